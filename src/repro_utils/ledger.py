"""The ledger: ``results/<profile>/<chapter>.json``, one run of one chapter, written by runs only.

It holds the parameters, every claim as declared when the run started, what was measured, the grade
and its reason, and the run's fingerprint. ``repro check`` re-derives each grade from it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema

from repro_utils.claims import Claim, schema
from repro_utils.grading import Grade, Measurement, grade


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


@dataclass(frozen=True)
class Entry:
    claim: Claim
    measured: Measurement | None
    grade: Grade

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.claim.id, "declared": self.claim.to_dict(),
                "measured": self.measured.to_dict() if self.measured else None,
                "grade": self.grade.rung, "reason": self.grade.reason}


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


def rederive(data: dict[str, Any], path: str | Path = "<ledger>") -> list[str]:
    """Problems where a stored grade does not follow from the stored claim and measurement.

    The grade is compared, not the wording of its reason, so that the reason's phrasing can improve
    without invalidating committed runs.
    """
    problems = []
    for c in data["claims"]:
        claim = Claim.from_dict(c["declared"])
        m = Measurement.from_dict(c["measured"]) if c["measured"] else None
        g = grade(claim, m, data["profile"])
        if g.rung != c["grade"]:
            problems.append(f"{path}: claim {c['id']!r}: stored grade {c['grade']!r} but its measurement "
                            f"grades {g.rung!r} ({g.reason})")
    return problems
