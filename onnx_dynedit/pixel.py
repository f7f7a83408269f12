"""Rank-one edits of a Conv in its *pixel view* (keys.pixel_view): keys are the C_in-wide
channel vectors of single input pixels, and one direction d acts at every kernel tap,
dW[o, c, tap] = u[o, tap] d[c].

Why (docs/results.md, "Colour: pixel-view edits"): a confound carried by the input's
colour is one direction of the 3 colour channels at every pixel; in the patch view it is
spread over the 27 unfolded features of each 3x3 patch and a rank-one edit holds only a
part of it. On the resnet_colour sample, the first conv's local least-squares edit with 20
pairs corrects 75.0 % (pixel, rank 1) against 64.2 % (patch, rank 1), and two pixel
directions 92.5 % (`benchmarks/colour_variants.py`).

The direction is computed as in rank_one.edit_direction, over pixels: C = E[k k^T] of the
stats inputs' pixel keys (regularised alike), the top whitened direction of the pairs'
pixel key differences, d = C^-1 k*. Directions of earlier pixel edits of the same layer
are projected out of the whitened rows first, so that a second edit of the layer adds a
new direction (the keys of the layer do not change with its own edits). u's closed form
fits the layer's outputs on x~ to those on x by least squares over every output position
(C_out x taps numbers).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import EditError
from .keys import layer_keys, pixel_keys, pixel_view
from .layers import Layer
from .rank_one import (ACTIVATION_BUDGET, AFFECTED_SHARE, DEFAULT_LAMBDA, KEY_BATCH, Direction,
                       regularised_cholesky, scaled_by_projections)
from .twin import Twin

MAX_PIXELS = 65536  # pixel keys per batch used for C (an even subsample)
EXHAUSTED = 1e-6    # whitened key changes left below this share after projecting out earlier directions: none new


def pixel_factor(twin: Twin, layer: Layer, x: np.ndarray, *, edits=(), lam: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """Lower Cholesky factor of the pixel keys' regularised second moment over inputs ``x``
    (edits applied), float64 [C_in, C_in]."""
    width = pixel_view(layer)[1]
    acc = torch.zeros(width, width, dtype=torch.float64, device=twin.device)
    count = 0
    with torch.no_grad(), twin.applied(edits), twin.capture([layer]) as store:
        twin.forward(twin.to_tensor(x[:1]))  # the layer's input size per row sets the batch
        batch = max(1, min(KEY_BATCH, ACTIVATION_BUDGET // max(4 * store[layer.node]["in"][0].numel(), 1)))
        for i in range(0, len(x), batch):
            store[layer.node]["in"].clear()
            twin.forward(twin.to_tensor(x[i:i + batch]))
            keys = pixel_keys(store[layer.node]["in"][0]).reshape(-1, width)
            if keys.shape[0] > MAX_PIXELS:
                keys = keys[:: -(-keys.shape[0] // MAX_PIXELS)]
            acc += keys.T.double() @ keys.double()
            count += keys.shape[0]
        store[layer.node]["in"].clear()
    return regularised_cholesky(acc, count, lam, f"pixel key statistics of layer {layer.node!r}")[0]


def pixel_direction(twin: Twin, layer: Layer, chol: torch.Tensor, corrupt: np.ndarray, clean: np.ndarray, *,
                    edits=(), used=()) -> Direction:
    """The pixel-view direction d and closed-form u of ``layer`` for the pairs (edits
    applied); ``used``: d's of earlier pixel edits of this layer, projected out."""
    with twin.applied(edits):
        xc, vc = _captured(twin, layer, corrupt)
        xk, vk = _captured(twin, layer, clean)
    per_pair = (pixel_keys(xc) - pixel_keys(xk)).double()  # [pairs, pixels, C_in]
    diff = per_pair.reshape(-1, xc.shape[1])
    norms = diff.norm(dim=1)
    if float(norms.max()) == 0.0:
        raise EditError(f"layer {layer.node!r}: corrupted and clean inputs give identical keys",
                        hint="the pair does not differ before this layer; pick an earlier layer")
    affected = norms > AFFECTED_SHARE * float(norms.max())
    z = torch.linalg.solve_triangular(chol, diff[affected].T, upper=False).T
    whole = float(z.norm())
    for d_prev in used:  # earlier directions, whitened (a = R^T d), projected out
        a_prev = chol.T @ torch.as_tensor(d_prev, dtype=torch.float64, device=chol.device)
        a_prev = a_prev / a_prev.norm().clamp_min(1e-300)
        z = z - (z @ a_prev).unsqueeze(1) * a_prev
    if used and float(z.norm()) <= EXHAUSTED * whole:
        raise EditError(f"layer {layer.node!r}: earlier pixel edits of this layer already use every direction "
                        "the key changes span")
    a = torch.linalg.eigh(z.T @ z)[1][:, -1]
    d = torch.linalg.solve_triangular(chol.T, a.unsqueeze(1), upper=True).squeeze(1)
    d = scaled_by_projections(d, diff[affected] @ d, layer)
    kstar = per_pair.sum(1)  # per pair: the summed key change
    maha = float(torch.linalg.solve_triangular(chol, kstar.T, upper=False).pow(2).sum(0).mean().sqrt())
    try:
        u_local = closed_form_u(layer, xc, vc, vk, d)
    except EditError:
        u_local = None
    return Direction(d=d, specificity=maha, affected=float(affected.double().mean()), u_local=u_local, view="pixel")


def closed_form_u(layer: Layer, xc: torch.Tensor, vc: torch.Tensor, vk: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Least-squares u [C_out x taps] so that the layer's outputs on x~ (edited) match those
    on x: the output change at a position is sum_tap u[:, tap] (d . x~ at that tap's pixel)."""
    s = torch.einsum("bc...,c->b...", xc.double(), d).unsqueeze(1)  # one channel: its patches are the taps
    feats = layer_keys(layer, s).reshape(-1, int(np.prod(layer.kernel)))
    target = (vk - vc).double().flatten(2).transpose(1, 2).reshape(-1, vk.shape[1])
    if float(feats.abs().max()) == 0.0:
        raise EditError("the edit direction is orthogonal to every corrupted key")
    u = torch.linalg.lstsq(feats.cpu(), target.cpu()).solution.to(d.device)  # [taps, C_out]
    return u.T.reshape(-1)


def _captured(twin: Twin, layer: Layer, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rec = twin.capture_rows([layer], x)[layer.node]
    return rec[0], rec[1]
