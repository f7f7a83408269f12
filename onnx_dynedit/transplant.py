"""Synthetic pairs: the given pairs' corruption transplanted onto other inputs.

The loop fits on the given pairs plus ``augment`` synthetic ones, and judges its candidates
on check pairs made the same way from inputs nothing in the fit uses (``rectify``). How a
corruption is carried over depends on what it is (``corruption_model``): a pasted patch,
a whole-image blend, a re-colouring, or (one widely changed pair) an additive guess.
"""

from __future__ import annotations

import numpy as np

GAIN_FLOOR = 1e-12    # denominators of the per-channel gains (an all-zero channel)
SAME_VALUE = 1e-6     # a stats input 'equals' the clean twin where the pairs differ within this
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
        g = (c * k).sum(2) / np.maximum((k * k).sum(2), GAIN_FLOOR)
        resid = np.linalg.norm((c - g[:, :, None] * k).reshape(n, -1), axis=1)
        diff = np.linalg.norm((c - k).reshape(n, -1), axis=1)
        if np.all(resid <= GAIN_RESIDUAL * np.maximum(diff, GAIN_FLOOR)):
            return "gain"
    if n >= 2:
        return "affine"
    return "paste" if float((corrupt != clean).mean()) <= PASTE_SHARE else "add"


def wide_corruption(corrupt: np.ndarray, clean: np.ndarray) -> bool:
    """The given pairs change more than PASTE_SHARE of their elements and are not a
    re-colouring: a whole-image corruption (a blend), not a pasted patch."""
    return float((corrupt != clean).mean()) > PASTE_SHARE and corruption_model(corrupt, clean) != "gain"


def transplant_model(corrupt: np.ndarray, clean: np.ndarray, model: str) -> str:
    """The transplant ``model`` resolves to for these pairs ("auto": ``corruption_model``;
    "affine" with one pair: "add")."""
    if model == "auto":
        model = corruption_model(corrupt, clean)
    return "add" if model == "affine" and len(corrupt) < 2 else model


def transplant_pairs(corrupt: np.ndarray, clean: np.ndarray, pool: np.ndarray, m: int, *, match: bool = False,
                     model: str = "add", strengths: tuple[float, ...] = (1.0,)):
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

    ``strengths``: synthetic pair i is s + a_i (t(s) - s), t(s) the transplant above and a_i
    cycling over ``strengths`` (clipped like the rest): (1.0,) is the corruption as given;
    (1.0, 1.5, ...) also shows the fit the corruption stronger or fainter than the pairs.

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
    if tuple(strengths) != (1.0,):
        a = np.asarray(strengths, np.float64)[np.arange(len(syn)) % len(strengths)].reshape((-1,) + (1,) * (syn.ndim - 1))
        s = src.astype(np.float64)
        syn = np.clip(s + a * (syn - s), lo, hi)
    return np.concatenate([corrupt, syn.astype(corrupt.dtype)]), np.concatenate([clean, src.astype(clean.dtype)])


def _gain_transplant(corrupt, clean, pool, m: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(sources, synthetic inputs): pool inputs with pair j's per-channel gain, the tail of
    the pool first; those that keep less than half of their mass are skipped."""
    n = len(corrupt)
    c = corrupt.reshape(n, corrupt.shape[1], -1).astype(np.float64)
    k = clean.reshape(n, clean.shape[1], -1).astype(np.float64)
    gain = (c * k).sum(2) / np.maximum((k * k).sum(2), GAIN_FLOOR)  # [n, channels]
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
