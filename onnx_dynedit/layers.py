"""The layer map: every editable layer <-> its ONNX initializer(s) and their exact layout.

Editing happens in one *canonical* space per layer: a matrix ``W`` of shape
``[out, in]`` such that the layer's output (bias excluded) is ``W @ k`` for a key ``k``.
The layout transform between ``W`` and the ONNX tensor is recorded here from the node's
attributes (transB, alpha, which MatMul operand is constant), never guessed from a
shape, so square weights come out right:

  Conv      weight [O, I, *kernel] (group = 1)   W = weight.reshape(O, I * prod(kernel))
            key = the unfolded input patch (channel-major, then kernel taps), one per
            output position, exactly the order of ``torch.nn.functional.unfold``.
  Gemm      Y = alpha * A @ B' + beta * C  (transA = 0)
            transB = 1: B is [out, in], W = alpha * B
            transB = 0: B is [in, out], W = alpha * B.T
  MatMul    Y = X @ B with B a 2-D constant [in, out]: W = B.T

A Gemm / MatMul weight may be ``Transpose(stored, perm)`` of a constant (some exporters
write this): ``perm`` is recorded, ``shape`` is the node's (transposed) weight shape, and
``initializer`` names the stored tensor; ``to_canonical`` / ``from_canonical`` go through
the perm, so an edit is written into the stored tensor.

ConvInteger / MatMulInteger (quantize_dynamic) are mapped as Conv / MatMul on the
dequantised weight (``quant.scheme == "integer_op"``); the node is the integer op.

A weight may also be made from an integer tensor (DequantizeLinear, or Cast [+ Sub] +
Mul; quant.py): the layer then names the integer tensor as its ``initializer``, its
``dtype`` is the integer type, and ``quant`` records the pattern, the scale / zero-point
tensors and the axis; the layouts above apply to the dequantised float weight.

This module needs onnx and numpy only.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import DataError, LayerError
from .quant import INTEGER_OPS, WeightQuant, dequantize, integer_op_weights, use_counts, weight_dequantisations

EDITABLE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def same_pads(size: int, kernel: int, stride: int, dilation: int, *, upper: bool) -> tuple[int, int]:
    """(begin, end) padding of one spatial axis of size ``size`` under auto_pad
    SAME_UPPER (``upper``) / SAME_LOWER, as ONNX defines it: the output has
    ceil(size / stride) positions, an odd total goes at the end (UPPER) or the beginning."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


@dataclass(frozen=True)
class Layer:
    """One weight-bearing node of the ONNX graph and how to edit it."""

    node: str                 # ONNX node name (generated as "<op>_<index>" when empty/duplicate)
    node_index: int           # position in graph.node
    op: str
    initializer: str          # name of the weight tensor
    bias: str | None
    shape: tuple[int, ...]    # ONNX weight shape
    dtype: str
    source: str               # "initializer" | "constant" | "constant_of_shape"
    shared: bool              # the weight tensor feeds more than this node
    layout: str               # human-readable layout transform (see module doc)
    key_input: str            # activation input of the node (the keys)
    module: str               # module name of this node in the onnx2torch twin
    editable: bool
    reason: str | None = None
    alpha: float = 1.0
    trans_b: bool = True
    groups: int = 1
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    kernel: tuple[int, ...] = ()
    quant: WeightQuant | None = None  # the weight is dequantised from an integer tensor
    perm: tuple[int, ...] | None = None  # the node's weight is Transpose(stored tensor, perm)

    @property
    def out_features(self) -> int:
        if self.op == "Conv":
            return self.shape[0]
        if self.op == "Gemm":
            return self.shape[0] if self.trans_b else self.shape[1]
        return self.shape[1]  # MatMul [in, out]

    @property
    def in_features(self) -> int:
        if self.op == "Conv":
            return int(np.prod(self.shape[1:]))
        if self.op == "Gemm":
            return self.shape[1] if self.trans_b else self.shape[0]
        return self.shape[0]

    # -- layout transforms (float64 in and out) -------------------------------------
    def to_canonical(self, weight: np.ndarray) -> np.ndarray:
        """Stored ONNX weight tensor -> canonical W [out, in]."""
        w = np.asarray(weight, dtype=np.float64)
        if self.perm is not None:
            w = np.transpose(w, self.perm)
        if self.op == "Conv":
            return w.reshape(self.shape[0], -1)
        if self.op == "Gemm":
            return self.alpha * (w if self.trans_b else w.T)
        if self.op == "MatMul":
            return w.T
        raise LayerError(f"layer {self.node!r} ({self.op}) has no canonical form")

    def from_canonical(self, canon: np.ndarray) -> np.ndarray:
        """Canonical W [out, in] -> the stored ONNX weight tensor's layout (float64)."""
        w = self._node_layout(np.asarray(canon, dtype=np.float64))
        return w if self.perm is None else np.transpose(w, np.argsort(self.perm))

    def _node_layout(self, c: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return c.reshape(self.shape)
        if self.op == "Gemm":
            c = c / self.alpha
            return c if self.trans_b else c.T
        if self.op == "MatMul":
            return c.T
        raise LayerError(f"layer {self.node!r} ({self.op}) has no canonical form")

    def to_dict(self) -> dict:
        return {
            "node": self.node, "op": self.op, "initializer": self.initializer, "bias": self.bias,
            "shape": list(self.shape), "dtype": self.dtype, "shared": self.shared, "source": self.source,
            "layout": self.layout, "editable": self.editable, "reason": self.reason, "module": self.module,
            "quant": self.quant.to_dict() if self.quant is not None else None,
            "perm": list(self.perm) if self.perm is not None else None,
        }


@dataclass(frozen=True)
class LayerMap:
    layers: tuple[Layer, ...]
    node_names: tuple[str, ...] = field(repr=False)  # unique name of every node, by index

    def editable(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.editable]

    def get(self, name: str) -> Layer:
        """A layer by node name or weight-initializer name; unknown names list close matches."""
        for layer in self.layers:
            if name in (layer.node, layer.initializer):
                return layer
        candidates = [l.node for l in self.layers] + [l.initializer for l in self.layers]
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.4)
        hint = ("close matches: " + ", ".join(close)) if close else (
            "editable layers: " + ", ".join(l.node for l in self.editable()[:8]))
        raise LayerError(f"no layer named {name!r} in this model", hint=hint + "; see `dynedit inspect`")


def unique_node_names(graph: onnx.GraphProto) -> list[str]:
    """Node names made unique: empty or repeated names become ``<op>_<index>``."""
    seen: set[str] = set()
    names = []
    for i, node in enumerate(graph.node):
        name = node.name
        if not name or name in seen:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
        seen.add(name)
        names.append(name)
    return names


def twin_module_name(node_name: str, domain: str = "") -> str:
    """The module name onnx2torch gives a node (its OnnxGraph.generate_node_name)."""
    return (f"{domain}/" + node_name.replace(".", "/")).lstrip("/")


def constant_sources(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """Tensor name -> (kind, node index) for values made by Constant / ConstantOfShape."""
    out = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            out[node.output[0]] = ("constant", i)
        elif node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx"):
            out[node.output[0]] = ("constant_of_shape", i)
    return out


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of a constant tensor (initializer, Constant or constant-shaped
    ConstantOfShape), or None when it is computed at run time."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if name not in node.output:
            continue
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type == "ConstantOfShape":
            shape = constant_value(graph, node.input[0]) if node.input else None
            if shape is None:
                return None
            fill = np.zeros(1, dtype=np.float32)
            for attr in node.attribute:
                if attr.name == "value":
                    fill = numpy_helper.to_array(attr.t)
            return np.full(tuple(int(d) for d in shape.reshape(-1)), fill.reshape(-1)[0], dtype=fill.dtype)
        return None
    return None


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _memo_constants(graph: onnx.GraphProto):
    """``constant_value`` for initializers and Constant nodes, by name, with a cache."""
    inits = {init.name: init for init in graph.initializer}
    consts = {node.output[0]: node for node in graph.node
              if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output}
    cache: dict = {}

    def value(name):
        if name not in cache:
            if name in inits:
                cache[name] = numpy_helper.to_array(inits[name])
            elif name in consts:
                cache[name] = _constant_node_value(consts[name])
            else:
                cache[name] = None
        return cache[name]

    return value


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def build_layer_map(model: onnx.ModelProto) -> LayerMap:
    """Every weight-bearing node of ``model`` (``EDITABLE_OPS``, and the integer ops of
    quant.INTEGER_OPS as their float op), with its weight's layout and, when it cannot be
    edited, why."""
    graph = model.graph
    names = unique_node_names(graph)
    ctx = _MapContext(graph)
    layers = []
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in INTEGER_OPS:
            if i not in ctx.integer:
                continue
            wq = ctx.integer[i]
            operands, op = (wq.value, node.input[0], None, None), INTEGER_OPS[node.op_type]
        elif node.op_type in EDITABLE_OPS:
            operands, op = _operands(node, ctx.is_const, ctx.is_weight), node.op_type
        else:
            continue
        layer = None if operands is None else _layer(ctx, i, node, op, names[i], operands)
        if layer is not None:
            layers.append(layer)
    return LayerMap(layers=tuple(layers), node_names=tuple(names))


class _MapContext:
    """What ``build_layer_map`` looks up for every node of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.init_names = {init.name for init in graph.initializer}
        self.graph_inputs = {vi.name for vi in graph.input} - self.init_names
        self.sources = constant_sources(graph)
        self.consumers = use_counts(graph)
        self.graph_outputs = {o.name for o in graph.output}
        value = _memo_constants(graph)
        self.dequantised = weight_dequantisations(graph, value)
        self.integer = integer_op_weights(graph, value)
        self.by_value = {wq.value: wq for wq in self.integer.values()}
        # Transpose(constant) -> (the constant, perm): the weight is stored transposed
        self.transposed = {n.output[0]: (n.input[0], tuple(int(p) for p in _attrs(n).get("perm", ())))
                           for n in graph.node if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")
                           and n.input and self.is_const(n.input[0])}

    def is_const(self, name: str) -> bool:
        return name in self.init_names or name in self.sources

    def is_weight(self, name: str) -> bool:
        return self.is_const(name) or name in self.dequantised or name in self.transposed

    def is_shared(self, name: str) -> bool:
        return self.consumers.get(name, 0) > 1 or name in self.graph_outputs or name in self.graph_inputs


def _layer(ctx: _MapContext, i: int, node, op: str, name: str, operands) -> Layer | None:
    """The Layer of node ``i`` (op ``op``) with weight / key / bias ``operands``."""
    weight, key, bias, reason = operands
    quant = ctx.dequantised.get(weight) or ctx.by_value.get(weight)
    if quant is not None and quant.scheme == "integer_op":  # ``weight`` names the op's scaled output
        shared = ctx.is_shared(quant.quantized)
    else:
        shared = ctx.is_shared(weight) or (quant is not None and ctx.is_shared(quant.quantized))
    perm = None
    if weight in ctx.transposed:
        weight, perm = ctx.transposed[weight]
        shared = shared or ctx.is_shared(weight)
        if op == "Conv":
            reason = reason or "a Conv weight made by Transpose is mapped but not editable"
    stored = _stored_weight(ctx.graph, weight, quant)
    if stored is None:
        return None
    weight, value, dtype = stored
    if perm is not None:
        if len(perm) != value.ndim:  # Transpose without perm reverses the axes
            perm = tuple(reversed(range(value.ndim)))
        value = np.transpose(value, perm)
    if quant is not None and quant.reason is not None:
        reason = reason or quant.reason
    shape = tuple(int(d) for d in value.shape)
    source = ctx.sources.get(weight, ("initializer", -1))[0] if weight not in ctx.init_names else "initializer"
    layout, op_reason = _op_layout(op, _attrs(node), shape)
    if perm is not None:
        layout["layout"] = f"weight = transpose({weight}, perm={list(perm)}); " + layout["layout"]
    if quant is not None and quant.scheme == "integer_op":
        layout["layout"] = f"{node.op_type} (as {op}): " + layout["layout"]
    reason = (reason or op_reason) if op == "MatMul" else (op_reason or reason)
    if reason is None and shared:
        reason = f"initializer {weight!r} is shared by several nodes; editing it would change all of them"
    if reason is None and not np.issubdtype(value.dtype, np.floating):
        reason = f"weight dtype {dtype} is not floating point"
    return Layer(node=name, node_index=i, op=op, initializer=weight, bias=bias, shape=shape, dtype=dtype,
                 source=source, shared=shared, key_input=key, module=twin_module_name(name, node.domain),
                 editable=reason is None, reason=reason, quant=quant, perm=perm, **layout)


def _operands(node, is_const, is_weight) -> tuple[str, str, str | None, str | None] | None:
    """(weight, key input, bias or None, why not editable or None) of an editable op's
    node; None when the node has no constant weight (activation x activation)."""
    inputs = list(node.input)
    if node.op_type == "MatMul":
        if len(inputs) < 2:
            return None
        if is_weight(inputs[1]) and not is_weight(inputs[0]):
            return inputs[1], inputs[0], None, None
        if is_weight(inputs[0]) and not is_weight(inputs[1]):
            return inputs[0], inputs[1], None, "the constant is MatMul's first operand (W @ X); only X @ W is editable"
        return None
    if len(inputs) < 2 or not is_weight(inputs[1]):
        return None
    bias = inputs[2] if len(inputs) > 2 and inputs[2] and is_const(inputs[2]) else None
    return inputs[1], inputs[0], bias, None


def _stored_weight(graph, weight: str, quant: WeightQuant | None) -> tuple[str, np.ndarray, str] | None:
    """(the stored tensor's name, the float weight, the stored dtype): a dequantised
    weight is edited as floats and stored as its integers; None when not a constant."""
    if quant is not None:
        q = constant_value(graph, quant.quantized)
        zp = constant_value(graph, quant.zero_point) if quant.zero_point else None
        return quant.quantized, dequantize(q, constant_value(graph, quant.scale), zp, quant), str(q.dtype)
    value = constant_value(graph, weight)
    return None if value is None else (weight, value, str(value.dtype))


def _op_layout(op: str, attrs: dict, shape: tuple[int, ...]) -> tuple[dict, str | None]:
    """The layout fields of a ``Layer`` for this op's attributes, and why the op's form
    is not editable (None when it is)."""
    out = dict(alpha=1.0, trans_b=True, groups=1, strides=(), pads=(), dilations=(), kernel=(), auto_pad="NOTSET")
    reason = None
    if op == "Conv":
        groups = int(attrs.get("group", 1))
        nsp = len(shape) - 2
        ap = attrs.get("auto_pad", b"NOTSET")
        out.update(groups=groups, kernel=tuple(int(k) for k in attrs.get("kernel_shape", shape[2:])),
                   strides=tuple(int(s) for s in attrs.get("strides", [1] * nsp)),
                   dilations=tuple(int(s) for s in attrs.get("dilations", [1] * nsp)),
                   pads=tuple(int(s) for s in attrs.get("pads", [0] * 2 * nsp)),
                   auto_pad=ap.decode() if isinstance(ap, bytes) else str(ap))
        out["layout"] = f"W[out,in*k] = weight.reshape({shape[0]}, -1)"
        if groups != 1:
            reason = f"grouped convolution (group={groups}) is mapped but not editable"
        elif nsp not in (1, 2):
            reason = f"{nsp}-D convolution is mapped but not editable (1-D and 2-D are)"
    elif op == "Gemm":
        alpha = float(attrs.get("alpha", 1.0))
        trans_b = bool(attrs.get("transB", 0))
        out.update(alpha=alpha, trans_b=trans_b,
                   layout=f"W[out,in] = {alpha:g} * B" if trans_b else f"W[out,in] = {alpha:g} * B.T")
        if attrs.get("transA", 0):
            reason = "Gemm with transA=1 is not editable"
        elif alpha == 0:
            reason = "Gemm with alpha=0 ignores its weight"
        elif len(shape) != 2:
            reason = f"Gemm weight has rank {len(shape)}"
    elif op == "MatMul":
        out["layout"] = "W[out,in] = B.T"
        if len(shape) != 2:
            reason = f"MatMul with a {len(shape)}-D constant is not editable (2-D only)"
    else:  # ConvTranspose
        out["layout"] = "weight [in, out/group, *k]"
        reason = "ConvTranspose is mapped but not editable"
    return out, reason


def check_finite_weights(model: onnx.ModelProto, layer_map: LayerMap, label: str) -> None:
    """A model whose layer weights hold NaN/Inf is unusable input: say so instead of
    reporting a NaN parity or propagating NaN into the edit."""
    graph = model.graph
    for layer in layer_map.layers:
        for kind, name in (("weight", layer.initializer), ("bias", layer.bias)):
            if not name:
                continue
            value = constant_value(graph, name)
            if value is None or not np.issubdtype(value.dtype, np.floating):
                continue
            bad = int(np.count_nonzero(~np.isfinite(value.astype(np.float32, copy=False))))
            if bad:
                raise DataError(f"{label}: {kind} {name!r} of layer {layer.node!r} holds {bad} NaN/Inf "
                                "value(s)", hint="the model is broken; re-export it from a healthy checkpoint")
