"""Chapter 07's measurement script on the CPU (its dry run): the TTFT part times every arm and the host's share of it.

The host share (scheduling, input preparation and the forward call until it returns) is what says whether a prefill
step is launch-bound on the GPU; on the CPU the forward call does the work itself, so host and TTFT nearly agree.
Times are not compared with anything: only their structure, signs and order, which cannot depend on the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chapters" / "07_prefix_caching"))
import prefix_bench as pb  # noqa: E402


def test_ttft_part_records_each_arms_host_time_and_leaves_the_engine_as_it_was():
    torch.manual_seed(0)
    res = pb.measure(dry_run=True, parts=["ttft"], reps=2, seed=0, progress=False)
    ttft = res["parts"]["ttft"]
    assert "error" not in ttft, ttft.get("error")
    rows = [r for r in ttft.values() if isinstance(r, dict) and "ttft_s" in r]
    assert [r["system_len"] for r in rows] == pb.SETTINGS["dry"]["ttft_system"]
    for r in rows:
        assert set(r["host_s"]) == set(r["ttft_s"]) == {"cold", "cached_hash", "cached_radix", "suffix_only"}
        for arm, times in r["ttft_s"].items():
            host = r["host_s"][arm]
            assert len(times) == len(host) == 2
            assert all(0 < h <= t for h, t in zip(host, times)), (arm, host, times)
        assert r["cached_tokens_beyond_system"] == {"cached_hash": 0, "cached_radix": 0}


def test_timed_forward_is_removed_after_the_part(monkeypatch):
    calls = []

    class Eng:
        def forward(self, *a):
            return "out"

    eng = Eng()
    monkeypatch.setattr(pb, "_ttft_rows", lambda e, *a: calls.append(e.forward()) or {})
    pb.ttft(eng, pb.SETTINGS["dry"], 1, 16, 0)
    assert calls == ["out"] and "forward" not in vars(eng)
