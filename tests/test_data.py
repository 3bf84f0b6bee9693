"""The data layer: offline from REPRO_DATA_DIR, a clear error when there is neither data nor network."""

from __future__ import annotations

import os

import numpy as np
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


@needs_data
def test_corpus_xl_val_has_every_source_and_per_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path))
    val = data.tokens("val", corpus="corpus-xl")
    names, src = data.token_sources("val", corpus="corpus-xl")
    assert 1_500_000 < len(val) < 1_650_000  # the README: 1.58 M tokens
    assert len(src) == len(val) and src.dtype.name == "uint8"
    assert sorted(names) == sorted(["wiki", "sotu", "brown", "gutenberg", "austen", "linux-doc", "python-doc",
                                    "gcide", "wordnet", "foldoc"])
    eot = data.gpt2_encoding().eot_token
    ends = np.flatnonzero(np.asarray(val) == eot)
    # a document's tokens all carry one source, and the source can change only after an <|endoftext|>
    changes = np.flatnonzero(np.diff(np.asarray(src).astype(int))) + 1
    assert set(changes) <= set(ends + 1)
    first = data.texts("val", corpus="corpus-xl", max_docs=1)
    doc = next(first)
    assert list(val[: len(data.gpt2_encoding().encode_ordinary(doc))]) == data.gpt2_encoding().encode_ordinary(doc)


def test_sample_windows_cover_the_split_without_overlap():
    starts = data.sample_windows(1_000_001, 64, 255, seed=3)
    assert len(starts) == 64 and (np.diff(starts) >= 256).all() and starts[-1] + 256 <= 1_000_001
    assert (starts == data.sample_windows(1_000_001, 64, 255, seed=3)).all()
    assert not (starts == data.sample_windows(1_000_001, 64, 255, seed=4)).all()
    # a shuffled sample, not the first windows: it reaches the last tenth of the split
    assert starts.max() > 900_000
    with pytest.raises(ValueError, match="windows"):
        data.sample_windows(1000, 10, 255)
    toks = np.arange(5000, dtype=np.uint16)
    x, y = data.windows(toks, [0, 100], 8)
    assert x.shape == (2, 8) and x[1, 0] == 100 and torch.equal(x[:, 1:], y[:, :-1])


def test_unknown_corpus_is_refused():
    with pytest.raises(ValueError, match="corpus"):
        next(data.texts("val", corpus="corpus-xxl"))


def test_a_local_folder_without_sources_is_one_source(tmp_path, monkeypatch):
    """A REPRO_DATA_DIR built before documents carried their source ({"id", "text"} only) still loads."""
    import gzip
    import json

    (tmp_path / "data" / "corpus").mkdir(parents=True)
    for split in ("train", "val"):
        with gzip.open(tmp_path / "data" / "corpus" / f"{split}.jsonl.gz", "wt") as f:
            for i in range(3):
                f.write(json.dumps({"id": f"{split}{i}", "text": f"document {i} of {split}"}) + "\n")
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert [s for s, _ in data.documents("val")] == ["corpus"] * 3


@needs_data
def test_build_local_writes_both_corpora_the_loader_reads(tmp_path, monkeypatch):
    """scripts/build_data.py's folder (here from made-up documents instead of FineWeb): corpus/ is the first
    documents, corpus-xl/ a superset, both split by the val rule, and the data layer reads either."""
    import shutil

    rows = [{"id": f"doc-{i}", "text": f"Document {i} says {'hello ' * (i % 7 + 1)}world."} for i in range(300)]
    counts = data.build_local(tmp_path / "d", docs=100, xl_docs=250, rows=iter(rows), tokenizer=False)
    assert counts["corpus/train"] + counts["corpus/val"] == 100
    assert counts["corpus-xl/train"] + counts["corpus-xl/val"] == 250
    assert counts["corpus/val"] == sum(data._is_val(f"doc-{i}") for i in range(100)) > 0
    shutil.copytree(os.path.join(os.environ["REPRO_DATA_DIR"], "tiktoken"), tmp_path / "d" / "tiktoken")
    monkeypatch.setenv("REPRO_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path / "cache"))
    small = list(data.texts("train", corpus="corpus"))
    large = list(data.texts("train", corpus="corpus-xl"))
    assert large[: len(small)] == small and len(large) > len(small)
    assert len(data.tokens("val", corpus="corpus-xl")) > 0
    with pytest.raises(ValueError, match="docs"):
        data.build_local(tmp_path / "e", docs=10, xl_docs=5, rows=iter(rows), tokenizer=False)
    # the tokenizer step reads GPT-2's files through tiktoken's cache in DIR/tiktoken (here already there: offline)
    shutil.copytree(tmp_path / "d" / "tiktoken", tmp_path / "f" / "tiktoken")
    data.build_local(tmp_path / "f", docs=1, xl_docs=2, rows=iter(rows), tokenizer=True)
    assert "TIKTOKEN_CACHE_DIR" not in os.environ or os.environ["TIKTOKEN_CACHE_DIR"] != str(tmp_path / "f" / "tiktoken")
