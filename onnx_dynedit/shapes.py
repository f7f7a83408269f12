"""A model's inputs and outputs (name, dims, dtype), the sizes a user gives for them
(``input_shapes``, ``NAME:D1,D2,...`` on the command line), and seeded random inputs
of those sizes (the parity checks' inputs). Numpy and onnx only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import InputError, option


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints, or strings / None for symbolic dims
    dtype: np.dtype


def _spec(vi) -> InputSpec:
    tt = vi.type.tensor_type
    shape = tuple((d.dim_value if d.HasField("dim_value") else (d.dim_param or None)) for d in tt.shape.dim)
    return InputSpec(vi.name, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph's real inputs (initializers listed as inputs, IR 3, are left out)."""
    init = {i.name for i in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in init]


def output_specs(model: onnx.ModelProto) -> list[InputSpec]:
    return [_spec(vi) for vi in model.graph.output]


def parse_input_shapes(values) -> dict[str, tuple[int, ...]]:
    """``NAME:D1,D2,...`` strings (``--input-shape``, as polygraphy / onnxsim take them)
    -> {name: dims}. The name may itself hold ':' (the last one separates)."""
    out: dict[str, tuple[int, ...]] = {}
    for value in values or ():
        name, sep, dims = str(value).rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip() != "")
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise InputError(f"{option('input_shapes')} {value!r} is not NAME:D1,D2,... with positive sizes",
                             hint=f"e.g. {option('input_shapes', 'input:1,3,224,224', python=_py_shape('input', '1,3,224,224'))}")
        if name in out:
            raise InputError(f"{option('input_shapes')} gives input {name!r} twice")
        out[name] = shape
    return out


def check_input_shapes(specs: list[InputSpec], given: dict | None, label: str) -> None:
    """Every given shape names a real input, has its rank and keeps its fixed dims."""
    if not given:
        return
    by_name = {s.name: s for s in specs}
    for name, shape in given.items():
        spec = by_name.get(name)
        if spec is None:
            raise InputError(f"{label}: {option('input_shapes')} names {name!r}, which is not an input of the model "
                             f"(inputs: {', '.join(by_name) or 'none'})", hint="use one of the input names")
        if spec.shape and len(shape) != len(spec.shape):
            raise InputError(f"{label}: {_shape_option(name, shape)} has rank {len(shape)} but input "
                             f"{name!r} is {_declared(spec)} (rank {len(spec.shape)})")
        for axis, (want, have) in enumerate(zip(spec.shape, shape)):
            if isinstance(want, int) and want > 0 and want != have:
                raise InputError(f"{label}: {_shape_option(name, shape)} changes axis {axis} of input "
                                 f"{name!r}, fixed at {want} ({_declared(spec)})",
                                 hint="only symbolic dims can be set")


def _dims(shape) -> str:
    return ",".join(str(d) for d in shape)


def _shape_option(name: str, dims) -> str:
    """The ``input_shapes`` option giving input ``name`` the sizes ``dims`` (a tuple or
    ``"D1,D2,..."``), for a message."""
    text = dims if isinstance(dims, str) else _dims(dims)
    return option("input_shapes", f"{name}:{text}", python=_py_shape(name, text))


def _py_shape(name: str, dims: str) -> str:
    """``{'x': (1, 3)}``: the Python form of ``x:1,3``."""
    return "{" + repr(name) + ": (" + ", ".join(dims.split(",")) + ")}"


def _declared(spec: InputSpec) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in spec.shape) + "]"


def resolve_input_shapes(specs: list[InputSpec], given: dict | None = None, *, batch: int = 2,
                         label: str = "model") -> dict[str, tuple[int, ...]]:
    """Concrete shape of each input for generated (parity) inputs: ``given`` first
    (the ``input_shapes`` option), else the graph's own dims; a symbolic first dim is the batch
    (``batch``); any other symbolic dim must be given."""
    given = given or {}
    out = {}
    for spec in specs:
        if spec.name in given:
            out[spec.name] = tuple(given[spec.name])
            continue
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            else:
                dim = d or f"d{i}"
                example = ",".join(str(x) if isinstance(x, int) and x > 0 else ("2" if j == 0 else (x or f"d{j}"))
                                   for j, x in enumerate(spec.shape))
                raise InputError(f"{label}: input {spec.name!r} is {_declared(spec)}: the size of axis {i} "
                                 f"({dim}) is not fixed by the graph",
                                 hint=f"give it with {_shape_option(spec.name, example)}, {dim} being a size "
                                      "the model accepts")
        out[spec.name] = tuple(shape)
    return out


def random_inputs(specs: list[InputSpec], *, batch: int = 2, seed: int = 0, int_range=(0, 10),
                  shapes: dict | None = None, label: str = "model") -> dict[str, np.ndarray]:
    """Seeded random values of each input's shape (``resolve_input_shapes``) and dtype."""
    rng = np.random.default_rng(seed)
    resolved = resolve_input_shapes(specs, shapes, batch=batch, label=label)
    out = {}
    for spec in specs:
        shape = list(resolved[spec.name])
        if np.issubdtype(spec.dtype, np.integer):
            out[spec.name] = rng.integers(int_range[0], int_range[1], size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out
