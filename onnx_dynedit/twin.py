"""The torch twin of an ONNX graph, built with onnx2torch from a normalised COPY.

Normalisation (on the copy only; the original is kept untouched for write-back):
  - every node gets a unique name (empty / repeated names become ``<op>_<index>``), so
    the twin's module names are known from the layer map;
  - weights made by Constant / ConstantOfShape nodes become initializers of the same
    name (onnx2torch wants Conv/Gemm weights as initializers);
  - graphs that list initializers as graph inputs (IR 3) lose those inputs, and an IR-3
    copy is marked IR 4 (else shape inference ignores the initializers and onnx2torch
    sees every shape as unknown: "spatial rank == -2");
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
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from . import progress, threads
from .errors import ConversionError, InputError, InternalError, ParityError, option
from .io import LoadedModel
from .layers import Layer, LayerMap, build_layer_map, constant_value, unique_node_names

log = logging.getLogger(__name__)

FP32_TOL = 1e-5
FP16_TOL = 1e-2
# Quantised activations (QuantizeLinear left in the graph): a value that lands near a
# rounding tie in ONNX Runtime (fused integer kernels, or float kernels summing in another
# order) can round one step away from the twin's float fake-quantisation, and the step
# propagates. Measured (max |ORT - twin| / max(1, max |output|)): 0.0075 on the int8 QDQ
# badnets copies (720 inputs: one step of the 8-bit logits); 0.016 / 0.021 on QDQ
# per-channel / per-tensor copies of a random-weight ResNet-18 (16 inputs), the same with
# every ORT graph optimisation off. A wrong conversion is off by far more.
QUANT_TOL = 5e-2


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' (or None) = CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{option('device', 'cuda')} was asked for but torch sees no CUDA device",
                         hint=f"use {option('device', 'cpu')} or {option('device', 'auto')}")
    return dev


# ------------------------------------------------------------------------ normalise


@dataclass(frozen=True)
class Normalised:
    model: onnx.ModelProto = field(repr=False)
    fp16: bool
    notes: tuple[str, ...]
    logits: str | None = None        # tensor appended as an extra output: the Softmax input
    softmax_node: str | None = None  # the Softmax / LogSoftmax node that ends the graph
    quantised: bool = False  # QuantizeLinear left in the graph (quantised activations)


SOFTMAX_OPS = ("Softmax", "LogSoftmax")
# Ops that may sit between the final Softmax and the graph output without changing
# which class scores are attributed (shape-only ops).
_SHAPE_ONLY = ("Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze")


def final_softmax(graph) -> tuple[str, str] | None:
    """(Softmax node name, its input tensor) when the graph's first output is a Softmax /
    LogSoftmax of some tensor (possibly through shape-only ops); else None."""
    if not graph.output:
        return None
    producer = {o: n for n in graph.node for o in n.output}
    name = graph.output[0].name
    for _ in range(8):
        node = producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in SOFTMAX_OPS:
            return node.name, node.input[0]
        if node.op_type not in _SHAPE_ONLY:
            return None
        name = node.input[0]
    return None


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

    # dequantised constants first: an Identity may alias one (quant.py)
    from .quant import fold_dequantisation

    folded = fold_dequantisation(copy)
    if folded:
        notes.append(f"{folded} dequantised constant(s) (DequantizeLinear / Cast+Mul of integers) folded "
                     "into float initializers")

    # Identity of an initializer -> an initializer of the output's name (the legacy torch
    # exporter deduplicates equal tensors, e.g. zero biases, and re-exposes them so).
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    aliased = [n for n in graph.node if n.op_type == "Identity" and n.domain in ("", "ai.onnx")
               and n.input and n.input[0] in inits and n.output[0] not in outputs]
    if aliased:
        drop = {n.output[0] for n in aliased}
        for n in aliased:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            graph.initializer.append(t)
        keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in drop)]
        del graph.node[:]
        graph.node.extend(keep)
        notes.append(f"{len(aliased)} Identity node(s) of initializers turned into initializers")

    init_names = {i.name for i in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in init_names]
    if len(inputs) != len(graph.input):
        notes.append(f"{len(graph.input) - len(inputs)} initializer(s) removed from graph inputs (IR {copy.ir_version})")
        del graph.input[:]
        graph.input.extend(inputs)
    if copy.ir_version < 4:
        # IR 3 requires every initializer to be a graph input; shape inference of an IR-3
        # graph ignores initializers that are not, so every shape after the first Conv
        # would be lost (onnx2torch then sees rank -2). The copy is valid IR 4.
        notes.append(f"IR {copy.ir_version} copy marked IR 4 (initializers are no longer graph inputs)")
        copy.ir_version = 4

    logits = softmax_node = None
    found = final_softmax(graph)
    if found is not None:
        softmax_node, logits = found
        if logits not in {o.name for o in graph.output}:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(logits))
        notes.append(f"attributed output: the logits {logits!r} before {_op_of(graph, softmax_node)} node "
                     f"{softmax_node!r} (probabilities saturate)")

    fp16 = _has_fp16(graph)
    if fp16:
        _fp16_to_fp32(graph)
        notes.append("float16 tensors converted to float32 for the twin")

    from .converters import ensure_converters

    missing = ensure_converters(copy)
    if missing:
        opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and 13 <= opset <= 17:
            # Already in the range onnx2torch knows: converting would not help.
            raise ConversionError(f"the torch twin cannot be built: no converter for {', '.join(missing)} "
                                  f"(opset {opset})", hint="neither onnx2torch nor dynedit converts this op; "
                                  "report it, or re-export the model without it")
        target = 17 if opset and opset > 17 else 13
        try:
            converted = onnx.version_converter.convert_version(copy, target)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(
                f"the torch twin cannot be built: no converter for {', '.join(missing)} "
                f"and converting opset {opset} -> {target} failed ({str(exc).splitlines()[0][:120]})",
                hint="re-export the model at an opset from 13 to 17",
            ) from None
        still = ensure_converters(converted)
        if still:
            raise ConversionError(f"the torch twin cannot be built: unsupported op(s) {', '.join(still)} "
                                  f"(opset {opset} converted to {target})",
                                  hint="neither onnx2torch nor dynedit converts them; report the op(s)")
        notes.append(f"opset {opset} converted to {target} for the twin")
        copy = converted
    return Normalised(model=copy, fp16=fp16, notes=tuple(notes), quantised=_has_quantize(copy), logits=logits,
                      softmax_node=softmax_node)


def _has_quantize(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _op_of(graph, node_name: str) -> str:
    return next((n.op_type for n in graph.node if n.name == node_name), "Softmax")


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

    def __init__(self, loaded: LoadedModel, device: str | torch.device | None = None, *,
                 input_shapes: dict[str, tuple[int, ...]] | None = None):
        from onnx2torch import convert

        self.loaded = loaded
        self.device = resolve_device(device)
        threads.apply_torch()
        self.layer_map: LayerMap = build_layer_map(loaded.model)
        self.inputs = input_specs(loaded.model)
        self.outputs = output_specs(loaded.model)
        check_input_shapes(self.inputs, input_shapes, loaded.label)
        self.input_shapes = dict(input_shapes or {})  # user-given sizes (input_shapes), name -> dims
        try:
            norm = normalise(loaded.model)
        except ConversionError as exc:  # name the file: the CLI prints this one line
            raise ConversionError(f"{loaded.label}: {exc.raw_message}", hint=exc.raw_hint) from None
        self.fp16 = norm.fp16
        self.quantised = norm.quantised
        self.notes = norm.notes
        # The scalar attributed / compared by the output criterion: the logits before a
        # final Softmax (an extra output of the twin, after the graph's own), else the
        # graph's first output.
        self.logits_tensor = norm.logits
        self.softmax_node = norm.softmax_node
        self._select = ([o.name for o in norm.model.graph.output].index(norm.logits)
                        if norm.logits is not None else 0)
        # Integer token inputs have no gradient: attribution interpolates the outputs of the
        # Gathers on embedding tables that read them (``interpolate``).
        self.embeddings = find_embeddings(loaded.model, unique_node_names(loaded.model.graph))
        # Class scores declared [N, C, 1, 1] (a conv head, e.g. SqueezeNet): seen as [N, C].
        first = self.outputs[0].shape if self.outputs else ()
        self._flatten = (len(first) > 2 and all(isinstance(d, int) and d == 1 for d in first[2:])
                         and not (isinstance(first[1], int) and first[1] <= 1))
        try:
            with progress.phase("torch twin (onnx2torch)"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = convert(norm.model)
            for w in caught:  # converter notes are for -vv, not the user's terminal
                log.debug("onnx2torch: %s: %s", w.category.__name__, w.message)
        except NotImplementedError as exc:
            raise ConversionError(f"{loaded.label}: the torch twin cannot be built: {str(exc).splitlines()[0]}",
                                  hint="onnx2torch lacks a converter for this op") from None
        except Exception as exc:  # noqa: BLE001 - converter failures are many
            raise ConversionError(f"{loaded.label}: onnx2torch failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                                  hint="onnx2torch failed on an op of this graph; report the op") from None
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
        if self.quantised:
            return QUANT_TOL
        return FP16_TOL if self.fp16 else FP32_TOL

    def module_of(self, layer: Layer) -> torch.nn.Module:
        return self._modules[layer.module]

    @property
    def attributed_output(self) -> str:
        """What localisation and the output criterion see (reported as ``attributed_output``)."""
        if self.logits_tensor is not None:
            op = _op_of(self.loaded.model.graph, self.softmax_node) if self.softmax_node else "Softmax"
            return f"logits {self.logits_tensor!r} before {op} node {self.softmax_node!r}"
        name = self.outputs[0].name if self.outputs else "?"
        return f"output {name!r}"

    def to_tensor(self, x: np.ndarray):
        """A batch as the twin's input: a tensor, or for a model with several inputs (a
        structured array with one field per input, ``data.pack_inputs``) a tuple of them."""
        if x.dtype.names:
            return tuple(self.to_tensor(x[name]) for name in x.dtype.names)
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.is_floating_point():
            t = t.float()
        return t.to(self.device)

    def forward(self, *xs) -> torch.Tensor:
        """The attributed output of the twin: the logits of a classifier (before a final
        Softmax when the graph ends in one), as [N, C] when declared [N, C, 1, ...]."""
        if len(xs) == 1 and isinstance(xs[0], tuple):
            xs = xs[0]
        return self.select(self.module(*xs))

    def select(self, out) -> torch.Tensor:
        """The attributed output out of the module's output(s)."""
        if isinstance(out, (tuple, list)):
            out = out[self._select]
        if self._flatten and out.dim() > 2:
            out = out.flatten(1)
        return out

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits as float64 numpy, batched, no grad, current hooks applied."""
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                outs.append(self.forward(self.to_tensor(x[i:i + batch_size])).double().cpu().numpy())
        return np.concatenate(outs, axis=0)

    @property
    def token_inputs(self) -> bool:
        """Some input is integer (token ids): no gradient reaches it."""
        return any(not np.issubdtype(spec.dtype, np.floating) for spec in self.inputs)

    # -- straight-line paths for integrated gradients ------------------------------
    def interpolate(self, xc, xk, alphas: torch.Tensor) -> "Path":
        """The points ``xc + a (xk - xc)`` for every pair and every ``a`` (pair-major).
        Float inputs are interpolated themselves; integer token inputs through the outputs
        of their embedding Gathers (``embeddings``), the other inputs kept at ``xc``'s."""
        if self.embeddings:
            return _EmbeddingPath(self, xc, xk, alphas)
        if isinstance(xc, tuple):
            raise InternalError("interpolating several float inputs is not supported")
        return _InputPath(self, xc, xk, alphas)

    @contextlib.contextmanager
    def _embedding_hooks(self, replace=None, store=None):
        handles = []

        def make(i):
            def hook(module, args, output):
                if store is not None:
                    store.append(output)
                if replace is not None:
                    return replace[i]
                return None

            return hook

        try:
            for i, (name, _) in enumerate(self.embeddings):
                handles.append(self._modules[name].register_forward_hook(make(i)))
            yield
        finally:
            for h in handles:
                h.remove()

    def embed(self, x) -> list[torch.Tensor]:
        """Outputs of the embedding Gathers for the input batch ``x`` (a tensor or tuple)."""
        store: list = []
        with torch.no_grad(), self._embedding_hooks(store=store):
            self.forward(x)
        return [t.detach() for t in store[:len(self.embeddings)]]

    def forward_embedded(self, x, values: list[torch.Tensor]) -> torch.Tensor:
        """The attributed output with the embedding Gathers' outputs replaced by ``values``."""
        with self._embedding_hooks(replace=values):
            return self.forward(x)

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


def _take(x, index):
    return tuple(t[index] for t in x) if isinstance(x, tuple) else x[index]


def batch_size_of(x) -> int:
    """Rows of a batch: a tensor, or a tuple of tensors (one per model input)."""
    return int((x[0] if isinstance(x, tuple) else x).shape[0])


def cat_inputs(*batches):
    """Concatenate batches along the rows (tuples field by field)."""
    if isinstance(batches[0], tuple):
        return tuple(torch.cat(parts, 0) for parts in zip(*batches))
    return torch.cat(batches, 0)


class _InputPath:
    """IG path points on the (float) input itself."""

    def __init__(self, twin: Twin, xc, xk, alphas):
        n, steps = xc.shape[0], alphas.shape[0]
        path = xc.unsqueeze(1) + alphas.view(1, -1, *([1] * (xc.dim() - 1))) * (xk - xc).unsqueeze(1)
        self.twin, self.path, self.n = twin, path.reshape(n * steps, *xc.shape[1:]), n

    def __len__(self) -> int:
        return int(self.path.shape[0])

    def forward(self, sl: slice) -> torch.Tensor:
        """The attributed output at points ``sl`` (a graph for backward is kept)."""
        return self.twin.forward(self.path[sl].clone().requires_grad_(True))


class _EmbeddingPath:
    """IG path points on the embedding outputs: e(xc) + a (e(xk) - e(xc)); every other
    input (attention mask, ...) is taken from the corrupted input."""

    def __init__(self, twin: Twin, xc, xk, alphas):
        n, steps = batch_size_of(xc), alphas.shape[0]
        ec, ek = twin.embed(xc), twin.embed(xk)
        self.points = []
        for a, b in zip(ec, ek):
            p = a.unsqueeze(1) + alphas.view(1, -1, *([1] * (a.dim() - 1))).to(a.dtype) * (b - a).unsqueeze(1)
            self.points.append(p.reshape(n * steps, *a.shape[1:]))
        self.base = _take(xc, torch.arange(n, device=twin.device).repeat_interleave(steps))
        self.twin, self.n = twin, n

    def __len__(self) -> int:
        return int(self.points[0].shape[0])

    def forward(self, sl: slice) -> torch.Tensor:
        values = [p[sl].clone().requires_grad_(True) for p in self.points]
        return self.twin.forward_embedded(_take(self.base, sl), values)


def find_embeddings(model: onnx.ModelProto, names) -> tuple[tuple[str, str], ...]:
    """(twin module name, ONNX node name) of each Gather that looks up a float table
    (an initializer or Constant) with indices read from an integer graph input (directly,
    or through Cast / Identity / Unsqueeze / Reshape)."""
    from .layers import constant_sources, twin_module_name

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    consts = constant_sources(graph)
    ints = {vi.name for vi in graph.input if vi.name not in init
            and vi.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    derived = set(ints)
    out = []
    for node, name in zip(graph.node, names):
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape") and node.input and node.input[0] in derived:
            derived.update(node.output)
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        table = node.input[0]
        is_float_table = (table in init and init[table].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                          and len(init[table].dims) == 2) or table in consts
        if is_float_table and node.input[1] in derived:
            out.append((twin_module_name(name, node.domain), name))
    return tuple(out)


class DownstreamRunner:
    """Re-run only the part of the twin's fx graph that depends on one layer.

    The first call runs the whole graph on the fixed input (under whatever edits are
    applied then) and caches every value that does not depend on ``layer``; later
    calls recompute the layer and what follows it. Used while fitting an edit, where
    the input and everything upstream of the edited layer stay fixed.
    """

    def __init__(self, twin: "Twin", layer: Layer, *inputs: torch.Tensor):
        from torch import fx

        if len(inputs) == 1 and isinstance(inputs[0], tuple):
            inputs = inputs[0]
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
        self._select = twin.select

    def __call__(self) -> torch.Tensor:
        return self._select(self._replay.run(*self._inputs))


def _delta_hook(layer: Layer, u, d, device):
    u = torch.as_tensor(u, dtype=torch.float32, device=device) if not torch.is_tensor(u) else u
    d = torch.as_tensor(d, dtype=torch.float32, device=device) if not torch.is_tensor(d) else d

    def hook(module, args, output):
        return output + layer_delta(layer, args[0], u, d)

    return hook


def layer_delta(layer: Layer, x: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The output change of ``layer`` for input ``x`` under W' = W + u d^T. ``u`` [C_out],
    or [B, C_out]: one u per input row (how the fit gets per-row Jacobians)."""
    rows = u.shape[0] if u.dim() == 2 else 1
    if layer.op == "Conv":
        s = key_projection_conv(layer, x, d)  # [B, 1, *spatial]
        return s * u.to(s.dtype).view((rows, -1) + (1,) * (s.dim() - 2))
    s = x @ d.to(x.dtype)  # [B, ...]
    return s.unsqueeze(-1) * u.to(x.dtype).view((rows,) + (1,) * (s.dim() - 1) + (-1,))


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


def ort_session_for(model: onnx.ModelProto, provider: str = "cpu"):
    import onnxruntime as ort

    opts = threads.session_options(ort.SessionOptions())
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


def _session_with_output(model: onnx.ModelProto, name: str):
    """An ORT session of ``model`` that also returns tensor ``name`` (the model proto is
    serialised with the extra output and left as it was)."""
    if name in {o.name for o in model.graph.output}:
        return ort_session_for(model)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        return ort_session_for(model)
    finally:
        del model.graph.output[-1]


def check_parity(twin: Twin, feeds: dict[str, np.ndarray] | None = None, *, seed: int = 0,
                 int_range=(0, 10), model: onnx.ModelProto | None = None, edits=(), session=None) -> Parity:
    """ONNX Runtime on ``model`` (default: the twin's original) vs the twin with ``edits``.
    ``session``: an ORT session of ``model`` to reuse across calls."""
    model = model if model is not None else twin.loaded.model
    if feeds is None:
        feeds = random_inputs(twin.inputs, seed=seed, int_range=int_range, shapes=twin.input_shapes,
                              label=twin.loaded.label)
    sizes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    hint = (f"give sizes that fit with {option('input_shapes', 'NAME:D1,D2,...', python='{NAME: (D1, D2, ...)}')} "
            f"(or {option('inputs_file')}); integer inputs must be valid ids ({option('int_range')})")
    try:
        if session is None:
            if model is twin.loaded.model and twin.logits_tensor is not None:
                session = _session_with_output(model, twin.logits_tensor)  # the attributed logits too
            else:
                session = ort_session_for(model)
        names = [o.name for o in session.get_outputs()]
        expected = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise InputError(f"{twin.loaded.label}: ONNX Runtime cannot run the model on inputs of size {sizes} "
                         f"({lines[0][:300]})", hint=hint) from None
    xs = [twin.to_tensor(feeds[spec.name]) for spec in twin.inputs]
    try:
        with torch.no_grad(), twin.applied(edits):
            got = twin.module(*xs)
    except RuntimeError as exc:  # sizes the graph cannot take (a pooling window larger than the map ...)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise InputError(f"{twin.loaded.label}: the model cannot run on inputs of size {sizes} "
                         f"({lines[0][:200]})", hint=hint) from None
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
