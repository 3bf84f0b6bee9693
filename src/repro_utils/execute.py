"""Executing chapters with papermill: one chapter, or the whole book."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro_utils import ledger, notebooks, scoreboard
from repro_utils.claims import Chapter, chapters
from repro_utils.profiles import resolve, resolve_profile


class PublishError(RuntimeError):
    """A run that must not replace the committed outputs (a smoke run, or no GPU in its fingerprint)."""


@dataclass
class Result:
    chapter: str
    profile: str
    ok: bool
    seconds: float
    notebook: Path | None = None
    ledger: Path | None = None
    error: str | None = None
    grades: Counter = field(default_factory=Counter)

    def line(self) -> str:
        if not self.ok:
            return f"{self.chapter} · {self.profile} · FAILED after {self.seconds:.0f} s: {self.error}"
        tally = ", ".join(f"{n} {g}" for g, n in self.grades.most_common())
        return f"{self.chapter} · {self.profile} · ok in {self.seconds:.0f} s · {tally}"


def default_out(root: Path, profile: str) -> Path:
    return root / "_build" / "runs" / profile


def run_chapter(root: Path, ch: Chapter, given: dict[str, Any], *, out: Path | None = None,
                publish: bool = False, log_output: bool = False) -> Result:
    """Execute one chapter's notebook through papermill; parameters are validated before anything runs.

    The executed notebook and its ledger go to ``out`` (default ``_build/runs/<profile>``). With
    ``publish``, a gpu/full run's notebook replaces the committed one and its ledger goes to
    ``results/<profile>/``; smoke runs are refused.
    """
    import papermill as pm

    params = resolve(ch.parameters, given, chapter=ch.id)  # raises ParameterError before any work
    profile = params["profile"]
    if publish and profile == "smoke":
        raise PublishError("smoke runs never replace the committed notebooks: publish a gpu or full run")
    out = Path(out) if out else default_out(root, profile)
    out.mkdir(parents=True, exist_ok=True)
    nb_out, ledger_out = out / ch.notebook.name, out / f"{ch.id}.json"
    ledger_out.unlink(missing_ok=True)
    env_before = {k: os.environ.get(k) for k in ("REPRO_OUT", "REPRO_ROOT")}
    os.environ.update(REPRO_OUT=str(out.resolve()), REPRO_ROOT=str(root.resolve()))
    t0 = time.time()
    try:
        pm.execute_notebook(str(ch.source_notebook), str(nb_out), parameters=params, cwd=str(ch.folder),
                            kernel_name="python3", progress_bar=False, log_output=log_output)
    except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
        msg = getattr(e, "evalue", None) or str(e).strip().splitlines()[-1]
        ename = getattr(e, "ename", type(e).__name__)
        return Result(ch.id, profile, False, time.time() - t0, nb_out, None, f"{ename}: {msg} (see {nb_out})")
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.time() - t0
    if not ledger_out.is_file():
        return Result(ch.id, profile, False, seconds, nb_out, None, "the notebook wrote no ledger (no run.finish()?)")
    data = ledger.read(ledger_out)
    res = Result(ch.id, profile, True, seconds, nb_out, ledger_out,
                 grades=Counter(c["grade"] for c in data["claims"]))
    if publish:
        res.ledger = publish_run(root, ch, nb_out, ledger_out)
    return res


def _settle(text: str) -> str:
    """What a terminal would show: within each line, a carriage return overwrites what came before."""
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p]
        lines.append(parts[-1] if parts else "")
    return "\n".join(lines)


def tidy_outputs(nb) -> int:
    """Merge each cell's consecutive stream outputs and settle carriage returns, so that a progress bar's
    hundreds of refreshes render as its final state. Only stream text changes; returns outputs removed."""
    removed = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1].get("name") == out.get("name")):
                merged[-1]["text"] += out["text"]
                removed += 1
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = _settle(out["text"])
        cell["outputs"] = merged
    return removed


def publish_run(root: Path, ch: Chapter, nb_path: Path, ledger_path: Path) -> Path:
    """Make an executed gpu/full run the committed one: its notebook replaces the chapter's, its ledger
    becomes its device's run (results/<profile>/<chapter>/<device>.json; other devices' runs are kept),
    and the scoreboard is regenerated. Smoke and CPU runs are refused. A staged next version of the notebook
    (``ch.next_notebook``), which a run of it executed, is removed: the published notebook is that version now."""
    data = ledger.read(ledger_path)
    if data["chapter"] != ch.id:
        raise PublishError(f"{ledger_path} is a ledger of {data['chapter']}, not {ch.id}")
    if data["profile"] not in ("gpu", "full"):
        raise PublishError(f"{ledger_path}: a {data['profile']} run never replaces the committed outputs")
    if "CPU" in data["fingerprint"]["device"]:
        raise PublishError(f"{ledger_path}: device {data['fingerprint']['device']!r}: not a GPU run")
    short = ledger.under_replicated(data)
    if short:
        raise PublishError(f"{ledger_path}: fewer replicates than declared, so it cannot be published: " + "; ".join(short))
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    injected = nb.metadata.get("papermill", {}).get("parameters", {})
    if injected.get("profile") != data["profile"]:
        raise PublishError(f"{nb_path}: ran with profile {injected.get('profile')!r}, its ledger says {data['profile']!r}")
    tidy_outputs(nb)
    dest = ledger.path_for(root, data)
    notebooks.tidy(nb, root=root, chapter=ch.id, minutes=ch.minutes, ledger=str(dest.relative_to(root)))
    nbformat.write(nb, ch.notebook)
    ch.next_notebook.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ledger_path, dest)
    scoreboard.write(root)
    return dest


def jupyter_book() -> str:
    """The ``jupyter-book`` executable of this Python environment (1.x has no ``python -m`` entry)."""
    exe = Path(sys.executable).with_name("jupyter-book")
    return str(exe) if exe.is_file() else (shutil.which("jupyter-book") or "jupyter-book")


def build_html(root: Path, *, path_output: Path | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """``jupyter-book build`` with warnings as errors; the book renders committed outputs only."""
    cmd = [jupyter_book(), "build", str(root), "--builder", "html", "-W", "-n", "--keep-going"]
    if path_output is not None:
        cmd += ["--path-output", str(path_output)]
    return subprocess.run(cmd, cwd=root, capture_output=capture, text=True)


def run_book(root: Path, profile: str, *, publish: bool = False, build: bool = True,
             only: list[str] | None = None) -> list[Result]:
    chs = [c for c in chapters(root) if not only or c.id in only]
    results = []
    resolved = resolve_profile(profile)  # gpu/full without CUDA stops here, before any chapter runs
    for i, ch in enumerate(chs, 1):
        print(f"[{i}/{len(chs)}] {ch.id} · {resolved} (expected ~{ch.minutes.get(resolved, '?')} min) …", flush=True)
        try:
            r = run_chapter(root, ch, {"profile": profile}, publish=publish)
        except Exception as e:  # one failing chapter does not stop the others
            r = Result(ch.id, resolved, False, 0.0, error=f"{type(e).__name__}: {e}")
        print("    " + r.line(), flush=True)
        results.append(r)
    return results
