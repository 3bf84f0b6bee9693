"""Parameters: unknown names and bad values stop a run at once, naming the parameter and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from repro_utils.claims import load_chapter
from repro_utils.profiles import ParameterError, parse_assignments, resolve, resolve_profile

SPEC = load_chapter(Path(__file__).parent / "fixtures" / "00_selftest").parameters


def test_defaults_follow_the_profile():
    assert resolve(SPEC, {}, cuda=False) == {"profile": "smoke", "seed": 0, "n": 100000, "method": "torch"}
    assert resolve(SPEC, {"profile": "auto"}, cuda=True)["n"] == 1000000
    assert resolve(SPEC, {"profile": "full"}, cuda=True)["n"] == 1000000  # full falls back to gpu's default
    assert resolve(SPEC, {"n": None, "seed": 3}, cuda=False)["seed"] == 3


@pytest.mark.parametrize("given,needles", [
    ({"bogus": 1}, ["unknown parameter 'bogus'", "known parameters: profile, seed, n, method"]),
    ({"n": "abc"}, ["'n'", "expected int"]),
    ({"n": 2.5}, ["'n'", "expected int"]),
    ({"n": True}, ["'n'", "expected int"]),
    ({"n": 10}, ["'n'", "below its minimum 100"]),
    ({"method": "jax"}, ["'method'", "'jax' is not allowed", "'torch', 'numpy'"]),
    ({"seed": -1}, ["'seed'", "below its minimum"]),
    ({"profile": "cloud"}, ["'profile'", "auto, smoke, gpu, full"]),
    ({"profile": "gpu"}, ["'profile'", "needs a CUDA GPU"]),
])
def test_bad_parameters_raise_with_the_name_and_allowed_values(given, needles):
    with pytest.raises(ParameterError) as e:
        resolve(SPEC, given, cuda=False)
    for n in needles:
        assert n in str(e.value)


def test_auto_picks_gpu_with_cuda_and_smoke_without():
    assert resolve_profile("auto", cuda=True) == "gpu"
    assert resolve_profile("auto", cuda=False) == "smoke"


def test_command_line_assignments_are_typed():
    assert parse_assignments(["n=4", "lr=1e-3", "name=abc", "sizes=[1, 2]", "flag=true"]) == {
        "n": 4, "lr": 1e-3, "name": "abc", "sizes": [1, 2], "flag": True}
    with pytest.raises(ParameterError, match="key=value"):
        parse_assignments(["n4"])
