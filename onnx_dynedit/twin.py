"""The torch twin of an ONNX graph: onnx2torch on a normalised COPY (normalise.py),
with the layer map of the original.

The twin is never mutated by an edit: edits are applied as forward hooks that add the
exact rank-one term to a layer's output (``Twin.applied``, keys.py), always removed in
``finally``. Parity against ONNX Runtime is measured, not assumed (parity.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx

from . import progress, threads
from .errors import ConversionError, InputError, InternalError, option
from .io import LoadedModel
from .keys import delta_hook
from .layers import Layer, LayerMap, build_layer_map, unique_node_names
from .memory import MMAP_THRESHOLD
from .normalise import normalise, op_of
from .shapes import check_input_shapes, input_specs, output_specs

log = logging.getLogger(__name__)

# Float32: two correct implementations differ by float rounding, grown by the depth of
# the graph. 1e-5 until the eighteenth session; a trained MobileNet-V3 small at 224x224
# (tv_mobilenet_badnets seed 1) is 1.3e-5 off ONNX Runtime on seeded random inputs (seed
# 0's 3.9e-6, a ResNet-18 at 224x224 2e-7) and was refused. A wrong conversion or
# write-back is off by far more (TF32 on CUDA: about 1e-3).
FP32_TOL = 1e-4
FP16_TOL = 1e-2
# Quantised activations (QuantizeLinear left in the graph): a value that lands near a
# rounding tie in ONNX Runtime (fused integer kernels, or float kernels summing in another
# order) can round one step away from the twin's float fake-quantisation, and the step
# propagates. Measured (max |ORT - twin| / max(1, max |output|)): 0.0075 on the int8 QDQ
# badnets copies (720 inputs: one step of the 8-bit logits); 0.016 / 0.021 on QDQ
# per-channel / per-tensor copies of a random-weight ResNet-18 (16 inputs), the same with
# every ORT graph optimisation off. A wrong conversion is off by far more.
QUANT_TOL = 5e-2
RUN_BUDGET = 256 * 2**20  # bytes of activations one no-grad pass of ``Twin.run`` may hold (the bound when PASS_BLOCK is raised)
PASS_BLOCK = MMAP_THRESHOLD - 2**16  # bytes: a pass's largest module output stays below the mmap threshold
                                    # (ResNet-50 at 224x224: 5 rows a pass; VGG-16 at 240x240: 1)
RUN_MAX_BATCH = 256
TWIN_VIA_FILE = 256 * 2**20  # bytes: a larger normalised model reaches onnx2torch through a file


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' (or None) = CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{option('device', 'cuda')} was asked for but torch sees no CUDA device",
                         hint=f"use {option('device', 'cpu')} or {option('device', 'auto')}")
    return dev


def exact_float32() -> None:
    """Full float32 in CUDA convolutions and matrix products, as ONNX Runtime computes
    them: torch lets cuDNN use TF32 (a 10-bit mantissa) by default on Ampere and later, off
    the ORT outputs by about 1e-3 relative, far outside the parity tolerance (FP32_TOL)."""
    if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
        log.debug("TF32 off for CUDA convolutions and matrix products (parity with ONNX Runtime)")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _normalised_module(loaded: LoadedModel):
    """The normalised copy's facts (``Normalised`` without its model) and the onnx2torch
    module made from it. A copy larger than TWIN_VIA_FILE reaches onnx2torch through a
    temporary file, its only holder while onnx2torch runs: onnx2torch's shape inference
    then reads the file instead of serialising and parsing two more copies in memory
    (VGG-16: 3.9 GB peak before)."""
    try:
        norm = normalise(loaded.model)
    except ConversionError as exc:  # name the file: the CLI prints this one line
        raise ConversionError(f"{loaded.label}: {exc.raw_message}", hint=exc.raw_hint) from None
    model, norm = norm.model, dataclasses.replace(norm, model=None)
    if model.ByteSize() <= TWIN_VIA_FILE:
        return norm, _onnx2torch(model, loaded.label)
    with tempfile.TemporaryDirectory(prefix="dynedit-twin-") as tmp:
        path = Path(tmp) / "twin.onnx"
        onnx.save_model(model, str(path))
        del model
        return norm, _onnx2torch(str(path), loaded.label)


def _onnx2torch(src, label: str) -> torch.nn.Module:
    from onnx2torch import convert

    try:
        with progress.phase("torch twin (onnx2torch)"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = convert(src)
        for w in caught:  # converter notes are for -vv, not the user's terminal
            log.debug("onnx2torch: %s: %s", w.category.__name__, w.message)
    except NotImplementedError as exc:
        raise ConversionError(f"{label}: the torch twin cannot be built: {str(exc).splitlines()[0]}",
                              hint="onnx2torch lacks a converter for this op") from None
    except Exception as exc:  # noqa: BLE001 - converter failures are many
        raise ConversionError(f"{label}: onnx2torch failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                              hint="onnx2torch failed on an op of this graph; report the op") from None
    return module


class Twin:
    """An onnx2torch module plus the layer map of the ORIGINAL model."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device | None = None, *,
                 input_shapes: dict[str, tuple[int, ...]] | None = None):
        self.loaded = loaded
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            exact_float32()
        threads.apply_torch()
        self.layer_map: LayerMap = build_layer_map(loaded.model)
        self.inputs = input_specs(loaded.model)
        self.outputs = output_specs(loaded.model)
        check_input_shapes(self.inputs, input_shapes, loaded.label)
        self.input_shapes = dict(input_shapes or {})  # user-given sizes (input_shapes), name -> dims
        norm, module = _normalised_module(loaded)
        self.fp16 = norm.fp16
        self.quantised = norm.quantised
        self.notes = norm.notes
        self._row_bytes: int | None = None  # Twin.run's memory per row, measured on its first call
        self._capturing = 0  # open capture() contexts: run() then measures nothing (no extra pass recorded)
        # The scalar attributed / compared by the output criterion: the logits before a
        # final Softmax (an extra output of the twin, after the graph's own), else the
        # graph's first output.
        self.logits_tensor = norm.logits
        self.softmax_node = norm.softmax_node
        self._select = norm.logits_index
        # Integer token inputs have no gradient: attribution interpolates the outputs of the
        # Gathers on embedding tables that read them (``interpolate``).
        self.embeddings = find_embeddings(loaded.model, unique_node_names(loaded.model.graph))
        # Class scores declared [N, C, 1, 1] (a conv head, e.g. SqueezeNet): seen as [N, C].
        first = self.outputs[0].shape if self.outputs else ()
        self._flatten = (len(first) > 2 and all(isinstance(d, int) and d == 1 for d in first[2:])
                         and not (isinstance(first[1], int) and first[1] <= 1))
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module.to(self.device)
        self._modules = dict(self.module.named_modules())
        self.channels_last = False
        self.set_layout(self.device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d)
                                                          for m in self._modules.values()))
        for layer in self.layer_map.layers:
            if layer.module not in self._modules:
                raise InternalError(f"twin has no module {layer.module!r} for node {layer.node!r}")

    def set_layout(self, channels_last: bool) -> None:
        """The memory layout of the module and of every 4-D input: channels_last on CPU for a
        model with a 2-D Conv (oneDNN's own layout, no reorder around every conv: the
        real-size repair of tv_badnets 222 -> 196 s, the same edit), else torch's default;
        back to the default where channels_last's rounding is what puts the twin off ONNX
        Runtime (``parity.check_parity``)."""
        if channels_last != self.channels_last:
            self.module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.channels_last = channels_last

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
            op = op_of(self.loaded.model.graph, self.softmax_node) if self.softmax_node else "Softmax"
            return f"logits {self.logits_tensor!r} before {op} node {self.softmax_node!r}"
        name = self.outputs[0].name if self.outputs else "?"
        return f"output {name!r}"

    def rows_elsewhere(self, layers, x: np.ndarray) -> dict[str, str]:
        """node -> why, for each of ``layers`` whose key input or output does not hold the
        inputs' rows along its first axis (seq-first attention: [T, B, D], [T x B, D];
        ``_row_axes`` on ``x``): key statistics, pair keys and integrated gradients read a
        layer's rows along the first axis, so such a layer is not a candidate."""
        xs = self.to_tensor(x[:2])
        axes = _row_axes(self.module, xs if isinstance(xs, tuple) else (xs,))
        nodes = {n.target: n for n in self.module.graph.nodes if n.op == "call_module"}
        out = {}
        for layer in layers:
            node = nodes[layer.module]
            data = next((a for a in node.all_input_nodes if axes.get(a.name) is not None), None)
            for what, value in (("input", data), ("output", node)):
                if value is not None and axes.get(value.name) != (0, 1, 1):
                    out[layer.node] = (f"its {what} does not hold the inputs' rows along its first axis "
                                       "(seq-first attention)")
                    break
        return out

    def to_tensor(self, x: np.ndarray):
        """A batch as the twin's input: a tensor, or for a model with several inputs (a
        structured array with one field per input, ``data.pack_inputs``) a tuple of them."""
        if x.dtype.names:
            return tuple(self.to_tensor(x[name]) for name in x.dtype.names)
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.is_floating_point():
            t = t.float()
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
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

    def run(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Logits as float64 numpy, batched, no grad, current hooks applied. The default
        batch keeps the activations within RUN_BUDGET (at most RUN_MAX_BATCH rows)."""
        batch_size = batch_size or self.pass_rows(x)
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                outs.append(self.forward(self.to_tensor(x[i:i + batch_size])).double().cpu().numpy())
        return np.concatenate(outs, axis=0)

    def pass_rows(self, x: np.ndarray) -> int:
        """Rows per no-grad pass: RUN_BUDGET over three times the largest module output of
        one row (a module's input and output, and a branch, are alive at once), and no
        more than keep every module output under glibc's mmap threshold (PASS_BLOCK): the
        pass's blocks then come from malloc's heap and are used again pass after pass,
        where larger ones are mapped and zeroed by the kernel every time (ResNet-50 at
        224x224, 40 inputs: 27 rows a pass 2.00 s, 5 rows 1.53 s and no page faults)."""
        if not len(x) or (self._row_bytes is None and self._capturing):
            return RUN_MAX_BATCH
        if self._row_bytes is None:
            largest = [0]

            def hook(module, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if torch.is_tensor(out):
                    largest[0] = max(largest[0], out.numel() * out.element_size())

            leaves = [m for m in self.module.modules() if not list(m.children())]
            handles = [m.register_forward_hook(hook) for m in leaves]
            try:
                with torch.no_grad():
                    self.forward(self.to_tensor(x[:1]))
            finally:
                for h in handles:
                    h.remove()
            self._row_bytes = 3 * max(largest[0], 1)
        return int(max(1, min(RUN_MAX_BATCH, RUN_BUDGET // self._row_bytes, 3 * PASS_BLOCK // self._row_bytes)))

    @property
    def token_inputs(self) -> bool:
        """Some input is integer (token ids): no gradient reaches it."""
        return any(not np.issubdtype(spec.dtype, np.floating) for spec in self.inputs)

    # -- straight-line paths for integrated gradients ------------------------------
    def interpolate(self, xc, xk, alphas: torch.Tensor) -> "_InputPath | _EmbeddingPath":
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
                hook = delta_hook(edit.layer, edit.u, edit.d, self.device, getattr(edit, "view", "patch"))
                handles.append(self.module_of(edit.layer).register_forward_hook(hook))
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

        self._capturing += 1
        try:
            for layer in layers:
                handles.append(self.module_of(layer).register_forward_hook(make(layer)))
            yield store
        finally:
            self._capturing -= 1
            for h in handles:
                h.remove()

    def capture_rows(self, layers, x: np.ndarray) -> dict:
        """Each layer's key input and output on the inputs ``x`` (no grad, current hooks
        applied): node -> (inputs [n, ...], outputs [n, ...]). The forward passes take
        ``pass_rows`` rows each (within RUN_BUDGET) and their captures are copied into
        one tensor per layer, so the peak is the gathered values plus one pass (VGG-16 at
        240x240: 34 inputs in one pass held 1.4 GB of transient activations)."""
        n = len(x)
        rows = self.pass_rows(x)
        got: dict = {}
        with torch.no_grad(), self.capture(layers, inputs=True, outputs=True) as store:
            for lo in range(0, n, rows):
                self.forward(self.to_tensor(x[lo:lo + rows]))
                for layer in layers:
                    rec = store[layer.node]
                    _gather(got, (layer.node, "in"), rec["in"].pop(), lo, n)
                    _gather(got, (layer.node, "out"), rec["out"].pop(), lo, n)
        return {layer.node: (got[layer.node, "in"], got[layer.node, "out"]) for layer in layers}

    def capture_upto(self, layer: Layer, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s key input and output on ``x`` (no grad, current hooks applied); the
        forward pass stops at the layer (what follows it is not computed)."""
        def stop(module, args, output):
            raise _Reached

        with torch.no_grad(), self.capture([layer], inputs=True, outputs=True) as store:
            handle = self.module_of(layer).register_forward_hook(stop)  # after capture's own hook
            try:
                self.forward(self.to_tensor(x))
            except _Reached:
                pass
            finally:
                handle.remove()
        rec = store[layer.node]
        return rec["in"][0], rec["out"][0]


def _gather(into: dict, key, rows: torch.Tensor, lo: int, n: int, axis: int = 0, outer: int = 1,
            inner: int = 1) -> None:
    """Put ``rows`` (a batch's rows lo.. of n) into ``into[key]``, allocated on first use;
    the rows lie along ``axis``, which is outer x rows x inner long (``_row_axes``); a
    whole batch is kept as it is (no copy)."""
    k = rows.shape[axis] // (outer * inner)
    if k == n:
        into[key] = rows
        return
    if key not in into:
        shape = list(rows.shape)
        shape[axis] = outer * n * inner
        into[key] = rows.new_empty(shape)
    _rows_view(into[key], axis, outer, inner).narrow(axis + 1, lo, k).copy_(_rows_view(rows, axis, outer, inner))


def _rows_view(t: torch.Tensor, axis: int, outer: int, inner: int) -> torch.Tensor:
    """``t`` with its rows' axis split into (outer, rows, inner)."""
    return t.view(*t.shape[:axis], outer, -1, inner, *t.shape[axis + 1:])


def _row_slice(t: torch.Tensor, row: tuple, lo: int, k: int) -> torch.Tensor:
    """Rows lo..lo + k of ``t``, whose rows lie as ``row`` = (axis, outer, inner) says."""
    axis, outer, inner = row
    if outer == 1:
        return t.narrow(axis, lo * inner, k * inner)
    part = _rows_view(t, axis, outer, inner).narrow(axis + 1, lo, k)
    return part.reshape(*t.shape[:axis], outer * k * inner, *t.shape[axis + 1:])


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
    or through Cast / Identity / Unsqueeze / Reshape); for an int8/uint8 table (what
    quantize_dynamic makes of an embedding), the DequantizeLinear of the looked-up rows."""
    from .layers import constant_sources, twin_module_name

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    consts = constant_sources(graph)
    ints = {vi.name for vi in graph.input if vi.name not in init
            and vi.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    derived = set(ints)
    out, int_rows = [], set()
    for node, name in zip(graph.node, names):
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape") and node.input and node.input[0] in derived:
            derived.update(node.output)
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in int_rows:
            out.append((twin_module_name(name, node.domain), name))
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        table = node.input[0]
        dtype = init[table].data_type if table in init and len(init[table].dims) == 2 else None
        is_float_table = dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or table in consts
        if node.input[1] in derived and is_float_table:
            out.append((twin_module_name(name, node.domain), name))
        elif node.input[1] in derived and dtype in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            int_rows.add(node.output[0])
    return tuple(out)


class _Reached(Exception):
    """Raised by a forward hook to stop a pass once the layer it watches has run."""


class DownstreamRunner:
    """Re-run only the part of the twin's fx graph that depends on one layer.

    The first call runs the whole graph on the fixed input (under whatever edits are
    applied then) and caches every value that does not depend on ``layer``; later
    calls recompute the layer and what follows it. Used while fitting an edit, where
    the input and everything upstream of the edited layer stay fixed. ``rows``: inputs
    per recording pass (default all; the peak is one pass plus the cached values).
    ``layer`` may be a list of layers: one recording keeps what each of them needs, and
    a call names the layer whose downstream part it recomputes (``layer=``; default
    the first), the screen's use: every candidate's trial scored from one recording.
    """

    def __init__(self, twin: "Twin", layer, *inputs: torch.Tensor, rows: int | None = None):
        if len(inputs) == 1 and isinstance(inputs[0], tuple):
            inputs = inputs[0]
        gm = twin.module
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        parts = {l.node: _downstream(gm, l) for l in layers}
        self._replay = _Replay(gm, _record(gm, inputs, list(parts.values()), rows), parts[layers[0].node])
        self._parts = parts
        self._first = layers[0].node
        self._inputs = inputs
        self._select = twin.select
        self.n_rows = batch_size_of(inputs[0] if len(inputs) == 1 else tuple(inputs))  # the batch it caches

    @staticmethod
    def row_bytes(twin: "Twin", layers, x1: torch.Tensor) -> int:
        """Bytes a recording of ``layers`` keeps per input row (one row recorded)."""
        rec = _record(twin.module, (x1[:1],), [_downstream(twin.module, l) for l in layers], None)
        return sum(rec.cache[n].numel() * rec.cache[n].element_size() for n in rec.sliced)

    def __call__(self, rows: slice | None = None, layer: Layer | None = None) -> torch.Tensor:
        """The output on every input, or on the inputs ``rows`` (a slice of the batch:
        memory for one chunk of the fit at a time), recomputed from ``layer`` on."""
        self._replay.rows = rows
        self._replay.downstream = self._parts[self._first if layer is None else layer.node]
        try:
            return self._select(self._replay.run(*self._inputs))
        finally:
            self._replay.rows = None


class TailRecording:
    """Whole passes that keep, batch by batch, the values the graph's tail from ``layers``
    on reads from upstream (its frontier), and later passes over the same batches that
    recompute that tail alone from them: the key statistics' later groups of layers
    (ResNet-18: the last block and the head) read their keys without a whole pass over
    the stats again. Once the kept values exceed ``budget`` bytes they are dropped and
    ``replay`` runs whole passes (the same values, at the cost of a whole pass)."""

    def __init__(self, twin: "Twin", layers: list[Layer], budget: int):
        gm = twin.module
        self.twin, self.budget, self.used = twin, budget, 0
        self.part = set().union(*(_downstream(gm, layer) for layer in layers))
        self.frontier = _frontier(gm, [self.part])
        self.records: list[dict] | None = []

    def forward(self, x) -> torch.Tensor:
        """``Twin.forward`` on batch ``x`` (under the caller's no_grad), the tail's frontier kept."""
        if self.records is None:
            return self.twin.forward(x)
        kept: dict = {}
        out = _Record(self.twin.module, self.frontier, kept.__setitem__).run(*(x if isinstance(x, tuple) else (x,)))
        rows = batch_size_of(x)
        self.used += sum(v.numel() * v.element_size() for v in kept.values()
                         if torch.is_tensor(v) and v.dim() and v.shape[0] == rows)
        if self.used > self.budget:
            self.records = None
        else:
            self.records.append(kept)
        return self.twin.select(out)

    def replay(self, index: int, x) -> torch.Tensor:
        """The output on the ``index``-th batch given to ``forward`` (``x``), the tail
        recomputed from the kept values (current hooks applied), or a whole pass."""
        if self.records is None:
            return self.twin.forward(x)
        return self.twin.select(_Replay(self.twin.module, Recording(self.records[index]), self.part).run())


def _downstream(gm, layer: Layer) -> set:
    """The fx nodes computed from ``layer``'s module (itself included)."""
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
    return downstream


@dataclasses.dataclass
class Recording:
    """Values a replay reads from upstream of the part it recomputes (``_record``).
    ``cache``: node -> value; ``sliced``: node -> (axis, outer, inner) for the values
    with a batch axis (a replay of some rows reads those rows: ``_row_axes``); ``replayed``:
    nodes computed from the inputs' shapes alone (Shape -> Gather -> Concat: a Reshape's
    target), recomputed by every replay for its own rows; ``shaped``: the Shape nodes
    they read, node -> (the value recorded, the index of its batch entry or None, that
    entry per row); ``fixed``: values computed from the inputs with no batch axis that a
    replay of some rows cannot slice."""

    cache: dict
    sliced: dict = dataclasses.field(default_factory=dict)
    replayed: set = dataclasses.field(default_factory=set)
    shaped: dict = dataclasses.field(default_factory=dict)
    fixed: set = dataclasses.field(default_factory=set)
    n_rows: int = 0


class _Replay(fx.Interpreter):
    """Runs the nodes in ``downstream`` (and the output); every other node reads its value
    from the recording (``rows`` of it when set) or is skipped. A module-level class: one
    defined per recording is freed only by the cyclic collector, and the recording with it."""

    def __init__(self, gm, recording: Recording, downstream: set):
        super().__init__(gm)
        self.rec, self.downstream = recording, downstream
        self.rows = None

    @property
    def rows(self) -> slice | None:
        return self._rows

    @rows.setter
    def rows(self, rows: slice | None) -> None:
        """The rows the next run replays (None: all); their span, and whether it is a part."""
        self._rows = rows
        self._span = range(self.rec.n_rows) if rows is None else range(self.rec.n_rows)[rows]
        self._part = len(self._span) != self.rec.n_rows

    def run_node(self, n):
        if n in self.downstream or n in self.rec.replayed or n.op == "output":
            return super().run_node(n)
        rec, span = self.rec, self._span
        if n in rec.shaped:  # the shape as recorded (its first pass), for the rows replayed
            value, entry, per_row = rec.shaped[n]
            if entry is not None:
                value = value.clone()
                value[entry] = len(span) * per_row
            return value
        if self._part and n in rec.fixed:
            raise InternalError(f"the value of fx node {n.name!r} depends on the inputs but has no batch axis: "
                                "it cannot be replayed for some of the rows")
        if n in rec.cache:
            if self._part and n in rec.sliced:
                return _row_slice(rec.cache[n], rec.sliced[n], span.start, len(span))
            return rec.cache[n]
        return None  # upstream and not read downstream: skipped


class _Record(fx.Interpreter):
    """Runs the graph and hands the value of every node in ``frontier`` to ``keep``."""

    def __init__(self, gm, frontier: set, keep):
        super().__init__(gm)
        self.frontier, self.keep = frontier, keep

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.frontier:
            self.keep(n, value)
        return value


def _frontier(gm, parts: list[set]) -> set:
    """The nodes outside a downstream part in ``parts`` whose values it reads."""
    return {n for n in gm.graph.nodes
            if n.op != "output" and any(n not in part and any(u in part for u in n.users) for part in parts)}


_ROW_AXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _row_axes(gm, inputs: tuple) -> dict:
    """node name -> (axis, outer, inner) for every tensor value whose rows lie along
    ``axis``, which is outer x rows x inner long (outer = inner = 1: the plain batch axis;
    inner > 1: the batch merged with an axis after it, attention's [B x heads, T, d];
    outer > 1: with one before it, seq-first attention's [T x B, D]); None where the value
    has no batch axis; "unknown" where no such layout gives its rows. Read once per graph
    (names, not nodes: a node holds its graph and so the module, which would keep the
    weak key alive) from the shapes of passes of one row and of two, and for a merged
    axis from their values, once inputs with two different rows come."""
    axes = _ROW_AXES.get(gm)
    if axes is None:
        axes = _ROW_AXES[gm] = _shape_axes(gm, tuple(t[:1] for t in inputs))
    merged = {name for name, a in axes.items() if a == "merged"}
    if not merged:
        return axes
    if batch_size_of(inputs[0]) < 2:
        return {name: ("unknown" if a == "merged" else a) for name, a in axes.items()}
    both, row0, row1 = (_probe(gm, tuple(t[lo:hi] for t in inputs), merged) for lo, hi in ((0, 2), (0, 1), (1, 2)))
    for name in merged:
        axes[name] = _merged_layout(both[name], row0[name], row1[name])
    return axes


def _shape_axes(gm, first: tuple) -> dict:
    """``_row_axes`` from the shapes alone (one row, and that row twice): "merged" where
    the rows share an axis with something else."""
    one, two = _probe(gm, first), _probe(gm, tuple(torch.cat([t] * 2) for t in first))
    axes: dict = {}
    for name, s1 in one.items():
        s2 = two.get(name, ())
        moved = [a for a in range(len(s1)) if len(s2) == len(s1) and s1[a] != s2[a]]
        if len(s2) == len(s1) and not moved:
            axes[name] = None
        elif len(moved) == 1 and s2[moved[0]] == 2 * s1[moved[0]]:
            axes[name] = (moved[0], 1, 1) if s1[moved[0]] == 1 else "merged"
        else:
            axes[name] = "unknown"
    return axes


def _probe(gm, inputs: tuple, names: set | None = None) -> dict:
    """node name -> the shape of every tensor node on ``inputs``, or with ``names`` the
    values of those nodes."""
    seen: dict = {}

    def keep(n, v):
        if torch.is_tensor(v) and names is None:
            seen[n.name] = tuple(v.shape)
        elif torch.is_tensor(v) and n.name in names:
            seen[n.name] = v
    with torch.no_grad():
        _Record(gm, set(gm.graph.nodes), keep).run(*inputs)
    return seen


def _merged_layout(both: torch.Tensor, row0: torch.Tensor, row1: torch.Tensor):
    """(axis, outer, inner) such that ``both`` (two rows) holds ``row0`` and ``row1`` (one
    row each) as rows 0 and 1 of its merged axis; "unknown" when no split does."""
    axis = next(a for a in range(both.dim()) if both.shape[a] != row0.shape[a])
    size = row0.shape[axis]
    for outer in (1, size) + tuple(d for d in range(2, size) if size % d == 0):
        view = _rows_view(both, axis, outer, size // outer)
        parts = [view.narrow(axis + 1, i, 1).reshape(row0.shape) for i in (0, 1)]
        if all(_close(p, r) for p, r in zip(parts, (row0, row1))):
            return axis, outer, size // outer
    return "unknown"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-12)))


def _shape_nodes(gm, dependent: set) -> tuple[set, set]:
    """(the Shape nodes of values computed from the inputs, the nodes computed from the
    inputs through those alone: functions of the inputs' shapes, not of their values)."""
    from onnx2torch.node_converters.shape import OnnxShape

    shapes = {n for n in dependent if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OnnxShape)}
    derived: set = set()
    for node in gm.graph.nodes:  # in topological order
        ins = [a for a in node.all_input_nodes if a in dependent]
        if node.op != "output" and node not in shapes and ins and all(a in shapes or a in derived for a in ins):
            derived.add(node)
    return shapes, derived


def _replayed(frontier: set, derived: set) -> set:
    """The shape-derived nodes in ``frontier`` and the shape-derived nodes they are computed from."""
    out, stack = set(), [n for n in frontier if n in derived]
    while stack:
        node = stack.pop()
        if node not in out:
            out.add(node)
            stack.extend(a for a in node.all_input_nodes if a in derived)
    return out


def _batch_entry(gm, node, axes: dict) -> tuple[int | None, int]:
    """(the index of the rows' axis in Shape ``node``'s value or None, its length per row)."""
    row = axes.get(node.all_input_nodes[0].name)
    if not isinstance(row, tuple):
        return None, 1
    module = gm.get_submodule(node.target)
    start, end = getattr(module, "_start", 0) or 0, getattr(module, "_end", None)
    if start < 0 or (end is not None and not 0 <= row[0] < end) or row[0] < start:
        return None, 1  # a negative start, or the rows' axis left out
    return row[0] - start, row[1] * row[2]


def _record(gm, inputs: tuple, parts: list[set], rows: int | None) -> Recording:
    """Run the graph on ``inputs`` (``rows`` at a time) and keep the values each
    downstream part in ``parts`` reads from outside itself (its frontier). Values with a
    batch axis (``_row_axes``) are gathered pass by pass into one tensor; values computed
    from the inputs' shapes are left to each replay (a pass of other rows gives other
    values: the Reshape targets of a transformer's attention)."""
    n_rows = batch_size_of(inputs[0] if len(inputs) == 1 else tuple(inputs))
    rows = n_rows if rows is None else max(1, rows)
    dependent: set = set()  # nodes computed from the inputs
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    axes = _row_axes(gm, inputs)
    shapes, derived = _shape_nodes(gm, dependent)
    frontier = _frontier(gm, parts)
    replayed = _replayed(frontier, derived)
    read = ({a for n in replayed for a in n.all_input_nodes} | frontier) - replayed
    rec = Recording(cache={}, replayed=replayed, n_rows=n_rows)
    span = [0, n_rows]

    def keep(n, value):
        row = axes.get(n.name) if n in dependent else None
        if n in shapes:
            if n not in rec.shaped:  # the first pass's; replays set the rows' entry
                rec.shaped[n] = (value.clone(), *_batch_entry(gm, n, axes))
        elif isinstance(row, tuple):
            rec.sliced[n] = row
            _gather(rec.cache, n, value, span[0], n_rows, *row)
        else:
            if n in dependent:
                rec.fixed.add(n)
            rec.cache.setdefault(n, value)  # the same in every pass

    with torch.no_grad():
        for lo in range(0, n_rows, rows):
            span[:] = [lo, min(lo + rows, n_rows)]
            _Record(gm, read, keep).run(*(t[lo:lo + rows] for t in inputs))
    if rec.fixed and rows < n_rows:
        raise InternalError(f"the value of fx node {next(iter(rec.fixed)).name!r} depends on the inputs but has no "
                            "batch axis: it cannot be recorded a few rows at a time")
    return rec
