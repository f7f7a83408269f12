"""Quality and cost of the screened round, on two deeper digit ResNets (held-out test sets).

    python benchmarks/bench_deep.py [--dir FOLDER] [--pairs 1 5 20] [--configs '{}' '{"screen_check": 32}' ...]

The sample models have 6-10 editable layers, so their rounds fit every layer; a round with
more than ``screen_above`` (10) candidates is screened (closed form on the check pairs,
then the 3 best fitted). These two models exercise that path with a trained Trojan, which
the random ResNets of bench_speed.py cannot: `sample_models/build.py --cases
deep_badnets,deep_blend` (a ResNet of six basic blocks, 16 editable layers, stats = 200 of
its own training images; the patch Trojan of badnets and the whole-image blend of
resnet_blend; about 2 minutes each on 2 cores), built into FOLDER (default: a temporary
folder; an existing build there is reused). Each row is `edit_model` with stats + val and
the given RectifyConfig values, the written model measured with ONNX Runtime on the held-out
test set: corrected % (corrupted test inputs whose label is not the target, now right),
clean drop in points, the edit's seconds and what `dynedit edit` would exit with.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_efficacy import Case, ensure_built, run_edit  # noqa: E402

CASES = ("deep_badnets", "deep_blend")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the two models are built (or already are)")
    ap.add_argument("--pairs", type=int, nargs="*", default=[1, 5, 20], choices=[1, 5, 20])
    ap.add_argument("--configs", nargs="*", default=["{}"], help="RectifyConfig values, one JSON object per row")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / "models"
        ensure_built(folder, CASES)
        print("| case | pairs | config | corrected % | clean drop (pt) | edit s | exit | edits |")
        print("|---|---|---|---|---|---|---|---|")
        for name in CASES:
            case = Case(name, folder / name)
            for n in args.pairs:
                for i, config in enumerate(args.configs):
                    r = run_edit(case, n, json.loads(config), Path(tmp), f"{n}-{i}")
                    print(f"| {name} | {n} | `{config}` | {r['corrected']:.2f} (from {case.base['corrected']:.2f}) | "
                          f"{case.base['clean'] - r['clean']:.2f} | {r['time']:.1f} | {r['exit']} | {r['edits']} |",
                          flush=True)


if __name__ == "__main__":
    main()
