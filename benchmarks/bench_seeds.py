"""The defaults on held-out cases of the same kinds: the Trojan samples rebuilt with other seeds.

    python benchmarks/bench_seeds.py [--seeds 0 1 2 3 4] [--cases badnets resnet_blend ...] [--dir FOLDER]
                                     [--no-val-rows | --only-no-val] [--val-kinds labelled unlabeled none]
                                     [--reference] [--configs '{}' ...]

The efficacy targets of issue 10 were met on the committed samples (seed 0); acceptance is
measured on cases of the same kinds that are not in the repo. This benchmark rebuilds the
Trojan samples (and resnet_badnets: the patch on resnet_blend's small ResNet; tv_badnets
and tv_blend, the patch and the blend on torchvision's ResNet-18 at 3x224x224, and
tv_mobilenet_badnets and tv_resnet50_badnets, the patch on its MobileNet-V3 small and
ResNet-50, only when asked for: a build takes minutes; vit_badnets and vit_blend, the patch
and the blend on a small trained ViT, only when asked for) with other seeds
(`sample_models/build.py --seed S`: another split of the digits, other initial weights,
other poisoned images and pairs; the same trigger kinds) into FOLDER/sS (default FOLDER: a
temporary folder; a build there is reused; seed 0 uses the committed sample where there
is one) and runs `edit_model` at each config on each, at
the target's pair count (patch Trojans 1 pair, blends 5), with stats + val and, with
--no-val-rows, with stats only (the degradation is then checked on the held-out share of
the stats); --val-kinds picks the rows instead: "labelled" (val's inputs and labels: the
budget is the accuracy drop), "unlabeled" (val's inputs alone, what a user with unlabeled
deployment inputs passes: the budget reads the changed predictions and the output
shift on them) and "none" (stats only). Each row: the written model measured with ONNX Runtime on the held-out test
set: corrected % (corrupted test inputs whose label is not the target, now right), clean
drop in points, seconds, what `dynedit edit` would exit with, "target" (both within the
issue's targets) and "hidden" (exit 0 while the held-out drop exceeds the 1-point budget
+ 1 point: what the acceptance rules out). --reference adds the same build never poisoned
(`build.py --poison-rate 0`, FOLDER/sS-unpoisoned): its corrected % is what a model that
never learnt the trigger does on the triggered test inputs. "clean twins" is the shipped
model's accuracy on the clean twins of the triggered test inputs: what a repair that makes
every triggered input behave exactly like its clean twin (what the edit is fitted to)
corrects; "faithful" is the share of triggered test inputs the edited model predicts as the
shipped model predicts their clean twins. "check pairs fixed %": the report's
`check_share`, the synthetic pairs held out from every fit that the kept edits fix (read on
stats inputs, "-" when no edit was kept). "turned, bound %": the degradation inputs the
kept edits turned (right -> wrong with labels, top-1 changed without) and what they vouch
for, the report's `degradation_turned` and `degradation_bound` (95 %); "(below the drop)"
marks a row whose test-set clean drop is above it. "why exit 1": the report's `failure`
(which of the given pairs' class, their gap and the degradation budget was missed). A
config may hold "_stats": N, which passes only the first N stats inputs (a user with fewer
images of the training data). The last lines count per case (and the rows within one test
image of "clean twins", and those below the drop).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_efficacy import TARGETS as SAMPLE_TARGETS, Case, ensure_built, run_edit  # noqa: E402

# case: the target of its kind (pairs, min corrected %, max clean drop in points)
KIND = {"badnets": "badnets", "resnet_badnets": "badnets", "deep_badnets": "badnets",
        "resnet_blend": "resnet_blend", "deep_blend": "resnet_blend", "tv_badnets": "badnets",
        "tv_blend": "resnet_blend", "tv_mobilenet_badnets": "badnets",
        "tv_resnet50_badnets": "badnets", "vit_badnets": "badnets", "vit_blend": "resnet_blend"}
# real size (builds of 2.5-20 minutes) and the transformers: ask for them
DEFAULT_CASES = [name for name in KIND if not name.startswith(("tv_", "vit_"))]
TARGETS = {name: SAMPLE_TARGETS[kind] for name, kind in KIND.items()}
BUDGET_PTS = 1.0  # the default max_degradation (0.01) in points


def case_dir(root: Path, seed: int, name: str, *, unpoisoned: bool = False) -> Path:
    """The folder of ``name`` built with ``seed`` (built there when missing)."""
    committed = ROOT / "sample_models" / name
    if seed == 0 and not unpoisoned and (committed / "meta.json").exists():
        return committed
    folder = root / (f"s{seed}-unpoisoned" if unpoisoned else f"s{seed}")
    ensure_built(folder, [name], "--seed", str(seed), *(["--poison-rate", "0"] if unpoisoned else []))
    return folder / name


VAL_KINDS = {"labelled": True, "unlabeled": "unlabeled", "none": False}  # run_edit's "_val"
VAL_COLUMN = {"labelled": "yes", "unlabeled": "inputs only", "none": "no"}


def row(seed: int, case: Case, val_kind: str, config: str, tmp: Path,
        reference: str) -> tuple[str, bool, bool, bool, bool]:
    """(the table row, target met, exit 0 hiding a drop, corrected within one test image of
    the clean twins' accuracy, the test set's clean drop above the degradation inputs' bound)."""
    n, min_c, max_d = TARGETS[case.name]
    r = run_edit(case, n, {**json.loads(config), "_val": VAL_KINDS[val_kind]}, tmp,
                 f"{seed}-{val_kind}-{abs(hash(config))}")
    drop = case.base["clean"] - r["clean"]
    met = r["corrected"] >= min_c and drop <= max_d
    hidden = r["exit"] == 0 and drop > BUDGET_PTS + 1.0
    near = r["corrected"] >= case.ceiling - 100.0 / case.sel.sum() - 1e-9
    bound = 100.0 * r["bound"]
    over = drop > bound + 1e-9
    text = (f"| {seed} | {case.name} | {n} | {VAL_COLUMN[val_kind]} | `{config}` | {r['corrected']:.2f}{reference} | "
            f"{case.ceiling:.2f} | {r['faithful']:.2f} | {'-' if r['check'] is None else format(r['check'], '.2f')} | "
            f"{drop:.2f} | {r['turned']}, {bound:.2f}"
            f"{' (below the drop)' if over else ''} | {r['time']:.1f} | {r['exit']} | "
            f"{'met' if met else 'MISSED'} | {'HIDDEN DROP' if hidden else '-'} | {r['edits']} | {r['failure'] or '-'} |")
    return text, met, hidden, near, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(TARGETS))
    ap.add_argument("--dir", type=Path, default=None, help="where the models are built (FOLDER/sS/CASE)")
    ap.add_argument("--no-val-rows", dest="no_val", action="store_true", help="also run each case without --val")
    ap.add_argument("--only-no-val", action="store_true",
                    help="only the rows without --val (what a change to the unlabeled degradation check moves)")
    ap.add_argument("--val-kinds", nargs="*", choices=list(VAL_KINDS), default=None,
                    help="the rows' val: labelled, unlabeled (inputs only), none (stats only); overrides the two above")
    ap.add_argument("--reference", action="store_true", help="also build each case never poisoned (its corrected %%)")
    ap.add_argument("--configs", nargs="*", default=["{}"], help="RectifyConfig values, one JSON object per row")
    args = ap.parse_args()
    kinds = args.val_kinds or (["none"] if args.only_no_val else ["labelled", "none"] if args.no_val else ["labelled"])
    tally: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp) / "models"
        print("| seed | case | pairs | val | config | corrected %" + (" (never poisoned)" if args.reference else "")
              + " | clean twins % | faithful % | check pairs fixed % | clean drop (pt) | turned, bound % | edit s | exit"
              " | target | hidden | edits | why exit 1 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for seed in args.seeds:
            for name in args.cases:
                case = Case(name, case_dir(root, seed, name))
                ref = ""
                if args.reference:
                    ref = f" ({Case(name, case_dir(root, seed, name, unpoisoned=True)).base['corrected']:.2f})"
                for val_kind in kinds:
                    for config in args.configs:
                        text, *flags = row(seed, case, val_kind, config, Path(tmp), ref)
                        t = tally.setdefault(name, [0, 0, 0, 0, 0])
                        t[:] = [t[0] + 1] + [a + b for a, b in zip(t[1:], flags)]
                        print(text, flush=True)
    for name, (rows, met, hidden, near, over) in tally.items():
        print(f"{name}: target met in {met} of {rows} rows; exit 0 hiding a drop > {BUDGET_PTS + 1:.0f} pt in "
              f"{hidden}; corrected within one test image of the clean twins' accuracy in {near}; "
              f"test-set clean drop above the degradation inputs' 95 % bound in {over}")


if __name__ == "__main__":
    main()
