"""benchmarks/bench_speed.py's work counts (``--flops``), on products whose count is known on paper."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_speed  # noqa: E402
from onnx_dynedit import rectify  # noqa: E402


def test_counted_splits_the_work_by_rectify_phase():
    """[2, 3] @ [3, 4] is 2 x 3 x 4 multiply-adds = 48 operations; [5, 6] @ [6, 7] is 420.
    A product inside a phase of ``rectify.Timings`` counts for that phase (twice: 96), the
    rest for "outside the loop"; the phase is still timed, and the class is as before after."""
    plain = rectify.Timings.__call__
    a, b, c, d = torch.ones(2, 3), torch.ones(3, 4), torch.ones(5, 6), torch.ones(6, 7)
    timings = rectify.Timings()

    def work():
        for _ in range(2):
            with timings("fit"):
                torch.mm(a, b)
        torch.mm(c, d)
        return "done"

    out, by_phase, total = bench_speed.counted(work)
    assert out == "done" and total == 96 + 420
    assert by_phase == {"fit": 96, "outside the loop": 420}
    assert timings["fit"] > 0.0
    assert rectify.Timings.__call__ is plain


def test_counted_restores_the_timings_after_an_error():
    plain = rectify.Timings.__call__

    def fails():
        with rectify.Timings()("check"):
            raise RuntimeError("boom")

    try:
        bench_speed.counted(fails)
    except RuntimeError:
        pass
    assert rectify.Timings.__call__ is plain


def test_counted_edit_of_a_sample_model(tmp_path):
    """The real loop under the counter: the badnets sample repaired from its one pair
    (stats and val), once plain and once counted. The same edit; every phase that ran does
    work; the phases and "outside the loop" add up to the total."""
    from onnx_dynedit.api import edit_model

    sample = Path(__file__).resolve().parents[1] / "sample_models" / "badnets"

    def edit(name):
        return edit_model(sample / "model.onnx", sample / "pairs.npz", tmp_path / name, stats=sample / "stats.npz",
                          val=sample / "val.npz")

    plain = edit("plain.onnx")
    again, by_phase, total = bench_speed.counted(lambda: edit("counted.onnx"))
    assert [e.layer.node for e in again.result.edits] == [e.layer.node for e in plain.result.edits]
    assert (tmp_path / "plain.onnx").read_bytes() == (tmp_path / "counted.onnx").read_bytes()
    assert set(by_phase) == set(plain.result.timings) | {"outside the loop"}
    assert all(by_phase[p] > 0 for p in ("key_statistics", "localisation", "fit", "check", "outside the loop"))
    assert sum(by_phase.values()) == total
