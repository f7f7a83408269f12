"""Every command shown in the README is run here (in a scratch folder that links the
bundled samples), in order, and must exit 0 (or the code its trailing ``# exit N: why``
comment documents); the demo script too."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "docs" / "results.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("dynedit ")]


def test_readme_lists_every_command():
    names = {shlex.split(c, comments=True)[1] for c in readme_commands()}
    assert names == {"inspect", "locate", "edit", "revert", "diff", "verify"}


def _line_starts(text: str) -> set[str]:
    return {" ".join(line.lstrip("#").split()) for line in text.splitlines() if line.strip()}


def _results_references() -> set[str]:
    """Section names that the README, the code and the scripts send the reader to in
    docs/results.md: the file's name then a quoted name, a quoted name then "in" and the
    file's name, and the right-hand column of the README's "Results at a glance" table."""
    files = [ROOT / "README.md", ROOT / "benchmarks" / "gpu_check.sh"]
    files += [p for d in ("onnx_dynedit", "cli", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    names = set()
    for path in files:
        flat = " ".join(path.read_text().split())
        for a, b in re.findall(r'docs/results\.md[,:]? "([^"]+)"|"([^"]+)" in docs/results\.md', flat):
            names.add(a or b)
    glance = README.split("## Results at a glance", 1)[1].split("\n## ", 1)[0]
    for row in glance.splitlines():
        if row.startswith("| ") and not row.startswith("| what"):
            names.update(re.findall(r'"([^"]+)"', row.rstrip(" |").rsplit("|", 1)[1]))
    return {n for n in names if not n.startswith("...")}


def test_references_to_the_results_record_name_its_sections():
    """The measurement record moved out of the README (docs/results.md): every place that
    points into it names a heading, or the first words of a paragraph, that is there (the
    glance table may also name a README section)."""
    starts = _line_starts(RESULTS) | _line_starts(README)
    names = _results_references()
    assert len(names) >= 10
    missing = sorted(n for n in names if not any(s.startswith(n) for s in starts))
    assert not missing, missing


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    (work / "sample_models").symlink_to(ROOT / "sample_models")
    (work / "out").mkdir()
    return work


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_readme_commands_run_in_order(workdir):
    commands = readme_commands()
    assert len(commands) >= 10
    for cmd in commands:
        argv = [sys.executable, "-m", "cli.main"] + shlex.split(cmd, comments=True)[1:]
        documented = re.search(r"#\s*exit (\d+)", cmd)
        proc = subprocess.run(argv, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == (int(documented.group(1)) if documented else 0), f"{cmd}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
    assert (workdir / "out" / "badnets-locate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "out" / "badnets.edit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "out" / "badnets.restored.onnx").read_bytes() == (ROOT / "sample_models/badnets/model.onnx").read_bytes()


def test_demo_script(tmp_path):
    """The README's main command: edit + verify on badnets, ending in PASSED."""
    env = _env()
    env["DYNEDIT_VENV"] = str(Path(sys.executable).parent.parent)
    env["DYNEDIT_OUT"] = str(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "scripts/demo.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "PASSED"
    assert (tmp_path / "badnets.fixed.onnx").exists()
