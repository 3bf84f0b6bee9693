"""Chapter 07's measurements in one run: prefix caching in tinyserve on random Llama-3-8B-shaped weights.

    PYTHONPATH=$PWD/src python3 chapters/07_prefix_caching/prefix_bench.py --out $OUT/ch07_gpu.json
    PYTHONPATH=$PWD/src python3 chapters/07_prefix_caching/prefix_bench.py --dry-run --out /tmp/ch07_dry.json  # CPU

Parts, in order (each writes the JSON again when it ends, so a run cut short keeps what it measured):
  floors      the GPU's copy bandwidth and bf16 matmul rate, measured here: the physical floor under a prefill
  hit_rates   every workload through the scheduler without a model (exact: hits depend on token ids, lengths
              and policy only): hashed blocks vs radix tree, FCFS vs cache-aware, against the optimal (union trie);
              with the engine's whole pool and at the vLLM paper's 15.7K KV slots
  ttft        one request alone, a shared system prompt of 512 / 2K / 8K tokens + a ~100-token suffix: cold (no
              cache), cached (hash, radix; the prompt's prefix left by an earlier request) and the suffix alone
  agent       the agent loop (rounds = steps), cache off / hash / radix, interleaved replicates
  control     the no-sharing trace, cache off / hash / radix, interleaved replicates: what the cache costs
  few_shot    vLLM §6.4's shared prefixes (1-shot 80, 5-shot 341 tokens) at the paper's 15.7K KV slots: Orca (Oracle)
              reservation without sharing, paging without sharing, paging + hashed prefix blocks, at every request
              count n of the declared sweep (the ratio is a step function of n: see replay_pass)
  pressure    eviction: (a) several system prompts taking turns in a pool that holds about one and a half of
              them; (b) the agent loop in a pool smaller than its agents' contexts; hit rates and throughput
Every timing has its replicates; nothing here grades: claims.yaml and the notebook do.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import workloads as wl  # noqa: E402

from repro_utils.bench import Parts, script_args, script_fingerprint, sync  # noqa: E402
from tinyserve.engine import Engine  # noqa: E402
from tinyserve.model import LLAMA3_8B, TINY, ModelConfig, build_model  # noqa: E402
from tinyserve.scheduler import simulate_rounds  # noqa: E402
from tinyserve.workload import Request  # noqa: E402

BLOCK = 16
# the arms: no cache; vLLM's way (hashed blocks, first-come-first-served); SGLang's way (radix tree, longest prefix first)
# and Orca (Oracle): each request reserves prompt + output at admission, no sharing (vLLM §6.1's baseline)
POLICIES = {"off": dict(prefix_cache=None, cache_aware=False, reserve="paged"),
            "hash": dict(prefix_cache="hash", cache_aware=False, reserve="paged"),
            "radix": dict(prefix_cache="radix", cache_aware=True, reserve="paged"),
            "oracle": dict(prefix_cache=None, cache_aware=False, reserve="max_len")}
PAPER_SLOTS = 15_700  # vLLM Table 1: KV slots of the 13B model on one A100-40GB

SETTINGS = {  # full run on the H200 / dry run on the CPU
    "gpu": dict(model=LLAMA3_8B, kv_gib=48, max_model_len=8448, scale="gpu",
                ttft_system=[512, 2048, 8192], ttft_suffix=(80, 120),
                agent=dict(agents=16, steps=8, scaffold_len=2048, tool=(200, 400), action_tokens=16),
                control=dict(n=64, prompt_len=(100, 1024), new_tokens=128),
                pressure_prompts=dict(prompts=6, system_len=2048, per_prompt=4, suffix=(80, 120), new_tokens=8),
                # the declared sweep of request counts (claims.yaml's header has the wave arithmetic behind it)
                few_shot=dict(ns=[32, 64, 96, 128, 192, 256], query=(20, 60), new_tokens=32), few_shot_slots=PAPER_SLOTS,
                few_shot_need_s=240),
    "dry": dict(model=TINY, kv_gib=0.004, max_model_len=512, scale="dry",
                ttft_system=[64, 128, 256], ttft_suffix=(10, 14),
                agent=dict(agents=3, steps=3, scaffold_len=48, tool=(8, 16), action_tokens=3),
                control=dict(n=6, prompt_len=(10, 40), new_tokens=5),
                pressure_prompts=dict(prompts=4, system_len=48, per_prompt=3, suffix=(8, 12), new_tokens=3),
                few_shot=dict(ns=[4, 8, 16], query=(5, 9), new_tokens=3), few_shot_slots=1024, few_shot_need_s=0),
}
PARTS = ["floors", "hit_rates", "ttft", "agent", "control", "few_shot", "pressure"]


def floors(dev, reps: int, nbytes: int = 4 * 2**30, n: int = 8192) -> dict:
    """What the hardware allows, timed in this run: bytes per second of a large device-to-device copy (read +
    write) and bf16 FLOP/s of an n x n x n matmul, ``reps`` medians each. A prefill of t tokens can take no less
    than max(weight bytes / bandwidth, 2 x weights x t / matmul rate)."""
    if dev.type != "cuda":
        return {"skipped": "the floors are measured on a GPU only"}
    from triton.testing import do_bench

    def measure(src, dst, a, b):
        out = {"copy_bytes": 2 * nbytes, "matmul_n": n, "copy_bytes_per_s": [], "matmul_flop_per_s": []}
        for _ in range(reps):
            out["copy_bytes_per_s"].append(2 * nbytes / (do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3))
            out["matmul_flop_per_s"].append(2 * n**3 / (do_bench(lambda: a @ b, return_mode="median") / 1e3))
        return out

    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    out = measure(x, torch.empty_like(x), *(torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2)))
    del x
    torch.cuda.empty_cache()  # give the buffers back before the engine's runs
    return out


def rounds_of(w: wl.Workload):
    return [[(r.prompt, r.max_new_tokens) for r in rnd] for rnd in w.rounds]


def optimal_hit_rate(w: wl.Workload) -> float:
    """The most any cache could reuse (unbounded memory, best order): every distinct prefix of every prompt is
    computed once (a node of the union trie), and each prompt computes at least its last token (SGLang's
    "optimal" of its Fig. 13 counts the same way: no recomputation of a shared prefix)."""
    trie: dict = {}
    computed = 0
    for r in w.requests:
        node, fresh = trie, 0
        for t in r.prompt:
            if t not in node:
                node[t] = {}
                fresh += 1
            node = node[t]
        computed += max(fresh, 1)
    return 1 - computed / w.prompt_tokens


def hit_rates(workloads, num_blocks: int, max_model_len: int) -> dict:
    """Exact hit rates (cached prompt tokens / prompt tokens over every prefill) per workload and policy."""
    out = {}
    for w in workloads:
        row = {"shape": w.shape, "prompt_tokens": w.prompt_tokens, "requests": len(w.requests),
               "optimal_hit_rate": optimal_hit_rate(w)}
        for kind in ("hash", "radix"):
            for aware in (False, True):
                st = simulate_rounds(rounds_of(w), num_blocks, BLOCK, prefix_cache=kind, cache_aware=aware,
                                     max_model_len=max_model_len).cache_stats
                row[f"{kind}{'_aware' if aware else ''}"] = {**st, "hit_rate": st["cached_tokens"] / st["prefill_tokens"]}
        out[w.name] = row
    return out


def serve_rounds(eng: Engine, w: wl.Workload, num_blocks=None, **policy) -> dict:
    """One pass of a workload, round after round, from an empty cache. Throughput, TTFT, cache counts."""
    eng.reset(num_blocks=num_blocks, **policy)
    sync()
    t0 = time.perf_counter()
    seqs = [s for rnd in w.rounds for s in eng.run(rnd)]
    wall = time.perf_counter() - t0
    sched = eng.scheduler
    n_out = sum(len(s.output) for s in seqs)
    ttft = [s.token_times[0] - s.arrival for s in seqs]  # from the start of the request's round
    out = {"wall_s": wall, "output_tokens": n_out, "output_tok_s": n_out / wall,
           "ttft_s": {"mean": statistics.fmean(ttft), "p50": statistics.median(ttft), "max": max(ttft)},
           "preemptions": sched.num_preemptions, "prefill_steps": sum(1 for x in eng.step_log if x[0] == "prefill"),
           "prefill_tokens_computed": sum(x[2] for x in eng.step_log if x[0] == "prefill"),
           "outputs_head": [s.output[:6] for s in seqs[:3]]}
    if sched.cache is not None:
        st = sched.cache_stats
        out["cache"] = {**st, "hit_rate": st["cached_tokens"] / max(st["prefill_tokens"], 1),
                        "evicted_blocks": sched.cache.evicted_blocks}
    return out


def interleaved(eng, w, reps, arms, num_blocks=None) -> dict:
    """reps rounds of (arm 1, arm 2, ...): drift in the machine hits every arm alike; ratios pair by replicate."""
    runs = {a: [] for a in arms}
    serve_rounds(eng, w, num_blocks=num_blocks, **POLICIES[arms[-1]])  # warm-up (kernels, allocator): the cheap arm
    for _ in range(reps):
        for a in arms:
            runs[a].append(serve_rounds(eng, w, num_blocks=num_blocks, **POLICIES[a]))
    return {"workload": w.shape, "prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens,
            "num_blocks": num_blocks or eng.num_blocks, "runs": runs}


def few_shot_sweep(eng, s, reps, vocab, seed) -> dict:
    """vLLM §6.4's arms (Orca (Oracle), paging alone, paging + hashed blocks) at every n of the declared sweep, for
    the 1-shot and 5-shot prefixes: {"ns": [...], "1": {str(n): interleaved(...)}, "5": {...}}."""
    fs = dict(s["few_shot"])
    ns = fs.pop("ns")
    out = {"ns": ns}
    for shots in (1, 5):
        out[str(shots)] = {str(n): interleaved(eng, wl.few_shot(shots, n=n, **fs, vocab=vocab, seed=seed), reps,
                                               ["oracle", "off", "hash"], num_blocks=s["few_shot_slots"] // BLOCK)
                           for n in ns}
    return out


def replay_pass(w: wl.Workload, num_blocks: int, policy: dict, *, max_num_seqs: int = 256,
                max_num_batched_tokens: int = 8192, max_model_len: int | None = 8448) -> dict:
    """One pass of a single-round workload through the engine's scheduler without a model (every step "samples"
    token -1): the counts that set an arm's wall time, i.e. prefill steps, decode steps, preemptions and prefill
    tokens computed (cached ones excluded, recomputations after a preemption included), as Engine.step_log would
    count them. The defaults are the engine's in measure(). Decode steps count the waves: an arm that holds all n
    requests at once decodes new_tokens - 1 steps after its prefill; one that must serve them in k waves, about
    k times that."""
    from tinyserve.scheduler import simulate_rounds

    out = {"prefill_steps": 0, "decode_steps": 0, "prefill_tokens_computed": 0}

    def count(batch):
        if batch.is_prefill:
            out["prefill_steps"] += 1
            out["prefill_tokens_computed"] += sum(len(q.tokens) - q.num_cached for q in batch.seqs)
        else:
            out["decode_steps"] += 1

    sched = simulate_rounds([[(r.prompt, r.max_new_tokens) for r in w.requests]], num_blocks, BLOCK, observe=count,
                            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=max_model_len, **policy)
    out["preemptions"] = sched.num_preemptions
    return out


def step_ratio(shots: int, n: int, num_blocks: int = PAPER_SLOTS // BLOCK, num: str = "oracle", den: str = "hash",
               seed: int = 0, query=(20, 60), new_tokens: int = 32) -> float:
    """Decode steps of arm ``num`` over arm ``den`` on the few-shot trace of n requests: the wave count's ratio,
    which the throughput ratio follows up to the prefill's share of the time."""
    w = wl.few_shot(shots, n=n, query=query, new_tokens=new_tokens, seed=seed)
    steps = {a: replay_pass(w, num_blocks, POLICIES[a])["decode_steps"] for a in (num, den)}
    return steps[num] / steps[den]


def sweep_ratio(rows: dict, num: str, den: str, metric: str = "output_tok_s") -> list[float]:
    """One value per replicate: the mean over the sweep's n of that replicate's ratio num/den. rows maps each n to an
    interleaved() result; replicate r of every arm at one n ran in the same interleaved round, so each ratio pairs
    runs made side by side, and the mean weights every n of the sweep alike. Needs the same replicate count at
    every n."""
    per_n = []
    for n, part in rows.items():
        a, b = part["runs"][num], part["runs"][den]
        if len(a) != len(b):
            raise ValueError(f"n = {n}: {len(a)} runs of {num} against {len(b)} of {den}")
        per_n.append([x[metric] / y[metric] for x, y in zip(a, b)])
    if not per_n or len({len(v) for v in per_n}) != 1:
        raise ValueError("every n needs the same number of replicates")
    return [statistics.fmean(col) for col in zip(*per_n)]


def ttft(eng, s, reps, vocab, seed) -> dict:
    """Time to first token of one request alone (the step's whole wall time: scheduling, matching, copy, prefill,
    sampling). cold: no cache; cached_*: an earlier request with the same system prompt and another suffix has
    finished, so its prefix is in the cache; suffix_only: the suffix alone, no system prompt, no cache.

    host_s times the host's share of the same step: scheduling and input preparation, then the forward call until
    it returns to Python, i.e. until every kernel of the prefill is queued (nothing in it waits for the GPU). When
    host_s is close to the TTFT, the GPU was waiting for the CPU: the step is launch-bound."""
    launch = []
    model_forward = eng.forward

    def forward_timed(*a, **k):  # the engine's own forward, with the time until it returns recorded
        t = time.perf_counter()
        h = model_forward(*a, **k)
        launch.append(time.perf_counter() - t)
        return h

    eng.forward = forward_timed  # an instance attribute shadows the method; deleted again below
    try:
        return _ttft_rows(eng, s, reps, vocab, seed, launch)
    finally:
        del eng.forward


def _ttft_rows(eng, s, reps, vocab, seed, launch) -> dict:
    import random

    out = {}
    for system_len in s["ttft_system"]:
        rng = random.Random(seed + system_len)

        def tok(n, rng=rng):
            return [rng.randrange(1, vocab) for _ in range(n)]

        system = tok(system_len)
        rows = {k: [] for k in ("cold", "cached_hash", "cached_radix", "suffix_only")}
        host = {k: [] for k in rows}
        hits = {}

        def host_s():  # the last step: scheduling + input preparation, plus the forward call until it returned
            return eng.step_log[-1][3] + launch[-1]

        for r in range(reps + 1):  # replicate 0 warms up (Triton compiles per shape)
            suffix = tok(rng.randint(*s["ttft_suffix"]))
            target = Request(system + suffix, 1)
            for name, kind in (("cold", None), ("cached_hash", "hash"), ("cached_radix", "radix")):
                eng.reset(prefix_cache=kind, cache_aware=False)
                if kind:  # leave the system prompt in the cache
                    eng.run([Request(system + tok(rng.randint(*s["ttft_suffix"])), 2)])
                sync()
                seq = eng.run([target])[0]
                if r:
                    rows[name].append(seq.token_times[0] - seq.arrival)
                    host[name].append(host_s())
                    if kind:
                        hits[name] = eng.scheduler.cache_stats["cached_tokens"] - system_len  # beyond the prompt
            eng.reset(prefix_cache=None, cache_aware=False)
            sync()
            seq = eng.run([Request(suffix, 1)])[0]
            if r:
                rows["suffix_only"].append(seq.token_times[0] - seq.arrival)
                host["suffix_only"].append(host_s())
        out[str(system_len)] = {"system_len": system_len, "ttft_s": rows, "host_s": host,
                                "cached_tokens_beyond_system": hits,  # 0 means exactly the system prompt was reused
                                "cold_over_cached_hash": [a / b for a, b in zip(rows["cold"], rows["cached_hash"])],
                                "cached_hash_over_suffix": [a / b for a, b in zip(rows["cached_hash"], rows["suffix_only"])]}
    eng.reset(**POLICIES["off"])
    return out


def pressure(eng, s, reps, vocab, seed) -> dict:
    """Where caching stops being free: prefixes evicted before they are reused."""
    p = s["pressure_prompts"]
    import random

    rng = random.Random(seed + 7)
    systems = [[rng.randrange(1, vocab) for _ in range(p["system_len"])] for _ in range(p["prompts"])]
    rounds = [[Request(sp + [rng.randrange(1, vocab) for _ in range(rng.randint(*p["suffix"]))], p["new_tokens"])]
              for _ in range(p["per_prompt"]) for sp in systems]  # one request per round, prompts taking turns
    turns = wl.Workload("rotating_system_prompts", rounds,
                        f"{p['prompts']} system prompts of {p['system_len']} tokens taking turns, {p['per_prompt']} "
                        f"requests each, one at a time")
    tight = -(-int(1.5 * p["system_len"] + p["suffix"][1] + p["new_tokens"]) // BLOCK)  # ~1.5 prompts fit
    agent = wl.agent_loop(**s["agent"], vocab=vocab, seed=seed)
    final = sum(len(r.prompt) + r.max_new_tokens for r in agent.rounds[-1])
    agent_blocks = max(-(-final // BLOCK) // 2, -(-max(len(r.prompt) + r.max_new_tokens for r in agent.requests) // BLOCK))
    out = {"rotating": {"tight_blocks": tight, "ample": {}, "tight": {}},
           "agent": {"tight_blocks": agent_blocks, "final_round_tokens": final}}
    for kind in ("hash", "radix"):
        out["rotating"]["ample"][kind] = serve_rounds(eng, turns, **POLICIES[kind])
        out["rotating"]["tight"][kind] = serve_rounds(eng, turns, num_blocks=tight, **POLICIES[kind])
    out["rotating"]["tight"]["off"] = serve_rounds(eng, turns, num_blocks=tight, **POLICIES["off"])
    # one pass per arm: these figures describe eviction (hit rates, evicted blocks); no claim or goal times them
    out["agent"]["interleaved"] = interleaved(eng, agent, 1, ["off", "hash", "radix"], num_blocks=agent_blocks)
    eng.reset(num_blocks=eng.num_blocks, **POLICIES["off"])
    return out


def measure(*, dry_run: bool, out: str | Path | None = None, parts=tuple(PARTS), reps: int = 3, seed: int = 0,
            budget_s: float = 450.0, progress: bool = True) -> dict:
    """Every part in order; returns the results (and writes them to ``out`` after each part, if given)."""
    parts = list(parts)
    dev = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not dry_run:
        raise RuntimeError("no GPU: use dry_run=True (a tiny model on the CPU)")
    s = SETTINGS["dry" if dry_run else "gpu"]
    res = {"chapter": "07_prefix_caching", "profile": "dry-run" if dry_run else "gpu", "settings": s,
           "fingerprint": script_fingerprint(dev, ROOT), "parts": {}, "notes": []}
    part = Parts(res, parts, out=out, budget_s=budget_s, desc="ch07", progress=progress)
    dtype = torch.bfloat16
    cfg = ModelConfig(**s["model"])
    model = build_model(cfg, seed=seed, dtype=dtype, device=dev)
    num_blocks = int(s["kv_gib"] * 2**30 // (BLOCK * cfg.kv_bytes_per_token(dtype)))
    eng = Engine(model, num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=256, max_model_len=s["max_model_len"],
                 cuda_graphs=dev.type == "cuda", backend="triton" if dev.type == "cuda" else "torch")
    res["model"] = {"params": sum(p.numel() for p in model.parameters()), "dtype": "bf16",
                    # what every prefill reads once (all weights but the embedding table, of which it gathers rows)
                    "weight_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                        if not n.startswith("embed_tokens")),
                    "lm_head_params": model.lm_head.weight.numel(), "layers": cfg.num_hidden_layers,
                    "hidden": cfg.hidden_size,
                    "layer_params": sum(p.numel() for n, p in model.named_parameters()
                                        if not n.startswith(("embed_tokens", "lm_head"))),
                    "weights": "random N(0, 0.02), seeded", "kv_bytes_per_token": cfg.kv_bytes_per_token(dtype)}
    res["engine"] = {"num_blocks": num_blocks, "slots": num_blocks * BLOCK, "block_size": BLOCK, "backend": eng.backend,
                     "max_num_batched_tokens": eng.policy["max_num_batched_tokens"]}
    part.setup_done()
    vocab = cfg.vocab_size

    loads = wl.all_workloads(s["scale"], vocab=vocab, seed=seed)
    part("floors", lambda: floors(dev, reps))
    part("hit_rates", lambda: {"ample": hit_rates(loads, num_blocks, s["max_model_len"]),  # the engine's whole pool
                               # where eviction can bite: vLLM's 13B/A100-40GB slot count (gpu), a small pool (dry)
                               "paper_slots": hit_rates(loads, s["few_shot_slots"] // BLOCK, s["max_model_len"]),
                               "slots": {"ample": num_blocks * BLOCK, "paper_slots": s["few_shot_slots"]}})
    part("ttft", lambda: ttft(eng, s, reps, vocab, seed))
    part("agent", lambda: interleaved(eng, wl.agent_loop(**s["agent"], vocab=vocab, seed=seed), reps,
                                      ["off", "hash", "radix"]))
    part("control", lambda: interleaved(eng, wl.no_sharing(**s["control"], vocab=vocab, seed=seed), reps,
                                        ["off", "hash", "radix"]))
    # need_s: skipped rather than started too late to end inside budget_s (the gpu estimate is in claims.yaml)
    part("few_shot", lambda: few_shot_sweep(eng, s, reps, vocab, seed), need_s=s["few_shot_need_s"])
    part("pressure", lambda: pressure(eng, s, reps, vocab, seed))
    part.close()
    return res


def summary(res: dict) -> list[str]:
    """A few lines to read at a glance (the JSON has everything)."""
    p, lines = res["parts"], []
    for name, row in p.get("hit_rates", {}).get("ample", {}).items():
        if isinstance(row, dict) and "hash" in row:
            lines.append(f"hit rate {name:20s} optimal {row['optimal_hit_rate']:.3f}  hash {row['hash']['hit_rate']:.3f} / aware {row['hash_aware']['hit_rate']:.3f}"
                         f"   radix {row['radix']['hit_rate']:.3f} / aware {row['radix_aware']['hit_rate']:.3f}")
    for k, row in p.get("ttft", {}).items():
        if isinstance(row, dict) and "ttft_s" in row:
            m = {a: statistics.median(v) * 1e3 for a, v in row["ttft_s"].items()}
            lines.append(f"TTFT system {k:>5}: cold {m['cold']:.1f} ms, cached hash {m['cached_hash']:.1f} / radix "
                         f"{m['cached_radix']:.1f} ms, suffix alone {m['suffix_only']:.1f} ms")
    fs = p.get("few_shot", {})
    for k in ("1", "5"):
        for n, v in fs.get(k, {}).items():
            tps = {a: statistics.median(r["output_tok_s"] for r in x) for a, x in v["runs"].items()}
            lines.append(f"few-shot {k}, n = {n}: tok/s " + ", ".join(f"{a} {t:.1f}" for a, t in tps.items())
                         + f"; hash/oracle {tps['hash'] / tps['oracle']:.2f}x")
        if fs.get(k):
            lines.append(f"few-shot {k}: hash/oracle, mean over n, per replicate: "
                         + ", ".join(f"{x:.2f}" for x in sweep_ratio(fs[k], "hash", "oracle")))
    for name in ("agent", "control"):
        if "runs" in p.get(name, {}):
            tps = {a: statistics.median(r["output_tok_s"] for r in v) for a, v in p[name]["runs"].items()}
            lines.append(f"{name}: tok/s " + ", ".join(f"{a} {t:.1f}" for a, t in tps.items())
                         + f"; hash/off {tps['hash'] / tps['off']:.2f}x")
    if "rotating" in p.get("pressure", {}):
        pr = p["pressure"]
        hr = {f"{m}/{k}": pr["rotating"][m][k]["cache"]["hit_rate"] for m in ("ample", "tight") for k in ("hash", "radix")}
        lines.append("pressure rotating prompts hit rate: " + ", ".join(f"{k} {v:.2f}" for k, v in hr.items()))
        ag = pr["agent"]["interleaved"]["runs"]
        lines.append(f"pressure agent ({pr['agent']['tight_blocks']} blocks): hit rate hash "
                     f"{ag['hash'][0]['cache']['hit_rate']:.2f}, evicted {ag['hash'][0]['cache']['evicted_blocks']} blocks")
    return lines


def main(argv=None):
    args, parts = script_args(__doc__, PARTS, budget_s=450.0, argv=argv)
    res = measure(dry_run=args.dry_run, out=args.out, parts=parts, reps=args.reps, seed=args.seed,
                  budget_s=args.budget_s)
    failed = {k: v.get("error") or v.get("skipped") for k, v in res["parts"].items() if "error" in v or "skipped" in v}
    print("\n".join(summary(res)))
    print(f"wrote {args.out} in {res['wall_s']:.1f} s; failed or skipped: {failed or 'none'}")


if __name__ == "__main__":
    main()
