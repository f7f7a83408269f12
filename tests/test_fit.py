"""The optimisers of onnx_dynedit.fit on problems whose answer is known on paper, and the
per-row u the Levenberg-Marquardt Jacobian relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnx_dynedit import fit
from onnx_dynedit.io import load_model
from onnx_dynedit.rectify import RectifyConfig, rectify
from onnx_dynedit.keys import layer_delta
from onnx_dynedit.twin import Twin

from test_rank_one import conv_model, dense_model, only_layer, W_SQ, BIAS

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "sample_models"


def _linear_problem(seed=0, n=6, k=3, c=4):
    """out(U)_i = A_i U_i + b_i: a linear least-squares problem with a closed-form answer."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, c, generator=g, dtype=torch.float64)
    b = torch.randn(n, k, generator=g, dtype=torch.float64)
    ref = torch.randn(n, k, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    problem = fit.LeastSquares(lambda u: torch.einsum("nkc,nc->nk", a.float(), u) + b.float(), ref.float(), w.float())
    # min_u sum_i w_i ||A_i u + b_i - ref_i||^2  ->  (sum w A^T A) u = sum w A^T (ref - b)
    lhs = torch.einsum("n,nkc,nkd->cd", w, a, a)
    rhs = torch.einsum("n,nkc,nk->c", w, a, ref - b)
    return problem, torch.linalg.solve(lhs, rhs)


def test_levenberg_marquardt_solves_a_linear_problem():
    problem, answer = _linear_problem()
    u, loss, passes = fit.levenberg_marquardt(problem, torch.zeros(4))
    np.testing.assert_allclose(u.numpy(), answer.numpy(), rtol=1e-4, atol=1e-4)
    assert loss == pytest.approx(problem.loss(answer.float()), rel=1e-5)
    assert passes <= 4 * (1 + 3)  # Gauss-Newton is exact on a linear problem: a couple of steps


def test_levenberg_marquardt_never_raises_the_loss():
    """A nonlinear problem (tanh of the linear one): the loss only falls from the start."""
    problem, _ = _linear_problem(seed=1)
    bent = fit.LeastSquares(lambda u: torch.tanh(problem.out(u)), problem.ref.clamp(-0.9, 0.9), problem.weight)
    start = torch.full((4,), 3.0)
    u, loss, _ = fit.levenberg_marquardt(bent, start)
    assert loss <= bent.loss(start)
    assert loss == pytest.approx(bent.loss(u), rel=1e-5)


def test_adam_and_lbfgs_reach_the_linear_answer():
    problem, answer = _linear_problem(seed=2)
    for method in ("adam", "lbfgs"):
        u = torch.zeros(4, requires_grad=True)

        def loss_fn():
            r = problem.out(u.unsqueeze(0).expand(6, -1)) - problem.ref
            return (r.pow(2).sum(1) * problem.weight).sum()

        if method == "adam":
            (best,), _ = fit.adam([u], loss_fn, steps=3000, lr=0.05)
        else:
            (best,), _ = fit.lbfgs([u], loss_fn, max_evals=100)
        np.testing.assert_allclose(best.numpy(), answer.numpy(), atol=2e-2, err_msg=method)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0])
def test_lbfgs_first_step_is_the_line_minimum_on_a_quadratic(scale):
    """On f(v) = c |A v - b|^2 the curvature probe is exact, so the first L-BFGS step lands
    on the minimum along -g: t* = |g|^2 / (g^T H g), H = 2 c A^T A, whatever c is (torch's
    own first step is min(1, 1/|g|_1) g, far short of it when c is small). Three
    evaluations: the start, the probe, the first step."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(24, 16, generator=gen, dtype=torch.float64) + 2 * torch.eye(24, 16, dtype=torch.float64)
    b = torch.randn(24, generator=gen, dtype=torch.float64)
    v = torch.full((16,), 0.5, dtype=torch.float64, requires_grad=True)
    calls = []

    def loss_fn():
        calls.append(1)
        return scale * (a @ v - b).pow(2).sum()

    v0 = v.detach().clone()
    g = 2 * scale * a.T @ (a @ v0 - b)
    t = float(g @ g) / float(g @ (2 * scale * a.T @ a) @ g)
    expected = scale * float((a @ (v0 - t * g) - b).pow(2).sum())
    (best,), loss = fit.lbfgs([v], loss_fn, max_evals=3)
    assert len(calls) == 3
    assert loss == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(best, v0 - t * g)


@pytest.mark.parametrize("kind", ["gemm", "conv"])
def test_per_row_u_is_the_shared_u_row_by_row(tmp_path, kind):
    """layer_delta with u [B, C_out] edits row i with u[i]: equal rows give the shared edit,
    and each row depends only on its own u."""
    if kind == "gemm":
        path = dense_model(tmp_path, "Gemm", W_SQ, BIAS, trans_b=1, alpha=1.0)
        x = torch.randn(3, 4)
    else:
        rng = np.random.default_rng(0)
        path = conv_model(tmp_path, rng.standard_normal((3, 2, 3, 3)), np.zeros(3))
        x = torch.randn(3, 2, 5, 5)
    layer = only_layer(Twin(load_model(path), "cpu"))
    d = torch.randn(layer.in_features)
    u = torch.randn(layer.out_features)
    shared = layer_delta(layer, x, u, d)
    rows = torch.stack([u, 2 * u, -u])
    per_row = layer_delta(layer, x, rows, d)
    for i, factor in enumerate((1, 2, -1)):
        torch.testing.assert_close(per_row[i], factor * shared[i])


def test_rectify_with_levenberg_marquardt_fixes_the_badnets_pair():
    """End to end on the sample: the lm fit repairs the pair, within the budget."""
    d = SAMPLES / "badnets"
    twin = Twin(load_model(d / "model.onnx"), "cpu")
    pairs, val = np.load(d / "pairs.npz"), np.load(d / "val.npz")
    result = rectify(twin, pairs["corrupt"], pairs["clean"], stats_x=np.load(d / "stats.npz")["x"],
                     val_x=val["x"], val_y=val["y"], config=RectifyConfig(fit_method="lm"))
    assert result.success and result.fixed_after == result.n_pairs
    assert result.degradation <= 0.01


def test_downstream_runner_rows_are_the_slices_of_the_whole_batch():
    """runner(rows) recomputes only those rows: the same values as the whole batch's slice."""
    from onnx_dynedit.twin import DownstreamRunner

    d = SAMPLES / "badnets"
    twin = Twin(load_model(d / "model.onnx"), "cpu")
    x = twin.to_tensor(np.load(d / "stats.npz")["x"][:10])
    layer = next(l for l in twin.layer_map.editable() if l.op == "Conv")
    runner = DownstreamRunner(twin, layer, x)
    with torch.no_grad():
        whole = runner()
        parts = torch.cat([runner(slice(0, 4)), runner(slice(4, 10))])
    assert runner.n_rows == 10
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        direct = twin.forward(x)
    torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-5)
    # recorded 3 rows per pass (the last pass 1 row): the same cached frontier and outputs
    chunked = DownstreamRunner(twin, layer, x, rows=3)
    with torch.no_grad():
        torch.testing.assert_close(chunked(), whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked(slice(4, 10)), whole[4:10], rtol=1e-5, atol=1e-5)


def test_capture_rows_in_passes_is_the_capture_in_one_pass(monkeypatch):
    """Twin.capture_rows gathers the captures of several passes into the tensors one
    pass gives (what pair_keys reads)."""
    import onnx_dynedit.twin as twin_module

    d = SAMPLES / "badnets"
    twin = Twin(load_model(d / "model.onnx"), "cpu")
    x = np.load(d / "stats.npz")["x"][:7]
    layers = list(twin.layer_map.editable())[:3]
    whole = twin.capture_rows(layers, x)
    monkeypatch.setattr(twin_module, "RUN_BUDGET", twin._row_bytes * 2)  # two rows a pass
    assert twin.pass_rows(x) == 2
    parts = twin.capture_rows(layers, x)
    for layer in layers:
        for a, b in zip(parts[layer.node], whole[layer.node]):
            assert a.shape == b.shape and a.shape[0] == 7
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # batch size moves float32 rounding


def test_chunked_output_fit_is_the_unchunked_fit(monkeypatch):
    """The output fit with its activations in chunks of 3 inputs (gradients accumulated)
    makes the same edit as the fit in one pass."""
    import onnx_dynedit.criteria as criteria_module

    d = SAMPLES / "badnets"
    twin = Twin(load_model(d / "model.onnx"), "cpu")
    pairs, val = np.load(d / "pairs.npz"), np.load(d / "val.npz")
    args = dict(stats_x=np.load(d / "stats.npz")["x"], val_x=val["x"], val_y=val["y"],
                config=RectifyConfig(max_edits=1, fit_steps=60, fit_method="adam"))  # "auto": L-BFGS when chunked
    whole = rectify(twin, pairs["corrupt"], pairs["clean"], **args)
    monkeypatch.setattr(criteria_module, "FIT_BUDGET", 1)  # one input per pass
    chunks = []
    real = criteria_module.OutputGap._fit_chunk
    monkeypatch.setattr(criteria_module.OutputGap, "_fit_chunk",
                        lambda self, *a: chunks.append(real(self, *a)) or chunks[-1])
    chunked = rectify(twin, pairs["corrupt"], pairs["clean"], **args)
    assert chunks and set(chunks) == {1}  # every fit ran one input per pass
    assert [e.layer.node for e in chunked.edits] == [e.layer.node for e in whole.edits]
    np.testing.assert_allclose(chunked.edits[0].u, whole.edits[0].u, rtol=1e-3, atol=1e-4 * np.abs(whole.edits[0].u).max())
    assert chunked.gap_after == pytest.approx(whole.gap_after, abs=1e-4)


def test_twin_run_batches_within_its_activation_budget(monkeypatch):
    """Twin.run's default batch keeps the activations within RUN_BUDGET; the logits do
    not depend on the batch."""
    import onnx_dynedit.twin as twin_module

    d = SAMPLES / "badnets"
    twin = Twin(load_model(d / "model.onnx"), "cpu")
    x = np.load(d / "stats.npz")["x"][:20]
    whole = twin.run(x)
    assert twin.pass_rows(x) == twin_module.RUN_MAX_BATCH  # a 16x16 CNN: everything at once
    monkeypatch.setattr(twin_module, "RUN_BUDGET", twin._row_bytes * 3)  # three rows a pass
    assert twin.pass_rows(x) == 3
    np.testing.assert_allclose(twin.run(x), whole, rtol=1e-5, atol=1e-5)


def test_twin_run_passes_keep_each_output_under_the_mmap_threshold(monkeypatch):
    """A pass's largest module output stays under PASS_BLOCK (glibc's mmap threshold, less
    a margin), so its blocks come from malloc's heap; the logits do not depend on it."""
    import onnx_dynedit.twin as twin_module

    d = SAMPLES / "badnets"
    twin = Twin(load_model(d / "model.onnx"), "cpu")
    x = np.load(d / "stats.npz")["x"][:20]
    whole = twin.run(x)
    largest = twin._row_bytes // 3  # the largest module output of one row
    assert twin_module.PASS_BLOCK < twin_module.MMAP_THRESHOLD
    monkeypatch.setattr(twin_module, "PASS_BLOCK", 4 * largest + 1)  # four rows' outputs fit under it
    assert twin.pass_rows(x) == 4
    np.testing.assert_allclose(twin.run(x), whole, rtol=1e-5, atol=1e-5)


def test_lbfgs_returns_the_start_when_the_loss_is_not_finite():
    v = torch.ones(3, requires_grad=True)
    calls = []

    def loss_fn():
        calls.append(1)
        return (v * float("nan")).sum()

    (best,), loss = fit.lbfgs([v], loss_fn, max_evals=10)
    assert len(calls) == 1 and loss == float("inf")
    torch.testing.assert_close(best, torch.ones(3))


def test_lbfgs_with_two_evaluations_still_steps():
    """A cap of 2 evaluations (benchmarks' --fit-steps 2) has no room for the probe: torch's
    own first step is taken, and it lowers the loss."""
    v = torch.zeros(4, requires_grad=True)
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    calls = []

    def loss_fn():
        calls.append(1)
        return (v - target).pow(2).sum()

    (best,), loss = fit.lbfgs([v], loss_fn, max_evals=2)
    assert len(calls) == 2 and loss < float(target.pow(2).sum())
