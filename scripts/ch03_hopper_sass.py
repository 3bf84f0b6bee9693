"""Compile chapter 03's forward kernels for sm_90 (H100, H200) on the CPU and report what each will use there.

No GPU is needed (repro_utils.sm90: Triton's own ptxas and cuobjdump). For each tile candidate of the descriptor
kernel (hopper_kernels._attn_fwd_tma), bf16 and FP8, with warp specialization off and on, and for the studied
kernel (flash_kernels._attn_fwd) at the same head dims, it prints registers per thread, bytes spilled, shared
memory, and the instructions that say which Hopper paths the compiler took:

- UTMALDG / UTMASTG: TMA bulk loads and stores (tensor descriptors); LDGSTS: cp.async copies (Ampere's path);
- HGMMA / QGMMA: warpgroup matrix multiplies (wgmma) on 16-bit and on FP8 operands; HMMA: Ampere's mma.sync;
- whether asking for warp specialization changed the SASS at all (its hash is compared with the plain build).

    python3 scripts/ch03_hopper_sass.py            # every candidate at d = 64, 128, 256 (~1 min)
    python3 scripts/ch03_hopper_sass.py --json x   # also as JSON
    python3 scripts/ch03_hopper_sass.py --backward --dims 128   # studied dK/dV and dQ kernels, and the fused one

What it cannot say: how fast any of them runs. That is scripts/ch03_hopper_probe.py's job, on the GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "chapters" / "03_flash_attention"))
sys.path.insert(0, str(ROOT / "src"))

import flash_kernels as fk  # noqa: E402
import hopper_kernels as hk  # noqa: E402

from repro_utils import sm90  # noqa: E402

OPS = ("UTMALDG", "UTMASTG", "LDGSTS", "HGMMA", "QGMMA", "HMMA")
_OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def report(compiled) -> dict:
    regs, spill = sm90.registers_and_spills(compiled)
    sass = sm90.cuobjdump(compiled, "-sass")
    ops = Counter(_OPCODE.findall(sass))
    body = "\n".join(line.split("/*")[1] if "/*" in line else line for line in sass.splitlines() if "/*0" in line)
    return {"regs": regs, "spill_bytes": spill, "smem_bytes": compiled.metadata.shared,
            **{op: ops[op] for op in OPS}, "sass_sha": hashlib.sha1(body.encode()).hexdigest()[:12]}


def descriptor_kernel(d: int, fp8: bool, ws: bool, config) -> dict:
    el = "fp8e4nv" if fp8 else "bf16"
    sig = {"Q": f"*{el}", "K": f"*{el}", "V": f"*{el}", "O": "*bf16", "L": "*fp32", "Q_SCALE": "*fp32",
           "K_SCALE": "*fp32", "V_SCALE": "*fp32", "sm_scale": "fp32", "N_CTX": "i32", "BH": "i32", "V_STRIDE": "i32"}
    const = dict(HEAD_DIM=d, CAUSAL=False, IS_FP8=fp8, WARP_SPECIALIZE=ws, QBLOCK=hk.QUANT_BLOCK,
                 PSCALE=hk.P_SCALE, **config.kwargs)
    return report(sm90.compile_sm90(hk._attn_fwd_tma.fn, sig, const, num_warps=config.num_warps,
                                    num_stages=config.num_stages, aligned=("N_CTX", "V_STRIDE")))


def studied_kernel(d: int, config) -> dict:
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "L": "*fp32", "sm_scale": "fp32", "N_CTX": "i32"}
    const = dict(HEAD_DIM=d, CAUSAL=False, **config.kwargs)
    return report(sm90.compile_sm90(fk._attn_fwd.fn, sig, const, num_warps=config.num_warps,
                                    num_stages=config.num_stages, aligned=("N_CTX",)))


BWD_SIG = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "dO": "*bf16", "L": "*fp32", "Delta": "*fp32", "dQ": "*bf16",
           "dK": "*bf16", "dV": "*bf16", "sm_scale": "fp32", "N_CTX": "i32"}


def backward_rows(dims=(64, 128), candidates: int | None = None) -> list[dict]:
    """--backward: the studied dK/dV and dQ kernels beside the fused one (hopper_kernels._attn_bwd_fused, whose
    dQ is fp32 and added with atomics: RED instructions), bf16, causal and not."""
    kernels = (("studied dkdv", fk._attn_bwd_dkdv.fn, fk.bwd_dkdv_configs, {}),
               ("studied dq", fk._attn_bwd_dq.fn, fk.bwd_dq_configs, {}),
               ("fused", hk._attn_bwd_fused.fn, hk.bwd_fused_configs, {"dQ": "*fp32"}))
    out = []
    for d in dims:
        for causal in (False, True):
            for name, jit, configs, sig in kernels:
                for c in configs()[:candidates]:
                    out.append({"kernel": name, "d": d, "causal": causal, **c.kwargs, "warps": c.num_warps,
                                "stages": c.num_stages, **_safe(backward_kernel, jit, sig, d, causal, c)})
    return out


def backward_kernel(jit, sig: dict, d: int, causal: bool, config) -> dict:
    compiled = sm90.compile_sm90(jit, {**BWD_SIG, **sig}, dict(HEAD_DIM=d, CAUSAL=causal, **config.kwargs),
                                 num_warps=config.num_warps, num_stages=config.num_stages, aligned=("N_CTX",))
    red = len(re.findall(r"\bREDG?\.", sm90.cuobjdump(compiled, "-sass")))  # global atomic adds, result unused
    return {**report(compiled), "RED": red}


def rows(dims=(64, 128, 256), candidates: int | None = None) -> list[dict]:
    """One row per (kernel, head dim, candidate[, dtype, warp specialization]); ``candidates`` keeps the first
    few tile candidates of each kernel."""
    out = []
    for d in dims:
        studied = fk.fwd_configs() if d in fk.SUPPORTED_HEAD_DIMS else []
        for c in studied[:candidates]:
            out.append({"kernel": "studied", "d": d, "dtype": "bf16", "ws": False, **c.kwargs, "warps": c.num_warps,
                        "stages": c.num_stages, **_safe(studied_kernel, d, c)})
        for c in hk.tma_configs(d)[:candidates]:
            for fp8, ws in ((False, False), (False, True), (True, False)):
                out.append({"kernel": "descriptors", "d": d, "dtype": "fp8" if fp8 else "bf16", "ws": ws, **c.kwargs,
                            "warps": c.num_warps, "stages": c.num_stages, **_safe(descriptor_kernel, d, fp8, ws, c)})
    return out


def _safe(fn, *a) -> dict:
    try:
        return fn(*a)
    except Exception as e:  # a candidate that does not compile is a finding
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def print_table(got: list[dict], cols: list[str], width: int) -> None:
    """One line a row, ``width`` characters a column; a row that failed to compile shows its error as ``regs``."""
    print(" ".join(f"{c:>{width}}" for c in cols))
    for r in got:
        print(" ".join(f"{str(r.get(c, r.get('error', '') if c == 'regs' else '')):>{width}}" for c in cols))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--dims", default="64,128,256", help="head dims, comma-separated")
    ap.add_argument("--candidates", type=int, help="only the first K tile candidates of each kernel")
    ap.add_argument("--backward", action="store_true", help="the backward kernels instead (studied and fused)")
    a = ap.parse_args(argv)
    if a.backward:
        got = backward_rows(tuple(int(x) for x in a.dims.split(",")), a.candidates)
        cols = ["kernel", "d", "causal", "BLOCK_M", "BLOCK_N", "warps", "stages", "regs", "spill_bytes", "smem_bytes",
                "LDGSTS", "HGMMA", "HMMA", "RED"]
        print_table(got, cols, 12)
        if a.json:
            a.json.write_text(json.dumps({"rows": got}, indent=1))
        return
    got = rows(tuple(int(x) for x in a.dims.split(",")), a.candidates)
    cols = ["kernel", "d", "dtype", "ws", "BLOCK_M", "BLOCK_N", "warps", "stages", "regs", "spill_bytes",
            "smem_bytes", *OPS, "sass_sha"]
    print_table(got, cols, 11)
    plain = {(r["d"], r["dtype"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"]): r.get("sass_sha")
             for r in got if r["kernel"] == "descriptors" and not r["ws"]}
    ws = Counter("failed to compile" if "error" in r else "same SASS" if r["sass_sha"] == plain.get(
        (r["d"], r["dtype"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"])) else "changed SASS"
        for r in got if r["kernel"] == "descriptors" and r["ws"])
    print("warp specialization asked for, per candidate: " + ", ".join(f"{v} {k}" for k, v in sorted(ws.items())))
    if a.json:
        a.json.write_text(json.dumps({"rows": got, "warp_specialization": dict(ws)}, indent=1))


if __name__ == "__main__":
    main()
