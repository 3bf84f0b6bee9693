"""Mixture-of-experts routing: the code studied in Chapter 05.

A small GPT whose feed-forward layer is either dense or a mixture of experts (MoE), bottom-up:

    route            softmax router, top-k, optional selection-only bias     (Switch eq. 1-2; Wang et al. eq. 3)
    switch_aux_loss  the load-balancing loss                                  (Switch eq. 4-6)
    dispatch         sort assignments by expert, apply the capacity          (Switch eq. 3)
    to_experts       permute tokens into expert order (a gather; its backward a gather-sum, one Triton kernel)
    grouped_mm       one grouped matmul for all experts (torch._grouped_mm)
    combine          gate, un-permute, sum a token's k outputs (Switch eq. 2; one Triton kernel each way)
    experts_grouped  the MoE FFN: to_experts, grouped_mm, gelu, grouped_mm, combine
    experts_loop     the reference: a Python loop over experts
    MoE / MLP / GPT  the model;  MoE.update_bias is Algorithm 1 of Wang et al. (2024)
    train / evaluate the experiments;  bench_layer and bench_parts the systems bill

References: Fedus, Zoph & Shazeer 2021, "Switch Transformers" (JMLR 2022); Lepikhin et al. 2020, "GShard";
Dai et al. 2024, "DeepSeekMoE"; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE".
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton runs the dispatch kernels on the GPU, or on the CPU with TRITON_INTERPRET=1 (slow: tests)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU path needs no Triton
    triton = None

# ----------------------------------------------------------------------------------------- the router


@dataclass
class Routing:
    top_idx: torch.Tensor  # (N, k) int64: the chosen experts of each token, best first
    gates: torch.Tensor  # (N, k): the scores s_i of the chosen experts (the bias never enters a gate)
    scores: torch.Tensor  # (N, E): softmax probabilities p_i(x), or sigmoid affinities, in the router's dtype


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int, *, gate: str = "softmax",
          bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, kernel: str | None = None) -> Routing:
    """Top-k router. ``gate``: "softmax" (Switch, GShard, DeepSeekMoE) or "sigmoid" (the gate of Wang et
    al.'s main experiments). ``dtype`` is the router's precision: Switch §2.4 keeps it float32 ("selective
    precision") inside a bfloat16 model; bfloat16 here means logits, scores and selection in bfloat16.
    ``bias`` (aux-loss-free balancing) steers the selection only.

    A float32 (or float64) router is one autograd function, ``_Router``: the logits are computed in ``dtype``
    from ``x`` as it comes (bf16 on the GPU; bf16 converts to float32 exactly), and ``x`` is saved as it
    came, not as a float32 copy; the backward returns dx in x's dtype. On the GPU (or with
    ``kernel="triton"``) it is one Triton kernel forward (logits, softmax, top-k, gates) and two backward (dx,
    and dW by partial sums), float32 arithmetic throughout; the torch path computes the same and is the
    reference. A bfloat16 router keeps plain autograd (``route_autograd``)."""
    if dtype not in (torch.float32, torch.float64):
        return route_autograd(x, weight, top_k, gate=gate, bias=bias, dtype=dtype)
    with torch.autocast(x.device.type, enabled=False):
        scores, gates, top_idx = _Router.apply(x, weight, bias, top_k, gate == "softmax", dtype,
                                               _triton_ok(x, kernel) and dtype == torch.float32)
    return Routing(top_idx, gates, scores)


def route_autograd(x: torch.Tensor, weight: torch.Tensor, top_k: int, *, gate: str = "softmax",
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> Routing:
    """The router in plain torch ops and autograd (the bf16 router; and the reference for ``_Router``).
    Autograd saves ``x.to(dtype)``: a float32 copy of x lives from the forward to the backward."""
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.to(dtype), weight.to(dtype))  # (N, E): h(x) = W_r x
        if gate == "softmax":  # Switch eq. 1; below float32, every step rounds to dtype (see softmax_lowp)
            scores = logits.softmax(dim=-1) if dtype in (torch.float32, torch.float64) else softmax_lowp(logits)
        else:
            scores = logits.sigmoid()
        pick = scores if bias is None else scores.float() + bias  # Wang et al. eq. 3: s_i + b_i selects ...
        top_idx = pick.topk(top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(-1, top_idx)  # ... but the gate stays s_i (no bias, no renormalisation)
    return Routing(top_idx, gates, scores)


def softmax_lowp(logits: torch.Tensor) -> torch.Tensor:
    """Softmax whose every intermediate is rounded to ``logits.dtype``: exp, the row sum, the quotient.

    ``torch.softmax`` on a bfloat16 tensor computes in float32 and rounds only its output, so it is not
    what a bfloat16 router meant in 2021 (Mesh TensorFlow ran the whole softmax in the activation dtype).
    Here exp(z) and its sum are bfloat16 numbers (8 significant bits), as in that router."""
    z = logits - logits.amax(dim=-1, keepdim=True)  # (N, E), in dtype
    e = z.exp()  # rounded to dtype
    return e / e.sum(dim=-1, keepdim=True, dtype=logits.dtype)  # the sum rounded to dtype, then the quotient


def _router_fwd_torch(x, weight, bias, k, softmax, dtype):
    logits = F.linear(x.to(dtype), weight.to(dtype))
    scores = logits.softmax(dim=-1) if softmax else logits.sigmoid()
    pick = scores if bias is None else scores.float() + bias
    top_idx = pick.topk(k, dim=-1).indices
    return scores, scores.gather(-1, top_idx), top_idx


def _router_bwd_torch(dscores, dgates, x, weight, scores, top_idx, softmax, dtype):
    """dlogits from the scores' and the gates' gradients (the gates are scores[top_idx]), then
    dW = dlogitsᵀ x and dx = dlogits W, in ``dtype``; dx returned in x's dtype."""
    ds = torch.zeros_like(scores) if dscores is None else dscores.to(scores.dtype)
    if dgates is not None:
        ds = ds.scatter_add(-1, top_idx, dgates.to(scores.dtype))
    if softmax:  # d softmax: p ⊙ (g - <g, p>)
        dl = scores * (ds - (ds * scores).sum(-1, keepdim=True))
    else:  # d sigmoid: g ⊙ s ⊙ (1 - s)
        dl = ds * scores * (1 - scores)
    dw = dl.t() @ x.to(dtype)
    dx = (dl @ weight.to(dtype)).to(x.dtype)
    return dx, dw.to(weight.dtype)


def _router_fwd_triton(x, weight, bias, k, softmax):
    x, weight = x.contiguous(), weight.float().contiguous()
    (n, d), e = x.shape, weight.shape[0]
    scores = torch.empty(n, e, dtype=torch.float32, device=x.device)
    gates = torch.empty(n, k, dtype=torch.float32, device=x.device)
    top_idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    blk_n = 64
    b = weight if bias is None else bias.float().contiguous()
    _router_fwd_kernel[(triton.cdiv(n, blk_n),)](x, weight, b, scores, gates, top_idx, n, d, E=e, EP=_ep(e), K=k,
                                                 SOFTMAX=softmax, HAS_B=bias is not None, BLOCK_N=blk_n,
                                                 BLOCK_D=64, num_warps=4)
    return scores, gates, top_idx


def _router_bwd_triton(dscores, dgates, x, weight, scores, top_idx, softmax):
    x, w32 = x.contiguous(), weight.float().contiguous()
    (n, d), e, k = x.shape, w32.shape[0], top_idx.shape[1]
    ds = scores if dscores is None else dscores.float().contiguous()
    dg = scores if dgates is None else dgates.float().contiguous()
    dx = torch.empty_like(x)
    dl = torch.empty(n, e, dtype=torch.float32, device=x.device)
    blk_n, blk_d = 64, 128
    _router_bwd_dx_kernel[(triton.cdiv(n, blk_n), triton.cdiv(d, blk_d))](
        ds, dg, top_idx, scores, w32, dx, dl, n, d, E=e, EP=_ep(e), K=k, SOFTMAX=softmax,
        HAS_DS=dscores is not None, HAS_DG=dgates is not None, BLOCK_N=blk_n, BLOCK_D=blk_d, num_warps=4)
    rows = 512  # rows per program of the dW kernel: float32 partial sums, one slice per 512 rows
    partial = torch.empty(triton.cdiv(n, rows), e, d, dtype=torch.float32, device=x.device)
    _router_bwd_dw_kernel[(triton.cdiv(d, blk_d), partial.shape[0])](dl, x, partial, n, d, E=e, EP=_ep(e), ROWS=rows,
                                                                     BLOCK_N=blk_n, BLOCK_D=blk_d, num_warps=4)
    return dx, partial.sum(0).to(weight.dtype)


def _ep(e: int) -> int:
    return max(16, triton.next_power_of_2(e))  # tl.dot wants every dimension >= 16


class _Router(torch.autograd.Function):
    """Forward: (scores, gates, top_idx) of the router, logits in ``dtype``; saves x as it came (bf16 on the
    GPU), never a float32 copy. Backward: the gates' gradient scattered onto the scores', the softmax (or
    sigmoid) backward, then dx = dlogits W (in x's dtype) and dW = dlogitsᵀ x (in W's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, k, softmax, dtype, triton_):
        if triton_:
            scores, gates, top_idx = _router_fwd_triton(x, weight, bias, k, softmax)
        else:
            scores, gates, top_idx = _router_fwd_torch(x, weight, bias, k, softmax, dtype)
        ctx.save_for_backward(x, weight, scores, top_idx)
        ctx.softmax, ctx.dtype, ctx.triton = softmax, dtype, triton_
        ctx.mark_non_differentiable(top_idx)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not as zeros
        return scores, gates, top_idx

    @staticmethod
    def backward(ctx, dscores, dgates, _):
        x, weight, scores, top_idx = ctx.saved_tensors
        if ctx.triton:
            dx, dw = _router_bwd_triton(dscores, dgates, x, weight, scores, top_idx, ctx.softmax)
        else:
            dx, dw = _router_bwd_torch(dscores, dgates, x, weight, scores, top_idx, ctx.softmax, ctx.dtype)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), \
            None, None, None, None, None


def switch_aux_loss(scores: torch.Tensor, top_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch eq. 4-6 without its coefficient: N · Σ_i f_i · P_i.

    f_i is the fraction of the N·k assignments that went to expert i (hard counts: no gradient),
    P_i the mean router score of expert i (differentiable). For a softmax router, uniform routing gives 1.
    With f_i scaled by N/k instead, it is the loss of Wang et al. eq. 2 (the same function).
    """
    n_tokens, k = top_idx.shape
    f = expert_counts(top_idx, n_experts).float() / (n_tokens * k)  # eq. 5
    P = scores.float().mean(dim=0)  # eq. 6
    return n_experts * (f * P).sum()  # eq. 4 / α


def expert_counts(top_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert; a scatter-add, where ``torch.bincount`` would sync with the host."""
    idx = top_idx.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Switch eq. 3 (with GShard's k assignments per token): ceil(k · tokens / experts · factor)."""
    return math.ceil(top_k * n_tokens / n_experts * capacity_factor)


# ------------------------------------------------------------------------- dispatch, experts, combine


@dataclass
class Dispatch:
    slot: torch.Tensor  # (M,) kept assignments as indices into the choice-major list (k, N).flatten()
    token: torch.Tensor  # (M,) the token of each kept assignment; grouped by expert, in slot order
    pos: torch.Tensor  # (k*N,) the row of each assignment in the grouped layout; M (a zero row) if dropped
    offsets: torch.Tensor  # (E,) int32 cumulative kept counts: expert e owns rows offsets[e-1]:offsets[e]
    counts: torch.Tensor  # (E,) int64 assignments per expert before the capacity cut (the load)
    n_dropped: torch.Tensor  # () int64 assignments over capacity: not computed, the residual carries them
    k: int  # assignments per token
    capped: bool  # whether a capacity was applied (then ``pos`` may point at the zero row M)


def dispatch(top_idx: torch.Tensor, n_experts: int, cap: int | None = None) -> Dispatch:
    """Group the N·k (token, expert) assignments by expert; keep at most ``cap`` per expert.

    Assignments are listed choice-major (every token's first choice, then every second choice), and the
    sort is stable, so within an expert first choices come before second choices and earlier tokens before
    later ones: that order decides who is dropped when an expert is over capacity (as in GShard).
    All on the device, no host sync: one sort, each expert's end row by binary search in the sorted keys,
    the inverse permutation by one scatter. Only a capacity needs the host (the kept count is a shape).
    """
    n_tokens, k = top_idx.shape
    flat = top_idx.t().reshape(-1)  # (k*N,) expert of slot s = choice * N + token
    experts, order = torch.sort(flat, stable=True)  # slots grouped by expert
    ends = torch.searchsorted(experts, torch.arange(n_experts, device=flat.device, dtype=flat.dtype), right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) assignments per expert
    n_slots = order.numel()
    if cap is None:  # dropless: the grouped layout is `order` itself
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(n_slots, device=order.device))
        return Dispatch(slot=order, token=order % n_tokens, pos=pos, offsets=ends.to(torch.int32), counts=counts,
                        n_dropped=torch.zeros((), dtype=torch.int64, device=flat.device), k=k, capped=False)
    kept = counts.clamp(max=cap)
    rank = torch.arange(n_slots, device=order.device) - (ends - counts)[experts]  # place in its expert's block
    slot = order[rank < cap]  # over capacity: dropped (boolean indexing: one host sync)
    pos = torch.full_like(order, slot.numel()).scatter_(0, slot, torch.arange(slot.numel(), device=slot.device))
    return Dispatch(slot=slot, token=slot % n_tokens, pos=pos, offsets=torch.cumsum(kept, 0).to(torch.int32),
                    counts=counts, n_dropped=(counts - kept).sum(), k=k, capped=True)


def _zero_row(y: torch.Tensor) -> torch.Tensor:
    return torch.cat([y, y.new_zeros(1, y.shape[1])])  # row M: where a dropped assignment reads from


def _gather_sum_torch(src, pos, w, k):
    """out[n] = Σ_c w[c·N+n] · src[pos[c·N+n]] (w = 1 when None; pos = M, past the end, reads zeros)."""
    rows = _zero_row(src).index_select(0, pos)
    if w is not None:
        rows = rows * w.to(rows.dtype)[:, None]
    return rows.view(k, pos.numel() // k, -1).sum(0)


def _combine_bwd_torch(dout, y, pos, w, slot, token, k):
    """The transpose of the gated combine: dy[r] = w[slot[r]] · dout[token[r]], dw[s] = <dout[s % N], y[pos[s]]>."""
    dy = dout.index_select(0, token) * w[slot].to(dout.dtype)[:, None]
    dw = (dout.repeat(k, 1) * _zero_row(y).index_select(0, pos)).sum(-1)
    return dy, dw.to(w.dtype)


if triton is not None:

    @triton.jit
    def _gather_sum_kernel(SRC, POS, W, OUT, N, M, D, K: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        """Program (n, j): out[n, cols] = Σ_c w[c·N+n] · src[pos[c·N+n], cols], fp32 accumulation."""
        n = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(K):
            r = tl.load(POS + c * N + n)
            v = tl.load(SRC + r.to(tl.int64) * D + cols, mask=(cols < D) & (r < M), other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(W + c * N + n).to(tl.float32)
            acc += v
        tl.store(OUT + n.to(tl.int64) * D + cols, acc.to(OUT.dtype.element_ty), mask=cols < D)

    @triton.jit
    def _combine_bwd_kernel(DOUT, Y, W, SLOT, TOKEN, DY, DW, D: tl.constexpr, BLOCK: tl.constexpr):
        """Program r (one kept row): dy[r] = w[slot[r]] · dout[token[r]] and dw[slot[r]] = <dout[token[r]], y[r]>."""
        r = tl.program_id(0).to(tl.int64)
        s = tl.load(SLOT + r)
        t = tl.load(TOKEN + r)
        w = tl.load(W + s).to(tl.float32)
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, D, BLOCK):
            cols = j + tl.arange(0, BLOCK)
            m = cols < D
            g = tl.load(DOUT + t * D + cols, mask=m, other=0.0).to(tl.float32)
            dot += g * tl.load(Y + r * D + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DY + r * D + cols, (w * g).to(DY.dtype.element_ty), mask=m)
        tl.store(DW + s, tl.sum(dot, axis=0).to(DW.dtype.element_ty))

    @triton.jit
    def _router_fwd_kernel(X, W, B, SCORES, GATES, IDX, N, D: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                           SOFTMAX: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program i: rows i·BLOCK_N.., logits = x Wᵀ in float32 (x converted on load, IEEE fp32 dot), then
        softmax (or sigmoid), the scores stored, and the top K by K rounds of argmax (lowest index on a tie)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, r64 = rows < N, rows.to(tl.int64)
        e = tl.arange(0, EP)
        emask = e < E
        acc = tl.zeros((BLOCK_N, EP), dtype=tl.float32)
        for j in range(0, D, BLOCK_D):
            cols = j + tl.arange(0, BLOCK_D)
            cmask = cols < D
            xt = tl.load(X + r64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            wt = tl.load(W + e[None, :] * D + cols[:, None], mask=emask[None, :] & cmask[:, None], other=0.0)
            acc += tl.dot(xt.to(tl.float32), wt, input_precision="ieee")  # (BLOCK_N, EP)
        if SOFTMAX:
            z = tl.where(emask[None, :], acc, float("-inf"))
            z = tl.exp(z - tl.max(z, axis=1)[:, None])
            s = z / tl.sum(z, axis=1)[:, None]
        else:
            s = 1.0 / (1.0 + tl.exp(-acc))
        tl.store(SCORES + r64[:, None] * E + e[None, :], s, mask=rmask[:, None] & emask[None, :])
        pick = s
        if HAS_B:
            pick = s + tl.load(B + e, mask=emask, other=0.0)[None, :]
        pick = tl.where(emask[None, :], pick, float("-inf"))
        for c in tl.static_range(K):
            best = tl.max(pick, axis=1)
            i = tl.min(tl.where(pick == best[:, None], e[None, :], EP), axis=1)  # first index of the max
            hit = e[None, :] == i[:, None]
            tl.store(IDX + r64 * K + c, i.to(tl.int64), mask=rmask)
            tl.store(GATES + r64 * K + c, tl.sum(tl.where(hit, s, 0.0), axis=1), mask=rmask)
            pick = tl.where(hit, float("-inf"), pick)

    @triton.jit
    def _router_bwd_dx_kernel(DS, DG, IDX, SCORES, W, DX, DL, N, D, E: tl.constexpr, EP: tl.constexpr,
                              K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_DS: tl.constexpr, HAS_DG: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (i, j): dlogits of rows i·BLOCK_N.. (the gates' gradient added at their experts, then the
        softmax or sigmoid backward; program j = 0 stores them for dW), and dx = dlogits W for columns j."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, r64 = rows < N, rows.to(tl.int64)
        e = tl.arange(0, EP)
        m2 = rmask[:, None] & (e < E)[None, :]
        s = tl.load(SCORES + r64[:, None] * E + e[None, :], mask=m2, other=0.0)
        ds = tl.zeros((BLOCK_N, EP), dtype=tl.float32)
        if HAS_DS:
            ds += tl.load(DS + r64[:, None] * E + e[None, :], mask=m2, other=0.0)
        if HAS_DG:
            for c in tl.static_range(K):
                i = tl.load(IDX + r64 * K + c, mask=rmask, other=0)
                g = tl.load(DG + r64 * K + c, mask=rmask, other=0.0)
                ds += tl.where(e[None, :] == i[:, None], g[:, None], 0.0)
        if SOFTMAX:
            dl = s * (ds - tl.sum(ds * s, axis=1)[:, None])
        else:
            dl = ds * s * (1.0 - s)
        if tl.program_id(1) == 0:
            tl.store(DL + r64[:, None] * E + e[None, :], dl, mask=m2)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(W + e[:, None] * D + cols[None, :], mask=(e < E)[:, None] & cmask[None, :], other=0.0)
        dx = tl.dot(dl, w, input_precision="ieee")  # (BLOCK_N, BLOCK_D)
        tl.store(DX + r64[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _router_bwd_dw_kernel(DL, X, PART, N, D, E: tl.constexpr, EP: tl.constexpr, ROWS: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (j, c): part[c, :, cols j] = Σ over rows c·ROWS.. of dlogitsᵀ x, float32 (x converted on load)."""
        cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        e = tl.arange(0, EP)
        emask = e < E
        acc = tl.zeros((EP, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, ROWS, BLOCK_N):
            rows = tl.program_id(1) * ROWS + r0 + tl.arange(0, BLOCK_N)
            rmask, r64 = rows < N, rows.to(tl.int64)
            dlt = tl.load(DL + r64[None, :] * E + e[:, None], mask=emask[:, None] & rmask[None, :], other=0.0)
            xt = tl.load(X + r64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.dot(dlt, xt.to(tl.float32), input_precision="ieee")  # (EP, BLOCK_D)
        tl.store(PART + tl.program_id(1).to(tl.int64) * E * D + e[:, None] * D + cols[None, :], acc,
                 mask=emask[:, None] & cmask[None, :])


def _block(d: int) -> int:
    return min(1024, triton.next_power_of_2(d))


def _gather_sum_triton(src, pos, w, k):
    src, n, d = src.contiguous(), pos.numel() // k, src.shape[1]
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    blk = _block(d)
    _gather_sum_kernel[(n, triton.cdiv(d, blk))](src, pos, pos if w is None else w, out, n, src.shape[0], d, K=k,
                                                 HAS_W=w is not None, BLOCK=blk, num_warps=4)
    return out


def _combine_bwd_triton(dout, y, pos, w, slot, token, k):
    dout, y, d = dout.contiguous(), y.contiguous(), y.shape[1]
    dy = torch.empty_like(y)
    dw = torch.zeros_like(w)  # a dropped assignment's gate gets no gradient
    if y.shape[0]:
        _combine_bwd_kernel[(y.shape[0],)](dout, y, w, slot, token, dy, dw, D=d, BLOCK=_block(d), num_warps=4)
    return dy, dw


def _triton_ok(t: torch.Tensor, kernel: str | None) -> bool:
    """Triton for CUDA tensors of 32 bits or fewer (it accumulates in fp32); torch otherwise.
    ``kernel="triton"`` or ``"torch"`` forces one (the tests run Triton in its CPU interpreter)."""
    if kernel is None:
        return triton is not None and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return kernel == "triton"


class _ToExperts(torch.autograd.Function):
    """Forward: xs = x[token], a copy of each token per kept assignment, grouped by expert.
    Backward: its transpose, dx[n] = Σ_c dxs[pos[c·N+n]], a gather and a sum over k (no atomics)."""

    @staticmethod
    def forward(ctx, x, token, pos, k, triton_):
        ctx.save_for_backward(pos)
        ctx.k, ctx.triton = k, triton_
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, g):
        (pos,) = ctx.saved_tensors
        gather_sum = _gather_sum_triton if ctx.triton else _gather_sum_torch
        return gather_sum(g, pos, None, ctx.k), None, None, None, None


class _Combine(torch.autograd.Function):
    """Forward: out[n] = Σ_c w[c·N+n] · y[pos[c·N+n]]: each token's k expert outputs, times their gates,
    summed (a dropped assignment reads nothing). Backward: dy[r] = w[slot[r]] · dout[token[r]] and the gates'
    gradient <dout, y>. With Triton each direction is one kernel."""

    @staticmethod
    def forward(ctx, y, w, pos, slot, token, k, triton_):
        ctx.save_for_backward(y, w, pos, slot, token)
        ctx.k, ctx.triton = k, triton_
        return (_gather_sum_triton if triton_ else _gather_sum_torch)(y, pos, w, k)

    @staticmethod
    def backward(ctx, dout):
        y, w, pos, slot, token = ctx.saved_tensors
        dy, dw = (_combine_bwd_triton if ctx.triton else _combine_bwd_torch)(dout, y, pos, w, slot, token, ctx.k)
        return dy, dw, None, None, None, None, None


def to_experts(x: torch.Tensor, d: Dispatch, kernel: str | None = None) -> torch.Tensor:
    """(N, d) tokens → (M, d) rows grouped by expert, one per kept assignment."""
    return _ToExperts.apply(x, d.token, d.pos, d.k, _triton_ok(x, kernel))


def combine(y: torch.Tensor, d: Dispatch, gates: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """(M, d) expert outputs → (N, d), Switch eq. 2: each token's kept outputs times their gates (N, k),
    summed. With gates of 1 it is the transpose of ``to_experts``."""
    w = (torch.ones(d.pos.numel(), device=y.device) if gates is None else gates.t().reshape(-1)).contiguous()
    return _Combine.apply(y, w, d.pos, d.slot, d.token, d.k, _triton_ok(y, kernel))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, d_in) rows grouped by expert  ×  (E, d_in, d_out) weights  →  (M, d_out).

    Rows offsets[e-1]:offsets[e] are multiplied by w[e]. On the GPU in bf16 this is one kernel
    (``torch._grouped_mm``, a CUTLASS grouped GEMM), forward and backward. Elsewhere (CPU, float64):
    one ``mm`` per expert, after one host sync to read the offsets.
    """
    if x.is_cuda and x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, w, offs=offsets)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends))], dim=0)


def experts_grouped(x: torch.Tensor, d: Dispatch, w1: torch.Tensor, w2: torch.Tensor,
                    gates: torch.Tensor) -> torch.Tensor:
    """Switch eq. 2, y = Σ_{i∈T} p_i(x) E_i(x) with E_i(x) = gelu(x W1_i) W2_i: permute the tokens to their
    experts, two grouped matmuls, then the combine (gate, un-permute, sum a token's k rows). A dropped
    assignment adds nothing (the residual carries the token). bf16 on the GPU, as ``torch._grouped_mm`` wants."""
    dtype = torch.bfloat16 if x.is_cuda else x.dtype
    xs = to_experts(x.to(dtype), d)  # (M, d)
    h = F.gelu(grouped_mm(xs, w1.to(dtype), d.offsets))  # (M, H)
    return combine(grouped_mm(h, w2.to(dtype), d.offsets), d, gates)  # (N, d)


def experts_loop(x: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """The reference MoE FFN (dropless): a Python loop over experts, one small matmul pair each.
    ``torch.where`` must know how many tokens chose expert e: a host sync per expert."""
    acc = torch.promote_types(x.dtype, torch.float32)  # accumulate in at least fp32
    out = torch.zeros(x.shape, device=x.device, dtype=acc)
    for e in range(w1.shape[0]):
        tok, choice = torch.where(top_idx == e)
        if tok.numel() == 0:
            continue
        h = F.gelu(x[tok] @ w1[e]) @ w2[e]  # (n_e, d)
        out.index_add_(0, tok, (h * gates[tok, choice, None]).to(acc))
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------ the model


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 padded to a multiple of 64
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    ffn: str = "dense"  # "dense" | "moe"
    d_ff: int = 1024  # dense FFN width
    n_experts: int = 8
    top_k: int = 1
    gate: str = "softmax"  # "softmax" | "sigmoid"
    d_expert: int = 1024  # width of one routed expert (top-1 with d_expert = d_ff: same active FLOPs as dense)
    n_shared: int = 0  # always-on shared experts of width d_expert (DeepSeekMoE §3.2)
    balance: str = "aux"  # "aux" (Switch loss) | "none" | "bias" (aux-loss-free, Wang et al.)
    aux_alpha: float = 1e-2  # Switch §2.2
    bias_rate: float = 1e-3  # u of Wang et al. Algorithm 1
    router_dtype: str = "fp32"  # "fp32" (Switch's selective precision) | "bf16" (logits and softmax_lowp)
    router_init: float = 0.02  # std of W_r; ≈ Switch's scale s = 0.1 at d = 256 (std sqrt(s / d)); s = 1.0 is 0.0625
    z_loss: float = 0.0  # c_z of ST-MoE's router z-loss (§3.3, eq. 5; their value 1e-3); 0: none
    init_scale: float | None = None  # Switch §2.4: every weight matrix but the embeddings from a truncated normal
    #                                  of std sqrt(s / fan_in), resampled beyond 2 std; None: GPT-2's std 0.02
    capacity_factor: float | None = None  # None: dropless
    dispatch: str = "grouped"  # "grouped" | "loop"

    def __post_init__(self):
        checks = {"ffn": ("dense", "moe"), "gate": ("softmax", "sigmoid"), "balance": ("aux", "none", "bias"),
                  "router_dtype": ("fp32", "bf16"), "dispatch": ("grouped", "loop")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"GPTConfig.top_k={self.top_k}: need 1 <= top_k <= n_experts={self.n_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"GPTConfig.capacity_factor={self.capacity_factor}: must be > 0 (or None)")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")
        if not (self.z_loss >= 0 and math.isfinite(self.z_loss)):
            raise ValueError(f"GPTConfig.z_loss={self.z_loss}: must be a finite number >= 0")


class MLP(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, n_layer: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden, bias=False)
        self.proj = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * n_layer))  # GPT-2's residual scaling

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class MoE(nn.Module):
    """The MoE feed-forward layer: route, dispatch, run the experts, combine (+ shared experts)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        E, d, H = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.cfg = cfg
        self.router = nn.Parameter(torch.randn(E, d) * cfg.router_init)  # W_r
        self.register_buffer("bias", torch.zeros(E))  # b_i: selection bias, updated by rule, not by gradient
        self.w1 = nn.Parameter(torch.randn(E, d, H) * 0.02)  # (E, d, H)
        self.w2 = nn.Parameter(torch.randn(E, H, d) * 0.02 / math.sqrt(2 * cfg.n_layer))  # (E, H, d)
        self.shared = MLP(d, cfg.n_shared * H, cfg.n_layer) if cfg.n_shared else None
        self.capacity_factor = cfg.capacity_factor  # may be changed after training, for evaluation
        self.aux = self.counts = self.n_dropped = self.gate_mass = None  # set by forward

    def forward(self, x):
        B, T, d = x.shape
        cfg, xf = self.cfg, x.reshape(-1, d)  # (N, d)
        dtype = torch.float32 if cfg.router_dtype == "fp32" else torch.bfloat16
        r = route(xf, self.router, cfg.top_k, gate=cfg.gate, bias=self.bias if cfg.balance == "bias" else None,
                  dtype=dtype)
        if cfg.dispatch == "loop":
            y = experts_loop(xf, r.top_idx, r.gates, self.w1, self.w2)
            self.counts = expert_counts(r.top_idx, cfg.n_experts)
            self.n_dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        else:
            cap = None if self.capacity_factor is None else capacity(len(xf), cfg.n_experts, cfg.top_k,
                                                                       self.capacity_factor)
            disp = dispatch(r.top_idx, cfg.n_experts, cap)
            y = experts_grouped(xf, disp, self.w1, self.w2, r.gates)
            self.counts, self.n_dropped = disp.counts, disp.n_dropped
        if self.shared is not None:
            y = y + self.shared(xf)
        self.aux = switch_aux_loss(r.scores, r.top_idx, cfg.n_experts) if cfg.balance == "aux" else None
        self.gate_mass = r.gates.detach().float().sum(dim=-1).mean()  # the share of E_i(x) that reaches y
        return y.view(B, T, d)

    @torch.no_grad()
    def update_bias(self):
        """Wang et al. Algorithm 1, after each training step: e_i = mean(c) - c_i, b_i += u · sign(e_i)."""
        c = self.counts.float()
        self.bias += self.cfg.bias_rate * torch.sign(c.mean() - c)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, §3.3, eq. 5): the mean over the B tokens of the squared
    log-sum-exp of each token's router logits, (1/B) Σ_j (log Σ_i e^{x_ji})², in float32. It penalises large
    logits, whose exponentials round badly in low precision, and leaves the softmax's argmax alone."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class ZLossMoE(MoE):
    """The MoE layer with the router z-loss beside its balancing loss: ``self.z`` holds this step's z-loss
    (the GPT adds c_z times its sum over layers to the training loss). The logits are recomputed from x and
    W_r in the router's precision (one (N, d) x (d, E) product more): the layer's forward is the one above."""

    def forward(self, x):
        y = super().forward(x)
        dtype = torch.float32 if self.cfg.router_dtype == "fp32" else torch.bfloat16
        logits = x.reshape(-1, x.shape[-1]).to(dtype) @ self.router.to(dtype).t()
        self.z = router_z_loss(logits)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        moe = ZLossMoE if cfg.z_loss else MoE
        self.ffn = moe(cfg) if cfg.ffn == "moe" else MLP(cfg.d_model, cfg.d_ff, cfg.n_layer)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        if cfg.init_scale is not None:  # Switch §2.4 ("Smaller parameter initialization for stability")
            for name, p in self.named_parameters():
                if p.dim() >= 2 and not name.startswith(("wte", "wpe")):
                    std = math.sqrt(cfg.init_scale / p.shape[1])  # fan_in: (out, in) Linear, (E, in, out) experts, (E, d) router
                    nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(self, idx, targets, reduction: str = "mean"):
        """Returns (cross-entropy, α · Σ_layers aux loss [+ c_z · Σ_layers z-loss]) for (B, T) token ids and
        targets (``reduction="none"``: the cross-entropy of every token, (B*T,))."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied embeddings; (B, T, V)
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)  # fp32
        aux = [m.aux for m in self.moe_layers() if m.aux is not None]
        extra = self.cfg.aux_alpha * torch.stack(aux).sum() if aux else torch.zeros((), device=ce.device)
        if self.cfg.z_loss:
            extra = extra + self.cfg.z_loss * torch.stack([m.z for m in self.moe_layers()]).sum()
        return ce, extra


def param_counts(model: GPT) -> dict[str, int]:
    """Total parameters, and parameters active per token (embeddings excluded from both)."""
    cfg = model.cfg
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe")))
    active = body
    for m in model.moe_layers():
        active -= m.w1.numel() + m.w2.numel()
        active += cfg.top_k * (m.w1[0].numel() + m.w2[0].numel())
    return {"total": body, "active": active}


# --------------------------------------------------------------------------------- data and metrics


class Corpus:
    """Training tokens on the device (random windows: every batch a sample of the whole split); a fixed,
    shuffled validation sample; as many fixed training windows (``train_eval``), to compare the loss on
    seen text with the loss on unseen text.

    The validation windows are ``eval_batches * batch_size`` non-overlapping windows drawn uniformly from
    the whole split (``data.sample_windows``) and then put into batches in a seeded random order, so each
    batch mixes the sources as a training batch does (evidence standard, rule 8: never the first N tokens
    of a source-ordered file). ``val_sources`` (a per-token source index) lets ``evaluate`` report the
    loss per source.

    A uniform sample has the validation split's source mix, which is not the training split's when the
    split is by document and some documents are large (corpus-xl: gcide 29% of train, 34% of val). With
    ``match_shares`` ({source name: share}, e.g. the training split's percentages) and ``val_sources`` and
    ``source_names``, the windows are drawn per source instead (``data.sample_windows_by_source``): each
    source gets its share of the windows (largest-remainder rounding), drawn uniformly among the aligned
    windows whose tokens all come from it, so the sample's token mix is the given one; batches are then
    shuffled as before. A source of ``match_shares`` with no such window in the split gets none (a warning
    says so and the others fill its part); if a source has too few such windows for its share, the sample
    shrinks to the most windows that keep the mix (a warning says so, and ``len(val_starts)`` is smaller).
    Without ``match_shares`` the sample is the uniform one, unchanged."""

    def __init__(self, train: np.ndarray, val: np.ndarray, seq_len: int, batch_size: int, eval_batches: int,
                 device, *, val_sources: np.ndarray | None = None, source_names: list[str] | None = None,
                 seed: int = 0, match_shares: dict[str, float] | None = None):
        from repro_utils import data

        self.train = torch.from_numpy(np.asarray(train, dtype=np.int64)).to(device)
        self.seq_len, self.batch_size, self.device = seq_len, batch_size, device
        n_win = min(eval_batches * batch_size, (len(val) - 1) // (seq_len + 1))
        if n_win < 1:
            raise ValueError(f"{len(val)} validation tokens cannot fill one window of {seq_len}")
        if match_shares is None:
            starts = data.sample_windows(len(val), n_win, seq_len, seed=seed)
        else:
            if val_sources is None or source_names is None:
                raise ValueError("match_shares needs val_sources and source_names (the source of every validation token)")
            if len(val_sources) != len(val):
                raise ValueError(f"val_sources has {len(val_sources)} entries for {len(val)} validation tokens")
            starts = data.sample_windows_by_source(val_sources, source_names, match_shares, n_win, seq_len,
                                                   seed=seed, shortfall="shrink")
            n_win = len(starts)
        starts = starts[np.random.default_rng(seed).permutation(n_win)]  # batches mix sources
        self.val_starts = starts
        x, y = data.windows(val, starts, seq_len, device=device)
        self.val = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n_win, batch_size)]
        self.source_names = source_names
        self.val_src = None
        if val_sources is not None:  # (n_win, seq_len) source of each target token
            idx = starts[:, None] + 1 + np.arange(seq_len)[None, :]
            src = torch.from_numpy(np.asarray(val_sources[idx], dtype=np.int64)).to(device)
            self.val_src = [src[i:i + batch_size] for i in range(0, n_win, batch_size)]
        tstarts = torch.randint(0, len(self.train) - seq_len - 1, (n_win,), generator=torch.Generator().manual_seed(seed))
        t = self.train[tstarts.to(device)[:, None] + torch.arange(seq_len + 1, device=device)]
        self.train_eval = [(t[i:i + batch_size, :-1], t[i:i + batch_size, 1:]) for i in range(0, n_win, batch_size)]

    def sampler(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ar = torch.arange(self.seq_len + 1, device=self.device)

        def next_batch():
            starts = torch.randint(0, len(self.train) - self.seq_len - 1, (self.batch_size,), generator=gen)
            chunk = self.train[starts.to(self.device)[:, None] + ar]
            return chunk[:, :-1], chunk[:, 1:]

        return next_batch

    def sources_per_batch(self) -> list[int]:
        """How many distinct sources each validation batch draws its tokens from (1 would be a source-ordered split)."""
        return [int(s.unique().numel()) for s in self.val_src] if self.val_src is not None else []


def max_violation(counts: torch.Tensor) -> float:
    """Wang et al. eq. 4, MaxVio = (max_i load_i - mean load) / mean load, averaged over layers (rows)."""
    c = counts.double().reshape(-1, counts.shape[-1])
    mean = c.mean(dim=1)
    return float(((c.max(dim=1).values - mean) / mean).mean())


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else \
        torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, capacity_factor: float | None = None, split: str = "val",
             per_source: bool = False) -> dict:
    """Loss on the validation batches (or on the fixed training windows, ``split="train"``); for an MoE also
    the per-layer expert loads summed over the batches, the dropped share (capacity counted per batch of the
    training batch size), and the gate mass (the mean over tokens and layers of Σ_{i∈T} p_i(x), the weight
    with which the experts' output reaches the block). ``per_source``: also the loss per source."""
    model.eval()
    moe = model.moe_layers()
    for m in moe:
        m.capacity_factor = capacity_factor
    losses, counts, dropped, mass = [], 0, 0, []
    src_sum = src_n = None
    batches = corpus.val if split == "val" else corpus.train_eval
    for b, (x, y) in enumerate(batches):
        with _autocast(corpus.device):
            ce, _ = model(x, y, reduction="none")
        losses.append(ce.mean())
        if per_source and split == "val" and corpus.val_src is not None:
            k = len(corpus.source_names)
            src = corpus.val_src[b].reshape(-1)
            s_sum = torch.zeros(k, device=ce.device, dtype=torch.float64).index_add_(0, src, ce.double())
            s_n = torch.zeros(k, device=ce.device, dtype=torch.float64).index_add_(0, src, torch.ones_like(ce, dtype=torch.float64))
            src_sum, src_n = (s_sum, s_n) if src_sum is None else (src_sum + s_sum, src_n + s_n)
        if moe:
            counts = counts + torch.stack([m.counts for m in moe])
            dropped = dropped + torch.stack([m.n_dropped for m in moe]).sum()
            mass.append(torch.stack([m.gate_mass for m in moe]).mean())
    for m in moe:
        m.capacity_factor = model.cfg.capacity_factor
    model.train()
    out = {"loss": float(torch.stack(losses).mean())}
    if src_sum is not None:
        out["per_source"] = {name: float(sm / n) for name, sm, n in zip(corpus.source_names, src_sum.cpu(), src_n.cpu())
                             if n > 0}
    if moe:
        out["counts"] = counts.cpu()  # (L, E)
        out["maxvio_global"] = max_violation(out["counts"])
        out["dropped_frac"] = float(dropped) / float(counts.sum())
        out["gate_mass"] = float(torch.stack(mass).mean())
    return out


def dropped_per_batch(load: np.ndarray, top_k: int, capacity_factor: float) -> np.ndarray:
    """The share of assignments that a capacity would have dropped in each recorded batch, from its loads.

    ``load`` is (steps, L, E): assignments per expert of every layer in every training batch (a dropless
    run records them). Switch eq. 3 counts capacity per batch: cap = ceil(k · T / E · factor) for a batch
    of T tokens; an expert given c > cap assignments drops c - cap. Returns (steps,) dropped / assigned,
    over all layers."""
    load = np.asarray(load, dtype=np.int64)
    n_assign = load.sum(axis=-1)  # (steps, L): k · T in every layer
    E = load.shape[-1]
    n_tok = n_assign[..., :1] // top_k  # (steps, 1)
    cap = np.ceil(top_k * n_tok / E * capacity_factor).astype(np.int64)  # capacity(), vectorised
    over = np.clip(load - cap[..., None], 0, None).sum(axis=(-1, -2))  # (steps,)
    return over / n_assign.sum(axis=-1)


def maxvio_per_batch(load: np.ndarray) -> np.ndarray:
    """Wang et al.'s MaxVio_batch of every recorded batch, averaged over layers: (steps,)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return ((load.max(axis=-1) - mean) / mean).mean(axis=-1)


@contextmanager
def shared_expert_ablated(model, *, replace: bool = True):
    """DeepSeekMoE §4.5's ablation of a trained model, undone on exit: every MoE layer's shared expert is switched
    off and, with ``replace``, one more routed expert is activated instead (top_k + 1: the same computation when, as
    in DeepSeekMoE and in this chapter's shared-1+15 model, the shared expert is as wide as a routed one). Without
    ``replace`` the shared expert is only switched off: the control that shows it carries something at all."""
    layers = model.moe_layers()
    if not layers or any(m.shared is None for m in layers):
        raise ValueError("shared_expert_ablated needs a model whose every MoE layer has a shared expert (n_shared >= 1)")
    saved = [(m, m.cfg, m.shared) for m in layers]
    try:
        for m, cfg, _ in saved:
            top_k = cfg.top_k + 1 if replace else cfg.top_k
            if top_k > cfg.n_experts:
                raise ValueError(f"top_k + 1 = {top_k} exceeds the {cfg.n_experts} routed experts")
            m.cfg, m.shared = dataclasses.replace(cfg, top_k=top_k, n_shared=0), None
        yield model
    finally:
        for m, cfg, shared in saved:
            m.cfg, m.shared = cfg, shared


def unstable(res, rise: float = 0.5) -> bool:
    """The control of router-z-loss-stress: a run that diverged (a non-finite loss) or whose validation loss rose
    by more than ``rise`` nats from one evaluation to the next (a loss spike that training had to recover from)."""
    if res.diverged or not all(math.isfinite(v) for v in res.val_loss):
        return True
    return any(b - a > rise for a, b in zip(res.val_loss, res.val_loss[1:]))


# ------------------------------------------------------------------------------------------ training


@dataclass
class TrainResult:
    name: str
    cfg: GPTConfig
    seed: int
    lr: float = 0.0  # peak learning rate
    tokens: list[int] = field(default_factory=list)  # tokens seen at each evaluation
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # on the fixed training windows, at the end
    gate_mass: list[float] = field(default_factory=list)  # MoE: mean Σ gates per token on validation
    load: np.ndarray | None = None  # (steps, L, E) tokens per expert of each training batch
    final: dict = field(default_factory=dict)  # the last evaluation (loss, counts, maxvio_global, ...)
    seconds: float = 0.0  # training time, evaluations excluded
    tokens_per_s: float = 0.0
    diverged: bool = False
    params: dict = field(default_factory=dict)
    model: GPT | None = None

    def maxvio_batch(self) -> np.ndarray:
        """MaxVio of every training batch (Wang et al. MaxVio_batch), averaged over layers: (steps,)."""
        return maxvio_per_batch(self.load)

    def summary(self) -> dict:
        """A JSON-serialisable record of the run (no model, no per-step loads)."""
        out = {"name": self.name, "seed": self.seed, "lr": self.lr, "tokens": self.tokens, "val_loss": self.val_loss,
               "train_loss": self.train_loss, "gate_mass": self.gate_mass,
               "final_loss": self.final["loss"], "seconds": round(self.seconds, 2),
               "tokens_per_s": round(self.tokens_per_s), "diverged": self.diverged, "params": self.params,
               "config": {k: v for k, v in self.cfg.__dict__.items()}}
        if "per_source" in self.final:
            out["val_loss_per_source"] = self.final["per_source"]
        if "counts" in self.final:
            out["maxvio_global"] = self.final["maxvio_global"]
            out["val_counts"] = self.final["counts"].tolist()
        return out


def lr_at(step: int, steps: int, lr: float, warmup: int, min_frac: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_frac * lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup - 1)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(name: str, cfg: GPTConfig, corpus: Corpus, *, steps: int, lr: float, seed: int, warmup: int = 50,
          eval_every: int = 25, weight_decay: float = 0.1, keep_model: bool = False, progress=None) -> TrainResult:
    """AdamW, linear warm-up then cosine decay to a tenth of the peak at the last step (``lr_at``; every run
    gets the same token budget, so the schedule ends where the budget does), bf16 autocast on the GPU,
    gradient clipping at 1. The loss on the fixed training windows and per source is taken at the end only."""
    device = corpus.device
    torch.manual_seed(seed)  # same seed, same initial weights for the same architecture
    model = GPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                            fused=torch.device(device).type == "cuda")
    next_batch = corpus.sampler(seed)
    res = TrainResult(name, cfg, seed, lr=lr, params=param_counts(model))
    moe, loads = model.moe_layers(), []
    tokens_per_step = corpus.batch_size * corpus.seq_len
    train_time = 0.0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            ev = evaluate(model, corpus, per_source=step == steps)
            res.tokens.append(step * tokens_per_step)
            res.val_loss.append(ev["loss"])
            if step == steps:
                res.train_loss.append(evaluate(model, corpus, split="train")["loss"])
            if moe:
                res.gate_mass.append(ev["gate_mass"])
            res.final = ev
            if not math.isfinite(ev["loss"]):
                res.diverged = True
                break
        if step == steps:
            break
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        x, y = next_batch()
        with _autocast(device):
            ce, aux = model(x, y)
        opt.zero_grad(set_to_none=True)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if moe:
            if cfg.balance == "bias":
                for m in moe:
                    m.update_bias()
            loads.append(torch.stack([m.counts for m in moe]))  # stays on the device: no sync per step
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
    res.seconds = train_time
    res.tokens_per_s = (len(loads) if moe else steps) * tokens_per_step / max(train_time, 1e-9)
    if loads:
        res.load = torch.stack(loads).cpu().numpy()
    if keep_model:
        res.model = model
    return res


class Budget:
    """A wall-clock budget for the notebook (the safety valve): a training run starts only if its expected
    time, plus what the sections after it need (``reserve``), fits in what is left; otherwise the claims
    that needed it are recorded as untested ("time budget") and the run still finishes and saves its ledger.
    ``seconds`` <= 0 means no budget. ``t0`` is when the clock started (the run's start)."""

    def __init__(self, seconds: float, t0: float | None = None, reserve: float = 0.0):
        self.seconds, self.t0, self.reserve = seconds, time.time() if t0 is None else t0, reserve
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds <= 0 else self.seconds - self.elapsed()

    def fits(self, expected_s: float, what: str = "") -> bool:
        ok = expected_s + self.reserve <= self.left()
        if not ok and what:
            self.skipped.append(what)
        return ok


def best_lr(final_losses: dict[float, float]) -> tuple[float, bool]:
    """The learning rate of a bracket with the lowest final validation loss, and whether it lies inside the
    bracket (not at its smallest or largest rate: then the optimum may lie outside what was tried)."""
    lrs = sorted(final_losses)
    finite = {lr: v for lr, v in final_losses.items() if math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else lrs[len(lrs) // 2]
    return best, len(lrs) >= 3 and lrs[0] < best < lrs[-1]


def tokens_to_target(tokens: list[int], losses: list[float], target: float) -> float | None:
    """Tokens at which a validation curve first reaches ``target`` (linear interpolation); None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], loss
            return t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return None


def spearman(x, y) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):  # average the ranks of ties
            r[v == val] = r[v == val].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def routing_flip_rate(model: GPT, corpus: Corpus) -> float:
    """Fraction of first-choice decisions that change when the router of an fp32-router model is
    recomputed in bf16, on the validation set (the mechanism behind Switch §2.4)."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0]))) for m in model.moe_layers()]
    flips = total = 0
    try:
        model.eval()
        for x, y in corpus.val:
            inputs.clear()
            with _autocast(corpus.device):
                model(x, y)
            for m, h in inputs:
                h = h.reshape(-1, h.shape[-1])
                a = route(h, m.router, 1, gate=m.cfg.gate, dtype=torch.float32).top_idx
                b = route(h, m.router, 1, gate=m.cfg.gate, dtype=torch.bfloat16).top_idx
                flips += int((a != b).sum())
                total += a.numel()
    finally:
        for hk in hooks:
            hk.remove()
        model.train()
    return flips / max(total, 1)


# --------------------------------------------------------------------------------------- systems bill


def forced_routing(n_tokens: int, n_experts: int, top_k: int, kind: str, device, seed: int = 0) -> Routing:
    """Routing decisions made up for timing. ``balanced``: every expert gets exactly N·k/E assignments.
    ``skewed``: every token's first choice is expert 0 (half of all assignments for k = 2: MaxVio = E/2 - 1),
    the other choices spread evenly over the remaining experts."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n_tokens)
    if kind == "balanced":
        top_idx = torch.stack([(t * top_k + c) % n_experts for c in range(top_k)], dim=1)
    elif kind == "skewed":
        cols = [torch.zeros(n_tokens, dtype=torch.long)]
        cols += [1 + (t * (top_k - 1) + c) % (n_experts - 1) for c in range(top_k - 1)]
        top_idx = torch.stack(cols, dim=1)
    else:
        raise ValueError(f"forced_routing kind={kind!r}: expected 'balanced' or 'skewed'")
    top_idx = top_idx[torch.randperm(n_tokens, generator=g)]
    gates = torch.rand(n_tokens, top_k, generator=g)
    return Routing(top_idx.to(device), gates.to(device), torch.empty(0, device=device))


def _bench_tensors(n_tokens, d_model, d_expert, n_experts, top_k, device, seed):
    torch.manual_seed(seed)
    dt = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def p(*shape, std=0.02):
        return (torch.randn(*shape, device=device) * std).to(dt).requires_grad_()

    return dict(dt=dt, x=torch.randn(n_tokens, d_model, device=device).to(dt).requires_grad_(),
                router=(torch.randn(n_experts, d_model, device=device) * 0.02).requires_grad_(),
                w1=p(n_experts, d_model, d_expert), w2=p(n_experts, d_expert, d_model),
                dense1=p(top_k * d_expert, d_model), dense2=p(d_model, top_k * d_expert),  # F.linear layout
                dy=torch.randn(n_tokens, d_model, device=device).to(dt))


def dense_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The dense baseline: gelu(x W1ᵀ) W2ᵀ, two cuBLAS matmuls (``F.linear``)."""
    return F.linear(F.gelu(F.linear(x, w1)), w2)


def moe_ffn(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, top_k: int,
            r: Routing | None = None) -> torch.Tensor:
    """The benchmarked MoE layer, dropless: fp32 router, dispatch, grouped experts and combine."""
    r = route(x, router, top_k) if r is None else r
    return experts_grouped(x, dispatch(r.top_idx, w1.shape[0]), w1, w2, r.gates)


def bench_layer(n_tokens: int, d_model: int, d_expert: int, n_experts: int, top_k: int, device,
                time_fn, seed: int = 0, replicates: int = 5) -> dict:
    """Time one FFN layer, forward and forward+backward, bf16 on the GPU (fp32 on the CPU):
    the grouped MoE layer and the loop MoE layer (both with their fp32 router), and a dense FFN of
    width k·d_expert (the same active parameters). Also the experts alone (no router) under balanced and
    skewed routing. Returns milliseconds (medians of ``time_fn``, launched eagerly from Python) and tokens/s.
    On the GPU, grouped and dense forward + backward are also timed as CUDA-graph replays (``grouped_fwdbwd_graph``,
    ``dense_fwdbwd_graph``): the GPU's own time, which grouped-vs-dense grades. Eagerly, the grouped layer's
    many small kernels wait on the host's launch path at this size while the dense FFN's few large ones do not;
    the loop syncs with the host per expert and cannot be captured, so grouped-vs-loop compares eager times.
    ``ratios`` holds the goals' replicates: ``replicates`` speed-ups of the grouped layer's forward + backward
    over the dense FFN (graphed on the GPU, eager on the CPU) and over the loop (eager), each from its own
    pair of timings, the two layers alternating (``repro_utils.bench.ratios``)."""
    t = _bench_tensors(n_tokens, d_model, d_expert, n_experts, top_k, device, seed)
    x, router, w1, w2, dy = t["x"], t["router"], t["w1"], t["w2"], t["dy"]

    def grouped(r=None):
        return moe_ffn(x, router, w1, w2, top_k, r)

    def loop(r=None):
        r = route(x, router, top_k) if r is None else r
        return experts_loop(x, r.top_idx, r.gates.to(t["dt"]), w1, w2)

    def dense():
        return dense_ffn(x, t["dense1"], t["dense2"])

    def fwd_bwd(f, params):
        def run():
            torch.autograd.grad(f(), params, dy)
        return run

    moe_params, dense_params = [x, router, w1, w2], [x, t["dense1"], t["dense2"]]
    timings = {}
    for name, f, params in [("grouped", grouped, moe_params), ("loop", loop, moe_params),
                            ("dense", dense, dense_params)]:
        timings[f"{name}_fwd"] = time_fn(lambda f=f: f()).ms
        timings[f"{name}_fwdbwd"] = time_fn(fwd_bwd(f, params)).ms
    for kind in ("balanced", "skewed"):
        r = forced_routing(n_tokens, n_experts, top_k, kind, device, seed)
        r.gates = r.gates.to(t["dt"])
        timings[f"grouped_{kind}_fwd"] = time_fn(lambda r=r: grouped(r)).ms
        timings[f"loop_{kind}_fwd"] = time_fn(lambda r=r: loop(r)).ms
        timings[f"maxvio_{kind}"] = max_violation(expert_counts(r.top_idx, n_experts).cpu())
    graph_errors = {}
    if torch.device(device).type == "cuda":
        for name, f, params in [("grouped", grouped, moe_params), ("dense", dense, dense_params)]:
            try:
                timings[f"{name}_fwdbwd_graph"] = time_fn(fwd_bwd(f, params), graph=True).ms
            except RuntimeError as e:  # a host sync or a data-dependent shape: recorded, and the claim says so
                graph_errors[name] = str(e).strip().splitlines()[0][:300]
    from repro_utils.bench import ratios

    graphed = torch.device(device).type == "cuda" and not graph_errors
    reps = {"grouped_vs_dense_fwdbwd": ratios(fwd_bwd(dense, dense_params), fwd_bwd(grouped, moe_params),
                                              replicates=replicates, graph=graphed, timer=time_fn),
            "grouped_vs_loop_fwdbwd": ratios(fwd_bwd(loop, moe_params), fwd_bwd(grouped, moe_params),
                                             replicates=replicates, timer=time_fn),
            "dense_graphed": graphed}
    return {"ms": timings, "graph_errors": graph_errors, "ratios": reps,
            "tokens_per_s": {k: n_tokens / (v / 1e3) for k, v in timings.items() if not k.startswith("maxvio")}}


def bench_parts(n_tokens: int, d_model: int, d_expert: int, n_experts: int, top_k: int, device,
                time_fn, seed: int = 0) -> dict[str, dict[str, float]]:
    """Where the grouped layer's time goes: each stage timed alone (forward, and forward + backward with
    respect to its inputs), on the inputs the previous stage produced; beside it the dense FFN's three
    stages. {stage: {"fwd": ms, "fwdbwd": ms}}; the dispatch indices have no backward."""
    t = _bench_tensors(n_tokens, d_model, d_expert, n_experts, top_k, device, seed)
    x, router, w1, w2 = t["x"], t["router"], t["w1"], t["w2"]
    with torch.no_grad():
        r = route(x, router, top_k)
        d = dispatch(r.top_idx, n_experts)
        h1 = grouped_mm(to_experts(x, d), w1, d.offsets)
        y = grouped_mm(F.gelu(h1), w2, d.offsets)
        hd = F.linear(x, t["dense1"])
    leaf = lambda v: v.detach().requires_grad_()  # noqa: E731
    xs, h1, h, y, gates = leaf(to_experts(x, d)), leaf(h1), leaf(F.gelu(h1)), leaf(y), leaf(r.gates)
    hd, hd_act = leaf(hd), leaf(F.gelu(hd))
    stages = {  # name: (forward, the inputs to differentiate, or None)
        "router (fp32)": (lambda: route(x, router, top_k).gates, [x, router]),
        "sort + offsets": (lambda: dispatch(r.top_idx, n_experts).pos, None),
        "gather to experts": (lambda: to_experts(x, d), [x]),
        "grouped GEMM 1": (lambda: grouped_mm(xs, w1, d.offsets), [xs, w1]),
        "gelu": (lambda: F.gelu(h1), [h1]),
        "grouped GEMM 2": (lambda: grouped_mm(h, w2, d.offsets), [h, w2]),
        "combine": (lambda: combine(y, d, gates), [y, gates]),
        "dense GEMM 1": (lambda: F.linear(x, t["dense1"]), [x, t["dense1"]]),
        "dense gelu": (lambda: F.gelu(hd), [hd]),
        "dense GEMM 2": (lambda: F.linear(hd_act, t["dense2"]), [hd_act, t["dense2"]]),
    }
    out = {}
    for name, (f, params) in stages.items():
        out[name] = {"fwd": time_fn(f).ms}
        if params is not None:
            g = torch.randn_like(f())

            def run(f=f, params=params, g=g):
                torch.autograd.grad(f(), params, g)
            out[name]["fwdbwd"] = time_fn(run).ms
    return out
