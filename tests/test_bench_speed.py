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
