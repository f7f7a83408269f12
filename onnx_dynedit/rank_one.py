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
  output fitted in criteria.py: u starts at the closed form and Adam makes the
         NETWORK output on x~ match the output on x while keeping outputs on unlabeled
         clean inputs unchanged (the README's decision table; ``objective="local"`` keeps
         the closed form).
  attribution (feature leakage, criteria.py): u and the whitened key a are fitted
         together, d = R^-T a = C_l^-1 k with k = R a, starting at this module's k*;
         d keeps the form C^-1 k, only k moves.

Pure functions over torch tensors; no state, no I/O.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import memory
from .errors import EditError
from .layers import Layer
from .keys import layer_keys, layer_values, patch_factors, sampled_keys
from .twin import TailRecording, Twin

log = logging.getLogger(__name__)

DEFAULT_LAMBDA = 1e-2      # ridge, relative to the mean diagonal of C (keeps C invertible with few keys)
KEY_BATCH = 32             # stats inputs per forward pass while accumulating C
MAX_KEYS_PER_BATCH = 8192  # conv positions per batch and layer used for C (an even subsample; bounds the cost)
ACTIVATION_BUDGET = 256 * 2**20  # bytes of captured activations per chunked pass (bounds peak memory at 224x224)
MAX_KEY_FEATURES = 8192    # C is in_features^2 float64 (8192: 512 MB); wider layers (VGG's 25088-wide fc) are not edited
RIDGE_FLOOR = 1e-12        # the ridge's scale when every key is zero (C = 0 stays factorable)
CANCEL_SHARE = 1e-6        # a mean projection below this share of the mean |projection|: the changes cancel
FACTOR_F32_FEATURES = 2048  # wider factors are stored in float32 (VGG-16's 4608-wide convs: 85 MB each, not 170)
MOMENTS_BUDGET = 512 * 2**20  # bytes of float64 sums of k k^T accumulated in one pass over the stats; more layers
                              # than that (VGG-19: 1.6 GB) go in groups, one pass each (the same sums)
TAIL_BUDGET = 256 * 2**20  # bytes the first group's passes may keep for the later groups' (``TailRecording``)
GRAM_BLOCK = 576           # columns per block of a key Gram matrix (only the blocks on and above the diagonal are made)
ADD_BLOCK = 4 * 2**20       # bytes of the float64 copy made per block when a product is added to its sum
PAIR_KEYS_BUDGET = 64 * 2**20  # bytes of float64 pair keys kept whole (small layers: unfolded once)
KEY_BLOCK = 32 * 2**20       # bytes of float64 keys per block when they are read pair by pair
ROWS_BUDGET = 64 * 2**20     # bytes of affected key rows kept as rows; beyond, their Gram matrix
EIGH_DIRECT = 256            # top eigenvector of a matrix at most this wide: eigh; wider: subspace iteration
EIG_BLOCK = 16               # vectors iterated together (convergence ~ (l_17 / l_1)^steps)
EIG_STEPS = 150
EIG_TOL = 1e-9               # relative residual |a x - l x| / l at which the iteration stops
AFFECTED_SHARE = 1e-3      # a position is "affected" when its key change exceeds this share of the largest


@dataclass(frozen=True)
class TorchEdit:
    """A rank-one edit as torch tensors on the twin's device (what ``Twin.applied`` takes)."""

    layer: Layer
    u: torch.Tensor
    d: torch.Tensor
    view: str = "patch"


@dataclass(frozen=True)
class RankOneEdit:
    """W' = W + u d^T on one layer (canonical space; for ``view="pixel"`` a Conv's pixel
    view, keys.pixel_view). u, d: float64 numpy."""

    layer: Layer
    u: np.ndarray
    d: np.ndarray
    view: str = "patch"

    def to_torch(self, device) -> TorchEdit:
        return TorchEdit(self.layer, torch.as_tensor(self.u, dtype=torch.float32, device=device),
                         torch.as_tensor(self.d, dtype=torch.float32, device=device), self.view)

    def factors(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rank-one factors (u, d) of the canonical space that sum to this edit."""
        return patch_factors(self.layer, self.u, self.d, self.view)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.u).all() and np.isfinite(self.d).all())

    def to_dict(self) -> dict:
        return {"node": self.layer.node, "initializer": self.layer.initializer, "view": self.view,
                "u_norm": float(np.linalg.norm(self.u)), "d_norm": float(np.linalg.norm(self.d))}


@dataclass(frozen=True)
class KeyStats:
    """One layer's factored key statistics. ``chol`` is the lower Cholesky factor R of
    C + lam I, computed in float64 and stored in float64, or in float32 when the layer
    has more than FACTOR_F32_FEATURES key features (every use solves in float64 with the
    factor made float64 for that call: the stored rounding, 6e-8 relative per entry, is
    amplified at most by cond(R) = sqrt(cond(C + lam I)) <= sqrt(100 x features), about
    7e2 at 4608 features, so solves stay within about 4e-5 relative; the ten such factors
    of a VGG-16 keep 0.6 GB instead of 1.3)."""

    layer: Layer
    chol: torch.Tensor
    n_keys: int
    lam: float
    source: str

    @property
    def factor(self) -> torch.Tensor:
        """R in float64 (a copy when it is stored in float32)."""
        return self.chol.double()

    def whiten(self, rows: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
        """z = R^-1 r for rows [m, in] -> [m, in]; ``factor``: ``self.factor`` when the
        caller already holds it (a float32-stored factor is copied on every read)."""
        factor = self.factor if factor is None else factor
        return torch.linalg.solve_triangular(factor, rows.T.double(), upper=False).T

    def unwhiten_solve(self, a: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
        """d = R^-T a (so that d . k = a . R^-1 k); ``factor`` as for ``whiten``."""
        factor = self.factor if factor is None else factor
        return torch.linalg.solve_triangular(factor.T, a.double().unsqueeze(1), upper=True).squeeze(1)


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
                   lam: float = DEFAULT_LAMBDA, source: str = "stats", max_keys: int = MAX_KEYS_PER_BATCH,
                   outputs: list | None = None) -> dict[str, KeyStats]:
    """Second moments of every layer's keys over inputs ``x`` (current edits applied).
    Per batch at most ``max_keys`` keys per layer are used (every k-th position).
    ``x`` may also be a ``keystats.ShardedKeys`` (a stats set read shard by shard, here or
    on Ray): its per-shard ``key_moments`` are added in shard order. ``outputs``: a list
    that receives the model's outputs on ``x`` (float64 numpy, batch by batch, from the
    passes the keys are read in; nothing for a sharded set)."""
    if hasattr(x, "shard_moments"):
        parts = x.shard_moments(twin, layers, edits=edits, batch_size=batch_size, max_keys=max_keys)
        return stats_from_moments(layers, parts, lam=lam, source=source, device=twin.device)
    # group by group, each group's sums factored before the next group's are made (VGG-19: the
    # sums of every layer at once are 1.6 GB); the same batches for every group: the same sums.
    # The first group's passes keep what the later groups' layers and the graph after them
    # read (``TailRecording``): the later passes recompute that tail only
    batch, cap = _key_batches(twin, layers, x, edits, batch_size, max_keys)
    groups = _moment_groups(layers)
    tail = TailRecording(twin, [l for g in groups[1:] for l in g], TAIL_BUDGET) if len(groups) > 1 else None
    out = {}
    for i, group in enumerate(groups):
        run = None if tail is None else (lambda j, t: tail.forward(t)) if i == 0 else tail.replay
        part = _group_moments(twin, group, x, edits, batch, cap, outputs if i == 0 else None, run=run)
        out.update(stats_from_moments(group, [part], lam=lam, source=source, device=twin.device))
    return {l.node: out[l.node] for l in layers}


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
    batch, cap = _key_batches(twin, layers, x, edits, batch_size, max_keys)
    return _group_moments(twin, layers, x, edits, batch, cap)  # every layer's sums are returned: one pass


def _key_batches(twin: Twin, layers: list[Layer], x, edits, batch_size: int, max_keys: int) -> tuple[int, int]:
    """(inputs per pass, keys per layer and pass): captured activations within
    ACTIVATION_BUDGET, the key cap scaled down with the batch."""
    sizes = activation_sizes(twin, layers, x, edits=edits)
    per_input = 4 * (sum(s[0] for s in sizes.values()) + max(s[2] for s in sizes.values()))
    batch = _batch_for(ACTIVATION_BUDGET, per_input, batch_size)
    return batch, max(1, max_keys * batch // batch_size)


def _moment_groups(layers: list[Layer]) -> list[list[Layer]]:
    """``layers`` in graph order, cut into groups whose float64 sums fit MOMENTS_BUDGET."""
    groups, size = [[]], 0
    for layer in layers:
        need = 8 * layer.in_features ** 2
        if groups[-1] and size + need > MOMENTS_BUDGET:
            groups.append([])
            size = 0
        groups[-1].append(layer)
        size += need
    return groups


def _group_moments(twin: Twin, layers: list[Layer], x, edits, batch: int, cap: int,
                   outputs: list | None = None, run=None) -> dict[str, KeyMoments]:
    """``run(j, batch)``: the model's output on the j-th batch (default ``Twin.forward``)."""
    run = run or (lambda j, t: twin.forward(t))
    dim = {l.node: l.in_features for l in layers}
    acc = {l.node: torch.zeros(dim[l.node], dim[l.node], dtype=torch.float64, device=twin.device) for l in layers}
    count = {l.node: 0 for l in layers}
    # every product k^T k goes through one float32 buffer and into its float64 sum a block of
    # rows at a time (``_add_rows``): a fresh 85 MB product per layer and pass, and its 170 MB
    # float64 copy, were mapped and zeroed by the kernel each time (ResNet-50: 2.3 M page faults)
    product = None
    with torch.no_grad(), twin.applied(edits), twin.capture(layers) as store:
        for i in range(0, len(x), batch):
            for rec in store.values():
                rec["in"].clear()
            out = run(i // batch, twin.to_tensor(x[i:i + batch]))
            if outputs is not None:
                outputs.append(out.double().cpu().numpy())
            for layer in layers:
                keys = sampled_keys(layer, store[layer.node]["in"][0], cap)
                if product is None or product.dtype != keys.dtype:
                    product = torch.empty(max(dim.values()) ** 2, dtype=keys.dtype, device=keys.device)
                _add_gram(acc[layer.node], keys, product)
                count[layer.node] += keys.shape[0]
            for rec in store.values():
                rec["in"].clear()
    return {l.node: KeyMoments(sum_kk=_mirrored(acc.pop(l.node)).cpu().numpy(), count=count[l.node]) for l in layers}


def _gram_edges(k: int) -> list[int]:
    """Edges of the column blocks of a k-wide Gram matrix: k // GRAM_BLOCK blocks (at least
    one), their widths within one column of each other."""
    blocks = max(1, k // GRAM_BLOCK)
    return [i * k // blocks for i in range(blocks + 1)]


def _add_gram(acc: torch.Tensor, keys: torch.Tensor, buf: torch.Tensor) -> None:
    """``acc += keys^T keys`` on and above the diagonal blocks only (``_gram_edges``; the
    blocks below are ``_mirrored`` from them at the end): with b blocks the products cost
    (b + 1) / 2b of the whole one (ResNet-18's 4608-wide convs: 8 blocks, 56 %). Each block
    goes through ``buf`` (float32) into its float64 sum (``_add_rows``)."""
    edges = _gram_edges(keys.shape[1])
    for i in range(len(edges) - 1):
        a = keys[:, edges[i]:edges[i + 1]]
        b = keys[:, edges[i]:]
        w = b.shape[1]
        _add_rows(acc[edges[i]:edges[i + 1], edges[i]:], torch.mm(a.T, b, out=buf[:a.shape[1] * w].view(-1, w)))


def _mirrored(acc: torch.Tensor) -> torch.Tensor:
    """A sum filled by ``_add_gram`` made whole: each block below the diagonal blocks is
    the transpose of its mirror above them."""
    edges = _gram_edges(acc.shape[0])
    for i in range(1, len(edges) - 1):
        acc[edges[i]:, edges[i - 1]:edges[i]] = acc[edges[i - 1]:edges[i], edges[i]:].T
    return acc


def _add_rows(acc: torch.Tensor, part: torch.Tensor) -> None:
    """``acc += part`` (float64 += float32, the same sums bit for bit) a block of rows at a
    time, so that the float64 copy the addition makes of ``part`` is small (ADD_BLOCK)."""
    step = max(1, ADD_BLOCK // (8 * part.shape[1]))
    for r in range(0, part.shape[0], step):
        acc[r:r + step] += part[r:r + step]


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
    memory.trim()
    return out


def regularised_cholesky(acc: torch.Tensor, count: int, lam: float, what: str) -> tuple[torch.Tensor, float]:
    """(lower Cholesky factor of C = acc / count + ridge I, the ridge = lam x mean diag C),
    ``acc`` divided in place; ``what`` names the statistics in the error when C is not
    positive definite."""
    c = acc.div_(max(count, 1))
    ridge = lam * float(torch.diagonal(c).mean().clamp_min(RIDGE_FLOOR))
    c.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise EditError(f"{what} are not positive definite", hint="give more stats inputs or a larger ridge")
    return chol, ridge


def _factor(layer: Layer, acc: torch.Tensor, count: int, lam: float, source: str) -> KeyStats:
    chol, ridge = regularised_cholesky(acc, count, lam, f"key statistics of layer {layer.node!r}")
    if layer.in_features > FACTOR_F32_FEATURES:
        chol = chol.float()
    return KeyStats(layer=layer, chol=chol, n_keys=count, lam=ridge, source=source)


@dataclass(frozen=True)
class PairKeys:
    """One layer's inputs and outputs on the corrupted and clean inputs [n, ...], as
    captured (float32). The keys are unfolded from them pair by pair (``pair``, ``blocks``)
    and kept whole only when they are small (PAIR_KEYS_BUDGET): a 576-wide conv at 240x240
    would hold 9 GB of float64 keys for 17 pairs. A layer whose captures of every pair
    exceed ACTIVATION_BUDGET holds none (``recaptured``): each read runs the pair through
    the network up to the layer again (VGG-16's second conv at 240x240: 1 GB of captures
    for 17 pairs; a pair costs a forward pass through two convs)."""

    layer: Layer
    x_corrupt: torch.Tensor | None
    x_clean: torch.Tensor | None
    v_corrupt: torch.Tensor | None
    v_clean: torch.Tensor | None
    _whole: dict = field(default_factory=dict, compare=False, repr=False)
    recapture: Callable[[int], tuple] | None = field(default=None, compare=False, repr=False)
    n_pairs: int = 0

    @classmethod
    def recaptured(cls, layer: Layer, n: int, recapture: Callable[[int], tuple]) -> "PairKeys":
        """Keys read by ``recapture(i)`` -> (x~, x, v~, v) of pair i, [1, ...] each."""
        return cls(layer, None, None, None, None, recapture=recapture, n_pairs=n)

    @property
    def n(self) -> int:
        return self.n_pairs if self.recapture is not None else int(self.x_corrupt.shape[0])

    def _captured(self, i: int) -> tuple:
        """(x~, x, v~, v) of pair ``i`` [1, ...]; recaptured at most once per pair in a row."""
        if self.recapture is None:
            return self.x_corrupt[i:i + 1], self.x_clean[i:i + 1], self.v_corrupt[i:i + 1], self.v_clean[i:i + 1]
        last = self._whole.get("pair")
        if last is None or last[0] != i:
            self._whole["pair"] = last = (i, self.recapture(i))
        return last[1]

    def _unfold(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        xc, xk = self._captured(i)[:2]
        return layer_keys(self.layer, xc)[0], layer_keys(self.layer, xk)[0]

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every pair's keys, float64 [n, P, in], when they fit PAIR_KEYS_BUDGET; else None."""
        if self.recapture is not None:  # over the capture budget: never small enough to hold
            return None
        if "keys" not in self._whole:
            kc, kk = self._unfold(0)
            small = 2 * 8 * self.n * kc.numel() <= PAIR_KEYS_BUDGET
            self._whole["keys"] = (torch.stack([self._unfold(i)[0] for i in range(self.n)]).double(),
                                   torch.stack([self._unfold(i)[1] for i in range(self.n)]).double()) if small else None
        return self._whole["keys"]

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupted and clean keys of pair ``i``: float64 [P, in]."""
        whole = self._stacked()
        if whole is not None:
            return whole[0][i], whole[1][i]
        kc, kk = self._unfold(i)
        return kc.double(), kk.double()

    def _values(self, i: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupted and clean values of pair ``i`` (every pair when None), float64."""
        vc, vk = (self.v_corrupt, self.v_clean) if i is None else self._captured(i)[2:]
        return layer_values(self.layer, vc).double(), layer_values(self.layer, vk).double()

    def blocks(self, *, values: bool = False):
        """Yield (first pair, corrupted keys, clean keys[, corrupted values, clean values]),
        blocks [pairs, positions, features] in pair and position order: every pair at once
        when the keys are small, else one pair and at most KEY_BLOCK bytes of keys."""
        whole = self._stacked()
        if whole is not None:
            yield (0,) + whole + (self._values() if values else ())
            return
        for i in range(self.n):
            kc, kk = self._unfold(i)  # float32, made float64 a block at a time
            vals = self._values(i) if values else ()
            step = max(1, KEY_BLOCK // (8 * kc.shape[1]))
            for s in range(0, kc.shape[0], step):
                yield (i, kc[None, s:s + step].double(), kk[None, s:s + step].double()) + tuple(
                    v[:, s:s + step] for v in vals)


def pair_keys(twin: Twin, layers: list[Layer], corrupt: np.ndarray, clean: np.ndarray, *, edits=()) -> dict[str, PairKeys]:
    """Every layer's ``PairKeys`` on the pairs (edits applied), captured a few rows per
    forward pass (``Twin.capture_rows``)."""
    with twin.applied(edits):
        c = twin.capture_rows(layers, corrupt)
        k = twin.capture_rows(layers, clean)
    return {layer.node: PairKeys(layer, c[layer.node][0], k[layer.node][0], c[layer.node][1], k[layer.node][1])
            for layer in layers}


def pair_key_groups(twin: Twin, layers: list[Layer], corrupt: np.ndarray, clean: np.ndarray, *, edits=(),
                    sizes: dict | None = None):
    """Yield (layer, PairKeys) for every layer, capturing a group of layers per pass so
    that a group's captured inputs and outputs stay within ACTIVATION_BUDGET (one group
    for small models; a layer larger than that is a group of its own)."""
    sizes = sizes or activation_sizes(twin, layers, corrupt, edits=edits)
    n = len(corrupt) + len(clean)
    group, used = [], 0
    for layer in list(layers) + [None]:
        cost = 0 if layer is None else n * 4 * (sizes[layer.node][0] + sizes[layer.node][1])
        if layer is not None and cost > ACTIVATION_BUDGET and len(corrupt) > 1:
            yield layer, PairKeys.recaptured(layer, len(corrupt), _recapture(twin, layer, corrupt, clean, edits))
            memory.trim()
            continue
        if group and (layer is None or used + cost > ACTIVATION_BUDGET):
            keys = pair_keys(twin, group, corrupt, clean, edits=edits)
            for done in group:
                yield done, keys.pop(done.node)
                memory.trim()  # the layer's keys and their reads are freed by now
            group, used = [], 0
        if layer is not None:
            group.append(layer)
            used += cost


def _recapture(twin: Twin, layer: Layer, corrupt: np.ndarray, clean: np.ndarray, edits):
    def pair(i: int) -> tuple:
        with twin.applied(edits):
            xc, vc = twin.capture_upto(layer, corrupt[i:i + 1])
            xk, vk = twin.capture_upto(layer, clean[i:i + 1])
        return xc, xk, vc, vk

    return pair


@dataclass(frozen=True)
class Direction:
    d: torch.Tensor          # [in], float64
    specificity: float       # Mahalanobis norm of the per-pair summed key change, RMS over the scored pairs
    affected: float          # share of positions whose keys differ
    u_local: torch.Tensor | None = None  # closed-form u for this d (None: d misses every corrupted key)
    view: str = "patch"                  # "pixel": a Conv's pixel view (pixel.py)


def edit_direction(stats: KeyStats, keys: PairKeys, *, key: str = "diff", score_pairs: int | None = None) -> Direction:
    """d = C^-1 k* with k* the top whitened direction of the key differences (see module doc),
    and the layer-local closed-form u for it. ``score_pairs``: the specificity is measured
    on the first ``score_pairs`` pairs only (the given ones; the rest are synthetic).
    The keys are read block by block (``PairKeys.blocks``), three times: their norms, the
    whitened rows' top direction, the projections on it."""
    if key not in ("diff", "corrupt"):
        raise ValueError(f"unknown key formulation {key!r}")
    norms = [(kc - kk).reshape(-1, kc.shape[-1]).norm(dim=1) for _, kc, kk in keys.blocks()]
    scale = max((float(b.max()) for b in norms if b.numel()), default=0.0)
    if scale == 0.0:
        raise EditError(f"layer {stats.layer.node!r}: corrupted and clean inputs give identical keys",
                        hint="the pair does not differ before this layer; pick an earlier layer")
    threshold = AFFECTED_SHARE * scale
    n_score = keys.n if score_pairs is None else min(score_pairs, keys.n)
    kstar = torch.zeros(n_score, stats.chol.shape[0], dtype=torch.float64, device=stats.chol.device)
    pool = _RowPool(stats)
    for (i, kc, kk), nb in zip(keys.blocks(), norms):
        diff = kc - kk
        if i < n_score:  # k*_i = the sum over positions of pair i's key change
            kstar[i:i + diff.shape[0]] += diff[: n_score - i].sum(dim=1)
        mask = nb > threshold
        if key == "diff":
            pool.add(diff.reshape(-1, diff.shape[-1])[mask])
        else:
            pool.add(kc.reshape(-1, kc.shape[-1])[mask] * (nb[mask] / scale).unsqueeze(1))
    factor = stats.factor  # float64, read once for the three solves (VGG-16's 4608-wide: 170 MB)
    top = stats.unwhiten_solve(pool.top(factor), factor)
    # the Mahalanobis norm of k*_i under C (scale-free: the same whatever the scale of the keys)
    maha = float(stats.whiten(kstar, factor).pow(2).sum(1).mean().sqrt())
    del factor
    d = _scaled(stats, top, keys, norms, threshold)
    try:
        u_local = closed_form_u(keys, d)
    except EditError:
        u_local = None
    affected = sum(int((nb > threshold).sum()) for nb in norms) / max(sum(nb.numel() for nb in norms), 1)
    return Direction(d=d, specificity=maha, affected=affected, u_local=u_local)


class _RowPool:
    """The top right singular vector of the whitened rows z = R^-1 r: from the rows
    themselves while they fit ROWS_BUDGET (the smaller of z z^T and z^T z), else from
    their Gram matrix sum r r^T, accumulated block by block (R^-1 G R^-T)."""

    def __init__(self, stats: KeyStats):
        self.stats, self.rows, self.size, self.gram = stats, [], 0, None

    def add(self, rows: torch.Tensor) -> None:
        if self.gram is None and 8 * (self.size + rows.numel()) <= ROWS_BUDGET:
            self.rows.append(rows)
            self.size += rows.numel()
            return
        if self.gram is None:
            dim = self.stats.chol.shape[0]
            self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=self.stats.chol.device)
            for r in self.rows:
                self.gram += r.T @ r
            self.rows = []
        self.gram += rows.T @ rows

    def top(self, factor: torch.Tensor) -> torch.Tensor:
        """``factor``: the stats' R in float64 (``KeyStats.factor``)."""
        if self.gram is not None:  # each n x n intermediate freed once used (4608 wide: 170 MB each)
            half = torch.linalg.solve_triangular(factor, self.gram, upper=False)        # R^-1 G
            self.gram = None
            whitened = torch.linalg.solve_triangular(factor, half.T, upper=False)     # R^-1 G R^-T
            del half
            return top_eigenvector(whitened)
        z = self.stats.whiten(torch.cat(self.rows), factor)  # [m, in]
        if z.shape[0] < z.shape[1]:  # from the smaller Gram matrix
            a = z.T @ top_eigenvector(z @ z.T)
            return a / a.norm().clamp_min(1e-300)
        return top_eigenvector(z.T @ z)


def top_eigenvector(a: torch.Tensor) -> torch.Tensor:
    """The unit eigenvector of the largest eigenvalue of the symmetric PSD matrix ``a``
    (sign arbitrary, as ``eigh``'s). Above EIGH_DIRECT rows: block subspace iteration with
    Rayleigh-Ritz, O(n^2) per step instead of eigh's O(n^3) (4608 wide: about 1 s instead
    of 16 on one core), stopped when |a x - l x| <= EIG_TOL l; eigh itself when the Ritz
    values after 5 steps say that would take more than EIG_STEPS steps, or it has not
    happened by then (too little gap after the top eigenvalue)."""
    n = a.shape[0]
    if n <= EIGH_DIRECT:
        return torch.linalg.eigh(a)[1][:, -1]
    g = torch.Generator(device=a.device).manual_seed(0)
    q = torch.linalg.qr(a @ torch.randn(n, EIG_BLOCK, generator=g, dtype=a.dtype, device=a.device))[0]
    for step in range(EIG_STEPS):
        aq = a @ q
        w, v = torch.linalg.eigh(q.T @ aq)
        x = q @ v[:, -1]
        if float((aq @ v[:, -1] - w[-1] * x).norm()) <= EIG_TOL * float(w[-1].abs()):
            return x
        ratio = float(w[0] / w[-1]) if float(w[-1]) > 0 else 1.0  # ~ l_16 / l_1 once settled
        if step == 4 and (ratio >= 1.0 or math.log(EIG_TOL) / math.log(max(ratio, 1e-300)) > EIG_STEPS):
            break  # too flat a spectrum to converge in EIG_STEPS: eigh at once
        q = torch.linalg.qr(aq)[0]
    log.debug("top eigenvector of a %d-wide matrix: subspace iteration would not converge, eigh", n)
    return torch.linalg.eigh(a)[1][:, -1]


def _scaled(stats: KeyStats, d: torch.Tensor, keys: PairKeys, norms: list, threshold: float) -> torch.Tensor:
    """``d`` scaled so that mean(d . delta) over the affected positions is 1, sign positive;
    changes that cancel in the mean (+k and -k) still separate: mean |d . delta| = 1, the
    sign fixed by the largest projection."""
    proj = torch.cat([(kc - kk).reshape(-1, kc.shape[-1])[nb > threshold] @ d
                      for (_, kc, kk), nb in zip(keys.blocks(), norms)])
    return scaled_by_projections(d, proj, stats.layer)


def scaled_by_projections(d: torch.Tensor, proj: torch.Tensor, layer: Layer) -> torch.Tensor:
    """``d`` scaled by its projections ``proj`` on the affected key changes: mean 1, or
    when they cancel in the mean, mean |proj| = 1 with the largest one positive."""
    mean = float(proj.mean())
    spread = float(proj.abs().mean())
    if spread == 0.0:
        raise EditError(f"layer {layer.node!r}: the edit direction does not separate corrupted from clean keys")
    if abs(mean) > CANCEL_SHARE * spread:
        return d / mean
    return d / (spread if float(proj[proj.abs().argmax()]) > 0 else -spread)


def closed_form_u(keys: PairKeys, d: torch.Tensor) -> torch.Tensor:
    """Least-squares u for fixed d: match the clean outputs at the layer itself."""
    num, denom = 0.0, 0.0
    for _, kc, _, vc, vk in keys.blocks(values=True):
        s = kc.reshape(-1, kc.shape[-1]) @ d                       # [m]
        r = (vk - vc).reshape(-1, vk.shape[-1])                    # [m, out]
        num = num + (s.unsqueeze(1) * r).sum(0)
        denom += float((s * s).sum())
    if denom == 0.0:
        raise EditError("the edit direction is orthogonal to every corrupted key")
    return num / denom
