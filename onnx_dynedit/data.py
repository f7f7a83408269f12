"""Loading the user's .npz inputs safely (no pickles, no surprises).

Formats (all loaded with ``allow_pickle=False``):
  pairs.npz  ``corrupt`` and ``clean``: same shape [N, ...], N >= 1, row i of ``clean``
             is the cleansed twin of row i of ``corrupt``.
  stats.npz  ``x``: unlabeled inputs the model normally sees.
  val.npz    ``x`` and optionally ``y`` (integer labels).
  verify     ``x`` and optionally ``y`` (same as val).
Models with several inputs: give one array per model input, keyed
``<key>:<input name>`` (e.g. ``corrupt:input_ids`` and ``corrupt:attention_mask``);
``load_npz`` packs them into one structured array (``pack_inputs``: one field per input,
rows aligned) that slices, concatenates and indexes like a plain batch.

This module needs numpy only (``dynedit verify`` must work without torch).
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, UnsafeInputError, short

# Refuse arrays larger than this many elements before allocating them.
MAX_ARRAY_ELEMENTS = 1 << 31


def exceeds(dims, limit: int) -> bool:
    """True when a declared shape has a negative dim or more than ``limit`` elements
    (checked before anything is allocated from it)."""
    n = 1
    for d in dims:
        d = int(d)
        if d < 0:
            return True
        n *= d
    return n > limit


def load_npz(path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...] = (),
             *, what: str = "data") -> dict[str, np.ndarray]:
    """Load the named arrays of an .npz file; every failure is a one-line ``DataError``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} file {path} does not exist", hint="check the path")
    if path.is_dir():
        raise DataError(f"{what} file {path} is a directory", hint="give the path of an .npz file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{what} file {path} is not an .npz archive",
                        hint="save it with numpy.savez(path, " + ", ".join(f"{k}=..." for k in required) + ")")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds here
        raise DataError(f"{what} file {path} cannot be read: {short(exc)}") from None
    with archive:
        found = list(archive.files)
        grouped = {k: [f for f in found if f.startswith(k + ":")] for k in required + optional if k not in found}
        missing = [k for k in required if k not in found and not grouped.get(k)]
        if missing:
            raise DataError(
                f"{what} file {path} has no array {missing[0]!r} (found: {', '.join(found) or 'none'})",
                hint="expected keys: " + ", ".join(required + optional),
            )
        out = {}
        for key in required + optional:
            if key in found:
                out[key] = _read_member(archive, path, key, what)
            elif grouped.get(key):
                parts = {m.split(":", 1)[1]: _read_member(archive, path, m, what) for m in grouped[key]}
                out[key] = pack_inputs(parts, name=f"{what} file {path}: {key!r}")
    return out


def pack_inputs(arrays: dict[str, np.ndarray], *, name: str = "inputs") -> np.ndarray:
    """One structured array [N] with a field per model input (its row shape and dtype)."""
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if any(n is None for n in sizes.values()) or len(set(sizes.values())) != 1:
        raise DataError(f"{name}: the arrays of the inputs have different numbers of rows "
                        f"({', '.join(f'{k}: {n}' for k, n in sizes.items())})",
                        hint="row i of every '<key>:<input name>' array belongs to the same sample")
    n = next(iter(sizes.values()))
    dtype = np.dtype([(k, v.dtype, v.shape[1:]) for k, v in arrays.items()])
    out = np.empty(n, dtype=dtype)
    for k, v in arrays.items():
        out[k] = v
    return out


def fields(arr: np.ndarray) -> dict[str, np.ndarray]:
    """{input name: array} of a packed array, or {"": arr} of a plain one."""
    if arr.dtype.names:
        return {k: arr[k] for k in arr.dtype.names}
    return {"": arr}


def _read_member(archive, path: Path, key: str, what: str) -> np.ndarray:
    _member_header(archive, path, key, what)
    try:
        arr = archive[key]
    except Exception as exc:  # noqa: BLE001 - numpy / zipfile raise many kinds here
        raise DataError(f"{what} file {path}: array {key!r} cannot be read ({short(exc)})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise UnsafeInputError(f"{what} file {path}: array {key!r} is not a plain numeric array")
    return arr


def npz_headers(path: str | os.PathLike, *, what: str = "data") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of every array in an .npz, from the headers only (nothing
    is allocated from the data); the same checks as ``load_npz`` (no pickles, sizes that
    fit the archive), every failure a one-line ``DataError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist or is not a file", hint="check the path")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{what} file {path} is not an .npz archive", hint="save it with numpy.savez")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds here
        raise DataError(f"{what} file {path} cannot be read: {short(exc)}") from None
    with archive:
        return {key: _member_header(archive, path, key, what) for key in archive.files}


def _member_header(archive, path: Path, key: str, what: str) -> tuple[tuple[int, ...], np.dtype]:
    # Check the header (shape, dtype) against the member's size before numpy allocates.
    member = key + ".npy"
    try:
        info = archive.zip.getinfo(member)
        with archive.zip.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            header_end = fh.tell()
    except Exception as exc:  # noqa: BLE001 - numpy / zipfile raise many kinds on bad headers
        raise DataError(f"{what} file {path}: array {key!r} has a broken header ({short(exc)})",
                        hint="re-save it with numpy.savez") from None
    if dtype.hasobject:
        raise UnsafeInputError(f"{what} file {path}: array {key!r} holds Python objects",
                               hint="only numeric arrays are accepted (allow_pickle=False)")
    dims = [int(d) for d in shape]
    if exceeds(dims, MAX_ARRAY_ELEMENTS):
        raise UnsafeInputError(f"{what} file {path}: array {key!r} declares an absurd shape {tuple(dims)}",
                               hint="the file is corrupt or hostile")
    need = math.prod(dims) * dtype.itemsize
    have = info.file_size - header_end
    if need > have:
        raise DataError(f"{what} file {path}: array {key!r} declares shape {tuple(dims)} ({need} bytes) "
                        f"but holds only {max(have, 0)} bytes", hint="the file is truncated or tampered with")
    return tuple(dims), np.dtype(dtype)


def check_finite(arr: np.ndarray, *, name: str) -> None:
    if arr.dtype.names:
        for k in arr.dtype.names:
            check_finite(arr[k], name=f"{name}[{k!r}]")
        return
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{name} holds {bad} NaN/Inf value(s)", hint="clean the data; non-finite inputs would poison the edit")


def check_nonempty(arr: np.ndarray, *, name: str) -> None:
    if arr.ndim == 0 or arr.shape[0] == 0 or arr.size == 0:
        raise DataError(f"{name} is empty (shape {arr.shape})", hint="give at least one sample along the first axis")


@dataclass(frozen=True)
class Pairs:
    corrupt: np.ndarray
    clean: np.ndarray
    source: str

    @property
    def n(self) -> int:
        return int(self.corrupt.shape[0])


def load_pairs(path: str | os.PathLike) -> Pairs:
    arrays = load_npz(path, ("corrupt", "clean"), what="pairs")
    corrupt, clean = arrays["corrupt"], arrays["clean"]
    for key, arr in arrays.items():
        check_nonempty(arr, name=f"pairs {path}: {key!r}")
        check_finite(arr, name=f"pairs {path}: {key!r}")
    if corrupt.shape[0] != clean.shape[0]:
        raise DataError(
            f"pairs {path}: {corrupt.shape[0]} rows in 'corrupt' but {clean.shape[0]} in 'clean'",
            hint="row i of clean must be the cleansed twin of row i of corrupt: give as many of each",
        )
    if corrupt.shape != clean.shape:
        raise DataError(
            f"pairs {path}: 'corrupt' has shape {corrupt.shape} but 'clean' has {clean.shape}",
            hint="row i of clean must be the cleansed twin of row i of corrupt",
        )
    if corrupt.dtype != clean.dtype:
        raise DataError(f"pairs {path}: 'corrupt' is {corrupt.dtype} but 'clean' is {clean.dtype}")
    return Pairs(corrupt=corrupt, clean=clean, source=str(path))


@dataclass(frozen=True)
class Samples:
    x: np.ndarray
    y: np.ndarray | None
    source: str


def load_samples(path: str | os.PathLike, *, what: str, labels: str = "optional") -> Samples:
    """Load ``x`` (and ``y``). ``labels``: 'optional', 'required' or 'ignored'."""
    required = ("x", "y") if labels == "required" else ("x",)
    optional = ("y",) if labels == "optional" else ()
    arrays = load_npz(path, required, optional, what=what)
    x = arrays["x"]
    check_nonempty(x, name=f"{what} {path}: 'x'")
    check_finite(x, name=f"{what} {path}: 'x'")
    y = arrays.get("y")
    if y is not None and labels != "ignored":
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{what} {path}: labels 'y' must be integers, got {y.dtype}")
        y = y.reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise DataError(f"{what} {path}: {x.shape[0]} inputs in 'x' but {y.shape[0]} labels in 'y'")
    else:
        y = None
    return Samples(x=x, y=y, source=str(path))


def check_labels(y: np.ndarray, num_classes: int, *, name: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{name}: labels must lie in [0, {num_classes - 1}] for this model's {num_classes} outputs, "
            f"found {int(y.min())}..{int(y.max())}"
        )


def check_against_input(arr: np.ndarray, *, name: str, input_name: str, shape: list, dtype: np.dtype) -> np.ndarray:
    """Check an array [N, ...] against a model input's declared shape (symbolic dims are free)
    and dtype; returns the array cast to that dtype when the cast is safe."""
    if arr.ndim != len(shape):
        raise DataError(
            f"{name} has shape {arr.shape} but model input {input_name!r} is {_shape_str(shape)}",
            hint="the first axis is the batch; reshape the data to match",
        )
    for i, (have, want) in enumerate(zip(arr.shape, shape)):
        if i == 0:
            continue
        if isinstance(want, int) and want > 0 and have != want:
            raise DataError(
                f"{name} has shape {arr.shape} but model input {input_name!r} is {_shape_str(shape)} (axis {i})",
            )
    if arr.dtype != dtype:
        same_kind = (np.issubdtype(arr.dtype, np.floating) and np.issubdtype(dtype, np.floating)) or (
            np.issubdtype(arr.dtype, np.integer) and np.issubdtype(dtype, np.integer))
        if not same_kind:
            raise DataError(f"{name} is {arr.dtype} but model input {input_name!r} expects {np.dtype(dtype)}",
                            hint=f"save the array as {np.dtype(dtype)}")
        was_finite = not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(dtype)
        if np.issubdtype(arr.dtype, np.floating) and was_finite and not np.isfinite(arr).all():
            raise DataError(f"{name} holds values too large for the model's {np.dtype(dtype)} input "
                            f"{input_name!r} (they would become Inf)", hint="rescale the data as the model expects")
    return arr


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
