"""The localisation decisions the paper leaves open, measured: the scalar attributed (F),
the IG step count and the spatial reduction.

    python benchmarks/bench_locate.py [--cases badnets blend spurious leakage] [--no-edit-leakage]

One table per sample model, one pair (pairs.npz) and the stats inputs. Rows: the default
(F = logit of the class predicted on x~, 16 steps, positions summed before the norm) and
one change each. Columns: the chosen layer and the next two, IG completeness error
(mean over layers of |sum M - (F(x) - F(x~))| / |F(x) - F(x~)|), the time of `locate`,
and the outcome of the full dynamic edit run with that variant (written ONNX measured with
ONNX Runtime, as in bench_rectify.py). On leakage the edit takes about a minute per
variant; ``--no-edit-leakage`` skips it there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rectify import figures, ort_logits, print_tables  # noqa: E402
from onnx_dynedit.api import edit_model  # noqa: E402
from onnx_dynedit.attribution import locate  # noqa: E402
from onnx_dynedit.io import load_model  # noqa: E402
from onnx_dynedit.rank_one import key_statistics  # noqa: E402
from onnx_dynedit.twin import Twin  # noqa: E402

warnings.filterwarnings("ignore")

VARIANTS = [
    ("default: F = logit on x~, 16 steps, sum over positions", {}),
    ("F = logit gap (class on x~ minus class on x)", {"ig_target": "gap"}),
    ("4 IG steps", {"ig_steps": 4}),
    ("64 IG steps", {"ig_steps": 64}),
    ("abs(M) summed over positions (no cancelling)", {"ig_reduction": "abs"}),
]
KEY = {"badnets": ("asr", "ASR %"), "blend": ("asr", "ASR %"), "spurious": ("spurious", "spurious (pts)"),
       "leakage": ("leakage", "leakage score")}


def run_case(case: str, tmp: Path, edit: bool) -> str:
    d = ROOT / "sample_models" / case
    meta = json.loads((d / "meta.json").read_text())
    ct, xt = np.load(d / "clean_test.npz"), np.load(d / "corrupt_test.npz")
    data = {"clean_x": ct["x"], "clean_y": ct["y"], "corrupt_x": xt["x"], "corrupt_y": xt["y"]}
    model = d / "model.onnx"
    twin = Twin(load_model(model), "cpu")
    pairs, stats_x = np.load(d / "pairs.npz"), np.load(d / "stats.npz")["x"]
    layers = twin.layer_map.editable()
    stats = key_statistics(twin, layers, stats_x)
    key, label = KEY[case]
    head = ["variant", "chosen", "2nd", "3rd", "completeness err", "locate s", "clean acc %", label, "edit s",
            "edited layers"]
    lines = [f"### {case}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, kw in VARIANTS:
        t0 = time.perf_counter()
        loc = locate(twin, layers, pairs["corrupt"], pairs["clean"], stats, steps=kw.get("ig_steps", 16),
                     target=kw.get("ig_target", "corrupt_logit"), reduction=kw.get("ig_reduction", "sum"))
        t_loc = time.perf_counter() - t0
        ranked = [a.layer.node for a in loc.ranked] + ["-", "-", "-"]
        gap = abs(loc.f_gap) or 1e-12
        err = float(np.mean([abs(a.attribution - loc.f_gap) / gap for a in loc.ranked])) if loc.ranked else float("nan")
        row = [name, ranked[0], ranked[1], ranked[2], f"{err:.3f}", f"{t_loc:.2f}"]
        if edit or case != "leakage":
            out = tmp / f"{case}-{len(lines)}.onnx"
            t0 = time.perf_counter()
            outcome = edit_model(model, d / "pairs.npz", out, stats=d / "stats.npz", val=d / "val.npz", device="cpu",
                                 **kw)
            t_edit = time.perf_counter() - t0
            if outcome.output is None:
                fig, edited = figures(case, meta, data, ort_logits(model, data["clean_x"]),
                                      ort_logits(model, data["corrupt_x"]), twin.forward), "no edit accepted"
            else:
                tw = Twin(load_model(out), "cpu")
                fig = figures(case, meta, data, ort_logits(out, data["clean_x"]), ort_logits(out, data["corrupt_x"]),
                              tw.forward)
                edited = ",".join(e.layer.node for e in outcome.result.edits)
            value = fig[key]
            row += [f"{fig['clean_acc']:.2f}", f"{value:.3f}" if key == "leakage" else f"{value:.2f}", f"{t_edit:.1f}",
                    edited]
        else:
            row += ["-", "-", "-", "edit not run (--no-edit-leakage)"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["badnets", "blend", "spurious", "leakage"])
    ap.add_argument("--no-edit-leakage", action="store_true", help="only locate on leakage (its edits are slow)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = ap.parse_args()
    text = [f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"]
    print_tables(args.cases, lambda case, tmp: run_case(case, tmp, edit=not args.no_edit_leakage), args.out, text)

if __name__ == "__main__":
    main()
