"""Timing: the libraries' own timers, and speed always as a ratio to a baseline timed in the same run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    ms: float  # median milliseconds per call
    method: str


def time_fn(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> Timing:
    """Median time of ``fn()``: triton.testing.do_bench on CUDA (flushes L2, syncs), else
    torch.utils.benchmark on the CPU."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        return Timing(float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")), "triton.testing.do_bench median")
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2)
    return Timing(m.median * 1e3, "torch.utils.benchmark median")


def ratio(baseline: Timing, candidate: Timing) -> float:
    """Speed-up of ``candidate`` over ``baseline`` (> 1: faster), both timed in this run."""
    return baseline.ms / candidate.ms


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak CUDA bytes allocated while running ``fn`` (above what was allocated before it)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
