"""The data layer: offline from REPRO_DATA_DIR, a clear error when there is neither data nor network."""

from __future__ import annotations

import os

import pytest
import torch

from repro_utils import data

needs_data = pytest.mark.skipif(not os.environ.get("REPRO_DATA_DIR"), reason="no REPRO_DATA_DIR (../shared/data)")


@needs_data
def test_offline_tokens_are_the_local_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path))
    val = data.tokens("val")
    assert data.source() == "local"
    assert 140_000 < len(val) < 160_000  # the README: 151 k GPT-2 tokens in val
    assert val.dtype.name == "uint16" and int(val.max()) < 50257
    enc = data.gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]  # the README's check of the offline BPE
    assert (data.tokens("val") == val).all()  # second call: from the cache, identical


@needs_data
def test_batches_are_reproducible_and_shifted(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path))
    toks = data.tokens("val", max_tokens=5000)
    x1, y1 = data.batch(toks, 4, 16, generator=torch.Generator().manual_seed(0))
    x2, _ = data.batch(toks, 4, 16, generator=torch.Generator().manual_seed(0))
    assert x1.shape == (4, 16) and torch.equal(x1, x2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])


def test_no_data_and_no_network_says_what_to_do(monkeypatch):
    monkeypatch.delenv("REPRO_DATA_DIR", raising=False)
    monkeypatch.setenv("REPRO_OFFLINE", "1")
    with pytest.raises(data.DataUnavailable, match="REPRO_DATA_DIR"):
        data.source()


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        next(data.texts("test"))
