"""The ladder, rung by rung, and its boundaries; then the evidence standard: intervals, replicates,
controls and power, substitutes, goals. Grading is pure: same inputs, same grade and reason."""

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
    unverified_kind,
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
        # the ladder's own tests use single exact numbers; the standard's tests below declare replicates
        deterministic="peak bytes from the allocator's counters at fixed shapes",
        power="standard attention at N=4096 materialises a 4096² score matrix per head: 10x is far from noise",
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


def test_several_seeds_grade_their_t_interval_not_their_mean():
    c = claim(deterministic=None, replicates=3)
    g = grade(c, m(None, values=[11.0, 12.0, 13.0], seeds=[0, 1, 2]), "gpu")
    # mean 12, sd 1, t(0.975, 2) = 4.3027: [12 - 2.484, 12 + 2.484] = [9.516, 14.48] straddles 10
    assert g.rung == UNVERIFIED and "straddles" in g.reason and "[9.516, 14.48]" in g.reason
    g = grade(c, m(None, values=[11.5, 12.0, 12.5]), "gpu")  # [10.76, 13.24]: the whole interval passes
    assert g.rung == REPRODUCED and "95% t interval, n=3" in g.reason


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


def test_the_reason_is_one_sentence_ending_in_a_full_stop():
    for v in (17.9, 7.0, 3.0, 1.0):
        reason = grade(claim(), m(v), "gpu").reason
        assert reason.endswith(".")


def test_describe_test_reads_like_math():
    assert describe_test({"at_least": 10}, "x") == "≥ 10x"
    assert describe_test({"within": {"of": 20, "rel": 0.1}}, "x") == "within 10% of 20x"
    assert describe_test({"between": [0.68, 1.13]}, "") == "in [0.68, 1.13]"


# --- the evidence standard ----------------------------------------------------------------------

from repro_utils.claims import Goal  # noqa: E402
from repro_utils.grading import (  # noqa: E402
    MET,
    NOT_MET,
    bootstrap_interval,
    grade_goal,
    t_interval,
    t_quantile,
)


def replicated(**kw) -> Claim:
    return claim(**{"deterministic": None, "power": None, "replicates": 3, **kw})


@pytest.mark.parametrize("df,q", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (30, 2.042272)])
def test_t_quantiles_match_the_tables(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)  # tables give 6 decimals


def test_t_interval_of_three_seeds():
    iv = t_interval([2.0937979245999325, 1.7425301427899516, 2.0264328166757966])
    # scipy.stats.t.interval(0.95, 2, loc=mean, scale=sem) gives (1.4911458, 2.4173614)
    assert (iv.lo, iv.hi) == (pytest.approx(1.4911458, abs=1e-6), pytest.approx(2.4173614, abs=1e-6))


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    vals = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99, 1.0]
    a, b = bootstrap_interval(vals), bootstrap_interval(vals)
    assert a == b and a.lo < a.mean < a.hi and a.method == "bootstrap"


@pytest.mark.parametrize("values,rung", [
    ([10.0, 10.0, 10.0], REPRODUCED),   # a degenerate interval touching the bar from above: passes (≥)
    ([9.9, 10.0, 10.1], UNVERIFIED),    # [9.75, 10.25] touches both sides of 10: inconclusive
    ([6.0, 7.0, 8.0], PARTIAL),         # [4.52, 9.48] fails 10; straddles 5 but passes 2: Partial either way
    ([6.9, 7.0, 7.1], PARTIAL),         # [6.75, 7.25] fails 10, passes 5
    ([1.0, 1.1, 1.2], UNVERIFIED),      # fails every test, but no control and no power: cannot say Not reproduced
])
def test_the_interval_decides_or_the_grade_is_unverified(values, rung):
    assert grade(replicated(), m(None, values=values), "gpu").rung == rung


def test_an_interval_touching_a_bar_exactly_passes_it():
    c = replicated(holds_if={"at_least": 1.0}, reduced_scale_if=None, partial_if=None)
    iv = t_interval([1.5, 2.0, 2.5])
    lo_shift = 1.0 - iv.lo  # shift the replicates so that the interval's lower end sits exactly on the bar
    vals = [1.5 + lo_shift, 2.0 + lo_shift, 2.5 + lo_shift]
    assert t_interval(vals).lo == pytest.approx(1.0, abs=1e-12)
    assert grade(c, m(None, values=vals), "gpu").rung in (REPRODUCED, UNVERIFIED)  # float rounding either side
    assert grade(c, m(None, values=[v + 1e-9 for v in vals]), "gpu").rung == REPRODUCED


def test_one_replicate_when_three_are_declared_is_unverified_and_says_so():
    g = grade(replicated(), m(17.9), "gpu")
    assert g.rung == UNVERIFIED and "1 replicate recorded where 3 are declared" in g.reason
    g = grade(replicated(), m(None, values=[17.0, 18.0]), "gpu")
    assert g.rung == UNVERIFIED and "2 replicates recorded where 3 are declared" in g.reason


def test_a_deterministic_claim_whose_values_differ_is_refused():
    g = grade(claim(), m(None, values=[17.0, 18.0]), "gpu")
    assert g.rung == UNVERIFIED and "declared deterministic" in g.reason


def test_a_negative_needs_a_passing_control_or_a_power_argument():
    values = [1.0, 1.1, 1.2]  # fails every test decisively
    assert grade(replicated(), m(None, values=values), "gpu").rung == UNVERIFIED
    powered = replicated(power="the claimed 20x is 40 times the run-to-run spread of this ratio (0.5x)")
    g = grade(powered, m(None, values=values), "gpu")
    assert g.rung == NOT_REPRODUCED and "power:" in g.reason
    ctl = {"what": "standard attention's own growth from N=2048 to 4096", "unit": "x", "holds_if": {"at_least": 3}}
    c = replicated(control=ctl)
    assert grade(c, m(None, values=values), "gpu").rung == UNVERIFIED  # control declared, not measured
    failing = m(None, values=values, control={"setting": "same run", "values": [2.0, 2.1, 2.2]})
    g = grade(c, failing, "gpu")
    assert g.rung == UNVERIFIED and "could not show the effect" in g.reason and "it fails" in g.reason
    passing = m(None, values=values, control={"setting": "same run", "values": [3.9, 4.0, 4.1]})
    assert grade(c, passing, "gpu").rung == NOT_REPRODUCED


def test_a_declared_control_that_fails_also_withholds_a_positive():
    ctl = {"what": "RTN-3's perplexity increase", "unit": "%", "holds_if": {"at_least": 5}}
    c = replicated(control=ctl)
    good = [17.8, 17.9, 18.0]
    g = grade(c, m(None, values=good, control={"setting": "same run", "values": [0.8, 0.85, 0.9]}), "gpu")
    assert g.rung == UNVERIFIED and "could not fail" in g.reason
    g = grade(c, m(None, values=good, control={"setting": "same run", "values": [6.0, 6.5, 7.0]}), "gpu")
    assert g.rung == REPRODUCED


def test_a_control_whose_interval_straddles_its_bar_reads_inconclusive_not_could_not_fail():
    """A control that neither passes nor fails leaves open whether the test could fail: the run cannot tell."""
    ctl = {"what": "cold prefill over the suffix alone", "unit": "x", "holds_if": {"at_least": 10}}
    c = replicated(control=ctl)
    g = grade(c, m(None, values=[17.8, 17.9, 18.0], control={"setting": "same run", "values": [2.0, 8.0, 16.0]}),
              "gpu")
    assert g.rung == UNVERIFIED and unverified_kind(g.reason) == "inconclusive", g.reason
    assert "could not fail" not in g.reason and "control's interval straddles its bar" in g.reason


def test_an_inconclusive_interval_names_a_failing_control_too():
    ctl = {"what": "GRPO's own gain over its start", "unit": "points", "holds_if": {"at_least": 1}}
    c = replicated(control=ctl)
    straddling = [4.0, 10.0, 16.0]  # mean 10, interval ~[-4.9, 24.9] straddles every bar
    g = grade(c, m(None, values=straddling, control={"setting": "same run", "values": [0.2, 0.3, 0.5]}), "gpu")
    assert g.rung == UNVERIFIED and "straddles" in g.reason and "even a decided interval would not count" in g.reason
    assert "it fails" in g.reason
    g = grade(c, m(None, values=straddling, control={"setting": "same run", "values": [3.0, 3.1, 3.2]}), "gpu")
    assert g.rung == UNVERIFIED and "straddles" in g.reason and "would not count" not in g.reason


def test_a_substitute_artifact_grades_unverified():
    c = replicated(subject="Marlin")
    vals = [2.4, 2.45, 2.5]
    g = grade(c, m(None, values=vals, artifact="the chapter's Triton INT4 kernel"), "gpu")
    assert g.rung == UNVERIFIED and "Substitute" in g.reason and "Marlin" in g.reason
    assert grade(c, m(None, values=vals), "gpu").rung == UNVERIFIED  # the run did not say what it measured
    assert grade(c, m(None, values=[17.8, 17.9, 18.0], artifact="Marlin"), "gpu").rung == REPRODUCED


def test_a_reduced_scale_failure_is_labelled_so():
    c = replicated(profiles={"gpu": "reduced"}, power="a declared argument with a number: 3x the noise")
    g = grade(c, m(None, values=[1.0, 1.1, 1.2]), "gpu")
    assert g.rung == NOT_REPRODUCED and g.label == "Not reproduced (reduced scale)"
    assert grade(claim(), m(1.0), "gpu").label == "Not reproduced"  # own scale: no label


def goal(**kw) -> Goal:
    base = dict(id="moe-layer-vs-dense", goal="Our grouped layer runs at 0.7x of dense or better.", metric="ratio",
                unit="x", target={"at_least": 0.7}, baseline="dense FFN, same run", profiles=("gpu",),
                replicates=3)
    base.update(kw)
    return Goal(**base)


@pytest.mark.parametrize("values,result", [
    ([0.80, 0.81, 0.82], MET), ([0.50, 0.51, 0.52], NOT_MET), ([0.6, 0.7, 0.8], UNVERIFIED),
])
def test_a_goal_is_met_not_met_or_inconclusive(values, result):
    assert grade_goal(goal(), m(None, values=values), "gpu").rung == result


def test_a_goal_is_never_a_rung_of_the_ladder():
    g = grade_goal(goal(), m(None, values=[0.80, 0.81, 0.82]), "gpu")
    assert g.rung not in (REPRODUCED, REDUCED, PARTIAL, NOT_REPRODUCED)
    assert grade_goal(goal(), m(None, values=[0.8]), "gpu").rung == UNVERIFIED  # 1 of 3 replicates
    assert grade_goal(goal(), m(None, values=[0.8, 0.8, 0.8]), "smoke").rung == UNVERIFIED  # not its profile
