"""The CUDA path, run where torch sees a GPU (skipped elsewhere: CI has none; docs/results.md's
GPU section says where these ran and what they measured).

The twin on CUDA against ONNX Runtime on the CPU, the Quick start edit with ``--device
cuda`` judged by plain ONNX Runtime on the held-out test sets, and the same edit on the
CPU beside it: the same layers are edited and both repairs hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onnx_dynedit.io import load_model
from onnx_dynedit.parity import check_parity
from onnx_dynedit.twin import Twin
from test_edit_cli import dynedit, figures, sample  # noqa: E402  (plain ONNX Runtime on the test sets)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def edit(tmp_path: Path, device: str) -> tuple[dict, Path]:
    out = tmp_path / f"fixed_{device}.onnx"
    proc = dynedit("edit", sample("badnets", "model.onnx"), "--pairs", sample("badnets", "pairs.npz"),
                   "--stats", sample("badnets", "stats.npz"), "--val", sample("badnets", "val.npz"),
                   "-o", out, "--device", device, "--json", "-q", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), out


def test_twin_on_cuda_matches_onnx_runtime():
    twin = Twin(load_model(sample("badnets", "model.onnx")), "cuda")
    assert twin.device.type == "cuda"
    assert next(twin.module.parameters()).is_cuda
    assert not torch.backends.cudnn.allow_tf32  # TF32 convolutions are ~1e-3 off ONNX Runtime
    parity = check_parity(twin)
    assert parity.ok, parity


def test_edit_on_cuda_repairs_like_the_cpu(tmp_path):
    on_gpu, gpu_model = edit(tmp_path, "cuda")
    on_cpu, cpu_model = edit(tmp_path, "cpu")
    assert on_gpu["device"].startswith("cuda") and on_cpu["device"] == "cpu"
    assert on_gpu["success"] and on_cpu["success"]
    assert [e["node"] for e in on_gpu["edits"]] == [e["node"] for e in on_cpu["edits"]]
    acc0 = figures("badnets", sample("badnets", "model.onnx"))["clean_acc"]
    for path in (gpu_model, cpu_model):
        got = figures("badnets", path)
        assert got["asr"] <= 0.015 and got["clean_acc"] >= acc0 - 0.005, (path.name, got, acc0)
