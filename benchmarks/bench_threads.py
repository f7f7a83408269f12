"""`--threads N`: wall time of the badnets sample edit and of verify, by thread count,
with and without other busy processes on the machine. Prints a Markdown table.

    python benchmarks/bench_threads.py [--threads 1 2] [--busy 2] [--repeats 2]

Each run is the real CLI in a subprocess (`dynedit edit ... --report`, whose "total"
timing excludes Python start-up; `dynedit verify` timed from outside, start-up
included). "busy" = that many extra processes spinning on the CPU for the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
S = ROOT / "sample_models" / "badnets"


def dynedit(*args) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # --threads decides
        env.pop(var, None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"dynedit {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return took


def edit_seconds(threads: int, folder: Path) -> float:
    rep = folder / "r.json"
    dynedit("edit", S / "model.onnx", "--pairs", S / "pairs.npz", "--stats", S / "stats.npz", "--val", S / "val.npz",
            "-o", folder / "fixed.onnx", "--report", rep, "--threads", threads, "--quiet")
    return float(json.loads(rep.read_text())["timings"]["total"])


def verify_seconds(threads: int, folder: Path) -> float:
    return dynedit("verify", S / "model.onnx", folder / "fixed.onnx", "--clean", S / "clean_test.npz",
                   "--corrupt", S / "corrupt_test.npz", "--target", "0", "--threads", threads,
                   "--quiet")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--busy", type=int, default=2, help="extra spinning processes in the contended rows")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for busy in (0, args.busy):
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                for n in args.threads:
                    e = [edit_seconds(n, folder) for _ in range(args.repeats)]
                    v = [verify_seconds(n, folder) for _ in range(args.repeats)]
                    rows.append((busy, n, statistics.median(e), statistics.median(v)))
                    print(f"busy {busy} threads {n}: edit {e} verify {v}", file=sys.stderr)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    print(f"| other busy processes | --threads | edit s (report total, median of {args.repeats}) "
          f"| verify s (wall, start-up included, median of {args.repeats}) |")
    print("|---|---|---|---|")
    for busy, n, e, v in rows:
        print(f"| {busy} | {n} | {e:.1f} | {v:.1f} |")


if __name__ == "__main__":
    main()
