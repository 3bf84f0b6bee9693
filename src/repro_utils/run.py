"""One run of one chapter, as a notebook sees it.

    run = start(profile=profile, seed=seed, n_max=n_max)   # validates, seeds, fingerprints
    P = run.params                                         # every parameter, defaults filled in
    ...
    run.record("memory-linear", 17.9, setting="H100, fp16, N=4096, d=64")
    run.untested("fa3-speed", "no FA3 kernel runs on this machine")
    run.finish()                                           # writes the ledger, shows the claim card
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro_utils import ledger
from repro_utils.claims import Chapter, find_root, load_chapter
from repro_utils.display import markdown
from repro_utils.grading import Grade, Measurement, _with_unit, describe_measurement, grade
from repro_utils.profiles import resolve


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
    extra: dict[str, Any] = field(default_factory=dict)

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
               note: str | None = None, details: dict[str, Any] | None = None) -> Grade:
        """Record what was measured for one claim; returns (and prints) its grade."""
        claim = self.chapter.claim(claim_id)
        if scale is None and self.profile in ("gpu", "full") and not reference_gpu():
            scale = "reduced"  # the course's gpu/full settings assume an H100-class GPU; elsewhere, never Reproduced
            note = ((note + " ") if note else "") + "Run on a GPU other than the course's reference (H100/H200)."
        m = Measurement(setting=setting, value=value, unit=claim.unit, values=tuple(values or ()),
                        seeds=tuple(int(s) for s in (seeds or ())), scale=scale, note=note,
                        details=dict(details or {}))
        return self._enter(claim, m)

    def untested(self, claim_id: str, why: str, setting: str = "not run") -> Grade:
        """Record that this run could not test a claim, and why: it grades Unverified."""
        claim = self.chapter.claim(claim_id)
        return self._enter(claim, Measurement(setting=setting, unit=claim.unit, why_untested=why))

    def _enter(self, claim, m: Measurement) -> Grade:
        g = grade(claim, m, self.profile)
        self.entries[claim.id] = ledger.Entry(claim, m, g)
        print(f"[{claim.id}] {g.rung}: {g.reason}")
        return g

    def to_dict(self) -> dict[str, Any]:
        entries = []
        for c in self.chapter.claims:
            e = self.entries.get(c.id) or ledger.Entry(c, None, grade(c, None, self.profile))
            entries.append(e.to_dict())
        return {
            "schema_version": 1,
            "chapter": self.chapter.id,
            "profile": self.profile,
            "parameters": self.params,
            "claims": entries,
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
        return data


def card(data: dict[str, Any]) -> str:
    """The claim card: one row per claim, from a ledger."""
    fp = data["fingerprint"]
    rows = ["| claim | source | claimed | measured | grade |", "|---|---|---|---|---|"]
    for c in data["claims"]:
        d, m = c["declared"], c["measured"]
        src = d["source"].get("paper") or (d["source"]["repo"] + (f" `{d['source']['file']}`" if "file" in d["source"] else ""))
        claimed = f"{_with_unit(d['claimed']['value'], d['unit'])} — {d['claimed']['setting']}"
        if m is None or m.get("why_untested"):
            measured = "not measured" + (f": {m['why_untested']}" if m else "")
        else:
            measured = f"{describe_measurement(Measurement.from_dict(m), d['unit'])} — {m['setting']}"
        rows.append(f"| **{c['id']}**: {d['claim']} | {src}, {d['source']['where']} | {claimed} | {measured} "
                    f"| **{c['grade']}** |")
    reasons = "\n".join(f"- **{c['id']}** — {c['grade']}. {c['reason']}" for c in data["claims"])
    head = (f"**Claim card: {data['chapter']}** · profile `{data['profile']}` · {fp['device']} · "
            f"torch {fp['torch']} · commit `{fp['commit'][:10]}{'-dirty' if fp['dirty'] else ''}` · "
            f"{fp['started'][:16].replace('T', ' ')} UTC · {fp['wall_seconds'] / 60:.1f} min · seed {fp['seed']}")
    return f"{head}\n\n" + "\n".join(rows) + "\n\n" + reasons


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
