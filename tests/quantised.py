"""Half-precision and int8 copies of float ONNX models, built offline for the tests and
benchmarks (no downloads): the same graph as a shipped fp16 / int8 model would have.

``to_fp16``      every float tensor (weights, inputs, outputs, Constant values, Cast
                 targets) in float16, as float16 exporters write it.
``to_qdq``       onnxruntime.quantization.quantize_static with QuantFormat.QDQ (int8
                 weights and activations, calibrated on the given inputs), per-tensor or
                 per-channel.
``to_dynamic``   onnxruntime.quantization.quantize_dynamic (its default QOperator form):
                 ConvInteger / MatMulInteger with int8 (or uint8) weight initializers, the
                 activations quantised at run time by DynamicQuantizeLinear, the output
                 Cast to float and multiplied by activation scale x weight scale.
``to_cast_mul``  weights stored as int8 (symmetric) or uint8 (asymmetric) integers and
                 dequantised by Cast [+ Sub] + Mul in the graph, as int8 transformer
                 exports do; activations stay float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
# The int8 copies are quantised with reduce_range=True (7-bit weights) unless asked
# otherwise: ONNX Runtime's u8s8 integer kernels add pairs of products in 16 bits on x86
# CPUs without VNNI and saturate there, so full-range int8 weights make ORT's outputs,
# and so the tests, depend on the CPU (on an AVX2-only EPYC the per-channel QDQ badnets
# copy is 0.12 off the exact arithmetic on random inputs; with 7-bit weights a pair's
# sum stays within 2 x 255 x 63 < 32767 on every CPU). The saturation itself is tested
# by test_quant.test_a_twin_off_on_the_given_pairs_is_refused_before_the_edit.
REDUCE_RANGE = True


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == F32:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == F32:
            vi.type.tensor_type.elem_type = F16
    del g.value_info[:]
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == F32:
                attr.i = F16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == F32:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    onnx.checker.check_model(out)
    return out


def to_qdq(src: Path, dst: Path, calib: np.ndarray | dict, *, per_channel: bool, batch: int = 8,
           reduce_range: bool = REDUCE_RANGE) -> Path:
    """quantize_static (QDQ, int8 weights and activations) calibrated on ``calib`` (the
    first input's rows, or a dict of rows per input name); ``reduce_range`` (REDUCE_RANGE)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    if not isinstance(calib, dict):
        calib = {onnx.load(str(src), load_external_data=False).graph.input[0].name: calib}
    n = len(next(iter(calib.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=reduce_range)
    return dst


def calibration_feeds(model: onnx.ModelProto, n: int = 16, *, seed: int = 0, int_high: int = 50) -> dict:
    """Seeded inputs for calibration: standard normal floats, integer ids in [0, int_high),
    inputs whose name says "mask" all ones; symbolic dims: batch ``n``, others 8."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (n if k == 0 else 8)
                for k, d in enumerate(tt.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[vi.name] = (np.ones(dims, dtype) if "mask" in vi.name else rng.integers(0, int_high, size=dims).astype(dtype))
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def qdq_model(model: onnx.ModelProto, *, per_channel: bool, feeds: dict | None = None, batch: int = 4,
              reduce_range: bool = REDUCE_RANGE) -> onnx.ModelProto:
    """``to_qdq`` on a ModelProto, calibrated on ``feeds`` (default: ``calibration_feeds``)."""
    import tempfile

    feeds = feeds if feeds is not None else calibration_feeds(model)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, str(src))
        to_qdq(src, dst, feeds, per_channel=per_channel, batch=batch, reduce_range=reduce_range)
        return onnx.load(str(dst))


def to_dynamic(model: onnx.ModelProto, *, per_channel: bool = False, unsigned: bool = False,
               reduce_range: bool = REDUCE_RANGE) -> onnx.ModelProto:
    """quantize_dynamic of ``model`` (int8 weights, or uint8 with ``unsigned``); ``reduce_range``
    (REDUCE_RANGE)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(str(src), str(dst), per_channel=per_channel,
                         weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8, reduce_range=reduce_range)
        return onnx.load(str(dst))


def to_cast_mul(model: onnx.ModelProto, *, asymmetric: bool = False, per_channel: bool = True) -> onnx.ModelProto:
    """Every Conv / Gemm / MatMul weight initializer stored as integers and dequantised by
    Cast (+ Sub zero point) + Mul scale, per output channel or per tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {init.name: init for init in g.initializer}
    new_nodes, new_inits, done = [], [], set()
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        if name in done:
            continue
        done.add(name)
        w = numpy_helper.to_array(inits[name]).astype(np.float64)
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else w.ndim - 1
        red = tuple(k for k in range(w.ndim) if k != axis) if per_channel else tuple(range(w.ndim))
        sshape = [1] * w.ndim
        if per_channel:
            sshape[axis] = w.shape[axis]
        if asymmetric:  # uint8, zero point from the range (which always holds 0)
            lo, hi = np.minimum(w.min(axis=red), 0), np.maximum(w.max(axis=red), 0)
            scale = np.maximum((hi - lo) / 255.0, 1e-8)
            zp = np.clip(np.rint(-lo / scale), 0, 255)
            q = np.clip(np.rint(w / scale.reshape(sshape)) + zp.reshape(sshape), 0, 255).astype(np.uint8)
        else:  # int8 symmetric
            scale = np.maximum(np.abs(w).max(axis=red) / 127.0, 1e-8)
            q = np.clip(np.rint(w / scale.reshape(sshape)), -127, 127).astype(np.int8)
        qname, fname = name + "_q", name + "_f"
        inits[name].CopyFrom(numpy_helper.from_array(q, qname))
        new_inits.append(numpy_helper.from_array(scale.reshape(sshape).astype(np.float32), name + "_scale"))
        nodes = [helper.make_node("Cast", [qname], [fname], to=F32, name=name + "_cast")]
        if asymmetric:
            new_inits.append(numpy_helper.from_array(zp.reshape(sshape).astype(np.float32), name + "_zp"))
            nodes.append(helper.make_node("Sub", [fname, name + "_zp"], [name + "_c"], name=name + "_sub"))
            fname = name + "_c"
        nodes.append(helper.make_node("Mul", [fname, name + "_scale"], [name], name=name + "_mul"))
        new_nodes.extend(nodes)
    g.initializer.extend(new_inits)
    body = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + body)
    del g.value_info[:]
    onnx.checker.check_model(out)
    return out
