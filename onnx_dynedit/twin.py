"""The torch twin of an ONNX graph, built with onnx2torch from a normalised COPY.

Normalisation (on the copy only; the original is kept untouched for write-back):
  - every node gets a unique name (empty / repeated names become ``<op>_<index>``), so
    the twin's module names are known from the layer map;
  - weights made by Constant / ConstantOfShape nodes become initializers of the same
    name (onnx2torch wants Conv/Gemm weights as initializers);
  - IR-3 graphs that list initializers as graph inputs lose those inputs;
  - float16 models get a float32 copy (the twin computes in fp32; parity tolerance is
    looser for them);
  - converters are registered for op versions onnx2torch lacks (converters.py); if
    some are still missing, the copy is down/up-converted with onnx.version_converter.

The twin is never mutated by an edit: edits are applied as forward hooks that add the
exact rank-one term to a layer's output (``Twin.applied``), always removed in
``finally``. Parity against ONNX Runtime is measured, not assumed (``check_parity``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .errors import ConversionError, InternalError, ParityError
from .io import LoadedModel
from .layers import Layer, LayerMap, build_layer_map, constant_value, unique_node_names

log = logging.getLogger(__name__)

FP32_TOL = 1e-5
FP16_TOL = 1e-2


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' (or None) = CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import InputError

        raise InputError("--device cuda was asked for but torch sees no CUDA device",
                         hint="use --device cpu or --device auto")
    return dev


# ------------------------------------------------------------------------ normalise


@dataclass(frozen=True)
class Normalised:
    model: onnx.ModelProto = field(repr=False)
    fp16: bool
    notes: tuple[str, ...]


def normalise(model: onnx.ModelProto) -> Normalised:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    notes = []

    for node, name in zip(graph.node, unique_node_names(graph)):
        node.name = name

    # Constant / ConstantOfShape -> initializers (same names).
    keep = []
    new_inits = []
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape") and node.domain in ("", "ai.onnx"):
            value = constant_value(graph, node.output[0])
            if value is not None and not (node.op_type == "Constant" and _is_sparse(node)):
                new_inits.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
                continue
        keep.append(node)
    if new_inits:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        notes.append(f"{len(new_inits)} Constant/ConstantOfShape node(s) turned into initializers")

    init_names = {i.name for i in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in init_names]
    if len(inputs) != len(graph.input):
        notes.append(f"{len(graph.input) - len(inputs)} initializer(s) removed from graph inputs (IR {copy.ir_version})")
        del graph.input[:]
        graph.input.extend(inputs)

    fp16 = _has_fp16(graph)
    if fp16:
        _fp16_to_fp32(graph)
        notes.append("float16 tensors converted to float32 for the twin")

    from .converters import ensure_converters

    missing = ensure_converters(copy)
    if missing:
        opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), None)
        target = 17 if opset and opset > 17 else 13
        try:
            converted = onnx.version_converter.convert_version(copy, target)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(
                f"the torch twin cannot be built: no converter for {', '.join(missing)} "
                f"and converting opset {opset} -> {target} failed ({str(exc).splitlines()[0][:120]})",
                hint="re-export the model at opset 13-17",
            ) from None
        still = ensure_converters(converted)
        if still:
            raise ConversionError(f"the torch twin cannot be built: unsupported op(s) {', '.join(still)}",
                                  hint="onnx2torch has no converter for them")
        notes.append(f"opset {opset} converted to {target} for the twin")
        copy = converted
    return Normalised(model=copy, fp16=fp16, notes=tuple(notes))


def _is_sparse(node) -> bool:
    return any(a.name == "sparse_value" for a in node.attribute)


def _has_fp16(graph) -> bool:
    fp16 = onnx.TensorProto.FLOAT16
    if any(i.data_type == fp16 for i in graph.initializer):
        return True
    return any(vi.type.tensor_type.elem_type == fp16 for vi in list(graph.input) + list(graph.output))


def _fp16_to_fp32(graph) -> None:
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for i, init in enumerate(graph.initializer):
        if init.data_type == fp16:
            arr = numpy_helper.to_array(init).astype(np.float32)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type == fp16:
            vi.type.tensor_type.elem_type = fp32
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == fp16:
                attr.i = fp32
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == fp16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))


# ------------------------------------------------------------------------------ twin


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


class Twin:
    """An onnx2torch module plus the layer map of the ORIGINAL model."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device | None = None):
        from onnx2torch import convert

        self.loaded = loaded
        self.device = resolve_device(device)
        self.layer_map: LayerMap = build_layer_map(loaded.model)
        self.inputs = input_specs(loaded.model)
        self.outputs = output_specs(loaded.model)
        try:
            norm = normalise(loaded.model)
        except ConversionError as exc:  # name the file: the CLI prints this one line
            raise ConversionError(f"{loaded.label}: {exc.message}", hint=exc.hint) from None
        self.fp16 = norm.fp16
        self.notes = norm.notes
        try:
            module = convert(norm.model)
        except NotImplementedError as exc:
            raise ConversionError(f"{loaded.label}: the torch twin cannot be built: {str(exc).splitlines()[0]}",
                                  hint="onnx2torch lacks a converter for this op") from None
        except Exception as exc:  # noqa: BLE001 - converter failures are many
            raise ConversionError(f"{loaded.label}: onnx2torch failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                                  hint="re-export the model at opset 13-17 or report the op") from None
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module.to(self.device)
        self._modules = dict(self.module.named_modules())
        for layer in self.layer_map.layers:
            if layer.module not in self._modules:
                raise InternalError(f"twin has no module {layer.module!r} for node {layer.node!r}")

    @property
    def tol(self) -> float:
        return FP16_TOL if self.fp16 else FP32_TOL

    def module_of(self, layer: Layer) -> torch.nn.Module:
        return self._modules[layer.module]

    def to_tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.is_floating_point():
            t = t.float()
        return t.to(self.device)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """First output of the twin (the logits of a classifier)."""
        out = self.module(*xs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits as float64 numpy, batched, no grad, current hooks applied."""
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                outs.append(self.forward(self.to_tensor(x[i:i + batch_size])).double().cpu().numpy())
        return np.concatenate(outs, axis=0)

    # -- hooks ---------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, edits):
        """Apply rank-one edits (objects with .layer, .u and .d as torch tensors or numpy)
        as forward hooks: output += u * (d . key). Removed in ``finally``."""
        handles = []
        try:
            for edit in edits:
                handles.append(self.module_of(edit.layer).register_forward_hook(_delta_hook(edit.layer, edit.u, edit.d, self.device)))
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def capture(self, layers, *, inputs: bool = True, outputs: bool = False, retain_grad: bool = False):
        """Record each layer's key input and/or output during forward passes.
        Yields a dict node -> {"in": [tensors], "out": [tensors]}. Removed in ``finally``."""
        store = {layer.node: {"in": [], "out": []} for layer in layers}
        handles = []

        def make(layer):
            def hook(module, args, output):
                if inputs:
                    store[layer.node]["in"].append(args[0])
                if outputs:
                    out = output[0] if isinstance(output, (tuple, list)) else output
                    if retain_grad and out.requires_grad:
                        out.retain_grad()
                    store[layer.node]["out"].append(out)

            return hook

        try:
            for layer in layers:
                handles.append(self.module_of(layer).register_forward_hook(make(layer)))
            yield store
        finally:
            for h in handles:
                h.remove()


class DownstreamRunner:
    """Re-run only the part of the twin's fx graph that depends on one layer.

    The first call runs the whole graph on the fixed input (under whatever edits are
    applied then) and caches every value that does not depend on ``layer``; later
    calls recompute the layer and what follows it. Used while fitting an edit, where
    the input and everything upstream of the edited layer stay fixed.
    """

    def __init__(self, twin: "Twin", layer: Layer, *inputs: torch.Tensor):
        from torch import fx

        gm = twin.module
        start = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer.module]
        if not start:
            raise InternalError(f"no fx node for module {layer.module!r}")
        downstream: set = set()
        stack = list(start)
        while stack:
            node = stack.pop()
            if node not in downstream:
                downstream.add(node)
                stack.extend(node.users)
        cache: dict = {}

        class _Record(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n not in downstream and n.op != "output" and any(u in downstream for u in n.users):
                    cache[n] = value  # only what the downstream part reads (the frontier)
                return value

        with torch.no_grad():
            _Record(gm).run(*inputs)

        class _Replay(fx.Interpreter):
            def run_node(self, n):
                if n in cache:
                    return cache[n]
                if n not in downstream and n.op != "output":
                    return None  # upstream and not read downstream: skipped
                return super().run_node(n)

        self._replay = _Replay(gm)
        self._inputs = inputs

    def __call__(self) -> torch.Tensor:
        out = self._replay.run(*self._inputs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _delta_hook(layer: Layer, u, d, device):
    u = torch.as_tensor(u, dtype=torch.float32, device=device) if not torch.is_tensor(u) else u
    d = torch.as_tensor(d, dtype=torch.float32, device=device) if not torch.is_tensor(d) else d

    def hook(module, args, output):
        return output + layer_delta(layer, args[0], u, d)

    return hook


def layer_delta(layer: Layer, x: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The output change of ``layer`` for input ``x`` under W' = W + u d^T."""
    if layer.op == "Conv":
        s = key_projection_conv(layer, x, d)  # [B, 1, *spatial]
        shape = (1, -1) + (1,) * (s.dim() - 2)
        return s * u.to(s.dtype).view(shape)
    s = x @ d.to(x.dtype)  # [..., ]
    return s.unsqueeze(-1) * u.to(x.dtype)


def conv_pads(layer: Layer, spatial: tuple[int, ...]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] resolved for auto_pad."""
    n = len(spatial)
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, dil in zip(spatial, layer.kernel, layer.strides, layer.dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * dil + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if layer.auto_pad == "SAME_UPPER" else large)
            ends.append(large if layer.auto_pad == "SAME_UPPER" else small)
        return begins + ends
    if layer.auto_pad == "VALID":
        return [0] * 2 * n
    return list(layer.pads) if layer.pads else [0] * 2 * n


def _pad_input(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    pads = conv_pads(layer, tuple(x.shape[2:]))
    n = x.dim() - 2
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    return F.pad(x, torch_pads) if any(torch_pads) else x


def key_projection_conv(layer: Layer, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d . k for every output position's unfolded key k: a conv with kernel d."""
    xp = _pad_input(layer, x)
    kernel = d.to(x.dtype).view((1,) + tuple(layer.shape[1:]))
    if x.dim() == 3:
        return F.conv1d(xp, kernel, stride=layer.strides, dilation=layer.dilations)
    return F.conv2d(xp, kernel, stride=layer.strides, dilation=layer.dilations)


def layer_keys(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Keys of ``layer`` for its input ``x``: [B, P, in] (P positions; 1 for dense)."""
    if layer.op == "Conv":
        xp = _pad_input(layer, x)
        if x.dim() == 3:  # 1-D conv as 2-D with height 1
            cols = F.unfold(xp.unsqueeze(2), (1, layer.kernel[0]), dilation=(1, layer.dilations[0]),
                            stride=(1, layer.strides[0]))
        else:
            cols = F.unfold(xp, tuple(layer.kernel), dilation=tuple(layer.dilations), stride=tuple(layer.strides))
        return cols.transpose(1, 2)  # [B, P, in]
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_values(layer: Layer, out: torch.Tensor) -> torch.Tensor:
    """Layer outputs arranged like ``layer_keys``: [B, P, out]."""
    if layer.op == "Conv":
        return out.flatten(2).transpose(1, 2)
    if out.dim() == 2:
        return out.unsqueeze(1)
    return out.reshape(out.shape[0], -1, out.shape[-1])


# ---------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class OutputParity:
    name: str
    max_abs_diff: float
    max_rel_diff: float  # max abs diff / output scale (max |ORT output|, at least 1)
    where: tuple[int, ...]


@dataclass(frozen=True)
class Parity:
    outputs: tuple[OutputParity, ...]
    tol: float
    n_inputs: int

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_diff <= self.tol)

    def to_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "ok": self.ok,
            "tol": self.tol, "n_inputs": self.n_inputs,
            "outputs": [{"name": o.name, "max_abs_diff": o.max_abs_diff, "max_rel_diff": o.max_rel_diff,
                         "where": list(o.where)} for o in self.outputs],
        }


def random_inputs(specs: list[InputSpec], *, batch: int = 2, seed: int = 0, int_range=(0, 10),
                  sym_dim: int = 8) -> dict[str, np.ndarray]:
    """Seeded random values of each input's declared shape and dtype. Symbolic dims:
    the first is the batch (``batch``), others ``sym_dim``."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            else:
                shape.append(batch if i == 0 else sym_dim)
        if np.issubdtype(spec.dtype, np.integer):
            out[spec.name] = rng.integers(int_range[0], int_range[1], size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


def ort_session_for(model: onnx.ModelProto, provider: str = "cpu"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: failures surface as our own one-line errors
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def compare_outputs(names, expected: list[np.ndarray], got: list[np.ndarray]) -> list[OutputParity]:
    out = []
    for name, ref, val in zip(names, expected, got):
        ref = np.asarray(ref, dtype=np.float64)
        val = np.asarray(val, dtype=np.float64).reshape(ref.shape)
        diff = np.abs(ref - val)
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else ()
        mad = float(diff.max()) if diff.size else 0.0
        out.append(OutputParity(name=name, max_abs_diff=mad, max_rel_diff=mad / scale, where=idx))
    return out


def check_parity(twin: Twin, feeds: dict[str, np.ndarray] | None = None, *, seed: int = 0,
                 int_range=(0, 10), model: onnx.ModelProto | None = None, edits=(), session=None) -> Parity:
    """ONNX Runtime on ``model`` (default: the twin's original) vs the twin with ``edits``.
    ``session``: an ORT session of ``model`` to reuse across calls."""
    model = model if model is not None else twin.loaded.model
    if feeds is None:
        feeds = random_inputs(twin.inputs, seed=seed, int_range=int_range)
    try:
        if session is None:
            session = ort_session_for(model)
        names = [o.name for o in session.get_outputs()]
        expected = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        from .errors import InputError

        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise InputError(f"{twin.loaded.label}: ONNX Runtime cannot run the model on the parity inputs "
                         f"({lines[0][:300]})",
                         hint="check --inputs / --int-range (integer inputs must be valid ids)") from None
    xs = [twin.to_tensor(feeds[spec.name]) for spec in twin.inputs]
    with torch.no_grad(), twin.applied(edits):
        got = twin.module(*xs)
    if not isinstance(got, (tuple, list)):
        got = [got]
    got = [g.detach().double().cpu().numpy() for g in got]
    first = next(iter(feeds.values()))
    return Parity(outputs=tuple(compare_outputs(names, expected, got)), tol=twin.tol, n_inputs=int(first.shape[0]) if first.ndim else 1)


def require_parity(parity: Parity, label: str) -> None:
    if not parity.ok:
        worst = max(parity.outputs, key=lambda o: o.max_rel_diff)
        raise ParityError(
            f"{label}: the torch twin differs from ONNX Runtime by {worst.max_abs_diff:.3g} "
            f"(relative {worst.max_rel_diff:.3g} > tol {parity.tol:g}) on output {worst.name!r} at {list(worst.where)}",
            hint="the twin is refused; report the model's ops",
        )
