"""The ``repro`` command: list, run, book, publish, scoreboard, check, regrade, export, import."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repro_utils import ledger, scoreboard
from repro_utils.check import check
from repro_utils.claims import ClaimsError, chapters, find_root, resolve_chapter
from repro_utils.execute import PublishError, build_html, publish_run, run_book, run_chapter
from repro_utils.profiles import ParameterError, parse_assignments, resolve
from repro_utils.records import RecordError, export_run, import_run, refresh_notebook, regrade
from repro_utils.run import card


def _root(args) -> Path:
    return Path(args.root).resolve() if args.root else find_root()


def cmd_list(args) -> int:
    root = _root(args)
    for ch in chapters(root):
        mins = " · ".join(f"{p} ~{m:g} min" for p, m in ch.minutes.items())
        print(f"{ch.id}  {ch.title}\n    profiles: {mins}")
        for c in ch.claims:
            when = f"; declared {c.pending[:10]}, not yet run" if c.pending else ""
            print(f"    - {c.id}: {c.claim}  [tested by: {', '.join(c.profiles)}{when}]")
        for g in ch.goals:
            when = f"; declared {g.pending[:10]}, not yet run" if g.pending else ""
            print(f"    - goal {g.id}: {g.goal}  [tested by: {', '.join(g.profiles)}{when}]")
        extra = ", ".join(f"{k} ({v['type']})" for k, v in ch.parameters.items())
        print(f"    parameters: profile, seed{', ' + extra if extra else ''}")
    return 0


def cmd_run(args) -> int:
    root = _root(args)
    ch = resolve_chapter(root, args.chapter)
    given = parse_assignments(args.p or [])
    if "profile" in given:
        raise ParameterError("pass the profile with --profile, not -p profile=...")
    given["profile"] = args.profile
    resolve(ch.parameters, given, chapter=ch.id)  # a bad parameter stops here, before anything runs
    print(f"{ch.id} · running (expected ~{ch.minutes.get(args.profile, '?')} min) …", flush=True)
    r = run_chapter(root, ch, given, out=Path(args.out) if args.out else None, publish=args.publish,
                    log_output=args.verbose)
    print(r.line())
    if r.ok:
        print()
        print(card(ledger.read(r.ledger)))
        print(f"\nexecuted notebook: {r.notebook}\nledger: {r.ledger}")
    return 0 if r.ok else 1


def cmd_book(args) -> int:
    root = _root(args)
    results = run_book(root, args.profile, publish=args.publish)
    board = scoreboard.write(root)
    print(f"scoreboard: {board}")
    failed = [r for r in results if not r.ok]
    rc = 0
    if not args.no_build:
        print("building the HTML (jupyter-book build -W) …", flush=True)
        rc = build_html(root).returncode
        print(f"HTML: {root / '_build' / 'html' / 'index.html'}" if rc == 0 else "the HTML build failed")
    print(f"\nsummary: {len(results) - len(failed)} of {len(results)} chapters ran"
          + (f"; failed: {', '.join(r.chapter for r in failed)}" if failed else ""))
    return 1 if failed or rc else 0


def cmd_publish(args) -> int:
    root = _root(args)
    ch = resolve_chapter(root, args.chapter)
    folder = Path(args.folder)
    dest = publish_run(root, ch, folder / ch.notebook.name, folder / f"{ch.id}.json")
    print(f"published {ch.id}: {ch.notebook} and {dest}; scoreboard regenerated")
    return 0


def cmd_scoreboard(args) -> int:
    print(scoreboard.write(_root(args)))
    return 0


def cmd_regrade(args) -> int:
    root = _root(args)
    moved = dict(m.split("=", 1) for m in (args.moved or []))
    for p in regrade(root, args.chapter, note=args.note, moved=moved):
        print(f"regraded {p.relative_to(root)}")
    ch = resolve_chapter(root, args.chapter)
    retired = {old: goal for goal, old in moved.items() if old not in {c.id for c in ch.claims}}
    n = refresh_notebook(root, ch.id, renamed=retired)
    print(f"{ch.notebook.name}: {n} printed grade(s) and the claim card brought in line with the ledger")
    print(f"scoreboard: {scoreboard.write(root)}\nnext: a dated line in book/corrections.md for each grade that "
          "changed, then `repro check`")
    return 0


def cmd_export(args) -> int:
    root = _root(args)
    ch = resolve_chapter(root, args.chapter)
    src = Path(args.ledger) if args.ledger else root / "_build" / "runs" / args.profile / f"{ch.id}.json"
    if not src.is_file():
        raise FileNotFoundError(f"no run to export at {src}: run `repro run {ch.id} --profile {args.profile}` "
                                "first, or pass --ledger PATH")
    out = Path(args.out) if args.out else root / "_build" / "records" / f"{ch.id}-{src.stem}.record.json"
    print(f"run record: {export_run(root, ch.id, src, out)}\nsend it with the issue tracker; a maintainer "
          "adds it with `repro import FILE`")
    return 0


def cmd_import(args) -> int:
    root = _root(args)
    dest = import_run(root, Path(args.file), replace=args.replace)
    print(f"imported as {dest.relative_to(root)}; scoreboard regenerated; run `repro check`")
    return 0


def cmd_check(args) -> int:
    problems = check(_root(args))
    for p in problems:
        print(f"problem: {p}")
    print("repro check: ok" if not problems else f"repro check: {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="repro", description="Run, grade and publish the course's chapters.")
    ap.add_argument("--root", help="the course's root (default: found above the current folder)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="chapters, claims, profiles, expected minutes").set_defaults(fn=cmd_list)
    r = sub.add_parser("run", help="execute one chapter through papermill and grade it")
    r.add_argument("chapter", help="id, number or slug: 03_flash_attention, 03, flash_attention")
    r.add_argument("--profile", default="auto", choices=["auto", "smoke", "gpu", "full"])
    r.add_argument("-p", action="append", metavar="KEY=VALUE", help="a chapter parameter (repeatable)")
    r.add_argument("--out", help="folder for the executed notebook and ledger (default _build/runs/<profile>)")
    r.add_argument("--publish", action="store_true",
                   help="gpu/full only: replace the committed notebook and this device's results/<profile>/<chapter>/<device>.json")
    r.add_argument("--verbose", action="store_true", help="stream the notebook's output")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("book", help="run every chapter, regenerate the scoreboard, build the HTML")
    b.add_argument("--profile", default="auto", choices=["auto", "smoke", "gpu", "full"])
    b.add_argument("--publish", action="store_true", help="as for run")
    b.add_argument("--no-build", action="store_true", help="skip the HTML build")
    b.set_defaults(fn=cmd_book)
    pb = sub.add_parser("publish", help="commit-ready: take a gpu/full run's notebook + ledger from FOLDER (e.g. another machine's --out)")
    pb.add_argument("chapter")
    pb.add_argument("folder", help="the --out folder of that run")
    pb.set_defaults(fn=cmd_publish)
    sub.add_parser("scoreboard", help="regenerate book/scoreboard.md from results/").set_defaults(fn=cmd_scoreboard)
    sub.add_parser("check", help="schemas, re-derived grades, corrections, stability, scoreboard").set_defaults(fn=cmd_check)
    rg = sub.add_parser("regrade", help="re-grade a chapter's committed runs under the current claims.yaml and rules (no rerun)")
    rg.add_argument("chapter")
    rg.add_argument("--note", required=True, help="why, in one sentence (kept in the ledger)")
    rg.add_argument("--moved", action="append", metavar="GOAL=OLD_CLAIM",
                    help="a goal that takes over an old claim's measurement (repeatable)")
    rg.set_defaults(fn=cmd_regrade)
    ex = sub.add_parser("export", help="write a self-contained run record of your run, to send to the course")
    ex.add_argument("chapter")
    ex.add_argument("--profile", default="gpu", choices=["gpu", "full"])
    ex.add_argument("--ledger", help="the run's ledger (default _build/runs/<profile>/<chapter>.json)")
    ex.add_argument("--out", help="where to write the record (default _build/records/)")
    ex.set_defaults(fn=cmd_export)
    im = sub.add_parser("import", help="validate a run record and add it as its device's run")
    im.add_argument("file")
    im.add_argument("--replace", action="store_true", help="replace the same device's committed run")
    im.set_defaults(fn=cmd_import)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ParameterError, ClaimsError, KeyError, PublishError, ledger.LedgerError, FileNotFoundError,
            RecordError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"repro: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
