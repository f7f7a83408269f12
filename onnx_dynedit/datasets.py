"""Datasets as one ``.npz`` or a folder / glob of ``.npz`` shards, read one shard at a time.

A dataset argument (``--clean``, ``--corrupt``, ``--stats``, ``--val``) is
  - a path to one ``.npz`` file,
  - a folder: every ``*.npz`` directly inside it, in sorted name order, or
  - a glob pattern (``data/part-*.npz``), in sorted name order.
Every shard holds the same keys (``x`` and, for labelled sets, ``y``) with the same
trailing shape and dtype; rows may differ from shard to shard.

``open_dataset`` checks every shard's *headers* up front (keys, shapes, dtypes, no
pickled arrays, sizes that fit the archive; nothing is allocated from the data), so a
bad shard is refused before any work starts, with the file named, as one line.
``Dataset.load(i)`` then reads one shard with ``data.load_samples`` (``allow_pickle=False``,
finite values, integer labels). Callers stream: they hold one shard at a time, so peak
memory follows the largest shard, not the number of shards.

Numpy only (``dynedit verify`` must work without torch).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Samples, load_samples, npz_headers
from .errors import DataError

logger = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Shard:
    """One shard: its file and what its headers declare."""

    path: str
    n: int
    x_shape: tuple[int, ...]     # the whole array, rows first
    x_dtype: np.dtype
    has_labels: bool


@dataclass(frozen=True)
class Dataset:
    """A checked list of shards (``what`` names the set in messages: clean, stats, ...).

    ``samples`` holds an in-memory set (one pseudo-shard) given as ``Samples``; a set on
    disk has ``samples=None`` and is read shard by shard.
    """

    source: str
    what: str
    labels: str                  # 'optional', 'required' or 'ignored' (data.load_samples)
    shards: tuple[Shard, ...]
    samples: Samples | None = None

    @property
    def n(self) -> int:
        return sum(s.n for s in self.shards)

    @property
    def has_labels(self) -> bool:
        return self.labels != "ignored" and all(s.has_labels for s in self.shards)

    @property
    def sharded(self) -> bool:
        return self.samples is None and (len(self.shards) > 1 or Path(self.source) != Path(self.shards[0].path))

    @property
    def x_shape(self) -> tuple[int, ...]:
        """Trailing shape of one input (the same in every shard)."""
        return tuple(self.shards[0].x_shape[1:])

    @property
    def x_dtype(self) -> np.dtype:
        return self.shards[0].x_dtype

    def layouts(self):
        """One ``(shard, message name)`` per distinct declared row shape and dtype, for header checks."""
        seen = set()
        for shard in self.shards:
            key = (shard.x_shape[1:], shard.x_dtype)
            if key not in seen:
                seen.add(key)
                yield shard, f"{self.what} {shard.path}: 'x'"

    def load(self, i: int) -> Samples:
        """Read shard ``i`` (all of it) with the safe npz loader."""
        if self.samples is not None:
            return self.samples
        shard = self.shards[i]
        samples = load_samples(shard.path, what=self.what, labels=self.labels)
        if samples.x.shape != shard.x_shape:  # the file changed since it was opened
            raise DataError(f"{self.what} shard {shard.path}: 'x' has shape {samples.x.shape} but its header "
                            f"said {shard.x_shape} when the dataset was opened", hint="do not rewrite shards during a run")
        return samples

    def __iter__(self) -> Iterator[Samples]:
        for i in range(len(self.shards)):
            yield self.load(i)

    def head(self, n: int) -> np.ndarray:
        """The first ``n`` inputs (at most), reading only the shards they lie in."""
        parts, have = [], 0
        for i in range(len(self.shards)):
            if have >= n:
                break
            x = self.load(i).x[: n - have]
            parts.append(x)
            have += len(x)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def load_all(self) -> Samples:
        """Every shard concatenated in memory (for sets that are used many times over)."""
        if self.samples is not None or len(self.shards) == 1:
            s = self.load(0)
            return Samples(x=s.x, y=s.y, source=self.source)
        loaded = list(self)
        y = np.concatenate([s.y for s in loaded]) if all(s.y is not None for s in loaded) else None
        return Samples(x=np.concatenate([s.x for s in loaded]), y=y, source=self.source)


def shard_paths(spec: str | os.PathLike, *, what: str = "data") -> list[Path]:
    """The files a dataset argument names (see module doc); none found is a ``DataError``."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise DataError(f"{what} folder {path} holds no .npz file", hint="put the shards (*.npz) directly in it")
        return files
    if path.exists() or not (_GLOB_CHARS & set(text)):
        return [path]  # one file (load_samples reports a missing or bad one)
    files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
    if not files:
        raise DataError(f"{what} pattern {text} matches no file", hint="check the path and the pattern")
    return files


def open_dataset(spec, *, what: str, labels: str = "optional") -> Dataset:
    """Open a dataset argument: a path, a folder or a glob of ``.npz`` shards, or an
    in-memory ``Samples``. Every shard's headers are checked (see module doc)."""
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, Samples):
        x = spec.x
        shard = Shard(path=spec.source, n=int(x.shape[0]) if x.ndim else 0, x_shape=tuple(x.shape),
                      x_dtype=x.dtype, has_labels=spec.y is not None)
        return Dataset(source=spec.source, what=what, labels=labels, shards=(shard,), samples=spec)
    files = shard_paths(spec, what=what)
    if len(files) == 1 and Path(str(spec)) == files[0]:
        # One file: the full safe load reports its problems in the familiar words.
        header = _header(files[0], what, labels)
        return Dataset(source=str(spec), what=what, labels=labels, shards=(header,))
    shards = tuple(_header(p, f"{what} shard", labels) for p in files)
    first = shards[0]
    for s in shards[1:]:
        if s.x_shape[1:] != first.x_shape[1:] or len(s.x_shape) != len(first.x_shape):
            raise DataError(f"{what} shard {s.path}: 'x' has shape {s.x_shape} but shard {first.path} has "
                            f"{first.x_shape}", hint="every shard must hold inputs of the same shape (rows may differ)")
        if s.x_dtype != first.x_dtype:
            raise DataError(f"{what} shard {s.path}: 'x' is {s.x_dtype} but shard {first.path} is {first.x_dtype}",
                            hint="save every shard with the same dtype")
        if labels == "optional" and s.has_labels != first.has_labels:
            with_y, without = (s, first) if s.has_labels else (first, s)
            raise DataError(f"{what} shard {without.path} has no labels 'y' but shard {with_y.path} has",
                            hint="give labels in every shard or in none")
    logger.info("%s: %d shards, %d inputs (%s)", what, len(shards), sum(s.n for s in shards), spec)
    return Dataset(source=str(spec), what=what, labels=labels, shards=shards)


def _header(path: Path, what: str, labels: str) -> Shard:
    if not path.exists():
        raise DataError(f"{what} file {path} does not exist", hint="check the path")
    if path.is_dir():
        raise DataError(f"{what} file {path} is a directory", hint="give the path of an .npz file")
    headers = npz_headers(path, what=what)
    keyed = sorted(k for k in headers if k.startswith("x:"))
    if "x" not in headers and keyed:  # several model inputs: 'x:<input name>' arrays, packed on load
        rows = {headers[k][0][0] if headers[k][0] else None for k in keyed}
        packed = np.dtype([(k[2:], headers[k][1], tuple(headers[k][0][1:])) for k in keyed])
        headers = {**headers, "x": ((rows.pop() if len(rows) == 1 else 0,), packed)}
    if "x" not in headers:
        raise DataError(f"{what} file {path} has no array 'x' (found: {', '.join(headers) or 'none'})",
                        hint="expected keys: x" + ("" if labels == "ignored" else ", y"))
    x_shape, x_dtype = headers["x"]
    if len(x_shape) == 0 or x_shape[0] == 0 or 0 in x_shape:
        raise DataError(f"{what} {path}: 'x' is empty (shape {x_shape})", hint="give at least one sample along the first axis")
    has_y = "y" in headers and labels != "ignored"
    if labels == "required" and "y" not in headers:
        raise DataError(f"{what} file {path} has no array 'y' (found: {', '.join(headers)})", hint="the true labels are required")
    if has_y:
        y_shape, y_dtype = headers["y"]
        if not np.issubdtype(y_dtype, np.integer):
            raise DataError(f"{what} {path}: labels 'y' must be integers, got {y_dtype}")
        rows = int(np.prod(y_shape)) if y_shape else 1
        if rows != x_shape[0]:
            raise DataError(f"{what} {path}: {x_shape[0]} inputs in 'x' but {rows} labels in 'y'")
    return Shard(path=str(path), n=int(x_shape[0]), x_shape=tuple(x_shape), x_dtype=x_dtype, has_labels=has_y)
