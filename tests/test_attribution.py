"""Integrated gradients on layer units and the layer ranking (attribution.py).

A purely linear 2-layer model has IG known on paper: dF/dh is constant along the path,
so M^l_i = (h(x)_i - h(x~)_i) * dF/dh_i exactly and the sum of M over any layer's units
is F(x) - F(x~) (completeness). On the real badnets sample model completeness holds per
layer up to the Riemann error of the midpoint rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dynedit.attribution import integrated_gradients, locate
from onnx_dynedit.io import load_model
from onnx_dynedit.rank_one import key_statistics
from onnx_dynedit.twin import Twin

F32 = TensorProto.FLOAT
SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"

# x [N, 3] -> fc1 (W1 [4, 3], b1) -> h [N, 4] -> fc2 (W2 [2, 4], b2) -> logits [N, 2]
W1 = np.array([[1, 0, -1], [2, 1, 0], [0, -1, 1], [1, 1, 1]], dtype=np.float64)
B1 = np.array([0.5, 0.0, -0.5, 1.0])
W2 = np.array([[1, -1, 2, 0], [0, 1, -1, 1]], dtype=np.float64)
B2 = np.array([0.25, -0.25])


def _save(tmp_path, nodes, inits, n_in, n_out, name) -> str:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", F32, ["N", n_in])],
                              [helper.make_tensor_value_info("logits", F32, ["N", n_out])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return str(path)


def _t(arr, name):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


@pytest.fixture(scope="module")
def linear_twin(tmp_path_factory):
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["logits"], name="fc2", transB=1)]
    path = _save(tmp_path_factory.mktemp("lin"), nodes, [_t(W1, "W1"), _t(B1, "b1"), _t(W2, "W2"), _t(B2, "b2")],
                 3, 2, "linear")
    return Twin(load_model(path), "cpu")


def _f(x):
    h = x @ W1.T + B1
    return h, h @ W2.T + B2


# corrupt -> class 0, clean -> class 1 (checked below)
CORRUPT = np.array([[-1.0, 0.0, 2.0], [1.0, -1.0, 0.5]], dtype=np.float32)
CLEAN = np.array([[0.0, 1.0, 1.0], [0.0, 0.5, 1.0]], dtype=np.float32)


@pytest.mark.parametrize("target", ["corrupt_logit", "gap"])
def test_ig_linear_model_exact(linear_twin, target):
    twin = linear_twin
    layers = twin.layer_map.editable()
    assert [l.node for l in layers] == ["fc1", "fc2"]
    hc, lc = _f(CORRUPT.astype(np.float64))
    hk, lk = _f(CLEAN.astype(np.float64))
    c_corrupt, c_clean = lc.argmax(1), lk.argmax(1)
    assert list(c_corrupt) == [0, 0] and list(c_clean) == [1, 1]
    # F and dF/dlogits per pair
    g_logits = np.zeros((2, 2))
    g_logits[np.arange(2), c_corrupt] = 1.0
    if target == "gap":
        g_logits[np.arange(2), c_clean] -= 1.0
    f_gap = float(((lk - lc) * g_logits).sum())

    ig = integrated_gradients(twin, layers, CORRUPT, CLEAN, steps=4, target=target)
    assert ig.f_gap == pytest.approx(f_gap, rel=1e-6)

    # output layer: dF/dlogit = g_logits, M = delta logits * g_logits (summed over pairs)
    m2 = (lk - lc) * g_logits
    # hidden layer: dF/dh = g_logits @ W2 (constant along the path)
    m1 = (hk - hc) * (g_logits @ W2)
    for node, m in (("fc1", m1), ("fc2", m2)):
        per_unit, mass, total = ig[node].per_unit, ig[node].mass, ig[node].total
        np.testing.assert_allclose(per_unit.numpy(), m.sum(0), rtol=1e-6, atol=1e-6)
        assert mass == pytest.approx(np.abs(m).sum(), rel=1e-6)
        assert total == pytest.approx(m.sum(), rel=1e-6)
        # completeness, exact for a linear model
        assert total == pytest.approx(f_gap, rel=1e-6)


def test_ig_abs_reduction_sums_magnitudes(linear_twin):
    """reduction="abs": |M| summed over pairs (and positions), so nothing cancels."""
    layers = linear_twin.layer_map.editable()
    hc, lc = _f(CORRUPT.astype(np.float64))
    hk, _ = _f(CLEAN.astype(np.float64))
    g_logits = np.zeros((2, 2))
    g_logits[np.arange(2), lc.argmax(1)] = 1.0
    m1 = (hk - hc) * (g_logits @ W2)
    ig = integrated_gradients(linear_twin, layers, CORRUPT, CLEAN, steps=4, reduction="abs")
    np.testing.assert_allclose(ig["fc1"].per_unit.numpy(), np.abs(m1).sum(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        integrated_gradients(linear_twin, layers, CORRUPT, CLEAN, reduction="max")


def test_ig_independent_of_steps_for_linear_model(linear_twin):
    layers = linear_twin.layer_map.editable()
    a = integrated_gradients(linear_twin, layers, CORRUPT, CLEAN, steps=1)
    b = integrated_gradients(linear_twin, layers, CORRUPT, CLEAN, steps=32, chunk=5)  # chunks split pairs
    for node in ("fc1", "fc2"):
        np.testing.assert_allclose(a[node].per_unit.numpy(), b[node].per_unit.numpy(), rtol=1e-6, atol=1e-6)


def test_locate_linear_model_ranks_every_layer(linear_twin):
    twin = linear_twin
    layers = twin.layer_map.editable()
    stats_x = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    stats = key_statistics(twin, layers, stats_x)
    loc = locate(twin, layers, CORRUPT, CLEAN, stats, steps=8)
    assert {a.layer.node for a in loc.ranked} == {"fc1", "fc2"}
    assert not loc.skipped
    assert all(np.isfinite(a.score) and a.score > 0 for a in loc.ranked)
    assert [a.score for a in loc.ranked] == sorted((a.score for a in loc.ranked), reverse=True)
    assert loc.chosen is loc.ranked[0]
    assert [a.layer.node for a in loc.in_graph_order] == ["fc1", "fc2"]
    for a in loc.ranked:
        assert a.score == pytest.approx(a.norm * a.specificity, rel=1e-12)
        assert a.attribution == pytest.approx(loc.f_gap, rel=1e-5)
    d = loc.to_dict()
    assert d["chosen"] == loc.chosen.layer.node
    assert [x["node"] for x in d["layers"]] == [a.layer.node for a in loc.ranked]


def test_locate_skips_layer_with_unchanged_keys(tmp_path):
    """logits = fc2(relu(fc1(x))) + fc3(x). fc1's output is negative on both inputs of
    the pair, so fc2's keys (relu outputs) are identical: fc2 is skipped, not scored."""
    w1 = np.array([[1, 1, 0], [0, 1, 1]], dtype=np.float64)
    b1 = np.array([-10.0, -10.0])
    w2 = np.array([[1, 2], [-1, 1]], dtype=np.float64)
    w3 = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float64)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "W2"], ["a"], name="fc2", transB=1),
        helper.make_node("Gemm", ["x", "W3"], ["b"], name="fc3", transB=1),
        helper.make_node("Add", ["a", "b"], ["logits"], name="add"),
    ]
    path = _save(tmp_path, nodes, [_t(w1, "W1"), _t(b1, "b1"), _t(w2, "W2"), _t(w3, "W3")], 3, 2, "branch")
    twin = Twin(load_model(path), "cpu")
    layers = twin.layer_map.editable()
    assert [l.node for l in layers] == ["fc1", "fc2", "fc3"]
    corrupt = np.array([[3.0, 0.0, 0.0]], dtype=np.float32)  # class 0
    clean = np.array([[0.0, 0.0, 3.0]], dtype=np.float32)    # class 1
    stats_x = np.random.default_rng(1).uniform(0, 8, (32, 3)).astype(np.float32)  # some relu units on
    stats = key_statistics(twin, layers, stats_x)
    loc = locate(twin, layers, corrupt, clean, stats, steps=8)
    assert [n for n, _ in loc.skipped] == ["fc2"]
    assert "identical keys" in loc.skipped[0][1]
    scored = {a.layer.node: a for a in loc.ranked}
    assert set(scored) == {"fc1", "fc3"}
    # fc1's units are dead on the whole path: no attribution, score 0; fc3 carries it all
    assert scored["fc1"].score == 0.0 and scored["fc1"].mass == 0.0
    assert scored["fc3"].score > 0 and np.isfinite(scored["fc3"].score)
    assert loc.chosen.layer.node == "fc3"
    assert scored["fc3"].attribution == pytest.approx(loc.f_gap, rel=1e-6)
    assert loc.f_gap == pytest.approx(-3.0, rel=1e-6)  # logit 0: 3 -> 0


# --------------------------------------------------------------------------- badnets


@pytest.fixture(scope="module")
def badnets_localisation():
    folder = SAMPLES / "badnets"
    twin = Twin(load_model(folder / "model.onnx"), "cpu")
    pairs = np.load(folder / "pairs.npz")
    stats_x = np.load(folder / "stats.npz")["x"]
    layers = twin.layer_map.editable()
    stats = key_statistics(twin, layers, stats_x)
    return twin, layers, locate(twin, layers, pairs["corrupt"], pairs["clean"], stats)


def test_badnets_completeness_per_layer(badnets_localisation):
    twin, layers, loc = badnets_localisation
    assert loc.f_gap < 0  # the target logit drops from the corrupted input to its clean twin
    assert len(loc.ranked) == len(layers) and not loc.skipped
    for a in loc.ranked:
        assert np.isfinite(a.score) and a.score > 0
        assert abs(a.attribution - loc.f_gap) <= 0.15 * abs(loc.f_gap), (a.layer.node, a.attribution, loc.f_gap)


def test_badnets_locate_chooses_editable_layer(badnets_localisation):
    twin, layers, loc = badnets_localisation
    assert loc.chosen is not None
    assert loc.chosen.layer.editable
    assert loc.chosen.layer.node in {l.node for l in layers}
    assert loc.steps == 16 and loc.target == "corrupt_logit"
