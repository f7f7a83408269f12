"""Loading and saving ONNX models safely.

- The input file (and its external data) is only ever read.
- External-data locations that leave the model's folder (absolute paths, ``..``) are
  refused, and so are tensors whose declared size is absurd, before anything is
  allocated.
- Saving is atomic: temporary file in the target folder, fsync, rename. External data
  goes to a file named after its content hash, written and renamed *before* the model,
  so a crash leaves either the old model (still pointing at its old data) or the new one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import ModelLoadError, OutputError, UnsafeInputError

log = logging.getLogger(__name__)

# Refuse any single tensor that declares more elements than this (8 G elements).
MAX_TENSOR_ELEMENTS = 1 << 33
# Tensors at least this large (bytes) go to external data for newly created tensors.
EXTERNAL_THRESHOLD = 1024


@dataclass(frozen=True)
class LoadedModel:
    """A model read from disk (or given as a proto), external data already in memory."""

    model: onnx.ModelProto = field(repr=False)
    path: Path | None
    sha256: str
    external_names: frozenset[str] = frozenset()  # tensors that lived in external data

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_names)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<in-memory model>"

    def protected_paths(self) -> list[Path]:
        """Files that must never be overwritten: the model and its external data."""
        if self.path is None:
            return []
        out = [self.path.resolve()]
        for tensor in _all_tensors(self.model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    out.append((self.path.parent / entry.value).resolve())
        return out


def model_sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def load_model(src: str | os.PathLike | onnx.ModelProto | LoadedModel, *, check: bool = True) -> LoadedModel:
    """Load an ONNX model from a path (external data beside it) or wrap a ModelProto.

    Every failure is a ``ModelLoadError`` / ``UnsafeInputError`` naming the file.
    """
    if isinstance(src, LoadedModel):
        return src
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        _check_sizes(model, "<in-memory model>")
        if check:
            _run_checker(model, "<in-memory model>")
        return LoadedModel(model=model, path=None, sha256=model_sha256(model))

    path = Path(src)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist", hint="check the path")
    if not path.is_file():
        raise ModelLoadError(f"model path {path} is not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty")
    try:
        with open(path, "rb") as fh:
            model = onnx.load_model_from_string(fh.read())
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})",
            hint="is the file truncated or of another format?",
        ) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph or no ir_version)",
                             hint="is the file truncated or of another format?")
    _check_sizes(model, str(path))
    external = _load_external(model, path)
    if check:
        _run_checker(model, str(path))
    return LoadedModel(model=model, path=path, sha256=model_sha256(model), external_names=frozenset(external))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _all_tensors(model: onnx.ModelProto):
    """Initializers and Constant-node tensors of the main graph and its subgraphs."""

    def walk(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)


def _check_sizes(model: onnx.ModelProto, label: str) -> None:
    for tensor in _all_tensors(model):
        dims = list(tensor.dims)
        if any(d < 0 for d in dims):
            raise UnsafeInputError(f"{label}: tensor {tensor.name!r} has a negative dimension {dims}")
        n = 1
        for d in dims:
            n *= d
            if n > MAX_TENSOR_ELEMENTS:
                raise UnsafeInputError(f"{label}: tensor {tensor.name!r} declares an absurd shape {dims}",
                                       hint="the file is corrupt or hostile")


def _load_external(model: onnx.ModelProto, path: Path) -> list[str]:
    base = path.parent.resolve()
    names = []
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} is marked external but names no file")
        if os.path.isabs(location) or ".." in Path(location).parts or location.startswith(("/", "\\")):
            raise UnsafeInputError(
                f"{path}: external data of tensor {tensor.name!r} points outside the model's folder ({location!r})",
                hint="external data must be a relative path inside the model's folder",
            )
        target = (base / location).resolve()
        if base not in target.parents and target != base:
            raise UnsafeInputError(f"{path}: external data of tensor {tensor.name!r} resolves outside the model's folder ({location!r})")
        if not target.is_file():
            raise ModelLoadError(f"{path}: external data file {location!r} for tensor {tensor.name!r} is missing",
                                 hint=f"copy it next to {path.name}")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has a malformed external-data offset/length") from None
        size = target.stat().st_size
        itemsize = _itemsize(tensor.data_type)
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize if itemsize else None
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelLoadError(f"{path}: external data for {tensor.name!r} ({location!r}) is truncated: "
                                 f"needs bytes {offset}..{offset + length}, file has {size}")
        if expected is not None and length != expected:
            raise ModelLoadError(f"{path}: external data for {tensor.name!r} has {length} bytes, its shape needs {expected}")
        with open(target, "rb") as fh:
            fh.seek(offset)
            tensor.raw_data = fh.read(length)
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # as if it had always been stored inline
        names.append(tensor.name)
    return names


def _itemsize(data_type: int) -> int | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:  # noqa: BLE001 - string or exotic types
        return None


def _run_checker(model: onnx.ModelProto, label: str) -> None:
    try:
        if model.ByteSize() < (2 << 30) - (1 << 20):
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{label} fails the ONNX checker: {_first_line(exc)}",
                             hint="fix the model or re-export it") from None
    except Exception as exc:  # noqa: BLE001 - the checker raises assorted C++ errors
        raise ModelLoadError(f"{label} fails the ONNX checker: {_first_line(exc)}") from None


# --------------------------------------------------------------------------- saving


def check_output_path(out: str | os.PathLike, protected: list[Path], *, in_place: bool = False) -> Path:
    """Refuse writing over an input unless ``in_place``; refuse a missing folder."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise OutputError(f"output {out} is a directory", hint="give a file name such as model.fixed.onnx")
    if not out.parent.exists():
        raise OutputError(f"output folder {out.parent} does not exist", hint="create it first")
    resolved = out.resolve()
    if resolved in protected and not in_place:
        raise OutputError(f"refusing to overwrite the input {out}",
                          hint="write to another path, or pass --in-place (a .bak copy is kept)")
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model(model: onnx.ModelProto, out: str | os.PathLike, *, external_names=None,
               protected: list[Path] | None = None, in_place: bool = False) -> Path:
    """Save ``model`` atomically to ``out``.

    ``external_names``: tensor names to store as external data (None or empty: one
    file). With ``in_place`` and ``out`` among ``protected``, a ``.bak`` copy of the
    old file is kept first.
    """
    protected = protected or []
    out = check_output_path(out, protected, in_place=in_place)
    if in_place and out.resolve() in protected and out.exists():
        backup = out.with_name(out.name + ".bak")
        shutil.copy2(out, backup)
        log.info("kept a backup of %s at %s", out, backup)

    model = _copy(model)
    old_data = _previous_data_files(out)
    data_name = None
    if external_names:
        blob, data_name = _externalize(model, set(external_names), out.name)
        if data_name is not None:
            atomic_write_bytes(out.parent / data_name, blob)
    payload = model.SerializeToString(deterministic=True)
    atomic_write_bytes(out, payload)
    for stale in old_data:
        if stale.name != data_name and stale.resolve() not in protected:
            try:
                stale.unlink()
            except OSError:
                pass
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _externalize(model: onnx.ModelProto, names: set[str], out_name: str) -> tuple[bytes, str | None]:
    chunks: list[bytes] = []
    offset = 0
    moved = []
    for tensor in _all_tensors(model):
        if tensor.name not in names or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if not tensor.HasField("raw_data"):
            arr = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))
        data = tensor.raw_data
        pad = (-offset) % 64  # keep offsets aligned, as onnx.save does with align
        if pad:
            chunks.append(b"\0" * pad)
            offset += pad
        chunks.append(data)
        moved.append((tensor, offset, len(data)))
        offset += len(data)
    if not moved:
        return b"", None
    blob = b"".join(chunks)
    data_name = f"{out_name}.{hashlib.sha256(blob).hexdigest()[:12]}.data"
    for tensor, off, length in moved:
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", data_name), ("offset", str(off)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return blob, data_name


def _previous_data_files(out: Path) -> list[Path]:
    """External-data files written by us for a previous version of ``out``."""
    return sorted(out.parent.glob(f"{out.name}.*.data"))
