"""Run records that travel: regrading a committed run under new rules, and the community path.

- ``regrade``: re-grade a committed run's own measurements under the current claims.yaml and rules (no
  rerun): the measurements stay exactly as recorded, the declarations, intervals and grades are renewed,
  and the ledger says so (``regraded``). Grade changes then need their dated Corrections lines.
- ``export_run`` writes a self-contained record a user can send: the ledger (measurements, grades,
  fingerprint), the claims.yaml it was graded under, and a sha256 of the ledger.
- ``import_run`` validates such a record (schema, checksum, re-derived grades, a commit this repository
  knows, the protocol it was graded under equals today's) and adds it as its device's run. Anything
  wrong: a clear error, and nothing changes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from repro_utils import ledger
from repro_utils.check import _git
from repro_utils.claims import Chapter, Claim, Goal, resolve_chapter

FORMAT = "repro-run-record"


class RecordError(ValueError):
    """A run record that cannot be imported (or exported) as it is."""


def _today() -> str:
    return dt.date.today().isoformat()


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def regrade_data(ch: Chapter, data: dict[str, Any], *, note: str, commit: str, date: str | None = None,
                 moved: dict[str, str] | None = None, root: Path | None = None) -> dict[str, Any]:
    """``data`` (a committed run, schema 1 or 2) re-graded under ``ch``'s current declarations.

    ``moved`` maps a goal id to the id of the old claim whose measurement it takes over (a self-set
    target that used to be graded as a claim). Claims no longer declared leave the ledger (their history
    stays in git); declared claims the run never measured grade Unverified, but for pending ones (declared for a
    later run), which stay out. With ``root`` (a git checkout), an unmeasured claim or goal that did not exist at
    the run's commit is stamped as declared after the run, so that no table counts it as that run's untested."""
    profile = data["profile"]
    old = {c["id"]: c for c in data["claims"]} | {g["id"]: g for g in data.get("goals", [])}
    moved = moved or {}

    def entry(spec: Claim | Goal, src: dict[str, Any] | None) -> dict[str, Any]:
        kind = "goal" if isinstance(spec, Goal) else "claim"
        measured = dict(src["measured"]) if src and src.get("measured") else None
        if measured is None and root is not None and ledger.declared_after_run(root, data, spec.id):
            measured = {"setting": "not run", "why_untested": f"{ledger.DECLARED_AFTER} (not in the chapter's "
                        f"claims.yaml at the run's commit, {data['fingerprint']['commit'][:10]})"}
        if measured is not None:
            measured["unit"] = spec.unit
        e = {"id": spec.id, "declared": spec.to_dict(), "measured": measured, "grade": "", "reason": ""}
        g = ledger.regrade_entry(e, profile, kind)
        e.update(grade=g.rung, reason=g.reason, interval=g.interval.to_dict() if g.interval else None)
        if kind == "claim":
            e["scale"] = g.scale
        return e

    out = dict(data)
    out["schema_version"] = ledger.SCHEMA_VERSION
    # a pending declaration waits for the run that records it: a regrade of an earlier run leaves it out
    out["claims"] = [entry(c, old.get(c.id)) for c in ch.claims if not (c.pending and c.id not in old)]
    # a goal takes the moved claim's measurement if the run still has it, else its own (moved by an earlier regrade)
    out["goals"] = [entry(g, old.get(moved.get(g.id)) or old.get(g.id)) for g in ch.goals
                    if not (g.pending and g.id not in old and moved.get(g.id) not in old)]
    entry_ = {"date": date or _today(), "commit": commit, "note": note}
    history = [r for r in data.get("regraded", []) if (r["date"], r["note"]) != (entry_["date"], note)]
    out["regraded"] = [*history, entry_]  # regrading twice on one day with one note is one regrade
    ledger.validate(out)
    return out


def regrade(root: Path, chapter: str, *, note: str, moved: dict[str, str] | None = None) -> list[Path]:
    """Regrade every committed run of a chapter in place (each device's file)."""
    from repro_utils.ledger import git_commit

    ch = resolve_chapter(root, chapter)
    commit, _ = git_commit(root)
    written = []
    for path, data in ledger.published(root, ch.id):
        new = regrade_data(ch, data, note=note, commit=commit, moved=moved, root=root)
        written.append(ledger.write(path, new))
    return written


def export_run(root: Path, chapter: str, ledger_path: Path, out: Path) -> Path:
    """Write a run record for ``ledger_path`` (a run's ledger, e.g. ``_build/runs/gpu/<chapter>.json``)."""
    ch = resolve_chapter(root, chapter)
    data = ledger.read(ledger_path)
    if data["chapter"] != ch.id:
        raise RecordError(f"{ledger_path} is a ledger of {data['chapter']}, not {ch.id}")
    problems = ledger.rederive(data, ledger_path)
    if problems:
        raise RecordError("the ledger's grades do not re-derive: " + "; ".join(problems))
    record = {"format": FORMAT, "version": 1, "chapter": ch.id, "ledger": data,
              "claims_yaml": (ch.folder / "claims.yaml").read_text(),
              "sha256": hashlib.sha256(_canonical(data)).hexdigest()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return out


def validate_record(root: Path, record: dict[str, Any], *, source: str = "<record>") -> tuple[Chapter, dict]:
    """Every check ``import_run`` makes; raises RecordError naming the first failure."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RecordError(f"{source}: not a run record (format {record.get('format') if isinstance(record, dict) else None!r})")
    data = record.get("ledger")
    if not isinstance(data, dict):
        raise RecordError(f"{source}: the record holds no ledger")
    if hashlib.sha256(_canonical(data)).hexdigest() != record.get("sha256"):
        raise RecordError(f"{source}: the ledger's sha256 does not match the record's: it was changed after export")
    try:
        ledger.validate(data, source)
    except ledger.LedgerError as e:
        raise RecordError(str(e)) from None
    try:
        ch = resolve_chapter(root, data["chapter"])
    except KeyError as e:
        raise RecordError(f"{source}: {e.args[0]}") from None
    if data["profile"] not in ("gpu", "full") or "CPU" in data["fingerprint"]["device"]:
        raise RecordError(f"{source}: a {data['profile']} run on {data['fingerprint']['device']!r}: only gpu/full "
                          "runs on a GPU are kept in the ledger")
    short = ledger.under_replicated(data)
    if short:
        raise RecordError(f"{source}: fewer replicates than declared: " + "; ".join(short))
    problems = ledger.rederive(data, source)
    if problems:
        raise RecordError(f"{source}: its grades do not re-derive from its measurements: " + "; ".join(problems))
    fp = data["fingerprint"]
    if fp.get("dirty"):
        raise RecordError(f"{source}: run from a modified tree (commit {fp['commit'][:10]}-dirty): the code that "
                          "ran is not in any commit; rerun from a clean checkout")
    if _git(root, "cat-file", "-e", f"{fp['commit']}^{{commit}}") is None:
        raise RecordError(f"{source}: commit {fp['commit'][:10]} is not in this repository's history: pull, or "
                          "rerun at a commit of this course")
    then = _git(root, "show", f"{fp['commit']}:chapters/{ch.id}/claims.yaml")
    if then is None or yaml.safe_load(then) != yaml.safe_load(record.get("claims_yaml", "")):
        raise RecordError(f"{source}: the claims.yaml in the record is not the one at commit {fp['commit'][:10]}")
    for kind, specs, entries, cls in (("claim", ch.claims, data["claims"], Claim),
                                      ("goal", ch.goals, data.get("goals", []), Goal)):
        stored = {e["id"]: e for e in entries}
        for spec in specs:
            if spec.id not in stored or cls.from_dict(stored[spec.id]["declared"]).grading_view() != spec.grading_view():
                raise RecordError(f"{source}: {kind} {spec.id!r} was graded under another protocol than today's "
                                  "claims.yaml: rerun at the current commit")
    return ch, data


def import_run(root: Path, file: Path, *, replace: bool = False) -> Path:
    """Add a user's run record as its device's run; nothing changes unless every check passes."""
    try:
        record = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{file}: cannot read a run record: {e}") from None
    ch, data = validate_record(root, record, source=str(file))
    dest = ledger.path_for(root, data)
    if dest.exists() and not replace:
        raise RecordError(f"{dest.relative_to(root)} already holds a run of {data['fingerprint']['device']}: pass "
                          "--replace to make this one the device's run (the other stays in git history)")
    data = dict(data)
    data["imported"] = {"date": _today(), "sha256": record["sha256"], "from": Path(file).name}
    ledger.write(dest, data)
    from repro_utils import scoreboard

    scoreboard.write(root)
    return dest


def refresh_notebook(root: Path, chapter: str, *, renamed: dict[str, str] | None = None) -> int:
    """After a regrade, bring a committed notebook's grade lines and claim card in line with its ledger.

    Only what ``Run.record``/``Run.goal`` print (``[id] grade: reason``) and the card that ``Run.finish``
    displays are rewritten, each to exactly what the current code prints for the same stored measurement;
    no other output changes. ``renamed`` maps a retired claim id to the goal that took its measurement.
    Returns the number of outputs changed."""
    import nbformat

    from repro_utils.grading import label
    from repro_utils.run import card

    ch = resolve_chapter(root, chapter)
    shown = ledger.latest(root, ch.id)  # the run the notebook shows
    if shown is None:
        return 0
    data = shown[1]
    lines = {c["id"]: f"[{c['id']}] {label(c['grade'], c.get('scale'))}: {c['reason']}" for c in data["claims"]}
    lines |= {g["id"]: f"[goal {g['id']}] {g['grade']}: {g['reason']}" for g in data.get("goals", [])}
    for old, new in (renamed or {}).items():
        lines[old] = lines[new]
    nb = nbformat.read(ch.notebook, as_version=4)
    changed = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "stream":
                text = out["text"]
                new = "\n".join(_regrade_line(ln, lines) for ln in text.split("\n"))
                if new != text:
                    out["text"], changed = new, changed + 1
            md = out.get("data", {}).get("text/markdown")
            if md is not None and "".join(md).startswith("**Claim card:"):
                out["data"]["text/markdown"] = card(data)
                changed += 1
    if changed:
        nbformat.write(nb, ch.notebook)
    return changed


def _regrade_line(line: str, lines: dict[str, str]) -> str:
    if line.startswith("[") and "] " in line:
        cid = line[1:line.index("]")].removeprefix("goal ")
        if cid in lines:
            return lines[cid]
    return line
