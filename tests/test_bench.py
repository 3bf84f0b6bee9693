"""repro_utils.bench on the CPU (the CI machine has no GPU: the CUDA-graph path is exercised by the chapters' gpu runs)."""

import pytest
import torch

from repro_utils import bench


def test_time_fn_times_a_call_and_names_its_method():
    calls = []

    def work():
        calls.append(1)
        return torch.ones(64, 64) @ torch.ones(64, 64)

    t = bench.time_fn(work)
    assert t.ms > 0 and len(calls) > 1
    assert t.method == "torch.utils.benchmark median"


def test_graph_is_a_cuda_option_and_the_cpu_timer_ignores_it():
    if torch.cuda.is_available():
        pytest.skip("on a GPU graph=True captures a CUDA graph")
    assert bench.time_fn(lambda: torch.zeros(8).sum(), graph=True).method == "torch.utils.benchmark median"


def test_ratio_is_baseline_over_candidate():
    assert bench.ratio(bench.Timing(3.0, "x"), bench.Timing(1.5, "x")) == 2.0


def test_ratios_gives_one_replicate_per_timed_pair_and_sees_a_real_speedup():
    big, small = torch.ones(256, 256), torch.ones(16, 16)
    rs = bench.ratios(lambda: big @ big, lambda: small @ small, replicates=3)
    assert len(rs) == 3 and all(r > 1 for r in rs)  # a 256³ matmul is far slower than a 16³ one on any CPU
    with pytest.raises(ValueError):
        bench.ratios(lambda: None, lambda: None, replicates=0)
