"""Safety contract of the `dynedit` CLI, on real files through the real CLI.

Every refused input must give: the right exit code (2 unusable input, 1 failed check),
exactly ONE non-empty line on stderr (``dynedit: error: ...``, no traceback), no output
file and no temporary file left in the output folder, and the input model (and its
external data) byte-for-byte unchanged.

Most cases run the CLI in-process (``cli.main.main``) under ``capfd``, which captures
file descriptors 1 and 2, so C++ libraries writing to stderr would be seen too; a few
run ``python -m cli.main`` in a subprocess to prove the real entry point.

Models: a TINY Gemm classifier built here (x [N, 4] -> logits [N, 3], with a planted
"trigger" on feature 3 so that a real edit succeeds in well under a second), the same
model saved with external data, and copies of ``sample_models/blend`` (external data)
with crafted external-data locations.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cli.main  # noqa: E402
from onnx_dynedit.errors import DynEditError, EditError  # noqa: E402

BLEND = REPO / "sample_models" / "blend"
FAST = ["--max-edits", "1", "--augment", "0"]


# ----------------------------------------------------------------------------- models


def tiny_model() -> onnx.ModelProto:
    """x [N, 4] -> Gemm(4->6) -> Relu -> Gemm(6->3): class k follows feature k, and a
    planted weight makes feature 3 (the trigger) push every input to class 2."""
    rng = np.random.default_rng(0)
    w1 = np.zeros((6, 4), np.float32)
    w1[:4, :4] = np.eye(4) * 2
    w1[4:] = rng.standard_normal((2, 4)) * 0.3
    w2 = np.zeros((3, 6), np.float32)
    w2[0, 0] = w2[1, 1] = w2[2, 2] = 1.0
    w2[2, 3] = 3.0  # the backdoor
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "W1"), (np.zeros(6, np.float32), "b1"), (w2, "W2"), (np.zeros(3, np.float32), "b2"))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "W2", "b2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="safety-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_arrays() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    n = 64
    y = rng.integers(0, 3, n)
    x = (np.abs(rng.standard_normal((n, 4))) * 0.3).astype(np.float32)
    x[np.arange(n), y] += 1.0
    x[:, 3] = 0.0
    clean = x[:8].copy()
    corrupt = clean.copy()
    corrupt[:, 3] = 2.0
    return {"pairs": {"corrupt": corrupt, "clean": clean}, "stats": {"x": x}, "val": {"x": x, "y": y}}


def save_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


@pytest.fixture()
def work(tmp_path):
    """A folder with the tiny model, its inputs, and an empty output folder."""
    d = tmp_path / "in"
    d.mkdir()
    onnx.save(tiny_model(), str(d / "model.onnx"))
    for name, arrays in tiny_arrays().items():
        save_npz(d / f"{name}.npz", **arrays)
    out = tmp_path / "out"
    out.mkdir()
    inputs = {p: sha(p) for p in d.iterdir()}
    w = {"dir": d, "model": d / "model.onnx", "pairs": d / "pairs.npz", "stats": d / "stats.npz",
         "val": d / "val.npz", "out": out, "in_place": False}
    yield w
    if not w["in_place"]:  # whatever the test did, the original inputs are byte-identical
        assert {p: sha(p) for p in inputs} == inputs


@pytest.fixture()
def tiny_external(tmp_path):
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(tiny_model(), str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return d / "model.onnx"


def blend_copy(folder: Path, *, with_data: bool = True, location: str | None = None) -> Path:
    """A copy of the blend sample model (external data) in ``folder``; ``location``
    rewrites every external-data location of the copy's proto."""
    folder.mkdir(parents=True, exist_ok=True)
    if location is None:
        shutil.copy(BLEND / "model.onnx", folder / "model.onnx")
    else:
        model = onnx.load(str(BLEND / "model.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        (folder / "model.onnx").write_bytes(model.SerializeToString())
    if with_data:
        shutil.copy(BLEND / "model.onnx.data", folder / "model.onnx.data")
    return folder / "model.onnx"


# ---------------------------------------------------------------------------- helpers


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(*paths: Path) -> dict[Path, str]:
    """Hashes of the given files (and, for an .onnx, every file beside it)."""
    out = {}
    for p in paths:
        p = Path(p)
        for f in (sorted(p.parent.iterdir()) if p.suffix == ".onnx" else [p]):
            if f.is_file():
                out[f] = sha(f)
    return out


def run(argv, capfd) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    try:
        cli.main.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err


def run_subprocess(argv, cwd=REPO) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "cli.main", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("dynedit: error: "), lines[0]
    return lines[0]


def assert_refused(result, code: int, *fragments: str, out_dir: Path | None = None, absent=(),
                   before: dict | None = None) -> str:
    got, _stdout, err = result
    assert got == code, f"exit {got}, expected {code}; stderr:\n{err}"
    line = one_line(err)
    for frag in fragments:
        assert frag in line, f"{frag!r} not in: {line}"
    if out_dir is not None:
        assert sorted(p.name for p in Path(out_dir).iterdir()) == [], "output folder is not empty"
    for p in absent:
        assert not Path(p).exists(), f"{p} was written"
    if before is not None:
        assert {p: sha(p) for p in before} == before, "an input file changed"
        for folder in {p.parent for p in before}:
            left = [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".bak"))]
            assert not left, f"left behind in the input folder: {left}"
    return line


def edit_argv(w, *, model=None, pairs=None, stats=None, val=None, out=None, extra=()):
    argv = ["edit", model or w["model"], "--pairs", pairs or w["pairs"]]
    if stats is not False:
        argv += ["--stats", stats or w["stats"]]
    if val:
        argv += ["--val", val]
    argv += ["-o", out or w["out"] / "fixed.onnx", *FAST, *extra]
    return argv


# ------------------------------------------------------------------- unusable models


@pytest.mark.parametrize("command", ["inspect", "edit", "locate", "revert", "diff", "verify"])
def test_not_onnx_file_every_command(work, capfd, command):
    bad = work["dir"] / "notes.onnx"
    bad.write_text("this is not an ONNX model\n")
    before = snapshot(bad, work["model"])
    out = work["out"] / "fixed.onnx"
    argv = {
        "inspect": ["inspect", bad],
        "edit": ["edit", bad, "--pairs", work["pairs"], "-o", out],
        "locate": ["locate", bad, "--pairs", work["pairs"], "--plot", work["out"] / "plot.png"],
        "revert": ["revert", bad, "-o", out],
        "diff": ["diff", bad, work["model"]],
        "verify": ["verify", bad, work["model"], "--clean", work["val"]],
    }[command]
    assert_refused(run(argv, capfd), 2, "notes.onnx", out_dir=work["out"], before=before)


def test_not_onnx_file_subprocess(work):
    bad = work["dir"] / "model.txt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    before = snapshot(bad)
    res = run_subprocess(["edit", bad, "--pairs", work["pairs"], "-o", work["out"] / "fixed.onnx"])
    assert_refused(res, 2, "model.txt", "not a readable ONNX model", out_dir=work["out"], before=before)


def test_truncated_model(work, capfd):
    data = work["model"].read_bytes()
    cut = work["dir"] / "cut.onnx"
    cut.write_bytes(data[: len(data) * 2 // 3])
    before = snapshot(cut)
    for argv in (edit_argv(work, model=cut), ["inspect", cut]):
        assert_refused(run(argv, capfd), 2, "cut.onnx", out_dir=work["out"], before=before)


def test_missing_external_data(tmp_path, work, capfd):
    model = blend_copy(tmp_path / "blend", with_data=False)
    before = snapshot(model)
    line = assert_refused(run(edit_argv(work, model=model, stats=False), capfd), 2, "model.onnx.data", "missing",
                          out_dir=work["out"], before=before)
    assert "copy it next to" in line


@pytest.mark.parametrize("location", ["../x", "/etc/passwd", "sub/../../x"])
def test_external_data_outside_the_model_folder(tmp_path, work, capfd, location):
    # a real data file where '../x' points, so that only the location itself is wrong
    shutil.copy(BLEND / "model.onnx.data", tmp_path / "x")
    model = blend_copy(tmp_path / "blend", location=location)
    before = snapshot(model, tmp_path / "x")
    for argv in (edit_argv(work, model=model, stats=False), ["inspect", model],
                 ["verify", model, BLEND / "model.onnx", "--clean", BLEND / "val.npz"]):
        assert_refused(run(argv, capfd), 2, "outside the model's folder", repr(location), out_dir=work["out"],
                       before=before)


def test_verify_from_python_runs_the_cli_file_checks(tmp_path):
    """``verify()`` called from Python refuses the same unsafe file as `dynedit verify`."""
    from onnx_dynedit.verify import verify

    shutil.copy(BLEND / "model.onnx.data", tmp_path / "x")
    model = blend_copy(tmp_path / "blend", location="../x")
    before = snapshot(model, tmp_path / "x")
    with pytest.raises(DynEditError, match="outside the model's folder") as info:
        verify(model, BLEND / "model.onnx", BLEND / "val.npz")
    assert info.value.exit_code == 2 and str(model) in info.value.one_line()
    with pytest.raises(DynEditError, match="outside the model's folder"):
        verify(BLEND / "model.onnx", model, BLEND / "val.npz")
    assert snapshot(model, tmp_path / "x") == before


def test_external_data_symlink_out_of_the_folder(tmp_path, work, capfd):
    shutil.copy(BLEND / "model.onnx.data", tmp_path / "elsewhere.data")
    model = blend_copy(tmp_path / "blend", with_data=False)
    (model.parent / "model.onnx.data").symlink_to(tmp_path / "elsewhere.data")
    assert_refused(run(["inspect", model], capfd), 2, "resolves outside the model's folder", out_dir=work["out"])


def test_absurd_tensor_dims(work, capfd):
    model = tiny_model()
    w = next(t for t in model.graph.initializer if t.name == "W1")
    del w.dims[:]
    w.dims.extend([1 << 40, 1 << 30])
    path = work["dir"] / "absurd.onnx"
    path.write_bytes(model.SerializeToString())
    before = snapshot(path)
    for argv in (edit_argv(work, model=path), ["inspect", path], ["verify", path, work["model"], "--clean", work["val"]]):
        assert_refused(run(argv, capfd), 2, "'W1'", "absurd shape", out_dir=work["out"], before=before)


def test_tensor_data_shorter_than_its_shape(work, capfd):
    model = tiny_model()
    w = next(t for t in model.graph.initializer if t.name == "W2")
    w.raw_data = w.raw_data[:-8]
    path = work["dir"] / "short.onnx"
    path.write_bytes(model.SerializeToString())
    for argv in (["inspect", path], ["verify", path, work["model"], "--clean", work["val"]]):
        assert_refused(run(argv, capfd), 2, "'W2'", "bytes of data", out_dir=work["out"])


def test_absurd_input_shape_and_constant_of_shape(work, capfd):
    model = tiny_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 40
    path = work["dir"] / "huge_input.onnx"
    path.write_bytes(model.SerializeToString())
    assert_refused(run(["inspect", path], capfd), 2, "graph input 'x'", "absurd shape")

    model = tiny_model()
    w2 = next(t for t in model.graph.initializer if t.name == "W2")
    model.graph.initializer.remove(w2)
    model.graph.initializer.append(numpy_helper.from_array(np.array([100000, 100000], np.int64), "w2_shape"))
    model.graph.node.insert(0, helper.make_node("ConstantOfShape", ["w2_shape"], ["W2"], name="fill",
                                                value=numpy_helper.from_array(np.array([0.1], np.float32))))
    path = work["dir"] / "huge_fill.onnx"
    path.write_bytes(model.SerializeToString())
    assert_refused(run(edit_argv(work, model=path), capfd), 2, "ConstantOfShape", "absurd shape",
                   out_dir=work["out"])


def test_model_with_nan_weights(work, capfd):
    model = tiny_model()
    w = next(t for t in model.graph.initializer if t.name == "W2")
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0] = np.nan
    w.CopyFrom(numpy_helper.from_array(arr, "W2"))
    path = work["dir"] / "nan.onnx"
    onnx.save(model, str(path))
    before = snapshot(path)
    assert_refused(run(edit_argv(work, model=path), capfd), 2, "'W2'", "NaN/Inf", out_dir=work["out"],
                   before=before)
    # inspect too: unusable input (exit 2), not a failed parity check (exit 1)
    assert_refused(run(["inspect", path], capfd), 2, "'W2'", "NaN/Inf", out_dir=work["out"], before=before)


# ------------------------------------------------------------------------ bad npz files


def test_pickled_object_array_is_refused_not_unpickled(work, tmp_path, capfd):
    marker = tmp_path / "UNPICKLED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = work["dir"] / "evil.npz"
    save_npz(bad, corrupt=np.array([Evil(), Evil()], dtype=object), clean=np.zeros((2, 4), np.float32))
    before = snapshot(bad, work["model"])
    assert_refused(run(edit_argv(work, pairs=bad), capfd), 2, "evil.npz", "'corrupt'", "Python objects",
                   out_dir=work["out"], before=before)
    assert not marker.exists(), "the pickle was executed"
    # and for verify (numpy-only path) too
    bad2 = work["dir"] / "evil_clean.npz"
    save_npz(bad2, x=np.array([Evil()], dtype=object))
    assert_refused(run(["verify", work["model"], work["model"], "--clean", bad2], capfd), 2, "Python objects")
    assert not marker.exists()


def test_wrong_npz_keys_lists_keys_found(work, capfd):
    bad = save_npz(work["dir"] / "keys.npz", triggered=np.zeros((2, 4), np.float32), fixed=np.zeros((2, 4), np.float32))
    line = assert_refused(run(edit_argv(work, pairs=bad), capfd), 2, "keys.npz", "'corrupt'", out_dir=work["out"])
    assert "found: triggered, fixed" in line
    assert "corrupt, clean" in line  # what was expected


def test_not_an_npz(work, capfd):
    bad = work["dir"] / "pairs.csv.npz"
    bad.write_text("1,2,3\n")
    assert_refused(run(edit_argv(work, pairs=bad), capfd), 2, "is not an .npz archive", out_dir=work["out"])


def test_npy_header_declaring_a_huge_shape(work, capfd):
    """The .npy header inside the npz claims 2^40 rows: refused before allocating."""
    import io
    import struct
    import zipfile

    raw = io.BytesIO()
    np.save(raw, np.zeros((8, 4), np.float32))
    data = raw.getvalue()
    hlen = struct.unpack("<H", data[8:10])[0]
    header = data[10:10 + hlen].decode("latin1").replace("(8, 4)", "(1099511627776, 4)")
    header = header.rstrip("\n").rstrip() + " " * 8
    header += " " * ((-(10 + len(header) + 1)) % 64) + "\n"
    tampered = data[:8] + struct.pack("<H", len(header)) + header.encode("latin1") + data[10 + hlen:]
    bad = work["dir"] / "huge.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("x.npy", tampered)
    assert_refused(run(edit_argv(work, stats=bad), capfd), 2, "huge.npz", "absurd shape", out_dir=work["out"])


def test_pairs_shape_mismatch_vs_model_input(work, capfd):
    bad = save_npz(work["dir"] / "shape.npz", corrupt=np.zeros((4, 5), np.float32), clean=np.zeros((4, 5), np.float32))
    assert_refused(run(edit_argv(work, pairs=bad), capfd), 2, "shape.npz", "(4, 5)", "'x'", "[N, 4]",
                   out_dir=work["out"])


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool", "complex64"])
def test_pairs_dtype_mismatch_refused(work, capfd, dtype):
    arrays = {k: v.astype(dtype) for k, v in tiny_arrays()["pairs"].items()}
    bad = save_npz(work["dir"] / "dtype.npz", **arrays)
    assert_refused(run(edit_argv(work, pairs=bad), capfd), 2, "dtype.npz", dtype, "float32", out_dir=work["out"])


def test_float64_pairs_are_cast_silently(work, capfd):
    arrays = {k: v.astype(np.float64) for k, v in tiny_arrays()["pairs"].items()}
    ok = save_npz(work["dir"] / "f64.npz", **arrays)
    code, _out, err = run(edit_argv(work, pairs=ok), capfd)
    assert code == 0, err
    assert (work["out"] / "fixed.onnx").exists()


def test_float64_values_too_large_for_float32(work, capfd):
    arrays = {k: v.astype(np.float64) for k, v in tiny_arrays()["pairs"].items()}
    arrays["corrupt"][0, 0] = 1e300
    bad = save_npz(work["dir"] / "big.npz", **arrays)
    assert_refused(run(edit_argv(work, pairs=bad), capfd), 2, "too large", out_dir=work["out"])


def test_corrupt_clean_count_mismatch(work, capfd):
    p = tiny_arrays()["pairs"]
    bad = save_npz(work["dir"] / "count.npz", corrupt=p["corrupt"], clean=p["clean"][:5])
    assert_refused(run(edit_argv(work, pairs=bad), capfd), 2, "8 rows in 'corrupt' but 5 in 'clean'",
                   out_dir=work["out"])


@pytest.mark.parametrize("which", ["pairs", "stats"])
def test_empty_arrays(work, capfd, which):
    if which == "pairs":
        bad = save_npz(work["dir"] / "empty.npz", corrupt=np.zeros((0, 4), np.float32), clean=np.zeros((0, 4), np.float32))
        argv = edit_argv(work, pairs=bad)
    else:
        bad = save_npz(work["dir"] / "empty.npz", x=np.zeros((0, 4), np.float32))
        argv = edit_argv(work, stats=bad)
    assert_refused(run(argv, capfd), 2, "empty.npz", "is empty", out_dir=work["out"])


@pytest.mark.parametrize("which,value", [("pairs", np.nan), ("pairs", np.inf), ("stats", np.nan), ("val", -np.inf)])
def test_non_finite_inputs_are_reported(work, capfd, which, value):
    arrays = tiny_arrays()[which]
    key = "corrupt" if which == "pairs" else "x"
    arrays[key] = arrays[key].copy()
    arrays[key][1, 2] = value
    bad = save_npz(work["dir"] / f"nf_{which}.npz", **arrays)
    argv = edit_argv(work, **{which: bad})
    assert_refused(run(argv, capfd), 2, f"nf_{which}.npz", f"'{key}'", "NaN/Inf", out_dir=work["out"],
                   before=snapshot(work["model"]))


def test_labels_out_of_range_in_val(work, capfd):
    v = tiny_arrays()["val"]
    y = v["y"].copy()
    y[3] = 7
    bad = save_npz(work["dir"] / "val_bad.npz", x=v["x"], y=y)
    assert_refused(run(edit_argv(work, val=bad), capfd), 2, "val_bad.npz", "'y'", "[0, 2]", "0..7",
                   out_dir=work["out"])
    # and in verify (ONNX Runtime only)
    assert_refused(run(["verify", work["model"], work["model"], "--clean", bad], capfd), 2, "val_bad.npz", "[0, 2]")


def test_unknown_layer_lists_close_matches(work, capfd):
    line = assert_refused(run(edit_argv(work, extra=["--layer", "fc3"]), capfd), 2, "'fc3'", "close matches",
                          out_dir=work["out"], before=snapshot(work["model"]))
    assert "fc1" in line and "fc2" in line


def test_usage_error_is_one_line(work, capfd):
    assert_refused(run(["edit", work["model"], "-o", work["out"] / "x.onnx"], capfd), 2, "--pairs",
                   out_dir=work["out"])
    assert_refused(run(["no-such-command"], capfd), 2, "no-such-command")


# ------------------------------------------------------------------------ outputs


def test_output_equal_to_input_refused_without_in_place(work, capfd):
    before = snapshot(work["model"], work["pairs"])
    line = assert_refused(run(edit_argv(work, out=work["model"]), capfd), 2, "refusing to overwrite", before=before)
    assert "--in-place" in line
    assert not any(p.name.endswith((".tmp", ".bak")) for p in work["dir"].iterdir())
    # the same file under another spelling
    alias = work["dir"] / ".." / "in" / "model.onnx"
    assert_refused(run(edit_argv(work, out=alias), capfd), 2, "refusing to overwrite", before=before)
    # the report and the plot must not replace the input either, nor an npz input
    assert_refused(run(edit_argv(work, extra=["--report", work["model"]]), capfd), 2, "refusing to overwrite",
                   out_dir=work["out"], before=before)
    assert_refused(run(edit_argv(work, out=work["pairs"]), capfd), 2, "refusing to overwrite", before=before)
    assert_refused(run(["locate", work["model"], "--pairs", work["pairs"], "--plot", work["model"]], capfd), 2,
                   "refusing to overwrite", before=before)


def test_output_equal_to_external_data_refused(tiny_external, work, capfd):
    before = snapshot(tiny_external)
    data = tiny_external.parent / "model.onnx.data"
    for extra in ([], ["--in-place"]):  # --in-place is for the model file, never for its data
        assert_refused(run(edit_argv(work, model=tiny_external, out=data, extra=extra), capfd), 2,
                       "refusing to overwrite", "external data", before=before)  # --in-place is for the model file, never for its data


def test_in_place_keeps_a_byte_identical_backup(work, capfd):
    work["in_place"] = True
    original = work["model"].read_bytes()
    code, out, err = run(edit_argv(work, out=work["model"], extra=["--in-place"]), capfd)
    assert code == 0, err
    assert err.strip() == ""
    backup = work["dir"] / "model.onnx.bak"
    assert backup.read_bytes() == original
    assert work["model"].read_bytes() != original
    onnx.checker.check_model(onnx.load(str(work["model"])))
    assert not [p for p in work["dir"].iterdir() if p.name.endswith(".tmp")]
    # a second in-place write (here: revert) never overwrites the first backup
    edited = work["model"].read_bytes()
    code, _out, err = run(["revert", work["model"], "-o", work["model"], "--in-place"], capfd)
    assert code == 0, err
    assert backup.read_bytes() == original
    assert (work["dir"] / "model.onnx.bak.1").read_bytes() == edited
    assert work["model"].read_bytes() == original


def test_in_place_with_external_data(tiny_external, work, capfd):
    folder = tiny_external.parent
    before = snapshot(tiny_external)
    code, _out, err = run(edit_argv(work, model=tiny_external, out=tiny_external, extra=["--in-place"]), capfd)
    assert code == 0, err
    # the original data file is untouched, and the backup still loads with it
    assert sha(folder / "model.onnx.data") == before[folder / "model.onnx.data"]
    assert sha(folder / "model.onnx.bak") == before[folder / "model.onnx"]
    onnx.checker.check_model(onnx.load(str(folder / "model.onnx")))
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_revert_output_equal_to_input_refused(work, capfd):
    edited = work["out"] / "fixed.onnx"
    assert run(edit_argv(work), capfd)[0] == 0
    before = snapshot(edited)
    assert_refused(run(["revert", edited, "-o", edited], capfd), 2, "refusing to overwrite", before=before)
    assert sorted(p.name for p in work["out"].iterdir()) == ["fixed.onnx"]
    code, _out, err = run(["revert", edited, "-o", edited, "--in-place"], capfd)
    assert code == 0, err
    assert sha(work["out"] / "fixed.onnx.bak") == before[edited]
    assert edited.read_bytes() == work["model"].read_bytes()  # bit-for-bit original


def test_revert_of_unedited_model(work, capfd):
    assert_refused(run(["revert", work["model"], "-o", work["out"] / "r.onnx"], capfd), 2, "edit record",
                   out_dir=work["out"], before=snapshot(work["model"]))


def test_output_folder_missing(work, capfd):
    assert_refused(run(edit_argv(work, out=work["out"] / "nope" / "x.onnx"), capfd), 2, "does not exist",
                   out_dir=work["out"])


# ------------------------------------------------------------------------ non-finite edit


def test_edit_that_would_make_non_finite_weights_is_refused(work):
    from onnx_dynedit.io import load_model, save_model
    from onnx_dynedit.layers import build_layer_map
    from onnx_dynedit.writeback import LayerUpdate, write_back

    loaded = load_model(work["model"])
    layer = build_layer_map(loaded.model).get("fc2")
    out = work["out"] / "fixed.onnx"
    for u_value in (np.inf, np.nan, 1e30):
        u = np.full(layer.out_features, u_value)
        d = np.full(layer.in_features, 1e30)
        with pytest.raises(EditError, match="non-finite"), np.errstate(over="ignore", invalid="ignore"):
            new = write_back(loaded, [LayerUpdate(layer=layer, factors=((u, d),))])
            save_model(new, out, protected=loaded.protected_paths())  # never reached
        assert sorted(work["out"].iterdir()) == []
    assert EditError.exit_code == 1 and issubclass(EditError, DynEditError)


# --------------------------------------------------------------------- errors and bugs


def test_debug_shows_the_traceback_of_a_user_error(work):
    bad = work["dir"] / "bad.onnx"
    bad.write_text("nope")
    code, _out, err = run_subprocess(["--debug", "inspect", bad])
    assert code == 2
    assert "Traceback" in err and "ModelLoadError" in err
    assert err.strip().splitlines()[-1].startswith("dynedit: error: ")
    code, _out, err = run_subprocess(["inspect", bad])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_internal_bug_keeps_its_traceback(work, capfd, monkeypatch):
    import onnx_dynedit.api as api

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a genuine bug")

    monkeypatch.setattr(api, "read_inputs", broken)
    code, _out, err = run(edit_argv(work), capfd)
    assert code == 3  # neither 1 (failed check) nor 2 (bad input)
    assert "Traceback" in err and "ZeroDivisionError: a genuine bug" in err
    assert "internal error" in err
    assert sorted(work["out"].iterdir()) == []


# ------------------------------------------------------------------------- determinism


def test_two_runs_of_the_same_edit_are_byte_identical(work, tiny_external, capfd):
    a, b = work["out"] / "a.onnx", work["out"] / "b.onnx"
    full = ["--max-edits", "2"]  # augmentation and output-fitted u on: the seeded, stochastic path
    for out in (a, b):
        argv = ["edit", work["model"], "--pairs", work["pairs"], "--stats", work["stats"], "--val", work["val"],
                "-o", out, *full]
        code, _o, err = run(argv, capfd)
        assert code == 0, err
    assert a.read_bytes() == b.read_bytes()
    # with external data: the model and its data file are identical too
    outs = [work["out"] / "ext1" / "model.onnx", work["out"] / "ext2" / "model.onnx"]
    for out in outs:
        out.parent.mkdir()
        code, _o, err = run(edit_argv(work, model=tiny_external, out=out), capfd)
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()
    data = [sorted(p.name for p in o.parent.iterdir()) for o in outs]
    assert data[0] == data[1] and len(data[0]) == 2, data
    assert all((o.parent / data[0][1]).read_bytes() == (outs[0].parent / data[0][1]).read_bytes() for o in outs)


def test_fixed_batch_model_is_edited_and_checked_in_chunks(work, capfd):
    """A model exported with batch 1 (common) gets its after-edit ORT parity on 1-row
    chunks instead of failing on a 16-row batch."""
    model = tiny_model()
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].ClearField("dim_param")
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    path = work["dir"] / "batch1.onnx"
    onnx.save(model, str(path))
    code, out, err = run(edit_argv(work, model=path), capfd)
    assert code == 0, err
    assert "written-model parity" in out and (work["out"] / "fixed.onnx").exists()
