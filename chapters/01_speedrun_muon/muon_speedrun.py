"""The nanoGPT speedrun's ingredients, small enough to read in one sitting.

What chapter 01 studies, in the order the notebook shows it:

1. ``GPT``: a GPT-2 whose architecture changes are switches (``GPTConfig``): RMSNorm, rotary positions,
   QK-norm, ReLU², zero-initialised projections, an untied head. With every switch off it is the
   llm.c / nanoGPT GPT-2; with every switch on it is the 124M model of the modded-nanogpt records of
   October-November 2024 (KellerJordan/modded-nanogpt, records/track_1_short/2024-10-14_ModernArch and
   2024-11-03_UntieEmbed).
2. ``newton_schulz``: the quintic Newton-Schulz iteration with coefficients (3.4445, -4.7750, 2.0315),
   in bfloat16, after Frobenius normalisation (KellerJordan/Muon, ``muon.py``).
3. ``Muon``: SGD with Nesterov momentum whose update is orthogonalised by ``newton_schulz``; on several
   processes each rank orthogonalises a share of the matrices and they are gathered.
4. ``split_params`` / ``build_optimizers``: Muon for the 2-D matrices inside the blocks; AdamW for the
   embeddings, the head and every gain and bias.
5. ``train``: one training run, the same code on one process or under
   ``torchrun --nproc_per_node=N muon_speedrun.py ...`` (DDP; gloo on CPU, NCCL on GPU).
6. ``tokens_to_target`` / ``budget_to_target``: how many tokens a run needs to reach a target loss.
7. ``bench_step``: the step time of the 124M model, plain GPT-2 + AdamW against the modern one + Muon.
8. ``scaling_sweep``: tokens/s of ``train`` on 1, 2, 4, 8 GPUs and the loss parity of N GPUs with one
   (``muon_speedrun.py sweep --out DIR``; its docstring gives the one command for a multi-GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1. The model


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 tokens padded to a multiple of 128
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    seq_len: int = 1024
    # The ladder: each switch is one change the speedrun records adopted. All off = llm.c's GPT-2.
    rmsnorm: bool = False  # parameter-free RMSNorm and no biases (GPT-2: LayerNorm with gain/bias, biased linears)
    rotary: bool = False  # rotary position embeddings on q, k (GPT-2: learned absolute positions)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    relu2: bool = False  # ReLU(x)² in the MLP (GPT-2: GELU)
    zero_init: bool = False  # the two output projections of each block start at zero
    untied: bool = False  # input embedding and output head are separate matrices; head starts at zero
    embed_std: float = 0.02  # init of the token embedding (record 8: PyTorch's default N(0, 1), then an RMSNorm)


# The rungs of the ladder, each adding one change to the one above (the record that adopted it in brackets).
LADDER = [
    ("GPT-2 (llm.c)", {}),
    ("+ RMSNorm, no biases", dict(rmsnorm=True)),  # 10/04/24 README: "rotary embeddings and RMSNorm"
    ("+ rotary", dict(rotary=True)),  # record 2, 06/06/24
    ("+ QK-norm", dict(qk_norm=True)),  # record 5, 10/14/24
    ("+ ReLU²", dict(relu2=True)),  # record 5
    ("+ zero-init projections", dict(zero_init=True)),  # record 5
    ("+ untied head", dict(untied=True)),  # record 8, 11/03/24
]
MODERN = dict(rmsnorm=True, rotary=True, qk_norm=True, relu2=True, zero_init=True, untied=True)


def ladder_configs(base: GPTConfig) -> list[tuple[str, GPTConfig]]:
    """[(rung name, config)], each rung with every change of the rungs above it."""
    out, flags = [], {}
    for name, change in LADDER:
        flags.update(change)
        out.append((name, replace(base, **flags)))
    return out


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Norm(nn.Module):
    """LayerNorm with gain and bias (GPT-2), or RMSNorm with no parameters (the records)."""

    def __init__(self, dim: int, rms: bool):
        super().__init__()
        self.ln = None if rms else nn.LayerNorm(dim)

    def forward(self, x):
        return rms_norm(x) if self.ln is None else self.ln(x)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × frequency, (seq_len, head_dim / 2) each (Su et al. 2021, RoFormer eq. 34)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1_i, x2_i) of a head by its position's angle. x: (B, T, nh, hd)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[None, : x.size(1), None, :], sin[None, : x.size(1), None, :]  # (1, T, 1, hd/2)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.cfg, self.n_head, self.head_dim = cfg, cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=not cfg.rmsnorm)
        self.qkv.weight.ns_chunks = 3  # Muon orthogonalises W_q, W_k, W_v separately, as the records do
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=not cfg.rmsnorm)
        self.proj.residual = True
        if cfg.rotary:
            cos, sin = rotary_tables(cfg.seq_len, self.head_dim)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, nh, hd)
        if self.cfg.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if self.cfg.rotary:
            q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)  # (B, nh, T, hd), a fused kernel where one exists
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.relu2 = cfg.relu2
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=not cfg.rmsnorm)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=not cfg.rmsnorm)
        self.proj.residual = True

    def forward(self, x):
        h = self.fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")  # ReLU²: So et al. 2021, Primer
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1, self.attn = Norm(cfg.n_embd, cfg.rmsnorm), CausalSelfAttention(cfg)
        self.norm2, self.mlp = Norm(cfg.n_embd, cfg.rmsnorm), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = None if cfg.rotary else nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.embed_norm = Norm(cfg.n_embd, cfg.rmsnorm) if cfg.untied else None  # record 8 norms the embedding
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = Norm(cfg.n_embd, cfg.rmsnorm)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if not cfg.untied:
            self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.apply(self._init)

    def _init(self, m):
        # GPT-2 / nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer) (GPT-2 paper, §2.3)
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "residual", False) and self.cfg.zero_init:
                nn.init.zeros_(m.weight)  # records 5+: "zero init suggested by @Grad62304977"
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if m is self.lm_head and self.cfg.untied:
                nn.init.zeros_(m.weight)  # record 8: "init head to zero"
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.cfg.embed_std if m is self.wte else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy. idx, targets: (B, T) int64."""
        return self.loss(self.hidden(idx), targets)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The last block's output, (B, T, C), before the final norm and the head."""
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1), device=idx.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x)
        return x

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm_f(x)).float()  # (B, T, V), the softmax in fp32
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every target token, (B, T): for validation loss per source."""
        logits = self.lm_head(self.norm_f(self.hidden(idx))).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply per token: the blocks' and the head's (not the lookups)."""
        return sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 N + 12 L d T (PaLM, Chowdhery et al. 2022, App. B), N = matmul parameters."""
    c = model.cfg
    return 6 * model.matmul_params() + 12 * c.n_layer * c.n_embd * c.seq_len


def compile_regions(model: GPT) -> GPT:
    """Regional compilation: every block shares one compiled graph (compile time of one block, not twelve).
    Static shapes: a model of another size gets its own kernels, never slower shape-generic ones. One process trains
    several architectures (records 4, 5 and 8, each also evaluated and forked), and every one of them is a new graph
    of the same ``Block.forward``: dynamo's default limit of 8 graphs per function was reached in the H200 run at
    6f8498c (torch logged it during §2; the page's tidy removes torch's log lines), after which new shapes ran
    eagerly. 64 leaves room for every arm."""
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.blocks:
        block.compile(dynamic=False)
    model.loss = torch.compile(model.loss, dynamic=False)  # the head and the cross-entropy: one fused graph
    return model


# ----------------------------------------------------------------------------------------------------
# 2. Newton-Schulz and Muon

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # KellerJordan/Muon, muon.py: chosen to maximise the slope at zero


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T, batched over leading dimensions, in bfloat16.

    Each step applies the odd polynomial p(x) = a x + b x^3 + c x^5 to every singular value at once:
    X <- a X + b (X X^T) X + c (X X^T)^2 X. Dividing by the Frobenius norm first puts every singular
    value in [0, 1]; five steps of p push them into roughly [0.7, 1.2] instead of exactly 1.
    """
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: X X^T is the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # ||X||_2 <= ||X||_F = 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def polar(G: torch.Tensor) -> torch.Tensor:
    """The exact polar factor U V^T of G = U S V^T (thin SVD in float32), batched over leading dimensions:
    what Newton-Schulz approximates. Singular values that are exactly zero map to zero, as in NS."""
    U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    tol = S.amax(-1, keepdim=True) * max(G.shape[-2:]) * torch.finfo(torch.float32).eps  # numpy's matrix_rank rule
    keep = (S > tol).to(U.dtype)  # a rank-deficient G: its null directions stay zero
    return (U * keep.unsqueeze(-2)) @ Vh


def polar_newton(G: torch.Tensor, quintic_steps: int = 16, cubic_steps: int = 8) -> torch.Tensor:
    """The polar factor U V^T by iteration, in float64, batched: what ``polar`` computes with an SVD, at the
    cost of matrix products (on a GPU, ~40x faster than torch's SVD for the chapter's 256-wide matrices).

    After division by the Frobenius norm every singular value lies in (0, 1]. Muon's quintic first lifts the
    small ones fast (slope 3.4445 at zero: 16 steps take 2e-9 up into its [0.68, 1.13] cycle); then the
    classical cubic Newton-Schulz step X <- 1.5 X - 0.5 X X^T X, which converges quadratically to 1 from
    anywhere in (0, sqrt(3)), brings every one of them to 1 within float64 rounding (8 steps from 0.32 off).
    Singular values below ~2e-9 of the norm, zero included, stay near zero, where the SVD version (float32)
    zeros those below ~1e-4 of the largest; the tests compare the two where neither is at that edge."""
    a, b, c = NS_COEFFS
    X = G.double()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    for _ in range(quintic_steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    for _ in range(cubic_steps):
        X = 1.5 * X - 0.5 * (X @ X.mT) @ X
    return X.mT if tall else X


def scalar_map_range(iterations: int = 200, steps_tail: int = 2, grid: int = 20001, lo: float = 1e-3) -> tuple[float, float]:
    """Where the quintic's scalar map p(x) = a x + b x^3 + c x^5 settles "upon repeated application" (README):
    the smallest and largest value over the last ``steps_tail`` iterates of every start in [lo, 1], float64.
    The map has no stable fixed point near 1: it ends on a 4-cycle (0.682 -> 1.134 -> 0.753 -> 1.047 -> 0.682),
    so the range is that of the cycle."""
    a, b, c = NS_COEFFS
    x = np.linspace(lo, 1.0, grid)
    tail = []
    for i in range(iterations):
        x = a * x + b * x**3 + c * x**5
        if i >= iterations - steps_tail:
            tail.append(x.copy())
    t = np.concatenate(tail)
    return float(t.min()), float(t.max())


def ns_lift_threshold(steps: int = 5, level: float = 0.68, lo: float = 1e-9) -> float:
    """The smallest normalised singular value that ``steps`` applications of the quintic lift to ``level`` or above:
    inputs below it end below ``level``. The map is increasing from 0 up to its first crossing, so the crossing is
    found by bisection in log space after a scan (float64). Five steps: about 0.0015 (0.003 already ends at 1.11)."""
    a, b, c = NS_COEFFS

    def p(x):
        for _ in range(steps):
            x = a * x + b * x**3 + c * x**5
        return x

    x = np.logspace(math.log10(lo), 0, 4001)
    above = np.nonzero(p(x) >= level)[0]
    if len(above) == 0 or above[0] == 0:
        raise ValueError(f"{steps} steps reach {level} from no start in [{lo}, 1], or from every one")
    left, right = math.log(x[above[0] - 1]), math.log(x[above[0]])
    for _ in range(100):
        mid = (left + right) / 2
        left, right = (mid, right) if p(math.exp(mid)) < level else (left, mid)
    return math.exp(right)


ORTHO_METHODS = ("ns5", "svd", "newton")


def ortho_arm(method: str, ns_steps: int = 5) -> tuple[str, int]:
    """(method, Newton-Schulz steps) that ``orthogonalize`` takes for the name of one of Muon's orthogonalisations.

    "ns5" is the quintic iteration, run for ``ns_steps`` steps (the records: five); "ns1" ... "ns9" name the same
    quintic cut short (or run longer) at that many steps, e.g. "ns2" for §4's control arm, a deliberately worse
    orthogonalisation; "svd" and "newton" are the exact polar factor U V^T (steps unused)."""
    if len(method) == 3 and method[:2] == "ns" and method[2].isdigit() and method != "ns5":
        steps = int(method[2])
        if steps < 1:
            raise ValueError(f"{method!r}: Newton-Schulz needs at least one step")
        return "ns5", steps
    if method not in ORTHO_METHODS:
        raise ValueError(f"method must be one of {ORTHO_METHODS} or 'ns1'...'ns9', not {method!r}")
    return method, ns_steps


def orthogonalize(mats: list[torch.Tensor], chunks: list[int], steps: int = 5, method: str = "ns5") -> list[torch.Tensor]:
    """Newton-Schulz (``method="ns5"``) or the exact polar factor (``"svd"``: by SVD; ``"newton"``: by
    ``polar_newton``) of every matrix (a matrix with k
    chunks is k stacked matrices), scaled by sqrt(max(1, rows/cols)) as in the records. Pieces of the same
    shape share one batched call."""
    if method not in ORTHO_METHODS:
        raise ValueError(f"method must be one of {ORTHO_METHODS}, not {method!r}")
    groups = defaultdict(list)  # (short side, long side) -> [(matrix index, chunk index, transposed, piece)]
    for i, (G, k) in enumerate(zip(mats, chunks)):
        for j, piece in enumerate(G.view(k, -1, G.size(-1)).unbind(0)):
            tall = piece.size(0) > piece.size(1)
            groups[tuple(sorted(piece.shape))].append((i, j, tall, piece.mT if tall else piece))
    out = [torch.empty_like(G) for G in mats]
    for entries in groups.values():
        stack = torch.stack([e[3] for e in entries])
        ortho = (newton_schulz(stack, steps) if method == "ns5" else
                 (polar(stack) if method == "svd" else polar_newton(stack)).to(stack.dtype))
        for (i, j, tall, _), o in zip(entries, ortho):
            o = o.mT if tall else o
            out[i].view(chunks[i], -1, mats[i].size(-1))[j].copy_(o * max(1.0, o.size(0) / o.size(1)) ** 0.5)
    return out


def orthogonalize_seconds(cfg: GPTConfig, method: str, device="cpu", reps: int = 3) -> float:
    """Seconds one Muon step spends in ``orthogonalize`` for ``cfg``'s hidden matrices (random inputs of their shapes
    and chunks, float32), the median of ``reps`` timed calls after one warm-up call. The budget valve uses it to
    foresee a run's cost before starting it: on the H200 (2026-12-04) the float32 SVD of the polar arm made a
    4-layer, 256-wide run take ~200 ms a step against ~20 ms with NS5, which no estimate from NS5 runs foresaw."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, not {reps}")
    with torch.device("meta"):
        hidden = split_params(GPT(cfg))["hidden"]
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(p.shape, generator=gen).to(device) for p in hidden]
    chunks = [getattr(p, "ns_chunks", 1) for p in hidden]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(reps + 1):
        sync()
        t = time.perf_counter()
        orthogonalize(mats, chunks, method=method)
        sync()
        if i:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def ns_singular_values(kept: list[tuple[torch.Tensor, torch.Tensor]], device="cpu", steps: int = 5) -> dict:
    """Singular values of the matrices Muon orthogonalised at one step (``Muon.kept``), piece by piece as
    ``orthogonalize`` sees them: 'input' (divided by the piece's Frobenius norm) and 'output' (after NS)."""
    s_in, s_out = [], []
    for p, G in kept:
        for piece in G.view(getattr(p, "ns_chunks", 1), -1, G.size(-1)).unbind(0):
            s_in.append(torch.linalg.svdvals(piece / piece.norm()))
            s_out.append(torch.linalg.svdvals(newton_schulz(piece.to(device), steps).float().cpu()))
    return dict(input=torch.cat(s_in).numpy(), output=torch.cat(s_out).numpy())


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024), for 2-D hidden matrices only.

    B_t = mu B_{t-1} + G_t;  G'_t = G_t + mu B_t (Nesterov);  W_t = W_{t-1} - lr * NS5(G'_t).
    On several processes (torch.distributed), matrices of each shape are dealt out round-robin: each
    rank orthogonalises its share, then all_gather hands every rank every updated matrix.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, method: str = "ns5"):
        params = list(params)
        if not params or any(p.ndim != 2 for p in params):
            raise ValueError("Muon takes a non-empty list of 2-D matrices; give embeddings, head, gains and biases to AdamW")
        method, ns_steps = ortho_arm(method, ns_steps)  # "ns2": the quintic for two steps (a worse orthogonalisation)
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, method=method))
        self.keep_inputs = False  # when True, the next step keeps (param, NS input) pairs in self.kept
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        rank, world = rank_world()
        for group in self.param_groups:
            by_shape = defaultdict(list)
            for p in group["params"]:
                by_shape[tuple(p.shape)].append(p)
            mine = [p for ps in by_shape.values() for p in ps[rank::world]]  # my share: index % world == rank
            inputs = []
            for p in mine:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)  # B_t = mu B_{t-1} + G_t
                inputs.append(g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf.clone())
            if self.keep_inputs:
                self.kept = [(p, G.detach().float().cpu()) for p, G in zip(mine, inputs)]
                self.keep_inputs = False
            updates = orthogonalize(inputs, [getattr(p, "ns_chunks", 1) for p in mine], group["ns_steps"],
                                    group.get("method", "ns5"))
            for p, u in zip(mine, updates):
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(u, alpha=-group["lr"])
            if world > 1:  # gather: chunk i of each shape holds params i*world ... i*world + world - 1
                for ps in by_shape.values():
                    for i in range(0, len(ps), world):
                        chunk = list(ps[i:i + world])
                        chunk += [torch.empty_like(chunk[0]) for _ in range(world - len(chunk))]
                        dist.all_gather(chunk, chunk[rank])
        return None


# ----------------------------------------------------------------------------------------------------
# 3. Which parameter goes to which optimizer


def split_params(model: GPT) -> dict[str, list[nn.Parameter]]:
    """'hidden': the 2-D matrices inside the blocks (Muon's); 'embed_head': embeddings and output head;
    'gains_biases': every 1-D parameter (LayerNorm gains and biases, linear biases)."""
    hidden = [p for p in model.blocks.parameters() if p.ndim == 2]
    gains_biases = [p for p in model.parameters() if p.ndim < 2]
    taken = {id(p) for p in hidden + gains_biases}
    embed_head = [p for p in model.parameters() if id(p) not in taken]  # parameters() lists a tied matrix once
    return dict(hidden=hidden, embed_head=embed_head, gains_biases=gains_biases)


@dataclass(frozen=True)
class RunConfig:
    optimizer: str = "muon"  # what trains the hidden matrices: "muon" or "adamw"
    lr: float = 0.02  # Muon's lr, or AdamW's lr for the hidden matrices
    adam_lr: float = 0.0018  # AdamW lr for gains and biases (and the hidden matrices when optimizer="adamw": lr)
    embed_lr: float = 0.0036  # AdamW lr for embeddings and head (records: 0.0036)
    momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0  # the records: zero; llm.c: 0.1 on matrices
    batch_size: int = 16  # sequences per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per step on each process
    tokens: int = 2**22  # training budget
    schedule: str = "trapezoid"  # "trapezoid" (records: constant, then linear warmdown) or "cosine" (llm.c)
    warmup_frac: float = 0.0
    warmdown_frac: float = 1450 / 5100  # the records' 1450 warmdown steps of 5100
    eval_every: int = 32  # steps; 0: only at the end
    eval_tokens: int = 65536
    seed: int = 0
    compile: bool = False
    keep_ns_inputs_at: float | None = None  # fraction of the run at which Muon keeps its NS inputs
    head_lr: float | None = None  # untied models: AdamW lr of the head alone (record 8: 0.002); None = embed_lr
    ortho: str = "ns5"  # Muon's orthogonalisation: "ns5" (Newton-Schulz), "ns1"-"ns9" (that many steps: see ortho_arm),
    # or the exact polar factor: "svd", "newton"
    branches: tuple[float, ...] = ()  # shorter budgets (fractions of tokens) forked from this run (see train)


def build_optimizers(model: GPT, run: RunConfig) -> list[torch.optim.Optimizer]:
    groups = split_params(model)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    wd = run.weight_decay
    if run.head_lr is not None and model.cfg.untied:  # record 8: the embedding and the head each get their own lr
        head = [p for p in groups["embed_head"] if p is model.lm_head.weight]
        embed = [p for p in groups["embed_head"] if p is not model.lm_head.weight]
        extra = [dict(params=head, lr=run.head_lr, weight_decay=wd)]
    else:
        embed, extra = groups["embed_head"], []
    if run.optimizer == "adamw":
        adam_groups = [dict(params=groups["hidden"], lr=run.lr, weight_decay=wd),
                       dict(params=embed, lr=run.embed_lr, weight_decay=wd), *extra,
                       dict(params=groups["gains_biases"], lr=run.lr, weight_decay=0.0)]
        return [torch.optim.AdamW([g for g in adam_groups if g["params"]], betas=run.betas, eps=1e-8, **fused)]
    if run.optimizer == "muon":
        adam_groups = [dict(params=embed, lr=run.embed_lr, weight_decay=wd), *extra,
                       dict(params=groups["gains_biases"], lr=run.adam_lr, weight_decay=0.0)]
        adam = torch.optim.AdamW([g for g in adam_groups if g["params"]], betas=run.betas, eps=1e-8, **fused)
        return [adam, Muon(groups["hidden"], lr=run.lr, momentum=run.momentum, weight_decay=wd, method=run.ortho)]
    raise ValueError(f"optimizer must be 'muon' or 'adamw', not {run.optimizer!r}")


def optimizer_state_bytes(opts: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor the optimizers keep between steps (AdamW: exp_avg, exp_avg_sq; Muon: the
    momentum buffer), counted from their state after a step; scalar step counters are left out."""
    return sum(t.numel() * t.element_size() for o in opts for st in o.state.values() for t in st.values()
               if torch.is_tensor(t) and t.ndim > 0)


def optimizer_state_ratio(cfg: GPTConfig, device="meta") -> dict:
    """Optimizer state of Muon (+ AdamW for embeddings, head, gains) over AdamW for everything, for ``cfg``,
    measured from real optimizer state after one step. On the ``meta`` device no memory is touched, so the
    124M model is counted on any machine."""
    out = {}
    for name in ("adamw", "muon"):
        with torch.device(device):
            model = GPT(cfg)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opts = build_optimizers(model, RunConfig(optimizer=name))
        for o in opts:
            o.step()
        out[name] = optimizer_state_bytes(opts)
    out["params"] = sum(p.numel() for p in GPT(cfg).to("meta").parameters()) if device != "meta" else \
        sum(p.numel() for p in model.parameters())
    out["ratio"] = out["muon"] / out["adamw"]
    return out


def lr_factor(step: int, steps: int, run: RunConfig) -> float:
    """Multiplier of every base learning rate at ``step`` (0-based) of ``steps``."""
    warmup = round(run.warmup_frac * steps)
    if step < warmup:
        return (step + 1) / warmup
    if run.schedule == "cosine":  # llm.c: cosine from 1 to 0 after warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    warmdown = round(run.warmdown_frac * steps)
    return 1.0 if step < steps - warmdown else (steps - step) / warmdown


# ----------------------------------------------------------------------------------------------------
# 4. Data


class TokenBatches:
    """Non-overlapping sequences of a token array, shuffled once per epoch; the same order for a seed on
    every process, so N processes that each take their slice see exactly the one-process global batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.n_seqs = (len(tokens) - 1) // seq_len
        if self.n_seqs < batch_size:
            raise ValueError(f"{len(tokens)} tokens hold {self.n_seqs} sequences of {seq_len}, fewer than a batch of {batch_size}")
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos, self.epoch = torch.randperm(self.n_seqs, generator=self.gen), 0, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next global batch: x, y of shape (batch_size, seq_len), y = x shifted by one token."""
        if self.pos + self.batch_size > self.n_seqs:
            self.order, self.pos, self.epoch = torch.randperm(self.n_seqs, generator=self.gen), 0, self.epoch + 1
        starts = self.order[self.pos:self.pos + self.batch_size].numpy() * self.seq_len
        self.pos += self.batch_size
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        chunk = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def state(self) -> tuple:
        """Where the stream is (order, position, epoch, generator): ``set_state`` returns to it exactly."""
        return self.order.clone(), self.pos, self.epoch, self.gen.get_state()

    def set_state(self, st: tuple) -> None:
        order, self.pos, self.epoch, gen = st
        self.order = order.clone()
        self.gen.set_state(gen)


@dataclass
class ValSet:
    """Validation windows: inputs x and targets y, (n, seq_len); ``src`` (n, seq_len) is the source index of
    each target token (``names[src]``), or None where sources are unknown."""

    x: torch.Tensor
    y: torch.Tensor
    src: torch.Tensor | None = None
    names: tuple[str, ...] = ()

    @property
    def n_tokens(self) -> int:
        return self.y.numel()


def val_set(tokens: np.ndarray, seq_len: int, n_tokens: int | None = None, *, sources: np.ndarray | None = None,
            names=(), seed: int = 0) -> ValSet:
    """A shuffled, seeded sample of non-overlapping windows from the whole validation split
    (``repro_utils.data.sample_windows``), never its first documents; ``n_tokens=None`` takes every window
    (the whole split). ``sources`` (one index per token, ``data.token_sources``) labels each target token."""
    from repro_utils.data import sample_windows, windows

    slots = (len(tokens) - 1) // (seq_len + 1)
    n = slots if n_tokens is None else max(1, min(slots, n_tokens // seq_len))
    starts = sample_windows(len(tokens), n, seq_len, seed=seed)
    x, y = windows(tokens, starts, seq_len)
    src = None
    if sources is not None:
        idx = starts[:, None] + np.arange(1, seq_len + 1)[None, :]  # the source of each target token
        src = torch.from_numpy(np.asarray(sources[idx], dtype=np.int64))
    return ValSet(x, y, src, tuple(names))


def data_digest(batches: TokenBatches, n: int = 4) -> str:
    """A fingerprint of the first ``n`` batches a run will draw (without drawing them): two runs with the
    same digest see the same data in the same order, the pairing that the paired-seed comparisons rely on."""
    import hashlib

    st, h = batches.state(), hashlib.sha1()
    for _ in range(n):
        h.update(batches.next()[0].numpy().tobytes())
    batches.set_state(st)
    return h.hexdigest()[:12]


def shrink_vocab(train: np.ndarray, val: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the size-1 most frequent training tokens as ids 0..size-2; every other token becomes size-1.

    Only for CPU smoke runs: a 50k-entry head dominates a tiny model's step on two cores."""
    counts = np.bincount(np.asarray(train), minlength=65536)
    keep = np.argsort(-counts, kind="stable")[: size - 1]
    table = np.full(65536, size - 1, dtype=np.uint16)
    table[keep] = np.arange(size - 1, dtype=np.uint16)
    return table[np.asarray(train)], table[np.asarray(val)]


FINEWEB_REPO = "kjj0/fineweb10B-gpt2"  # the speedrun's pre-tokenized FineWeb (data/cached_fineweb10B.py)


def read_shard(path: str | Path) -> np.ndarray:
    """One llm.c / modded-nanogpt token shard: a 256 x int32 header (magic 20240520, version 1, n tokens),
    then n uint16 GPT-2 tokens."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header[0] != 20240520 or header[1] != 1:
        raise ValueError(f"{path}: not a version-1 llm.c token shard (magic {header[0]}, version {header[1]})")
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=256 * 4)
    if len(tokens) != header[2]:
        raise ValueError(f"{path}: header says {header[2]} tokens, the file holds {len(tokens)}")
    return tokens


def fineweb_tokens(split: str, n_tokens: int) -> np.ndarray:
    """FineWeb-10B GPT-2 tokens through huggingface_hub (100 M tokens a shard; val: the first shard's)."""
    from huggingface_hub import hf_hub_download

    if split == "val":
        return np.asarray(read_shard(hf_hub_download(FINEWEB_REPO, "fineweb_val_000000.bin", repo_type="dataset"))[:n_tokens])
    parts, have, i = [], 0, 1
    while have < n_tokens:
        shard = read_shard(hf_hub_download(FINEWEB_REPO, f"fineweb_train_{i:06d}.bin", repo_type="dataset"))
        parts.append(np.asarray(shard[: n_tokens - have]))
        have, i = have + len(parts[-1]), i + 1
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------------
# 5. Training


@dataclass
class History:
    name: str
    tokens: list[int] = field(default_factory=list)  # tokens seen at each evaluation
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)  # mean train loss since the previous evaluation
    final_val: float | None = None
    steps: int = 0
    seconds: float = 0.0
    epochs: float = 0.0  # passes over the training tokens
    final_by_source: dict[str, float] = field(default_factory=dict)  # final validation loss per source
    data: str = ""  # data_digest of the run's batches: equal for the arms of a paired comparison
    branches: dict[str, dict] = field(default_factory=dict)  # fraction -> {tokens, steps, final_val, final_by_source, seconds}

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, val: ValSet, device, batch: int = 64, per_source: bool = False):
    """Mean validation loss on fixed windows; with several processes each takes a share, then all_reduce.
    ``per_source=True`` returns (mean, {source: mean loss}) from per-token losses (needs ``val.src``)."""
    rank, world = rank_world()
    model.eval()
    k = len(val.names) if per_source else 0
    if per_source:
        batch = min(batch, 16)  # fp32 logits of every position: 16 x 1024 x 50304 x 4 bytes = 3.3 GB
    total = torch.zeros(2 + 2 * k, device=device, dtype=torch.float64)  # (loss sum, tokens, per source: sums, counts)
    for i in range(rank * batch, len(val.x), batch * world):
        x, y = val.x[i:i + batch].to(device), val.y[i:i + batch].to(device)
        with autocast(device):
            if per_source:
                lt = model.token_losses(x, y).double()
                s = val.src[i:i + batch].to(device).reshape(-1)
                total[0] += lt.sum()
                total[1] += y.numel()
                total[2:2 + k] += torch.bincount(s, weights=lt.reshape(-1), minlength=k)[:k]
                total[2 + k:] += torch.bincount(s, minlength=k)[:k].double()
            else:
                total[:2] += torch.tensor([model(x, y).item() * y.numel(), y.numel()], device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    mean = (total[0] / total[1]).item()
    if not per_source:
        return mean
    sums, counts = total[2:2 + k].tolist(), total[2 + k:].tolist()
    return mean, {name: sm / c for name, sm, c in zip(val.names, sums, counts) if c}


def autocast(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp32 on the CPU


def train(model_cfg: GPTConfig, run: RunConfig, train_tokens: np.ndarray, val: ValSet | np.ndarray, *,
          device="cpu", name: str = "", keep_first_grads: bool = False, progress=None, val_final: ValSet | None = None):
    """Train one model from scratch; returns (History, model, optimizers).

    The same code runs on one process and under torchrun (DDP): each of the N processes takes its
    1/N slice of every global batch, DDP averages the gradients, Muon shares its Newton-Schulz work.
    ``val`` is evaluated every ``eval_every`` steps (the curve); ``val_final`` (e.g. the whole validation
    split, with sources) once at the end, which gives ``final_val`` and ``final_by_source``.

    ``run.branches``: shorter budgets forked from this run. Under the records' schedule (constant, then a
    linear warmdown over the last ``warmdown_frac`` of the steps, no warmup) a run of budget f*T is this
    run's first (1 - warmdown_frac) * f * T tokens followed by its own warmdown; so at that step the model,
    optimizers and data stream are copied, the branch's warmdown is run and evaluated, and this run resumes
    from the copy. Same numbers as a separate run of f*T tokens (tested), at a fraction of the cost.
    """
    rank, world = rank_world()
    device = torch.device(device)
    micro = run.batch_size // (world * run.grad_accum)
    if micro * world * run.grad_accum != run.batch_size:
        raise ValueError(f"batch_size {run.batch_size} is not divisible by {world} processes x {run.grad_accum} micro-batches")
    tokens_per_step = run.batch_size * model_cfg.seq_len
    steps = run.tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"a budget of {run.tokens} tokens is less than one batch of {run.batch_size} x {model_cfg.seq_len}")
    forks = {}  # fork step -> [(fraction, branch steps)]
    if run.branches:
        if run.warmup_frac or run.schedule != "trapezoid" or world > 1:
            raise ValueError("branches need the trapezoid schedule with no warmup, on one process")
        for f in run.branches:
            if not 0 < f < 1:
                raise ValueError(f"a branch is a fraction of the budget in (0, 1), not {f}")
            steps_f = int(f * run.tokens) // tokens_per_step
            forks.setdefault(steps_f - round(run.warmdown_frac * steps_f), []).append((f, steps_f))
    if isinstance(val, np.ndarray):
        val = val_set(val, model_cfg.seq_len, run.eval_tokens)
    torch.manual_seed(run.seed)  # the same initial weights on every process
    model = GPT(model_cfg).to(device)
    if run.compile:
        compile_regions(model)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    opts = build_optimizers(model, run)
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    muon = next((o for o in opts if isinstance(o, Muon)), None)
    keep_step = None if run.keep_ns_inputs_at is None else min(steps - 1, int(run.keep_ns_inputs_at * steps))
    batches = TokenBatches(train_tokens, model_cfg.seq_len, run.batch_size, run.seed)
    hist, first_grads = History(name=name, steps=steps, data=data_digest(batches)), None
    losses = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_step(step: int, total: int):
        x, y = batches.next()
        mine = slice(rank * micro * run.grad_accum, (rank + 1) * micro * run.grad_accum)
        x, y = x[mine], y[mine]
        for o, lrs in zip(opts, base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * lr_factor(step, total, run)
        for m in range(run.grad_accum):
            xm, ym = x[m * micro:(m + 1) * micro].to(device), y[m * micro:(m + 1) * micro].to(device)
            last = m == run.grad_accum - 1
            with (contextlib.nullcontext() if last or world == 1 else net.no_sync()), autocast(device):
                loss = net(xm, ym) / run.grad_accum
            loss.backward()
            losses.append(loss.detach() * run.grad_accum)
        return step

    def final_eval() -> tuple[float | None, dict]:
        if val_final is None:
            return None, {}
        if val_final.src is None:
            return evaluate(model, val_final, device), {}
        return evaluate(model, val_final, device, per_source=True)

    def branch(f: float, steps_f: int, start: int) -> None:
        sync()
        t_b = time.perf_counter()
        snap = ({k: v.clone() for k, v in model.state_dict().items()},
                [copy.deepcopy(o.state_dict()) for o in opts], batches.state(), len(losses))
        for st in range(start, steps_f):
            one_step(st, steps_f)
            for o in opts:
                o.step()
            net.zero_grad(set_to_none=True)
        sync()
        seconds = time.perf_counter() - t_b
        final, by_source = final_eval()
        if final is None:
            final = evaluate(model, val, device)
        hist.branches[f"{f:g}"] = dict(tokens=steps_f * tokens_per_step, steps=steps_f, fork_step=start,
                                       final_val=final, final_by_source=by_source, seconds=seconds)
        model.load_state_dict(snap[0])
        for o, sd in zip(opts, snap[1]):
            o.load_state_dict(sd)
        batches.set_state(snap[2])
        del losses[snap[3]:]  # the branch's training losses are not this run's

    sync()
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step == steps or (run.eval_every and step % run.eval_every == 0):
            sync()
            t_eval = time.perf_counter()
            hist.tokens.append(step * tokens_per_step)
            hist.val_loss.append(evaluate(model, val, device))  # the bare model: no DDP hooks
            hist.train_loss.append(torch.stack(losses).mean().item() if losses else None)
            losses = []
            t0 += time.perf_counter() - t_eval  # evaluations are not training time
            if step == steps:
                break
        for f, steps_f in forks.get(step, ()):
            t_fork = time.perf_counter()
            branch(f, steps_f, step)
            t0 += time.perf_counter() - t_fork  # a branch is its own run's time, not this one's
        one_step(step, steps)
        if keep_first_grads and step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if muon is not None and step == keep_step:
            muon.keep_inputs = True
        for o in opts:
            o.step()
        net.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(1)
    sync()
    hist.seconds = time.perf_counter() - t0
    final, hist.final_by_source = final_eval()
    hist.final_val = hist.val_loss[-1] if final is None else final
    hist.epochs = steps * tokens_per_step / len(train_tokens)
    if keep_first_grads:
        hist.first_grads = first_grads
    return hist, model, opts


# ----------------------------------------------------------------------------------------------------
# 6. Tokens to a target loss


def tokens_to_target(tokens: list[float], losses: list[float], target: float) -> float | None:
    """Tokens at which a loss curve first reaches ``target`` (linear between evaluations); None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], loss
            return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))
    return None


def budget_to_target(budgets: list[float], finals: list[float], target: float) -> tuple[float, str]:
    """The budget whose run (with its own full schedule) would end at ``target``: linear interpolation in
    log(budget) between the runs that bracket it; outside them, extrapolation from the two nearest runs.
    Returns (budget, 'interpolated' | 'extrapolated'). This is how the records compare: the shortest
    schedule that reaches the target, not where a longer run happens to cross it."""
    pts = sorted(zip(budgets, finals))
    if len(pts) < 2:
        raise ValueError("need runs at two budgets or more")
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= target <= max(l0, l1) and l0 != l1:
            return math.exp(math.log(b0) + (math.log(b1) - math.log(b0)) * (l0 - target) / (l0 - l1)), "interpolated"
    (b0, l0), (b1, l1) = (pts[-2], pts[-1]) if target < pts[-1][1] else (pts[0], pts[1])
    if l0 == l1:
        return float("nan"), "extrapolated"
    return math.exp(math.log(b0) + (math.log(b1) - math.log(b0)) * (l0 - target) / (l0 - l1)), "extrapolated"


# ----------------------------------------------------------------------------------------------------
# 6b. §4's test: each orthogonalisation at its own tuned learning rate


def polar_arms(control_steps: int) -> dict[str, str]:
    """§4's three arms, name -> ``RunConfig.ortho``: Muon's five Newton-Schulz steps, the exact polar factor U V^T
    (``polar_newton``), and the control, the same quintic cut to ``control_steps`` steps: an orthogonalisation that
    is worse by construction, which the setting must be able to tell from the exact one."""
    if not 1 <= control_steps <= 4:
        raise ValueError(f"the control arm takes 1 to 4 Newton-Schulz steps (fewer than NS5's), not {control_steps}")
    return {"NS5": "ns5", "exact": "newton", f"NS{control_steps}": f"ns{control_steps}"}


def best_rate(finals: dict[float, float]) -> tuple[float, bool]:
    """(the learning rate whose run ended at the lowest validation loss, whether that optimum is bracketed).

    Bracketed means a rate on each side of the best one was swept and ended higher: a best rate at the smallest or
    the largest rate of the sweep may have its optimum beyond it, so an arm tuned that way is not shown to be
    tuned (evidence standard, rule 3). A sweep of fewer than three rates brackets nothing."""
    if not finals:
        raise ValueError("no runs to pick a rate from")
    if not all(math.isfinite(v) for v in finals.values()):
        finals = {lr: (v if math.isfinite(v) else math.inf) for lr, v in finals.items()}  # a diverged run loses
    rates = sorted(finals)
    best = min(rates, key=lambda lr: (finals[lr], lr))
    return best, len(rates) >= 3 and rates[0] < best < rates[-1]


def check_polar_params(P: dict) -> None:
    """§4's parameters, checked before anything runs: every rate sweep needs three rates or more, or its best could
    never be shown to sit between two others."""
    from repro_utils.profiles import ParameterError

    for name in ("polar_lrs", "polar_control_lrs"):
        if len(set(P[name])) < 3:
            raise ParameterError(f"parameter '{name}': {P[name]} has fewer than 3 distinct rates, so no best rate "
                                 "could be shown to lie inside the sweep")


def paired_differences(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a[s] - b[s] for every seed s, in seed order: the replicates of a paired comparison (both arms of seed s share
    its initial weights and data order). The two arms must have run the same seeds."""
    if set(a) != set(b):
        raise ValueError(f"unpaired seeds: {sorted(set(a) ^ set(b))}")
    return [a[s] - b[s] for s in sorted(a)]


def polar_expected_s(run_s: float, run_tokens: int, tokens: int, steps: int, exact_extra_s: float,
                     n_arms: int = 3, n_exact: int = 1) -> float:
    """Seconds ``n_arms`` runs of ``tokens`` tokens (``steps`` optimizer steps each) should take, ``n_exact`` of
    them with the exact polar factor: each at the pace of a typical NS5 run (``run_s`` seconds for ``run_tokens``
    tokens), plus the exact factor's extra cost per step (``orthogonalize_seconds``). The arms with fewer
    Newton-Schulz steps are counted at NS5's pace, a little above their cost. The budget valve uses it before the
    sweep and before each paired seed."""
    if run_tokens <= 0:
        return 0.0
    return n_arms * run_s * tokens / run_tokens + n_exact * steps * max(0.0, exact_extra_s)


# ----------------------------------------------------------------------------------------------------
# 7. Step time of the 124M model


def bench_step(cfg: GPTConfig, micro_batch: int, accum: int, device, *, optimizers=("adamw", "muon"),
               compile: bool = True, timer=None, reps: int = 1) -> dict:
    """Time one training step of ``cfg`` at ``accum`` micro-batches of ``micro_batch`` sequences.

    A step is accum x (forward + backward) then each optimizer's step; both are timed apart with the
    same timer (``repro_utils.bench.time_fn``: do_bench on CUDA) so the optimizers share one compiled model.
    Returns ms per micro-batch, ms per optimizer step, ms per step, tokens/s and model TFLOP/s (means), and
    each of ``reps`` repeated timings (``*_reps``: the replicates an interval needs).
    """
    from repro_utils.bench import time_fn

    timer = timer or time_fn
    device = torch.device(device)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if compile:
        torch._dynamo.reset()  # compile from scratch: no graphs left over from the training runs
        compile_regions(model)
    x = torch.randint(0, min(cfg.vocab_size, 50257), (micro_batch, cfg.seq_len), device=device)
    y = torch.randint(0, min(cfg.vocab_size, 50257), (micro_batch, cfg.seq_len), device=device)

    def fwd_bwd():
        with autocast(device):
            model(x, y).backward()

    t0 = time.perf_counter()
    fwd_bwd()  # the first call compiles
    if device.type == "cuda":
        torch.cuda.synchronize()
    micro = [timer(fwd_bwd).ms for _ in range(reps)]
    out = dict(compile_s=time.perf_counter() - t0, micro_ms=float(np.mean(micro)), micro_ms_reps=micro,
               tokens_per_step=accum * micro_batch * cfg.seq_len,
               flops_per_token=flops_per_token(model), params=sum(p.numel() for p in model.parameters()))
    for name in optimizers:
        opts = build_optimizers(model, RunConfig(optimizer=name, lr=0.02 if name == "muon" else 0.0018))

        def opt_step(opts=opts):
            for o in opts:
                o.step()

        opt_step()  # create the optimizer state outside the timing
        opt = [timer(opt_step).ms for _ in range(reps)]
        out[f"opt_ms_{name}"], out[f"opt_ms_{name}_reps"] = float(np.mean(opt)), opt
        out[f"step_ms_{name}_reps"] = [accum * m + o for m, o in zip(micro, opt)]  # rep r: micro-batch r, optimizer r
        out[f"tokens_per_s_{name}_reps"] = [out["tokens_per_step"] / t * 1e3 for t in out[f"step_ms_{name}_reps"]]
        step_ms = accum * out["micro_ms"] + out[f"opt_ms_{name}"]
        out[f"step_ms_{name}"] = step_ms
        out[f"tokens_per_s_{name}"] = out["tokens_per_step"] / step_ms * 1e3
        out[f"tflops_{name}"] = out[f"tokens_per_s_{name}"] * out["flops_per_token"] / 1e12
    return out


# ----------------------------------------------------------------------------------------------------
# torchrun entry point: the same train() under DDP


PRESETS = {
    "tiny": dict(model=GPTConfig(n_layer=2, n_head=2, n_embd=64, seq_len=32), batch_size=8, tokens=8 * 32 * 3),
    "small": dict(model=GPTConfig(n_layer=6, n_head=6, n_embd=384, seq_len=512), batch_size=16, tokens=2**22),
    "124M": dict(model=GPTConfig(n_layer=12, n_head=6, n_embd=768, seq_len=1024), batch_size=512, tokens=5100 * 2**19),
}


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device) of this process; under torchrun (WORLD_SIZE > 1) joins the process group
    (NCCL on GPUs, gloo on the CPU) and takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank_world()[0], world, device


def load_tokens(data: str, n_train: int, vocab: int = 50257) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) tokens: 'random' (a fixed stream below ``vocab``, at least ``n_train`` long), 'fineweb'
    (the speedrun's shards) or 'local' (the course corpus through repro_utils.data)."""
    if data == "random":  # enough for checking that N processes = one process, and for timing
        g = np.random.default_rng(0)  # an epoch of 200 k to 2 M tokens: TokenBatches reshuffles after it
        return (g.integers(0, vocab, max(200_000, min(n_train, 2**21))).astype(np.uint16),
                g.integers(0, vocab, 20_000).astype(np.uint16))
    if data == "fineweb":
        return fineweb_tokens("train", n_train), fineweb_tokens("val", 10 * 2**20)
    from repro_utils.data import tokens as corpus_tokens

    return corpus_tokens("train"), corpus_tokens("val")


def main(argv=None) -> None:
    """``torchrun --nproc_per_node=N muon_speedrun.py --preset small --optimizer muon [--out f.pt]``;
    ``muon_speedrun.py scaling|sweep|table ...``: the multi-GPU scaling measurement (``scaling_sweep``)."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SCALING_COMMANDS:
        return scaling_main(argv)
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--arch", choices=["gpt2", "modern"], default="modern")
    ap.add_argument("--data", choices=["local", "fineweb", "random"], default="local")
    ap.add_argument("--out", default=None, help="rank 0 saves the history, first gradients and final weights here")
    a = ap.parse_args(argv)
    rank, world, device = init_distributed()
    p = PRESETS[a.preset]
    cfg = replace(p["model"], **(MODERN if a.arch == "modern" else {}))
    tokens = a.tokens or p["tokens"]
    run = RunConfig(optimizer=a.optimizer, lr=a.lr or (0.02 if a.optimizer == "muon" else 0.0018),
                    batch_size=p["batch_size"], grad_accum=a.grad_accum, tokens=tokens, eval_every=0,
                    eval_tokens=4 * cfg.seq_len, compile=device.type == "cuda")
    train_toks, val_toks = load_tokens(a.data, tokens)
    hist, model, _ = train(cfg, run, train_toks, val_toks, device=device, keep_first_grads=a.out is not None)
    if rank == 0:
        print(f"world {world} · {hist.steps} steps · final val loss {hist.final_val:.4f} · {hist.seconds:.1f} s")
        if a.out:
            torch.save(dict(history=hist.to_dict(), first_grads={k: v.cpu() for k, v in hist.first_grads.items()},
                            params={k: v.detach().cpu() for k, v in model.state_dict().items()}), a.out)
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# 8. Scaling over GPUs: throughput and loss parity of the same train() under DDP


def scaling_sweep(out: str | Path, gpus: list[int] | None = None, worker_args: list[str] = ()) -> dict:
    """Run the scaling measurement on N = 1, 2, 4, 8 GPUs (as many as the machine has) and write the table.

    THE ONE COMMAND for a multi-GPU machine (issue 9), from the repository root, with NVLink multicast off
    (KINDS.md: NCCL_NVLS_ENABLE=0 and its two companions stay set). On the course's device machine it is
    one ``run`` call: kind nvidia-h100-x8 (else the largest kind lent), carry [".data", ".whl"] (the
    offline corpus + GPT-2 BPE, and the wheels that scripts/gpu-box.sh installs), timeout_s 600:

        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; \\
        NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \\
        PYTHONPATH=/tmp/site:$PWD/src REPRO_DATA_DIR=$PWD/.data TIKTOKEN_CACHE_DIR=$PWD/.data/tiktoken \\
        HF_HUB_OFFLINE=1 REPRO_CACHE_DIR=/tmp/repro-cache \\
        python3 chapters/01_speedrun_muon/muon_speedrun.py sweep --out $OUT/scaling

    (Elsewhere, drop the pip line and /tmp/site; only the loss-parity runs read the corpus, and
    ``--data random`` needs none, but then their loss hardly moves.) The sweep forces NCCL_NVLS_ENABLE=0,
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 in its children's environment as well,
    and records NCCL_NVLS_ENABLE in every JSON. For each N it starts one
    ``torchrun --standalone --nproc_per_node=N muon_speedrun.py scaling --out DIR ...``, which
      - times ``train()`` on the 124M modern model (seq 1024, bf16 autocast, torch.compile per block,
        SDPA, DDP over NCCL, the distributed Muon) at the records' global batch of 512 x 1024 = 2^19
        tokens a step, micro-batches of 32 per GPU (16/N of them a step on each), with Muon and then
        with AdamW: ``--warmup`` 5 steps (compilation included), then ``--steps`` 20 timed steps, the
        slowest rank's clock -> ``throughput_N{N}.json`` (tokens/s, per GPU, ms/step, device, torch);
      - trains the 'small' model (6 x 384, seq 512) with Muon for ``--parity-steps`` 200 steps at a global
        batch of 64 sequences, seed 0 (at N = 1 also seed 1: the seed noise), keeping the global training
        loss and the validation loss after every step -> ``parity_N{N}_seed{S}.json``.
    After each N it rewrites ``scaling.json`` and ``scaling.md`` (``scaling_table``), so what was done
    survives a time-out; ``muon_speedrun.py table --out DIR`` rebuilds them from the JSON files in DIR
    (e.g. after ``--gpus 1 2`` and ``--gpus 4 8`` were run as two commands). Worker options after
    ``sweep`` (``--steps``, ``--micro-batch``, ``--optimizers muon``, ``--parity-steps`` ...) pass through.

    Into the chapter afterwards (this session wrote none of it): put scaling.json beside the chapter's
    results; add a section "Several GPUs" to the notebook with the table (N, tokens/s, tokens/s per GPU,
    efficiency = rate_N / (N x rate_1), ms/step, Muon's overhead over AdamW at that N, parity: largest
    |Δ val loss| against the seed noise) and a plot of tokens/s against N beside the ideal N x rate_1,
    naming the device (``device`` in the JSON) and NCCL_NVLS_ENABLE=0. Where N = 8 ran, add a ledger row
    at the record's own setting, graded from the N = 8 rows of scaling.json: the Muon step of 2^19 tokens
    on 8 GPUs with the work shared (``step_ms``, tokens/s, and ``overhead_pct`` against AdamW) beside the
    source's 142.01 ms (Muon) and 138.61 ms (AdamW) per step on 8xH100 (records/track_1_short/
    2024-10-29_Optimizers, the logs that claim muon-overhead cites), as a claim of claims.yaml whose
    profile is 'own' on that machine.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = gpus or [n for n in (1, 2, 4, 8) if n <= max(1, torch.cuda.device_count())]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    import subprocess
    import sys

    args = list(worker_args)
    if "--data" not in args or args[args.index("--data") + 1] == "local":
        load_tokens("local", 0)  # tokenise the corpus once (cached on disk), not in every rank at once
    for n in gpus:
        seeds = ["0", "1"] if n == 1 else ["0"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "scaling", "--out", str(out), "--seeds", *seeds, *args]
        print(f"[sweep] N={n}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env=env, check=True)
        table = scaling_table(out)
        print(table["markdown"], flush=True)
    return scaling_table(out)


class StepClock:
    """``train()``'s progress hook: the wall-clock time from the end of step ``warmup`` to the end of
    step ``warmup + steps``, with a device sync at those two points only (none in between)."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.marks, self.done, self.at = [], 0, (warmup, warmup + steps)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done in self.at:
            self.sync()
            self.marks.append(time.perf_counter())

    def seconds(self) -> float:
        return self.marks[1] - self.marks[0]


def _all_ranks(x: torch.Tensor, op) -> torch.Tensor:
    if rank_world()[1] > 1:
        dist.all_reduce(x, op=op)
    return x


def _machine(device: torch.device) -> dict:
    return dict(world=rank_world()[1], device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, cuda=torch.version.cuda,
                backend=dist.get_backend() if dist.is_initialized() else None,
                NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE"))


def measure_throughput(cfg: GPTConfig, device, *, batch_size: int = 512, micro_batch: int = 32, warmup: int = 5,
                       steps: int = 20, optimizer: str = "muon") -> dict:
    """Tokens/s of ``train()`` on this process group: ``batch_size`` sequences a step over all processes,
    ``micro_batch`` sequences per forward/backward, random tokens (the speed does not depend on them)."""
    rank, world = rank_world()
    accum = batch_size // (world * micro_batch)
    if warmup < 1 or steps < 1:
        raise ValueError("the clock needs at least one warm-up step and one timed step")
    if accum < 1 or accum * world * micro_batch != batch_size:
        raise ValueError(f"batch_size {batch_size} is not {world} processes x micro-batches of {micro_batch}")
    run = RunConfig(optimizer=optimizer, lr=0.02 if optimizer == "muon" else 0.0018, batch_size=batch_size,
                    grad_accum=accum, tokens=(warmup + steps) * batch_size * cfg.seq_len, eval_every=0,
                    eval_tokens=cfg.seq_len, compile=torch.device(device).type == "cuda")
    toks, val = load_tokens("random", 2 * batch_size * cfg.seq_len + 1, min(cfg.vocab_size, 50257))
    torch._dynamo.reset()  # as bench_step: compile from scratch, never past dynamo's recompile limit
    clock = StepClock(torch.device(device), warmup, steps)
    train(cfg, run, toks, val, device=device, progress=clock)
    seconds = _all_ranks(torch.tensor([clock.seconds()], device=device, dtype=torch.float64), dist.ReduceOp.MAX).item()
    tokens_per_s = steps * batch_size * cfg.seq_len / seconds  # the slowest rank's clock
    return dict(optimizer=optimizer, tokens_per_s=tokens_per_s, tokens_per_s_per_gpu=tokens_per_s / world,
                step_ms=1e3 * seconds / steps, micro_batch=micro_batch, grad_accum=accum, warmup=warmup,
                steps=steps, compile=run.compile)


def loss_parity(cfg: GPTConfig, device, *, batch_size: int = 64, steps: int = 200, seed: int = 0,
                data: str = "local", eval_seqs: int = 16) -> dict:
    """A short Muon run of ``train()`` with one validation every step: the global-batch training loss
    (each rank's mean, averaged over ranks) and the validation loss after every step."""
    rank, world = rank_world()
    run = RunConfig(optimizer="muon", batch_size=batch_size, tokens=steps * batch_size * cfg.seq_len, eval_every=1,
                    eval_tokens=eval_seqs * cfg.seq_len, seed=seed, compile=torch.device(device).type == "cuda")
    toks, val = load_tokens(data, run.tokens, min(cfg.vocab_size, 50257))
    torch._dynamo.reset()
    hist, _, _ = train(cfg, run, toks, val, device=device)
    mine = torch.tensor(hist.train_loss[1:], device=device, dtype=torch.float64)  # [0] is None: before step 1
    train_loss = (_all_ranks(mine, dist.ReduceOp.SUM) / world).tolist()  # equal micro-batches on every rank
    return dict(seed=seed, steps=hist.steps, batch_size=batch_size, data=data, train_loss=train_loss,
                val_loss=hist.val_loss, final_val=hist.final_val, epochs=hist.epochs, seconds=hist.seconds)


def scaling_table(out: str | Path) -> dict:
    """The scaling table from the JSON files in ``out``: efficiency = rate_N / (N x rate_1) for each
    optimizer; parity = largest |val loss (N) - val loss (1)| over the run against the seed noise
    (the same between seeds 0 and 1 on one process). Writes scaling.json and scaling.md."""
    import json

    out = Path(out)
    thr = sorted((json.loads(f.read_text()) for f in out.glob("throughput_N*.json")), key=lambda d: d["world"])
    par = {(d["world"], d["seed"]): d for d in (json.loads(f.read_text()) for f in out.glob("parity_N*_seed*.json"))}
    base = {r["optimizer"]: r["tokens_per_s"] for d in thr if d["world"] == 1 for r in d["runs"]}
    rows = []
    for d in thr:
        by_opt = {r["optimizer"]: r for r in d["runs"]}
        for r in d["runs"]:
            row = dict(N=d["world"], optimizer=r["optimizer"], tokens_per_s=r["tokens_per_s"],
                       tokens_per_s_per_gpu=r["tokens_per_s_per_gpu"], step_ms=r["step_ms"],
                       efficiency=r["tokens_per_s"] / (d["world"] * base[r["optimizer"]]) if r["optimizer"] in base else None)
            if r["optimizer"] == "muon" and "adamw" in by_opt:
                row["overhead_pct"] = 100 * (r["step_ms"] / by_opt["adamw"]["step_ms"] - 1)
            rows.append(row)

    def gap(a: dict, b: dict, key: str) -> float:
        return max(abs(x - y) for x, y in zip(a[key], b[key]))

    ref, parity = par.get((1, 0)), []
    for (n, seed), d in sorted(par.items()):
        if ref is not None and seed == 0 and n > 1:
            parity.append(dict(N=n, max_val_gap=gap(d, ref, "val_loss"), max_train_gap=gap(d, ref, "train_loss"),
                               final_val=d["final_val"], final_val_1=ref["final_val"]))
    seed1, noise = par.get((1, 1)), None
    if ref is not None and seed1 is not None:
        noise = dict(max_val_gap=gap(seed1, ref, "val_loss"), max_train_gap=gap(seed1, ref, "train_loss"),
                     final_val_gap=abs(seed1["final_val"] - ref["final_val"]))
    for p in parity:
        p["within_seed_noise"] = None if noise is None else p["max_val_gap"] <= noise["max_val_gap"]
    lines = ["| N | optimizer | tokens/s | tokens/s per GPU | efficiency | ms/step | Muon overhead |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eff, ovh = r["efficiency"], r.get("overhead_pct")
        lines.append(f"| {r['N']} | {r['optimizer']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{'' if eff is None else f'{eff:.3f}'} | {r['step_ms']:.1f} | {'' if ovh is None else f'{ovh:.2f}%'} |")
    for p in parity:
        seed_noise = "?" if noise is None else f"{noise['max_val_gap']:.4f}"
        lines.append(f"\nparity N={p['N']}: max |Δ val loss| {p['max_val_gap']:.4f} vs seed noise {seed_noise}; "
                     f"final val {p['final_val']:.4f} (1 GPU: {p['final_val_1']:.4f})")
    table = dict(device=thr[0]["device"] if thr else None, torch=thr[0]["torch"] if thr else None, rows=rows,
                 parity=parity, seed_noise=noise, markdown="\n".join(lines))
    (out / "scaling.json").write_text(json.dumps(table, indent=1))
    (out / "scaling.md").write_text(table["markdown"] + "\n")
    return table


SCALING_COMMANDS = ("scaling", "sweep", "table")


def scaling_main(argv: list[str]) -> None:
    """``torchrun --nproc_per_node=N muon_speedrun.py scaling --out DIR`` (one N: throughput, then parity);
    ``muon_speedrun.py sweep --out DIR [--gpus 1 2 4 8]`` (every N, then the table: see ``scaling_sweep``);
    ``muon_speedrun.py table --out DIR`` (the table from the JSON files already in DIR)."""
    import json

    command, argv = argv[0], argv[1:]
    ap = argparse.ArgumentParser(prog=f"muon_speedrun.py {command}", description=scaling_main.__doc__)
    ap.add_argument("--out", required=True, help="folder of the JSON files")
    if command == "table":
        print(scaling_table(ap.parse_args(argv).out)["markdown"])
        return
    if command == "sweep":
        ap.add_argument("--gpus", type=int, nargs="+", default=None, help="values of N (default 1, 2, 4, 8 up to the GPUs)")
        a, rest = ap.parse_known_args(argv)
        scaling_sweep(a.out, a.gpus, rest)
        return
    ap.add_argument("--preset", choices=sorted(PRESETS), default="124M", help="the model timed")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences a step over all GPUs (preset's: 512)")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation included)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--optimizers", nargs="*", default=["muon", "adamw"], help="timed in turn; none: skip the timing")
    ap.add_argument("--parity-preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--parity-batch-size", type=int, default=64)
    ap.add_argument("--parity-steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="seeds of the parity runs; none: skip them")
    ap.add_argument("--data", choices=["local", "fineweb", "random"], default="local", help="tokens of the parity runs")
    ap.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (CPU tests)")
    a = ap.parse_args(argv)
    rank, world, device = init_distributed()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def model(preset: str) -> GPTConfig:
        return replace(PRESETS[preset]["model"], **MODERN, **({} if a.vocab is None else dict(vocab_size=a.vocab)))

    def write(name: str, d: dict) -> None:
        if rank == 0:
            (out / name).write_text(json.dumps({**_machine(device), **d}, indent=1))

    if a.optimizers:
        cfg, batch = model(a.preset), a.batch_size or PRESETS[a.preset]["batch_size"]
        runs = [measure_throughput(cfg, device, batch_size=batch, micro_batch=a.micro_batch, warmup=a.warmup,
                                   steps=a.steps, optimizer=o) for o in a.optimizers]
        write(f"throughput_N{world}.json", dict(model=asdict(cfg), tokens_per_step=batch * cfg.seq_len, runs=runs))
    for seed in a.seeds:
        cfg = model(a.parity_preset)
        write(f"parity_N{world}_seed{seed}.json", dict(model=asdict(cfg), **loss_parity(
            cfg, device, batch_size=a.parity_batch_size, steps=a.parity_steps, seed=seed, data=a.data)))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
