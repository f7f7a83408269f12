"""Integer-quantised weights: where a layer's float weight comes from, and requantisation.

Two patterns make a float weight out of an integer tensor stored in the model:

  qdq        q (int8/uint8 constant) -> DequantizeLinear(q, scale, zero_point; axis)
             (onnxruntime.quantization.quantize_static with QuantFormat.QDQ, per-tensor
             or per-channel)
  cast_mul   q (integer constant) -> Cast(to=float) [-> Sub(zero_point)] -> Mul(scale)
             (int8 exports that dequantise with plain arithmetic, e.g. an int8 MiniLM)

A third keeps the weight inside an integer op (onnxruntime.quantization.quantize_dynamic):

  integer_op ConvInteger / MatMulInteger(x_q, q, x_zero_point, zero_point) -> Cast(to=float)
             -> Mul(Mul(x_scale, scale)): the weight scale is multiplied into the output
             after the integer op, together with the activation's scale (x_q, x_scale and
             x_zero_point usually come from DynamicQuantizeLinear). The float layer is
             Conv / MatMul(x_f, W) with x_f = (x_q - x_zero_point) x_scale; the record
             names the activation tensors and the chain's float output too.

All three compute ``W = (q - zero_point) * scale`` with the scale (and zero point) broadcast
over ``q``: one value (per-tensor), one per slice along ``axis`` (per-channel), or, for
cast_mul, any shape that broadcasts (recorded, never guessed). ``WeightQuant`` records the
pattern, the tensor names and the node indices; the layer map carries it (``Layer.quant``).

The edit is made on the dequantised float weight W. ``requantize`` turns the edited W'
back into integers:
  - every group (all of q for per-tensor, one channel for per-channel) whose values fit
    the integer range with its current scale keeps its scale and zero point:
    q' = clip(rint(W' / s) + z) changes only by rounding;
  - a group that does not fit gets a new scale (and, if asymmetric, zero point) of its
    own, the smallest that holds W' (symmetric: zero point kept, s' = the largest of
    max(W')/(qmax - z) and min(W')/(qmin - z); asymmetric: range [min(W', 0), max(W', 0)]
    mapped onto [qmin, qmax]), unless the scale or zero-point tensor is used by another
    node as well: then that tensor is left alone and the values are clipped (counted).
Rounding is round-half-to-even, as ONNX QuantizeLinear does.

This module needs onnx and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

INT_RANGES = {
    np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
    np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int32): (-(2 ** 31), 2 ** 31 - 1),
}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class WeightQuant:
    """How a float weight is made from an integer tensor (see module doc)."""

    scheme: str                   # "qdq" | "cast_mul" | "integer_op"
    value: str                    # the float tensor the layer consumes (integer_op: the chain's float output)
    quantized: str                # the integer tensor (initializer / Constant)
    scale: str
    zero_point: str | None        # None: zero point 0
    axis: int | None              # per-channel axis of the weight; None = per-tensor or general broadcast
    scale_shape: tuple[int, ...]  # broadcast shape of the scale against the weight
    q_dtype: str
    nodes: tuple[int, ...]        # graph.node indices of the dequantisation chain
    scale_shared: bool            # scale / zero point used by another node too
    reason: str | None = None     # why this weight cannot be requantised (None: it can)
    activation: tuple[str, str, str] = ()  # integer_op: (x_q, x_scale, x_zero_point or "")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "quantized": self.quantized, "value": self.value, "scale": self.scale,
                "zero_point": self.zero_point, "axis": self.axis, "scale_shape": list(self.scale_shape),
                "dtype": self.q_dtype, "scale_shared": self.scale_shared,
                **({"activation": list(self.activation)} if self.activation else {})}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _is_default_domain(node) -> bool:
    return node.domain in ("", "ai.onnx")


def weight_dequantisations(graph: onnx.GraphProto, const_value) -> dict[str, WeightQuant]:
    """Float tensor name -> WeightQuant for every value made from a constant integer
    tensor by DequantizeLinear or Cast [+ Sub] + Mul. ``const_value(name)`` returns a
    constant's value or None (layers.constant_value)."""
    producer = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            producer[out] = i
    consumers = use_counts(graph)
    outputs = {o.name for o in graph.output}

    def single_use(name):
        return consumers.get(name, 0) == 1 and name not in outputs

    found = {}
    for i, node in enumerate(graph.node):
        if not _is_default_domain(node):
            continue
        if node.op_type == "DequantizeLinear" and len(node.input) >= 2:
            q = const_value(node.input[0])
            scale = const_value(node.input[1])
            zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            zp = const_value(zp_name) if zp_name else None
            if q is None or scale is None or (zp_name and zp is None):
                continue
            if q.dtype not in INT_RANGES:
                continue  # float8 / int4: not handled
            attrs = _attrs(node)
            reason = "a 32-bit integer tensor (a quantised bias) is not requantised" if q.dtype == np.int32 else None
            axis = None
            if scale.size > 1 or scale.ndim == 1 and attrs.get("block_size", 0):
                axis = int(attrs.get("axis", 1)) % max(q.ndim, 1)
            if attrs.get("block_size", 0):
                reason = "blocked quantisation (block_size) is not supported"
            shape = [1] * q.ndim
            if axis is not None:
                shape[axis] = scale.size
            found[node.output[0]] = WeightQuant(
                scheme="qdq", value=node.output[0], quantized=node.input[0], scale=node.input[1],
                zero_point=zp_name, axis=axis, scale_shape=tuple(shape), q_dtype=str(q.dtype), nodes=(i,),
                scale_shared=not single_use(node.input[1]) or bool(zp_name and not single_use(zp_name)),
                reason=reason)
        elif node.op_type == "Mul" and len(node.input) == 2:
            wq = _cast_mul(graph, i, producer, const_value, single_use)
            if wq is not None:
                found[node.output[0]] = wq
    return found


def _cast_mul(graph, mul_index, producer, const_value, single_use) -> WeightQuant | None:
    mul = graph.node[mul_index]
    for scale_pos in (1, 0):
        scale_name, other = mul.input[scale_pos], mul.input[1 - scale_pos]
        scale = const_value(scale_name)
        if scale is None or not np.issubdtype(scale.dtype, np.floating) or other not in producer:
            continue
        chain = [mul_index]
        node = graph.node[producer[other]]
        zp_name = None
        if node.op_type == "Sub" and _is_default_domain(node) and single_use(other):
            zp_name = node.input[1]
            if const_value(zp_name) is None or node.input[0] not in producer:
                return None
            chain.append(producer[other])
            other = node.input[0]
            node = graph.node[producer[other]]
        if node.op_type != "Cast" or not _is_default_domain(node) or not single_use(other):
            return None
        if _attrs(node).get("to") not in _FLOAT_TYPES:
            return None
        q = const_value(node.input[0])
        if q is None or q.dtype not in INT_RANGES or q.dtype == np.int32:
            return None
        chain.append(producer[other])
        try:
            full = np.broadcast_shapes(q.shape, scale.shape)
        except ValueError:
            return None
        if full != q.shape:
            return None  # the scale would enlarge the weight: not a dequantisation
        aligned = (1,) * (q.ndim - scale.ndim) + tuple(scale.shape)
        big = [k for k, n in enumerate(aligned) if n > 1]
        reason = None
        zp = const_value(zp_name) if zp_name else None
        if zp is not None:
            try:
                np.broadcast_shapes(zp.shape, q.shape)
            except ValueError:
                return None
            if not np.array_equal(np.asarray(zp, np.float64), np.rint(np.asarray(zp, np.float64))):
                reason = "the zero point is not integer-valued"
            zbig = [k for k, n in enumerate((1,) * (q.ndim - zp.ndim) + tuple(zp.shape)) if n > 1]
            if zbig and zbig != big:
                reason = "the zero point and the scale vary along different axes"
        if len(big) > 1:
            reason = reason or "the scale varies along more than one axis"
        return WeightQuant(
            scheme="cast_mul", value=mul.output[0], quantized=node.input[0], scale=scale_name, zero_point=zp_name,
            axis=big[0] if len(big) == 1 else None, scale_shape=aligned, q_dtype=str(q.dtype),
            nodes=tuple(sorted(chain)),
            scale_shared=not single_use(scale_name) or bool(zp_name and not single_use(zp_name)), reason=reason)
    return None


INTEGER_OPS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}  # integer op -> its float op


def integer_op_weights(graph: onnx.GraphProto, const_value) -> dict[int, WeightQuant]:
    """Node index -> WeightQuant (scheme ``integer_op``, module doc) for every ConvInteger /
    MatMulInteger whose weight is a constant int8/uint8 tensor and whose output is
    Cast to float and multiplied by ``x_scale x weight scale``; other forms are left out."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for inp in node.input:
            readers.setdefault(inp, []).append(i)
    outputs = {o.name for o in graph.output}

    def only_reader(name):
        return readers[name][0] if len(readers.get(name, [])) == 1 and name not in outputs else None

    found = {}
    for i, node in enumerate(graph.node):
        if node.op_type in INTEGER_OPS and _is_default_domain(node) and len(node.input) >= 2:
            wq = _integer_op(graph, i, producer, only_reader, const_value)
            if wq is not None:
                found[i] = wq
    return found


def _integer_op(graph, index, producer, only_reader, const_value) -> WeightQuant | None:
    node = graph.node[index]
    q = const_value(node.input[1])
    zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
    zp = const_value(zp_name) if zp_name else None
    if q is None or q.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or (zp_name and zp is None):
        return None
    cast_i = only_reader(node.output[0])
    cast = graph.node[cast_i] if cast_i is not None else None
    if cast is None or cast.op_type != "Cast" or _attrs(cast).get("to") != onnx.TensorProto.FLOAT:
        return None
    mul_i = only_reader(cast.output[0])
    mul = graph.node[mul_i] if mul_i is not None else None
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    product = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    prod = graph.node[producer[product]] if product in producer else None
    if prod is None or prod.op_type != "Mul" or not _is_default_domain(prod):
        return None
    x_zp = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    for pos in (1, 0):  # the weight scale is the constant factor that is not the activation's scale
        scale_name, x_scale = prod.input[pos], prod.input[1 - pos]
        scale = const_value(scale_name)
        if scale is not None and _activation_scalar(graph, node.input[0], x_scale, x_zp, producer, const_value):
            break
    else:
        return None
    axis = _integer_op_axis(INTEGER_OPS[node.op_type], q, scale)
    if axis == -1 or (zp is not None and zp.size not in (1, scale.size)):
        return None  # a scale (zero point) along no axis the layer map knows
    single = [only_reader(n) is not None for n in (scale_name, product) + ((zp_name,) if zp_name else ())]
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = scale.size
    return WeightQuant(
        scheme="integer_op", value=mul.output[0], quantized=node.input[1], scale=scale_name, zero_point=zp_name,
        axis=axis, scale_shape=tuple(shape), q_dtype=str(q.dtype),
        nodes=tuple(sorted((index, cast_i, mul_i, producer[product]))), scale_shared=not all(single),
        activation=(node.input[0], x_scale, x_zp))


def _activation_scalar(graph, x_q, x_scale, x_zp, producer, const_value) -> bool:
    """The activation's (x_q, x_scale, x_zero_point) are DynamicQuantizeLinear's three
    outputs, or x_scale (and x_zero_point) are constant scalars."""
    dq = graph.node[producer[x_q]] if x_q in producer else None
    if dq is not None and dq.op_type == "DynamicQuantizeLinear" and list(dq.output[:3]) == [x_q, x_scale, x_zp]:
        return True
    s = const_value(x_scale)
    z = const_value(x_zp) if x_zp else np.zeros(())
    return s is not None and s.size == 1 and z is not None and z.size == 1


def _integer_op_axis(float_op: str, q: np.ndarray, scale: np.ndarray) -> int | None:
    """The weight axis a scale multiplied into the output runs along: per-tensor (None),
    Conv output channels (scale [M, 1, ...] on the output's channel axis: weight axis 0),
    MatMul columns (scale [N] on the output's last axis: weight axis 1); -1 for any other."""
    if scale.size == 1:
        return None
    big = [k for k, n in enumerate(scale.shape) if n > 1]
    if float_op == "MatMul" and q.ndim == 2 and big == [scale.ndim - 1] and scale.size == q.shape[1]:
        return 1
    if float_op == "Conv" and len(big) == 1 and scale.ndim - big[0] == q.ndim - 1 and scale.size == q.shape[0]:
        return 0
    return -1


# ------------------------------------------------------------------ (de)quantisation


def _group_view(arr: np.ndarray, wq: WeightQuant, shape: tuple[int, ...]) -> np.ndarray:
    """A scale / zero-point array broadcast to the weight's shape."""
    a = np.asarray(arr)
    return np.broadcast_to(a.reshape(wq.scale_shape) if a.size > 1 else a.reshape(()), shape)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, wq: WeightQuant) -> np.ndarray:
    """W = (q - z) * s computed as ONNX Runtime does (in the scale's float type)."""
    s = _group_view(scale, wq, q.shape)
    z = _group_view(zero_point, wq, q.shape) if zero_point is not None else 0
    diff = np.asarray(q, np.int64) - np.asarray(z, np.int64) if wq.scheme in ("qdq", "integer_op") else \
        q.astype(s.dtype) - np.asarray(z, s.dtype)
    return (diff.astype(s.dtype) * s).astype(s.dtype)


@dataclass(frozen=True)
class Requantized:
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    groups: int               # scale groups (1 per-tensor, C per-channel)
    rescaled: int             # groups that got a new scale (zero point)
    clipped: int              # values clipped (the scale could not change)
    scale_kept: bool


def requantize(w_new: np.ndarray, q_old: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
               wq: WeightQuant) -> Requantized:
    """Integers for the edited float weight ``w_new`` (module doc: keep the scale where
    the values fit, a new scale for the groups that do not, clip when it is shared)."""
    qmin, qmax = INT_RANGES[q_old.dtype]
    scale = np.asarray(scale)
    n = scale.size
    flat_s = scale.reshape(-1).copy()
    flat_z = np.asarray(zero_point).reshape(-1).copy() if zero_point is not None else None
    if flat_z is not None and flat_z.size == 1 and n > 1:
        flat_z = np.repeat(flat_z, n)  # a shared scalar zero point stays scalar below
    z_scalar = zero_point is not None and np.asarray(zero_point).size == 1 and n > 1
    w = np.asarray(w_new, np.float64)
    if n > 1 and wq.axis is None:
        raise ValueError(f"{wq.quantized}: a scale of {n} values without an axis cannot be requantised")
    # one row per scale group: [n, -1] (the axis first), vectorised over rows
    rows = np.moveaxis(w, wq.axis, 0).reshape(n, -1) if n > 1 else w.reshape(1, -1)
    z_col = flat_z.astype(np.float64)[:, None] if flat_z is not None else 0.0
    q_rows = np.rint(rows / flat_s.astype(np.float64)[:, None]) + z_col
    over = (q_rows < qmin) | (q_rows > qmax)
    rescaled = clipped = 0
    for g in np.flatnonzero(over.any(axis=1)):
        if wq.scale_shared:
            clipped += int(over[g].sum())
            continue
        z = flat_z[g] if flat_z is not None else None  # a zero point shared by every channel stays
        s_new, z_new = _new_scale(rows[g], flat_s[g], z, qmin, qmax, symmetric=z_scalar or _symmetric(z, q_old.dtype))
        flat_s[g] = s_new
        if flat_z is not None:
            flat_z[g] = z_new
        q_rows[g] = np.rint(rows[g] / np.float64(s_new)) + (float(z_new) if z_new is not None else 0.0)
        clipped += int(((q_rows[g] < qmin) | (q_rows[g] > qmax)).sum())
        rescaled += 1
    if n > 1:
        moved = np.moveaxis(np.empty(q_old.shape), wq.axis, 0).shape
        q_new = np.moveaxis(q_rows.reshape(moved), 0, wq.axis)
    else:
        q_new = q_rows.reshape(q_old.shape)
    q_int = np.clip(q_new, qmin, qmax).astype(q_old.dtype)
    new_scale = flat_s.reshape(scale.shape).astype(scale.dtype)
    new_zp = None
    if zero_point is not None:
        zp = np.asarray(zero_point)
        new_zp = (flat_z[:1] if z_scalar else flat_z).reshape(zp.shape).astype(zp.dtype)
    return Requantized(q=q_int, scale=new_scale, zero_point=new_zp, groups=n, rescaled=rescaled,
                       clipped=clipped, scale_kept=rescaled == 0)


def _symmetric(z, dtype) -> bool:
    if z is None:
        return True
    qmin, qmax = INT_RANGES[np.dtype(dtype)]
    middle = 0 if qmin < 0 else (qmin + qmax + 1) // 2  # int8: 0; uint8: 128
    return float(z) == float(middle)


def _new_scale(vals: np.ndarray, s_old, z_old, qmin: int, qmax: int, *, symmetric: bool):
    """The smallest scale (float32 or the scale's own type) for which ``vals`` fit."""
    sdt = np.asarray(s_old).dtype
    if symmetric:
        z = 0.0 if z_old is None else float(z_old)
        hi = float(vals.max()) / (qmax - z) if qmax > z and vals.max() > 0 else 0.0
        lo = float(vals.min()) / (qmin - z) if qmin < z and vals.min() < 0 else 0.0
        s = max(hi, lo, float(s_old))
    else:
        rmin, rmax = min(float(vals.min()), 0.0), max(float(vals.max()), 0.0)
        s = max((rmax - rmin) / (qmax - qmin), float(np.finfo(np.float32).tiny))
        z = float(np.clip(np.rint(qmin - rmin / s), qmin, qmax))
    s = sdt.type(s)
    for _ in range(64):  # the stored (rounded) scale must hold every value
        q = np.rint(vals / np.float64(s)) + z
        if (q.min() >= qmin and q.max() <= qmax) or symmetric and (
                (vals.min() < 0 and qmin >= z) or (vals.max() > 0 and qmax <= z)):
            break
        s = np.nextafter(s, sdt.type(np.inf))
    return s, (None if z_old is None else np.asarray(z_old).dtype.type(z))


def rounding_stats(float_delta: np.ndarray, written_delta: np.ndarray) -> dict:
    """How far the written weight change is from the float edit (both in the weight's
    own layout, float64): max abs rounding error, the same relative to max |float delta|,
    and the Frobenius residual ||written - float|| / ||float||."""
    err = np.asarray(written_delta, np.float64) - np.asarray(float_delta, np.float64)
    ref = float(np.abs(float_delta).max()) if float_delta.size else 0.0
    fro = float(np.linalg.norm(float_delta))
    mae = float(np.abs(err).max()) if err.size else 0.0
    return {"max_abs_rounding_error": mae, "max_abs_float_delta": ref,
            "rel_rounding_error": mae / ref if ref > 0 else 0.0,
            "rounding_residual": float(np.linalg.norm(err)) / fro if fro > 0 else 0.0,
            "unchanged_fraction": float(np.mean(np.asarray(written_delta) == 0)) if err.size else 1.0}


def _quantize_constant(node: onnx.NodeProto, value) -> np.ndarray | None:
    """ONNX QuantizeLinear on constant inputs (int8/uint8/int16/uint16 outputs), or None."""
    x, scale = value(node.input[0]), value(node.input[1])
    zp = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    if dtype not in INT_RANGES or not np.issubdtype(x.dtype, np.floating):
        return None
    axis = int(_attrs(node).get("axis", 1)) % max(x.ndim, 1)
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis] = scale.size
    s = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
    z = (zp.astype(np.float64).reshape(shape) if zp.size > 1 else zp.astype(np.float64).reshape(())) \
        if zp is not None else 0.0
    qmin, qmax = INT_RANGES[dtype]
    ratio = (x.astype(scale.dtype) / s).astype(np.float64)  # divided in the scale's type, as ONNX Runtime does
    return np.clip(np.rint(ratio) + z, qmin, qmax).astype(dtype)


def fold_dequantisation(model: onnx.ModelProto) -> int:
    """Replace every dequantisation chain of a constant integer tensor (module doc) by a
    float initializer of the same output name, in place (used on the twin's normalised
    copy; Conv converters want their weight and bias as initializers). Returns how many."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}

    def value(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    # QuantizeLinear of a float constant (quantize_static does this to Constant-node
    # weights): evaluate it, so that the DequantizeLinear after it sees integers
    kept, quantized = [], 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and _is_default_domain(node) and len(node.input) >= 2 \
                and all(i in inits for i in node.input if i) and not _attrs(node).get("block_size", 0):
            q = _quantize_constant(node, value)
            if q is not None:
                inits[node.output[0]] = numpy_helper.from_array(q, node.output[0])
                graph.initializer.append(inits[node.output[0]])
                quantized += 1
                continue
        kept.append(node)
    if quantized:
        del graph.node[:]
        graph.node.extend(kept)

    chains = weight_dequantisations(graph, value)
    drop: set[int] = set()
    new = []
    for wq in chains.values():
        if wq.reason is not None and "block_size" in wq.reason:
            continue
        z = value(wq.zero_point) if wq.zero_point else None
        new.append(numpy_helper.from_array(dequantize(value(wq.quantized), value(wq.scale), z, wq), wq.value))
        drop.update(wq.nodes)
    if drop:
        kept = [node for i, node in enumerate(graph.node) if i not in drop]
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new)
    return len(new)


def float_integer_ops(model: onnx.ModelProto) -> int:
    """Replace each recognised integer op chain (``integer_op_weights``) by its float
    equivalent, in place (used on the twin's normalised copy): DequantizeLinear(x_q,
    x_scale, x_zero_point) -> Conv / MatMul with the dequantised weight (an initializer),
    under the integer op's node name, writing the chain's float output. Equal in exact
    arithmetic: sum (x_q - x_z)(q - z) x x_scale x scale. Returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}

    def value(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    found = integer_op_weights(graph, value)
    if not found:
        return 0
    counts = use_counts(graph)
    replace: dict[int, list] = {}
    drop: set[int] = set()
    for index, wq in found.items():
        node = graph.node[index]
        w_name = f"{wq.quantized}__dequantised"
        if w_name not in inits:
            z = value(wq.zero_point) if wq.zero_point else None
            inits[w_name] = numpy_helper.from_array(dequantize(value(wq.quantized), value(wq.scale), z, wq), w_name)
            graph.initializer.append(inits[w_name])
        x_q, x_scale, x_zp = wq.activation
        x_f = f"{node.name}__input_dequantised"
        float_node = helper.make_node(INTEGER_OPS[node.op_type], [x_f, w_name], [wq.value], name=node.name)
        float_node.attribute.extend(node.attribute)  # ConvInteger's attributes are Conv's
        replace[index] = [helper.make_node("DequantizeLinear", [x_q, x_scale] + ([x_zp] if x_zp else []), [x_f],
                                           name=f"{node.name}__dequantize_input"), float_node]
        for i in wq.nodes:  # the Cast, the Mul, and the scale product when nothing else reads it
            out = graph.node[i].output[0]
            if i != index and (out == wq.value or graph.node[i].op_type == "Cast" or counts.get(out) == 1):
                drop.add(i)
    nodes = [new for i, node in enumerate(graph.node) if i not in drop for new in replace.get(i, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(found)


def use_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs of ``graph`` read each tensor name."""
    counts: dict[str, int] = {}
    for node in graph.node:
        for inp in node.input:
            if inp:
                counts[inp] = counts.get(inp, 0) + 1
    return counts
