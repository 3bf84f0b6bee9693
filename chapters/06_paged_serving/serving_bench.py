"""Chapter 06's GPU measurements in one run: the engine (tinyserve) against HF on random Llama-3-8B-shaped weights.

    PYTHONPATH=$PWD/src python3 chapters/06_paged_serving/serving_bench.py --out $OUT/ch06_gpu.json
    PYTHONPATH=$PWD/src python3 chapters/06_paged_serving/serving_bench.py --dry-run --out /tmp/ch06_dry.json   # CPU, tiny

Parts, in order (each writes the JSON again when it ends, so a run cut short keeps what it measured):
  setup      random HF LlamaForCausalLM (bf16) and the engine's model with the same weights
  bandwidth  device-to-device copy (read + write bytes / time): the roofline's bandwidth
  logits     engine vs HF logits (prefill, every position; one decode step) against an fp32 HF reference
  logits_torch  the same through the engine's torch attention path (tells the kernels from the model)
  decode_b1  batch-1 decode step time, eager and CUDA-graphed, against the weight-read floor
  kernel     paged decode attention (shuffled blocks) vs the same kernel on contiguous blocks vs SDPA on
             contiguous K/V, at vLLM Fig. 18a's batch sizes and contexts
  block_sizes  vLLM §7.2's trade-off: KV waste of the trace per block size (exact, from the scheduler) and the
             decode kernel's latency per block size (batch 32, context 1,024, shuffled tables)
  decode_b256  one decode step of 256 sequences at 1,024 tokens of context: roofline share and host time
  workload   the 256-request trace: engine (paged, token-level; one untimed run first) and engine (request-level,
             max-length reservation)
  pressure   the same policies and Orca-style reservations at the vLLM paper's KV slot count (15.7K, Table 1)
  orca       iteration- vs request-level scheduling on a trace with varied output lengths
  hf_static  HF generate, static batches of 32/64 padded to their longest prompt (a subset of the trace)
  hf_batch   HF generate_batch, continuous batching (a subset of the trace)
  dial       128 requests queued at t = 0 (so the top setting fills), maximum batch 8/128: time between tokens,
             TTFT and throughput per setting, and the realised mean decode batch
Every timing comes with its replicates; nothing here grades: claims.yaml and the notebook do.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from repro_utils.bench import Parts, script_args, script_fingerprint, sync  # noqa: E402
from tinyserve.engine import Engine  # noqa: E402
from tinyserve.model import LLAMA3_8B, TINY, ModelConfig, build_model  # noqa: E402
from tinyserve.scheduler import Sequence  # noqa: E402
from tinyserve.workload import hf_generate_batch, hf_static, make_workload, summarize  # noqa: E402

PAPER_SLOTS = 15_700  # vLLM Table 1: "Max. # KV cache slots" for the 13B model on one A100-40GB

SETTINGS = {  # full run on the H200 / dry run on the CPU
    "gpu": dict(model=LLAMA3_8B, n_requests=256, prompt_len=(100, 1024), new_tokens=256, max_model_len=2048,
                kv_gib=48, b1_prompt=512, b1_tokens=128, b256_ctx=1024, b256_batch=256, pressure_requests=64,
                kernel_batches=[8, 32], kernel_ctx=[64, 128, 256, 1024],
                orca_requests=128, orca_new=(16, 512), orca_batch=64, hf_static={32: 32, 64: 64},
                hf_batch_requests=64, dial_requests=128, dial_new_tokens=128, dial_batches=[8, 128],
                block_sizes=[8, 16, 32, 64, 128, 256], block_batch=32, block_ctx=1024),
    "dry": dict(model=TINY, n_requests=12, prompt_len=(5, 40), new_tokens=6, max_model_len=128,
                kv_gib=0.01, b1_prompt=20, b1_tokens=6, b256_ctx=64, b256_batch=16, pressure_requests=6,
                kernel_batches=[8], kernel_ctx=[64],
                orca_requests=8, orca_new=(2, 10), orca_batch=4, hf_static={2: 4, 4: 4}, hf_batch_requests=4,
                dial_requests=8, dial_new_tokens=4, dial_batches=[2, 8], block_sizes=[8, 16, 64], block_batch=4,
                block_ctx=64),
}
PARTS = ["bandwidth", "logits", "logits_torch", "decode_b1", "kernel", "block_sizes", "decode_b256", "workload", "pressure", "orca", "hf_static", "hf_batch",
         "dial"]


def waste_over_last_block(kv: dict) -> float:
    """Unused slot-steps (slots in blocks the allocator has handed out, minus token states) over the slot-steps the
    last-block rule allows at the same instants (KVAccount: the sum over running sequences of ceil(len / B) * B - len,
    step by step, from the lengths alone). An allocator that hands out a block only when a sequence's tokens need one
    gives 1, or a hair under it: in a prefill step a running sequence that is not in it already counts its newest
    sampled token, whose K/V (and block) come at its next decode step. One that reserves ahead (to the output's length,
    to the model's maximum) or keeps blocks nobody holds gives more. NaN where the rule allows no waste at all."""
    unused = kv["allocated_slot_steps"] - kv["token_state_slot_steps"]
    allowed = kv["last_block_slot_steps"]
    return unused / allowed if allowed else (1.0 if unused == 0 else float("nan"))


def worst_last_block_waste(kv: dict, block_size: int) -> float:
    """The most waste the last-block rule allows at the instants of this account: every running sequence's last
    block holding a single token (B - 1 empty slots), as a share of what such an allocator would reserve. An upper
    bound for any allocator that wastes only last blocks: if it is under a bar, a paged run at this block size and
    on this trace cannot go over it."""
    empty = (block_size - 1) * kv["sequence_steps"]
    total = kv["token_state_slot_steps"] + empty
    return empty / total if total else 0.0


def timed(fn, reps):
    """Wall seconds of `reps` calls of fn (synchronised), after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def median_ms(fn):
    """Median milliseconds per call: triton's do_bench on CUDA (as repro_utils.bench.time_fn does, without importing
    the course package, whose dependencies the GPU machine may lack); 20 synchronised calls on the CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return 1e3 * statistics.median(timed(fn, 20))


def copy_bandwidth(dev, reps, nbytes):
    """Bytes moved (read + write) per second by a large device-to-device copy: the roofline's bandwidth."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), reps)
    return [2 * nbytes / t for t in times]


def make_hf(cfg, dtype, dev, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly: an fp32 8B model would need 32 GB first
    try:
        with torch.device(dev):
            hf = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(before)
    return hf.eval()


def weight_bytes(model):
    """Bytes a decode step reads: every weight but the embedding table (one row per token is gathered)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def check_logits(hf, model, eng, dev, seed):
    """Prefill logits at every position of 4 prompts packed in one step, and one decode step, against HF."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [37, 128, 300, 511] if model.cfg.hidden_size > 64 else [5, 16, 17, 30]
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    eng.reset()
    seqs = [eng.add_request(p, 2) for p in prompts]
    batch = eng.scheduler.schedule()
    ids, pos, meta, _ = eng.prepare(batch)
    ours_prefill = model.logits(model(ids, pos, eng.kv_caches, meta))  # (T, vocab) fp32
    for s in seqs:
        s.tokens.append(42)  # the decode step's input token, the same for HF
    batch = eng.scheduler.schedule()
    ids, pos, meta, last = eng.prepare(batch)
    ours_decode = model.logits(eng.forward(ids, pos, meta)[last])  # (4, vocab)

    def hf_logits():
        with torch.no_grad():
            pre = torch.cat([hf(torch.tensor([p], device=dev)).logits[0].float() for p in prompts])
            dec = torch.stack([hf(torch.tensor([p + [42]], device=dev)).logits[0, -1].float() for p in prompts])
        return pre, dec

    hf_pre, hf_dec = hf_logits()
    rot = hf.model.rotary_emb
    freqs = {n: b.clone() for n, b in rot.named_buffers()}  # fp32 RoPE frequencies: a cast must not round them
    hf.float()  # the fp32 reference: same weights (bf16 values are exact in fp32)
    ref_pre, ref_dec = hf_logits()
    hf.to(torch.bfloat16)
    for n, b in freqs.items():  # .to(bf16) rounded them (6x the logit error at position 500): put them back
        setattr(rot, n, b)
    eng.reset()
    out = {"prompt_lengths": lengths}
    for name, ours, hfb, ref in (("prefill", ours_prefill, hf_pre, ref_pre), ("decode", ours_decode, hf_dec, ref_dec)):
        out[name] = {"engine_rel_err_vs_fp32": rel_err(ours, ref), "hf_bf16_rel_err_vs_fp32": rel_err(hfb, ref),
                     "engine_vs_hf_bf16_max_abs": (ours - hfb).abs().max().item(),
                     "engine_argmax_agrees_fp32": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                     "hf_bf16_argmax_agrees_fp32": (hfb.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        out[name]["err_ratio_engine_over_hf"] = out[name]["engine_rel_err_vs_fp32"] / max(out[name]["hf_bf16_rel_err_vs_fp32"], 1e-12)
    return out


def decode_b1(model, graphs, s, reps, seed):
    """Median decode step time of one sequence (prompt b1_prompt, b1_tokens new), per replicate."""
    n_blocks = math.ceil((s["b1_prompt"] + s["b1_tokens"]) / 16) + 2
    eng = Engine(model, num_blocks=n_blocks, max_num_seqs=1, max_model_len=s["max_model_len"], cuda_graphs=graphs)
    req = make_workload(1, (s["b1_prompt"], s["b1_prompt"]), s["b1_tokens"], model.cfg.vocab_size, seed)
    meds = []
    for r in range(reps + 1):
        eng.reset()
        eng.run(req)
        steps = [x[4] for x in eng.step_log if x[0] == "decode"]
        if r:  # the first run warms up (kernel compilation, allocator)
            meds.append(statistics.median(steps))
    del eng
    return meds


def decode_b256(eng, s, reps, batch=256):
    """Decode steps of `batch` sequences of b256_ctx tokens (K/V left as zeros: the time does not depend on them)."""
    ctx = s["b256_ctx"]
    eng.reset()
    seqs = [Sequence(i, [1] * ctx, 1) for i in range(batch)]
    for q in seqs:
        eng.bm.allocate(q.block_table, ctx)
    eng.scheduler.running = list(seqs)
    host, step = [], []
    for r in range(reps + 3):  # three warm-ups
        sync()
        t0 = time.perf_counter()
        b = eng.scheduler.schedule()
        ids, pos, meta, last = eng.prepare(b)
        t1 = time.perf_counter()
        eng.sample(eng.model.logits(eng.forward(ids, pos, meta)[last]), b.seqs)  # .tolist() syncs
        t2 = time.perf_counter()
        if r >= 3:
            host.append(t1 - t0)
            step.append(t2 - t0)
    device = timed(lambda: eng.model.logits(eng.forward(ids, pos, meta)[last]).argmax(-1), reps)
    eng.reset()
    return {"batch": batch, "context": ctx, "step_s": step, "host_s": host, "device_only_s": device,
            "kv_bytes_read": batch * ctx * eng.model.cfg.kv_bytes_per_token(eng.dtype)}


def kernel_overhead(cfg, s, dev, dtype, reps, seed, backend):
    """Decode attention alone: the paged kernel through a shuffled block table, the same kernel through an identity
    (contiguous) table, and SDPA on contiguous (B, H, ctx, d) K/V. Medians of the library timer, `reps` each."""
    from torch.nn import functional as F

    from tinyserve.attention import AttnMeta, attention_torch, decode_triton

    kernel = decode_triton if backend == "triton" else attention_torch
    h_q, h_kv, d, bs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for b in s["kernel_batches"]:
        for ctx in s["kernel_ctx"]:
            nblk = b * ctx // bs
            k_cache = torch.randn(nblk, bs, h_kv, d, device=dev, dtype=dtype, generator=gen)
            v_cache = torch.randn(nblk, bs, h_kv, d, device=dev, dtype=dtype, generator=gen)
            q = torch.randn(b, h_q, d, device=dev, dtype=dtype, generator=gen)
            ctx_t = torch.full((b,), ctx, dtype=torch.int32, device=dev)
            tables = {"shuffled": torch.randperm(nblk, device=dev, generator=gen).view(b, -1).int(),
                      "contiguous": torch.arange(nblk, device=dev).view(b, -1).int()}
            row = {"batch": b, "context": ctx}
            for name, t in tables.items():
                meta = AttnMeta(False, None, ctx_t, t, context_lens_host=[ctx] * b, backend=backend)
                row[f"paged_{name}_ms"] = [median_ms(lambda meta=meta, q=q, kc=k_cache, vc=v_cache: kernel(q, kc, vc, meta))
                                            for _ in range(reps)]
            k = k_cache.view(b, ctx, h_kv, d).transpose(1, 2).contiguous()  # (B, H_kv, ctx, d), one sequence per row
            v = v_cache.view(b, ctx, h_kv, d).transpose(1, 2).contiguous()
            row["sdpa_contiguous_ms"] = [median_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q[:, :, None], k, v, enable_gqa=True)) for _ in range(reps)]
            out.append(row)
    return {"rows": out, "timer": "triton.testing.do_bench median (L2 flushed) on CUDA; perf_counter median on the CPU"}


def block_size_sweep(cfg, s, dev, dtype, reps, seed, backend, reqs, num_slots):
    """Waste per block size over the trace (scheduler.simulate: exact, no model) and the paged decode kernel's latency
    per block size at batch 32, context 1,024 (the same tokens in blocks of each size, shuffled)."""
    from tinyserve.attention import AttnMeta, attention_torch, decode_triton
    from tinyserve.scheduler import simulate

    kernel = decode_triton if backend == "triton" else attention_torch
    lengths = [(len(r.prompt), r.max_new_tokens) for r in reqs]
    out = {"sizes": s["block_sizes"], "waste": {}, "kernel_ms": {}, "batch": s["block_batch"], "context": s["block_ctx"]}
    h_q, h_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b, ctx = s["block_batch"], s["block_ctx"]
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(b, h_q, d, device=dev, dtype=dtype, generator=gen)
    ctx_t = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    for bs in s["block_sizes"]:
        acct = simulate(lengths, num_blocks=num_slots // bs, block_size=bs).account
        out["waste"][str(bs)] = 1 - acct.kept_fraction
        nblk = b * ctx // bs
        k_cache = torch.randn(nblk, bs, h_kv, d, device=dev, dtype=dtype, generator=gen)
        v_cache = torch.randn(nblk, bs, h_kv, d, device=dev, dtype=dtype, generator=gen)
        table = torch.randperm(nblk, device=dev, generator=gen).view(b, -1).int()
        meta = AttnMeta(False, None, ctx_t, table, context_lens_host=[ctx] * b, backend=backend)
        out["kernel_ms"][str(bs)] = [median_ms(lambda meta=meta, kc=k_cache, vc=v_cache: kernel(q, kc, vc, meta))
                                     for _ in range(reps)]
    return out


def serve(eng, reqs, reps, num_blocks=None, warmup=False, **policy):
    """Run the trace `reps` times under one policy; per replicate: throughput, latency, KV accounting, host share.
    `warmup`: one untimed run of the whole trace first (its wall time is kept, not graded). The workload part, the
    first to serve the full trace, uses it: in the H200 run at fa21a00 its first timed replicate was 7.6% slower
    than the next two (6,842 against 7,403 and 7,418 tokens/s), and no later part's first replicate was."""
    runs, warm_s = [], None
    for r in range(int(warmup) + reps):
        eng.reset(num_blocks=num_blocks, **policy)
        sync()
        t = time.perf_counter()
        seqs = eng.run(reqs)
        wall = time.perf_counter() - t
        if r < warmup:  # the untimed pass: its wall time is kept, nothing else
            warm_s = wall
            continue
        res = summarize(seqs, wall)
        res["kv"] = eng.scheduler.account.as_dict()
        dec = [x for x in eng.step_log if x[0] == "decode"]
        res["steps"] = {"prefill": len(eng.step_log) - len(dec), "decode": len(dec),
                        "mean_decode_batch": statistics.fmean(x[1] for x in dec) if dec else 0.0,
                        "host_share_of_decode_steps": sum(x[3] for x in dec) / max(sum(x[4] for x in dec), 1e-12)}
        res["outputs_head"] = [q.output[:8] for q in seqs[:4]]
        runs.append(res)
    out = {"policy": {**eng.policy, "num_blocks": eng.bm.num_blocks, "block_size": eng.block_size}, "runs": runs}
    if warmup:
        out["warmup_wall_s"] = warm_s
    return out


def dial_part(eng, s, vocab_size, seed, workload_reps):
    """The dial (claim latency-dial-binds): every request queued at t = 0, as many as the top setting holds, so
    that the maximum batch binds at every setting; each setting serves the same requests `workload_reps` times.
    Per setting: the runs (time between tokens, TTFT, output tokens/s, the realised mean decode batch in
    runs[i]["steps"]) and realised_batch_share, the mean decode batch of each run over the setting."""
    reqs = make_workload(s["dial_requests"], s["prompt_len"], s["dial_new_tokens"], vocab_size, seed + 2)
    out = {"requests": len(reqs), "new_tokens": s["dial_new_tokens"], "arrivals": "all at t=0 (queued)",
           "arrival_s": sorted({r.arrival for r in reqs}), "max_num_seqs": list(s["dial_batches"])}
    for b in s["dial_batches"]:
        out[str(b)] = serve(eng, reqs, workload_reps, max_num_seqs=b, request_level=False, reserve="paged")
        out[str(b)]["realised_batch_share"] = [r["steps"]["mean_decode_batch"] / b for r in out[str(b)]["runs"]]
    return out


def measure(*, dry_run: bool, out: str | Path | None = None, parts=tuple(PARTS), reps: int = 3, workload_reps: int = 2,
            seed: int = 0, budget_s: float = 480.0, progress: bool = True) -> dict:
    """Every part in order; returns the results (and writes them to ``out`` after each part, if given)."""
    parts = list(parts)
    dev = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not dry_run:
        raise RuntimeError("no GPU: use dry_run=True (a tiny model on the CPU)")
    s = SETTINGS["dry" if dry_run else "gpu"]
    res = {"chapter": "06_paged_serving", "profile": "dry-run" if dry_run else "gpu", "settings": {
        k: (v if k != "hf_static" else {str(b): n for b, n in v.items()}) for k, v in s.items()},
        "fingerprint": script_fingerprint(dev, ROOT, ("triton", "transformers")), "parts": {}, "notes": []}
    part = Parts(res, parts, out=out, budget_s=budget_s, desc="ch06", progress=progress)
    dtype = torch.bfloat16
    hf = make_hf(s["model"], dtype, dev, seed)
    model = build_model(ModelConfig.from_hf(hf.config), hf.state_dict(), dtype=dtype, device=dev)
    cfg = model.cfg
    res["model"] = {"params": sum(p.numel() for p in model.parameters()), "weight_bytes_read_per_step": weight_bytes(model),
                    "kv_bytes_per_token": cfg.kv_bytes_per_token(dtype), "dtype": "bf16", "weights": "random N(0, 0.02), seeded"}
    part.setup_done()

    part("bandwidth", lambda: {"bytes_per_s": copy_bandwidth(dev, reps, 4 << 30 if dev.type == "cuda" else 64 << 20),
                               "method": "tensor.copy_ of 4 GiB bf16 (2 x bytes per copy time), synchronised wall time"})
    bw = statistics.median(res["parts"].get("bandwidth", {}).get("bytes_per_s", [float("nan")]))

    # The engine for everything but batch-1: a cache of kv_gib, CUDA graphs on the GPU
    num_blocks = int(s["kv_gib"] * 2**30 // (16 * cfg.kv_bytes_per_token(dtype)))
    eng = Engine(model, num_blocks=num_blocks, max_num_seqs=256, max_model_len=s["max_model_len"],
                 cuda_graphs=dev.type == "cuda", backend="triton" if dev.type == "cuda" else "torch")
    res["engine"] = {"num_blocks": num_blocks, "slots": num_blocks * 16, "backend": eng.backend,
                     "cuda_graph_sizes": eng.graphs.sizes if eng.graphs else None}

    part("logits", lambda: check_logits(hf, model, eng, dev, seed))

    def logits_torch():  # the same check through the torch reference path: separates the kernels from the model
        backend, eng.backend = eng.backend, "torch"
        try:
            return check_logits(hf, model, eng, dev, seed)
        finally:
            eng.backend = backend

    part("logits_torch", logits_torch)

    def b1():
        out = {"prompt": s["b1_prompt"], "new_tokens": s["b1_tokens"], "eager_step_s": decode_b1(model, False, s, reps, seed)}
        if dev.type == "cuda":
            out["graph_step_s"] = decode_b1(model, True, s, reps, seed)
        mean_ctx = s["b1_prompt"] + s["b1_tokens"] / 2
        out["floor_bytes"] = weight_bytes(model) + mean_ctx * cfg.kv_bytes_per_token(dtype)
        out["floor_s"] = out["floor_bytes"] / bw
        return out

    part("decode_b1", b1)

    part("kernel", lambda: kernel_overhead(cfg, s, dev, dtype, reps, seed, eng.backend))
    trace = make_workload(s["n_requests"], s["prompt_len"], s["new_tokens"], cfg.vocab_size, seed)
    part("block_sizes", lambda: block_size_sweep(cfg, s, dev, dtype, reps, seed, eng.backend, trace, num_blocks * 16))

    def b256():
        out = decode_b256(eng, s, reps, batch=min(s["b256_batch"], num_blocks * 16 // s["b256_ctx"]))
        out["roofline_s"] = (weight_bytes(model) + out["kv_bytes_read"]) / bw
        return out

    part("decode_b256", b256)

    reqs = make_workload(s["n_requests"], s["prompt_len"], s["new_tokens"], cfg.vocab_size, seed)
    res["workload"] = {"requests": len(reqs), "prompt_tokens": sum(len(r.prompt) for r in reqs),
                       "output_tokens": sum(r.max_new_tokens for r in reqs), "arrivals": "all at t=0 (offline)"}
    part("workload", lambda: {
        "paged_token_level": serve(eng, reqs, workload_reps, warmup=True, request_level=False, reserve="paged"),
        "request_level_max_len": serve(eng, reqs, workload_reps, request_level=True, reserve="max_len")})

    def pressure():
        sub = reqs[: s["pressure_requests"]]
        blocks = min(num_blocks, PAPER_SLOTS // 16) if dev.type == "cuda" else max(
            math.ceil(s["max_model_len"] / 16), num_blocks // 8)
        out = {"slots": blocks * 16, "requests": len(sub), "note": "KV slots capped at the vLLM paper's 13B/A100-40GB count"}
        for name, pol in (("paged_token_level", dict(request_level=False, reserve="paged")),
                          ("oracle_token_level", dict(request_level=False, reserve="max_len")),
                          ("max_token_level", dict(request_level=False, reserve="max_model_len"))):
            out[name] = serve(eng, sub, workload_reps, num_blocks=blocks, **pol)
        eng.reset(num_blocks=num_blocks, request_level=False, reserve="paged")
        return out

    part("pressure", pressure)

    def orca():
        var = make_workload(s["orca_requests"], s["prompt_len"], s["orca_new"], cfg.vocab_size, seed + 1)
        out = {"requests": len(var), "new_tokens_range": s["orca_new"], "max_num_seqs": s["orca_batch"]}
        for name, pol in (("token_level", dict(request_level=False)), ("request_level", dict(request_level=True))):
            out[name] = serve(eng, var, workload_reps, max_num_seqs=s["orca_batch"], reserve="paged", **pol)
        eng.reset(max_num_seqs=256, request_level=False)
        return out

    part("orca", orca)

    def static():
        out = {"note": "HF generate on the first n requests of the trace (tokens/s is per token, so a subset compares)"}
        for bsz, n in s["hf_static"].items():
            out[str(bsz)] = hf_static(hf, reqs[:n], bsz)
        return out

    part("hf_static", static)
    part("hf_batch", lambda: {"note": "HF generate_batch on the first n requests of the trace",
                              **hf_generate_batch(hf, reqs[: s["hf_batch_requests"]])})

    def dial():
        out = dial_part(eng, s, cfg.vocab_size, seed, workload_reps)
        eng.reset(max_num_seqs=256)
        return out

    part("dial", dial)
    part.close()
    return res


def main(argv=None):
    args, parts = script_args(__doc__, PARTS, budget_s=480.0, reps_help="replicates of every microbenchmark", argv=argv,
                              extra=lambda ap: ap.add_argument("--workload-reps", type=int, default=2,
                                                               help="replicates of each full-trace run"))
    res = measure(dry_run=args.dry_run, out=args.out, parts=parts, reps=args.reps, workload_reps=args.workload_reps,
                  seed=args.seed, budget_s=args.budget_s)
    print(f"wrote {args.out} in {res['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
