"""Chapter 06's measurement script on the CPU (its dry run): the workload part's untimed warm-up.

The first full-trace run of the H200 run at fa21a00 was 7.6% slower than the two after it; the workload part now runs
the trace once untimed before its timed replicates. These tests check that the warm-up runs the same trace under the
same policy, is kept apart from the replicates, and is off for every other part.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chapters" / "06_paged_serving"))
import serving_bench as sb  # noqa: E402


def test_workload_part_warms_up_once_untimed_and_keeps_its_replicates():
    torch.manual_seed(0)
    res = sb.measure(dry_run=True, parts=["workload"], reps=2, workload_reps=2, seed=0, progress=False)
    w = res["parts"]["workload"]
    assert "error" not in w, w.get("error")
    paged, req = w["paged_token_level"], w["request_level_max_len"]
    assert len(paged["runs"]) == len(req["runs"]) == 2  # the warm-up is not a replicate
    assert paged["warmup_wall_s"] > 0
    assert "warmup_wall_s" not in req  # only the first policy to serve the full trace warms up
    # the warm-up leaves nothing behind: every timed replicate of the paged policy generates the same tokens
    assert paged["runs"][0]["outputs_head"] == paged["runs"][1]["outputs_head"]


def test_serve_warmup_resets_the_engine_under_the_timed_policy_and_runs_the_same_trace():
    calls = []

    class Account:
        def as_dict(self):
            return {}

    class Eng:
        policy = {"request_level": False}
        block_size = 16
        step_log = []

        def __init__(self):
            self.bm = type("BM", (), {"num_blocks": 7})()
            self.scheduler = type("S", (), {"account": Account()})()

        def reset(self, **kw):
            calls.append(("reset", kw))

        def run(self, reqs):
            calls.append(("run", tuple(reqs)))
            return []

    orig = sb.summarize
    sb.summarize = lambda seqs, wall: {"wall_s": wall}
    try:
        out = sb.serve(Eng(), ["a", "b"], 2, num_blocks=7, warmup=True, reserve="paged")
        plain = sb.serve(Eng(), ["a", "b"], 1, reserve="paged")
    finally:
        sb.summarize = orig
    policy = {"num_blocks": 7, "reserve": "paged"}
    assert calls[:6] == [("reset", policy), ("run", ("a", "b"))] * 3  # warm-up, then two timed runs, same policy
    assert len(out["runs"]) == 2 and out["warmup_wall_s"] >= 0
    assert "warmup_wall_s" not in plain and len(plain["runs"]) == 1
