"""Speed of locate + edit + write-back on a ResNet-18-sized model (one pair), and where the time goes.

    python benchmarks/bench_speed.py [--device cpu|cuda] [--augment N]

Builds a CIFAR-style ResNet-18 (11.2 M parameters, 3x32x32 input, seeded random weights,
BatchNorm with non-trivial statistics, folded by the legacy exporter at opset 13), a
pair (a random image and the same image with a 6x6 patch), 64 stats and 64 val inputs,
then times every phase of `dynedit edit` and reports each as a ratio to one
forward+backward pass of the twin on one input, all measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_dynedit.io import load_model, save_model  # noqa: E402
from onnx_dynedit.rectify import RectifyConfig, rectify  # noqa: E402
from onnx_dynedit.twin import Twin, check_parity  # noqa: E402
from onnx_dynedit.writeback import write_back  # noqa: E402

warnings.filterwarnings("ignore")


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            layers.append(Block(cin, cout, stride))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(path: Path) -> int:
    torch.manual_seed(0)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--augment", type=int, default=None, help="synthetic pairs (default: the library's)")
    ap.add_argument("--stats", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.onnx"
        n_params = build(path)
        stats = rng.standard_normal((args.stats, 3, 32, 32)).astype(np.float32)
        val = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
        clock = time.perf_counter
        times = {}

        t = clock()
        loaded = load_model(path)
        times["load + check"] = clock() - t
        t = clock()
        twin = Twin(loaded, args.device)
        times["twin (onnx2torch)"] = clock() - t
        t = clock()
        parity = check_parity(twin)
        times["parity before"] = clock() - t

        clean = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        corrupt = clean.copy()
        corrupt[:, :, -6:, -6:] = 6.0  # a 6x6 patch

        # reference: one forward + backward pass of the twin on one input
        x = twin.to_tensor(clean).requires_grad_(True)
        for _ in range(2):
            twin.forward(x).sum().backward()
        if twin.device.type == "cuda":
            torch.cuda.synchronize()
        reps = 5
        t = clock()
        for _ in range(reps):
            twin.forward(x).sum().backward()
        if twin.device.type == "cuda":
            torch.cuda.synchronize()
        fb = (clock() - t) / reps

        # A random ResNet predicts one class for everything, so no pair "misbehaves";
        # target_gap=0 makes the loop do its full work: localise, fit, check one edit.
        cfg = RectifyConfig(target_gap=0.0, max_edits=1)
        if args.augment is not None:
            cfg = cfg.replace(augment=args.augment)
        t = clock()
        result = rectify(twin, corrupt, clean, stats_x=stats, val_x=val, config=cfg)
        times["rectify (total)"] = clock() - t
        for k, v in result.timings.items():
            times[f"  rectify: {k}"] = v
        t = clock()
        new = write_back(loaded, result.updates()) if result.edits else loaded.model
        times["write-back"] = clock() - t
        t = clock()
        edits = [e.to_torch(twin.device) for e in result.edits]
        feeds = {twin.inputs[0].name: np.concatenate([corrupt, clean])}
        parity_after = check_parity(twin, feeds, model=new, edits=edits)
        times["parity after (ORT)"] = clock() - t
        t = clock()
        save_model(new, Path(tmp) / "resnet18.fixed.onnx")
        times["save (atomic)"] = clock() - t

    total = sum(v for k, v in times.items() if not k.startswith("  "))
    print(f"ResNet-18 (CIFAR), {n_params / 1e6:.1f} M parameters, 3x32x32, device {twin.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"one forward+backward of the twin (1 input): {fb * 1000:.1f} ms")
    print(f"edits: {[e.layer.node for e in result.edits]}; pair fixed {result.real_fixed_after}/{result.n_real_pairs}; "
          f"{result.n_pairs - result.n_real_pairs} synthetic pairs; parity before {parity.max_rel_diff:.2g}, "
          f"after {parity_after.max_rel_diff:.2g}; stopped: {result.stopped_because}")
    print()
    print("| phase | seconds | x forward+backward |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.2f} | {v / fb:.0f} |")
    print(f"| **total locate + edit + write-back** | **{total:.2f}** | **{total / fb:.0f}** |")


if __name__ == "__main__":
    main()
