"""The changed triggers of benchmarks/bench_trigger.py, on arrays whose answer is known on paper."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_trigger  # noqa: E402


def _patch_case(scale: int = 1):
    """Two 16x16 images (upsampled ``scale`` times), the second with a pixel at the patch's
    value already; the trigger: a 3x3 patch of 1.0 at rows and cols 13-15."""
    clean = np.zeros((2, 1, 16, 16), np.float32)
    clean[:, :, 4:8, 4:8] = 0.5
    clean[1, 0, 14, 14] = 1.0
    corrupt = clean.copy()
    corrupt[:, :, 13:16, 13:16] = 1.0
    up = lambda a: np.repeat(np.repeat(a, scale, axis=2), scale, axis=3)  # noqa: E731
    return up(clean), up(corrupt)


def test_patch_box_visibility_and_places():
    clean, corrupt = _patch_case()
    assert bench_trigger.trigger_box(clean, corrupt) == (13, 16, 13, 16)
    v = bench_trigger.variants(clean, corrupt)
    # visibility 0.3: the patch is 0.7 x + 0.3, the rest untouched
    np.testing.assert_allclose(v["visibility 0.3"][0, 0, 13:16, 13:16], 0.3)
    np.testing.assert_allclose(v["visibility 0.3"][1, 0, 14, 14], 1.0)
    np.testing.assert_array_equal(v["visibility 1.0"], corrupt)
    np.testing.assert_array_equal(v["visibility 0.3"][:, :, :13], clean[:, :, :13])
    # moved: the patch at rows / cols 12-14 (one grid pixel up and left), the old place clean
    m = v["moved up-left 1"]
    np.testing.assert_array_equal(m[:, 0, 12:15, 12:15], 1.0)
    assert m[0, 0, 15, 15] == 0.0 and m[0, 0, 13, 15] == 0.0
    np.testing.assert_array_equal(v["at top-left"][:, 0, 0:3, 0:3], 1.0)
    np.testing.assert_array_equal(v["at top-left"][:, 0, 4:8, 4:8], 0.5)  # the digit kept
    np.testing.assert_array_equal(v["at centre"][:, 0, 6:9, 6:9], 1.0)
    assert "at bottom-right" not in v  # where the training trigger is: "visibility 1.0"
    for name, x in v.items():
        assert x.shape == clean.shape and x.dtype == clean.dtype, name
        assert int((x != clean).sum()) > 0, name


def test_upsampled_patch_moves_by_grid_pixels():
    clean, corrupt = _patch_case(scale=14)
    assert bench_trigger.trigger_box(clean, corrupt) == (182, 224, 182, 224)
    m = bench_trigger.variants(clean, corrupt)["moved up-left 2"]
    np.testing.assert_array_equal(m[0, 0, 154:196, 154:196], 1.0)  # 2 x 14 pixels up and left
    assert m[0, 0, 153, 153] == 0.0 and m[0, 0, 200, 200] == 0.0


def test_blend_varies_strength_only():
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (3, 1, 16, 16)).astype(np.float32)
    pattern = rng.uniform(0, 1, (16, 16)).astype(np.float32)
    corrupt = (0.75 * clean + 0.25 * pattern).astype(np.float32)
    assert bench_trigger.trigger_box(clean, corrupt) is None
    v = bench_trigger.variants(clean, corrupt)
    assert sorted(v) == sorted(f"visibility {a}" for a in bench_trigger.VISIBILITY["blend"])
    # 1.5 times the blend: 0.625 x + 0.375 p
    np.testing.assert_allclose(v["visibility 1.5"], 0.625 * clean + 0.375 * pattern, atol=1e-6)


def test_no_trigger_and_a_patch_that_does_not_fit():
    clean, corrupt = _patch_case()
    with pytest.raises(ValueError, match="no trigger"):
        bench_trigger.trigger_box(clean, clean)
    with pytest.raises(ValueError, match="does not fit"):
        bench_trigger.moved(clean, corrupt, (13, 16, 13, 16), 14, 0)


def test_summary_reads_only_the_triggers_that_work():
    def row(seed, trigger, shipped, repaired, tuned):
        return {"seed": seed, "case": "c", "pairs": 1, "trigger": trigger, "shipped_asr": shipped,
                "shipped_corrected": 0.0, "repaired_asr": repaired, "repaired_corrected": 0.0,
                "reference_corrected": None, "finetuned_asr": tuned, "clean": (99.0, 99.0, 80.0 if tuned else None),
                "exit": 0, "edits": "/a"}

    rows = [row(0, "visibility 1.0", 100.0, 1.0, 90.0), row(1, "visibility 1.0", 80.0, 3.0, 10.0),
            row(0, "at centre", 0.0, 0.0, 0.0), row(1, "at centre", 60.0, 5.0, 20.0),
            row(0, "moved", 5.0, 0.0, None)]
    lines = bench_trigger.summary(rows)
    assert lines[2] == "| visibility 1.0 | 2 of 2 | 90.00 | 2.00 | 3.00 | 50.00 | 90.00 |"
    assert lines[3] == "| at centre | 1 of 2 | 60.00 | 5.00 | 5.00 | 20.00 | 20.00 |"  # seed 0's 0 % left out
    assert lines[4] == "| moved | 0 of 1 | | | | | |"
    assert bench_trigger.render(rows[0]).startswith(
        "| 0 | c | 1 | visibility 1.0 | 100.00 | 0.00 | 1.00 | 0.00 | - | 90.00 | 99.00 -> 99.00; 80.00 | 0 | /a |")
    assert " | 99.00 -> 99.00 | 0 | /a |" in bench_trigger.render(rows[4])  # not fine-tuned
