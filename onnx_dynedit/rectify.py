"""The dynamic loop: locate -> rank-one edit -> check -> accept / roll back.

  repeat (at most ``max_edits`` accepted edits):
    gap = mean total-variation distance between the model's softmax on x~ and the
          shipped model's softmax on x (its cleansed twin); "fixed" = same top-1 class
    stop when every pair is fixed and gap <= target_gap
    re-run localisation on the current (edited) model, rank the layers
    for the best few layers: fit a rank-one edit; keep the first one that lowers the gap
      and keeps degradation within budget (others are rolled back)
    stop when none does
  return the accepted edits

Degradation: with labelled validation data, the drop in accuracy against the shipped
model; otherwise the share of inputs (val x, else stats x, else the clean twins) whose
top-1 class changed.

Static mode (``layers=...``): localisation is skipped and the given layers are edited
in turn (the "static rectifying" baseline when it is the last layer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .attribution import DEFAULT_STEPS, Localisation, locate
from .errors import EditError, LayerError
from .layers import Layer
from .rank_one import DEFAULT_LAMBDA, RankOneEdit, closed_form_u, edit_direction, key_statistics, pair_keys
from .twin import DownstreamRunner, Twin
from .writeback import LayerUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RectifyConfig:
    """Every default of the method lives here (the CLI passes None for 'not given')."""

    max_edits: int = 4
    max_degradation: float = 0.01     # accuracy drop (fraction) or share of changed predictions
    target_gap: float = 0.1           # mean TV distance on the pairs that counts as "behaves like clean"
    objective: str = "output"         # "output" (fit u on the network output) or "local" (closed form)
    key: str = "diff"                 # rows for the direction: "diff" (k~ - k) or "corrupt" (k~ weighted)
    ig_steps: int = DEFAULT_STEPS
    ig_target: str = "corrupt_logit"
    fit_steps: int = 200
    fit_lr: float = 0.05
    locality_weight: float = 1.0
    locality_batch: int = 16
    lam: float = DEFAULT_LAMBDA
    candidates_per_step: int = 3
    layers: tuple[str, ...] | None = None  # static mode: edit these, skip localisation
    augment: int = 16                 # synthetic pairs: x~ - x transplanted onto stats inputs (0 = off)
    seed: int = 0

    def replace(self, **changes) -> "RectifyConfig":
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"]) or None
        return RectifyConfig(**values)


@dataclass(frozen=True)
class _TorchEdit:
    layer: Layer
    u: torch.Tensor
    d: torch.Tensor


def _as_torch(edit: RankOneEdit, device) -> _TorchEdit:
    return _TorchEdit(edit.layer, torch.as_tensor(edit.u, dtype=torch.float32, device=device),
                      torch.as_tensor(edit.d, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class EditStep:
    step: int
    node: str
    initializer: str
    score: float | None
    gap_before: float
    gap_after: float
    fixed_before: int
    fixed_after: int
    degradation: float
    accepted: bool
    reason: str
    u_norm: float
    d_norm: float
    fit_loss: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RectifyResult:
    edits: tuple[RankOneEdit, ...]
    steps: tuple[EditStep, ...]
    localisations: tuple[dict, ...]
    n_pairs: int          # pairs used (given + synthetic)
    n_real_pairs: int     # pairs given by the user
    gap_before: float
    gap_after: float
    fixed_before: int
    fixed_after: int
    degradation: float
    degradation_kind: str
    stats_source: str
    stopped_because: str
    config: RectifyConfig = field(repr=False)
    timings: dict = field(default_factory=dict)  # seconds per phase

    real_gap_after: float = float("nan")   # over the given pairs only
    real_fixed_after: int = 0

    @property
    def success(self) -> bool:
        """Judged on the pairs the user gave (synthetic ones only guide the fit)."""
        return self.real_fixed_after == self.n_real_pairs and self.real_gap_after <= self.config.target_gap

    def updates(self) -> list[LayerUpdate]:
        """Accepted edits grouped per layer (a layer may be picked more than once)."""
        order, groups = [], {}
        for e in self.edits:
            if e.layer.node not in groups:
                order.append(e.layer)
                groups[e.layer.node] = []
            groups[e.layer.node].append((e.u, e.d))
        return [LayerUpdate(layer=l, factors=tuple(groups[l.node])) for l in order]

    def to_dict(self) -> dict:
        return {
            "n_pairs": self.n_pairs, "n_real_pairs": self.n_real_pairs, "gap_before": self.gap_before, "gap_after": self.gap_after,
            "fixed_before": self.fixed_before, "fixed_after": self.fixed_after,
            "real_gap_after": self.real_gap_after, "real_fixed_after": self.real_fixed_after,
            "degradation": self.degradation, "degradation_kind": self.degradation_kind,
            "stats_source": self.stats_source, "stopped_because": self.stopped_because, "success": self.success,
            "edits": [e.to_dict() for e in self.edits], "steps": [s.to_dict() for s in self.steps],
            "localisations": list(self.localisations), "config": asdict(self.config),
            "timings": dict(self.timings),
        }


class _Scorer:
    """Pair gap and degradation of the current edits against the shipped model."""

    def __init__(self, twin: Twin, corrupt, clean, ref_x, ref_y):
        self.twin = twin
        self.corrupt = corrupt
        self.target = torch.softmax(torch.as_tensor(twin.run(clean)), 1)  # shipped model on clean twins
        self.target_cls = self.target.argmax(1)
        self.ref_x, self.ref_y = ref_x, ref_y
        ref = twin.run(ref_x).argmax(1)
        self.ref_pred = ref
        self.base_acc = float((ref == ref_y).mean()) if ref_y is not None else None

    def gap(self, edits, first: int | None = None) -> tuple[float, int]:
        """(mean TV distance, pairs fixed) over all pairs, or over the ``first`` ones."""
        with self.twin.applied(edits):
            p = torch.softmax(torch.as_tensor(self.twin.run(self.corrupt[:first])), 1)
        target = self.target[:first]
        tv = 0.5 * (p - target).abs().sum(1)
        return float(tv.mean()), int((p.argmax(1) == target.argmax(1)).sum())

    def degradation(self, edits) -> float:
        with self.twin.applied(edits):
            pred = self.twin.run(self.ref_x).argmax(1)
        if self.ref_y is not None:
            return self.base_acc - float((pred == self.ref_y).mean())
        return float((pred != self.ref_pred).mean())


def _fit_output(twin: Twin, layer: Layer, d: torch.Tensor, u0: torch.Tensor, prev: list[_TorchEdit],
                corrupt_t: torch.Tensor, target_logits: torch.Tensor, loc_x: torch.Tensor, loc_ref: torch.Tensor,
                cfg: RectifyConfig) -> tuple[torch.Tensor, float]:
    """Fit u (d fixed) so the network output on x~ matches the shipped output on x while
    outputs on unlabeled clean inputs stay put. Returns (u float32, final loss)."""
    scale = float(u0.norm()) / max(1.0, u0.numel() ** 0.5) or 1e-3
    v = (u0 / scale).float().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.fit_lr)
    xs = torch.cat([corrupt_t, loc_x], 0)
    n = corrupt_t.shape[0]
    t_norm = target_logits.pow(2).mean().clamp_min(1e-8)
    l_norm = loc_ref.pow(2).mean().clamp_min(1e-8)
    with twin.applied(prev):
        runner = DownstreamRunner(twin, layer, xs)  # upstream of the layer stays cached
    best = (float("inf"), v.detach().clone())
    since_best = 0
    for _ in range(cfg.fit_steps):
        opt.zero_grad(set_to_none=True)
        with twin.applied(prev + [_TorchEdit(layer, v * scale, d)]):
            out = runner()
        loss = F.mse_loss(out[:n], target_logits) / t_norm
        if loc_x.shape[0]:
            loss = loss + cfg.locality_weight * F.mse_loss(out[n:], loc_ref) / l_norm
        loss.backward()
        loss_val = float(loss.detach())
        if loss_val < best[0] * (1 - 1e-3):
            since_best = 0
        else:
            since_best += 1
        if loss_val < best[0]:
            best = (loss_val, v.detach().clone())
        if loss_val < 1e-5 or since_best >= 30:  # converged / stalled: stop early
            break
        opt.step()
    return (best[1] * scale).float(), best[0]


def transplant_pairs(corrupt: np.ndarray, clean: np.ndarray, pool: np.ndarray, m: int):
    """Append ``m`` synthetic pairs: stats input s and s + (x~_j - x_j), clipped to the
    value range of the given pairs (j cycles over the pairs). Exact for a pasted patch on
    a constant background, an approximation for blended triggers."""
    m = min(m, len(pool))
    src = pool[len(pool) - m:]  # the tail: the locality batch uses the head
    delta = (corrupt - clean).astype(np.float64)
    lo = min(float(corrupt.min()), float(clean.min()))
    hi = max(float(corrupt.max()), float(clean.max()))
    idx = np.arange(m) % len(corrupt)
    syn = np.clip(src.astype(np.float64) + delta[idx], lo, hi).astype(corrupt.dtype)
    return np.concatenate([corrupt, syn]), np.concatenate([clean, src.astype(clean.dtype)])


def rectify(twin: Twin, corrupt: np.ndarray, clean: np.ndarray, *, stats_x: np.ndarray | None = None,
            val_x: np.ndarray | None = None, val_y: np.ndarray | None = None,
            config: RectifyConfig | None = None) -> RectifyResult:
    cfg = config or RectifyConfig()
    torch.manual_seed(cfg.seed)
    editable = twin.layer_map.editable()
    if not editable:
        raise LayerError(f"{twin.loaded.label} has no editable layer (Conv/Gemm/MatMul with a constant weight)")
    if cfg.layers:
        pinned = [twin.layer_map.get(name) for name in cfg.layers]
        for layer in pinned:
            if not layer.editable:
                raise LayerError(f"layer {layer.node!r} cannot be edited: {layer.reason}")
        candidates = pinned
    else:
        candidates = editable

    if stats_x is not None:
        stats_source = f"stats ({len(stats_x)} inputs)"
        key_x = stats_x
    else:
        stats_source = f"clean twins of the pairs ({len(clean)} inputs; no --stats given)"
        key_x = clean
    if val_x is not None:
        ref_x, ref_y = val_x, val_y
        kind = "accuracy drop on val" if val_y is not None else "changed predictions on val"
    elif stats_x is not None:
        ref_x, ref_y, kind = stats_x, None, "changed predictions on stats"
    else:
        ref_x, ref_y, kind = clean, None, "changed predictions on the clean twins"

    real_n = len(corrupt)
    if cfg.augment and stats_x is not None:
        corrupt, clean = transplant_pairs(corrupt, clean, stats_x, cfg.augment)
    scorer = _Scorer(twin, corrupt, clean, ref_x, ref_y)
    corrupt_t = twin.to_tensor(corrupt)
    with torch.no_grad():
        target_logits = twin.forward(twin.to_tensor(clean)).float()
        loc_src = stats_x if stats_x is not None else clean
        loc_x = twin.to_tensor(loc_src[: cfg.locality_batch])
        loc_ref = twin.forward(loc_x).float()

    timings = {"key_statistics": 0.0, "localisation": 0.0, "fit": 0.0, "check": 0.0}
    clock = time.perf_counter
    accepted: list[RankOneEdit] = []
    steps: list[EditStep] = []
    localisations: list[dict] = []
    gap0, fixed0 = scorer.gap([])
    gap, fixed = gap0, fixed0
    stopped = "max edits reached"
    step_no = 0
    stats = None
    while len(accepted) < cfg.max_edits:
        if fixed == len(corrupt) and gap <= cfg.target_gap:
            stopped = "target reached"
            break
        torch_edits = [_as_torch(e, twin.device) for e in accepted]
        # key statistics depend on upstream edits: recompute after every accepted edit
        t0 = clock()
        stats = key_statistics(twin, candidates, key_x, edits=torch_edits, lam=cfg.lam, source=stats_source)
        timings["key_statistics"] += clock() - t0
        t0 = clock()
        if cfg.layers:
            order = [(l, None) for l in candidates]
            order = order[len(accepted) % len(order):] + order[: len(accepted) % len(order)]
        else:
            # localisation attributes the given pairs only (the paper's method)
            loc = locate(twin, candidates, corrupt[:real_n], clean[:real_n], stats, edits=torch_edits,
                         steps=cfg.ig_steps, target=cfg.ig_target, key=cfg.key)
            localisations.append(loc.to_dict())
            order = [(a.layer, a.score) for a in loc.ranked][: cfg.candidates_per_step]
            if not order:
                stopped = "no layer separates corrupted from clean keys"
                break
        timings["localisation"] += clock() - t0
        keys = pair_keys(twin, [l for l, _ in order], corrupt, clean, edits=torch_edits)
        took = False
        for layer, score in order:
            step_no += 1
            try:
                direction = edit_direction(stats[layer.node], keys[layer.node], key=cfg.key)
                u0 = closed_form_u(keys[layer.node], direction.d)
            except EditError as err:
                log.info("step %d: layer %s skipped: %s", step_no, layer.node, err.message)
                continue
            d32 = direction.d.float()
            fit_loss = None
            t0 = clock()
            if cfg.objective == "output":
                u, fit_loss = _fit_output(twin, layer, d32, u0, torch_edits, corrupt_t, target_logits,
                                          loc_x, loc_ref, cfg)
            elif cfg.objective == "local":
                u = u0.float()
            else:
                raise ValueError(f"unknown objective {cfg.objective!r}")
            timings["fit"] += clock() - t0
            edit = RankOneEdit(layer=layer, u=u.detach().double().cpu().numpy(), d=direction.d.cpu().numpy())
            if not (np.isfinite(edit.u).all() and np.isfinite(edit.d).all()):
                steps.append(EditStep(step_no, layer.node, layer.initializer, score, gap, gap, fixed, fixed,
                                      float("nan"), False, "non-finite factors", float("nan"), float("nan"), fit_loss))
                continue
            trial = torch_edits + [_as_torch(edit, twin.device)]
            t0 = clock()
            new_gap, new_fixed = scorer.gap(trial)
            degr = scorer.degradation(trial)
            timings["check"] += clock() - t0
            ok_budget = degr <= cfg.max_degradation + 1e-12
            # lexicographic: more pairs fixed, or as many fixed and a smaller gap
            improves = new_fixed > fixed or (new_fixed == fixed and new_gap < gap - 1e-6)
            reason = "accepted" if ok_budget and improves else (
                f"rolled back: degradation {degr:.4f} > budget {cfg.max_degradation:.4f}" if not ok_budget
                else "rolled back: neither more pairs fixed nor a smaller gap")
            steps.append(EditStep(step_no, layer.node, layer.initializer, score, gap, new_gap, fixed, new_fixed,
                                  degr, ok_budget and improves, reason, float(np.linalg.norm(edit.u)),
                                  float(np.linalg.norm(edit.d)), fit_loss))
            log.info("step %d: %s gap %.4f -> %.4f, fixed %d -> %d, degradation %.4f: %s", step_no, layer.node,
                     gap, new_gap, fixed, new_fixed, degr, reason)
            if ok_budget and improves:
                accepted.append(edit)
                gap, fixed = new_gap, new_fixed
                took = True
                break
        if not took:
            stopped = "no candidate edit lowered the gap within the degradation budget"
            break
    else:
        if fixed == len(corrupt) and gap <= cfg.target_gap:
            stopped = "target reached"
    final_edits = [_as_torch(e, twin.device) for e in accepted]
    final_degr = scorer.degradation(final_edits) if accepted else 0.0
    real_gap, real_fixed = scorer.gap(final_edits, first=real_n)
    return RectifyResult(
        edits=tuple(accepted), steps=tuple(steps), localisations=tuple(localisations), n_pairs=int(len(corrupt)),
        n_real_pairs=real_n,
        gap_before=gap0, gap_after=gap, fixed_before=fixed0, fixed_after=fixed, degradation=final_degr,
        degradation_kind=kind, stats_source=stats_source, stopped_because=stopped, config=cfg, timings=timings,
        real_gap_after=real_gap, real_fixed_after=real_fixed)
