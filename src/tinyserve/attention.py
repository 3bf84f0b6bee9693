"""Attention over a paged KV cache (PagedAttention, Kwon et al. 2023, §4.1).

The cache of one layer is two tensors (num_blocks, block_size, H_kv, d). Logical block j of a sequence
lives in physical block ``block_table[j]``, so token position p is cache slot
``block_table[p // block_size] * block_size + p % block_size`` (vLLM §4.2: "logical and physical KV
blocks"). A step writes its new tokens' K and V to their slots first (``store_kv``); attention then reads
every key and value from the cache, whatever step wrote them. That one rule serves both phases:

- prefill: sequence b brings q_len_b new tokens (``cu_seqlens_q``) and attends causally over its
  ``context_lens[b]`` cached tokens; the new tokens are the last q_len_b of them (a recomputed or, later,
  a prefix-cached sequence has q_len < context_len);
- decode: one new token per sequence, attending to all its context_len tokens.

Two implementations: a plain torch reference (gather K/V through the block table, then SDPA), and Triton
kernels that read the blocks in place. The kernels run on the GPU, or on the CPU in Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported); elsewhere the engine uses the reference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no triton
    triton = None


LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels fold log2(e) into the scale


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter() -> None:
    """triton 3.6's interpreter turns a loop bound into int(array of shape (1,)), which numpy >= 2.4 refuses;
    patched there only, as upstream fixed it (triton-lang/triton#9171). Chapter 03 patches the same gap."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_tinyserve_fix", False) or getattr(interpreter, "_course_fixes", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched_tensor
    interpreter._tinyserve_fix = True


if triton is not None and interpreting():
    _fix_interpreter()


@dataclass
class AttnMeta:
    """What attention needs besides q and the cache. Tensors live on the model's device; the *_host lists
    are the same numbers on the host, for the torch path (no device-to-host syncs)."""
    is_prefill: bool
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token
    context_lens: torch.Tensor  # (B,) int32: tokens of each sequence in the cache after this step's write
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with any valid block id
    cu_seqlens_q: torch.Tensor | None = None  # (B+1,) int32, prefill: sequence b's new tokens are q[cu[b]:cu[b+1]]
    max_seqlen_q: int = 1
    context_lens_host: list[int] | None = None
    q_lens_host: list[int] | None = None
    backend: str = "torch"  # "torch" or "triton"


def store_kv(k_cache, v_cache, k, v, slot_mapping):
    """Write the new tokens' K, V (T, H_kv, d) into their slots of the (num_blocks, block_size, H_kv, d) caches."""
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v


def attention(q, k_cache, v_cache, meta: AttnMeta):
    """q: (T, H_q, d) packed new tokens -> (T, H_q, d)."""
    if meta.backend == "triton":
        return (prefill_triton if meta.is_prefill else decode_triton)(q, k_cache, v_cache, meta)
    return attention_torch(q, k_cache, v_cache, meta)


# ----------------------------------------------------------------------------------------------
# Reference: gather, then SDPA
# ----------------------------------------------------------------------------------------------

def gather_kv(cache, block_table_row, n):
    """The first n tokens of one sequence, copied out of its blocks: (n, H_kv, d)."""
    bs = cache.shape[1]
    blocks = block_table_row[: -(-n // bs)].long()
    return cache[blocks].flatten(0, 1)[:n]


def attention_torch(q, k_cache, v_cache, meta: AttnMeta):
    ctx = meta.context_lens_host or meta.context_lens.tolist()
    q_lens = meta.q_lens_host or ([1] * len(ctx) if not meta.is_prefill else torch.diff(meta.cu_seqlens_q).tolist())
    out = torch.empty_like(q)
    start = 0
    for b, (n, m) in enumerate(zip(ctx, q_lens)):
        k = gather_kv(k_cache, meta.block_tables[b], n).transpose(0, 1)  # (H_kv, n, d)
        v = gather_kv(v_cache, meta.block_tables[b], n).transpose(0, 1)
        qb = q[start:start + m].transpose(0, 1)  # (H_q, m, d)
        # new token i sits at position n - m + i and sees keys 0 .. n - m + i (causal)
        allowed = torch.arange(n, device=q.device)[None, :] <= (n - m + torch.arange(m, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=allowed, enable_gqa=True)  # (H_q, m, d)
        out[start:start + m] = o.transpose(0, 1)
        start += m
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernels: read the blocks in place, online softmax (FlashAttention, Dao et al. 2022, Alg. 1)
# ----------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _kv_tile(K_cache, V_cache, block_tables, seq, kvh, start_n, ctx, stride_bt,
                 HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Keys and values of positions start_n .. start_n + BLOCK_N - 1 of one sequence, one KV head, found
        through the block table (physical slot = table[p // block_size] * block_size + p % block_size)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        valid = offs_n < ctx
        blk = tl.load(block_tables + seq * stride_bt + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + offs_n % BLOCK_SIZE  # (BLOCK_N,)
        ptr = slot[:, None] * (HKV * HEAD_DIM) + kvh * HEAD_DIM + offs_d[None, :]
        k = tl.load(K_cache + ptr, mask=valid[:, None], other=0.0)  # (BLOCK_N, d)
        v = tl.load(V_cache + ptr, mask=valid[:, None], other=0.0)
        return k, v, offs_n, valid

    @triton.jit
    def _prefill_kernel(Q, K_cache, V_cache, O,  # noqa: E741 (paper symbols)
                        cu_seqlens_q, context_lens, block_tables, qk_scale, stride_bt,
                        GROUP: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start = tl.load(cu_seqlens_q + seq)
        q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
        if pid_m * BLOCK_M >= q_len:  # the grid covers the longest sequence; shorter ones stop early
            return
        ctx = tl.load(context_lens + seq)
        kvh = head // GROUP  # GQA: query head -> its shared K/V head
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptr = (q_start + offs_m)[:, None].to(tl.int64) * (HKV * GROUP * HEAD_DIM) + head * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_ptr, mask=(offs_m < q_len)[:, None], other=0.0)  # (BLOCK_M, d)
        pos_m = ctx - q_len + offs_m  # absolute positions of these queries
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        hi = tl.minimum(ctx, ctx - q_len + (pid_m + 1) * BLOCK_M)  # causal: no key after the tile's last query
        for start_n in range(0, hi, BLOCK_N):
            k, v, offs_n, valid = _kv_tile(K_cache, V_cache, block_tables, seq, kvh, start_n, ctx, stride_bt,
                                           HKV, HEAD_DIM, BLOCK_SIZE, BLOCK_N)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # S = Q K^T * scale * log2(e)   (BLOCK_M, BLOCK_N)
            s = tl.where(valid[None, :] & (offs_n[None, :] <= pos_m[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # running max (FlashAttention Alg. 1, line 10)
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o = acc / l_i[:, None]  # O = diag(l)^-1 O~ (Alg. 1, line 12)
        tl.store(O + q_ptr, o.to(O.dtype.element_ty), mask=(offs_m < q_len)[:, None])

    @triton.jit
    def _decode_kernel(Q, K_cache, V_cache, O,  # noqa: E741
                       context_lens, block_tables, qk_scale, stride_bt,
                       GROUP: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per (sequence, KV head). The GROUP query heads that share the KV head are the rows of
        one (BLOCK_G, d) tile, so each key and value is read from memory once for all of them."""
        seq, kvh = tl.program_id(0), tl.program_id(1)
        ctx = tl.load(context_lens + seq)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_g < GROUP  # BLOCK_G >= 16 for tl.dot; rows past GROUP are padding
        q_ptr = seq.to(tl.int64) * (HKV * GROUP * HEAD_DIM) + (kvh * GROUP + offs_g)[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_ptr, mask=rows[:, None], other=0.0)  # (BLOCK_G, d)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for start_n in range(0, ctx, BLOCK_N):
            k, v, offs_n, valid = _kv_tile(K_cache, V_cache, block_tables, seq, kvh, start_n, ctx, stride_bt,
                                           HKV, HEAD_DIM, BLOCK_SIZE, BLOCK_N)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_G, BLOCK_N)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        tl.store(O + q_ptr, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=rows[:, None])


def _tiles(head_dim):
    """(BLOCK_M, BLOCK_N): small in the interpreter (numpy runs every program); 64 x 64 on the GPU."""
    return (16, 16) if interpreting() else (64, 64 if head_dim <= 128 else 32)


def prefill_triton(q, k_cache, v_cache, meta: AttnMeta):
    t, h_q, d = q.shape
    _, block_size, h_kv, _ = k_cache.shape
    q = q.contiguous()
    o = torch.empty_like(q)
    n_seq = meta.cu_seqlens_q.shape[0] - 1
    block_m, block_n = _tiles(d)
    grid = (triton.cdiv(meta.max_seqlen_q, block_m), n_seq, h_q)
    _prefill_kernel[grid](q, k_cache, v_cache, o, meta.cu_seqlens_q, meta.context_lens, meta.block_tables,
                          LOG2E / math.sqrt(d), meta.block_tables.stride(0), GROUP=h_q // h_kv, HKV=h_kv,
                          HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return o


def decode_triton(q, k_cache, v_cache, meta: AttnMeta):
    b, h_q, d = q.shape
    _, block_size, h_kv, _ = k_cache.shape
    q = q.contiguous()
    o = torch.empty_like(q)
    group = h_q // h_kv
    _, block_n = _tiles(d)
    _decode_kernel[(b, h_kv)](q, k_cache, v_cache, o, meta.context_lens, meta.block_tables,
                              LOG2E / math.sqrt(d), meta.block_tables.stride(0), GROUP=group, HKV=h_kv,
                              HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_G=max(16, triton.next_power_of_2(group)),
                              BLOCK_N=block_n, num_warps=4)
    return o
