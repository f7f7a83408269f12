"""Coverage of real-world graph styles (issue 9): every graph of tests/corpus.py, each in
its own subprocess (so peak RSS is that graph's own), through the public API:

  loads        the twin builds (onnx2torch + our converters)
  parity       max relative |ORT - twin| on seeded inputs (the model's own sizes)
  editable     editable layers / mapped layers
  edit         a forced one-edit repair of a synthetic pair (two seeded inputs the
               model assigns different classes; criterion output, target gap 0,
               max 1 edit, degradation budget off, 4 stats inputs) written to disk
  ORT after    parity of ONNX Runtime on the written model vs the twin with the edit
  rank-1       `diff` shows only initializer changes, each of rank 1 (int8 copies: the
               edited weights, rank 1 at their quantisation step, plus the scale / zero
               point / bias tensors written with them)
  rounding     fp16 / int8 copies: max |written - float edit| / max |float edit|, and
               its effect (ORT on the written model vs the twin with the float edit, rel)
  revert       `revert` gives back a model `diff` calls identical to the original
  RSS, s       peak resident memory of the subprocess (VmHWM) and wall seconds

    python benchmarks/bench_coverage.py                # the CI corpus (light graphs)
    python benchmarks/bench_coverage.py --all          # + heavy graphs (VGG-19 ...)
    python benchmarks/bench_coverage.py --only zoo_squeezenet paddle_style
    python benchmarks/bench_coverage.py --quant        # fp16 / int8 copies and their originals

Prints a Markdown table. Timings are wall seconds on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# Stats inputs of the forced edit (key statistics, locality term).
N_STATS = 4


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(name: str, folder: Path, edit: bool) -> dict:
    import onnx

    import corpus
    from onnx_dynedit.api import edit_model, revert_model
    from onnx_dynedit.diff import diff_models
    from onnx_dynedit.errors import DynEditError
    from onnx_dynedit.io import load_model
    from onnx_dynedit.parity import check_parity
    from onnx_dynedit.twin import Twin

    entry = corpus.CORPUS[name]
    row = {"graph": name, "family": entry.family}
    t0 = time.perf_counter()
    path = folder / f"{name}.onnx"
    model = entry.build()
    onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > (1 << 30))
    del model
    row["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        twin = Twin(load_model(path), "cpu", input_shapes=entry.input_shapes or None)
        row["loads"] = True
        parity = check_parity(twin, int_range=(0, 50))
        row["parity"] = parity.max_rel_diff
        row["editable"] = f"{len(twin.layer_map.editable())}/{len(twin.layer_map.layers)}"
        row["attributed"] = "logits" if twin.logits_tensor else "output"
    except DynEditError as exc:
        row["loads"] = False
        row["error"] = exc.one_line()[:160]
        row["seconds"] = time.perf_counter() - t0
        row["rss_mb"] = peak_rss_mb()
        return row
    same = diff_models(load_model(path), load_model(path))
    row["diff_self_identical"] = same.identical
    if edit and entry.classifier:
        corrupt, clean, stats_x = corpus.synthetic_pair(twin, entry, N_STATS)
        del twin
        pairs, stats, out = folder / f"{name}_pairs.npz", folder / f"{name}_stats.npz", folder / f"{name}_e.onnx"
        _save(pairs, {"corrupt": corrupt, "clean": clean})
        _save(stats, {"x": stats_x})
        try:
            outcome = edit_model(path, pairs, out, stats=stats, max_edits=1, target_gap=0.0, criterion="output",
                                 max_degradation=1.0, input_shapes=entry.input_shapes or None)
            row["edit_written"] = outcome.output is not None and not outcome.output_unchanged
            row["ort_after"] = outcome.parity_after.get("max_rel_diff")
            if row["edit_written"]:
                d = diff_models(load_model(path), load_model(out))
                # int8: the edited weights (rank at their quantisation step) plus the scale /
                # zero-point / bias tensors requantised with them (the report's aux_changed)
                edited = {r["initializer"] for r in outcome.rounding}
                aux = {a for r in outcome.rounding for a in r.get("aux_changed", [])}
                row["rank1"] = (bool(d.changed) and all(c.rank == 1 for c in d.changed if c.initializer not in aux)
                                and {c.initializer for c in d.changed} <= edited | aux and not d.other_differences)
                lowp = [r for r in outcome.rounding if r["dtype"] not in ("float32", "float64")]
                if lowp:
                    row["rounding"] = max(r["rel_rounding_error"] for r in lowp)
                    row["rounding_effect"] = outcome.rounding_effect.get("max_rel_logit_change")
                back = folder / f"{name}_back.onnx"
                revert_model(out, back)
                row["revert_identical"] = diff_models(load_model(path), load_model(back)).identical
        except DynEditError as exc:
            row["edit_written"] = False
            row["error"] = exc.one_line()[:160]
    row["seconds"] = time.perf_counter() - t0
    row["rss_mb"] = peak_rss_mb()
    return row


def _save(path: Path, arrays: dict) -> None:
    import numpy as np

    flat = {}
    for key, arr in arrays.items():
        if arr.dtype.names:
            flat.update({f"{key}:{f}": arr[f] for f in arr.dtype.names})
        else:
            flat[key] = arr
    np.savez(path, **flat)


def _cell(value, fmt="{}") -> str:
    if value is None:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "**no**"
    return fmt.format(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="include the heavy graphs")
    ap.add_argument("--only", nargs="*", default=None, help="graph names (tests/corpus.py CORPUS)")
    ap.add_argument("--no-edit", action="store_true", help="round trips only")
    ap.add_argument("--jsonl", default=None, help="also append each graph's row (JSON) to this file as it completes")
    ap.add_argument("--render", default=None, help="print the table of the rows in this JSON-lines file and exit")
    ap.add_argument("--quant", action="store_true", help="only the fp16 / int8 copies (and their float originals)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, Path(args.folder), not args.no_edit)))
        return
    if args.render:
        render([json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()])
        return
    import corpus

    names = args.only or [n for n, e in corpus.CORPUS.items() if args.all or not e.heavy]
    if args.quant:
        copies = [n for n in names if n.split("_")[0] in ("fp16", "qdq", "int8cm", "int8dyn")]
        bases = {corpus.CORPUS[n].family.rsplit(" of ", 1)[-1] for n in copies}
        names = [n for n in names if n in bases] + copies
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--folder", tmp] + (["--no-edit"] if args.no_edit else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"graph": name, "loads": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{name}: done", file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")
            for f in Path(tmp).iterdir():
                f.unlink()
    render(rows)


def render(rows: list[dict]) -> None:
    head = ["graph", "loads", "twin parity (rel)", "attributed", "editable", "diff M M", "edit written",
            "ORT parity after", "rank-1 diff", "rounding (rel)", "rounding effect (rel)", "revert identical",
            "peak RSS MB", "seconds"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["graph"], _cell(r.get("loads")), _cell(r.get("parity"), "{:.1e}"), _cell(r.get("attributed")),
                 _cell(r.get("editable")), _cell(r.get("diff_self_identical")), _cell(r.get("edit_written")),
                 _cell(r.get("ort_after"), "{:.1e}"), _cell(r.get("rank1")), _cell(r.get("rounding"), "{:.1e}"),
                 _cell(r.get("rounding_effect"), "{:.1e}"), _cell(r.get("revert_identical")),
                 _cell(r.get("rss_mb"), "{:.0f}"), _cell(r.get("seconds"), "{:.1f}")]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("error"):
            print(f"\n{r['graph']}: {r['error']}")


if __name__ == "__main__":
    main()
