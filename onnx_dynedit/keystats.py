"""Key statistics over a stats set read shard by shard: here, or on Ray.

``rank_one.key_statistics(twin, layers, x)`` takes either inputs ``x`` in memory or a
``ShardedKeys``: then every shard gives per-layer sums of k k^T and key counts
(``rank_one.key_moments``), computed in this process one shard at a time (``local``) or
by Ray workers that each hold a twin of the model (``ray``, ``engine_ray``), and the
driver adds them in shard order (``rank_one.stats_from_moments``). Both engines run the
same per-shard function, so their statistics agree up to float rounding.

Use it as a context manager: the Ray workers live for the ``with`` block, across the
loop's repeated requests (the statistics are recomputed after every accepted edit).
"""

from __future__ import annotations

import logging

import numpy as np

from .datasets import Dataset
from .keys import patch_factors

logger = logging.getLogger(__name__)


class ShardedKeys:
    """The stats set of the key statistics, as shards (see module doc)."""

    def __init__(self, dataset: Dataset, *, engine: str = "local", ray_address: str | None = None,
                 model_path=None):
        if engine not in ("local", "ray"):
            raise ValueError(f"unknown engine {engine!r}")
        if engine == "ray" and model_path is None:
            raise ValueError("the ray engine needs the model's path (each worker builds its own twin)")
        self.dataset = dataset
        self.engine = engine
        self.ray_address = ray_address
        self.model_path = model_path
        self.workers = 1
        self._ray = None

    @property
    def n(self) -> int:
        return self.dataset.n

    def __len__(self) -> int:
        return self.dataset.n

    @property
    def source(self) -> str:
        k = len(self.dataset.shards)
        where = "" if self.engine == "local" else f", engine {self.engine} with {self.workers} worker(s)"
        return f"stats ({self.n} inputs in {k} shard{'s' if k != 1 else ''}{where})"

    def info(self) -> dict:
        return {"engine": self.engine, "workers": self.workers, "shards": len(self.dataset.shards), "n": self.n}

    def __enter__(self):
        if self.engine == "ray":
            from .engine_ray import RayKeyStats

            self._ray = RayKeyStats(self.model_path, self.dataset, address=self.ray_address).__enter__()
            self.workers = self._ray.workers
        return self

    def __exit__(self, *exc):
        if self._ray is not None:
            ray, self._ray = self._ray, None
            ray.__exit__(*exc)

    def shard_moments(self, twin, layers, *, edits=(), batch_size: int, max_keys: int) -> list:
        """Per-shard ``rank_one.key_moments`` of ``layers`` with ``edits`` applied, in shard order."""
        if self.engine == "local":
            from .rank_one import key_moments

            return [key_moments(twin, layers, fitted_shard(twin, self.dataset, i), edits=edits,
                                batch_size=batch_size, max_keys=max_keys)
                    for i in range(len(self.dataset.shards))]
        if self._ray is None:
            raise RuntimeError("ShardedKeys with the ray engine must be used inside a `with` block")
        plain = [(e.layer.node, u, d) for e in edits  # pixel-view edits as their patch factors
                 for u, d in patch_factors(e.layer, _numpy(e.u), _numpy(e.d), getattr(e, "view", "patch"))]
        return self._ray.moments([l.node for l in layers], plain, batch_size=batch_size, max_keys=max_keys)


def fitted_shard(twin, dataset: Dataset, index: int) -> np.ndarray:
    """Shard ``index`` of ``dataset`` (safe loader), checked against and cast to the model's input."""
    samples = dataset.load(index)
    return _fit(twin, samples.x, f"{dataset.what} {samples.source}: 'x'")


def check_shards(twin, dataset: Dataset) -> None:
    """Every shard's declared shape and dtype against the model's input(s), from the headers."""
    for shard, name in dataset.layouts():
        if not shard.x_dtype.names and len(twin.inputs) == 1:
            # the declared shape (a view of one zero: nothing allocated), then the dtype on one row
            _fit(twin, np.broadcast_to(np.zeros((), dtype=twin.inputs[0].dtype), shard.x_shape), name)
        _fit(twin, np.zeros((1,) + tuple(shard.x_shape[1:]), dtype=shard.x_dtype), name)


def _fit(twin, x: np.ndarray, name: str) -> np.ndarray:
    from .api import fit_input  # the same checks as an .npz in memory (one input or several)

    return fit_input(twin, x, name)


def _numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=np.float32)
