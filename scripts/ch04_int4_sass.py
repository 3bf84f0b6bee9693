"""Compile chapter 04's INT4 kernels for sm_90 (H100, H200) and count what one weight costs in instructions.

No GPU is needed: Triton compiles to a cubin with the ptxas it ships, and cuobjdump (shipped with Triton too)
disassembles it. For each kernel configuration the script finds the main loop (the longest backward branch in
the SASS), counts its instructions by opcode, and divides by the weights one thread handles per iteration. It
also prints the registers a thread uses, the bytes it spills and the width of its global loads.

Why: a GEMV that reads INT4 weights can only be 4x faster than bf16 if it issues few enough instructions per
weight. An SM issues one warp instruction per clock on each of its 4 schedulers, so a GPU issues at most
    SMs x 4 x clock x 32  thread instructions per second,
and a kernel spending I instructions per weight cannot process more than that over I weights per second, however
fast its memory is. The script prints that ceiling as a multiple of a bf16 GEMV reading at --bf16-tbps (default
4.3 TB/s: the H200's measured copy bandwidth, issue 18), beside the bandwidth ceiling of INT4 itself (4.19 bits
per weight with group-128 scales and zeros). Whichever is lower bounds the kernel; neither is a measurement of it.

    python3 scripts/ch04_int4_sass.py                      # the chapter's default configurations, Llama-3-8B MLP
    python3 scripts/ch04_int4_sass.py --all                # every candidate tune_int4 tries at M = 1
    python3 scripts/ch04_int4_sass.py --lean               # the lean GEMVs (section 4b of ptq.py), every tile
    python3 scripts/ch04_int4_sass.py --lean --m 1 3       # ... at 1 and 3 tokens

The default report has three kernels per shape: the fp32 GEMV at its default configuration (M = 1), the fp16x2
GEMV (``_int4_gemv_h2_kernel``) at the same tiles, and the tensor-core kernel at its M = 16 default; a table of
the two GEMVs side by side follows.

``--lean`` reports the lean GEMVs instead (``_int4_gemv_v2_kernel``, ``_v3``, ``_v5``): every tile of
``ptq.int4_lean_tiles()`` compiled at SPLIT_K = 8 with 4 steps a program (the loop the split-K candidates run,
whatever their SPLIT_K), with registers, spills, shared memory, the loads of the main loop by width, instructions
per weight (and per weight and token), and the theoretical occupancy those give on an sm_90 SM (65536 registers,
allocated 256 a warp; 228 KB of shared memory, 1 KB of it reserved per block; at most 64 warps and 32 blocks).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "chapters" / "04_quantization"))
sys.path.insert(0, str(ROOT / "src"))

import ptq  # noqa: E402
import triton  # noqa: E402

from repro_utils.sm90 import compile_sm90, cuobjdump, registers_and_spills  # noqa: E402

TYPES = {"X": "*bf16", "Wp": "*i32", "S": "*bf16", "Z": "*u8", "Y": "*bf16", "WS": "*fp32", "CNT": "*i32",
         "M": "i32", "N": "i32", "stride_xm": "i32"}
BITS_PER_WEIGHT = 4 + (16 + 8) / 128  # the nibble, and a bf16 scale and a uint8 zero per group of 128


def compile_kernel(cfg: ptq.Int4Config, N: int, K: int, kernel: str):
    """The kernel ``int4_matmul`` launches for ``cfg`` at (N, K), compiled for sm_90; kernel "gemv_h2": the one
    ``int4_gemv_h2`` launches on the same tiles."""
    jit = {"gemv": ptq._int4_gemv_kernel, "gemv_h2": ptq._int4_gemv_h2_kernel, "mma": ptq._int4_mma_kernel}[kernel]
    constants = {"G": 128, "BLOCK_N": cfg.BLOCK_N, "SPLIT_K": cfg.SPLIT_K, "K_ITERS": K // (cfg.SPLIT_K * cfg.k_step()),
                 "ASM": True}
    constants.update({"KW": cfg.KW} if cfg.kernel != "mma" else {"BLOCK_M": cfg.BLOCK_M, "F32_DOT": False})
    return compile_sm90(jit, TYPES, constants, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        aligned=("N", "stride_xm"))


def main_loop(sass: str) -> list[str]:
    """The instructions between the target and the source of the longest backward branch."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    best = (0, 0)
    for a, ln in zip(addr, lines):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < a and a - int(m.group(1), 16) > best[1] - best[0]:
            best = (int(m.group(1), 16), a)
    return [ln for a, ln in zip(addr, lines) if best[0] <= a <= best[1]]


def opcode(line: str) -> str:
    body = re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", line)
    return body.split()[0].rstrip(";") if body.split() else "?"


def report(cfg: ptq.Int4Config, N: int, K: int, args, kernel: str) -> dict:
    compiled = compile_kernel(cfg, N, K, kernel)
    regs, spill = registers_and_spills(compiled)
    loop = main_loop(cuobjdump(compiled, "-sass"))
    ops = Counter(opcode(ln).split(".")[0] for ln in loop)
    loads = Counter(m.group(0) for m in re.finditer(r"LDG\.E[.A-Z0-9]*", "\n".join(loop)))
    # weights one thread handles per loop iteration: gemv steps over KW word rows, mma over one 128-input group
    rows = 8 * cfg.KW if cfg.kernel != "mma" else 128
    per_thread = rows * cfg.BLOCK_N / (32 * cfg.num_warps)
    instr = len(loop) / per_thread
    issue = args.sms * 4 * args.clock_ghz * 1e9 * 32  # thread instructions per second
    bf16_weights = args.bf16_tbps * 1e12 / 2
    return {"cfg": cfg, "kernel": kernel, "regs": regs, "spill": spill, "loop": len(loop), "per_weight": instr,
            "issue_ceiling_x": issue / instr / bf16_weights,
            "bandwidth_ceiling_x": args.bf16_tbps * 16 / BITS_PER_WEIGHT / args.bf16_tbps,
            "ops": ops.most_common(10), "op_counts": ops, "loads": dict(loads)}


LEAN_TYPES = {"X": "*bf16", "Wp": "*i32", "S": "*bf16", "Z": "*u8", "Y": "*bf16", "WS": "*fp32", "CNT": "*i32",
              "stride_xm": "i32"}


def compile_lean(cfg: ptq.Int4LeanConfig, N: int, M: int = 1, k_iters: int = 4):
    """A lean GEMV (``ptq.int4_gemv_lean``'s kernel for cfg) compiled for sm_90 at N outputs, M tokens and
    k_iters steps a program (SPLIT_K as in cfg; K does not enter the code otherwise)."""
    jit = {"v3": ptq._int4_gemv_v3_kernel, "v5": ptq._int4_gemv_v5_kernel}.get(cfg.kernel, ptq._int4_gemv_v2_kernel)
    constants = {"N": N, "G": 128, "BLOCK_M": M, "BLOCK_N": cfg.BLOCK_N, "RW": cfg.RW, "TR": cfg.TR,
                 "SPLIT_K": cfg.SPLIT_K, "K_ITERS": k_iters, "ASM": True}
    if cfg.kernel == "v3":
        constants["STAGES"] = cfg.num_stages
    elif cfg.kernel != "v5":
        constants["PREFETCH"] = cfg.kernel == "v2"
    return compile_sm90(jit, LEAN_TYPES, constants, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        aligned=("stride_xm",))


def occupancy(regs: int, smem: int, warps: int) -> int:
    """Warps an sm_90 SM can hold of a kernel using ``regs`` registers a thread and ``smem`` bytes a block."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min((65536 // per_warp) // warps, 64 // warps, 32,
                 (228 * 1024) // (smem + 1024) if smem else 32)
    return blocks * warps


def report_lean(cfg: ptq.Int4LeanConfig, N: int, M: int) -> dict:
    compiled = compile_lean(cfg, N, M)
    regs, spill = registers_and_spills(compiled)
    smem = compiled.metadata.shared
    loop = main_loop(cuobjdump(compiled, "-sass"))
    ops = Counter(opcode(ln).split(".")[0] for ln in loop)
    loads = Counter(m.group(0) for m in re.finditer(r"\b(?:LDGSTS|LDG|LDS)\b(?:\.[A-Z0-9_]+)*", "\n".join(loop)))
    per_thread = cfg.k_step() * cfg.BLOCK_N / (32 * cfg.num_warps)  # weights a thread handles per step
    per_thread *= 2 if cfg.kernel == "v5" else 1  # v5's loop takes two steps an iteration
    return {"cfg": cfg, "M": M, "regs": regs, "spill": spill, "smem": smem, "loop": len(loop),
            "per_weight": len(loop) / per_thread, "warps_per_sm": occupancy(regs, smem, cfg.num_warps),
            "ops": ops, "loads": dict(loads)}


def lean_main(args) -> int:
    """The lean GEMVs' table: one row per (tile, tokens), on the up/gate shape (N only sets the row stride)."""
    N = 14336
    print(f"triton {triton.__version__}, sm_90; lean GEMVs at N = {N}, SPLIT_K = 8, 4 steps a program")
    print(f"{'kernel':6} {'BLOCK_N':>7} {'warps':>5} {'RW':>3} {'TR':>3} {'stages':>6} {'M':>2} {'regs':>4} "
          f"{'spill':>5} {'smem':>6} {'warps/SM':>8} {'instr/w':>7} {'instr/(w·M)':>11}  loads in the main loop")
    for M in args.m:
        for tile in ptq.int4_lean_tiles(M):
            cfg = ptq.Int4LeanConfig(tile.kernel, tile.BLOCK_N, tile.RW, tile.TR, 8, tile.num_warps, tile.num_stages)
            r = report_lean(cfg, N, M)
            loads = ", ".join(f"{v} {k}" for k, v in sorted(r["loads"].items()))
            print(f"{cfg.kernel:6} {cfg.BLOCK_N:7} {cfg.num_warps:5} {cfg.RW:3} {cfg.TR:3} {cfg.num_stages:6} {M:2} "
                  f"{r['regs']:4} {r['spill']:5} {r['smem']:6} {r['warps_per_sm']:8} {r['per_weight']:7.2f} "
                  f"{r['per_weight'] / M:11.2f}  {loads}")
            if args.ops:
                print("      ", r["ops"].most_common(12))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every M = 1 candidate of int4_candidates, not the default")
    ap.add_argument("--sms", type=int, default=132, help="SMs (H100 SXM and H200: 132)")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock under load (H200 SXM boost: 1.98)")
    ap.add_argument("--bf16-tbps", type=float, default=4.3, help="bytes/s a bf16 GEMV reads at, in TB/s (the H200 copied at ~4.3)")
    ap.add_argument("--lean", action="store_true", help="the lean GEMVs (int4_lean_tiles) instead")
    ap.add_argument("--m", type=int, nargs="+", default=[1], help="--lean: token counts (1 to 4)")
    ap.add_argument("--ops", action="store_true", help="--lean: also the main loop's most frequent opcodes")
    args = ap.parse_args(argv)
    if args.lean:
        return lean_main(args)
    shapes = {"up/gate 14336 x 4096": (14336, 4096), "down 4096 x 14336": (4096, 14336)}
    print(f"triton {triton.__version__}, sm_90; ceilings as multiples of a bf16 GEMV at {args.bf16_tbps} TB/s; "
          f"issue ceiling from {args.sms} SMs x 4 schedulers x {args.clock_ghz} GHz")
    table = []
    for label, (N, K) in shapes.items():
        gemv = ptq.int4_config(1, N, K)
        cfgs = ptq.int4_candidates(1, N, K) if args.all else [gemv, ptq.int4_config(16, N, K)]
        runs = [(c, k) for c in cfgs for k in ((c.kernel, "gemv_h2") if c.kernel == "gemv" else (c.kernel,))]
        for cfg, kernel in runs:
            r = report(cfg, N, K, args, kernel)
            c = r["cfg"]
            if cfg == gemv:
                table.append((label, r))
            print(f"{label}: {kernel} BLOCK_M={c.BLOCK_M} BLOCK_N={c.BLOCK_N} SPLIT_K={c.SPLIT_K} "
                  f"warps={c.num_warps} stages={c.num_stages}" + (f" KW={c.KW}" if c.kernel != "mma" else ""))
            print(f"    {r['regs']} registers, {r['spill']} bytes spilled; main loop {r['loop']} instructions, "
                  f"{r['per_weight']:.2f} per weight -> issue ceiling {r['issue_ceiling_x']:.2f}x bf16 "
                  f"(INT4 bandwidth ceiling {r['bandwidth_ceiling_x']:.2f}x)")
            print(f"    opcodes: {r['ops']}; global loads: {r['loads']}")
    print("\nthe two GEMVs side by side (M = 1, the default tiles; instructions per weight of the main loop)")
    ops = ("LOP3", "SHF", "FFMA", "HFMA2", "HADD2", "IMAD", "LDG", "PRMT", "F2FP")
    print(f"{'shape':22} {'kernel':8} {'regs':>4} {'spill':>5} {'instr/w':>7} {'issue':>6} {'bw':>6}  "
          + " ".join(f"{o:>6}" for o in ops))
    for label, r in table:
        w = r["loop"] / r["per_weight"]  # weights per thread per iteration
        print(f"{label:22} {r['kernel']:8} {r['regs']:4d} {r['spill']:5d} {r['per_weight']:7.2f} "
              f"{r['issue_ceiling_x']:5.2f}x {r['bandwidth_ceiling_x']:5.2f}x  "
              + " ".join(f"{r['op_counts'][o] / w:6.2f}" for o in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
