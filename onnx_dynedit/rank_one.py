"""Key statistics and the rank-one update, as data.

A layer with canonical weight W [out, in] maps keys k to values W k (layers.py). For a
corrupted input x~ and its cleansed twin x, every output position p gives a corrupted
key k~_p, a clean key k_p and their difference delta_p = k~_p - k_p (zero where the
trigger does not reach).

Direction (the "d" of W' = W + u d^T):
  C = E[k k^T] over the stats inputs' keys (every position of every input), regularised
  C_l = C + lam * mean(diag C) * I and factored once, C_l = R R^T (Cholesky; never inverted).
  Rows r_p (delta_p by default, or k~_p weighted by ||delta_p||) are whitened, z_p = R^-1 r_p,
  and the top singular direction a of {z_p} is taken (one SVD pooling every pair and
  position, as in the prior work for n > 1). Then d = R^-T a = C_l^-1 k* with
  k* = R a: the key direction along which the corrupted keys stand out most from the
  keys the layer normally sees. d is scaled so that mean_p(d . delta_p) over the
  affected positions is 1 and its sign so that it is positive (when the changes cancel
  in that mean, e.g. +k and -k, so that mean_p |d . delta_p| is 1).

Value (the "u"):
  local  closed form: minimise sum_p || (v_p - v~_p) - u (d . k~_p) ||^2, i.e.
         u = sum_p s_p r_p / sum_p s_p^2 with s_p = d . k~_p and r_p the clean-minus-
         corrupted output at p (bias cancels). For one dense key this is the textbook
         u = (v* - W k*) / (d^T k*).
  output fitted in rectify.py: u starts at the closed form and Adam makes the
         NETWORK output on x~ match the output on x while keeping outputs on unlabeled
         clean inputs unchanged (the README's decision table; ``objective="local"`` keeps
         the closed form).
  attribution (feature leakage, rectify.py): u and the whitened key a are fitted
         together, d = R^-T a = C_l^-1 k with k = R a, starting at this module's k*;
         d keeps the form C^-1 k, only k moves.

Pure functions over torch tensors; no state, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import EditError
from .layers import Layer
from .keys import layer_keys, layer_values
from .twin import Twin

DEFAULT_LAMBDA = 1e-2      # ridge, relative to the mean diagonal of C (keeps C invertible with few keys)
KEY_BATCH = 32             # stats inputs per forward pass while accumulating C
MAX_KEYS_PER_BATCH = 8192  # conv positions per batch and layer used for C (an even subsample; bounds the cost)
ACTIVATION_BUDGET = 256 * 2**20  # bytes of captured activations per chunked pass (bounds peak memory at 224x224)
MAX_KEY_FEATURES = 8192    # C is in_features^2 float64 (8192: 512 MB); wider layers (VGG's 25088-wide fc) are not edited
RIDGE_FLOOR = 1e-12        # the ridge's scale when every key is zero (C = 0 stays factorable)
CANCEL_SHARE = 1e-6        # a mean projection below this share of the mean |projection|: the changes cancel
AFFECTED_SHARE = 1e-3      # a position is "affected" when its key change exceeds this share of the largest


@dataclass(frozen=True)
class TorchEdit:
    """A rank-one edit as torch tensors on the twin's device (what ``Twin.applied`` takes)."""

    layer: Layer
    u: torch.Tensor
    d: torch.Tensor


@dataclass(frozen=True)
class RankOneEdit:
    """W' = W + u d^T on one layer (canonical space). u, d: float64 numpy."""

    layer: Layer
    u: np.ndarray
    d: np.ndarray

    def to_torch(self, device) -> TorchEdit:
        return TorchEdit(self.layer, torch.as_tensor(self.u, dtype=torch.float32, device=device),
                         torch.as_tensor(self.d, dtype=torch.float32, device=device))

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.u).all() and np.isfinite(self.d).all())

    def to_dict(self) -> dict:
        return {"node": self.layer.node, "initializer": self.layer.initializer,
                "u_norm": float(np.linalg.norm(self.u)), "d_norm": float(np.linalg.norm(self.d))}


@dataclass(frozen=True)
class KeyStats:
    layer: Layer
    chol: torch.Tensor      # lower Cholesky factor R of C + lam I (float64)
    n_keys: int
    lam: float
    source: str

    def whiten(self, rows: torch.Tensor) -> torch.Tensor:
        """z = R^-1 r for rows [m, in] -> [m, in]."""
        return torch.linalg.solve_triangular(self.chol, rows.T.double(), upper=False).T

    def unwhiten_solve(self, a: torch.Tensor) -> torch.Tensor:
        """d = R^-T a (so that d . k = a . R^-1 k)."""
        return torch.linalg.solve_triangular(self.chol.T, a.double().unsqueeze(1), upper=True).squeeze(1)


def too_wide(layer: Layer) -> str | None:
    """Why ``layer``'s key statistics cannot be held in memory, or None."""
    if layer.in_features > MAX_KEY_FEATURES:
        return (f"{layer.in_features} key features: C would take {8 * layer.in_features ** 2 / 2**30:.1f} GiB "
                f"(at most {MAX_KEY_FEATURES} features)")
    return None


def activation_sizes(twin: Twin, layers: list[Layer], x1: np.ndarray, *, edits=()) -> dict[str, tuple[int, int, int]]:
    """Per layer and per input: (input numel, output numel, unfolded key numel), from one
    forward pass of one input; what the chunked passes below budget their memory with."""
    sizes = {}
    with torch.no_grad(), twin.applied(edits), twin.capture(layers, inputs=True, outputs=True) as store:
        twin.forward(twin.to_tensor(x1[:1]))
        for layer in layers:
            rec = store[layer.node]
            keys = layer_keys(layer, rec["in"][0]).shape
            sizes[layer.node] = (rec["in"][0].numel(), rec["out"][0].numel(), keys[1] * keys[2])
    return sizes


def _batch_for(budget: int, per_input: int, most: int) -> int:
    return int(max(1, min(most, budget // max(per_input, 1))))


def key_statistics(twin: Twin, layers: list[Layer], x: np.ndarray, *, edits=(), batch_size: int = KEY_BATCH,
                   lam: float = DEFAULT_LAMBDA, source: str = "stats",
                   max_keys: int = MAX_KEYS_PER_BATCH) -> dict[str, KeyStats]:
    """Second moments of every layer's keys over inputs ``x`` (current edits applied).
    Per batch at most ``max_keys`` keys per layer are used (every k-th position).
    ``x`` may also be a ``keystats.ShardedKeys`` (a stats set read shard by shard, here or
    on Ray): its per-shard ``key_moments`` are added in shard order."""
    if hasattr(x, "shard_moments"):
        parts = x.shard_moments(twin, layers, edits=edits, batch_size=batch_size, max_keys=max_keys)
    else:
        parts = [key_moments(twin, layers, x, edits=edits, batch_size=batch_size, max_keys=max_keys)]
    return stats_from_moments(layers, parts, lam=lam, source=source, device=twin.device)


@dataclass(frozen=True)
class KeyMoments:
    """Sum of k k^T (float64 [in, in], numpy) and the number of keys k, over some inputs:
    the part of the key statistics that adds up across shards and workers."""

    sum_kk: np.ndarray
    count: int


def key_moments(twin: Twin, layers: list[Layer], x: np.ndarray, *, edits=(), batch_size: int = KEY_BATCH,
                max_keys: int = MAX_KEYS_PER_BATCH) -> dict[str, KeyMoments]:
    """Per-layer ``KeyMoments`` of the keys over inputs ``x`` (edits applied), batch by batch
    (at most ``max_keys`` keys per layer and batch of ``batch_size``: every k-th position).
    Large inputs go in smaller batches (captured activations stay within ACTIVATION_BUDGET)
    with the key cap scaled down with the batch."""
    sizes = activation_sizes(twin, layers, x, edits=edits)
    per_input = 4 * (sum(s[0] for s in sizes.values()) + max(s[2] for s in sizes.values()))
    batch = _batch_for(ACTIVATION_BUDGET, per_input, batch_size)
    cap = max(1, max_keys * batch // batch_size)
    dim = {l.node: l.in_features for l in layers}
    acc = {l.node: torch.zeros(dim[l.node], dim[l.node], dtype=torch.float64, device=twin.device) for l in layers}
    count = {l.node: 0 for l in layers}
    with torch.no_grad(), twin.applied(edits), twin.capture(layers) as store:
        for i in range(0, len(x), batch):
            for rec in store.values():
                rec["in"].clear()
            twin.forward(twin.to_tensor(x[i:i + batch]))
            for layer in layers:
                keys = layer_keys(layer, store[layer.node]["in"][0]).reshape(-1, dim[layer.node])
                if keys.shape[0] > cap:  # many conv positions: an even, deterministic subsample
                    keys = keys[:: -(-keys.shape[0] // cap)]
                acc[layer.node] += (keys.T @ keys).double()
                count[layer.node] += keys.shape[0]
            for rec in store.values():
                rec["in"].clear()
    return {l.node: KeyMoments(sum_kk=acc.pop(l.node).cpu().numpy(), count=count[l.node]) for l in layers}


def stats_from_moments(layers: list[Layer], parts, *, lam: float = DEFAULT_LAMBDA, source: str = "stats",
                       device=None) -> dict[str, KeyStats]:
    """Add per-shard ``key_moments`` results (in the order given) and factor each layer's
    regularised second moment C + lam * mean(diag C) * I (Cholesky). The parts are used
    up: each layer's entries are taken out of them (and a single part's sum is divided in
    place), so at most one layer's C exists beside the factors (VGG-16: 1 GiB less)."""
    out = {}
    for layer in layers:
        entries = [part.pop(layer.node) for part in parts]
        total = entries[0].sum_kk
        for m in entries[1:]:
            total = total + m.sum_kk
        n = sum(m.count for m in entries)
        del entries
        if not total.flags.writeable:  # a part read from Ray's object store: divided in a copy
            total = total.copy()
        out[layer.node] = _factor(layer, torch.as_tensor(total, dtype=torch.float64, device=device), n, lam, source)
        del total
    return out


def _factor(layer: Layer, acc: torch.Tensor, count: int, lam: float, source: str) -> KeyStats:
    c = acc.div_(max(count, 1))
    ridge = lam * float(torch.diagonal(c).mean().clamp_min(RIDGE_FLOOR))
    c.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise EditError(f"key statistics of layer {layer.node!r} are not positive definite",
                        hint="give more stats inputs or a larger ridge")
    return KeyStats(layer=layer, chol=chol, n_keys=count, lam=ridge, source=source)


@dataclass(frozen=True)
class PairKeys:
    """Keys and outputs of one layer on the corrupted and clean inputs: [n, P, *]."""

    k_corrupt: torch.Tensor
    k_clean: torch.Tensor
    v_corrupt: torch.Tensor
    v_clean: torch.Tensor


def pair_keys(twin: Twin, layers: list[Layer], corrupt: np.ndarray, clean: np.ndarray, *, edits=()) -> dict[str, PairKeys]:
    out = {}
    with torch.no_grad(), twin.applied(edits), twin.capture(layers, inputs=True, outputs=True) as store:
        twin.forward(twin.to_tensor(corrupt))
        twin.forward(twin.to_tensor(clean))
    for layer in layers:
        rec = store[layer.node]
        out[layer.node] = PairKeys(
            k_corrupt=layer_keys(layer, rec["in"][0]).double(), k_clean=layer_keys(layer, rec["in"][1]).double(),
            v_corrupt=layer_values(layer, rec["out"][0]).double(), v_clean=layer_values(layer, rec["out"][1]).double())
    return out


def pair_key_groups(twin: Twin, layers: list[Layer], corrupt: np.ndarray, clean: np.ndarray, *, edits=(),
                    sizes: dict | None = None):
    """Yield (layer, PairKeys) for every layer, capturing a group of layers per pass so
    that a group's keys stay within ACTIVATION_BUDGET (one group for small models)."""
    sizes = sizes or activation_sizes(twin, layers, corrupt, edits=edits)
    n = len(corrupt) + len(clean)
    group, used = [], 0
    for layer in list(layers) + [None]:
        cost = 0 if layer is None else n * 4 * (sizes[layer.node][0] + 3 * sizes[layer.node][1]
                                                + 2 * sizes[layer.node][2])
        if group and (layer is None or used + cost > ACTIVATION_BUDGET):
            keys = pair_keys(twin, group, corrupt, clean, edits=edits)
            for done in group:
                yield done, keys.pop(done.node)
            group, used = [], 0
        if layer is not None:
            group.append(layer)
            used += cost


@dataclass(frozen=True)
class Direction:
    d: torch.Tensor          # [in], float64
    specificity: float       # Mahalanobis norm of the per-pair summed key change, RMS over the scored pairs
    affected: float          # share of positions whose keys differ
    u_local: torch.Tensor | None = None  # closed-form u for this d (None: d misses every corrupted key)


def edit_direction(stats: KeyStats, keys: PairKeys, *, key: str = "diff", score_pairs: int | None = None) -> Direction:
    """d = C^-1 k* with k* the top whitened direction of the key differences (see module doc),
    and the layer-local closed-form u for it. ``score_pairs``: the specificity is measured
    on the first ``score_pairs`` pairs only (the given ones; the rest are synthetic)."""
    diff = (keys.k_corrupt - keys.k_clean).reshape(-1, keys.k_corrupt.shape[-1])
    norms = diff.norm(dim=1)
    scale = float(norms.max()) if norms.numel() else 0.0
    if scale == 0.0:
        raise EditError(f"layer {stats.layer.node!r}: corrupted and clean inputs give identical keys",
                        hint="the pair does not differ before this layer; pick an earlier layer")
    affected_mask = norms > AFFECTED_SHARE * scale
    if key == "diff":
        rows = diff[affected_mask]
    elif key == "corrupt":
        k = keys.k_corrupt.reshape(-1, diff.shape[1])[affected_mask]
        rows = k * (norms[affected_mask] / scale).unsqueeze(1)
    else:
        raise ValueError(f"unknown key formulation {key!r}")
    z = stats.whiten(rows)  # [m, in]
    if z.shape[0] < z.shape[1]:  # top right singular vector from the smaller Gram matrix
        evals, evecs = torch.linalg.eigh(z @ z.T)
        a = z.T @ evecs[:, -1]
        a = a / a.norm().clamp_min(1e-300)
    else:
        evals, evecs = torch.linalg.eigh(z.T @ z)
        a = evecs[:, -1]
    d = stats.unwhiten_solve(a)
    proj = diff[affected_mask] @ d
    mean = float(proj.mean())
    spread = float(proj.abs().mean())
    if spread == 0.0:
        raise EditError(f"layer {stats.layer.node!r}: the edit direction does not separate corrupted from clean keys")
    if abs(mean) > CANCEL_SHARE * spread:
        d = d / mean  # mean d . delta over affected positions = 1, sign positive
    else:  # changes that cancel in the mean (+k and -k) still separate: mean |d . delta| = 1,
        # sign fixed by the largest projection
        d = d / (spread if float(proj[proj.abs().argmax()]) > 0 else -spread)
    # k*_i = sum over positions of pair i's key change; its Mahalanobis norm under C
    # (scale-free: the same whatever the scale of the layer's keys)
    kstar = (keys.k_corrupt[:score_pairs] - keys.k_clean[:score_pairs]).sum(dim=1)  # [n, in]
    maha = float(stats.whiten(kstar).pow(2).sum(1).mean().sqrt())
    try:
        u_local = closed_form_u(keys, d)
    except EditError:
        u_local = None
    return Direction(d=d, specificity=maha, affected=float(affected_mask.double().mean()), u_local=u_local)


def closed_form_u(keys: PairKeys, d: torch.Tensor) -> torch.Tensor:
    """Least-squares u for fixed d: match the clean outputs at the layer itself."""
    s = keys.k_corrupt.reshape(-1, keys.k_corrupt.shape[-1]) @ d          # [m]
    r = (keys.v_clean - keys.v_corrupt).reshape(-1, keys.v_clean.shape[-1])  # [m, out]
    denom = float((s * s).sum())
    if denom == 0.0:
        raise EditError("the edit direction is orthogonal to every corrupted key")
    return (s.unsqueeze(1) * r).sum(0) / denom
