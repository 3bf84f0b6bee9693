"""A radix tree over token ids with reference counts and LRU leaf eviction (RadixAttention; Zheng et al. 2024,
SGLang, §3 and Algorithm 1; LMSYS blog 2024-01-17).

Every path from the root spells a token sequence whose K/V is in the cache. An edge carries a run of tokens
(not one): a new sequence that leaves an edge half-way splits it in two, so that both continuations hang off
the shared part. Matching is therefore at token granularity; a sequence's prefill skips every matched token.

SGLang stores K/V in pages of one token; tinyserve's cache is blocks of B tokens. The two meet like this:
- a node covering path positions [s, e) lists the physical blocks holding them, one per logical block
  s // B .. (e - 1) // B. Where an edge ends inside a block, that block is listed by the node and by its
  children: the child that wrote its tokens after the split point either owns the same physical block (a split
  of one sequence's edge) or its own copy (a sequence that diverged there);
- for logical block j, the deepest matched node touching j lists a physical block whose tokens are valid up to
  that node's end: that is the one a new sequence reads;
- a new sequence shares (reference count + 1) every FULL matched block and COPIES the block holding the match's
  end when the match ends inside a block (copy-on-write: it is about to write its own tokens after that point,
  and must not overwrite the cached ones). The copy is one block per layer, far cheaper than recomputing up to
  B - 1 tokens; the engine performs it before the step's forward pass.
The cache holds one block reference per listing (BlockManager.share_block), so a block split between a node
and its child is held twice and freed only when both are evicted.

Reference counts per node (SGLang's lock_ref): a running sequence locks the path to its deepest node (the one
it matched, then the one it inserted), so nothing it reads or will extend is evicted. Eviction takes unlocked
leaves, least recently used first; a parent left childless and unlocked becomes a leaf in its turn.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from .block_manager import BlockManager


@dataclass(eq=False)
class Node:
    key: list[int]  # the edge's tokens, path positions start .. start + len(key) - 1
    start: int
    blocks: list[int]  # physical blocks of logical blocks start // B .. (start + len(key) - 1) // B
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)  # by first token
    ref: int = 0  # running sequences whose path goes through here
    last_use: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.key)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, bm: BlockManager):
        self.bm, self.B = bm, bm.block_size
        self.root = Node([], 0, [])
        self.root.ref = 1  # never evicted
        self.clock = 0
        self.evicted_blocks = 0  # blocks actually returned to the free list by eviction
        bm.reclaim = self.evict

    # ------------------------------------------------------------------ the tree
    def _split(self, child: Node, k: int) -> Node:
        """Cut child's edge after k tokens; returns the new upper node (the lower keeps child's identity)."""
        cut = child.start + k
        first, mid = child.start // self.B, cut // self.B
        upper = Node(child.key[:k], child.start, child.blocks[: (cut - 1) // self.B - first + 1], child.parent,
                     ref=child.ref, last_use=child.last_use)  # every lock through child also goes through upper
        if cut % self.B:  # the cut falls inside a block: both halves list it, the cache holds it twice
            self.bm.share_block(child.blocks[mid - first])
        child.blocks = child.blocks[mid - first:]
        child.key, child.start = child.key[k:], cut
        upper.children[child.key[0]] = child
        child.parent.children[upper.key[0]] = upper
        child.parent = upper
        return upper

    def _walk(self, tokens: list[int], limit: int, split: bool) -> tuple[list[Node], int]:
        """Match tokens[:limit]: the path of nodes and the tokens matched. With split=True the path's last node
        ends exactly at the match (an edge left half-way is split), as a lock or an insertion needs."""
        node, m, path = self.root, 0, [self.root]
        while m < limit and (child := node.children.get(tokens[m])) is not None:
            k = _common(child.key, tokens[m:limit])
            if k < len(child.key):
                if split:
                    path.append(self._split(child, k))
                m += k
                break
            path.append(child)
            node, m = child, m + k
        return path, m

    def _path_blocks(self, path: list[Node], m: int) -> list[int]:
        """Physical block of each logical block 0 .. ceil(m / B) - 1: the deepest node touching it decides."""
        table: list[int] = []
        for node in path[1:]:
            for i, j in enumerate(range(node.start // self.B, (node.end - 1) // self.B + 1)):
                if j < len(table):
                    table[j] = node.blocks[i]
                else:
                    table.append(node.blocks[i])
        return table[: -(-m // self.B)]

    def _lock(self, node: Node, delta: int) -> None:
        self.clock += 1
        while node is not None:
            node.ref += delta
            node.last_use = self.clock
            node = node.parent

    # ------------------------------------------------------------------ the engine's interface
    def peek(self, tokens: list[int]) -> int:
        return self._walk(tokens, len(tokens) - 1, split=False)[1]

    def match(self, seq, limit: int | None = None) -> tuple[list[int], int, int | None]:
        """Lock the longest cached prefix of seq.tokens (at most len - 1 tokens, or limit). Returns (full blocks, now
        also held by seq; tokens reused; the block to copy into seq's next block when the match ends inside one)."""
        limit = len(seq.tokens) - 1 if limit is None else min(limit, len(seq.tokens) - 1)
        path, m = self._walk(seq.tokens, limit, split=True)
        self._lock(path[-1], +1)
        seq.cache_node = path[-1]
        table = self._path_blocks(path, m)
        full = [self.bm.share_block(b) for b in table[: m // self.B]]
        return full, m, table[m // self.B] if m % self.B else None

    def insert(self, seq, n: int) -> None:
        """Add seq's first n tokens (their K/V computed, in seq.block_table) and move seq's lock to their node."""
        path, m = self._walk(seq.tokens, n, split=True)
        node = path[-1]
        if m < n:
            leaf = Node(seq.tokens[m:n], m, seq.block_table[m // self.B: (n - 1) // self.B + 1], node)
            for b in leaf.blocks:
                self.bm.share_block(b)
            node.children[leaf.key[0]] = leaf
            node = leaf
        self._lock(node, +1)
        if getattr(seq, "cache_node", None) is not None:
            self._lock(seq.cache_node, -1)
        seq.cache_node = node

    def release(self, seq) -> None:
        if getattr(seq, "cache_node", None) is not None:
            self._lock(seq.cache_node, -1)
            seq.cache_node = None
        self.bm.free(seq.block_table)

    def evict(self, n: int) -> int:
        """Evict unlocked leaves, least recently used first, until n blocks are free again (or none is left)."""
        before = self.bm.num_free
        heap = [(x.last_use, id(x), x) for x in self.nodes() if not x.children and x.ref == 0]
        heapq.heapify(heap)
        while heap and self.bm.num_free - before < n:
            _, _, leaf = heapq.heappop(heap)
            for b in leaf.blocks:
                self.bm.release_block(b)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.ref == 0:
                heapq.heappush(heap, (parent.last_use, id(parent), parent))
        freed = self.bm.num_free - before
        self.evicted_blocks += freed
        return freed

    # ------------------------------------------------------------------ invariants
    def nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            x = stack.pop()
            out.append(x)
            stack.extend(x.children.values())
        return out

    def held(self) -> list[list[int]]:
        return [x.blocks for x in self.nodes()]

    def check(self) -> None:
        for x in self.nodes():
            assert x.key and x.start == x.parent.end, "an empty edge or a gap in a path"
            assert x.parent.children[x.key[0]] is x, "a child filed under the wrong token"
            assert len(x.blocks) == (x.end - 1) // self.B - x.start // self.B + 1, "blocks do not cover the edge"
            assert x.ref >= sum(c.ref for c in x.children.values()), "a lock stops half-way to the root"
            assert all(self.bm.ref_counts[b] >= 1 for b in x.blocks), "a cached block is free"
