"""The attribution criterion (feature leakage) on a hand-set model, where the answer is
known on paper.

x [N, 4]: x0, x1 carry the signal, x2, x3 are the "null block". A purely linear model

  fc1 (W1 [3, 4]):  h0 = x0, h1 = x1, h2 = x2 + x3   (h2 reads only the null block)
  fc2 (W2 [2, 3]):  logit0 = h0 - h1 + h2,  logit1 = -h0 + h1 + h2

The null block adds the same amount to both logits, so it never changes a prediction or
the softmax: the pair x~ = [1, 0, 1, 1], x = [1, 0, 0, 0] has output gap 0 and "auto"
must pick the attribution criterion. IG from the zero baseline of a linear model is
exact: A_i = x_i (W2 W1)[c, i], so on x~ for class 0: A = [1, 0, 1, 1] and the null
block holds 2/3 of the attribution; on x it holds 0.

A rank-one edit removes it exactly, on either layer: fc1 with u = -e2, d = [0, 0, 1, 1]
(h2 no longer reads x2 + x3), or fc2 with u = -[1, 1], d = e2. Inputs without a null
pattern (the stats) keep their outputs exactly, so the fit can reach zero.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_dynedit.api import edit_model
from onnx_dynedit.attribution import input_attribution, region_shares
from onnx_dynedit.io import load_model
from onnx_dynedit.rectify import RectifyConfig, rectify
from onnx_dynedit.transplant import transplant_pairs
from onnx_dynedit.twin import Twin

F32 = TensorProto.FLOAT
W1 = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=np.float32)
W2 = np.array([[1, -1, 1], [-1, 1, 1]], dtype=np.float32)
CORRUPT = np.array([[1, 0, 1, 1]], dtype=np.float32)
CLEAN = np.array([[1, 0, 0, 0]], dtype=np.float32)


def _stats(n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros((n, 4), np.float32)
    x[:, 0] = rng.integers(0, 5, size=n) / 4  # signal only, null block empty
    x[:, 1] = (x[:, 0] + rng.choice([-2, -1, 1, 2], size=n) / 4) % 1.25  # never a tie between the logits
    return x


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> str:
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "W2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "leaky", [helper.make_tensor_value_info("x", F32, ["N", 4])],
                              [helper.make_tensor_value_info("logits", F32, ["N", 2])],
                              initializer=[numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("leaky") / "leaky.onnx"
    onnx.save_model(model, str(path))
    return str(path)


def test_input_attribution_linear_model_exact(leaky):
    twin = Twin(load_model(leaky), "cpu")
    x = torch.tensor([[1, 0, 1, 1], [0.5, 0.25, 1, 0], [0, 1, 0, 0]], dtype=torch.float32)
    cls = torch.tensor([0, 1, 1])
    a = input_attribution(twin, x, cls, steps=3)
    expected = np.abs(x.numpy() * (W2 @ W1)[cls.numpy()])
    np.testing.assert_allclose(a.numpy(), expected, atol=1e-6)
    region = np.zeros((3, 4), bool)
    region[:, 2:] = True
    shares = region_shares(twin, x.numpy(), region, cls.numpy())
    np.testing.assert_allclose(shares, [2 / 3, 1 / 1.75, 0.0], atol=1e-6)


def test_transplant_match_uses_inputs_with_the_same_empty_region():
    pool = np.array([[0, 0, 0, 0], [1, 1, 1, 0], [0.5, 0.5, 0, 0], [1, 1, 0, 1]], np.float32)
    corrupt, clean = transplant_pairs(CORRUPT, CLEAN, pool, 4, match=True)
    assert len(corrupt) == 3  # the given pair + the 2 pool rows whose null block is empty like x's
    np.testing.assert_array_equal(clean[1:], pool[[0, 2]])
    np.testing.assert_array_equal(corrupt[1:] - clean[1:], np.repeat(CORRUPT - CLEAN, 2, axis=0))
    corrupt, _ = transplant_pairs(CORRUPT, CLEAN, pool, 4)  # no matching: the whole pool
    assert len(corrupt) == 5


def test_auto_picks_attribution_and_removes_the_leak(leaky):
    twin = Twin(load_model(leaky), "cpu")
    stats = _stats()
    result = rectify(twin, CORRUPT, CLEAN, stats_x=stats, config=RectifyConfig())
    assert result.criterion == "attribution"
    assert result.real_gap_before == pytest.approx(2 / 3, abs=1e-4)
    assert result.success, result.to_dict()["steps"]
    assert result.real_gap_after <= RectifyConfig().target_attribution
    assert result.changed_predictions == 0.0 and result.degradation < 1e-4  # outputs hardly moved
    edit = result.edits[0]
    if edit.layer.node == "fc1":   # h2 stops reading the null block: d along [0, 0, 1, 1]
        d = edit.d / np.abs(edit.d).max()
        np.testing.assert_allclose(d[:2], 0.0, atol=0.05)
        assert d[2] == pytest.approx(d[3], rel=0.05)
    else:                          # fc2 stops reading h2: d along e2
        d = edit.d / np.abs(edit.d).max()
        np.testing.assert_allclose(d[:2], 0.0, atol=0.05)


def test_output_criterion_sees_nothing_to_fix(leaky):
    twin = Twin(load_model(leaky), "cpu")
    result = rectify(twin, CORRUPT, CLEAN, stats_x=_stats(), config=RectifyConfig(criterion="output"))
    assert result.criterion == "output"
    assert result.gap_before < 1e-6 and not result.edits
    assert result.stopped_because == "target reached"


def test_edited_onnx_has_no_leak_in_onnxruntime(leaky, tmp_path):
    """Written back and run by plain ONNX Runtime: x~ now gives the logits of x, inputs
    without the null pattern keep their outputs, and the effective weight ignores x2, x3."""
    stats = _stats()
    np.savez(tmp_path / "pairs.npz", corrupt=CORRUPT, clean=CLEAN)
    np.savez(tmp_path / "stats.npz", x=stats)
    out = tmp_path / "fixed.onnx"
    outcome = edit_model(leaky, tmp_path / "pairs.npz", out, stats=tmp_path / "stats.npz", device="cpu")
    assert outcome.success and outcome.output == str(out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    run = lambda x: sess.run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(CORRUPT), run(CLEAN), atol=0.05)
    np.testing.assert_allclose(run(stats), stats @ (W2 @ W1).T, atol=0.05)  # fitted, so close, not exact
    np.testing.assert_array_equal(run(stats).argmax(1), (stats @ (W2 @ W1).T).argmax(1))
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    effective = weights["W2"] @ weights["W1"]
    np.testing.assert_allclose(effective[:, 2:], 0.0, atol=0.05)


def test_closed_form_objective_is_refused_under_the_attribution_criterion(leaky):
    from onnx_dynedit.errors import InputError

    twin = Twin(load_model(leaky), "cpu")
    with pytest.raises(InputError, match="objective='local'"):
        rectify(twin, CORRUPT, CLEAN, stats_x=_stats(), config=RectifyConfig(objective="local"))
