"""ONNX -> torch converters side by side on the coverage corpus (issue 9, item 1).

For every graph of tests/corpus.py (saved to a temporary folder and loaded back), the same
seeded inputs go through ONNX Runtime and through three torch conversions:

  onnx2torch raw   ``onnx2torch.convert`` on the unmodified ModelProto (graphs that list
                   initializers as inputs, IR 3, get those values as arguments, as ONNX
                   Runtime takes them by default)
  dynedit twin     ``onnx_dynedit.twin.Twin(onnx_dynedit.io.load_model(path))``: the
                   normalised copy (unique names, Constant weights as initializers, IR 3
                   inputs dropped, fp16 -> fp32, dequantised constants folded ...)
                   converted by onnx2torch with our converters registered
  onnx2pytorch     onnx2pytorch 0.6.0 ``ConvertModel(model, experimental=True)`` (the
                   column is skipped, with a note, when onnx2pytorch is not installed:
                   ``pip install -e ".[bench]"``)

A cell is the max relative difference to ONNX Runtime over all outputs (max |ORT - torch|
/ max(1, max |ORT output|), as ``check_parity`` measures it), in bold when it is above the
graph's tolerance (the twin's own: 1e-5 float32, 1e-2 float16, 5e-2 quantised
activations), or the first line of the error (``convert:`` or ``run:``, shortened). The
``s`` columns are seconds to convert (for the twin: load checks + normalisation +
conversion + layer map). Inputs: batch 2, seed 0, integer ids in [0, 50), attention masks
all ones, the corpus's ``input_shapes`` for symbolic sizes.

Each graph is built in one subprocess and each converter runs in its own (a crash fills one
cell, not the table); a process is killed if its resident memory passes --max-rss-mb
(default 4096) or it runs past --timeout seconds. ``peak RSS MB`` is the largest of the
graph's processes (build + ONNX Runtime, or one converter).

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


# ---------------------------------------------------------------- one graph (subprocess)


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


def feeds_for(model, entry) -> dict:
    """Seeded inputs from the graph's own inputs (batch 2, the corpus's sizes)."""
    import numpy as np

    from onnx_dynedit.twin import input_specs, random_inputs

    specs = input_specs(model)
    feeds = random_inputs(specs, batch=BATCH, seed=SEED, int_range=INT_RANGE, shapes=entry.input_shapes or None,
                          label=entry.name)
    for spec in specs:  # as corpus.sample_inputs: attention masks keep every token
        if not np.issubdtype(spec.dtype, np.floating) and "mask" in spec.name:
            feeds[spec.name] = np.ones_like(feeds[spec.name])
    return feeds


def graph_tolerance(model) -> float:
    """The twin's tolerance for a graph it could not build (same rule as Twin.tol)."""
    from onnx import TensorProto

    from onnx_dynedit.twin import FP16_TOL, FP32_TOL, QUANT_TOL

    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return QUANT_TOL
    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    halves += [v for v in model.graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT16]
    return FP16_TOL if halves else FP32_TOL


def _outputs(got) -> list:
    import torch

    if isinstance(got, torch.Tensor):
        got = [got]
    return [g.detach().double().cpu().numpy() for g in got]


def _compare(names, expected, got) -> float:
    import numpy as np

    from onnx_dynedit.twin import compare_outputs

    if len(got) != len(expected):
        raise ValueError(f"{len(got)} outputs, ONNX Runtime gives {len(expected)}")
    for ref, val in zip(expected, got):
        if np.asarray(ref).size != np.asarray(val).size:
            raise ValueError(f"output of shape {list(np.shape(val))}, ONNX Runtime's is {list(np.shape(ref))}")
    rel = max((o.max_rel_diff for o in compare_outputs(names, expected, got)), default=0.0)
    return rel if np.isfinite(rel) else float("inf")


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def run_onnx2torch(model, feeds, names, expected) -> dict:
    import torch
    from onnx import numpy_helper
    from onnx2torch import convert

    t0 = time.perf_counter()
    try:
        module = convert(_copy(model))
    except Exception as exc:  # noqa: BLE001 - any converter failure is a measurement
        return {"error": "convert: " + first_line(exc), "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    inits = {t.name: t for t in model.graph.initializer}
    args = [torch.from_numpy(feeds[vi.name]) if vi.name in feeds else torch.from_numpy(numpy_helper.to_array(inits[vi.name]).copy())
            for vi in model.graph.input]
    try:
        with torch.no_grad():
            rel = _compare(names, expected, _outputs(module.eval()(*args)))
    except Exception as exc:  # noqa: BLE001
        return {"error": "run: " + first_line(exc), "seconds": seconds}
    return {"rel": rel, "seconds": seconds}


def run_twin(path, entry, feeds) -> dict:
    from onnx_dynedit.errors import DynEditError
    from onnx_dynedit.io import load_model
    from onnx_dynedit.twin import Twin, check_parity

    t0 = time.perf_counter()
    try:
        twin = Twin(load_model(path), "cpu", input_shapes=entry.input_shapes or None)
    except DynEditError as exc:
        return {"error": "convert: " + exc.one_line(), "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - a bug in ours is a measurement too
        return {"error": "convert: " + first_line(exc), "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    try:
        parity = check_parity(twin, feeds)
    except DynEditError as exc:
        return {"error": "run: " + exc.one_line(), "seconds": seconds, "tol": twin.tol}
    except Exception as exc:  # noqa: BLE001
        return {"error": "run: " + first_line(exc), "seconds": seconds, "tol": twin.tol}
    return {"rel": parity.max_rel_diff, "seconds": seconds, "tol": twin.tol}


def run_onnx2pytorch(model, feeds, names, expected) -> dict:
    import torch
    from onnx2pytorch import ConvertModel

    t0 = time.perf_counter()
    try:
        module = ConvertModel(_copy(model), experimental=True)
    except Exception as exc:  # noqa: BLE001
        return {"error": "convert: " + first_line(exc), "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    try:
        with torch.no_grad():
            got = module.eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        rel = _compare(names, expected, _outputs(got))
    except Exception as exc:  # noqa: BLE001
        return {"error": "run: " + first_line(exc), "seconds": seconds}
    return {"rel": rel, "seconds": seconds}


def _quiet() -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


def prepare(name: str, folder: Path) -> dict:
    """Build graph ``name``, save it, and keep the seeded inputs and ONNX Runtime's outputs."""
    import numpy as np
    import onnx

    import corpus
    from onnx_dynedit.twin import ort_session_for

    _quiet()
    entry = corpus.CORPUS[name]
    path = folder / f"{name}.onnx"
    model = entry.build()
    onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > (1 << 30))
    model = onnx.load(str(path))
    feeds = feeds_for(model, entry)
    session = ort_session_for(model)
    names = [o.name for o in session.get_outputs()]
    expected = session.run(None, feeds)
    np.savez(folder / f"{name}_io.npz", **{f"in{i}": v for i, v in enumerate(feeds.values())},
             **{f"out{i}": v for i, v in enumerate(expected)})
    return {"graph": name, "inputs": list(feeds), "outputs": names, "tol": graph_tolerance(model),
            "rss_mb": peak_rss_mb()}


def cell(name: str, converter: str, folder: Path, meta: dict) -> dict:
    """One converter on graph ``name`` (prepared in ``folder``)."""
    import contextlib
    import io

    import numpy as np
    import onnx

    import corpus

    _quiet()
    path = folder / f"{name}.onnx"
    with np.load(folder / f"{name}_io.npz") as io_arrays:
        feeds = {k: io_arrays[f"in{i}"] for i, k in enumerate(meta["inputs"])}
        expected = [io_arrays[f"out{i}"] for i in range(len(meta["outputs"]))]
    with contextlib.redirect_stdout(io.StringIO()):  # converters that print
        if converter == "twin":
            res = run_twin(path, corpus.CORPUS[name], feeds)
        else:
            model = onnx.load(str(path))  # the unmodified ModelProto
            run = run_onnx2torch if converter == "onnx2torch" else run_onnx2pytorch
            res = run(model, feeds, meta["outputs"], expected)
    res["rss_mb"] = peak_rss_mb()
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
    """Run this script with ``args``; its JSON result, or {"error": why, "rss_mb": peak}."""
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
    return {"error": why, "rss_mb": peak, "seconds": None}


def run_graph(name: str, folder: Path, columns, timeout: float, max_rss_mb: float) -> dict:
    """Prepare graph ``name`` in one process, then each converter in its own process."""
    meta_path = folder / f"{name}_meta.json"
    meta = _subprocess(["--prepare", name, "--folder", str(folder)], meta_path, timeout, max_rss_mb)
    row = {"graph": name, "tol": meta.get("tol"), "rss_mb": meta.get("rss_mb")}
    if "error" in meta:
        row["error"] = "prepare: " + meta["error"]
        return row
    for converter in columns:
        res = _subprocess(["--cell", name, "--converter", converter, "--folder", str(folder), "--meta", str(meta_path)],
                          folder / f"{name}_{converter}.json", timeout, max_rss_mb)
        if "error" in res and not res["error"].startswith(("convert:", "run:")):
            res["error"] = "run: " + res["error"]
        row["tol"] = res.pop("tol", row["tol"])  # the twin's own tolerance when it builds
        row["rss_mb"] = max(row["rss_mb"] or 0.0, res.pop("rss_mb", 0.0) or 0.0)
        row[converter] = res
    return row


def _cell(res: dict | None, tol: float | None) -> str:
    if res is None:
        return "-"
    if "rel" in res:
        text = f"{res['rel']:.1e}"
        return text if tol is not None and res["rel"] <= tol else f"**{text}**"
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
        cells = [r["graph"], f"{tol:g}" if tol is not None else "-"]
        for i, c in enumerate(columns):
            res = r.get(c)
            if res is None and i == 0 and r.get("error"):  # the graph's process failed
                res = {"error": r["error"], "seconds": None}
            cells += [_cell(res, tol), f"{res['seconds']:.2f}" if res and res["seconds"] is not None else "-"]
        cells.append(f"{r['rss_mb']:.0f}" if r.get("rss_mb") else "-")
        print("| " + " | ".join(cells) + " |")
    total = ["**with parity**", ""]
    for c in columns:
        total += [f"**{sum(passes(r.get(c), r.get('tol')) for r in rows)} / {len(rows)}**", ""]
    total.append("")
    print("| " + " | ".join(total) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="include the heavy graphs")
    ap.add_argument("--only", nargs="*", default=None, help="graph names (tests/corpus.py CORPUS)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per graph (default 600)")
    ap.add_argument("--max-rss-mb", type=float, default=4096.0, help="kill a graph's process past this (default 4096)")
    for hidden in ("--prepare", "--cell", "--converter", "--folder", "--meta", "--result"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        Path(args.result).write_text(json.dumps(prepare(args.prepare, Path(args.folder))))
        return
    if args.cell:
        meta = json.loads(Path(args.meta).read_text())
        Path(args.result).write_text(json.dumps(cell(args.cell, args.converter, Path(args.folder), meta)))
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
            rows.append(run_graph(name, Path(tmp), columns, args.timeout, args.max_rss_mb))
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
