"""How well the unlabeled degradation check sees a held-out accuracy drop, edit by edit.

    python benchmarks/bench_degradation.py [--dir FOLDER] [--seeds 0 1 2 3 4]
                                           [--cases resnet_blend deep_blend resnet_badnets ...]

Without labels the degradation budget reads the share of reference inputs whose top-1
class an edit changes, or w x their mean output shift (the total-variation distance of
the class probabilities) where that is larger (`degradation.Degradation`). This benchmark
makes many edits of known cost and asks which of them each reading would refuse: every
editable layer of each case pinned in turn (`layers=[L]`, one edit, the budget off), with
16 and with no synthetic pairs, at the case's target pair count, stats only. For each
edit it measures, on the twin: the clean accuracy drop on the held-out test set (what
the budget stands for), and on two kinds of reference inputs the changed share and the
mean output shift: the 25 % of the stats the loop holds out (the model's own training
images) and val's inputs without their labels (fresh inputs, what a user with unlabeled
deployment data passes). It prints, per reference and weight w, how many edits the rule
max(changed, w x shift) > 1 % (the default budget) refuses among those that cost more than
2 points (the acceptance's budget + 1 point), between 0.5 and 2, and at most 0.5.
Cases: the committed samples (seed 0) and the held-out rebuilds of bench_seeds.py in
FOLDER/sS/CASE (built there when missing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_efficacy import Case  # noqa: E402
from bench_seeds import TARGETS, case_dir  # noqa: E402

from onnx_dynedit.io import load_model  # noqa: E402
from onnx_dynedit.degradation import Degradation, Reference  # noqa: E402
from onnx_dynedit.rectify import RectifyConfig, rectify, split_stats  # noqa: E402
from onnx_dynedit.twin import Twin  # noqa: E402

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0)
BANDS = (("> 2 pt", lambda d: d > 2.0), ("0.5-2 pt", lambda d: 0.5 < d <= 2.0), ("<= 0.5 pt", lambda d: d <= 0.5))


def pinned_edits(case: Case) -> list[dict]:
    """Every pinned single edit of ``case``: its test drop and each reference's (changed, shift)."""
    twin = Twin(load_model(case.model), "cpu")
    n = TARGETS[case.name][0]
    p = np.load(case.pairs(n))
    stats = np.load(case.dir / "stats.npz")["x"]
    cfg = RectifyConfig()
    refs = {name: Degradation(twin, Reference(x, None, name, name)) for name, x in (
        ("held-out stats", split_stats(stats, cfg.holdout, cfg.seed)[1]),
        ("val inputs", np.load(case.dir / "val.npz")["x"]))}
    test = Degradation(twin, Reference(case.clean_x, case.y, "test", "accuracy drop on the test set"))
    out = []
    for layer in twin.layer_map.editable():
        for augment in (16, 0):
            r = rectify(twin, p["corrupt"], p["clean"], stats_x=stats, config=cfg.replace(
                layers=[layer.node], max_degradation=1.0, max_edits=1, augment=augment))
            if not r.edits:
                continue
            edits = [e.to_torch(twin.device) for e in r.edits]
            row = {"drop": 100 * test(edits)}
            for name, ref in refs.items():
                parts = ref.parts(ref.logits(edits))
                row[name] = parts["changed_predictions"], parts["output_shift"]
            out.append(row)
            print(f"  {case.dir.parent.name}/{case.name} {layer.node} augment {augment}: drop {row['drop']:.2f} pt",
                  file=sys.stderr, flush=True)
    return out


def table(edits: list[dict], budget: float = 0.01) -> str:
    """Edits refused by max(changed, w x shift) > budget, per reference, weight and cost band."""
    counts = {name: sum(f(e["drop"]) for e in edits) for name, f in BANDS}
    lines = ["| reference | w | " + " | ".join(f"refused, cost {name} ({counts[name]})" for name, _ in BANDS) + " |",
             "|---|---|" + "---|" * len(BANDS)]
    for ref in ("held-out stats", "val inputs"):
        for w in WEIGHTS:
            refused = [e for e in edits if max(e[ref][0], w * e[ref][1]) > budget]
            cells = [str(sum(f(e["drop"]) for e in refused)) for _, f in BANDS]
            lines.append(f"| {ref} | {w:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--cases", nargs="*", default=["resnet_blend", "deep_blend", "resnet_badnets"],
                    choices=list(TARGETS))
    ap.add_argument("--dir", type=Path, default=None, help="where the models are built (FOLDER/sS/CASE)")
    args = ap.parse_args()
    edits: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp) / "models"
        for seed in args.seeds:
            for name in args.cases:
                edits += pinned_edits(Case(name, case_dir(root, seed, name)))
    print(f"{len(edits)} pinned single edits, budget 1 %:\n")
    print(table(edits))


if __name__ == "__main__":
    main()
