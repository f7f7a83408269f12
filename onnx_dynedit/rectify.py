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

Criteria (criteria.py): what "behaves like its clean twin" means, how an edit is fitted
for it, and which trial is kept: "output" (a prediction to fix), "attribution" (feature
leakage), "auto" picks.

Degradation (degradation.py): with labelled validation data, the drop in accuracy against
the shipped model; otherwise the share of inputs whose top-1 class changed, or a multiple of
their mean output shift where that is larger. The inputs (``degradation_source``) are never
used by the fit: val when given; otherwise a held-out share (``holdout``) of the stats
inputs, which then stay out of C, the locality term and the augmentation; the clean twins
only when nothing else is given (then the check is in-sample and the report says so).

Synthetic and check pairs (transplant.py): the given pairs' corruption carried over to
stats inputs.

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

from . import memory, progress
from .attribution import DEFAULT_STEPS, Localisation, locate
from .bounds import upper_bound
from .criteria import FIT_BUDGET, Criterion, Score, Shipped, fit_input_bytes, make_criterion
from .degradation import FRESH_SHIFT_WEIGHT, SHIFT_WEIGHT, Degradation, Reference, bound_line
from .erase import erase_edit
from .errors import EditError, InputError, LayerError, option
from .factors import FactorStore
from .layers import Layer
from .options import check_config
from .pixel import pixel_direction, pixel_factor
from .rank_one import (DEFAULT_LAMBDA, Direction, RankOneEdit, TorchEdit, edit_direction, key_statistics,
                       pair_key_groups, too_wide)
from .transplant import corruption_model, transplant_model, transplant_pairs, wide_corruption
from .twin import Twin
from .writeback import LayerUpdate

log = logging.getLogger(__name__)

BUDGET_SLACK = 1e-12    # a degradation equal to the budget passes (float rounding of exact fractions)
MIN_HOLDOUT_POOL = 4    # fewer stats inputs than this: nothing is held out (the check is in-sample)
HELD_OUT = ("val", "held-out stats")  # degradation inputs no fit uses: check pairs are drawn on them too
UNFIXED_SHOWN = 8        # the failure line names at most this many unfixed given pairs (the report: all)
# Synthetic pairs when ``augment`` is None (``augment_for``; docs/results.md, "More synthetic pairs for a blend"):
AUGMENT = 16            # by default;
AUGMENT_WIDE = 192      # for a whole-image corruption given by 2+ pairs (a blend: held-out blends 18 -> 20 of 20
                        # on the CNNs, 2 -> 6 of 10 on the ViT; the patch gained nothing at 5-20x the time),
AUGMENT_WIDE_BUDGET = FIT_BUDGET  # while fitting that many inputs keeps at most this many bytes of activations
                        # (the samples: 0.08-0.2 of it; torchvision's ResNet-18 at 224x224: 15x, one test image
                        # more for 4x the time)


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
    lbfgs_evals: int = 12             # loss evaluations (downstream passes) of the L-BFGS fit (25 until the
                                      # twenty-ninth session: the same targets on the held-out deep and
                                      # real-size rows with half the fit's work, docs/results.md)
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
    screen_check: int = 32            # check pairs a screening trial is scored on (the first this many; 64
                                      # until the twenty-ninth session)
    check_target: float = 0.01        # with check pairs deciding, the loop goes on past the target while their
                                      # mean TV distance exceeds this, keeping an edit only when it cuts that
                                      # distance by POLISH_GAIN (none fewer fixed); 1.0: stop at the target
    layers: tuple[str, ...] | None = None  # static mode: edit these, skip localisation
    augment: int | None = None        # synthetic pairs: the corruption transplanted onto stats inputs (0 = off;
                                      # None: AUGMENT_WIDE when 2+ pairs change most of each input, else AUGMENT)
    transplant: str = "auto"          # how: "add", "affine", "gain" or "auto" (transplant_pairs)
    strengths: tuple[float, ...] = (1.0,)  # the synthetic and check pairs' corruption at these strengths, cycling
                                      # (transplant_pairs); (1.0,): as in the given pairs
    holdout: float = 0.25             # share of stats held out for the degradation check when no val is given
    seed: int = 0

    def __post_init__(self):
        check_config(self)  # a bad value is an InputError naming the option (exit 2), before any work

    def replace(self, **changes) -> "RectifyConfig":
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"]) or None
        if isinstance(values.get("strengths"), list):
            values["strengths"] = tuple(values["strengths"])
        return RectifyConfig(**values)


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
    screened: bool = False                 # judged by a round's screen only (a cheap u, the first screen_check
                                           # check pairs) and not fitted fully

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
    real_unfixed_after: tuple[int, ...] = ()  # rows of the pairs given (from 0) not classified like their clean twins
    criterion: str = "output"              # the gap used: "output" or "attribution"
    degradation_source: str = "val"        # "val", "held-out stats", "stats" (in-sample) or "clean twins"
    degradation_count: int = 0             # inputs the degradation was measured on
    n_check_pairs: int = 0                 # synthetic pairs held out from the fit that chose among candidates
    check_source: str = ""                 # the inputs they were made from: "stats" (spare), then "val" or
                                           # "held-out stats" (the degradation check's), e.g. "stats, val"
    corruption: str = ""                   # what the given pairs look like (corruption_model): "gain" = a re-colouring
    output_shift: float = 0.0              # mean TV distance of the shipped and edited outputs on those inputs
    changed_predictions: float = 0.0       # share of those inputs whose top-1 class the edits changed
    degradation_turned: int = 0            # of those inputs, how many the edits turned wrong (labels) or changed
    check_fixed_after: int = 0             # check pairs the accepted edits fixed (scored on all of them), and
    check_count_after: int = 0             # how many were scored (0: no full trial accepted, or no check pairs)
    check_gap_after: float = float("nan")

    @property
    def suggests_erase(self) -> bool:
        """A failed output-fit repair of pairs that are re-colourings: a feature to remove,
        which ``objective="erase"`` does (docs/results.md, "Colour: erasing the direction")."""
        return (not self.success and self.corruption == "gain" and self.criterion == "output"
                and self.config.objective != "erase")

    @property
    def suggests_more_edits(self) -> bool:
        """A failed run whose only shortfall is the given pairs' gap, with every edit it was
        allowed used and each given pair already classified like its clean twin: more edits
        may reach the target (a held-out blend build: a fifth edit did, exit 0 and the test
        set's target met; docs/results.md, "More synthetic pairs for a blend")."""
        return (not self.success and self.stopped_because == "max edits reached" and self.within_budget
                and self.real_fixed_after == self.n_real_pairs and self.real_gap_after > self.target)

    @property
    def degradation_bound(self) -> float:
        """What the degradation inputs vouch for: at 95 %, the largest share of inputs like
        them that the edits turn (``degradation_turned``), ``bounds.upper_bound``; it bounds
        the accuracy drop too, and with none turned is still 1 - 0.05^(1/n), 1.5 % on 200
        inputs. 0 without edits (nothing changed)."""
        return upper_bound(self.degradation_turned, self.degradation_count) if self.edits else 0.0

    @property
    def bound_line(self) -> str | None:
        """What the degradation inputs vouch for, in one line (``degradation.bound_line``); None without edits."""
        if not self.edits:
            return None
        return bound_line(self.degradation_turned, self.degradation_count, self.degradation_source,
                          self.degradation_kind.startswith("accuracy drop"), self.config.max_degradation)

    @property
    def check_share(self) -> float | None:
        """The share of the check pairs (synthetic pairs held out from every fit) that the
        kept edits make behave like their clean twins: how far the repair carries beyond
        the pairs; read on stats inputs alone, mostly above what fresh inputs show
        (docs/results.md, "Transformers with a Trojan"). None when nothing was scored on them."""
        return self.check_fixed_after / self.check_count_after if self.check_count_after else None

    @property
    def check_line(self) -> str | None:
        """``check_share`` in one line of the text report; None when there is none."""
        if self.check_share is None:
            return None
        caveat = "" if "val" in self.check_source.split(", ") else \
            " (read on stats inputs: mostly above what fresh inputs show)"
        return (f"held-out synthetic pairs (the corruption moved onto {self.check_count_after} inputs no fit used: "
                f"{self.check_source}): {self.check_fixed_after} of {self.check_count_after} ({self.check_share:.0%}) "
                f"now behave like their clean twins, mean gap {self.check_gap_after:.4f}{caveat}")

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
                    f"classified like their clean twins{self.unfixed_rows}")
        if self.real_gap_after > self.target:
            return f"the given pairs' gap {self.real_gap_after:.4f} is above the target {self.target:g}"
        if not self.within_budget:
            return f"degradation {self.degradation:.4f} is over the budget {self.config.max_degradation:g}"
        return None

    @property
    def unfixed_rows(self) -> str:
        """' (pairs file row 3, counting from 0)': the given pairs not fixed, for the failure
        line and the text report ("" when every one is)."""
        rows = self.real_unfixed_after
        if not rows:
            return ""
        shown = ", ".join(str(i) for i in rows[:UNFIXED_SHOWN]) + (", ..." if len(rows) > UNFIXED_SHOWN else "")
        return f" (pairs file row{'s' if len(rows) > 1 else ''} {shown}, counting from 0)"

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
            "n_pairs": self.n_pairs, "n_real_pairs": self.n_real_pairs,
            "gap_before": self.gap_before, "gap_after": self.gap_after,
            "fixed_before": self.fixed_before, "fixed_after": self.fixed_after,
            "real_gap_before": self.real_gap_before, "real_gap_after": self.real_gap_after,
            "real_fixed_after": self.real_fixed_after, "unfixed_pairs": list(self.real_unfixed_after),
            "degradation": self.degradation, "degradation_kind": self.degradation_kind,
            "degradation_source": self.degradation_source, "degradation_count": self.degradation_count,
            "output_shift": self.output_shift, "changed_predictions": self.changed_predictions,
            "degradation_turned": self.degradation_turned, "degradation_bound": self.degradation_bound,
            "n_check_pairs": self.n_check_pairs, "check_fixed_after": self.check_fixed_after,
            "check_count_after": self.check_count_after, "check_share": self.check_share,
            "check_source": self.check_source,
            "check_gap_after": self.check_gap_after if self.check_count_after else None,
            "corruption": self.corruption,
            "stats_source": self.stats_source, "stopped_because": self.stopped_because, "success": self.success,
            "failure": self.failure,
            "edits": [e.to_dict() for e in self.edits], "steps": [s.to_dict() for s in self.steps],
            "localisations": [loc.to_dict() for loc in self.localisations], "config": asdict(self.config),
            "timings": dict(self.timings),
        }


# ------------------------------------------------------------------------------ plan


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
    augment: int                 # synthetic pairs asked for (``augment_for``)
    check_corrupt: np.ndarray | None = None  # check pairs: synthetic, on stats inputs nothing in the fit uses
    check_clean: np.ndarray | None = None
    check_fit_rows: int = 0  # the check pairs' first a clean sides are the spare stats: fit_x[locality_batch:][:a]
    check_reference_rows: int = 0  # the check pairs' last k clean sides are the reference inputs' first k
    check_source: str = ""       # what the check pairs were made from (RectifyResult.check_source)


def _candidates(twin: Twin, cfg: RectifyConfig, x: np.ndarray) -> tuple[tuple[Layer, ...], bool]:
    """(the layers the loop may edit, whether pinned by ``cfg.layers``); ``x``: inputs
    whose rows tell where each layer holds them (``Twin.rows_elsewhere``)."""
    if cfg.layers:
        pinned = tuple(twin.layer_map.get(name) for name in cfg.layers)
        elsewhere = twin.rows_elsewhere([layer for layer in pinned if layer.editable], x)
        for layer in pinned:
            why = layer.reason if not layer.editable else too_wide(layer) or elsewhere.get(layer.node)
            if why:
                raise LayerError(f"layer {layer.node!r} cannot be edited: {why}")
        return pinned, True
    editable = twin.layer_map.editable()
    elsewhere = twin.rows_elsewhere(editable, x)
    for layer in editable:
        if too_wide(layer) or layer.node in elsewhere:
            log.info("layer %s is not a candidate: %s", layer.node, too_wide(layer) or elsewhere[layer.node])
    editable = [layer for layer in editable if not too_wide(layer) and layer.node not in elsewhere]
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
    candidates, static = _candidates(twin, cfg, corrupt)
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
    augment = augment_for(twin, candidates, corrupt, clean, criterion, cfg)
    reference = _reference(clean, fit_stats, held, val_x, val_y)
    check, spare = (None, None), ()
    if fit_stats is not None:
        pool = fit_stats
        if criterion == "output":
            pool, spare = split_check(fit_stats, cfg, augment)
            check = make_check_pairs(corrupt, clean, spare, reference, cfg)
        if augment:
            corrupt, clean = transplant_pairs(corrupt, clean, pool, augment, match=criterion == "attribution",
                                              model=cfg.transplant, strengths=cfg.strengths)
    return Plan(candidates=candidates, static=static, key_x=key_x, stats_source=stats_source, fit_x=fit_x,
                reference=reference, corrupt=corrupt, clean=clean, n_real=n_real, criterion=criterion, augment=augment,
                check_corrupt=check[0], check_clean=check[1], **_check_rows(check[1], check_sources(spare, reference, cfg)))


def augment_for(twin: Twin, candidates, corrupt: np.ndarray, clean: np.ndarray, criterion: str,
                cfg: RectifyConfig) -> int:
    """The synthetic pairs to make: ``cfg.augment`` when set; else AUGMENT_WIDE for a
    whole-image corruption that the affine transplant carries over (``wide_corruption``,
    2+ pairs: a blend, whose repair carries further with more of them) on inputs small
    enough that fitting that many stays within AUGMENT_WIDE_BUDGET; AUGMENT otherwise: a
    patch, a re-colouring, leakage, inputs with several fields, real-size inputs, and one
    widely changed pair, whose additive guess more copies only repeat (the blend sample,
    one pair: 4 edits instead of 1 at 30x the time, for one more test image)."""
    if cfg.augment is not None:
        return cfg.augment
    if (criterion != "output" or corrupt.dtype.names or not wide_corruption(corrupt, clean)
            or transplant_model(corrupt, clean, cfg.transplant) != "affine"):
        return AUGMENT
    fitted = len(corrupt) + AUGMENT_WIDE + cfg.locality_batch
    return AUGMENT_WIDE if fitted * fit_input_bytes(twin, candidates, corrupt[:1]) <= AUGMENT_WIDE_BUDGET else AUGMENT


def check_sources(spare: np.ndarray, reference: Reference, cfg: RectifyConfig) -> list[tuple[str, np.ndarray]]:
    """(name, inputs) the check pairs are drawn from, in order, at most ``check_pairs`` in
    all: the spare stats ("stats"), then the degradation check's inputs when no fit uses
    them ("val", "held-out stats"); sources that give none are left out."""
    named = [("stats", spare)] + ([(reference.source, reference.x)] if reference.source in HELD_OUT else [])
    drawn, left = [], cfg.check_pairs
    for name, x in named:
        if left and len(x):
            drawn.append((name, x[:left]))
            left -= len(drawn[-1][1])
    return drawn


def _check_rows(check_clean: np.ndarray | None, drawn: list[tuple[str, np.ndarray]]) -> dict:
    """Where the check pairs came from (``check_source``), and which of their clean sides
    are inputs whose shipped outputs are computed anyway, bit for bit: the first a are the
    spare stats (fit_x from ``locality_batch`` on: the key statistics' inputs), the last k
    the reference inputs' first k. A re-colouring's transplant picks and orders its
    sources itself: then none."""
    if check_clean is None:
        return {}
    part = dict(drawn)
    a, k = len(part.get("stats", ())), next((len(x) for name, x in drawn if name in HELD_OUT), 0)
    a = a if a and np.array_equal(check_clean[:a], part["stats"]) else 0
    k = k if k and np.array_equal(check_clean[-k:], drawn[-1][1]) else 0
    return {"check_fit_rows": a, "check_reference_rows": k, "check_source": ", ".join(name for name, _ in drawn)}


def split_check(fit_stats: np.ndarray, cfg: RectifyConfig, augment: int) -> tuple[np.ndarray, np.ndarray]:
    """(the pool of the synthetic pairs, the spare stats): up to ``check_pairs`` stats inputs
    between the locality batch (the head) and the synthetic pairs' sources (the tail), so
    that neither changes; none when the stats have no input to spare."""
    head = min(cfg.locality_batch, len(fit_stats))
    k = max(0, min(cfg.check_pairs, len(fit_stats) - head - augment))
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
    drawn = check_sources(spare, reference, cfg)
    if not drawn:
        return None, None
    pool = np.concatenate([x for _, x in drawn])
    c, k = transplant_pairs(corrupt, clean, pool, len(pool), model=cfg.transplant, strengths=cfg.strengths)
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
    with crit.recording(prev, [opt.layer for opt in options]):
        fits = [_fitted(crit, opt, prev, timings, method=method) for opt in options]
    memory.trim()  # the fits' recording is freed
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
    fixed, then the smallest gap on them (``OutputGap.pick`` then keeps the fitted one
    with the smallest gap first: measured that way, the screen's order as it was). The
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
    out = [replace(t.step, accepted=False, screened=True, reason=f"screened out after {how} "
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

    def missing(self) -> list[Layer]:
        """The candidates whose statistics are not held (all at first; after an edit, those after it)."""
        return [layer for layer in self.plan.candidates if layer.node not in self.stats]

    def current(self, prev: list[TorchEdit], outputs: list | None = None) -> FactorStore:
        """``outputs``: receives the model's outputs on the key statistics' inputs when they
        are computed here (``key_statistics``)."""
        missing = self.missing()
        if missing:
            self.stats.update(key_statistics(self.twin, missing, self.plan.key_x, edits=prev, lam=self.cfg.lam,
                                             source=self.plan.stats_source, outputs=outputs))
        return self.stats

    def first(self) -> np.ndarray | None:
        """Round 1's key statistics (the shipped model's), made before the loop: the passes
        that read them give the shipped outputs on fit_x (the check pairs' spare stats and the
        locality batch), returned; None when the keys come from elsewhere (a sharded set)."""
        progress.step(f"round 1: key statistics ({len(self.plan.candidates)} layers)")
        outputs: list = []
        self.current([], outputs if self.plan.key_x is self.plan.fit_x else None)
        return np.concatenate(outputs) if outputs else None

    def edited(self, layer: Layer) -> None:
        for other in self.plan.candidates:
            if other.node_index > layer.node_index:
                self.stats.discard(other.node)

    def close(self) -> None:
        self.stats.close()


def _options(twin: Twin, plan: Plan, prev: list[TorchEdit], done: int, cfg: RectifyConfig, timings: Timings,
             localisations: list, cache: KeyCache) -> list[Option]:
    """The layers this step may edit, best first, each with its direction."""
    missing = cache.missing()
    if missing:  # round 1's were made before the loop (KeyCache.first); after an edit, the layers after it
        progress.step(f"round {done + 1}: key statistics ({len(missing)} layers)")
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
    degradation = Degradation(twin, plan.reference)
    timings = Timings(key_statistics=0.0, localisation=0.0, fit=0.0, check=0.0)
    accepted: list[RankOneEdit] = []
    steps: list[EditStep] = []
    localisations: list[Localisation] = []
    cache = KeyCache(twin, plan, cfg)
    try:
        with timings("key_statistics"):
            fit_logits = cache.first()
        crit = make_criterion(twin, plan, cfg, Shipped(fit=fit_logits, reference=degradation.base_logits))
        start = state = crit.start()
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
    measured on the last accepted step (its trial applied exactly these edits) and its
    parts as measured then; a run of the reference inputs only when that step has none."""
    if not accepted:
        return 0.0, {"changed_predictions": 0.0, "output_shift": 0.0}
    parts = degradation.measured_parts([e.to_torch(degradation.twin.device) for e in accepted])
    last = next(s for s in reversed(steps) if s.accepted)
    return (last.degradation if np.isfinite(last.degradation) else degradation.of_parts(parts)), parts


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
        stats_source=plan.stats_source, stopped_because=stopped, config=cfg.replace(augment=plan.augment),
        timings=dict(timings),
        real_gap_before=start.real_gap, real_gap_after=state.real_gap, real_fixed_after=state.real_fixed,
        real_unfixed_after=state.real_unfixed,
        criterion=crit.name, degradation_source=ref.source, degradation_count=ref.count,
        n_check_pairs=0 if crit.check is None else len(crit.check), check_source=plan.check_source,
        corruption="" if plan.corrupt.dtype.names else corruption_model(plan.corrupt[:plan.n_real],
                                                                         plan.clean[:plan.n_real]),
        output_shift=parts["output_shift"], changed_predictions=parts["changed_predictions"],
        degradation_turned=degradation.turned(parts), **_check_figures(state))


def _check_figures(state: Score) -> dict:
    """The final state's reading of the check pairs, when it was scored on every one."""
    if not state.check_count or not np.isfinite(state.check_gap):
        return {}
    return {"check_fixed_after": state.check_fixed, "check_count_after": state.check_count,
            "check_gap_after": state.check_gap}
