"""Data: the real source when the network is there, the same loaders on a local folder when not.

Order of preference for text:
1. ``REPRO_DATA_DIR`` is set: read ``$REPRO_DATA_DIR/corpus/{train,val}.jsonl.gz`` (English prose, one
   document per line; see running.md for how to build the folder). Offline GPU machines use this.
2. The Hugging Face hub is reachable: stream FineWeb's ``sample-10BT`` through ``datasets``; a document
   goes to ``val`` when the sha1 of its id is divisible by 20 (the same rule as the local corpus).
3. Neither: ``DataUnavailable``, which says what to download and where to put it.

GPT-2 tokens come from tiktoken; with ``REPRO_DATA_DIR`` set its BPE files are read from
``$REPRO_DATA_DIR/tiktoken`` (``TIKTOKEN_CACHE_DIR``), so no download is needed.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
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


def texts(split: str, *, max_docs: int | None = None):
    """An iterable of documents (str) of ``split`` ('train' or 'val') from the chosen source."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    import datasets

    if source() == "local":
        corpus = local_dir() / "corpus"
        f = corpus / f"{split}.jsonl.gz"
        if not f.is_file():
            raise DataUnavailable(f"REPRO_DATA_DIR={local_dir()} has no {f.relative_to(local_dir())}")
        ds = datasets.load_dataset("json", data_files={split: str(f)}, split=split)
        n = len(ds) if max_docs is None else min(max_docs, len(ds))
        for row in ds.select(range(n)):
            yield row["text"]
        return
    ds = datasets.load_dataset(*FINEWEB, split="train", streaming=True)
    taken = 0
    for row in ds:
        if _is_val(row["id"]) == (split == "val"):
            yield row["text"]
            taken += 1
            if max_docs is not None and taken >= max_docs:
                return


def cache_dir() -> Path:
    d = Path(os.environ.get("REPRO_CACHE_DIR", Path.home() / ".cache" / "repro"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def tokens(split: str, *, max_tokens: int | None = None) -> np.ndarray:
    """GPT-2 tokens of ``split``, documents joined by <|endoftext|>, as uint16; cached on disk.

    The online path stops after ``max_tokens`` (FineWeb is billions of tokens); the local corpus
    is small (4.3 M train, 151 k val tokens) and is returned whole when ``max_tokens`` is None.
    """
    src = source()
    if src == "fineweb" and max_tokens is None:
        raise ValueError("max_tokens is required for the FineWeb stream")
    key = f"{src}-{split}-{max_tokens or 'all'}"
    if src == "local":
        f = local_dir() / "corpus" / f"{split}.jsonl.gz"
        key += f"-{f.stat().st_size}"
    path = cache_dir() / f"gpt2-{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    enc = gpt2_encoding()
    eot = enc.eot_token
    out: list[np.ndarray] = []
    n = 0
    for doc in texts(split):
        ids = enc.encode_ordinary(doc)
        ids.append(eot)
        out.append(np.asarray(ids, dtype=np.uint16))
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    arr = np.concatenate(out)[:max_tokens] if out else np.zeros(0, np.uint16)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


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
