"""Extra onnx2torch converters, registered through onnx2torch's own registry.

onnx2torch registers converters per (op, since-version) and knows opsets up to ~17.
Two gaps matter for real shipped classifiers:

1. *Newer or older versions of ops whose semantics did not change* for inference
   (Reshape-19/21, Flatten-1/21, Conv-22, Relu-1, ...): the converter of the nearest
   registered version is registered for the missing version (``alias``). The list below
   is explicit; ops that changed meaning (Reduce-18 moved ``axes`` to an input, Split-18
   added ``num_outputs``) get converters of their own instead.
2. *Ops onnx2torch lacks*: GlobalMaxPool, Gelu-20; QuantizeLinear / DequantizeLinear (the
   activations of a QDQ-quantised graph; constant weights are folded by the twin, see
   quant.py) and DynamicQuantizeLinear (quantize_dynamic's activations; its ConvInteger /
   MatMulInteger become DequantizeLinear + Conv / MatMul in the twin's copy, quant.py):
   fake quantisation in float with a straight-through gradient; Conv with
   auto_pad SAME_UPPER/SAME_LOWER (onnx2torch refuses it; ``SamePadding`` pads from the
   input size at run time); AveragePool with asymmetric pads (inception-era graphs;
   ``AvgPoolPadded``).
3. *Converters we replace*: Dropout of every version (``DropoutInference``: the identity,
   plus the all-True mask output opset 7-11 graphs declare; onnx2torch's Dropout-10
   returned one tensor where the graph wants two, which broke AlexNet / VGG / SqueezeNet).

``ensure_converters(model)`` registers what the model needs and returns the (op,
version) pairs still missing; it is idempotent.
"""

from __future__ import annotations

import logging

import onnx
import torch
import torch.nn.functional as F
from onnx import defs
from onnx2torch.node_converters import registry
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from .layers import same_pads

log = logging.getLogger(__name__)

# Ops whose every version is the same computation for the float tensors classifiers use
# (later versions only widen the accepted types or add attributes with neutral defaults).
SAME_SEMANTICS = {
    "Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Div", "Dropout", "Equal", "Erf", "Exp",
    "Expand", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "HardSigmoid",
    "Identity", "InstanceNormalization", "LeakyRelu", "Less", "Log", "MatMul", "Max",
    "MaxPool", "Min", "Mul", "Neg", "Not", "Pow", "Reciprocal", "Relu", "Reshape", "Shape",
    "Sigmoid", "Size", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Transpose", "Unsqueeze",
    "Where", "Pad", "GreaterOrEqual", "LessOrEqual", "Range", "Einsum", "Tile", "Clip", "CumSum", "Mod",
    "IsNaN", "HardSwish", "LayerNormalization", "Softmax", "LogSoftmax",
}

_REDUCE_OPS = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}


def _since_version(op: str, opset: int, domain: str = "") -> int | None:
    try:
        return defs.get_schema(op, max_inclusive_version=opset, domain=domain).since_version
    except Exception:  # noqa: BLE001 - unknown op or domain
        return None


def _registered_versions(op: str, domain: str = "") -> list[int]:
    return sorted(d.version for d in registry._CONVERTER_REGISTRY if d.operation_type == op and d.domain == domain)


def _register(op: str, version: int, converter, domain: str = "") -> None:
    key = registry.OperationDescription(domain=domain, operation_type=op, version=version)
    if key not in registry._CONVERTER_REGISTRY:
        registry.add_converter(operation_type=op, version=version, domain=domain)(converter)


# ----------------------------------------------------------------------------- new ops


class GlobalMaxPool(nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(torch_module=GlobalMaxPool(), onnx_mapping=onnx_mapping_from_node(node))


_Q_RANGES = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
             onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535),
             onnx.TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1)}
_TORCH_Q = {torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8,
            torch.int16: onnx.TensorProto.INT16, torch.int32: onnx.TensorProto.INT32}


def _per_axis(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A scale / zero point shaped to broadcast over ``x`` (scalar, or 1-D along ``axis``)."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = t.numel()
    return t.reshape(shape)


class QuantizeLinear(nn.Module, OnnxToTorchModule):
    """y = saturate(rint(x / scale) + zero_point), kept in float (integer values) so that
    gradients pass: rounding has a straight-through gradient (identity inside the range,
    zero where the value saturates), as in quantisation-aware training."""

    def __init__(self, axis: int, qrange: tuple[int, int] | None):
        super().__init__()
        self.axis, self.qrange = axis, qrange

    def forward(self, x, scale, zero_point=None):  # noqa: D102
        s = _per_axis(scale.to(torch.float32), x, self.axis)
        if self.qrange is not None:
            qmin, qmax = self.qrange
        elif zero_point is not None:
            qmin, qmax = _Q_RANGES[_TORCH_Q.get(zero_point.dtype, onnx.TensorProto.UINT8)]
        else:
            qmin, qmax = 0, 255  # no zero point: uint8
        z = _per_axis(zero_point.to(torch.float32), x, self.axis) if zero_point is not None else 0.0
        v = x.to(torch.float32) / s
        v = v + (torch.round(v) - v).detach()  # round half to even, straight-through
        return torch.clamp(v + z, qmin, qmax)


class DequantizeLinear(nn.Module, OnnxToTorchModule):
    """y = (x - zero_point) * scale, per tensor or along ``axis``."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x, scale, zero_point=None):  # noqa: D102
        s = _per_axis(scale, x, self.axis)
        v = x.to(s.dtype)
        if zero_point is not None:
            v = v - _per_axis(zero_point.to(s.dtype), x, self.axis)
        return v * s


def _qdq_converter(op: str):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        attrs = node.attributes
        if attrs.get("block_size", 0):
            raise NotImplementedError(f"{op} with block_size (blocked quantisation) is not supported")
        axis = int(attrs.get("axis", 1))
        if op == "DequantizeLinear":
            return OperationConverterResult(torch_module=DequantizeLinear(axis), onnx_mapping=onnx_mapping_from_node(node))
        qrange = None
        if "output_dtype" in attrs and attrs["output_dtype"]:
            if attrs["output_dtype"] not in _Q_RANGES:
                raise NotImplementedError(f"QuantizeLinear to type {attrs['output_dtype']} is not supported")
            qrange = _Q_RANGES[attrs["output_dtype"]]
        elif len(node.input_values) > 2 and node.input_values[2] in graph.initializers:
            zp_type = graph.initializers[node.input_values[2]].proto.data_type
            if zp_type not in _Q_RANGES:
                raise NotImplementedError(f"QuantizeLinear to type {zp_type} is not supported")
            qrange = _Q_RANGES[zp_type]
        return OperationConverterResult(torch_module=QuantizeLinear(axis, qrange), onnx_mapping=onnx_mapping_from_node(node))

    return convert


class DynamicQuantizeLinear(nn.Module, OnnxToTorchModule):
    """ONNX DynamicQuantizeLinear (uint8) in float: scale = (max(x, 0) - min(x, 0)) / 255
    over the whole tensor (every row of the batch, as ONNX Runtime computes it), zero
    point = saturate(rint(-min / scale)), y = saturate(rint(x / scale) + zero point). The
    scale and zero point are constants to the gradient; rounding passes it straight
    through (as QuantizeLinear). quantize_dynamic puts it before ConvInteger /
    MatMulInteger, which the twin runs as DequantizeLinear + Conv / MatMul (quant.py)."""

    def forward(self, x):  # noqa: D102
        x = x.to(torch.float32)
        lo = torch.clamp(x.detach().min(), max=0.0)
        hi = torch.clamp(x.detach().max(), min=0.0)
        scale = (hi - lo) / 255.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(-lo / safe), 0, 255)
        v = x / safe
        v = v + (torch.round(v) - v).detach()
        return torch.clamp(v + zero_point, 0, 255), scale, zero_point


def _dynamic_quantize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(torch_module=DynamicQuantizeLinear(), onnx_mapping=onnx_mapping_from_node(node))


def _schema_versions(op: str) -> list[int]:
    return sorted({s.since_version for s in defs.get_all_schemas_with_history() if s.name == op and s.domain == ""})


class Reduce18(nn.Module, OnnxToTorchModule):
    """Reduce* from opset 18 on: ``axes`` is an (optional) constant input."""

    def __init__(self, op: str, axes, keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.op, self.axes, self.keepdims, self.noop = op, axes, keepdims, noop_with_empty_axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.axes:
            if self.noop:
                return x
            dims = tuple(range(x.dim()))
        else:
            dims = tuple(int(a) % x.dim() for a in self.axes)
        k = self.keepdims
        if self.op == "ReduceMean":
            return x.mean(dim=dims, keepdim=k)
        if self.op == "ReduceSum":
            return x.sum(dim=dims, keepdim=k)
        if self.op == "ReduceMax":
            return torch.amax(x, dim=dims, keepdim=k)
        if self.op == "ReduceMin":
            return torch.amin(x, dim=dims, keepdim=k)
        if self.op == "ReduceProd":
            out = x
            for d in sorted(dims, reverse=True):
                out = out.prod(dim=d, keepdim=k)
            return out
        if self.op == "ReduceL1":
            return x.abs().sum(dim=dims, keepdim=k)
        if self.op == "ReduceL2":
            return torch.sqrt((x * x).sum(dim=dims, keepdim=k))
        if self.op == "ReduceLogSum":
            return torch.log(x.sum(dim=dims, keepdim=k))
        if self.op == "ReduceLogSumExp":
            return torch.logsumexp(x, dim=dims, keepdim=k)
        if self.op == "ReduceSumSquare":
            return (x * x).sum(dim=dims, keepdim=k)
        raise NotImplementedError(self.op)


def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        name = node.input_values[1]
        if name not in graph.initializers:
            raise NotImplementedError(f"{node.operation_type} with computed axes ({name}) is not supported")
        axes = [int(a) for a in graph.initializers[name].to_torch().reshape(-1).tolist()]
    module = Reduce18(node.operation_type, axes, bool(attrs.get("keepdims", 1)),
                      bool(attrs.get("noop_with_empty_axes", 0)))
    return OperationConverterResult(
        torch_module=module,
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


def _pad_without_axes(base):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if len(node.input_values) > 3 and node.input_values[3]:
            raise NotImplementedError("Pad with an 'axes' input is not supported")
        return base(node, graph)

    return convert


class ReshapeAllowZero(nn.Module, OnnxToTorchModule):
    """Reshape with allowzero=1: a 0 in the shape is a zero-size dim, as in torch.reshape."""

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.reshape(x, tuple(int(s) for s in shape.tolist()))


def _reshape_allowzero(base):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if node.attributes.get("allowzero", 0):
            return OperationConverterResult(torch_module=ReshapeAllowZero(), onnx_mapping=onnx_mapping_from_node(node))
        return base(node, graph)

    convert._dynedit_wrapped = True
    return convert


class SamePadding(nn.Module, OnnxToTorchModule):
    """auto_pad SAME_UPPER / SAME_LOWER: pads computed from the input size at run time
    (with strides > 1 they depend on it), odd total padding at the end (UPPER) or
    the beginning (LOWER), as ONNX defines it."""

    def __init__(self, kernel, strides, dilations, upper: bool):
        super().__init__()
        self.kernel, self.strides, self.dilations, self.upper = list(kernel), list(strides), list(dilations), upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        pads = []
        for i in reversed(range(len(self.kernel))):  # torch pads the last dim first
            pads += same_pads(int(x.shape[2 + i]), self.kernel[i], self.strides[i], self.dilations[i],
                              upper=self.upper)
        return torch.nn.functional.pad(x, pads) if any(pads) else x


def _conv_auto_pad(base):
    """onnx2torch refuses Conv with auto_pad SAME_*: convert it without padding and put
    a ``SamePadding`` in front (the node's module still takes the unpadded input)."""

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        auto_pad = node.attributes.get("auto_pad", "NOTSET")
        if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return base(node, graph)
        proto = onnx.NodeProto()
        proto.CopyFrom(node.proto)
        kept = [a for a in proto.attribute if a.name not in ("auto_pad", "pads")]
        del proto.attribute[:]
        proto.attribute.extend(kept)
        result = base(OnnxNode(proto, node.unique_name), graph)
        kernel_default = list(graph.initializers[node.input_values[1]].to_torch().shape[2:])
        nsp, attrs = len(kernel_default), node.attributes
        pad = SamePadding(attrs.get("kernel_shape", kernel_default), attrs.get("strides", [1] * nsp),
                          attrs.get("dilations", [1] * nsp), auto_pad == "SAME_UPPER")
        return OperationConverterResult(torch_module=nn.Sequential(pad, result.torch_module),
                                        onnx_mapping=result.onnx_mapping)

    convert._dynedit_wrapped = True
    return convert


class Gelu(nn.Module, OnnxToTorchModule):
    """Gelu-20: exact (erf) or the tanh approximation, as the ``approximate`` attribute says."""

    def __init__(self, approximate: str):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.gelu(x, approximate=self.approximate)


def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approximate = node.attributes.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
    return OperationConverterResult(torch_module=Gelu(approximate), onnx_mapping=onnx_mapping_from_node(node))


class DropoutInference(nn.Module, OnnxToTorchModule):
    """Dropout at inference (every version): the identity; the optional second output
    (the mask, opset 7-11 graphs list it even when nothing reads it) is all True."""

    def __init__(self, with_mask: bool):
        super().__init__()
        self.with_mask = with_mask

    def forward(self, x: torch.Tensor):  # noqa: D102
        if self.with_mask:
            return x, torch.ones_like(x, dtype=torch.bool)
        return x


def _dropout(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    outputs = tuple(o for o in node.output_values)
    with_mask = len(outputs) > 1 and bool(outputs[1])
    return OperationConverterResult(
        torch_module=DropoutInference(with_mask),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=outputs if with_mask else outputs[:1]),
    )


class AvgPoolPadded(nn.Module, OnnxToTorchModule):
    """AveragePool with explicit (possibly asymmetric) pads, as ONNX defines it: with
    count_include_pad=0 the pads are not counted (sum of values / number of real
    elements in each window), with 1 they count as zeros."""

    def __init__(self, kernel, strides, pads, ceil_mode: bool, count_include_pad: bool):
        super().__init__()
        self.kernel, self.strides, self.ceil_mode = list(kernel), list(strides), ceil_mode
        self.count_include_pad = count_include_pad
        n = len(self.kernel)
        self.torch_pads = []
        for i in reversed(range(n)):  # torch pads the last dim first
            self.torch_pads += [int(pads[i]), int(pads[i + n])]

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(self.kernel)]
        return pool(x, self.kernel, self.strides, 0, self.ceil_mode, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xp = F.pad(x, self.torch_pads)
        out = self._pool(xp)
        if self.count_include_pad:
            return out
        ones = F.pad(torch.ones_like(x[:1, :1]), self.torch_pads)
        return out / self._pool(ones)


def _avg_pool_padded(base):
    """onnx2torch refuses AveragePool with asymmetric pads: ours pads explicitly."""

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        attrs = node.attributes
        pads = list(attrs.get("pads", []))
        kernel = list(attrs["kernel_shape"])
        n = len(kernel)
        symmetric = not pads or pads[:n] == pads[n:]
        if symmetric or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return base(node, graph)
        if any(d != 1 for d in attrs.get("dilations", [1] * n)):
            raise NotImplementedError("AveragePool with dilations and asymmetric pads is not supported")
        module = AvgPoolPadded(kernel, attrs.get("strides", [1] * n), pads, bool(attrs.get("ceil_mode", 0)),
                               bool(attrs.get("count_include_pad", 0)))
        return OperationConverterResult(torch_module=module,
                                        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],),
                                                                 outputs=node.output_values))

    convert._dynedit_wrapped = True
    return convert


def ensure_converters(model: onnx.ModelProto) -> list[str]:
    """Register the converters ``model`` needs; return the ops still missing."""
    _register("GlobalMaxPool", 1, _global_max_pool)
    _register("DynamicQuantizeLinear", 11, _dynamic_quantize)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        for op in ("QuantizeLinear", "DequantizeLinear"):
            for version in _schema_versions(op):
                _register(op, version, _qdq_converter(op))
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing = []
    needed = set()
    for node in model.graph.node:
        domain = node.domain if node.domain not in ("ai.onnx",) else ""
        needed.add((domain, node.op_type))
    for domain, op in sorted(needed):
        opset = opsets.get(domain)
        if opset is None:
            missing.append(f"{op} (domain {domain!r} not imported)")
            continue
        since = _since_version(op, opset, domain)
        if since is None:
            missing.append(f"{domain + '.' if domain else ''}{op}-{opset} (unknown op)")
            continue
        if op in OWN_CONVERTERS and domain == "":
            key = registry.OperationDescription(domain="", operation_type=op, version=since)
            registry._CONVERTER_REGISTRY[key] = OWN_CONVERTERS[op]
            continue
        have = _registered_versions(op, domain)
        if since in have:
            if op in WRAPPERS:
                _wrap(op, since)
            continue
        if op in _REDUCE_OPS and since >= 18:
            _register(op, since, _reduce18)
            continue
        if op in SAME_SEMANTICS and have:
            lower = [v for v in have if v < since]
            source = max(lower) if lower else min(have)
            converter = registry._CONVERTER_REGISTRY[registry.OperationDescription(domain, op, source)]
            if op == "Pad" and since >= 18:
                converter = _pad_without_axes(converter)
            _register(op, since, converter, domain)
            if op in WRAPPERS:
                _wrap(op, since)
            log.debug("registered %s-%d with the converter of %s-%d", op, since, op, source)
            continue
        missing.append(f"{op}-{since}")
    return missing


def _wrap(op: str, version: int) -> None:
    """Put our wrapper (Reshape allowzero, Conv auto_pad SAME_*) around a registered converter."""
    key = registry.OperationDescription(domain="", operation_type=op, version=version)
    base = registry._CONVERTER_REGISTRY[key]
    if not getattr(base, "_dynedit_wrapped", False):
        registry._CONVERTER_REGISTRY[key] = WRAPPERS[op](base)


# Ops whose onnx2torch converter we wrap (falling back to it for the cases it handles)
# or replace outright (every version).
WRAPPERS = {"Reshape": _reshape_allowzero, "Conv": _conv_auto_pad, "AveragePool": _avg_pool_padded}
OWN_CONVERTERS = {"Dropout": _dropout, "Gelu": _gelu}
