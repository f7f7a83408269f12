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
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .data import exceeds
from .errors import ModelLoadError, OutputError, UnsafeInputError, option

log = logging.getLogger(__name__)

# Refuse any single tensor that declares more elements than this (8 G elements).
MAX_TENSOR_ELEMENTS = 1 << 33
# Refuse a model input, or a tensor made from a shape (ConstantOfShape), with more
# elements than this (256 M): dynedit allocates such tensors itself (parity inputs,
# weight placeholders), and a few bytes of a hostile file must not ask for terabytes.
MAX_SYNTH_ELEMENTS = 1 << 28
# A model read from a file with more tensor data than this drops it from memory while an
# edit runs (``LoadedModel.release_weights``) and reads the file again before writing.
RELEASE_ABOVE = 64 << 20
# Tensors at most this large keep their data when released (shapes and Constant scalars).
_KEEP_BELOW = 4096
_DATA_FIELDS = ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data")


@dataclass(frozen=True)
class LoadedModel:
    """A model read from disk (or given as a proto), external data already in memory."""

    model: onnx.ModelProto = field(repr=False)
    path: Path | None
    sha256: str
    external_names: frozenset[str] = frozenset()  # tensors that lived in external data
    external_files: frozenset[Path] = frozenset()  # the (resolved) files they were read from

    released: bool = False  # the large tensors' data is not in memory (release_weights)
    file_digest: str = field(default="", repr=False)  # sha256 of the bytes read (file, then external data)

    def release_weights(self) -> bool:
        """Drop the data of the large tensors from memory; the graph, every name and shape
        and the small tensors stay. Only for a model read from a file with more than
        RELEASE_ABOVE bytes of tensor data: the twin holds its own copy of the weights, so
        the edit then runs with one copy instead of two (VGG-16: 528 MB).
        ``restore_weights`` reads them from the file again. Returns whether it released."""
        if self.path is None or self.released:
            return False
        tensors = list(_all_tensors(self.model))
        if sum(t.ByteSize() for t in tensors) <= RELEASE_ABOVE:
            return False
        for tensor in tensors:
            if tensor.ByteSize() > _KEEP_BELOW:
                for name in _DATA_FIELDS:
                    tensor.ClearField(name)
        lite = onnx.ModelProto()
        lite.CopyFrom(self.model)  # a small copy; the parsed original's memory goes with it
        object.__setattr__(self, "model", lite)
        object.__setattr__(self, "released", True)
        return True

    def restore_weights(self) -> None:
        """Read the weights dropped by ``release_weights`` from the file again; a file
        that changed since it was loaded is a ModelLoadError (nothing is written)."""
        if not self.released:
            return
        digest = hashlib.sha256()  # the same bytes as at load: the same checked model, the same sha256
        model = _parse(self.path, digest=digest)
        _load_external(model, self.path, digest)
        if digest.hexdigest() != self.file_digest:
            raise ModelLoadError(f"{self.path} changed on disk while it was being edited",
                                 hint="edit a copy that no other program writes to")
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "released", False)

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
        out = [self.path.resolve(), *sorted(self.external_files)]
        for tensor in _all_tensors(self.model):  # external data left in place (not loaded)
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
        label = "<in-memory model>"
        _check_strings(model, label)
        _check_sizes(model, label)
        _check_tensor_data(model, label)
        _check_io(model, label)
        _check_constant_of_shape(model, label)
        if check:
            _run_checker(model, "<in-memory model>")
        return LoadedModel(model=model, path=None, sha256=model_sha256(model))

    path = Path(src)
    digest = hashlib.sha256()
    model = _parse(path, digest=digest)
    _check_sizes(model, str(path))
    external = _load_external(model, path, digest)
    _check_tensor_data(model, str(path))
    _check_io(model, str(path))
    _check_constant_of_shape(model, str(path))
    if check:
        _run_checker(model, str(path))
    return LoadedModel(model=model, path=path, sha256=model_sha256(model), file_digest=digest.hexdigest(),
                       external_names=frozenset(name for name, _ in external),
                       external_files=frozenset(file for _, file in external))


def check_model_file(src: str | os.PathLike, *, what: str = "model") -> None:
    """The safety checks of ``load_model`` for a file another runtime will load (e.g.
    ONNX Runtime in ``dynedit verify``), without reading external data into memory:
    readable ONNX, no external data outside the model's folder or past the end of its
    file, no absurd shapes, stored data consistent with the declared shapes, tensor
    inputs and outputs. Raises ``ModelLoadError`` / ``UnsafeInputError``."""
    path = Path(src)
    model = _parse(path, what=what)
    label = f"{what} {path}"
    _check_sizes(model, label)
    for _tensor, _target, _offset, _length in _external_entries(model, path, label):
        pass
    _check_tensor_data(model, label)
    _check_io(model, label)
    _check_constant_of_shape(model, label)


def _parse(path: Path, *, what: str = "model", digest=None) -> onnx.ModelProto:
    """The model in ``path``; ``digest`` (a hashlib object), when given, is fed the file's bytes."""
    try:
        if not path.exists():
            raise ModelLoadError(f"{what} file {path} does not exist", hint="check the path")
        if not path.is_file():
            raise ModelLoadError(f"{what} path {path} is not a file", hint="give the path of an .onnx file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{what} file {path} is empty", hint="is the file truncated?")
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ModelLoadError(f"{what} file {path} cannot be read ({exc.strerror or exc})") from None
    if digest is not None:
        digest.update(data)
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})",
            hint="is the file truncated or of another format?",
        ) from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph or no ir_version)",
                             hint="is the file truncated or of another format?")
    _check_strings(model, str(path))
    return model


def _check_strings(message, label: str, where: str = "model") -> None:
    """Every string field (names, op types, domains, ...) must be valid UTF-8; protobuf
    hands invalid ones back as bytes, which would break every later step."""
    from google.protobuf.descriptor import FieldDescriptor

    for field_desc, value in message.ListFields():
        repeated = (field_desc.is_repeated if hasattr(field_desc, "is_repeated")
                    else field_desc.label == FieldDescriptor.LABEL_REPEATED)
        if field_desc.type == FieldDescriptor.TYPE_STRING:
            values = value if repeated else [value]
            if any(not isinstance(v, str) for v in values):
                raise ModelLoadError(f"{label}: field {where}.{field_desc.name} is not valid UTF-8",
                                     hint="the file is corrupt")
        elif field_desc.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if repeated else [value]
            for item in items:
                _check_strings(item, label, f"{where}.{field_desc.name}")


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
    """Refuse negative or absurd dims before anything is allocated from them."""
    for tensor in _all_tensors(model):
        dims = [int(d) for d in tensor.dims]
        if any(d < 0 for d in dims):
            raise UnsafeInputError(f"{label}: tensor {tensor.name!r} has a negative dimension {dims}")
        if exceeds(dims, MAX_TENSOR_ELEMENTS):
            raise UnsafeInputError(f"{label}: tensor {tensor.name!r} declares an absurd shape {dims}",
                                   hint="the file is corrupt or hostile")


# Elements per typed field entry, for the types whose values do not live in int32_data.
_TYPED_FIELD = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
}
# Sub-byte types: bits per element (packed in raw_data).
_SUB_BYTE_BITS = {name: bits for name, bits in (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2),
                                                 ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))}
_SUB_BYTE = {getattr(onnx.TensorProto, name): bits for name, bits in _SUB_BYTE_BITS.items()
             if hasattr(onnx.TensorProto, name)}


def _numel(tensor) -> int:
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return n


def _type_name(data_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def _expected_nbytes(tensor) -> int | None:
    """Bytes of raw data that ``tensor``'s dims and data_type call for (None: unknown type)."""
    n = _numel(tensor)
    if tensor.data_type in _SUB_BYTE:
        return -(-n * _SUB_BYTE[tensor.data_type] // 8)
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    itemsize = _itemsize(tensor.data_type)
    return None if itemsize is None else n * itemsize


def _check_tensor_data(model: onnx.ModelProto, label: str) -> None:
    """Every stored tensor has a known data type and exactly the data its dims call for,
    so that reading it later (numpy_helper.to_array, the twin, ORT) cannot fail or guess."""
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # not loaded (in-memory model): left to the runtime
        where = f"{label}: tensor {tensor.name!r}"
        if tensor.data_type == onnx.TensorProto.UNDEFINED or (
                tensor.data_type not in _SUB_BYTE and tensor.data_type != onnx.TensorProto.STRING
                and _itemsize(tensor.data_type) is None):
            raise ModelLoadError(f"{where} has an unknown data type ({_type_name(tensor.data_type)})",
                                 hint="the file is corrupt or needs a newer onnx")
        n = _numel(tensor)
        if tensor.HasField("raw_data"):
            expected = _expected_nbytes(tensor)
            if expected is not None and len(tensor.raw_data) != expected:
                raise ModelLoadError(
                    f"{where} ({_type_name(tensor.data_type)}{list(tensor.dims)}) holds {len(tensor.raw_data)} "
                    f"bytes of data, its shape needs {expected}", hint="the file is corrupt or truncated")
            continue
        if tensor.data_type in _SUB_BYTE:
            continue  # packed typed storage: left to onnx
        field_name, per = _TYPED_FIELD.get(tensor.data_type, ("int32_data", 1))
        have = len(getattr(tensor, field_name))
        if have != n * per:
            raise ModelLoadError(
                f"{where} ({_type_name(tensor.data_type)}{list(tensor.dims)}) holds {have} value(s) in "
                f"{field_name}, its shape needs {n * per}", hint="the file is corrupt")


def _check_io(model: onnx.ModelProto, label: str) -> None:
    """Graph inputs and outputs must be tensors of a known element type."""
    inits = {i.name for i in model.graph.initializer}
    if not model.graph.output:
        raise ModelLoadError(f"{label}: the graph has no outputs", hint="the file is corrupt or not a classifier")
    if not [vi for vi in model.graph.input if vi.name not in inits]:
        raise ModelLoadError(f"{label}: the graph has no inputs", hint="the file is corrupt or not a classifier")
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            if kind == "input" and vi.name in inits:
                continue
            if not vi.type.HasField("tensor_type"):
                what = vi.type.WhichOneof("value") or "no type"
                raise ModelLoadError(f"{label}: graph {kind} {vi.name!r} is not a tensor ({what})",
                                     hint="dynedit handles models whose inputs and outputs are tensors")
            elem = vi.type.tensor_type.elem_type
            if elem == onnx.TensorProto.UNDEFINED or (_itemsize(elem) is None and elem != onnx.TensorProto.STRING):
                raise ModelLoadError(f"{label}: graph {kind} {vi.name!r} has an unknown element type "
                                     f"({_type_name(elem)})", hint="the file is corrupt or needs a newer onnx")
            if kind == "input":
                fixed = [max(int(d.dim_value), 1) for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
                if exceeds(fixed, MAX_SYNTH_ELEMENTS):
                    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                            for d in vi.type.tensor_type.shape.dim]
                    raise UnsafeInputError(f"{label}: graph input {vi.name!r} declares an absurd shape {dims}",
                                           hint="the file is corrupt or hostile")


def _check_constant_of_shape(model: onnx.ModelProto, label: str) -> None:
    """ConstantOfShape nodes fed by a constant shape make tensors we may allocate (weight
    placeholders): their shape must be a sane 1-D list of non-negative sizes."""
    graph = model.graph
    shapes = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = attr.t
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        tensor = shapes.get(node.input[0])
        if tensor is None:
            continue  # computed at run time: ONNX Runtime's business
        try:
            dims = numpy_helper.to_array(tensor)
        except Exception as exc:  # noqa: BLE001 - corrupt tensor contents
            raise ModelLoadError(f"{label}: shape {node.input[0]!r} of ConstantOfShape node {node.name!r} "
                                 f"cannot be read ({_first_line(exc)})") from None
        if dims.ndim > 1 or not np.issubdtype(dims.dtype, np.integer):
            raise ModelLoadError(f"{label}: ConstantOfShape node {node.name!r} has a malformed shape input "
                                 f"({dims.dtype}{list(dims.shape)})", hint="the shape must be a 1-D int64 tensor")
        values = [int(d) for d in dims.reshape(-1)]
        if exceeds(values, MAX_SYNTH_ELEMENTS):
            raise UnsafeInputError(f"{label}: ConstantOfShape node {node.name!r} asks for an absurd shape {values}",
                                   hint="the file is corrupt or hostile")


def _external_entries(model: onnx.ModelProto, path: Path, label: str | None = None):
    """Yield (tensor, file, offset, length) for every tensor stored as external data,
    after refusing locations outside the model's folder and ranges outside the file."""
    label = label or str(path)
    base = path.parent.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"{label}: tensor {tensor.name!r} is marked external but names no file")
        if any(ord(c) < 32 for c in location):
            raise UnsafeInputError(f"{label}: external data location of tensor {tensor.name!r} holds control "
                                   f"characters ({location!r})", hint="the file is corrupt or hostile")
        if os.path.isabs(location) or ".." in Path(location).parts or location.startswith(("/", "\\")):
            raise UnsafeInputError(
                f"{label}: external data of tensor {tensor.name!r} points outside the model's folder ({location!r})",
                hint="external data must be a relative path inside the model's folder",
            )
        target = (base / location).resolve()
        if base not in target.parents:
            raise UnsafeInputError(f"{label}: external data of tensor {tensor.name!r} resolves outside the "
                                   f"model's folder ({location!r})",
                                   hint="external data must be a file inside the model's folder (no symlinks out)")
        if not target.is_file():
            raise ModelLoadError(f"{label}: external data file {location!r} for tensor {tensor.name!r} is missing",
                                 hint=f"copy it next to {path.name}")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelLoadError(f"{label}: tensor {tensor.name!r} has a malformed external-data offset/length") from None
        size = target.stat().st_size
        expected = _expected_nbytes(tensor)
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelLoadError(f"{label}: external data for {tensor.name!r} ({location!r}) is truncated: "
                                 f"needs bytes {offset}..{offset + length}, file has {size}")
        if expected is not None and length != expected:
            raise ModelLoadError(f"{label}: external data for {tensor.name!r} has {length} bytes, its shape needs {expected}")
        yield tensor, target, offset, length


def _load_external(model: onnx.ModelProto, path: Path, digest=None) -> list[tuple[str, Path]]:
    """Read every external tensor into raw_data; returns (tensor name, file) pairs.
    ``digest`` (a hashlib object), when given, is fed each tensor's name and bytes."""
    names = []
    for tensor, target, offset, length in list(_external_entries(model, path)):
        try:
            with open(target, "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
        except OSError as exc:
            raise ModelLoadError(f"{path}: external data {target.name} of tensor {tensor.name!r} cannot be read "
                                 f"({exc.strerror or exc})") from None
        if len(data) != length:
            raise ModelLoadError(f"{path}: external data {target.name} of tensor {tensor.name!r} is truncated")
        if digest is not None:
            digest.update(tensor.name.encode() + b"\0")
            digest.update(data)
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # as if it had always been stored inline
        names.append((tensor.name, target))
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
    """Refuse writing over an input; refuse a missing folder.

    ``protected``: the input model first (the one file ``in_place`` allows to replace),
    then its external data files (never replaced)."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise OutputError(f"output {out} is a directory", hint="give a file name such as model.fixed.onnx")
    if not out.parent.exists():
        raise OutputError(f"output folder {out.parent} does not exist", hint="create it first")
    resolved = out.resolve()
    if resolved in protected:
        if not protected or resolved != protected[0]:
            raise OutputError(f"refusing to overwrite {out}: it is the external data of the input model",
                              hint="write to another path")
        if not in_place:
            raise OutputError(f"refusing to overwrite the input {out}",
                              hint=f"write to another path, or pass {option('in_place', True)} (a .bak copy is kept)")
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def file_mode_for(path: Path) -> int:
    """The permission bits a written file gets: a file that is replaced keeps its mode
    (``--in-place``, or an output written again); a new file gets 0666 & ~umask, as
    ``open(path, "w")`` would give it (``mkstemp`` alone would leave it 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _write_temp(path: Path, fill, *, what: str, mode: int | None = None) -> Path:
    """A temp file next to ``path``, written by ``fill(fd, tmp_path)`` (which closes
    ``fd``), given ``mode`` (default ``file_mode_for(path)``) and fsynced; on any failure
    it is removed (an ``OSError`` becomes an ``OutputError`` naming ``path``)."""
    mode = file_mode_for(path) if mode is None else mode
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}",
                          hint="check that the folder exists and is writable") from None
    try:
        fill(fd, tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except OSError as exc:  # disk full, permissions...
        _unlink_quietly(tmp)
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}",
                          hint="nothing was changed; check free space and permissions") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return Path(tmp)


def _replace(tmp: Path, path: Path, *, what: str) -> None:
    """Rename the written ``tmp`` over ``path`` and fsync the folder; on failure ``tmp``
    is removed and ``path`` untouched."""
    try:
        os.replace(tmp, path)
    except OSError as exc:  # target is a directory, another filesystem...
        _unlink_quietly(tmp)
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}",
                          hint="nothing was changed; check free space and permissions") from None
    _fsync_dir(path.parent)


def _atomic_replace(path: Path, fill, *, what: str, mode: int | None = None) -> None:
    """Create a temp file next to ``path``, let ``fill(fd, tmp_path)`` write it (and close
    ``fd``), fsync, give it ``mode`` (default ``file_mode_for(path)``), rename over
    ``path``; on any failure the temp file is removed and ``path`` is untouched."""
    _replace(_write_temp(path, fill, what=what, mode=mode), path, what=what)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write bytes to ``path`` atomically: temp file in the same folder, fsync, rename.
    ``mode``: the permission bits (default ``file_mode_for(path)``)."""

    def fill(fd, tmp):
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    _atomic_replace(Path(path), fill, what="file", mode=mode)


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
    staged = stage_model(model, out, external_names=external_names, protected=protected, in_place=in_place)
    return staged.commit()


@dataclass
class StagedModel:
    """A model written in full to a temporary file (``path``, which ONNX Runtime can load:
    its external data, if any, sits beside it) that ``commit`` renames over ``out`` (with
    ``in_place``, the replaced input's ``.bak`` copy was made before staging), or
    ``discard`` removes, together with any data file the staging created. ``out`` None:
    the file lives in a temporary folder of its own and there is nothing to commit."""

    path: Path | None                  # None until the file is written in full
    out: Path | None
    protected: list[Path] = field(default_factory=list)
    data_name: str | None = None
    new_data: Path | None = None       # a data file this staging created (removed on discard)
    old_data: list[Path] = field(default_factory=list)
    folder: Path | None = None         # the temporary folder (out None)
    done: bool = False

    def commit(self) -> Path | None:
        """Put the staged file at ``out``; data files of an earlier version of ``out``
        are removed."""
        if self.out is None:
            self.discard()
            return None
        out = self.out
        try:
            _replace(self.path, out, what="file")
        except BaseException:
            self.discard()
            raise
        self.done = True
        for stale in self.old_data:
            if stale.name != self.data_name and stale.resolve() not in self.protected:
                _unlink_quietly(stale)
        return out

    def discard(self) -> None:
        """Remove what the staging wrote (nothing once committed)."""
        if self.done:
            return
        self.done = True
        if self.path is not None:
            _unlink_quietly(self.path)
        if self.new_data is not None:  # the old model (if any) does not use it: do not leave it behind
            _unlink_quietly(self.new_data)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "StagedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def stage_model(model: onnx.ModelProto, out: str | os.PathLike | None, *, external_names=None,
                protected: list[Path] | None = None, in_place: bool = False) -> StagedModel:
    """Write ``model`` in full to a temporary file next to ``out`` (``out`` None: in a
    temporary folder), its external data (``external_names``) to a content-named file
    beside it; ``commit`` then puts it at ``out``. The caller may drop ``model`` once
    staged: checking the file (an ONNX Runtime session on ``path``) needs no second
    copy of the weights in memory."""
    protected = protected or []
    folder = None
    if out is None:
        folder = Path(tempfile.mkdtemp(prefix="dynedit-stage-"))
        target = folder / "model.onnx"
    else:
        target = check_output_path(out, protected, in_place=in_place)
        if in_place and target.resolve() in protected and target.exists():
            log.info("kept a backup of %s at %s", target, backup_file(target))
    staged = StagedModel(path=None, out=None if out is None else target, protected=protected,
                         old_data=_previous_data_files(target), folder=folder)
    try:
        if external_names:  # moving tensors out changes the proto: a copy's (one file: serialised as it is)
            model = _copy(model)
            blob, staged.data_name = _externalize(model, set(external_names), target.name)
            if staged.data_name is not None:
                data = target.parent / staged.data_name
                if not data.exists():
                    staged.new_data = data
                # the data file goes with the model: same mode as the model file gets
                atomic_write_bytes(data, blob, mode=file_mode_for(target))
                del blob
        payload = model.SerializeToString(deterministic=True)
        del model

        def fill(fd, tmp):
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)

        staged.path = _write_temp(target, fill, what="file")
    except BaseException:
        staged.discard()
        raise
    return staged


def backup_file(path: Path) -> Path:
    """Copy ``path`` to ``<name>.bak`` (``.bak.1``, ``.bak.2``, ... when taken: an older
    backup is never overwritten), atomically, keeping its timestamps. Returns the copy."""
    path = Path(path)
    backup = path.with_name(path.name + ".bak")
    i = 0
    while backup.exists():
        i += 1
        backup = path.with_name(f"{path.name}.bak.{i}")
    def fill(fd, tmp):
        os.close(fd)
        shutil.copy2(path, tmp)

    _atomic_replace(backup, fill, what="the backup", mode=stat.S_IMODE(os.stat(path).st_mode))
    return backup


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
