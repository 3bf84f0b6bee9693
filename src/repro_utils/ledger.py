"""The ledger: ``results/<profile>/<chapter>/<device>.json``, the latest published run of one chapter on
one device, written by runs only (``repro publish``, ``repro import``), never by hand.

It holds the parameters, every claim and goal as declared when the run started, what was measured (the
replicates), the interval, the grade and its reason, and the run's fingerprint. Each device keeps its
own file, so an H100 run and an H200 run sit side by side; earlier runs of a device are in git history.
``repro check`` re-derives every grade and interval from it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from repro_utils.claims import Claim, Goal, schema
from repro_utils.grading import Grade, Measurement, grade, grade_goal

SCHEMA_VERSION = 2


class LedgerError(ValueError):
    """A ledger file that does not follow the schema or whose grades do not follow from its data."""


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit(cwd: str | Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty). REPRO_COMMIT overrides, for copies of the tree without .git (e.g. a GPU box)."""
    if os.environ.get("REPRO_COMMIT"):
        c = os.environ["REPRO_COMMIT"]
        return c.removesuffix("-dirty"), c.endswith("-dirty")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=cwd,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return head, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def fingerprint(*, started: str, wall_seconds: float, seed: int) -> dict[str, Any]:
    """Where and how a run was measured."""
    try:
        import torch

        cuda = torch.cuda.is_available()
        device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        cuda_v = torch.version.cuda if cuda else None
        torch_v = torch.__version__
    except ImportError:
        device, cuda_v, torch_v = f"CPU ({platform.machine()})", None, None
    commit, dirty = git_commit()
    return {
        "device": device,
        "cuda": cuda_v,
        "torch": torch_v,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "dirty": dirty,
        "started": started,
        "wall_seconds": round(wall_seconds, 2),
        "seed": seed,
        "data": f"REPRO_DATA_DIR={os.environ['REPRO_DATA_DIR']}" if os.environ.get("REPRO_DATA_DIR") else "network (hub)",
        "packages": {p: v for p in ("transformers", "trl", "peft", "accelerate", "datasets", "numpy")
                     if (v := _version(p))},
    }


def device_slug(device: str) -> str:
    """A file name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return slug or "unknown-device"


def path_for(root: str | Path, data: dict[str, Any]) -> Path:
    """Where a run's ledger lives in the committed tree."""
    return Path(root) / "results" / data["profile"] / data["chapter"] / f"{device_slug(data['fingerprint']['device'])}.json"


def published(root: str | Path, chapter: str, profiles: tuple[str, ...] = ("gpu", "full")) -> list[tuple[Path, dict]]:
    """Every committed run of a chapter: one per profile and device."""
    out = []
    for p in profiles:
        for f in sorted((Path(root) / "results" / p / chapter).glob("*.json")):
            out.append((f, read(f)))
    return out


def graded_later(root: str | Path, data: dict, kind: str, cid: str) -> dict | None:
    """A later committed run (same chapter and profile, another device) that grades ``cid``, which ``data`` lacks.

    A claim or goal declared after one device's run and graded by the next run on another device is absent from
    the older ledger for an honest reason: it did not exist when that run was made. ``kind``: "claims" or "goals".
    """
    started = data["fingerprint"]["started"]
    for _, other in published(root, data["chapter"], (data["profile"],)):
        if other["fingerprint"]["started"] > started and any(e["id"] == cid for e in other.get(kind, [])):
            return other
    return None


@functools.cache
def ids_declared_at(root: str, chapter: str, commit: str) -> frozenset[str] | None:
    """The claim and goal ids in a chapter's claims.yaml at ``commit``; None where git cannot say (no history,
    a shallow clone, a commit that never had the file)."""
    try:
        text = subprocess.run(["git", "show", f"{commit}:chapters/{chapter}/claims.yaml"], cwd=root,
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    d = yaml.safe_load(text) or {}
    return frozenset(e["id"] for e in (d.get("claims") or []) + (d.get("goals") or []))


DECLARED_AFTER = "declared after this run"


def declared_after_run(root: str | Path, data: dict, cid: str) -> bool:
    """Whether ``cid`` did not exist when the run that wrote ``data`` was made (read from git; False where git
    cannot say). A regrade (``repro regrade``) re-grades an older ledger under today's claims.yaml, so a claim
    declared since then sits in it unmeasured: it was never that run's to test. The regrade stamps such an entry
    (``why_untested`` starting with ``DECLARED_AFTER``), so tables need no git history to say so."""
    ids = ids_declared_at(str(root), data["chapter"], data["fingerprint"].get("commit", ""))
    return ids is not None and cid not in ids


def is_declared_after(entry: dict) -> bool:
    """A ledger entry stamped by a regrade as declared after its run (see ``declared_after_run``)."""
    return (entry.get("measured") or {}).get("why_untested", "").startswith(DECLARED_AFTER)


def latest(root: str | Path, chapter: str) -> tuple[Path, dict] | None:
    """The most recent committed run of a chapter (the one its committed notebook shows), or None."""
    runs = published(root, chapter)
    return max(runs, key=lambda r: r[1]["fingerprint"]["started"]) if runs else None


@dataclass(frozen=True)
class Entry:
    claim: Claim | Goal
    measured: Measurement | None
    grade: Grade

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.claim.id, "declared": self.claim.to_dict(),
             "measured": self.measured.to_dict() if self.measured else None,
             "grade": self.grade.rung, "reason": self.grade.reason,
             "interval": self.grade.interval.to_dict() if self.grade.interval else None}
        if isinstance(self.claim, Claim):
            d["scale"] = self.grade.scale
        return d


def validate(data: dict[str, Any], path: str | Path = "<ledger>") -> None:
    v = jsonschema.Draft202012Validator(schema("ledger.schema.json"))
    errs = list(v.iter_errors(data))
    if errs:
        e = jsonschema.exceptions.best_match(errs)
        loc = ".".join(str(x) for x in e.absolute_path) or "(top level)"
        raise LedgerError(f"{path}: field {loc}: {e.message}")


def write(path: str | Path, data: dict[str, Any]) -> Path:
    validate(data, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LedgerError(f"{path}: not valid JSON: {e}") from None
    validate(data, path)
    return data


def under_replicated(data: dict[str, Any]) -> list[str]:
    """Entries whose measurement holds fewer replicates than their declaration asks for."""
    out = []
    for c in list(data["claims"]) + list(data.get("goals", [])):
        need, m = c["declared"].get("replicates"), c["measured"]
        if need and m and not m.get("why_untested") and m.get("value") is not None:
            n = len(m.get("values") or ()) or 1
            if n < need:
                out.append(f"{c['id']!r} recorded {n} replicate(s) where {need} are declared")
    return out


def _same_interval(stored: dict[str, Any] | None, iv) -> bool:
    if stored is None or iv is None:
        return stored is None and iv is None
    new = iv.to_dict()
    if stored.get("method") != new["method"] or stored.get("n") != new["n"]:
        return False
    for k in ("mean", "lo", "hi", "level"):
        a, b = stored.get(k), new[k]
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif a != b:
            return False
    return True


def regrade_entry(entry: dict[str, Any], profile: str, kind: str = "claim") -> Grade:
    """The grade that an entry's stored declaration and measurement give under the current rules."""
    m = Measurement.from_dict(entry["measured"]) if entry["measured"] else None
    if kind == "goal":
        return grade_goal(Goal.from_dict(entry["declared"]), m, profile)
    return grade(Claim.from_dict(entry["declared"]), m, profile)


def rederive(data: dict[str, Any], path: str | Path = "<ledger>") -> list[str]:
    """Problems where a stored grade or interval does not follow from the stored declaration and measurement
    (a hand-edited grade, replicate or interval).

    The grade and interval are compared, not the wording of the reason, so that the reason's phrasing can
    improve without invalidating committed runs. Version-1 ledgers (before the evidence standard) are
    not re-derived: they must be regraded (``repro regrade``) or rerun.
    """
    if data.get("schema_version", 1) < SCHEMA_VERSION:
        return [f"{path}: schema_version {data.get('schema_version', 1)} predates the evidence standard: "
                "`repro regrade` it (re-grades its own measurements) or rerun the chapter"]
    problems = []
    for kind, entries in (("claim", data["claims"]), ("goal", data.get("goals", []))):
        for c in entries:
            try:
                g = regrade_entry(c, data["profile"], kind)
            except (TypeError, ValueError, KeyError) as e:
                problems.append(f"{path}: {kind} {c['id']!r}: its stored measurement is inconsistent "
                                f"(hand-edited?): {e}")
                continue
            if g.rung != c["grade"]:
                problems.append(f"{path}: {kind} {c['id']!r}: stored grade {c['grade']!r} but its measurement "
                                f"grades {g.rung!r} ({g.reason})")
            elif not _same_interval(c.get("interval"), g.interval):
                problems.append(f"{path}: {kind} {c['id']!r}: stored interval {c.get('interval')} does not follow "
                                f"from its replicates (re-derived: {g.interval.to_dict() if g.interval else None}): "
                                "a hand-edited replicate or interval")
    return problems
