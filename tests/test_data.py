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


def _documents(mix, n_docs=600, lengths=(20, 200), seed=0):
    """A split of documents of random lengths whose sources are drawn with probabilities ``mix``: the per-token
    source index (uint8), as token_sources gives it."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(mix), size=n_docs, p=np.asarray(mix) / sum(mix))
    return np.repeat(src, rng.integers(*lengths, size=n_docs)).astype(np.uint8)


def test_windows_by_source_follow_the_target_shares_not_the_splits():
    names = ["a", "b", "c", "d"]
    src = _documents([0.1, 0.2, 0.3, 0.4])              # the split's own mix
    target = {"a": 40.0, "b": 30.0, "c": 20.0, "d": 10.0}  # e.g. the training mix, in percent
    n, seq_len = 37, 15
    starts = data.sample_windows_by_source(src, names, target, n, seq_len, seed=0)
    width = seq_len + 1
    assert len(starts) == n and (np.diff(starts) >= width).all()        # sorted, non-overlapping
    assert (starts % width == 0).all() and starts[-1] + width <= len(src)  # aligned slots, inside the split
    win = src[starts[:, None] + np.arange(width)]
    assert (win == win[:, :1]).all()                                    # every window from one source alone
    counts = np.bincount(win[:, 0], minlength=4)
    quota = np.array([target[k] for k in names]) / 100 * n
    assert counts.sum() == n and (np.abs(counts - quota) < 1).all()     # within one window of its quota
    assert counts.tolist() == [15, 11, 7, 4]                            # 14.8, 11.1, 7.4, 3.7: largest remainders
    tok = np.bincount(win[:, 1:].reshape(-1), minlength=4) / (n * seq_len)
    assert np.allclose(tok, counts / n)                                 # token shares = window shares
    uniform = data.sample_windows(len(src), n, seq_len, seed=0)          # the uniform sample keeps the split's mix
    assert np.bincount(src[uniform + 1], minlength=4)[0] < counts[0]
    # seeded: the same seed draws the same windows, another seed others, and a source's windows spread over the split
    assert np.array_equal(starts, data.sample_windows_by_source(src, names, target, n, seq_len, seed=0))
    assert not np.array_equal(starts, data.sample_windows_by_source(src, names, target, n, seq_len, seed=1))
    many = data.sample_windows_by_source(src, names, target, 200, seq_len, seed=2)
    assert many.max() > 0.9 * len(src) and many.min() < 0.1 * len(src)
    # fractions or percents, the same draw; a source of the split left out of the shares, or at 0, gets nothing
    assert np.array_equal(starts, data.sample_windows_by_source(src, names, {k: v / 100 for k, v in target.items()},
                                                                n, seq_len, seed=0))
    only = data.sample_windows_by_source(src, names, {"b": 1.0, "c": 0.0}, 20, seq_len, seed=0)
    assert set(src[only].tolist()) == {1}


def test_windows_by_source_round_by_largest_remainder():
    src = _documents([1, 1, 1])
    starts = data.sample_windows_by_source(src, ["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, 10, 15)
    assert np.bincount(src[starts], minlength=3).tolist() == [4, 3, 3]   # ties go to the first named


def test_windows_by_source_without_a_source_in_the_split_say_so_and_fill_from_the_others():
    src = _documents([1, 1, 1])
    with pytest.warns(UserWarning, match=r"zz \(25.0%\).*get none"):
        starts = data.sample_windows_by_source(src, ["a", "b", "c"], {"a": 1, "b": 1, "c": 1, "zz": 1}, 12, 15)
    assert len(starts) == 12 and np.bincount(src[starts], minlength=3).tolist() == [4, 4, 4]


def test_windows_by_source_shortfall_raises_or_shrinks_keeping_the_mix():
    names = ["a", "b"]
    src = np.concatenate([np.zeros(16 * 50, np.uint8), np.ones(16 * 5, np.uint8), [1]])  # 50 windows of a, 5 of b
    # 25 windows at 60/40 need 10 of b; 13 is the most that fits (7.8 + 5.2 -> 8 + 5; 14 would need 6 of b)
    with pytest.raises(ValueError, match=r"b needs 10, has 5.*at most 13 windows fit"):
        data.sample_windows_by_source(src, names, {"a": 0.6, "b": 0.4}, 25, 15)
    with pytest.warns(UserWarning, match="drawing 13"):
        starts = data.sample_windows_by_source(src, names, {"a": 0.6, "b": 0.4}, 25, 15, shortfall="shrink")
    assert np.bincount(src[starts], minlength=2).tolist() == [8, 5]


@pytest.mark.parametrize("args, match", [
    (dict(n=100), "hold only"),                              # more windows than the split holds
    (dict(n=0), "n >= 1"),
    (dict(shares={"a": -1.0, "b": 2.0}), "non-negative"),
    (dict(shares={"a": float("nan")}), "non-negative"),
    (dict(shares={"a": 0.0, "b": 0.0}), "sum to 0"),
    (dict(shares={"zz": 1.0}), "no source"),                 # none of the named sources is in the split
    (dict(names=["a"]), "index 1"),                          # sources point past names
    (dict(shortfall="cap"), "shortfall"),
])
def test_windows_by_source_refuse_impossible_requests(args, match):
    src = np.repeat(np.array([0, 1], np.uint8), 16 * 20)    # 40 windows of 16 (39 slots: one token kept spare)
    kw = dict(sources=src, names=["a", "b"], shares={"a": 1.0, "b": 1.0}, n=10, seq_len=15) | args
    with pytest.raises(ValueError, match=match):
        data.sample_windows_by_source(**kw)
