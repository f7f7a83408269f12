"""Erasing a key direction (``objective="erase"``): the edited layer stops seeing the
component of its keys along the edit direction d,

    W' = W - W d d^T / |d|^2        (u = -W d / |d|^2, rank one),

W being the layer's weight with its earlier edits. For a Conv the keys are its pixel view
(keys.pixel_view): the channel vector of one input pixel, d acting at every kernel tap, so
the layer becomes blind to one colour-like direction of its input. For Gemm / MatMul the
keys are the input's feature vectors. A second erase of the same layer removes a direction
orthogonal to the earlier ones, so that edits compose into the orthogonal projection off
their span (a later direction with a part along an erased one would bring it back).

Why (docs/results.md, "Colour: pixel-view edits"): on the resnet_colour sample the confound is the
input's colour; the pairs' whitened directions (pixel.pixel_direction) erased at the first
conv correct 74.72 % (one) and 93.06 % (two) of the held-out triggered inputs with 5 pairs,
where the fitted u of ``objective="local"`` gives 71.11 / 78.06 % (benchmarks/colour_variants.py).
The erased map is the same family as the other objectives (W + u d^T); only u is not
fitted: no pair's output is matched, a feature is removed. It is a concept-erasure step
(nullspace projection, as in INLP), with d from the pairs.

u is computed from the layer's own forward on the corrupted inputs' keys projected onto d
(twin hooks applied), so the weight's layout (Gemm transB / alpha, transposed MatMul
weights, pads) is the twin's, and solved by least squares with the same features as the
local closed form; the fit is exact up to rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import EditError
from .layers import Layer
from .pixel import closed_form_u
from .twin import Twin


def erase_edit(twin: Twin, layer: Layer, d: torch.Tensor, view: str, prev, x: np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, d) of the edit that removes ``layer``'s sight of direction ``d`` (float64; d
    orthogonalised against the directions that earlier edits of the layer in ``view`` use),
    with the edits ``prev`` applied; the keys are the layer's inputs on ``x``."""
    if layer.op == "Conv" and view != "pixel":
        raise EditError(f"layer {layer.node!r}: erasing a direction takes a Conv in its pixel view")
    used = [e.d for e in prev if e.layer.node == layer.node and e.view == view]
    d = orthogonal_to(d.double(), used)
    with torch.no_grad(), twin.applied(prev):
        captured = twin.capture_rows([layer], x)[layer.node][0]
        keys = captured.double()
        unit = d.to(keys.device) / d.norm()
        if layer.op == "Conv":
            s = torch.einsum("bc...,c->b...", keys, unit)
            projected = s.unsqueeze(1) * unit.view((1, -1) + (1,) * (keys.dim() - 2))
        else:
            projected = (keys @ unit).unsqueeze(-1) * unit
        change = _layer_change(twin, layer, projected.to(captured.dtype))
    if layer.op == "Conv":
        u = closed_form_u(layer, keys, change, torch.zeros_like(change), d.to(keys.device))
    else:
        feats = (keys @ d.to(keys.device)).reshape(-1, 1)
        if float(feats.abs().max()) == 0.0:
            raise EditError("the edit direction is orthogonal to every corrupted key")
        u = torch.linalg.lstsq(feats.cpu(), -change.reshape(feats.shape[0], -1).cpu()).solution[0]
    return u.to(d.device), d


def orthogonal_to(d: torch.Tensor, used) -> torch.Tensor:
    """``d`` with its parts along the span of ``used`` removed (Euclidean, Gram-Schmidt)."""
    basis: list[torch.Tensor] = []
    for prev in used:
        v = torch.as_tensor(prev, dtype=torch.float64, device=d.device).reshape(-1).clone()
        for b in basis:
            v = v - (v @ b) * b
        if float(v.norm()) > 1e-12:
            basis.append(v / v.norm())
    whole = float(d.norm())
    for b in basis:
        d = d - (d @ b) * b
    if float(d.norm()) <= 1e-6 * whole:
        raise EditError("earlier edits of this layer already erase every direction the key changes span")
    return d


def _layer_change(twin: Twin, layer: Layer, projected: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``projected`` keys minus its output on zeros (its bias), in
    float64: W d (d . k) / |d|^2 at every output position."""
    module = twin.module_of(layer)
    try:
        return (module(projected) - module(torch.zeros_like(projected))).double()
    except TypeError as exc:  # a module that takes its weight as an input
        raise EditError(f"layer {layer.node!r}: its twin module cannot run on its keys alone ({exc})") from None
