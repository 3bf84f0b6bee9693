"""The notebooks' time valve (repro_utils.Clock): a part outside the run's parts, or work that would end past budget_s,
does not start, and the reason says which; laps are recorded. Deterministic: the clock's start is set in the past."""

from __future__ import annotations

import time

from repro_utils import Clock


def test_a_part_outside_the_runs_parts_is_skipped_with_its_reason():
    clock = Clock(time.time(), budget_s=100.0, parts=["arch", "bench"])
    assert clock.skip("arch") is None
    assert clock.skip("polar") == "the 'polar' part is not among this run's parts (arch, bench)"
    assert Clock(time.time(), budget_s=100.0).skip("anything") is None  # no parts: only time decides


def test_work_that_would_end_past_the_budget_does_not_start():
    clock = Clock(time.time() - 90.0, budget_s=100.0)  # 90 s have passed
    assert clock.skip(expect_s=5.0) is None
    why = clock.skip(expect_s=15.0)
    assert why is not None and why.startswith("time budget: 90 s elapsed + ~15 s expected > budget_s = 100 s")
    assert Clock(time.time() - 101.0, budget_s=100.0).skip() is not None  # past the budget, nothing starts


def test_laps_are_recorded_and_printed(capsys):
    clock = Clock(time.time() - 10.0, budget_s=100.0)
    clock.lap("data", time.time() - 2.0)
    assert 1.9 <= clock.laps["data"] <= 2.5
    assert "[data: 2 s; 10 s since the run started]" in capsys.readouterr().out
