"""tools/ab.py, the A/B timing of two builds of umgr: how it reads a
program's phases and pairs runs (pure), and a real run against the last
commit, built aside in a git worktree."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
TOOL = REPO / "tools" / "ab.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("ab", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_phases_are_the_last_json_line_of_output_that_has_them():
    ab = load_tool()
    out = ('{"phases": {"touch": 9.0}}\nchecking\n{"ok": true, "phases": {"touch": 1.5, "random": 2}}\n'
           '{"not": "phases"}\nnot json {\n')
    assert ab.reported_phases(out) == {"touch": 1.5, "random": 2.0}
    assert ab.reported_phases("ok 123\n") == {}


def test_pairs_give_each_figure_its_median_ratio_range_and_medians():
    ab = load_tool()
    base = [{"random": 2.0, "wall": 4.0}, {"random": 4.0, "wall": 5.0}, {"random": 1.0, "wall": 5.0}]
    new = [{"random": 1.0, "wall": 4.0}, {"random": 4.0, "wall": 6.0}, {"random": 1.5, "wall": 5.0, "extra": 1}]
    rows = {row[0]: row[1:] for row in ab.paired(base, new)}
    assert set(rows) == {"random", "wall"}   # (a figure some run lacks is left out)
    assert rows["random"] == (1.0, 0.5, 1.5, 2.0, 1.5)
    assert rows["wall"] == (1.0, 1.0, 1.2, 5.0, 5.0)


# What a copy of the tree leaves out: git's, build products, installs.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.log")


@pytest.mark.timeout(300)
def test_a_run_against_the_last_commit_builds_it_aside_and_compares_real_runs(programs, tmp_path):
    # The tool in a git repository of its own, made here from this tree (a
    # checkout or an unpacked sdist alike), so that its worktrees are never
    # this checkout's: its base is that repository's only commit.
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=NOT_SOURCE)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(git + step, cwd=repo, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, str(repo / "tools" / "ab.py"), "--pairs", "1", "--umgr-args",
                             "--max-resident 8M --swap-size 64M", "--", programs["scatter"], "24", "3000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:   # (SIGTERM: it removes the base's checkout on the way out)
            proc.terminate()
            proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-3000:]
    lines = out.splitlines()
    # The base ran from its own checkout (a worktree of the tool's), not from this one.
    assert lines[0].startswith("base: HEAD, umgr from ") and "umgr-ab-" in lines[0], out
    base_tree = lines[0].split("umgr from ")[1]
    rows = {line.split()[0]: line.split() for line in lines[4:]}
    assert {"wall", "daemon_cpu_seconds", "faults"} <= set(rows), out
    # Both builds paged: 24 MiB under 8 MiB faults back thousands of pages.
    _, ratio, _, base_faults, new_faults = rows["faults"]
    assert float(base_faults) > 1000 and float(new_faults) > 1000, out
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert str(Path(base_tree).parent) not in worktrees, worktrees   # (the base's checkout is gone)
