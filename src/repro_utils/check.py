"""``repro check``: the committed course is consistent.

- every claims.yaml validates, and its notebook declares exactly the chapter's parameters;
- a claim or goal marked ``pending`` (declared, with its date, before the run that will grade it) may be absent
  from the ledgers; one that a ledger grades must no longer be marked pending; one absent from a device's
  ledger must be graded by a later run of the same chapter and profile on another device (it was declared after
  the older run, which the scoreboard then says);
- every ledger (``results/<profile>/<chapter>/<device>.json``) validates, sits where its content says,
  belongs to a chapter, and every stored grade and interval re-derives from its stored replicates; the
  grading fields it stored equal those claims.yaml declares now (a test changed after the run means the
  run must be repeated or regraded, never that the grade is kept);
- a claim or goal a ledger grades is still declared, or a dated Corrections line retires it (the ledgers of runs
  made before keep it as their history);
- a claim's metric, unit and tests never change under the same id across published runs (evidence
  standard, rule 7): a changed metric is a new claim;
- a grade that changed between committed versions of a ledger has a dated line in book/corrections.md;
- a claim graded two different ways on two devices (or by two runs of one device at the same protocol),
  counting an Unverified that the measurement itself produced (inconclusive, could not fail, no power), is
  *unstable*, and needs a dated line in book/corrections.md that explains it;
- a staged next version of a chapter's notebook (``<chapter>.next.ipynb``) has no outputs, declares the
  chapter's parameters (the published notebook may then lack parameters added for it, and keep those that its
  own run was given and the staged version no longer declares), and passes ``values=``
  wherever it records, by a literal id, a claim or goal that declares replicates for a gpu or full run (one
  value there makes the run unpublishable, which otherwise shows only at the end of a device call);
- a committed notebook with outputs comes from a gpu or full run whose ledger is committed, and every
  piece of code it shows with ``display.show`` is still, verbatim, in the chapter's modules (studied code
  edited after the run means the run must be repeated); edits to such code wait in the chapter's
  ``rerun.patch``, which must still apply;
- book/scoreboard.md is what ``repro scoreboard`` would write.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import nbformat

from repro_utils import ledger
from repro_utils.claims import Claim, ClaimsError, Goal, load_chapter
from repro_utils.grading import unverified_kind
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
    staged = ch.next_notebook.is_file()
    if staged:  # parameters added for the staged version: the published notebook may lack them until it runs
        problems += _check_staged(ch, want)
        # and parameters the staged version dropped: the published notebook keeps those its own run was given
        ran_with = set(nb.metadata.get("papermill", {}).get("parameters", {}))
        if not set(names) <= want | ran_with:
            problems.append(f"{nb_path}: parameters cell assigns {sorted(set(names) - want - ran_with)}, which "
                            "claims.yaml no longer declares")
    else:
        problems += _parameters_match(nb_path, names, want)
    has_outputs = any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    if has_outputs:
        injected = nb.metadata.get("papermill", {}).get("parameters", {})
        profile = injected.get("profile")
        if profile not in ("gpu", "full"):
            problems.append(f"{nb_path}: committed outputs come from a {profile!r} run; only gpu or full "
                            "runs are committed (repro run --profile gpu --publish)")
        elif not any((root / "results" / profile / ch.id).glob("*.json")):
            problems.append(f"{nb_path}: outputs from a {profile} run but results/{profile}/{ch.id}/ holds no ledger")
        problems += _check_shown_code(root, nb_path, nb)
    return problems


def _check_staged(ch, want: set[str]) -> list[str]:
    """A staged next version (``<chapter>.next.ipynb``) has no outputs (it has not run: its outputs come with the
    run that publishes it) and declares exactly the chapter's parameters."""
    path = ch.next_notebook
    nb = nbformat.read(path, as_version=4)
    problems = []
    if any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
        problems.append(f"{path}: a staged notebook holds outputs: clear them (its outputs come with the gpu or full "
                        "run that publishes it)")
    problems += _single_value_records(ch, path, nb)
    try:
        names = notebook_parameters(path, nb)
    except (ValueError, SyntaxError) as e:
        return problems + [str(e)]
    return problems + _parameters_match(path, names, want)


def record_calls(nb) -> list[tuple[str, str, ast.Call]]:
    """(method, id, call) for every ``<x>.record("<id>", ...)`` or ``<x>.goal("<id>", ...)`` in the notebook's
    code whose id is a string literal (calls with a computed id, e.g. inside a chapter module, are not seen)."""
    found = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        try:
            tree = ast.parse(c.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("record", "goal") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                found.append((node.func.attr, node.args[0].value, node))
    return found


def _single_value_records(ch, path: Path, nb) -> list[str]:
    """Records without ``values=`` of a claim or goal that a gpu/full run must give its declared replicates."""
    specs = {("record", c.id): c for c in ch.claims} | {("goal", g.id): g for g in ch.goals}
    problems = []
    for method, cid, call in record_calls(nb):
        spec = specs.get((method, cid))
        if spec is None or spec.deterministic or (spec.replicates or 0) < 2 or not {"gpu", "full"} & set(spec.profiles):
            continue
        if not any(kw.arg == "values" for kw in call.keywords):
            problems.append(f"{path}: run.{method}({cid!r}, ...) passes one value, but claims.yaml declares "
                            f"{spec.replicates} replicates: a gpu or full run of this notebook could not be "
                            "published (pass values=[...], one per seed or repeated timing)")
    return problems


def _parameters_match(path: Path, names: list[str], want: set[str]) -> list[str]:
    if set(names) == want:
        return []
    return [f"{path}: parameters cell assigns {sorted(names)}, claims.yaml declares {sorted(want)}"]


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


# another chapter's folder put on the import path: sys.path.insert(0, str(Path("../01_speedrun_muon").resolve()))
_BORROWED = re.compile(r'sys\.path\.(?:insert|append)\([^\n]*Path\("\.\./(\d\d_[A-Za-z0-9_]+)"\)')


def _check_shown_code(root: Path, nb_path: Path, nb) -> list[str]:
    """Each shown piece must occur in a module of the chapter, of a chapter whose folder its code puts on the import
    path (``Path("../01_speedrun_muon")``: chapter 08 runs chapter 01's module), or of a package under src/, at some
    indentation."""
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    borrowed = [nb_path.parent.parent / d for d in sorted(set(_BORROWED.findall(code)))]
    texts = []
    modules = [*sorted(nb_path.parent.glob("*.py")), *(f for d in borrowed for f in sorted(d.glob("*.py"))),
               *sorted((root / "src").glob("*/*.py"))]  # chapter, chapters it imports from, repro_utils, tinyserve
    for f in modules:
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


def check_rerun_patches(root: Path) -> list[str]:
    """A chapter's ``rerun.patch`` (edits to code its published page shows, which land with its next run) still
    applies to the working tree; without git there is nothing to check it with."""
    problems = []
    for f in sorted((root / "chapters").glob("*/rerun.patch")):
        try:
            r = subprocess.run(["git", "apply", "--check", str(f)], cwd=root, capture_output=True, text=True)
        except OSError:
            return []
        if r.returncode:
            problems.append(f"{f.relative_to(root)}: no longer applies ({r.stderr.strip().splitlines()[0][:160]}): "
                            "rebase it on the code it edits")
    return problems


def ledger_versions(root: Path, rel: str) -> list[tuple[str, dict]]:
    """Committed versions of a ledger, oldest first (following renames: the ledgers moved to one file
    per device), then the working copy if it differs."""
    out = []
    log = _git(root, "log", "--follow", "--name-only", "--format=@%H", "--", rel) or ""
    pairs, commit = [], None
    for line in log.splitlines():
        if line.startswith("@"):
            commit = line[1:]
        elif line.strip() and commit:
            pairs.append((commit, line.strip()))
            commit = None
    for commit, path in reversed(pairs):
        text = _git(root, "show", f"{commit}:{path}")
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
    # --follow also "finds" a rename where a new device's ledger was merely added beside an older one that it
    # resembles (04's H200 ledger after its H100 one): a ledger's history is its own device's only
    if out:
        device = _device(out[-1][1])
        out = [(label, data) for label, data in out if _device(data) == device]
    return out


def _device(data: dict) -> str | None:
    return (data.get("fingerprint") or {}).get("device")


DATED = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


def _entries(data: dict) -> list[dict]:
    return list(data.get("claims", [])) + list(data.get("goals", []))


def grade_changes(root: Path, rel: str) -> list[tuple[str, str, str, str, str]]:
    """(chapter, claim, old grade, new grade, version) for each change between consecutive versions."""
    changes = []
    versions = ledger_versions(root, rel)
    for (_, a), (label, b) in zip(versions, versions[1:]):
        old = {c["id"]: c["grade"] for c in _entries(a)}
        for c in _entries(b):
            if c["id"] in old and old[c["id"]] != c["grade"]:
                changes.append((b["chapter"], c["id"], old[c["id"]], c["grade"], label))
    return changes


def correction_log(root: Path) -> list[str]:
    corrections = root / "book" / "corrections.md"
    lines = corrections.read_text().splitlines() if corrections.is_file() else []
    return lines[next((i for i, ln in enumerate(lines) if ln.strip() == "## Log"), len(lines)):]


def ledger_files(root: Path) -> list[Path]:
    return sorted((root / "results").glob("*/*/*.json"))


def check_corrections(root: Path) -> list[str]:
    log = correction_log(root)
    problems = []
    for f in ledger_files(root):
        rel = str(f.relative_to(root))
        for chapter, cid, old, new, label in grade_changes(root, rel):
            change = f"{old} → {new}"
            ok = any(DATED.search(ln) and f"{chapter} / {cid}" in ln and change in ln for ln in log)
            if not ok:
                problems.append(f"{rel}: claim {cid!r} went from {old!r} to {new!r} ({label}) with no dated line "
                                f"under '## Log' in book/corrections.md like "
                                f"'- YYYY-MM-DD · {chapter} / {cid} · {change} · why'")
    return problems


def check_identity(root: Path, chapters: dict) -> list[str]:
    """Rule 7: under one id, the metric, unit and tests never change across published runs (schema 2 on)
    and the current claims.yaml. The old id keeps its history; a changed claim takes a new id."""
    problems = []
    for f in ledger_files(root):
        rel = str(f.relative_to(root))
        seen: dict[str, tuple[str, dict]] = {}
        versions = [(lbl, d) for lbl, d in ledger_versions(root, rel) if d.get("schema_version", 1) >= 2]
        ch = chapters.get(f.parent.name)
        now = []
        if ch is not None:
            now = [("claims.yaml", {"claims": [{"id": c.id, "declared": c.to_dict()} for c in ch.claims],
                                    "goals": [{"id": g.id, "declared": g.to_dict()} for g in ch.goals]})]
        for lbl, d in versions + now:
            for kind, entries in (("claim", d.get("claims", [])), ("goal", d.get("goals", []))):
                for c in entries:
                    spec = (Claim if kind == "claim" else Goal).from_dict(c["declared"])
                    key = f"{kind}:{c['id']}"
                    if key in seen and seen[key][1] != spec.identity():
                        problems.append(f"{rel}: {kind} {c['id']!r}: its metric, unit or test changed under the same "
                                        f"id (version {seen[key][0]}: {seen[key][1]}; {lbl}: {spec.identity()}): "
                                        "a changed metric is a new claim: declare it under a new id, and say why in "
                                        "book/corrections.md")
                        continue
                    seen.setdefault(key, (lbl, spec.identity()))
    return sorted(set(problems))


# Parameters that do not change what a run measures: how long it may take, which sections it runs, its base seed
# (another seed is another draw of the same protocol) and its profile.
RUN_ONLY_PARAMETERS = frozenset({"budget_s", "parts", "seed", "profile"})


def run_protocol(data: dict) -> str:
    """The run's side of a protocol: its parameters (training steps, batch, model size, ...), less those that do not
    change what it measures. The parameters are the chapter's, not the claim's, so two runs whose parameters differ
    may still have measured a given claim alike (chapter 04's training steps do not touch its kernel timings):
    the scoreboard uses this only to say "protocols differ" beside agreeing grades, never to excuse a flip."""
    return json.dumps({k: v for k, v in data.get("parameters", {}).items() if k not in RUN_ONLY_PARAMETERS},
                      sort_keys=True)


def stability(root: Path, chapter: str, profile: str) -> dict[str, dict]:
    """Per claim or goal id: the grade on each device (latest run) and whether it is unstable, that is,
    graded differently by two devices, or by two consecutive runs of one device, under the same declared test
    (``views``; the run's parameters, ``runs``, are kept beside it for the scoreboard)."""
    out: dict[str, dict] = {}
    for f in sorted((root / "results" / profile / chapter).glob("*.json")):
        try:
            data = ledger.read(f)
        except ledger.LedgerError:
            continue  # reported by check() itself
        device = data["fingerprint"]["device"]
        params = run_protocol(data)  # the chapter's, the same for every entry of this run
        for c in _entries(data):
            rec = out.setdefault(c["id"], {"grades": {}, "views": {}, "runs": {}, "flips": [], "decisive": {}})
            rec["grades"][device] = c["grade"]
            rec["decisive"][device] = _decisive(c)
            rec["views"][device] = json.dumps(_view(c), sort_keys=True)
            rec["runs"][device] = params
        rel = str(f.relative_to(root))
        versions = ledger_versions(root, rel)
        for (_, a), (lbl, b) in zip(versions, versions[1:]):
            if b.get("schema_version", 1) < 2 or a.get("schema_version", 1) < 2:
                continue
            old = {c["id"]: c for c in _entries(a)}
            for c in _entries(b):
                o = old.get(c["id"])
                if o and _conflict(o, c) and _view(o) == _view(c) and c["id"] in out:
                    out[c["id"]]["flips"].append(f"{device}: {o['grade']} then {c['grade']} ({lbl})")
    for rec in out.values():
        same_protocol = len(set(rec["views"].values())) == 1
        decisive = {rec["grades"][d] for d, ok in rec["decisive"].items() if ok}
        rec["unstable"] = bool(rec["flips"]) or (same_protocol and len(decisive) > 1)
    return out


# Unverified after a measurement under the declared protocol: the measurement itself landed there (its interval
# straddled a bar, or its control's did, or the control failed). Against a decided grade from the same protocol
# that is a grade the draw decided (evidence standard, rule 9). "Not tested", "too few replicates" and
# "substitute" mean the protocol was not carried out, so they contradict nothing.
MEASURED_UNVERIFIED = ("inconclusive", "could not fail", "no power")


def _decisive(entry: dict) -> bool:
    """Whether an entry's grade came out of carrying out its protocol: a decided rung, or Unverified because of
    what the measurement showed (not because it was not made)."""
    if entry["grade"] != "Unverified":
        return True
    return unverified_kind(entry.get("reason", "")) in MEASURED_UNVERIFIED


def _conflict(a: dict, b: dict) -> bool:
    """Two entries contradict each other when both carried out the protocol and their grades differ. That
    includes an interval that sat on the bar in one run and cleared it in another (rule 9: the grade differs
    between runs, so the protocol cannot decide it yet). Unverified because a run did not test the claim (or
    had too few replicates, or measured a substitute) is no contradiction."""
    return a["grade"] != b["grade"] and _decisive(a) and _decisive(b)


def _view(entry: dict) -> dict:
    d = entry["declared"]
    spec = Goal.from_dict(d) if "goal" in d else Claim.from_dict(d)
    return spec.grading_view()


def retired(log: list[str], chapter: str, cid: str) -> bool:
    """Whether a dated Corrections line retires ``cid`` ('<chapter> / <cid> · retired as <new id> · why'; a goal's
    line may say '(goal)' after its id). A retired claim leaves claims.yaml at once, for the successor declared in its
    place (rule 7); the ledgers of runs made before keep its grade as their history, and the chapter's next run on
    each device no longer records it."""
    head = re.compile(re.escape(f"{chapter} / {cid}") + r"( \(goal\))? · retired\b")
    return any(DATED.search(ln) and head.search(ln) for ln in log)


def explained(log: list[str], chapter: str, cid: str) -> bool:
    return any(DATED.search(ln) and f"{chapter} / {cid}" in ln and "unstable" in ln for ln in log)


def check_stability(root: Path, chapters: dict) -> list[str]:
    log = correction_log(root)
    problems = []
    for ch in chapters.values():
        for profile in ("gpu", "full"):
            for cid, rec in stability(root, ch.id, profile).items():
                if rec["unstable"] and not explained(log, ch.id, cid):
                    where = "; ".join([f"{d}: {g}" for d, g in rec["grades"].items()] + rec["flips"])
                    problems.append(f"results/{profile}/{ch.id}: {cid!r} is unstable ({where}) and book/corrections.md "
                                    f"does not explain it: add '- YYYY-MM-DD · {ch.id} / {cid} · unstable · why' "
                                    "(or strengthen its protocol and rerun)")
    return problems


def check(root: str | Path) -> list[str]:
    """Every problem found; empty when the course is consistent."""
    root = Path(root)
    problems: list[str] = []
    chapters = {}
    log = correction_log(root)
    for f in sorted((root / "chapters").glob("*/claims.yaml")):
        try:
            ch = load_chapter(f)
        except ClaimsError as e:
            problems.append(str(e))
            continue
        chapters[ch.id] = ch
        problems += _check_notebook(root, ch)
    for f in sorted((root / "results").glob("*/*.json")):
        problems.append(f"{f.relative_to(root)}: a ledger in the old layout: runs live in "
                        "results/<profile>/<chapter>/<device>.json")
    for f in ledger_files(root):
        rel = f.relative_to(root)
        try:
            data = ledger.read(f)
        except ledger.LedgerError as e:
            problems.append(str(e))
            continue
        want = ledger.path_for(root, data)
        if f != want:
            problems.append(f"{rel}: holds chapter {data['chapter']!r}, profile {data['profile']!r}, device "
                            f"{data['fingerprint']['device']!r}: wrong place (belongs at {want.relative_to(root)})")
            continue
        ch = chapters.get(data["chapter"])
        if ch is None:
            problems.append(f"{rel}: no chapter {data['chapter']!r} declares its claims")
            continue
        problems += ledger.rederive(data, rel)
        for kind, specs, entries, cls in (("claim", ch.claims, data["claims"], Claim),
                                          ("goal", ch.goals, data.get("goals", []), Goal)):
            stored = {c["id"]: c for c in entries}
            for spec in specs:
                if spec.id not in stored:
                    # pending: declared for the next run, before it (pre-registered); graded_later: declared after
                    # this device's run and graded by a later run on another device
                    if not spec.pending and not ledger.graded_later(root, data, kind + "s", spec.id):
                        problems.append(f"{rel}: {kind} {spec.id!r} is declared but the run did not grade it: rerun")
                    continue
                if spec.pending:
                    problems.append(f"{rel}: {kind} {spec.id!r} is graded by this run, but claims.yaml still marks it "
                                    f"pending ({spec.pending[:10]}): remove `pending`")
                then = cls.from_dict(stored[spec.id]["declared"]).grading_view()
                if then != spec.grading_view():
                    problems.append(f"{rel}: {kind} {spec.id!r}: claims.yaml changed its test since the run "
                                    f"(then {then}, now {spec.grading_view()}): rerun the chapter (or `repro "
                                    "regrade` it, if only the protocol was strengthened)")
            for cid in sorted(set(stored) - {s.id for s in specs}):
                if retired(log, ch.id, cid):  # its history: this run graded it before it was retired
                    continue
                problems.append(f"{rel}: {kind} {cid!r} is graded but no longer declared: rerun the chapter (or "
                                f"retire it with a dated line '- YYYY-MM-DD · {ch.id} / {cid} · retired as <new id> "
                                "· why' in book/corrections.md)")
    problems += check_identity(root, chapters)
    problems += check_rerun_patches(root)
    problems += check_corrections(root)
    problems += check_stability(root, chapters)
    from repro_utils import scoreboard  # late: the scoreboard reads this module's stability()

    board = root / "book" / "scoreboard.md"
    if not problems:
        if not board.is_file() or board.read_text() != scoreboard.render(root):
            problems.append("book/scoreboard.md is out of date: run `repro scoreboard`")
    return problems
