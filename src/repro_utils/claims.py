"""Claims: what a chapter declares in its ``claims.yaml`` before anything runs.

A claim says what a paper or repository asserts, where, at which setting, and the test that decides
whether our measurement reproduces it. The file is validated against ``schemas/claims.schema.json``;
a malformed file fails with the file, the claim id and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PROFILES = ("smoke", "gpu", "full")
# The fields that decide a grade. A ledger whose stored declaration differs in any of them is stale.
GRADING_FIELDS = ("holds_if", "reduced_scale_if", "partial_if", "profiles", "unit", "replicates", "deterministic",
                  "interval", "control", "power", "subject")
# What a claim *is*: changing any of these after a published run makes a new claim (a new id).
IDENTITY_FIELDS = ("metric", "unit", "holds_if", "reduced_scale_if", "partial_if")
GOAL_GRADING_FIELDS = ("target", "profiles", "unit", "replicates", "deterministic", "interval")
GOAL_IDENTITY_FIELDS = ("metric", "unit", "target")


class ClaimsError(ValueError):
    """A claims.yaml that does not follow the schema."""


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    source: dict[str, str]
    metric: str
    unit: str
    claimed: dict[str, Any]
    holds_if: dict[str, Any]
    profiles: dict[str, str]  # profile -> "own" | "reduced"
    reduced_scale_if: dict[str, Any] | None = None
    partial_if: dict[str, Any] | None = None
    replicates: int | None = None  # replicates the interval needs (seeds, repeated timings)
    deterministic: str | None = None  # or: why the number cannot vary (then one value suffices)
    interval: str = "t"  # "t" (Student-t 95% of the mean) or "bootstrap" (percentile, 95%)
    control: dict[str, Any] | None = None  # {what, unit, holds_if}: shows the setting can exhibit the effect
    power: str | None = None  # or: an argument with a number for why the setting can show the effect
    subject: str | None = None  # the artifact the claim is about (Marlin, FA3, vLLM)
    notes: str | None = None
    disagreement: str | None = None
    pending: str | None = None  # "YYYY-MM-DD: ..." declared after the last published run, for the next one

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Claim:
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "pending"}

    def grading_view(self) -> dict[str, Any]:
        """The fields that decide a grade: a ledger is stale when these change after its run."""
        return {k: getattr(self, k) for k in GRADING_FIELDS}

    def identity(self) -> dict[str, Any]:
        """What the claim measures and how it is tested: a change here needs a new id."""
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    @property
    def cite(self) -> str:
        s = self.source
        head = s.get("paper") or (s["repo"] + (f" `{s['file']}`" if "file" in s else ""))
        return f"{head}, {s['where']}"


@dataclass(frozen=True)
class Goal:
    """A target the course sets itself (a speed ratio against a baseline, a share of a roofline). Graded
    Met / Not met under the same interval rule as claims, shown apart, never counted on the ladder."""

    id: str
    goal: str
    metric: str
    unit: str
    target: dict[str, Any]
    baseline: str
    profiles: tuple[str, ...]
    replicates: int | None = None
    deterministic: str | None = None
    interval: str = "t"
    notes: str | None = None
    pending: str | None = None  # as Claim.pending

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Goal:
        d = dict(d)
        d["profiles"] = tuple(d["profiles"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v is not None and k != "pending"}
        d["profiles"] = list(self.profiles)
        return d

    def grading_view(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in GOAL_GRADING_FIELDS}

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in GOAL_IDENTITY_FIELDS}


@dataclass(frozen=True)
class Chapter:
    id: str
    title: str
    minutes: dict[str, float]
    parameters: dict[str, dict[str, Any]]
    claims: tuple[Claim, ...]
    folder: Path = field(compare=False)
    goals: tuple[Goal, ...] = ()

    @property
    def notebook(self) -> Path:
        return self.folder / f"{self.id}.ipynb"

    @property
    def next_notebook(self) -> Path:
        """The chapter's next version, staged: ``<chapter>.next.ipynb``, without outputs, beside the published
        notebook. Where it exists, every run executes it (CI's smoke run tests it), the book keeps rendering the
        published one, and publishing a gpu/full run of it replaces the published notebook and removes it."""
        return self.folder / f"{self.id}.next.ipynb"

    @property
    def source_notebook(self) -> Path:
        """The notebook a run executes: the staged next version if there is one, else the published one."""
        return self.next_notebook if self.next_notebook.is_file() else self.notebook

    @property
    def staged(self) -> str | None:
        """The staged next version's file name while there is one (the published page's running note then names it
        as the one to run), else None."""
        return self.next_notebook.name if self.next_notebook.is_file() else None

    def claim(self, claim_id: str) -> Claim:
        for c in self.claims:
            if c.id == claim_id:
                return c
        raise KeyError(f"chapter {self.id} declares no claim {claim_id!r}; its claims are: "
                       + ", ".join(c.id for c in self.claims)
                       + ("; its goals are: " + ", ".join(g.id for g in self.goals) if self.goals else ""))

    def goal(self, goal_id: str) -> Goal:
        for g in self.goals:
            if g.id == goal_id:
                return g
        raise KeyError(f"chapter {self.id} declares no goal {goal_id!r}; its goals are: "
                       + (", ".join(g.id for g in self.goals) or "(none)"))


@cache
def schema(name: str) -> dict[str, Any]:
    return json.loads(resources.files("repro_utils").joinpath("schemas", name).read_text())


def _where(path: Path, data: dict[str, Any], err: jsonschema.ValidationError) -> str:
    loc = list(err.absolute_path)
    parts = []
    if len(loc) >= 2 and loc[0] == "claims" and isinstance(loc[1], int):
        try:
            parts.append(f"claim {data['claims'][loc[1]].get('id', '#' + str(loc[1]))!r}")
        except (KeyError, IndexError, AttributeError):
            parts.append(f"claim #{loc[1]}")
        loc = loc[2:]
    elif len(loc) >= 2 and loc[0] == "parameters":
        parts.append(f"parameter {loc[1]!r}")
        loc = loc[2:]
    field_ = ".".join(str(x) for x in loc) or "(top level)"
    return f"{path}: {' '.join(parts) + ', ' if parts else ''}field {field_}: {err.message}"


def load_chapter(path: str | Path) -> Chapter:
    """Load and validate a chapter's claims.yaml (path to the file or to its folder)."""
    path = Path(path).resolve()
    if path.is_dir():
        path = path / "claims.yaml"
    if not path.is_file():
        raise ClaimsError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ClaimsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ClaimsError(f"{path}: expected a mapping at the top level")
    validator = jsonschema.Draft202012Validator(schema("claims.schema.json"))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ClaimsError(_where(path, data, best))
    if data["chapter"] != path.parent.name:
        raise ClaimsError(f"{path}: field chapter: {data['chapter']!r} must equal its folder's name "
                          f"{path.parent.name!r}")
    seen: set[str] = set()
    for kind, c in [("claim", c) for c in data["claims"]] + [("goal", g) for g in data.get("goals", [])]:
        if c["id"] in seen:
            raise ClaimsError(f"{path}: {kind} {c['id']!r}, field id: declared twice (claims and goals share ids)")
        seen.add(c["id"])
        if ("replicates" in c) == ("deterministic" in c):
            raise ClaimsError(f"{path}: {kind} {c['id']!r}: declare exactly one of `replicates` (how many seeds or "
                              "repeated timings the interval needs) and `deterministic` (why the number cannot vary)")
        if c.get("interval") == "bootstrap" and c.get("replicates", 0) < 10:
            raise ClaimsError(f"{path}: {kind} {c['id']!r}: a bootstrap interval needs replicates ≥ 10 "
                              "(use interval: t below that)")
        if "deterministic" in c and c.get("interval"):
            raise ClaimsError(f"{path}: {kind} {c['id']!r}: a deterministic number has no interval kind")
    from repro_utils.profiles import check_spec  # late import: profiles imports this module

    for name, spec in data["parameters"].items():
        try:
            check_spec(name, spec)
        except ValueError as e:
            raise ClaimsError(f"{path}: parameter {name!r}: {e}") from None
    claims = tuple(Claim.from_dict(c) for c in data["claims"])
    goals = tuple(Goal.from_dict(g) for g in data.get("goals", []))
    return Chapter(id=data["chapter"], title=data["title"], minutes=data["minutes"],
                   parameters=data["parameters"], claims=claims, folder=path.parent, goals=goals)


def find_root(start: str | Path | None = None) -> Path:
    """The course's root: the nearest folder above ``start`` (default: cwd) holding _toc.yml."""
    import os

    if os.environ.get("REPRO_ROOT"):
        return Path(os.environ["REPRO_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "_toc.yml").is_file() and (p / "chapters").is_dir():
            return p
    raise FileNotFoundError(f"no course root (a folder with _toc.yml and chapters/) above {here}")


def chapters(root: str | Path) -> list[Chapter]:
    """Every chapter under ``root/chapters``, in order."""
    return [load_chapter(p) for p in sorted(Path(root, "chapters").glob("*/claims.yaml"))]


def resolve_chapter(root: str | Path, name: str) -> Chapter:
    """A chapter by its id (``03_flash_attention``), number (``03``, ``3``) or slug (``flash_attention``)."""
    folders = sorted(p.parent for p in Path(root, "chapters").glob("*/claims.yaml"))
    ids = [f.name for f in folders]
    key = name.strip().rstrip("/").split("/")[-1]
    hits = [f for f in folders if key in (f.name, f.name[:2], f.name[3:]) or
            (key.isdigit() and f.name[:2] == key.zfill(2))]
    if len(hits) != 1:
        raise KeyError(f"unknown chapter {name!r}; chapters are: {', '.join(ids) or '(none)'}")
    return load_chapter(hits[0])
