"""A Llama-architecture decoder for serving: packed tokens in, a paged KV cache beside it.

Llama (Touvron et al. 2023) = a pre-norm transformer with RMSNorm (Zhang & Sennrich 2019), rotary
position embeddings (RoPE, Su et al. 2021), SwiGLU feed-forward layers (Shazeer 2020) and, from Llama 2
on, grouped-query attention (GQA, Ainslie et al. 2023). Qwen2 is the same with a bias on q, k and v.

Unlike a training model there is no batch dimension: a step's tokens from every sequence are packed
into one (T,) vector, each with its position, and the attention metadata (attention.AttnMeta) says
which sequence each token belongs to and where its key and value go in the paged cache.
The weights load from a HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` state dict, or are random
(seeded) with the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .attention import AttnMeta, attention, store_kv

# The shapes the serving chapters run (ModelConfig keyword arguments, as in the HF config): Llama-3-8B with random
# weights on the GPU, and a 2-layer miniature of it for CPU dry runs.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                 rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


@dataclass
class ModelConfig:
    vocab_size: int = 128256  # Llama 3's tokenizer
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # GQA: 4 query heads share each K/V head (Llama-3-8B)
    head_dim: int | None = None  # hidden_size // num_attention_heads when None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} or None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs whole groups"

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """From a transformers LlamaConfig / Qwen2Config."""
        rope = getattr(hf, "rope_scaling", None) or getattr(hf, "rope_parameters", None)
        theta = getattr(hf, "rope_theta", None) or (rope or {}).get("rope_theta", 10000.0)
        if rope is not None and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        if getattr(hf, "attention_bias", False) and hf.model_type == "llama":
            raise NotImplementedError("Llama with attention_bias (a bias on o_proj too)")
        return cls(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                   num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
                   num_key_value_heads=hf.num_key_value_heads, head_dim=getattr(hf, "head_dim", None),
                   rms_norm_eps=hf.rms_norm_eps, rope_theta=theta, rope_scaling=rope,
                   max_position_embeddings=hf.max_position_embeddings, tie_word_embeddings=hf.tie_word_embeddings,
                   qkv_bias=hf.model_type == "qwen2")

    def kv_bytes_per_token(self, dtype=torch.bfloat16) -> int:
        """K and V of one token over all layers: 2 * L * H_kv * d * bytes (128 KiB for Llama-3-8B in bf16)."""
        elt = torch.empty(0, dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elt


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d) (RoFormer eq. 15), with Llama 3's frequency-dependent scaling when asked:
    wavelengths longer than old_len/low_freq_factor are stretched by `factor`, shorter than
    old_len/high_freq_factor kept, and those between interpolated (Llama 3 paper §3.3 / Meta's reference code)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (d/2,)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "llama3":
        raise NotImplementedError(f"rope_scaling {kind!r}")
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)  # 0 at the long end, 1 at the short end of the middle band
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, smoothed, scaled)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the "rotate half" layout of HF checkpoints: pairs (x_i, x_{i+d/2}) turn by angle m*theta_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (T, H, d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # y = x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019, eq. 4), in fp32 as HF does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_q, self.n_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_q + 2 * self.n_kv) * self.d, bias=cfg.qkv_bias)  # fused
        self.o_proj = nn.Linear(self.n_q * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, kv_cache, meta: AttnMeta):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.n_q * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        q = rotate(q.view(t, self.n_q, self.d), cos, sin)  # (T, Hq, d)
        k = rotate(k.view(t, self.n_kv, self.d), cos, sin)  # (T, Hkv, d)
        v = v.view(t, self.n_kv, self.d)
        k_cache, v_cache = kv_cache  # (num_blocks, block_size, Hkv, d) each
        store_kv(k_cache, v_cache, k, v, meta.slot_mapping)  # write first: attention reads K/V from the cache only
        o = attention(q, k_cache, v_cache, meta)  # (T, Hq, d)
        return self.o_proj(o.reshape(t, self.n_q * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused gate | up
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU: (Swish(x W) * x V) W2 (Shazeer 2020, eq. 6)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # fp32 always (see _apply)

    def _apply(self, fn, recurse=True):
        """``.to(bf16)`` would round the RoPE frequencies too, and m * theta_i then drifts by up to half a radian
        at position 500 (measured on the H200: 6x HF's logit error). Keep them fp32 on whatever device."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.cfg).to(self.embed_tokens.weight.device)
        return self

    @torch.no_grad()
    def forward(self, input_ids, positions, kv_caches, meta: AttnMeta):
        """input_ids, positions: (T,) packed over sequences; kv_caches: one (K, V) pair per layer.
        Returns the final hidden states (T, hidden)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # m * theta_i           (T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # broadcast over heads  (T, 1, d)
        x = self.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta)
        return self.norm(x)

    @torch.no_grad()
    def logits(self, hidden):
        return self.lm_head(hidden).float()  # (B, vocab)

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a HF Llama/Qwen2 state dict in, fusing q|k|v and gate|up as this module stores them."""
        own = {}
        for name, t in sd.items():
            name = name.removeprefix("model.")
            if name.endswith("rotary_emb.inv_freq"):
                continue
            own[name] = t
        for i in range(self.cfg.num_hidden_layers):
            p = f"layers.{i}."
            for kind in (["weight", "bias"] if self.cfg.qkv_bias else ["weight"]):
                own[p + f"self_attn.qkv_proj.{kind}"] = torch.cat(
                    [own.pop(p + f"self_attn.{x}_proj.{kind}") for x in "qkv"])
            own[p + "mlp.gate_up_proj.weight"] = torch.cat([own.pop(p + "mlp.gate_proj.weight"), own.pop(p + "mlp.up_proj.weight")])
        if self.cfg.tie_word_embeddings:
            own.pop("lm_head.weight", None)
            own["lm_head.weight"] = own["embed_tokens.weight"]
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if m != "inv_freq"]
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")


def build_model(cfg: ModelConfig, state_dict: dict | None = None, *, seed: int = 0,
                dtype=torch.float32, device="cpu") -> Llama:
    """The model with `state_dict`'s weights, or random ones (N(0, 0.02) as HF initialises Llama; norms 1)."""
    with torch.device(device):
        model = Llama(cfg).to(dtype)
    if state_dict is not None:
        model.load_hf_state_dict(state_dict)
    else:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return model.eval()
