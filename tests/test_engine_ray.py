"""`--engine ray` on a real local Ray (issue 13): no mocks. One Ray (2 CPUs) for the module,
plus one CLI run that starts and stops its own. Figures are compared with the local
engine's on the badnets sample's held-out sets split into shards."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from onnx_dynedit.datasets import open_dataset  # noqa: E402
from onnx_dynedit.engine_ray import CRASH_ONCE_ENV  # noqa: E402
from onnx_dynedit.errors import DataError, InputError  # noqa: E402
from onnx_dynedit.verify import verify  # noqa: E402
from test_datasets import BADNETS, REPO, assert_same_figures, perturbed_copy, split  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray with 2 CPUs. Its workers see CRASH_ONCE_ENV (set only while Ray starts):
    while the marker file exists nothing happens; a test that removes it makes the first
    worker task kill its own process once."""
    root = tmp_path_factory.mktemp("ray")
    marker = root / "crashed"
    marker.write_text("armed later")
    assert not ray.is_initialized()
    os.environ[CRASH_ONCE_ENV] = str(marker)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
    finally:
        del os.environ[CRASH_ONCE_ENV]
    data = {
        "marker": marker,
        "edited": perturbed_copy(BADNETS / "model.onnx", root / "edited.onnx"),
        "clean": split(BADNETS / "clean_test.npz", root / "clean", [100, 7, 120, 50]),
        "corrupt": split(BADNETS / "corrupt_test.npz", root / "corrupt", [90, 90, 90]),
        "stats": split(BADNETS / "stats.npz", root / "stats", [64, 64, 72]),
    }
    try:
        yield data
    finally:
        ray.shutdown()


def run_verify(cluster, engine, **kw):
    return verify(BADNETS / "model.onnx", cluster["edited"], cluster["clean"], corrupt=cluster["corrupt"],
                  target=0, engine=engine, **kw).to_dict()


def test_verify_ray_equals_local(cluster):
    local = run_verify(cluster, "local")
    on_ray = run_verify(cluster, "ray")
    assert local["engine"] == "local" and on_ray["engine"] == "ray"
    assert on_ray["workers"] == 2 and on_ray["shards"] == {"clean": 4, "corrupt": 3}
    assert_same_figures(local, on_ray)
    assert on_ray["clean"]["n"] == 360 and on_ray["corrupt"]["n"] == 360


def test_worker_killed_mid_run_is_retried(cluster):
    local = run_verify(cluster, "local")
    cluster["marker"].unlink()  # arm: the first shard's worker exits its process
    on_ray = run_verify(cluster, "ray")
    assert cluster["marker"].exists(), "no worker crashed: the fault was not injected"
    assert int(cluster["marker"].read_text()) != os.getpid()
    assert_same_figures(local, on_ray)


def test_bad_shards_are_refused_on_ray(cluster, tmp_path):
    # A wrong shape and a pickled array: refused from the headers, before any worker runs.
    folder = split(BADNETS / "clean_test.npz", tmp_path / "clean", [200])
    np.savez(folder / "part-009.npz", x=np.zeros((4, 1, 16, 15), np.float32))
    with pytest.raises(DataError, match="part-009.npz"):
        verify(BADNETS / "model.onnx", cluster["edited"], folder, engine="ray")
    np.savez(folder / "part-009.npz", x=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(InputError, match=r"part-009.npz.*Python objects"):
        verify(BADNETS / "model.onnx", cluster["edited"], folder, engine="ray")
    # NaN inside a shard is only seen when a worker reads it: the same one-line error comes back.
    x = np.load(BADNETS / "clean_test.npz")["x"][:5].copy()
    x[2, 0, 0, 0] = np.nan
    np.savez(folder / "part-009.npz", x=x, y=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"part-009.npz.*NaN") as info:
        verify(BADNETS / "model.onnx", cluster["edited"], folder, engine="ray")
    assert len(info.value.one_line().splitlines()) == 1 and "Traceback" not in str(info.value)


def test_key_statistics_ray_equals_local_with_a_crash(cluster):
    import torch

    from onnx_dynedit.io import load_model
    from onnx_dynedit.keystats import ShardedKeys
    from onnx_dynedit.rank_one import key_statistics
    from onnx_dynedit.twin import Twin

    model = BADNETS / "model.onnx"
    twin = Twin(load_model(model), "cpu")
    layers = twin.layer_map.editable()
    # With an edit upstream applied (as in the loop after an accepted edit).
    first = layers[0]
    rng = np.random.default_rng(0)
    edits = [SimpleNamespace(layer=first,  # what Twin.applied takes: .layer, .u, .d
                             u=torch.as_tensor(rng.standard_normal(first.out_features) * 0.1, dtype=torch.float32),
                             d=torch.as_tensor(rng.standard_normal(first.in_features) * 0.1, dtype=torch.float32))]
    dataset = open_dataset(cluster["stats"], what="stats", labels="ignored")
    with ShardedKeys(dataset) as keys:
        local = key_statistics(twin, layers, keys, edits=edits)
    cluster["marker"].unlink()
    with ShardedKeys(dataset, engine="ray", model_path=model) as keys:
        assert keys.workers == 2 and "engine ray" in keys.source
        on_ray = key_statistics(twin, layers, keys, edits=edits)
    assert cluster["marker"].exists()
    for layer in layers:
        assert local[layer.node].n_keys == on_ray[layer.node].n_keys
        a, b = local[layer.node].chol, on_ray[layer.node].chol
        # keys are float32 (k k^T summed per batch in float32, then in float64): rounding
        # differs with the thread count, so compare against the factor's scale
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))


def test_cli_starts_and_stops_its_own_ray(cluster, tmp_path):
    """The CLI's own start (a separate process: a new local Ray, not the module's), with a
    worker that dies once: stdout is still JSON only, naming the engine; and a bad
    --ray-address is one line, exit 2."""
    marker = tmp_path / "crashed"
    env = {**os.environ, CRASH_ONCE_ENV: str(marker)}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "verify", str(BADNETS / "model.onnx"),
                           str(cluster["edited"]), "--clean", str(cluster["clean"]), "--engine", "ray", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()
    data = json.loads(proc.stdout)
    assert data["engine"] == "ray" and data["workers"] >= 1 and data["shards"]["clean"] == 4
    local = verify(BADNETS / "model.onnx", cluster["edited"], cluster["clean"]).to_dict()
    for key, value in local["clean"].items():
        assert data["clean"][key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value)
    bad = subprocess.run([sys.executable, "-m", "cli.main", "verify", str(BADNETS / "model.onnx"),
                          str(cluster["edited"]), "--clean", str(cluster["clean"]), "--engine", "ray",
                          "--ray-address", "127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("dynedit: error: cannot connect to the Ray cluster at 127.0.0.1:9")
