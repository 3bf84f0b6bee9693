"""Workloads and measurements: a seeded request trace, per-request latency and throughput, and the HF baselines.

The trace follows the chapter's setting: n requests, prompt lengths uniform in [lo, hi], a fixed number
of new tokens each (no early stop: the model is random, and EOS is ignored everywhere so that every system
produces the same number of tokens), all arriving at once (offline throughput) or as a Poisson process.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0  # seconds after the start (or scheduler steps, see Engine.run)
    temperature: float = 0.0


def make_workload(n: int = 256, prompt_len: tuple[int, int] = (100, 1024), max_new_tokens: int | tuple[int, int] = 256,
                  vocab_size: int = 128256, seed: int = 0, rate: float | None = None) -> list[Request]:
    """Seeded requests: random token ids, prompt lengths uniform in prompt_len (inclusive), new tokens fixed or
    uniform in a (lo, hi) range, arrivals at 0 or, with `rate` (requests/s), spaced by exponential gaps (a
    Poisson process)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate:
            t += rng.expovariate(rate)
        length = rng.randint(*prompt_len)
        new = max_new_tokens if isinstance(max_new_tokens, int) else rng.randint(*max_new_tokens)
        out.append(Request([rng.randrange(vocab_size) for _ in range(length)], new, t))
    return out


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def latency_stats(arrivals: list[float], token_times: list[list[float]], wall_s: float) -> dict:
    """TTFT = first token time - arrival; TBT = gaps between a request's consecutive tokens."""
    ttft = [t[0] - a for a, t in zip(arrivals, token_times) if t]
    tbt = [b - a for t in token_times for a, b in zip(t, t[1:])]
    n_out = sum(len(t) for t in token_times)
    return {"requests": len(token_times), "output_tokens": n_out, "wall_s": wall_s, "output_tok_s": n_out / wall_s,
            "ttft_s": {"mean": statistics.fmean(ttft) if ttft else float("nan"), "p50": _pct(ttft, 0.5), "p99": _pct(ttft, 0.99)},
            "tbt_s": {"mean": statistics.fmean(tbt) if tbt else float("nan"), "p50": _pct(tbt, 0.5), "p99": _pct(tbt, 0.99)}}


def summarize(seqs, wall_s: float) -> dict:
    """Per-run figures of an Engine.run."""
    out = latency_stats([s.arrival for s in seqs], [s.token_times for s in seqs], wall_s)
    out["preemptions"] = sum(s.preemptions for s in seqs)
    return out


# ----------------------------------------------------------------------------------------------
# HF baselines
# ----------------------------------------------------------------------------------------------

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_static(model, requests: list[Request], batch_size: int, pad_id: int = 0, progress: bool = False) -> dict:
    """HF ``generate``, greedy, in static batches of `batch_size` requests (in request order), each left-padded
    to its longest prompt and run until its longest output is done: request-level batching with padding.
    Every request counts as present at the start (offline): TTFT is measured from the call.
    Token times are host times at each step's logits processor (HF syncs with the GPU every step)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter() - start)
            return scores

    dev = model.device
    token_times = []
    start = time.perf_counter()
    batches = range(0, len(requests), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"HF static B={batch_size}", leave=False)
    for i in batches:
        group = requests[i:i + batch_size]
        width = max(len(r.prompt) for r in group)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in group], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in group], device=dev)
        new = max(r.max_new_tokens for r in group)
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                               pad_token_id=pad_id)
        stamp = Stamp()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                             logits_processor=LogitsProcessorList([stamp]))
        _sync(dev)
        assert out.shape[1] == width + new, "HF stopped early"
        token_times += [stamp.times[: r.max_new_tokens] for r in group]
    wall = time.perf_counter() - start
    res = latency_stats([0.0] * len(requests), token_times, wall)
    # tokens past a request's own max_new_tokens (the batch runs to its longest) are computed, not counted
    res["batch_size"] = batch_size
    return res


def hf_generate_batch(model, requests: list[Request], attn_implementation: str = "paged|sdpa") -> dict:
    """HF's continuous batching (``generate_batch``, transformers >= 5). Returns {"available": False, ...}
    where this transformers has none, instead of failing the benchmark."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"available": False, "reason": "this transformers has no generate_batch"}
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(attn_implementation)  # 5.17 needs "paged|sdpa"; >= 5.23 says plain "sdpa"
    except Exception as e:  # noqa: BLE001 - any refusal: run with what the model has, and say so
        attn_implementation = f"{before} ({attn_implementation} refused: {e})"
    new = max(r.max_new_tokens for r in requests)
    cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    dev = model.device
    try:
        _sync(dev)
        start = time.perf_counter()
        try:  # warmup (CUDA-graph capture before the requests) is its default; it means nothing on the CPU
            out = model.generate_batch([r.prompt for r in requests], generation_config=cfg, record_timestamps=True,
                                       progress_bar=False, warmup=dev.type == "cuda")
        except TypeError:  # older signature
            out = model.generate_batch([r.prompt for r in requests], generation_config=cfg)
        _sync(dev)
        wall = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001
        return {"available": False, "reason": f"generate_batch failed: {type(e).__name__}: {e}"}
    finally:
        model.set_attn_implementation(before)
    results = list(out.values())
    n_out = sum(len(o.generated_tokens) for o in results)
    res = {"available": True, "attn_implementation": attn_implementation, "requests": len(requests),
           "completed": len(results), "output_tokens": n_out, "wall_s": wall, "output_tok_s": n_out / wall}
    stamps = [getattr(o, "timestamps", None) for o in results]
    if all(stamps):  # perf_counter times from the manager: TTFT from the call's start
        lat = latency_stats([0.0] * len(stamps), [[t - start for t in s] for s in stamps], wall)
        res["ttft_s"], res["tbt_s"] = lat["ttft_s"], lat["tbt_s"]
    spans = [getattr(o, "lifespan", None) for o in results]
    if all(spans) and all(s is not None and len(s) == 2 for s in spans):
        # from the first request's start to the last one's end: leaves out the manager's set-up and warm-up,
        # which favours HF; a ratio against it understates the engine's advantage
        res["span_s"] = max(s[1] for s in spans) - min(s[0] for s in spans)
        res["output_tok_s_span"] = n_out / res["span_s"]
    return res
