"""Where does the suffix-alone TTFT floor come from: the host launching kernels, or the GPU's clocks?

A probe, not a part of the chapter's measurement. It builds the gpu profile's engine (random Llama-3-8B-shaped
bf16 weights), times a 100-token request alone (`ttft_ms`) and how long the engine's forward call takes to return
to Python (`enqueue_ms`: every kernel queued, nothing waited for), in groups: after a pause, right after cold
8,192-token prefills, after 2 s and 7 s idle, after 3 s of large matmuls; `nvidia-smi` reads the SM clock, power
and throttle reasons after each group. If ttft - enqueue is small, the GPU was waiting for the host.

It writes `diag07.json` to $OUT (elsewhere to the ignored `_build/probes/`). It ran once, on an H200, at commit
798cfe4 (right after chapter 05's gpu run, in the same device call; tinyserve as at c977b60), as
`python3 ttft_host_probe.py` with OUT set; that file is committed as `probes/ttft_host_probe-h200.json`, with the
probe, commit, date and note fields added to it. On the CPU it runs the chapter's tiny dry-run model instead.
"""
import json
import os
import random
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prefix_bench as pb  # noqa: E402

from tinyserve.engine import Engine  # noqa: E402
from tinyserve.model import ModelConfig, build_model  # noqa: E402
from tinyserve.workload import Request  # noqa: E402

dry = not torch.cuda.is_available()
dev = torch.device("cpu" if dry else "cuda")
s = pb.SETTINGS["dry" if dry else "gpu"]
cfg = ModelConfig(**s["model"])
model = build_model(cfg, seed=0, dtype=torch.bfloat16, device=dev)
nb = int(s["kv_gib"] * 2**30 // (16 * cfg.kv_bytes_per_token(torch.bfloat16)))
eng = Engine(model, num_blocks=nb, block_size=16, max_num_seqs=256, max_model_len=s["max_model_len"],
             cuda_graphs=not dry, backend="torch" if dry else "triton")
enq = []
orig = eng.forward


def fwd(*a, **k):  # the engine's forward, timed until it returns to Python
    t = time.perf_counter()
    h = orig(*a, **k)
    enq.append(time.perf_counter() - t)
    return h


eng.forward = fwd


def clocks():
    if dry:
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,"
                        "clocks_throttle_reasons.active", "--format=csv,noheader"], capture_output=True, text=True)
    return r.stdout.strip()


rng = random.Random(0)


def tok(n):
    return [rng.randrange(1, cfg.vocab_size) for _ in range(n)]


suffix = tok(100)
big = s["ttft_system"][-1]


def one(prompt):
    eng.reset(prefix_cache=None, cache_aware=False)
    if not dry:
        torch.cuda.synchronize()
    enq.clear()
    seq = eng.run([Request(prompt, 1)])[0]
    return {"ttft_ms": 1e3 * (seq.token_times[0] - seq.arrival), "enqueue_ms": 1e3 * enq[0]}


out = {"device": torch.cuda.get_device_name() if not dry else "cpu", "groups": []}


def group(name, n, prompt=None):
    rows = [one(prompt or suffix) for _ in range(n)]
    out["groups"].append({"name": name, "clock": clocks(), "rows": rows})
    print(name, out["groups"][-1]["clock"], [(round(r["ttft_ms"], 1), round(r["enqueue_ms"], 1)) for r in rows],
          flush=True)


group("warm", 3)
time.sleep(3)
group("cool suffix", 5)
for _ in range(3):
    group(f"cold {big}", 3, tok(big) + suffix)
    group("suffix right after", 5)
time.sleep(2)
group("suffix after 2 s", 5)
time.sleep(5)
group("suffix after 7 s", 5)
if not dry:  # 3 s of large matmuls, then the suffix again
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = time.perf_counter()
    while time.perf_counter() - t < 3:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
    group("suffix after 3 s of matmuls", 5)
# $OUT on the GPU box; elsewhere the ignored _build/ folder (a run here once left its CPU JSON in the repository root)
out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "_build", "probes")
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, "diag07.json"), "w") as f:
    json.dump(out, f, indent=1)
