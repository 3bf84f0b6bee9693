"""Grading: a pure function of (claim, measurement, profile) onto the ladder, under the evidence standard.

| rung | meaning |
|---|---|
| Reproduced | at the claim's own setting, the whole interval passes ``holds_if`` |
| Reproduced at reduced scale | at a smaller or substitute setting, the whole interval passes ``reduced_scale_if`` (default ``holds_if``) |
| Partially reproduced | the effect is there but weaker: the whole interval passes only ``partial_if`` (or, at the own setting, ``reduced_scale_if``) |
| Not reproduced | the whole interval fails every test that applies, AND the same run showed the setting could exhibit the effect (a passing control, or a declared power argument) |
| Unverified | not tested; or inconclusive (the interval straddles a bar that decides between rungs); or a negative without power; or a measurement of another artifact than the claim's subject |

The interval is the claim's declared kind (``interval: t``, the default: Student-t 95% interval of the
mean of the replicates; ``interval: bootstrap``: percentile bootstrap of the mean, 10,000 resamples,
seed 0). A quantity that cannot vary declares ``deterministic: why`` and its interval is the point.
A grade never rises above what the evidence supports: a reduced setting is never Reproduced, and a
measurement that declares itself reduced stays reduced in any profile.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from repro_utils.claims import Claim, Goal

REPRODUCED = "Reproduced"
REDUCED = "Reproduced at reduced scale"
PARTIAL = "Partially reproduced"
NOT_REPRODUCED = "Not reproduced"
UNVERIFIED = "Unverified"
RUNGS = (REPRODUCED, REDUCED, PARTIAL, NOT_REPRODUCED, UNVERIFIED)
MET, NOT_MET = "Met", "Not met"
GOAL_GRADES = (MET, NOT_MET, UNVERIFIED)
LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Measurement:
    """What a run measured for one claim or goal.

    ``values`` are the replicates (one per seed, or one per repeated timing); ``value`` is their mean
    (given alone, it is a single measurement, enough only for a claim declared ``deterministic``).
    ``why_untested`` records that the run could not test the claim (the value stays None).
    ``scale`` may lower the profile's scale to "reduced" (never raise it). ``control`` is the same run's
    measurement of the claim's declared control ({setting, value | values}). ``artifact`` names what was
    measured, for claims about a specific artifact (their ``subject``).
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
    control: dict[str, Any] | None = None
    artifact: str | None = None

    def __post_init__(self):
        if self.values:
            vals = tuple(float(v) for v in self.values)
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"a replicate is not finite: {vals}")
            object.__setattr__(self, "values", vals)
            mean = statistics.fmean(vals)
            if self.value is not None and not math.isclose(float(self.value), mean, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"value {self.value} is not the mean of its replicates {vals}")
            object.__setattr__(self, "value", mean)
        if self.seeds and self.values and len(self.seeds) != len(self.values):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.values)} replicates")
        if self.scale not in (None, "own", "reduced"):
            raise ValueError(f"scale must be 'own' or 'reduced', not {self.scale!r}")
        if self.why_untested and self.value is not None:
            raise ValueError("a measurement is either a value or a reason it could not be taken, not both")
        if isinstance(self.value, float) and not math.isfinite(self.value):
            raise ValueError(f"measured value is not finite: {self.value}")
        if self.control is not None:
            c = dict(self.control)
            if "setting" not in c or ("value" not in c and "values" not in c):
                raise ValueError("a control needs a setting and a value or values")
            if c.get("values"):
                c["values"] = [float(v) for v in c["values"]]
                mean = statistics.fmean(c["values"])
                if c.get("value") is not None and not math.isclose(float(c["value"]), mean, rel_tol=1e-9,
                                                                    abs_tol=1e-12):
                    raise ValueError(f"control value {c['value']} is not the mean of its replicates {c['values']}")
                c["value"] = mean
            object.__setattr__(self, "control", c)

    @property
    def n(self) -> int:
        return len(self.values) if self.values else (0 if self.value is None else 1)

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
class Interval:
    """The interval a grade is decided on: [lo, hi] around ``mean`` from ``n`` replicates."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str  # "t", "bootstrap" or "exact"
    level: float = LEVEL

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "level": self.level, "n": self.n, "mean": self.mean, "lo": self.lo,
                "hi": self.hi}

    def describe(self, unit: str = "") -> str:
        if self.method == "exact":
            return f"{_with_unit(self.mean, unit)} (exact)"
        kind = "t" if self.method == "t" else "bootstrap"
        return (f"{_with_unit(self.mean, unit)} [{fmt(self.lo)}, {fmt(self.hi)}] "
                f"({int(self.level * 100)}% {kind} interval, n={self.n})")


@dataclass(frozen=True)
class Grade:
    rung: str
    reason: str
    interval: Interval | None = None
    scale: str | None = None  # "own" | "reduced": the scale the grade was decided at

    @property
    def label(self) -> str:
        return label(self.rung, self.scale)


def label(rung: str, scale: str | None) -> str:
    """What a reader sees: a failure or a partial result at a reduced setting says so, so that it never
    reads as a refutation at the claim's own setting."""
    if scale == "reduced" and rung in (NOT_REPRODUCED, PARTIAL):
        return f"{rung} (reduced scale)"
    return rung


def table_measured(entry: dict[str, Any], unit: str = "", missing: str = "not measured") -> str:
    """A ledger entry's measurement as a table cell: the mean and its interval, or the exact value."""
    m, iv = entry["measured"], entry.get("interval")
    if m is None or m.get("why_untested"):
        return missing
    if iv and iv["method"] != "exact":
        return f"{_with_unit(iv['mean'], unit)} [{fmt(iv['lo'])}, {fmt(iv['hi'])}]"
    return _with_unit(m.get("value"), unit)


def table_grade(entry: dict[str, Any]) -> str:
    """A ledger entry's grade as a table cell: the scale-labelled rung, or Unverified with its short why."""
    if entry["grade"] == UNVERIFIED:
        return f"Unverified ({unverified_kind(entry['reason'])})"
    return label(entry["grade"], entry.get("scale"))


def unverified_kind(reason: str) -> str:
    """The short why of an Unverified grade, read off its reason (for tables)."""
    for prefix, kind in (("Inconclusive: the interval", "inconclusive"), ("Inconclusive: the control", "inconclusive"),
                         ("Inconclusive:", "too few replicates"),
                         ("The setting could not show", "no power"), ("A test that could not fail", "could not fail"),
                         ("Substitute", "substitute")):
        if reason.startswith(prefix):
            return kind
    return "not tested"


# --- statistics ------------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), not {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def t_interval(values: tuple[float, ...] | list[float], level: float = LEVEL) -> Interval:
    """Student-t interval of the mean: mean ± t_{(1+level)/2, n-1} · sd / √n."""
    n = len(values)
    if n < 2:
        raise ValueError("a t interval needs at least two replicates")
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t", level)


def bootstrap_interval(values, level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean (deterministic: a fixed seed)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise ValueError("a bootstrap interval needs at least two replicates")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(v.mean()), float(lo), float(hi), int(v.size), "bootstrap", level)


def interval_for(spec: Claim | Goal, m: Measurement | dict[str, Any]) -> Interval | str:
    """The interval ``spec`` declares, from ``m``'s replicates; a string says why there is none."""
    values = tuple(m.get("values") or ()) if isinstance(m, dict) else m.values
    value = m.get("value") if isinstance(m, dict) else m.value
    if spec.deterministic:
        if values and max(values) != min(values):
            return (f"declared deterministic, yet its {len(values)} values differ "
                    f"({fmt(min(values))} to {fmt(max(values))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return Interval(value, value, value, 1, "exact")  # type: ignore[arg-type]
        return Interval(float(value), float(value), float(value), max(1, len(values)), "exact")
    need = spec.replicates
    if not need:
        return "the claim declares neither `replicates` nor `deterministic`, so no interval can be formed"
    if len(values) < need:
        got = len(values) or (1 if value is not None else 0)
        return f"{got} replicate{'s' if got != 1 else ''} recorded where {need} are declared"
    return bootstrap_interval(values) if spec.interval == "bootstrap" else t_interval(values)


# --- tests -----------------------------------------------------------------------------------------

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


def _band(test: dict[str, Any]) -> tuple[float, float]:
    """The closed set of values a numeric test accepts, as [lo, hi]."""
    (kind, arg), = test.items()
    if kind == "at_least":
        return float(arg), math.inf
    if kind == "at_most":
        return -math.inf, float(arg)
    if kind == "between":
        return float(arg[0]), float(arg[1])
    if kind == "within":
        tol = arg.get("abs", 0.0) + arg.get("rel", 0.0) * abs(arg["of"])
        tol = tol * (1 + 1e-12) + 1e-15  # a hair of slack for binary floating point: "within 10% of 20" admits 22.0
        return arg["of"] - tol, arg["of"] + tol
    raise ValueError(f"unknown test {kind!r}")


PASS, FAIL, STRADDLE = "pass", "fail", "straddle"


def verdict(test: dict[str, Any], iv: Interval) -> str:
    """pass: the whole interval passes; fail: the whole interval fails; straddle: the run cannot tell.
    Boundaries count as passing (≥, ≤, closed intervals)."""
    (kind, arg), = test.items()
    if kind == "equals":
        if iv.lo == iv.hi:
            return PASS if iv.mean == arg else FAIL
        return STRADDLE if iv.lo <= arg <= iv.hi else FAIL
    if isinstance(iv.mean, bool) or not isinstance(iv.mean, (int, float)):
        raise TypeError(f"test {kind!r} needs a number, got {iv.mean!r}")
    a, b = _band(test)
    if a <= iv.lo and iv.hi <= b:
        return PASS
    if iv.hi < a or iv.lo > b:
        return FAIL
    return STRADDLE


def passes(test: dict[str, Any], value: Any) -> bool:
    """Whether one exact ``value`` passes ``test``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        (kind, arg), = test.items()
        if kind != "equals":
            raise TypeError(f"test {kind!r} needs a number, got {value!r}")
        return value == arg
    return verdict(test, Interval(value, value, value, 1, "exact")) == PASS


def describe_measurement(m: Measurement, unit: str, iv: Interval | None = None) -> str:
    if iv is not None:
        return iv.describe(unit)
    if m.spread is not None:
        core = f"{fmt(m.value)} ± {m.spread:.2g}"
        core = f"{core}{unit}" if unit in ("x", "×", "%") else f"{core} {unit}".rstrip()
        return f"{core}, mean ± sd of {len(m.values)}"
    return _with_unit(m.value, unit)


def _ladder(claim: Claim, scale: str) -> list[tuple[str, list[tuple[str, dict]]]]:
    """The rungs that apply at ``scale``, best first, each with the tests that lead to it."""
    reduced_test = claim.reduced_scale_if or claim.holds_if
    partial = [("partially", claim.partial_if)] if claim.partial_if else []
    if scale == "own":
        lower = ([("at reduced scale", claim.reduced_scale_if)] if claim.reduced_scale_if else []) + partial
        return [(REPRODUCED, [("reproduced", claim.holds_if)])] + ([(PARTIAL, lower)] if lower else [])
    return [(REDUCED, [("at reduced scale" if claim.reduced_scale_if else "reproduced", reduced_test)])] + \
        ([(PARTIAL, partial)] if partial else [])


def _control(claim: Claim, m: Measurement) -> tuple[str, str]:
    """The declared control's verdict (PASS, FAIL or STRADDLE; FAIL where it was not measured or has no interval)
    and what it measured."""
    spec = claim.control
    if m.control is None:
        return FAIL, f"its control ({spec['what']}) was not measured"
    iv = interval_for(claim, m.control)
    if isinstance(iv, str):
        return FAIL, f"its control ({spec['what']}) has no interval: {iv}"
    v = verdict(spec["holds_if"], iv)
    what = (f"control ({spec['what']}) measured {iv.describe(spec.get('unit', ''))} ({m.control['setting']}), "
            f"needs {describe_test(spec['holds_if'], spec.get('unit', ''))}")
    return v, what + {PASS: "", FAIL: ": it fails", STRADDLE: ": inconclusive"}[v]


def grade(claim: Claim, m: Measurement | None, profile: str) -> Grade:
    """Grade one claim. Pure: the same inputs always give the same grade, interval and reason."""
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
    if claim.subject and m.artifact != claim.subject:
        what = f"measured {m.artifact}" if m.artifact else f"did not record that what it measured is {claim.subject}"
        return Grade(UNVERIFIED, f"Substitute: the claim is about {claim.subject}; the run {what} "
                                 f"({_with_unit(m.value, claim.unit)}, {m.setting}); that figure is a goal or a "
                                 f"detail, never this claim's grade; {claimed}.", None, scale)
    iv = interval_for(claim, m)
    if isinstance(iv, str):
        return Grade(UNVERIFIED, f"Inconclusive: {iv} (measured {describe_measurement(m, claim.unit)}, "
                                 f"{m.setting}); {claimed}.", None, scale)
    measured = f"Measured {iv.describe(claim.unit)} ({m.setting}) vs {claimed}"
    ladder = _ladder(claim, scale)
    rule = "; ".join(f"{name} if {describe_test(t, claim.unit)}" for _, tests in ladder for name, t in tests)
    rung = NOT_REPRODUCED
    for candidate, tests in ladder:
        states = [verdict(t, iv) for _, t in tests]
        if PASS in states:
            rung = candidate
            break
        if STRADDLE in states:
            bar = next(f"{name} if {describe_test(t, claim.unit)}" for (name, t), s in zip(tests, states)
                       if s == STRADDLE)
            # a declared control that fails is said too: it would withhold the grade even if the interval decided
            also = ""
            if claim.control:
                state, what = _control(claim, m)
                also = "" if state == PASS else f"; and even a decided interval would not count: {what}"
            return Grade(UNVERIFIED, f"Inconclusive: the interval [{fmt(iv.lo)}, {fmt(iv.hi)}] straddles the "
                                     f"bar ({bar}){also}; {measured}; {rule}.", iv, scale)
    if claim.control:
        state, what = _control(claim, m)
        if state != PASS:
            if state == STRADDLE:  # the control's own interval straddles its bar: the run cannot tell
                return Grade(UNVERIFIED, f"Inconclusive: the control's interval straddles its bar, so the run cannot "
                                         f"tell whether the setting could show the effect: "
                                         f"{what.removesuffix(': inconclusive')}; {measured}; {rule}.", iv, scale)
            why = ("the setting could not show the effect" if rung == NOT_REPRODUCED
                   else "a test that could not fail is not a test")
            return Grade(UNVERIFIED, f"{why.capitalize()}: {what}; {measured}; {rule}.", iv, scale)
    elif rung == NOT_REPRODUCED and not claim.power:
        return Grade(UNVERIFIED, f"The setting could not show the effect: the interval fails every test, but "
                                 f"the claim declares no control and no power argument; {measured}; {rule}.",
                     iv, scale)
    why = {REPRODUCED: "passes at the claim's own setting",
           REDUCED: "passes at a reduced setting",
           PARTIAL: "the effect is there but short of the claim's test",
           NOT_REPRODUCED: "the whole interval fails every test " + (
               "at the claim's own setting" if scale == "own" else "at the reduced setting")}[rung]
    power = ""
    if rung == NOT_REPRODUCED:
        power = f" (power: {_control(claim, m)[1]})" if claim.control else f" (power: {claim.power})"
    return Grade(rung, f"{measured}; {rule}: {why}{power}.", iv, scale)


def grade_goal(goal: Goal, m: Measurement | None, profile: str) -> Grade:
    """Grade one of the course's own goals: Met, Not met, or Unverified (untested or inconclusive)."""
    target = f"target {describe_test(goal.target, goal.unit)} ({goal.baseline})"
    if profile not in goal.profiles:
        return Grade(UNVERIFIED, f"The {profile} profile does not test this goal (tested by: "
                                 f"{', '.join(goal.profiles)}); {target}.")
    if m is None or m.why_untested or m.value is None:
        why = m.why_untested if m is not None and m.why_untested else "no measurement was recorded"
        return Grade(UNVERIFIED, f"Not tested in the {profile} run: {why}; {target}.")
    iv = interval_for(goal, m)
    if isinstance(iv, str):
        return Grade(UNVERIFIED, f"Inconclusive: {iv} (measured {describe_measurement(m, goal.unit)}, "
                                 f"{m.setting}); {target}.")
    v = verdict(goal.target, iv)
    measured = f"Measured {iv.describe(goal.unit)} ({m.setting}); {target}"
    if v == STRADDLE:
        return Grade(UNVERIFIED, f"Inconclusive: the interval [{fmt(iv.lo)}, {fmt(iv.hi)}] straddles the "
                                 f"target; {measured}.", iv)
    return Grade(MET if v == PASS else NOT_MET, f"{measured}: {'met' if v == PASS else 'not met'}.", iv)
