"""Datasets as folders / globs of .npz shards (issue 13), local engine: real sample model,
real ONNX Runtime. The Ray engine is tested in test_engine_ray.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_dynedit.datasets import open_dataset
from onnx_dynedit.errors import InputError, UnsafeInputError
from onnx_dynedit.verify import verify

REPO = Path(__file__).resolve().parents[1]
BADNETS = REPO / "sample_models" / "badnets"


def perturbed_copy(src: Path, dst: Path, *, seed: int = 0) -> Path:
    """The sample model with its last Gemm's weights nudged: a stand-in "edited" model that
    changes some predictions (cheap: no torch)."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name == "17.weight":
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((w + 0.4 * rng.standard_normal(w.shape)).astype(w.dtype), init.name))
    onnx.save(model, str(dst))
    return dst


def split(src: Path, folder: Path, sizes: list[int], *, prefix: str = "part") -> Path:
    """Write ``src``'s arrays as shards of the given row counts (the last takes the rest)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.load(src)
    arrays = {k: data[k] for k in data.files}
    n = len(arrays["x"])
    bounds = np.cumsum([0] + sizes[:-1] + [n - sum(sizes[:-1])])
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.savez(folder / f"{prefix}-{i:03d}.npz", **{k: v[a:b] for k, v in arrays.items()})
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {
        "edited": perturbed_copy(BADNETS / "model.onnx", root / "edited.onnx"),
        "clean": split(BADNETS / "clean_test.npz", root / "clean", [100, 7, 200]),
        "corrupt": split(BADNETS / "corrupt_test.npz", root / "corrupt", [90, 90, 90]),
        "stats": split(BADNETS / "stats.npz", root / "stats", [64, 64, 72]),
        "root": root,
    }


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dynedit: error: "), proc.stderr
    for needle in needles:
        assert needle in err, (needle, err)


def assert_same_figures(a: dict, b: dict) -> None:
    """Counts identical, sums within float rounding."""
    for part in ("clean", "corrupt"):
        for key, va in a[part].items():
            vb = b[part][key]
            if isinstance(va, float):
                assert vb == pytest.approx(va, rel=1e-9, abs=1e-12), (part, key)
            else:
                assert va == vb, (part, key)
    assert a["passed"] == b["passed"]


def test_open_dataset_folder_glob_and_file(shards):
    folder = open_dataset(shards["clean"], what="clean")
    assert [Path(s.path).name for s in folder.shards] == ["part-000.npz", "part-001.npz", "part-002.npz"]
    assert [s.n for s in folder.shards] == [100, 7, 253] and folder.n == 360 and folder.has_labels and folder.sharded
    glob = open_dataset(str(shards["corrupt"] / "part-00[12].npz"), what="corrupt", labels="required")
    assert [s.n for s in glob.shards] == [90, 180 - 90 + 90] and glob.n == 270
    one = open_dataset(BADNETS / "clean_test.npz", what="clean")
    assert len(one.shards) == 1 and not one.sharded and one.n == 360
    stats = open_dataset(shards["stats"], what="stats", labels="ignored")
    assert stats.head(70).shape == (70, 1, 16, 16) and not stats.has_labels


def test_sharded_verify_equals_one_file(shards):
    one = verify(BADNETS / "model.onnx", shards["edited"], BADNETS / "clean_test.npz",
                 corrupt=BADNETS / "corrupt_test.npz", target=0).to_dict()
    many = verify(BADNETS / "model.onnx", shards["edited"], shards["clean"],
                  corrupt=str(shards["corrupt"] / "part-*.npz"), target=0, batch_size=64).to_dict()
    assert one["shards"] == {"clean": 1, "corrupt": 1} and many["shards"] == {"clean": 3, "corrupt": 3}
    assert many["engine"] == "local" and many["workers"] == 1
    assert 0 < many["clean"]["agreement"] < 1  # the perturbation changes some predictions
    assert_same_figures(one, many)


@pytest.mark.parametrize("make, needles", [
    (lambda d: np.savez(d / "part-009.npz", x=np.zeros((4, 1, 16, 15), np.float32), y=np.zeros(4, np.int64)),
     ["part-009.npz", "(4, 1, 16, 15)"]),
    (lambda d: np.savez(d / "part-009.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, np.int64)),
     ["part-009.npz", "Python objects"]),
    (lambda d: np.savez(d / "part-009.npz", inputs=np.zeros((4, 1, 16, 16), np.float32)),
     ["part-009.npz", "no array 'x'"]),
    (lambda d: np.savez(d / "part-009.npz", x=np.zeros((4, 1, 16, 16), np.float32)),
     ["part-009.npz", "no labels 'y'"]),
    (lambda d: (d / "part-009.npz").write_bytes(b"not a zip"), ["part-009.npz", "not an .npz"]),
])
def test_bad_shard_is_refused_with_its_file_named(shards, tmp_path, make, needles):
    folder = split(BADNETS / "clean_test.npz", tmp_path / "clean", [300])
    make(folder)
    with pytest.raises(InputError) as info:  # DataError, or UnsafeInputError for a pickle
        verify(BADNETS / "model.onnx", shards["edited"], folder)
    text = info.value.one_line()
    assert len(text.splitlines()) == 1
    for needle in needles:
        assert needle in text, (needle, text)


def test_pickled_shard_is_refused_without_unpickling(shards, tmp_path):
    folder = split(BADNETS / "stats.npz", tmp_path / "stats", [200])
    np.savez(folder / "part-001.npz", x=np.array([object()] * 3, dtype=object))
    with pytest.raises(UnsafeInputError, match="part-001.npz"):
        open_dataset(folder, what="stats", labels="ignored")


def test_shard_shape_wrong_for_model_cli(shards, tmp_path):
    folder = tmp_path / "clean"
    folder.mkdir()
    for i in range(2):
        np.savez(folder / f"s{i}.npz", x=np.zeros((3, 1, 8, 8), np.float32))
    assert_one_line_error(cli("verify", BADNETS / "model.onnx", shards["edited"], "--clean", folder),
                          "s0.npz", "(3, 1, 8, 8)")
    assert_one_line_error(cli("verify", BADNETS / "model.onnx", shards["edited"], "--clean", tmp_path / "none-*.npz"),
                          "matches no file")


def test_sharded_key_statistics_add_up_to_the_whole(shards):
    """Per-shard sums of k k^T reduce to the same statistics as one pass over the whole
    set (shards of 64 rows: the same batches of 32, so the same subsampled keys)."""
    import torch

    from onnx_dynedit.io import load_model
    from onnx_dynedit.keystats import ShardedKeys
    from onnx_dynedit.rank_one import key_statistics
    from onnx_dynedit.twin import Twin

    twin = Twin(load_model(BADNETS / "model.onnx"), "cpu")
    layers = twin.layer_map.editable()
    x = np.load(BADNETS / "stats.npz")["x"]
    whole = key_statistics(twin, layers, x)
    with ShardedKeys(open_dataset(shards["stats"], what="stats", labels="ignored")) as keys:
        assert keys.n == 200 and "3 shards" in keys.source
        parts = key_statistics(twin, layers, keys)
    for layer in layers:
        a, b = whole[layer.node], parts[layer.node]
        assert a.n_keys == b.n_keys
        torch.testing.assert_close(a.chol, b.chol, rtol=1e-9, atol=1e-9)


def test_locate_streams_a_sharded_stats_folder(shards):
    """The CLI wiring: `locate --stats FOLDER` runs the key statistics shard by shard (the
    per-shard sums are checked against one pass above) and says so."""
    proc = cli("locate", BADNETS / "model.onnx", "--pairs", BADNETS / "pairs.npz", "--stats", shards["stats"],
               "--steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["engine"] == "local" and data["workers"] == 1
    assert data["stats_source"] == "stats (200 inputs in 3 shards)"
    bad = shards["root"] / "bad_stats"
    bad.mkdir()
    np.savez(bad / "a.npz", x=np.zeros((3, 1, 16, 16), np.float32))
    np.savez(bad / "b.npz", x=np.zeros((3, 16, 16), np.float32))
    assert_one_line_error(cli("locate", BADNETS / "model.onnx", "--pairs", BADNETS / "pairs.npz", "--stats", bad),
                          "b.npz", "(3, 16, 16)")


def test_engine_options_are_checked_before_any_work(shards):
    from onnx_dynedit.errors import InputError as IE

    with pytest.raises(IE, match="unknown engine"):
        verify(BADNETS / "model.onnx", shards["edited"], shards["clean"], engine="spark")
    with pytest.raises(IE, match="needs the ray engine"):
        verify(BADNETS / "model.onnx", shards["edited"], shards["clean"], ray_address="auto")
    with pytest.raises(IE, match="CPU workers"):
        verify(BADNETS / "model.onnx", shards["edited"], shards["clean"], engine="ray", provider="cuda")


def test_edit_streams_a_sharded_stats_folder(shards, tmp_path):
    """`edit --stats FOLDER`: the loop's key statistics come from every shard (the report
    says how many); the rest of the loop uses the first shard."""
    out = tmp_path / "fixed.onnx"
    proc = cli("edit", BADNETS / "model.onnx", "--pairs", BADNETS / "pairs.npz", "--stats", shards["stats"],
               "--val", BADNETS / "val.npz", "--max-edits", "1", "--layer", "/3/Conv", "--objective", "local",
               "--augment", "0", "-o", out, "--json")  # the quick path: pinned layer, closed-form u
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["engine"] == "local" and data["workers"] == 1
    assert data["stats_source"].startswith("stats (200 inputs in 3 shards")
    assert data["inputs"]["stats"] == str(shards["stats"])
    assert data["inputs"]["val_in_stats"] is None  # streamed stats: not compared against one shard
