"""One device call for issue 18's INT4 GEMVs: are they correct, how fast, and what limits them.

    python3 scripts/ch04_int4_probe.py --dry-run             # no GPU: what a run would time and profile, and checks
    python3 scripts/ch04_int4_probe.py --out $OUT            # timing part (not yet run; ~1-2 min expected on an H200)
    python3 scripts/ch04_int4_probe.py --out $OUT --ncu      # then ncu on the fastest config of each kernel (4 runs)
    python3 scripts/ch04_int4_probe.py --out $OUT --old-sweep --m16 --ncu   # the previous probe's full sweeps too

Timing part, on each Llama-3-8B MLP shape (N, K) = (14336, 4096), (4096, 14336) and on (4096, 4096), at M = 1:
- the lean GEMVs of section 4b of ptq.py (``ptq.int4_gemv_lean``, kernels "v2", "v3", "v4", "v5"), every candidate of
  ``ptq.int4_lean_candidates``;
- the fp32 GEMV (``int4_matmul``) and the fp16x2 GEMV (``int4_gemv_h2``) as references, each on the fastest
  "gemv" configurations of the last H200 probe (calibration/h200-15a2b94-int4-probe.json), both kernels on each;
  ``--old-sweep``: every "gemv" candidate instead (``ptq.tune_int4_gemvs``, the previous probe's sweep);
- every kernel checked against the dequantized reference (relative max error) and timed as CUDA-graph replays with
  L2 flushed before each (``repro_utils.bench.time_fn(graph=True)``), the same weights and input for all of them;
- in the same run, bf16 cuBLAS (``F.linear``) and torch's tinygemm (``aten._weight_int4pack_mm``), timed the same
  way: the goals' baselines; and the read floor of the packed weight (``ptq.read_floor``);
- at ``--small-m`` tokens (default 4): the fastest M = 1 tile of each lean GEMV that takes several tokens, beside
  bf16 and tinygemm at the same M.
Printed as tables of ratios (bf16 / kernel, tinygemm / kernel, floor / kernel) and written to int4_probe.json, same
structure as before: shapes[i].rows (M = 1, every kernel, "kernel" naming it), shapes[i].small_m[M] (new),
shapes[i].m16 (--m16), ncu (--ncu).

Before timing, ``--jobs`` child processes launch every kernel configuration once (same shapes, dtypes and
alignment as the timed calls), so that Triton's compilations run in parallel and the timed loop finds them in its
cache; a child's failure only costs that time back.

Nsight part (``--ncu``): the fastest configuration of each kernel (gemv_h2 and the lean ones; gemv and mma too with
--old-sweep / --m16) on the shapes of ``--ncu-shapes``, launched again in a child process under
``ncu --clock-control none`` with the SpeedOfLight, Occupancy, LaunchStats, WarpStateStats and SchedulerStats
sections. The raw CSV is written to ncu_<shape>_<kernel>.csv and the lines that decide the question (DRAM
throughput, issue-slot use, achieved occupancy, registers, eligible warps) are printed. The question now: do the
lean GEMVs' 56-94 registers at M = 1 (sm_90 SASS, ``scripts/ch04_int4_sass.py --lean``) buy the occupancy and the DRAM
throughput that the fp16x2 GEMV's 221-255 did not.

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
import time
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
LEAN = ("v2", "v3", "v4", "v5")
# the fastest "gemv" configurations of each old GEMV in the last H200 probe (calibration/h200-15a2b94-int4-probe):
# (BLOCK_N, num_warps, KW, SPLIT_K) of the fp32 GEMV's best and of the fp16x2 GEMV's best, per shape
REFERENCE = {(14336, 4096): [(512, 4, 8, 32), (256, 2, 16, 8)], (4096, 14336): [(512, 4, 8, 112), (256, 2, 16, 28)],
             (4096, 4096): [(256, 2, 16, 32)]}
SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats"]
KEEP = ("DRAM Throughput", "Memory Throughput", "Duration", "Compute (SM) Throughput", "Achieved Occupancy",
        "Theoretical Occupancy", "Registers Per Thread", "Issue Slots Busy", "Issued Warp Per Scheduler",
        "No Eligible", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler",
        "Warp Cycles Per Issued Instruction", "Block Limit Registers", "Block Limit Shared Mem",
        "Dynamic Shared Memory Per Block", "Static Shared Memory Per Block")
KERNEL_NAMES = {"gemv": "_int4_gemv_kernel", "gemv_h2": "_int4_gemv_h2_kernel", "mma": "_int4_mma_kernel",
                "v2": "_int4_gemv_v2_kernel", "v3": "_int4_gemv_v3_kernel", "v4": "_int4_gemv_v2_kernel",
                "v5": "_int4_gemv_v5_kernel"}


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


# ---- what a run times: (kernel name, configuration) per shape and token count -----------------------------------

def make_config(kernel: str, config: dict):
    return ptq.Int4LeanConfig(**config) if kernel in LEAN else ptq.Int4Config(**config)


def kernel_fn(kernel: str):
    return {"gemv": ptq.int4_matmul, "gemv_h2": ptq.int4_gemv_h2, "mma": ptq.int4_matmul}.get(kernel,
                                                                                             ptq.int4_gemv_lean)


def reference_configs(N: int, K: int) -> list[ptq.Int4Config]:
    return [ptq.Int4Config("gemv", 1, bn, sk, warps, 2, kw) for bn, warps, kw, sk in REFERENCE[(N, K)]]


def m1_jobs(N: int, K: int, lean: tuple[str, ...], old_sweep: bool) -> list[tuple[str, object]]:
    """(kernel, config) pairs timed at M = 1 on (N, K)."""
    old = ([c for c in ptq.int4_candidates(1, N, K) if c.kernel == "gemv"] if old_sweep
           else reference_configs(N, K))
    jobs = [(k, c) for c in old for k in ("gemv", "gemv_h2")]
    return jobs + [(c.kernel, c) for c in ptq.int4_lean_candidates(1, N, K) if c.kernel in lean]


def small_m_config(best: ptq.Int4LeanConfig, M: int, N: int, K: int) -> ptq.Int4LeanConfig | None:
    """The M = 1 winner's tile at M tokens when it takes them (``int4_lean_tiles(M)``), else that kernel's first
    M-token tile, with the M = 1 winner's split-K where K allows it."""
    tiles = [t for t in ptq.int4_lean_tiles(M) if t.kernel == best.kernel]
    if not tiles:
        return None
    same = [t for t in tiles if (t.BLOCK_N, t.RW, t.TR, t.num_warps, t.num_stages)
            == (best.BLOCK_N, best.RW, best.TR, best.num_warps, best.num_stages)]
    t = (same or tiles)[0]
    split = best.SPLIT_K if K % (best.SPLIT_K * t.k_step()) == 0 else K // t.k_step() // 2
    return ptq.Int4LeanConfig(t.kernel, t.BLOCK_N, t.RW, t.TR, split, t.num_warps, t.num_stages)


def time_rows(N: int, K: int, M: int, jobs, device: str, log) -> list[dict]:
    """Check and time each (kernel, config) at M tokens on the probe's weights: two calls (the second finds the
    split-K workspace as the first left it), the relative max error against the dequantized reference, then the
    CUDA-graph-replay median with L2 flushed (as ``ptq.tune_int4_gemvs`` times)."""
    from repro_utils.bench import time_fn

    _, w4, x = weights(N, K, device, M=M)
    ref = x.float() @ w4.dequantize().t()
    rows = []
    for kernel, c in jobs:
        fn = kernel_fn(kernel)
        try:
            y = torch.stack([fn(x, w4, c) for _ in range(2)]).float()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            us = 1e3 * time_fn(partial(fn, x, w4, c), warmup=5, rep=20, graph=True).ms
        except Exception as e:  # noqa: BLE001 - a configuration that fails here is reported and skipped
            log(f"skipped {kernel} {c} for M={M}, N={N}, K={K}: {type(e).__name__}: {str(e)[:160]}")
            continue
        rows.append({"M": M, "N": N, "K": K, "kernel": kernel, "config": c, "us": us, "rel_err": err})
    return rows


def config_text(kernel: str, c) -> str:
    if kernel in LEAN:
        return f"BLOCK_N {c.BLOCK_N:4} warps {c.num_warps} RW {c.RW} TR {c.TR:2} stages {c.num_stages} SPLIT_K {c.SPLIT_K:3}"
    return f"BLOCK_N {c.BLOCK_N:4} warps {c.num_warps} KW {c.KW:2} SPLIT_K {c.SPLIT_K:3}"


def log_rows(rows: list[dict], bf16_us: float, tg_us: float, floor_us: float, log) -> None:
    log(f"{'kernel':8} {'configuration':58} {'us':>7} {'x bf16':>7} {'x tinygemm':>10} {'floor/us':>8} {'rel err':>8}")
    for r in sorted(rows, key=lambda r: r["us"]):
        log(f"{r['kernel']:8} {config_text(r['kernel'], r['config']):58} {r['us']:7.1f} {bf16_us / r['us']:7.2f} "
            f"{tg_us / r['us']:10.2f} {floor_us / r['us']:8.2f} {r['rel_err']:8.1e}")


def rows_json(rows: list[dict]) -> list[dict]:
    return [{**r, "config": asdict(r["config"])} for r in rows]


def timing(device: str, log, args) -> dict:
    out = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "shapes": []}
    for N, K in SHAPES:
        rows = time_rows(N, K, 1, m1_jobs(N, K, args.lean, args.old_sweep), device, log)
        bf16_us, tg_us, tg_err, nbytes = baselines(N, K, device, M=1)
        floor = ptq.read_floor(nbytes, device=device)  # packed codes, bf16 scales, uint8 zeros
        floor_us = 1e3 * floor["ms"]
        shape = {"N": N, "K": K, "bf16_us": bf16_us, "tinygemm_us": tg_us, "tinygemm_rel_err": tg_err,
                 "floor_us": floor_us, "floor": floor, "rows": rows_json(rows)}
        out["shapes"].append(shape)
        log(f"\n(N, K) = ({N}, {K}): bf16 {bf16_us:.1f} us, tinygemm {tg_us:.1f} us (err {tg_err:.1e}), "
            f"read floor {floor_us:.1f} us ({floor['GBps']:.0f} GB/s)")
        log_rows(rows, bf16_us, tg_us, floor_us, log)
        shape["small_m"] = {}
        for M in args.small_m:
            jobs = []
            for kernel in args.lean:
                ok = [r for r in rows if r["kernel"] == kernel and r["rel_err"] < 1e-2]
                c = small_m_config(min(ok, key=lambda r: r["us"])["config"], M, N, K) if ok else None
                if c is not None:
                    jobs.append((kernel, c))
            small = time_rows(N, K, M, jobs, device, log)
            bf16_m, tg_m, tg_err_m, _ = baselines(N, K, device, M=M)
            shape["small_m"][str(M)] = {"bf16_us": bf16_m, "tinygemm_us": tg_m, "tinygemm_rel_err": tg_err_m,
                                        "rows": rows_json(small)}
            log(f"M = {M}: bf16 {bf16_m:.1f} us, tinygemm {tg_m:.1f} us (err {tg_err_m:.1e}), read floor {floor_us:.1f} us")
            log_rows(small, bf16_m, tg_m, floor_us, log)
        if args.m16:
            shape["m16"] = m16_part(N, K, device, log, floor_us=floor_us)
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


# ---- parallel compilation ----------------------------------------------------------------------------------------

def compile_jobs(args) -> list[tuple[int, int, int, str, dict]]:
    """Every (N, K, M, kernel, config) the timing part launches that can be known before it runs: the M = 1 jobs
    and, for --small-m, every lean tile at M (a superset of what will be timed)."""
    jobs = []
    for N, K in SHAPES:
        jobs += [(N, K, 1, k, asdict(c)) for k, c in m1_jobs(N, K, args.lean, args.old_sweep)]
        for M in args.small_m:
            for c in ptq.int4_lean_candidates(1, N, K):
                s = small_m_config(c, M, N, K) if c.kernel in args.lean else None
                if s is not None:
                    jobs.append((N, K, M, s.kernel, asdict(s)))
        jobs.append((N, K, 1, "read", {}))  # ptq.read_floor's 30 grids on this shape's bytes
    return list({json.dumps(j): j for j in jobs}.values())


def compile_child(jobs: list) -> None:
    """Launch each job once (eager) on tensors of the timed calls' shapes: Triton compiles it into its cache."""
    made = {}
    for N, K, M, kernel, config in jobs:
        if (N, K, M) not in made:
            made = {(N, K, M): weights(N, K, "cuda", M=M)[1:]}
        w4, x = made[(N, K, M)]
        try:
            if kernel == "read":
                read_grids(w4.nbytes())
                continue
            kernel_fn(kernel)(x, w4, make_config(kernel, config))
        except Exception as e:  # noqa: BLE001 - the timed loop will meet (and report) it again
            print(f"compile child: {kernel} {config}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    torch.cuda.synchronize()


def read_grids(nbytes: int) -> None:
    """The launches of ``ptq.read_floor`` (same arguments, one each), for their compilations."""
    words = torch.zeros(-(-nbytes // 4), device="cuda", dtype=torch.int32)
    sms = torch.cuda.get_device_properties("cuda").multi_processor_count
    sink = torch.empty(64 * sms, device="cuda", dtype=torch.int32)
    grids = [(words, p * sms, b, w) for p in (4, 8, 16, 32, 64) for b in (1024, 2048, 4096) for w in (4, 8)]
    for w, programs, block, warps in grids + [(words[:4096], 1, 4096, 4)]:
        ptq._read_kernel[(programs,)](w, sink, w.numel(), BLOCK=block, ITERS=-(-w.numel() // (programs * block)),
                                      num_warps=warps)


def precompile(args, log) -> None:
    """Run ``compile_child`` on --jobs slices of ``compile_jobs`` at once; their stderr goes to compile_<i>.log."""
    jobs = compile_jobs(args)
    n = max(1, min(args.jobs, len(jobs)))
    t0 = time.time()
    procs = []
    for i in range(n):
        err = open(args.out / f"compile_{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--compile-child", json.dumps(jobs[i::n])],
                                       stdout=err, stderr=err), err))
    bad = []
    for i, (p, err) in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, 400 - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        err.close()
        if p.returncode:
            bad.append(f"compile_{i}.log (rc {p.returncode})")
    log(f"precompiled {len(jobs)} kernel launches in {n} processes in {time.time() - t0:.0f} s"
        + (f"; failed: {bad}" if bad else ""))


# ---- Nsight Compute ----------------------------------------------------------------------------------------------

def ncu_child(N: int, K: int, kernel: str, config: dict, M: int = 1) -> None:
    """Launch one kernel a few times (eager) for ncu to catch the last one."""
    _, w4, x = weights(N, K, "cuda", M=16 if kernel == "mma" else M)
    fn, c = kernel_fn(kernel), make_config(kernel, config)
    for _ in range(4):
        fn(x, w4, c)
    torch.cuda.synchronize()


def ncu_kernels(args) -> tuple[str, ...]:
    return (("gemv",) if args.old_sweep else ()) + ("gemv_h2",) + tuple(args.lean) + (("mma",) if args.m16 else ())


def ncu(record: dict, out: Path, log, args) -> dict:
    found = {}
    for shape in record["shapes"]:
        N, K = shape["N"], shape["K"]
        if f"{N}x{K}" not in args.ncu_shapes:
            continue
        for kernel in ncu_kernels(args):
            rows = ([r for r in shape["rows"] if r["kernel"] == kernel and r["rel_err"] < 1e-2] if kernel != "mma"
                    else [r for r in shape.get("m16", {}).get("rows", []) if r["rel_err"] < 1e-2])
            if not rows:
                continue
            best = min(rows, key=lambda r: r["us"])
            cmd = ["ncu", "--clock-control", "none", "--csv", "--page", "details",
                   *[a for s in SECTIONS for a in ("--section", s)],
                   "-k", f"regex:^{KERNEL_NAMES[kernel]}$", "--launch-skip", "3", "--launch-count", "1",
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


# ---- dry run (no GPU) --------------------------------------------------------------------------------------------

def dry_run(args) -> None:
    """What a run would launch, and the checks that need no GPU: every configuration is valid and divides K, every
    configuration survives its JSON round trip (the child processes rebuild them from it), the ncu kernel names
    exist in ptq."""
    total = 0
    for N, K in SHAPES:
        jobs = m1_jobs(N, K, args.lean, args.old_sweep)
        for kernel, c in jobs:
            assert K % (c.SPLIT_K * c.k_step()) == 0, (N, K, kernel, c)
            assert make_config(kernel, json.loads(json.dumps(asdict(c)))) == c
        counts = {k: sum(1 for j, _ in jobs if j == k) for k in dict.fromkeys(j for j, _ in jobs)}
        print(f"(N, K) = ({N}, {K}): M = 1 rows {counts}")
        total += len(jobs)
        for kernel in args.lean:
            for c in ptq.int4_lean_candidates(1, N, K, kernel):
                for M in args.small_m:
                    s = small_m_config(c, M, N, K)
                    assert s is None or K % (s.SPLIT_K * s.k_step()) == 0, (c, M, s)
    for kernel in ncu_kernels(args):
        assert getattr(ptq, KERNEL_NAMES[kernel]) is not None
    print(f"{total} timed configurations at M = 1, {len(compile_jobs(args))} launches to precompile with --jobs "
          f"{args.jobs}; small M {args.small_m}"
          + (f"; ncu on {args.ncu_shapes} for {ncu_kernels(args)}" if args.ncu else "; no ncu"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--ncu", action="store_true", help="also profile the fastest config of each kernel with ncu")
    ap.add_argument("--ncu-shapes", default="14336x4096", help="NxK,... shapes that --ncu profiles")
    ap.add_argument("--m16", action="store_true", help="also the tensor-core kernel at 16 tokens (goal int4-kernel-m16-marlin)")
    ap.add_argument("--old-sweep", action="store_true", help="every 'gemv' candidate of the two old GEMVs, not the references")
    ap.add_argument("--lean", nargs="*", default=list(LEAN), choices=LEAN, help="lean GEMVs to time (default all)")
    ap.add_argument("--small-m", type=int, nargs="*", default=[4], help="token counts (2-4) for the lean GEMVs' small-M part")
    ap.add_argument("--jobs", type=int, default=8, help="processes that compile the kernels before timing (0: none)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: list what a run launches and check the configurations")
    ap.add_argument("--ncu-child", help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.lean = tuple(a.lean)
    if any(not 2 <= m <= ptq.GEMV_LEAN_MAX_M for m in a.small_m):
        ap.error(f"--small-m takes token counts from 2 to {ptq.GEMV_LEAN_MAX_M}")
    if a.ncu_child:
        return ncu_child(*json.loads(a.ncu_child))
    if a.compile_child:
        return compile_child(json.loads(a.compile_child))
    if a.dry_run:
        return dry_run(a)
    if not torch.cuda.is_available():
        sys.exit("ch04_int4_probe.py times CUDA kernels: it needs a GPU (the CPU checks are tests/test_04_*.py, "
                 "and --dry-run)")
    ptq.NUM_SMS = torch.cuda.get_device_properties("cuda").multi_processor_count
    a.out.mkdir(parents=True, exist_ok=True)
    logf = open(a.out / "int4_probe.log", "w")

    def log(s: str) -> None:
        print(s, flush=True)
        logf.write(s + "\n")

    t0 = time.time()
    if a.jobs > 0:
        precompile(a, log)
    record = timing("cuda", log, a)
    record["timing_s"] = time.time() - t0
    (a.out / "int4_probe.json").write_text(json.dumps(record, indent=1, default=str))
    if a.ncu:
        record["ncu"] = ncu(record, a.out, log, a)
        (a.out / "int4_probe.json").write_text(json.dumps(record, indent=1, default=str))
    log(f"\nprobe done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
