"""Repairs of fp16 and int8 copies of the sample models, measured in one run.

    python benchmarks/bench_quant.py [--cases badnets blend] [--out results.md]

For each case, the float32 model as shipped and copies of it built offline
(tests/quantised.py): float16; int8 QDQ from onnxruntime.quantization.quantize_static
(per-tensor and per-channel, activations quantised too, calibrated on 32 stats inputs);
int8 weights dequantised by Cast + Mul (per-channel, symmetric) and uint8 by Cast + Sub +
Mul (per-tensor, asymmetric). Two edits per copy, both through
`onnx_dynedit.api.edit_model` (written ONNX, measured with ONNX Runtime on the copy's own
graph):
  - "repair": the defaults, one pair, the case's stats inputs;
  - "forced": `--criterion output --target-gap 0 --max-edits 1` (a large edit: it pushes
    weights past their channel's range, so scales get recomputed).
Columns: clean accuracy and attack success rate (%) of the written model on the held-out
test sets; the rounding of the written weight (max |written - float edit|, the same over
max |float edit|, Frobenius residual), scale groups recomputed / all, the effect of the
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
    for label, pc in (("int8 QDQ, per-tensor", False), ("int8 QDQ, per-channel", True)):
        out[label] = quantised.to_qdq(src, folder / f"qdq{int(pc)}.onnx", calib, per_channel=pc)
    return out


def ort_pred(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if inp.type == "tensor(float16)":
        x = x.astype(np.float16)
    return sess.run(None, {inp.name: x})[0].argmax(1)


def run_case(case: str, tmp: Path, only: list[str] | None = None, edits=("repair", "forced")) -> str:
    d = ROOT / "sample_models" / case
    meta = json.loads((d / "meta.json").read_text())
    ct, xt = np.load(d / "clean_test.npz"), np.load(d / "corrupt_test.npz")
    target = meta["target"]
    calib = np.load(d / "stats.npz")["x"][:32]

    def figures(path: Path) -> tuple[float, float]:
        clean = 100 * float((ort_pred(path, ct["x"]) == ct["y"]).mean())
        pred = ort_pred(path, xt["x"])
        return clean, 100 * float((pred[xt["y"] != target] == target).mean())

    head = ["model", "edit", "clean acc %", "ASR %", "layer", "max rounding", "rel", "residual", "rescaled",
            "logit effect", "parity rel", "diff rank", "diff only edited", "revert identical", "time s"]
    lines = [f"#### {case}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, path in variants(d / "model.onnx", calib, tmp).items():
        if only and not any(o in label for o in only):
            continue
        clean, asr = figures(path)
        lines.append(f"| {label} | shipped | {clean:.2f} | {asr:.2f} |" + " |" * (len(head) - 4))
        for edit, kw in (("repair", {}), ("forced", {"criterion": "output", "target_gap": 0.0, "max_edits": 1})):
            if edit not in edits:
                continue
            out = tmp / f"e_{case}_{abs(hash(label))}_{edit}.onnx"
            t0 = time.perf_counter()
            res = edit_model(path, d / "pairs.npz", out, stats=d / "stats.npz", **kw)
            dt = time.perf_counter() - t0
            if res.output is None:
                lines.append(f"| {label} | {edit} | - | - | (no edit accepted) |" + " |" * (len(head) - 5))
                continue
            clean, asr = figures(out)
            r = res.rounding[0]
            eff = res.rounding_effect.get("max_abs_logit_change")
            diff = diff_models(load_model(path), load_model(out))
            expected = {x["initializer"] for x in res.rounding} | {a for x in res.rounding for a in x["aux_changed"]}
            only = {c.initializer for c in diff.changed} == expected and not diff.other_differences
            rank = ",".join(str(c.rank) for c in diff.changed if c.initializer in {x["initializer"] for x in res.rounding})
            back = tmp / "back.onnx"
            revert_model(out, back)
            same = back.read_bytes() == Path(path).read_bytes()
            rescaled = f"{r['rescaled_groups']}/{r['groups']}" if "groups" in r else "-"
            lines.append(
                f"| {label} | {edit} | {clean:.2f} | {asr:.2f} | {','.join(e.layer.node for e in res.result.edits)} "
                f"| {r['max_abs_rounding_error']:.2e} | {r['rel_rounding_error']:.2e} | {r['rounding_residual']:.2e} "
                f"| {rescaled} | {'-' if eff is None else f'{eff:.3g}'} | {res.parity_after['max_rel_diff']:.2g} "
                f"| {rank} | {'yes' if only else 'NO'} | {'yes' if same else 'NO'} | {dt:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["badnets"])
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    ap.add_argument("--only", nargs="*", default=None, help="copies whose label contains one of these (e.g. QDQ)")
    ap.add_argument("--edits", nargs="*", default=["repair", "forced"], choices=["repair", "forced"])
    args = ap.parse_args()
    text = [f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            table = run_case(case, Path(tmp), args.only, tuple(args.edits))
            print(table, flush=True)
            text.append(table)
    if args.out:
        args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
