"""Attribution-guided layer localisation (integrated gradients on layer units).

For every editable layer l, along the straight input path x^(a) = x~ + a (x - x~) from
the corrupted input to its cleansed twin:

  M^l_i = (f_l(x)_i - f_l(x~)_i) * mean_a dF/df_l(x^(a))_i      (midpoint rule, ``steps``)

Decisions the paper leaves open (defaults, all measured in benchmarks/):
  - F, the scalar attributed: the logit of the class the model predicts on x~
    (``target="corrupt_logit"``); alternative ``"gap"``: logit[c~] - logit[c] with c the
    class predicted on x.
  - steps: 16 midpoints (IG's completeness error on the sample models is reported).
  - spatial reduction: units are output channels; M is summed over positions (and
    pairs) before the norm, so opposite-signed positions cancel like they do in F
    (``reduction="sum"``); alternative ``"abs"``: |M| summed, nothing cancels.
  - score: G_l = ||M^l||_2 * sqrt(k*^T C^-1 k*), with k* the layer's key change summed
    over positions (RMS over pairs; rank_one.Direction.specificity). The paper's
    ||M (C^-1 k*)^T||_F = ||M|| ||C^-1 k*|| depends on the arbitrary scale of a layer's
    keys (it scales like 1/scale); measuring k* in the metric C makes it scale-free and
    keeps what the projection rewards: a key change that stands out from the keys the
    layer normally sees. ``raw`` (||M||_1 over every unit and
    position) is reported too.

All layers are attributed in ONE batched forward/backward over (pairs x steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import EditError
from .layers import Layer
from .rank_one import ACTIVATION_BUDGET, Direction, KeyStats, activation_sizes, edit_direction, pair_key_groups
from .twin import Twin

log = logging.getLogger(__name__)

DEFAULT_STEPS = 16  # midpoints; 4 and 64 pick the same layers on every sample (bench_locate.py)
IG_CHUNK = 256      # path points per forward/backward pass
REGION_CHUNK = 32   # inputs per pass when measuring region shares


@dataclass(frozen=True)
class LayerIG:
    """IG of one layer's units, reduced over positions and pairs."""

    per_unit: torch.Tensor  # [out] float64
    mass: float             # sum |M| over units and positions
    total: float            # sum M (completeness: ~ F(x) - F(x~))


@dataclass(frozen=True)
class IGResult:
    layers: dict[str, LayerIG]
    f_gap: float            # F(x) - F(x~), summed over pairs

    def __getitem__(self, node: str) -> LayerIG:
        return self.layers[node]


@dataclass(frozen=True)
class LayerAttribution:
    layer: Layer
    attribution: float   # sum of M (IG completeness: ~ F(x) - F(x~) summed over layers' share)
    mass: float          # sum |M| over units and positions
    norm: float          # ||M reduced over positions||_2
    specificity: float
    score: float
    direction: Direction | None = field(default=None, repr=False, compare=False)  # d (and local u) of this layer

    def to_dict(self) -> dict:
        return {"node": self.layer.node, "op": self.layer.op, "initializer": self.layer.initializer,
                "score": self.score, "attribution": self.attribution, "mass": self.mass,
                "norm": self.norm, "specificity": self.specificity}


def _scalar(logits: torch.Tensor, target: str, c_corrupt: torch.Tensor, c_clean: torch.Tensor) -> torch.Tensor:
    picked = logits.gather(1, c_corrupt.view(-1, 1)).squeeze(1)
    if target == "corrupt_logit":
        return picked
    if target == "gap":
        return picked - logits.gather(1, c_clean.view(-1, 1)).squeeze(1)
    raise ValueError(f"unknown attribution target {target!r}")


def integrated_gradients(twin: Twin, layers: list[Layer], corrupt: np.ndarray, clean: np.ndarray, *,
                         edits=(), steps: int = DEFAULT_STEPS, target: str = "corrupt_logit",
                         reduction: str = "sum", chunk: int = IG_CHUNK) -> IGResult:
    """M^l for each layer, reduced over positions and pairs, and the F gap."""
    from .twin import batch_size_of

    xc, xk = twin.to_tensor(corrupt), twin.to_tensor(clean)
    n = batch_size_of(xc)
    with torch.no_grad(), twin.applied(edits), twin.capture(layers, inputs=False, outputs=True) as ends:
        lc = twin.forward(xc)
        lk = twin.forward(xk)
    c_corrupt, c_clean = lc.argmax(1), lk.argmax(1)
    delta_f = {l.node: (ends[l.node]["out"][1] - ends[l.node]["out"][0]).double() for l in layers}
    f_gap = float((_scalar(lk, target, c_corrupt, c_clean) - _scalar(lc, target, c_corrupt, c_clean)).sum())

    alphas = (torch.arange(steps, dtype=torch.float32, device=twin.device) + 0.5) / steps
    grads = {l.node: torch.zeros_like(delta_f[l.node]) for l in layers}
    # path points, pair-major: index = pair * steps + step (over the embedding outputs
    # for integer token inputs)
    path = twin.interpolate(xc, xk, alphas)
    pair_of = torch.arange(n, device=twin.device).repeat_interleave(steps)
    for start in range(0, n * steps, chunk):
        sl = slice(start, min(start + chunk, n * steps))
        with twin.applied(edits), twin.capture(layers, inputs=False, outputs=True, retain_grad=True) as store:
            logits = path.forward(sl)
            f = _scalar(logits, target, c_corrupt[pair_of[sl]], c_clean[pair_of[sl]]).sum()
            f.backward()
        for layer in layers:
            out = store[layer.node]["out"][0]
            if out.grad is None:
                continue
            g = out.grad.double()
            idx = pair_of[sl]
            grads[layer.node].index_add_(0, idx, g)
    if reduction not in ("sum", "abs"):
        raise ValueError(f"unknown reduction {reduction!r}")
    result = {}
    for layer in layers:
        m = delta_f[layer.node] * grads[layer.node] / steps  # [n, out, *spatial] or [n, ..., out]
        r = m if reduction == "sum" else m.abs()
        if layer.op == "Conv":
            per_unit = r.sum(dim=tuple(d for d in range(r.dim()) if d != 1))
        else:
            per_unit = r.reshape(-1, r.shape[-1]).sum(0)
        result[layer.node] = LayerIG(per_unit=per_unit, mass=float(m.abs().sum()), total=float(m.sum()))
    return IGResult(layers=result, f_gap=f_gap)


@dataclass(frozen=True)
class Localisation:
    ranked: tuple[LayerAttribution, ...]   # best first
    in_graph_order: tuple[LayerAttribution, ...]
    f_gap: float                             # F(x) - F(x~), summed over pairs
    skipped: tuple[tuple[str, str], ...]     # (node, reason) of layers not scored
    target: str
    steps: int

    @property
    def chosen(self) -> LayerAttribution | None:
        return self.ranked[0] if self.ranked else None

    def to_dict(self) -> dict:
        return {"layers": [a.to_dict() for a in self.ranked],
                "chosen": self.chosen.layer.node if self.chosen else None,
                "f_gap": self.f_gap, "target": self.target, "steps": self.steps,
                "skipped": [{"node": n, "reason": r} for n, r in self.skipped]}


def locate(twin: Twin, layers: list[Layer], corrupt: np.ndarray, clean: np.ndarray, stats: dict[str, KeyStats], *,
           edits=(), steps: int = DEFAULT_STEPS, target: str = "corrupt_logit", key: str = "diff",
           reduction: str = "sum", key_pairs: tuple[np.ndarray, np.ndarray] | None = None) -> Localisation:
    """Score every layer in ``layers`` (key statistics ``stats`` from rank_one.key_statistics).
    IG runs on the given pairs; each layer's edit direction is found from ``key_pairs``
    (default: the same pairs; the loop passes the pairs after augmentation, whose first
    ``len(corrupt)`` are the given ones) and kept on the result for the edit."""
    sizes = activation_sizes(twin, layers, corrupt, edits=edits)
    per_point = 4 * sum(i + 3 * o for i, o, _ in sizes.values())  # activations, retained outputs and grads
    chunk = max(1, min(IG_CHUNK, ACTIVATION_BUDGET // max(per_point, 1)))
    ig = integrated_gradients(twin, layers, corrupt, clean, edits=edits, steps=steps, target=target,
                              reduction=reduction, chunk=chunk)
    kc, kk = key_pairs if key_pairs is not None else (corrupt, clean)
    scored, skipped = [], []
    for layer, keys in pair_key_groups(twin, layers, kc, kk, edits=edits, sizes=sizes):
        lig = ig[layer.node]
        try:
            direction = edit_direction(stats[layer.node], keys, key=key, score_pairs=len(corrupt))
        except EditError as err:
            skipped.append((layer.node, err.message))
            continue
        norm = float(lig.per_unit.norm())
        scored.append(LayerAttribution(layer=layer, attribution=lig.total, mass=lig.mass, norm=norm,
                                       specificity=direction.specificity, score=norm * direction.specificity,
                                       direction=direction))
    ranked = tuple(sorted(scored, key=lambda a: (-a.score, a.layer.node_index)))
    return Localisation(ranked=ranked, in_graph_order=tuple(scored), f_gap=ig.f_gap, skipped=tuple(skipped),
                        target=target, steps=steps)


# ------------------------------------------------------------ input attribution on a region
# The attribution criterion (feature leakage: the model attributes its decision to a region
# that should not matter). For an input z, IG from the zero baseline on the input pixels,
#   A_i(z) = z_i * mean_a dF/dz_i (a z)        (midpoint rule, ``steps``),
# with F the logit of class ``cls``; the region's share is sum_{i in S} |A_i| / sum_i |A_i|
# with S the support of x~ - x (where the corrupted input differs from its clean twin).


def input_attribution(twin: Twin, x: torch.Tensor, cls: torch.Tensor, *, steps: int = DEFAULT_STEPS,
                      create_graph: bool = False) -> torch.Tensor:
    """|IG| of each input element of ``x`` [n, ...] for the logit of ``cls`` [n]; hooks
    (edits) active on the twin apply. ``create_graph`` keeps the graph for fitting."""
    n = x.shape[0]
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    path = (alphas.view(-1, 1, *([1] * (x.dim() - 1))) * x.unsqueeze(0)).reshape(steps * n, *x.shape[1:])
    path = path.detach().requires_grad_(True)
    out = twin.forward(path)
    f = out.gather(1, cls.repeat(steps).view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(f, path, create_graph=create_graph)
    return (x * grad.view(steps, *x.shape).mean(0)).abs()


def region_shares(twin: Twin, x: np.ndarray, region: np.ndarray, cls: np.ndarray, *, edits=(),
                  steps: int = DEFAULT_STEPS, chunk: int = REGION_CHUNK) -> np.ndarray:
    """Share of |IG| on ``region`` (bool, shaped like ``x``) per input, float64 [n]."""
    shares = []
    with twin.applied(edits):
        for i in range(0, len(x), chunk):
            xt = twin.to_tensor(x[i:i + chunk])
            a = input_attribution(twin, xt, torch.as_tensor(cls[i:i + chunk], device=twin.device).long(),
                                  steps=steps).detach().double()
            m = torch.as_tensor(region[i:i + chunk], device=twin.device)
            on = (a * m).flatten(1).sum(1)
            total = a.flatten(1).sum(1).clamp_min(1e-30)
            shares.append((on / total).cpu().numpy())
    return np.concatenate(shares)
