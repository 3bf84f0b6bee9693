"""Chapter 06: paged attention. The torch reference against dense float64 attention, then the Triton kernels
(in Triton's CPU interpreter) against the reference: odd lengths, shuffled block tables, GQA groups of 1, 4
and 8 query heads per KV head, blocks of 8 and 16 tokens.

TRITON_INTERPRET=1 must be set when triton is imported and the kernels are decorated: it is set around the
import and, by an autouse fixture, around each test, as tests/test_03_flash_attention.py does.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import import_interpreted

A = import_interpreted("tinyserve.attention")

HEAD_DIM = 32
# fp32: the kernels sum exp2 of fp32 scores in another order than SDPA (online softmax over 16-key tiles vs
# one softmax): a few ulp of O(1) outputs, 8.3e-7 at most measured here; 1e-5 leaves 10x. fp16: the output is
# rounded to fp16 (half an ulp is 9.8e-4 for |O| in [2, 4)) and P is rounded before P V: 9.2e-4 measured, the
# same as SDPA's own error on the same inputs; 2e-3 leaves 2x, and the kernel must not be worse than 1.5x SDPA.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def paged_case(ctx_lens, q_lens, h_kv, group, block_size, dtype=torch.float32, seed=0):
    """Random K/V for sequences of ctx_lens tokens, scattered over a shuffled pool of blocks (with spare
    blocks between them); the last q_lens[b] tokens of sequence b are its queries."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in ctx_lens]
    num_blocks = 2 * sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need)
    tables = torch.full((len(ctx_lens), width), num_blocks - 1, dtype=torch.int32)
    i = 0
    for b, k in enumerate(need):
        tables[b, :k] = perm[i:i + k]
        i += k
    k_cache = torch.randn(num_blocks, block_size, h_kv, HEAD_DIM, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, h_kv, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), h_kv * group, HEAD_DIM, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    prefill = any(m > 1 for m in q_lens)
    meta = A.AttnMeta(prefill, None, torch.tensor(ctx_lens, dtype=torch.int32), tables,
                      cu if prefill else None, max(q_lens), list(ctx_lens), list(q_lens))
    return q, k_cache, v_cache, meta


def dense_reference(q, k_cache, v_cache, meta):
    """Attention written out in float64 from the contiguous K/V of each sequence: no block tables, no SDPA."""
    out, start = [], 0
    group = q.shape[1] // k_cache.shape[2]
    for b, (n, m) in enumerate(zip(meta.context_lens_host, meta.q_lens_host)):
        slots = [int(meta.block_tables[b, p // k_cache.shape[1]]) * k_cache.shape[1] + p % k_cache.shape[1]
                 for p in range(n)]
        k = k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)  # (n, Hq, d)
        v = v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        qb = q[start:start + m].double()  # (m, Hq, d)
        s = torch.einsum("mhd,nhd->hmn", qb, k) / math.sqrt(q.shape[-1])
        future = torch.arange(n)[None, :] > (n - m + torch.arange(m))[:, None]
        p = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
        out.append(torch.einsum("hmn,nhd->mhd", p, v))
        start += m
    return torch.cat(out)


CASES = {  # (context lengths, query lengths): odd lengths, one token, exact block multiples, a recomputed tail
    "prefill": ([37, 1, 16, 50], [37, 1, 16, 50]),
    "prefill-tail": ([45, 23], [7, 23]),  # the first sequence's queries are its last 7 tokens
    "decode": ([37, 1, 16, 50, 9], [1, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_reference_equals_dense_float64_attention(case):
    q, k, v, meta = paged_case(*CASES[case], h_kv=2, group=4, block_size=8, dtype=torch.float64)
    assert torch.allclose(A.attention_torch(q, k, v, meta), dense_reference(q, k, v, meta), atol=1e-12)


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_kernels_match_the_reference(case, group, block_size):
    q, k, v, meta = paged_case(*CASES[case], h_kv=2, group=group, block_size=block_size, seed=group + block_size)
    kernel = A.prefill_triton if meta.is_prefill else A.decode_triton
    got, ref = kernel(q, k, v, meta), A.attention_torch(q, k, v, meta)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert (got - ref).abs().max() <= ATOL[torch.float32]


@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_triton_kernels_in_fp16(case):
    q, k, v, meta = paged_case(*CASES[case], h_kv=1, group=8, block_size=16, dtype=torch.float16, seed=5)
    kernel = A.prefill_triton if meta.is_prefill else A.decode_triton
    ref = dense_reference(q, k, v, meta)
    err = (kernel(q, k, v, meta).double() - ref).abs().max()
    sdpa_err = (A.attention_torch(q, k, v, meta).double() - ref).abs().max()
    assert err <= ATOL[torch.float16] and err <= 1.5 * sdpa_err


def test_store_kv_writes_each_token_to_its_slot_only():
    k_cache, v_cache = torch.zeros(4, 8, 2, HEAD_DIM), torch.zeros(4, 8, 2, HEAD_DIM)
    k, v = torch.randn(3, 2, HEAD_DIM), torch.randn(3, 2, HEAD_DIM)
    slots = torch.tensor([17, 3, 31])  # block 2 slot 1, block 0 slot 3, block 3 slot 7
    A.store_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(k_cache[0, 3], k[1]) and torch.equal(v_cache[3, 7], v[2])
    assert int((k_cache.abs().sum(dim=(2, 3)) > 0).sum()) == 3  # nothing else written
