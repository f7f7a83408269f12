"""Speed and memory of locate + edit + write-back (one pair), per phase, and fine-tuning beside it.

    python benchmarks/bench_speed.py [--models resnet18 resnet50 vgg16] [--device auto|cpu|cuda]
                                     [--stats N] [--augment N] [--fit-methods auto adam lm lbfgs]
                                     [--fit-steps N] [--finetune-steps N] [--floor] [--flops]

Models (random weights, seeded, exported to ONNX at run time; nothing is downloaded):
  resnet18  a CIFAR-style ResNet-18 (11.2 M parameters, 3x32x32, BatchNorm with non-trivial
            statistics folded by the legacy exporter at opset 13), 64 stats inputs
  resnet50  torchvision ResNet-50 at 3x224x224 (ImageNet size), 200 stats inputs
  vgg16     torchvision VGG-16 at 3x240x240, 200 stats inputs
A pair (a random image and the same image with a patch), stats and 64 val inputs, as .npz
files. Every model runs in its own child process, so its peak RSS (``ru_maxrss``) is the
edit's own. The edit is ``edit_model``, the path `dynedit edit` runs (load, twin, parity,
rectify, write-back to a staged file, ORT parity on it, rename); each phase of its clock is
reported in seconds, as a ratio to one forward+backward pass of the twin on one input
(timed in the same process with the same thread settings, after warm-up, on a twin built
after the edit), and with the peak RSS sampled every 20 ms up to the end of that phase.
Fine-tuning rows: every weight of the twin, Adam (lr 1e-4), 20 steps on the n pairs (n = 1
and 20: corrupted and clean inputs, labels = the clean twins' classes), timed in the same
process; the total row's peak RSS is the edit's, taken before them (they copy the model and
keep Adam's state: a line below gives the peak after them).

A random network predicts one class for everything, so no pair "misbehaves";
``target_gap=0`` and ``max_edits=1`` make the loop do its full work once: localise, fit,
check one edit.

The imports the twin needs (onnx2torch and the torchvision it imports, 1.6-1.7 s here) are
timed first, on their own row: a process pays them once, however many models it edits.
The total row adds them to ``edit_model``'s clock, so it measures what it did when they
were inside the twin's phase (before the seventeenth session). ``--floor`` also runs the
cheapest edit the pipeline can make (the last editable layer named, so no localisation;
its layer-local closed form, so no fit; no synthetic or check pairs): the cost of the
phases around the loop (load, twin, parity before and after, write-back), which no loop
can go below.

``--flops`` runs the same edit once more under torch's ``FlopCounterMode`` (after the
timed run, so the seconds are not the counter's) and adds the work of each phase: the
floating-point operations of the convolutions, matrix products and their backward passes
that torch counts (not the Cholesky factors, solves and eigenvectors of the key
statistics), as a ratio to one forward+backward counted the same way, and the rate each
phase ran at (its operations / its seconds of the timed run). The work ratio does not
depend on the machine: where it is far above the issue's 50x, fewer or smaller passes,
not faster ones, are what would close the gap.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore")

SIZES = {"resnet18": (32, 64), "resnet50": (224, 200), "vgg16": (240, 200)}  # input side, stats inputs
FT_STEPS = 20


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


def build(name: str, path: Path) -> int:
    torch.manual_seed(0)
    if name == "resnet18":
        model = ResNet18()
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    side = SIZES[name][0]
    torch.onnx.export(model, (torch.randn(1, 3, side, side),), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    return sum(p.numel() for p in model.parameters())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def forward_backward(twin, x) -> float:
    """Seconds of one forward+backward of the twin on ``x``: the faster of the twin's own
    layout and torch's default one. The twin runs channels_last on CPU, which is faster in
    every batch the edit runs but slower for one small input (ResNet-18 at 32x32: 68.9
    against 42.2 ms), so the ratios are not flattered by a slow baseline."""
    best = _forward_backward(twin, x)
    if twin.channels_last:
        twin.set_layout(channels_last=False)
        try:
            best = min(best, _forward_backward(twin, x))
        finally:
            twin.set_layout(channels_last=True)
    return best


def _forward_backward(twin, x) -> float:
    x = twin.to_tensor(x).requires_grad_(True)
    for _ in range(2):
        twin.forward(x).sum().backward()
    sync = torch.cuda.synchronize if twin.device.type == "cuda" else (lambda: None)
    sync()
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        twin.forward(x).sum().backward()
    sync()
    return (time.perf_counter() - t) / reps


def counted(fn):
    """(fn(), {phase: operations}, total operations): ``fn`` run under torch's
    FlopCounterMode, the operations split by the rectify phase (``rectify.Timings``) they
    ran in; the rest of ``edit_model`` (parity, write-back ...) under "outside the loop"."""
    from torch.utils.flop_counter import FlopCounterMode

    from onnx_dynedit import rectify

    counter, by_phase, plain = FlopCounterMode(display=False), {}, rectify.Timings.__call__

    def timed(self, phase):
        start = counter.get_total_flops()
        with plain(self, phase):
            yield
        by_phase[phase] = by_phase.get(phase, 0) + counter.get_total_flops() - start

    rectify.Timings.__call__ = contextlib.contextmanager(timed)
    try:
        with counter:
            out = fn()
    finally:
        rectify.Timings.__call__ = plain
    total = counter.get_total_flops()
    by_phase["outside the loop"] = total - sum(by_phase.values())
    return out, by_phase, total


def forward_backward_flops(twin, x) -> int:
    """The operations of one forward+backward of the twin on ``x``, as ``forward_backward`` runs it."""
    x = twin.to_tensor(x).requires_grad_(True)
    return counted(lambda: twin.forward(x).sum().backward())[2]


def finetune_seconds(twin, corrupt, clean, steps: int = FT_STEPS) -> float:
    module = copy.deepcopy(twin.module)
    params = [p for p in module.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    xs = torch.cat([twin.to_tensor(corrupt), twin.to_tensor(clean)])
    with torch.no_grad():
        labels = twin.forward(twin.to_tensor(clean)).argmax(1)
    ys = torch.cat([labels, labels])
    opt = torch.optim.Adam(params, lr=1e-4)
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        out = module(xs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        F.cross_entropy(out, ys).backward()
        opt.step()
    if twin.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


PHASES = {"load": "load + check (model and data)", "twin_and_parity": "twin (onnx2torch) + parity before (ORT vs twin)",
          "rectify": "rectify (total)", "write_back": "write-back (edited model staged to a file)",
          "parity_after": "parity after (ORT on the staged file)", "save": "save (rename over the output)"}


class RssSampler:
    """Resident size every 20 ms in a thread: (seconds since start, MB) samples."""

    def __init__(self):
        import threading

        self.samples, self.t0, self.stop = [], time.perf_counter(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            with open("/proc/self/statm") as fh:
                self.samples.append((time.perf_counter() - self.t0, int(fh.read().split()[1]) * 4096 / 2**20))
            time.sleep(0.02)

    def peak_until(self, t: float) -> float:
        return max((mb for s, mb in self.samples if s <= t), default=0.0)


def cheapest_config(path: Path) -> dict:
    """The cheapest edit the pipeline can make (``--floor``): the last editable layer named
    (no localisation), its layer-local closed form (no fit), no synthetic or check pairs."""
    from onnx_dynedit.io import load_model
    from onnx_dynedit.layers import build_layer_map

    last = build_layer_map(load_model(path).model).editable()[-1].node
    return {"layers": [last], "objective": "local", "check_pairs": 0, "augment": 0}


def run_one(path: Path, side: int, n_stats: int, device: str, augment, fit_method: str,
            fit_steps: int | None = None, ft_steps: int = FT_STEPS, check_candidates: int | None = None,
            floor: bool = False, flops: bool = False) -> dict:
    """The measured run (child process): ``edit_model``, what `dynedit edit` runs, with
    freed memory returned to the system as the CLI does (onnx_dynedit.memory), its
    phases from the edit's own clock; then the baseline and the fine-tuning rows on a
    twin built after the edit's peak RSS is taken. The imports the twin needs (onnx2torch
    and the torchvision it imports) are timed first, on their own: a process pays them
    once, however many models it edits. ``floor``: the cheapest edit (``cheapest_config``)."""
    t = time.perf_counter()
    import onnx2torch  # noqa: F401  (and torchvision, which it imports)
    imports = time.perf_counter() - t
    from onnx_dynedit.api import edit_model
    from onnx_dynedit.io import load_model
    from onnx_dynedit.memory import return_freed_memory
    from onnx_dynedit.twin import Twin

    return_freed_memory()
    rng = np.random.default_rng(0)
    shape = (3, side, side)
    stats = rng.standard_normal((n_stats, *shape)).astype(np.float32)
    val = rng.standard_normal((64, *shape)).astype(np.float32)
    clean = rng.standard_normal((1, *shape)).astype(np.float32)
    corrupt = clean.copy()
    p = max(2, side * 6 // 32)
    corrupt[:, :, -p:, -p:] = 6.0  # a patch covering the same share of the image as 6x6 at 32x32
    config = {"target_gap": 0.0, "max_edits": 1, "fit_method": fit_method}
    if floor:
        config.update(cheapest_config(path))
    if check_candidates is not None:
        config["check_candidates"] = check_candidates
    if fit_steps is not None:
        config.update(fit_steps=fit_steps, lbfgs_evals=fit_steps)
    if augment is not None:
        config["augment"] = augment
    with tempfile.TemporaryDirectory() as tmp:
        data = {name: Path(tmp) / f"{name}.npz" for name in ("pairs", "stats", "val")}
        np.savez(data["pairs"], corrupt=corrupt, clean=clean)
        np.savez(data["stats"], x=stats)
        np.savez(data["val"], x=val)
        del stats, val  # the edit reads them from the files, as the CLI does (VGG-16 at 240x240: 176 MiB)
        sampler = RssSampler()

        def edit(out: str):
            return edit_model(path, data["pairs"], Path(tmp) / out, stats=data["stats"], val=data["val"],
                              device=device, **config)

        outcome = edit("fixed.onnx")
        sampler.stop = True
        edit_peak = rss_mb()  # the edit's own peak, before the baseline and fine-tuning rows
        work = None
        if flops:  # the same edit again, counted
            again, by_phase, total_ops = counted(lambda: edit("counted.onnx"))
            nodes = [[e.layer.node for e in o.result.edits] for o in (outcome, again)]
            work = {"by_phase": by_phase, "total": total_ops, "same_edit": nodes[0] == nodes[1]}
    phases, t = [], 0.0
    for key, seconds in outcome.timings.items():
        if key == "total":
            continue
        t += seconds
        phases.append([PHASES.get(key, key), seconds, sampler.peak_until(t)])
        if key == "rectify":
            phases.extend([f"  rectify: {k}", v, None] for k, v in outcome.result.timings.items())
    result = outcome.result
    twin = Twin(load_model(path), device)
    fb = forward_backward(twin, clean)
    if work is not None:
        work["fb"] = forward_backward_flops(twin, clean)
    clean20 = rng.standard_normal((20, *shape)).astype(np.float32)
    corrupt20 = clean20.copy()
    corrupt20[:, :, -p:, -p:] = 6.0
    ft = {"1": finetune_seconds(twin, corrupt, clean, ft_steps),
          "20": finetune_seconds(twin, corrupt20, clean20, ft_steps)}
    return {"fb": fb, "phases": phases, "finetune": ft, "peak_rss_mb": edit_peak, "finetune_rss_mb": rss_mb(),
            "total": outcome.timings["total"], "imports": imports, "device": outcome.device, "floor": floor,
            "threads": torch.get_num_threads(), "edits": [e.layer.node for e in result.edits],
            "parity_before": outcome.parity_before["max_rel_diff"],
            "parity_after": outcome.parity_after.get("max_rel_diff", float("nan")),
            "synthetic": result.n_pairs - result.n_real_pairs, "stopped": result.stopped_because,
            "fit_method": fit_method if fit_steps is None else f"{fit_method}, at most {fit_steps} steps",
            "fit_loss": [s.fit_loss for s in result.steps], "ft_steps": ft_steps,
            "fitted": len(result.steps), "check_candidates": check_candidates, "work": work}


def table(name: str, n_params: int, side: int, n_stats: int, r: dict) -> str:
    fb = r["fb"]
    total = r["imports"] + r["total"]
    what = ("the cheapest edit (floor: the last editable layer named, its closed form, no synthetic or check "
            "pairs)" if r.get("floor") else
            f"fit of u: {r['fit_method']}, {r['fitted']} trials reported (screened-out ones included; "
            f"check_candidates {r['check_candidates']})")
    lines = [f"### {name}: {n_params / 1e6:.1f} M parameters, 3x{side}x{side}, {n_stats} stats inputs, "
             f"device {r['device']}, {r['threads']} threads, {what}",
             "", f"one forward+backward of the twin (1 input): {fb * 1000:.1f} ms; edits {r['edits']}; "
             f"{r['synthetic']} synthetic pairs; fit loss {r['fit_loss']}; parity before {r['parity_before']:.2g}, after {r['parity_after']:.2g}",
             "", "| phase | seconds | x forward+backward | peak RSS MB by the end of the phase |",
             "|---|---|---|---|"]
    lines.append(f"| imports (onnx2torch and torchvision; once per process) | {r['imports']:.2f} | "
                 f"{r['imports'] / fb:.0f} | |")
    for k, v, rss in r["phases"]:
        lines.append(f"| {k} | {v:.2f} | {v / fb:.0f} | {'' if rss is None else f'{rss:.0f}'} |")
    lines.append(f"| `edit_model` alone (imports done: a process's second edit) | {r['total']:.2f} | "
                 f"{r['total'] / fb:.0f} | |")
    lines.append(f"| **total: imports + `edit_model` (locate + edit + write-back)** | **{total:.2f}** | "
                 f"**{total / fb:.0f}** | **{r['peak_rss_mb']:.0f}** (ru_maxrss) |")
    for n, v in r["finetune"].items():
        lines.append(f"| fine-tune all weights, {r['ft_steps']} Adam steps, n = {n} | {v:.2f} | {v / fb:.0f} | |")
    lines.append(f"| (peak RSS after the fine-tuning rows, which copy the model and keep Adam's state) | | | "
                 f"{r['finetune_rss_mb']:.0f} |")
    if r.get("work"):
        lines += ["", work_table(r)]
    return "\n".join(lines) + "\n"


def work_table(r: dict) -> str:
    """``--flops``: each phase's counted operations, as a ratio to one forward+backward's,
    and the rate it ran at in the timed run."""
    w, fb_ops = r["work"], r["work"]["fb"]
    seconds = {k.replace("  rectify: ", ""): v for k, v, _ in r["phases"]}
    inside = sum(seconds.get(k, 0.0) for k in w["by_phase"] if k != "outside the loop")
    seconds["outside the loop"] = r["total"] - inside
    lines = [f"work (`--flops`, the same edit counted again: {'the same' if w['same_edit'] else 'ANOTHER'} edit; one "
             f"forward+backward {fb_ops / 1e9:.3f} GFLOP)", "",
             "| phase | GFLOP | x forward+backward | GFLOP/s in the timed run |", "|---|---|---|---|"]
    for phase, ops in list(w["by_phase"].items()) + [("total", w["total"])]:
        secs = r["total"] if phase == "total" else seconds.get(phase)
        rate = f"{ops / 1e9 / secs:.1f}" if secs else ""
        lines.append(f"| {phase} | {ops / 1e9:.2f} | {ops / fb_ops:.0f} | {rate} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["resnet18", "resnet50"], choices=sorted(SIZES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--augment", type=int, default=None, help="synthetic pairs (default: the library's)")
    ap.add_argument("--stats", type=int, default=None, help="stats inputs (default: per model)")
    ap.add_argument("--fit-methods", nargs="*", default=["auto"], choices=["auto", "adam", "lm", "lbfgs"],
                    help="fit of u, one table per method (RectifyConfig.fit_method)")
    ap.add_argument("--fit-method", default="auto", help=argparse.SUPPRESS)  # the child's
    ap.add_argument("--finetune-steps", type=int, default=FT_STEPS, help="Adam steps of the fine-tuning rows")
    ap.add_argument("--fit-steps", type=int, default=None,
                    help="cap Adam's steps and L-BFGS's evaluations (default: the library's, 200 Adam steps "
                         "with early stop, 25 evaluations); for a timed look at models where a full fit takes "
                         "hours on a CPU")
    ap.add_argument("--check-candidates", type=int, default=None,
                    help="layers fitted per round (default: the library's, every editable layer)")
    ap.add_argument("--floor", action="store_true",
                    help="also run the cheapest edit the pipeline can make (the last layer named, its closed "
                         "form, no synthetic or check pairs): what the phases around the loop cost")
    ap.add_argument("--flops", action="store_true",
                    help="also count each phase's operations (the edit run again under torch's FlopCounterMode)")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "SIDE", "STATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, side, n_stats = args.child
        print(json.dumps(run_one(Path(path), int(side), int(n_stats), args.device, args.augment, args.fit_method,
                                 args.fit_steps, args.finetune_steps, args.check_candidates, args.floor,
                                 args.flops)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            side, n_stats = SIZES[name]
            n_stats = args.stats or n_stats
            path = Path(tmp) / f"{name}.onnx"
            n_params = build(name, path)
            runs = [(method, False) for method in args.fit_methods] + ([("auto", True)] if args.floor else [])
            for method, floor in runs:
                cmd = [sys.executable, __file__, "--child", str(path), str(side), str(n_stats), "--device",
                       args.device, "--fit-method", method, "--finetune-steps", str(args.finetune_steps)]
                for flag, value in (("--augment", args.augment), ("--fit-steps", args.fit_steps),
                                    ("--check-candidates", args.check_candidates)):
                    cmd += [] if value is None else [flag, str(value)]
                cmd += (["--floor"] if floor else []) + (["--flops"] if args.flops else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(f"### {name} ({'floor' if floor else method}): the measured run failed "
                          f"(exit {proc.returncode})\n\n```\n{proc.stderr[-3000:]}\n```\n", flush=True)
                    continue
                print(table(name, n_params, side, n_stats, json.loads(proc.stdout.strip().splitlines()[-1])),
                      flush=True)


if __name__ == "__main__":
    main()
