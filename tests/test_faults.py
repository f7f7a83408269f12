"""Fault injection on saving: an interrupted save never loses or corrupts a file.

Outputs are written to a hidden temporary file in the target's folder, fsynced, then
renamed over the target; external data goes first, to a file named after its content
hash, so the old model keeps pointing at its old data until the new model is in place.

Two kinds of faults, both while saving over an EXISTING target (and over a fresh one):
  - an error (``os.replace`` or ``os.fsync`` raising, as on a full disk): the CLI exits 2
    with one line, the target holds the complete previous file (byte-identical) or
    nothing, and no temporary file is left;
  - a hard kill (``os._exit`` in the middle of writing, after half the bytes, in a real
    subprocess running the real CLI): the target holds the complete previous file or
    nothing; what is left is only a hidden ``.<name>.*.tmp`` file (or a complete,
    unreferenced content-hashed data file) that never replaced the target.
Covered for single-file models, models with external data (a kill while writing the
data file and while writing the model file), the --in-place backup, edit and revert.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cli.main  # noqa: E402
from onnx_dynedit.io import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_safety import FAST, save_npz, tiny_arrays, tiny_model  # noqa: E402

KILLED = 97  # exit status of the injected hard kill


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def run(argv, capfd):
    capfd.readouterr()
    try:
        cli.main.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture()
def setup(tmp_path, capfd):
    """Tiny model (inline and with external data), its edited versions, an output
    folder holding an EXISTING target for each."""
    d = tmp_path / "in"
    d.mkdir()
    onnx.save(tiny_model(), str(d / "model.onnx"))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(tiny_model(), str(ext / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    for name, arrays in tiny_arrays().items():
        save_npz(d / f"{name}.npz", **arrays)
    edited = tmp_path / "edited"
    edited.mkdir()
    for src, dst in ((d / "model.onnx", edited / "inline.onnx"), (ext / "model.onnx", edited / "ext.onnx")):
        code, _o, err = run(["edit", src, "--pairs", d / "pairs.npz", "--stats", d / "stats.npz", "-o", dst, *FAST],
                            capfd)
        assert code == 0, err
    out = tmp_path / "out"
    out.mkdir()
    return {"model": d / "model.onnx", "ext": ext / "model.onnx", "pairs": d / "pairs.npz", "stats": d / "stats.npz",
            "edited": edited / "inline.onnx", "edited_ext": edited / "ext.onnx", "out": out, "in": d}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dynedit: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------ errors (in-process)


def _failing(real, *, fail_on_call: int = 1, error=errno.ENOSPC):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("fault", ["replace", "fsync"])
@pytest.mark.parametrize("existing", [True, False])
def test_error_while_saving_keeps_the_old_file(setup, capfd, monkeypatch, fault, existing):
    target = setup["out"] / "restored.onnx"
    if existing:
        target.write_bytes(setup["edited"].read_bytes())  # a previous version of the target
    before = listing(setup["out"])
    monkeypatch.setattr(os, fault, _failing(getattr(os, fault)))
    code, _out, err = run(["revert", setup["edited"], "-o", target], capfd)
    monkeypatch.undo()
    assert code == 2
    line = one_error_line(err)
    assert str(target) in line and "No space left on device" in line
    assert listing(setup["out"]) == before  # old file byte-identical (or still absent), no temp file


@pytest.mark.parametrize("fail_on_call", [1, 2])  # 1: the data file's rename, 2: the model's rename
def test_error_while_saving_external_data(setup, capfd, monkeypatch, fail_on_call):
    target = setup["out"] / "restored.onnx"
    code, _o, err = run(["revert", setup["edited_ext"], "-o", target], capfd)  # an existing target + its data
    assert code == 0, err
    before = listing(setup["out"])
    assert len(before) == 2
    monkeypatch.setattr(os, "replace", _failing(os.replace, fail_on_call=fail_on_call))
    code, _o, err = run(["edit", setup["ext"], "--pairs", setup["pairs"], "-o", target, *FAST], capfd)
    monkeypatch.undo()
    assert code == 2, err
    one_error_line(err)
    assert listing(setup["out"]) == before  # no temp file, no orphan data file, old model + data intact
    assert load_model(target).sha256 == load_model(setup["ext"]).sha256  # the old target still loads whole


@pytest.mark.parametrize("model_key", ["model", "ext"])
def test_written_model_failing_parity_leaves_nothing(setup, capfd, monkeypatch, model_key):
    """The written file is checked with ONNX Runtime before it is put at the target: when
    its weights are not the twin's edit (here: the changed initializer doubled as it is
    written), edit exits 1 naming the edited model, the old target is intact, and no
    staged file or orphan data file is left."""
    from onnx import numpy_helper

    import onnx_dynedit.writeback as writeback

    real = writeback.write_back

    def doubled(loaded, updates, **kwargs):
        model = real(loaded, updates, **kwargs)
        for init in model.graph.initializer:
            if init.name == updates[0].layer.initializer:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
        return model

    target = setup["out"] / "fixed.onnx"
    target.write_bytes(setup["edited"].read_bytes())  # a previous version of the target
    before = listing(setup["out"])
    monkeypatch.setattr(writeback, "write_back", doubled)
    code, _o, err = run(["edit", setup[model_key], "--pairs", setup["pairs"], "--stats", setup["stats"],
                         "-o", target, *FAST], capfd)
    monkeypatch.undo()
    assert code == 1, err
    line = one_error_line(err)
    assert "(edited)" in line and "differs from ONNX Runtime" in line
    assert listing(setup["out"]) == before


def test_error_while_writing_the_in_place_backup(setup, capfd, monkeypatch):
    model = setup["edited"]
    before = listing(model.parent)
    monkeypatch.setattr(os, "fsync", _failing(os.fsync))
    code, _o, err = run(["revert", model, "-o", model, "--in-place"], capfd)
    monkeypatch.undo()
    assert code == 2
    assert "backup" in one_error_line(err)
    assert listing(model.parent) == before


# ------------------------------------------------------------- hard kills (subprocess)

# Runs the real CLI with os.fdopen patched: the N-th file opened for writing in OUT gets
# half of its bytes written and flushed to disk, then the process dies (os._exit).
KILL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    out_dir, nth, killed, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    real_fdopen = os.fdopen
    seen = {"n": 0}

    class HalfThenDie:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            os._exit(killed)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if "w" in mode:
            where = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
            if os.path.realpath(where) == os.path.realpath(out_dir):
                seen["n"] += 1
                if seen["n"] == nth:
                    return HalfThenDie(f)
        return f

    os.fdopen = fdopen
    import cli.main
    cli.main.main(argv)
""")


def kill_run(out_dir: Path, nth: int, argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out_dir), str(nth), str(KILLED),
                           json.dumps([str(a) for a in argv])], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def leftovers(folder: Path, before: dict[str, str]) -> list[str]:
    return sorted(name for name in listing(folder) if name not in before)


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc/self/fd")


@needs_proc
@pytest.mark.parametrize("existing", [True, False])
def test_kill_mid_write_leaves_old_file_or_nothing(setup, existing):
    target = setup["out"] / "restored.onnx"
    if existing:
        target.write_bytes(setup["edited"].read_bytes())
    before = listing(setup["out"])
    proc = kill_run(setup["out"], 1, ["revert", setup["edited"], "-o", target])
    assert proc.returncode == KILLED, proc.stderr
    if existing:
        assert sha(target) == before["restored.onnx"]  # the complete previous file
    else:
        assert not target.exists()
    left = leftovers(setup["out"], before)
    assert len(left) == 1 and left[0].startswith(".restored.onnx.") and left[0].endswith(".tmp"), left
    # the half-written temp is exactly that: half; and a rerun still works and succeeds
    proc = subprocess.run([sys.executable, "-m", "cli.main", "revert", str(setup["edited"]), "-o", str(target)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sha(target) == sha(setup["model"])


@needs_proc
@pytest.mark.parametrize("nth", [1, 2])  # killed while writing 1: the external data, 2: the model
def test_kill_mid_write_with_external_data(setup, capfd, nth):
    target = setup["out"] / "restored.onnx"
    code, _o, err = run(["revert", setup["edited_ext"], "-o", target], capfd)  # existing target + data
    assert code == 0, err
    before = listing(setup["out"])
    old_hash = load_model(target).sha256
    proc = kill_run(setup["out"], nth, ["edit", setup["ext"], "--pairs", setup["pairs"], "-o", target, *FAST])
    assert proc.returncode == KILLED, proc.stderr
    now = listing(setup["out"])
    for name, digest in before.items():  # old model and old data byte-identical
        assert now[name] == digest, name
    assert load_model(target).sha256 == old_hash  # and still load together
    left = leftovers(setup["out"], before)
    hidden = [n for n in left if n.startswith(".") and n.endswith(".tmp")]
    assert len(hidden) == 1, left
    # besides the temp, at most the complete new data file (content-hashed, unreferenced)
    for name in set(left) - set(hidden):
        assert nth == 2 and name.startswith("restored.onnx.") and name.endswith(".data"), left


@needs_proc
def test_kill_during_an_in_place_save(setup):
    model = setup["edited"]
    before = listing(model.parent)
    # the backup is made first (a complete copy), then the model is written: kill there
    proc = kill_run(model.parent, 1, ["revert", model, "-o", model, "--in-place"])
    assert proc.returncode == KILLED, proc.stderr
    now = listing(model.parent)
    assert now["inline.onnx"] == before["inline.onnx"]  # the model was never replaced
    assert now["inline.onnx.bak"] == before["inline.onnx"]  # and its backup is complete
    left = [n for n in now if n not in before and n != "inline.onnx.bak"]
    assert len(left) == 1 and left[0].startswith(".inline.onnx.") and left[0].endswith(".tmp"), left


@needs_proc
def test_kill_during_a_real_edit(setup):
    """The whole `dynedit edit` (torch twin, rectify, write-back) killed while saving."""
    target = setup["out"] / "fixed.onnx"
    target.write_bytes(b"previous version")
    proc = kill_run(setup["out"], 1, ["edit", setup["model"], "--pairs", setup["pairs"], "-o", target, *FAST])
    assert proc.returncode == KILLED, proc.stderr
    assert target.read_bytes() == b"previous version"
    assert sha(setup["model"]) == sha(setup["in"] / "model.onnx")
