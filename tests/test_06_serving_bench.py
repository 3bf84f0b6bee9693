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


def test_dial_part_queues_every_request_at_zero_and_fills_the_top_setting():
    """latency-dial-binds (declared 2026-12-06): the dial's requests all wait at t = 0, there are as many as the top
    setting holds, and each setting's runs carry what the notebook reads (time between tokens, throughput, the
    realised mean decode batch and its share of the setting, the control)."""
    s = sb.SETTINGS["dry"]
    assert "dial_rate" not in s and "dial_rate" not in sb.SETTINGS["gpu"]  # no Poisson arrivals any more
    for cfg in sb.SETTINGS.values():  # the top setting can fill
        assert cfg["dial_requests"] >= max(cfg["dial_batches"]) and len(cfg["dial_batches"]) >= 2
    torch.manual_seed(0)
    res = sb.measure(dry_run=True, parts=["dial"], reps=1, workload_reps=2, seed=0, progress=False)
    d = res["parts"]["dial"]
    assert "error" not in d, d.get("error")
    assert d["requests"] == s["dial_requests"] and d["new_tokens"] == s["dial_new_tokens"]
    assert d["arrival_s"] == [0.0] and d["max_num_seqs"] == s["dial_batches"]
    for b in s["dial_batches"]:
        runs = d[str(b)]["runs"]
        assert len(runs) == 2
        assert d[str(b)]["policy"]["max_num_seqs"] == b
        # queued at t = 0 with every request the same length: the schedule is fixed, the setting binds exactly
        assert [r["steps"]["mean_decode_batch"] for r in runs] == [float(b)] * 2
        assert d[str(b)]["realised_batch_share"] == [1.0, 1.0]
        assert all(r["output_tokens"] == s["dial_requests"] * s["dial_new_tokens"] for r in runs)
        assert all(r["tbt_s"]["p50"] > 0 and r["output_tok_s"] > 0 for r in runs)
    # the small setting runs in waves of b: ceil(n / b) prefill steps, (new - 1) decode steps per wave
    lo = min(s["dial_batches"])
    waves = -(-s["dial_requests"] // lo)
    assert d[str(lo)]["runs"][0]["steps"] == {**d[str(lo)]["runs"][0]["steps"], "prefill": waves,
                                              "decode": waves * (s["dial_new_tokens"] - 1)}
    # the same requests at every setting: the same greedy tokens
    assert d[str(lo)]["runs"][0]["outputs_head"] == d[str(max(s["dial_batches"]))]["runs"][0]["outputs_head"]


def test_staged_notebook_records_the_dial_successor_with_its_control_and_gate():
    import nbformat

    from repro_utils.check import record_calls
    from repro_utils.claims import load_chapter

    chdir = Path(__file__).resolve().parents[1] / "chapters" / "06_paged_serving"
    declared = {c.id: c for c in load_chapter(chdir / "claims.yaml").claims}
    assert "latency-is-a-dial" not in declared  # retired (book/corrections.md)
    new = declared["latency-dial-binds"]
    assert new.pending.startswith("2026-12-06") and new.holds_if == {"at_least": 1.2} and new.replicates == 3
    assert new.control["holds_if"] == {"at_least": 0.75}
    nb = nbformat.read(chdir / "06_paged_serving.next.ipynb", as_version=4)
    calls = [(m, cid) for m, cid, _ in record_calls(nb)]
    assert ("record", "latency-dial-binds") in calls and all(cid != "latency-is-a-dial" for _, cid in calls)
    code = "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'run.untested("latency-dial-binds"' in code and "TRADE_BAR = 1.5" in code  # the throughput gate
    assert '"realised_batch_share"' in code and "dial_rate" not in code
    log = (chdir.parents[1] / "book" / "corrections.md").read_text()
    assert "- 2026-12-06 · 06_paged_serving / latency-is-a-dial · retired as latency-dial-binds (pending its first run) ·" in log
