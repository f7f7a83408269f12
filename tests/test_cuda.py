"""The CUDA path, run where torch sees a GPU (skipped elsewhere: CI has none; the README's
GPU section says where these ran and what they measured).

The twin on CUDA against ONNX Runtime on the CPU, the Quick start edit with ``--device
cuda`` judged by plain ONNX Runtime on the held-out test sets, and the same edit on the
CPU beside it: the same layers are edited and both repairs hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from onnx_dynedit.io import load_model
from onnx_dynedit.parity import check_parity
from onnx_dynedit.twin import Twin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ROOT = Path(__file__).resolve().parent.parent
BADNETS = ROOT / "sample_models" / "badnets"


def edit(tmp_path: Path, device: str) -> tuple[dict, Path]:
    out = tmp_path / f"fixed_{device}.onnx"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "edit", BADNETS / "model.onnx", "--pairs",
                           BADNETS / "pairs.npz", "--stats", BADNETS / "stats.npz", "--val", BADNETS / "val.npz",
                           "-o", out, "--device", device, "--json", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), out


def asr_and_accuracy(path: Path) -> tuple[float, float]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    clean, corrupt = np.load(BADNETS / "clean_test.npz"), np.load(BADNETS / "corrupt_test.npz")
    acc = float((sess.run(None, {name: clean["x"]})[0].argmax(1) == clean["y"]).mean())
    pred = sess.run(None, {name: corrupt["x"]})[0].argmax(1)
    keep = corrupt["y"] != 0  # target class 0 (meta.json)
    return float((pred[keep] == 0).mean()), acc


def test_twin_on_cuda_matches_onnx_runtime():
    twin = Twin(load_model(BADNETS / "model.onnx"), "cuda")
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
    _, acc0 = asr_and_accuracy(BADNETS / "model.onnx")
    for path in (gpu_model, cpu_model):
        asr, acc = asr_and_accuracy(path)
        assert asr <= 0.015 and acc >= acc0 - 0.005, (path.name, asr, acc, acc0)
