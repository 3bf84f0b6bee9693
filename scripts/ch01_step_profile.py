"""Where chapter 01's training step spends its time on a GPU (issue 16: the polar test does not fit the gpu call).

The `gpu` profile's runs train record 4's model (4 layers, 256 wide, 2 heads of 128, seq 512, vocab 50,304) with
Muon at 32 x 512 tokens a step. On the H200 at 3d29a44 they ran at about 70 steps/s (14 ms a step); whether that is
the GPU's work or the host's launches decides whether CUDA graphs or a fused cross-entropy could make room for §4.
This script measures, on one GPU, with `muon_speedrun.train` itself (regional compile, as the notebook runs it):

* seconds per step from two runs of different lengths (the difference cancels setup and the final evaluation);
* the GPU's kernel time per step and kernels per step, from `torch.profiler` over two more runs (same difference);
* forward+backward and the optimizers' step timed apart (`repro_utils.bench.time_fn`: medians);
* the top operators by GPU time.

    PYTHONPATH=$PWD/src:$PWD/chapters/01_speedrun_muon python3 scripts/ch01_step_profile.py --out x.json
    ... --dry-run   (a tiny model on the CPU: checks the script, measures nothing worth reading)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import muon_speedrun as ms
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from repro_utils.bench import time_fn


def setup(dry: bool):
    base = ms.GPTConfig(vocab_size=512 if dry else 50304, n_layer=2 if dry else 4, n_head=2,
                        n_embd=32 if dry else 256, seq_len=32 if dry else 512)
    cfg = dict(ms.ladder_configs(base))["+ rotary"]  # record 4's architecture, as §2 and §4 train it
    batch = 4 if dry else 32
    run = ms.RunConfig(optimizer="muon", lr=0.02, adam_lr=0.0036, embed_lr=0.0036, momentum=0.95, warmup_frac=0.0,
                       batch_size=batch, eval_every=0, eval_tokens=cfg.seq_len * 8, compile=not dry, seed=0)
    rng = np.random.default_rng(0)
    train = rng.integers(0, cfg.vocab_size, size=2_000_000 if not dry else 50_000).astype(np.int64)
    val = rng.integers(0, cfg.vocab_size, size=cfg.seq_len * 64).astype(np.int64)
    return cfg, run, train, val


def steps_run(cfg, run, train, val, steps, device):
    r = replace(run, tokens=steps * run.batch_size * cfg.seq_len)
    hist, model, opts = ms.train(cfg, r, train, val, device=device)
    return hist.seconds, model, opts


def kernel_stats(prof) -> tuple[float, int]:
    """(GPU kernel milliseconds, kernel count) of a profile."""
    ms_total, n = 0.0, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms_total += e.device_time / 1e3 if hasattr(e, "device_time") else e.cuda_time / 1e3
            n += 1
    return ms_total, n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    cfg, run, train, val = setup(dry)
    res = {"device": torch.cuda.get_device_name() if not dry else "cpu (dry run)", "torch": torch.__version__,
           "model": dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, seq_len=cfg.seq_len, vocab=cfg.vocab_size,
                         batch=run.batch_size)}
    short, long_ = (3, 9) if dry else (40, 240)
    t = time.perf_counter()
    steps_run(cfg, run, train, val, short, device)  # compiles (regional, static shapes)
    res["warmup_run_s"] = time.perf_counter() - t
    s_short = steps_run(cfg, run, train, val, short, device)[0]
    s_long, model, opts = steps_run(cfg, run, train, val, long_, device)
    res["step_ms"] = 1e3 * (s_long - s_short) / (long_ - short)
    res["steps_per_s"] = 1e3 / res["step_ms"]
    print(f"{res['step_ms']:.2f} ms a step ({res['steps_per_s']:.1f} steps/s)", flush=True)

    if not dry:
        p_short, p_long = 20, 80
        stats = {}
        for n in (p_short, p_long):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                steps_run(cfg, run, train, val, n, device)
            stats[n] = kernel_stats(prof)
            if n == p_long:
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
        res["kernel_ms_per_step"] = (stats[p_long][0] - stats[p_short][0]) / (p_long - p_short)
        res["kernels_per_step"] = (stats[p_long][1] - stats[p_short][1]) / (p_long - p_short)
        res["gpu_busy_share"] = res["kernel_ms_per_step"] / res["step_ms"]
        res["top_ops"] = table
        print(table, flush=True)
        print(f"GPU kernels {res['kernel_ms_per_step']:.2f} ms a step ({res['kernels_per_step']:.0f} kernels), "
              f"{100 * res['gpu_busy_share']:.0f}% of the step's wall time", flush=True)

    # forward+backward and the optimizer step, timed apart on the trained model
    x = torch.from_numpy(train[: run.batch_size * cfg.seq_len].reshape(run.batch_size, cfg.seq_len)).to(device)
    y = torch.from_numpy(train[1: run.batch_size * cfg.seq_len + 1].reshape(run.batch_size, cfg.seq_len)).to(device)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with ms.autocast(torch.device(device)):
            loss = model(x, y)
        loss.backward()

    def opt_step():
        for o in opts:
            o.step()

    res["fwd_bwd_ms"] = time_fn(fwd_bwd).ms
    fwd_bwd()
    res["optimizer_ms"] = time_fn(opt_step).ms
    for o in opts:
        name = type(o).__name__
        res[f"{name}_ms"] = time_fn(o.step).ms
    print({k: round(v, 3) for k, v in res.items() if k.endswith("_ms")}, flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
