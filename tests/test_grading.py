"""The ladder, rung by rung, and its boundaries. Grading is pure: same inputs, same grade and reason."""

from __future__ import annotations

import pytest

from repro_utils.claims import Claim
from repro_utils.grading import (
    NOT_REPRODUCED,
    PARTIAL,
    REDUCED,
    REPRODUCED,
    UNVERIFIED,
    Measurement,
    describe_test,
    grade,
    passes,
)


def claim(**kw) -> Claim:
    base = dict(
        id="memory-saving",
        claim="FlashAttention saves about 20x memory at N=4096.",
        source={"paper": "Dao et al. 2022", "where": "§4.3, Fig. 3"},
        metric="peak-memory ratio standard/flash",
        unit="x",
        claimed={"value": 20, "setting": "A100, N=4096, d=64"},
        holds_if={"at_least": 10},
        reduced_scale_if={"at_least": 5},
        partial_if={"at_least": 2},
        profiles={"gpu": "own", "full": "own"},
    )
    base.update(kw)
    return Claim(**base)


def m(value, **kw) -> Measurement:
    return Measurement(setting=kw.pop("setting", "H100, N=4096, d=64"), value=value, unit="x", **kw)


# --- each rung ---------------------------------------------------------------------------------

def test_own_setting_passing_the_test_is_reproduced():
    g = grade(claim(), m(17.9), "gpu")
    assert g.rung == REPRODUCED
    assert "17.9x" in g.reason and "20x" in g.reason  # both numbers
    assert "H100, N=4096" in g.reason and "A100, N=4096" in g.reason  # both settings


def test_reduced_setting_passing_is_reproduced_at_reduced_scale_never_reproduced():
    c = claim(profiles={"gpu": "reduced"})
    assert grade(c, m(17.9), "gpu").rung == REDUCED
    assert grade(c, m(6.0), "gpu").rung == REDUCED  # passes reduced_scale_if (≥ 5)


def test_weaker_effect_is_partially_reproduced():
    assert grade(claim(), m(7.0), "gpu").rung == PARTIAL  # own setting: reduced test only
    assert grade(claim(), m(3.0), "gpu").rung == PARTIAL  # partial_if only
    assert grade(claim(profiles={"gpu": "reduced"}), m(3.0), "gpu").rung == PARTIAL


def test_no_effect_is_not_reproduced():
    assert grade(claim(), m(1.0), "gpu").rung == NOT_REPRODUCED
    assert grade(claim(profiles={"gpu": "reduced"}), m(1.5), "gpu").rung == NOT_REPRODUCED


def test_wrong_direction_is_not_reproduced():
    # a "saving" below 1 means the kernel used MORE memory: the opposite of the claim
    assert grade(claim(), m(0.5), "gpu").rung == NOT_REPRODUCED
    faster = claim(unit="ms", holds_if={"at_most": 1.0}, reduced_scale_if=None, partial_if=None)
    assert grade(faster, Measurement(setting="s", value=1.3, unit="ms"), "gpu").rung == NOT_REPRODUCED


def test_cpu_smoke_run_of_a_gpu_claim_is_unverified_even_with_a_value():
    g = grade(claim(), m(50.0), "smoke")
    assert g.rung == UNVERIFIED
    assert "smoke profile cannot test" in g.reason and "20x" in g.reason


def test_missing_measurement_is_unverified():
    g = grade(claim(), None, "gpu")
    assert g.rung == UNVERIFIED and "No measurement" in g.reason


def test_untested_with_a_reason_is_unverified_and_says_why():
    g = grade(claim(), Measurement(setting="H100", unit="x", why_untested="no FA3 kernel runs here"), "gpu")
    assert g.rung == UNVERIFIED and "no FA3 kernel runs here" in g.reason


# --- boundaries --------------------------------------------------------------------------------

@pytest.mark.parametrize("value,rung", [
    (10.0, REPRODUCED),          # exactly at the tolerance: passes
    (9.999, PARTIAL),            # just outside: the reduced test still holds
    (5.0, PARTIAL),
    (2.0, PARTIAL),              # at the partial boundary
    (1.999, NOT_REPRODUCED),     # just below it
])
def test_boundaries_at_and_just_outside_tolerance(value, rung):
    assert grade(claim(), m(value), "gpu").rung == rung


@pytest.mark.parametrize("test,value,ok", [
    ({"at_most": 2.0}, 2.0, True), ({"at_most": 2.0}, 2.0001, False),
    ({"between": [0.68, 1.13]}, 0.68, True), ({"between": [0.68, 1.13]}, 1.1301, False),
    ({"within": {"of": 20, "rel": 0.1}}, 22.0, True), ({"within": {"of": 20, "rel": 0.1}}, 22.01, False),
    ({"within": {"of": 0.5, "abs": 0.01}}, 0.49, True), ({"within": {"of": 0.5, "abs": 0.01}}, 0.4899, False),
    ({"equals": True}, True, True), ({"equals": True}, False, False),
])
def test_each_kind_of_test_at_its_boundary(test, value, ok):
    assert passes(test, value) is ok


def test_a_number_test_refuses_a_non_number():
    with pytest.raises(TypeError):
        passes({"at_least": 1}, "fast")
    with pytest.raises(TypeError):
        passes({"at_least": 1}, True)


def test_measurement_that_declares_itself_reduced_cannot_be_graded_reproduced():
    assert grade(claim(), m(17.9, scale="reduced"), "gpu").rung == REDUCED


def test_several_seeds_grade_their_mean_and_report_the_spread():
    g = grade(claim(), m(None, values=[9.0, 11.0, 13.0], seeds=[0, 1, 2]), "gpu")
    assert g.rung == REPRODUCED  # mean 11 ≥ 10
    assert "11 ± 2x, mean ± sd of 3 runs" in g.reason
    assert grade(claim(), m(None, values=[8.0, 9.0, 12.0]), "gpu").rung == PARTIAL  # mean 9.67 < 10


def test_value_must_be_the_mean_of_values():
    with pytest.raises(ValueError):
        m(5.0, values=[1.0, 2.0])


def test_a_value_and_a_reason_for_not_measuring_are_exclusive():
    with pytest.raises(ValueError):
        Measurement(setting="s", value=1.0, why_untested="no GPU")


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError):
        m(float("nan"))


def test_grading_is_pure():
    assert grade(claim(), m(7.0), "gpu") == grade(claim(), m(7.0), "gpu")


def test_the_reason_is_one_sentence():
    for v in (17.9, 7.0, 3.0, 1.0):
        reason = grade(claim(), m(v), "gpu").reason
        assert reason.endswith(".") and reason.count(". ") == 0


def test_describe_test_reads_like_math():
    assert describe_test({"at_least": 10}, "x") == "≥ 10x"
    assert describe_test({"within": {"of": 20, "rel": 0.1}}, "x") == "within 10% of 20x"
    assert describe_test({"between": [0.68, 1.13]}, "") == "in [0.68, 1.13]"
