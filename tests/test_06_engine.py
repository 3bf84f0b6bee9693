"""Chapter 06: the engine is token-identical to HF greedy decoding.

A random 2-layer fp32 Llama (GQA, Llama-3 rope scaling) from transformers is decoded by HF ``generate`` one
request at a time, and by the engine with its weights under staggered arrivals, prompts that end on, before
and after block boundaries, a pool so small that sequences are preempted and recomputed, and the baselines'
switches. Greedy decoding of the same function must give the same tokens: the only differences are fp32
rounding (1e-7 relative), far below the gaps between the top two logits of this seeded model (checked).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tinyserve.engine import Engine
from tinyserve.model import ModelConfig, build_model
from tinyserve.workload import Request, hf_static, make_workload

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # short, so that positions here reach every band
NEW = 10


@pytest.fixture(scope="module")
def hf_llama():
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, rope_scaling=LLAMA3_ROPE, rope_theta=10000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ours(hf_llama):
    return build_model(ModelConfig.from_hf(hf_llama.config), hf_llama.state_dict())


def requests(seed=1):
    lengths = [7, 8, 9, 16, 17, 31, 3, 24]  # block size 8: just before, on and after block boundaries
    gen = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(0, 256, (n,), generator=gen).tolist(), NEW, arrival=float(2 * i))
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def hf_outputs(hf_llama):
    cfg = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = []
    for r in requests():
        ids = torch.tensor([r.prompt])
        seq = hf_llama.generate(ids, generation_config=cfg)[0, len(r.prompt):].tolist()
        logits = hf_llama(torch.tensor([r.prompt + seq[:-1]])).logits[0, len(r.prompt) - 1:]
        top2 = logits.topk(2).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-tie: greedy is decided, 1e3x fp32 rounding
        out.append(seq)
    return out


@pytest.mark.parametrize("setting", [
    dict(num_blocks=64),  # plenty of room, staggered arrivals
    dict(num_blocks=7, max_num_seqs=8),  # 56 slots for up to 8 requests of up to 41 tokens: preemption
    dict(num_blocks=64, request_level=True, reserve="max_len"),  # the baseline's switches
    dict(num_blocks=40, reserve="max_model_len", max_model_len=64, max_num_batched_tokens=32),
])
def test_engine_equals_hf_greedy(ours, hf_outputs, setting):
    setting = {"max_model_len": 128, **setting}
    eng = Engine(ours, block_size=8, backend="torch", **setting)
    seqs = eng.run(requests(), step_clock=True)
    assert [s.output for s in seqs] == hf_outputs
    if setting["num_blocks"] == 7:
        assert eng.scheduler.num_preemptions > 0  # the setting does exercise recomputation
    assert eng.bm.num_free == setting["num_blocks"]


def test_triton_backend_equals_hf_greedy(ours, hf_outputs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # conftest set it before triton's import on GPU-less machines
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        pytest.skip("the interpreter is set up only on GPU-less machines")
    reqs = requests()[3:6]  # 16, 17 and 31 tokens: a few steps of the interpreter suffice
    eng = Engine(ours, num_blocks=6, block_size=8, max_model_len=64, backend="triton")
    seqs = eng.run(reqs, step_clock=True)
    assert eng.scheduler.num_preemptions > 0
    assert [s.output for s in seqs] == hf_outputs[3:6]


def test_random_init_is_seeded_and_shaped_like_hf(hf_llama):
    cfg = ModelConfig.from_hf(hf_llama.config)
    a, b, c = build_model(cfg, seed=0), build_model(cfg, seed=0), build_model(cfg, seed=1)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(sa["layers.0.self_attn.qkv_proj.weight"], sc["layers.0.self_attn.qkv_proj.weight"])
    n_hf = sum(p.numel() for p in hf_llama.parameters())
    assert sum(p.numel() for p in a.parameters()) == n_hf


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_weights_with_qkv_bias_give_hf_logits(tied):
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=tied)
    torch.manual_seed(2)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model = build_model(ModelConfig.from_hf(cfg), hf.state_dict())
    eng = Engine(model, num_blocks=8, block_size=8, backend="torch")
    prompt = list(range(3, 22))
    eng.add_request(prompt, 1)
    batch = eng.scheduler.schedule()
    ids, pos, meta, _ = eng.prepare(batch)
    ours_logits = model.logits(model(ids, pos, eng.kv_caches, meta))
    ref = hf(torch.tensor([prompt])).logits[0]
    assert (ours_logits - ref).abs().max() < 1e-5  # fp32, same operations up to summation order (1e-7 seen)


def test_temperature_sampling_is_seeded(ours):
    reqs = [Request([5, 6, 7, 8, 9], 8, temperature=1.0) for _ in range(3)]
    outs = [[s.output for s in Engine(ours, num_blocks=16, block_size=8, backend="torch", seed=s).run(reqs)]
            for s in (0, 0, 1)]
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_hf_static_baseline_runs_whole_batches(hf_llama, hf_outputs):
    reqs = requests()[:3]
    res = hf_static(hf_llama, reqs, batch_size=2)
    assert res["output_tokens"] == 3 * NEW and res["requests"] == 3 and res["ttft_s"]["p50"] > 0


def test_workload_is_seeded_and_in_range():
    a, b = make_workload(16, (100, 1024), 256, 1000, seed=3), make_workload(16, (100, 1024), 256, 1000, seed=3)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert all(100 <= len(r.prompt) <= 1024 and r.max_new_tokens == 256 and r.arrival == 0 for r in a)
    timed = make_workload(50, (1, 2), 1, 10, seed=0, rate=10.0)
    gaps = [y.arrival - x.arrival for x, y in zip(timed, timed[1:])]
    assert min(gaps) >= 0 and 0.05 < timed[-1].arrival / 50 < 0.2  # mean gap 1/rate = 0.1 s, 50 draws


def test_rope_frequencies_stay_fp32_when_the_model_is_cast_to_bf16(hf_llama):
    """The first H200 run built the engine in bf16 and `.to(bf16)` rounded inv_freq too: at position 500 the
    angle m * theta_i drifted by up to ~0.5 rad and the 8B model's logits were 6x further from fp32 than HF's
    bf16 logits. The frequencies must stay fp32 through any cast or move."""
    from tinyserve.model import rope_inv_freq

    m = build_model(ModelConfig.from_hf(hf_llama.config), hf_llama.state_dict(), dtype=torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32
    assert torch.equal(m.inv_freq, rope_inv_freq(m.cfg))
    assert m.to(torch.float16).inv_freq.dtype == torch.float32


def test_bf16_engine_logits_are_as_close_to_fp32_as_hf_bf16_at_long_positions():
    """bf16 engine vs bf16 HF, both against HF in fp32, at positions up to 500 (Llama-3 rope, theta 5e5).
    q and k are scaled 8x so that attention is sharp and a wrong rotation shows (at init scale attention is
    nearly uniform and RoPE hardly matters: this test could not fail). HF's inv_freq is kept fp32 after its
    bf16 cast, as HF builds it when constructed in bf16 (the GPU run's baseline). Same weights, so the
    engine's relative error should match HF's; 1.5x allows for summation order. Measured here: 1.0x with the
    fix, 6.1x with bf16-rounded frequencies."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    hf_bf16 = LlamaForCausalLM(cfg).eval()
    hf_bf16.load_state_dict(ref.state_dict())
    hf_bf16.to(torch.bfloat16)
    hf_bf16.model.rotary_emb.inv_freq = ref.model.rotary_emb.inv_freq.clone()  # fp32, as a bf16-built HF model has
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})  # same bf16 values
    ours = build_model(ModelConfig.from_hf(cfg), hf_bf16.state_dict(), dtype=torch.bfloat16)
    prompt = torch.randint(0, 512, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(ours, num_blocks=64, max_num_seqs=1, max_model_len=512, cuda_graphs=False)
    # the torch path: Triton's CPU interpreter mishandles bf16 (a kernel exact in fp32 and fp16 gives a 1.7e9
    # relative error there); gpu_bench.py checks the Triton kernels in bf16 on the GPU
    eng.backend = "torch"
    eng.add_request(prompt, 1)
    ids, pos, meta, _ = eng.prepare(eng.scheduler.schedule())
    mine = ours.logits(ours(ids, pos, eng.kv_caches, meta))
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0].float()
        theirs = hf_bf16(torch.tensor([prompt])).logits[0].float()

    def rel(a):
        return ((a - want).norm() / want.norm()).item()

    assert rel(mine) <= 1.5 * rel(theirs), (rel(mine), rel(theirs))
