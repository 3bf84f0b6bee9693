"""The chapter's forward kernel, rewritten for Hopper (sm_90), and an FP8 forward beside it (issue 20).

The studied kernel (flash_kernels.py) stays as the chapter teaches it. This file changes three things,
each of which the device probe (scripts/ch03_hopper_probe.py) times on its own against the studied
kernel and against PyTorch SDPA's FlashAttention-2 and cuDNN backends in the same run:

1. **Tensor descriptors (TMA) for the loads.** `tl.make_tensor_descriptor` describes each (B*H, N, D)
   tensor once; on sm_90 a load through it is one TMA bulk copy into shared memory, issued without any
   per-element address arithmetic in registers, and rows past N come back as zeros (stores past N are
   dropped). The studied kernel's block pointers compute addresses per thread. The descriptor is 3-D
   (head, row, column), so a tile never reads into the next head's rows and any N works.
2. **Head dim 256** (forward only): the FP8 figures of FlashAttention-3 (Fig. 7) are at d = 256.
3. **Optional warp specialization**: `tl.range(..., warp_specialize=True)` asks Triton to split the loop
   into producer warps (the loads) and consumer warps (the matmuls and the softmax), the structure of
   FlashAttention-3 §3.1. Compiled for sm_90 on the CPU (scripts/ch03_hopper_sass.py), Triton 3.6 ignores
   it at 8 warps (the SASS is identical) and fails to compile it at 4; the default is off.

**FP8 forward** (FlashAttention-3 §3.3): Q and K are quantized to float8 e4m3 with one scale per block of
`QUANT_BLOCK` rows of each head ("block quantization"), V with one scale per head; S = Q K^T is computed
from the FP8 operands with fp32 accumulation and dequantized by the two blocks' scales; P (in [0, 1])
is multiplied by 2^8 before its cast to e4m3 so that small probabilities keep their mantissa (an exact
power-of-two scale, removed after P V; `p_scale=1` casts P as it is, to measure what this choice buys); the row sums l_i use the fp32 P. "Incoherent processing"
multiplies Q and K by one random orthogonal matrix M = H diag(s) / sqrt(d) (H a Hadamard matrix, s random
signs) before quantizing: (QM)(KM)^T = QK^T, but an outlier feature is spread over all d coordinates, so
the per-block scale is no longer set by it. Here M is applied in PyTorch before the kernel (FA3 fuses it
with rotary embeddings); the probe reports its cost separately. V is stored transposed, (B*H, D, N), so
the second FP8 matmul reads it K-major, as sm_90's FP8 tensor cores require.

`fp8_reference` computes the same quantized attention in PyTorch (float64 after quantization), and
`fp8_baseline` the baseline of FA3 Table 3 as its text describes it: per-tensor scales, fp32 matmul
accumulation, the softmax output kept in fp16 (then cast to e4m3 for P V, since both operands of an FP8
matmul are FP8; the paper does not say how its baseline forms P V: our reading).

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton is
first imported; CPU tensors). The forwards have no backward of their own; `flash_backward_fused` (exercise 1)
is the studied backward with dQ added by atomics, FA2 Algorithm 2 line 15, so that one kernel does all of it.
"""

from __future__ import annotations

import math

import flash_kernels as fk
import torch
import triton
import triton.language as tl

HOPPER_HEAD_DIMS = (64, 128, 256)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
P_SCALE = 256.0  # P in [0, 1] -> [0, 256] before its cast to e4m3 (max 448); 1.0 casts P as it is
QUANT_BLOCK = 64  # rows of Q and of K that share one FP8 scale


def tma_configs(head_dim: int) -> list[triton.Config]:
    """Tile candidates. At d = 256 a 128 x 128 tile of Q plus two K/V stages do not fit 228 KB of shared
    memory, so the key blocks are narrower; autotuning drops any candidate that fails to compile."""
    if fk.interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if head_dim == 256:  # compiled for sm_90 (scripts/ch03_hopper_sass.py), 8 warps: no candidate spills in either
        # dtype (the FP8 kernel did at 128-row tiles until PV accumulated in place; 4-warp tiles, left out, did)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2))]
    # 128-row tiles over 4 warps spill at d = 128 (255 registers), as in the studied kernel: left out
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3))]


def _prune(configs, named_args, **kwargs):
    """The candidates of this head dim. With warp specialization asked for, 8-warp tiles only: at 4 warps
    Triton 3.6 fails to compile it for sm_90 ("PassManager::run failed"; scripts/ch03_hopper_sass.py)."""
    head_dim = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
    keep = [c for c in tma_configs(head_dim) if any(c.all_kwargs() == d.all_kwargs() for d in configs)]
    if kwargs.get("WARP_SPECIALIZE") and not fk.interpreting():
        keep = [c for c in keep if c.num_warps == 8]
    return keep or configs


def _all_configs() -> list[triton.Config]:
    seen, out = set(), []
    for d in HOPPER_HEAD_DIMS:
        for c in tma_configs(d):
            key = str(sorted(c.all_kwargs().items()))
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


@triton.jit
def _tma_inner(acc, l_i, m_i, q, q_scale, k_desc, v_desc, k_scales, off_hz, offs_m, lo, hi,
               qk_scale, N_CTX, CAUSAL: tl.constexpr, MASKED: tl.constexpr, IS_FP8: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, QBLOCK: tl.constexpr, PSCALE: tl.constexpr,
               WARP_SPECIALIZE: tl.constexpr):
    """The online softmax over key blocks [lo, hi), as flash_kernels._fwd_inner, with loads through
    tensor descriptors. Rows past N_CTX arrive as zeros, so only MASKED blocks need the -inf mask."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([off_hz, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k))  # fp32; for FP8 operands, in units of the two blocks' scales
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if IS_FP8:  # dequantize S: one scale per query row block times one per key row block
            if QBLOCK % BLOCK_N == 0:  # the key block lies inside one scale block: one scalar, not BLOCK_N loads
                s = s * (q_scale * tl.load(k_scales + start_n // QBLOCK))[:, None]
            else:
                k_scale = tl.load(k_scales + offs_n // QBLOCK, mask=offs_n < N_CTX, other=0.0)
                s = s * q_scale[:, None] * k_scale[None, :]
        if MASKED:
            keep = offs_n[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # from the fp32 P, before any rounding to FP8
        if IS_FP8:  # V^T block (D, BLOCK_N): its transpose is K-major, as an FP8 matmul needs on sm_90
            vt = v_desc.load([off_hz, 0, start_n]).reshape(HEAD_DIM, BLOCK_N)
            # acc stays in units of PSCALE / v_scale (both constant for the head): the tensor cores accumulate
            # in place, and the epilogue multiplies by v_scale / PSCALE once
            acc = tl.dot((p * PSCALE).to(vt.dtype), tl.trans(vt), acc * alpha[:, None])
        else:
            v = v_desc.load([off_hz, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_all_configs(), key=["N_CTX", "HEAD_DIM", "CAUSAL", "IS_FP8", "WARP_SPECIALIZE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd_tma(Q, K, V, O, L, Q_SCALE, K_SCALE, V_SCALE, sm_scale, N_CTX, BH, V_STRIDE,  # noqa: E741
                  HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, IS_FP8: tl.constexpr,
                  WARP_SPECIALIZE: tl.constexpr, QBLOCK: tl.constexpr, PSCALE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - start_m
    off_hz = tl.program_id(1)
    # One descriptor per tensor, 3-D (head, row, column): a tile never crosses into the next head.
    q_desc = tl.make_tensor_descriptor(Q, shape=[BH, N_CTX, HEAD_DIM], strides=[N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                       block_shape=[1, BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=[BH, N_CTX, HEAD_DIM], strides=[N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                       block_shape=[1, BLOCK_N, HEAD_DIM])
    if IS_FP8:  # V^T, (BH, D, N) with rows padded to V_STRIDE (TMA strides are multiples of 16 bytes)
        v_desc = tl.make_tensor_descriptor(V, shape=[BH, HEAD_DIM, N_CTX], strides=[HEAD_DIM * V_STRIDE, V_STRIDE, 1],
                                           block_shape=[1, HEAD_DIM, BLOCK_N])
    else:
        v_desc = tl.make_tensor_descriptor(V, shape=[BH, N_CTX, HEAD_DIM], strides=[N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                           block_shape=[1, BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(O, shape=[BH, N_CTX, HEAD_DIM], strides=[N_CTX * HEAD_DIM, HEAD_DIM, 1],
                                       block_shape=[1, BLOCK_M, HEAD_DIM])
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * fk.LOG2E
    q = q_desc.load([off_hz, start_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    if IS_FP8:
        q_scale = tl.load(Q_SCALE + off_hz.to(tl.int64) * tl.cdiv(N_CTX, QBLOCK) + offs_m // QBLOCK,
                          mask=offs_m < N_CTX, other=0.0)
        v_scale = tl.load(V_SCALE + off_hz)
        k_scales = K_SCALE + off_hz.to(tl.int64) * tl.cdiv(N_CTX, QBLOCK)  # this head's key-block scales
    else:
        q_scale = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused
        v_scale = 1.0
        k_scales = K_SCALE  # unused
    if CAUSAL:
        full_hi = start_m * BLOCK_M
        hi = tl.minimum((start_m + 1) * BLOCK_M, N_CTX)
    else:
        full_hi = (N_CTX // BLOCK_N) * BLOCK_N
        hi = N_CTX
    acc, l_i, m_i = _tma_inner(acc, l_i, m_i, q, q_scale, k_desc, v_desc, k_scales, off_hz, offs_m,
                               0, full_hi, qk_scale, N_CTX, CAUSAL, False, IS_FP8, HEAD_DIM, BLOCK_N, QBLOCK,
                               PSCALE, WARP_SPECIALIZE)
    acc, l_i, m_i = _tma_inner(acc, l_i, m_i, q, q_scale, k_desc, v_desc, k_scales, off_hz, offs_m,
                               full_hi, hi, qk_scale, N_CTX, CAUSAL, True, IS_FP8, HEAD_DIM, BLOCK_N, QBLOCK,
                               PSCALE, False)
    if IS_FP8:
        acc = acc * (v_scale / PSCALE)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / fk.LOG2E
    tl.store(L + off_hz.to(tl.int64) * N_CTX + offs_m, lse, mask=offs_m < N_CTX)
    o_desc.store([off_hz, start_m * BLOCK_M, 0], acc.to(O.dtype.element_ty).reshape(1, BLOCK_M, HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _set_allocator(device: torch.device) -> None:
    """Tensor descriptors made inside a kernel need a little global scratch per program on the GPU."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(alloc)


def check_inputs(q, k, v, causal=False, sm_scale=None) -> float:
    """The studied kernel's checks (fk.check_inputs), with head dim 256 added. Returns the softmax scale."""
    if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] == 256:
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.shape == v.shape == q.shape):
            raise fk.UnsupportedInput(f"q, k, v must have one shape (self-attention); got {tuple(q.shape)}, "
                                      f"{getattr(k, 'shape', None)}, {getattr(v, 'shape', None)}")
        sm_scale = 1.0 / math.sqrt(256) if sm_scale is None else sm_scale
        # every other check is independent of the head dim: run them on 128-wide views (no copy)
        return fk.check_inputs(q[..., :128], k[..., :128], v[..., :128], causal, sm_scale)
    if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] not in HOPPER_HEAD_DIMS:
        raise fk.UnsupportedInput(f"head_dim {q.shape[-1]} is not supported; supported: {HOPPER_HEAD_DIMS}")
    return fk.check_inputs(q, k, v, causal, sm_scale)


def _launch(q, k, v, o, lse, scales, sm_scale, causal, is_fp8, warp_specialize, v_stride, config, p_scale=P_SCALE):
    batch, heads, seq_len, head_dim = o.shape
    if q.device.type == "cuda":
        _set_allocator(q.device)
    q_scale, k_scale, v_scale = scales
    args = (q, k, v, o, lse, q_scale, k_scale, v_scale, sm_scale, seq_len, batch * heads, v_stride)
    meta = dict(HEAD_DIM=head_dim, CAUSAL=causal, IS_FP8=is_fp8, WARP_SPECIALIZE=warp_specialize,
                QBLOCK=QUANT_BLOCK, PSCALE=float(p_scale))
    grid = lambda m: (triton.cdiv(seq_len, m["BLOCK_M"]), batch * heads)  # noqa: E731
    if config is None:
        _attn_fwd_tma[grid](*args, **meta)
    else:
        _attn_fwd_tma.fn[grid](*args, **meta, **config.all_kwargs())


def tma_forward(q, k, v, causal=False, sm_scale=None, warp_specialize=False, config=None):
    """O and the logsumexp L of softmax(q k^T * sm_scale) v: (batch, heads, seq_len, head_dim) fp16/bf16
    tensors, head dim 64, 128 or 256. ``config`` (a triton.Config) skips autotuning."""
    sm_scale = check_inputs(q, k, v, causal, sm_scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    none = torch.empty(1, device=q.device, dtype=torch.float32)
    _launch(q, k, v, o, lse, (none, none, none), sm_scale, causal, False, bool(warp_specialize), 0, config)
    return o, lse


def random_orthogonal(head_dim: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """M = H diag(s) / sqrt(d): H the Sylvester Hadamard matrix, s random signs. M M^T = I."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size; got {head_dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return (h * signs[None, :] / math.sqrt(head_dim)).to(device=device, dtype=dtype)


def quantize_rows(x: torch.Tensor, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (BH, N, D) -> float8 e4m3 values and fp32 scales, one per ``block`` rows of each head
    (``block=None``: one per head), so that x ~= values * scale and |values| <= 448."""
    bh, n, d = x.shape
    rows = n if block is None else block
    nb = -(-n // rows)
    pad = torch.zeros(bh, nb * rows, d, dtype=torch.float32, device=x.device)
    pad[:, :n] = x.float()
    amax = pad.view(bh, nb, rows * d).abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    values = (pad.view(bh, nb, rows, d) / scale[:, :, None, None]).view(bh, nb * rows, d)[:, :n]
    return values.to(FP8), scale.contiguous()


def fp8_inputs(q, k, v, incoherent=True, block=QUANT_BLOCK, seed=0):
    """What the FP8 kernel reads: Q, K (rotated by M if ``incoherent``) quantized per ``block`` rows,
    V per head and transposed to (BH, D, N padded to 16). Returns (q8, k8, vt8, (q_scale, k_scale, v_scale), n_pad)."""
    batch, heads, n, d = q.shape
    q3, k3, v3 = (t.reshape(batch * heads, n, d) for t in (q, k, v))
    if incoherent:
        m = random_orthogonal(d, seed, q.device)
        q3, k3 = q3.float() @ m, k3.float() @ m
    q8, qs = quantize_rows(q3, block)
    k8, ks = quantize_rows(k3, block)
    v8, vs = quantize_rows(v3, None)
    n_pad = -(-n // 16) * 16
    vt8 = torch.zeros(batch * heads, d, n_pad, dtype=FP8, device=q.device)
    vt8[:, :, :n] = v8.transpose(1, 2)
    return q8.contiguous(), k8.contiguous(), vt8, (qs, ks, vs.reshape(-1).contiguous()), n_pad


def fp8_forward(q, k, v, causal=False, sm_scale=None, incoherent=True, block=QUANT_BLOCK, seed=0,
                warp_specialize=False, config=None, inputs=None, p_scale=P_SCALE):
    """FP8 attention forward (FlashAttention-3 §3.3): fp16/bf16 q, k, v in, O in q's dtype out.
    ``block=None`` quantizes Q and K per head instead of per block; ``p_scale`` multiplies P before its
    cast to e4m3 (a power of two, so exact; 1.0 casts P as it is); ``inputs`` reuses fp8_inputs' output
    (so that timing can leave out the quantization)."""
    sm_scale = check_inputs(q, k, v, causal, sm_scale)
    if p_scale not in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0):
        raise fk.UnsupportedInput(f"p_scale must be a power of two from 1 to 256 (P * p_scale <= 448), got {p_scale!r}")
    if block is not None and block != QUANT_BLOCK:
        raise fk.UnsupportedInput(f"the kernel reads scales per {QUANT_BLOCK} rows (or per head: block=None)")
    batch, heads, n, d = q.shape
    q8, k8, vt8, (qs, ks, vs), n_pad = inputs if inputs is not None else fp8_inputs(q, k, v, incoherent, block, seed)
    if block is None:  # one scale per head, spread over the kernel's per-block layout
        nb = -(-n // QUANT_BLOCK)
        qs, ks = qs.expand(-1, nb).contiguous(), ks.expand(-1, nb).contiguous()
    o = torch.empty(batch, heads, n, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, n, device=q.device, dtype=torch.float32)
    _launch(q8, k8, vt8, o, lse, (qs, ks, vs), sm_scale, causal, True, bool(warp_specialize), n_pad, config, p_scale)
    return o


# ----------------------------------------------------------------------------------------------
# References for the FP8 error study (FlashAttention-3 §4.3, Table 3)
# ----------------------------------------------------------------------------------------------

def outlier_inputs(shape, seed=0, device="cpu", dtype=torch.float16):
    """FA3 §4.3's distribution: N(0, 1) + N(0, 100) * Bernoulli(0.001), entry by entry, for q, k and v."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(shape, generator=g) + 10 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 1e-3)
        out.append(x.to(device=device, dtype=dtype))
    return tuple(out)


def _scores(q, k, sm_scale, causal):
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def fp8_reference(q, k, v, causal=False, sm_scale=None, incoherent=True, block=QUANT_BLOCK, seed=0, p_scale=P_SCALE):
    """The FP8 kernel's quantization in PyTorch, float64 after it: the same quantized Q, K and V, and
    p_scale * exp(S - rowmax) rounded to e4m3 (the kernel rounds relative to its running max instead, so the
    two differ by about one e4m3 rounding of P; the sums are exact here, fp32 in the kernel)."""
    batch, heads, n, d = q.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q8, k8, vt8, (qs, ks, vs), _ = fp8_inputs(q, k, v, incoherent, block, seed)
    rows = n if block is None else block
    qd = q8.double() * qs.double().repeat_interleave(rows, 1)[:, :n, None]
    kd = k8.double() * ks.double().repeat_interleave(rows, 1)[:, :n, None]
    vd = vt8[:, :, :n].double().transpose(1, 2) * vs.double()[:, None, None]
    s = _scores(qd, kd, sm_scale, causal)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    e8 = (e * p_scale).to(FP8).double() / p_scale
    return ((e8 @ vd) / e.sum(-1, keepdim=True)).reshape(batch, heads, n, d)


def fp8_baseline(q, k, v, causal=False, sm_scale=None):
    """FA3 Table 3's FP8 baseline as its text describes it: per-tensor scales, fp32 accumulation, the
    softmax output kept in fp16, then cast to e4m3 for P V (our reading: both FP8 matmul operands are FP8)."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale

    def per_tensor(x):
        scale = x.float().abs().amax().clamp_min(1e-12) / FP8_MAX
        return (x.float() / scale).to(FP8).float() * scale

    qf, kf, vf = per_tensor(q), per_tensor(k), per_tensor(v)
    p16 = _scores(qf, kf, sm_scale, causal).softmax(-1).half()
    return (p16.float().to(FP8).float() @ vf).to(q.dtype)


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean squared error, in float64, against the float64 reference."""
    return float((x.double() - ref.double()).pow(2).mean().sqrt())


# ----------------------------------------------------------------------------------------------
# Backward with FA2's atomic adds for dQ (Algorithm 2 line 15): exercise 1
# ----------------------------------------------------------------------------------------------

FUSED_BWD_HEAD_DIMS = (64, 128)  # at 256 every tile tried spills on sm_90 (40 to 1,272 bytes): refused


def bwd_fused_configs():
    """Autotune candidates for the fused backward: BLOCK_N keys held on chip (dK, dV), BLOCK_M query rows
    per step; BLOCK_N must be a multiple of BLOCK_M, as in the studied dK/dV kernel. The first is the default."""
    if fk.interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # Compiled for sm_90 (scripts/ch03_hopper_sass.py --backward), bf16, d = 128: 64 x 64 over 8 warps keeps all
    # five matmuls on wgmma and spills 0 (causal: 8) bytes: the default, untimed. 64 x 128, the studied dK/dV
    # kernel's default, spills 72-112 bytes (that kernel 88-128); 32 x 128 spills none but runs dQ's on mma.sync.
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((64, 64, 8, 2), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3))]


@triton.jit
def _dkdvdq_inner(dk, dv, k, v, q_blk, do_blk, dq_ptrs, L, Delta, offs_n, lo, hi, sm_scale, N_CTX,
                  CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """flash_kernels._dkdv_inner over query blocks [lo, hi), plus line 15: dQ_i += scale · dS_ij K_j, added
    at once to the fp32 buffer (other key blocks add to the same rows: atomically). MASKED blocks also drop
    keys past N_CTX, whose zero-padded rows would otherwise still get P > 0."""
    q_blk = tl.advance(q_blk, (lo, 0))
    do_blk = tl.advance(do_blk, (lo, 0))
    dq_ptrs += lo * HEAD_DIM
    qk_scale = sm_scale * fk.LOG2E
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if MASKED:
            q = tl.load(q_blk, boundary_check=(0,), padding_option="zero")  # (BLOCK_M, D)
            do = tl.load(do_blk, boundary_check=(0,), padding_option="zero")
            lse = tl.load(L + offs_m, mask=offs_m < N_CTX, other=0.0)
            delta = tl.load(Delta + offs_m, mask=offs_m < N_CTX, other=0.0)
        else:
            q = tl.load(q_blk)
            do = tl.load(do_blk)
            lse = tl.load(L + offs_m)
            delta = tl.load(Delta + offs_m)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :] * fk.LOG2E)  # P_ij^T    matmul 1
        if MASKED:
            keep = (offs_m[None, :] < N_CTX) & (offs_n[:, None] < N_CTX)
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)  # line 12: dV_j += P_ij^T dO_i                       matmul 2
        dp_t = tl.dot(v, tl.trans(do))  # line 13: dP_ij^T = V_j dO_i^T                              matmul 3
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # line 14: dS_ij^T = P_ij^T ∘ (dP_ij^T - D_i)
        dk = tl.dot(ds_t, q, dk)  # line 16: dK_j += dS_ij^T Q_i (scale applied at the end)        matmul 4
        dq = tl.dot(tl.trans(ds_t), k) * sm_scale  # line 15: scale · dS_ij K_j                    matmul 5
        # relaxed: nothing reads dQ before the kernel ends, so the adds need atomicity, not ordering
        tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < N_CTX, sem="relaxed")
        q_blk = tl.advance(q_blk, (BLOCK_M, 0))
        do_blk = tl.advance(do_blk, (BLOCK_M, 0))
        dq_ptrs += BLOCK_M * HEAD_DIM
    return dk, dv


@triton.autotune(configs=bwd_fused_configs(), key=["N_CTX", "HEAD_DIM", "CAUSAL"], reset_to_zero=["dQ"])
@triton.jit
def _attn_bwd_fused(Q, K, V, dO, L, Delta, dQ, dK, dV, sm_scale, N_CTX,
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """flash_kernels._attn_bwd_dkdv, line for line, but with dQ (fp32, zeroed) accumulated too."""
    start_n = tl.program_id(0)  # which block of keys (Alg. 2 line 5, run in parallel)
    off_hz = tl.program_id(1)
    base = off_hz.to(tl.int64) * N_CTX * HEAD_DIM
    L += off_hz.to(tl.int64) * N_CTX
    Delta += off_hz.to(tl.int64) * N_CTX
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_blk = tl.make_block_ptr(K + base, shape=(N_CTX, HEAD_DIM), strides=(HEAD_DIM, 1),
                              offsets=(n0, 0), block_shape=(BLOCK_N, HEAD_DIM), order=(1, 0))
    v_blk = tl.make_block_ptr(V + base, shape=(N_CTX, HEAD_DIM), strides=(HEAD_DIM, 1),
                              offsets=(n0, 0), block_shape=(BLOCK_N, HEAD_DIM), order=(1, 0))
    q_blk = tl.make_block_ptr(Q + base, shape=(N_CTX, HEAD_DIM), strides=(HEAD_DIM, 1),
                              offsets=(0, 0), block_shape=(BLOCK_M, HEAD_DIM), order=(1, 0))
    do_blk = tl.make_block_ptr(dO + base, shape=(N_CTX, HEAD_DIM), strides=(HEAD_DIM, 1),
                               offsets=(0, 0), block_shape=(BLOCK_M, HEAD_DIM), order=(1, 0))
    # atomics take plain pointers, not block pointers: the (BLOCK_M, D) tile of dQ's first query block
    dq_ptrs = dQ + base + tl.arange(0, BLOCK_M)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_blk, boundary_check=(0,), padding_option="zero")  # line 6: K_j, V_j stay on chip
    v = tl.load(v_blk, boundary_check=(0,), padding_option="zero")
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)  # line 7
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # The studied kernel's query ranges: causal diagonal band (masked), full blocks, masked tail past N.
    # A key block cut by N sends every query block through the masked loop, which drops its padded keys.
    lo = 0
    if CAUSAL:
        diag_hi = tl.minimum(n0 + BLOCK_N, N_CTX)
        dk, dv = _dkdvdq_inner(dk, dv, k, v, q_blk, do_blk, dq_ptrs, L, Delta, offs_n, n0, diag_hi, sm_scale,
                               N_CTX, CAUSAL, True, BLOCK_M, HEAD_DIM)
        lo = n0 + BLOCK_N
    full_hi = lo + (tl.maximum(N_CTX - lo, 0) // BLOCK_M) * BLOCK_M
    full_hi = tl.where(n0 + BLOCK_N > N_CTX, lo, full_hi)
    dk, dv = _dkdvdq_inner(dk, dv, k, v, q_blk, do_blk, dq_ptrs, L, Delta, offs_n, lo, full_hi, sm_scale,
                           N_CTX, CAUSAL, False, BLOCK_M, HEAD_DIM)
    dk, dv = _dkdvdq_inner(dk, dv, k, v, q_blk, do_blk, dq_ptrs, L, Delta, offs_n, full_hi, N_CTX, sm_scale,
                           N_CTX, CAUSAL, True, BLOCK_M, HEAD_DIM)
    dk = dk * sm_scale  # dS was taken w.r.t. the scaled scores: dK = scale · dS^T Q
    dk_blk = tl.make_block_ptr(dK + base, shape=(N_CTX, HEAD_DIM), strides=(HEAD_DIM, 1),
                               offsets=(n0, 0), block_shape=(BLOCK_N, HEAD_DIM), order=(1, 0))
    dv_blk = tl.make_block_ptr(dV + base, shape=(N_CTX, HEAD_DIM), strides=(HEAD_DIM, 1),
                               offsets=(n0, 0), block_shape=(BLOCK_N, HEAD_DIM), order=(1, 0))
    tl.store(dk_blk, dk.to(dK.dtype.element_ty), boundary_check=(0,))  # line 18
    tl.store(dv_blk, dv.to(dV.dtype.element_ty), boundary_check=(0,))


def flash_backward_fused(q, k, v, o, lse, do, causal, sm_scale, config=None):
    """dQ, dK, dV as flash_kernels.flash_backward returns them (contiguous (B, H, N, D) inputs, given O, L and
    dO), from ONE kernel per key block instead of two: FA2's Algorithm 2 as written, line 15 included.

    Why atomics: the studied backward gives dQ its own kernel (one program per query block) so that each dQ
    row has one writer; that kernel recomputes S = Q K^T and dP = dO V^T, seven matmuls per tile pair instead
    of five. Here the key-block program that already holds dS_ij adds scale · dS_ij K_j into dQ_i itself.
    The saving: two matmuls per tile pair, and the dQ kernel's second pass over K and V. The cost: every key
    block adds to the same dQ rows (N / BLOCK_N read-modify-writes of each element, in L2), so the adds are
    atomic, in an order that changes from run to run (dQ is not bitwise deterministic: fp32 sums in another
    order), into an fp32 buffer of B·H·N·d (4 bytes an element, twice a bf16 dQ), which a last pass casts to
    the inputs' dtype. ``config`` (a triton.Config) skips autotuning; the head dim must be 64 or 128."""
    batch, heads, seq_len, head_dim = q.shape
    if head_dim not in FUSED_BWD_HEAD_DIMS:
        raise fk.UnsupportedInput(f"head_dim {head_dim} is not supported by the fused backward; supported: "
                                  f"{FUSED_BWD_HEAD_DIMS} (at 256 its dK, dV and dQ tiles spill registers on sm_90)")
    delta = torch.empty_like(lse)
    pre_block = 64
    fk._bwd_preprocess[(triton.cdiv(seq_len, pre_block), batch * heads)](  # line 4: D = rowsum(dO ∘ O)
        o, do, delta, seq_len, HEAD_DIM=head_dim, BLOCK_M=pre_block)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # the atomics' fp32 accumulator
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    fk._launch(_attn_bwd_fused, grid, config, q, k, v, do, lse, delta, dq, dk, dv, sm_scale, seq_len,
               HEAD_DIM=head_dim, CAUSAL=causal)
    return dq.to(q.dtype), dk, dv


class FusedBwdAttention(fk.FlashAttention):
    """The studied kernels' forward (fk.flash_forward), with the fused backward above in place of fk.flash_backward."""

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward_fused(q, k, v, o, lse, do.contiguous(), ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None, None


def flash_attention_fused(q, k, v, causal=False, sm_scale=None):
    """fk.flash_attention with the fused backward (head dims 64 and 128)."""
    sm_scale = fk.check_inputs(q, k, v, causal, sm_scale)
    return FusedBwdAttention.apply(q, k, v, causal, sm_scale, None)
