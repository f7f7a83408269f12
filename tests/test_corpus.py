"""The coverage corpus (tests/corpus.py) in CI: round trips (inspect parity, `diff M M`
identical) on the light graphs, and a few forced one-edit repairs whose diff is rank-1
initializer changes only and that revert bit for bit. The heavy graphs (VGG-19 ...,
dynamo exports) run in benchmarks/bench_coverage.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
from onnx_dynedit.io import load_model  # noqa: E402
from onnx_dynedit.twin import Twin  # noqa: E402
from test_roundtrip import run_cli  # noqa: E402

ROUND_TRIPS = ["zoo_inception_v1", "zoo_shufflenet", "tv_resnet18_legacy13", "tv_mobilenet_v3_small_legacy17",
               "tv_squeezenet1_1_legacy9", f"tv_resnet18_opset{onnx.defs.onnx_opset_version()}", "paddle_style",
               "tf2onnx_style"]
FORCED_EDITS = ["paddle_style", "tf2onnx_style"]  # + bert in test_transformers; resnet18 etc.: the benchmark


def test_registry_is_consistent():
    light = [n for n, e in corpus.CORPUS.items() if not e.heavy]
    assert set(ROUND_TRIPS) <= set(light) and set(FORCED_EDITS) <= set(light)
    families = {e.family.split(",")[0].split(" (")[0] for e in corpus.CORPUS.values()}
    assert len(families) >= 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    cache = {}

    def get(name):
        if name not in cache:
            path = folder / f"{name}.onnx"
            onnx.save_model(corpus.build(name), str(path))
            cache[name] = path
        return cache[name]

    return get


def _shape_args(entry) -> list[str]:
    return [a for k, v in entry.input_shapes.items() for a in ("--input-shape", f"{k}:{','.join(map(str, v))}")]


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip(name, built, capsys):
    path = built(name)
    code, out, err = run_cli(["inspect", path, "--json"] + _shape_args(corpus.CORPUS[name]), capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["parity"]["ok"] and report["parity"]["max_rel_diff"] <= 1e-5, report["parity"]
    assert any(l["editable"] for l in report["layers"])
    code, out, err = run_cli(["diff", path, path], capsys)
    assert code == 0 and out.startswith("identical"), err


@pytest.mark.parametrize("name", FORCED_EDITS)
def test_forced_edit_is_rank_one_and_reverts(name, built, tmp_path, capsys):
    entry = corpus.CORPUS[name]
    path = built(name)
    twin = Twin(load_model(path), "cpu", input_shapes=entry.input_shapes or None)
    corrupt, clean, stats = corpus.synthetic_pair(twin, entry, 3)
    np.savez(tmp_path / "pairs.npz", corrupt=corrupt, clean=clean)
    np.savez(tmp_path / "stats.npz", x=stats)
    out = tmp_path / "edited.onnx"
    code, stdout, err = run_cli(["edit", path, "--pairs", tmp_path / "pairs.npz", "--stats", tmp_path / "stats.npz",
                                 "-o", out, "--criterion", "output", "--target-gap", "0", "--max-edits", "1",
                                 "--max-degradation", "1", "--json"] + _shape_args(entry), capsys)
    assert code in (0, 1), err  # a random pair on random weights: the edit's effect is not the point, its file is
    report = json.loads(stdout)
    assert report["output"] and report["parity_after"]["ok"]
    assert report["attributed_output"] == twin.attributed_output
    code, stdout, _ = run_cli(["diff", path, out, "--json"], capsys)
    diff = json.loads(stdout)
    assert len(diff["changed"]) == 1 and diff["changed"][0]["rank"] == 1 and not diff["other_differences"], diff
    back = tmp_path / "back.onnx"
    code, _, err = run_cli(["revert", out, "-o", back], capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["diff", path, back], capsys)
    assert stdout.startswith("identical")
