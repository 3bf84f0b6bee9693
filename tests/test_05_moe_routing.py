"""Chapter 05 (MoE routing): the aux loss, dispatch/combine, the bias rule, the layer, the parameters.

CPU only, seeded, seconds. The smoke execution of the notebook is covered by tests/test_chapters.py.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from repro_utils.claims import load_chapter
from repro_utils.profiles import ParameterError, resolve

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "chapters" / "05_moe_routing"
sys.path.insert(0, str(FOLDER))

import moe_routing as moe  # noqa: E402


def random_top_k(n_tokens, n_experts, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)])


# ------------------------------------------------------------------------------------------ aux loss


def test_aux_loss_matches_switch_formula_on_a_hand_computed_example():
    # 4 tokens, 2 experts, top-1: argmax = 0, 0, 1, 0 -> f = (3/4, 1/4); P = mean p = (0.65, 0.35)
    # Switch eq. 4: N * sum f_i P_i = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 2 * 0.575 = 1.15
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], requires_grad=True)
    loss = moe.switch_aux_loss(p, p.argmax(dim=1, keepdim=True), 2)
    assert loss.item() == pytest.approx(1.15, abs=1e-6)  # float32 arithmetic on numbers of 2 decimals
    loss.backward()
    # f carries no gradient, so d loss / d p_ti = N * f_i / T: 2 * 0.75 / 4 = 0.375 and 2 * 0.25 / 4 = 0.125
    assert torch.allclose(p.grad, torch.tensor([[0.375, 0.125]] * 4), atol=1e-7)


def test_aux_loss_is_one_under_uniform_routing_and_counts_every_top_k_assignment():
    E, T = 4, 8  # top-2
    uniform = torch.full((T, E), 1 / E)
    top = torch.tensor([[0, 1], [2, 3]] * (T // 2))  # every expert gets T*k/E assignments
    assert moe.switch_aux_loss(uniform, top, E).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.tensor([[0, 1]] * T)  # experts 0 and 1 get everything: f = (1/2, 1/2, 0, 0)
    p = torch.tensor([[0.4, 0.4, 0.1, 0.1]] * T)
    assert moe.switch_aux_loss(p, skewed, E).item() == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.4), abs=1e-6)


# ----------------------------------------------------------------------------------- dispatch/combine


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_then_combine_is_an_exact_permutation_when_dropless(k):
    N, E = 101, 7
    top = random_top_k(N, E, k, seed=k)
    d = moe.dispatch(top, E)
    assert torch.equal(d.slot.sort().values, torch.arange(k * N))  # every assignment exactly once
    assert torch.equal(d.slot[d.pos], torch.arange(k * N))  # pos is the inverse permutation
    assert torch.equal(torch.bincount(d.token, minlength=N), torch.full((N,), k))  # each token k times
    experts_in_order = top.t().reshape(-1)[d.slot]
    assert torch.all(experts_in_order[1:] >= experts_in_order[:-1])  # grouped by expert
    assert torch.equal(d.offsets.long(), torch.cumsum(torch.bincount(top.flatten(), minlength=E), 0))
    assert torch.equal(d.counts, torch.bincount(top.flatten(), minlength=E))
    assert int(d.n_dropped) == 0
    x = torch.randn(N, 5, dtype=torch.float64)
    xs = moe.to_experts(x, d)
    assert torch.equal(xs, x[d.token])  # row i is a copy of its token
    assert torch.equal(moe.combine(xs, d), k * x)  # identity experts: exact, nothing lost or duplicated


def test_empty_experts_get_empty_groups():
    top = torch.tensor([[3], [0], [3], [3]])  # experts 1 and 2 get nothing
    d = moe.dispatch(top, 5)
    assert d.offsets.tolist() == [1, 1, 1, 4, 4] and d.counts.tolist() == [1, 0, 0, 3, 0]
    assert d.token.tolist() == [1, 0, 2, 3]


def test_capacity_keeps_first_choices_first_and_counts_the_drops():
    N, E, k, cap = 60, 4, 2, 12
    top = random_top_k(N, E, k, seed=3)
    top[:40, 0] = 1  # overload expert 1 with first choices
    top[:40, 1] = torch.where(top[:40, 1] == 1, torch.tensor(2), top[:40, 1])
    d = moe.dispatch(top, E, cap)
    counts = torch.bincount(top.flatten(), minlength=E)
    assert torch.equal(d.counts, counts)
    assert int(d.n_dropped) == int((counts - cap).clamp(min=0).sum())
    assert d.slot.numel() + int(d.n_dropped) == k * N  # kept + dropped = all assignments
    assert torch.equal(d.offsets.long(), torch.cumsum(counts.clamp(max=cap), 0))
    # reference: per expert, keep the first `cap` slots in choice-major order (first choices, by token)
    flat = top.t().reshape(-1).tolist()
    kept_ref = sorted(s for e in range(E) for s in [s for s in range(k * N) if flat[s] == e][:cap])
    assert sorted(d.slot.tolist()) == kept_ref
    dropped = torch.ones(k * N, dtype=torch.bool)
    dropped[d.slot] = False
    assert torch.all(d.pos[dropped] == d.slot.numel())  # a dropped assignment reads the zero row
    # a token whose assignments were all dropped comes back as zero: only the residual carries it
    x = torch.randn(N, 3, dtype=torch.float64)
    back = moe.combine(moe.to_experts(x, d), d)
    kept_per_token = torch.bincount(d.token, minlength=N).to(torch.float64)
    assert torch.equal(back, kept_per_token[:, None] * x)


@pytest.mark.parametrize("cap", [None, 5])
def test_permutation_backward_is_the_transpose(cap):
    # the custom backwards (gathers by the inverse permutation, no atomics) against finite differences
    N, E, k = 12, 3, 2
    d = moe.dispatch(random_top_k(N, E, k, seed=4), E, cap)
    x = torch.randn(N, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(d.slot.numel(), 3, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(N, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: moe.to_experts(v, d), (x,))
    assert torch.autograd.gradcheck(lambda v, g: moe.combine(v, d, g), (y, gates))


needs_triton = pytest.mark.skipif(moe.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs triton, run in its interpreter (TRITON_INTERPRET=1, set by conftest)")


@needs_triton
@pytest.mark.parametrize("cap", [None, 9])
def test_triton_permutation_kernels_match_torch(cap):
    # the GPU's kernels, run by Triton's CPU interpreter, against the torch path: forward and both gradients
    N, E, k, D = 24, 4, 2, 40  # D not a power of two: the column mask matters
    d = moe.dispatch(random_top_k(N, E, k, seed=5), E, cap)
    torch.manual_seed(0)
    x, y = torch.randn(N, D), torch.randn(d.slot.numel(), D)
    gates, g_out, g_xs = torch.rand(N, k), torch.randn(N, D), torch.randn(d.slot.numel(), D)
    results = {}
    for kernel in ("torch", "triton"):
        xv, yv, gv = (t.clone().requires_grad_() for t in (x, y, gates))
        xs = moe.to_experts(xv, d, kernel=kernel)
        out = moe.combine(yv, d, gv, kernel=kernel)
        torch.autograd.backward([xs, out], [g_xs, g_out])
        results[kernel] = (xs, out, xv.grad, yv.grad, gv.grad)
    for a, b in zip(*results.values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)  # float32; sums of k terms in another order
    if cap is not None:
        assert int(d.n_dropped) > 0 and torch.count_nonzero(results["triton"][4]) < N * k  # dropped: no gate grad


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_router_function_gradcheck_and_agreement_with_autograd(gate, with_bias):
    # _Router's hand-written backward (the gates' gradient scattered onto the scores', softmax/sigmoid backward,
    # dx and dW) against finite differences in float64, and against the plain-autograd router in float32
    torch.manual_seed(6)
    N, d, E, k = 23, 12, 6, 2
    bias = torch.randn(E) * 0.05 if with_bias else None
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, d, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        r = moe.route(x, w, k, gate=gate, bias=bias, dtype=torch.float64, kernel="torch")
        return r.scores, r.gates
    assert torch.autograd.gradcheck(f, (x, w))
    g_s, g_g = torch.randn(N, E), torch.randn(N, k)
    got = {}
    for name, fn in (("new", lambda a, b: moe.route(a, b, k, gate=gate, bias=bias, kernel="torch")),
                     ("autograd", lambda a, b: moe.route_autograd(a, b, k, gate=gate, bias=bias))):
        a, b = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        r = fn(a, b)
        torch.autograd.backward([r.scores, r.gates], [g_s, g_g])
        got[name] = (r.top_idx, r.scores, r.gates, a.grad, b.grad)
    new, ref = got["new"], got["autograd"]
    assert all(torch.equal(u, v) for u, v in zip(new[:3], ref[:3]))  # the same forward ops: bit-identical
    for u, v in zip(new[3:], ref[3:]):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6)  # float32, the backward's sums in another order


def test_router_saves_x_as_it_came_and_returns_dx_in_its_dtype():
    x = torch.randn(10, 8).to(torch.bfloat16).requires_grad_()
    w = torch.randn(4, 8, requires_grad=True)
    r = moe.route(x, w, 2, kernel="torch")
    assert r.scores.dtype == torch.float32 and r.gates.dtype == torch.float32  # Switch §2.4: an fp32 router
    saved = r.gates.grad_fn.saved_tensors
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)  # no float32 copy of x kept
    r.gates.sum().backward()  # only the gates used: the scores' gradient is None, not a tensor of zeros
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert moe.route(x, w, 2, dtype=torch.bfloat16).scores.dtype == torch.bfloat16  # the bf16 router: autograd


@needs_triton
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", [(6, 2), (32, 1)])
def test_triton_router_matches_torch(gate, E, k):
    # the GPU's router (one kernel forward, two backward), run by Triton's CPU interpreter, against the torch path
    torch.manual_seed(7)
    N, d = 70, 40  # N, d not multiples of the blocks; E padded to 16 (or a power of two) for tl.dot
    bias = torch.randn(E) * 0.05
    x, w = torch.randn(N, d) * 0.2, torch.randn(E, d)  # logits of a few units: no sigmoid saturated to 1.0 (ties)
    g_s, g_g = torch.randn(N, E), torch.randn(N, k)
    for b in (None, bias):
        got = {}
        for kernel in ("torch", "triton"):
            a, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            r = moe.route(a, ww, k, gate=gate, bias=b, kernel=kernel)
            torch.autograd.backward([r.scores, r.gates], [g_s, g_g])
            got[kernel] = (r.top_idx, r.scores, r.gates, a.grad, ww.grad)
        assert torch.equal(got["triton"][0], got["torch"][0])
        for u, v in zip(got["triton"][1:], got["torch"][1:]):
            assert torch.allclose(u, v, rtol=1e-5, atol=1e-5 * v.abs().max().item())  # float32 rounding
    xb = x.to(torch.bfloat16)
    grads = {}
    for kernel in ("torch", "triton"):  # bf16 x, gates only: dx comes back in bf16
        a, ww = xb.clone().requires_grad_(), w.clone().requires_grad_()
        moe.route(a, ww, k, gate=gate, kernel=kernel).gates.sum().backward()
        grads[kernel] = (a.grad, ww.grad)
    assert grads["triton"][0].dtype == torch.bfloat16
    assert torch.allclose(grads["triton"][0].float(), grads["torch"][0].float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(grads["triton"][1], grads["torch"][1], rtol=1e-5, atol=1e-5)


def test_capacity_follows_switch_eq_3():
    assert moe.capacity(n_tokens=1024, n_experts=8, top_k=1, capacity_factor=1.0) == 128
    assert moe.capacity(1024, 8, 1, 1.25) == 160
    assert moe.capacity(1024, 8, 2, 1.25) == 320  # k assignments per token
    assert moe.capacity(1000, 3, 1, 1.0) == 334  # rounded up


# ---------------------------------------------------------------------------------- experts and layer


def test_grouped_experts_match_the_loop_reference():
    torch.manual_seed(0)
    N, d, H, E, k = 96, 16, 24, 6, 2
    x = torch.randn(N, d, dtype=torch.float64)
    w1, w2 = torch.randn(E, d, H, dtype=torch.float64), torch.randn(E, H, d, dtype=torch.float64)
    r = moe.route(x.float(), torch.randn(E, d), k)
    gates = r.gates.double()
    ref = moe.experts_loop(x, r.top_idx, gates, w1, w2)
    disp = moe.dispatch(r.top_idx, E)
    got = moe.experts_grouped(x, disp, w1, w2, gates)  # float64
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)  # same products, float64 rounding only
    got32 = moe.experts_grouped(x.float(), disp, w1.float(), w2.float(), r.gates)
    # float32: the gate applied before the second matmul instead of after: a few float32 ulps
    assert torch.allclose(got32.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # the gradients agree too (float64): the permutations' backward and the gate folded into the hidden layer
    params = [t.clone().requires_grad_() for t in (x, w1, w2, gates)]
    moe.experts_grouped(params[0], disp, *params[1:3], params[3]).pow(2).sum().backward()
    ref_params = [t.clone().requires_grad_() for t in (x, w1, w2, gates)]
    moe.experts_loop(ref_params[0], r.top_idx, ref_params[3], *ref_params[1:3]).pow(2).sum().backward()
    for a, b in zip(params, ref_params):
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_grouped_mm_fallback_matches_and_handles_empty_groups():
    torch.manual_seed(1)
    x, w = torch.randn(10, 8), torch.randn(3, 8, 4)
    offsets = torch.tensor([3, 3, 10], dtype=torch.int32)  # expert 1 gets no rows
    ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    assert torch.allclose(moe.grouped_mm(x, w, offsets), ref, atol=1e-5)  # float32 sums of 8 terms
    if hasattr(torch, "_grouped_mm"):  # the GPU path's calling convention, where torch has a CPU kernel
        try:
            got = torch._grouped_mm(x, w, offs=offsets)
        except (RuntimeError, NotImplementedError):
            pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
        assert torch.allclose(got, ref, atol=1e-5)


def test_bias_steers_selection_only_and_follows_algorithm_1():
    x = torch.randn(5, 4)
    weight = torch.zeros(3, 4)  # every score equal: the bias alone decides
    for gate in ("softmax", "sigmoid"):
        r = moe.route(x, weight, 1, gate=gate, bias=torch.tensor([0.0, 0.0, 0.01]))
        assert torch.equal(r.top_idx.flatten(), torch.full((5,), 2))
        expected = 1 / 3 if gate == "softmax" else 0.5
        assert torch.allclose(r.gates, torch.full((5, 1), expected))  # the gate never includes the bias
    cfg = moe.GPTConfig(d_model=8, n_head=2, ffn="moe", n_experts=3, d_expert=8, balance="bias", bias_rate=1e-3)
    layer = moe.MoE(cfg)
    layer.counts = torch.tensor([5, 1, 2])  # mean 8/3: expert 0 overloaded, 1 and 2 underloaded
    layer.update_bias()
    assert torch.allclose(layer.bias, torch.tensor([-1e-3, 1e-3, 1e-3]))
    layer.counts = torch.tensor([2, 2, 2])  # balanced: sign(0) = 0, no change
    layer.update_bias()
    assert torch.allclose(layer.bias, torch.tensor([-1e-3, 1e-3, 1e-3]))


def test_moe_layer_gradients_reach_the_router_through_the_gate():
    torch.manual_seed(2)
    cfg = moe.GPTConfig(d_model=16, n_head=2, ffn="moe", n_experts=4, top_k=1, d_expert=32, balance="none")
    layer = moe.MoE(cfg)
    out = layer(torch.randn(2, 5, 16))
    out.pow(2).sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0  # via p_i(x) in Switch eq. 2
    assert layer.w1.grad.abs().sum() > 0 and layer.aux is None
    assert int(layer.counts.sum()) == 10 and int(layer.n_dropped) == 0


def test_max_violation_is_wang_eq_4_averaged_over_layers():
    assert moe.max_violation(torch.tensor([[4, 4, 4, 4]])) == pytest.approx(0.0)
    assert moe.max_violation(torch.tensor([[8, 4, 2, 2]])) == pytest.approx(1.0)  # (8 - 4) / 4
    assert moe.max_violation(torch.tensor([[8, 4, 2, 2], [4, 4, 4, 4]])) == pytest.approx(0.5)


def test_forced_routing_is_balanced_or_skewed_as_described():
    bal = moe.forced_routing(64, 8, 2, "balanced", "cpu")
    assert torch.equal(torch.bincount(bal.top_idx.flatten(), minlength=8), torch.full((8,), 16))
    assert torch.all(bal.top_idx[:, 0] != bal.top_idx[:, 1])
    skew = moe.forced_routing(64, 8, 2, "skewed", "cpu")
    counts = torch.bincount(skew.top_idx.flatten(), minlength=8)
    assert counts[0] == 64 and moe.max_violation(counts) == pytest.approx(3.0)  # half of all assignments
    with pytest.raises(ValueError):
        moe.forced_routing(8, 4, 1, "zipf", "cpu")


def test_tokens_to_target_and_spearman():
    tokens, losses = [0, 100, 200, 300], [10.0, 6.0, 5.0, 4.5]
    assert moe.tokens_to_target(tokens, losses, 5.5) == pytest.approx(150.0)  # halfway from 6.0 to 5.0
    assert moe.tokens_to_target(tokens, losses, 4.0) is None
    assert moe.spearman([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)
    assert moe.spearman([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(-1.0)


def test_a_tiny_training_run_records_loads_and_stays_finite():
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 64, 4000), rng.integers(0, 64, 600)
    corpus = moe.Corpus(train, val, seq_len=16, batch_size=4, eval_batches=2, device="cpu")
    cfg = moe.GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=16, ffn="moe", n_experts=4,
                        d_expert=32, gate="sigmoid", balance="bias")
    r = moe.train("tiny", cfg, corpus, steps=4, lr=1e-2, seed=0, eval_every=2, keep_model=True)
    assert r.tokens == [0, 128, 256] and all(np.isfinite(r.val_loss))
    assert r.load.shape == (4, 2, 4) and (r.load.sum(axis=-1) == 64).all()  # 4 x 16 tokens per layer
    assert r.model.moe_layers()[0].bias.abs().sum() > 0  # the bias moved
    ev = moe.evaluate(r.model, corpus, capacity_factor=1.0)
    assert 0.0 <= ev["dropped_frac"] <= 1.0 and ev["counts"].shape == (2, 4)


# --------------------------------------------------------------------------------------- bad values


def test_bad_config_values_are_rejected():
    for bad in (dict(balance="sinkhorn"), dict(gate="relu"), dict(top_k=0), dict(top_k=9, n_experts=8),
                dict(capacity_factor=0.0), dict(router_dtype="fp8"), dict(d_model=10, n_head=4)):
        with pytest.raises(ValueError):
            moe.GPTConfig(**bad)


@pytest.mark.parametrize("bad", [{"n_seeds": 0}, {"expert_counts": [1, 8]}, {"expert_counts": 8},
                                 {"steps": 0}, {"lr": -1.0}, {"capacity_factors": [0.0]},
                                 {"stress_seeds": 2.5}, {"corpus": "fineweb"}, {"n_experts": 8}])
def test_bad_parameters_raise_parameter_error(bad):
    chapter = load_chapter(FOLDER)
    with pytest.raises(ParameterError):
        resolve(chapter.parameters, {"profile": "smoke", **bad}, cuda=False)


def test_profile_defaults_resolve():
    chapter = load_chapter(FOLDER)
    smoke = resolve(chapter.parameters, {"profile": "smoke"}, cuda=False)
    gpu = resolve(chapter.parameters, {"profile": "gpu"}, cuda=True)
    assert smoke["steps"] < gpu["steps"] and gpu["expert_counts"] == [8, 32] and 8 in smoke["expert_counts"]
    assert gpu["corpus"] == "corpus-xl" and not gpu["extended"] and smoke["extended"] and 0 < gpu["budget_s"] <= 450
    assert gpu["bench_d_model"] % 8 == 0 and gpu["bench_d_expert"] % 8 == 0  # torch._grouped_mm alignment


# ------------------------------------------------------------------- the fair tests (issue 15)


def test_dropped_per_batch_counts_capacity_per_batch_on_a_hand_example():
    # 2 batches of T = 4 tokens, top-1, 2 experts, 1 layer. Capacity at factor 1.0: ceil(1 * 4 / 2) = 2.
    # Batch 0 sends 3 tokens to expert 0: one over capacity, 1 of 4 dropped. Batch 1 is balanced: none.
    load = np.array([[[3, 1]], [[2, 2]]])
    assert moe.dropped_per_batch(load, 1, 1.0).tolist() == [0.25, 0.0]
    assert moe.dropped_per_batch(load, 1, 1.25).tolist() == [0.0, 0.0]  # ceil(2.5) = 3: nothing over
    # Capacity is counted per batch, not over the pooled loads (pooled, [5, 3] against 2 x 2 would drop 1 of 8)
    assert moe.dropped_per_batch(load, 1, 1.0).mean() == 0.125


def test_dropped_per_batch_agrees_with_dispatch_on_random_routings():
    E, k, T = 8, 2, 512
    loads, expected = [], []
    for seed in range(5):
        top = random_top_k(T, E, k, seed)
        top[: T // 3, 0] = 0  # skew: expert 0 overloaded
        cap = moe.capacity(T, E, k, 1.25)
        d = moe.dispatch(top, E, cap)
        loads.append(d.counts.numpy()[None])  # (L = 1, E)
        expected.append(int(d.n_dropped) / (T * k))
    got = moe.dropped_per_batch(np.stack(loads), k, 1.25)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)  # exact counts


def test_maxvio_per_batch_is_wang_eq_4_per_batch_averaged_over_layers():
    load = np.array([[[3, 1], [2, 2]],  # layer 0: (3 - 2) / 2 = 0.5; layer 1: 0 -> 0.25
                     [[4, 0], [1, 3]]])  # layer 0: 1.0; layer 1: 0.5 -> 0.75
    np.testing.assert_allclose(moe.maxvio_per_batch(load), [0.25, 0.75])
    np.testing.assert_allclose(moe.maxvio_per_batch(load[:1]), [moe.max_violation(torch.tensor(load[0]))])


def _source_ordered_split(n_sources=4, per_source=2000, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n_sources * per_source).astype(np.uint16)
    sources = np.repeat(np.arange(n_sources), per_source).astype(np.uint8)  # source-ordered, like a raw file
    return tokens, sources


def test_validation_sample_mixes_sources_in_every_batch():
    val, src = _source_ordered_split()
    train = np.random.default_rng(1).integers(0, 64, 5000).astype(np.uint16)
    c = moe.Corpus(train, val, seq_len=16, batch_size=8, eval_batches=4, device="cpu", val_sources=src,
                   source_names=["a", "b", "c", "d"], seed=0)
    assert len(c.val) == 4 and all(x.shape == (8, 16) for x, _ in c.val)
    # the old sampler (consecutive windows from the start) would give 1 source per batch, and only source a
    assert all(n >= 2 for n in c.sources_per_batch())
    assert set(torch.cat(c.val_src).unique().tolist()) == {0, 1, 2, 3}
    starts = np.sort(c.val_starts)
    assert (np.diff(starts) >= 17).all()  # non-overlapping windows of seq_len + 1
    x, y = c.val[0]
    s0 = int(c.val_starts[0])
    assert torch.equal(x[0], torch.from_numpy(val[s0:s0 + 16].astype(np.int64)))  # windows are the split's tokens
    assert torch.equal(y[0], torch.from_numpy(val[s0 + 1:s0 + 17].astype(np.int64)))
    c2 = moe.Corpus(train, val, seq_len=16, batch_size=8, eval_batches=4, device="cpu", seed=0)
    assert np.array_equal(c.val_starts, c2.val_starts)  # seeded


def _mixed_split(mix, n_docs=800, seed=0, vocab=64):
    """Documents of 20-200 tokens whose sources are drawn with probabilities ``mix`` (shuffled, not ordered)."""
    rng = np.random.default_rng(seed)
    src = np.repeat(rng.choice(len(mix), size=n_docs, p=np.asarray(mix) / sum(mix)),
                    rng.integers(20, 200, size=n_docs)).astype(np.uint8)
    return rng.integers(0, vocab, len(src)).astype(np.uint16), src


def test_match_shares_gives_the_validation_sample_the_training_mix():
    names = ["a", "b", "c", "d"]
    val, src = _mixed_split([0.1, 0.2, 0.3, 0.4])                    # the val split's own mix
    train = np.random.default_rng(1).integers(0, 64, 5000).astype(np.uint16)
    mix = {"a": 45.0, "b": 25.0, "c": 20.0, "d": 10.0}                 # the training mix, in percent
    kw = dict(seq_len=16, batch_size=8, eval_batches=5, device="cpu", val_sources=src, source_names=names, seed=0)
    c = moe.Corpus(train, val, match_shares=mix, **kw)
    n = 40
    assert len(c.val) == 5 and all(x.shape == (8, 16) for x, _ in c.val) and len(c.val_starts) == n
    counts = torch.cat(c.val_src).reshape(-1).bincount(minlength=4).numpy() / 16   # target tokens per source / 16
    quota = np.array([mix[k] for k in names]) / 100 * n
    assert (np.abs(counts - quota) < 1).all() and counts.sum() == n               # within one window of its share
    assert all(v.unique().numel() == 1 for s in c.val_src for v in s)             # every window one source
    starts = np.sort(c.val_starts)
    assert (np.diff(starts) >= 17).all() and (starts % 17 == 0).all()
    assert all(n_src >= 2 for n_src in c.sources_per_batch())                     # batches still mix the sources
    s0 = int(c.val_starts[0])
    assert torch.equal(c.val[0][0][0], torch.from_numpy(val[s0:s0 + 16].astype(np.int64)))
    assert np.array_equal(c.val_starts, moe.Corpus(train, val, match_shares=mix, **kw).val_starts)  # seeded
    # without match_shares: the uniform sample, unchanged, whose mix is the split's
    u = moe.Corpus(train, val, **kw)
    from repro_utils import data
    assert np.array_equal(np.sort(u.val_starts), data.sample_windows(len(val), n, 16, seed=0))
    assert torch.cat(u.val_src).reshape(-1).bincount(minlength=4)[0] / (n * 16) < 0.3
    with pytest.raises(ValueError, match="val_sources"):
        moe.Corpus(train, val, 16, 8, 5, "cpu", match_shares=mix)


def test_match_shares_shrinks_the_sample_where_a_source_is_short_and_says_so():
    val = np.random.default_rng(0).integers(0, 64, 17 * 30 + 1).astype(np.uint16)
    src = np.concatenate([np.zeros(17 * 27, np.uint8), np.ones(17 * 3 + 1, np.uint8)])  # 27 windows of a, 3 of b
    train = np.random.default_rng(1).integers(0, 64, 5000).astype(np.uint16)
    with pytest.warns(UserWarning, match="drawing 7"):   # 24 at 50/50 need 12 of b; 7 (4 + 3) keep the mix
        c = moe.Corpus(train, val, 16, 8, 3, "cpu", val_sources=src, source_names=["a", "b"],
                       match_shares={"a": 1.0, "b": 1.0})
    assert len(c.val_starts) == 7 and [x.shape[0] for x, _ in c.val] == [7]
    assert torch.cat(c.val_src).reshape(-1).bincount().tolist() == [4 * 16, 3 * 16]


def test_the_notebook_run_next_draws_its_validation_sample_in_the_training_mix():
    """The notebook a run executes (the staged next version while there is one) computes the training split's
    source shares before it builds the Corpus, and passes them as match_shares (rule 8: the balance metrics are
    declared on a validation sample whose sources match the training mix)."""
    import nbformat

    nb = nbformat.read(load_chapter(FOLDER).source_notebook, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "moe.Corpus(" in c.source)
    assert "match_shares=tr" in cell
    assert cell.index("tr = shares(train_src, train_names)") < cell.index("moe.Corpus(")


def test_per_source_losses_average_to_the_overall_loss():
    val, src = _source_ordered_split()
    train = np.random.default_rng(1).integers(0, 64, 5000).astype(np.uint16)
    c = moe.Corpus(train, val, seq_len=16, batch_size=4, eval_batches=2, device="cpu", val_sources=src,
                   source_names=["a", "b", "c", "d"], seed=3)
    torch.manual_seed(0)
    model = moe.GPT(moe.GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16, ffn="moe",
                                  n_experts=4, d_expert=32))
    ev = moe.evaluate(model, c, per_source=True)
    counts = torch.cat(c.val_src).reshape(-1).bincount(minlength=4).double()
    pooled = sum(counts[i] * ev["per_source"][n] for i, n in enumerate("abcd") if n in ev["per_source"]) / counts.sum()
    assert abs(float(pooled) - ev["loss"]) < 1e-5  # equal batch sizes: the token mean is the batch mean (fp32 sums)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [moe.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_best_lr_flags_an_optimum_at_the_bracket_edge():
    assert moe.best_lr({1e-3: 3.0, 2e-3: 2.9, 4e-3: 3.1}) == (2e-3, True)
    assert moe.best_lr({1e-3: 3.0, 2e-3: 2.9, 4e-3: 2.8}) == (4e-3, False)
    assert moe.best_lr({1e-3: 3.0, 2e-3: float("nan"), 4e-3: 3.5}) == (1e-3, False)  # a diverged run never wins


def test_budget_skips_what_does_not_fit_and_remembers_it():
    import time

    b = moe.Budget(100, t0=time.time() - 90, reserve=5)
    assert b.fits(4) and not b.fits(6, "run x") and b.skipped == ["run x"]
    assert moe.Budget(0).fits(1e9)  # 0 = no budget


def test_softmax_lowp_rounds_every_step_unlike_torchs_bf16_softmax():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4096, 8, generator=g) * 3).to(torch.bfloat16)
    low, torch_bf16 = moe.softmax_lowp(logits), logits.softmax(dim=-1)
    ref = logits.float().softmax(dim=-1)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 2e-2  # bf16: 8 significant bits, a few roundings
    assert (low != torch_bf16).any()  # torch rounds only its output: a different function
    assert (low.float() - ref).abs().mean() > (torch_bf16.float() - ref).abs().mean()
    r = moe.route_autograd(logits.float(), torch.eye(8), 1, dtype=torch.bfloat16)  # the bf16 router uses it
    assert torch.equal(r.scores, moe.softmax_lowp(logits.float().to(torch.bfloat16) @ torch.eye(8).to(torch.bfloat16)))


def test_the_dense_vs_moe_claims_need_their_control_before_a_negative():
    from repro_utils.grading import NOT_REPRODUCED, UNVERIFIED, Measurement, grade

    claim = load_chapter(FOLDER).claim("moe-tokens-to-target-tuned")
    assert claim.control and claim.control["holds_if"] == {"at_least": 0.01}
    fails = (0.5, 0.55, 0.6)  # the MoE never reaches dense: speed-ups well under every bar
    no_power = Measurement(setting="s", values=fails, control={"setting": "c", "values": [0.0, 0.002, -0.001]})
    powered = Measurement(setting="s", values=fails, control={"setting": "c", "values": [0.05, 0.06, 0.055]})
    assert grade(claim, no_power, "gpu").rung == UNVERIFIED
    assert grade(claim, powered, "gpu").rung == NOT_REPRODUCED
    for cid in ("moe-gain-grows-tuned", "aux-free-frontier", "bf16-router-stress"):
        assert load_chapter(FOLDER).claim(cid).control


def test_init_scale_is_switchs_truncated_normal_on_every_matrix_but_the_embeddings():
    cfg = moe.GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=64, ffn="moe", n_experts=4,
                        d_expert=256, init_scale=1.0)
    torch.manual_seed(0)
    m = moe.GPT(cfg)
    layer = m.moe_layers()[0]
    for w, fan_in in ((layer.w1, 64), (layer.w2, 256), (layer.router, 64), (m.blocks[0].attn.qkv.weight, 64)):
        std = (1.0 / fan_in) ** 0.5
        w = w.detach()
        assert w.abs().max() <= 2 * std + 1e-6  # resampled beyond 2 std
        # a normal truncated at 2 std has std 0.880 of the untruncated one; 5% covers sampling at these sizes
        assert abs(float(w.std()) / (0.880 * std) - 1) < 0.05
    assert abs(float(m.wte.weight.detach().std()) - 0.02) < 0.002  # embeddings keep GPT-2's init


def test_bench_layer_records_the_goals_replicates_from_alternating_timings():
    """The goals declare 5 replicates: bench_layer returns one ratio per pair of timings (baseline first, then the
    grouped layer), through the timer it was given. A fake timer that counts calls makes the pairing visible."""
    from repro_utils.bench import Timing

    calls = []

    def fake_time_fn(fn, graph=False, **kw):
        calls.append(graph)
        return Timing(ms=float(len(calls)), method="fake")  # the n-th timing takes n ms

    out = moe.bench_layer(64, 16, 32, 4, 2, torch.device("cpu"), fake_time_fn, seed=0, replicates=3)
    r = out["ratios"]
    assert len(r["grouped_vs_dense_fwdbwd"]) == len(r["grouped_vs_loop_fwdbwd"]) == 3 and r["dense_graphed"] is False
    n0 = len(calls) - 12  # the 12 timings of the two ratio loops come last: (b, c) pairs, dense then loop
    assert r["grouped_vs_dense_fwdbwd"] == [(n0 + 1) / (n0 + 2), (n0 + 3) / (n0 + 4), (n0 + 5) / (n0 + 6)]
    assert r["grouped_vs_loop_fwdbwd"] == [(n0 + 7) / (n0 + 8), (n0 + 9) / (n0 + 10), (n0 + 11) / (n0 + 12)]
    assert not any(calls)  # no CUDA graphs on the CPU


# ------------------------------------------------------------------------------------------ router z-loss


def test_router_z_loss_is_st_moe_eq_5_and_enters_the_training_loss():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2 and log 4
    assert moe.router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    torch.manual_seed(0)
    base = dict(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=16, ffn="moe", n_experts=4, d_expert=32)
    idx = torch.randint(0, 64, (2, 16))
    plain = moe.GPT(moe.GPTConfig(**base))
    with_z = moe.GPT(moe.GPTConfig(**base, z_loss=1e-3))
    with_z.load_state_dict(plain.state_dict())  # the same weights: z_loss adds a layer attribute, no parameter
    ce0, aux0 = plain(idx, idx)
    ce1, aux1 = with_z(idx, idx)
    assert all(isinstance(m, moe.ZLossMoE) for m in with_z.moe_layers())
    assert not any(isinstance(m, moe.ZLossMoE) for m in plain.moe_layers())
    assert torch.equal(ce0, ce1)  # the layer's output is unchanged
    z = sum(m.z for m in with_z.moe_layers())
    assert (aux1 - aux0).item() == pytest.approx(1e-3 * z.item(), rel=1e-5)
    assert z.item() > 0
    aux1.backward()
    assert with_z.moe_layers()[0].router.grad.abs().sum() > 0  # the z-loss reaches W_r
    with pytest.raises(ValueError, match="z_loss"):
        moe.GPTConfig(z_loss=-1e-3)


def test_unstable_flags_divergence_and_loss_spikes_only():
    def res(curve, diverged=False):
        return moe.TrainResult("r", moe.GPTConfig(), 0, val_loss=list(curve), diverged=diverged)

    assert not moe.unstable(res([10.8, 7.0, 6.2, 6.0]))  # falls all the way
    assert not moe.unstable(res([10.8, 7.0, 7.4, 6.0]))  # a rise of 0.4 nats: noise, not a spike
    assert moe.unstable(res([10.8, 7.0, 7.6, 6.0]))  # a rise of 0.6 nats between evaluations
    assert moe.unstable(res([10.8, 7.0, float("nan")]))
    assert moe.unstable(res([10.8, 7.0], diverged=True))
    assert moe.unstable(res([10.8, 7.0, 7.4]), rise=0.3)


def test_shared_expert_ablation_swaps_it_for_one_more_routed_expert_and_restores_it():
    torch.manual_seed(0)
    cfg = moe.GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=16, ffn="moe", n_experts=5,
                        d_expert=32, n_shared=1)
    model = moe.GPT(cfg).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        base = model(idx, idx)[0]
        with moe.shared_expert_ablated(model):
            assert all(m.shared is None and m.cfg.top_k == 2 for m in model.moe_layers())
            swapped = model(idx, idx)[0]
        with moe.shared_expert_ablated(model, replace=False):
            assert all(m.shared is None and m.cfg.top_k == 1 for m in model.moe_layers())
            off = model(idx, idx)[0]
        again = model(idx, idx)[0]
        assert torch.equal(base, again) and all(m.shared is not None and m.cfg.top_k == 1 for m in model.moe_layers())
        assert not torch.equal(base, swapped) and not torch.equal(base, off) and not torch.equal(off, swapped)
        for m in model.moe_layers():  # a shared expert that outputs nothing: switching it off changes nothing
            m.shared.proj.weight.zero_()
        zeroed = model(idx, idx)[0]
        with moe.shared_expert_ablated(model, replace=False):
            assert torch.allclose(model(idx, idx)[0], zeroed, atol=1e-6)
    with pytest.raises(ValueError, match="shared expert"):
        with moe.shared_expert_ablated(moe.GPT(moe.GPTConfig(**{**cfg.__dict__, "n_shared": 0}))):
            pass
