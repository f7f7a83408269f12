"""The tool in a terminal and in a pipeline (issue 11): file modes, `edit -o` always
writes on success, progress on stderr only (and never with --quiet), --threads, the
plots, help texts and the parity line.

Real parts throughout: hand-built ONNX graphs (tests/graphs.py) and the badnets sample
on disk, the real CLI in subprocesses, onnx2torch and ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphs
from onnx_dynedit import io as dio
from onnx_dynedit import progress, threads

ROOT = Path(__file__).resolve().parent.parent
BADNETS = ROOT / "sample_models" / "badnets"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# words that only progress lines contain
PROGRESS_WORDS = ("torch twin (onnx2torch)", "parity (ONNX Runtime vs twin)")


def dynedit(*args, env_extra=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(progress.ENV_VAR, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)  # inherited by the subprocesses
    try:
        yield 0o027
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two folders' worth of inputs: the badnets sample (model, its pair, stats, and
    "same.npz": pairs that already behave, x~ = x) and conv_groups (a grouped conv that
    is mapped but refused, a 1x1 conv, a Gemm) with random pairs, for the locate plot."""
    folder = tmp_path_factory.mktemp("small")
    for name in ("model.onnx", "pairs.npz", "stats.npz"):
        (folder / name).write_bytes((BADNETS / name).read_bytes())
    clean = np.load(BADNETS / "pairs.npz")["clean"]
    np.savez(folder / "same.npz", corrupt=clean, clean=clean)
    onnx.save_model(graphs.conv_groups(), str(folder / "groups.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    y = x.copy()
    y[:, :, :2, :2] += 4.0
    np.savez(folder / "groups_pairs.npz", corrupt=y, clean=x)
    return folder


# a quick dynamic edit of badnets: closed-form u, no synthetic pairs, one edit
QUICK = ("--objective", "local", "--augment", "0", "--max-edits", "1")


# ------------------------------------------------------------------------ file modes


def test_new_files_get_0666_minus_umask_and_replaced_files_keep_their_mode(tmp_path, umask_027):
    new = tmp_path / "new.bin"
    dio.atomic_write_bytes(new, b"x")
    assert mode(new) == 0o640  # 0666 & ~027, not mkstemp's 0600
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    os.chmod(kept, 0o604)
    dio.atomic_write_bytes(kept, b"new")
    assert mode(kept) == 0o604 and kept.read_bytes() == b"new"


def test_in_place_keeps_the_input_mode_and_so_does_the_backup(tmp_path, umask_027):
    path = tmp_path / "m.onnx"
    onnx.save_model(graphs.gemm(), str(path))
    os.chmod(path, 0o644)
    loaded = dio.load_model(path)
    dio.save_model(loaded.model, path, protected=loaded.protected_paths(), in_place=True)
    assert mode(path) == 0o644
    assert mode(tmp_path / "m.onnx.bak") == 0o644


def test_a_run_short_only_of_the_gap_after_its_last_edit_hints_at_more_edits(small, tmp_path):
    """One edit allowed and a target it does not reach: the 20 pairs are classified right
    (gap 0.018 against 0.001), so the report hints at --max-edits; the default target,
    reached in that one edit: no hint."""
    args = ("edit", small / "model.onnx", "--pairs", BADNETS / "pairs20.npz", "--stats", small / "stats.npz", *QUICK)
    short = dynedit(*args, "--target-gap", "0.001", "-o", tmp_path / "short.onnx")
    assert short.returncode == 1, short.stderr
    assert "given pairs: 20/20 classified like their clean twin" in short.stdout
    assert "hint: every given pair is classified like its clean twin; only their gap is above the target after the " \
           "1 edit(s) --max-edits allows: a larger one (e.g. 3) may reach it" in short.stdout
    done = dynedit(*args, "-o", tmp_path / "done.onnx")
    assert done.returncode == 0 and "--max-edits allows" not in done.stdout, done.stdout


def test_a_failed_run_names_the_given_pairs_left_unfixed(small, tmp_path):
    """Rows 0 and 1 of the pairs hold the same triggered input with clean twins the shipped
    model puts in different classes: no model classifies both like their twins, so at
    least one stays unfixed whatever the edit. The report's ``unfixed_pairs`` and the
    FAILED line name those rows of the pairs file, and no other."""
    import onnxruntime as ort

    pairs = np.load(BADNETS / "pairs20.npz")
    sess = ort.InferenceSession(str(small / "model.onnx"), providers=["CPUExecutionProvider"])
    classes = sess.run(None, {sess.get_inputs()[0].name: pairs["clean"]})[0].argmax(1)
    other = int(np.flatnonzero(classes != classes[0])[0])
    np.savez(tmp_path / "clash.npz", corrupt=pairs["corrupt"][[0, 0]], clean=pairs["clean"][[0, other]])
    rep = tmp_path / "r.json"
    proc = dynedit("edit", small / "model.onnx", "--pairs", tmp_path / "clash.npz", "--stats", small / "stats.npz",
                   *QUICK, "-o", tmp_path / "o.onnx", "--report", rep)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(rep.read_text())
    unfixed = report["unfixed_pairs"]
    assert unfixed and set(unfixed) <= {0, 1} and len(unfixed) == 2 - report["real_fixed_after"]
    rows = ", ".join(map(str, unfixed))
    named = f"(pairs file row{'s' if len(unfixed) > 1 else ''} {rows}, counting from 0)"
    assert named in report["failure"]
    assert f"FAILED: target not reached within the edit and degradation budgets ({report['failure']})" in proc.stdout
    assert f"given pairs: {2 - len(unfixed)}/2 classified like their clean twin {named}" in proc.stdout


def test_cli_outputs_get_the_usual_mode(small, tmp_path, umask_027):
    out, rep, png = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "e.png"
    proc = dynedit("edit", small / "model.onnx", "--pairs", small / "pairs.npz", "--stats", small / "stats.npz",
                   *QUICK, "-o", out, "--report", rep, "--plot", png)
    assert proc.returncode in (0, 1), proc.stderr
    for p in (out, rep, png):
        assert mode(p) == 0o640, p
    assert png.read_bytes()[:8] == PNG_MAGIC and f"plot written to {png}" in proc.stdout
    report = json.loads(rep.read_text())  # an edit was made: every phase is timed
    assert report["output_unchanged"] is False and report["edits"]
    assert {"load", "twin_and_parity", "rectify", "write_back", "parity_after", "save", "plot", "total"} <= set(
        report["timings"])
    # revert --in-place keeps the edited model's mode
    os.chmod(out, 0o644)
    proc = dynedit("revert", out, "-o", out, "--in-place")
    assert proc.returncode == 0, proc.stderr
    assert mode(out) == 0o644


# --------------------------------------------------------------- edit -o on success


def test_edit_writes_the_unchanged_model_when_nothing_needs_changing(small, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = dynedit("-v", "edit", small / "model.onnx", "--pairs", small / "same.npz", "--criterion", "output",
                   "-o", out, "--report", rep)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr  # -v: our log lines, not converter warnings
    assert out.exists()
    assert onnx.load(str(out)) == onnx.load(str(small / "model.onnx"))
    assert "nothing to change" in proc.stderr
    assert "unchanged" in proc.stdout.splitlines()[-2] and proc.stdout.splitlines()[-1] == "PASSED"
    report = json.loads(rep.read_text())
    assert report["output_unchanged"] is True and report["output"] == str(out) and report["edits"] == []
    t = report["timings"]
    assert {"load", "twin_and_parity", "rectify", "save", "total"} <= set(t)
    assert t["total"] > 0 and t["twin_and_parity"] > 0


# ------------------------------------------------------------------------- progress


def test_progress_goes_to_stderr_never_stdout_and_quiet_turns_it_off(small, tmp_path):
    args = ["edit", small / "model.onnx", "--pairs", small / "pairs.npz", *QUICK, "-o", tmp_path / "o.onnx"]
    forced = {progress.ENV_VAR: "1"}
    on = dynedit(*args, env_extra=forced)
    assert on.returncode in (0, 1), on.stderr
    for word in PROGRESS_WORDS + ("round 1: key statistics", "round 1: localisation"):
        assert word in on.stderr, word
    assert not any(word in on.stdout for word in PROGRESS_WORDS) and "\r" not in on.stdout
    for quiet in (["edit", "--quiet"], ["--quiet", "edit"]):
        off = dynedit(*quiet, *args[1:], env_extra=forced)
        assert off.returncode == on.returncode
        assert not any(word in off.stderr for word in PROGRESS_WORDS), off.stderr
        assert off.stdout == on.stdout
    # not a terminal and not forced: nothing either (a pipeline's stderr stays clean)
    plain = dynedit(*args)
    assert not any(word in plain.stderr for word in PROGRESS_WORDS)


def test_progress_of_verify_and_inspect_and_the_parity_line(tmp_path):
    forced = {progress.ENV_VAR: "1"}
    model = BADNETS / "model.onnx"
    on = dynedit("verify", model, model, "--clean", BADNETS / "clean_test.npz", "--json", env_extra=forced)
    assert on.returncode == 0, on.stderr
    assert "verify (ONNX Runtime)" in on.stderr
    json.loads(on.stdout)  # stdout is JSON only
    off = dynedit("verify", model, model, "--clean", BADNETS / "clean_test.npz", "--quiet", env_extra=forced)
    assert off.returncode == 0 and "verify (ONNX Runtime)" not in off.stderr
    ins = dynedit("inspect", model, env_extra=forced)
    assert ins.returncode == 0 and "torch twin (onnx2torch)" in ins.stderr
    assert "onnx2torch" not in ins.stdout
    # the parity line says which figure the tolerance applies to
    line = next(l for l in ins.stdout.splitlines() if l.startswith("parity"))
    assert "max abs" in line and "tolerance 0.0001 x max(1, max|output|) = " in line
    assert "max rel" in line and line.endswith("within tolerance")
    assert ins.stdout.splitlines()[-1] == "PASSED"


def test_progress_is_silent_in_the_library_by_default(capsys):
    with progress.phase("a phase", total=3) as bar:
        bar.update()
    progress.step("a step")
    progress.end()
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    with progress.enabled(True):
        with progress.phase("shown", total=2) as bar:
            bar.update(2)
        progress.step("a step shown")
    out, err = capsys.readouterr()
    assert out == "" and "shown" in err and "a step shown" in err
    assert not progress.is_enabled()


# -------------------------------------------------------------------------- threads


def test_threads_option_sets_torch_and_onnxruntime(small):
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.configure(1) == 1
        assert torch.get_num_threads() == 1
        assert threads.session_options().intra_op_num_threads == 1
        assert threads.configure(None) == threads.default()
    finally:
        torch.set_num_threads(before)
        threads.reset()
    assert threads.current() is None and threads.session_options().intra_op_num_threads == 0


def test_threads_on_every_computing_command(small, tmp_path):
    model = small / "model.onnx"
    assert dynedit("inspect", model, "--threads", "1").returncode == 0
    assert dynedit("locate", small / "groups.onnx", "--pairs", small / "groups_pairs.npz", "--threads", "1").returncode == 0
    rep = tmp_path / "r.json"
    proc = dynedit("edit", model, "--pairs", small / "same.npz", "--criterion", "output", "-o", tmp_path / "o.onnx",
                   "--report", rep, "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rep.read_text())["threads"] == 2
    ver = dynedit("verify", BADNETS / "model.onnx", BADNETS / "model.onnx", "--clean", BADNETS / "clean_test.npz",
                  "--threads", "1")
    assert ver.returncode == 0, ver.stderr
    bad = dynedit("inspect", model, "--threads", "0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- plots


def test_locate_plot_names_refused_layers(small, tmp_path):
    from onnx_dynedit.api import locate_model
    from onnx_dynedit.plot import layer_bars
    from onnx_dynedit.twin import Twin

    png = tmp_path / "loc.png"
    outcome = locate_model(small / "groups.onnx", small / "groups_pairs.npz", plot=png, device="cpu")
    assert png.read_bytes()[:8] == PNG_MAGIC
    bars = layer_bars(outcome.localisation, Twin(dio.load_model(small / "groups.onnx"), "cpu").layer_map)
    refused = [b for b in bars if b.score is None]
    assert [b.node for b in refused] == ["gconv"] and "group" in refused[0].reason
    assert [b.node for b in bars] == ["gconv", "pconv", "fc"]  # graph order, nothing dropped


def test_plot_may_not_overwrite_another_output(small, tmp_path):
    out = tmp_path / "o.onnx"
    proc = dynedit("edit", small / "model.onnx", "--pairs", small / "pairs.npz", "-o", out, "--plot", out)
    assert proc.returncode == 2 and "same file" in proc.stderr and not out.exists()


# ------------------------------------------------------------------ help and wording


def test_help_texts():
    top = dynedit("--help")
    assert top.returncode == 0
    commands = top.stdout.split("Commands:")[1].strip().splitlines()
    from cli.main import _COMMANDS

    assert len(commands) == len(_COMMANDS) and not any(line.rstrip().endswith("...") for line in commands)
    assert all(line.rstrip().endswith(".") for line in commands)
    ins = dynedit("inspect", "--help").stdout
    assert "9223372036854775807" not in ins and "--int-range LOW HIGH" in ins
    for cmd in ("inspect", "locate", "edit", "verify", "diff", "revert"):
        text = dynedit(cmd, "--help").stdout
        assert "--quiet" in text, cmd
        assert ("--threads" in text) == (cmd in ("inspect", "locate", "edit", "verify")), cmd
