"""Pixel-view edits of a Conv (pixel.py, ``--conv-keys pixel``): one channel direction d at
every kernel tap, dW[o, c, tap] = u[o, tap] d[c].

Hand-set case, known on paper: a 2 -> 3 channel 3x3 conv (pads 1) on 5x5 inputs whose
stats use channel 0 and channel 1 on disjoint pixels (so C is diagonal), clean inputs
with channel 0 empty and corrupted ones with channel 0 = 1 everywhere (a tint). Every
pixel key changes by e0, so d = e0 (scaled so that d . e0 = 1), and the edit that maps
the corrupted outputs to the clean ones is u[o, tap] = -W[o, 0, tap]: the tint's
contribution removed, exactly (the padding sees no tint, and neither does the edit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onnx_dynedit.api import edit_model, revert_model
from onnx_dynedit.diff import diff_models
from onnx_dynedit.errors import EditError
from onnx_dynedit.io import load_model
from onnx_dynedit.keys import layer_delta, patch_factors
from onnx_dynedit.pixel import pixel_direction, pixel_factor
from onnx_dynedit.rank_one import RankOneEdit
from onnx_dynedit.twin import Twin
from onnx_dynedit.writeback import LayerUpdate, write_back
from test_rank_one import conv_model, only_layer, ort_run

ROOT = Path(__file__).resolve().parents[1]
W = np.arange(54, dtype=np.float64).reshape(3, 2, 3, 3) % 7 - 3  # small integers
B = np.array([0.5, -1.0, 2.0])


def tint_case(tmp_path):
    twin = Twin(load_model(conv_model(tmp_path, W, B)), "cpu")
    rng = np.random.default_rng(0)
    stats = rng.integers(1, 4, size=(8, 2, 5, 5)).astype(np.float32)
    even = (np.add.outer(np.arange(5), np.arange(5)) % 2 == 0)
    stats[:, 0][:, ~even] = 0  # channel 0 on even pixels, channel 1 on odd ones: C diagonal
    stats[:, 1][:, even] = 0
    clean = rng.integers(-2, 3, size=(2, 2, 5, 5)).astype(np.float32)
    clean[:, 0] = 0
    corrupt = clean.copy()
    corrupt[:, 0] = 1.0
    return twin, stats, corrupt, clean


def test_tint_direction_and_u_known_on_paper(tmp_path):
    twin, stats, corrupt, clean = tint_case(tmp_path)
    layer = only_layer(twin)
    chol = pixel_factor(twin, layer, stats)
    got = pixel_direction(twin, layer, chol, corrupt, clean)
    assert got.view == "pixel"
    np.testing.assert_allclose(got.d.numpy(), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(got.u_local.numpy(), -W[:, 0].reshape(-1), atol=1e-9)
    edit = RankOneEdit(layer, got.u_local.numpy(), got.d.numpy(), view="pixel")
    with torch.no_grad(), twin.applied([edit]):
        fixed = twin.forward(twin.to_tensor(corrupt)).numpy()
    np.testing.assert_allclose(fixed, twin.run(clean), atol=1e-5)
    # written into the ONNX weight as its patch-space factors: ONNX Runtime agrees
    written = write_back(twin.loaded, [LayerUpdate(layer=layer, factors=tuple(edit.factors()))])
    np.testing.assert_allclose(ort_run(written, corrupt), twin.run(clean), atol=1e-5)


def test_pixel_delta_is_the_sum_of_its_patch_factors(tmp_path):
    twin = Twin(load_model(conv_model(tmp_path, W, B)), "cpu")
    layer = only_layer(twin)
    rng = np.random.default_rng(1)
    u, d = rng.standard_normal(27), rng.standard_normal(2)
    x = torch.as_tensor(rng.standard_normal((2, 2, 5, 5)), dtype=torch.float32)
    pixel = layer_delta(layer, x, torch.as_tensor(u).float(), torch.as_tensor(d).float(), "pixel")
    factors = patch_factors(layer, u, d, "pixel")
    assert len(factors) == 9 and all(f[1].shape == (18,) for f in factors)
    summed = sum(layer_delta(layer, x, torch.as_tensor(fu).float(), torch.as_tensor(fd).float()) for fu, fd in factors)
    np.testing.assert_allclose(pixel.numpy(), summed.numpy(), atol=1e-5)
    # the canonical delta: dW[o, c, tap] = u[o, tap] d[c]
    delta = sum(np.outer(fu, fd) for fu, fd in factors)
    np.testing.assert_allclose(delta.reshape(3, 2, 3, 3), np.einsum("ot,c->oct", u.reshape(3, 9), d).reshape(3, 2, 3, 3))


def test_second_pixel_edit_takes_a_new_direction(tmp_path):
    twin, stats, corrupt, clean = tint_case(tmp_path)
    corrupt[:, 1, :2] += 2.0  # the tint now spans both channels (two rows differ): two directions
    layer = only_layer(twin)
    chol = pixel_factor(twin, layer, stats)
    first = pixel_direction(twin, layer, chol, corrupt, clean)
    second = pixel_direction(twin, layer, chol, corrupt, clean, used=[first.d.numpy()])
    a1, a2 = chol.T @ first.d, chol.T @ second.d  # whitened: orthogonal
    assert abs(float(a1 @ a2)) < 1e-9 * float(a1.norm() * a2.norm())
    with pytest.raises(EditError, match="already use every direction"):
        pixel_direction(twin, layer, chol, corrupt, clean, used=[first.d.numpy(), second.d.numpy()])


def test_colour_sample_pixel_edits_written_revert_and_correct(tmp_path):
    """resnet_colour, 20 pairs, two pixel-view edits of the first conv (local objective):
    only that initializer changes, ONNX Runtime agrees with the twin, revert gives the
    original back, and held-out inputs in another class's colour are corrected far more
    often than by the shipped model (51.9 %)."""
    case = ROOT / "sample_models" / "resnet_colour"
    out = tmp_path / "fixed.onnx"
    outcome = edit_model(case / "model.onnx", case / "pairs20.npz", out, stats=case / "stats.npz",
                         val=case / "val.npz", conv_keys="pixel", objective="local", layers=["/0/Conv"], max_edits=2,
                         max_degradation=0.05,
                         device="cpu")
    res = outcome.result
    assert [e.view for e in res.edits] == ["pixel", "pixel"] and all(e.layer.node == "/0/Conv" for e in res.edits)
    assert outcome.parity_after["max_rel_diff"] < 1e-4
    d = diff_models(load_model(case / "model.onnx"), load_model(out))
    stem = res.edits[0].layer.initializer
    assert [c.initializer for c in d.changed] == [stem] and not d.other_differences
    assert 1 < d.changed[0].rank <= 2 * 9  # two pixel directions: rank up to 2 x taps in the patch view
    meta = json.loads((case / "meta.json").read_text())
    test = np.load(case / "corrupt_test.npz")
    corrected = float((ort_run(str(out), test["x"]).argmax(1) == test["y"]).mean())
    assert corrected > meta["corrupt_acc"] + 0.2
    back = tmp_path / "back.onnx"
    revert_model(out, back)
    assert diff_models(load_model(case / "model.onnx"), load_model(back)).identical
