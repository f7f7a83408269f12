"""Hand-built ONNX models (onnx.helper) with seeded weights, for the round-trip tests.

Every builder returns a checked ``onnx.ModelProto``; nothing is written to disk here
(tests save what they need into ``tmp_path``; tests/conftest.py writes them all once per
session). Shapes are tiny so a whole test file runs in seconds. ``BUILDERS`` maps a name
to a no-argument builder for every model the round-trip tests parametrise over;
``unsupported_det`` / ``custom_domain_op`` are models the twin must refuse.

torch-exported models (``export_torch_cnn``) are built from a small Conv-BN-ReLU CNN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16
I64 = TensorProto.INT64


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng, *shape, scale=0.5, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _t(arr: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits, *, opset=17, ir=None, name="g", value_info=(), check=True):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits, value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="dynedit-tests", producer_version="1.0")
    model.ir_version = ir if ir is not None else min(8, model.ir_version)
    if check:
        onnx.checker.check_model(model)
    return model


def add_provenance(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``model`` a doc_string, model_version, metadata_props, value_info (from
    shape inference) and unused initializers, to prove write-back keeps them (returns
    a copy)."""
    out = onnx.shape_inference.infer_shapes(model)
    out.doc_string = "a hand-built test model"
    out.model_version = 7
    out.domain = "org.example.tests"
    for key, value in (("author", "tests"), ("zz.last", "kept in order"), ("a.first", "order matters")):
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    out.graph.doc_string = "graph doc"
    out.graph.initializer.append(_t(np.arange(5, dtype=np.int64), "unused_ints"))
    out.graph.initializer.append(_t(np.full((2, 3), 0.25, np.float32), "unused_floats"))
    onnx.checker.check_model(out)
    return out


# ---------------------------------------------------------------------------- dense


def gemm(trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, *, n_in: int = 6, hidden: int = 5,
         n_out: int = 3, seed: int = 0, bias: bool = True) -> onnx.ModelProto:
    """x [N, n_in] -> Gemm(W1, b1; transB, alpha, beta) -> Relu -> Gemm(W2, b2) -> logits."""
    rng = _rng(seed)
    w1 = _w(rng, hidden, n_in) if trans_b else _w(rng, n_in, hidden)
    inits = [_t(w1, "W1"), _t(_w(rng, n_out, hidden), "W2"), _t(_w(rng, n_out, scale=0.1), "b2")]
    g1_inputs = ["x", "W1"]
    if bias:
        inits.append(_t(_w(rng, hidden, scale=0.1), "b1"))
        g1_inputs.append("b1")
    nodes = [
        helper.make_node("Gemm", g1_inputs, ["h"], name="fc1", transB=trans_b, alpha=alpha, beta=beta),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "W2", "b2"], ["logits"], name="fc2", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", n_in])], [_vi("logits", F32, ["N", n_out])], inits)


def gemm_square(trans_b: int = 0, alpha: float = 1.0) -> onnx.ModelProto:
    """Square first weight (4x4): a wrong transpose would be caught."""
    return gemm(trans_b=trans_b, alpha=alpha, n_in=4, hidden=4, seed=1)


def matmul(*, n_in: int = 6, hidden: int = 5, n_out: int = 3, seq: int | None = None, seed: int = 2) -> onnx.ModelProto:
    """x [N, n_in] (or [N, S, n_in]) -> MatMul(W1 [in, hid]) -> Add -> Relu -> MatMul -> Add."""
    rng = _rng(seed)
    inits = [_t(_w(rng, n_in, hidden), "W1"), _t(_w(rng, hidden, scale=0.1), "b1"),
             _t(_w(rng, hidden, n_out), "W2"), _t(_w(rng, n_out, scale=0.1), "b2")]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["logits"], name="add2"),
    ]
    lead = ["N"] if seq is None else ["N", "S"]
    return _model(nodes, [_vi("x", F32, lead + [n_in])], [_vi("logits", F32, lead + [n_out])], inits)


def matmul_3d() -> onnx.ModelProto:
    return matmul(seq=3, seed=3)


def matmul_square() -> onnx.ModelProto:
    return matmul(n_in=4, hidden=4, n_out=4, seed=4)


def shared_weight() -> onnx.ModelProto:
    """One square initializer W used by a Gemm (transB=0) and a MatMul: mapped twice,
    shared=True, not editable; the last Gemm stays editable."""
    rng = _rng(5)
    inits = [_t(_w(rng, 4, 4), "W"), _t(_w(rng, 4, scale=0.1), "b"), _t(_w(rng, 3, 4), "W3")]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["h1"], name="g1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W"], ["h2"], name="mm2"),
        helper.make_node("Gemm", ["h2", "W3"], ["logits"], name="g3", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 4])], [_vi("logits", F32, ["N", 3])], inits)


# ----------------------------------------------------------------- constant weights


def constant_nodes() -> onnx.ModelProto:
    """Conv weight and Gemm weight held in Constant nodes (biases are initializers)."""
    rng = _rng(6)
    cw = _w(rng, 3, 2, 3, 3)
    gw = _w(rng, 4, 3 * 4 * 4)
    inits = [_t(_w(rng, 3, scale=0.1), "conv_b"), _t(_w(rng, 4, scale=0.1), "fc_b")]
    nodes = [
        helper.make_node("Constant", [], ["conv_w"], name="const_conv_w", value=_t(cw, "conv_w")),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flatten", axis=1),
        helper.make_node("Constant", [], ["fc_w"], name="const_fc_w", value=_t(gw, "fc_w")),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 2, 6, 6])], [_vi("logits", F32, ["N", 4])], inits)


def constant_of_shape() -> onnx.ModelProto:
    """A Gemm weight produced by ConstantOfShape (placeholder fill 0.1, shape from an
    int64 initializer), after an ordinary MatMul."""
    rng = _rng(7)
    inits = [_t(_w(rng, 6, 4), "W1"), _t(np.array([3, 4], dtype=np.int64), "w2_shape"),
             _t(_w(rng, 3, scale=0.1), "b2")]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("ConstantOfShape", ["w2_shape"], ["W2"], name="fill_w2",
                         value=_t(np.array([0.1], dtype=np.float32), "value")),
        helper.make_node("Gemm", ["hr", "W2", "b2"], ["logits"], name="fc2", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 6])], [_vi("logits", F32, ["N", 3])], inits)


# ---------------------------------------------------------------------- fp16 / opsets


def fp16() -> onnx.ModelProto:
    """Everything float16: input, weights, output."""
    rng = _rng(8)
    inits = [_t(_w(rng, 5, 6, dtype=np.float16), "W1"), _t(_w(rng, 5, scale=0.1, dtype=np.float16), "b1"),
             _t(_w(rng, 5, 3, dtype=np.float16), "W2"), _t(_w(rng, 3, scale=0.1, dtype=np.float16), "b2")]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["m"], name="mm2"),
        helper.make_node("Add", ["m", "b2"], ["logits"], name="add2"),
    ]
    return _model(nodes, [_vi("x", F16, ["N", 6])], [_vi("logits", F16, ["N", 3])], inits)


def opset9() -> onnx.ModelProto:
    """Old-style ops at opset 9: Flatten, Gemm, Relu, Sum."""
    rng = _rng(9)
    inits = [_t(_w(rng, 4, 12), "Wa"), _t(_w(rng, 4, scale=0.1), "ba"),
             _t(_w(rng, 12, 4), "Wb"), _t(_w(rng, 4, scale=0.1), "bb"),
             _t(_w(rng, 3, 4), "Wc"), _t(_w(rng, 3, scale=0.1), "bc")]
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "Wa", "ba"], ["ga"], name="fca", transB=1),
        helper.make_node("Relu", ["ga"], ["ra"], name="relua"),
        helper.make_node("Gemm", ["f", "Wb", "bb"], ["gb"], name="fcb", transB=0, alpha=0.5),
        helper.make_node("Sum", ["ra", "gb", "ba"], ["s"], name="sum"),
        helper.make_node("Gemm", ["s", "Wc", "bc"], ["logits"], name="fcc", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 3, 2, 2])], [_vi("logits", F32, ["N", 3])], inits, opset=9, ir=4)


def opset7() -> onnx.ModelProto:
    """Opset 7 (IR 3): Gemm-7 with its required C, Relu-6, Add-7, Flatten-1."""
    rng = _rng(10)
    inits = [_t(_w(rng, 5, 6), "W1"), _t(_w(rng, 5, scale=0.1), "b1"),
             _t(_w(rng, 5, 3), "W2"), _t(_w(rng, 3, scale=0.1), "b2"), _t(_w(rng, 3, scale=0.1), "b3")]
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1, beta=0.5),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "W2", "b2"], ["g2"], name="fc2", transB=0, alpha=2.0),
        helper.make_node("Add", ["g2", "b3"], ["logits"], name="add"),
    ]
    inputs = [_vi("x", F32, ["N", 2, 3])] + [_vi(i.name, i.data_type, list(i.dims)) for i in inits]
    return _model(nodes, inputs, [_vi("logits", F32, ["N", 3])], inits, opset=7, ir=3)


def ir3_initializers_as_inputs() -> onnx.ModelProto:
    """IR 3 / opset 8: every initializer is also listed as a graph input."""
    rng = _rng(11)
    inits = [_t(_w(rng, 5, 6), "W1"), _t(_w(rng, 5, scale=0.1), "b1"),
             _t(_w(rng, 5, 3), "W2"), _t(_w(rng, 3, scale=0.1), "b2")]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["m"], name="mm2"),
        helper.make_node("Add", ["m", "b2"], ["logits"], name="add"),
    ]
    inputs = [_vi("x", F32, ["N", 6])] + [_vi(i.name, i.data_type, list(i.dims)) for i in inits]
    return _model(nodes, inputs, [_vi("logits", F32, ["N", 3])], inits, opset=8, ir=3)


# ----------------------------------------------------------------- integer inputs


VOCAB = 10


def token_ids(pool: str = "ReduceMean") -> onnx.ModelProto:
    """ids [N, 4] int64 -> Gather(embedding [10, 3]) -> ReduceMean(axis 1) | Flatten -> Gemm."""
    rng = _rng(12)
    emb = _w(rng, VOCAB, 3, scale=1.0)
    emb[5:] *= 100.0  # ids >= 5 dominate the output: --int-range is visible in the logits
    feat = 3 if pool == "ReduceMean" else 12
    inits = [_t(emb, "embedding"), _t(_w(rng, 2, feat), "W"), _t(_w(rng, 2, scale=0.1), "b")]
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["e"], name="embed", axis=0)]
    if pool == "ReduceMean":
        nodes.append(helper.make_node("ReduceMean", ["e"], ["p"], name="pool", axes=[1], keepdims=0))
    else:
        nodes.append(helper.make_node("Flatten", ["e"], ["p"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["p", "W", "b"], ["logits"], name="fc", transB=1))
    return _model(nodes, [_vi("ids", I64, ["N", 4])], [_vi("logits", F32, ["N", 2])], inits, opset=13)


def token_ids_flatten() -> onnx.ModelProto:
    return token_ids("Flatten")


# --------------------------------------------------------------------------- convs


# Sizes of the symbolic non-batch dims (``--input-shape``) of the graphs that have them.
INPUT_SHAPES = {"matmul_3d": {"x": (2, 5, 6)}, "symbolic_dims": {"x": (2, 2, 7, 9)}}


def input_shape_args(name: str) -> list[str]:
    """``--input-shape`` options for graph ``name`` (none when its dims are all fixed)."""
    return [a for k, v in INPUT_SHAPES.get(name, {}).items()
            for a in ("--input-shape", f"{k}:{','.join(map(str, v))}")]


def symbolic_dims() -> onnx.ModelProto:
    """x [batch, 2, h, w] (symbolic spatial dims) -> Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = _rng(13)
    inits = [_t(_w(rng, 4, 2, 3, 3), "conv_w"), _t(_w(rng, 4, scale=0.1), "conv_b"),
             _t(_w(rng, 3, 4), "fc_w"), _t(_w(rng, 3, scale=0.1), "fc_b")]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu"),
        helper.make_node("GlobalAveragePool", ["cr"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["batch", 2, "h", "w"])], [_vi("logits", F32, ["batch", 3])], inits)


def conv_padding() -> onnx.ModelProto:
    """Conv with asymmetric pads and a 3x2 kernel on a 9x7 input, then a Conv with
    auto_pad=SAME_UPPER, stride 2 (odd sizes: the SAME padding is asymmetric too)."""
    rng = _rng(14)
    inits = [_t(_w(rng, 4, 2, 3, 2), "c1_w"), _t(_w(rng, 4, scale=0.1), "c1_b"),
             _t(_w(rng, 3, 4, 3, 3), "c2_w"),
             _t(_w(rng, 3, 3 * 5 * 4), "fc_w"), _t(_w(rng, 3, scale=0.1), "fc_b")]
    nodes = [
        # pads [H begin, W begin, H end, W end]: out H = 9 + 0 + 2 - 3 + 1 = 9, W = 7 + 1 + 0 - 2 + 1 = 7
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv_asym", kernel_shape=[3, 2],
                         pads=[0, 1, 2, 0]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        # SAME_UPPER, stride 2: out ceil(9/2) = 5, ceil(7/2) = 4; total pads 2 and 1 (end gets the odd one)
        helper.make_node("Conv", ["r1", "c2_w"], ["c2"], name="conv_same", kernel_shape=[3, 3],
                         strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 2, 9, 7])], [_vi("logits", F32, ["N", 3])], inits)


def conv_groups() -> onnx.ModelProto:
    """Conv with group=2 (mapped, not editable), then a 1x1 Conv, GAP, Gemm."""
    rng = _rng(15)
    inits = [_t(_w(rng, 4, 2, 3, 3), "gconv_w"), _t(_w(rng, 4, scale=0.1), "gconv_b"),
             _t(_w(rng, 3, 4, 1, 1), "pconv_w"), _t(_w(rng, 2, 3), "fc_w"), _t(_w(rng, 2, scale=0.1), "fc_b")]
    nodes = [
        helper.make_node("Conv", ["x", "gconv_w", "gconv_b"], ["c"], name="gconv", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="relu"),
        helper.make_node("Conv", ["cr", "pconv_w"], ["p"], name="pconv"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 4, 5, 5])], [_vi("logits", F32, ["N", 2])], inits)


def global_max_pool() -> onnx.ModelProto:
    """Conv -> GlobalMaxPool (an op onnx2torch lacks; converters.py adds it) -> Gemm."""
    rng = _rng(16)
    inits = [_t(_w(rng, 4, 2, 3, 3), "conv_w"), _t(_w(rng, 4, scale=0.1), "conv_b"),
             _t(_w(rng, 3, 4), "fc_w"), _t(_w(rng, 3, scale=0.1), "fc_b")]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv"),
        helper.make_node("GlobalMaxPool", ["c"], ["p"], name="gmp"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 2, 5, 5])], [_vi("logits", F32, ["N", 3])], inits)


def unnamed_nodes() -> onnx.ModelProto:
    """Nodes without names (the layer map and the twin name them <op>_<index>). ONNX
    Runtime refuses repeated node names, so those cannot be tested end to end."""
    rng = _rng(17)
    inits = [_t(_w(rng, 5, 6), "W1"), _t(_w(rng, 3, 5), "W2")]
    nodes = [
        helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "W2"], ["logits"], transB=1),
    ]
    return _model(nodes, [_vi("x", F32, ["N", 6])], [_vi("logits", F32, ["N", 3])], inits)


# ---------------------------------------------------------------- unsupported ops


def unsupported_det() -> onnx.ModelProto:
    """Det: a standard op that ONNX Runtime runs but onnx2torch has no converter for."""
    rng = _rng(18)
    inits = [_t(_w(rng, 4, 4), "W")]
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], name="fc"),
        helper.make_node("Reshape", ["h", "shape"], ["m"], name="reshape"),
        helper.make_node("Det", ["m"], ["logits"], name="det"),
    ]
    inits.append(_t(np.array([-1, 2, 2], dtype=np.int64), "shape"))
    return _model(nodes, [_vi("x", F32, ["N", 4])], [_vi("logits", F32, ["N"])], inits)


def custom_domain_op() -> onnx.ModelProto:
    """A node of a custom domain that neither onnx2torch nor ONNX Runtime knows."""
    rng = _rng(19)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
         helper.make_node("Frobnicate", ["h"], ["logits"], name="custom", domain="com.example")],
        "g", [_vi("x", F32, ["N", 4])], [_vi("logits", F32, ["N", 3])],
        initializer=[_t(_w(rng, 3, 4), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------ the registries


BUILDERS = {
    "gemm_transB1": lambda: gemm(trans_b=1),
    "gemm_transB0_alpha2_beta": lambda: gemm(trans_b=0, alpha=2.0, beta=0.5),
    "gemm_nobias_alpha": lambda: gemm(trans_b=1, alpha=0.75, bias=False, seed=20),
    "gemm_square_transB0": gemm_square,
    "gemm_square_transB0_alpha2": lambda: gemm_square(trans_b=0, alpha=2.0),
    "gemm_square_transB1": lambda: gemm_square(trans_b=1),
    "matmul": matmul,
    "matmul_3d": matmul_3d,
    "matmul_square": matmul_square,
    "shared_weight": shared_weight,
    "constant_nodes": constant_nodes,
    "constant_of_shape": constant_of_shape,
    "fp16": fp16,
    "opset9": opset9,
    "opset7": opset7,
    "ir3": ir3_initializers_as_inputs,
    "token_ids": token_ids,
    "token_ids_flatten": token_ids_flatten,
    "symbolic_dims": symbolic_dims,
    "conv_padding": conv_padding,
    "conv_groups": conv_groups,
    "global_max_pool": global_max_pool,
    "unnamed_nodes": unnamed_nodes,
}


# ------------------------------------------------------------------- torch export


def torch_cnn(seed: int = 0):
    """A small CNN: (Conv-BN-ReLU) x2, max pool, Linear-ReLU-Linear; BN statistics set
    to non-trivial values so folding them changes the weights. Eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.fc1 = nn.Linear(6 * 2 * 2, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            x = self.features(x).flatten(1)
            return self.fc2(torch.relu(self.fc1(x)))

    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def export_torch_cnn(path: Path, *, dynamo: bool, opset: int) -> Path:
    """Export ``torch_cnn()`` to ``path`` (input [batch, 3, 8, 8]). Legacy exporter:
    eval mode, Conv+BN folded. Dynamo exporter: saved with external data beside it."""
    import torch

    net = torch_cnn()
    example = torch.randn(2, 3, 8, 8)
    path = Path(path)
    if not dynamo:
        torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
        return path
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(net, (example,), dynamo=True, opset_version=opset,
                                input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    model = program.model_proto
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=64)
    return path
