"""Automatic prefix caching with hashed full blocks (vLLM's automatic prefix caching; the sharing of a common
prefix through block tables is PagedAttention's, Kwon et al. 2023, §4.4 "Shared prefix").

The K/V of token p depends on tokens 0..p and nothing else. So a FULL block j of a sequence can be named by
a chained hash of everything up to its end:

    h_j = H(h_{j-1}, tokens[j*B : (j+1)*B]),      h_{-1} = None

and a new sequence whose first blocks hash to names already in the table can point its block table at those
physical blocks instead of computing them again. Three rules keep that correct and simple:

- a hash is a hint, never proof: on a hit the block's token ids and its parent are compared too (a collision
  of H must not hand a sequence someone else's K/V);
- only full blocks are named: a sequence never shares a block it will still write into, and the last,
  partial block of a prompt is always recomputed (what the radix cache recovers, see radix_cache.py);
- at most len(prompt) - 1 tokens are reused: the prefill must still run the last prompt token to get the
  logits of the first output token.

The cache keeps one reference of its own on every block it names (BlockManager.share_block). A cached block
that no sequence holds (reference count 1) costs nothing until memory runs short: it sits in an LRU list and
is evicted, oldest first, only when the free list cannot serve an allocation (BlockManager.reclaim).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .block_manager import BlockManager


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """H(h_{j-1}, block tokens). Python hashes tuples of ints the same in every process (no salt, unlike str)."""
    return hash((parent, tokens))


class HashPrefixCache:
    def __init__(self, bm: BlockManager, hash_fn: Callable[[int | None, tuple[int, ...]], int] = chain_hash):
        self.bm, self.B, self.hash_fn = bm, bm.block_size, hash_fn
        self.by_hash: dict[int, int] = {}  # h_j -> physical block
        self.hash_of: dict[int, int] = {}  # physical block -> h_j
        # what a name stands for: (parent's serial, token ids). A serial is given at each registration, so a block
        # evicted and registered again under another prefix cannot pass for its old self.
        self.meta: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self.serial: dict[int, int] = {}
        self._next_serial = 0
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, least recent first
        self.evicted_blocks = 0
        bm.reclaim = self.evict

    # ------------------------------------------------------------------ lookups
    def _lookup(self, tokens: list[int], limit: int) -> list[int]:
        """Physical blocks of the longest run of cached full blocks among tokens[:limit]."""
        found, h, parent = [], None, None
        for j in range(limit // self.B):
            toks = tuple(tokens[j * self.B:(j + 1) * self.B])
            h = self.hash_fn(h, toks)
            block = self.by_hash.get(h)
            if block is None or self.meta[block] != (parent, toks):  # the token re-check: a hash alone proves nothing
                break
            found.append(block)
            parent = self.serial[block]
        return found

    def peek(self, tokens: list[int]) -> int:
        """Tokens a new sequence with this prompt would reuse now (no side effects; cache-aware scheduling)."""
        return len(self._lookup(tokens, len(tokens) - 1)) * self.B

    def match(self, seq, limit: int | None = None) -> tuple[list[int], int, int | None]:
        """Share the cached prefix of seq.tokens (at most len - 1 tokens, or limit): (blocks now also held by seq,
        tokens reused, block to copy: always None, a hash hit is whole blocks)."""
        limit = len(seq.tokens) - 1 if limit is None else min(limit, len(seq.tokens) - 1)
        blocks = self._lookup(seq.tokens, limit)
        for b in blocks:
            self.bm.share_block(b)
            self.lru.pop(b, None)  # held again: not evictable
        return blocks, len(blocks) * self.B, None

    # ------------------------------------------------------------------ insertion and release
    def insert(self, seq, n: int) -> None:
        """Name the full blocks among seq's first n tokens (their K/V are computed)."""
        h, parent = None, None
        for j in range(n // self.B):
            toks = tuple(seq.tokens[j * self.B:(j + 1) * self.B])
            h = self.hash_fn(h, toks)
            block, known = seq.block_table[j], self.by_hash.get(h)
            if known is None:
                if block in self.meta:  # already named for another prefix (cannot happen: a named block is only shared)
                    break
                self.by_hash[h], self.hash_of[block] = block, h
                self.meta[block], self.serial[block] = (parent, toks), self._next_serial
                self._next_serial += 1
                self.bm.share_block(block)  # the cache's own reference
                known = block
            elif self.meta[known] != (parent, toks):
                break  # a true collision: this prefix cannot be named; stop (its blocks stay private)
            # known == block: shared from the cache at admission; else a duplicate computed in the same step,
            # which stays private to seq and is freed with it
            parent = self.serial[known]

    def release(self, seq) -> None:
        """seq drops its blocks; named blocks nobody else holds become evictable. The tail goes first into the
        LRU list, so that a prefix's last blocks are evicted before its first ones (as vLLM does)."""
        for b in reversed(seq.block_table):
            self.bm.release_block(b)
            if b in self.meta and self.bm.ref_counts[b] == 1:
                self.lru[b] = None
                self.lru.move_to_end(b)
        seq.block_table.clear()

    def evict(self, n: int) -> int:
        """Free up to n blocks, least recently released first. Returns the number freed."""
        freed = 0
        while freed < n and self.lru:
            b, _ = self.lru.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)], self.meta[b], self.serial[b]
            self.bm.release_block(b)
            freed += 1
        self.evicted_blocks += freed
        return freed

    # ------------------------------------------------------------------ invariants
    def held(self) -> list[list[int]]:
        """The cache's references, one list per reference (for BlockManager.check)."""
        return [[b] for b in self.meta]

    def check(self) -> None:
        assert all(self.bm.ref_counts[b] >= 1 for b in self.meta), "a named block is free"
        assert set(self.lru) == {b for b in self.meta if self.bm.ref_counts[b] == 1}, "LRU list != unheld named blocks"
        assert all(self.by_hash[self.hash_of[b]] == b for b in self.meta), "hash table and names disagree"
        assert len(self.by_hash) == len(self.meta) == len(self.hash_of) == len(self.serial)
