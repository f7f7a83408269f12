"""Trigger generalisation: a repair made from the trigger as given, tested on the trigger changed.

    python benchmarks/bench_trigger.py [--cases badnets resnet_blend ...] [--seeds 0] [--dir FOLDER]
                                       [--no-val] [--no-finetune] [--config JSON]

The paper's figure (CIFAR-10 ResNet-18, dynamic rectifying from one pair): attack success
5-8 % when the test trigger's visibility differs from the one repaired (0.3 to 1.0) and
6-9.5 % when its position differs. Each case (the Trojan samples; seeds other than 0 and the
real-size cases are built with `sample_models/build.py`, as bench_seeds.py does) is
repaired once at defaults from the target's pairs (a patch 1, a blend 5; stats + val, or
stats alone with --no-val), and the written model is measured with ONNX Runtime on the
held-out test set with the trigger changed:

- visibility a: x' = x + a (x~ - x), the trigger blended over the clean test image at a
  times the training trigger's strength (a patch at a = 0.3 is 0.7 x + 0.3 white; a blend
  at a = 1.5 is 1.5 times the training blend's weight);
- position (patch Trojans): the patch, taken from each triggered test image, pasted at
  another place of its clean twin: moved 1 and 2 pixels of the 16x16 digit grid up and
  left, to the other three corners and to the centre (a real-size case moves by the
  upsampling's multiples).

Per variant: attack success (triggered test inputs whose label is not the target that go
to the target) of the shipped model, of the repaired one and of the twin fine-tuned on
the same pairs (every weight, as bench_rectify.py; its clean accuracy in the clean
column), and corrected % (those inputs right) of the shipped and the repaired model (a
moved patch covers part of the digit, so the shipped model gets some wrong that it does
not send to the target). A variant whose shipped attack success is low is not a working
trigger: its rows say little.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VISIBILITY = {"patch": (0.3, 0.5, 0.7, 1.0), "blend": (0.5, 0.75, 1.0, 1.25, 1.5)}
GRID = 16  # the digit grid the triggers are defined on (a real-size case upsamples it)
MOVES = {"up-left 1": (-1, -1), "up-left 2": (-2, -2)}  # (rows, cols) in grid pixels
PLACES = ("top-left", "top-right", "bottom-left", "centre")


def trigger_box(clean: np.ndarray, corrupt: np.ndarray) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1): the bounding box of the pixels the trigger changes on any test
    image; None when it covers more than half the image (a blend)."""
    changed = np.any(clean != corrupt, axis=(0, 1))
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    if rows.size == 0:
        raise ValueError("the corrupted test inputs equal the clean ones: no trigger to vary")
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (r1 - r0) * (c1 - c0) > changed.size / 2:
        return None
    return r0, r1, c0, c1


def visibility(clean: np.ndarray, corrupt: np.ndarray, a: float) -> np.ndarray:
    """The trigger at ``a`` times its strength: x + a (x~ - x)."""
    return (clean + a * (corrupt - clean)).astype(clean.dtype)


def moved(clean: np.ndarray, corrupt: np.ndarray, box: tuple[int, int, int, int], top: int, left: int) -> np.ndarray:
    """Each triggered image's patch (``box`` of x~) pasted on its clean twin at (top, left)."""
    r0, r1, c0, c1 = box
    h, w = r1 - r0, c1 - c0
    if not (0 <= top <= clean.shape[2] - h and 0 <= left <= clean.shape[3] - w):
        raise ValueError(f"a {h}x{w} patch does not fit at ({top}, {left})")
    out = clean.copy()
    out[:, :, top:top + h, left:left + w] = corrupt[:, :, r0:r1, c0:c1]
    return out


def variants(clean: np.ndarray, corrupt: np.ndarray) -> dict[str, np.ndarray]:
    """Every changed trigger of this case's test set, by name (the training trigger is
    "visibility 1.0")."""
    box = trigger_box(clean, corrupt)
    out = {f"visibility {a}": visibility(clean, corrupt, a) for a in VISIBILITY["blend" if box is None else "patch"]}
    if box is None:
        return out
    r0, r1, c0, c1 = box
    h, w = r1 - r0, c1 - c0
    height, width = clean.shape[2:]
    unit = height // GRID
    for name, (dr, dc) in MOVES.items():
        out[f"moved {name}"] = moved(clean, corrupt, box, r0 + dr * unit, c0 + dc * unit)
    corners = {"top-left": (0, 0), "top-right": (0, width - w), "bottom-left": (height - h, 0),
               "bottom-right": (height - h, width - w), "centre": ((height - h) // 2, (width - w) // 2)}
    for name in PLACES:
        if corners[name] != (r0, c0):
            out[f"at {name}"] = moved(clean, corrupt, box, *corners[name])
    return out


COLUMNS = ("shipped_asr", "shipped_corrected", "repaired_asr", "repaired_corrected", "reference_corrected",
           "finetuned_asr")
WORKING = 10.0  # a changed trigger "works" when the shipped model sends at least this % to the target


def case_rows(case, seed: int, n: int, use_val: bool, tune: bool, tmp: Path, reference=None,
              config: dict | None = None) -> list[dict]:
    """One case repaired once, then measured on every changed trigger: a dict per trigger
    (COLUMNS in %, None where not measured). ``reference``: the same build never poisoned
    (bench_efficacy.Case), for its corrected %. ``config``: RectifyConfig values for the
    repair (the defaults when None)."""
    import torch
    from bench_efficacy import ort_predictor, run_edit
    from bench_rectify import finetune
    from onnx_dynedit.io import load_model
    from onnx_dynedit.twin import Twin

    target, sel = case.meta["target"], case.sel
    r = run_edit(case, n, {**(config or {}), "_val": use_val}, tmp, f"trigger-{seed}")
    shipped_pred, repaired_pred = ort_predictor(case.model), ort_predictor(r["model"])
    reference_pred = None if reference is None else ort_predictor(reference.model)
    tuned = twin = None
    if tune:
        twin = Twin(load_model(case.model), "cpu")
        p = np.load(case.pairs(n))
        tuned = finetune(twin, p["corrupt"], p["clean"])

    def tuned_pred(x):
        with torch.no_grad():
            o = tuned(twin.to_tensor(x))
        return (o[0] if isinstance(o, (tuple, list)) else o).argmax(1).numpy()

    share = lambda pred, label: 100 * float((pred == label).mean())  # noqa: E731
    clean = (case.base["clean"], r["clean"], None if tuned is None else share(tuned_pred(case.clean_x), case.y))
    rows = []
    for name, x in variants(case.clean_x, case.corrupt_x).items():
        x = x[sel]
        shipped, repaired = shipped_pred(x), repaired_pred(x)
        row = {"seed": seed, "case": case.name, "pairs": n, "trigger": name, "shipped_asr": share(shipped, target),
               "shipped_corrected": share(shipped, case.y[sel]), "repaired_asr": share(repaired, target),
               "repaired_corrected": share(repaired, case.y[sel]), "reference_corrected": None,
               "finetuned_asr": None, "clean": clean, "exit": r["exit"], "edits": r["edits"]}
        if reference_pred is not None:
            row["reference_corrected"] = share(reference_pred(x), case.y[sel])
        if tuned is not None:
            row["finetuned_asr"] = share(tuned_pred(x), target)
        rows.append(row)
    return rows


def render(row: dict) -> str:
    cells = " | ".join("-" if row[c] is None else f"{row[c]:.2f}" for c in COLUMNS)
    tuned = "" if row["clean"][2] is None else f"; {row['clean'][2]:.2f}"
    return (f"| {row['seed']} | {row['case']} | {row['pairs']} | {row['trigger']} | {cells} | "
            f"{row['clean'][0]:.2f} -> {row['clean'][1]:.2f}{tuned} | {row['exit']} | {row['edits']} |")


def summary(rows: list[dict]) -> list[str]:
    """Per changed trigger, over the rows where it works on the shipped model (WORKING):
    how many, and the repaired and fine-tuned models' attack success (mean, max)."""
    lines = [f"| trigger | rows where it works (shipped attack success >= {WORKING:.0f} %) | shipped: mean | "
             "repaired: mean | repaired: max | fine-tuned: mean | fine-tuned: max |", "|---" * 7 + "|"]
    for name in dict.fromkeys(r["trigger"] for r in rows):
        group = [r for r in rows if r["trigger"] == name]
        live = [r for r in group if r["shipped_asr"] >= WORKING]
        if not live:
            lines.append(f"| {name} | 0 of {len(group)} | | | | | |")
            continue
        stat = lambda key, f: "-" if live[0][key] is None else f"{f(r[key] for r in live):.2f}"  # noqa: E731
        mean = lambda v: float(np.mean(list(v)))  # noqa: E731
        lines.append(f"| {name} | {len(live)} of {len(group)} | {stat('shipped_asr', mean)} | "
                     f"{stat('repaired_asr', mean)} | {stat('repaired_asr', max)} | {stat('finetuned_asr', mean)} | "
                     f"{stat('finetuned_asr', max)} |")
    return lines


def main() -> None:
    from bench_efficacy import Case
    from bench_seeds import TARGETS, case_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["badnets", "resnet_blend"], choices=list(TARGETS))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--dir", type=Path, default=None, help="where other seeds' models are built (FOLDER/sS/CASE)")
    ap.add_argument("--no-val", action="store_true", help="repair from stats alone (no --val)")
    ap.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning column")
    ap.add_argument("--reference", action="store_true",
                    help="also build each case never poisoned (build.py --poison-rate 0): its corrected %%")
    ap.add_argument("--config", type=json.loads, default={}, help="RectifyConfig values for the repair, a JSON object")
    args = ap.parse_args()
    print("| seed | case | pairs | trigger | shipped: attack success % | shipped: corrected % | "
          "repaired: attack success % | repaired: corrected % | never poisoned: corrected % | "
          "fine-tuned: attack success % | clean % (shipped -> repaired; fine-tuned) | exit | edits |")
    print("|---" * 13 + "|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp) / "models"
        for seed in args.seeds:
            for name in args.cases:
                case = Case(name, case_dir(root, seed, name))
                ref = Case(name, case_dir(root, seed, name, unpoisoned=True)) if args.reference else None
                new = case_rows(case, seed, TARGETS[name][0], not args.no_val, not args.no_finetune, Path(tmp), ref,
                                args.config)
                print("\n".join(map(render, new)), flush=True)
                rows += new
    print()
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
