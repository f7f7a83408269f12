"""Synthetic pairs: the corruption of the given pairs copied onto stats inputs (hand-set)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dynedit.transplant import corruption_model, transplant_pairs, wide_corruption

RNG = np.random.default_rng(0)


def _digits(n, c=1):
    return RNG.uniform(0, 1, (n, c, 4, 4)).astype(np.float32)


def test_affine_recovers_a_blend_exactly():
    pattern = RNG.uniform(0, 1, (1, 4, 4)).astype(np.float32)
    clean = _digits(5)
    corrupt = (0.75 * clean + 0.25 * pattern).astype(np.float32)
    pool = _digits(8)
    assert corruption_model(corrupt, clean) == "affine"
    c, k = transplant_pairs(corrupt, clean, pool, 8, model="auto")
    assert len(c) == 13
    np.testing.assert_array_equal(k[5:], pool)
    np.testing.assert_allclose(c[5:], 0.75 * pool + 0.25 * pattern, atol=1e-2)  # the ridge toward a = 1 biases a slightly
    # the additive transplant only approximates it
    c_add, _ = transplant_pairs(corrupt, clean, pool, 8, model="add")
    assert np.abs(c_add[5:] - (0.75 * pool + 0.25 * pattern)).max() > 0.05


def test_affine_with_one_pair_is_the_additive_transplant():
    clean = _digits(1)
    corrupt = clean.copy()
    corrupt[..., 3:, 3:] = 1.0  # a pasted patch
    pool = _digits(4)
    assert corruption_model(corrupt, clean) == "paste"  # one pair, 1 of 16 elements changed: localised
    a = transplant_pairs(corrupt, clean, pool, 4, model="affine")
    b = transplant_pairs(corrupt, clean, pool, 4, model="add")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_gain_recolours_grey_inputs_and_skips_colours_they_lack():
    shape = RNG.uniform(0, 1, (3, 1, 4, 4)).astype(np.float32)
    grey = np.array([0.6, 0.6, 0.6], np.float32)[None, :, None, None]
    red, green = (np.array(v, np.float32)[None, :, None, None] for v in ([1, 0, 0], [0, 1, 0]))
    clean = shape * grey
    corrupt = np.concatenate([shape[:2] * red, shape[2:] * green])
    assert corruption_model(corrupt, clean) == "gain"
    pool = np.concatenate([shape * grey, shape[:1] * green])  # 3 grey inputs, then a green one
    c, k = transplant_pairs(corrupt, clean, pool, 4, model="auto")
    # the green pool input first (tail first): red gain on it leaves nothing -> skipped
    assert len(c) == 3 + 3
    assert not any(np.array_equal(row, pool[3]) for row in k[3:])
    np.testing.assert_allclose(c[3], pool[2] / 0.6 * red[0], atol=1e-6)  # grey -> red


def test_unknown_transplant_is_refused():
    with pytest.raises(ValueError):
        transplant_pairs(_digits(1), _digits(1), _digits(2), 2, model="nope")


def test_strengths_scale_the_transplanted_corruption_in_turn():
    """A blend x~ = 0.75 x + 0.25 p at strength a is x + a (x~ - x) = (1 - a/4) x + (a/4) p:
    pair i of the synthetic ones takes a = strengths[i % len(strengths)]; the given pairs
    stay as they are; (1.0,) is the transplant unchanged, bit for bit."""
    pattern = RNG.uniform(0, 1, (1, 4, 4)).astype(np.float32)
    clean = _digits(5)
    corrupt = (0.75 * clean + 0.25 * pattern).astype(np.float32)
    pool = _digits(6) * 0.5
    c1, k1 = transplant_pairs(corrupt, clean, pool, 6, model="affine")
    same = transplant_pairs(corrupt, clean, pool, 6, model="affine", strengths=(1.0,))
    np.testing.assert_array_equal(same[0], c1)
    c, k = transplant_pairs(corrupt, clean, pool, 6, model="affine", strengths=(1.0, 2.0, 0.5))
    np.testing.assert_array_equal(c[:5], corrupt)
    np.testing.assert_array_equal(k, k1)
    for i, a in enumerate((1.0, 2.0, 0.5, 1.0, 2.0, 0.5)):
        np.testing.assert_allclose(c[5 + i], (1 - a / 4) * pool[i] + (a / 4) * pattern, atol=2e-2)
        np.testing.assert_allclose(c[5 + i] - pool[i], a * (c1[5 + i] - pool[i]), atol=1e-6)


def test_a_stronger_patch_is_clipped_to_the_pairs_range():
    clean = np.zeros((1, 1, 4, 4), np.float32)
    corrupt = clean.copy()
    corrupt[..., 3:, 3:] = 1.0
    pool = np.full((2, 1, 4, 4), 0.5, np.float32)
    c, _ = transplant_pairs(corrupt, clean, pool, 2, model="paste", strengths=(2.0, 0.5))
    assert c[1, 0, 3, 3] == 1.0 and c[2, 0, 3, 3] == 0.75  # 0.5 + 2 x 0.5 clipped to 1; 0.5 + 0.5 x 0.5
    np.testing.assert_array_equal(c[1:, 0, :3], pool[:, 0, :3])


def test_wide_corruption_is_a_whole_image_change_but_not_a_recolouring():
    clean = _digits(5)
    patched = clean.copy()
    patched[..., 3:, 3:] = 1.0                       # 1 of 16 elements
    blended = (0.75 * clean + 0.25 * _digits(1)[0]).astype(np.float32)
    grey = np.repeat(_digits(5), 3, axis=1)
    tinted = (grey * np.array([1.0, 0.4, 0.2], np.float32).reshape(1, 3, 1, 1)).astype(np.float32)
    assert not wide_corruption(patched, clean) and not wide_corruption(patched[:1], clean[:1])
    assert wide_corruption(blended, clean) and wide_corruption(blended[:1], clean[:1])
    assert corruption_model(tinted, grey) == "gain" and not wide_corruption(tinted, grey)
