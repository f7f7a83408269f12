"""A bad value of a method option is a user error naming the option (exit 2, one line),
checked once in the library (options.py) before any work; the CLI's help reads each
default from the library. No model is loaded: the option is refused first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from onnx_dynedit.errors import InputError  # noqa: E402
from onnx_dynedit.rectify import AUGMENT, AUGMENT_WIDE, RectifyConfig  # noqa: E402
from test_roundtrip import run_cli  # noqa: E402


@pytest.mark.parametrize("changes, needle", [
    ({"max_degradation": 2.0}, "max_degradation must be in [0, 1], got 2.0"),
    ({"criterion": "bogus"}, "criterion 'bogus' is not one of auto, output, attribution"),
    ({"max_edits": 0}, "max_edits must be >= 1, got 0"),
    ({"holdout": 1.0}, "holdout must be in [0, 1), got 1.0"),
    ({"fit_lr": float("nan")}, "fit_lr must be >= 0, got nan"),
    ({"augment": 2.5}, "augment must be an integer, got 2.5"),
    ({"no_such_option": 1}, "unknown option 'no_such_option'"),
    ({"strengths": []}, "strengths must be one or more numbers, got ()"),
    ({"strengths": "1.5"}, "strengths must be one or more numbers, got '1.5'"),
    ({"strengths": [1.0, -0.5]}, "strengths must be >= 0, got -0.5"),
    ({"strengths": [1.0, float("inf")]}, "strengths must be >= 0, got inf"),
])
def test_a_bad_config_value_is_an_input_error_naming_the_option(changes, needle):
    from onnx_dynedit.api import edit_config

    with pytest.raises(InputError) as info:
        edit_config(**changes)
    assert needle in str(info.value) and info.value.exit_code == 2


def test_edit_model_and_locate_model_refuse_a_bad_value_before_loading(tmp_path):
    from onnx_dynedit.api import edit_model, locate_model

    missing = tmp_path / "missing.onnx"  # the option is refused first: no model is read
    with pytest.raises(InputError, match="objective 'closed' is not one of"):
        edit_model(missing, tmp_path / "pairs.npz", objective="closed")
    with pytest.raises(InputError, match="steps must be >= 1, got 0"):
        locate_model(missing, tmp_path / "pairs.npz", steps=0)


@pytest.mark.parametrize("args, needle", [
    (["--max-degradation", "2"], "--max-degradation must be in [0, 1], got 2.0"),
    (["--max-edits", "0"], "--max-edits must be >= 1, got 0"),
    (["--augment", "-1"], "--augment must be >= 0, got -1"),
    (["--target-gap", "1.5"], "--target-gap must be in [0, 1], got 1.5"),
    (["--strengths", "1,-0.5"], "--strengths must be >= 0, got -0.5"),
])
def test_a_bad_config_value_on_the_cli_exits_2_with_one_line(tmp_path, capsys, args, needle):
    code, out, err = run_cli(["edit", tmp_path / "m.onnx", "--pairs", tmp_path / "p.npz", "-o", tmp_path / "o.onnx",
                              *args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines == [f"dynedit: error: {needle}"], err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_help_reads_the_defaults_from_the_library(capsys):
    cfg = RectifyConfig()
    _, out, _ = run_cli(["edit", "--help"], capsys)
    text = " ".join(out.split())
    for flag, value in (("--max-edits", cfg.max_edits), ("--max-degradation", cfg.max_degradation),
                        ("--target-gap", cfg.target_gap), ("--augment", AUGMENT_WIDE), ("--seed", cfg.seed)):
        assert f"(default {value}" in text.split(flag, 1)[1].split(" --", 1)[0], flag
    assert f"else {AUGMENT};" in text.split("--augment", 1)[1].split(" --", 1)[0]
    _, out, _ = run_cli(["locate", "--help"], capsys)
    assert f"(default {cfg.ig_steps})" in " ".join(out.split())
    _, out, _ = run_cli(["inspect", "--help"], capsys)
    assert "[default: 0 10]" in " ".join(out.split())


@pytest.mark.parametrize("changes", [{"criterion": "bogus"}, {"fit_method": "sgd"}, {"max_edits": 0}])
def test_a_rectify_config_checks_itself(changes):
    """``rectify()`` called with a hand-made config refuses it at construction, not deep
    in the loop."""
    with pytest.raises(InputError) as info:
        RectifyConfig(**changes)
    assert next(iter(changes)) in str(info.value)
    with pytest.raises(InputError):
        RectifyConfig().replace(**changes)
