"""Timing: the libraries' own timers, and speed always as a ratio to a baseline timed in the same run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    ms: float  # median milliseconds per call
    method: str


def time_fn(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, graph: bool = False) -> Timing:
    """Median time of ``fn()``: triton.testing.do_bench on CUDA (flushes L2, syncs), else
    torch.utils.benchmark on the CPU.

    ``graph=True`` (CUDA only) captures ``fn`` once in a CUDA graph and times its replays with the same
    do_bench (L2 still flushed before each replay). Use it for work of a few microseconds launched from
    Python: eager, the host's launch time can exceed the GPU's and the timer then measures the host. A
    ``fn`` that cannot be captured (it syncs with the host, say) raises ``RuntimeError``; nothing is
    timed eagerly behind the caller's back."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        method = "triton.testing.do_bench median"
        if graph:
            fn, method = cuda_graph(fn), method + " of CUDA-graph replays"
        return Timing(float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")), method)
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2)
    return Timing(m.median * 1e3, "torch.utils.benchmark median")


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after ``warmup`` calls on a side stream, as torch.cuda.graph's
    documentation prescribes: compilation and lazy allocations happen there); returns its replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn()
    except Exception as e:  # a sync or a host-dependent shape inside fn
        raise RuntimeError(f"could not capture {getattr(fn, '__name__', fn)!r} in a CUDA graph: {e}") from e
    torch.cuda.synchronize()
    return g.replay


def ratio(baseline: Timing, candidate: Timing) -> float:
    """Speed-up of ``candidate`` over ``baseline`` (> 1: faster), both timed in this run."""
    return baseline.ms / candidate.ms


def ratios(baseline: Callable[[], object], candidate: Callable[[], object], *, replicates: int = 5,
           graph: bool = False, timer: Callable[..., Timing] | None = None, **kw) -> list[float]:
    """Replicates of a speed-up: ``replicates`` ratios baseline/candidate, each from its own pair of timings,
    baseline and candidate alternating so that drift in clocks or host load hits both. These are the
    ``values`` a speed claim's interval is formed from (one median pair does not make an interval).
    ``timer`` replaces ``time_fn`` (a chapter that takes its timer as an argument passes it on)."""
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, not {replicates}")
    timer = timer or time_fn
    out = []
    for _ in range(replicates):
        b = timer(baseline, graph=graph, **kw)
        c = timer(candidate, graph=graph, **kw)
        out.append(ratio(b, c))
    return out


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak CUDA bytes allocated while running ``fn`` (above what was allocated before it)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
