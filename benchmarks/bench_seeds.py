"""The defaults on held-out cases of the same kinds: the sample models rebuilt with other seeds.

    python benchmarks/bench_seeds.py [--seeds 1 2 3] [--cases badnets resnet_blend ...] [--dir FOLDER]
                                     [--no-val-rows] [--configs '{}' ...]

The efficacy targets of issue 10 were tuned on the committed samples (seed 0). Acceptance
is measured on cases of the same kinds that are not in the repo, so this benchmark rebuilds
the Trojan samples with other seeds (`sample_models/build.py --seed S`: another split of
the digits, other initial weights, other poisoned images, other pairs; the same trigger
kinds) into FOLDER (default: a temporary folder; a build there is reused) and runs
`edit_model` with its defaults on each, at the target's pair count (patch Trojans 1 pair,
blends 5), with stats + val and with stats only (no --val: the degradation is then checked
on the held-out share of the stats). Each row: the written model measured with ONNX Runtime
on the held-out test set, corrected % (corrupted test inputs whose label is not the target,
now right), clean drop in points, what `dynedit edit` would exit with, and two verdicts:
"target" (corrected and drop within the issue's targets) and "hidden" (exit 0 while the
held-out drop exceeds the 1-point budget + 1 point: the failure the acceptance rules out).
The last lines count both per case kind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_efficacy import Case, run_edit  # noqa: E402

# case: (pairs, min corrected %, max clean drop in points), the targets for its kind
TARGETS = {"badnets": (1, 99.0, 0.5), "deep_badnets": (1, 99.0, 0.5),
           "resnet_blend": (5, 90.0, 1.0), "deep_blend": (5, 90.0, 1.0)}
BUDGET_PTS = 1.0  # the default max_degradation (0.01) in points


def ensure_built(folder: Path, cases: list[str], seed: int) -> None:
    missing = [c for c in cases if not (folder / c / "meta.json").exists()]
    if missing:
        subprocess.run([sys.executable, str(ROOT / "sample_models" / "build.py"), "--cases", ",".join(missing),
                        "--seed", str(seed), "--out", str(folder)], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--cases", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--dir", type=Path, default=None, help="where the models are built (FOLDER/sS/CASE)")
    ap.add_argument("--no-val-rows", dest="no_val", action="store_true", help="also run each case without --val")
    ap.add_argument("--configs", nargs="*", default=["{}"], help="RectifyConfig values, one JSON object per row")
    args = ap.parse_args()
    tally: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp) / "models"
        print("| seed | case | pairs | val | config | corrected % | clean drop (pt) | edit s | exit | target | hidden | edits |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for seed in args.seeds:
            folder = root / f"s{seed}"
            ensure_built(folder, args.cases, seed)
            for name in args.cases:
                case = Case(name, folder / name)
                n, min_c, max_d = TARGETS[name]
                for use_val in (True, False) if args.no_val else (True,):
                    for i, config in enumerate(args.configs):
                        kw = {**json.loads(config), "_val": use_val}
                        r = run_edit(case, n, kw, Path(tmp), f"{seed}-{n}-{use_val}-{i}")
                        drop = case.base["clean"] - r["clean"]
                        met = r["corrected"] >= min_c and drop <= max_d
                        hidden = r["exit"] == 0 and drop > BUDGET_PTS + 1.0
                        t = tally.setdefault(name, [0, 0, 0])
                        t[0] += 1
                        t[1] += met
                        t[2] += hidden
                        print(f"| {seed} | {name} | {n} | {'yes' if use_val else 'no'} | `{config}` | "
                              f"{r['corrected']:.2f} (from {case.base['corrected']:.2f}) | {drop:.2f} | {r['time']:.1f} | {r['exit']} | "
                              f"{'met' if met else 'MISSED'} | {'HIDDEN DROP' if hidden else '-'} | {r['edits']} |",
                              flush=True)
    for name, (rows, met, hidden) in tally.items():
        print(f"{name}: target met in {met} of {rows} rows; exit 0 hiding a drop > {BUDGET_PTS + 1:.0f} pt in {hidden}")


if __name__ == "__main__":
    main()
