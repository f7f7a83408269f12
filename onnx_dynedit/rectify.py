"""The dynamic loop: locate -> rank-one edit -> check -> accept / roll back.

  repeat (at most ``max_edits`` accepted edits):
    gap = (criterion "output") mean total-variation distance between the model's softmax
          on x~ and the shipped model's softmax on x (its cleansed twin), or
          (criterion "attribution") the mean share of input attribution on the region
          where x~ differs from x, in excess of the clean twin's share there;
          "fixed" = same top-1 class as the shipped model on x
    stop when every pair is fixed and gap <= target (target_gap / target_attribution)
    re-run localisation on the current (edited) model, rank the layers
    for the best few layers: fit a rank-one edit; keep the first one that lowers the gap
      and keeps degradation within budget (others are rolled back); under the attribution
      criterion every candidate is fitted and the one with the smallest gap is kept
    stop when none does
  return the accepted edits

Degradation: with labelled validation data, the drop in accuracy against the shipped
model; otherwise the share of inputs (val x, else stats x, else the clean twins) whose
top-1 class changed.

Criteria. "output" is the paper's setting (a Trojan or spurious feature changes the
prediction). "attribution" is for feature leakage, where x~ and x already get the same
prediction but the model's attribution leans on a region that should not matter: u and
the whitened key k (d = C^-1 k, starting at the paper's k*) are then fitted together so
that the input attribution (IG from the zero baseline, logit of the clean twin's class)
on that region falls, while outputs on x~ and on stats inputs stay where they were.
"auto" (default) picks "attribution" when every given pair already behaves like its
clean twin by the output gap, "output" otherwise.

Static mode (``layers=...``): localisation is skipped and the given layers are edited
in turn (the "static rectifying" baseline when it is the last layer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import progress
from .attribution import DEFAULT_STEPS, input_attribution, locate, region_shares
from .errors import EditError, InputError, LayerError
from .layers import Layer
from .rank_one import DEFAULT_LAMBDA, RankOneEdit, closed_form_u, edit_direction, key_statistics, pair_keys
from .twin import DownstreamRunner, Twin, batch_size_of, cat_inputs
from .writeback import LayerUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RectifyConfig:
    """Every default of the method lives here (the CLI passes None for 'not given')."""

    max_edits: int = 4
    max_degradation: float = 0.01     # accuracy drop (fraction) or share of changed predictions
    criterion: str = "auto"           # "output", "attribution" or "auto" (see module doc)
    target_gap: float = 0.1           # mean TV distance on the pairs that counts as "behaves like clean"
    target_attribution: float = 0.05  # attribution share on the changed region, in excess of the clean twin's
    objective: str = "output"         # "output" (fit u on the network output) or "local" (closed form)
    key: str = "diff"                 # rows for the direction: "diff" (k~ - k) or "corrupt" (k~ weighted)
    ig_steps: int = DEFAULT_STEPS
    ig_target: str = "corrupt_logit"
    ig_reduction: str = "sum"         # positions: "sum" (signed, before the norm) or "abs"
    fit_steps: int = 200
    fit_lr: float = 0.05
    attr_weight: float = 3.0          # weight of the region's attribution in the attribution fit
    attr_steps: int = 8               # IG steps inside the attribution fit
    fit_key: bool = True              # attribution fit: fit the whitened key too (False: d = C^-1 k* fixed)
    locality_weight: float = 1.0
    locality_batch: int = 16
    lam: float = DEFAULT_LAMBDA
    candidates_per_step: int = 3
    layers: tuple[str, ...] | None = None  # static mode: edit these, skip localisation
    augment: int = 16                 # synthetic pairs: the corruption transplanted onto stats inputs (0 = off)
    transplant: str = "auto"          # how: "add", "affine", "gain" or "auto" (transplant_pairs)
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

    real_gap_before: float = float("nan")  # over the given pairs only
    real_gap_after: float = float("nan")
    real_fixed_after: int = 0
    criterion: str = "output"              # the gap used: "output" or "attribution"

    @property
    def target(self) -> float:
        return self.config.target_attribution if self.criterion == "attribution" else self.config.target_gap

    @property
    def success(self) -> bool:
        """Judged on the pairs the user gave (synthetic ones only guide the fit)."""
        return self.real_fixed_after == self.n_real_pairs and self.real_gap_after <= self.target

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
            "criterion": self.criterion, "target": self.target,
            "n_pairs": self.n_pairs, "n_real_pairs": self.n_real_pairs, "gap_before": self.gap_before, "gap_after": self.gap_after,
            "fixed_before": self.fixed_before, "fixed_after": self.fixed_after,
            "real_gap_before": self.real_gap_before, "real_gap_after": self.real_gap_after, "real_fixed_after": self.real_fixed_after,
            "degradation": self.degradation, "degradation_kind": self.degradation_kind,
            "stats_source": self.stats_source, "stopped_because": self.stopped_because, "success": self.success,
            "edits": [e.to_dict() for e in self.edits], "steps": [s.to_dict() for s in self.steps],
            "localisations": list(self.localisations), "config": asdict(self.config),
            "timings": dict(self.timings),
        }


class _Scorer:
    """Pair gap and degradation of the current edits against the shipped model."""

    def __init__(self, twin: Twin, corrupt, clean, ref_x, ref_y, criterion: str = "output",
                 ig_steps: int = DEFAULT_STEPS):
        self.twin = twin
        self.corrupt = corrupt
        self.criterion = criterion
        self.ig_steps = ig_steps
        self.target = torch.softmax(torch.as_tensor(twin.run(clean)), 1)  # shipped model on clean twins
        self.target_cls = self.target.argmax(1)
        if criterion == "attribution":
            self.region = np.asarray(corrupt != clean)
            self.floor = region_shares(twin, clean, self.region, self.target_cls.numpy(), steps=ig_steps)
        self.ref_x, self.ref_y = ref_x, ref_y
        ref = twin.run(ref_x).argmax(1)
        self.ref_pred = ref
        self.base_acc = float((ref == ref_y).mean()) if ref_y is not None else None

    def gap(self, edits, first: int | None = None) -> tuple[float, int]:
        """(mean gap, pairs fixed) over all pairs, or over the ``first`` ones."""
        with self.twin.applied(edits):
            p = torch.softmax(torch.as_tensor(self.twin.run(self.corrupt[:first])), 1)
        target = self.target[:first]
        fixed = int((p.argmax(1) == target.argmax(1)).sum())
        if self.criterion == "attribution":
            shares = region_shares(self.twin, self.corrupt[:first], self.region[:first],
                                   self.target_cls[:first].numpy(), edits=edits, steps=self.ig_steps)
            return float(np.clip(shares - self.floor[:first], 0.0, None).mean()), fixed
        tv = 0.5 * (p - target).abs().sum(1)
        return float(tv.mean()), fixed

    def fixed(self, edits, first: int) -> int:
        """Pairs among the ``first`` ones whose top-1 matches the shipped model on x."""
        with self.twin.applied(edits):
            pred = self.twin.run(self.corrupt[:first]).argmax(1)
        return int((torch.as_tensor(pred) == self.target_cls[:first]).sum())

    def degradation(self, edits) -> float:
        with self.twin.applied(edits):
            pred = self.twin.run(self.ref_x).argmax(1)
        if self.ref_y is not None:
            return self.base_acc - float((pred == self.ref_y).mean())
        return float((pred != self.ref_pred).mean())


def _adam(params: list[torch.Tensor], loss_fn, cfg: RectifyConfig) -> tuple[list[torch.Tensor], float]:
    """Minimise ``loss_fn()`` with Adam; keep the best iterate; stop early when the loss
    has converged or stalled for 30 steps. Returns (best params, detached; best loss)."""
    opt = torch.optim.Adam(params, lr=cfg.fit_lr)
    best = (float("inf"), [p.detach().clone() for p in params])
    since_best = 0
    for _ in range(cfg.fit_steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        loss_val = float(loss.detach())
        since_best = 0 if loss_val < best[0] * (1 - 1e-3) else since_best + 1
        if loss_val < best[0]:
            best = (loss_val, [p.detach().clone() for p in params])
        if loss_val < 1e-5 or since_best >= 30:  # converged / stalled: stop early
            break
        opt.step()
    return best[1], best[0]


def _u_scale(u0: torch.Tensor) -> float:
    return float(u0.norm()) / max(1.0, u0.numel() ** 0.5) or 1e-3


def _fit_output(twin: Twin, layer: Layer, d: torch.Tensor, u0: torch.Tensor, prev: list[_TorchEdit],
                corrupt_t: torch.Tensor, target_logits: torch.Tensor, loc_x: torch.Tensor, loc_ref: torch.Tensor,
                cfg: RectifyConfig) -> tuple[torch.Tensor, float]:
    """Fit u (d fixed) so the network output on x~ matches the shipped output on x while
    outputs on unlabeled clean inputs stay put. Returns (u float32, final loss)."""
    scale = _u_scale(u0)
    v = (u0 / scale).float().clone().requires_grad_(True)
    xs = cat_inputs(corrupt_t, loc_x)  # tensors, or tuples of them for several inputs
    n = batch_size_of(corrupt_t)
    t_norm = target_logits.pow(2).mean().clamp_min(1e-8)
    l_norm = loc_ref.pow(2).mean().clamp_min(1e-8)
    with twin.applied(prev):
        runner = DownstreamRunner(twin, layer, xs)  # upstream of the layer stays cached

    def loss_fn():
        with twin.applied(prev + [_TorchEdit(layer, v * scale, d)]):
            out = runner()
        loss = F.mse_loss(out[:n], target_logits) / t_norm
        if batch_size_of(loc_x):
            loss = loss + cfg.locality_weight * F.mse_loss(out[n:], loc_ref) / l_norm
        return loss

    (best_v,), loss = _adam([v], loss_fn, cfg)
    return (best_v * scale).float(), loss


def _fit_attribution(twin: Twin, layer: Layer, chol: torch.Tensor, d0: torch.Tensor, u0: torch.Tensor,
                     prev: list[_TorchEdit], corrupt_t: torch.Tensor, region_t: torch.Tensor, cls_t: torch.Tensor,
                     target_logits: torch.Tensor, loc_x: torch.Tensor, loc_ref: torch.Tensor,
                     cfg: RectifyConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit u and the whitened key a (d = R^-T a = C^-1 R a, starting at the paper's
    direction d0) so that the input attribution of x~ on the region falls while the outputs
    on x~ and on the stats inputs keep their shipped values. Full forward passes: the
    attribution needs gradients down to the input. Returns (u, d float32, final loss)."""
    r = chol.float()
    a0 = r.T @ d0.float()
    a_scale = float(a0.norm()) or 1.0
    a = (a0 / a_scale).clone().requires_grad_(cfg.fit_key)
    scale = _u_scale(u0)
    v = torch.zeros_like(u0, dtype=torch.float32).requires_grad_(True)  # start at the shipped model
    with twin.applied(prev):
        total0 = input_attribution(twin, corrupt_t, cls_t, steps=cfg.attr_steps).detach().flatten(1).sum(1)
    total0 = total0.clamp_min(1e-12)
    xs = torch.cat([corrupt_t, loc_x], 0)
    ref = torch.cat([target_logits, loc_ref], 0)
    n = corrupt_t.shape[0]
    w = torch.ones(xs.shape[0], 1, device=xs.device)
    if loc_x.shape[0]:
        w[n:] = cfg.locality_weight * n / loc_x.shape[0]
    norm = ref.pow(2).mean().clamp_min(1e-8)

    def direction(a_):
        return torch.linalg.solve_triangular(r.T, (a_ * a_scale).unsqueeze(1), upper=True).squeeze(1)

    def loss_fn():
        with twin.applied(prev + [_TorchEdit(layer, v * scale, direction(a))]):
            attr = input_attribution(twin, corrupt_t, cls_t, steps=cfg.attr_steps, create_graph=True)
            out = twin.forward(xs)
        on_region = ((attr * region_t).flatten(1).sum(1) / total0).mean()
        keep = ((out - ref).pow(2) * w).mean() / norm
        return cfg.attr_weight * on_region + keep

    if cfg.fit_key:
        (best_v, best_a), loss = _adam([v, a], loss_fn, cfg)
    else:
        (best_v,), loss = _adam([v], loss_fn, cfg)
        best_a = a.detach()
    return (best_v * scale).float(), direction(best_a).float(), loss


AFFINE_RIDGE = 1e-4   # per-element affine fit of the corruption: ridge (x n pairs) toward a = 1
GAIN_RESIDUAL = 0.05  # a per-pair channel gain "explains" a pair below this share of ||x~ - x||
TRANSPLANTS = ("auto", "add", "affine", "gain")


def corruption_model(corrupt: np.ndarray, clean: np.ndarray) -> str:
    """The transplant that ``auto`` picks for these pairs (see ``transplant_pairs``):
    "gain" when every pair is its clean twin with each channel scaled (a re-colouring,
    inputs with 2+ channels), else "affine" with two or more pairs, else "add"."""
    n = len(corrupt)
    if corrupt.ndim >= 3 and corrupt.shape[1] > 1:
        c = corrupt.reshape(n, corrupt.shape[1], -1).astype(np.float64)
        k = clean.reshape(n, clean.shape[1], -1).astype(np.float64)
        g = (c * k).sum(2) / np.maximum((k * k).sum(2), 1e-12)
        resid = np.linalg.norm((c - g[:, :, None] * k).reshape(n, -1), axis=1)
        diff = np.linalg.norm((c - k).reshape(n, -1), axis=1)
        if np.all(resid <= GAIN_RESIDUAL * np.maximum(diff, 1e-12)):
            return "gain"
    return "affine" if n >= 2 else "add"


def transplant_pairs(corrupt: np.ndarray, clean: np.ndarray, pool: np.ndarray, m: int, *, match: bool = False,
                     model: str = "add"):
    """Append up to ``m`` synthetic pairs (stats input s, s corrupted the way the given
    pairs are), clipped to the value range of the given pairs. ``model``:

    "add"    s + (x~_j - x_j), j cycling over the pairs: exact for a pasted patch on a
             constant background, an approximation for blended triggers;
    "affine" per input element x~ = a x + b, fitted by least squares over the given pairs
             with a ridge (AFFINE_RIDGE x n) toward a = 1, applied to s: a blend
             x~ = (1 - phi) x + phi p is recovered exactly from 2+ pairs (a = 1 - phi,
             b = phi p), a pasted patch too (a = 0, b = patch); with one pair it is "add";
    "gain"   per pair j and channel c, g_jc = <x~_jc, x_jc> / ||x_jc||^2 (a re-colouring),
             s_c scaled by g_jc; synthetic inputs that keep less than half of s's mass (a
             colour s does not carry) are skipped;
    "auto"   ``corruption_model``.

    ``match`` (attribution criterion): additive, and only stats inputs that equal the first
    clean twin where the pairs differ (the corrupting pattern then lands on the same kind
    of content, e.g. an empty block rather than another input's digit); all of the pool
    when none does."""
    if model not in TRANSPLANTS:
        raise ValueError(f"unknown transplant {model!r}")
    if match:
        model = "add"
        support = (corrupt != clean).any(axis=0).reshape(-1)
        gap = np.abs(pool - clean[:1]).reshape(len(pool), -1)[:, support]
        ok = gap.max(axis=1) <= 1e-6 if support.any() else np.zeros(len(pool), bool)
        if ok.any():
            pool = pool[ok]
    elif model == "auto":
        model = corruption_model(corrupt, clean)
    if model == "affine" and len(corrupt) < 2:
        model = "add"
    m = min(m, len(pool))
    lo = min(float(corrupt.min()), float(clean.min()))
    hi = max(float(corrupt.max()), float(clean.max()))
    n = len(corrupt)
    if model == "gain":
        c = corrupt.reshape(n, corrupt.shape[1], -1).astype(np.float64)
        k = clean.reshape(n, clean.shape[1], -1).astype(np.float64)
        gain = (c * k).sum(2) / np.maximum((k * k).sum(2), 1e-12)  # [n, channels]
        shape = (1, corrupt.shape[1]) + (1,) * (corrupt.ndim - 2)
        src, syn = [], []
        for i in range(len(pool) - 1, -1, -1):  # the tail first: the locality batch uses the head
            s = pool[i].astype(np.float64)
            t = np.clip(s * gain[len(syn) % n].reshape(shape[1:]), lo, hi)
            if np.abs(t).sum() >= 0.5 * np.abs(s).sum():
                src.append(pool[i])
                syn.append(t)
            if len(syn) >= m:
                break
        if not syn:
            return corrupt, clean
        src_a = np.stack(src).astype(clean.dtype)
        return np.concatenate([corrupt, np.stack(syn).astype(corrupt.dtype)]), np.concatenate([clean, src_a])
    src = pool[len(pool) - m:]  # the tail: the locality batch uses the head
    if model == "affine":
        x = clean.reshape(n, -1).astype(np.float64)
        t = corrupt.reshape(n, -1).astype(np.float64)
        lam = AFFINE_RIDGE * n
        sx, sxx, st, sxt = x.sum(0), (x * x).sum(0), t.sum(0), (x * t).sum(0)
        det = (sxx + lam) * n - sx * sx  # > 0: lam > 0 and Cauchy-Schwarz
        a = ((sxt + lam) * n - sx * st) / det
        b = ((sxx + lam) * st - sx * (sxt + lam)) / det
        syn = np.clip(src.reshape(m, -1).astype(np.float64) * a + b, lo, hi).reshape(src.shape)
        return np.concatenate([corrupt, syn.astype(corrupt.dtype)]), np.concatenate([clean, src.astype(clean.dtype)])
    delta = (corrupt - clean).astype(np.float64)
    idx = np.arange(m) % len(corrupt)
    syn = np.clip(src.astype(np.float64) + delta[idx], lo, hi).astype(corrupt.dtype)
    return np.concatenate([corrupt, syn]), np.concatenate([clean, src.astype(clean.dtype)])


def rectify(twin: Twin, corrupt: np.ndarray, clean: np.ndarray, *, stats_x: np.ndarray | None = None,
            val_x: np.ndarray | None = None, val_y: np.ndarray | None = None,
            config: RectifyConfig | None = None, key_source=None) -> RectifyResult:
    """``key_source``: a ``keystats.ShardedKeys`` standing in for ``stats_x`` in the key
    statistics (a sharded stats set; ``stats_x`` is then its first shard, for the rest)."""
    cfg = config or RectifyConfig()
    torch.manual_seed(cfg.seed)
    progress.step("prepare the pairs (criterion, synthetic pairs, reference outputs)")
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

    if key_source is not None:
        stats_source, key_x = key_source.source, key_source
    elif stats_x is not None:
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
    criterion = cfg.criterion
    if criterion == "auto":  # leakage: the given pairs already behave like their clean twins
        probe_gap, probe_fixed = _Scorer(twin, corrupt, clean, clean[:1], None).gap([])
        criterion = "attribution" if probe_fixed == real_n and probe_gap <= cfg.target_gap else "output"
    elif criterion not in ("output", "attribution"):
        raise ValueError(f"unknown criterion {cfg.criterion!r}")
    attribution = criterion == "attribution"
    if attribution and cfg.objective == "local":
        raise InputError("--objective local (the closed form) only applies to the output criterion; the pairs "
                         "call for the attribution criterion", hint="drop --objective local, or pass --criterion output")
    target = cfg.target_attribution if attribution else cfg.target_gap
    if cfg.augment and stats_x is not None:
        corrupt, clean = transplant_pairs(corrupt, clean, stats_x, cfg.augment, match=attribution,
                                          model=cfg.transplant)
    scorer = _Scorer(twin, corrupt, clean, ref_x, ref_y, criterion, cfg.ig_steps)
    corrupt_t = twin.to_tensor(corrupt)
    with torch.no_grad():
        target_logits = twin.forward(twin.to_tensor(clean)).float()
        loc_src = stats_x if stats_x is not None else clean
        loc_x = twin.to_tensor(loc_src[: cfg.locality_batch])
        loc_ref = twin.forward(loc_x).float()
    if attribution:
        region_t = torch.as_tensor(scorer.region, device=twin.device).float()
        cls_t = scorer.target_cls.to(twin.device)

    timings = {"key_statistics": 0.0, "localisation": 0.0, "fit": 0.0, "check": 0.0}
    clock = time.perf_counter
    accepted: list[RankOneEdit] = []
    steps: list[EditStep] = []
    localisations: list[dict] = []
    gap0, fixed0 = scorer.gap([])
    real_fixed = scorer.fixed([], real_n)
    real_gap0 = scorer.gap([], first=real_n)[0] if len(corrupt) > real_n else gap0
    gap, fixed = gap0, fixed0
    stopped = "max edits reached"
    step_no = 0
    stats = None
    while len(accepted) < cfg.max_edits:
        if fixed == len(corrupt) and gap <= target:
            stopped = "target reached"
            break
        torch_edits = [_as_torch(e, twin.device) for e in accepted]
        # key statistics depend on upstream edits: recompute after every accepted edit
        t0 = clock()
        progress.step(f"round {len(accepted) + 1}: key statistics ({len(candidates)} layers)")
        stats = key_statistics(twin, candidates, key_x, edits=torch_edits, lam=cfg.lam, source=stats_source)
        timings["key_statistics"] += clock() - t0
        t0 = clock()
        if cfg.layers:
            order = [(l, None) for l in candidates]
            order = order[len(accepted) % len(order):] + order[: len(accepted) % len(order)]
        else:
            # localisation attributes the given pairs only (the paper's method)
            progress.step(f"round {len(accepted) + 1}: localisation")
            loc = locate(twin, candidates, corrupt[:real_n], clean[:real_n], stats, edits=torch_edits,
                         steps=cfg.ig_steps, target=cfg.ig_target, key=cfg.key, reduction=cfg.ig_reduction)
            localisations.append(loc.to_dict())
            order = [(a.layer, a.score) for a in loc.ranked][: cfg.candidates_per_step]
            if not order:
                stopped = "no layer separates corrupted from clean keys"
                break
        timings["localisation"] += clock() - t0
        keys = pair_keys(twin, [l for l, _ in order], corrupt, clean, edits=torch_edits)
        took = False
        tried: list[tuple[EditStep, RankOneEdit]] = []
        for layer, score in order:
            step_no += 1
            try:
                direction = edit_direction(stats[layer.node], keys[layer.node], key=cfg.key)
                u0 = closed_form_u(keys[layer.node], direction.d)
            except EditError as err:
                log.info("step %d: layer %s skipped: %s", step_no, layer.node, err.message)
                continue
            d32 = direction.d.float()
            d_np = direction.d.cpu().numpy()
            fit_loss = None
            t0 = clock()
            progress.step(f"round {len(accepted) + 1}: fit {layer.node}")
            if attribution:
                u, d_fit, fit_loss = _fit_attribution(twin, layer, stats[layer.node].chol, d32, u0, torch_edits,
                                                      corrupt_t, region_t, cls_t, target_logits, loc_x, loc_ref, cfg)
                d_np = d_fit.double().cpu().numpy()
            elif cfg.objective == "output":
                u, fit_loss = _fit_output(twin, layer, d32, u0, torch_edits, corrupt_t, target_logits,
                                          loc_x, loc_ref, cfg)
            elif cfg.objective == "local":
                u = u0.float()
            else:
                raise ValueError(f"unknown objective {cfg.objective!r}")
            timings["fit"] += clock() - t0
            edit = RankOneEdit(layer=layer, u=u.detach().double().cpu().numpy(), d=d_np)
            if not (np.isfinite(edit.u).all() and np.isfinite(edit.d).all()):
                tried.append((EditStep(step_no, layer.node, layer.initializer, score, gap, gap, fixed, fixed,
                                       float("nan"), False, "non-finite factors", float("nan"), float("nan"), fit_loss),
                              edit))
                continue
            trial = torch_edits + [_as_torch(edit, twin.device)]
            t0 = clock()
            progress.step(f"round {len(accepted) + 1}: check {layer.node}")
            new_gap, new_fixed = scorer.gap(trial)
            degr = scorer.degradation(trial)
            timings["check"] += clock() - t0
            ok_budget = degr <= cfg.max_degradation + 1e-12
            if attribution:
                # a smaller attribution gap, and every given pair keeps its clean twin's class
                # (synthetic pairs' predictions are left to the degradation budget)
                keeps = scorer.fixed(trial, real_n) >= real_fixed
                improves = keeps and new_gap < gap - 1e-6
                why = "no smaller gap" if keeps else "a given pair lost its clean twin's class"
            else:
                # lexicographic: more pairs fixed, or as many fixed and a smaller gap
                improves = new_fixed > fixed or (new_fixed == fixed and new_gap < gap - 1e-6)
                why = "neither more pairs fixed nor a smaller gap"
            reason = "accepted" if ok_budget and improves else (
                f"rolled back: degradation {degr:.4f} > budget {cfg.max_degradation:.4f}" if not ok_budget
                else f"rolled back: {why}")
            tried.append((EditStep(step_no, layer.node, layer.initializer, score, gap, new_gap, fixed, new_fixed,
                                   degr, ok_budget and improves, reason, float(np.linalg.norm(edit.u)),
                                   float(np.linalg.norm(edit.d)), fit_loss), edit))
            if ok_budget and improves and not attribution:
                break  # output criterion: the first candidate that helps (the paper's loop)
        # attribution criterion: every candidate is fitted and the best one is kept (the
        # output-gap localisation does not rank layers by what this criterion needs)
        passing = [(st, e) for st, e in tried if st.accepted]
        rank = (lambda t: t[0].gap_after) if attribution else (lambda t: (-t[0].fixed_after, t[0].gap_after))
        chosen = min(passing, key=rank) if passing else None
        for st, e in tried:
            if st.accepted and chosen is not None and st is not chosen[0]:
                st = replace(st, accepted=False, reason=f"not kept: {chosen[0].node} did better")
            steps.append(st)
            log.info("step %d: %s gap %.4f -> %.4f, fixed %d -> %d, degradation %.4f: %s", st.step, st.node,
                     st.gap_before, st.gap_after, st.fixed_before, st.fixed_after, st.degradation, st.reason)
        if chosen is not None:
            accepted.append(chosen[1])
            gap, fixed = chosen[0].gap_after, chosen[0].fixed_after
            if attribution:
                real_fixed = scorer.fixed([_as_torch(e, twin.device) for e in accepted], real_n)
            took = True
        if not took:
            stopped = "no candidate edit lowered the gap within the degradation budget"
            break
    else:
        if fixed == len(corrupt) and gap <= target:
            stopped = "target reached"
    progress.step("final checks")
    final_edits = [_as_torch(e, twin.device) for e in accepted]
    final_degr = scorer.degradation(final_edits) if accepted else 0.0
    real_gap, real_fixed = scorer.gap(final_edits, first=real_n)
    return RectifyResult(
        edits=tuple(accepted), steps=tuple(steps), localisations=tuple(localisations), n_pairs=int(len(corrupt)),
        n_real_pairs=real_n,
        gap_before=gap0, gap_after=gap, fixed_before=fixed0, fixed_after=fixed, degradation=final_degr,
        degradation_kind=kind, stats_source=stats_source, stopped_because=stopped, config=cfg, timings=timings,
        real_gap_before=real_gap0, real_gap_after=real_gap, real_fixed_after=real_fixed, criterion=criterion)
