"""The KV cache as fixed-size blocks handed out from a free list (PagedAttention, Kwon et al. 2023, §4.2).

A sequence owns a block table: logical block j (its tokens j*B .. j*B+B-1) lives in physical block
``table[j]``, which may be any free block; nothing needs to be contiguous. A block carries a reference
count, so that several tables may share it (parallel sampling, prefix caching: chapter 07); it returns
to the free list when the count drops to zero.

``KVAccount`` keeps the books vLLM's Fig. 2 keeps: of the slots reserved for running sequences, how many
hold a token's K/V now, how many are reserved for tokens the request will still produce, and how many
will never be used (internal fragmentation). A contiguous allocator's external fragmentation is not
modelled: there are no holes between blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        # set by a prefix cache (chapter 07): reclaim(n) evicts up to n cached blocks that no sequence holds
        self.reclaim = None

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)  # ceil(n / B)

    # one block at a time: the primitives sharing and prefix caching build on
    def alloc_block(self) -> int:
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def share_block(self, block: int) -> int:
        assert self.ref_counts[block] > 0, "only a block in use can be shared"
        self.ref_counts[block] += 1
        return block

    def release_block(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} released twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    # whole tables
    def can_allocate(self, n_tokens: int, table: list[int] = ()) -> bool:
        """Can `table` (empty for a new sequence) grow to hold n_tokens? With a prefix cache attached, cached blocks
        nobody holds are evicted first when the free list is short (only then: the cache is free until it is not)."""
        short = self.blocks_for(n_tokens) - len(table) - self.num_free
        if short > 0 and self.reclaim is not None:
            short -= self.reclaim(short)
        return short <= 0

    def allocate(self, table: list[int], n_tokens: int) -> None:
        """Grow `table` in place until it holds n_tokens (one new block every B tokens when decoding)."""
        assert self.can_allocate(n_tokens, table), "out of blocks: check can_allocate first"
        while len(table) < self.blocks_for(n_tokens):
            table.append(self.alloc_block())

    def can_append(self, table: list[int], n_tokens: int) -> bool:
        """Room for one more token after n_tokens? Needs a new block only when the last one is full."""
        return self.can_allocate(n_tokens + 1, table)

    def free(self, table: list[int]) -> None:
        for block in reversed(table):  # last blocks first: they are the least likely to be shared
            self.release_block(block)
        table.clear()

    def slot(self, table: list[int], pos: int) -> int:
        """Cache slot of token position `pos`: table[pos // B] * B + pos % B."""
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def check(self, tables: list[list[int]]) -> None:
        """Invariants: every block is free xor referenced, its count equals the tables holding it."""
        held = [0] * self.num_blocks
        for table in tables:
            for block in table:
                held[block] += 1
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        for block in range(self.num_blocks):
            assert held[block] == self.ref_counts[block], f"block {block}: {held[block]} owners, count {self.ref_counts[block]}"
            assert (block in free) == (held[block] == 0), f"block {block} is lost or free while in use"


@dataclass
class KVAccount:
    """Slot-steps summed over a trace: each scheduler step adds, for every running sequence, its reserved
    slots split into tokens held now, slots its future tokens will fill, and slots it will never use."""
    reserved: int = 0  # slots in the running sequences' block tables
    token_states: int = 0  # slots holding a token's K/V after the step
    future: int = 0  # reserved for tokens the request has not produced yet ("reservation")
    never_used: int = 0  # beyond the request's final length ("internal fragmentation")
    steps: int = 0
    peak_reserved: int = 0
    seq_steps: int = 0  # running sequences summed over the steps (one per sequence per step)
    # slots the last-block rule allows: ceil(held / B) * B - held per sequence, the waste of an allocator that
    # gives a sequence a block only when its tokens need one (counted when add is given block_size)
    last_block: int = 0
    allocated: int = 0  # slots in blocks the allocator has handed out (not on its free list), summed over the steps

    def add(self, reserved_slots: int, held: int, final_len: int, block_size: int = 0) -> None:
        self.reserved += reserved_slots
        self.token_states += held
        self.future += min(reserved_slots, final_len) - held
        self.never_used += reserved_slots - min(reserved_slots, final_len)
        self.seq_steps += 1
        if block_size:
            self.last_block += -held % block_size

    def end_step(self, reserved_now: int, allocated_now: int | None = None) -> None:
        """``allocated_now``: slots in blocks off the allocator's free list (leaked blocks count here, not in the
        tables); summed over the steps when given."""
        self.steps += 1
        self.peak_reserved = max(self.peak_reserved, reserved_now)
        if allocated_now is not None:
            self.allocated += allocated_now

    @property
    def kept_fraction(self) -> float:
        """Share of reserved KV memory holding token states, averaged over the trace (vLLM Fig. 2)."""
        return self.token_states / self.reserved if self.reserved else 1.0

    def as_dict(self) -> dict:
        return {"reserved_slot_steps": self.reserved, "token_state_slot_steps": self.token_states,
                "future_slot_steps": self.future, "never_used_slot_steps": self.never_used,
                "kept_fraction": self.kept_fraction, "waste_fraction": 1 - self.kept_fraction,
                "steps": self.steps, "peak_reserved_slots": self.peak_reserved,
                "sequence_steps": self.seq_steps, "last_block_slot_steps": self.last_block,
                "allocated_slot_steps": self.allocated}
