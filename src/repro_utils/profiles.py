"""Profiles and parameters.

Every chapter runs in three profiles: ``smoke`` (CPU, minutes; what CI runs), ``gpu`` (one H100, about
ten minutes; the outputs the book shows) and ``full`` (the claim's own scale where one GPU holds it).
``auto`` means gpu when CUDA is visible, smoke otherwise.

A chapter declares its parameters in claims.yaml (type, default — one value or one per profile —,
choices or bounds, help). ``profile`` and ``seed`` are declared for every chapter. Validation follows
nanoGPT's configurator: an unknown name or a value of the wrong type or range stops the run at once,
with a message that names the parameter and what it accepts.
"""

from __future__ import annotations

from typing import Any

import yaml

PROFILE_CHOICES = ("auto", "smoke", "gpu", "full")
COMMON = {
    "profile": {"type": "str", "default": "auto", "choices": list(PROFILE_CHOICES),
                "help": "smoke (CPU, minutes), gpu (one H100, ~10 min), full (the claim's scale), auto"},
    "seed": {"type": "int", "default": 0, "min": 0, "help": "seed for python, numpy and torch"},
}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list, tuple)}


class ParameterError(ValueError):
    """A parameter that the chapter does not know, or a value it does not accept."""


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_profile(profile: str, *, cuda: bool | None = None) -> str:
    if profile not in PROFILE_CHOICES:
        raise ParameterError(f"parameter 'profile': {profile!r} is not one of {', '.join(PROFILE_CHOICES)}")
    cuda = cuda_available() if cuda is None else cuda
    if profile == "auto":
        return "gpu" if cuda else "smoke"
    if profile in ("gpu", "full") and not cuda:
        raise ParameterError(f"parameter 'profile': {profile!r} needs a CUDA GPU and none is visible; "
                             "use profile='smoke' (or 'auto') on this machine")
    return profile


def check_spec(name: str, spec: dict[str, Any]) -> None:
    """A parameter declaration must accept its own defaults."""
    default = spec["default"]
    defaults = default.values() if isinstance(default, dict) else [default]
    if isinstance(default, dict) and not set(default) <= {"smoke", "gpu", "full"}:
        raise ValueError(f"per-profile default has keys {sorted(default)}; allowed: smoke, gpu, full")
    for d in defaults:
        check_value(name, spec, d)


def check_value(name: str, spec: dict[str, Any], value: Any) -> Any:
    kind = spec["type"]
    if value is None:
        raise ParameterError(f"parameter {name!r}: None is not a {kind}")
    ok = isinstance(value, _TYPES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise ParameterError(f"parameter {name!r}: {value!r} is a {type(value).__name__}, expected {kind}"
                             + (f" (one of {spec['choices']})" if "choices" in spec else ""))
    if kind == "float":
        value = float(value)
    if "choices" in spec:
        bad = [v for v in (value if kind == "list" else [value]) if v not in spec["choices"]]
        if bad:
            raise ParameterError(f"parameter {name!r}: {bad[0]!r} is not allowed; allowed values: "
                                 + ", ".join(map(repr, spec["choices"])))
    for v in (value if kind == "list" else [value]):
        if "min" in spec and isinstance(v, (int, float)) and v < spec["min"]:
            raise ParameterError(f"parameter {name!r}: {v!r} is below its minimum {spec['min']}")
        if "max" in spec and isinstance(v, (int, float)) and v > spec["max"]:
            raise ParameterError(f"parameter {name!r}: {v!r} is above its maximum {spec['max']}")
    return list(value) if kind == "list" else value


def all_specs(chapter_params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**COMMON, **chapter_params}


def resolve(chapter_params: dict[str, dict[str, Any]], given: dict[str, Any], *,
            cuda: bool | None = None, chapter: str = "") -> dict[str, Any]:
    """Validate ``given`` against the chapter's declarations and fill every default for the profile.

    A value of None means "the profile's default". Returns every parameter, with ``profile`` concrete.
    """
    specs = all_specs(chapter_params)
    where = f" of chapter {chapter}" if chapter else ""
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ParameterError(f"unknown parameter {unknown[0]!r}{where}; known parameters: {', '.join(specs)}")
    profile = resolve_profile(given.get("profile") or "auto", cuda=cuda)
    out: dict[str, Any] = {"profile": profile}
    for name, spec in specs.items():
        if name == "profile":
            continue
        value = given.get(name)
        if value is None:
            d = spec["default"]
            value = d.get(profile, d.get("gpu") if profile == "full" else None) if isinstance(d, dict) else d
            if value is None:
                raise ParameterError(f"parameter {name!r}{where} has no default for profile {profile!r}; pass one")
        out[name] = check_value(name, spec, value)
    return out


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``["n=4", "lr=1e-3", "name=abc", "sizes=[1,2]"]`` -> typed values (YAML scalars)."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ParameterError(f"-p {p!r}: expected key=value")
        k, v = p.split("=", 1)
        k = k.strip()
        try:
            parsed = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            parsed = v
        if isinstance(parsed, str) and _looks_float(parsed):
            parsed = float(parsed)  # YAML 1.1 reads "1e-3" as a string
        out[k] = parsed
    return out


def _looks_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")
