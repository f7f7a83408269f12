"""Freed memory goes back to the system (onnx_dynedit.memory): with the mmap threshold
fixed, blocks freed after a burst of 1-32 MB allocations leave the resident size where it
was; the CLI sets it for its own process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BURST = textwrap.dedent("""
    import sys, numpy as np
    from onnx_dynedit.memory import MMAP_THRESHOLD, return_freed_memory

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    assert return_freed_memory()
    big = [np.ones(MMAP_THRESHOLD // 8 + 1024 * (i % 7)) for i in range(8)]  # raise a dynamic threshold
    del big
    before = rss_mb()
    keep, blocks = [], []
    for i in range(300):  # blocks just over the threshold, freed out of order, small ones kept between
        blocks.append(np.ones(MMAP_THRESHOLD // 8 + 4096 * (i % 5)))
        keep.append(np.ones(64))
        if i % 3 == 2:
            blocks.pop(0)
    del blocks
    print(rss_mb() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_leave_the_process():
    grown = float(subprocess.run([sys.executable, "-c", BURST], check=True, capture_output=True,
                                 text=True).stdout.strip())
    assert grown < 64  # MB: about 100 blocks of >= 4 MB were alive at the end before ``del``


DEVICES = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_key_factors_spilled_to_disk_give_the_same_repair(monkeypatch, device):
    """With every round's key factors written to disk (FactorStore's budget at 0) the
    repair of a sample is the repair with them in memory, and the temporary folder is
    gone afterwards."""
    from pathlib import Path

    import numpy as np

    from onnx_dynedit import factors
    from onnx_dynedit.io import load_model
    from onnx_dynedit.rectify import RectifyConfig, rectify
    from onnx_dynedit.twin import Twin

    d = Path(__file__).resolve().parents[1] / "sample_models" / "badnets"
    twin = Twin(load_model(d / "model.onnx"), device)
    pairs, val = np.load(d / "pairs.npz"), np.load(d / "val.npz")
    args = dict(stats_x=np.load(d / "stats.npz")["x"], val_x=val["x"], val_y=val["y"],
                config=RectifyConfig(fit_steps=40, max_edits=2))
    held = rectify(twin, pairs["corrupt"], pairs["clean"], **args)
    folders = []
    real_init = factors.FactorStore.__init__

    def spilling(self, budget=0):
        real_init(self, 0)
        folders.append(self)

    monkeypatch.setattr(factors.FactorStore, "__init__", spilling)
    spilled = rectify(twin, pairs["corrupt"], pairs["clean"], **args)
    assert folders and folders[0]._written > 0  # the factors did go to disk
    assert folders[0]._folder is None  # and the folder was removed
    assert [s.node for s in spilled.steps] == [s.node for s in held.steps]
    for a, b in zip(spilled.edits, held.edits):
        np.testing.assert_allclose(a.u, b.u, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(a.d, b.d, rtol=1e-9, atol=1e-12)


def _badnets():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "sample_models" / "badnets"


def test_weights_released_while_the_edit_runs_give_the_same_file(tmp_path, monkeypatch):
    """A model over RELEASE_ABOVE runs the loop with its ONNX weights dropped from memory
    (the twin holds its own) and read again before the write: the written weights are
    those of the same edit made with them in memory."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from onnx_dynedit import api, io

    d = _badnets()
    seen = []
    inner = api._rectify

    def spy(twin, *args, **kwargs):  # what the loop sees of the ONNX graph's largest weight
        big = max(twin.loaded.model.graph.initializer, key=lambda t: np.prod(t.dims))
        seen.append((twin.loaded.released, len(big.raw_data) + len(big.float_data)))
        return inner(twin, *args, **kwargs)

    monkeypatch.setattr(api, "_rectify", spy)
    outs = {}
    for above in (1 << 40, 0):
        monkeypatch.setattr(io, "RELEASE_ABOVE", above)
        out = tmp_path / f"fixed{above}.onnx"
        outcome = api.edit_model(str(d / "model.onnx"), str(d / "pairs.npz"), str(out), stats=str(d / "stats.npz"))
        assert outcome.result.edits
        outs[above] = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
        assert ("reload" in outcome.timings) == (above == 0)
    assert seen[0][0] is False and seen[0][1] > 0
    assert seen[1] == (True, 0)  # released: the largest weight had no data while the loop ran
    assert outs[0].keys() == outs[1 << 40].keys()
    for name, arr in outs[0].items():
        np.testing.assert_array_equal(arr, outs[1 << 40][name], err_msg=name)


def test_restoring_weights_refuses_a_file_changed_meanwhile(tmp_path, monkeypatch):
    import shutil

    import onnx

    from onnx_dynedit import io
    from onnx_dynedit.errors import ModelLoadError

    path = tmp_path / "m.onnx"
    shutil.copy(_badnets() / "model.onnx", path)
    monkeypatch.setattr(io, "RELEASE_ABOVE", 0)
    loaded = io.load_model(path)
    assert loaded.release_weights() and loaded.released
    assert not loaded.release_weights()  # once
    loaded.restore_weights()  # unchanged file: the weights come back, bit for bit
    assert not loaded.released and io.model_sha256(loaded.model) == loaded.sha256
    loaded.release_weights()
    changed = onnx.load(str(path))
    changed.doc_string = "changed by another program"
    onnx.save(changed, str(path))
    with pytest.raises(ModelLoadError, match="changed on disk while it was being edited"):
        loaded.restore_weights()
    in_memory = io.load_model(onnx.load(str(_badnets() / "model.onnx")))
    assert not in_memory.release_weights()  # a proto given in memory cannot be read again


def test_locate_with_the_weights_released_ranks_the_same(monkeypatch):
    from onnx_dynedit import api, io

    d = _badnets()
    args = (str(d / "model.onnx"), str(d / "pairs.npz"))
    held = api.locate_model(*args, stats=str(d / "stats.npz")).to_dict()
    monkeypatch.setattr(io, "RELEASE_ABOVE", 0)
    calls, real = [], io.LoadedModel.release_weights
    monkeypatch.setattr(io.LoadedModel, "release_weights", lambda self: calls.append(real(self)) or calls[-1])
    released = api.locate_model(*args, stats=str(d / "stats.npz")).to_dict()
    assert calls == [True] and released == held


def test_unchanged_model_written_after_the_weights_were_released(tmp_path, monkeypatch):
    """Pairs that already behave: with the weights released during the loop, the output is
    still the input model, read from the file again (the ``reload`` phase)."""
    import numpy as np
    import onnx

    from onnx_dynedit import api, io

    d = _badnets()
    clean = np.load(d / "pairs.npz")["clean"][:1]
    np.savez(tmp_path / "same.npz", corrupt=clean, clean=clean)
    monkeypatch.setattr(io, "RELEASE_ABOVE", 0)
    out = tmp_path / "out.onnx"
    outcome = api.edit_model(str(d / "model.onnx"), str(tmp_path / "same.npz"), str(out), criterion="output")
    assert outcome.output_unchanged and "reload" in outcome.timings
    assert onnx.load(str(out)) == onnx.load(str(d / "model.onnx"))


def test_downstream_recording_is_freed_with_its_runner():
    """A DownstreamRunner's recording (the values upstream of its layers: at 224x224 tens
    of MiB per input) goes when the runner is dropped, without waiting for the cyclic
    garbage collector (the fx interpreter classes made per runner hold no reference to
    it); the screen and every fit rely on this between chunks and candidates."""
    import gc
    import weakref

    import numpy as np
    import torch

    from onnx_dynedit.io import load_model
    from onnx_dynedit.twin import DownstreamRunner, Twin

    twin = Twin(load_model(_badnets() / "model.onnx"), "cpu")
    layers = twin.layer_map.editable()[1:3]
    x = twin.to_tensor(np.load(_badnets() / "stats.npz")["x"][:8])
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            runner = DownstreamRunner(twin, layers, x)
            whole = runner(layer=layers[1])
        recorded = [weakref.ref(v) for v in runner._replay.rec.cache.values() if torch.is_tensor(v) and v.dim()]
        assert recorded
        del runner
        assert not [r for r in recorded if r() is not None]
    finally:
        gc.enable()
    with torch.no_grad():
        np.testing.assert_array_equal(whole.numpy(), twin.forward(x).numpy())
    # the twin's graph module is not held by the shapes probe's per-graph cache either
    import onnx_dynedit.twin as twin_module

    module = weakref.ref(twin.module)
    assert module() in twin_module._ROW_AXES
    del twin
    gc.collect()
    assert module() is None
