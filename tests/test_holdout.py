"""Degradation is checked on inputs nothing in the fit used (rectify.py and degradation.py, issue 10.1).

The model memorised its stats: a Gemm over 256 features whose stats are 64 of its own
"training" inputs. C from those few inputs is nearly singular outside their span, so the
edit direction d = C^-1 k* lies mostly where the stats have nothing: the edit leaves every
stats input's prediction alone while it moves inputs the fit never saw. Checked in-sample
(holdout 0: the first release's behaviour) the budget sees 0 changed predictions and the
edit is accepted although 13 % of fresh inputs change class; with the default held-out
share the same edit is rolled back, and `dynedit edit` does not report success.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dynedit.api import edit_model, shared_rows
from onnx_dynedit.bounds import binomial_cdf, upper_bound
from onnx_dynedit.degradation import FRESH_SHIFT_WEIGHT, SHIFT_WEIGHT, Degradation, Reference, bound_line
from onnx_dynedit.io import load_model
from onnx_dynedit.rectify import RectifyConfig, _reference, rectify, split_stats
from onnx_dynedit.twin import Twin

D, K = 256, 4
SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _data(rng, n):
    return rng.standard_normal((n, D)).astype(np.float32)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((K, D)).astype(np.float32)
    w[:, 0] = [8, 0, 0, 0]  # feature 0 is the trigger: it pulls towards class 0
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["logits"], name="fc", transB=1)], "memorised",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = tmp_path_factory.mktemp("memorised")
    onnx.save_model(model, str(folder / "model.onnx"))
    stats, fresh = _data(rng, 64), _data(rng, 2000)
    clean = next(x for x in (_data(rng, 1) for _ in range(100)) if (x @ w.T).argmax() != 0 and x[0, 0] < 0)  # a Trojan pair:
    corrupt = clean.copy()
    corrupt[0, 0] = 3.0                                                                  # x~ is pulled to 0
    np.savez(folder / "pairs.npz", corrupt=corrupt, clean=clean)
    np.savez(folder / "stats.npz", x=stats)
    return {"folder": folder, "w": w, "stats": stats, "fresh": fresh, "corrupt": corrupt, "clean": clean}


def _changed(twin, result, x) -> float:
    before = twin.run(x).argmax(1)
    with twin.applied([e.to_torch(twin.device) for e in result.edits]):
        after = twin.run(x).argmax(1)
    return float((before != after).mean())


def test_split_is_seeded_and_disjoint():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    fit, held = split_stats(x, 0.25, seed=0)
    assert len(fit) == 15 and len(held) == 5
    assert set(fit[:, 0]) | set(held[:, 0]) == set(x[:, 0]) and not set(fit[:, 0]) & set(held[:, 0])
    np.testing.assert_array_equal(split_stats(x, 0.25, seed=0)[1], held)
    assert len(split_stats(x[:3], 0.25, seed=0)[1]) == 0  # too few to hold any out
    assert len(split_stats(x, 0.0, seed=0)[1]) == 0


def test_in_sample_check_misses_the_drop_that_the_held_out_check_catches(memorised):
    m = memorised
    twin = Twin(load_model(m["folder"] / "model.onnx"), "cpu")
    blind = rectify(twin, m["corrupt"], m["clean"], stats_x=m["stats"], config=RectifyConfig(holdout=0.0))
    assert blind.degradation_source == "stats" and blind.degradation_count == 64
    assert blind.edits and blind.success and blind.changed_predictions == 0.0  # the in-sample check sees nothing
    assert blind.output_shift < 0.005                                          # ... and hardly a shift
    assert blind.degradation == pytest.approx(2 * blind.output_shift, rel=1e-6)  # (the trial's own run)
    assert _changed(twin, blind, m["fresh"]) > 0.05                     # ... fresh inputs do change class

    held = rectify(twin, m["corrupt"], m["clean"], stats_x=m["stats"])
    assert held.degradation_source == "held-out stats" and held.degradation_count == 16
    assert "16 more held out" in held.stats_source
    assert not held.edits and not held.success
    assert held.steps and all("degradation" in s.reason for s in held.steps)
    assert min(s.degradation for s in held.steps) > 0.05


def test_val_is_never_used_by_the_fit(memorised):
    """With val, every stats input feeds the fit and val only judges: the report says so."""
    m = memorised
    twin = Twin(load_model(m["folder"] / "model.onnx"), "cpu")
    result = rectify(twin, m["corrupt"], m["clean"], stats_x=m["stats"], val_x=m["fresh"][:200])
    assert result.degradation_source == "val" and result.degradation_count == 200
    assert result.stats_source == "stats (64 inputs)"
    assert not result.success  # the fresh inputs see the damage the stats cannot


def test_edit_reports_the_held_out_source_and_fails(memorised, tmp_path):
    m = memorised
    f = m["folder"]
    out = edit_model(f / "model.onnx", f / "pairs.npz", tmp_path / "fixed.onnx", stats=f / "stats.npz",
                     report=tmp_path / "report.json", device="cpu")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["degradation_source"] == "held-out stats" and report["degradation_count"] == 16
    assert report["changed_predictions"] == report["output_shift"] == 0.0  # nothing kept: nothing moved
    assert report["degradation_turned"] == 0 and report["degradation_bound"] == 0.0 and out.result.bound_line is None
    assert report["check_share"] is None and out.result.check_line is None  # no edit kept: no reading of them
    assert report["success"] is False and not out.success
    assert out.output is None  # nothing accepted, nothing written
    sess = ort.InferenceSession(str(f / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": m["clean"]})[0].shape == (1, K)


def test_reported_degradation_is_that_of_the_edits_kept(memorised):
    """The result's degradation is the last accepted trial's measurement (not measured a
    second time): it equals the share of val inputs whose class the kept edits change."""
    m = memorised
    twin = Twin(load_model(m["folder"] / "model.onnx"), "cpu")
    val = m["fresh"][:200]
    result = rectify(twin, m["corrupt"], m["clean"], stats_x=m["stats"], val_x=val,
                     config=RectifyConfig(max_degradation=0.5))
    assert result.edits and result.degradation_kind.startswith("changed predictions on val, or 0.5 x their mean")
    assert result.degradation > 0.05
    assert result.changed_predictions == _changed(twin, result, val)
    assert result.degradation == pytest.approx(max(result.changed_predictions, 0.5 * result.output_shift), rel=1e-6)
    assert result.degradation == [s for s in result.steps if s.accepted][-1].degradation
    assert result.degradation_turned == round(result.changed_predictions * 200) > 0  # unlabeled: the changed ones
    assert result.degradation_bound == upper_bound(result.degradation_turned, 200) > result.changed_predictions


def _identity_twin(folder) -> Twin:
    """A Gemm with W = I: its logits are its inputs, so the reference outputs are set by hand."""
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["logits"], name="fc", transB=1)], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
                              initializer=[numpy_helper.from_array(np.eye(K, dtype=np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "identity.onnx"))
    return Twin(load_model(folder / "identity.onnx"), "cpu")


def test_unlabeled_degradation_counts_the_output_shift(tmp_path):
    """Without labels the degradation is the share of changed top-1 classes or twice the
    mean total-variation distance of the class probabilities, whichever is larger: edits
    that move confident (memorised) inputs' outputs without flipping them still count.
    The distances here are worked out on paper from softmax([4, 0, 0, 0]) etc."""
    twin = _identity_twin(tmp_path)
    x = np.array([[4, 0, 0, 0], [0, 4, 0, 0]], np.float32)
    degr = Degradation(twin, Reference(x, None, "held-out stats", "changed predictions"))
    e4 = np.exp(4.0)
    # row 1 -> [0, 1, 0, 0]: still class 1; p(1) falls from e^4/(e^4+3) to e/(e+3), the rest rise alike
    tv = e4 / (e4 + 3) - np.e / (np.e + 3)
    moved = np.array([[4, 0, 0, 0], [0, 1, 0, 0]], np.float64)
    assert degr.parts(moved) == pytest.approx({"changed_predictions": 0.0, "output_shift": tv / 2, "changed": 0})
    assert degr.of(moved) == pytest.approx(tv)                        # 2 x the mean shift, no class changed
    assert degr.of(x.astype(np.float64)) == 0.0                       # nothing moved
    flipped = np.array([[4, 0, 0, 0], [0, 0, 4, 0]], np.float64)    # row 1 now class 2: TV = p(1) - p(2) swap
    swap = e4 / (e4 + 3) - 1 / (e4 + 3)
    assert degr.parts(flipped)["changed_predictions"] == 0.5
    assert degr.parts(flipped)["output_shift"] == pytest.approx(swap / 2)  # 0.482
    assert degr.of(flipped) == pytest.approx(swap)                    # 0.964: above the share changed, 0.5
    tie = Degradation(twin, Reference(np.array([[0, 4, 3.99, 0]], np.float32), None, "held-out stats", "changed"))
    assert tie.of(np.array([[0, 3.99, 4, 0]])) == 1.0                 # a near tie flipped: the share changed
    labelled = Degradation(twin, Reference(x, np.array([0, 1]), "val", "accuracy drop on val"))
    assert labelled.of(moved) == 0.0 and labelled.of(flipped) == 0.5  # with labels: the accuracy drop alone
    fresh = Degradation(twin, Reference(x, None, "val", "changed predictions on val", FRESH_SHIFT_WEIGHT))
    assert fresh.of(moved) == pytest.approx(0.5 * tv / 2)             # fresh inputs: half the mean shift
    assert fresh.of(flipped) == 0.5                                   # ... here below the share changed


def test_the_turned_inputs_are_counted_and_bounded(tmp_path):
    """What the degradation inputs vouch for: the inputs turned are counted by hand (with
    labels, right -> wrong only: a gain does not offset a loss in the count), and the
    bound is the exact one-sided 95 % limit of that count, worked out on paper."""
    twin = _identity_twin(tmp_path)
    x = np.array([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 4]], np.float32)
    y = np.array([0, 1, 3, 3])  # inputs 0, 1 and 3 right, input 2 wrong
    after = np.array([[0, 4, 0, 0], [0, 4, 0, 0], [0, 0, 0, 4], [0, 0, 0, 4]], np.float64)  # 0: lost, 2: gained
    labelled = Degradation(twin, Reference(x, y, "val", "accuracy drop on val"))
    parts = labelled.parts(after)
    assert parts["changed"] == 2 and parts["lost"] == 1 and parts["accuracy_drop"] == 0.0
    assert labelled.turned(parts) == 1
    assert binomial_cdf(1, 4, upper_bound(labelled.turned(parts), 4)) == pytest.approx(0.05)  # P(X <= 1 | 4, p) = 0.05 at the limit
    unlabeled = Degradation(twin, Reference(x, None, "held-out stats", "changed"))
    assert unlabeled.turned(unlabeled.parts(after)) == 2
    # k = 0: (1 - p)^n = 0.05; k = 1, n = 200: (1 - p)^200 + 200 p (1 - p)^199 = 0.05 at p = 0.02350
    assert upper_bound(0, 200) == pytest.approx(1 - 0.05 ** (1 / 200)) == pytest.approx(0.014867, abs=1e-6)
    p = upper_bound(1, 200)
    assert (1 - p) ** 200 + 200 * p * (1 - p) ** 199 == pytest.approx(0.05) and p == pytest.approx(0.02350, abs=1e-5)
    assert upper_bound(200, 200) == upper_bound(3, 0) == 1.0
    assert upper_bound(0, 200) < upper_bound(1, 200) < upper_bound(2, 200) and upper_bound(1, 400) < p
    # the report's line: over the 1 % budget, 299 inputs with none turned would vouch for it, (1 - 0.01)^299 < 0.05
    line = bound_line(0, 200, "val", True, 0.01)
    assert "200 (val), 0 turned from right to wrong" in line and "at most 1.49% of inputs" in line
    assert "about 299 inputs" in line and 0.99 ** 299 < 0.05 < 0.99 ** 298
    assert "budget" not in bound_line(0, 400, "val", True, 0.01)
    unlabeled_line = bound_line(2, 50, "held-out stats", False, 0.01)
    assert "50 (held-out stats), 2 moved to another class" in unlabeled_line and "with none moved" in unlabeled_line


def test_the_shift_weight_follows_the_reference():
    """Unlabeled val (fresh inputs) weighs the output shift by FRESH_SHIFT_WEIGHT, every
    stats-based reference (memorised inputs, their outputs move less) by SHIFT_WEIGHT."""
    x = np.zeros((8, K), np.float32)
    assert _reference(x, x, x[:2], x, None).shift_weight == FRESH_SHIFT_WEIGHT == 0.5
    assert _reference(x, x, x[:2], None, None).shift_weight == SHIFT_WEIGHT == 2.0
    assert _reference(x, x, None, None, None).shift_weight == SHIFT_WEIGHT
    assert _reference(x, None, None, None, None).shift_weight == SHIFT_WEIGHT
    assert _reference(x, x, None, x, np.zeros(8, int)).kind == "accuracy drop on val"


def test_unlabeled_val_repairs_the_memorised_blend(tmp_path):
    """val's inputs without labels (what a user with deployment inputs passes) are fresh:
    the budget weighs their output shift by FRESH_SHIFT_WEIGHT. At the stats' weight, 2,
    this sample's repair was refused edit after edit and corrected 0 % of the triggered
    test inputs (exit 1); now it meets the blend's target, measured with ONNX Runtime."""
    folder = SAMPLES / "resnet_blend"
    val = tmp_path / "val_inputs.npz"
    np.savez(val, x=np.load(folder / "val.npz")["x"])
    out = tmp_path / "edited.onnx"
    result = edit_model(folder / "model.onnx", folder / "pairs5.npz", out, stats=folder / "stats.npz", val=val,
                        device="cpu").result
    assert result.success and result.degradation_kind.startswith("changed predictions on val, or 0.5 x")
    assert result.degradation == pytest.approx(max(result.changed_predictions, 0.5 * result.output_shift), rel=1e-6)
    clean, corrupt = np.load(folder / "clean_test.npz"), np.load(folder / "corrupt_test.npz")
    target = json.loads((folder / "meta.json").read_text())["target"]

    def predict(path, x):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)

    right = [(predict(path, clean["x"]) == clean["y"]).mean() for path in (folder / "model.onnx", out)]
    drop = right[0] - right[1]
    sel = corrupt["y"] != target
    corrected = (predict(out, corrupt["x"])[sel] == corrupt["y"][sel]).mean()
    assert corrected >= 0.90 and drop <= 0.01, (corrected, drop)


def test_unlabeled_val_that_repeats_the_stats_is_flagged(memorised, tmp_path, caplog):
    """Unlabeled val is read as fresh inputs; val inputs that are also stats inputs (the
    model's training images, often) get a warning naming the file, and the report counts
    them (``inputs.val_in_stats``). Labelled val is counted, not warned about: its budget is
    the accuracy drop, whatever the inputs."""
    m = memorised
    f = m["folder"]
    np.savez(tmp_path / "val_inputs.npz", x=np.concatenate([m["stats"][:10], m["fresh"][:30]]))
    np.savez(tmp_path / "val_labelled.npz", x=m["stats"][:10], y=np.zeros(10, int))
    with caplog.at_level("WARNING", logger="onnx_dynedit.api"):
        out = edit_model(f / "model.onnx", f / "pairs.npz", None, stats=f / "stats.npz",
                         val=tmp_path / "val_inputs.npz", device="cpu")
    assert out.inputs["val_in_stats"] == 10
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("val_inputs.npz" in w and "10 of its 40 inputs are also stats inputs" in w for w in warned), warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnx_dynedit.api"):
        out = edit_model(f / "model.onnx", f / "pairs.npz", None, stats=f / "stats.npz",
                         val=tmp_path / "val_labelled.npz", device="cpu")
    assert out.inputs["val_in_stats"] == 10 and not [r for r in caplog.records if r.levelname == "WARNING"]
    out = edit_model(f / "model.onnx", f / "pairs.npz", None, stats=f / "stats.npz", device="cpu")
    assert out.inputs["val_in_stats"] is None


def test_shared_rows_on_paper():
    pool = np.arange(12, dtype=np.float32).reshape(4, 3)
    x = np.stack([pool[2], pool[0] + 1e-6, pool[0], np.zeros(3, np.float32)])
    assert shared_rows(x, pool) == 2          # rows 0 and 2; a row off by 1e-6 is another input
    assert shared_rows(x[:0], pool) == 0 and shared_rows(pool, pool) == 4
