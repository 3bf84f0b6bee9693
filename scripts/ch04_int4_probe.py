"""One device call for issue 18's INT4 GEMVs: are they correct, how fast, and what limits them.

    python3 scripts/ch04_int4_probe.py --out $OUT            # timing part (~1-2 min on an H200)
    python3 scripts/ch04_int4_probe.py --out $OUT --ncu      # then Nsight Compute on the fastest configs (~2 min)
    python3 scripts/ch04_int4_probe.py --out $OUT --ncu --m16   # and the tensor-core kernel at 16 tokens (~4-5 min in all)

Timing part, on each Llama-3-8B MLP shape (N, K) = (14336, 4096), (4096, 14336) and on (4096, 4096), at M = 1:
- ``ptq.tune_int4_gemvs``: every "gemv" candidate with both kernels, the fp32 GEMV (``int4_matmul``) and the
  fp16x2 GEMV (``int4_gemv_h2``), each checked against the dequantized reference (relative max error) and timed as
  CUDA-graph replays with L2 flushed before each;
- in the same run, on the same weights and input, bf16 cuBLAS (``F.linear``) and torch's tinygemm
  (``aten._weight_int4pack_mm``), timed the same way: the goals' baselines;
- the read floor of the packed weight (``ptq.read_floor``: the fastest Triton kernel that only reads as many bytes).
Printed as a table of ratios (bf16 / kernel, tinygemm / kernel, floor / kernel) and written to int4_probe.json.

Nsight part (``--ncu``): the fastest configuration of each kernel per shape, launched again in a child process under
``ncu --clock-control none`` with the SpeedOfLight, Occupancy, LaunchStats, WarpStateStats and SchedulerStats
sections. The raw CSV is written to ncu_<shape>_<kernel>.csv and the lines that decide the question (DRAM
throughput, issue-slot use, achieved occupancy, registers, the top warp stall) are printed. What the question is:
the fp16x2 GEMV issues 2.89 instructions per weight against 4.33 (``scripts/ch04_int4_sass.py``), but uses 221
registers against 128, halving the warps an SM can hold; which of issue rate or memory latency limits each kernel
is what ncu's issue-slot and stall figures say.

Nothing here writes to results/ or the notebook: it is development evidence for the next chapter change.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "chapters" / "04_quantization"))
sys.path.insert(0, str(ROOT / "src"))

import ptq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]
SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats"]
KEEP = ("DRAM Throughput", "Memory Throughput", "Duration", "Compute (SM) Throughput", "Achieved Occupancy",
        "Theoretical Occupancy", "Registers Per Thread", "Issue Slots Busy", "Issued Warp Per Scheduler",
        "No Eligible", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler",
        "Warp Cycles Per Issued Instruction", "Block Limit Registers")


def weights(N: int, K: int, device: str, seed: int = 0, M: int = 1):
    g = torch.Generator(device=device).manual_seed(seed + N + 7 * K)
    qw = ptq.rtn(torch.randn(N, K, generator=g, device=device) * 0.02, 4, 128)
    x = torch.randn(M, K, generator=g, device=device).to(torch.bfloat16)
    return qw, ptq.Int4Weight.from_qweight(qw), x


def baselines(N: int, K: int, device: str, M: int) -> tuple[float, float, float, int]:
    """bf16 cuBLAS on the same weights dense (2 bytes a weight) and tinygemm on them packed, for M tokens, timed
    as the kernels are (graph replays, L2 flushed): (bf16 us, tinygemm us, tinygemm's relative error, the
    INT4 weight's bytes)."""
    from repro_utils.bench import time_fn

    qw, w4, x = weights(N, K, device, M=M)
    W = w4.dequantize().to(torch.bfloat16)
    tg, sz = ptq.tinygemm_pack(qw)
    ref = x.float() @ w4.dequantize().t()
    tg_err = ((ptq.tinygemm_linear(x, tg, sz, 128).float() - ref).abs().max() / ref.abs().max()).item()
    bf16_us = 1e3 * time_fn(partial(F.linear, x, W), warmup=5, rep=40, graph=True).ms
    tg_us = 1e3 * time_fn(partial(ptq.tinygemm_linear, x, tg, sz, 128), warmup=5, rep=40, graph=True).ms
    return bf16_us, tg_us, tg_err, w4.nbytes()


def timing(device: str, log, m16: bool = False) -> dict:
    out = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "shapes": []}
    for N, K in SHAPES:
        rows = ptq.tune_int4_gemvs([(N, K)], device=device, log=log)
        bf16_us, tg_us, tg_err, nbytes = baselines(N, K, device, M=1)
        floor = ptq.read_floor(nbytes, device=device)  # packed codes, bf16 scales, uint8 zeros
        shape = {"N": N, "K": K, "bf16_us": bf16_us, "tinygemm_us": tg_us, "tinygemm_rel_err": tg_err,
                 "floor_us": 1e3 * floor["ms"], "floor": floor,
                 "rows": [{**r, "config": asdict(r["config"])} for r in rows]}
        out["shapes"].append(shape)
        log(f"\n(N, K) = ({N}, {K}): bf16 {bf16_us:.1f} us, tinygemm {tg_us:.1f} us (err {tg_err:.1e}), "
            f"read floor {1e3 * floor['ms']:.1f} us ({floor['GBps']:.0f} GB/s)")
        log(f"{'kernel':8} {'BLOCK_N':>7} {'warps':>5} {'KW':>3} {'SPLIT_K':>7} {'us':>7} {'x bf16':>7} "
            f"{'x tinygemm':>10} {'floor/us':>8} {'rel err':>8}")
        for r in sorted(rows, key=lambda r: r["us"]):
            c = r["config"]
            log(f"{r['kernel']:8} {c.BLOCK_N:7} {c.num_warps:5} {c.KW:3} {c.SPLIT_K:7} {r['us']:7.1f} "
                f"{bf16_us / r['us']:7.2f} {tg_us / r['us']:10.2f} {1e3 * floor['ms'] / r['us']:8.2f} "
                f"{r['rel_err']:8.1e}")
        if m16:
            shape["m16"] = m16_part(N, K, device, log, floor_us=1e3 * floor["ms"])
    return out


def m16_part(N: int, K: int, device: str, log, floor_us: float) -> dict:
    """16 tokens (the goal int4-kernel-m16-marlin): every tensor-core candidate of ``tune_int4``, beside bf16
    cuBLAS and tinygemm at M = 16 on the same weights, timed the same way."""
    rows = [r for r in ptq.tune_int4([(16, N, K)], device=device, log=log) if r["config"].kernel == "mma"]
    bf16_us, tg_us, _, _ = baselines(N, K, device, M=16)
    log(f"M = 16: bf16 {bf16_us:.1f} us, tinygemm {tg_us:.1f} us, read floor {floor_us:.1f} us")
    log(f"{'BLOCK_M':>7} {'BLOCK_N':>7} {'stages':>6} {'SPLIT_K':>7} {'us':>7} {'x bf16':>7} {'x tinygemm':>10} "
        f"{'floor/us':>8} {'rel err':>8}")
    for r in sorted(rows, key=lambda r: r["us"]):
        c = r["config"]
        log(f"{c.BLOCK_M:7} {c.BLOCK_N:7} {c.num_stages:6} {c.SPLIT_K:7} {r['us']:7.1f} {bf16_us / r['us']:7.2f} "
            f"{tg_us / r['us']:10.2f} {floor_us / r['us']:8.2f} {r['rel_err']:8.1e}")
    return {"bf16_us": bf16_us, "tinygemm_us": tg_us, "rows": [{**r, "config": asdict(r["config"])} for r in rows]}


def ncu_child(N: int, K: int, kernel: str, config: dict) -> None:
    """Launch one kernel a few times (eager) for ncu to catch the last one."""
    _, w4, x = weights(N, K, "cuda", M=16 if kernel == "mma" else 1)
    fn = ptq.int4_gemv_h2 if kernel == "gemv_h2" else ptq.int4_matmul
    c = ptq.Int4Config(**config)
    for _ in range(4):
        fn(x, w4, c)
    torch.cuda.synchronize()


def ncu(record: dict, out: Path, log) -> dict:
    found = {}
    for shape in record["shapes"]:
        N, K = shape["N"], shape["K"]
        for kernel in ("gemv", "gemv_h2", "mma"):
            rows = ([r for r in shape["rows"] if r["kernel"] == kernel] if kernel != "mma"
                    else [r for r in shape.get("m16", {}).get("rows", []) if r["rel_err"] < 1e-2])
            if not rows:
                continue
            best = min(rows, key=lambda r: r["us"])
            name = {"gemv": "_int4_gemv_kernel", "gemv_h2": "_int4_gemv_h2_kernel", "mma": "_int4_mma_kernel"}[kernel]
            cmd = ["ncu", "--clock-control", "none", "--csv", "--page", "details",
                   *[a for s in SECTIONS for a in ("--section", s)],
                   "-k", f"regex:^{name}$", "--launch-skip", "3", "--launch-count", "1",
                   sys.executable, __file__, "--ncu-child", json.dumps([N, K, kernel, best["config"]])]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            tag = f"{N}x{K}_{kernel}"
            (out / f"ncu_{tag}.csv").write_text(p.stdout + "\n# stderr\n" + p.stderr[-4000:])
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith('"')]
            keep = {}
            for row in csv.DictReader(io.StringIO("\n".join(lines))):
                m = row.get("Metric Name", "")
                if any(m.startswith(k) for k in KEEP):
                    keep[m] = f"{row.get('Metric Value', '')} {row.get('Metric Unit', '')}".strip()
            found[tag] = {"config": best["config"], "us": best["us"], "rc": p.returncode, "metrics": keep}
            log(f"\nncu {tag} (rc {p.returncode}), config {best['config']}, graphed {best['us']:.1f} us")
            for m, v in keep.items():
                log(f"  {m:45} {v}")
            if p.returncode:
                log(p.stderr[-1500:])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--ncu", action="store_true", help="also profile the fastest config of each kernel with ncu")
    ap.add_argument("--m16", action="store_true", help="also the tensor-core kernel at 16 tokens (goal int4-kernel-m16-marlin)")
    ap.add_argument("--ncu-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ncu_child:
        N, K, kernel, config = json.loads(a.ncu_child)
        return ncu_child(N, K, kernel, config)
    if not torch.cuda.is_available():
        sys.exit("ch04_int4_probe.py times CUDA kernels: it needs a GPU (the CPU checks are tests/test_04_*.py)")
    a.out.mkdir(parents=True, exist_ok=True)
    logf = open(a.out / "int4_probe.log", "w")

    def log(s: str) -> None:
        print(s, flush=True)
        logf.write(s + "\n")

    record = timing("cuda", log, m16=a.m16)
    (a.out / "int4_probe.json").write_text(json.dumps(record, indent=1, default=str))
    if a.ncu:
        record["ncu"] = ncu(record, a.out, log)
        (a.out / "int4_probe.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
