"""A real-size Trojan repaired at defaults: torchvision's ResNet-18 at 3x224x224.

    python benchmarks/bench_realsize.py [--case tv_badnets|tv_mobilenet_badnets|tv_resnet50_badnets]
                                        [--dir FOLDER] [--seed S] [--pairs 1 20] [--no-finetune]

Builds ``tv_badnets`` with ``sample_models/build.py`` (badnets' patch on torchvision's
ResNet-18 at 3x224x224: the digits upsampled 14x, the patch 42x42, stats = 200 of the
model's own training images; about 6 minutes on 2 cores; reused when FOLDER/sS/tv_badnets
exists, default FOLDER a temporary folder) and measures, with ONNX Runtime on its
held-out test sets (360 clean inputs; 360 triggered, 324 of them not of the target class):
  * the model as shipped;
  * fine-tuning every weight of the twin on the same pairs (n = 1 and 20; Adam 1e-4
    until every corrupted input is classified like its clean twin, at most 100 steps;
    measured on the torch twin);
  * `edit_model` at its defaults (what `dynedit edit` runs) with one pair, with stats +
    val and with stats only, and with 20 pairs (stats + val).
Each row: clean accuracy, corrected % (triggered test inputs whose label is not the
target, now right), faithful % (triggered inputs predicted as the shipped model predicts
their clean twins), the clean drop in points, seconds, the seconds as a ratio to one
forward+backward of the twin on one input (timed in this process after the rows), the
exit `dynedit edit` would give, and the issue's patch target (>= 99 % corrected, <= 0.5
point clean drop). The line above the table gives the clean twins' level: the share
of the triggered test inputs that a repair making each behave exactly like its clean twin
corrects. ``--case tv_mobilenet_badnets``: the same patch Trojan on torchvision's
MobileNet-V3 small (about 2.5 minutes to build); ``--case tv_resnet50_badnets``: on its
ResNet-50 (about 20 minutes to build).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_efficacy import Case, ensure_built, run_edit, run_finetune  # noqa: E402
from bench_speed import forward_backward  # noqa: E402
from onnx_dynedit.io import load_model  # noqa: E402
from onnx_dynedit.twin import Twin  # noqa: E402

CASES = ("tv_badnets", "tv_mobilenet_badnets", "tv_resnet50_badnets")
MIN_CORRECTED, MAX_DROP = 99.0, 0.5  # the patch Trojan target (1 pair)


def rows(case: Case, twin: Twin, pairs: list[int], finetune: bool, tmp: Path) -> list[tuple[str, int, str, dict]]:
    """(label, n, val, figures) per row, the shipped model first; ``twin``: the shipped
    model's (fine-tuning works on copies of its module)."""
    out = [("shipped", 0, "-", {**case.base, "time": 0.0, "exit": "-", "edits": ""})]
    if finetune:
        out += [("fine-tune all weights", n, "-", run_finetune(case, twin, n)) for n in pairs]
    for n in pairs:
        for use_val in (True, False) if n == 1 else (True,):
            print(f"edit n = {n}, val {use_val} ...", file=sys.stderr, flush=True)
            out.append(("dynedit edit, defaults", n, "yes" if use_val else "no",
                        run_edit(case, n, {"_val": use_val}, tmp, f"{n}-{use_val}")))
    return out


def table(case: Case, results: list[tuple[str, int, str, dict]], fb: float) -> str:
    lines = [f"{case.name} ({case.dir}): clean twins' level {case.ceiling:.2f} % of {int(case.sel.sum())} triggered "
             f"test inputs; one forward+backward of the twin on one input {fb * 1000:.1f} ms", "",
             "| row | pairs | val | clean % | corrected % | faithful % | clean drop (pt) | s | x fwd+bwd | exit | "
             "target | edits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, n, val, r in results:
        drop = case.base["clean"] - r["clean"]
        target = "-" if n != 1 else ("met" if r["corrected"] >= MIN_CORRECTED and drop <= MAX_DROP else "MISSED")
        lines.append(f"| {label} | {n or '-'} | {val} | {r['clean']:.2f} | {r['corrected']:.2f} | "
                     f"{r['faithful']:.2f} | {drop:.2f} | {r['time']:.1f} | {r['time'] / fb:.0f} | {r['exit']} | "
                     f"{target} | {r['edits']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default=CASES[0], choices=CASES)
    ap.add_argument("--dir", type=Path, default=None, help="where the model is built (FOLDER/sS/CASE)")
    ap.add_argument("--seed", type=int, default=0, help="the build's seed (sample_models/build.py --seed)")
    ap.add_argument("--pairs", type=int, nargs="*", default=[1, 20], choices=[1, 5, 20])
    ap.add_argument("--no-finetune", dest="finetune", action="store_false", help="leave out the fine-tuning rows")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.dir or Path(tmp) / "models") / f"s{args.seed}"
        ensure_built(folder, [args.case], "--seed", str(args.seed))
        case = Case(args.case, folder / args.case)
        twin = Twin(load_model(case.model), "cpu")
        results = rows(case, twin, args.pairs, args.finetune, Path(tmp))
        fb = forward_backward(twin, np.load(case.pairs(1))["clean"])
        print(table(case, results, fb))


if __name__ == "__main__":
    main()
