"""The measurements of issue 20, as functions: the device probe (scripts/ch03_hopper_probe.py) runs them in one
GPU call today, and the chapter's next graded run calls the same functions from the notebook, so what the probe
measured is what the notebook will grade.

Each returns plain rows (dicts) for a DataFrame or JSON. On a machine without a GPU they run in Triton's
interpreter on tiny shapes (TRITON_INTERPRET=1 before triton is first imported; device "cpu"), which exercises
every code path and times nothing real. Speeds are TFLOP/s from medians (repro_utils.bench.time_fn: L2 flushed
before each call on CUDA); the goals' values are replicates of a ratio, baseline and kernel timed alternately
(repro_utils.bench.ratios), and ``worst_per_replicate`` turns them into one value per replicate.
"""

from __future__ import annotations

import math
from functools import partial

import flash_kernels as fk
import hopper_kernels as hk
import torch

from repro_utils.bench import ratios, time_fn

HIDDEN = 2048  # FA2 §4.1: hidden dimension 2048, so heads = 2048 / head dim
TOKENS = 16384  # and batch = 16K tokens / N


def heads_for(d: int) -> int:
    return HIDDEN // d


def inputs(batch: int, heads: int, n: int, d: int, *, device, dtype=torch.bfloat16, seed: int = 0):
    """q, k, v ~ N(0, 1), drawn on ``device`` from one seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, device=device, dtype=dtype) for _ in range(3)]


def _err(e: Exception, n: int = 300) -> str:
    return f"{type(e).__name__}: {str(e)[:n]}"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def sdpa(backend):
    """PyTorch's scaled_dot_product_attention pinned to one backend (SDPBackend.CUDNN_ATTENTION, ...)."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def attention(q, k, v, causal=False):
        with sdpa_kernel(backend):
            return scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attention


def forwards() -> dict:
    """The forwards the speed rows time, by name: SDPA's FlashAttention-2 and cuDNN backends, the studied
    kernel, the descriptor kernel."""
    from torch.nn.attention import SDPBackend

    return {"SDPA flash (FA2)": sdpa(SDPBackend.FLASH_ATTENTION), "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
            "studied kernel": lambda q, k, v, c: fk.flash_forward(q, k, v, c, 1 / math.sqrt(q.shape[-1]))[0],
            "descriptors": lambda q, k, v, c: hk.tma_forward(q, k, v, c)[0]}


def tflops(ms: float, batch: int, heads: int, n: int, d: int, causal: bool, mode: str = "fwd") -> float:
    return fk.attention_flops(batch, heads, n, d, causal, mode) / (ms * 1e-3) / 1e12


def backward_only(f, q, k, v, causal):
    """A callable that runs only the backward of f's output: the forward runs once here, its graph kept."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = f(q, k, v, causal)
    do = torch.randn_like(o)
    return partial(torch.autograd.grad, o, (q, k, v), do, retain_graph=True)


def check_rows(dims, n: int, device) -> list[dict]:
    """The descriptor forward (warp specialization off and on) and the FP8 forward against float64 attention
    at length n, per head dim and mask, beside standard attention's error in the same precision."""
    rows = []
    for d in dims:
        for causal in (False, True):
            q, k, v = inputs(1, 2, n, d, device=device, seed=d + causal)
            ref = fk.reference_attention(q.double(), k.double(), v.double(), causal)
            row = {"d": d, "causal": causal, "standard": rel_err(fk.standard_attention(q, k, v, causal), ref)}
            for name, ws in (("descriptors", False), ("descriptors + warp spec.", True)):
                try:
                    row[name] = rel_err(hk.tma_forward(q, k, v, causal, warp_specialize=ws)[0], ref)
                except Exception as e:  # a path that does not compile is a finding, not a crash
                    row[name] = _err(e)
            r8 = hk.fp8_reference(q, k, v, causal)
            row["fp8 vs its reference (rmse)"] = hk.rmse(hk.fp8_forward(q, k, v, causal), r8)
            row["fp8 reference vs exact (rmse)"] = hk.rmse(r8, ref)
            rows.append(row)
    return rows


def speed_rows(dims, seq_lens, device, *, reps: int, tokens: int = TOKENS, replicate: bool = True) -> dict:
    """Forward TFLOP/s of every forward at FA2 §4.1's shapes; at d = 128 also the backward alone (the studied
    kernel's, the fused one's and cuDNN's). With ``replicate``, the goals' ratios (cuDNN time / kernel time) as ``reps``
    alternating replicates per shape."""
    impls = forwards()
    rows, goal = [], []
    for d in dims:
        for causal in (False, True):
            for n in seq_lens:
                batch, heads = max(1, tokens // n), heads_for(d)
                q, k, v = inputs(batch, heads, n, d, device=device)
                row = {"d": d, "causal": causal, "N": n, "batch": batch, "heads": heads}
                fns = {}
                for name, f in impls.items():
                    if d not in fk.SUPPORTED_HEAD_DIMS and name == "studied kernel":
                        continue  # head dim 256 is the descriptor kernel's addition
                    try:
                        fn = partial(f, q, k, v, causal)
                        fn()  # autotunes the Triton kernels once per shape
                        row[name] = tflops(time_fn(fn).ms, batch, heads, n, d, causal)
                        fns[name] = fn
                    except Exception as e:
                        row[name] = _err(e, 200)
                if d == 128:  # the backward goal
                    bwds = {"SDPA cuDNN bwd": impls["SDPA cuDNN"],
                            "studied kernel bwd": lambda q, k, v, c: fk.flash_attention(q, k, v, c)}
                    if n in GOAL_SEQ_LENS:  # the fused backward at its goal's lengths only (its autotuning costs time)
                        bwds["fused bwd"] = hk.flash_attention_fused
                    for name, f in bwds.items():
                        try:
                            fns[name] = backward_only(f, q, k, v, causal)
                            fns[name]()
                            row[name] = tflops(time_fn(fns[name]).ms, batch, heads, n, d, causal, "bwd")
                        except Exception as e:
                            fns.pop(name, None)
                            row[name] = _err(e, 200)
                rows.append(row)
                if replicate:
                    for base, name in (("SDPA cuDNN", "studied kernel"), ("SDPA cuDNN", "descriptors"),
                                       ("SDPA cuDNN bwd", "studied kernel bwd"), ("SDPA cuDNN bwd", "fused bwd")):
                        if base in fns and name in fns:
                            goal.append({"d": d, "causal": causal, "N": n, "kernel": name,
                                         "vs cuDNN (x)": ratios(fns[base], fns[name], replicates=reps)})
                del q, k, v, fns
    return {"rows": rows, "ratios": goal,
            "note": "bwd TFLOP/s count 2.5x the forward's FLOPs (FA2 §4.1); ratios are cuDNN time / kernel time"}


def fp8_speed_rows(dims, seq_lens, device, *, reps: int, tokens: int = TOKENS, replicate: bool = True,
                   causals=(False, True)) -> list[dict]:
    """The FP8 forward against the bf16 descriptor forward on the same shapes, quantization left out (and timed
    on its own); with ``replicate``, the ratio bf16 time / FP8 time as ``reps`` alternating replicates."""
    rows = []
    for d in dims:
        for causal in causals:
            for n in seq_lens:
                batch, heads = max(1, tokens // n), heads_for(d)
                q, k, v = inputs(batch, heads, n, d, device=device)
                row = {"d": d, "causal": causal, "N": n}
                try:
                    bf16 = partial(hk.tma_forward, q, k, v, causal)
                    bf16()
                    prepared = hk.fp8_inputs(q, k, v)
                    fp8 = partial(hk.fp8_forward, q, k, v, causal, inputs=prepared)
                    fp8()
                    row["bf16 descriptors"] = tflops(time_fn(bf16).ms, batch, heads, n, d, causal)
                    row["fp8"] = tflops(time_fn(fp8).ms, batch, heads, n, d, causal)
                    row["quantize + rotate (ms)"] = time_fn(partial(hk.fp8_inputs, q, k, v)).ms
                    if replicate:
                        row["fp8 / bf16 (x)"] = ratios(bf16, fp8, replicates=reps)
                except Exception as e:
                    row["error"] = _err(e)
                rows.append(row)
    return rows


FA3_TABLE3 = {"baseline FP8": 2.4e-2, "FA3 FP8": 9.1e-3, "no block quant": 9.3e-3, "no incoherent processing": 2.4e-2,
              "baseline FP16": 3.2e-4, "FA2/FA3 FP16": 1.9e-4}  # arXiv:2407.08608, Table 3 (p. 12)
FP8_VARIANTS = (("FP8 block + incoherent", {}), ("FP8 no block quant", {"block": None}),
                ("FP8 no incoherent", {"incoherent": False}), ("FP8 neither", {"incoherent": False, "block": None}),
                ("FP8 block + incoherent, P unscaled", {"p_scale": 1.0}))


def fp8_error_rows(shape, dims, seeds, device) -> list[dict]:
    """FA3 §4.3's error study on this chapter's kernels: RMSE against float64 attention on outlier inputs of
    ``shape`` (batch, heads, N) x each head dim, per seed, of standard fp16 attention, the descriptor kernel in
    fp16, FA3 Table 3's per-tensor FP8 baseline, and the FP8 forward with each of its parts taken away."""
    rows = []
    for seed in seeds:
        for d in dims:
            shp = tuple(shape[:3]) + (d,)
            q, k, v = hk.outlier_inputs(shp, seed=seed, device=device, dtype=torch.float16)
            ref = fk.reference_attention(q.double(), k.double(), v.double())
            row = {"seed": seed, "shape": list(shp),
                   "standard fp16": hk.rmse(fk.standard_attention(q, k, v), ref),
                   "descriptors fp16": hk.rmse(hk.tma_forward(q, k, v)[0], ref),
                   "FP8 baseline (per-tensor)": hk.rmse(hk.fp8_baseline(q, k, v), ref)}
            for label, kw in FP8_VARIANTS:
                row[label] = hk.rmse(hk.fp8_forward(q, k, v, seed=seed, **kw), ref)
            row["baseline / ours (x)"] = row["FP8 baseline (per-tensor)"] / row["FP8 block + incoherent"]
            rows.append(row)
            del q, k, v, ref
    return rows


def worst_per_replicate(rows, key: str, shapes) -> list[float]:
    """A goal's values: for replicate i, the smallest ratio ``row[key][i]`` over the rows, one row per shape
    (N, causal) in ``shapes``, so one replicate passes only if every shape does. The caller picks the rows (one
    kernel, one head dim). Raises if a shape is missing or doubled (a goal graded on other shapes than it
    declares would be another goal) or if the shapes have different numbers of replicates."""
    have = sorted((r["N"], r["causal"]) for r in rows)
    if have != sorted(set(shapes)):
        raise ValueError(f"{key}: the rows cover shapes {have}, the goal declares {sorted(set(shapes))}")
    reps = {len(r[key]) for r in rows}
    if len(reps) != 1:
        raise ValueError(f"{key}: shapes have different replicate counts {sorted(reps)}")
    return [min(r[key][i] for r in rows) for i in range(reps.pop())]


# ----------------------------------------------------------------------------------------------
# Grading: the goals and the FP8 claim declared (pending) in claims.yaml, from the rows above
# ----------------------------------------------------------------------------------------------

GOAL_SEQ_LENS = (4096, 8192, 16384)  # "N >= 4K" in the goals


def grade(run, *, speed: dict | None, fp8_error: list[dict] | None, fp8_speed: list[dict] | None, device: str,
          why_not: str = "not measured in this run") -> None:
    """Record fwd-vs-cudnn, bwd-vs-cudnn, fused-bwd-vs-cudnn, fp8-error-vs-baseline and fp8-fwd-vs-bf16 on ``run`` (a
    repro_utils Run) from the rows of ``speed_rows``, ``fp8_error_rows`` and ``fp8_speed_rows``, as each goal's
    metric declares; a part that is None (or lacks a declared shape) records its goals untested with
    ``why_not`` (or what is missing). fa3-fp8-error is recorded untested: FA3 is not installed."""
    both = [(n, c) for n in GOAL_SEQ_LENS for c in (False, True)]
    for gid, kernel in (("fwd-vs-cudnn", "descriptors"), ("bwd-vs-cudnn", "studied kernel bwd"),
                        ("fused-bwd-vs-cudnn", "fused bwd")):
        if speed is None:
            run.untested(gid, why_not)
            continue
        rows = [r for r in speed["ratios"] if r["kernel"] == kernel and r["d"] == 128 and r["N"] in GOAL_SEQ_LENS]
        try:
            values = worst_per_replicate(rows, "vs cuDNN (x)", both)
        except ValueError as e:
            run.untested(gid, f"{why_not}: {e}")
            continue
        run.goal(gid, values=values, setting=f"{device}, bf16, head dim 128, 16 heads, batch 16K / N, N = 4K, 8K, "
                 "16K, causal and not; per replicate the worst of the six shapes; cuDNN = SDPA's CUDNN_ATTENTION",
                 details={"per_shape": rows})
    if fp8_error is None:
        run.untested("fp8-error-vs-baseline", why_not)
    else:
        rows = [r for r in fp8_error if r["shape"] == [4, 16, 4096, 128]]
        if rows:
            run.goal("fp8-error-vs-baseline", values=[r["baseline / ours (x)"] for r in rows],
                     seeds=[r["seed"] for r in rows], setting=f"{device}; Q, K, V ~ N(0,1) + N(0,100)·Bernoulli(0.001), "
                     "fp16, shape (4, 16, 4096, 128); RMSE against float64 attention; one ratio per seed",
                     details={"rows": fp8_error, "fa3_table3": FA3_TABLE3})
        else:
            run.untested("fp8-error-vs-baseline", f"{why_not}: no row at the declared shape (4, 16, 4096, 128)")
    if fp8_speed is None:
        run.untested("fp8-fwd-vs-bf16", why_not)
    else:
        rows = [r for r in fp8_speed if r["d"] == 256 and not r["causal"] and r["N"] in GOAL_SEQ_LENS
                and "fp8 / bf16 (x)" in r]
        try:
            values = worst_per_replicate(rows, "fp8 / bf16 (x)", [(n, False) for n in GOAL_SEQ_LENS])
        except ValueError as e:
            run.untested("fp8-fwd-vs-bf16", f"{why_not}: {e}")
        else:
            run.goal("fp8-fwd-vs-bf16", values=values, setting=f"{device}, head dim 256, 8 heads, batch 16K / N, "
                     "N = 4K, 8K, 16K, no causal mask; quantization not counted; per replicate the worst shape",
                     details={"rows": fp8_speed})
    run.untested("fa3-fp8-error", "FlashAttention-3 (flash_attn_interface, built from the repository's hopper/ "
                 "folder) is not installed on the course's GPU machines; the chapter's own FP8 forward, which "
                 "implements both techniques, is the goal fp8-error-vs-baseline")
