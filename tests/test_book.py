"""The book builds from the committed notebooks with warnings as errors (it never executes them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_jupyter_book_builds_with_no_warnings(tmp_path):
    cmd = [sys.executable, "-m", "jupyter_book", "build", str(ROOT), "--path-output", str(tmp_path),
           "--builder", "html", "-W", "-n", "--keep-going"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "book" / "scoreboard.html").is_file()
    for nb in sorted(ROOT.glob("chapters/*/*.ipynb")):
        assert (html / nb.relative_to(ROOT).with_suffix(".html")).is_file(), nb
