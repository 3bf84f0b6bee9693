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


# ---------------------------------------------------------------------------------------------- measurement scripts
# A chapter's measurement script (chapters 06, 07) runs its parts in order inside one GPU call and writes JSON that
# its notebook reads. What they share lives here: the parts runner, the fingerprint and the command line.

def sync() -> None:
    """Wait for the GPU, where there is one."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def script_fingerprint(device, root, packages=("triton",)) -> dict:
    """Where a script's numbers come from: device, library versions, the git commit of ``root`` and whether the tree
    was dirty (``ledger.git_commit``: REPRO_COMMIT on a GPU box without .git), the start time."""
    import importlib
    import platform
    import time

    import torch

    from .ledger import git_commit

    commit, dirty = git_commit(root)
    return {"device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            **{p: importlib.import_module(p).__version__ for p in packages},
            "python": platform.python_version(), "git_commit": commit, "dirty": dirty,
            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Parts:
    """A script's measurement parts, run in order under one wall-clock budget. Each part's result (a dict), or its
    error, or "skipped" once ``budget_s`` seconds have passed since the script started, goes into
    ``res["parts"][name]`` with its wall time (``part_wall_s``); ``res`` (with ``wall_s``) is written to ``out`` as
    JSON after every part, so a run cut short keeps what it measured. A tqdm bar counts the setup and the parts."""

    def __init__(self, res: dict, names, *, out=None, budget_s: float = float("inf"), desc: str = "parts",
                 progress: bool = True):
        import time
        from pathlib import Path

        from tqdm.auto import tqdm

        self.t_start = time.perf_counter()
        self.res, self.names, self.budget_s = res, list(names), budget_s
        res.setdefault("parts", {})
        self.out = None if out is None else Path(out)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=len(self.names) + 1, desc=desc, unit="part", disable=not progress)
        self.bar.set_postfix_str("setup")

    def setup_done(self) -> None:
        self.bar.update(1)

    def save(self) -> None:
        import json
        import time

        self.res["wall_s"] = time.perf_counter() - self.t_start
        if self.out is not None:
            self.out.write_text(json.dumps(self.res, indent=1, default=str))

    def __call__(self, name: str, fn: Callable[[], dict], need_s: float = 0.0) -> None:
        """Run part ``name`` unless fewer than ``need_s`` seconds (its expected wall time) are left of the budget."""
        import time

        if name not in self.names:
            return
        parts = self.res["parts"]
        elapsed = time.perf_counter() - self.t_start
        if elapsed + need_s > self.budget_s:
            why = (f"time budget of {self.budget_s:.0f} s spent" if elapsed > self.budget_s else
                   f"time budget: would not fit (needs about {need_s:.0f} s, {self.budget_s - elapsed:.0f} s of "
                   f"{self.budget_s:.0f} s left)")
            parts[name] = {"skipped": why, "part_wall_s": 0.0}
            self.save()
            self.bar.update(1)
            return
        self.bar.set_postfix_str(name)
        t = time.perf_counter()
        try:
            parts[name] = fn()
        except Exception as e:  # one failed part must not lose the others
            parts[name] = {"error": f"{type(e).__name__}: {e}"}
        parts[name]["part_wall_s"] = time.perf_counter() - t
        self.save()
        self.bar.update(1)

    def close(self) -> None:
        # the bar counts the setup too: say so on its last line, which stays in a notebook's output beside the
        # script's own "N parts in ..." line
        self.bar.set_postfix_str(f"setup + {len(self.names)} parts", refresh=True)
        self.bar.close()
        self.save()


def script_args(doc: str, parts, *, budget_s: float, reps_help: str | None = "replicates of every timing", extra=None,
                argv=None):
    """The command line every measurement script shares: --out, --dry-run, --parts, --reps (left out where
    ``reps_help`` is None), --seed, --budget-s, and what ``extra(parser)`` adds. Returns (args, the parts asked for,
    validated)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: the same code paths, in seconds")
    ap.add_argument("--parts", default=",".join(parts), help="comma-separated subset of " + ",".join(parts))
    if reps_help is not None:  # None: a script without timed replicates
        ap.add_argument("--reps", type=int, default=3, help=reps_help)
    if extra is not None:
        extra(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=budget_s,
                    help="skip the parts not yet started once this many seconds have passed (the JSON says which)")
    args = ap.parse_args(argv)
    chosen = [p for p in args.parts.split(",") if p]
    unknown = set(chosen) - set(parts)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    return args, chosen
