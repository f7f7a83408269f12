"""`dynedit verify` and onnx_dynedit.verify: real ONNX files, real ONNX Runtime sessions.

The models are tiny Gemm classifiers (x [N, 4] -> logits [N, 3]) with hand-set weights:
the original has a "trigger" weight from feature 3 into class 2, the edited copy has
that weight shrunk. Corrupted inputs carry a large feature 3, so the original predicts
class 2 (the attack target) and the edited model mostly recovers the true class.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dynedit.bounds import binomial_cdf, inputs_needed, upper_bound
from onnx_dynedit.errors import DynEditError, InputError
from onnx_dynedit.sessions import ort_session
from onnx_dynedit.verify import (
    GateResult,
    Thresholds,
    VerifyReport,
    effective_batch_size,
    output_shifts,
    run_batched,
    verify,
)

REPO = Path(__file__).resolve().parents[1]
TARGET = 2

W_ORIG = np.array([[2.0, 0.0, 0.0],
                   [0.0, 2.0, 0.0],
                   [0.0, 0.0, 2.0],
                   [0.0, 0.0, 3.0]], dtype=np.float32)
B = np.array([0.1, -0.1, 0.0], dtype=np.float32)
W_EDIT = W_ORIG.copy()
W_EDIT[3, 2] = 0.5  # the rank-one repair: shrink the trigger weight


# ----------------------------------------------------------------------------- helpers


def gemm_model(path: Path, w: np.ndarray, b: np.ndarray, *, batch="N", two_outputs=False) -> Path:
    """Write a Gemm classifier x [batch, 4] -> logits [batch, C] (optionally + probs)."""
    c = w.shape[1]
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, c])]
    if two_outputs:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, c]))
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, w.shape[0]])],
        outputs,
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_data(rng: np.random.Generator, n: int, *, corrupt: bool) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[:, 3] *= 0.3
    if corrupt:
        x[:, 3] = 2.5 + rng.normal(scale=0.7, size=n)
    y = x[:, :3].argmax(axis=1).astype(np.int64)  # the "true" class ignores the trigger
    return x, y


@pytest.fixture()
def case(tmp_path):
    rng = np.random.default_rng(0)
    orig = gemm_model(tmp_path / "orig.onnx", W_ORIG, B)
    edit = gemm_model(tmp_path / "edit.onnx", W_EDIT, B)
    cx, cy = make_data(rng, 120, corrupt=False)
    kx, ky = make_data(rng, 60, corrupt=True)
    np.savez(tmp_path / "clean.npz", x=cx, y=cy)
    np.savez(tmp_path / "clean_nolabels.npz", x=cx)
    np.savez(tmp_path / "corrupt.npz", x=kx, y=ky)
    return {"dir": tmp_path, "orig": orig, "edit": edit, "clean": tmp_path / "clean.npz",
            "clean_nolabels": tmp_path / "clean_nolabels.npz", "corrupt": tmp_path / "corrupt.npz",
            "cx": cx, "cy": cy, "kx": kx, "ky": ky}


def plain_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """An independent ORT session, whole array in one call."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def dynedit(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "cli.main", "verify", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, proc.stderr
    assert err.startswith("dynedit: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ----------------------------------------------------------------------------- figures


def test_figures_equal_independent_numpy_computation(case):
    report = verify(case["orig"], case["edit"], case["clean"], corrupt=case["corrupt"], target=TARGET,
                    batch_size=7)  # 7 does not divide 120 or 60: ragged last batch
    assert isinstance(report, VerifyReport)

    # Independent logits: a separate ORT session on the whole array, cross-checked by numpy.
    lo, le = plain_logits(case["orig"], case["cx"]), plain_logits(case["edit"], case["cx"])
    np.testing.assert_allclose(lo, case["cx"] @ W_ORIG + B, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(le, case["cx"] @ W_EDIT + B, rtol=1e-5, atol=1e-5)
    po, pe, y = lo.argmax(1), le.argmax(1), case["cy"]

    c = report.clean
    assert c.n == 120
    assert c.acc_before == pytest.approx(np.mean(po == y), abs=0)
    assert c.acc_after == pytest.approx(np.mean(pe == y), abs=0)
    assert c.agreement == pytest.approx(np.mean(po == pe), abs=0)
    diff = np.abs(lo.astype(np.float64) - le.astype(np.float64))
    assert c.max_abs_logit_change == pytest.approx(diff.max(), rel=1e-6)
    assert c.mean_abs_logit_change == pytest.approx(diff.mean(), rel=1e-6)
    # right -> wrong, counted over the ragged batches (each its own partial, merged), and its exact 95 % limit
    assert c.turned == int(((po == y) & (pe != y)).sum())
    assert c.drop_bound == upper_bound(c.turned, 120) and binomial_cdf(c.turned, 120, c.drop_bound) == pytest.approx(0.05)
    # ... and the change is the trigger weight times feature 3, only in class 2.
    assert c.max_abs_logit_change == pytest.approx(2.5 * np.abs(case["cx"][:, 3]).max(), rel=1e-5)

    ko, ke = plain_logits(case["orig"], case["kx"]), plain_logits(case["edit"], case["kx"])
    qo, qe, ky = ko.argmax(1), ke.argmax(1), case["ky"]
    k = report.corrupt
    assert k.n == 60
    assert k.acc_before == pytest.approx(np.mean(qo == ky), abs=0)
    assert k.acc_after == pytest.approx(np.mean(qe == ky), abs=0)
    wrong = qo != ky
    assert k.n_wrong_before == wrong.sum()
    assert k.fix_rate == pytest.approx(np.mean(qe[wrong] == ky[wrong]), abs=0)
    other = ky != TARGET
    assert k.n_not_target == other.sum() < 60  # some corrupted inputs really are class 2
    assert k.asr_before == pytest.approx(np.mean(qo[other] == TARGET), abs=0)
    assert k.asr_after == pytest.approx(np.mean(qe[other] == TARGET), abs=0)

    # The scenario is not degenerate: the edit really repairs some, not all.
    assert k.asr_before > 0.5 > k.asr_after
    assert 0 < k.fix_rate < 1
    assert c.acc_after >= c.acc_before
    assert report.passed and report.gates == ()


def test_clean_without_labels_gives_null_accuracy_but_agreement(case):
    report = verify(case["orig"], case["edit"], case["clean_nolabels"])
    lo, le = plain_logits(case["orig"], case["cx"]), plain_logits(case["edit"], case["cx"])
    assert report.clean.acc_before is None and report.clean.acc_after is None
    assert report.clean.agreement == np.mean(lo.argmax(1) == le.argmax(1))
    assert report.clean.turned == int((lo.argmax(1) != le.argmax(1)).sum()) > 0  # without labels: top-1 changed
    assert report.to_dict()["clean"]["drop_bound"] == upper_bound(report.clean.turned, 120)
    assert report.corrupt is None
    d = report.to_dict()
    assert d["clean"]["acc_before"] is None and d["corrupt"] is None


def test_asr_null_without_target(case):
    report = verify(case["orig"], case["edit"], case["clean"], corrupt=case["corrupt"])
    assert report.corrupt.asr_before is None and report.corrupt.asr_after is None
    assert report.corrupt.fix_rate is not None


def test_gates_in_library(case):
    ok = verify(case["orig"], case["edit"], case["clean"], corrupt=case["corrupt"], target=TARGET,
                thresholds={"max_acc_drop": 0.0, "min_fix_rate": 0.3, "max_logit_change": 100.0, "max_asr": 0.5})
    assert ok.passed and [g.name for g in ok.gates] == ["max-acc-drop", "min-fix-rate", "max-logit-change", "max-asr"]
    bad = verify(case["orig"], case["edit"], case["clean"], corrupt=case["corrupt"], target=TARGET,
                 thresholds=Thresholds(max_logit_change=0.001, min_fix_rate=1.0))
    assert not bad.passed
    assert [m.split(":")[0] for m in bad.failed_checks] == ["min-fix-rate", "max-logit-change"]
    assert bad.failed_checks[1].startswith("max-logit-change: ") and bad.failed_checks[1].endswith(" > 0.0010")


def test_output_shift_on_paper():
    """softmax([0, 0, 0]) = 1/3 each and softmax([ln 2, 0, 0]) = (1/2, 1/4, 1/4): TV 1/6.
    Outputs that are already distributions (a graph ending in Softmax) are taken as they are."""
    np.testing.assert_allclose(output_shifts(np.zeros((1, 3)), np.array([[np.log(2), 0, 0]])), [1 / 6])
    np.testing.assert_allclose(output_shifts(np.full((1, 3), 1 / 3), np.array([[0.5, 0.25, 0.25]])), [1 / 6])
    np.testing.assert_allclose(output_shifts(np.array([[50.0, 0, 0]]), np.array([[0, 50.0, 0]])), [1.0])
    assert output_shifts(np.ones((2, 3)), np.ones((2, 3)) + 7).tolist() == [0.0, 0.0]  # softmax ignores a shift


def test_output_shift_gate(case):
    """The figure is the mean TV distance of the two models' softmax outputs on the clean
    inputs (recomputed here from independent sessions); the gate compares it."""
    lo, le = plain_logits(case["orig"], case["cx"]), plain_logits(case["edit"], case["cx"])
    p, q = (np.exp(v - v.max(1, keepdims=True)) for v in (lo.astype(np.float64), le.astype(np.float64)))
    expect = float((0.5 * np.abs(p / p.sum(1, keepdims=True) - q / q.sum(1, keepdims=True)).sum(1)).mean())
    ok = verify(case["orig"], case["edit"], case["clean"], thresholds={"max_output_shift": expect + 1e-6})
    assert ok.passed and ok.clean.output_shift == pytest.approx(expect, rel=1e-6)
    assert ok.to_dict()["clean"]["output_shift"] == pytest.approx(expect, rel=1e-6)
    bad = verify(case["orig"], case["edit"], case["clean"], thresholds={"max_output_shift": expect / 2})
    assert not bad.passed and bad.failed_checks[0].startswith("max-output-shift: ")
    same = verify(case["orig"], case["orig"], case["clean"], thresholds={"max_output_shift": 0.0})
    assert same.passed and same.clean.output_shift == 0.0


def test_drop_bound_gate(case):
    """The gate reads what the clean set vouches for: upper_bound(turned, n), labels or not.
    The original against itself turns none of 120: 1 - 0.05^(1/120) = 0.02465."""
    ok = verify(case["orig"], case["edit"], case["clean"], thresholds={"max_drop_bound": 1.0})
    bound = upper_bound(ok.clean.turned, 120)
    assert ok.passed and ok.gates[0].name == "max-drop-bound" and ok.gates[0].value == bound
    bad = verify(case["orig"], case["edit"], case["clean_nolabels"], thresholds={"max_drop_bound": bound / 2})
    assert not bad.passed and bad.failed_checks[0].startswith("max-drop-bound: ")
    same = verify(case["orig"], case["orig"], case["clean_nolabels"], thresholds={"max_drop_bound": 0.025})
    assert same.passed and same.clean.turned == 0 and same.clean.drop_bound == pytest.approx(0.024656, abs=1e-6)
    assert not verify(case["orig"], case["orig"], case["clean"], thresholds={"max_drop_bound": 0.024}).passed


def test_inputs_needed_on_paper():
    """None turned of n vouches for r when (1 - r)^n <= 0.05: 1 % needs 299 (0.99^299 = 0.0495,
    0.99^298 = 0.0500), half a percent 598 (ln 0.05 / ln 0.995 = 597.6)."""
    assert inputs_needed(0.01) == 299 and inputs_needed(0.005) == 598
    for rate in (0.1, 0.01, 0.005, 0.001):
        n = inputs_needed(rate)
        assert upper_bound(0, n) <= rate < upper_bound(0, n - 1)


def test_acc_drop_is_exact_from_counts(case, tmp_path):
    # Labels = the original's predictions, so the drop is (#disagreements) / N exactly.
    lo, le = plain_logits(case["orig"], case["cx"]), plain_logits(case["edit"], case["cx"])
    y = lo.argmax(1).astype(np.int64)
    d = int((lo.argmax(1) != le.argmax(1)).sum())
    assert d > 0
    np.savez(tmp_path / "c.npz", x=case["cx"], y=y)
    at_limit = verify(case["orig"], case["edit"], tmp_path / "c.npz", thresholds={"max_acc_drop": d / 120})
    assert at_limit.passed, at_limit.failed_checks
    below = verify(case["orig"], case["edit"], tmp_path / "c.npz", thresholds={"max_acc_drop": (d - 1) / 120})
    assert not below.passed and below.failed_checks[0].startswith("max-acc-drop: ")


def test_gate_message_format():
    g = GateResult(name="max-acc-drop", value=0.03125, limit=0.01, op="<=", passed=False)
    assert g.message == "max-acc-drop: 0.0312 > 0.0100"
    g = GateResult(name="min-fix-rate", value=0.5, limit=0.8, op=">=", passed=False)
    assert g.message == "min-fix-rate: 0.5000 < 0.8000"
    # Differences below 4 decimals still show.
    g = GateResult(name="max-logit-change", value=1e-6, limit=1e-7, op="<=", passed=False)
    assert g.message == "max-logit-change: 1e-06 > 1e-07"


@pytest.mark.parametrize("kwargs, needle", [
    ({"thresholds": {"max_acc_drop": 5}}, "fraction in [0, 1]"),
    ({"thresholds": {"max_logit_change": -1}}, "max-logit-change"),
    ({"thresholds": {"bogus": 1}}, "unknown threshold"),
    ({"batch_size": 0}, "batch size"),
    ({"target": 1}, "needs corrupted inputs"),
    ({"provider": "tpu"}, "unknown provider"),
])
def test_library_rejects_bad_arguments(case, kwargs, needle):
    with pytest.raises(InputError) as info:
        verify(case["orig"], case["edit"], case["clean"], **kwargs)
    assert needle in info.value.one_line()
    assert info.value.exit_code == 2


def test_report_is_frozen(case):
    report = verify(case["orig"], case["edit"], case["clean"])
    with pytest.raises(Exception):
        report.passed_override = True  # type: ignore[attr-defined]
    with pytest.raises(Exception):
        report.clean.n = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------- helpers for reuse


def test_run_batched_fixed_batch_dims_match_dynamic(tmp_path, case):
    x = case["cx"][:10]
    dyn = ort_session(case["orig"])
    one = ort_session(gemm_model(tmp_path / "b1.onnx", W_ORIG, B, batch=1))
    four = ort_session(gemm_model(tmp_path / "b4.onnx", W_ORIG, B, batch=4))
    assert effective_batch_size(dyn, 256) == 256
    assert effective_batch_size(one, 256) == 1
    assert effective_batch_size(four, 256) == 4
    ref = plain_logits(case["orig"], x)
    seen = []
    out1 = run_batched(one, x, 256, on_batch=seen.append)
    assert seen == list(range(1, 11))  # one sample at a time
    np.testing.assert_allclose(out1, ref, rtol=1e-6, atol=1e-6)
    out4 = run_batched(four, x, 3)  # 10 rows in fixed batches of 4: last one padded
    assert out4.shape == (10, 3)
    np.testing.assert_allclose(out4, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run_batched(dyn, {"x": x}, 3), ref, rtol=1e-6, atol=1e-6)


def test_run_batched_all_outputs(tmp_path, case):
    sess = ort_session(gemm_model(tmp_path / "two.onnx", W_ORIG, B, two_outputs=True))
    x = case["cx"][:9]
    logits, probs = run_batched(sess, x, 4, all_outputs=True)
    np.testing.assert_allclose(logits, plain_logits(case["orig"], x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    (only_probs,) = run_batched(sess, x, 4, output_names=["probs"])
    np.testing.assert_allclose(only_probs, probs)
    # verify uses the first output (logits) of a multi-output model.
    report = verify(tmp_path / "two.onnx", case["edit"], case["clean"], batch_size=50)
    assert report.clean.acc_before == np.mean(plain_logits(case["orig"], case["cx"]).argmax(1) == case["cy"])


def test_verify_on_fixed_batch_one_model(tmp_path, case):
    one = gemm_model(tmp_path / "b1.onnx", W_ORIG, B, batch=1)
    a = verify(one, case["edit"], case["clean"], corrupt=case["corrupt"], target=TARGET)
    b = verify(case["orig"], case["edit"], case["clean"], corrupt=case["corrupt"], target=TARGET)
    assert a.clean.to_dict() == pytest.approx(b.clean.to_dict())
    assert a.corrupt.to_dict() == b.corrupt.to_dict()


def test_ort_session_errors_name_the_file(tmp_path):
    with pytest.raises(DynEditError) as info:
        ort_session(tmp_path / "nope.onnx")
    assert "nope.onnx" in info.value.one_line() and info.value.exit_code == 2


# ----------------------------------------------------------------------------- CLI


def test_cli_pass_exit_0(case):
    proc = dynedit(case["orig"], case["edit"], "--clean", case["clean"], "--corrupt", case["corrupt"],
                   "--target", TARGET, "--max-acc-drop", "0.0", "--min-fix-rate", "0.3",
                   "--max-logit-change", "100", "--max-asr", "0.5", "--batch-size", "1", check_rc=0)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "PASSED"
    assert any("before" in ln and "after" in ln and "change" in ln for ln in lines)
    assert any(ln.strip().startswith("attack success rate") for ln in lines)
    # 2 x 120 + 2 x 60 batches of 1, but stderr is not a terminal: no progress bar.
    assert proc.stderr == ""


def test_cli_output_shift_gate(case):
    proc = dynedit(case["orig"], case["edit"], "--clean", case["clean_nolabels"], "--max-output-shift", "0.0001",
                   check_rc=1)
    assert any(ln.strip().startswith("output shift (mean TV distance)") for ln in proc.stdout.splitlines())
    assert proc.stdout.strip().splitlines()[-1].startswith("FAILED: max-output-shift: ")
    dynedit(case["orig"], case["edit"], "--clean", case["clean_nolabels"], "--max-output-shift", "1", check_rc=0)


def test_cli_drop_bound_gate(case):
    """Too few clean inputs to vouch for the limit: exit 1, the FAILED line last, and the
    gate row says how many inputs would (1 - 0.05^(1/120) = 0.0247 > 0.01: 299)."""
    proc = dynedit(case["orig"], case["orig"], "--clean", case["clean_nolabels"], "--max-drop-bound", "0.01",
                   check_rc=1)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "FAILED: max-drop-bound: 0.0247 > 0.0100"
    assert any("FAILED (none of 120 turned; about 299 inputs with none turned would vouch for 0.0100)" in ln
               for ln in lines)
    dynedit(case["orig"], case["orig"], "--clean", case["clean_nolabels"], "--max-drop-bound", "0.03", check_rc=0)


def test_cli_no_gates_passes(case):
    proc = dynedit(case["orig"], case["edit"], "--clean", case["clean_nolabels"], check_rc=0)
    assert proc.stdout.strip().splitlines()[-1] == "PASSED"


def test_cli_fail_exit_1_names_the_checks(case):
    proc = dynedit(case["orig"], case["edit"], "--clean", case["clean"], "--corrupt", case["corrupt"],
                   "--max-logit-change", "0.001", "--min-fix-rate", "1", "--max-acc-drop", "0.5", check_rc=1)
    lines = proc.stdout.strip().splitlines()
    failed = [ln for ln in lines if ln.startswith("FAILED: ")]
    assert lines[-len(failed):] == failed  # the FAILED lines are the last lines
    assert [ln.split(":")[1].strip() for ln in failed] == ["min-fix-rate", "max-logit-change"]
    assert failed[-1].endswith("> 0.0010")
    assert "PASSED" not in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_json(case):
    proc = dynedit(case["orig"], case["edit"], "--clean", case["clean"], "--corrupt", case["corrupt"],
                   "--target", TARGET, "--min-fix-rate", "0.1", "--json", check_rc=0)
    data = json.loads(proc.stdout)  # only JSON on stdout
    assert {"acc_before", "acc_after", "agreement", "max_abs_logit_change", "mean_abs_logit_change",
            "n"} <= set(data["clean"])
    assert {"acc_before", "acc_after", "fix_rate", "asr_before", "asr_after", "n"} <= set(data["corrupt"])
    assert data["passed"] is True and data["failed_checks"] == []
    assert data["thresholds"]["min_fix_rate"] == 0.1 and data["thresholds"]["max_acc_drop"] is None
    assert data["provider"] == "cpu"
    assert data["clean"]["n"] == 120 and data["corrupt"]["n"] == 60
    lib = verify(case["orig"], case["edit"], case["clean"], corrupt=case["corrupt"], target=TARGET)
    assert data["clean"] == lib.to_dict()["clean"] and data["corrupt"] == lib.to_dict()["corrupt"]


def test_cli_json_failed_still_exit_1(case):
    proc = dynedit(case["orig"], case["edit"], "--clean", case["clean_nolabels"],
                   "--max-logit-change", "0.001", "--json", check_rc=1)
    data = json.loads(proc.stdout)
    assert data["corrupt"] is None
    assert data["passed"] is False
    assert len(data["failed_checks"]) == 1 and data["failed_checks"][0].startswith("max-logit-change: ")


def test_cli_missing_model(case):
    err = assert_one_line_error(dynedit(case["dir"] / "missing.onnx", case["edit"], "--clean", case["clean"]))
    assert "missing.onnx" in err and "does not exist" in err


def test_cli_not_onnx_and_truncated(case):
    junk = case["dir"] / "junk.onnx"
    junk.write_text("this is not a model\n")
    assert_one_line_error(dynedit(case["orig"], junk, "--clean", case["clean"]), "junk.onnx")
    data = case["orig"].read_bytes()
    cut = case["dir"] / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(dynedit(cut, case["edit"], "--clean", case["clean"]), "cut.onnx")


def test_cli_npz_wrong_keys_lists_found(case):
    bad = case["dir"] / "bad.npz"
    np.savez(bad, inputs=case["cx"], labels=case["cy"])
    err = assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", bad), "'x'")
    assert "found: inputs, labels" in err


def test_cli_corrupt_needs_labels(case):
    nolab = case["dir"] / "k.npz"
    np.savez(nolab, x=case["kx"])
    assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", case["clean"], "--corrupt", nolab),
                          "'y'", "found: x")


def test_cli_wrong_shape(case):
    bad = case["dir"] / "wide.npz"
    np.savez(bad, x=np.zeros((5, 5), np.float32))
    assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", bad), "(5, 5)", "'x'")


def test_cli_labels_out_of_range(case):
    bad = case["dir"] / "lab.npz"
    np.savez(bad, x=case["cx"][:4], y=np.array([0, 1, 2, 3]))
    assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", bad), "[0, 2]", "3 outputs")


def test_cli_target_out_of_range(case):
    assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", case["clean"], "--corrupt", case["corrupt"],
                                  "--target", "7"), "target class 7")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP is available here")
def test_cli_cuda_unavailable(case):
    assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", case["clean"], "--provider", "cuda"),
                          "CUDA execution provider not available", "--provider cpu")


@pytest.mark.parametrize("args, needle", [
    (["--max-acc-drop", "0.01"], "needs labels"),                       # clean has no y
    (["--min-fix-rate", "0.5"], "min-fix-rate needs corrupted inputs"),  # no --corrupt
    (["--max-asr", "0.1"], "max-asr needs corrupted inputs and a target"),
    (["--max-logit-change", "nan"], "max-logit-change"),
])
def test_cli_uncomputable_gate_is_usage_error(case, args, needle):
    assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", case["clean_nolabels"], *args), needle)


def test_cli_nothing_to_fix_is_usage_error(case):
    # Corrupt "labels" equal to the original's predictions: nothing wrong before.
    ko = plain_logits(case["orig"], case["kx"])
    easy = case["dir"] / "easy.npz"
    np.savez(easy, x=case["kx"], y=ko.argmax(1).astype(np.int64))
    assert_one_line_error(dynedit(case["orig"], case["edit"], "--clean", case["clean"], "--corrupt", easy,
                                  "--min-fix-rate", "0.5"), "nothing to fix")


# ----------------------------------------------------------------------------- without torch


BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys

    BLOCKED = {"torch", "torchvision", "onnx2torch"}

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
            return None

    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "torch already imported at startup"
    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("torch is still importable")

    from cli.main import main
    try:
        main(json.loads(sys.argv[1]))
        code = 0
    except SystemExit as exc:
        code = exc.code
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("RESULT " + json.dumps({"code": code, "loaded": loaded}))
""")


def test_verify_works_with_torch_unimportable(case):
    argv = ["verify", str(case["orig"]), str(case["edit"]), "--clean", str(case["clean"]),
            "--corrupt", str(case["corrupt"]), "--target", str(TARGET), "--min-fix-rate", "0.3", "--json"]
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, json.dumps(argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    result = json.loads(out[-1].removeprefix("RESULT "))
    assert result == {"code": 0, "loaded": []}
    report = json.loads("\n".join(out[:-1]))
    assert report["passed"] is True and report["corrupt"]["fix_rate"] > 0.3


def test_verify_modules_do_not_import_torch():
    code = ("import sys, cli.verify_cmd, onnx_dynedit.verify; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx2torch')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------- several inputs and --input-shape


def two_input_model(path: Path, w: np.ndarray) -> Path:
    """logits = (a + b) @ W: two float inputs a, b [N, 4] (the second with a symbolic width)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["logits"])],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def two_inputs(tmp_path):
    rng = np.random.default_rng(4)
    orig = two_input_model(tmp_path / "orig2.onnx", W_ORIG)
    edit = two_input_model(tmp_path / "edit2.onnx", W_EDIT)
    a, b = rng.normal(size=(40, 4)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    b[:, 3] = 3.0  # the trigger feature: the edit changes some predictions
    y = (a + b)[:, :3].argmax(1)
    np.savez(tmp_path / "two.npz", **{"x:a": a, "x:b": b, "y": y})
    return {"dir": tmp_path, "orig": orig, "edit": edit, "clean": tmp_path / "two.npz", "a": a, "b": b, "y": y}


def test_verify_several_inputs_match_numpy(two_inputs):
    c = two_inputs
    rep = verify(c["orig"], c["edit"], c["clean"])
    lo, le = (c["a"] + c["b"]) @ W_ORIG, (c["a"] + c["b"]) @ W_EDIT
    assert rep.clean.n == 40
    assert rep.clean.acc_before == pytest.approx(float((lo.argmax(1) == c["y"]).mean()))
    assert rep.clean.acc_after == pytest.approx(float((le.argmax(1) == c["y"]).mean()))
    assert rep.clean.agreement == pytest.approx(float((lo.argmax(1) == le.argmax(1)).mean()))
    assert 0 < rep.clean.agreement < 1
    proc = dynedit(c["orig"], c["edit"], "--clean", c["clean"], "--json", check_rc=0)
    assert json.loads(proc.stdout)["clean"]["agreement"] == pytest.approx(rep.clean.agreement)


def test_verify_several_inputs_errors_name_the_inputs(two_inputs):
    c = two_inputs
    plain = c["dir"] / "plain.npz"
    np.savez(plain, x=c["a"])
    assert_one_line_error(dynedit(c["orig"], c["edit"], "--clean", plain), "2 inputs (a, b)", "x:a")
    half = c["dir"] / "half.npz"
    np.savez(half, **{"x:a": c["a"]})
    assert_one_line_error(dynedit(c["orig"], c["edit"], "--clean", half), "a, b")


def test_verify_input_shape_checks_every_set(two_inputs):
    c = two_inputs
    dynedit(c["orig"], c["edit"], "--clean", c["clean"], "--input-shape", "b:1,4", check_rc=0)
    err = assert_one_line_error(dynedit(c["orig"], c["edit"], "--clean", c["clean"], "--input-shape", "b:1,5"),
                                "input 'b'", "axis 1")
    assert "--input-shape" not in err or "b:1,5" in err
    assert_one_line_error(dynedit(c["orig"], c["edit"], "--clean", c["clean"], "--input-shape", "c:1,4"),
                          "--input-shape", "'c'", "not an input")
    assert_one_line_error(dynedit(c["orig"], c["edit"], "--clean", c["clean"], "--input-shape", "a:1,5"),
                          "axis 1", "fixed at 4")
    with pytest.raises(InputError, match="input_shapes"):
        verify(c["orig"], c["edit"], c["clean"], input_shapes={"c": (1, 4)})


def test_large_model_proto_session_goes_through_a_file(monkeypatch):
    """A ModelProto above SESSION_VIA_FILE reaches ONNX Runtime through a temporary file
    (a session made from bytes keeps them for its lifetime): same outputs as from bytes,
    the temporary folder is gone afterwards."""
    import glob
    import tempfile as _tempfile

    from onnx import TensorProto, helper, numpy_helper

    from onnx_dynedit import sessions

    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 100
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.ones((2, 64), np.float32)
    via_bytes = sessions.ort_session(model).run(None, {"x": x})[0]
    monkeypatch.setattr(sessions, "SESSION_VIA_FILE", 1024)  # this 2 KB model counts as large
    before = set(glob.glob(f"{_tempfile.gettempdir()}/dynedit-ort-*"))
    via_file = sessions.ort_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(via_file, via_bytes)
    np.testing.assert_allclose(via_file, x @ w, rtol=1e-6)
    assert set(glob.glob(f"{_tempfile.gettempdir()}/dynedit-ort-*")) == before
    assert len(model.graph.initializer) == 1  # the proto itself is untouched
