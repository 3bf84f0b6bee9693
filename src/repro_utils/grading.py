"""Grading: a pure function of (claim, measurement, profile) onto the ladder.

| rung | meaning |
|---|---|
| Reproduced | at the claim's own setting, the measurement passes ``holds_if`` |
| Reproduced at reduced scale | at a smaller or substitute setting, it passes ``reduced_scale_if`` (default ``holds_if``) |
| Partially reproduced | the effect is there but weaker: it passes only ``partial_if``, or only ``reduced_scale_if`` at the own setting |
| Not reproduced | a setting that tests the claim shows no effect or the opposite |
| Unverified | nothing was measured: the profile, hardware, data or time could not test it |

A grade never rises above what the evidence supports: a reduced setting can never be graded
Reproduced, and a measurement that declares itself reduced stays reduced in any profile.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from repro_utils.claims import Claim

REPRODUCED = "Reproduced"
REDUCED = "Reproduced at reduced scale"
PARTIAL = "Partially reproduced"
NOT_REPRODUCED = "Not reproduced"
UNVERIFIED = "Unverified"
RUNGS = (REPRODUCED, REDUCED, PARTIAL, NOT_REPRODUCED, UNVERIFIED)


@dataclass(frozen=True)
class Measurement:
    """What a run measured for one claim.

    ``value`` is what the test sees; with several seeds pass ``values`` and the mean is graded.
    ``why_untested`` records that the run could not test the claim (the value stays None).
    ``scale`` may lower the profile's scale to "reduced" (never raise it).
    """

    setting: str
    value: float | bool | str | None = None
    unit: str = ""
    values: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()
    scale: str | None = None
    why_untested: str | None = None
    note: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.values:
            vals = tuple(float(v) for v in self.values)
            object.__setattr__(self, "values", vals)
            mean = statistics.fmean(vals)
            if self.value is not None and not math.isclose(float(self.value), mean, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"value {self.value} is not the mean of values {vals}")
            object.__setattr__(self, "value", mean)
        if self.scale not in (None, "own", "reduced"):
            raise ValueError(f"scale must be 'own' or 'reduced', not {self.scale!r}")
        if self.why_untested and self.value is not None:
            raise ValueError("a measurement is either a value or a reason it could not be taken, not both")
        if isinstance(self.value, float) and not math.isfinite(self.value):
            raise ValueError(f"measured value is not finite: {self.value}")

    @property
    def spread(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v not in (None, (), {})}
        for k in ("values", "seeds"):
            if k in d:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        d = dict(d)
        for k in ("values", "seeds"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class Grade:
    rung: str
    reason: str


def fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.3g}"
        return f"{x:.4g}" if abs(x) < 100 else f"{x:,.1f}".rstrip("0").rstrip(".")
    return str(x)


def _with_unit(v: Any, unit: str) -> str:
    if not unit or isinstance(v, str):  # a claimed value in words ("above 1") takes no unit
        return fmt(v)
    return f"{fmt(v)}{unit}" if unit in ("x", "×", "%") else f"{fmt(v)} {unit}"


def describe_test(test: dict[str, Any], unit: str) -> str:
    (kind, arg), = test.items()
    if kind == "at_least":
        return f"≥ {_with_unit(arg, unit)}"
    if kind == "at_most":
        return f"≤ {_with_unit(arg, unit)}"
    if kind == "between":
        return f"in [{fmt(arg[0])}, {_with_unit(arg[1], unit)}]"
    if kind == "within":
        if "rel" in arg:
            return f"within {fmt(100 * arg['rel'])}% of {_with_unit(arg['of'], unit)}"
        return f"within ±{fmt(arg.get('abs', 0.0))} of {_with_unit(arg['of'], unit)}"
    if kind == "equals":
        return f"= {_with_unit(arg, unit)}"
    raise ValueError(f"unknown test {kind!r}")


def passes(test: dict[str, Any], value: Any) -> bool:
    """Whether ``value`` passes ``test``. Boundaries count as passing (≥, ≤, closed intervals)."""
    (kind, arg), = test.items()
    if kind == "equals":
        return value == arg
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"test {kind!r} needs a number, got {value!r}")
    v = float(value)
    if kind == "at_least":
        return v >= arg
    if kind == "at_most":
        return v <= arg
    if kind == "between":
        return arg[0] <= v <= arg[1]
    if kind == "within":
        tol = arg.get("abs", 0.0) + arg.get("rel", 0.0) * abs(arg["of"])
        # a hair of slack for binary floating point: "within 10% of 20" must admit 22.0
        return abs(v - arg["of"]) <= tol * (1 + 1e-12) + 1e-15
    raise ValueError(f"unknown test {kind!r}")


def describe_measurement(m: Measurement, unit: str) -> str:
    if m.spread is not None:
        core = f"{fmt(m.value)} ± {m.spread:.2g}"
        core = f"{core}{unit}" if unit in ("x", "×", "%") else f"{core} {unit}".rstrip()
        return f"{core}, mean ± sd of {len(m.values)} runs"
    return _with_unit(m.value, unit)


def grade(claim: Claim, m: Measurement | None, profile: str) -> Grade:
    """Grade one claim. Pure: the same inputs always give the same grade and reason."""
    claimed = f"claim {_with_unit(claim.claimed['value'], claim.unit)} ({claim.claimed['setting']})"
    if profile not in claim.profiles:
        can = ", ".join(claim.profiles)
        return Grade(UNVERIFIED, f"The {profile} profile cannot test this claim (it is tested by: {can}); {claimed}.")
    if m is None:
        return Grade(UNVERIFIED, f"No measurement was recorded in the {profile} run; {claimed}.")
    if m.why_untested:
        return Grade(UNVERIFIED, f"Not tested in the {profile} run: {m.why_untested}; {claimed}.")
    if m.value is None:
        return Grade(UNVERIFIED, f"The {profile} run recorded no value and no reason; {claimed}.")
    scale = "reduced" if "reduced" in (claim.profiles[profile], m.scale) else "own"
    holds, reduced_test = claim.holds_if, claim.reduced_scale_if or claim.holds_if
    measured = f"Measured {describe_measurement(m, claim.unit)} ({m.setting})"
    rule = f"reproduced if {describe_test(holds, claim.unit)}"
    if claim.reduced_scale_if:
        rule += f", at reduced scale if {describe_test(claim.reduced_scale_if, claim.unit)}"
    if claim.partial_if:
        rule += f", partially if {describe_test(claim.partial_if, claim.unit)}"
    partial = claim.partial_if is not None and passes(claim.partial_if, m.value)
    if scale == "own":
        if passes(holds, m.value):
            rung, why = REPRODUCED, "passes at the claim's own setting"
        elif passes(reduced_test, m.value) or partial:
            rung, why = PARTIAL, "the effect is there but short of the claim's test"
        else:
            rung, why = NOT_REPRODUCED, "fails the test at the claim's own setting"
    else:
        if passes(reduced_test, m.value):
            rung, why = REDUCED, "passes at a reduced setting"
        elif partial:
            rung, why = PARTIAL, "the effect is there but weaker than the test asks"
        else:
            rung, why = NOT_REPRODUCED, "fails the test at the reduced setting"
    return Grade(rung, f"{measured} vs {claimed}; {rule}: {why}.")
