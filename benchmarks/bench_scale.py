"""Scale-out of `dynedit verify`: throughput and peak driver memory, local vs Ray, as the data grows.

    python benchmarks/bench_scale.py [--shards 1,10,50] [--rows 360] [--cpus 2] [--big]

Data: the badnets sample's clean test set (360 inputs, 1x16x16 float32) tiled to
``--rows`` inputs per shard and written as 1, 10, 50 ... identical shards, with their
labels. Models: the badnets sample against a copy with its last Gemm's weights nudged
(an "edited" model that changes some predictions; no torch needed).

Each row is one fresh Python process (so its peak RSS is its own) that runs
``onnx_dynedit.verify.verify`` on the folder:
  local  one process, shards read one at a time, ONNX Runtime's default threads
  ray    a local Ray with ``--cpus`` CPUs started in that process first (its start-up is
         timed apart), then one actor per CPU holding both sessions (one thread each)
``inputs/s`` counts each input once (both models run on it) over the verify call alone;
``peak driver MiB`` is the process's own peak RSS (VmHWM; the Ray workers' memory is not in it);
``peak worker MiB`` the largest peak RSS among the Ray actors (each reads its own VmHWM).
``--big`` adds a row with all the inputs of the largest size in ONE file, to show that
peak memory follows the largest shard, not the number of shards.
Results are printed as a Markdown table; figures from the local and the Ray run are
checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BADNETS = ROOT / "sample_models" / "badnets"

CHILD = r"""
import json, sys, time, logging
sys.path.insert(0, {root!r})
from onnx_dynedit.verify import verify
engine, folder, original, edited, cpus = sys.argv[1:6]
startup = 0.0
peaks = []
class Peaks(logging.Handler):
    def emit(self, record):
        peaks.extend(getattr(record, "worker_peak_rss_kb", None) or [])
log = logging.getLogger("onnx_dynedit.engine_ray")
log.setLevel(logging.INFO)
log.addHandler(Peaks())
if engine == "ray":
    import ray
    t = time.perf_counter()
    ray.init(address="local", num_cpus=int(cpus), include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    startup = time.perf_counter() - t
t = time.perf_counter()
report = verify(original, edited, folder, engine=engine)
run = time.perf_counter() - t
if engine == "ray":
    ray.shutdown()
d = report.to_dict()
# VmHWM: this process's own peak RSS (ru_maxrss would start at the parent's, kept across exec)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({{"run_s": run, "startup_s": startup, "maxrss_kb": hwm,
                  "workers": d["workers"], "n": d["clean"]["n"], "clean": d["clean"],
                  "worker_kb": max([p for p in peaks if p] or [0])}}))
"""


def write_shards(folder: Path, shards: int, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = np.load(BADNETS / "clean_test.npz")
    reps = -(-rows // len(data["x"]))
    x = np.concatenate([data["x"]] * reps)[:rows]
    y = np.concatenate([data["y"]] * reps)[:rows]
    for i in range(shards):
        np.savez(folder / f"part-{i:04d}.npz", x=x, y=y)
    return folder


def run(engine: str, folder: Path, original: Path, edited: Path, cpus: int) -> dict:
    code = CHILD.format(root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, engine, str(folder), str(original), str(edited), str(cpus)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="1,10,50", help="comma-separated shard counts")
    ap.add_argument("--rows", type=int, default=360, help="inputs per shard")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--big", action="store_true", help="also one file holding every input of the largest size")
    args = ap.parse_args()

    from test_datasets import perturbed_copy

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        original = BADNETS / "model.onnx"
        edited = perturbed_copy(original, tmp / "edited.onnx")
        counts = [int(s) for s in args.shards.split(",")]
        cases = [(f"{k} x {args.rows}", write_shards(tmp / f"s{k}", k, args.rows), k) for k in counts]
        if args.big:
            k = max(counts)
            cases.append((f"1 x {k * args.rows} (one file)", write_shards(tmp / "big", 1, k * args.rows), 1))
        for label, folder, _ in cases:
            results = {e: run(e, folder, original, edited, args.cpus) for e in ("local", "ray")}
            a, b = results["local"]["clean"], results["ray"]["clean"]
            same = all(a[key] == b[key] if not isinstance(a[key], float) else abs(a[key] - b[key]) <= 1e-9 * max(1, abs(a[key]))
                       for key in a)
            for engine, r in results.items():
                rows_out.append([label, engine, r["workers"], r["n"], f"{r['run_s']:.2f}", f"{r['n'] / r['run_s']:.0f}",
                                 f"{r['startup_s']:.1f}" if engine == "ray" else "-",
                                 f"{r['maxrss_kb'] / 1024:.0f}",
                                 f"{r['worker_kb'] / 1024:.0f}" if engine == "ray" else "-", "yes" if same else "NO"])
            for f in folder.iterdir():
                f.unlink()
    head = ["shards x inputs", "engine", "workers", "inputs", "verify s", "inputs/s", "Ray start s",
            "peak driver MiB", "peak worker MiB", "figures equal"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows_out:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print(f"\nmachine: {os.cpu_count()} cores; Ray with {args.cpus} CPUs; numpy {np.__version__}")


if __name__ == "__main__":
    main()
