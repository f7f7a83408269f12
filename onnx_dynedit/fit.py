"""Optimisers for the factors of a rank-one edit: Adam, L-BFGS and Levenberg-Marquardt.

The output fit of u (d fixed) is a small nonlinear least-squares problem: u has C_out
numbers and the residuals are the logits of a few dozen inputs. Levenberg-Marquardt uses
that structure: one forward pass and one backward pass per output class give the exact
Jacobian of every residual with respect to u, and a damped Gauss-Newton step solves the
C_out x C_out normal equations. It converges in a handful of iterations where Adam takes
hundreds of steps (see docs/results.md's speed section); Adam stays for the attribution fit
(IG inside the loss) and for heads with many classes (one backward pass per class).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

STALL_STEPS = 30        # Adam stops when the loss has not improved by STALL_REL for this many steps
STALL_REL = 1e-3
CONVERGED_LOSS = 1e-5   # normalised losses below this are a perfect fit: stop
LBFGS_HISTORY = 10      # u has C_out numbers; a short curvature history is enough
LBFGS_TOL_GRAD = 1e-7   # on the normalised loss: the fit has converged
LBFGS_TOL_CHANGE = 1e-9
PROBE_STEP = 1e-3       # L-BFGS's curvature probe: a step of this share of |u| along -g
LM_MAX_OUTPUTS = 64     # one backward pass per output class: wider heads are fitted with Adam
LM_ITERATIONS = 20      # Gauss-Newton steps (each: one Jacobian, one or a few trial passes)
LM_DAMPING = 1e-3       # initial damping, relative to the diagonal of J^T W J (Marquardt's scaling)
LM_TOL = 1e-4           # stop when an accepted step lowers the loss by less than this share
LM_TRIES = 8            # damping increases (x LM_UP) before giving up on a step
LM_UP, LM_DOWN = 4.0, 3.0
LM_MIN_DAMPING = 1e-12  # the damping never falls below this (J^T W J may be singular)
U_SCALE_FLOOR = 1e-3    # Adam's unit for u when the closed form is zero


def adam(params: list[torch.Tensor], loss_fn, steps: int, lr: float) -> tuple[list[torch.Tensor], float]:
    """Minimise ``loss_fn()`` with Adam; keep the best iterate; stop early when the loss
    has converged or stalled. ``loss_fn`` returns the loss as a tensor to differentiate,
    or as a float when it has accumulated the gradients itself (a loss summed chunk by
    chunk). Returns (best params, detached; best loss)."""
    opt = torch.optim.Adam(params, lr=lr)
    best = (float("inf"), [p.detach().clone() for p in params])
    since_best = 0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_val = _value_and_grad(loss_fn)
        since_best = 0 if loss_val < best[0] * (1 - STALL_REL) else since_best + 1
        if loss_val < best[0]:
            best = (loss_val, [p.detach().clone() for p in params])
        if loss_val < CONVERGED_LOSS or since_best >= STALL_STEPS:
            break
        opt.step()
    return best[1], best[0]


def lbfgs(params: list[torch.Tensor], loss_fn, max_evals: int) -> tuple[list[torch.Tensor], float]:
    """Minimise ``loss_fn()`` over one tensor with L-BFGS (strong Wolfe line search), at
    most ``max_evals`` evaluations; keep the best iterate.

    torch's L-BFGS takes its first step along -g as min(1, 1/|g|_1) g and lets the line
    search grow it at most 10x per evaluation: on the output fit's normalised loss
    that first step is 1e-4 of what is needed, and 5 of 25 evaluations went on growing it.
    Here a second evaluation a short way along -g gives the curvature there (from the two
    gradients, ``_first_step_scale``), and the fit runs in rescaled coordinates w = v / s,
    chosen so that torch's first step is the line minimum of that quadratic model.
    L-BFGS's later steps do not depend on a uniform rescaling; its gradient tolerance is
    rescaled with it. Where torch's first step was already about right, the probe costs
    one evaluation; with fewer than 3 evaluations there is no probe (torch's own steps)."""
    (v,) = params
    best = [float("inf"), v.detach().clone()]

    def evaluate(at: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            v.copy_(at)
        v.grad = None
        value = _value_and_grad(loss_fn)
        if value < best[0]:
            best[0], best[1] = value, v.detach().clone()
        return value, torch.zeros_like(v) if v.grad is None else v.grad.detach().clone()

    v0 = v.detach().clone()
    f0, g0 = evaluate(v0)
    # nothing to search from: a non-finite start, or converged as torch's first tests would
    # find in the original coordinates (the gradient, the first step's slope -|g|^2)
    if (max_evals < 2 or not (math.isfinite(f0) and bool(torch.isfinite(g0).all()))
            or float(g0.abs().max()) <= LBFGS_TOL_GRAD or float(g0.pow(2).sum()) <= LBFGS_TOL_CHANGE):
        return [best[1]], best[0]
    scale = _first_step_scale(evaluate, v0, g0) if max_evals >= 3 else 1.0
    w = (v0 / scale).requires_grad_(True)
    cached = [f0, g0]
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_evals, max_eval=max_evals - 1, history_size=LBFGS_HISTORY,
                            tolerance_grad=LBFGS_TOL_GRAD * scale, tolerance_change=LBFGS_TOL_CHANGE,
                            line_search_fn="strong_wolfe")

    def closure():
        if cached:  # L-BFGS's first evaluation is at v0, already evaluated
            value, g = cached
            cached.clear()
        else:
            value, g = evaluate(w.detach() * scale)
        w.grad = g * scale
        return torch.tensor(value)

    opt.step(closure)
    with torch.no_grad():
        v.copy_(best[1])
    return [best[1]], best[0]


def _first_step_scale(evaluate, v0: torch.Tensor, g0: torch.Tensor) -> float:
    """The rescaling s (w = v / s) that makes torch's first L-BFGS step along -g0 the
    length t* |g0| with t* = |g0|^2 / (g0 . H g0), the curvature along g0 from the
    gradient a short way along it (PROBE_STEP of |v0|). torch's first step in w is
    min(1, 1/|g_w|_1) g_w with g_w = s g0, i.e. s^2 min(1, 1/(s |g0|_1)) g0 in v."""
    gn, g1n = float(g0.norm()), float(g0.abs().sum())
    eps = PROBE_STEP * max(float(v0.norm()), 1.0) / gn
    _, g1 = evaluate(v0 - eps * g0)
    curvature = float(g0.flatten().dot((g0 - g1).flatten())) / eps
    t = gn * gn / curvature if curvature > 0 else eps
    return t * g1n if t * g1n * g1n >= 1.0 else t ** 0.5


def u_scale(u0: torch.Tensor) -> float:
    """Adam fits u / scale so that its step size (lr) is relative to the closed form's size."""
    return float(u0.norm()) / max(1.0, u0.numel() ** 0.5) or U_SCALE_FLOOR


def _value_and_grad(loss_fn) -> float:
    """Call ``loss_fn``; differentiate what it returns unless it did so itself (a float)."""
    loss = loss_fn()
    if torch.is_tensor(loss):
        loss.backward()
        return float(loss.detach())
    return float(loss)


@dataclass(frozen=True)
class LeastSquares:
    """min_u sum_rows w_row * ||out(u)_row - ref_row||^2 with ``out(U)`` the network output
    [N, K] when input row i is edited with u = U[i] (U: [N, C_out]; the rows share one u
    in the fit, the per-row copy is what gives per-row Jacobians in one backward pass)."""

    out: Callable[[torch.Tensor], torch.Tensor]
    ref: torch.Tensor        # [N, K]
    weight: torch.Tensor     # [N], the weight of each row's squared error

    def loss(self, u: torch.Tensor) -> float:
        with torch.no_grad():
            r = self.out(u.unsqueeze(0).expand(self.ref.shape[0], -1)).double() - self.ref.double()
        return float((r.pow(2).sum(1) * self.weight).sum())

    def linearise(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(J^T W J, J^T W r, loss) at u, float64."""
        n, k = self.ref.shape
        rows = u.detach().unsqueeze(0).expand(n, -1).clone().requires_grad_(True)
        out = self.out(rows)
        if out.shape != self.ref.shape:
            raise RuntimeError(f"output shape {tuple(out.shape)} is not {tuple(self.ref.shape)}")
        jac = torch.empty(n, k, u.numel(), dtype=torch.float64, device=u.device)
        for c in range(k):
            (g,) = torch.autograd.grad(out[:, c].sum(), rows, retain_graph=c < k - 1)
            jac[:, c] = g.double()
        r = out.detach().double() - self.ref.double()
        w = self.weight.double()
        jtj = torch.einsum("nkc,n,nkd->cd", jac, w, jac)
        jtr = torch.einsum("nkc,n,nk->c", jac, w, r)
        return jtj, jtr, float((r.pow(2).sum(1) * w).sum())


def levenberg_marquardt(problem: LeastSquares, u0: torch.Tensor, *, iterations: int = LM_ITERATIONS,
                        tol: float = LM_TOL) -> tuple[torch.Tensor, float, int]:
    """Damped Gauss-Newton from ``u0``. Returns (u, loss, passes): every loss is a forward
    pass, every Jacobian one forward and K backward passes (counted as 1 + K)."""
    u = u0.detach().double().clone()
    mu, passes = LM_DAMPING, 0
    jtj, jtr, loss = problem.linearise(u.float())
    passes += 1 + problem.ref.shape[1]
    for _ in range(iterations):
        if loss < CONVERGED_LOSS:
            break
        diag = torch.diagonal(jtj).clamp_min(1e-12 * float(torch.diagonal(jtj).mean()) + 1e-300)
        for _ in range(LM_TRIES):
            step = torch.linalg.solve(jtj + torch.diag(mu * diag), -jtr)
            trial = problem.loss((u + step).float())
            passes += 1
            if trial < loss:
                break
            mu *= LM_UP
        else:
            break  # no damping gives a smaller loss: a (local) minimum
        gain = (loss - trial) / max(loss, 1e-300)
        u, mu = u + step, max(mu / LM_DOWN, LM_MIN_DAMPING)
        if gain < tol:
            loss = trial
            break
        jtj, jtr, loss = problem.linearise(u.float())
        passes += 1 + problem.ref.shape[1]
    return u.float(), loss, passes
