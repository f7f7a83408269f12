"""ONNX -> torch converters side by side on the coverage corpus (issue 9, item 1).

For every graph of tests/corpus.py (saved to a temporary folder and loaded back), the same
seeded inputs go through ONNX Runtime and through three torch conversions:

  onnx2torch raw   ``onnx2torch.convert`` on the unmodified ModelProto, called with the
                   graph inputs its module keeps (an IR-3 graph's initializers listed as
                   inputs are read as weights and dropped from the arguments)
  dynedit twin     ``onnx_dynedit.twin.Twin(onnx_dynedit.io.load_model(path))``: the
                   normalised copy (unique names, Constant weights as initializers, IR 3
                   inputs dropped, fp16 computed in fp32, dequantised constants folded ...)
                   converted by onnx2torch with our converters registered; its graph
                   outputs are compared (the extra logits output it adds is left out)
  onnx2pytorch     onnx2pytorch 0.6.0 ``ConvertModel(model, experimental=True)`` (the
                   column is skipped, with a note, when onnx2pytorch is not installed:
                   ``pip install -e ".[bench]"``)

A cell is the max relative difference to ONNX Runtime over all graph outputs (max |ORT -
torch| / max(1, max |ORT output|), ``parity.compare_outputs``, as the twin's parity check
measures it), in bold when it is above the graph's tolerance (the twin's own, ``Twin.tol``:
1e-5 float32, 1e-2 float16, 5e-2 quantised activations), or the first line of the error
(``convert:`` or ``run:``, shortened; onnx2torch's missing-converter message becomes ``no
converter for Op-version``). The ``s`` columns are seconds to convert, after one untimed
warm-up conversion of a tiny graph per converter (for the twin: load checks +
normalisation + conversion + layer map). Inputs: batch 2, seed 0, integer ids in [0, 50),
attention masks all ones, the corpus's ``input_shapes`` for symbolic sizes. ONNX Runtime
runs with dynedit's session settings (``sessions.ort_session``).

Each graph runs in its own subprocess. A heavy graph, or one whose process dies (a segfault
in a converter or in ONNX Runtime), runs with ONNX Runtime and each converter in separate
processes, so one process holds one converter's copy of the weights and a crash fills one
cell; if ONNX Runtime itself crashes at its default optimisation level, the reference is
taken at ``ORT_ENABLE_BASIC`` (the row is marked ``ORT basic``). A process is killed if its
resident memory passes --max-rss-mb (default 4096) or it runs past --timeout seconds.
``peak RSS MB`` is the largest of the graph's processes.

    python benchmarks/bench_converters.py                 # the light graphs
    python benchmarks/bench_converters.py --all           # + heavy ones (VGG-19 ...)
    python benchmarks/bench_converters.py --only tf2onnx_style zoo_squeezenet

Prints a Markdown table (progress on stderr). Timings are wall seconds on whatever machine
runs it; compare them within one run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

COLUMNS = ("onnx2torch", "twin", "onnx2pytorch")
HEADS = {"onnx2torch": "onnx2torch raw", "twin": "dynedit twin", "onnx2pytorch": "onnx2pytorch 0.6.0"}
SEED, BATCH, INT_RANGE = 0, 2, (0, 50)
CELL_CHARS = 80


def onnx2pytorch_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("onnx2pytorch")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- measuring (in a subprocess)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_NO_CONVERTER = re.compile(r"Converter is not implemented \(OperationDescription\(domain='([^']*)', "
                           r"operation_type='([^']*)', version=(\d+)\)\)")


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, onnx2torch's missing-converter message
    shortened to ``no converter for Op-version``."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return _NO_CONVERTER.sub(lambda m: f"no converter for {m[1] + '.' if m[1] else ''}{m[2]}-{m[3]}", text)


def _quiet() -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


def feeds_for(model, entry) -> dict:
    """Seeded inputs from the graph's own inputs (batch 2, the corpus's sizes)."""
    import numpy as np

    from onnx_dynedit.shapes import input_specs, random_inputs

    specs = input_specs(model)
    feeds = random_inputs(specs, batch=BATCH, seed=SEED, int_range=INT_RANGE, shapes=entry.input_shapes or None,
                          label=entry.name)
    for spec in specs:  # as corpus.sample_inputs: attention masks keep every token
        if not np.issubdtype(spec.dtype, np.floating) and "mask" in spec.name:
            feeds[spec.name] = np.ones_like(feeds[spec.name])
    return feeds


def graph_tolerance(model) -> float:
    """The twin's tolerance for a graph it could not build (the rule of ``Twin.tol``)."""
    from onnx import TensorProto

    from onnx_dynedit.twin import FP16_TOL, FP32_TOL, QUANT_TOL

    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return QUANT_TOL
    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    halves += [v for v in model.graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT16]
    return FP16_TOL if halves else FP32_TOL


def reference(name: str, folder: Path, *, ort_basic: bool = False) -> dict:
    """Build graph ``name``, save it, and compute ONNX Runtime's outputs on seeded inputs:
    {"path", "entry", "feeds", "names", "expected", "tol", "ort"}."""
    import onnx
    import onnxruntime as ort

    import corpus
    from onnx_dynedit.sessions import ort_session

    entry = corpus.CORPUS[name]
    path = folder / f"{name}.onnx"
    model = entry.build()
    onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > (1 << 30))
    model = onnx.load(str(path))
    feeds = feeds_for(model, entry)
    if ort_basic:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    else:
        session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    expected = session.run(None, feeds)
    return {"path": path, "entry": entry, "feeds": feeds, "names": names, "expected": expected,
            "tol": graph_tolerance(model), "ort": "basic" if ort_basic else "default"}


def _outputs(got) -> list:
    import torch

    if isinstance(got, torch.Tensor):
        got = [got]
    return [g.detach().double().cpu().numpy() for g in got]


def _compare(names, expected, got) -> float:
    import numpy as np

    from onnx_dynedit.parity import compare_outputs

    if len(got) != len(expected):
        raise ValueError(f"{len(got)} outputs, ONNX Runtime gives {len(expected)}")
    for ref, val in zip(expected, got):
        if np.asarray(ref).size != np.asarray(val).size:
            raise ValueError(f"output of shape {list(np.shape(val))}, ONNX Runtime's is {list(np.shape(ref))}")
    rel = max((o.max_rel_diff for o in compare_outputs(names, expected, got)), default=0.0)
    return rel if np.isfinite(rel) else float("inf")


def _onnx2torch(ref: dict):
    import onnx
    import torch
    from onnx import numpy_helper
    from onnx2torch import convert

    model = onnx.load(str(ref["path"]))  # the unmodified ModelProto
    module = convert(model)
    # an IR-3 graph lists its initializers as inputs too: onnx2torch reads them as weights
    # and its module keeps only the real inputs (graph order) as arguments
    inits = {t.name: t for t in model.graph.initializer}
    kept = sum(1 for node in module.graph.nodes if node.op == "placeholder")
    real = [vi.name for vi in model.graph.input if vi.name not in inits]
    if kept == len(real):
        args = [ref["feeds"][name] for name in real]
    else:
        args = [ref["feeds"][vi.name] if vi.name in ref["feeds"] else numpy_helper.to_array(inits[vi.name]).copy()
                for vi in model.graph.input]
    return module, lambda: module.eval()(*[torch.from_numpy(a) for a in args])


def _twin(ref: dict):
    from onnx_dynedit.io import load_model
    from onnx_dynedit.twin import Twin

    twin = Twin(load_model(ref["path"]), "cpu", input_shapes=ref["entry"].input_shapes or None)
    xs = [twin.to_tensor(ref["feeds"][spec.name]) for spec in twin.inputs]
    def run():
        got = twin.module(*xs)
        return list(got)[:len(ref["names"])] if isinstance(got, (tuple, list)) else got  # not the extra logits

    return twin, run


def _onnx2pytorch(ref: dict):
    import onnx
    import torch
    from onnx2pytorch import ConvertModel

    module = ConvertModel(onnx.load(str(ref["path"])), experimental=True)
    return module, lambda: module.eval()(**{k: torch.from_numpy(v) for k, v in ref["feeds"].items()})


CONVERTERS = {"onnx2torch": _onnx2torch, "twin": _twin, "onnx2pytorch": _onnx2pytorch}


def _error(exc: BaseException) -> str:
    from onnx_dynedit.errors import DynEditError

    return exc.one_line() if isinstance(exc, DynEditError) else first_line(exc)


def measure(converter: str, ref: dict) -> dict:
    """Convert with ``converter`` and compare with ONNX Runtime: {"rel" | "error", "seconds"}."""
    import contextlib
    import gc
    import io

    import torch

    build = CONVERTERS[converter]
    res: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):  # converters that print
        t0 = time.perf_counter()
        try:
            obj, run = build(ref)
        except Exception as exc:  # noqa: BLE001 - a converter's failure is a measurement
            return {"error": "convert: " + _error(exc), "seconds": time.perf_counter() - t0}
        res["seconds"] = time.perf_counter() - t0
        if converter == "twin":
            res["tol"] = obj.tol
        try:
            with torch.no_grad():
                res["rel"] = _compare(ref["names"], ref["expected"], _outputs(run()))
        except Exception as exc:  # noqa: BLE001
            res["error"] = "run: " + _error(exc)
    del obj, run
    gc.collect()
    return res


def warm_up(converters, folder: Path) -> None:
    """One untimed conversion of a tiny Conv + Relu graph per converter (lazy imports,
    first-call setup), so the timed conversions compare like with like."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                               helper.make_node("Relu", ["c"], ["y"], name="relu")], "warm_up",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w])
    path = folder / "_warm_up.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    ref = {"path": path, "feeds": {"x": np.ones((1, 1, 2, 2), np.float32)}, "names": ["y"],
           "entry": type("E", (), {"input_shapes": {}})()}
    for converter in converters:
        try:
            CONVERTERS[converter](ref)[1]()
        except Exception:  # noqa: BLE001 - a warm-up only
            pass


def whole_graph(name: str, folder: Path, columns) -> dict:
    """Every converter on graph ``name`` in this process."""
    _quiet()
    ref = reference(name, folder)
    row = {"graph": name, "tol": ref["tol"], "ort": ref["ort"]}
    # raw onnx2torch first: building a twin registers our converters in onnx2torch's
    # own registry (converters.ensure_converters), which would help the raw column
    for converter in sorted(columns, key=lambda c: c != "onnx2torch"):
        warm_up([converter], folder)
        row[converter] = measure(converter, ref)
        row["tol"] = row[converter].pop("tol", row["tol"])  # the twin's own tolerance when it builds
    row["rss_mb"] = peak_rss_mb()
    return row


def one_cell(name: str, folder: Path, converter: str | None, ort_basic: bool) -> dict:
    """ONNX Runtime alone (``converter`` None), or ONNX Runtime and one converter."""
    _quiet()
    if converter:
        warm_up([converter], folder)
    ref = reference(name, folder, ort_basic=ort_basic)
    res = measure(converter, ref) if converter else {}
    res.update({"ref_tol": ref["tol"], "rss_mb": peak_rss_mb()})
    return res


# ---------------------------------------------------------------- driver


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _subprocess(args: list[str], result: Path, timeout: float, max_rss_mb: float) -> dict:
    """Run this script with ``args``; its JSON result, or {"crash": why, "rss_mb": peak}."""
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, *args, "--result", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _rss_mb(proc.pid))
        if peak > max_rss_mb:
            killed = f"killed: resident memory passed {max_rss_mb:.0f} MB"
        elif time.perf_counter() - t0 > timeout:
            killed = f"killed: ran past {timeout:.0f} s"
        if killed:
            proc.kill()
            break
        time.sleep(0.1)
    _, err = proc.communicate()
    if not killed and proc.returncode == 0 and result.exists():
        return json.loads(result.read_text())
    if killed:
        why = killed
    elif proc.returncode < 0:
        why = f"process crashed (signal {-proc.returncode})"
    else:
        why = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return {"crash": why, "rss_mb": peak}


def run_graph(name: str, folder: Path, columns, timeout: float, max_rss_mb: float, *, isolate: bool = False) -> dict:
    """Graph ``name`` in one process; if it dies (or ``isolate``: heavy graphs, so one
    process holds one converter's copy of the weights), ONNX Runtime and each converter
    apart."""
    common = ["--folder", str(folder), "--columns", ",".join(columns)]
    peak = 0.0
    if not isolate:
        row = _subprocess(["--graph", name, *common], folder / "row.json", timeout, max_rss_mb)
        if "crash" not in row:
            return row
        print(f"{name}: {row['crash']}; again with one process per converter", file=sys.stderr, flush=True)
        peak = row["rss_mb"]
    ort_basic = []
    ref = _subprocess(["--cell", name, *common], folder / "cell.json", timeout, max_rss_mb)
    if "crash" in ref:  # ONNX Runtime itself: try its basic optimisation level
        peak = max(peak, ref["rss_mb"])
        ort_basic = ["--ort-basic"]
        ref = _subprocess(["--cell", name, *common, *ort_basic], folder / "cell.json", timeout, max_rss_mb)
    peak = max(peak, ref["rss_mb"])
    if "crash" in ref:
        return {"graph": name, "error": "ONNX Runtime: " + ref["crash"], "rss_mb": peak}
    row = {"graph": name, "tol": ref["ref_tol"], "ort": "basic" if ort_basic else "default",
           "rss_by": {"ONNX Runtime": ref["rss_mb"]}}
    for converter in columns:
        res = _subprocess(["--cell", name, "--converter", converter, *common, *ort_basic], folder / "cell.json",
                          timeout, max_rss_mb)
        row["rss_by"][HEADS[converter]] = res.get("rss_mb", 0.0)
        peak = max(peak, res.pop("rss_mb", 0.0))
        res.pop("ref_tol", None)
        if "crash" in res:
            res = {"error": "run: " + res["crash"], "seconds": None}
        row["tol"] = res.pop("tol", row["tol"])
        row[converter] = res
    row["rss_mb"] = peak
    return row


def _cell(res: dict | None, tol: float | None) -> str:
    if res is None:
        return "-"
    if "rel" in res:
        text = f"{res['rel']:.1e}"
        return text if passes(res, tol) else f"**{text}**"
    err = res["error"].replace("|", "/").replace("`", "'")
    return err if len(err) <= CELL_CHARS else err[:CELL_CHARS - 3] + "..."


def passes(res: dict | None, tol: float | None) -> bool:
    return bool(res and "rel" in res and tol is not None and res["rel"] <= tol)


def render(rows: list[dict], columns: tuple[str, ...]) -> None:
    head = ["graph", "tol"]
    for c in columns:
        head += [HEADS[c], "s"]
    head.append("peak RSS MB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        tol = r.get("tol")
        graph = r["graph"] + (" (ORT basic)" if r.get("ort") == "basic" else "")
        cells = [graph, f"{tol:g}" if tol is not None else "-"]
        for i, c in enumerate(columns):
            res = r.get(c)
            if res is None and i == 0 and r.get("error"):  # no reference: the row's error, once
                res = {"error": r["error"], "seconds": None}
            seconds = res.get("seconds") if res else None
            cells += [_cell(res, tol), f"{seconds:.2f}" if seconds is not None else "-"]
        cells.append(f"{r['rss_mb']:.0f}" if r.get("rss_mb") else "-")
        print("| " + " | ".join(cells) + " |")
    total = ["**with parity**", ""]
    for c in columns:
        total += [f"**{sum(passes(r.get(c), r.get('tol')) for r in rows)} / {len(rows)}**", ""]
    total.append("")
    print("| " + " | ".join(total) + " |")
    apart = [r for r in rows if r.get("rss_by")]
    if apart:  # graphs run one process per converter: each process's peak (each builds the graph and runs ORT first)
        keys = list(apart[0]["rss_by"])
        print("\nPeak RSS MB of each process (graphs run one process per converter; each process builds the "
              "graph and runs ONNX Runtime before converting):\n")
        print("| graph | " + " | ".join(keys) + " |")
        print("|" + "---|" * (len(keys) + 1))
        for r in apart:
            print(f"| {r['graph']} | " + " | ".join(f"{r['rss_by'].get(k, 0):.0f}" for k in keys) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="include the heavy graphs")
    ap.add_argument("--only", nargs="*", default=None, help="graph names (tests/corpus.py CORPUS)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process (default 600)")
    ap.add_argument("--max-rss-mb", type=float, default=4096.0, help="kill a process past this (default 4096)")
    for hidden in ("--graph", "--cell", "--converter", "--folder", "--columns", "--result"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ort-basic", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.graph or args.cell:
        folder = Path(args.folder)
        if args.graph:
            out = whole_graph(args.graph, folder, args.columns.split(","))
        else:
            out = one_cell(args.cell, folder, args.converter, args.ort_basic)
        Path(args.result).write_text(json.dumps(out))
        return
    import corpus

    unknown = [n for n in args.only or () if n not in corpus.CORPUS]
    if unknown:
        ap.error(f"not in tests/corpus.py CORPUS: {', '.join(unknown)}")
    names = args.only or [n for n, e in corpus.CORPUS.items() if args.all or not e.heavy]
    version = onnx2pytorch_version()
    columns = COLUMNS if version else COLUMNS[:2]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run_graph(name, Path(tmp), columns, args.timeout, args.max_rss_mb,
                                  isolate=corpus.CORPUS[name].heavy))
            print(f"{name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            for f in Path(tmp).iterdir():
                f.unlink()
    from importlib import metadata

    import onnxruntime

    print(f"onnx2torch {metadata.version('onnx2torch')}, onnxruntime {onnxruntime.__version__}, "
          + (f"onnx2pytorch {version}" if version else "onnx2pytorch not installed: its column is skipped "
             "(pip install -e \".[bench]\")") + "\n")
    render(rows, columns)


if __name__ == "__main__":
    main()
