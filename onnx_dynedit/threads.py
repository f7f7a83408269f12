"""How many CPU threads the computing steps use (torch intra-op and ONNX Runtime intra-op).

Default (None): ``OMP_NUM_THREADS`` when it is set, else every core this process may run
on. Under contention from other busy
processes fewer threads can be much faster (OpenMP threads wait for each other); the
docs/results.md ("Threads") gives measured figures. ``configure`` records the number (the CLI always calls
it); the twin then applies it to torch when it is built (``apply_torch``) and every ONNX
Runtime session takes it (``session_options``). Until ``configure`` is called, torch and
ONNX Runtime keep their own defaults (a library caller, or a Ray worker that set its own
count, is left alone). torch is never imported here, so ``dynedit verify`` works
without it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_threads: int | None = None  # None: default()
_configured = False          # False: leave torch and ONNX Runtime at their own defaults


def all_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads from now on (None: ``default()``). Returns the number.
    Applied to torch at once when torch is already imported, else when a twin is built."""
    global _threads, _configured
    if threads is not None and int(threads) < 1:
        from .errors import InputError, option

        raise InputError(f"{option('threads')} must be at least 1, got {threads}")
    _threads = None if threads is None else int(threads)
    _configured = True
    import sys

    if "torch" in sys.modules:
        apply_torch()
    return count()


def default() -> int:
    """``OMP_NUM_THREADS`` when set to a positive integer (the user's environment wins),
    else all cores."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return all_cores()


def count() -> int:
    return _threads if _threads is not None else default()


def current() -> int | None:
    """The configured count, None while torch and ONNX Runtime keep their own defaults."""
    return count() if _configured else None


def reset() -> None:
    """Back to torch's and ONNX Runtime's own defaults for later sessions and twins."""
    global _threads, _configured
    _threads, _configured = None, False


def apply_torch() -> None:
    """Set torch's intra-op thread count (call where torch work starts); nothing until
    ``configure`` was called."""
    if not _configured:
        return
    import torch

    n = count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        log.debug("torch intra-op threads: %d", n)


def session_options(options=None):
    """ONNX Runtime ``SessionOptions`` with ``intra_op_num_threads`` set once
    ``configure`` was called (a new object when ``options`` is None)."""
    if options is None:
        import onnxruntime as ort

        options = ort.SessionOptions()
    if _configured:
        options.intra_op_num_threads = count()
    return options


__all__ = ["all_cores", "default", "configure", "count", "current", "reset", "apply_torch", "session_options"]
