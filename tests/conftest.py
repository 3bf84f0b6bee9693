"""Shared fixtures. Tests are offline and deterministic: data from ../shared/data (REPRO_DATA_DIR) or
made by the tests; every random draw is seeded."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when triton.language is first imported and when each kernel is decorated:
# on a machine without a GPU, set it before anything (torch included) imports triton, so that every
# chapter's kernels and Triton's own library functions run in its CPU interpreter, in any test order.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

# Offline data: ../shared/data beside the checkout, unless REPRO_DATA_DIR already points somewhere.
_shared = ROOT.parent / "shared" / "data"
if not os.environ.get("REPRO_DATA_DIR") and _shared.is_dir():
    os.environ["REPRO_DATA_DIR"] = str(_shared)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("REPRO_OFFLINE", "1")


def import_interpreted(name: str):
    """Import module ``name`` with TRITON_INTERPRET=1 (its kernels run in Triton's CPU interpreter), leaving the
    variable as it was for everything imported after it."""
    import importlib

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(name)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.fixture
def course(tmp_path: Path) -> Path:
    """A throwaway course root with the self-test chapter, as a git repository."""
    root = tmp_path / "course"
    (root / "chapters").mkdir(parents=True)
    (root / "book").mkdir()
    shutil.copytree(FIXTURES / "00_selftest", root / "chapters" / "00_selftest")
    shutil.copyfile(ROOT / "_toc.yml", root / "_toc.yml")
    (root / "book" / "corrections.md").write_text("# Corrections\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)
    return root


def git_commit(root: Path, msg: str) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", msg], cwd=root, check=True)


# A goal and a claim declared after the self-test chapter's last run, for the next one (pre-registration).
PENDING_GOAL = """
goals:
  - id: later-goal
    goal: A target declared after the last run, for the next one.
    metric: a ratio
    unit: x
    target: {at_least: 1.0}
    baseline: itself
    profiles: [gpu]
    deterministic: "a number the self-test writes down, the same every run"
    pending: "2026-12-05: graded by the next gpu run, once the notebook records it"
"""
PENDING_CLAIM = """  - id: later-claim
    claim: A claim declared after the last run, for the next one.
    source: {paper: "a paper", where: "§1"}
    metric: anything
    unit: x
    claimed: {value: 2, setting: "H100"}
    holds_if: {at_least: 1.5}
    profiles: {gpu: own}
    deterministic: "a number the self-test writes down, the same every run"
    pending: "2026-12-05: graded by the next gpu run"
"""
