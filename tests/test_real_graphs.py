"""Real-world graph styles load with parity (issue 9): old zoo graphs (IR 3, opset 9,
initializers as inputs, ConstantOfShape weights), paddle2onnx- and tf2onnx-style graphs,
``--input-shape``, the converters we add, and the logits before a final Softmax.

Real ONNX Runtime and onnx2torch throughout; the models come from tests/corpus.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
from onnx_dynedit.errors import ConversionError, InputError  # noqa: E402
from onnx_dynedit.io import load_model  # noqa: E402
from onnx_dynedit.parity import check_parity  # noqa: E402
from onnx_dynedit.sessions import ort_session  # noqa: E402
from onnx_dynedit.shapes import parse_input_shapes  # noqa: E402
from onnx_dynedit.twin import Twin  # noqa: E402
from test_roundtrip import assert_one_line_error, run_cli  # noqa: E402

F32 = TensorProto.FLOAT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    out = {}
    for name, build in (("squeezenet", lambda: corpus.zoo("squeezenet")),
                        ("squeezenet_placeholder", lambda: corpus.zoo_placeholder("squeezenet")),
                        ("paddle", corpus.paddle_style), ("tf2onnx", corpus.tf2onnx_style)):
        path = folder / f"{name}.onnx"
        onnx.save_model(build(), str(path))
        out[name] = path
    return out


# ------------------------------------------------------------------ zoo graphs (IR 3)


@pytest.mark.parametrize("name", ["squeezenet", "squeezenet_placeholder"])
def test_zoo_ir3_graph_inspects_with_parity(name, files, capsys):
    """IR 3, opset 9, initializers listed as inputs, Dropout-7 with its mask output,
    Softmax-1 over [N, 1000, 1, 1]: used to fail with "spatial rank == -2"."""
    code, out, err = run_cli(["inspect", str(files[name]), "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["ir_version"] == 3 and report["opset"] == 9
    assert report["parity"]["ok"] and report["parity"]["max_rel_diff"] <= 1e-5
    assert sum(l["editable"] for l in report["layers"]) == 26
    assert report["attributed_output"].startswith("logits") and "Softmax" in report["attributed_output"]
    code, out, err = run_cli(["diff", str(files[name]), str(files[name])], capsys)
    assert code == 0 and out.startswith("identical"), err


def test_materialised_zoo_logits_match_onnxruntime(files):
    """The twin's attributed output is the Softmax input, equal to ONNX Runtime's own."""
    loaded = load_model(files["squeezenet"])
    twin = Twin(loaded, "cpu")
    assert twin.logits_tensor == "r65"
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    model.graph.output.append(helper.make_empty_tensor_value_info("r65"))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    probs, logits = ort_session(model).run(None, {"data_0": x})
    with torch.no_grad():
        got = twin.forward(twin.to_tensor(x)).numpy()
    assert got.shape == (1, 1000)
    np.testing.assert_allclose(got, logits.reshape(1, 1000), rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    assert not np.allclose(got, probs.reshape(1, 1000))


# ------------------------------------------------------------------ paddle / tf2onnx style


def test_paddle_style_needs_width_then_loads(files, capsys):
    path = str(files["paddle"])
    code, _, err = run_cli(["inspect", path], capsys)
    assert_one_line_error(code, err, path)
    assert "'x'" in err and "--input-shape x:" in err
    code, out, err = run_cli(["inspect", path, "--json", "--input-shape", "x:2,3,16,20"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["parity"]["ok"] and report["parity"]["max_rel_diff"] <= 1e-5
    assert [l["source"] for l in report["layers"]] == ["constant"] * 3
    assert [l["editable"] for l in report["layers"]] == [True] * 3
    assert "linear_0.tmp_1" in report["attributed_output"]
    # a width the pooling cannot take: one line naming the input, no traceback
    code, _, err = run_cli(["inspect", path, "--input-shape", "x:2,3,16,2"], capsys)
    assert_one_line_error(code, err, path)
    assert "x [2, 3, 16, 2]" in err and "--input-shape" in err


@pytest.mark.parametrize("bad", ["y:1,3,16,20", "x:1,3,17,20", "x:1,3,16", "x:a,b", "x", "x:0,3,16,4"])
def test_input_shape_refuses_what_does_not_fit(bad, files, capsys):
    code, _, err = run_cli(["inspect", str(files["paddle"]), "--input-shape", bad], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "input-shape" in err


def test_parse_input_shapes():
    assert parse_input_shapes(["a:1,2", "ns/b:0:3"]) == {"a": (1, 2), "ns/b:0": (3,)}
    with pytest.raises(InputError):
        parse_input_shapes(["a:1", "a:2"])


def test_tf2onnx_style_nhwc_loads(files, capsys):
    code, out, err = run_cli(["inspect", str(files["tf2onnx"]), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["inputs"][0]["shape"] == ["unk__18", 12, 12, 3]
    assert report["parity"]["ok"] and report["parity"]["max_rel_diff"] <= 1e-5
    assert [l["op"] for l in report["layers"]] == ["Conv", "Conv", "MatMul"]


# ------------------------------------------------------------------ converters


def _single(nodes, x_shape, y_shape=None, inits=(), opset=11, ir=6):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, x_shape)],
                              [helper.make_tensor_value_info("y", F32, y_shape)], initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return onnx.shape_inference.infer_shapes(model) if y_shape is None else model


def _parity(model, shapes=None):
    twin = Twin(load_model(model), "cpu", input_shapes=shapes)
    return check_parity(twin)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_average_pool_asymmetric_pads(count_include_pad, ceil_mode):
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 2],
                            count_include_pad=count_include_pad, ceil_mode=ceil_mode)
    parity = _parity(_single([node], [2, 3, 9, 8], opset=11))
    assert parity.ok and parity.max_abs_diff <= 1e-6


@pytest.mark.parametrize("opset", [7, 10, 13])
def test_dropout_with_mask_output(opset):
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], **({"ratio": 0.3} if opset < 12 else {})),
             helper.make_node("Relu", ["d"], ["y"])]
    parity = _parity(_single(nodes, [2, 5], [2, 5], opset=opset, ir=3 if opset < 9 else 6))
    assert parity.ok and parity.max_abs_diff == 0.0


def test_greater_or_equal_16_and_gelu_20():
    nodes = [helper.make_node("GreaterOrEqual", ["x", "zero"], ["ge"]),
             helper.make_node("Cast", ["ge"], ["gef"], to=F32),
             helper.make_node("Gelu", ["x"], ["g"], approximate="tanh"),
             helper.make_node("Add", ["g", "gef"], ["y"])]
    model = _single(nodes, [2, 6], [2, 6], [numpy_helper.from_array(np.zeros(1, np.float32), "zero")], opset=20,
                    ir=9)
    parity = _parity(model)
    assert parity.ok and parity.max_abs_diff <= 1e-6


def test_missing_converter_message_does_not_contradict_itself():
    """An opset-17 graph with an op nobody converts: no advice to re-export at 13-17."""
    node = helper.make_node("Det", ["x"], ["y"])
    model = _single([node], [2, 3, 3], [2], opset=17, ir=8)
    with pytest.raises(ConversionError) as info:
        Twin(load_model(model), "cpu")
    text = info.value.one_line()
    assert "Det" in text and "opset 17" in text and "13-17" not in text and "13 to 17" not in text


def test_locate_takes_symbolic_sizes_from_the_pairs(files, tmp_path, capsys):
    """No --input-shape: the width of the pairs' rows sizes the parity inputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 16, 12)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", corrupt=x[:1], clean=x[1:2])
    np.savez(tmp_path / "stats.npz", x=x[2:])
    code, out, err = run_cli(["locate", files["paddle"], "--pairs", tmp_path / "pairs.npz", "--stats",
                              tmp_path / "stats.npz", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["attributed_output"].startswith("logits 'linear_0.tmp_1'")


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("logits_is_output", [False, True])
def test_final_softmax_logits_are_attributed(op, logits_is_output):
    """x -> Gemm -> (Log)Softmax -> Identity -> probs: the twin attributes the Gemm output,
    also when the graph already returns it as a second output."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((3, 4)) * 3).astype(np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z"], name="fc", transB=1),
             helper.make_node(op, ["z"], ["p"], name="sm", axis=1),
             helper.make_node("Identity", ["p"], ["probs"], name="id")]
    outputs = [helper.make_tensor_value_info("probs", F32, ["N", 3])]
    if logits_is_output:
        outputs.append(helper.make_tensor_value_info("z", F32, ["N", 3]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 4])], outputs,
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    twin = Twin(load_model(model), "cpu")
    assert twin.logits_tensor == "z" and twin.attributed_output == f"logits 'z' before {op} node 'sm'"
    x = rng.standard_normal((2, 4)).astype(np.float32)
    with torch.no_grad():
        got = twin.forward(twin.to_tensor(x)).numpy()
    np.testing.assert_allclose(got, x @ numpy_helper.to_array(w).T, rtol=1e-5, atol=1e-5)
    parity = check_parity(twin)
    assert parity.ok and "z" in [o.name for o in parity.outputs]
