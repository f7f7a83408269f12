"""Weights the layer map once listed but could not edit (issue 9, items 3 and 7):

- quantize_dynamic's integer ops: ConvInteger / MatMulInteger on an int8/uint8 weight
  initializer, the activation quantised at run time by DynamicQuantizeLinear, the output
  Cast to float and multiplied by (activation scale x weight scale). Mapped as Conv /
  MatMul on the dequantised weight (quant scheme ``integer_op``), edited as floats,
  requantised into the ORIGINAL integer initializer, checked with ONNX Runtime on the
  integer graph, reverted bit for bit.
- a Gemm / MatMul whose weight is Transpose(initializer): the perm is recorded in the
  layer map and the edit is written into the stored initializer through it.

Hand-set weights where the answer is known on paper, plus one end-to-end forced edit of
a quantize_dynamic copy of the badnets sample model through the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dynedit.diff import diff_models
from onnx_dynedit.io import load_model
from onnx_dynedit.layers import build_layer_map
from onnx_dynedit.parity import check_parity
from onnx_dynedit.quant import dequantize
from onnx_dynedit.twin import Twin
from onnx_dynedit.writeback import LayerUpdate, revert, write_back, written_edits

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quantised  # noqa: E402
from test_roundtrip import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BADNETS = ROOT / "sample_models" / "badnets"

# MatMulInteger weight B [in, out] (canonical W = B.T), per-tensor scale 0.1, zero point 0
BQ = np.array([[10, -20], [5, 100]], dtype=np.int8)
S = np.array(0.1, dtype=np.float32)


def _model(nodes, inits, n_in=2, n_out=2) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _matmul_integer(zero_point: int = 0) -> onnx.ModelProto:
    """x -> DynamicQuantizeLinear -> MatMulInteger(x_q, Bq, x_zp, b_zp) -> Cast -> Mul(x_s * b_s)
    -> y, as quantize_dynamic writes a MatMul."""
    inits = [numpy_helper.from_array(BQ, "Bq"), numpy_helper.from_array(S, "b_scale"),
             numpy_helper.from_array(np.array(zero_point, np.int8), "b_zp")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_s", "x_zp"], name="dql"),
             helper.make_node("Mul", ["x_s", "b_scale"], ["scales"], name="scales"),
             helper.make_node("MatMulInteger", ["x_q", "Bq", "x_zp", "b_zp"], ["acc"], name="mm"),
             helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["acc_f", "scales"], ["y"], name="rescale")]
    return _model(nodes, inits)


def _save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _record(model: onnx.ModelProto) -> dict:
    return json.loads(next(p.value for p in model.metadata_props if p.key == "dynedit.edits"))["tensors"][0]


# x = [[1, 0], [0, 1]]: DynamicQuantizeLinear gives scale 1/255, zero point 0, x_q = 255 x:
# exactly x again after dequantisation, so y = x @ dequant(B) on paper.
X = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)


def test_layer_map_records_the_integer_op():
    layer = build_layer_map(_matmul_integer()).get("mm")
    assert layer.editable and layer.op == "MatMul" and layer.initializer == "Bq" and layer.dtype == "int8"
    wq = layer.quant
    assert (wq.scheme, wq.scale, wq.zero_point, wq.axis, wq.value) == ("integer_op", "b_scale", "b_zp", None, "y")
    assert wq.activation == ("x_q", "x_s", "x_zp") and not wq.scale_shared
    assert np.allclose(layer.to_canonical(dequantize(BQ, S, np.zeros((), np.int8), wq)), (BQ * 0.1).T, atol=1e-7)


def test_twin_of_the_integer_op_matches_onnx_runtime(tmp_path):
    model = _matmul_integer()
    assert np.allclose(_ort(model, X), X @ (BQ.astype(np.float64) * 0.1), atol=1e-6)
    twin = Twin(load_model(_save(model, tmp_path / "m.onnx")), "cpu")
    assert check_parity(twin, {"x": X}).max_rel_diff < 1e-6
    assert check_parity(twin, seed=1).max_rel_diff < 1e-5


@pytest.mark.parametrize("case", ["fits", "new_scale"])
def test_edit_is_requantised_into_the_integer_initializer(tmp_path, case):
    model = _matmul_integer()
    loaded = load_model(_save(model, tmp_path / "m.onnx"))
    layer = build_layer_map(model).get("mm")
    # canonical W [out, in] = B.T: +0.5 at W[0, 0] = B[0, 0] (1.0 -> 1.5 = 15 x 0.1: fits);
    # +3 at W[1, 1] = B[1, 1] (10 -> 13 = 130 x 0.1 > 127: does not fit)
    u, d = (np.array([1.0, 0.0]), np.array([0.5, 0.0])) if case == "fits" else (np.array([0.0, 1.0]), np.array([0.0, 3.0]))
    upd = LayerUpdate(layer=layer, factors=((u, d),))
    new = write_back(loaded, [upd])
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    rec = _record(new)
    if case == "fits":
        assert inits["Bq"].tolist() == [[15, -20], [5, 100]] and inits["b_scale"].tobytes() == S.tobytes()
        assert rec["rounding"]["scale_kept"] and rec["aux"] == [] and rec["rounding"]["max_abs_rounding_error"] < 1e-6
    else:  # symmetric: s' = max |W'| / 127 = 13 / 127, every integer rescaled to it
        assert float(inits["b_scale"]) == pytest.approx(13 / 127, rel=1e-6)
        assert inits["Bq"].tolist() == np.rint(np.array([[1.0, -2.0], [0.5, 13.0]]) / (13 / 127)).astype(int).tolist()
        assert [a["initializer"] for a in rec["aux"]] == ["b_scale"] and rec["rounding"]["rescaled_groups"] == 1
    assert rec["quant"]["scheme"] == "integer_op"
    # ONNX Runtime runs the integer graph with the written integers (and scale)
    written = dequantize(inits["Bq"], inits["b_scale"], inits["b_zp"], layer.quant)
    assert np.allclose(_ort(new, X), X @ written, atol=1e-5)
    # the twin carrying the change as written reproduces it
    twin = Twin(loaded, "cpu")
    assert check_parity(twin, {"x": X}, model=new, edits=written_edits(loaded.model, new, [upd])).max_rel_diff < 1e-5
    b = _save(new, tmp_path / "e.onnx")
    changed = {c.initializer: c for c in diff_models(loaded, load_model(b)).changed}
    assert changed["Bq"].dequantised and changed["Bq"].rank == 1
    assert set(changed) == ({"Bq"} if case == "fits" else {"Bq", "b_scale"})
    assert revert(load_model(b)).SerializeToString() == loaded.model.SerializeToString()


def test_per_column_edit_rescales_that_column_only(tmp_path):
    """uint8 MatMulInteger weight with a scale and zero point per column (quantize_dynamic
    per_channel=True): B = [[1.0, -0.2], [0.5, 1.0]] as q = [[138, 108], [133, 228]],
    scales [0.1, 0.01], zero points 128. +0.5 at B[1, 1] (1.5: q 278 > 255) gives column 1
    alone the symmetric scale 1.5 / 127 (zero point 128 kept): q = rint(-0.2 / s') + 128 =
    111 and 255; column 0 keeps its scale and integers."""
    bq = np.array([[138, 108], [133, 228]], np.uint8)
    inits = [numpy_helper.from_array(bq, "Bq"), numpy_helper.from_array(np.array([0.1, 0.01], np.float32), "b_scale"),
             numpy_helper.from_array(np.array([128, 128], np.uint8), "b_zp")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_s", "x_zp"]),
             helper.make_node("Mul", ["x_s", "b_scale"], ["scales"]),
             helper.make_node("MatMulInteger", ["x_q", "Bq", "x_zp", "b_zp"], ["acc"], name="mm"),
             helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["acc_f", "scales"], ["y"])]
    model = _model(nodes, inits)
    loaded = load_model(_save(model, tmp_path / "m.onnx"))
    layer = build_layer_map(model).get("mm")
    assert layer.editable and layer.quant.axis == 1 and layer.quant.scale_shape == (1, 2)
    upd = LayerUpdate(layer=layer, factors=((np.array([0.0, 1.0]), np.array([0.0, 0.5])),))
    new = write_back(loaded, [upd])
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    assert inits["Bq"].tolist() == [[138, 111], [133, 255]] and inits["b_zp"].tolist() == [128, 128]
    assert inits["b_scale"][0] == np.float32(0.1) and inits["b_scale"][1] == pytest.approx(1.5 / 127, rel=1e-6)
    written = dequantize(inits["Bq"], inits["b_scale"], inits["b_zp"], layer.quant)
    assert np.allclose(_ort(new, X), X @ written, atol=1e-5)
    b = _save(new, tmp_path / "e.onnx")
    assert revert(load_model(b)).SerializeToString() == loaded.model.SerializeToString()


def test_dynamic_quantize_converter_matches_onnx_runtime():
    """The twin's DynamicQuantizeLinear: the scale spans [min(x, 0), max(x, 0)] over the
    whole tensor; on paper x = [-1, 0, 0.6, 2]: scale 3/255, zero point 85,
    y = rint(x / scale) + 85 = [0, 85, 136, 255]; ONNX Runtime agrees."""
    import torch

    from onnx_dynedit.converters import DynamicQuantizeLinear

    x = np.array([[-1.0, 0.0, 0.6, 2.0]], np.float32)
    y, scale, zp = DynamicQuantizeLinear()(torch.from_numpy(x))
    assert y.tolist() == [[0.0, 85.0, 136.0, 255.0]] and float(zp) == 85.0
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 4]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    ry, rs, rz = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert ry.tolist() == y.int().tolist() and float(rs) == float(scale) and int(rz) == int(zp)


# ------------------------------------------------------------ Transpose(initializer) weights

W0 = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], np.float32)   # stored [2, 3]


def _transposed(op: str) -> onnx.ModelProto:
    """x -> op(x, Transpose(W0, perm [1, 0])) -> y: the stored W0 [2, 3] becomes [3, 2],
    which is Gemm's B [out, in] (transB = 1: W = W0.T) or MatMul's B [in, out] (W = W0)."""
    nodes = [helper.make_node("Transpose", ["W0"], ["Wt"], perm=[1, 0], name="t")]
    if op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["x", "Wt"], ["y"], transB=1, name="fc"))
        return _model(nodes, [numpy_helper.from_array(W0, "W0")], n_in=2, n_out=3)
    nodes.append(helper.make_node("MatMul", ["x", "Wt"], ["y"], name="fc"))
    return _model(nodes, [numpy_helper.from_array(W0, "W0")], n_in=3, n_out=2)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_transposed_weight_is_written_through_the_perm(tmp_path, op):
    model = _transposed(op)
    loaded = load_model(_save(model, tmp_path / "m.onnx"))
    layer = build_layer_map(model).get("fc")
    assert layer.editable and layer.initializer == "W0" and layer.perm == (1, 0)
    canon = layer.to_canonical(W0)
    assert np.array_equal(canon, W0.T.astype(np.float64) if op == "Gemm" else W0.astype(np.float64))
    u = np.arange(1.0, layer.out_features + 1)
    d = np.linspace(-1.0, 1.0, layer.in_features)
    upd = LayerUpdate(layer=layer, factors=((u, d),))
    new = write_back(loaded, [upd])
    got = numpy_helper.to_array(next(i for i in new.graph.initializer if i.name == "W0"))
    delta = np.outer(u, d)   # canonical [out, in]
    expected = W0 + (delta.T if op == "Gemm" else delta)   # Gemm: W = W0.T, so W0 gets delta^T
    assert np.allclose(got, expected.astype(np.float32), atol=1e-6)
    x = np.random.default_rng(0).standard_normal((4, layer.in_features)).astype(np.float32)
    assert np.allclose(_ort(new, x), x @ (canon + delta).T, atol=1e-5)
    twin = Twin(loaded, "cpu")
    assert check_parity(twin, {"x": x}, model=new, edits=written_edits(loaded.model, new, [upd])).max_rel_diff < 1e-5
    b = _save(new, tmp_path / "e.onnx")
    diff = diff_models(loaded, load_model(b))
    assert [(c.initializer, c.rank) for c in diff.changed] == [("W0", 1)] and not diff.other_differences
    assert revert(load_model(b)).SerializeToString() == loaded.model.SerializeToString()


# ------------------------------------------------------------ end to end on a real model


@pytest.fixture(scope="module")
def dynamic_badnets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dyn")
    model = onnx.load(str(BADNETS / "model.onnx"))
    np.savez(folder / "stats32.npz", x=np.load(BADNETS / "stats.npz")["x"][:32])
    return {"int8": _save(quantised.to_dynamic(model), folder / "dyn_int8.onnx"),
            "uint8_pc": _save(quantised.to_dynamic(model, per_channel=True, unsigned=True), folder / "dyn_u8pc.onnx"),
            "stats": folder / "stats32.npz"}


@pytest.mark.parametrize("name", ["int8", "uint8_pc"])
def test_forced_edit_of_a_quantize_dynamic_copy(dynamic_badnets, name, tmp_path, capsys):
    src = dynamic_badnets[name]
    assert {n.op_type for n in onnx.load(str(src)).graph.node} >= {"ConvInteger", "MatMulInteger",
                                                                    "DynamicQuantizeLinear"}
    edited, report = tmp_path / "e.onnx", tmp_path / "r.json"
    code, out, err = run_cli(["edit", src, "--pairs", BADNETS / "pairs.npz", "--stats", dynamic_badnets["stats"],
                              "--criterion", "output", "--target-gap", "0", "--max-edits", "1", "-o", edited,
                              "--objective", "local", "--augment", "0", "--check-pairs", "0",  # first passing layer
                              "--report", report], capsys)
    assert code in (0, 1), out + err
    rep = json.loads(report.read_text())
    assert rep["parity_after"]["ok"], rep["parity_after"]
    (rounding,) = rep["rounding"]
    assert rounding["quant"]["scheme"] == "integer_op" and rounding["float_delta_rank"] == 1
    assert rounding["dtype"] == ("int8" if name == "int8" else "uint8") and rounding["clipped"] == 0
    assert rounding["initializer"].endswith("_quantized")   # the original integer initializer
    diff = diff_models(load_model(src), load_model(edited))
    assert {c.initializer for c in diff.changed} == {rounding["initializer"], *rounding["aux_changed"]}
    assert not diff.other_differences
    weight = next(c for c in diff.changed if c.initializer == rounding["initializer"])
    assert weight.rank == 1 and weight.dequantised
    back = tmp_path / "back.onnx"
    code, out, err = run_cli(["revert", edited, "-o", back], capsys)
    assert code == 0, out + err
    assert back.read_bytes() == src.read_bytes()
