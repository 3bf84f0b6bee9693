"""One run of one chapter, as a notebook sees it.

    run = start(profile=profile, seed=seed, n_max=n_max)   # validates, seeds, fingerprints
    P = run.params                                         # every parameter, defaults filled in
    ...
    run.record("memory-saving", 17.9, setting="H100, fp16, N=4096, d=64")        # a deterministic claim
    run.record("fa2-speed", values=[318.2, 321.0, 317.5], setting="H200, d=128")  # replicates -> interval
    run.goal("fwd-vs-cudnn", values=[0.81, 0.83, 0.80], setting="H200, N=4096")   # the course's own target
    run.untested("fa3-speed", "no FA3 kernel runs on this machine")
    run.finish()                                           # writes the ledger, shows the claim card
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro_utils import ledger
from repro_utils.claims import Chapter, Claim, Goal, find_root, load_chapter
from repro_utils.display import markdown
from repro_utils.grading import (
    Grade,
    Measurement,
    _with_unit,
    describe_test,
    grade,
    grade_goal,
    label,
    table_grade,
    table_measured,
)
from repro_utils.profiles import resolve


class ReplicatesWarning(UserWarning):
    """A claim or goal recorded with fewer replicates than it declares."""


class ReplicatesError(RuntimeError):
    """A gpu/full run that recorded fewer replicates than its claims declare: it cannot be published."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)  # seeds every CUDA device too
    except ImportError:
        pass


def reference_gpu() -> bool:
    """Whether this machine's GPU is the course's reference hardware (an H100 or H200)."""
    try:
        import torch

        return torch.cuda.is_available() and any(k in torch.cuda.get_device_name(0) for k in ("H100", "H200"))
    except ImportError:
        return False


def out_dir(profile: str) -> Path:
    """Where a run writes its ledger: $REPRO_OUT (set by ``repro run``), else _build/runs/<profile>.

    Never the committed results/: publishing a gpu run there is ``repro run --publish``'s job.
    """
    if os.environ.get("REPRO_OUT"):
        return Path(os.environ["REPRO_OUT"])
    try:
        return find_root() / "_build" / "runs" / profile
    except FileNotFoundError:
        return Path.cwd() / "_build" / "runs" / profile


@dataclass
class Run:
    chapter: Chapter
    params: dict[str, Any]
    started: str
    t0: float
    entries: dict[str, ledger.Entry] = field(default_factory=dict)
    goal_entries: dict[str, ledger.Entry] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    short: list[str] = field(default_factory=list)  # under-replicated records (see _check_replicates)

    @property
    def profile(self) -> str:
        return self.params["profile"]

    @property
    def seed(self) -> int:
        return self.params["seed"]

    @property
    def device(self):
        import torch

        return torch.device("cuda" if self.profile in ("gpu", "full") else "cpu")

    def record(self, claim_id: str, value: float | bool | str | None = None, *, setting: str,
               values: list[float] | None = None, seeds: list[int] | None = None, scale: str | None = None,
               note: str | None = None, details: dict[str, Any] | None = None,
               control: dict[str, Any] | None = None, artifact: str | None = None) -> Grade:
        """Record what was measured for one claim; returns its grade (and prints it).

        ``values`` are the replicates (seeds, repeated timings); fewer than the claim declares warns at once
        and grades Unverified (see ``_check_replicates``). ``control`` is the claim's declared control, measured in this run ({setting, values}).
        ``artifact`` names what was measured where the claim is about a specific artifact."""
        claim = self.chapter.claim(claim_id)
        self._check_replicates(claim, value, values, what="claim")
        if claim.control and control is not None:
            self._check_replicates(claim, control.get("value"), control.get("values"), what="control of claim")
        m = self._measurement(claim.unit, value, setting, values, seeds, scale, note, details,
                              control=control, artifact=artifact)
        return self._enter(claim, m)

    def goal(self, goal_id: str, value: float | None = None, *, setting: str, values: list[float] | None = None,
             seeds: list[int] | None = None, note: str | None = None, details: dict[str, Any] | None = None) -> Grade:
        """Record a measurement of one of the chapter's goals (the course's own targets): Met / Not met."""
        goal = self.chapter.goal(goal_id)
        self._check_replicates(goal, value, values, what="goal")
        return self._enter_goal(goal, self._measurement(goal.unit, value, setting, values, seeds, None, note, details))

    def untested(self, claim_id: str, why: str, setting: str = "not run") -> Grade:
        """Record that this run could not test a claim or goal, and why: it grades Unverified."""
        try:
            spec = self.chapter.claim(claim_id)
        except KeyError:
            spec = self.chapter.goal(claim_id)
        m = Measurement(setting=setting, unit=spec.unit, why_untested=why)
        return self._enter_goal(spec, m) if isinstance(spec, Goal) else self._enter(spec, m)

    def _check_replicates(self, spec: Claim | Goal, value, values, *, what: str) -> None:
        """Fewer replicates than declared: a loud warning now, Unverified ("inconclusive") in the grade, and
        ``finish()`` refuses the run as a gpu/full result once its ledger is safely written."""
        if spec.deterministic or not spec.replicates:
            return
        n = len(values or ()) or (1 if value is not None else 0)
        if n < spec.replicates:
            msg = (f"{what} {spec.id!r} declares {spec.replicates} replicates; this run recorded {n}. Pass "
                   "values=[...] (one per seed or repeated timing), or declare fewer in claims.yaml before the run.")
            self.short.append(msg)
            warnings.warn(msg, ReplicatesWarning, stacklevel=3)

    def _measurement(self, unit, value, setting, values, seeds, scale, note, details, **extra) -> Measurement:
        if scale is None and self.profile in ("gpu", "full") and not reference_gpu():
            scale = "reduced"  # the course's gpu/full settings assume an H100-class GPU; elsewhere, never Reproduced
            note = ((note + " ") if note else "") + "Run on a GPU other than the course's reference (H100/H200)."
        return Measurement(setting=setting, value=value, unit=unit, values=tuple(values or ()),
                           seeds=tuple(int(s) for s in (seeds or ())), scale=scale, note=note,
                           details=dict(details or {}), **extra)

    def _enter(self, claim, m: Measurement) -> Grade:
        g = grade(claim, m, self.profile)
        self.entries[claim.id] = ledger.Entry(claim, m, g)
        print(f"[{claim.id}] {g.label}: {g.reason}")
        return g

    def _enter_goal(self, goal: Goal, m: Measurement) -> Grade:
        g = grade_goal(goal, m, self.profile)
        self.goal_entries[goal.id] = ledger.Entry(goal, m, g)
        print(f"[goal {goal.id}] {g.rung}: {g.reason}")
        return g

    def to_dict(self) -> dict[str, Any]:
        # A pending claim or goal (declared for a run the notebook does not make yet) enters the ledger only once
        # the notebook records it; every other unrecorded one is graded Unverified.
        entries = []
        for c in self.chapter.claims:
            if c.pending and c.id not in self.entries:
                continue
            e = self.entries.get(c.id) or ledger.Entry(c, None, grade(c, None, self.profile))
            entries.append(e.to_dict())
        goals = []
        for gl in self.chapter.goals:
            if gl.pending and gl.id not in self.goal_entries:
                continue
            e = self.goal_entries.get(gl.id) or ledger.Entry(gl, None, grade_goal(gl, None, self.profile))
            goals.append(e.to_dict())
        return {
            "schema_version": ledger.SCHEMA_VERSION,
            "chapter": self.chapter.id,
            "profile": self.profile,
            "parameters": self.params,
            "claims": entries,
            "goals": goals,
            "extra": self.extra,
            "fingerprint": ledger.fingerprint(started=self.started, wall_seconds=time.time() - self.t0,
                                              seed=self.seed),
        }

    def finish(self, *, show: bool = True) -> dict[str, Any]:
        """Grade every declared claim (unrecorded ones are Unverified), write the ledger, show the card."""
        data = self.to_dict()
        path = ledger.write(out_dir(self.profile) / f"{self.chapter.id}.json", data)
        if show:
            markdown(card(data))
            print(f"ledger: {path}")
        if self.short and self.profile in ("gpu", "full"):
            raise ReplicatesError(f"this {self.profile} run cannot be published: " + " ".join(self.short)
                                  + f" (its ledger is kept at {path}; the affected grades are Unverified)")
        return data


def card(data: dict[str, Any]) -> str:
    """The claim card, from a ledger: a slim table (claim, claimed, measured with its interval, scale,
    grade), the goals in a table of their own, and the long text (the claim, both settings, the source,
    the reason) in a list below."""
    fp = data["fingerprint"]
    rows = ["| claim | claimed | measured (95% interval) | scale | grade |", "|---|---|---|---|---|"]
    notes = []
    for c in data["claims"]:
        d, m = c["declared"], c["measured"]
        scale = c.get("scale") or "—"
        rows.append(f"| {c['id']} | {_with_unit(d['claimed']['value'], d['unit'])} | {table_measured(c, d['unit'])} "
                    f"| {scale} | **{table_grade(c)}** |")
        src = d["source"].get("paper") or (d["source"]["repo"] + (f" `{d['source']['file']}`" if "file" in d["source"] else ""))
        measured = m and not m.get("why_untested")
        if measured and m["setting"] in c["reason"] and d["claimed"]["setting"] in c["reason"]:
            settings = ""  # the reason already reads "Measured v (its setting) vs claim c (the claim's setting)"
        else:
            settings = f"*Claimed at:* {d['claimed']['setting']}; " + (f"measured at: {m['setting']}. " if measured
                                                                     else "not measured. ")
        notes.append(f"- **`{c['id']}`** · {label(c['grade'], c.get('scale'))}. {d['claim']} *Source:* {src}, "
                     f"{d['source']['where']}. {settings}{c['reason']}")
    out = [f"**Claim card: {data['chapter']}** · profile `{data['profile']}` · {fp['device']} · "
           f"torch {fp['torch']} · commit `{fp['commit'][:10]}{'-dirty' if fp['dirty'] else ''}` · "
           f"{fp['started'][:16].replace('T', ' ')} UTC · {fp['wall_seconds'] / 60:.1f} min · seed {fp['seed']}",
           "", *rows]
    if data.get("regraded"):
        r = data["regraded"][-1]
        out += ["", f"*Regraded {r['date']} at commit `{r['commit'][:10]}` from this run's own measurements: {r['note']}*"]
    goals = data.get("goals") or []
    if goals:
        out += ["", "**The course's own goals** (targets we set; never counted as reproductions)", "",
                "| goal | target | measured (95% interval) | result |", "|---|---|---|---|"]
        for g in goals:
            d = g["declared"]
            out.append(f"| {g['id']} | {describe_test(d['target'], d['unit'])} | {table_measured(g, d['unit'])} "
                       f"| **{table_grade(g)}** |")
            notes.append(f"- **goal `{g['id']}`** · {g['grade']}. {d['goal']} *Baseline:* {d['baseline']}. {g['reason']}")
    return "\n".join(out) + "\n\n" + "\n".join(notes)


class Clock:
    """A notebook's time per section and its safety valve: a part of the run (or one seed of it) starts only if the
    time it is expected to take still fits in ``budget_s`` seconds since ``t0`` (``run.t0``); otherwise its claims are
    recorded Unverified ('time budget'), so that a run never dies at the device call's limit with nothing saved.
    ``parts`` (optional) are the run's ``parts`` parameter: a part not among them is skipped, saying so."""

    def __init__(self, t0: float, budget_s: float, parts: list[str] | None = None):
        self.t0, self.budget_s, self.parts, self.laps = t0, budget_s, parts, {}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def skip(self, part: str | None = None, expect_s: float = 0.0) -> str | None:
        """None if ``part`` (or, without one, work expected to take ``expect_s`` seconds) may start now, else why not."""
        if part is not None and self.parts is not None and part not in self.parts:
            return f"the '{part}' part is not among this run's parts ({', '.join(self.parts)})"
        if self.elapsed() + expect_s > self.budget_s:
            return (f"time budget: {self.elapsed():.0f} s elapsed + ~{expect_s:.0f} s expected > "
                    f"budget_s = {self.budget_s:.0f} s")
        return None

    def lap(self, name: str, since: float) -> None:
        """Record and print the seconds a section took since ``since`` (a time.time())."""
        self.laps[name] = round(time.time() - since, 1)
        print(f"[{name}: {self.laps[name]:.0f} s; {self.elapsed():.0f} s since the run started]")


def start(claims: str | Path = "claims.yaml", **given: Any) -> Run:
    """Begin a run: load and validate the chapter, check the parameters, seed everything.

    ``given`` are the notebook's parameters (None = the profile's default). A bad one raises
    ParameterError before anything else happens.
    """
    chapter = load_chapter(claims)
    params = resolve(chapter.parameters, given, chapter=chapter.id)
    seed_everything(params["seed"])
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    run = Run(chapter=chapter, params=params, started=started, t0=time.time())
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
    print(f"{chapter.id} · profile {params['profile']} · {ledger.fingerprint(started=started, wall_seconds=0, seed=params['seed'])['device']}\n{shown}")
    return run
