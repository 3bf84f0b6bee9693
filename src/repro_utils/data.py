"""Data: the real source when the network is there, the same loaders on a local folder when not.

Order of preference for text:
1. ``REPRO_DATA_DIR`` is set: read ``$REPRO_DATA_DIR/corpus/{train,val}.jsonl.gz`` (English prose, one
   document per line, 4.3 M tokens; see running.md for how to build the folder), or with ``corpus="corpus-xl"``
   ``$REPRO_DATA_DIR/corpus-xl/{train,val}.jsonl.xz`` (~32 M tokens from ten sources, shuffled). Offline GPU
   machines use this.
2. The Hugging Face hub is reachable: stream FineWeb's ``sample-10BT`` through ``datasets``; a document
   goes to ``val`` when the sha1 of its id is divisible by 20 (the same rule as the local corpus).
3. Neither: ``DataUnavailable``, which says what to download and where to put it.

Every document carries its ``source`` (wiki, sotu, brown, ...; FineWeb's are all "fineweb"), so a chapter can
report validation loss per source (``token_sources``) and draw a shuffled sample of windows from the whole
split (``sample_windows``) instead of its first few batches, which follow the order of the file, or one whose
source mix is a given one, e.g. the training split's (``sample_windows_by_source``).

GPT-2 tokens come from tiktoken; with ``REPRO_DATA_DIR`` set its BPE files are read from
``$REPRO_DATA_DIR/tiktoken`` (``TIKTOKEN_CACHE_DIR``), so no download is needed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
CORPORA = {"corpus": "gz", "corpus-xl": "xz"}  # local folders under REPRO_DATA_DIR and their compression
FINEWEB = ("HuggingFaceFW/fineweb", "sample-10BT")


class DataUnavailable(RuntimeError):
    """Neither a local data folder nor the network can provide the data."""


def local_dir() -> Path | None:
    d = os.environ.get("REPRO_DATA_DIR")
    return Path(d).expanduser().resolve() if d else None


def online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the hub answers. HF_HUB_OFFLINE=1 or REPRO_OFFLINE=1 force False."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("REPRO_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def source() -> str:
    """Which source ``texts`` and ``tokens`` will use: 'local' or 'fineweb'."""
    if local_dir() is not None:
        return "local"
    if online():
        return "fineweb"
    raise DataUnavailable(
        "no data: REPRO_DATA_DIR is not set and the Hugging Face hub cannot be reached. Either connect to "
        "the network (FineWeb is streamed through `datasets`), or set REPRO_DATA_DIR to a folder holding "
        "corpus/train.jsonl.gz, corpus/val.jsonl.gz and tiktoken/ (the course's dev machines have one at "
        "../shared/data; book/running.md says how to build one).")


def gpt2_encoding():
    """tiktoken's GPT-2 BPE, read from $REPRO_DATA_DIR/tiktoken when that folder exists."""
    import tiktoken

    d = local_dir()
    if d is not None and (d / "tiktoken").is_dir() and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        os.environ["TIKTOKEN_CACHE_DIR"] = str(d / "tiktoken")
    return tiktoken.get_encoding("gpt2")


def _is_val(doc_id: str) -> bool:
    return int(hashlib.sha1(str(doc_id).encode()).hexdigest(), 16) % 20 == 0


def _local_file(corpus: str, split: str) -> Path:
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, not {corpus!r}")
    f = local_dir() / corpus / f"{split}.jsonl.{CORPORA[corpus]}"
    if not f.is_file():
        raise DataUnavailable(f"REPRO_DATA_DIR={local_dir()} has no {f.relative_to(local_dir())}")
    return f


def documents(split: str, *, corpus: str = "corpus", max_docs: int | None = None):
    """An iterable of (source, text) of ``split`` ('train' or 'val') from the chosen source. ``corpus`` picks the
    local folder (the online path streams FineWeb whichever is named)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, not {corpus!r}")
    import datasets

    if source() == "local":
        f = _local_file(corpus, split)
        ds = datasets.load_dataset("json", data_files={split: str(f)}, split=split)
        n = len(ds) if max_docs is None else min(max_docs, len(ds))
        for row in ds.select(range(n)):
            yield row.get("source") or corpus, row["text"]  # a folder built without sources is one source
        return
    ds = datasets.load_dataset(*FINEWEB, split="train", streaming=True)
    taken = 0
    for row in ds:
        if _is_val(row["id"]) == (split == "val"):
            yield "fineweb", row["text"]
            taken += 1
            if max_docs is not None and taken >= max_docs:
                return


def texts(split: str, *, corpus: str = "corpus", max_docs: int | None = None):
    """An iterable of documents (str) of ``split`` ('train' or 'val') from the chosen source."""
    for _, text in documents(split, corpus=corpus, max_docs=max_docs):
        yield text


def cache_dir() -> Path:
    d = Path(os.environ.get("REPRO_CACHE_DIR", Path.home() / ".cache" / "repro"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cache_key(split: str, corpus: str, max_tokens: int | None) -> str:
    src = source()
    if src == "fineweb" and max_tokens is None:
        raise ValueError("max_tokens is required for the FineWeb stream")
    key = f"{src}-{split}-{max_tokens or 'all'}"
    if src == "local":
        key += f"-{corpus}-{_local_file(corpus, split).stat().st_size}"
    return key


def _encode(split: str, corpus: str, max_tokens: int | None) -> tuple[Path, Path, Path]:
    """Tokenize once and cache: tokens (uint16), each token's source index (uint8), the source names."""
    stem = cache_dir() / f"gpt2-{_cache_key(split, corpus, max_tokens)}"
    paths = stem.with_suffix(".npy"), stem.with_name(stem.name + "-src.npy"), stem.with_name(stem.name + "-src.txt")
    if all(p.is_file() for p in paths):
        return paths
    enc = gpt2_encoding()
    eot = enc.eot_token
    names: list[str] = []
    toks: list[np.ndarray] = []
    srcs: list[np.ndarray] = []
    n = 0
    docs = iter(documents(split, corpus=corpus))
    while max_tokens is None or n < max_tokens:
        chunk = [d for _, d in zip(range(256), docs)]
        if not chunk:
            break
        for (name, _), ids in zip(chunk, enc.encode_ordinary_batch([t for _, t in chunk], num_threads=8)):
            if name not in names:
                names.append(name)
            ids.append(eot)
            toks.append(np.asarray(ids, dtype=np.uint16))
            srcs.append(np.full(len(ids), names.index(name), dtype=np.uint8))
            n += len(ids)
    arr = np.concatenate(toks)[:max_tokens] if toks else np.zeros(0, np.uint16)
    src = np.concatenate(srcs)[:max_tokens] if srcs else np.zeros(0, np.uint8)
    for path, value in zip(paths[:2], (arr, src)):
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
        np.save(tmp, value)
        tmp.replace(path)
    paths[2].write_text("\n".join(names) + "\n")
    return paths


def tokens(split: str, *, corpus: str = "corpus", max_tokens: int | None = None) -> np.ndarray:
    """GPT-2 tokens of ``split``, documents joined by <|endoftext|>, as uint16; cached on disk.

    The online path stops after ``max_tokens`` (FineWeb is billions of tokens); a local corpus is returned
    whole when ``max_tokens`` is None (corpus: 4.3 M train, 151 k val tokens; corpus-xl: 30.6 M and 1.58 M).
    """
    return np.load(_encode(split, corpus, max_tokens)[0], mmap_mode="r")


def token_sources(split: str, *, corpus: str = "corpus", max_tokens: int | None = None) -> tuple[list[str], np.ndarray]:
    """(names, index): ``names[index[i]]`` is the source of the document that token i of ``tokens(...)`` is in."""
    _, src, names = _encode(split, corpus, max_tokens)
    return names.read_text().split(), np.load(src, mmap_mode="r")


def sample_windows(n_tokens: int, n: int, seq_len: int, *, seed: int = 0) -> np.ndarray:
    """Start offsets of ``n`` non-overlapping windows of seq_len + 1 tokens, drawn uniformly (seeded) from the
    whole of a split of n_tokens: a shuffled evaluation sample, not the file's first documents. Sorted."""
    slots = (n_tokens - 1) // (seq_len + 1)
    if n > slots:
        raise ValueError(f"{n_tokens} tokens hold only {slots} windows of {seq_len + 1}, not {n}")
    picked = np.random.default_rng(seed).choice(slots, size=n, replace=False)
    return np.sort(picked) * (seq_len + 1)


def _largest_remainder(n: int, weights: np.ndarray) -> np.ndarray:
    """``n`` split into integer counts proportional to ``weights`` (non-negative, positive sum) by the largest-remainder
    (Hamilton) rule: every count is the floor of its quota or one more, so each is within one of its quota. Ties in
    the remainders go to the earlier weight."""
    quota = n * weights / weights.sum()
    counts = np.floor(quota).astype(np.int64)
    left = n - int(counts.sum())
    if left:
        counts[np.argsort(-(quota - counts), kind="stable")[:left]] += 1
    return counts


def sample_windows_by_source(sources: np.ndarray, names: list[str], shares: dict[str, float], n: int, seq_len: int,
                             *, seed: int = 0, shortfall: str = "raise") -> np.ndarray:
    """Start offsets of ``n`` non-overlapping windows of seq_len + 1 tokens from a split, stratified by source so
    that the sample's source mix is ``shares`` (e.g. the training split's mix) rather than the split's own. Sorted,
    like ``sample_windows``, and on the same aligned slots (multiples of seq_len + 1).

    ``sources`` is the split's per-token source index and ``names`` its names (``token_sources``); ``shares`` maps
    a source name to its target share, in any unit (percent or fraction: it is normalised). Each source gets a
    number of windows proportional to its share, rounded by the largest-remainder rule (so within one window of
    its quota, and the counts sum to ``n``), drawn uniformly (seeded) without replacement among the slots whose
    seq_len + 1 tokens all come from that source. Whole-source windows rather than windows labelled by the source
    of their first target token: a window then adds seq_len target tokens of exactly its source, so the sample's
    token shares (what a per-token metric such as the routed load averages over) equal the window shares exactly;
    a window labelled by one token would bring in the next documents' tokens, from whatever sources follow it in
    the file, and the token mix would drift from the target (most for sources of short documents). The price:
    document boundaries between two sources are never sampled, and a source whose documents are short next to
    seq_len + 1 has few such slots.

    A source of ``shares`` with no whole-source slot in the split (absent from it, or only in documents shorter
    than a window and between other sources' documents) gets no window: the others' shares are scaled up to fill
    ``n``, with a warning that names it. A source with fewer slots than its count is a shortfall:
    ``shortfall="raise"`` (default) raises ValueError, saying the largest ``n`` that fits; ``"shrink"`` draws
    that many windows instead, with a warning (the mix still matches; the sample is smaller). Sources of the
    split that ``shares`` does not name, or gives 0, get no window.
    """
    if shortfall not in ("raise", "shrink"):
        raise ValueError(f"shortfall must be 'raise' or 'shrink', not {shortfall!r}")
    if n < 1 or seq_len < 1:
        raise ValueError(f"need n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    bad = {k: v for k, v in shares.items() if not (np.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"shares must be finite and non-negative: {bad}")
    if sum(shares.values()) <= 0:
        raise ValueError(f"shares sum to {sum(shares.values())}: no source to draw from")
    src = np.asarray(sources)
    if len(names) and src.size and int(src.max()) >= len(names):
        raise ValueError(f"sources holds index {int(src.max())} but names has only {len(names)} entries")
    width = seq_len + 1
    n_slots = (len(src) - 1) // width if len(src) else 0
    if n > n_slots:
        raise ValueError(f"{len(src)} tokens hold only {n_slots} windows of {width}, not {n}")
    block = src[: n_slots * width].reshape(n_slots, width)
    whole = (block == block[:, :1]).all(axis=1)                   # slots whose tokens all share one source
    slot_src = np.where(whole, block[:, 0].astype(np.int64), -1)
    index = {name: i for i, name in enumerate(names)}
    wanted = [(name, float(v)) for name, v in shares.items() if v > 0]
    pools = {name: np.flatnonzero(slot_src == index[name]) if name in index else np.zeros(0, np.int64)
             for name, _ in wanted}
    total = sum(v for _, v in wanted)
    missing = {name: v for name, v in wanted if len(pools[name]) == 0}
    present = [(name, v) for name, v in wanted if len(pools[name])]
    if not present:
        raise ValueError(f"no source of shares {sorted(shares)} has a window of {width} tokens in the split "
                         f"(its sources: {list(names)})")
    if missing:
        lost = sum(missing.values()) / total
        warnings.warn(f"sources {', '.join(f'{k} ({100 * v / total:.1f}%)' for k, v in missing.items())} have no "
                      f"window of {width} tokens of their own in the split: they get none, and the other sources' "
                      f"shares are scaled up by 1/{1 - lost:.3f} to fill the {n} windows", stacklevel=2)
    weights = np.array([v for _, v in present])
    avail = np.array([len(pools[name]) for name, _ in present])
    counts = _largest_remainder(n, weights)
    if (counts > avail).any():
        fits = next(m for m in range(n, 0, -1) if (_largest_remainder(m, weights) <= avail).all())
        short = ", ".join(f"{present[i][0]} needs {counts[i]}, has {avail[i]}" for i in np.flatnonzero(counts > avail))
        msg = (f"the split holds too few windows of {width} tokens from one source for {n} windows in these "
               f"shares ({short}); at most {fits} windows fit")
        if shortfall == "raise":
            raise ValueError(msg + ": ask for fewer, or pass shortfall='shrink'")
        warnings.warn(msg + f": drawing {fits}", stacklevel=2)
        counts = _largest_remainder(fits, weights)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(pools[name], size=int(k), replace=False) for (name, _), k in zip(present, counts)]
    return np.sort(np.concatenate(picked)) * width


def windows(tokens: np.ndarray, starts, seq_len: int, *, device="cpu"):
    """(x, y) int64 tensors of shape (len(starts), seq_len) for the windows at ``starts``; y = x shifted by one."""
    import torch

    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def batch(tokens: np.ndarray, batch_size: int, seq_len: int, *, generator=None, device="cpu"):
    """A random language-modelling batch: (x, y) int64 tensors of shape (batch_size, seq_len), y = x shifted by one.

    ``generator`` is a torch.Generator (CPU) so that batches are reproducible for a seed.
    """
    import torch

    if len(tokens) <= seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens cannot fill a sequence of {seq_len}")
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx.numpy()], dtype=np.int64))
    x, y = chunk[:, :-1], chunk[:, 1:]
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def build_local(out, *, docs: int = 5_000, xl_docs: int = 32_000, rows=None, tokenizer: bool = True) -> dict:
    """Write a REPRO_DATA_DIR at ``out`` from FineWeb's ``sample-10BT`` (streamed through ``datasets``; needs the
    network once): ``corpus/`` from the first ``docs`` documents (gzip) and ``corpus-xl/`` from the first
    ``xl_docs`` (xz; it holds corpus/'s documents, as the course's own folder does), each split by ``_is_val``;
    and, with ``tokenizer``, GPT-2's BPE files under ``tiktoken/``. FineWeb documents average about a thousand
    GPT-2 tokens, so the defaults give roughly the 4-5 M and 30 M tokens the chapters are sized for.

    ``rows``: an iterable of {"id", "text"} (and optionally "source") to use instead of FineWeb. Returns the
    number of documents written per corpus and split."""
    import gzip
    import json
    import lzma

    if not 0 < docs <= xl_docs:
        raise ValueError(f"need 0 < docs <= xl_docs, got docs={docs}, xl_docs={xl_docs}")
    out = Path(out)
    if rows is None:
        import datasets

        rows = datasets.load_dataset(*FINEWEB, split="train", streaming=True)
    opener = {"gz": gzip.open, "xz": lzma.open}
    files = {}
    for corpus, ext in CORPORA.items():
        (out / corpus).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            files[corpus, split] = opener[ext](out / corpus / f"{split}.jsonl.{ext}", "wt", encoding="utf-8")
    counts = {f"{c}/{s}": 0 for c, s in files}
    try:
        for i, row in enumerate(rows):
            if i == xl_docs:
                break
            split = "val" if _is_val(row["id"]) else "train"
            line = json.dumps({"id": str(row["id"]), "source": row.get("source", "fineweb"), "text": row["text"]}) + "\n"
            for corpus in ("corpus", "corpus-xl") if i < docs else ("corpus-xl",):
                files[corpus, split].write(line)
                counts[f"{corpus}/{split}"] += 1
    finally:
        for f in files.values():
            f.close()
    if tokenizer:  # GPT-2's BPE files into out/tiktoken, hash-checked, whatever cache this process had set
        from tiktoken_ext.openai_public import gpt2

        before = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(out / "tiktoken")
        try:
            gpt2()  # reads (downloads) the files through tiktoken's own cache, bypassing its in-process encodings
        finally:
            if before is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR")
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = before
    return counts
