"""The dynamic loop: plan -> (locate -> trial per layer -> accept / roll back) -> result.

  plan:   the candidate layers, where the key statistics come from, the reference inputs the
          degradation budget is checked on (held out from everything the fit uses), and the
          pairs after augmentation
  repeat (at most ``max_edits`` accepted edits):
    stop when the criterion is reached (every pair fixed, gap <= target over all pairs and
      over the given ones alone; with check pairs deciding, also their gap <=
      ``check_target``: past the target an edit is kept only when it cuts the check pairs'
      gap by POLISH_GAIN)
    key statistics and localisation on the current (edited) model; the localisation
      carries each layer's edit direction
    a trial per layer, best first: fit a rank-one edit, measure gap and degradation;
      the criterion says whether it improves and which passing trial to keep
    stop when none is kept
  return the accepted edits

Criteria (``Criterion``; each has gap / fit / improves / pick):
  "output" (the paper's setting: a Trojan or spurious feature changes the prediction):
    gap = mean total-variation distance between the softmax on x~ and the shipped model's
    softmax on x; "fixed" = same top-1 as the shipped model on x. u is fitted so the
    network output on x~ matches the shipped output on x while outputs on unlabeled clean
    inputs stay put (or the layer-local closed form, ``objective="local"``). A trial passes
    when it fixes more pairs (or as many with a smaller gap) within budget. With check
    pairs (``check_pairs``: the corruption transplanted onto stats inputs that neither the
    locality term nor the synthetic pairs use) every candidate is fitted and the passing
    one that fixes most check pairs (then the smallest gap on them) is kept: a repair must
    hold on inputs the fit never saw. Every editable layer is then a candidate, best
    localised first (``check_candidates`` bounds it; on a model with more than
    ``screen_above`` candidates each is first fitted briefly and only the ``screen_keep``
    best on the check pairs are fitted fully). Past the target, while the check pairs'
    gap exceeds ``check_target``, the loop goes on ("polishing"): an edit is kept only
    when it cuts that gap by POLISH_GAIN with no fewer check pairs fixed (on rebuilds of
    the Trojan samples with other seeds it fixed what one edit left: bench_seeds.py).
    No check pairs (no stats, ``check_pairs=0``, or one widely changed pair whose
    transplant is the additive guess): the first of the ``candidates_per_step`` best
    localised layers that passes.
  "attribution" (feature leakage: x~ and x already get the same prediction, but the
    attribution leans on a region that should not matter): gap = mean share of input
    attribution on the region where x~ differs from x, in excess of the clean twin's share.
    u and the whitened key a (d = C^-1 R a, starting at the paper's k*) are fitted together.
    Every candidate is fitted and the one with the smallest gap is kept, provided every
    given pair keeps its clean twin's class.
  "auto" (default) picks "attribution" when every given pair already behaves like its
  clean twin by the output gap, "output" otherwise.

Degradation: with labelled validation data, the drop in accuracy against the shipped model;
otherwise the share of inputs whose top-1 class changed. The inputs (``degradation_source``)
are never used by the fit: val when given; otherwise a held-out share (``holdout``) of the
stats inputs, which then stay out of C, the locality term and the augmentation; the clean
twins only when nothing else is given (then the check is in-sample and the report says so).

Static mode (``layers=...``): localisation is skipped and the given layers are edited
in turn (the "static rectifying" baseline when it is the last layer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import fit as fitting
from . import memory, progress
from .attribution import DEFAULT_STEPS, Localisation, input_attribution, locate, region_shares
from .erase import erase_edit
from .errors import EditError, InputError, LayerError, option
from .factors import FactorStore
from .layers import Layer
from .options import check_config
from .pixel import pixel_direction, pixel_factor
from .rank_one import (ACTIVATION_BUDGET, DEFAULT_LAMBDA, Direction, RankOneEdit, TorchEdit, activation_sizes,
                       edit_direction, key_statistics, pair_key_groups,
                       too_wide)
from .twin import DownstreamRunner, Twin, batch_size_of, cat_inputs
from .verify import output_shifts
from .writeback import LayerUpdate

log = logging.getLogger(__name__)

GAP_EPS = 1e-6          # a gap must fall by more than this to count as smaller (float noise)
BUDGET_SLACK = 1e-12    # a degradation equal to the budget passes (float rounding of exact fractions)
MIN_HOLDOUT_POOL = 4    # fewer stats inputs than this: nothing is held out (the check is in-sample)
FIT_BUDGET = 2 * ACTIVATION_BUDGET  # bytes of activations one forward/backward pass of the output fit keeps
LBFGS_ABOVE = 4 * ACTIVATION_BUDGET  # fit_method "auto": L-BFGS when the fit's inputs' activations exceed this
SCREEN_CACHE_BUDGET = ACTIVATION_BUDGET  # bytes of upstream values a screen's recording may keep
NORM_FLOOR = 1e-8       # mean squares the fit losses are divided by never fall below this (all-zero logits)
SHARE_FLOOR = 1e-12     # denominators of shares and gains (an all-zero attribution or channel)
SAME_VALUE = 1e-6       # a stats input 'equals' the clean twin where the pairs differ within this
POLISH_GAIN = 0.3       # past the target, an edit must cut the check pairs' gap by this share (bench_seeds.py)
SHIFT_WEIGHT = 2.0      # unlabeled degradation on stats: at least this x the mean output shift (Degradation)
FRESH_SHIFT_WEIGHT = 0.5  # the same on unlabeled val, inputs the model did not learn (Degradation)


@dataclass(frozen=True)
class RectifyConfig:
    """Every default of the method lives here (the CLI passes None for 'not given')."""

    max_edits: int = 4
    max_degradation: float = 0.01     # accuracy drop (fraction), else max(changed share, w x output shift)
    criterion: str = "auto"           # "output", "attribution" or "auto" (see module doc)
    target_gap: float = 0.1           # mean TV distance on the pairs that counts as "behaves like clean"
    target_attribution: float = 0.05  # attribution share on the changed region, in excess of the clean twin's
    objective: str = "output"         # "output" (fit u on the network output), "local" (closed form) or "erase"
                                      # (u = -W d/|d|^2: the layer no longer sees d; Conv in its pixel view, erase.py)
    key: str = "diff"                 # rows for the direction: "diff" (k~ - k) or "corrupt" (k~ weighted)
    conv_keys: str = "patch"          # Conv keys: unfolded "patch" (rank one in [out, in x taps]), "pixel" (one
                                      # channel direction at every tap, pixel.py; output criterion) or "both"
    ig_steps: int = DEFAULT_STEPS
    ig_target: str = "corrupt_logit"
    ig_reduction: str = "sum"         # positions: "sum" (signed, before the norm) or "abs"
    fit_steps: int = 200              # Adam steps (attribution fit, and the output fit with fit_method "adam")
    fit_lr: float = 0.05
    fit_method: str = "auto"          # output fit of u: "adam", "lm" (Levenberg-Marquardt; heads with more than
                                      # fit.LM_MAX_OUTPUTS classes use adam), "lbfgs" or "auto": adam, and lbfgs for
                                      # the screen_keep candidates of a screened round (models with more than
                                      # screen_above editable layers) and for fits whose inputs' activations exceed
                                      # LBFGS_ABOVE (real-size inputs, fitted in chunks); lm and lbfgs converge in
                                      # fewer passes but move the n = 20 sample rows (docs/results.md, speed section)
    lbfgs_evals: int = 25             # loss evaluations (downstream passes) of the L-BFGS fit
    attr_weight: float = 3.0          # weight of the region's attribution in the attribution fit
    attr_steps: int = 8               # IG steps inside the attribution fit
    fit_key: bool = True              # attribution fit: fit the whitened key too (False: d = C^-1 k* fixed)
    locality_weight: float = 1.0
    locality_batch: int = 16
    lam: float = DEFAULT_LAMBDA
    candidates_per_step: int = 3
    check_pairs: int = 256            # synthetic pairs held out from the fit: every candidate of a round is fitted
                                      # and the one that does best on them is kept (0: the first that improves)
    check_candidates: int = 0         # layers fitted per round when check pairs decide, best localised first
                                      # (0: every editable layer; the localisation's top 3 miss the best on badnets)
    screen: str = "closed"            # a round with more than screen_above candidates (check pairs deciding) first
    screen_steps: int = 25            # judges each with a cheap u: "adam" (screen_steps Adam steps of the output
    screen_above: int = 10            # fit; 0 steps: no screen), "closed" (the layer-local closed form, no fit) or
    screen_keep: int = 3              # "none"; only the screen_keep best on the check pairs get the full fit.
                                      # Models with at most screen_above editable layers (every sample model: 6-10)
                                      # fit each fully
    screen_check: int = 64            # check pairs a screening trial is scored on (the first this many)
    check_target: float = 0.02        # with check pairs deciding, the loop goes on past the target while their
                                      # mean TV distance exceeds this, keeping an edit only when it cuts that
                                      # distance by POLISH_GAIN (none fewer fixed); 1.0: stop at the target
    layers: tuple[str, ...] | None = None  # static mode: edit these, skip localisation
    augment: int = 16                 # synthetic pairs: the corruption transplanted onto stats inputs (0 = off)
    transplant: str = "auto"          # how: "add", "affine", "gain" or "auto" (transplant_pairs)
    holdout: float = 0.25             # share of stats held out for the degradation check when no val is given
    seed: int = 0

    def __post_init__(self):
        check_config(self)  # a bad value is an InputError naming the option (exit 2), before any work

    def replace(self, **changes) -> "RectifyConfig":
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"]) or None
        return RectifyConfig(**values)


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
    check_fixed_after: int | None = None   # check pairs (held out from the fit) fixed; None: no check pairs
    check_gap_after: float | None = None
    view: str = "patch"                    # "pixel": a Conv's pixel-view edit (pixel.py)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RectifyResult:
    edits: tuple[RankOneEdit, ...]
    steps: tuple[EditStep, ...]
    localisations: tuple[Localisation, ...]  # one per round of the loop
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
    degradation_source: str = "val"        # "val", "held-out stats", "stats" (in-sample) or "clean twins"
    degradation_count: int = 0             # inputs the degradation was measured on
    n_check_pairs: int = 0                 # synthetic pairs held out from the fit that chose among candidates
    corruption: str = ""                   # what the given pairs look like (corruption_model): "gain" = a re-colouring
    output_shift: float = 0.0              # mean TV distance of the shipped and edited outputs on those inputs
    changed_predictions: float = 0.0       # share of those inputs whose top-1 class the edits changed

    @property
    def suggests_erase(self) -> bool:
        """A failed output-fit repair of pairs that are re-colourings: a feature to remove,
        which ``objective="erase"`` does (docs/results.md, "Colour: erasing the direction")."""
        return (not self.success and self.corruption == "gain" and self.criterion == "output"
                and self.config.objective != "erase")

    @property
    def target(self) -> float:
        return self.config.target_attribution if self.criterion == "attribution" else self.config.target_gap

    @property
    def within_budget(self) -> bool:
        return self.degradation <= self.config.max_degradation + BUDGET_SLACK

    @property
    def success(self) -> bool:
        """The given pairs are fixed (synthetic ones only guide the fit) and the degradation,
        measured on inputs the fit did not use, is within budget."""
        return self.failure is None

    @property
    def failure(self) -> str | None:
        """Why ``success`` is False, in one line (None when it is True)."""
        if self.real_fixed_after < self.n_real_pairs:
            return (f"{self.n_real_pairs - self.real_fixed_after} of {self.n_real_pairs} given pair(s) not "
                    f"classified like their clean twins")
        if self.real_gap_after > self.target:
            return f"the given pairs' gap {self.real_gap_after:.4f} is above the target {self.target:g}"
        if not self.within_budget:
            return f"degradation {self.degradation:.4f} is over the budget {self.config.max_degradation:g}"
        return None

    def updates(self) -> list[LayerUpdate]:
        """Accepted edits grouped per layer (a layer may be picked more than once)."""
        order, groups = [], {}
        for e in self.edits:
            if e.layer.node not in groups:
                order.append(e.layer)
                groups[e.layer.node] = []
            groups[e.layer.node].extend(e.factors())
        return [LayerUpdate(layer=l, factors=tuple(groups[l.node])) for l in order]

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion, "target": self.target,
            "n_pairs": self.n_pairs, "n_real_pairs": self.n_real_pairs, "gap_before": self.gap_before, "gap_after": self.gap_after,
            "fixed_before": self.fixed_before, "fixed_after": self.fixed_after,
            "real_gap_before": self.real_gap_before, "real_gap_after": self.real_gap_after, "real_fixed_after": self.real_fixed_after,
            "degradation": self.degradation, "degradation_kind": self.degradation_kind,
            "degradation_source": self.degradation_source, "degradation_count": self.degradation_count,
            "output_shift": self.output_shift, "changed_predictions": self.changed_predictions,
            "n_check_pairs": self.n_check_pairs, "corruption": self.corruption,
            "stats_source": self.stats_source, "stopped_because": self.stopped_because, "success": self.success,
            "failure": self.failure,
            "edits": [e.to_dict() for e in self.edits], "steps": [s.to_dict() for s in self.steps],
            "localisations": [loc.to_dict() for loc in self.localisations], "config": asdict(self.config),
            "timings": dict(self.timings),
        }


# ------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Reference:
    """The inputs the degradation budget is checked on."""

    x: np.ndarray
    y: np.ndarray | None
    source: str   # "val", "held-out stats", "stats" or "clean twins"
    kind: str     # what the number means, for the report
    shift_weight: float = SHIFT_WEIGHT  # unlabeled: the degradation is at least this x the mean output shift

    @property
    def count(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Plan:
    candidates: tuple[Layer, ...]
    static: bool                 # layers given: no localisation
    key_x: object                # inputs of the key statistics (or a keystats.ShardedKeys)
    stats_source: str
    fit_x: np.ndarray            # inputs of the locality term
    reference: Reference
    corrupt: np.ndarray          # pairs after augmentation; the first n_real are the given ones
    clean: np.ndarray
    n_real: int
    criterion: str               # "output" or "attribution"
    check_corrupt: np.ndarray | None = None  # check pairs: synthetic, on stats inputs nothing in the fit uses
    check_clean: np.ndarray | None = None


def _candidates(twin: Twin, cfg: RectifyConfig) -> tuple[tuple[Layer, ...], bool]:
    if cfg.layers:
        pinned = tuple(twin.layer_map.get(name) for name in cfg.layers)
        for layer in pinned:
            why = layer.reason if not layer.editable else too_wide(layer)
            if why:
                raise LayerError(f"layer {layer.node!r} cannot be edited: {why}")
        return pinned, True
    editable = twin.layer_map.editable()
    for layer in editable:
        if too_wide(layer):
            log.info("layer %s is not a candidate: %s", layer.node, too_wide(layer))
    editable = [layer for layer in editable if not too_wide(layer)]
    if not editable:
        raise LayerError(f"{twin.loaded.label} has no editable layer (Conv/Gemm/MatMul with a constant weight)")
    return tuple(editable), False


def split_stats(stats_x: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs the fit may use, inputs held out for the degradation check): a seeded
    random ``share`` of the stats, at least one input; nothing held out from tiny sets."""
    n = len(stats_x)
    k = min(n - 1, max(1, int(round(share * n)))) if share > 0 and n >= MIN_HOLDOUT_POOL else 0
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return stats_x[~held], stats_x[held]


def _reference(clean, fit_stats, held, val_x, val_y) -> Reference:
    def unlabeled(x, source: str, on: str, weight: float = SHIFT_WEIGHT) -> Reference:  # Degradation's rule
        return Reference(x, None, source, f"changed predictions on {on}, or {weight:g} x their mean output shift "
                         "where larger", weight)

    if val_x is not None:
        if val_y is not None:
            return Reference(val_x, val_y, "val", "accuracy drop on val")
        return unlabeled(val_x, "val", "val", FRESH_SHIFT_WEIGHT)
    if held is not None and len(held):
        return unlabeled(held, "held-out stats", f"{len(held)} held-out stats inputs")
    if fit_stats is not None:
        return unlabeled(fit_stats, "stats", "stats (in-sample: none held out)")
    return unlabeled(clean, "clean twins", "the clean twins (in-sample)")


def make_plan(twin: Twin, corrupt: np.ndarray, clean: np.ndarray, stats_x, val_x, val_y,
              cfg: RectifyConfig, key_source=None) -> Plan:
    candidates, static = _candidates(twin, cfg)
    fit_stats, held = stats_x, None
    if stats_x is not None and val_x is None:
        fit_stats, held = split_stats(stats_x, cfg.holdout, cfg.seed)
    if fit_stats is not None:
        key_x, fit_x = fit_stats, fit_stats
        stats_source = f"stats ({len(fit_stats)} inputs)" if held is None or not len(held) else \
            f"stats ({len(fit_stats)} inputs; {len(held)} more held out for the degradation check)"
    else:
        key_x, fit_x = clean, clean
        stats_source = f"clean twins of the pairs ({len(clean)} inputs; no stats given)"
    if key_source is not None:  # a sharded stats set: C from every shard (held-out inputs included)
        key_x, stats_source = key_source, key_source.source
    criterion = _criterion_name(twin, corrupt, clean, cfg)
    if criterion == "attribution" and cfg.objective != "output":
        raise InputError(f"{option('objective', cfg.objective)} only applies to the output criterion; "
                         "the pairs call for the attribution criterion",
                         hint=f"drop {option('objective', cfg.objective)}, or pass {option('criterion', 'output')}")
    n_real = len(corrupt)
    reference = _reference(clean, fit_stats, held, val_x, val_y)
    check = (None, None)
    if fit_stats is not None:
        pool = fit_stats
        if criterion == "output":
            pool, spare = split_check(fit_stats, cfg)
            check = make_check_pairs(corrupt, clean, spare, reference, cfg)
        if cfg.augment:
            corrupt, clean = transplant_pairs(corrupt, clean, pool, cfg.augment, match=criterion == "attribution",
                                              model=cfg.transplant)
    return Plan(candidates=candidates, static=static, key_x=key_x, stats_source=stats_source, fit_x=fit_x,
                reference=reference, corrupt=corrupt, clean=clean, n_real=n_real, criterion=criterion,
                check_corrupt=check[0], check_clean=check[1])


def split_check(fit_stats: np.ndarray, cfg: RectifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(the pool of the synthetic pairs, the spare stats): up to ``check_pairs`` stats inputs
    between the locality batch (the head) and the synthetic pairs' sources (the tail), so
    that neither changes; none when the stats have no input to spare."""
    head = min(cfg.locality_batch, len(fit_stats))
    k = max(0, min(cfg.check_pairs, len(fit_stats) - head - cfg.augment))
    return np.concatenate([fit_stats[:head], fit_stats[head + k:]]), fit_stats[head: head + k]


def make_check_pairs(corrupt, clean, spare: np.ndarray, reference: Reference, cfg: RectifyConfig):
    """(corrupted, clean) check pairs: the given pairs' corruption transplanted onto inputs
    nothing in the fit uses: the spare stats, then the degradation check's inputs when they
    are held out (val, held-out stats), at most ``check_pairs``; (None, None) when none, or
    when the transplant is "add": a single pair that changes the input widely does not
    identify the corruption (a blend's ghost of the pair's own digit rides along), so pairs
    made by that guess would judge the candidates on the wrong corruption."""
    if transplant_model(corrupt, clean, cfg.transplant) == "add":
        return None, None
    sources = [spare]
    if reference.source in ("val", "held-out stats"):
        sources.append(reference.x)
    pool = np.concatenate(sources)[: cfg.check_pairs]
    if not len(pool):
        return None, None
    c, k = transplant_pairs(corrupt, clean, pool, len(pool), model=cfg.transplant)
    return c[len(corrupt):], k[len(corrupt):]


def _criterion_name(twin: Twin, corrupt: np.ndarray, clean: np.ndarray, cfg: RectifyConfig) -> str:
    if cfg.criterion in ("output", "attribution"):
        return cfg.criterion
    if cfg.criterion != "auto":
        raise ValueError(f"unknown criterion {cfg.criterion!r}")
    # leakage: the given pairs already behave like their clean twins
    p = torch.softmax(torch.as_tensor(twin.run(corrupt)), 1)
    q = torch.softmax(torch.as_tensor(twin.run(clean)), 1)
    same = bool((p.argmax(1) == q.argmax(1)).all())
    return "attribution" if same and float((0.5 * (p - q).abs().sum(1)).mean()) <= cfg.target_gap else "output"


AFFINE_RIDGE = 1e-4   # per-element affine fit of the corruption: ridge (x n pairs) toward a = 1
GAIN_RESIDUAL = 0.05  # a per-pair channel gain "explains" a pair below this share of ||x~ - x||
PASTE_SHARE = 0.25    # one pair that differs from its clean twin on at most this share of elements: a pasted patch
TRANSPLANTS = ("auto", "add", "affine", "gain", "paste")


def corruption_model(corrupt: np.ndarray, clean: np.ndarray) -> str:
    """The transplant that ``auto`` picks for these pairs (see ``transplant_pairs``):
    "gain" when every pair is its clean twin with each channel scaled (a re-colouring,
    inputs with 2+ channels), else "affine" with two or more pairs, else (one pair) "paste"
    when the pair differs on at most PASTE_SHARE of its elements (a localised trigger: a
    patch replaces what lies under it), else "add"."""
    n = len(corrupt)
    if corrupt.ndim >= 3 and corrupt.shape[1] > 1:
        c = corrupt.reshape(n, corrupt.shape[1], -1).astype(np.float64)
        k = clean.reshape(n, clean.shape[1], -1).astype(np.float64)
        g = (c * k).sum(2) / np.maximum((k * k).sum(2), SHARE_FLOOR)
        resid = np.linalg.norm((c - g[:, :, None] * k).reshape(n, -1), axis=1)
        diff = np.linalg.norm((c - k).reshape(n, -1), axis=1)
        if np.all(resid <= GAIN_RESIDUAL * np.maximum(diff, SHARE_FLOOR)):
            return "gain"
    if n >= 2:
        return "affine"
    return "paste" if float((corrupt != clean).mean()) <= PASTE_SHARE else "add"


def transplant_model(corrupt: np.ndarray, clean: np.ndarray, model: str) -> str:
    """The transplant ``model`` resolves to for these pairs ("auto": ``corruption_model``;
    "affine" with one pair: "add")."""
    if model == "auto":
        model = corruption_model(corrupt, clean)
    return "add" if model == "affine" and len(corrupt) < 2 else model


def transplant_pairs(corrupt: np.ndarray, clean: np.ndarray, pool: np.ndarray, m: int, *, match: bool = False,
                     model: str = "add"):
    """Append up to ``m`` synthetic pairs (stats input s, s corrupted the way the given
    pairs are), clipped to the value range of the given pairs. ``model``:

    "add"    s + (x~_j - x_j), j cycling over the pairs: exact for a pasted patch on a
             constant background, an approximation for blended triggers;
    "paste"  the pair's corrupted values where it differs from its clean twin, s elsewhere
             (j cycling): exact for a patch that replaces what lies under it, whatever
             the source has there ("add" leaves a ghost where the pair's own digit was);
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
        ok = gap.max(axis=1) <= SAME_VALUE if support.any() else np.zeros(len(pool), bool)
        if ok.any():
            pool = pool[ok]
    else:
        model = transplant_model(corrupt, clean, model)
    m = min(m, len(pool))
    lo = min(float(corrupt.min()), float(clean.min()))
    hi = max(float(corrupt.max()), float(clean.max()))
    if model == "gain":
        src, syn = _gain_transplant(corrupt, clean, pool, m, lo, hi)
        if not len(syn):
            return corrupt, clean
    else:
        src = pool[len(pool) - m:]  # the tail: the locality batch uses the head
        if model == "affine":
            syn = _affine_transplant(corrupt, clean, src, lo, hi)
        elif model == "paste":
            j = np.arange(m) % len(corrupt)
            syn = np.where(corrupt[j] != clean[j], corrupt[j], src)
        else:
            delta = (corrupt - clean).astype(np.float64)
            syn = np.clip(src.astype(np.float64) + delta[np.arange(m) % len(corrupt)], lo, hi)
    return np.concatenate([corrupt, syn.astype(corrupt.dtype)]), np.concatenate([clean, src.astype(clean.dtype)])


def _gain_transplant(corrupt, clean, pool, m: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(sources, synthetic inputs): pool inputs with pair j's per-channel gain, the tail of
    the pool first; those that keep less than half of their mass are skipped."""
    n = len(corrupt)
    c = corrupt.reshape(n, corrupt.shape[1], -1).astype(np.float64)
    k = clean.reshape(n, clean.shape[1], -1).astype(np.float64)
    gain = (c * k).sum(2) / np.maximum((k * k).sum(2), SHARE_FLOOR)  # [n, channels]
    shape = (corrupt.shape[1],) + (1,) * (corrupt.ndim - 2)
    src, syn = [], []
    for i in range(len(pool) - 1, -1, -1):  # the tail first: the locality batch uses the head
        s = pool[i].astype(np.float64)
        t = np.clip(s * gain[len(syn) % n].reshape(shape), lo, hi)
        if np.abs(t).sum() >= 0.5 * np.abs(s).sum():
            src.append(pool[i])
            syn.append(t)
        if len(syn) >= m:
            break
    if not syn:
        return pool[:0], np.zeros((0,) + corrupt.shape[1:])
    return np.stack(src), np.stack(syn)


def _affine_transplant(corrupt, clean, src, lo: float, hi: float) -> np.ndarray:
    """Per element x~ = a x + b over the given pairs (ridge toward a = 1), applied to ``src``."""
    n, m = len(corrupt), len(src)
    x = clean.reshape(n, -1).astype(np.float64)
    t = corrupt.reshape(n, -1).astype(np.float64)
    lam = AFFINE_RIDGE * n
    sx, sxx, st, sxt = x.sum(0), (x * x).sum(0), t.sum(0), (x * t).sum(0)
    det = (sxx + lam) * n - sx * sx  # > 0: lam > 0 and Cauchy-Schwarz
    a = ((sxt + lam) * n - sx * st) / det
    b = ((sxx + lam) * st - sx * (sxt + lam)) / det
    return np.clip(src.reshape(m, -1).astype(np.float64) * a + b, lo, hi).reshape(src.shape)


# ------------------------------------------------------------------------- degradation


class Degradation:
    """Degradation of a set of edits against the shipped model on the reference inputs:
    with labels, the accuracy drop; without, the share of inputs whose top-1 class changed,
    or the reference's ``shift_weight`` x their mean output shift where that is larger (the
    total-variation distance between the shipped and the edited class probabilities:
    ``verify.output_shifts``). Stats are often the model's own training images, predicted
    too confidently for a top-1 change to show, and their outputs move less than fresh
    inputs' (3.6-11x less on the rebuilt samples): on deep_blend and resnet_blend rebuilt
    with seeds 0 and 4, edits that cost 2.2 points of held-out accuracy changed none of 50
    held-out stats inputs' top-1 classes and shifted their outputs by 0.89 and 0.66 %,
    where every edit that cost at most 1.4 points shifted them by at most 0.25 %: on stats
    the weight is SHIFT_WEIGHT (2). Unlabeled val is fresh inputs, whose outputs move that
    much more: FRESH_SHIFT_WEIGHT (0.5; at 2, 171 of 260 pinned edits that cost at most 0.5
    point were refused on val: bench_degradation.py). docs/results.md, "The degradation check on
    memorised stats" and "... on unlabeled val"."""

    def __init__(self, twin: Twin, ref: Reference):
        self.twin, self.ref = twin, ref
        self.base_logits = twin.run(ref.x)
        self.base_pred = self.base_logits.argmax(1)
        self.base_acc = float((self.base_pred == ref.y).mean()) if ref.y is not None else None

    def __call__(self, edits) -> float:
        return self.of(self.logits(edits))

    def logits(self, edits) -> np.ndarray:
        with self.twin.applied(edits):
            return self.twin.run(self.ref.x)

    def many(self, prev, trials) -> list[float]:
        """``self(prev + [t])`` of every trial ``t``, each recomputing only what follows
        its layer (``recorded_logits``)."""
        logits = recorded_logits(self.twin, prev, trials, self.ref.x)
        if logits is None:
            return [self(prev + [t]) for t in trials]
        return [self.of(a) for a in logits]

    def parts(self, logits: np.ndarray) -> dict:
        """What the degradation of edits with these reference ``logits`` is made of."""
        pred = logits.argmax(1)
        shift = float(output_shifts(self.base_logits, logits).mean()) if len(logits) else 0.0
        out = {"changed_predictions": float((pred != self.base_pred).mean()), "output_shift": shift}
        if self.ref.y is not None:
            out["accuracy_drop"] = self.base_acc - float((pred == self.ref.y).mean())
        return out

    def of(self, logits: np.ndarray) -> float:
        parts = self.parts(logits)
        if self.ref.y is not None:
            return parts["accuracy_drop"]
        return max(parts["changed_predictions"], self.ref.shift_weight * parts["output_shift"])


def recorded_logits(twin: Twin, prev: list[TorchEdit], trials: list[TorchEdit],
                    x: np.ndarray) -> list[np.ndarray] | None:
    """Every trial's logits on ``x`` with ``prev + [t]`` applied: the values upstream of
    every trial's layer are recorded once (``DownstreamRunner``) and each trial recomputes
    only what follows its layer. The recording keeps at most SCREEN_CACHE_BUDGET: when the
    inputs' recording is larger (real-size inputs: ResNet-50 at 224x224 keeps 46 MiB per
    input), they are recorded and scored a chunk of inputs at a time. None where nothing
    can be recorded (a model with several inputs, no trials): run each trial whole."""
    if len(twin.inputs) != 1 or not trials or not len(x):
        return None
    layers = list({t.layer.node: t.layer for t in trials}.values())
    per_input = recording_bytes(twin, prev, layers, x[:1])
    if not per_input:
        return None
    chunk = max(1, SCREEN_CACHE_BUDGET // per_input)
    logits = [[] for _ in trials]
    for lo in range(0, len(x), chunk):
        for out, part in zip(logits, _recorded_chunk(twin, prev, trials, layers, x[lo:lo + chunk])):
            out.append(part)
    return [np.concatenate(parts) for parts in logits]


def _recorded_chunk(twin: Twin, prev: list[TorchEdit], trials: list[TorchEdit], layers: list[Layer],
                    x: np.ndarray) -> list[np.ndarray]:
    """Every trial's logits on ``x``, from one recording of the values upstream of ``layers``."""
    rows = twin.pass_rows(x[:1])
    with torch.no_grad(), twin.applied(prev):
        runner = DownstreamRunner(twin, layers, twin.to_tensor(x), rows=rows)
    logits = []
    for t in trials:
        with torch.no_grad(), twin.applied(prev + [t]):
            logits.append(np.concatenate([runner(slice(i, i + rows), layer=t.layer).double().cpu().numpy()
                                          for i in range(0, runner.n_rows, rows)]))
    del runner
    memory.trim()
    return logits


def recording_bytes(twin: Twin, prev: list[TorchEdit], layers: list[Layer], x1: np.ndarray) -> int:
    """Bytes per input of a recording of the values upstream of ``layers``."""
    with torch.no_grad(), twin.applied(prev):
        return DownstreamRunner.row_bytes(twin, layers, twin.to_tensor(x1))


# --------------------------------------------------------------------------- criteria


@dataclass(frozen=True)
class Fitted:
    u: torch.Tensor              # float32
    d: torch.Tensor              # float32
    loss: float | None
    view: str = "patch"


class Criterion:
    """What "the corrupted input behaves like its clean twin" means, and how to fit for it."""

    name = ""
    try_all = False  # fit every candidate and keep the best (else the first that improves)

    def __init__(self, twin: Twin, plan: Plan, cfg: RectifyConfig):
        self.twin, self.cfg, self.n_real = twin, cfg, plan.n_real
        self.candidates, self.x1, self._input_bytes = plan.candidates, plan.corrupt[:1], None
        self.corrupt, self.n = plan.corrupt, len(plan.corrupt)
        self.target_p = torch.softmax(torch.as_tensor(twin.run(plan.clean)), 1)  # shipped model on clean twins
        self.target_cls = self.target_p.argmax(1)
        with torch.no_grad():
            self.corrupt_t = twin.to_tensor(plan.corrupt)
            self.target_logits = twin.forward(twin.to_tensor(plan.clean)).float()
            self.loc_x = twin.to_tensor(plan.fit_x[: cfg.locality_batch])
            self.loc_ref = twin.forward(self.loc_x).float()
        self.check = plan.check_corrupt if plan.check_corrupt is not None and len(plan.check_corrupt) else None
        self.static = plan.static
        self.check_p = None
        if self.check is not None:  # the shipped model on the check pairs' clean sides
            self.check_p = torch.softmax(torch.as_tensor(twin.run(plan.check_clean)), 1)

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
                     real_fixed=int(ok[:r].sum()), **check)

    def per_pair_gap(self, p: torch.Tensor, edits) -> torch.Tensor:
        raise NotImplementedError

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
        with self.twin.applied(prev):
            # upstream of the layer stays cached; recorded a few rows per pass (Twin.run's budget)
            runner = DownstreamRunner(self.twin, layer, xs, rows=self.twin.pass_rows(self.x1))

        def out(u, rows=None):
            with self.twin.applied(prev + [TorchEdit(layer, u, d, view)]):
                return runner(rows)

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

    def _fit_chunk(self, budget: int = FIT_BUDGET) -> int:
        """Inputs per forward/backward pass of the output fit: activations within ``budget``
        (estimated from one input through every candidate layer, as the localisation does)."""
        if self._input_bytes is None:
            sizes = activation_sizes(self.twin, list(self.candidates), self.x1)
            self._input_bytes = 4 * sum(i + 3 * o for i, o, _ in sizes.values())
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
        # lexicographic: more pairs fixed, or as many fixed and a smaller gap
        if after.fixed > before.fixed or (after.fixed == before.fixed and after.gap < before.gap - GAP_EPS):
            return None
        return "neither more pairs fixed nor a smaller gap"

    @staticmethod
    def _polishes(before: Score, after: Score) -> str | None:
        """Past the target: the check pairs' gap falls by POLISH_GAIN with no smaller share
        of them fixed (shares: a screening trial scores fewer)."""
        fewer = after.check_fixed * before.check_count < before.check_fixed * after.check_count
        if not fewer and after.check_gap < (1 - POLISH_GAIN) * before.check_gap:
            return None
        return f"the check pairs did not improve (gap {after.check_gap:.4f} against {before.check_gap:.4f})"

    def pick(self, passing):
        if self.check is not None:  # generalisation first: the check pairs were never fitted
            return min(passing, key=lambda t: (-t.after.check_fixed, t.after.check_gap, -t.after.fixed, t.after.gap),
                       default=None)
        return min(passing, key=lambda t: (-t.after.fixed, t.after.gap), default=None)


class AttributionShare(Criterion):
    name = "attribution"
    try_all = True  # the output-gap localisation does not rank layers by what this criterion needs

    def __init__(self, twin, plan, cfg):
        super().__init__(twin, plan, cfg)
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


def make_criterion(twin: Twin, plan: Plan, cfg: RectifyConfig) -> Criterion:
    return (AttributionShare if plan.criterion == "attribution" else OutputGap)(twin, plan, cfg)


# ------------------------------------------------------------------------------ trial


@dataclass(frozen=True)
class Option:
    """A layer the step may edit, with its direction (from the localisation) and key statistics."""

    layer: Layer
    score: float | None
    direction: Direction
    factor: Callable[[], torch.Tensor]  # R of the layer's key statistics, read on demand


@dataclass(frozen=True)
class Trial:
    step: EditStep
    edit: RankOneEdit
    after: Score


class Timings(dict):
    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0


def _step(layer: Layer, score, before: Score, after: Score, degradation: float, reason: str,
          edit: RankOneEdit, loss) -> EditStep:
    # step 0: numbered by _choose, in the order the round reports
    return EditStep(step=0, node=layer.node, initializer=layer.initializer, score=score, view=edit.view,
                    gap_before=before.gap, gap_after=after.gap, fixed_before=before.fixed, fixed_after=after.fixed,
                    degradation=degradation, accepted=reason == "accepted", reason=reason,
                    u_norm=float(np.linalg.norm(edit.u)), d_norm=float(np.linalg.norm(edit.d)), fit_loss=loss,
                    check_fixed_after=after.check_fixed if np.isfinite(after.check_gap) else None,
                    check_gap_after=after.check_gap if np.isfinite(after.check_gap) else None)


def trial(crit: Criterion, degradation: Degradation, option: Option, prev: list[TorchEdit], state: Score,
          timings: Timings, steps: int | None = None, method: str | None = None) -> Trial:
    """Fit an edit of one layer on top of ``prev`` and judge it (nothing is applied).
    ``steps``: a screening trial (Adam steps of its fit, 0: the closed form), scored on the
    first ``screen_check`` check pairs, its degradation left unmeasured (NaN; ``_budgeted``);
    ``method``: the fit method when not the config's."""
    edit, loss = _fitted(crit, option, prev, timings, steps, method)
    after, degr = None, float("nan")
    if edit.finite:
        progress.step(f"check {option.layer.node}")
        with timings("check"):
            edits = prev + [edit.to_torch(crit.twin.device)]
            after = crit.score(edits, None if steps is None else crit.cfg.screen_check)
            degr = degradation(edits) if steps is None else float("nan")
    return _judged(crit, option, state, (edit, loss), after, degr, screening=steps is not None)


def _full_trials(crit: Criterion, degradation: Degradation, options: list[Option], prev: list[TorchEdit],
                 state: Score, timings: Timings, method: str | None) -> list[Trial]:
    """``trial`` of every option, fitted one after another and then judged together: their
    scores and degradations from recordings of the values upstream of their layers
    (``recorded_logits``), where each trial ran the whole network on the pairs, the check
    pairs and the reference inputs."""
    fits = [_fitted(crit, opt, prev, timings, method=method) for opt in options]
    finite = [i for i, (edit, _) in enumerate(fits) if edit.finite]
    edits = [fits[i][0].to_torch(crit.twin.device) for i in finite]
    progress.step(f"check {len(finite)} trials")
    with timings("check"):
        after = dict(zip(finite, crit.scores(prev, edits)))
        degr = dict(zip(finite, degradation.many(prev, edits)))
    return [_judged(crit, opt, state, fits[i], after.get(i), degr.get(i, float("nan")), screening=False)
            for i, opt in enumerate(options)]


def _in_turn(crit: Criterion, degradation: Degradation, options: list[Option], prev: list[TorchEdit],
             state: Score, timings: Timings) -> list[Trial]:
    """``trial`` of the options in order, up to the first that passes."""
    trials = []
    for opt in options:
        trials.append(trial(crit, degradation, opt, prev, state, timings))
        if trials[-1].step.accepted:
            break
    return trials


def _fitted(crit: Criterion, option: Option, prev: list[TorchEdit], timings: Timings, steps: int | None = None,
            method: str | None = None) -> tuple[RankOneEdit, float | None]:
    """(the edit of ``option``'s layer fitted on top of ``prev``, the fit's loss)."""
    layer = option.layer
    how = "" if steps is None else f" ({f'{steps} steps' if steps else 'closed form'}, screening)"
    progress.step(f"fit {layer.node}{how}")
    with timings("fit"):
        fitted = crit.fit(layer, option.direction, option.factor, prev, steps, method)
    memory.trim()  # the fit's cached upstream values and activations are freed
    return RankOneEdit(layer=layer, u=fitted.u.detach().double().cpu().numpy(),
                       d=fitted.d.detach().double().cpu().numpy(), view=fitted.view), fitted.loss


def _judged(crit: Criterion, option: Option, state: Score, fitted: tuple, after: Score | None, degr: float, *,
            screening: bool) -> Trial:
    """The trial of a fitted edit scored ``after`` (None: its factors are not finite);
    a full trial is checked against the degradation budget."""
    (edit, loss), layer = fitted, option.layer
    if after is None:
        return Trial(_step(layer, option.score, state, state, float("nan"), "non-finite factors", edit, loss),
                     edit, state)
    why = crit.improves(state, after)
    t = Trial(_step(layer, option.score, state, after, degr, "accepted" if why is None else f"rolled back: {why}",
                    edit, loss), edit, after)
    return t if screening else _budgeted(crit, t, degr)


def _budgeted(crit: Criterion, t: Trial, degr: float) -> Trial:
    """An accepted trial with its measured degradation ``degr``, rolled back when that
    exceeds the budget (or is not a number)."""
    if not t.step.accepted:
        return t
    budget = crit.cfg.max_degradation
    if not degr <= budget + BUDGET_SLACK:
        return Trial(replace(t.step, degradation=degr, accepted=False,
                             reason=f"rolled back: degradation {degr:.4f} > budget {budget:.4f}"), t.edit, t.after)
    return Trial(replace(t.step, degradation=degr), t.edit, t.after)


def _screen(crit: Criterion, degradation: Degradation, options: list[Option], prev, state: Score,
            timings: Timings) -> tuple[list[EditStep], list[Option]]:
    """Every option judged with a cheap u (``OutputGap.screen_steps``) on the first
    ``screen_check`` check pairs (every cheap u first, then all scored together:
    ``Criterion.scores``); returns (the steps of those screened out, the
    ``screen_keep`` best options in their order). Best: passing, then most check pairs
    fixed, then the smallest gap on them (what ``OutputGap.pick`` prefers). The
    degradation is measured in that order, on the trials that improve, until
    ``screen_keep`` pass the budget: the same choice as measuring all. Step numbers are
    given by ``_choose``."""
    fits = [_fitted(crit, opt, prev, timings, crit.screen_steps) for opt in options]
    finite = [i for i, (edit, _) in enumerate(fits) if edit.finite]
    progress.step(f"check {len(finite)} screening trials")
    with timings("check"):
        scores = dict(zip(finite, crit.scores(prev, [fits[i][0].to_torch(crit.twin.device) for i in finite],
                                              crit.cfg.screen_check)))
    short = [(opt, _judged(crit, opt, state, fits[i], scores.get(i), float("nan"), screening=True))
             for i, opt in enumerate(options)]
    keep = _best(crit, degradation, short, prev, timings)
    how = f"{crit.screen_steps} Adam steps" if crit.screen_steps else "the closed form"
    out = [replace(t.step, accepted=False, reason=f"screened out after {how} "
                   f"({t.after.check_fixed} of {t.after.check_count} check pairs fixed"
                   + ("" if t.step.accepted else f"; {t.step.reason}") + ")")
           for opt, t in short if id(opt) not in keep]
    return out, [opt for opt in options if id(opt) in keep]


def _best(crit: Criterion, degradation: Degradation, short: list, prev, timings: Timings) -> set[int]:
    """The ids of the ``screen_keep`` best screened options (``short``: (option, trial)
    pairs, their trials replaced by budgeted ones where measured); options, not nodes: a
    Conv may be in two views. The degradations are measured in order, as many at a time
    as options are still needed (``Degradation.many``: one recording for them). A closed
    form has no locality term, so its output shift is larger than its fitted edit's would
    be; reading it anyway keeps the risky layers out (docs/results.md, "The degradation check on
    memorised stats": without it, deep_blend rebuilt with seed 0 hid a 2.2-point drop)."""
    def by_check(i):
        a = short[i][1].after
        return -a.check_fixed, a.check_gap, -a.fixed, a.gap

    n_keep, passing = crit.cfg.screen_keep, []
    order = sorted((i for i in range(len(short)) if short[i][1].step.accepted), key=by_check)
    while order and len(passing) < n_keep:
        batch, order = order[: n_keep - len(passing)], order[n_keep - len(passing):]
        with timings("check"):
            degr = degradation.many(prev, [short[i][1].edit.to_torch(crit.twin.device) for i in batch])
        for i, value in zip(batch, degr):
            opt, t = short[i]
            short[i] = opt, _budgeted(crit, t, value)
            if short[i][1].step.accepted:
                passing.append(i)
    rest = [i for i in sorted(range(len(short)), key=by_check) if i not in passing]
    return {id(short[i][0]) for i in passing + rest[: n_keep - len(passing)]}


# ------------------------------------------------------------------------------- loop


class KeyCache:
    """Key statistics of the candidates on the current (edited) model. An edit of layer L
    changes the keys of layers after L only (graph order is topological), so after an
    accepted edit only those are recomputed; the others are reused as they are. Large
    sets of factors are kept on disk between uses (``factors.FactorStore``)."""

    def __init__(self, twin: Twin, plan: Plan, cfg: RectifyConfig):
        self.twin, self.plan, self.cfg = twin, plan, cfg
        self.stats = FactorStore()

    def current(self, prev: list[TorchEdit]) -> FactorStore:
        missing = [layer for layer in self.plan.candidates if layer.node not in self.stats]
        if missing:
            self.stats.update(key_statistics(self.twin, missing, self.plan.key_x, edits=prev, lam=self.cfg.lam,
                                             source=self.plan.stats_source))
        return self.stats

    def edited(self, layer: Layer) -> None:
        for other in self.plan.candidates:
            if other.node_index > layer.node_index:
                self.stats.discard(other.node)

    def close(self) -> None:
        self.stats.close()


def _options(twin: Twin, plan: Plan, prev: list[TorchEdit], done: int, cfg: RectifyConfig, timings: Timings,
             localisations: list, cache: KeyCache) -> list[Option]:
    """The layers this step may edit, best first, each with its direction."""
    progress.step(f"round {done + 1}: key statistics ({len(plan.candidates)} layers)")
    with timings("key_statistics"):
        stats = cache.current(prev)
    with timings("localisation"):
        if plan.static:
            turn = done % len(plan.candidates)
            layers = list(plan.candidates[turn:] + plan.candidates[:turn])
            options = []
            for layer, keys in pair_key_groups(twin, layers, plan.corrupt, plan.clean, edits=prev):
                try:
                    direction = edit_direction(stats[layer.node], keys, key=cfg.key)
                except EditError as err:
                    log.info("layer %s skipped: %s", layer.node, err.message)
                    continue
                options.append(Option(layer, None, direction, _factor_of(stats, layer)))
            return _edit_views(twin, plan, prev, options, cfg)
        # localisation attributes the given pairs only (the paper's method)
        progress.step(f"round {done + 1}: localisation")
        r = plan.n_real
        loc = locate(twin, list(plan.candidates), plan.corrupt[:r], plan.clean[:r], stats, edits=prev,
                     steps=cfg.ig_steps, target=cfg.ig_target, key=cfg.key, reduction=cfg.ig_reduction,
                     key_pairs=(plan.corrupt, plan.clean))
    localisations.append(loc)
    n = cfg.candidates_per_step
    if plan.criterion == "output" and plan.check_corrupt is not None and len(plan.check_corrupt):
        n = cfg.check_candidates or None  # the check pairs judge every candidate: each one fitted
    options = [Option(a.layer, a.score, a.direction, _factor_of(stats, a.layer)) for a in loc.ranked[:n]]
    with timings("localisation"):
        return _edit_views(twin, plan, prev, options, cfg)


def _edit_views(twin: Twin, plan: Plan, prev: list[TorchEdit], options: list[Option],
                cfg: RectifyConfig) -> list[Option]:
    """The options in the views ``conv_keys`` asks for; with ``objective="erase"`` a Conv in
    its pixel view only, each option with its erasing u."""
    if cfg.objective != "erase":
        return _with_pixel_views(twin, plan, prev, options, cfg.conv_keys, cfg.lam)
    return _erasing(twin, plan, prev, _with_pixel_views(twin, plan, prev, options, "pixel", cfg.lam))


def _erasing(twin: Twin, plan: Plan, prev: list[TorchEdit], options: list[Option]) -> list[Option]:
    """``objective="erase"``: each option's u (in ``u_local``) erases its direction from the
    layer's keys (erase.py); an option whose direction cannot be erased is skipped."""
    out = []
    for opt in options:
        try:
            u, d = erase_edit(twin, opt.layer, opt.direction.d, opt.direction.view, prev, plan.corrupt)
        except EditError as err:
            log.info("layer %s (%s view) skipped: %s", opt.layer.node, opt.direction.view, err.message)
            continue
        out.append(replace(opt, direction=replace(opt.direction, d=d, u_local=u)))
    return out


def _with_pixel_views(twin: Twin, plan: Plan, prev: list[TorchEdit], options: list[Option], views: str,
                      lam: float) -> list[Option]:
    """``views`` "pixel" / "both": every Conv option in its pixel view (pixel.py) in
    place of / right after its patch view, with the same localisation score. Output
    criterion only (the attribution fit moves a whitened patch key). Directions of the
    layer's earlier pixel edits are projected out of the new one's."""
    if views == "patch" or plan.criterion != "output":
        return options
    out = []
    for opt in options:
        if views == "both" or opt.layer.op != "Conv":
            out.append(opt)
        if opt.layer.op != "Conv":
            continue
        used = [e.d for e in prev if e.view == "pixel" and e.layer.node == opt.layer.node]
        try:
            chol = pixel_factor(twin, opt.layer, plan.fit_x, edits=prev, lam=lam)
            direction = pixel_direction(twin, opt.layer, chol, plan.corrupt, plan.clean, edits=prev, used=used)
        except EditError as err:
            log.info("layer %s (pixel view) skipped: %s", opt.layer.node, err.message)
            continue
        out.append(Option(opt.layer, opt.score, direction, lambda c=chol: c))
    return out


def _factor_of(stats, layer: Layer) -> Callable[[], torch.Tensor]:
    return lambda: stats[layer.node].chol


def _choose(crit: Criterion, degradation: Degradation, options: list[Option], prev, state: Score, first: int,
            timings: Timings) -> tuple[list[EditStep], Trial | None]:
    """Try the options in order (after a screen, when the criterion screens); the
    criterion picks among those that pass."""
    for opt in options:
        if opt.direction.u_local is None:
            log.info("layer %s skipped: the edit direction misses every corrupted key", opt.layer.node)
    options = [opt for opt in options if opt.direction.u_local is not None]
    screened, method = [], None
    if crit.screens(len(options)):
        screened, options = _screen(crit, degradation, options, prev, state, timings)
        method = "lbfgs" if crit.cfg.fit_method == "auto" else None
    trials = (_full_trials(crit, degradation, options, prev, state, timings, method) if crit.try_all
              else _in_turn(crit, degradation, options, prev, state, timings))
    chosen = crit.pick([t for t in trials if t.step.accepted])
    steps = screened + [t.step if t is chosen or not t.step.accepted
                        else replace(t.step, accepted=False, reason=f"not kept: {chosen.step.node} did better")
                        for t in trials]
    steps = [replace(s, step=first + i + 1) for i, s in enumerate(steps)]  # numbered here, in the order reported
    for s in steps:
        log.info("step %d: %s gap %.4f -> %.4f, fixed %d -> %d, check pairs fixed %s, degradation %.4f: %s",
                 s.step, s.node, s.gap_before, s.gap_after, s.fixed_before, s.fixed_after, s.check_fixed_after,
                 s.degradation, s.reason)
    return steps, chosen


def rectify(twin: Twin, corrupt: np.ndarray, clean: np.ndarray, *, stats_x: np.ndarray | None = None,
            val_x: np.ndarray | None = None, val_y: np.ndarray | None = None,
            config: RectifyConfig | None = None, key_source=None) -> RectifyResult:
    """``key_source``: a ``keystats.ShardedKeys`` standing in for ``stats_x`` in the key
    statistics (a sharded stats set; ``stats_x`` is then its first shard, for the rest)."""
    cfg = config or RectifyConfig()
    torch.manual_seed(cfg.seed)
    progress.step("prepare the pairs (criterion, synthetic pairs, reference outputs)")
    plan = make_plan(twin, corrupt, clean, stats_x, val_x, val_y, cfg, key_source)
    crit = make_criterion(twin, plan, cfg)
    degradation = Degradation(twin, plan.reference)
    timings = Timings(key_statistics=0.0, localisation=0.0, fit=0.0, check=0.0)
    accepted: list[RankOneEdit] = []
    steps: list[EditStep] = []
    localisations: list[Localisation] = []
    start = state = crit.score([])
    cache = KeyCache(twin, plan, cfg)
    try:
        state, stopped = _loop(crit, degradation, twin, plan, cfg, cache, timings, accepted, steps, localisations, state)
    finally:
        cache.close()
    if crit.reached(state):
        stopped = "target reached"
    return _result(plan, crit, degradation, cfg, accepted, steps, localisations, start, state, stopped, timings)


def _loop(crit: Criterion, degradation: Degradation, twin: Twin, plan: Plan, cfg: RectifyConfig, cache: KeyCache,
          timings: Timings, accepted: list, steps: list, localisations: list, state: Score) -> tuple[Score, str]:
    """The dynamic loop: localise, fit, check, accept, until the criterion is done (the
    target reached and, with check pairs, ``polishing`` over; ``accepted``, ``steps`` and
    ``localisations`` filled in). Returns (state, why it stopped)."""
    stopped = "max edits reached"
    while not crit.done(state) and len(accepted) < cfg.max_edits:
        prev = [e.to_torch(twin.device) for e in accepted]
        options = _options(twin, plan, prev, len(accepted), cfg, timings, localisations, cache)
        if not options:
            return state, "no layer separates corrupted from clean keys"
        tried, chosen = _choose(crit, degradation, options, prev, state, len(steps), timings)
        steps += tried
        if chosen is None:
            return state, "no candidate edit lowered the gap within the degradation budget"
        accepted.append(chosen.edit)
        cache.edited(chosen.edit.layer)
        state = chosen.after
    return state, stopped


def _final_degradation(degradation: Degradation, accepted: list, steps: list) -> tuple[float, dict]:
    """(the degradation of every accepted edit together, what it is made of): the one
    measured on the last accepted step (its trial applied exactly these edits), measured
    again only when that step has none; its parts from one run of the reference inputs."""
    if not accepted:
        return 0.0, {"changed_predictions": 0.0, "output_shift": 0.0}
    logits = degradation.logits([e.to_torch(degradation.twin.device) for e in accepted])
    last = next(s for s in reversed(steps) if s.accepted)
    return (last.degradation if np.isfinite(last.degradation) else degradation.of(logits)), degradation.parts(logits)


def _result(plan: Plan, crit: Criterion, degradation: Degradation, cfg, accepted, steps, localisations,
            start: Score, state: Score, stopped: str, timings) -> RectifyResult:
    progress.step("final checks")
    ref = plan.reference
    degr, parts = _final_degradation(degradation, accepted, steps)
    return RectifyResult(
        edits=tuple(accepted), steps=tuple(steps), localisations=tuple(localisations), n_pairs=len(plan.corrupt),
        n_real_pairs=plan.n_real, gap_before=start.gap, gap_after=state.gap, fixed_before=start.fixed,
        fixed_after=state.fixed, degradation=degr,
        degradation_kind=ref.kind,
        stats_source=plan.stats_source, stopped_because=stopped, config=cfg, timings=dict(timings),
        real_gap_before=start.real_gap, real_gap_after=state.real_gap, real_fixed_after=state.real_fixed,
        criterion=crit.name, degradation_source=ref.source, degradation_count=ref.count,
        n_check_pairs=0 if crit.check is None else len(crit.check),
        corruption="" if plan.corrupt.dtype.names else corruption_model(plan.corrupt[:plan.n_real],
                                                                         plan.clean[:plan.n_real]),
        output_shift=parts["output_shift"], changed_predictions=parts["changed_predictions"])
