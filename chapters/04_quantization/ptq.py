"""Post-training quantization, as studied in chapter 04: RTN, GPTQ, FP8 row-wise, and an INT4 kernel.

The notebook shows these functions with ``repro_utils.display.show``; what it shows is what runs.

1. Integer grids and round-to-nearest (RTN) ........ QWeight, quant_params, quantize, rtn
2. GPTQ (Frantar et al. 2022) ....................... HessianAccumulator, gptq, gptq_quantize_model
3. FP8 e4m3, row-wise scales ........................ fp8_rowwise, fp8_fake_quant, fp8_quant_rows, fp8_linear
4. INT4 weight-only ................................. Int4Weight, pack_int4, _int4_gemv_kernel and _int4_mma_kernel
                                                      (Triton), int4_matmul, tune_int4, int4_linear,
                                                      the fp16x2 GEMV beside them (_int4_gemv_h2_kernel,
                                                      int4_gemv_h2, tune_int4_gemvs),
                                                      tinygemm_pack / tinygemm_linear (torch's built-in kernel)
5. Models: a small GPT (quality), a Llama-3-8B-shaped decoder (speed)
6. Measurement: training, perplexity, timing sweeps, ceilings of the machine (read_floor: the INT4 bytes' floor)
7. GPTQ's own table: a Hugging Face decoder (OPT-125M) .. hub_file, load_causal_lm, wikitext2_test_ids,
                                                      c4_calibration, eval_windows, window_perplexity,
                                                      block_inputs, gptq_quantize_decoder, rtn_decoder
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton runs the kernels on a GPU, or on the CPU with TRITON_INTERPRET=1 (slow, for tests)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the chapter's CPU path needs no Triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------
# 1. Integer grids and round-to-nearest
# ----------------------------------------------------------------------------------------------------

@dataclass
class QWeight:
    """An integer-quantized weight: w[n, k] ≈ (q[n, k] - zero[n, g]) * scale[n, g], g = k // group_size."""

    q: torch.Tensor  # (N, K) uint8 codes in [0, 2**bits - 1]
    scale: torch.Tensor  # (N, K // G) float32
    zero: torch.Tensor  # (N, K // G) float32, integer-valued
    bits: int
    group_size: int  # G (equals K for one group per row)

    def dequantize(self) -> torch.Tensor:
        N, K = self.q.shape
        q = self.q.float().view(N, K // self.group_size, self.group_size)
        return ((q - self.zero[..., None]) * self.scale[..., None]).view(N, K)


def check_quant_args(bits: int, group_size: int, in_features: int) -> int:
    """Validate (bits, group_size) for a layer with ``in_features`` inputs; returns the group size G.

    ``group_size=-1`` means one group per output row (per-channel), GPTQ's default."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if group_size == -1:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer or -1 (one group per row), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the layer's {in_features} input features")
    return group_size


def quant_params(w: torch.Tensor, bits: int, group_size: int, sym: bool = False):
    """Scale and zero point of each group of ``group_size`` consecutive inputs of each row.

    Asymmetric (default): the grid spans [min(w, 0), max(w, 0)] in 2**bits - 1 steps and the zero point
    is rounded to an integer, so 0 is exactly representable (GPTQ's quantizer does the same)."""
    N, K = w.shape
    G = check_quant_args(bits, group_size, K)
    maxq = 2**bits - 1
    wg = w.float().reshape(N, K // G, G)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = hi == lo  # an all-zero group: any grid will do
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(w / scale) + zero, 0, 2**bits - 1), per group."""
    N, K = w.shape
    G = K // scale.shape[1]
    q = torch.round(w.float().view(N, K // G, G) / scale[..., None]) + zero[..., None]
    return q.clamp_(0, 2**bits - 1).to(torch.uint8).view(N, K)


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False) -> QWeight:
    """Round-to-nearest: every weight to its closest grid point, independently of all the others."""
    scale, zero = quant_params(w, bits, group_size, sym)
    return QWeight(quantize(w, scale, zero, bits), scale, zero, bits, w.shape[1] // scale.shape[1])


# ----------------------------------------------------------------------------------------------------
# 2. GPTQ
# ----------------------------------------------------------------------------------------------------

class HessianAccumulator:
    """H = (2 / n) Σ x xᵀ over the n calibration inputs x that reach one linear layer.

    GPTQ minimises ||W X - Ŵ X||² row by row; its Hessian with respect to a row is 2 X Xᵀ
    (Frantar et al. 2022, §3). The running mean keeps H at the same scale for any n."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H += x.T @ x


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, sym: bool = False) -> QWeight:
    """GPTQ (Frantar et al. 2022, Algorithm 1): quantize the columns of W one at a time and move each
    column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian.

    - damping: add ``damp`` × mean(diag H) to the diagonal so that H is safely invertible (the paper uses 1%);
    - H⁻¹ is used through its upper Cholesky factor U (H⁻¹ = Uᵀ U): row i of U holds exactly the update
      coefficients of step i, so no inverse is ever updated (§4, the Cholesky reformulation);
    - lazy batches: the error of ``block_size`` columns is applied to the rest of W in one matmul (§4);
    - groups: each group of ``group_size`` columns gets its own (scale, zero), chosen when the group's first
      column is reached, from the weights as GPTQ has updated them so far;
    - act_order: columns in order of decreasing diag(H) (the IST-DASLab/gptq README's ``--act-order``); the
      groups' grids are then fixed before any update (its ``--static-groups``), so that group g still covers
      columns g·G … g·G + G - 1 and the packed format is the same as RTN's.
    """
    W = W.float().clone()
    N, K = W.shape
    G = check_quant_args(bits, group_size, K)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    maxq = 2**bits - 1
    H = H.float().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        scale, zero = quant_params(W, bits, G, sym)  # static groups
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        scale = torch.zeros(N, K // G, device=W.device)
        zero = torch.zeros_like(scale)
        perm = torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    order = perm.tolist()
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = order[i1 + i]  # this column's index in the original W
            g = col // G
            if not act_order and col % G == 0:  # a new group: its grid from the weights as updated so far
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :G]
                scale[:, g:g + 1], zero[:, g:g + 1] = quant_params(upcoming, bits, G, sym)
            w, s, z = W1[:, i], scale[:, g], zero[:, g]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            Q[:, i1 + i] = q.to(torch.uint8)
            err = (w - (q - z) * s) / U1[i, i]  # the OBS update (§3), with H⁻¹'s rows taken from U (§4)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of every later column
    return QWeight(Q[:, torch.argsort(perm)], scale, zero, bits, G)


# ----------------------------------------------------------------------------------------------------
# 3. FP8 e4m3 with row-wise scales
# ----------------------------------------------------------------------------------------------------

FP8_MAX = 448.0  # largest finite e4m3 value, S.1111.110 = 1.75 × 2^8 (Micikevicius et al. 2022, Table 1)


def fp8_rowwise(x: torch.Tensor):
    """Row-wise e4m3: each row is scaled so that its largest |value| lands on 448, then rounded to e4m3.

    Returns (codes in torch.float8_e4m3fn, scale (rows, 1) float32); x ≈ codes * scale."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x rounded through row-wise e4m3 and back: what the tensor cores see, computed on any device."""
    q, s = fp8_rowwise(x)
    return (q.float() * s).to(x.dtype)


if triton is not None:

    @triton.jit
    def _fp8_quant_rows_kernel(X, Q, S, K, stride_x, stride_q, BLOCK: tl.constexpr):
        """One program per row: read the row once, find its max |x|, write e4m3 codes and the scale."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + row, scale)


def fp8_quant_rows(x: torch.Tensor):
    """Row-wise e4m3 of a 2-D activation in one fused pass (Triton); same result as ``fp8_rowwise``."""
    if triton is None or not (x.is_cuda or INTERPRET):
        return fp8_rowwise(x)
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _fp8_quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block,
                                 num_warps=min(16, max(4, block // 1024)))
    return q, s


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ on the FP8 tensor cores (torch._scaled_mm), both operands e4m3 with row-wise scales.

    The weight was quantized once, offline (w_scale has shape (1, N)); the activation is quantized here,
    per token, on every call, so its cost is part of whatever time this function is given."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = fp8_quant_rows(x2)
    y = torch._scaled_mm(xq, w_fp8.t(), scale_a=xs, scale_b=w_scale, out_dtype=torch.bfloat16,
                         use_fast_accum=True)
    return y.reshape(*x.shape[:-1], w_fp8.shape[0])


# ----------------------------------------------------------------------------------------------------
# 4. INT4 weight-only: packing, the Triton kernels, torch's tinygemm
# ----------------------------------------------------------------------------------------------------

PACK = 128  # inputs per packing block (one group of the kernels): 16 rows of int32 words, 8 nibbles each


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (N, K) into int32 words (K // 8, N): K-major, so consecutive outputs n are
    consecutive words and a warp reads a row of the tile in whole 128-byte lines.

    Within each block of 128 inputs, nibble j (bits 4j … 4j+3) of word row r holds input 16·j + r. The
    sixteen inputs one nibble position covers are then contiguous in x."""
    N, K = q.shape
    if K % PACK:
        raise ValueError(f"INT4 packing needs the input size to be a multiple of {PACK}, got {K}")
    q = q.to(torch.int64).view(N, K // PACK, 8, 16)  # (n, block, j, r)
    words = sum(q[:, :, j, :] << (4 * j) for j in range(8))  # (n, block, r)
    words = torch.where(words >= 2**31, words - 2**32, words)  # as signed int32
    return words.to(torch.int32).reshape(N, K // 8).t().contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes (N, K) back from ``pack_int4``'s words (K // 8, N)."""
    K8, N = packed.shape
    w = packed.t().reshape(N, K8 // 16, 1, 16)
    q = (w >> (4 * torch.arange(8, device=packed.device)).view(1, 1, 8, 1)) & 0xF  # (n, block, j, r)
    return q.reshape(N, K8 * 8).to(torch.uint8)


@dataclass
class Int4Weight:
    """A 4-bit weight as the Triton kernels read it: 4.19 bits per weight with group size 128."""

    packed: torch.Tensor  # (K // 8, N) int32, see pack_int4
    scale: torch.Tensor  # (K // G, N) bfloat16: group-major, so a tile of N reads one contiguous row
    zero: torch.Tensor  # (K // G, N) uint8
    group_size: int

    @property
    def shape(self):
        return self.packed.shape[1], self.packed.shape[0] * 8

    @classmethod
    def from_qweight(cls, qw: QWeight) -> Int4Weight:
        if qw.bits != 4 or qw.group_size % PACK:
            raise ValueError(f"the INT4 kernel needs bits=4 and a group size that is a multiple of {PACK}, "
                             f"got bits={qw.bits}, group_size={qw.group_size}")
        return cls(pack_int4(qw.q), qw.scale.t().contiguous().to(torch.bfloat16),
                   qw.zero.t().contiguous().to(torch.uint8), qw.group_size)

    def dequantize(self) -> torch.Tensor:
        """The weight the kernels multiply by (with the bf16-rounded scales), as float32 (N, K)."""
        N, K = self.shape
        q = unpack_int4(self.packed).float().view(N, K // self.group_size, self.group_size)
        s, z = self.scale.t().float(), self.zero.t().float()
        return ((q - z[..., None]) * s[..., None]).view(N, K)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


if triton is not None:

    @triton.jit
    def _lop3(v, field: tl.constexpr, ASM: tl.constexpr):
        """(v & field) | 0x43000000. The GPU does this in one instruction (lop3), but ptxas does not merge
        two constants into one, so on the GPU it is written in PTX; the CPU interpreter takes the plain form."""
        if not ASM:
            return (v & field) | 0x43000000
        elif field == 0xF0000:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF0000, 0x43000000, 0xEA;", "=r,r", [v],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF000, 0x43000000, 0xEA;", "=r,r", [v],
                                             dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _nibble_f32(W, j: tl.constexpr, ASM: tl.constexpr):
        """Nibble j of every word of W as an fp32 number, in two instructions (one shift, shared by two j,
        and one lop3): the nibble is moved to bits 16-19 (even j) or 12-15 (odd j) and OR-ed into the
        mantissa of 128.0 (bits 0x43000000, whose last bit is worth 2^-16). The result is exactly 128 + q
        (even j) or 128 + q/16 (odd j), with no int-to-float conversion."""
        d: tl.constexpr = 16 - 4 * j if j % 2 == 0 else 12 - 4 * j
        if d > 0:
            v = W << d
        elif d < 0:
            v = W >> -d
        else:
            v = W
        field: tl.constexpr = 0xF0000 if j % 2 == 0 else 0xF000
        return _lop3(v, field, ASM).to(tl.float32, bitcast=True)

    @triton.jit
    def _nibbles_bf16(W, zz, s: tl.constexpr, ASM: tl.constexpr):
        """Nibbles s and s + 4 of every word of W minus the zero point, as two bf16 tiles, two weights per
        instruction: shift by 4s, lop3 with 0x000F000F | 0x43004300 (two bf16 numbers 128 + q, one per
        16-bit half), then one packed bf16x2 subtraction of zz = (128 + z, 128 + z). q - z is a small
        integer, exact in bf16."""
        if ASM:
            v = W >> (4 * s)  # (sign bits shifted in stay above bit 19, which the lop3 drops)
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 t, t, $3; "
                "mov.b32 {$0, $1}, t; }",
                "=h,=h,r,r", [v, zz], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            z = (zz & 0xFF).to(tl.float32)  # zz's low byte is z (0x4300 | z is the bf16 number 128 + z)
            lo = (((W >> (4 * s)) & 0xF).to(tl.float32) - z).to(tl.bfloat16)
            hi = (((W >> (4 * s + 16)) & 0xF).to(tl.float32) - z).to(tl.bfloat16)
            return lo, hi

    @triton.jit
    def _store_tile(Y, WS, CNT, acc, offs, ok, tile, SPLIT_K: tl.constexpr):
        """Write one output tile. With split-K, SPLIT_K programs own the tile: each adds its partial sum
        into an fp32 workspace (atomics that complete before the program goes on), and the last one to
        arrive (an atomic counter tells it) takes the total out atomically, leaves zeros behind, stores the
        result and resets the counter. One launch and no memset: the workspace is zero between calls."""
        if SPLIT_K == 1:
            tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(WS + offs, acc, mask=ok, sem="acq_rel")
            tl.debug_barrier()  # every thread's adds are done before the counter is incremented
            arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # all partial sums are in
                total = tl.atomic_add(WS + offs, tl.zeros_like(acc), mask=ok, sem="acq_rel")
                tl.store(WS + offs, tl.zeros_like(acc), mask=ok)
                tl.store(Y + offs, total.to(Y.dtype.element_ty), mask=ok)
                tl.store(CNT + tile, 0)

    @triton.jit
    def _int4_gemv_kernel(X, Wp, S, Z, Y, WS, CNT, N, G: tl.constexpr, BLOCK_N: tl.constexpr,
                          KW: tl.constexpr, SPLIT_K: tl.constexpr, K_ITERS: tl.constexpr, ASM: tl.constexpr):
        """One token (M = 1) on the CUDA cores: y[n] = Σ_k x[k] · (q[k, n] - z[g, n]) · s[g, n].

        Grid (N / BLOCK_N, SPLIT_K): each program streams a [K / SPLIT_K, BLOCK_N] slice of the weight,
        KW word rows (8·KW inputs of one group) per step. Every tile is two-dimensional, [KW, BLOCK_N], in
        one register layout whose rows all sit in the same thread: the words are read once (coalesced
        along n), each nibble position j is extracted from all of them (``_nibble_f32``) and multiplied by
        the KW inputs 16·j + r it holds, a contiguous slice of x. Per weight: one lop3, half a shift, one
        FMA. The offset 128, the zero point and the scale are applied once per step and column:
            Σ_k f·x' = Σ_k q·x + 128·Σ_k x'   (f = 128 + q, x' = x for even j; f = 128 + q/16, x' = 16x for odd j)
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, KW)
        n_ok = rn < N
        k_first = pid_k * K_ITERS * 8 * KW
        w_ptrs = Wp + (k_first // 8 + rr)[:, None] * N + rn[None, :]
        Wt = tl.load(w_ptrs, mask=n_ok[None, :], other=0, eviction_policy="evict_first")
        s = tl.load(S + (k_first // G) * N + rn, mask=n_ok, other=0.0)
        z = tl.load(Z + (k_first // G) * N + rn, mask=n_ok, other=0)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for it in range(K_ITERS):
            k0 = k_first + it * 8 * KW
            # prefetch: the next step's words, scales and zeros are in flight while this step computes
            more = it + 1 < K_ITERS
            g_next = (k0 + 8 * KW) // G
            W_next = tl.load(w_ptrs + (it + 1) * KW * N, mask=n_ok[None, :] & more, other=0,
                             eviction_policy="evict_first")
            s_next = tl.load(S + g_next * N + rn, mask=n_ok & more, other=0.0)
            z_next = tl.load(Z + g_next * N + rn, mask=n_ok & more, other=0)
            r0 = k0 % 128 // 8  # first word row of this step inside its 128-input block
            base = k0 - k0 % 128  # first input of the block
            part = tl.zeros((KW, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((KW,), dtype=tl.float32)  # Σ_j x   per word row
            xps = tl.zeros((KW,), dtype=tl.float32)  # Σ_j x'  per word row
            for j in tl.static_range(8):
                xj = tl.load(X + base + 16 * j + r0 + rr, eviction_policy="evict_last").to(tl.float32)
                if j % 2 == 1:
                    xpj = xj * 16.0
                else:
                    xpj = xj
                part += _nibble_f32(Wt, j, ASM) * xpj[:, None]
                xs += xj
                xps += xpj
            sf = s.to(tl.float32)
            acc += sf * (tl.sum(part, axis=0) - 128.0 * tl.sum(xps, axis=0) - z.to(tl.float32) * tl.sum(xs, axis=0))
            Wt, s, z = W_next, s_next, z_next
        _store_tile(Y, WS, CNT, acc, rn, n_ok, pid_n, SPLIT_K)

    # The half2 GEMV: four nibbles of a word in two packed fp16 instructions each, two weights per instruction.
    # The conversion is the magic-number trick of NVIDIA FasterTransformer (interleaved_numeric_conversion.h)
    # and of Marlin (Frantar et al. 2024, arXiv:2408.11743, its dequant()): a nibble OR-ed into the mantissa
    # of 1024.0 (fp16 0x6400, whose last mantissa bit is worth 1) *is* the fp16 number 1024 + q, so one lop3
    # turns two nibbles (one per 16-bit half) into two fp16 numbers, and one packed fma removes the 1024 and
    # the zero point. The code below is this chapter's own; the layout (pairs j, j + 4) is pack_int4's.
    # Why fp16 and not bf16: bf16 keeps 8 significant bits, so the products (q - z)·x (up to 12 bits) and
    # their sums would round 8 times coarser than in fp16 (11 bits); fp16 keeps the sums within the chapter's
    # tolerance. x is converted to fp16 (exact in fp16's normal range, [6.1e-5, 65504]); the price is range:
    # see _int4_gemv_h2_kernel.

    @triton.jit
    def _bits_f16(v, hi: tl.constexpr):
        """Half ``hi`` (0: bits 0-15, 1: bits 16-31) of the int32 tile v, as fp16 (the interpreter's path)."""
        h = (v >> 16) if hi else v
        return (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _f16_bits(lo, hi):
        """Two fp16 tiles packed into one int32 tile: lo in bits 0-15, hi in bits 16-31 (the interpreter's path)."""
        lo32 = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo32 | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _x_pair_h2(xa, xb, ASM: tl.constexpr):
        """Two bf16 tiles as one int32 tile of fp16 pairs (xa low, xb high), each rounded to nearest."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .f32 a, b; cvt.f32.bf16 a, $1; cvt.f32.bf16 b, $2; cvt.rn.f16x2.f32 $0, b, a; }",
                "=r,h,h", [xa, xb], dtype=tl.int32, is_pure=True, pack=1)
        else:
            return _f16_bits(xa.to(tl.float32).to(tl.float16), xb.to(tl.float32).to(tl.float16))

    @triton.jit
    def _add_h2_asm(a, b):
        return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _add_h2_emulated(a, b):
        lo = (_bits_f16(a, 0).to(tl.float32) + _bits_f16(b, 0).to(tl.float32)).to(tl.float16)  # fp32 is
        hi = (_bits_f16(a, 1).to(tl.float32) + _bits_f16(b, 1).to(tl.float32)).to(tl.float16)  # exact here
        return _f16_bits(lo, hi)

    @triton.jit
    def _h2_sum_f32(v, ASM: tl.constexpr):
        """The two fp16 halves of each int32 of v, added in fp32."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .f16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
                "add.f32 $0, a, b; }", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return _bits_f16(v, 0).to(tl.float32) + _bits_f16(v, 1).to(tl.float32)

    @triton.jit
    def _fma_h2_emulated(a, b, c):
        """fma.rn.f16x2 on int32 tiles of fp16 pairs: a·b + c per half, rounded once (in float64 the product
        of two fp16 numbers and its sum with a third are exact, so one rounding to fp16 remains)."""
        lo = (_bits_f16(a, 0).to(tl.float64) * _bits_f16(b, 0).to(tl.float64)
              + _bits_f16(c, 0).to(tl.float64)).to(tl.float16)
        hi = (_bits_f16(a, 1).to(tl.float64) * _bits_f16(b, 1).to(tl.float64)
              + _bits_f16(c, 1).to(tl.float64)).to(tl.float16)
        return _f16_bits(lo, hi)

    @triton.jit
    def _word_dot_h2(W, za, zb, x0, x1, x2, x3, acc, ASM: tl.constexpr):
        """acc + Σ_p w_p·x_p over the four nibble pairs p = (j, j + 4) of each word, in fp16x2: w_p = (q - z)/16.

        Pairs (0, 4) and (2, 6) sit at bits 0-3 and 16-19 of W and of W >> 8: (v & 0x000F000F) | 0x64006400
        is 1024 + q in each half, and fma(t, 1/16, za) with za = -(64 + z/16) gives (q - z)/16. Pairs (1, 5) and
        (3, 7) sit at bits 4-7 and 20-23: the lop3 gives 1024 + 16q, and fma(t, 1/256, zb), zb = -(4 + z/16),
        gives (q - z)/16 again. Every step is exact up to the products' sums; the 1/16 keeps them as large
        as x at most (|q - z| ≤ 15). Per word: 1 shift, 4 lop3, 8 fma.f16x2, i.e. 13 instructions for 8 weights."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t, v, w, a, c16, c256;\n"
                " mov.b32 c16, 0x2C002C00; mov.b32 c256, 0x1C001C00;\n"
                " lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xEA; fma.rn.f16x2 w, t, c16, $2; fma.rn.f16x2 a, w, $4, $8;\n"
                " lop3.b32 t, $1, 0x00F000F0, 0x64006400, 0xEA; fma.rn.f16x2 w, t, c256, $3; fma.rn.f16x2 a, w, $5, a;\n"
                " shr.u32 v, $1, 8;\n"
                " lop3.b32 t, v, 0x000F000F, 0x64006400, 0xEA; fma.rn.f16x2 w, t, c16, $2; fma.rn.f16x2 a, w, $6, a;\n"
                " lop3.b32 t, v, 0x00F000F0, 0x64006400, 0xEA; fma.rn.f16x2 w, t, c256, $3; fma.rn.f16x2 $0, w, $7, a; }",
                "=r,r,r,r,r,r,r,r,r", [W, za, zb, x0, x1, x2, x3, acc], dtype=tl.int32, is_pure=True, pack=1)
        else:  # the same steps, one fp16 half at a time
            c16 = tl.full(W.shape, 0x2C002C00, tl.int32)  # 1/16 in both halves
            c256 = tl.full(W.shape, 0x1C001C00, tl.int32)  # 1/256
            V = (W >> 8) & 0x00FFFFFF  # shr.u32: a logical shift
            acc = _fma_h2_emulated(_fma_h2_emulated((W & 0x000F000F) | 0x64006400, c16, za), x0, acc)
            acc = _fma_h2_emulated(_fma_h2_emulated((W & 0x00F000F0) | 0x64006400, c256, zb), x1, acc)
            acc = _fma_h2_emulated(_fma_h2_emulated((V & 0x000F000F) | 0x64006400, c16, za), x2, acc)
            return _fma_h2_emulated(_fma_h2_emulated((V & 0x00F000F0) | 0x64006400, c256, zb), x3, acc)

    @triton.jit
    def _int4_gemv_h2_kernel(X, Wp, S, Z, Y, WS, CNT, N, G: tl.constexpr, BLOCK_N: tl.constexpr,
                             KW: tl.constexpr, SPLIT_K: tl.constexpr, K_ITERS: tl.constexpr, ASM: tl.constexpr):
        """``_int4_gemv_kernel``'s problem, grid and tiles, with the products in packed fp16 (``_word_dot_h2``):
        per word of the [KW, BLOCK_N] tile, four fp16x2 products (its 8 weights) summed in fp16; then the KW
        rows are summed in fp16 (KW - 1 packed adds) and the two halves once in fp32, which also accumulates
        over steps and applies the scale. Each fp16 sum so covers 4·KW products of at most |x| each.

        Range: x is rounded to fp16, so |x| must stay below 65504 / (4·KW) for no partial sum to overflow, and
        inputs below 6.1e-5 lose precision (fp16 subnormals). Fine for normalized activations; an input with
        outliers in the thousands needs the fp32 kernel (``_int4_gemv_kernel``), which ``tune_int4`` keeps
        among its candidates."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, KW)
        n_ok = rn < N
        k_first = pid_k * K_ITERS * 8 * KW
        w_ptrs = Wp + (k_first // 8 + rr)[:, None] * N + rn[None, :]
        Wt = tl.load(w_ptrs, mask=n_ok[None, :], other=0, eviction_policy="evict_first")
        s = tl.load(S + (k_first // G) * N + rn, mask=n_ok, other=0.0)
        z = tl.load(Z + (k_first // G) * N + rn, mask=n_ok, other=0)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zero = tl.zeros((KW, BLOCK_N), dtype=tl.int32)  # fp16x2 (+0, +0)
        for it in range(K_ITERS):
            k0 = k_first + it * 8 * KW
            more = it + 1 < K_ITERS
            g_next = (k0 + 8 * KW) // G
            W_next = tl.load(w_ptrs + (it + 1) * KW * N, mask=n_ok[None, :] & more, other=0,
                             eviction_policy="evict_first")
            s_next = tl.load(S + g_next * N + rn, mask=n_ok & more, other=0.0)
            z_next = tl.load(Z + g_next * N + rn, mask=n_ok & more, other=0)
            # x[16·j + r] for the KW rows r of this step: KW contiguous bf16, KW-aligned (k0 is a multiple of 8·KW)
            xo = tl.multiple_of(k0 - k0 % 128 + k0 % 128 // 8, KW) + rr
            x0 = _x_pair_h2(tl.load(X + xo), tl.load(X + xo + 64), ASM)  # inputs of nibbles 0 and 4
            x1 = _x_pair_h2(tl.load(X + xo + 16), tl.load(X + xo + 80), ASM)  # 1 and 5
            x2 = _x_pair_h2(tl.load(X + xo + 32), tl.load(X + xo + 96), ASM)  # 2 and 6
            x3 = _x_pair_h2(tl.load(X + xo + 48), tl.load(X + xo + 112), ASM)  # 3 and 7
            zf = z.to(tl.float32) * 0.0625
            za = _f16_bits((-64.0 - zf).to(tl.float16), (-64.0 - zf).to(tl.float16))  # exact: 11 bits
            zb = _f16_bits((-4.0 - zf).to(tl.float16), (-4.0 - zf).to(tl.float16))
            part = _word_dot_h2(Wt, za[None, :], zb[None, :], x0[:, None], x1[:, None], x2[:, None],
                                x3[:, None], zero, ASM)
            if ASM:
                part = tl.reduce(part, 0, _add_h2_asm)
            else:
                part = tl.reduce(part, 0, _add_h2_emulated)
            acc += (16.0 * s.to(tl.float32)) * _h2_sum_f32(part, ASM)
            Wt, s, z = W_next, s_next, z_next
        _store_tile(Y, WS, CNT, acc, rn, n_ok, pid_n, SPLIT_K)

    @triton.jit
    def _dot_slab(X, rm, m_ok, stride_xm, rk, w, part, F32_DOT: tl.constexpr):
        """part += x[rm, rk] @ w, for one [16, BLOCK_N] bf16 slab w of the weight."""
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None], other=0.0,
                    eviction_policy="evict_last")
        if F32_DOT:  # the CPU interpreter cannot multiply bf16 matrices
            return tl.dot(x.to(tl.float32), w.to(tl.float32), part)
        else:
            return tl.dot(x, w, part)

    @triton.jit
    def _int4_mma_kernel(X, Wp, S, Z, Y, WS, CNT, M, N, stride_xm, G: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, K_ITERS: tl.constexpr, F32_DOT: tl.constexpr,
                         ASM: tl.constexpr):
        """1 to 64 tokens on the tensor cores (rows of x beyond M are zeros). Same [16, BLOCK_N] word tiles,
        one 128-input group per step: nibble positions s and s + 4 become two bf16 slabs of q - z
        (``_nibbles_bf16``, 1.5 instructions per weight), each multiplied by the matching [BLOCK_M, 16]
        slice of x (inputs 16·j + r) with one tl.dot: 8 dots of depth 16 per group, accumulated in fp32
        and scaled once per group. Exact up to fp32 and the bf16 output. Grid (N / BLOCK_N, SPLIT_K, M / BLOCK_M)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, 16)
        n_ok = rn < N
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g0 = pid_k * K_ITERS * 128 // G
        s = tl.load(S + g0 * N + rn, mask=n_ok, other=0.0)
        z = tl.load(Z + g0 * N + rn, mask=n_ok, other=0)
        for it in range(K_ITERS):
            k0 = (pid_k * K_ITERS + it) * 128
            Wt = tl.load(Wp + (k0 // 8 + rr)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0,
                         eviction_policy="evict_first")  # Triton pipelines this load (num_stages)
            more = it + 1 < K_ITERS  # prefetch the next group's scales and zeros
            s_next = tl.load(S + (k0 + 128) // G * N + rn, mask=n_ok & more, other=0.0)
            z_next = tl.load(Z + (k0 + 128) // G * N + rn, mask=n_ok & more, other=0)
            zb = z.to(tl.int32) | 0x4300  # bf16 bits of 128 + z
            zz = tl.broadcast_to((zb | (zb << 16))[None, :], (16, BLOCK_N))
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s4 in tl.static_range(4):
                w_lo, w_hi = _nibbles_bf16(Wt, zz, s4, ASM)  # nibble positions j = s4 and s4 + 4
                part = _dot_slab(X, rm, m_ok, stride_xm, k0 + 16 * s4 + rr, w_lo, part, F32_DOT)
                part = _dot_slab(X, rm, m_ok, stride_xm, k0 + 16 * (s4 + 4) + rr, w_hi, part, F32_DOT)
            acc += s.to(tl.float32)[None, :] * part
            s, z = s_next, z_next
        ok = m_ok[:, None] & n_ok[None, :]
        tile = pid_m * tl.num_programs(0) + pid_n
        _store_tile(Y, WS, CNT, acc, rm[:, None] * N + rn[None, :], ok, tile, SPLIT_K)

    @triton.jit
    def _int4_dequant_kernel(Wp, S, Z, Wt, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr):
        """Write the transposed bf16 weight Wᵀ (K, N): one 128-input block of BLOCK_N outputs per program,
        every store a contiguous run along n."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * 128
        rr = tl.arange(0, 16)
        n_ok = rn < N
        Wd = tl.load(Wp + (k0 // 8 + rr)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
        s = tl.load(S + (k0 // G) * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(Z + (k0 // G) * N + rn, mask=n_ok, other=0).to(tl.float32)
        for j in tl.static_range(8):
            q = ((Wd >> (4 * j)) & 0xF).to(tl.float32)
            w = (q - z[None, :]) * s[None, :]
            tl.store(Wt + (k0 + 16 * j + rr)[:, None] * N + rn[None, :], w.to(Wt.dtype.element_ty),
                     mask=n_ok[None, :])


@dataclass(frozen=True)
class Int4Config:
    kernel: str  # "gemv" (one token, CUDA cores) or "mma" (tensor cores)
    BLOCK_M: int
    BLOCK_N: int
    SPLIT_K: int = 1  # programs sharing one output tile along K (see _store_tile)
    num_warps: int = 4
    num_stages: int = 2
    KW: int = 16  # gemv only: word rows (8·KW inputs) per step

    def __post_init__(self):
        if self.kernel not in ("gemv", "mma"):
            raise ValueError(f"unknown INT4 kernel {self.kernel!r}")
        if self.kernel == "gemv" and self.BLOCK_M != 1:
            raise ValueError("the gemv kernel computes one token: BLOCK_M must be 1")
        if self.kernel == "mma" and self.BLOCK_M < 16:
            raise ValueError("tl.dot needs BLOCK_M ≥ 16")
        if self.KW not in (1, 2, 4, 8, 16) or (self.kernel == "mma" and self.KW != 16):
            raise ValueError(f"KW must divide the 16 word rows of a block (and be 16 for mma), got {self.KW}")

    def k_step(self) -> int:
        """Inputs one program consumes per loop step: K / SPLIT_K must be a multiple of it."""
        return 8 * self.KW if self.kernel == "gemv" else PACK


def m_bucket(M: int) -> int:
    """Token counts that share one tuned configuration."""
    return 1 if M == 1 else 16 if M <= 16 else 32 if M <= 32 else 64


INT4_TUNED: dict[tuple[int, int, int], Int4Config | Int4LeanConfig] = {}  # (N, K, m_bucket) -> fastest measured
FP16_SUMS = True  # the tuner may pick the lean GEMV, whose sums of 32 products are fp16: inputs below ~2,000 only
NUM_SMS = 132  # an H100 SXM; replaced by the real count on a GPU (used to size the grid)


def split_for(N: int, K: int, block_n: int, block_m: int, M: int, waves: float) -> int:
    """The smallest split-K that gives at least ``waves`` × NUM_SMS programs (and divides K into blocks)."""
    tiles = -(-N // block_n) * -(-M // block_m)
    blocks = K // PACK
    ok = [s for s in range(1, blocks + 1) if blocks % s == 0]
    return next((s for s in ok if tiles * s >= waves * NUM_SMS), ok[-1])


def int4_config(M: int, N: int, K: int) -> Int4Config | Int4LeanConfig:
    """The configuration ``tune_int4`` measured fastest on this GPU, else a default (the fastest ones of the
    development runs on an H100): the CUDA-core GEMV for one token, the tensor-core kernel from two on,
    with enough programs to occupy every SM twice."""
    tuned = INT4_TUNED.get((N, K, m_bucket(M)))
    if tuned is not None:
        return tuned
    if M == 1:
        return Int4Config("gemv", 1, 512, split_for(N, K, 512, 1, M, 2), num_warps=4, KW=8)
    bm = max(16, m_bucket(M))
    return Int4Config("mma", bm, 128, split_for(N, K, 128, bm, M, 2), num_stages=3)


def int4_candidates(M: int, N: int, K: int) -> list[Int4Config | Int4LeanConfig]:
    """What ``tune_int4`` tries for one problem: a few tile shapes, each with the split-K that makes about
    2, 4 or 8 programs per SM (programs are short; several per SM hide each other's memory latency).
    One token tries both kernels, and (where ``FP16_SUMS``) the lean GEMV of section 4b on the tile that was
    fastest or within 5% of it in the H100 and H200 probes (calibration/*lean-probe*): 128 columns, 4 warp rows
    of 8 word rows, two steps a program (each of its shapes is a compile of its own, so one tile only).
    More tokens: the tensor-core kernel with BLOCK_M = 16, 32 or 64."""
    b = m_bucket(M)
    C = Int4Config
    out = []
    if b == 1:  # (BLOCK_N, warps, KW): every thread holds all KW rows of 4 or 8 columns
        for bn, warps, kw in ((512, 4, 8), (1024, 4, 4), (256, 2, 16)):
            for waves in (2, 4, 8):
                out.append(C("gemv", 1, bn, split_for(N, K, bn, 1, M, waves), warps, 2, kw))
    tiles = ((64, 3), (128, 3), (256, 3)) if b == 1 else ((64, 3), (128, 2), (128, 3), (256, 3))
    for bn, stages in tiles:  # (BLOCK_N, pipeline stages), 4 warps
        for waves in ((2, 4) if b == 1 else (1, 2, 4)):
            bm = max(16, b)
            out.append(C("mma", bm, bn, split_for(N, K, bn, bm, M, waves), 4, stages))
    if b == 1 and FP16_SUMS:
        out += [c for c in int4_lean_candidates(M, N, K, kernel="v2")
                if (c.BLOCK_N, c.RW, c.TR) == (128, 4, 8) and K // (c.SPLIT_K * c.k_step()) == 2]
    out = list(dict.fromkeys(out))  # distinct, in order
    return [c for c in out if (K // c.SPLIT_K) % c.k_step() == 0]


_WORKSPACE: dict = {}  # device -> (fp32 partial sums, int32 tile counters), zero between calls


def _workspace(device, numel: int, tiles: int):
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:
        ws = torch.zeros(max(numel, 1 << 21), device=device, dtype=torch.float32)
        cnt = torch.zeros(max(tiles, 1 << 16), device=device, dtype=torch.int32)
        _WORKSPACE[device] = (ws, cnt)
    return ws, cnt


def int4_matmul(x: torch.Tensor, w: Int4Weight, config: Int4Config | Int4LeanConfig | None = None) -> torch.Tensor:
    """y = x Wᵀ with W in 4 bits, read once from memory and dequantized in registers (Triton).

    One kernel launch, also with split-K. Split-K calls share one workspace per device, so calls must not
    run concurrently on different streams (the chapter uses one stream). A lean configuration (tuned for one
    token, see ``int4_candidates``) runs ``int4_gemv_lean``."""
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    c = config or int4_config(M, N, K)
    if isinstance(c, Int4LeanConfig):
        return int4_gemv_lean(x, w, c)
    if K % (c.SPLIT_K * c.k_step()):
        raise ValueError(f"K={K} is not a multiple of SPLIT_K · {c.k_step()} = {c.SPLIT_K * c.k_step()}")
    k_iters = K // (c.SPLIT_K * c.k_step())
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid_m = triton.cdiv(M, c.BLOCK_M)
    ws, cnt = _workspace(x.device, M * N, triton.cdiv(N, c.BLOCK_N) * grid_m) if c.SPLIT_K > 1 else (y, y)
    if c.kernel == "gemv":
        if M != 1:
            raise ValueError(f"the gemv kernel computes one token, got M={M}")
        _int4_gemv_kernel[(triton.cdiv(N, c.BLOCK_N), c.SPLIT_K)](
            x2, w.packed, w.scale, w.zero, y, ws, cnt, N, G=w.group_size, BLOCK_N=c.BLOCK_N, KW=c.KW,
            SPLIT_K=c.SPLIT_K, K_ITERS=k_iters, ASM=not INTERPRET, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        _int4_mma_kernel[(triton.cdiv(N, c.BLOCK_N), c.SPLIT_K, grid_m)](
            x2, w.packed, w.scale, w.zero, y, ws, cnt, M, N, x2.stride(0), G=w.group_size, BLOCK_M=c.BLOCK_M,
            BLOCK_N=c.BLOCK_N, SPLIT_K=c.SPLIT_K, K_ITERS=k_iters, F32_DOT=INTERPRET, ASM=not INTERPRET,
            num_warps=c.num_warps, num_stages=c.num_stages)
    return y.reshape(*x.shape[:-1], N)


def tune_int4(problems, *, device="cuda", seed: int = 0, rep: int = 20, log=None) -> list[dict]:
    """Time every candidate of ``int4_candidates`` for each (M, N, K) and keep the fastest correct one in
    INT4_TUNED (what ``triton.autotune`` does, made explicit so that the choice can be shown). A candidate
    that fails to compile or disagrees with the dequantized reference by more than 1% is skipped. Each
    candidate is timed as a CUDA-graph replay (see ``bench_linears``), L2 flushed before each."""
    from repro_utils.bench import time_fn

    global NUM_SMS
    NUM_SMS = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    g = torch.Generator(device=device).manual_seed(seed)
    for M, N, K in problems:
        w4 = Int4Weight.from_qweight(rtn(torch.randn(N, K, generator=g, device=device) * 0.02, 4, 128))
        x = torch.randn(M, K, generator=g, device=device).to(torch.bfloat16)
        ref = x.float() @ w4.dequantize().t()
        best = None
        for c in int4_candidates(M, N, K):
            try:
                y = torch.stack([int4_matmul(x, w4, c) for _ in range(2)]).float()  # 2nd: workspace left clean?
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                ms = time_fn(partial(int4_matmul, x, w4, c), warmup=5, rep=rep, graph=True).ms
            except Exception as e:  # noqa: BLE001 - a candidate that does not compile here is simply skipped
                if log:
                    log(f"skipped {c} for M={M}, N={N}, K={K}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append({"M": M, "N": N, "K": K, "config": c, "us": 1e3 * ms, "rel_err": err})
            if err < 1e-2 and (best is None or ms < best[1]):
                best = (c, ms)
        if best is not None:
            INT4_TUNED[(N, K, m_bucket(M))] = best[0]
    return rows


def int4_gemv_h2(x: torch.Tensor, w: Int4Weight, config: Int4Config | None = None) -> torch.Tensor:
    """y = x Wᵀ for one token with ``_int4_gemv_h2_kernel`` (products in packed fp16), on the tiles of a "gemv"
    configuration (default: the one ``int4_matmul`` would take). Kept beside ``int4_matmul``, which does not
    dispatch to it: the chapter's published choice stays the fp32 GEMV until a GPU has timed both
    (``tune_int4_gemvs``)."""
    N, K = w.shape
    x2 = x.reshape(-1, K)
    if x.shape[-1] != K or x2.shape[0] != 1:
        raise ValueError(f"the gemv kernels compute one token of {K} features, got x of shape {tuple(x.shape)}")
    c = config or int4_config(1, N, K)
    if c.kernel != "gemv":
        raise ValueError(f"int4_gemv_h2 runs the tiles of a 'gemv' configuration, got {c.kernel!r}")
    if K % (c.SPLIT_K * c.k_step()):
        raise ValueError(f"K={K} is not a multiple of SPLIT_K · {c.k_step()} = {c.SPLIT_K * c.k_step()}")
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    ws, cnt = _workspace(x.device, N, triton.cdiv(N, c.BLOCK_N)) if c.SPLIT_K > 1 else (y, y)
    _int4_gemv_h2_kernel[(triton.cdiv(N, c.BLOCK_N), c.SPLIT_K)](
        x2.contiguous(), w.packed, w.scale, w.zero, y, ws, cnt, N, G=w.group_size, BLOCK_N=c.BLOCK_N, KW=c.KW,
        SPLIT_K=c.SPLIT_K, K_ITERS=K // (c.SPLIT_K * c.k_step()), ASM=not INTERPRET, num_warps=c.num_warps,
        num_stages=c.num_stages)
    return y.reshape(*x.shape[:-1], N)


def tune_int4_gemvs(problems, *, device="cuda", seed: int = 0, rep: int = 20, log=None) -> list[dict]:
    """Time the fp32 GEMV (``int4_matmul``) and the fp16x2 GEMV (``int4_gemv_h2``) on every "gemv" candidate of
    ``int4_candidates`` for each (N, K) at M = 1, in one run, on the same weights and input, timed as
    ``tune_int4`` times (CUDA-graph replays). One row per (problem, tiles, kernel) with its time and its error
    against the dequantized reference; it leaves INT4_TUNED alone (the published choice is ``tune_int4``'s)."""
    from repro_utils.bench import time_fn

    global NUM_SMS
    NUM_SMS = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    g = torch.Generator(device=device).manual_seed(seed)
    for N, K in problems:
        w4 = Int4Weight.from_qweight(rtn(torch.randn(N, K, generator=g, device=device) * 0.02, 4, 128))
        x = torch.randn(1, K, generator=g, device=device).to(torch.bfloat16)
        ref = x.float() @ w4.dequantize().t()
        for c in (c for c in int4_candidates(1, N, K) if c.kernel == "gemv"):
            for name, fn in (("gemv", int4_matmul), ("gemv_h2", int4_gemv_h2)):
                try:
                    y = torch.stack([fn(x, w4, c) for _ in range(2)]).float()  # 2nd: workspace left clean?
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    ms = time_fn(partial(fn, x, w4, c), warmup=5, rep=rep, graph=True).ms
                except Exception as e:  # noqa: BLE001 - a candidate that does not compile here is simply skipped
                    if log:
                        log(f"skipped {name} {c} for N={N}, K={K}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                rows.append({"M": 1, "N": N, "K": K, "kernel": name, "config": c, "us": 1e3 * ms, "rel_err": err})
    return rows


def int4_dequantize_t(w: Int4Weight, dtype=torch.bfloat16) -> torch.Tensor:
    """The full weight, transposed, in ``dtype`` (K, N), written by one Triton pass over the packed weight."""
    N, K = w.shape
    out = torch.empty(K, N, device=w.packed.device, dtype=dtype)
    _int4_dequant_kernel[(triton.cdiv(N, 128), K // PACK)](w.packed, w.scale, w.zero, out, N, K,
                                                           G=w.group_size, BLOCK_N=128)
    return out


INT4_KERNEL_MAX_M = 64  # above this many tokens, dequantize once and use the bf16 tensor-core GEMM


def int4_linear(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """A serving stack's dispatch: the int4 kernel while the matmul is bandwidth-bound (few tokens),
    dequantize-then-cuBLAS once it is compute-bound (prefill), where 4-bit weights cannot help."""
    M = x.numel() // x.shape[-1]
    if M <= INT4_KERNEL_MAX_M:
        return int4_matmul(x, w)
    return torch.matmul(x, int4_dequantize_t(w, x.dtype))


def tinygemm_pack(qw: QWeight, inner_k_tiles: int = 8):
    """torch's built-in int4 kernel (tinygemm, the one torchao's int4 weight-only path used):
    w = (q - 8) · scale + zero', so zero' = (8 - zero) · scale; pairs of codes packed into bytes."""
    if qw.bits != 4:
        raise ValueError(f"tinygemm is a 4-bit kernel, got bits={qw.bits}")
    q = qw.q.to(torch.int32)
    q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, inner_k_tiles)
    zero_t = (8 - qw.zero) * qw.scale
    sz = torch.stack([qw.scale, zero_t], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/G, N, 2)
    return packed, sz


def tinygemm_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, sz)
    return y.reshape(*x.shape[:-1], y.shape[-1])



# ----------------------------------------------------------------------------------------------------
# 4b. Register-lean INT4 GEMVs for 1 to 4 tokens (issue 18, after the H200 probe of 15a2b94)
# ----------------------------------------------------------------------------------------------------
# The probe found the two GEMVs above latency-bound: 128 and 221-255 registers a thread (25% and 12.5%
# theoretical occupancy), DRAM 37-40% busy, no eligible warp on 47-60% of the cycles. Each of their threads
# holds all KW word rows of its columns, twice (the tile and its prefetch), and every input its rows need.
# The kernels below read the same Int4Weight and spread a step over the warps instead: warp row w (RW of
# them) takes TR consecutive word rows, in quads of 4, each thread 4·CH columns of them (128-bit loads);
# the warp rows' partial sums meet once, at the end of the program (one reduction through shared memory).
# The arithmetic is the fp16x2 GEMV's (lop3 / fma pairs giving the exact (q - z)/16 in fp16, products
# summed in fp16, here over the 4·TR products of one group and token, then fp32 times 16·scale), with
# - x read as int64, four bf16 inputs a load (a quad's 4 rows are 4 consecutive inputs of each nibble),
#   each fp16 pair built once per row for all the thread's columns (2 shifts or ands, one cvt);
# - each word dequantized once and shared by up to 4 tokens (BLOCK_M = M ≤ 4);
# - N a compile-time constant, so that word rows N words apart are immediate offsets of one address.
# Three ways to keep bytes in flight (Int4LeanConfig.kernel): "v2" loads the next quad's words into
# registers before it multiplies the current one (as the GEMVs above mean to: their sm_90 SASS shows ptxas
# sinking that prefetch to the last third of the loop body; here a barrier after the loads pins them);
# "v4" (the same kernel, PREFETCH off) loads each quad just before it, behind the same barrier, and counts on
# more resident warps; "v3" (_int4_gemv_v3_kernel) lets Triton's software pipeliner stream whole steps through
# shared memory (cp.async, num_stages deep). Which is fastest is for the GPU to say (scripts/ch04_int4_probe.py).
# A fourth, "v5" (_int4_gemv_v5_kernel), came from v2's sm_90 SASS: ptxas moves each quad's math (registers only)
# above the barrier and the next quad's loads, so v2 has 4 128-bit loads a thread in flight for ~50 instructions;
# v5 loads the whole next step (and its scales and zeros) before a step's math, which reads x after the barrier.
# In the interpreter (no PTX) the quads are computed by _quad_ref: the same loads and indexing, the
# products in fp32 from x rounded to fp16 (the fp16 sums are not reproduced); the PTX steps' own emulation
# (_deq_h2, _x4_pair_h2, _dot4_h2, bit for bit) is checked separately, one quad at a time.

if triton is not None:

    @triton.jit
    def _h2_pack_f64(lo, hi):
        """Two float64 tiles rounded to fp16 (to nearest, once) and packed as fp16x2 bits (lo in bits 0-15)."""
        lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo16 | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _h2_f64(v, hi: tl.constexpr):
        """Half ``hi`` of the fp16x2 bits v as float64."""
        h = (v >> 16) & 0xFFFF if hi else v & 0xFFFF
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)

    @triton.jit
    def _zeros_h2(z):
        """The fp16x2 offsets of the dequantization, za = -(64 + z/16) and zb = -(4 + z/16) in both halves, from
        the zero points z (int32, 0..15) by integer operations: the fp16 number 0xD400 | z is -(64 + z/16) and
        0xC400 | 16·z is -(4 + z/16) (below as signed int32: 0xD400D400 - 2^32 and 0xC400C400 - 2^32)."""
        zz = z * 0x10001
        return zz | -738143232, (zz << 4) | -1006582784

    @triton.jit
    def _deq_h2(W, za, zb, ASM: tl.constexpr):
        """The first half of ``_word_dot_h2``: the 8 weights of each word as four fp16x2 numbers (q - z)/16, for
        the nibble pairs (0, 4), (1, 5), (2, 6), (3, 7). Apart from the products so that tokens can share them."""
        if ASM:
            return tl.inline_asm_elementwise(  # (outputs written last: no output may share an input's register)
                "{ .reg .b32 t, v, c16, c256, d0, d1, d2, d3;\n"
                " mov.b32 c16, 0x2C002C00; mov.b32 c256, 0x1C001C00;\n"
                " lop3.b32 t, $4, 0x000F000F, 0x64006400, 0xEA; fma.rn.f16x2 d0, t, c16, $5;\n"
                " lop3.b32 t, $4, 0x00F000F0, 0x64006400, 0xEA; fma.rn.f16x2 d1, t, c256, $6;\n"
                " shr.u32 v, $4, 8;\n"
                " lop3.b32 t, v, 0x000F000F, 0x64006400, 0xEA; fma.rn.f16x2 d2, t, c16, $5;\n"
                " lop3.b32 t, v, 0x00F000F0, 0x64006400, 0xEA; fma.rn.f16x2 d3, t, c256, $6;\n"
                " mov.b32 $0, d0; mov.b32 $1, d1; mov.b32 $2, d2; mov.b32 $3, d3; }",
                "=r,=r,=r,=r,r,r,r", [W, za, zb], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                pack=1)
        else:  # the same steps on each half, in float64: 1024 + q (or 1024 + 16q) times 1/16 (1/256) plus za (zb)
            V = (W >> 8) & 0x00FFFFFF  # shr.u32
            t0 = (W & 0x000F000F) | 0x64006400
            t1 = (W & 0x00F000F0) | 0x64006400
            t2 = (V & 0x000F000F) | 0x64006400
            t3 = (V & 0x00F000F0) | 0x64006400
            return (_h2_pack_f64(_h2_f64(t0, 0) * 0.0625 + _h2_f64(za, 0), _h2_f64(t0, 1) * 0.0625 + _h2_f64(za, 1)),
                    _h2_pack_f64(_h2_f64(t1, 0) * 0.00390625 + _h2_f64(zb, 0),
                                 _h2_f64(t1, 1) * 0.00390625 + _h2_f64(zb, 1)),
                    _h2_pack_f64(_h2_f64(t2, 0) * 0.0625 + _h2_f64(za, 0), _h2_f64(t2, 1) * 0.0625 + _h2_f64(za, 1)),
                    _h2_pack_f64(_h2_f64(t3, 0) * 0.00390625 + _h2_f64(zb, 0),
                                 _h2_f64(t3, 1) * 0.00390625 + _h2_f64(zb, 1)))

    @triton.jit
    def _dot4_h2(d0, d1, d2, d3, x0, x1, x2, x3, acc, ASM: tl.constexpr):
        """The second half of ``_word_dot_h2``: acc + d0·x0 + d1·x1 + d2·x2 + d3·x3 in fp16x2, in this order."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 a; fma.rn.f16x2 a, $1, $5, $9; fma.rn.f16x2 a, $2, $6, a; fma.rn.f16x2 a, $3, $7, a;"
                " fma.rn.f16x2 $0, $4, $8, a; }",
                "=r,r,r,r,r,r,r,r,r,r", [d0, d1, d2, d3, x0, x1, x2, x3, acc], dtype=tl.int32, is_pure=True, pack=1)
        else:  # per half: product and sum exact in float64, one rounding to fp16, as fma.rn does
            lo = _h2_f64(acc, 0)
            hi = _h2_f64(acc, 1)
            for i in tl.static_range(4):
                if i == 0:
                    d, x = d0, x0
                elif i == 1:
                    d, x = d1, x1
                elif i == 2:
                    d, x = d2, x2
                else:
                    d, x = d3, x3
                lo = (lo + _h2_f64(d, 0) * _h2_f64(x, 0)).to(tl.float16).to(tl.float64)
                hi = (hi + _h2_f64(d, 1) * _h2_f64(x, 1)).to(tl.float16).to(tl.float64)
            return _h2_pack_f64(lo, hi)

    @triton.jit
    def _x4_pair_h2(a, b, t: tl.constexpr, ASM: tl.constexpr):
        """fp16x2 (input t of a low, input t of b high), rounded to nearest, from two int64 of four consecutive
        bf16 inputs each: the bf16 bits shifted (even t) or masked (odd t) into an fp32, then one cvt."""
        if ASM:
            if t < 2:
                sel: tl.constexpr = "mov.b64 {a, ah}, $1; mov.b64 {b, bh}, $2;"
            else:
                sel: tl.constexpr = "mov.b64 {al, a}, $1; mov.b64 {bl, b}, $2;"
            if t % 2 == 0:
                op: tl.constexpr = " shl.b32 a, a, 16; shl.b32 b, b, 16;"
            else:
                op: tl.constexpr = " and.b32 a, a, 0xFFFF0000; and.b32 b, b, 0xFFFF0000;"
            return tl.inline_asm_elementwise(
                "{ .reg .b32 a, b, al, ah, bl, bh; " + sel + op + " cvt.rn.f16x2.f32 $0, b, a; }",
                "=r,l,l", [a, b], dtype=tl.int32, is_pure=True, pack=1)
        else:
            xa = ((a >> (16 * t)) & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
            xb = ((b >> (16 * t)) & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
            return _h2_pack_f64(xa.to(tl.float64), xb.to(tl.float64))

    @triton.jit
    def _quad_load(p, N: tl.constexpr, mask, MASKED: tl.constexpr):
        """Word rows p, p + N, p + 2N, p + 3N: four tiles of 128-bit loads (masked only where MASKED)."""
        if MASKED:
            return (tl.load(p, mask=mask, eviction_policy="evict_first"),
                    tl.load(p + N, mask=mask, eviction_policy="evict_first"),
                    tl.load(p + 2 * N, mask=mask, eviction_policy="evict_first"),
                    tl.load(p + 3 * N, mask=mask, eviction_policy="evict_first"))
        else:
            return (tl.load(p, eviction_policy="evict_first"), tl.load(p + N, eviction_policy="evict_first"),
                    tl.load(p + 2 * N, eviction_policy="evict_first"),
                    tl.load(p + 3 * N, eviction_policy="evict_first"))

    @triton.jit
    def _x_quad(xp):
        """x for a quad of word rows: 8 int64 (nibble j's 4 inputs at xp + 4j), broadcast over the columns."""
        return (tl.load(xp)[:, None, None], tl.load(xp + 4)[:, None, None], tl.load(xp + 8)[:, None, None],
                tl.load(xp + 12)[:, None, None], tl.load(xp + 16)[:, None, None], tl.load(xp + 20)[:, None, None],
                tl.load(xp + 24)[:, None, None], tl.load(xp + 28)[:, None, None])

    @triton.jit
    def _row_dot(d0, d1, d2, d3, xq, t: tl.constexpr, p, ASM: tl.constexpr):
        """p + the products of row t of a quad (dequantized: d0..d3) with its inputs (xq: ``_x_quad``'s 8 int64)."""
        v0, v1, v2, v3, v4, v5, v6, v7 = xq
        return _dot4_h2(d0, d1, d2, d3, _x4_pair_h2(v0, v4, t, ASM), _x4_pair_h2(v1, v5, t, ASM),
                        _x4_pair_h2(v2, v6, t, ASM), _x4_pair_h2(v3, v7, t, ASM), p, ASM)

    @triton.jit
    def _quad_ref(w0, w1, w2, w3, xp, sxm, za, p, m: tl.constexpr):
        """p + Σ (q - z)/16 · x over a quad for token m, in fp32 from x rounded to fp16: the interpreter's path
        (all 4 rows and 8 nibbles in one tensor, [RW, CH, 128, 2, 2, 8])."""
        z = (za & 0xF).to(tl.float32)[:, :, :, None, None, None]  # za's low bits are z
        Wq = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [..., a, b] = row a + 2b (join stacks on a new last axis)
        j = tl.arange(0, 8)[None, None, None, None, None, :]
        q = ((Wq[:, :, :, :, :, None] >> (4 * j)) & 0xF).to(tl.float32)
        t = (tl.arange(0, 2)[:, None, None] + 2 * tl.arange(0, 2)[None, :, None])[None, None, None]
        xb = (xp + m * sxm).to(tl.pointer_type(tl.bfloat16))[:, None, None, None, None, None]
        x = tl.load(xb + 16 * j + t).to(tl.float32).to(tl.float16).to(tl.float32)
        prod = (q - z) * x
        return p + tl.sum(tl.sum(tl.sum(prod, axis=5), axis=4), axis=3) * 0.0625

    @triton.jit
    def _quad_x(xp, sxm, BLOCK_M: tl.constexpr, REF: tl.constexpr):
        """The inputs of a quad for BLOCK_M ≤ 4 tokens (``_x_quad`` each, token rows sxm int64 apart); the
        reference path loads its own (placeholders here)."""
        if REF:
            return xp, xp, xp, xp
        else:
            x0 = _x_quad(xp)
            x1 = x0
            x2 = x0
            x3 = x0
            if BLOCK_M > 1:
                x1 = _x_quad(xp + sxm)
            if BLOCK_M > 2:
                x2 = _x_quad(xp + 2 * sxm)
            if BLOCK_M > 3:
                x3 = _x_quad(xp + 3 * sxm)
            return x0, x1, x2, x3

    @triton.jit
    def _quad_dot(w0, w1, w2, w3, xs, xp, sxm, za, zb, p0, p1, p2, p3, BLOCK_M: tl.constexpr, ASM: tl.constexpr,
                  REF: tl.constexpr):
        """One quad (4 word rows a thread, words w0..w3) for BLOCK_M ≤ 4 tokens: each word dequantized once and
        multiplied by the inputs xs (``_quad_x``) of every token m into its partial sum p_m (fp16x2; fp32 where
        REF, the interpreter's reference path, which reads x at xp itself)."""
        if REF:
            p0 = _quad_ref(w0, w1, w2, w3, xp, sxm, za, p0, 0)
            if BLOCK_M > 1:
                p1 = _quad_ref(w0, w1, w2, w3, xp, sxm, za, p1, 1)
            if BLOCK_M > 2:
                p2 = _quad_ref(w0, w1, w2, w3, xp, sxm, za, p2, 2)
            if BLOCK_M > 3:
                p3 = _quad_ref(w0, w1, w2, w3, xp, sxm, za, p3, 3)
        else:
            x0, x1, x2, x3 = xs
            for t in tl.static_range(4):
                if t == 0:
                    d0, d1, d2, d3 = _deq_h2(w0, za, zb, ASM)
                elif t == 1:
                    d0, d1, d2, d3 = _deq_h2(w1, za, zb, ASM)
                elif t == 2:
                    d0, d1, d2, d3 = _deq_h2(w2, za, zb, ASM)
                else:
                    d0, d1, d2, d3 = _deq_h2(w3, za, zb, ASM)
                p0 = _row_dot(d0, d1, d2, d3, x0, t, p0, ASM)
                if BLOCK_M > 1:
                    p1 = _row_dot(d0, d1, d2, d3, x1, t, p1, ASM)
                if BLOCK_M > 2:
                    p2 = _row_dot(d0, d1, d2, d3, x2, t, p2, ASM)
                if BLOCK_M > 3:
                    p3 = _row_dot(d0, d1, d2, d3, x3, t, p3, ASM)
        return p0, p1, p2, p3

    @triton.jit
    def _group_h2(S, Z, row, cols, n_ok, N: tl.constexpr, G: tl.constexpr):
        """16 × the scale and the fp16x2 offsets (za, zb) of the group of each warp row's word rows, [RW, CH, 128]."""
        gp = (row // (G // 8))[:, None, None] * N + cols
        s16 = 16.0 * tl.load(S + gp, mask=n_ok, other=0.0).to(tl.float32)
        za, zb = _zeros_h2(tl.load(Z + gp, mask=n_ok, other=0).to(tl.int32))
        return s16, za, zb

    @triton.jit
    def _parts_zero(RW: tl.constexpr, CH: tl.constexpr, REF: tl.constexpr):
        """A group's partial sums start at 0: fp16x2 (+0, +0), or fp32 in the interpreter's reference path."""
        if REF:
            return tl.zeros((RW, CH, 128), dtype=tl.float32)
        else:
            return tl.zeros((RW, CH, 128), dtype=tl.int32)

    @triton.jit
    def _parts_f32(p, REF: tl.constexpr, ASM: tl.constexpr):
        """A group's partial sums in fp32 (the two fp16 halves added)."""
        if REF:
            return p
        else:
            return _h2_sum_f32(p, ASM)

    @triton.jit
    def _store_rows(Y, WS, CNT, a0, a1, a2, a3, offs, ok, N: tl.constexpr, tile, BLOCK_M: tl.constexpr,
                    SPLIT_K: tl.constexpr):
        """``_store_tile`` for BLOCK_M ≤ 4 output rows held as separate tiles a_m (row m at offs + m·N): the same
        workspace, the same counter (one arrival per program), the same clean-up by the last program."""
        if SPLIT_K == 1:
            tl.store(Y + offs, a0.to(Y.dtype.element_ty), mask=ok)
            if BLOCK_M > 1:
                tl.store(Y + N + offs, a1.to(Y.dtype.element_ty), mask=ok)
            if BLOCK_M > 2:
                tl.store(Y + 2 * N + offs, a2.to(Y.dtype.element_ty), mask=ok)
            if BLOCK_M > 3:
                tl.store(Y + 3 * N + offs, a3.to(Y.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(WS + offs, a0, mask=ok, sem="acq_rel")
            if BLOCK_M > 1:
                tl.atomic_add(WS + N + offs, a1, mask=ok, sem="acq_rel")
            if BLOCK_M > 2:
                tl.atomic_add(WS + 2 * N + offs, a2, mask=ok, sem="acq_rel")
            if BLOCK_M > 3:
                tl.atomic_add(WS + 3 * N + offs, a3, mask=ok, sem="acq_rel")
            tl.debug_barrier()  # every thread's adds are done before the counter is incremented
            arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # all partial sums are in
                for m in tl.static_range(BLOCK_M):
                    total = tl.atomic_add(WS + m * N + offs, tl.zeros_like(a0), mask=ok, sem="acq_rel")
                    tl.store(WS + m * N + offs, tl.zeros_like(a0), mask=ok)
                    tl.store(Y + m * N + offs, total.to(Y.dtype.element_ty), mask=ok)
                tl.store(CNT + tile, 0)

    @triton.jit
    def _lean_accumulate(a0, a1, a2, a3, s16, p0, p1, p2, p3, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
        """A step's partial sums (one group: one scale) into the fp32 accumulators of the tokens there are."""
        a0 += s16 * _parts_f32(p0, not ASM, ASM)
        if BLOCK_M > 1:
            a1 += s16 * _parts_f32(p1, not ASM, ASM)
        if BLOCK_M > 2:
            a2 += s16 * _parts_f32(p2, not ASM, ASM)
        if BLOCK_M > 3:
            a3 += s16 * _parts_f32(p3, not ASM, ASM)
        return a0, a1, a2, a3

    @triton.jit
    def _lean_store(Y, WS, CNT, a0, a1, a2, a3, pid_n, N: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr):
        """The warp rows' sums meet, then the program's BLOCK_N columns go out (split-K through the workspace)."""
        out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 128)[:, None] * 128 + tl.arange(0, 128)[None, :]
        _store_rows(Y, WS, CNT, tl.sum(a0, axis=0), tl.sum(a1, axis=0), tl.sum(a2, axis=0), tl.sum(a3, axis=0),
                    out, out < N, N, pid_n, BLOCK_M, SPLIT_K)

    @triton.jit
    def _lean_tile(N: tl.constexpr, BLOCK_N: tl.constexpr, RW: tl.constexpr, TR: tl.constexpr,
                   K_ITERS: tl.constexpr):
        """A lean GEMV program's tile: its column block (pid_n), its columns as (1, CH, 128) and which of them
        exist, and each warp row's first word row (RW,) of the program's first step."""
        pid_n = tl.program_id(0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 128)[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]
        row = tl.program_id(1) * (K_ITERS * RW * TR) + tl.arange(0, RW) * TR
        return pid_n, cols, cols < N, row

    @triton.jit
    def _int4_gemv_v2_kernel(X, Wp, S, Z, Y, WS, CNT, stride_xm, N: tl.constexpr, G: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RW: tl.constexpr, TR: tl.constexpr,
                             SPLIT_K: tl.constexpr, K_ITERS: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr):
        """y[m, n] = Σ_k x[m, k] · w[n, k] for BLOCK_M ≤ 4 tokens, the weight read once (see the section's note).

        Grid (N / BLOCK_N, SPLIT_K); K_ITERS steps of RW·TR word rows each. Warp row w takes word rows
        w·TR … w·TR + TR - 1 of a step (one group), in quads of 4, each thread 4·CH columns (CH = BLOCK_N / 128).
        PREFETCH (kernel "v2"): the next quad's words are loaded into registers before the current quad is
        multiplied. Without (kernel "v4"): a quad's words are loaded just before it is multiplied, and other warps
        hide the wait (fewer registers, more warps). Either way a barrier follows the loads: ptxas otherwise sinks
        each load to just before its first use (seen in the sm_90 SASS), which leaves nothing in flight."""
        CH: tl.constexpr = BLOCK_N // 128
        STEP: tl.constexpr = RW * TR
        MASKED: tl.constexpr = N % BLOCK_N != 0
        pid_n, cols, n_ok, row = _lean_tile(N, BLOCK_N, RW, TR, K_ITERS)  # row: each warp row's first word row
        wp = Wp + row[:, None, None] * N + cols
        sxm = stride_xm // 4
        a0 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        a1 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        a2 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        a3 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        if PREFETCH:
            w0, w1, w2, w3 = _quad_load(wp, N, n_ok, MASKED)
        for it in range(K_ITERS):
            s16, za, zb = _group_h2(S, Z, row, cols, n_ok, N, G)
            xp = X.to(tl.pointer_type(tl.int64)) + (row // 16 * 128 + row % 16) // 4  # nibble 0 of the row
            p0 = _parts_zero(RW, CH, not ASM)
            p1 = p0
            p2 = p0
            p3 = p0
            for q in tl.static_range(TR // 4):
                if not PREFETCH:
                    w0, w1, w2, w3 = _quad_load(wp + 4 * q * N, N, n_ok, MASKED)
                elif q + 1 < TR // 4:  # the next quad of this step, else the first quad of the next step
                    n0, n1, n2, n3 = _quad_load(wp + 4 * (q + 1) * N, N, n_ok, MASKED)
                else:
                    n0, n1, n2, n3 = _quad_load(wp + STEP * N, N, n_ok & (it + 1 < K_ITERS), True)
                xs = _quad_x(xp + q, sxm, BLOCK_M, not ASM)
                tl.debug_barrier()  # the loads above are issued here, not where their results are first needed
                p0, p1, p2, p3 = _quad_dot(w0, w1, w2, w3, xs, xp + q, sxm, za, zb, p0, p1, p2, p3, BLOCK_M, ASM,
                                           not ASM)
                if PREFETCH:
                    w0, w1, w2, w3 = n0, n1, n2, n3
            a0, a1, a2, a3 = _lean_accumulate(a0, a1, a2, a3, s16, p0, p1, p2, p3, BLOCK_M, ASM)
            wp += STEP * N
            row += STEP
        _lean_store(Y, WS, CNT, a0, a1, a2, a3, pid_n, N, BLOCK_N, BLOCK_M, SPLIT_K)

    @triton.jit
    def _int4_gemv_v3_kernel(X, Wp, S, Z, Y, WS, CNT, stride_xm, N: tl.constexpr, G: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RW: tl.constexpr, TR: tl.constexpr,
                             SPLIT_K: tl.constexpr, K_ITERS: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr):
        """``_int4_gemv_v2_kernel`` without its register prefetch: all loads of a step are written in the step,
        and Triton's software pipeliner (num_stages) turns them into cp.async copies to shared memory issued
        num_stages - 1 steps ahead; each 16 bytes is then read back from shared memory once."""
        CH: tl.constexpr = BLOCK_N // 128
        STEP: tl.constexpr = RW * TR
        MASKED: tl.constexpr = N % BLOCK_N != 0
        pid_n, cols, n_ok, row0 = _lean_tile(N, BLOCK_N, RW, TR, K_ITERS)
        sxm = stride_xm // 4
        a0 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        a1 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        a2 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        a3 = tl.zeros((RW, CH, 128), dtype=tl.float32)
        for it in tl.range(0, K_ITERS, num_stages=STAGES):
            row = row0 + it * STEP
            wp = Wp + row[:, None, None] * N + cols
            s16, za, zb = _group_h2(S, Z, row, cols, n_ok, N, G)
            xp = X.to(tl.pointer_type(tl.int64)) + (row // 16 * 128 + row % 16) // 4
            p0 = _parts_zero(RW, CH, not ASM)
            p1 = p0
            p2 = p0
            p3 = p0
            for q in tl.static_range(TR // 4):
                w0, w1, w2, w3 = _quad_load(wp + 4 * q * N, N, n_ok, MASKED)
                xs = _quad_x(xp + q, sxm, BLOCK_M, not ASM)
                p0, p1, p2, p3 = _quad_dot(w0, w1, w2, w3, xs, xp + q, sxm, za, zb, p0, p1, p2, p3, BLOCK_M, ASM,
                                           not ASM)
            a0, a1, a2, a3 = _lean_accumulate(a0, a1, a2, a3, s16, p0, p1, p2, p3, BLOCK_M, ASM)
        _lean_store(Y, WS, CNT, a0, a1, a2, a3, pid_n, N, BLOCK_N, BLOCK_M, SPLIT_K)

    @triton.jit
    def _v5_step(X, Wp, S, Z, wp, row, cols, n_ok, more, w, g, a, sxm, N: tl.constexpr, G: tl.constexpr,
                 BLOCK_M: tl.constexpr, RW: tl.constexpr, CH: tl.constexpr, TR: tl.constexpr, ASM: tl.constexpr):
        """One step of ``_int4_gemv_v5_kernel``: the next step's words and group are loaded (where ``more``),
        then this step's words w (8 tiles: quads A and B, B unused where TR = 4) and group g = (s16, za, zb) are
        multiplied into the accumulators a. Returns a, the next step's words and group."""
        STEP: tl.constexpr = RW * TR
        n0, n1, n2, n3 = _quad_load(wp + STEP * N, N, n_ok & more, True)
        n4, n5, n6, n7 = n0, n1, n2, n3
        if TR == 8:
            n4, n5, n6, n7 = _quad_load(wp + (STEP + 4) * N, N, n_ok & more, True)
        ng = _group_h2(S, Z, row + STEP, cols, n_ok & more, N, G)
        tl.debug_barrier()  # the loads above are issued here ...
        # ... and this step's inputs read after it, so that the products below cannot move above them
        xp = X.to(tl.pointer_type(tl.int64)) + (row // 16 * 128 + row % 16) // 4  # nibble 0 of the row
        s16, za, zb = g
        p0 = _parts_zero(RW, CH, not ASM)
        p1 = p0
        p2 = p0
        p3 = p0
        xs = _quad_x(xp, sxm, BLOCK_M, not ASM)
        p0, p1, p2, p3 = _quad_dot(w[0], w[1], w[2], w[3], xs, xp, sxm, za, zb, p0, p1, p2, p3, BLOCK_M, ASM,
                                   not ASM)
        if TR == 8:
            xs = _quad_x(xp + 1, sxm, BLOCK_M, not ASM)
            p0, p1, p2, p3 = _quad_dot(w[4], w[5], w[6], w[7], xs, xp + 1, sxm, za, zb, p0, p1, p2, p3, BLOCK_M,
                                       ASM, not ASM)
        a = _lean_accumulate(a[0], a[1], a[2], a[3], s16, p0, p1, p2, p3, BLOCK_M, ASM)
        return a, (n0, n1, n2, n3, n4, n5, n6, n7), ng

    @triton.jit
    def _int4_gemv_v5_kernel(X, Wp, S, Z, Y, WS, CNT, stride_xm, N: tl.constexpr, G: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RW: tl.constexpr, TR: tl.constexpr,
                             SPLIT_K: tl.constexpr, K_ITERS: tl.constexpr, ASM: tl.constexpr):
        """``_int4_gemv_v2_kernel`` with its prefetch a whole step ahead, and kept there (register double-buffering).

        Step it + 1's words (TR word rows a thread: one quad for TR = 4, two for TR = 8) and its scales and
        zeros are loaded into registers before step it is multiplied, so that TR·CH 128-bit loads a thread are
        in flight during a whole step's math. Why v2's prefetch does not do that: bar.sync orders memory
        operations only, and in its sm_90 SASS ptxas moves each quad's math (which reads registers only) above
        the barrier and above the next quad's loads, whose results are then needed ~50 instructions later.
        Here x is read after the barrier (``_v5_step``): the products depend on it, so the math stays below
        the loads of the next step. The loop takes two steps an iteration, so that the two register sets
        alternate (w → n → w) instead of being copied back at every step."""
        CH: tl.constexpr = BLOCK_N // 128
        STEP: tl.constexpr = RW * TR
        MASKED: tl.constexpr = N % BLOCK_N != 0
        tl.static_assert(TR == 4 or TR == 8, "v5 takes 4 or 8 word rows a thread and step")
        pid_n, cols, n_ok, row = _lean_tile(N, BLOCK_N, RW, TR, K_ITERS)
        wp = Wp + row[:, None, None] * N + cols
        sxm = stride_xm // 4
        z = tl.zeros((RW, CH, 128), dtype=tl.float32)
        a = (z, z, z, z)
        w0, w1, w2, w3 = _quad_load(wp, N, n_ok, MASKED)  # the first step's words and group
        w4, w5, w6, w7 = w0, w1, w2, w3
        if TR == 8:
            w4, w5, w6, w7 = _quad_load(wp + 4 * N, N, n_ok, MASKED)
        w = (w0, w1, w2, w3, w4, w5, w6, w7)
        g = _group_h2(S, Z, row, cols, n_ok, N, G)
        for it in range(0, K_ITERS - 1, 2):  # steps it (words w, loading n) and it + 1 (words n, loading w)
            a, n, ng = _v5_step(X, Wp, S, Z, wp, row, cols, n_ok, True, w, g, a, sxm, N, G, BLOCK_M, RW, CH, TR,
                                ASM)
            a, w, g = _v5_step(X, Wp, S, Z, wp + STEP * N, row + STEP, cols, n_ok, it + 2 < K_ITERS, n, ng, a,
                               sxm, N, G, BLOCK_M, RW, CH, TR, ASM)
            wp += 2 * STEP * N
            row += 2 * STEP
        if K_ITERS % 2 == 1:  # the last step of an odd number
            a, w, g = _v5_step(X, Wp, S, Z, wp, row, cols, n_ok, False, w, g, a, sxm, N, G, BLOCK_M, RW, CH, TR,
                               ASM)
        _lean_store(Y, WS, CNT, a[0], a[1], a[2], a[3], pid_n, N, BLOCK_N, BLOCK_M, SPLIT_K)

GEMV_LEAN_MAX_M = 4


@dataclass(frozen=True)
class Int4LeanConfig:
    """Tiles of the lean GEMVs: kernel "v2" (next quad prefetched into registers), "v3" (steps pipelined
    through shared memory by cp.async), "v4" (no prefetch: fewer registers, more warps) or "v5" (next step
    prefetched into registers, TR 4 or 8).

    A program owns BLOCK_N = 128·CH columns and K / SPLIT_K inputs, in steps of RW·TR word rows (8·RW·TR
    inputs). Its num_warps warps are RW warp rows (TR word rows each per step) × num_warps / RW warp columns;
    a thread holds TR·CH·RW / num_warps words of a step."""
    kernel: str
    BLOCK_N: int
    RW: int
    TR: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 1  # v3: the pipeline's depth (steps in flight + 1); v2 and v4 leave Triton's pipeliner off

    def __post_init__(self):
        if self.kernel not in ("v2", "v3", "v4", "v5"):
            raise ValueError(f"unknown lean GEMV {self.kernel!r}")
        if self.kernel == "v5" and self.TR not in (4, 8):
            raise ValueError(f"v5 takes TR 4 or 8 (one or two quads a step), got {self.TR}")
        if self.TR not in (4, 8, 16):
            raise ValueError(f"TR (word rows per thread and step) must be 4, 8 or 16, got {self.TR}")
        ch = self.BLOCK_N // 128
        if self.BLOCK_N % 128 or ch < 1 or ch & (ch - 1):
            raise ValueError(f"BLOCK_N must be 128 times a power of two, got {self.BLOCK_N}")
        if self.RW < 1 or self.num_warps % self.RW or ch % (self.num_warps // self.RW):
            raise ValueError(f"RW={self.RW} warp rows must divide num_warps={self.num_warps}, and the other "
                             f"warps must divide the {ch} column chunks of 128")

    def k_step(self) -> int:
        """Inputs a program consumes per step: K / SPLIT_K must be a multiple of it."""
        return 8 * self.RW * self.TR


def int4_lean_tiles(M: int = 1) -> list[Int4LeanConfig]:
    """The lean GEMVs' tiles (SPLIT_K 1) that ``int4_lean_candidates`` sweeps (sm_90 registers, instructions per
    weight: ``scripts/ch04_int4_sass.py --lean``). Two tokens and more take 128 columns and at most 8 rows a
    thread: each token adds 8 int64 of inputs a quad and a partial sum per column to the registers."""
    C = Int4LeanConfig
    tiles = [C("v2", 128, 4, 8), C("v2", 256, 4, 4), C("v4", 128, 4, 8), C("v4", 128, 4, 16),
             C("v3", 128, 4, 4, num_stages=3), C("v3", 128, 4, 8, num_stages=3),
             C("v5", 128, 4, 4), C("v5", 128, 4, 8), C("v5", 256, 4, 4)]
    if M == 1:
        return tiles
    return [c for c in tiles if c.BLOCK_N == 128 and c.TR < 16] + [C("v4", 128, 4, 4)]


def int4_lean_candidates(M: int, N: int, K: int, kernel: str | None = None) -> list[Int4LeanConfig]:
    """Each tile of ``int4_lean_tiles`` with the split-K that gives every program 1, 2 or 4 steps (where K allows
    it; one step leaves v3's pipeline and v5's prefetch nothing to overlap, so they take 2 and 4), if that makes
    at least one program per SM. What ``scripts/ch04_int4_probe.py`` times and ``scripts/ch04_int4_sass.py --lean`` compiles."""
    out = []
    for c in int4_lean_tiles(M):
        if (kernel is not None and c.kernel != kernel) or K % c.k_step():
            continue
        steps = K // c.k_step()
        for per in ((2, 4) if c.kernel in ("v3", "v5") else (1, 2, 4)):
            if steps % per == 0 and -(-N // c.BLOCK_N) * (steps // per) >= NUM_SMS:
                out.append(Int4LeanConfig(c.kernel, c.BLOCK_N, c.RW, c.TR, steps // per, c.num_warps, c.num_stages))
    return list(dict.fromkeys(out))


def int4_gemv_lean(x: torch.Tensor, w: Int4Weight, config: Int4LeanConfig) -> torch.Tensor:
    """y = x Wᵀ for 1 to 4 tokens with a lean GEMV (``_int4_gemv_v2_kernel``, ``_v3`` or ``_v5``) on the
    same Int4Weight as every kernel above. The products are in fp16 as in ``int4_gemv_h2``: same range caveat,
    each fp16 sum covers 4·TR products of at most |x| (here ≤ 64), so |x| must stay well below 65504 / (4·TR).
    Split-K calls share ``int4_matmul``'s workspace (one stream at a time)."""
    N, K = w.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if x.shape[-1] != K or not 1 <= M <= GEMV_LEAN_MAX_M or x.dtype != torch.bfloat16:
        raise ValueError(f"the lean GEMVs take 1 to {GEMV_LEAN_MAX_M} tokens of {K} bf16 features, "
                         f"got x of shape {tuple(x.shape)} and dtype {x.dtype}")
    c = config
    if K % (c.SPLIT_K * c.k_step()):
        raise ValueError(f"K={K} is not a multiple of SPLIT_K · {c.k_step()} = {c.SPLIT_K * c.k_step()}")
    if x2.stride(-1) != 1 or x2.stride(0) % 4 or x2.data_ptr() % 8:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # x is read 8 bytes (4 inputs) at a time
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    ws, cnt = _workspace(x.device, M * N, triton.cdiv(N, c.BLOCK_N)) if c.SPLIT_K > 1 else (y, y)
    kern, extra = ((_int4_gemv_v3_kernel, {"STAGES": c.num_stages}) if c.kernel == "v3"
                   else (_int4_gemv_v5_kernel, {}) if c.kernel == "v5"
                   else (_int4_gemv_v2_kernel, {"PREFETCH": c.kernel == "v2"}))
    kern[(triton.cdiv(N, c.BLOCK_N), c.SPLIT_K)](
        x2, w.packed, w.scale, w.zero, y, ws, cnt, x2.stride(0), N=N, G=w.group_size, BLOCK_M=M,
        BLOCK_N=c.BLOCK_N, RW=c.RW, TR=c.TR, SPLIT_K=c.SPLIT_K, K_ITERS=K // (c.SPLIT_K * c.k_step()), **extra,
        ASM=not INTERPRET, num_warps=c.num_warps, num_stages=c.num_stages)
    return y.reshape(*x.shape[:-1], N)

# ----------------------------------------------------------------------------------------------------
# 5a. A small GPT, trained by the chapter, whose weights are quantized (quality)
# ----------------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 tokens padded to a multiple of 64
    block_size: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """nanoGPT's model without biases in the linear layers; the embedding and the output layer are tied
    and, as in the GPTQ paper, never quantized: only the blocks' linear layers are."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def embed(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def quantizable(self):
        """(name, layer) for every linear layer inside the blocks."""
        return [(n, m) for n, m in self.blocks.named_modules() if isinstance(m, nn.Linear)]

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wte.weight.numel() + self.wpe.weight.numel() if non_embedding else 0)


def with_weights(model: GPT, fn) -> GPT:
    """A copy of ``model`` whose block linear weights are replaced by fn(weight) (e.g. RTN round trips)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for _, lin in out.quantizable():
            lin.weight.copy_(fn(lin.weight).to(lin.weight.dtype))
    return out


def fp8_simulated(model: GPT) -> GPT:
    """A copy of ``model`` computing every block linear layer as the FP8 tensor cores would: weights and
    (per token) inputs rounded through row-wise e4m3, products accumulated in fp32."""
    out = with_weights(model, fp8_fake_quant)
    for _, lin in out.quantizable():
        lin.register_forward_pre_hook(lambda mod, args: (fp8_fake_quant(args[0]),))
    return out


# The linear layers of a block in the order data reaches them: the IST-DASLab/gptq README's
# --true-sequential quantizes each group only after the groups before it, from inputs that have passed
# through them quantized (llama.py: [k, v, q], [o], [up, gate], [down]; here q, k, v are one layer).
SEQUENTIAL = [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]


@torch.no_grad()
def gptq_quantize_model(model: GPT, calib: torch.Tensor, bits: int, group_size: int, *, act_order: bool = False,
                        damp: float = 0.01, block_size: int = 128, chunk: int = 16, true_sequential: bool = True):
    """GPTQ over a whole model, block after block (the paper's §4 "sequential" setting): the calibration
    sequences run through the blocks already quantized, each linear layer's Hessian is collected from
    the inputs it actually receives, then its weights are replaced by their GPTQ round trip.

    ``true_sequential`` (the README's ``--true-sequential``) goes further inside a block: the layers are
    quantized group by group in the order of ``SEQUENTIAL``, and each group's Hessians are collected with
    the groups before it already quantized. Without it, all layers of a block take their Hessians from one
    pass of the unquantized block (the paper's original setting, opt.py)."""
    qmodel = copy.deepcopy(model).eval()
    x = torch.cat([qmodel.embed(c) for c in calib.split(chunk)])
    for block in qmodel.blocks:
        linear = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        for names in (SEQUENTIAL if true_sequential else [list(linear)]):
            acc = {n: HessianAccumulator(linear[n].in_features, x.device) for n in names}
            hooks = [linear[n].register_forward_hook(lambda mod, inp, out, a=acc[n]: a.add(inp[0])) for n in names]
            for xs in x.split(chunk):
                block(xs)
            for h in hooks:
                h.remove()
            for n in names:
                m = linear[n]
                qw = gptq(m.weight, acc[n].H, bits, group_size, block_size=block_size, damp=damp, act_order=act_order)
                m.weight.copy_(qw.dequantize().to(m.weight.dtype))
        x = torch.cat([block(xs) for xs in x.split(chunk)])  # the next block's inputs, through this one quantized
    return qmodel


# ----------------------------------------------------------------------------------------------------
# 5b. A decoder with Llama-3-8B's shapes and random weights (speed: weights' values do not matter)
# ----------------------------------------------------------------------------------------------------

@dataclass
class LlamaShape:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8  # grouped-query attention: k and v are 1024 wide
    hidden: int = 14336
    vocab: int = 128256

    @property
    def head_dim(self):
        return self.dim // self.n_heads


def block_linear_shapes(cfg: LlamaShape) -> dict[str, tuple[int, int]]:
    """(in_features K, out_features N) of each linear layer of one transformer block."""
    kv = cfg.n_kv_heads * cfg.head_dim
    return {"q": (cfg.dim, cfg.dim), "k": (cfg.dim, kv), "v": (cfg.dim, kv), "o": (cfg.dim, cfg.dim),
            "gate": (cfg.dim, cfg.hidden), "up": (cfg.dim, cfg.hidden), "down": (cfg.hidden, cfg.dim)}


class QLinear:
    """A linear layer stored in one of three formats: 'bf16', 'fp8' (row-wise e4m3, _scaled_mm) or
    'int4' (group-128 RTN, the chapter's kernel through ``int4_linear``)."""

    def __init__(self, w: torch.Tensor, fmt: str):
        self.fmt, self.out_features = fmt, w.shape[0]
        if fmt == "bf16":
            self.w = w
        elif fmt == "fp8":
            self.wq, ws = fp8_rowwise(w)
            self.ws = ws.t().contiguous()  # (1, N)
        elif fmt == "int4":
            self.w4 = Int4Weight.from_qweight(rtn(w, 4, 128))
        else:
            raise ValueError(f"unknown format {fmt!r}; use 'bf16', 'fp8' or 'int4'")

    def __call__(self, x):
        if self.fmt == "bf16":
            return F.linear(x, self.w)
        if self.fmt == "fp8":
            return fp8_linear(x, self.wq, self.ws)
        return int4_linear(x, self.w4)


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(X, R, Wn, Y, D, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
        """x += r (in place, the residual stream), y = x / rms(x) · w: one read of each row."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_R:
            x += tl.load(R + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(X + row * D + cols, x.to(X.dtype.element_ty), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(Wn + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, Y, H, BLOCK: tl.constexpr):
        """y = silu(gate) · up, reading the fused [gate | up] projection of one row."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        g = tl.load(GU + row * 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * H + H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * H + cols, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor | None = None, eps: float = 1e-5):
    """(x + r written back into x, rmsnorm(x + r) · w) for 2-D bf16 x."""
    y = torch.empty_like(x)
    D = x.shape[-1]
    _add_rmsnorm_kernel[(x.shape[0],)](x, r if r is not None else x, w, y, D, eps, HAS_R=r is not None,
                                       BLOCK=triton.next_power_of_2(D), num_warps=8)
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    M, H2 = gu.shape
    y = torch.empty(M, H2 // 2, device=gu.device, dtype=gu.dtype)
    _silu_mul_kernel[(M, triton.cdiv(H2 // 2, 4096))](gu, y, H2 // 2, BLOCK=4096, num_warps=8)
    return y


class SpeedLlama:
    """Llama-3-8B's decoder shapes with random weights, every linear layer in one format (q, k, v fused into
    one projection and gate, up into another, as serving stacks do; the output layer is quantized too).
    No rotary embedding: it is a few elementwise operations per token and does not touch the weights."""

    def __init__(self, cfg: LlamaShape, fmt: str, *, device="cuda", seed: int = 0, max_seq: int = 1024):
        self.cfg, self.fmt, self.max_seq = cfg, fmt, max_seq
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape):  # never zeros: a zero weight would quantize to a degenerate grid
            return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02

        d, kv, h = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden
        self.embed = rand(cfg.vocab, d)
        self.layers = []
        for _ in range(cfg.n_layers):
            self.layers.append(dict(qkv=QLinear(rand(d + 2 * kv, d), fmt), o=QLinear(rand(d, d), fmt),
                                    gate_up=QLinear(rand(2 * h, d), fmt), down=QLinear(rand(d, h), fmt),
                                    n1=torch.ones(d, device=device, dtype=torch.bfloat16),
                                    n2=torch.ones(d, device=device, dtype=torch.bfloat16)))
        self.norm = torch.ones(d, device=device, dtype=torch.bfloat16)
        self.head = QLinear(rand(cfg.vocab, d), fmt)
        shape = (cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=torch.bfloat16) for _ in range(cfg.n_layers)]
        self.v_cache = [torch.zeros(shape, device=device, dtype=torch.bfloat16) for _ in range(cfg.n_layers)]

    def _mlp(self, L, h):
        return L["down"](silu_mul(L["gate_up"](h)))

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of each sequence (B, T) -> (B, vocab): causal attention, no cache."""
        c = self.cfg
        B, T = tokens.shape
        x = self.embed[tokens.reshape(-1)]  # (B·T, d)
        kv = c.n_kv_heads * c.head_dim
        rep = c.n_heads // c.n_kv_heads
        r = None
        for L in self.layers:
            h = add_rmsnorm(x, L["n1"], r)
            q, k, v = L["qkv"](h).split([c.dim, kv, kv], dim=-1)
            q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
            k, v = (t.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2).repeat_interleave(rep, dim=1)
                    for t in (k, v))  # each k/v head serves `rep` query heads
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x_attn = L["o"](a.transpose(1, 2).reshape(B * T, c.dim))
            h = add_rmsnorm(x, L["n2"], x_attn)
            r = self._mlp(L, h)
        x = x.view(B, T, -1)[:, -1].contiguous()
        return self.head(add_rmsnorm(x, self.norm, r.view(B, T, -1)[:, -1].contiguous()))

    @torch.no_grad()
    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token (batch 1) at position ``pos`` (a 1-element tensor, so a CUDA graph can replay it)."""
        c = self.cfg
        kv = c.n_kv_heads * c.head_dim
        rep = c.n_heads // c.n_kv_heads
        x = self.embed[tok]  # (1, d)
        mask = torch.where(torch.arange(self.max_seq, device=tok.device) <= pos, 0.0, float("-inf"))
        r = None
        for i, L in enumerate(self.layers):
            h = add_rmsnorm(x, L["n1"], r)
            q, k, v = L["qkv"](h).split([c.dim, kv, kv], dim=-1)
            self.k_cache[i].index_copy_(1, pos, k.view(c.n_kv_heads, 1, c.head_dim))
            self.v_cache[i].index_copy_(1, pos, v.view(c.n_kv_heads, 1, c.head_dim))
            qh = q.view(c.n_kv_heads, rep, c.head_dim)  # the query heads that share one k/v head
            att = (qh @ self.k_cache[i].transpose(1, 2)).float() / math.sqrt(c.head_dim) + mask
            a = (att.softmax(-1).to(qh.dtype) @ self.v_cache[i]).reshape(1, c.dim)
            h = add_rmsnorm(x, L["n2"], L["o"](a))
            r = self._mlp(L, h)
        return self.head(add_rmsnorm(x, self.norm, r))


# ----------------------------------------------------------------------------------------------------
# 6. Measurement
# ----------------------------------------------------------------------------------------------------

class Budget:
    """The notebook's wall-clock budget (``budget_s``; 0 = none). A stage asks ``fits`` before it starts,
    with the seconds it expects to take and those that later stages must keep; what does not fit is skipped,
    named in ``skipped``, and its claims are recorded untested ("time budget"), so that the one GPU call still
    ends with a ledger."""

    def __init__(self, seconds: float, t0: float | None = None):
        import time

        self.seconds, self.t0, self.skipped = float(seconds), time.time() if t0 is None else t0, []

    def elapsed(self) -> float:
        import time

        return time.time() - self.t0

    def left(self) -> float:
        return float("inf") if not self.seconds else self.seconds - self.elapsed()

    def fits(self, expected_s: float, what: str, *, reserve_s: float = 0.0) -> bool:
        ok = expected_s + reserve_s <= self.left()
        if not ok:
            self.skipped.append(what)
            print(f"time budget: {what} skipped (expects {expected_s:.0f} s, keeps {reserve_s:.0f} s for later "
                  f"stages, {self.left():.0f} s of budget_s = {self.seconds:.0f} left)")
        return ok

    def mark(self, section: str) -> None:
        print(f"[{self.elapsed():5.0f} s] {section}")


def compact_vocab(train: torch.Tensor, size: int):
    """Map GPT-2 tokens to ``size`` ids: the size - 1 most frequent training tokens keep an id of their own,
    every other token shares the last one. The smoke profile uses it so that a CPU can train a model."""
    counts = torch.bincount(train, minlength=50257)
    keep = torch.argsort(counts, descending=True)[: size - 1]
    table = torch.full((50257,), size - 1, dtype=torch.long)
    table[keep] = torch.arange(size - 1)
    return table


def train_gpt(model: GPT, tokens, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
              device, weight_decay: float = 0.1, progress=None):
    """AdamW, linear warm-up then cosine decay to lr/10, bf16 autocast on a GPU; returns the losses."""
    from repro_utils.data import batch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=str(device).startswith("cuda"))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    cuda = str(device).startswith("cuda")
    losses = []  # (step, loss) every 10 steps: reading a loss waits for the GPU
    model.train()
    it = progress(range(steps)) if progress else range(steps)
    for step in it:
        frac = step / max(1, steps - 1)
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        x, y = batch(tokens, batch_size, seq_len, generator=gen, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            losses.append((step, loss.item()))
    model.eval()
    return losses


@contextmanager
def fp32_matmuls():
    """TF32 off for CUDA matmuls inside (perplexities here are fp32 arithmetic; the GPTQ repository turns it off as well); restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@torch.no_grad()
def token_losses(model: GPT, tokens, starts, *, seq_len: int, batch_size: int = 16, device="cpu") -> torch.Tensor:
    """Next-token loss (nats) of every predicted token of the windows of seq_len + 1 tokens at ``starts``:
    shape (len(starts), seq_len), in fp32 arithmetic (no TF32), on the CPU. Perplexity over any subset of
    windows or tokens (one source, one replicate's share) is exp of the mean of its entries."""
    from repro_utils.data import windows

    out = []
    with fp32_matmuls():
        model.eval()
        for i in range(0, len(starts), batch_size):
            x, y = windows(tokens, starts[i:i + batch_size], seq_len, device=device)
            logits = model(x).float()
            out.append(F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
                       .view(y.shape).cpu())
    return torch.cat(out)


def perplexity_by_source(losses: torch.Tensor, source: torch.Tensor, names: list[str]) -> dict[str, float]:
    """exp(mean loss) over all tokens, then per source (``source`` holds each loss's source index)."""
    out = {"all": math.exp(losses.mean().item())}
    for i, name in enumerate(names):
        sel = losses[source == i]
        if sel.numel():
            out[name] = math.exp(sel.mean().item())
    return out


def layer_output_error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ||² / ||X Wᵀ||²: the quantity GPTQ minimises, relative to the output's size."""
    ref = X @ W.t()
    return ((X @ W_hat.t() - ref).pow(2).sum() / ref.pow(2).sum()).item()


def measure_ceilings(device="cuda", n: int = 8192):
    """What this GPU does: copy bandwidth (bytes read + written per second), bf16 and fp8 matmul rates."""
    from repro_utils.bench import time_fn

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(partial(dst.copy_, src)).ms
    src = dst = None
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_bf16 = time_fn(partial(torch.matmul, x, y)).ms
    xq, xs = fp8_rowwise(x)
    yq, ys = fp8_rowwise(y)
    t_fp8 = time_fn(partial(torch._scaled_mm, xq, yq.t(), scale_a=xs, scale_b=ys.t().contiguous(),
                            out_dtype=torch.bfloat16, use_fast_accum=True)).ms
    flops = 2 * n**3
    return {"copy_GBps": 2 * 2**30 / t_copy / 1e6, "bf16_TFLOPs": flops / t_bf16 / 1e9,
            "fp8_TFLOPs": flops / t_fp8 / 1e9, "n": n}


if triton is not None:

    @triton.jit
    def _read_kernel(A, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        """Read n int32 words once (grid-stride, BLOCK words a step) and write one word per program."""
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.int32)
        for it in tl.range(0, ITERS, num_stages=3):
            idx = (it * tl.num_programs(0) + pid) * BLOCK + offs
            acc ^= tl.load(A + idx, mask=idx < n, other=0, eviction_policy="evict_first")
        tl.store(OUT + pid, tl.xor_sum(acc, axis=0))


def read_floor(nbytes: int, *, device="cuda", seed: int = 0) -> dict:
    """The floor under any kernel that must read ``nbytes`` once, timed as bench_linears times a layer (CUDA-graph
    replays, L2 flushed): the fastest of a sweep of grids (programs per SM, words per step, warps) of a Triton
    kernel that reads the bytes and computes nothing; the same kernel on 16 KB (the fixed cost of one graphed
    kernel under this timer); and, for scale, cuBLAS's bf16 GEMV (M = 1) on a weight of as many bytes."""
    from repro_utils.bench import time_fn

    g = torch.Generator(device=device).manual_seed(seed)
    words = torch.randint(-2**31, 2**31 - 1, (-(-nbytes // 4),), device=device, dtype=torch.int32, generator=g)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    sink = torch.empty(64 * sms, device=device, dtype=torch.int32)

    def read(w, programs, block, warps):
        _read_kernel[(programs,)](w, sink, w.numel(), BLOCK=block, ITERS=-(-w.numel() // (programs * block)),
                                  num_warps=warps)

    def timed(fn, *args):
        return time_fn(partial(fn, *args), warmup=10, rep=40, graph=True).ms

    grids = {(p * sms, b, w): timed(read, words, p * sms, b, w)
             for p in (4, 8, 16, 32, 64) for b in (1024, 2048, 4096) for w in (4, 8)}
    (programs, block, warps), ms = min(grids.items(), key=lambda kv: kv[1])
    W = torch.randn(nbytes // 2 // 4096, 4096, generator=g, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, generator=g, device=device, dtype=torch.bfloat16)
    return {"bytes": 4 * words.numel(), "ms": ms, "GBps": 4 * words.numel() / ms / 1e6,
            "grid": {"programs": programs, "block": block, "warps": warps}, "grids_tried": len(grids),
            "ms_16KB": timed(read, words[:4096], 1, 4096, 4), "ms_cublas_bf16_gemv": timed(F.linear, x, W)}


def linear_bytes(M: int, K: int, N: int, fmt: str, group_size: int = 128) -> float:
    """Bytes a linear layer must move at least: weights once, bf16 activations in and out."""
    weight = {"bf16": 2 * N * K, "fp8": N * K + 4 * N,
              "int4": N * K / 2 + 3 * N * K / group_size}[fmt]  # int4: bf16 scale + uint8 zero per group
    return weight + 2 * M * K + 2 * M * N


def bench_linears(shapes: dict[str, tuple[int, int]], token_counts: list[int], *, device="cuda", seed: int = 0,
                  kernel_max_m: int = 256, tinygemm_max_m: int = 1024, progress=None):
    """Median time of each linear shape at each token count M, per method (same run, same inputs):
    bf16 (cuBLAS), fp8 (row-wise, activation quantization included), int4 kernel, int4 dispatch, tinygemm.

    Every call is captured once in a CUDA graph and its replays are timed, L2 flushed before each, as a
    serving stack replays decode steps: launched eagerly from Python, a layer of a few microseconds is
    timed at the speed of the host's launch path, not of the GPU (the first run of this sweep measured
    the same INT4 kernel at 22 µs in one cell and 44 µs in the next)."""
    from repro_utils.bench import time_fn

    def timed(fn, *args):
        return time_fn(partial(fn, *args), warmup=10, rep=40, graph=True).ms

    rows = []
    g = torch.Generator(device=device).manual_seed(seed)
    todo = [(name, K, N, M) for name, (K, N) in shapes.items() for M in token_counts]
    weights = {}
    for name, K, N, M in (progress(todo) if progress else todo):
        if (K, N) not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            W = torch.randn(N, K, generator=g, device=device, dtype=torch.bfloat16) * 0.02
            qw = rtn(W, 4, 128)
            wq, ws = fp8_rowwise(W)
            weights[(K, N)] = (W, Int4Weight.from_qweight(qw), tinygemm_pack(qw), wq, ws.t().contiguous())
        W, w4, (tg, sz), wq, ws = weights[(K, N)]
        x = torch.randn(M, K, generator=g, device=device, dtype=torch.bfloat16)
        t = {"bf16": timed(F.linear, x, W), "fp8": timed(fp8_linear, x, wq, ws),
             "int4_dispatch": timed(int4_linear, x, w4)}
        if M <= kernel_max_m:
            try:
                t["int4_kernel"] = timed(int4_matmul, x, w4)
            except Exception as e:  # noqa: BLE001 - reported and left out of the table, not fatal
                print(f"int4 kernel failed at {name}, M={M}: {type(e).__name__}: {str(e)[:200]}")
        if M <= tinygemm_max_m:
            t["tinygemm"] = timed(tinygemm_linear, x, tg, sz, 128)
        rows.append({"layer": name, "K": K, "N": N, "M": M, **{f"ms_{k}": v for k, v in t.items()}})
    return rows


def linear_set(layers: list[tuple[int, int, int]], M: int, methods=("bf16", "int4_kernel"), *, device="cuda",
               seed: int = 0) -> dict:
    """For each method, one callable that runs ``count`` layers of each shape (K, N, count) of ``layers`` at M
    tokens, each layer with weights of its own (prepared once): a set of layers (the MLP, a block) timed as one
    unit, so that ``repro_utils.bench.ratios`` gives one speed-up per repeated timing (the replicates of a speed
    claim). Never the same weight twice in one call: a 30 MB INT4 weight read a second time would come from the
    50 MB L2 cache, which the timer flushes only before each call, and the INT4 figure would flatter itself."""
    g = torch.Generator(device=device).manual_seed(seed)
    per = {m: [] for m in methods}
    for K, N, count in layers:
        for _ in range(count):
            W = torch.randn(N, K, generator=g, device=device, dtype=torch.bfloat16) * 0.02
            x = torch.randn(M, K, generator=g, device=device, dtype=torch.bfloat16)
            qw = rtn(W, 4, 128) if {"int4_kernel", "tinygemm"} & set(methods) else None
            for m in methods:
                if m == "bf16":
                    fn = partial(F.linear, x, W)
                elif m == "fp8":
                    wq, ws = fp8_rowwise(W)
                    fn = partial(fp8_linear, x, wq, ws.t().contiguous())
                elif m == "int4_kernel":
                    fn = partial(int4_matmul, x, Int4Weight.from_qweight(qw))
                elif m == "tinygemm":
                    tg, sz = tinygemm_pack(qw)
                    fn = partial(tinygemm_linear, x, tg, sz, 128)
                else:
                    raise ValueError(f"unknown method {m!r}")
                per[m].append(fn)

    def runner(fns):
        def run_all():
            for fn in fns:
                fn()
        return run_all

    return {m: runner(fns) for m, fns in per.items()}


def time_decode(model: SpeedLlama, steps: int, pos: int = 512) -> float:
    """Milliseconds per decoded token (batch 1), one CUDA graph per step replayed ``steps`` times."""
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    p = torch.full((1,), pos, dtype=torch.long, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
            model.decode_step(tok, p)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.decode_step(tok, p)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / steps


def time_prefill(model: SpeedLlama, batch: int, seq: int, reps: int = 3) -> float:
    """Milliseconds for one prefill of ``batch`` sequences of ``seq`` tokens (median of ``reps``)."""
    tokens = torch.randint(0, model.cfg.vocab, (batch, seq), device="cuda")
    model.prefill(tokens)  # warm-up
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.prefill(tokens)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------
# 7. GPTQ's own table: a Hugging Face decoder (OPT-125M on WikiText-2, calibrated on C4), full profile, online
# ----------------------------------------------------------------------------------------------------
# The setting of the paper's Table 3 (Frantar et al. 2023, §5 "Setup" and Appendix A.2.1) as the IST-DASLab/gptq
# repository runs it (opt.py, datautils.py): 128 segments of 2048 tokens drawn from C4's first training shard,
# perplexity on WikiText-2's test split. The files, as the Hugging Face hub holds them: (dataset repository, path).
HUB_FILES = {
    "wikitext2-test": ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet"),
    "c4-train-00000": ("allenai/c4", "en/c4-train.00000-of-01024.json.gz"),
}


class HubUnavailable(RuntimeError):
    """A model or data file that is neither under $REPRO_DATA_DIR/hub nor reachable on the Hugging Face hub."""


def _hub_local(what: str, local_path: str, present) -> Path | None:
    """Where the offline path reads ``what`` (``$REPRO_DATA_DIR/<local_path>``) when REPRO_DATA_DIR is set, None when
    the hub answers instead. Neither, or REPRO_DATA_DIR set without it (``present`` is False): HubUnavailable."""
    from repro_utils import data

    local = data.local_dir()
    if local is not None:
        f = local / local_path
        if not present(f):
            raise HubUnavailable(f"REPRO_DATA_DIR={local} holds no {local_path}, and nothing is downloaded while "
                                 "REPRO_DATA_DIR is set")
        return f
    if not data.online():
        raise HubUnavailable(f"no network: {what} cannot be downloaded from the Hugging Face hub, and REPRO_DATA_DIR "
                             "(where a copy could be read) is not set")
    return None


def hub_file(repo: str, filename: str) -> Path:
    """A file of a Hugging Face dataset repository. With REPRO_DATA_DIR set it is read from
    ``$REPRO_DATA_DIR/hub/<repo>/<filename>`` and nothing is downloaded (the offline path); otherwise
    huggingface_hub downloads it when the hub answers. Neither: HubUnavailable, saying what is missing."""
    f = _hub_local(f"{repo}/{filename}", f"hub/{repo}/{filename}", Path.is_file)
    if f is not None:
        return f
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, repo_type="dataset"))


def hub_model(repo: str) -> str:
    """Where ``from_pretrained`` finds a model: ``$REPRO_DATA_DIR/hub/<repo>/`` (a saved copy) when REPRO_DATA_DIR is
    set, else the hub's repository id when the hub answers. Neither: HubUnavailable."""
    d = _hub_local(repo, f"hub/{repo}/", lambda d: (d / "config.json").is_file())
    return repo if d is None else str(d)


def load_causal_lm(name: str, device="cpu"):
    """(model, tokenizer) of a Hugging Face causal LM, its weights in float32 (OPT-125M's checkpoint is float16, so
    the 16-bit model exactly), in evaluation mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = hub_model(name)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    return model.float().eval().to(device), AutoTokenizer.from_pretrained(where)


def wikitext2_test_ids(tokenizer, texts=None) -> torch.Tensor:
    """WikiText-2's test split (``wikitext-2-raw-v1``) as the GPTQ repository evaluates it: its rows joined with
    blank lines into one text, tokenized once by the model's tokenizer (OPT's puts its ``</s>`` first). ``texts``
    defaults to the split itself, read through ``datasets``. Returns the token ids, 1-D."""
    if texts is None:
        import datasets

        f = hub_file(*HUB_FILES["wikitext2-test"])
        texts = datasets.load_dataset("parquet", data_files={"test": str(f)}, split="test")["text"]
    return torch.tensor(tokenizer("\n\n".join(texts))["input_ids"], dtype=torch.long)


class TextColumn:
    """``texts[i]``, one row's text of a ``datasets.Dataset``, without reading the whole column into memory."""

    def __init__(self, ds, key: str = "text"):
        self.ds, self.key = ds, key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:
        return self.ds[i][self.key]


def c4_train_texts() -> TextColumn:
    """The documents of C4's first English training shard (``en/c4-train.00000-of-01024``), which GPTQ's
    calibration draws from, through ``datasets``."""
    import datasets

    f = hub_file(*HUB_FILES["c4-train-00000"])
    return TextColumn(datasets.load_dataset("json", data_files={"train": str(f)}, split="train"))


def c4_calibration(texts, tokenizer, n: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """GPTQ's calibration draw, "128 random 2048 token segments from the C4 dataset" (§5), made as the repository's
    datautils makes it: Python's ``random`` seeded once with ``seed``; for each segment, a document drawn
    uniformly (with replacement), drawn again while it is not longer than ``seqlen`` tokens, then a window of
    ``seqlen`` consecutive tokens starting uniformly in it (never its last token). The draws follow the same
    random sequence, so ``seed=0`` (opt.py's default) picks the repository's segments. Returns (n, seqlen) ids."""
    import random

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ids = tokenizer(texts[rng.randint(0, len(texts) - 1)])["input_ids"]
        if len(ids) <= seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(torch.tensor(ids[start:start + seqlen], dtype=torch.long))
    return torch.stack(out)


def eval_windows(ids: torch.Tensor, seqlen: int = 2048) -> torch.Tensor:
    """The evaluation windows of Appendix A.2.1 (opt.py's ``opt_eval``): the token stream cut into consecutive,
    non-overlapping windows of ``seqlen`` tokens, the tail shorter than a window left out. (n, seqlen)."""
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens make no window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, *, batch_size: int = 2) -> float:
    """exp of the mean next-token loss over all windows. Each window is run alone, with no context from the one
    before it, and its first token is not predicted: seqlen - 1 losses a window, every window weighted alike
    (opt.py's exp(Σ nll / (n · seqlen)) with nll = mean loss · seqlen is the same number). fp32, TF32 off."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with fp32_matmuls():
        model.eval()
        for x in windows.split(batch_size):
            x = x.to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def decoder_blocks(model) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM: ``model.model.decoder.layers`` (OPT), else
    ``model.model.layers`` (Llama and most others)."""
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer inside one block, by name (OPT: ``self_attn.{k,v,q,out}_proj``, ``fc1``, ``fc2``)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


class _Stop(Exception):
    """Raised by ``block_inputs``' hook: block 0's input is known, the rest of the forward pass is not needed."""


@torch.no_grad()
def block_inputs(model, calib: torch.Tensor, chunk: int = 8) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Block 0's input for each chunk of calibration sequences, with the other arguments the model passes its blocks
    (positions, attention mask): the model computes its embeddings itself and is stopped at block 0 by a pre-hook,
    as opt.py's ``Catcher`` stops it. The same arguments then serve every block."""
    device = next(model.parameters()).device
    got = []

    def catch(mod, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        got.append((x, tuple(args[1:]), kwargs))
        raise _Stop

    hook = decoder_blocks(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for c in calib.split(chunk):
            try:
                model(input_ids=c.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        hook.remove()
    return got


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out  # a block returns a tuple in transformers 4, a tensor in 5


@torch.no_grad()
def gptq_quantize_decoder(model, calib: torch.Tensor, bits: int, group_size: int = -1, *, damp: float = 0.01,
                          act_order: bool = False, block_size: int = 128, chunk: int = 8):
    """GPTQ over a Hugging Face decoder, block after block, as the GPTQ repository's opt.py quantizes OPT: the
    calibration sequences reach block i through blocks 0 … i-1 already quantized; one pass through block i, still
    in full precision, gives each linear layer inside it its Hessian from the inputs it actually receives; every
    weight is replaced by its GPTQ round trip (``gptq``; one grid per row with group_size=-1); a second pass, through
    the quantized block, gives block i + 1 its inputs. Inside a block all Hessians come from that one pass (opt.py
    has no ``--true-sequential``). Returns the quantized copy and, per layer, how many of its inputs never fired
    (a zero on the Hessian's diagonal)."""
    qmodel = copy.deepcopy(model).eval()
    dead = {}
    with fp32_matmuls():
        xs = block_inputs(qmodel, calib, chunk)
        for i, block in enumerate(decoder_blocks(qmodel)):
            linear = block_linears(block)
            acc = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in linear.items()}
            hooks = [m.register_forward_hook(lambda mod, inp, out, a=acc[n]: a.add(inp[0])) for n, m in linear.items()]
            try:
                for x, args, kwargs in xs:
                    block(x, *args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            for n, m in linear.items():
                qw = gptq(m.weight, acc[n].H, bits, group_size, block_size=block_size, damp=damp, act_order=act_order)
                m.weight.copy_(qw.dequantize().to(m.weight.dtype))
                dead[f"{i}.{n}"] = int((acc[n].H.diagonal() == 0).sum())
            xs = [(_hidden(block(x, *args, **kwargs)), args, kwargs) for x, args, kwargs in xs]
    return qmodel, dead


@torch.no_grad()
def rtn_decoder(model, bits: int, group_size: int = -1):
    """Round-to-nearest of every linear layer inside the decoder blocks, on a copy (opt.py's ``--nearest``: one
    asymmetric min-max grid per row); the embeddings and the output layer stay as they are."""
    qmodel = copy.deepcopy(model).eval()
    for block in decoder_blocks(qmodel):
        for m in block_linears(block).values():
            m.weight.copy_(rtn(m.weight.float(), bits, group_size).dequantize().to(m.weight.dtype))
    return qmodel
