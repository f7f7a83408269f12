"""The Ray engine: the per-shard work of ``verify`` and of the key statistics on a Ray cluster.

Ray is optional (``pip install "onnx-dynedit[ray]"``); nothing here is imported unless
``--engine ray`` is asked for.

Where the work runs
  verify           one actor per CPU of the cluster (at most one per shard), each holding
                   a ``verify.ShardRunner`` (both models' ONNX Runtime sessions, one
                   intra-op thread), taking shards from an ``ActorPool``. Each shard comes
                   back as partial counts and sums; the driver reduces them in shard order,
                   exactly as the local engine does, so the figures are the same.
  key statistics   one actor per CPU (at most one per shard), each holding a torch twin of
                   the model built from the same file. For each request (layers, the edits
                   accepted so far) every shard comes back as per-layer sums of k k^T and
                   key counts (``rank_one.key_moments``), reduced on the driver in shard order
                   (``rank_one.stats_from_moments``).
Workers read the shards themselves, from the paths the driver was given: on a cluster
those paths must be visible from every node (a shared filesystem).

Failures: actors are created with ``max_restarts`` / ``max_task_retries``, so a worker
process that dies mid-run is restarted (its sessions rebuilt) and its shard re-run; a
user error inside a worker (a bad shard) comes back as the same one-line ``DynEditError``.

Ray's lifetime: ``ray_session(address)`` connects to an existing cluster (``address``,
e.g. ``ray://head:10001`` or ``auto``) or starts a local Ray with one CPU per core,
no dashboard and quiet logs, and shuts it down afterwards. When Ray is already
initialised in this process (tests, a notebook) it is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import errors
from .errors import DynEditError, InputError, option, short

logger = logging.getLogger(__name__)

MAX_RESTARTS = 2          # a worker process may die this many times (it is restarted each time)
MAX_TASK_RETRIES = 2      # a shard whose worker died is re-run this many times

# Fault injection for tests only: when this variable names a file that does not exist yet,
# the first worker task to see it creates the file and kills its own process (os._exit),
# so that Ray's restart-and-retry path runs for real.
CRASH_ONCE_ENV = "DYNEDIT_RAY_CRASH_ONCE"


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("the ray engine needs Ray, which is not installed",
                         hint=f'pip install "onnx-dynedit[ray]", or use {option("engine", "local")}') from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None):
    """Ray for the length of the block (see module doc); yields the ``ray`` module."""
    ray = import_ray()
    # Ray prints its notices (a worker died, a task is retried) on stdout; send them to
    # stderr while Ray runs, so that stdout stays the command's own (--json: JSON only).
    with contextlib.redirect_stdout(sys.stderr):
        if ray.is_initialized():
            yield ray
            return
        with _started(ray, address, num_cpus):
            yield ray


@contextlib.contextmanager
def _started(ray, address, num_cpus):
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                  configure_logging=True)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
            raise InputError(f"cannot connect to the Ray cluster at {address}: {short(exc)}",
                             hint="start it with `ray start --head` and give its address, "
                                  f"or drop {option('ray_address')}") from None
        logger.info("connected to Ray at %s", address)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(address="local", num_cpus=cpus, **kwargs)  # "local": a new instance, never a running one
        logger.info("started a local Ray with %d CPUs", cpus)
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A quick TCP check of ``host:port`` (Ray itself retries an unreachable address for
    minutes); ``auto`` and other forms are left to Ray."""
    text = address.split("://", 1)[-1]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"cannot connect to the Ray cluster at {address}: {short(exc)}",
                         hint="start it with `ray start --head` and give its address (or auto), "
                              f"or drop {option('ray_address')} to start a local Ray") from None


def cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# --------------------------------------------------------------------------- workers


def _crash_once_for_tests() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


def _peak_rss_kb() -> int | None:
    """This process's peak resident memory (Linux VmHWM), None where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _guarded(fn, *args, **kwargs):
    """Run ``fn``; a user error comes back as data (re-raised on the driver as the same
    class with the same one line), anything else keeps its traceback."""
    try:
        return ("ok", fn(*args, **kwargs))
    except DynEditError as exc:
        return ("error", type(exc).__name__, exc.raw_message, exc.raw_hint)  # option references kept


def _unwrap(result):
    if result[0] == "ok":
        return result[1]
    _, name, message, hint = result
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DynEditError)):
        cls = DynEditError
    raise cls(message, hint=hint)


class VerifyWorker:
    """A Ray actor: both models' sessions, run on one shard at a time."""

    def __init__(self, original, edited, provider, batch_size):
        from .verify import ShardRunner

        self.init = _guarded(ShardRunner, original, edited, provider, batch_size, threads=1)

    def peak_rss_kb(self) -> int | None:
        return _peak_rss_kb()

    def run(self, job):
        _crash_once_for_tests()
        if self.init[0] != "ok":
            return self.init
        return _guarded(self.init[1].run, job)


class KeyStatsWorker:
    """A Ray actor: a torch twin of the model (CPU), key moments of one shard at a time."""

    def __init__(self, model_path):
        import torch

        torch.set_num_threads(1)
        self.init = _guarded(_build_twin, model_path)

    def moments(self, dataset, index, layer_nodes, edits, batch_size, max_keys):
        _crash_once_for_tests()
        if self.init[0] != "ok":
            return self.init
        return _guarded(_shard_moments, self.init[1], dataset, index, layer_nodes, edits, batch_size, max_keys)


@dataclass(frozen=True)
class _Edit:
    layer: object
    u: object
    d: object


def _build_twin(model_path):
    from .io import load_model
    from .twin import Twin

    return Twin(load_model(model_path), "cpu")


def _shard_moments(twin, dataset, index, layer_nodes, edits, batch_size, max_keys):
    import torch

    from .keystats import fitted_shard
    from .rank_one import key_moments

    layers = [twin.layer_map.get(n) for n in layer_nodes]
    x = fitted_shard(twin, dataset, index)
    torch_edits = [_Edit(twin.layer_map.get(node), torch.as_tensor(u), torch.as_tensor(d)) for node, u, d in edits]
    return key_moments(twin, layers, x, edits=torch_edits, batch_size=batch_size, max_keys=max_keys)


def _actor(ray, cls):
    return ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(cls)


# --------------------------------------------------------------------------- verify


def verify_partials(original, edited, provider, batch_size, jobs: Sequence, weights: Sequence[int], *,
                    address: str | None = None, progress: Callable[[int, int], None] | None = None,
                    total: int = 0) -> tuple[list, int]:
    """The partial figures of every job (in job order) and the number of workers used."""
    with ray_session(address) as ray:
        from ray.util import ActorPool

        n_workers = min(cluster_cpus(ray), len(jobs))
        worker = _actor(ray, VerifyWorker)
        actors = [worker.remote(str(original), str(edited), provider, batch_size) for _ in range(n_workers)]
        logger.info("verify on Ray: %d shards over %d workers", len(jobs), n_workers)
        pool = ActorPool(actors)
        out, done = [], 0
        try:
            for i, result in enumerate(pool.map(lambda a, job: a.run.remote(job), list(jobs))):
                out.append(_unwrap(result))
                done += weights[i]
                if progress is not None:
                    progress(done, total)
            peaks = ray.get([a.peak_rss_kb.remote() for a in actors])
            logger.info("verify on Ray: worker peak RSS %s KiB", peaks, extra={"worker_peak_rss_kb": peaks})
        finally:
            for a in actors:
                ray.kill(a)
        return out, n_workers


# --------------------------------------------------------------------------- key statistics


class RayKeyStats:
    """Key moments over a sharded stats set on Ray, for the length of a ``with`` block
    (the actors, each holding a twin, live across the loop's repeated requests)."""

    def __init__(self, model_path, dataset, *, address: str | None = None):
        self.model_path = str(model_path)
        self.dataset = dataset
        self.address = address
        self.workers = 0
        self._stack = None
        self._actors = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._ray = self._stack.enter_context(ray_session(self.address))
        self.workers = min(cluster_cpus(self._ray), len(self.dataset.shards))
        worker = _actor(self._ray, KeyStatsWorker)
        self._actors = [worker.remote(self.model_path) for _ in range(self.workers)]
        logger.info("key statistics on Ray: %d shards over %d workers", len(self.dataset.shards), self.workers)
        return self

    def __exit__(self, *exc):
        try:
            for a in self._actors or ():
                self._ray.kill(a)
        finally:
            self._actors = None
            self._stack.close()

    def moments(self, layer_nodes, edits, *, batch_size, max_keys) -> list:
        """Per-shard moments, in shard order."""
        from ray.util import ActorPool

        pool = ActorPool(self._actors)
        args = [(i,) for i in range(len(self.dataset.shards))]
        results = pool.map(lambda a, i: a.moments.remote(self.dataset, i[0], list(layer_nodes), list(edits),
                                                          batch_size, max_keys), args)
        return [_unwrap(r) for r in results]
