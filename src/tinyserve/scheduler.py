"""Iteration-level scheduling (Orca, Yu et al. 2022, §3.1) over a paged KV cache (vLLM, Kwon et al. 2023, §4.5).

Every step the scheduler picks the work of one model call:
- prefill: admit waiting sequences, oldest first, while sequence slots, the step's token budget and free
  blocks last; their prompts run as one packed batch;
- otherwise decode: one token for every running sequence. A sequence whose last block is full needs a new
  one; when none is free, the newest running sequence is preempted: its blocks are freed and it goes back
  to the front of the queue, to be recomputed (prompt + tokens so far as one prefill) when blocks free up
  (vLLM §4.5, "recomputation"; all-or-nothing eviction, first-come-first-served).
A finished sequence frees its blocks at once, and the next step can admit a new one.

Switches for the baselines:
- ``request_level=True``: a batch, once it starts decoding, admits nobody until every member has finished
  (the request-level scheduling Orca §2.2 argues against);
- ``reserve="max_len"``: reserve blocks for prompt + max_new_tokens at admission, as systems that keep a
  request's KV contiguous must (vLLM §3; with the true output length this is Orca (Oracle), §6.1);
  ``reserve="max_model_len"`` reserves the model's maximum length for everyone (Orca (Max)).
  ``reserve="paged"`` (the default) allocates a block only when a token needs it.

Prefix caching (chapter 07): ``prefix_cache="hash"`` (prefix_cache.HashPrefixCache, vLLM's full-block hashes) or
``"radix"`` (radix_cache.RadixCache, SGLang's radix tree). At admission a sequence shares the cached prefix of
its tokens and its prefill computes only the rest (``Sequence.num_cached`` tokens are skipped); after a prefill,
and when a sequence finishes or is preempted, its computed tokens go into the cache. ``cache_aware=True``
admits the waiting sequences with the longest cached prefix first (SGLang's longest-prefix-match policy) and
holds back, for one step, a sequence that shares at least a block more with one admitted in the same step
than with the cache: next step it finds that prefix cached instead of computing it twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from .block_manager import BlockManager, KVAccount
from .prefix_cache import HashPrefixCache
from .radix_cache import RadixCache
from .radix_cache import _common as _common_prefix  # length of the common prefix of two token lists


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0
    temperature: float = 0.0
    tokens: list[int] = field(default_factory=list)  # prompt + output so far
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    preemptions: int = 0
    token_times: list[float] = field(default_factory=list)  # when each output token was produced
    num_cached: int = 0  # tokens of the latest prefill whose K/V came from the prefix cache
    cache_node: object = None  # the radix node this sequence locks (radix cache only)

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def final_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.final_len


@dataclass
class Batch:
    seqs: list[Sequence]
    is_prefill: bool
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks to copy before the step (radix)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 request_level: bool = False, reserve: str = "paged", max_model_len: int | None = None,
                 prefix_cache: str | None = None, cache_aware: bool = False):
        assert reserve in ("paged", "max_len", "max_model_len"), reserve
        assert prefix_cache in (None, "hash", "radix"), prefix_cache
        assert not cache_aware or prefix_cache, "cache-aware scheduling needs a prefix cache"
        assert reserve != "max_model_len" or max_model_len, "reserve='max_model_len' needs max_model_len"
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.request_level, self.reserve, self.max_model_len = request_level, reserve, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.account = KVAccount()
        self.num_preemptions = 0
        self._batch_open = True  # request-level only: may the current batch still admit?
        self.cache = {None: lambda bm: None, "hash": HashPrefixCache, "radix": RadixCache}[prefix_cache](block_manager)
        self.cache_aware = cache_aware
        # every prefill, recomputations included: tokens in it, and tokens whose K/V came from the cache
        self.cache_stats = {"prefill_tokens": 0, "cached_tokens": 0, "prefills": 0, "hits": 0, "block_copies": 0}

    def add(self, seq: Sequence) -> None:
        if self.max_model_len and seq.final_len > self.max_model_len:
            raise ValueError(f"sequence {seq.id}: {seq.final_len} tokens > max_model_len {self.max_model_len}")
        if self.bm.blocks_for(self._reserved_tokens(seq)) > self.bm.num_blocks:
            raise ValueError(f"sequence {seq.id} can never fit in {self.bm.num_blocks} blocks")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _reserved_tokens(self, seq: Sequence) -> int:
        if self.reserve == "max_len":
            return seq.final_len
        if self.reserve == "max_model_len":
            return self.max_model_len
        return len(seq.tokens)  # paged: only what the prefill writes

    def schedule(self) -> Batch | None:
        if self.request_level and not self.running:
            self._batch_open = True
        copies: list[tuple[int, int]] = []  # prefix caching: blocks to copy before the step (radix, chapter 07)
        batch = []
        if self._batch_open or not self.request_level:
            batch = self._admit() if self.cache is None else self._admit_cached(copies)
        if batch:
            self._account()
            return Batch(batch, is_prefill=True, copies=copies)
        self._batch_open = False
        batch = self._make_room_to_decode()
        if not batch:
            return None
        self._account()
        return Batch(batch, is_prefill=False)

    def _admit_cached(self, copies: list[tuple[int, int]]) -> list[Sequence]:
        """_admit with a prefix cache: each admitted sequence first takes the cached prefix of its tokens."""
        order = list(self.waiting)
        if self.cache_aware:  # longest cached prefix first; sorted() is stable, so arrival order among equals
            hits = {id(s): self.cache.peek(s.tokens) for s in order}
            order.sort(key=lambda s: -hits[id(s)])
        batch, tokens = [], 0
        for seq in order:
            if len(self.running) + len(batch) >= self.max_num_seqs:
                break
            if self.cache_aware and any(_common_prefix(seq.tokens, o.tokens) >= hits[id(seq)] + self.bm.block_size
                                        for o in batch):
                continue  # its prefix is being computed in this step: wait one step and reuse it
            table, m, src = self.cache.match(seq)
            seq.block_table = table
            if batch and tokens + len(seq.tokens) - m > self.max_num_batched_tokens:
                self.cache.release(seq)
                break  # a prompt longer than the budget still runs, alone
            need = self._reserved_tokens(seq)
            # A radix match may hold a block or two beyond seq's own table (the block to copy; another sequence's
            # copy at a mid-block split on the path): when that is what stops it, match less. Last, with nothing
            # else running to free memory, reuse nothing rather than wait forever.
            for limit in (m // self.bm.block_size * self.bm.block_size, 0):
                if self.bm.can_allocate(need, seq.block_table) or m == 0 or (limit == 0 and (batch or self.running)):
                    break
                self.cache.release(seq)
                table, m, src = self.cache.match(seq, limit)
                seq.block_table = table
            if not self.bm.can_allocate(need, seq.block_table):  # may evict cached blocks nobody holds
                self.cache.release(seq)
                break  # without cache-aware scheduling nobody overtakes the head of the queue
            self.bm.allocate(seq.block_table, need)
            if src is not None:  # the match ends inside a block: copy it, then write after the match
                copies.append((src, seq.block_table[m // self.bm.block_size]))
            seq.num_cached = m
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += len(seq.tokens) - m
            self.cache_stats["prefill_tokens"] += len(seq.tokens)
            self.cache_stats["cached_tokens"] += m
            self.cache_stats["prefills"] += 1
            self.cache_stats["hits"] += m > 0  # prefills that reused at least one token
        self.cache_stats["block_copies"] += len(copies)
        admitted = {id(s) for s in batch}
        self.waiting = deque(s for s in self.waiting if id(s) not in admitted)
        self.running.extend(batch)
        return batch

    def _admit(self) -> list[Sequence]:
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and tokens + len(seq.tokens) > self.max_num_batched_tokens:
                break  # a prompt longer than the budget still runs, alone
            need = self._reserved_tokens(seq)
            if not self.bm.can_allocate(need):
                break  # first-come-first-served: nobody overtakes the head of the queue
            self.bm.allocate(seq.block_table, need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += len(seq.tokens)
        self.running.extend(batch)
        return batch

    def _make_room_to_decode(self) -> list[Sequence]:
        """Every running sequence gets room for its next token; the newest are preempted to make it."""
        queue, kept = deque(self.running), []
        while queue:
            seq = queue.popleft()
            # the step writes K/V of position len(tokens) - 1: the table must hold len(tokens) tokens
            while not self.bm.can_allocate(len(seq.tokens), seq.block_table):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.bm.allocate(seq.block_table, len(seq.tokens))
                kept.append(seq)
        self.running = kept
        return list(kept)  # a copy: postprocess removes finished sequences from self.running

    def _free(self, seq: Sequence) -> None:
        """Give up seq's blocks; with a prefix cache, first offer it the tokens whose K/V are computed (all but the
        last token, which has not been fed to the model yet)."""
        if self.cache is None:
            self.bm.free(seq.block_table)
            return
        self.cache.insert(seq, len(seq.tokens) - 1)
        self.cache.release(seq)

    def held_tables(self) -> list[list[int]]:
        """Every block reference: the sequences' tables and the cache's own (for BlockManager.check)."""
        tables = [s.block_table for s in self.running] + [s.block_table for s in self.waiting]
        return tables + (self.cache.held() if self.cache is not None else [])

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # newest preempted first, so the oldest ends up at the front

    def _account(self) -> None:
        reserved_now = 0
        for seq in self.running:  # after this step every token of a running sequence has its K/V cached
            reserved = len(seq.block_table) * self.bm.block_size
            self.account.add(reserved, len(seq.tokens), seq.final_len, self.bm.block_size)
            reserved_now += reserved
        self.account.end_step(reserved_now, (self.bm.num_blocks - self.bm.num_free) * self.bm.block_size)

    def postprocess(self, batch: Batch, new_tokens: list[int], now: float = 0.0) -> list[Sequence]:
        """Append each sequence's sampled token; finished sequences free their blocks. Returns them."""
        finished = []
        for seq, tok in zip(batch.seqs, new_tokens):
            if batch.is_prefill and self.cache is not None:
                self.cache.insert(seq, len(seq.tokens))  # the prompt's K/V is computed: others may reuse it now
            seq.tokens.append(tok)
            seq.token_times.append(now)
            if seq.done:
                seq.status = Status.FINISHED
                self._free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished


def simulate(lengths: list[tuple[int, int]], num_blocks: int, block_size: int = 16, check: bool = False,
             **scheduler_kw) -> Scheduler:
    """Run the scheduler without a model on requests (prompt_len, max_new_tokens), all waiting at the start;
    every step "samples" token 0. The memory accounting of such a trace does not depend on the model, only on
    the lengths and the policy. ``check`` verifies the block manager's invariants after every step."""
    sched = Scheduler(BlockManager(num_blocks, block_size), **scheduler_kw)
    seqs = [Sequence(i, [1] * p, n) for i, (p, n) in enumerate(lengths)]
    for seq in seqs:
        sched.add(seq)
    while (batch := sched.schedule()) is not None:
        sched.postprocess(batch, [0] * len(batch.seqs))
        if check:
            sched.bm.check([s.block_table for s in sched.running] + [s.block_table for s in sched.waiting])
    assert not sched.has_work(), "the scheduler stopped with work left"
    return sched


def simulate_rounds(rounds: list[list[tuple[list[int], int]]], num_blocks: int, block_size: int = 16,
                    check: bool = False, observe=None, **scheduler_kw) -> Scheduler:
    """Run the scheduler without a model on rounds of requests (prompt token ids, max_new_tokens): a round enters
    the queue when the previous one has finished (a closed loop: chat turns, agent steps, tree levels). Every
    step "samples" token -1, which no prompt contains, so generated tokens never match a later prompt. The
    cache's hit counts (scheduler.cache_stats) of such a trace depend only on the token ids, lengths and policy.
    ``observe(batch)``, if given, sees every scheduled batch before its tokens are appended."""
    sched = Scheduler(BlockManager(num_blocks, block_size), **scheduler_kw)
    n = 0
    for rnd in rounds:
        for prompt, new in rnd:
            sched.add(Sequence(n, list(prompt), new))
            n += 1
        while (batch := sched.schedule()) is not None:
            if observe is not None:
                observe(batch)
            sched.postprocess(batch, [-1] * len(batch.seqs))
            if check:
                sched.bm.check(sched.held_tables())
                if sched.cache is not None:
                    sched.cache.check()
        assert not sched.has_work(), "the scheduler stopped with work left"
    return sched
