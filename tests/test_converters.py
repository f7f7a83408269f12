"""The extra onnx2torch converters (onnx_dynedit/converters.py) against ONNX Runtime:
GlobalMaxPool, Reduce* from opset 18 (axes as an input), Reshape with allowzero at
opset 19+/21, old-opset Flatten / Relu / Gemm through aliases, newer-opset ops through
aliases, Pad-18+, and Conv with auto_pad SAME_UPPER / SAME_LOWER (strided, dilated,
1-D). Every case is a real model run by a real ONNX Runtime session and by the real
onnx2torch twin; parity must hold within 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_dynedit.converters import ensure_converters
from onnx_dynedit.io import load_model
from onnx_dynedit.layers import Layer
from onnx_dynedit.keys import layer_keys
from onnx_dynedit.parity import check_parity
from onnx_dynedit.sessions import ort_session
from onnx_dynedit.twin import Twin
from onnx_dynedit.writeback import LayerUpdate, write_back

F32 = TensorProto.FLOAT


def _model(nodes, x_shape, inits=(), *, opset=18, ir=None, out_shape=None, x_type=F32, inits_as_inputs=False):
    extra = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits] if inits_as_inputs else []
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)] + extra,
        [helper.make_tensor_value_info("y", F32, out_shape)], initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir if ir is not None else (3 if opset < 9 else min(model.ir_version, 10))
    if out_shape is None:  # let ONNX shape inference declare the output's shape
        model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def _t(arr, name):
    return numpy_helper.from_array(np.asarray(arr), name)


def assert_parity(model, feeds=None, tol=1e-5):
    twin = Twin(load_model(model), "cpu")
    parity = check_parity(twin, feeds)
    assert parity.ok and parity.max_rel_diff <= tol, parity.to_dict()
    return twin


def twin_and_ort_outputs(model, feeds):
    twin = Twin(load_model(model), "cpu")
    ref = ort_session(model).run(None, feeds)[0]
    with torch.no_grad():
        got = twin.forward(*[twin.to_tensor(feeds[s.name]) for s in twin.inputs]).numpy()
    return ref, got


# ----------------------------------------------------------------------- GlobalMaxPool


@pytest.mark.parametrize("shape", [["N", 3, 5, 4], ["N", 2, 7], ["N", 2, 3, 3, 2]])
@pytest.mark.parametrize("opset", [13, 18, 22])
def test_global_max_pool(shape, opset):
    model = _model([helper.make_node("GlobalMaxPool", ["x"], ["y"])], shape, opset=opset)
    assert_parity(model)


def test_global_max_pool_registered():
    model = _model([helper.make_node("GlobalMaxPool", ["x"], ["y"])], ["N", 3, 4, 4], opset=17)
    assert ensure_converters(model) == []


# ------------------------------------------------------------------------ Reduce-18


REDUCE_OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("axes,keepdims", [([1], 0), ([1], 1), ([-1, 1], 0), (None, 1), (None, 0)])
def test_reduce18_axes_input(op, axes, keepdims):
    """x -> Abs -> Add 0.5 (so log-type reductions are defined) -> Reduce*(x, axes)."""
    inits = [_t(np.array([0.5], np.float32), "half")]
    inputs = ["p"]
    if axes is not None:
        inits.append(_t(np.array(axes, np.int64), "axes"))
        inputs.append("axes")
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Add", ["a", "half"], ["p"]),
             helper.make_node(op, inputs, ["y"], keepdims=keepdims)]
    model = _model(nodes, ["N", 3, 4], inits, opset=18)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    ref, got = twin_and_ort_outputs(model, {"x": x})
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
def test_reduce18_noop_with_empty_axes(op):
    model = _model([helper.make_node(op, ["x"], ["y"], keepdims=1, noop_with_empty_axes=1)], ["N", 3, 4], opset=18)
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    ref, got = twin_and_ort_outputs(model, {"x": x})
    assert ref.shape == got.shape == x.shape
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_reduce13_attribute_axes_still_works():
    model = _model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2], keepdims=0)], ["N", 3, 4], opset=13)
    assert_parity(model)


# ------------------------------------------------------------------- Reshape allowzero


@pytest.mark.parametrize("opset", [14, 19, 21])
@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape_allowzero(opset, allowzero):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)]
    model = _model(nodes, [2, 3, 4], [_t(np.array([2, -1, 2], np.int64), "shape")], opset=opset)
    twin = assert_parity(model)
    assert twin.notes == ()  # no opset conversion was needed


@pytest.mark.parametrize("opset", [19, 21])
def test_reshape_zero_copies_dim_without_allowzero(opset):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=0)]
    model = _model(nodes, [2, 3, 4], [_t(np.array([0, 0, 2, 2], np.int64), "shape")], opset=opset)
    ref, got = twin_and_ort_outputs(model, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})
    assert ref.shape == got.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("opset", [19, 21])
def test_reshape_allowzero_keeps_a_real_zero(opset):
    """allowzero=1: a 0 in the shape is a zero-size dim (the input is empty)."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]
    model = _model(nodes, [2, 0, 3], [_t(np.array([0, 6], np.int64), "shape")], opset=opset)
    ref, got = twin_and_ort_outputs(model, {"x": np.zeros((2, 0, 3), np.float32)})
    assert ref.shape == got.shape == (0, 6)


# --------------------------------------------------------------- aliases, old and new


@pytest.mark.parametrize("opset", [7, 8, 9])
def test_old_opset_flatten_relu_gemm(opset):
    """Flatten-1 (opset < 9) and Gemm-7 are aliases of the nearest registered converter."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("Gemm", ["r", "W", "b"], ["y"], transB=1, alpha=0.5)]
    inits = [_t(rng.standard_normal((3, 12)).astype(np.float32), "W"), _t(np.zeros(3, np.float32), "b")]
    # IR 3 (opset < 9): initializers are graph inputs too
    model = _model(nodes, ["N", 3, 2, 2], inits, opset=opset, ir=3 if opset < 9 else 4, inits_as_inputs=opset < 9)
    twin = assert_parity(model)
    assert not any("converted" in n for n in twin.notes), twin.notes


@pytest.mark.parametrize("opset", [21, 22, 23])
def test_new_opset_cnn(opset):
    """Conv-22, MaxPool-22, GlobalAveragePool-22, Flatten-21/23, Reshape-21/23, Pad-21/23."""
    rng = np.random.default_rng(3)
    inits = [_t(rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.5, "cw"), _t(np.zeros(4, np.float32), "cb"),
             _t(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"), _t(np.array([-1, 4], np.int64), "shape"),
             _t(rng.standard_normal((3, 4)).astype(np.float32), "fw")]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["xp"], mode="constant"),
        helper.make_node("Conv", ["xp", "cw", "cb"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2]),
        helper.make_node("GlobalAveragePool", ["m"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Reshape", ["f", "shape"], ["f2"]),
        helper.make_node("Gemm", ["f2", "fw"], ["y"], transB=1),
    ]
    model = _model(nodes, ["N", 2, 6, 6], inits, opset=opset)
    assert_parity(model)


@pytest.mark.parametrize("opset", [18, 19])
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad18(opset, mode):
    inits = [_t(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads")]
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)], ["N", 2, 4, 4], inits, opset=opset)
    assert_parity(model)


# ------------------------------------------------------------- Conv auto_pad SAME_*


@dataclass(frozen=True)
class Edit:
    layer: Layer
    u: np.ndarray
    d: np.ndarray


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("size,kernel,strides,dilations", [
    ((7, 6), (3, 3), (2, 2), (1, 1)),
    ((8, 8), (3, 2), (2, 3), (1, 1)),
    ((5, 7), (3, 3), (1, 1), (1, 1)),  # ONNX Runtime refuses dilations with SAME_*
    ((9, 4), (4, 4), (3, 1), (1, 1)),
])
def test_conv_auto_pad_same(auto_pad, size, kernel, strides, dilations):
    rng = np.random.default_rng(4)
    inits = [_t(rng.standard_normal((3, 2) + kernel).astype(np.float32), "w"),
             _t(rng.standard_normal(3).astype(np.float32), "b")]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", auto_pad=auto_pad, kernel_shape=list(kernel),
                            strides=list(strides), dilations=list(dilations))
    model = _model([node], ["N", 2, *size], inits, opset=17)
    twin = assert_parity(model)
    layer = twin.layer_map.get("conv")
    assert layer.editable and layer.auto_pad == auto_pad
    # the unfolded keys line up with ONNX Runtime's output positions
    x = np.random.default_rng(5).standard_normal((2, 2, *size)).astype(np.float32)
    ref = ort_session(model).run(None, {"x": x})[0]
    keys = layer_keys(layer, torch.from_numpy(x)).double().numpy()
    w = layer.to_canonical(numpy_helper.to_array(inits[0]))
    pred = (keys @ w.T).transpose(0, 2, 1).reshape(ref.shape) + numpy_helper.to_array(inits[1]).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(pred, ref, rtol=1e-4, atol=1e-4)
    # a rank-one edit written back == the twin's hook, through the SamePadding wrapper
    edit = Edit(layer, rng.standard_normal(layer.out_features), rng.standard_normal(layer.in_features) * 0.3)
    written = write_back(twin.loaded, [LayerUpdate(layer, ((edit.u, edit.d),))])
    assert check_parity(twin, model=written, edits=[edit]).max_rel_diff <= 1e-5


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv1d_auto_pad(auto_pad):
    rng = np.random.default_rng(6)
    inits = [_t(rng.standard_normal((3, 2, 4)).astype(np.float32), "w")]
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad=auto_pad, strides=[2])
    model = _model([node], ["N", 2, 9], inits, opset=13)
    twin = assert_parity(model)
    layer = twin.layer_map.get("conv")
    edit = Edit(layer, rng.standard_normal(layer.out_features), rng.standard_normal(layer.in_features) * 0.3)
    written = write_back(twin.loaded, [LayerUpdate(layer, ((edit.u, edit.d),))])
    assert check_parity(twin, model=written, edits=[edit]).max_rel_diff <= 1e-5


def test_conv_same_at_opset22():
    """Conv-22 is an alias of Conv-11, and the SAME_* wrapper still applies to it."""
    rng = np.random.default_rng(7)
    inits = [_t(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")]
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    assert_parity(_model([node], ["N", 2, 7, 7], inits, opset=22))


def _batch_one_reshape_model(tmp_path, *, transpose_first: bool):
    """x [1, 4, 2, 2] -> (Transpose) -> Reshape to the constant [1, 16] -> MatMul W -> y [1, 3]."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 3)).astype(np.float32)
    nodes, src = [], "x"
    if transpose_first:  # dim 0 of the reshaped tensor is 4, not the batch: left alone
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2, 3]))
        src = "xt"
    nodes += [helper.make_node("Reshape", [src, "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["y"])]
    model = _model(nodes, [1, 4, 2, 2], [_t(np.array([1, 16], np.int64), "shape"), _t(w, "W")], out_shape=[1, 3])
    path = tmp_path / "batch1.onnx"
    onnx.save(model, str(path))
    return path, w


def test_hard_coded_batch_reshape_runs_batches(tmp_path):
    """A graph fixed at batch 1 with Reshape([1, 16]) (the zoo's Inception v1 / ShuffleNet
    style): the twin runs several rows at once, each row as ONNX Runtime gives it alone."""
    path, w = _batch_one_reshape_model(tmp_path, transpose_first=False)
    loaded = load_model(path)
    twin = Twin(loaded, "cpu")
    assert any("hard-coded batch" in note for note in twin.notes)
    x = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float32)
    with torch.no_grad():
        out = twin.forward(twin.to_tensor(x)).numpy()
    sess = ort_session(loaded.model)
    expected = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, x.reshape(3, 16) @ w, rtol=1e-5, atol=1e-5)
    assert [i.name for i in loaded.model.graph.initializer] == ["shape", "W"]  # the original is untouched


def test_reshape_of_a_non_batch_dim_is_left_alone(tmp_path):
    path, _ = _batch_one_reshape_model(tmp_path, transpose_first=True)
    twin = Twin(load_model(path), "cpu")
    assert not any("hard-coded batch" in note for note in twin.notes)
    assert check_parity(twin).max_rel_diff < 1e-5


# ------------------------------------------------- shape inference on a light copy


def test_shape_inference_copy_leaves_large_weights_out():
    """normalise's batch-free Reshape check infers shapes on a copy without the large
    initializers (typed graph inputs instead): the inferred shapes are the full model's,
    the small Reshape target stays a constant, and the copy holds none of the weight bytes."""
    from onnx_dynedit.normalise import LIGHT_BYTES, _without_large_weights

    w = np.ones((256, 3, 8, 8), np.float32)
    assert w.nbytes > LIGHT_BYTES
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[8, 8]),
             helper.make_node("Reshape", ["c", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "W"),
                                           numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    light = _without_large_weights(model)
    assert [i.name for i in light.graph.initializer] == ["shape"]
    assert light.ByteSize() < 2048 and model.ByteSize() > w.nbytes
    full = onnx.shape_inference.infer_shapes(model).graph
    lean = onnx.shape_inference.infer_shapes(light).graph
    shapes = lambda g: {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
                        for v in list(g.value_info) + list(g.output)}
    assert shapes(lean) == shapes(full) and shapes(full)["y"] == [1, 256]
    assert len(model.graph.initializer) == 2  # the model itself is untouched
