"""``repro check``: the committed course is consistent.

- every claims.yaml validates, and its notebook declares exactly the chapter's parameters;
- every ledger validates, belongs to a chapter, and every stored grade re-derives from its stored
  measurement; the grading fields it stored equal those claims.yaml declares now (a test changed after
  the run means the run must be repeated, never that the grade is kept);
- a grade that changed between committed versions of a ledger has a dated line in book/corrections.md;
- a committed notebook with outputs comes from a gpu or full run whose ledger is committed, and every
  piece of code it shows with ``display.show`` is still, verbatim, in the chapter's modules (studied code
  edited after the run means the run must be repeated);
- book/scoreboard.md is what ``repro scoreboard`` would write.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import nbformat

from repro_utils import ledger, scoreboard
from repro_utils.claims import Claim, ClaimsError, load_chapter
from repro_utils.profiles import COMMON


def notebook_parameters(nb_path: Path, nb=None) -> list[str]:
    """Names assigned in the notebook's cell tagged ``parameters``."""
    nb = nb if nb is not None else nbformat.read(nb_path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{nb_path}: expected one cell tagged 'parameters', found {len(cells)}")
    tree = ast.parse(cells[0].source)
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)]


def _check_notebook(root: Path, ch) -> list[str]:
    problems = []
    nb_path = ch.notebook
    if not nb_path.is_file():
        return [f"{nb_path}: missing (a chapter's notebook is named after its folder)"]
    nb = nbformat.read(nb_path, as_version=4)
    try:
        names = notebook_parameters(nb_path, nb)
    except (ValueError, SyntaxError) as e:
        return [str(e)]
    want = set(COMMON) | set(ch.parameters)
    if set(names) != want:
        problems.append(f"{nb_path}: parameters cell assigns {sorted(names)}, claims.yaml declares {sorted(want)}")
    has_outputs = any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    if has_outputs:
        injected = nb.metadata.get("papermill", {}).get("parameters", {})
        profile = injected.get("profile")
        if profile not in ("gpu", "full"):
            problems.append(f"{nb_path}: committed outputs come from a {profile!r} run; only gpu or full "
                            "runs are committed (repro run --profile gpu --publish)")
        elif not (root / "results" / profile / f"{ch.id}.json").is_file():
            problems.append(f"{nb_path}: outputs from a {profile} run but results/{profile}/{ch.id}.json is missing")
        problems += _check_shown_code(root, nb_path, nb)
    return problems


_SHOWN = re.compile(r"```python\n(.*?)\n```", re.S)


def shown_code(nb) -> list[str]:
    """The pieces of source a notebook's outputs show through ``display.show`` (one per object shown)."""
    pieces = []
    for c in nb.cells:
        for out in c.get("outputs", []) if c.cell_type == "code" else []:
            text = out.get("data", {}).get("text/markdown", "")
            text = "".join(text) if isinstance(text, list) else text
            for block in _SHOWN.findall(text):
                pieces += [p for p in block.split("\n\n\n") if p.strip()]
    return pieces


def _check_shown_code(root: Path, nb_path: Path, nb) -> list[str]:
    """Each shown piece must occur in a module of the chapter (or of repro_utils), at some indentation."""
    texts = []
    for f in [*sorted(nb_path.parent.glob("*.py")), *sorted((root / "src" / "repro_utils").glob("*.py"))]:
        lines = f.read_text().splitlines()
        for k in (0, 4, 8, 12):  # show() dedents methods and nested functions
            texts.append("\n".join(ln[k:] if ln.startswith(" " * k) else ln.strip() and ln for ln in lines))
    stale = [p.splitlines()[0] for p in shown_code(nb) if not any(p in t for t in texts)]
    return [f"{nb_path}: shows code that is no longer in the chapter's modules (edited after the run: rerun "
            f"the chapter): {line[:80]!r}" for line in stale]


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def ledger_versions(root: Path, rel: str) -> list[tuple[str, dict]]:
    """Committed versions of a ledger, oldest first, then the working copy if it differs."""
    out = []
    log = _git(root, "log", "--format=%H", "--", rel)
    for commit in reversed((log or "").split()):
        text = _git(root, "show", f"{commit}:{rel}")
        if text:
            try:
                out.append((commit[:10], json.loads(text)))
            except json.JSONDecodeError:
                continue
    f = root / rel
    if f.is_file():
        cur = json.loads(f.read_text())
        if not out or out[-1][1] != cur:
            out.append(("working tree", cur))
    return out


DATED = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


def grade_changes(root: Path, rel: str) -> list[tuple[str, str, str, str, str]]:
    """(chapter, claim, old grade, new grade, version) for each change between consecutive versions."""
    changes = []
    versions = ledger_versions(root, rel)
    for (_, a), (label, b) in zip(versions, versions[1:]):
        old = {c["id"]: c["grade"] for c in a.get("claims", [])}
        for c in b.get("claims", []):
            if c["id"] in old and old[c["id"]] != c["grade"]:
                changes.append((b["chapter"], c["id"], old[c["id"]], c["grade"], label))
    return changes


def check_corrections(root: Path) -> list[str]:
    corrections = root / "book" / "corrections.md"
    lines = corrections.read_text().splitlines() if corrections.is_file() else []
    log = lines[next((i for i, ln in enumerate(lines) if ln.strip() == "## Log"), len(lines)):]
    problems = []
    for f in sorted((root / "results").glob("*/*.json")):
        rel = str(f.relative_to(root))
        for chapter, cid, old, new, label in grade_changes(root, rel):
            change = f"{old} → {new}"
            ok = any(DATED.search(ln) and f"{chapter} / {cid}" in ln and change in ln for ln in log)
            if not ok:
                problems.append(f"{rel}: claim {cid!r} went from {old!r} to {new!r} ({label}) with no dated line "
                                f"under '## Log' in book/corrections.md like "
                                f"'- YYYY-MM-DD · {chapter} / {cid} · {change} · why'")
    return problems


def check(root: str | Path) -> list[str]:
    """Every problem found; empty when the course is consistent."""
    root = Path(root)
    problems: list[str] = []
    chapters = {}
    for f in sorted((root / "chapters").glob("*/claims.yaml")):
        try:
            ch = load_chapter(f)
        except ClaimsError as e:
            problems.append(str(e))
            continue
        chapters[ch.id] = ch
        problems += _check_notebook(root, ch)
    for f in sorted((root / "results").glob("*/*.json")):
        rel = f.relative_to(root)
        try:
            data = ledger.read(f)
        except ledger.LedgerError as e:
            problems.append(str(e))
            continue
        if data["profile"] != f.parent.name or data["chapter"] != f.stem:
            problems.append(f"{rel}: holds chapter {data['chapter']!r}, profile {data['profile']!r}: wrong place")
            continue
        ch = chapters.get(data["chapter"])
        if ch is None:
            problems.append(f"{rel}: no chapter {data['chapter']!r} declares its claims")
            continue
        problems += ledger.rederive(data, rel)
        stored = {c["id"]: c for c in data["claims"]}
        for claim in ch.claims:
            if claim.id not in stored:
                problems.append(f"{rel}: claim {claim.id!r} is declared but the run did not grade it: rerun")
                continue
            then = Claim.from_dict(stored[claim.id]["declared"]).grading_view()
            if then != claim.grading_view():
                problems.append(f"{rel}: claim {claim.id!r}: claims.yaml changed its test since the run "
                                f"(then {then}, now {claim.grading_view()}): rerun the chapter")
        for cid in set(stored) - {c.id for c in ch.claims}:
            problems.append(f"{rel}: claim {cid!r} is graded but no longer declared: rerun the chapter")
    problems += check_corrections(root)
    board = root / "book" / "scoreboard.md"
    if not problems:
        if not board.is_file() or board.read_text() != scoreboard.render(root):
            problems.append("book/scoreboard.md is out of date: run `repro scoreboard`")
    return problems
