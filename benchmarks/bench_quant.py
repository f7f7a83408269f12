"""Repairs of fp16 and int8 copies of the sample models, measured in one run.

    python benchmarks/bench_quant.py [--cases badnets blend] [--dir FOLDER] [--only LABEL ...]
                                     [--edits repair forced] [--out results.md]

For each case, the float32 model as shipped and copies of it built offline
(tests/quantised.py): float16; int8 QDQ from onnxruntime.quantization.quantize_static
(per-tensor and per-channel, activations quantised too, calibrated on 32 stats inputs;
per-channel also with reduce_range=True, 7-bit weights);
int8 weights dequantised by Cast + Mul (per-channel, symmetric) and uint8 by Cast + Sub +
Mul (per-tensor, asymmetric). Two edits per copy, both through
`onnx_dynedit.api.edit_model` (written ONNX, measured with ONNX Runtime on the copy's own
graph):
  - "repair": the defaults, one pair, the case's stats inputs;
  - "forced": `--criterion output --target-gap 0 --max-edits 1` (a large edit: it pushes
    weights past their channel's range, so scales get recomputed).
``--dir FOLDER`` reads the cases from FOLDER/<case> instead of sample_models/ (a build of
``sample_models/build.py --out FOLDER``, e.g. the real-size ``tv_badnets``).
Columns: clean accuracy, attack success rate and corrected % (triggered test inputs whose
label is not the target, now right) of the written model on the held-out test sets; the
rounding of the written weight (max |written - float edit|, the same over max |float edit|,
Frobenius residual), scale groups recomputed / all, the effect of the
rounding on the logits (ONNX Runtime on the written model vs the twin with the float
edit, max abs), parity of the written model with the twin under the written change
(max rel), the rank `dynedit diff` reports for the edited weight, whether the diff shows
nothing but the edited weight and its quantisation tensors, whether revert gives the
original bytes, and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import quantised  # noqa: E402
from onnx_dynedit.api import edit_model, revert_model  # noqa: E402
from onnx_dynedit.diff import diff_models  # noqa: E402
from onnx_dynedit.errors import ParityError  # noqa: E402
from onnx_dynedit.io import load_model  # noqa: E402

warnings.filterwarnings("ignore")


def variants(src: Path, calib: np.ndarray, folder: Path) -> dict[str, Path]:
    model = onnx.load(str(src))
    out = {"float32 (shipped)": src}
    for label, build in (("float16", lambda: quantised.to_fp16(model)),
                         ("int8 Cast+Mul, per-channel", lambda: quantised.to_cast_mul(model)),
                         ("uint8 Cast+Sub+Mul, per-tensor", lambda: quantised.to_cast_mul(
                             model, asymmetric=True, per_channel=False))):
        path = folder / (label.split()[0] + label.split()[-1] + ".onnx")
        onnx.save(build(), str(path))
        out[label] = path
    for label, pc, rr in (("int8 QDQ, per-tensor", False, False), ("int8 QDQ, per-channel", True, False),
                          ("int8 QDQ, per-channel, reduce_range", True, True)):
        out[label] = quantised.to_qdq(src, folder / f"qdq{int(pc)}{int(rr)}.onnx", calib, per_channel=pc,
                                      reduce_range=rr)
    return out


def ort_pred(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if inp.type == "tensor(float16)":
        x = x.astype(np.float16)
    return sess.run(None, {inp.name: x})[0].argmax(1)


def run_case(case: str, tmp: Path, only: list[str] | None = None, edits=("repair", "forced"),
             folder: Path | None = None) -> str:
    d = (folder or ROOT / "sample_models") / case
    meta = json.loads((d / "meta.json").read_text())
    ct, xt = np.load(d / "clean_test.npz"), np.load(d / "corrupt_test.npz")
    target = meta["target"]
    calib = np.load(d / "stats.npz")["x"][:32]

    sel = xt["y"] != target

    def figures(path: Path) -> tuple[float, float, float]:
        clean = 100 * float((ort_pred(path, ct["x"]) == ct["y"]).mean())
        pred = ort_pred(path, xt["x"])[sel]
        return clean, 100 * float((pred == target).mean()), 100 * float((pred == xt["y"][sel]).mean())

    head = ["model", "edit", "clean acc %", "ASR %", "corrected %", "layer", "max rounding", "rel", "residual",
            "rescaled", "logit effect", "parity rel", "diff rank", "diff only edited", "revert identical", "time s"]
    lines = [f"#### {case}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, path in variants(d / "model.onnx", calib, tmp).items():
        if only and not any(o in label for o in only):
            continue
        clean, asr, corrected = figures(path)
        lines.append(f"| {label} | shipped | {clean:.2f} | {asr:.2f} | {corrected:.2f} |" + " |" * (len(head) - 5))
        for edit, kw in (("repair", {}), ("forced", {"criterion": "output", "target_gap": 0.0, "max_edits": 1})):
            if edit not in edits:
                continue
            out = tmp / f"e_{case}_{abs(hash(label))}_{edit}.onnx"
            t0 = time.perf_counter()
            try:
                res = edit_model(path, d / "pairs.npz", out, stats=d / "stats.npz", **kw)
            except ParityError as err:  # what `dynedit edit` prints, and exits 1
                lines.append(f"| {label} | {edit} | - | - | - | refused after {time.perf_counter() - t0:.1f} s: "
                             f"{err.message} |" + " |" * (len(head) - 6))
                print(lines[-1], file=sys.stderr, flush=True)
                continue
            dt = time.perf_counter() - t0
            if res.output is None:
                lines.append(f"| {label} | {edit} | - | - | - | (no edit accepted) |" + " |" * (len(head) - 6))
                continue
            clean, asr, corrected = figures(out)
            r = res.rounding[0]
            eff = res.rounding_effect.get("max_abs_logit_change")
            diff = diff_models(load_model(path), load_model(out))
            expected = {x["initializer"] for x in res.rounding} | {a for x in res.rounding for a in x["aux_changed"]}
            only_edited = {c.initializer for c in diff.changed} == expected and not diff.other_differences
            rank = ",".join(str(c.rank) for c in diff.changed if c.initializer in {x["initializer"] for x in res.rounding})
            back = tmp / "back.onnx"
            revert_model(out, back)
            same = back.read_bytes() == Path(path).read_bytes()
            rescaled = f"{r['rescaled_groups']}/{r['groups']}" if "groups" in r else "-"
            layers = ",".join(e.layer.node for e in res.result.edits)
            lines.append(
                f"| {label} | {edit} | {clean:.2f} | {asr:.2f} | {corrected:.2f} | {layers} "
                f"| {r['max_abs_rounding_error']:.2e} | {r['rel_rounding_error']:.2e} | {r['rounding_residual']:.2e} "
                f"| {rescaled} | {'-' if eff is None else f'{eff:.3g}'} | {res.parity_after['max_rel_diff']:.2g} "
                f"| {rank} | {'yes' if only_edited else 'NO'} | {'yes' if same else 'NO'} | {dt:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["badnets"])
    ap.add_argument("--dir", type=Path, default=None, help="read the cases from this folder (default sample_models/)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    ap.add_argument("--only", nargs="*", default=None, help="copies whose label contains one of these (e.g. QDQ)")
    ap.add_argument("--edits", nargs="*", default=["repair", "forced"], choices=["repair", "forced"])
    args = ap.parse_args()
    text = [f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            table = run_case(case, Path(tmp), args.only, tuple(args.edits), args.dir)
            print(table, flush=True)
            text.append(table)
    if args.out:
        args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
