"""Criteria: what "the corrupted input behaves like its clean twin" means, how a rank-one
edit is fitted for it, and which trial the loop keeps (``Criterion``; each has gap / fit /
improves / pick). The loop itself is rectify.py.

  "output" (the paper's setting: a Trojan or spurious feature changes the prediction):
    gap = mean total-variation distance between the softmax on x~ and the shipped model's
    softmax on x; "fixed" = same top-1 as the shipped model on x. u is fitted so the
    network output on x~ matches the shipped output on x while outputs on unlabeled clean
    inputs stay put (or the layer-local closed form, ``objective="local"``). A trial passes
    when it fixes more of the given pairs (or as many, with a smaller gap over every pair)
    within budget. With check pairs (``check_pairs``: the corruption transplanted onto
    stats inputs that neither the locality term nor the synthetic pairs use) every
    candidate is fitted and the passing one with the smallest mean gap on the check pairs
    (then the most fixed) is kept: a repair must hold on inputs the fit never saw. Every
    editable layer is then a candidate, best localised first (``check_candidates`` bounds
    it; on a model with more than ``screen_above`` candidates each is first fitted briefly
    and only the ``screen_keep`` best on the check pairs are fitted fully). Past the
    target, while the check pairs' gap exceeds ``check_target``, the loop goes on
    ("polishing"): an edit is kept only when it cuts that gap by POLISH_GAIN with no fewer
    check pairs fixed (on rebuilds of the Trojan samples with other seeds it fixed what
    one edit left: bench_seeds.py).
    No check pairs (no stats, ``check_pairs=0``, or one widely changed pair whose
    transplant is the additive guess): the first of the ``candidates_per_step`` best
    localised layers that passes.
  "attribution" (feature leakage: x~ and x already get the same prediction, but the
    attribution leans on a region that should not matter): gap = mean share of input
    attribution on the region where x~ differs from x, in excess of the clean twin's share.
    u and the whitened key a (d = C^-1 R a, starting at the paper's k*) are fitted together.
    Every candidate is fitted and the one with the smallest gap is kept, provided every
    given pair keeps its clean twin's class.
  "auto" (default; rectify's plan) picks "attribution" when every given pair already
  behaves like its clean twin by the output gap, "output" otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import fit as fitting
from .attribution import input_attribution, region_shares
from .degradation import recorded_logits, recording_bytes
from .layers import Layer
from .rank_one import ACTIVATION_BUDGET, Direction, TorchEdit, activation_sizes
from .twin import DownstreamRunner, Twin, batch_size_of, cat_inputs

if TYPE_CHECKING:
    from .rectify import Plan, RectifyConfig, Trial

log = logging.getLogger(__name__)

GAP_EPS = 1e-6          # a gap must fall by more than this to count as smaller (float noise)
FIT_BUDGET = 2 * ACTIVATION_BUDGET  # bytes of activations one forward/backward pass of the output fit keeps
LBFGS_ABOVE = 4 * ACTIVATION_BUDGET  # fit_method "auto": L-BFGS when the fit's inputs' activations exceed this
SHARED_FIT_BUDGET = ACTIVATION_BUDGET  # bytes of upstream values one recording for a round's fits may keep
NORM_FLOOR = 1e-8       # mean squares the fit losses are divided by never fall below this (all-zero logits)
SHARE_FLOOR = 1e-12     # denominators of attribution shares (an all-zero attribution)
POLISH_GAIN = 0.3       # past the target, an edit must cut the check pairs' gap by this share (bench_seeds.py)


@dataclass(frozen=True)
class Score:
    """The criterion's reading of the current model on the pairs."""

    gap: float          # over every pair (given + synthetic)
    fixed: int
    real_gap: float     # over the given pairs only
    real_fixed: int
    check_gap: float = float("nan")   # over the check pairs (synthetic, held out from the fit)
    check_fixed: int = 0
    check_count: int = 0              # check pairs scored (a screening trial scores the first screen_check)
    real_unfixed: tuple[int, ...] = ()  # the given pairs not fixed: their rows in the pairs given



@dataclass(frozen=True)
class Fitted:
    u: torch.Tensor              # float32
    d: torch.Tensor              # float32
    loss: float | None
    view: str = "patch"


@dataclass(frozen=True)
class Shipped:
    """The shipped model's outputs (logits, float64) already computed on the plan's inputs:
    ``fit`` on plan.fit_x (the key statistics' passes), ``reference`` on the degradation
    check's inputs (``Degradation.base_logits``); None where not."""

    fit: np.ndarray | None = None
    reference: np.ndarray | None = None


class Criterion:
    """What "the corrupted input behaves like its clean twin" means, and how to fit for it."""

    name = ""
    try_all = False  # fit every candidate and keep the best (else the first that improves)

    def __init__(self, twin: Twin, plan: Plan, cfg: RectifyConfig, shipped: Shipped | None = None):
        self.twin, self.cfg, self.n_real = twin, cfg, plan.n_real
        self.candidates, self.x1, self._input_bytes = plan.candidates, plan.corrupt[:1], None
        self.corrupt, self.n = plan.corrupt, len(plan.corrupt)
        target = torch.as_tensor(twin.run(plan.clean))  # the shipped model on the clean twins (float64 of float32)
        self.target_p = torch.softmax(target, 1)
        self.target_cls = self.target_p.argmax(1)
        with torch.no_grad():
            self.corrupt_t = twin.to_tensor(plan.corrupt)
            self.target_logits = target.float().to(twin.device)
            self.loc_x = twin.to_tensor(plan.fit_x[: cfg.locality_batch])
            self.loc_ref = _shipped_on_fit(twin, plan, self.loc_x, cfg.locality_batch, shipped or Shipped())
        self.check = plan.check_corrupt if plan.check_corrupt is not None and len(plan.check_corrupt) else None
        self.static = plan.static
        self._shared: dict | None = None  # ``recording``'s layers and runner while it lasts
        self.check_p = None
        if self.check is not None:  # the shipped model on the check pairs' clean sides
            logits = _shipped_on_check(twin, plan, shipped or Shipped(), cfg.locality_batch)
            self.check_p = torch.softmax(torch.as_tensor(logits), 1)

    @property
    def target(self) -> float:
        raise NotImplementedError

    def screens(self, n_options: int) -> bool:
        return False

    def reached(self, s: Score) -> bool:
        """Every pair fixed, and the gap within the target over all pairs and over the given
        ones alone: what ``RectifyResult.success`` reads, so that the loop does not stop at
        a state the result calls failed (before the sixteenth session only the first two)."""
        return s.fixed == self.n and s.gap <= self.target and s.real_gap <= self.target

    def done(self, s: Score) -> bool:
        """The loop stops here: the target reached (and, past it, ``polishing`` over)."""
        return self.reached(s) and not self.polishing(s)

    def polishing(self, s: Score) -> bool:
        return False

    def _check_set(self, n_check: int | None):
        """(the check pairs' corrupted sides, the shipped model's outputs on their clean
        sides): the first ``n_check`` (a screening trial) or all; (None, None) without."""
        if self.check is None or n_check is None:
            return self.check, self.check_p
        return self.check[:n_check], self.check_p[:n_check]

    def score(self, edits, n_check: int | None = None) -> Score:
        """``n_check``: score only the first this many check pairs (a screening trial)."""
        check, check_p = self._check_set(n_check)
        with self.twin.applied(edits):
            logits = self.twin.run(self.corrupt)
            check_logits = None if check is None else self.twin.run(check)
        return self._score(logits, check_logits, check_p, edits)

    def start(self) -> Score:
        """The shipped model's score, on the pairs alone: a state's check pairs are read only
        once it reaches the target (``polishing``), so they are scored too only when the
        shipped model already does (real size: 168 check inputs, 4.5 s of a 125 s repair)."""
        s = self._score(self.twin.run(self.corrupt), None, None, [])
        return self.score([]) if self.check is not None and self.reached(s) else s

    def scores(self, prev: list[TorchEdit], trials: list[TorchEdit], n_check: int | None = None) -> list[Score]:
        """``score(prev + [t], n_check)`` of every trial ``t``, with less work: each trial
        recomputes only what follows its layer (``recorded_logits``). A model with several
        inputs: each trial runs whole."""
        check, check_p = self._check_set(n_check)
        x = self.corrupt if check is None else np.concatenate([self.corrupt, check])
        logits = recorded_logits(self.twin, prev, trials, x)
        if logits is None:
            return [self.score(prev + [t], n_check) for t in trials]
        n = self.n
        return [self._score(a[:n], None if check is None else a[n:], check_p, prev + [t])
                for a, t in zip(logits, trials)]

    def _score(self, logits: np.ndarray, check_logits: np.ndarray | None, check_p, edits) -> Score:
        p = torch.softmax(torch.as_tensor(logits), 1)
        q = None if check_logits is None else torch.softmax(torch.as_tensor(check_logits), 1)
        ok = p.argmax(1) == self.target_cls
        per_pair = self.per_pair_gap(p, edits)
        r = self.n_real
        check = {} if q is None else {"check_gap": float((0.5 * (q - check_p).abs().sum(1)).mean()),
                                      "check_fixed": int((q.argmax(1) == check_p.argmax(1)).sum()),
                                      "check_count": len(q)}
        return Score(gap=float(per_pair.mean()), fixed=int(ok.sum()), real_gap=float(per_pair[:r].mean()),
                     real_fixed=int(ok[:r].sum()), real_unfixed=tuple(np.flatnonzero(~ok[:r].cpu().numpy()).tolist()),
                     **check)

    def per_pair_gap(self, p: torch.Tensor, edits) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def recording(self, prev: list[TorchEdit], layers: list[Layer]):
        """Within it, the output fits of ``layers`` on top of ``prev`` read one recording of
        the values upstream of them (made at the first fit that needs it), each recomputing
        what follows its own layer: the same values as a recording per fit (a round's kept
        candidates: one pass of the fit's inputs instead of three)."""
        self._shared = {"prev": prev, "layers": {layer.node: layer for layer in layers}, "runner": None}
        try:
            yield
        finally:
            self._shared = None

    def _fit_runner(self, layer: Layer, prev: list[TorchEdit], xs) -> DownstreamRunner:
        """The fit's ``DownstreamRunner``: ``recording``'s when it covers ``layer`` and its
        values fit SHARED_FIT_BUDGET (one-input models; else one recording per fit, freed
        with it)."""
        shared = self._shared
        covered = shared is not None and shared["prev"] is prev and layer.node in shared["layers"]
        if covered and shared["runner"] is None:
            shared["runner"] = self._shared_runner(list(shared["layers"].values()), prev, xs) or False
        if covered and shared["runner"]:
            return shared["runner"]
        with self.twin.applied(prev):
            # upstream of the layer stays cached; recorded a few rows per pass (Twin.run's budget)
            return DownstreamRunner(self.twin, layer, xs, rows=self.twin.pass_rows(self.x1))

    def _shared_runner(self, layers: list[Layer], prev: list[TorchEdit], xs) -> DownstreamRunner | None:
        """One recording for ``layers``' fits, or None (several inputs, or over the budget)."""
        if isinstance(xs, tuple):
            return None
        if recording_bytes(self.twin, prev, layers, self.x1) * batch_size_of(xs) > SHARED_FIT_BUDGET:
            return None
        with self.twin.applied(prev):
            return DownstreamRunner(self.twin, layers, xs, rows=self.twin.pass_rows(self.x1))

    def fit(self, layer: Layer, direction: Direction, factor: Callable[[], torch.Tensor], prev: list[TorchEdit],
            steps: int | None = None, method: str | None = None) -> Fitted:
        """``factor()``: the layer's Cholesky factor R of C (read on demand: it may be on
        disk, factors.py); ``steps``: Adam steps of the output fit when not ``fit_steps``
        (a screening fit; 0: the closed form); ``method``: the output fit's method when not
        ``fit_method``."""
        raise NotImplementedError

    def improves(self, before: Score, after: Score) -> str | None:
        """None when ``after`` is better than ``before``; else why not."""
        raise NotImplementedError

    def pick(self, passing: list["Trial"]) -> "Trial | None":
        raise NotImplementedError


class OutputGap(Criterion):
    name = "output"

    @property
    def try_all(self) -> bool:
        # with check pairs every candidate is fitted: the one that generalises best is kept
        # (static mode edits the given layers in turn, as before)
        return self.check is not None and not self.static

    def polishing(self, s: Score) -> bool:
        """Past the target, the check pairs (never fitted) still differ from their clean
        sides by more than ``check_target``: the loop goes on while an edit improves them."""
        return self.try_all and s.check_count > 0 and s.check_gap > self.cfg.check_target

    @property
    def target(self) -> float:
        return self.cfg.target_gap

    def per_pair_gap(self, p, edits):
        return 0.5 * (p - self.target_p).abs().sum(1)

    def fit(self, layer, direction, factor, prev, steps=None, method=None):
        d, view = direction.d.float(), direction.view
        if self.cfg.objective in ("local", "erase") or steps == 0:  # 0 steps: a closed-form screen
            return Fitted(direction.u_local.float(), d, None, view)
        if self.cfg.objective != "output":
            raise ValueError(f"unknown objective {self.cfg.objective!r}")
        u, loss = self._fit_output(layer, d, direction.u_local, prev, steps or self.cfg.fit_steps, view, method)
        return Fitted(u, d, loss, view)

    def screens(self, n_options: int) -> bool:
        """A cheap u per candidate (``screen``: the closed form, or ``screen_steps`` Adam
        steps) first picks which candidates get the full fit: with check pairs deciding
        among more than ``screen_above`` (and ``screen_keep``) candidates."""
        cfg = self.cfg
        if cfg.screen == "closed":
            cheap = True
        else:
            cheap = (cfg.screen == "adam" and cfg.fit_method in ("adam", "auto")
                     and 0 < cfg.screen_steps < cfg.fit_steps)
        return (self.try_all and cfg.objective == "output" and cheap
                and n_options > max(cfg.screen_keep, cfg.screen_above))

    @property
    def screen_steps(self) -> int:
        """Adam steps of a screening fit (0: the closed form)."""
        return 0 if self.cfg.screen == "closed" else self.cfg.screen_steps

    def _fit_output(self, layer, d, u0, prev, steps: int, view: str = "patch",
                    method: str | None = None) -> tuple[torch.Tensor, float]:
        """u (d fixed) so the network output on x~ matches the shipped output on x while
        outputs on unlabeled clean inputs stay put."""
        xs = cat_inputs(self.corrupt_t, self.loc_x)  # tensors, or tuples of them for several inputs
        n, m = batch_size_of(self.corrupt_t), batch_size_of(self.loc_x)
        runner = self._fit_runner(layer, prev, xs)

        def out(u, rows=None):
            with self.twin.applied(prev + [TorchEdit(layer, u, d, view)]):
                return runner(rows, layer=layer)

        method = method or self.cfg.fit_method
        if method == "auto":  # real-size inputs (fitted in chunks): L-BFGS's 25 passes, not Adam's 200
            method = "lbfgs" if self._fit_chunk(LBFGS_ABOVE) < n + m else "adam"
        if method == "lm" and self.target_logits.shape[-1] > fitting.LM_MAX_OUTPUTS:
            method = "adam"  # one backward pass per class would cost more than Adam's steps
        if method == "lm":
            try:
                return self._fit_lm(out, u0, n, m)
            except RuntimeError as err:  # an output or layer the per-row trick does not fit: Adam
                log.info("layer %s: Levenberg-Marquardt fit not possible (%s); fitting with Adam", layer.node, err)
                method = "adam"
        scale = fitting.u_scale(u0)
        v = (u0 / scale).float().clone().requires_grad_(True)
        loss_fn = self._output_loss(lambda rows: out(v * scale, rows), n, m)
        if method == "lbfgs":
            (best_v,), loss = fitting.lbfgs([v], loss_fn, self.cfg.lbfgs_evals)
        elif method == "adam":
            (best_v,), loss = fitting.adam([v], loss_fn, steps, self.cfg.fit_lr)
        else:
            raise ValueError(f"unknown fit method {method!r}")
        return (best_v * scale).float(), loss

    def _output_loss(self, out_rows, n: int, m: int):
        """The output fit's loss: mean squared logit error on the pairs (to the shipped
        outputs on the clean twins) + locality_weight x the same on the locality inputs,
        each relative to its mean square. In one pass when the kept activations fit
        FIT_BUDGET, else chunk by chunk, each chunk's gradient accumulated (the same sum;
        ``loss_fn`` then returns a float, see fit.adam)."""
        t_norm = self.target_logits.pow(2).mean().clamp_min(NORM_FLOOR)
        l_norm = self.loc_ref.pow(2).mean().clamp_min(NORM_FLOOR)
        total = n + m
        chunk = self._fit_chunk()
        if chunk >= total:
            def loss_fn():
                o = out_rows(None)
                loss = F.mse_loss(o[:n], self.target_logits) / t_norm
                if m:
                    loss = loss + self.cfg.locality_weight * F.mse_loss(o[n:], self.loc_ref) / l_norm
                return loss

            return loss_fn
        ref, weight = self._rows(n, m)

        def chunked() -> float:
            value = 0.0
            for lo in range(0, total, chunk):
                rows = slice(lo, min(lo + chunk, total))
                part = ((out_rows(rows) - ref[rows]).pow(2).sum(1) * weight[rows]).sum()
                part.backward()
                value += float(part.detach())
            return value

        return chunked

    def _rows(self, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The output fit's loss as weighted least squares over rows: the reference logits
        [n + m, K] (shipped outputs on the clean twins, then on the locality inputs) and
        each row's weight, so that sum_rows w ||out - ref||^2 is the two relative mean
        squares of ``_output_loss``."""
        k = self.target_logits.shape[-1]
        t_norm = float(self.target_logits.pow(2).mean().clamp_min(NORM_FLOOR))
        l_norm = float(self.loc_ref.pow(2).mean().clamp_min(NORM_FLOOR))
        weight = torch.cat([torch.full((n,), 1.0 / (t_norm * n * k)),
                            torch.full((m,), self.cfg.locality_weight / (l_norm * max(m, 1) * k))])
        return torch.cat([self.target_logits, self.loc_ref]), weight.to(self.target_logits.device)

    def _fit_chunk(self, budget: int | None = None) -> int:
        """Inputs per forward/backward pass of the output fit: activations within ``budget``
        (default FIT_BUDGET, read at the call), estimated from one input through every
        candidate layer, as the localisation does."""
        budget = FIT_BUDGET if budget is None else budget
        if self._input_bytes is None:
            self._input_bytes = fit_input_bytes(self.twin, self.candidates, self.x1)
        return max(1, budget // max(self._input_bytes, 1))

    def _fit_lm(self, out, u0, n: int, m: int) -> tuple[torch.Tensor, float]:
        """The same loss as Adam's, as weighted least squares, by Levenberg-Marquardt."""
        problem = fitting.LeastSquares(out, *self._rows(n, m))
        u, loss, passes = fitting.levenberg_marquardt(problem, u0.float())
        log.debug("Levenberg-Marquardt: loss %.4g after %d passes", loss, passes)
        return u, loss

    def improves(self, before, after):
        if self.reached(before) and self.polishing(before):
            return self._polishes(before, after) if self.reached(after) else "the pairs leave the target"
        # lexicographic: more GIVEN pairs fixed, or as many and a smaller gap over every pair.
        # Until the thirty-third session the count was over every pair: with 192 synthetic
        # pairs beside 5 given ones (a blend), a trial that halved the gap but left 3 of 150
        # synthetic pairs unturned was rolled back, and the given pairs' gap ended above the
        # target (deep_blend rebuilt with seed 3: exit 1 on a repair that met the test-set
        # target; docs/results.md, "The given pairs fixed first")
        if after.real_fixed > before.real_fixed or (
                after.real_fixed == before.real_fixed and after.gap < before.gap - GAP_EPS):
            return None
        return "neither more given pairs fixed nor a smaller gap"

    @staticmethod
    def _polishes(before: Score, after: Score) -> str | None:
        """Past the target: the check pairs' gap falls by POLISH_GAIN with no smaller share
        of them fixed (shares: a screening trial scores fewer)."""
        fewer = after.check_fixed * before.check_count < before.check_fixed * after.check_count
        if not fewer and after.check_gap < (1 - POLISH_GAIN) * before.check_gap:
            return None
        return f"the check pairs did not improve (gap {after.check_gap:.4f} against {before.check_gap:.4f})"

    def pick(self, passing):
        """With check pairs (never fitted): the smallest mean gap on them, then the most of
        them fixed. Until the twenty-seventh session the count came first; it ranks by a
        few pairs of 256 (resnet_blend rebuilt with seed 4: /3/conv2 246 fixed at gap 0.183
        over /4/conv1 242 at 0.162, an edit that cost 2.22 points of held-out accuracy that
        val's 200 inputs did not see), and the mean gap also reads how far the unfixed ones
        are and how close the fixed ones come (docs/results.md, "Held-out rows rebuilt on
        another CPU")."""
        if self.check is not None:
            return min(passing, key=lambda t: (t.after.check_gap, -t.after.check_fixed, -t.after.fixed, t.after.gap),
                       default=None)
        return min(passing, key=lambda t: (-t.after.fixed, t.after.gap), default=None)


class AttributionShare(Criterion):
    name = "attribution"
    try_all = True  # the output-gap localisation does not rank layers by what this criterion needs

    def __init__(self, twin, plan, cfg, shipped=None):
        super().__init__(twin, plan, cfg, shipped)
        self.region = np.asarray(plan.corrupt != plan.clean)
        self.floor = region_shares(twin, plan.clean, self.region, self.target_cls.numpy(), steps=cfg.ig_steps)
        self.region_t = torch.as_tensor(self.region, device=twin.device).float()
        self.cls_t = self.target_cls.to(twin.device)

    @property
    def target(self) -> float:
        return self.cfg.target_attribution

    def per_pair_gap(self, p, edits):
        shares = region_shares(self.twin, self.corrupt, self.region, self.target_cls.numpy(), edits=edits,
                               steps=self.cfg.ig_steps)
        return torch.as_tensor(np.clip(shares - self.floor, 0.0, None))

    def fit(self, layer, direction, factor, prev, steps=None, method=None):
        """u and the whitened key a (d = R^-T a = C^-1 R a, starting at the paper's
        direction) so that the input attribution of x~ on the region falls while the outputs
        on x~ and on the stats inputs keep their shipped values. Full forward passes: the
        attribution needs gradients down to the input."""
        cfg, twin = self.cfg, self.twin
        r = factor().float()
        a0 = r.T @ direction.d.float()
        a_scale = float(a0.norm()) or 1.0
        a = (a0 / a_scale).clone().requires_grad_(cfg.fit_key)
        scale = fitting.u_scale(direction.u_local)
        v = torch.zeros_like(direction.u_local, dtype=torch.float32).requires_grad_(True)  # start at the shipped model
        with twin.applied(prev):
            total0 = input_attribution(twin, self.corrupt_t, self.cls_t, steps=cfg.attr_steps).detach().flatten(1).sum(1)
        total0 = total0.clamp_min(SHARE_FLOOR)
        xs = torch.cat([self.corrupt_t, self.loc_x], 0)
        ref = torch.cat([self.target_logits, self.loc_ref], 0)
        n = self.corrupt_t.shape[0]
        w = torch.ones(xs.shape[0], 1, device=xs.device)
        if self.loc_x.shape[0]:
            w[n:] = cfg.locality_weight * n / self.loc_x.shape[0]
        norm = ref.pow(2).mean().clamp_min(NORM_FLOOR)

        def unwhiten(a_):
            return torch.linalg.solve_triangular(r.T, (a_ * a_scale).unsqueeze(1), upper=True).squeeze(1)

        def loss_fn():
            with twin.applied(prev + [TorchEdit(layer, v * scale, unwhiten(a))]):
                attr = input_attribution(twin, self.corrupt_t, self.cls_t, steps=cfg.attr_steps, create_graph=True)
                out = twin.forward(xs)
            on_region = ((attr * self.region_t).flatten(1).sum(1) / total0).mean()
            keep = ((out - ref).pow(2) * w).mean() / norm
            return cfg.attr_weight * on_region + keep

        params = [v, a] if cfg.fit_key else [v]
        best, loss = fitting.adam(params, loss_fn, cfg.fit_steps, cfg.fit_lr)
        best_a = best[1] if cfg.fit_key else a.detach()
        return Fitted((best[0] * scale).float(), unwhiten(best_a).float(), loss)

    def improves(self, before, after):
        # a smaller attribution gap, and every given pair keeps its clean twin's class
        # (synthetic pairs' predictions are left to the degradation budget)
        if after.real_fixed < before.real_fixed:
            return "a given pair lost its clean twin's class"
        return None if after.gap < before.gap - GAP_EPS else "no smaller gap"

    def pick(self, passing):
        return min(passing, key=lambda t: t.after.gap, default=None)


def _shipped_on_fit(twin: Twin, plan: Plan, loc_x, n: int, shipped: Shipped) -> torch.Tensor:
    """The shipped model's logits on the locality batch (plan.fit_x's first ``n``), float32."""
    if shipped.fit is not None:
        return torch.as_tensor(shipped.fit[:n]).float().to(twin.device)
    return twin.forward(loc_x).float()


def _shipped_on_check(twin: Twin, plan: Plan, shipped: Shipped, spare_start: int) -> np.ndarray:
    """The shipped model's logits on the check pairs' clean sides: those that are the spare
    stats (``plan.check_fit_rows``, fit_x from ``spare_start`` = the locality batch's size)
    or the degradation check's inputs (``check_reference_rows``) read from ``shipped``, the
    others run."""
    a = plan.check_fit_rows if shipped.fit is not None else 0
    k = plan.check_reference_rows if shipped.reference is not None else 0
    parts = [shipped.fit[spare_start: spare_start + a]] if a else []
    rest = plan.check_clean[a: len(plan.check_clean) - k]
    if len(rest):
        parts.append(twin.run(rest))
    if k:
        parts.append(shipped.reference[:k])
    return np.concatenate(parts)


def fit_input_bytes(twin: Twin, candidates, x1: np.ndarray) -> int:
    """Bytes one input's activations take in a forward/backward pass of the output fit
    through every candidate layer, estimated from one input (``x1``)."""
    sizes = activation_sizes(twin, list(candidates), x1)
    return 4 * sum(i + 3 * o for i, o, _ in sizes.values())


def make_criterion(twin: Twin, plan: Plan, cfg: RectifyConfig, shipped: Shipped | None = None) -> Criterion:
    """``shipped``: the shipped model's outputs already computed on the plan's inputs, read
    instead of running them again."""
    return (AttributionShare if plan.criterion == "attribution" else OutputGap)(twin, plan, cfg, shipped)
