"""Every ``benchmarks/*.py`` runs its smallest setting (``--smoke``) and writes only under ``--output``.

The benchmarks are found by glob, so a new one is covered as soon as it exists; each must take ``--smoke`` and
``--output DIR``. Each runs in a subprocess from the repository root (a file written to the working directory would
land in the work tree) with a timeout that kills its whole process group. The work tree is compared before and
after with ``git status --porcelain --ignored=matching --untracked-files=all`` plus every file inside an ignored
directory: tracked, untracked and ignored files alike. Byte code and a virtual environment inside the tree are the
exceptions: the benchmark runs with ``PYTHONDONTWRITEBYTECODE=1``, and ``__pycache__`` entries are left out because
any process of the test session may import a module for the first time meanwhile. (So do not edit the tree while
this test runs.) The numbers a smoke run prints mean nothing and are not checked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 900
# Ignored directories not compared file by file: virtual environments (thousands of files, and a first import there
# may write byte code).
ENVIRONMENTS = (".venv", "venv", ".tox")


def _in_git_work_tree() -> bool:
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == "true"


def _work_tree() -> list[str]:
    """``git status`` of every tracked, untracked and ignored path, with the files inside ignored directories listed
    one by one (the virtual environment and byte code aside)."""
    done = subprocess.run(["git", "status", "--porcelain", "--ignored=matching", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    entries = []
    for line in done.stdout.splitlines():
        if "__pycache__" in line:
            continue
        entries.append(line)
        path = line[3:].strip('"')
        if line.startswith("!! ") and path.endswith("/") and path.rstrip("/") not in ENVIRONMENTS:
            entries += [f"!! {f.relative_to(ROOT)}" for f in (ROOT / path).rglob("*") if "__pycache__" not in f.parts]
    return sorted(entries)


def test_the_benchmarks_are_found():
    names = {p.name for p in BENCHMARKS}
    assert {"config_overhead.py", "metanet_study.py", "prediction_cost.py", "probe_overhead.py",
            "representation_cost.py"} <= names


@pytest.mark.skipif(not _in_git_work_tree(), reason="needs a git work tree to compare before and after")
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_smoke_run_writes_only_under_its_output(script, tmp_path):
    output = tmp_path / "output"
    before = _work_tree()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, str(script), "--smoke", "--output", str(output)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"{script.name} --smoke ran past {TIMEOUT_S} s:\n{log[-3000:]}")
    assert process.returncode == 0, f"{script.name} --smoke failed:\n{log[-3000:]}"
    assert _work_tree() == before, f"{script.name} --smoke changed the work tree"
    assert output.is_dir() and any(output.rglob("*")), f"{script.name} wrote nothing under --output"
