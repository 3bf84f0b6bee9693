"""The book builds from the committed notebooks with warnings as errors (it never executes them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from repro_utils.execute import build_html

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_jupyter_book_builds_with_no_warnings(tmp_path):
    r = build_html(ROOT, path_output=tmp_path, capture=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "book" / "scoreboard.html").is_file()
    for nb in sorted(ROOT.glob("chapters/*/*.ipynb")):
        assert (html / nb.relative_to(ROOT).with_suffix(".html")).is_file(), nb
