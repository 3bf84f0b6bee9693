"""The engine: requests in, tokens out, one scheduler step per model call (the loop of vLLM's LLMEngine).

    step():  batch = scheduler.schedule()          which sequences, prefill or decode
             inputs = prepare(batch)               packed token ids, positions, slots, block tables
             hidden = model(inputs, kv_cache)      writes K/V of the new tokens, attends over the cache
             tokens = sample(logits of each sequence's last token)
             scheduler.postprocess(batch, tokens)  append; finished sequences free their blocks

Every output token is time-stamped, so each request yields its time to first token (TTFT) and the times
between tokens (TBT). Decode can replay CUDA graphs captured for a few batch sizes (GPU only): a decode
step of a small batch is many short kernels, and launching them from Python costs more than running them.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from .attention import AttnMeta, interpreting
from .block_manager import BlockManager
from .scheduler import Batch, Scheduler, Sequence
from .workload import Request


class Engine:
    def __init__(self, model, *, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int | None = None, request_level: bool = False,
                 reserve: str = "paged", backend: str = "auto", cuda_graphs: bool = False, seed: int = 0,
                 prefix_cache: str | None = None, cache_aware: bool = False):
        cfg = model.cfg
        self.model, self.device, self.dtype = model, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self.num_blocks = num_blocks  # physical blocks in the cache (one more, the scratch block, is never handed out)
        self.policy = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           request_level=request_level, reserve=reserve, prefix_cache=prefix_cache,
                           cache_aware=cache_aware)
        self.reset()
        # one extra block, never handed out: padded rows of a graphed batch write and read there
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(cfg.num_hidden_layers)]
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" or interpreting() else "torch"
        if backend == "triton" and self.device.type != "cuda" and not interpreting():
            raise ValueError("the triton backend on the CPU needs TRITON_INTERPRET=1 (set before triton is imported)")
        self.backend = backend
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.graphs = None
        if cuda_graphs:
            if self.device.type != "cuda" or backend != "triton":
                raise ValueError("CUDA graphs need the model on a GPU and the triton backend")
            self.graphs = DecodeGraphs(self, max_bs=max_num_seqs)
        self._next_id = 0

    def reset(self, num_blocks: int | None = None, **policy) -> None:
        """A fresh block manager and scheduler over the same cache (and CUDA graphs): change the policy, or cap the
        blocks in use at num_blocks (<= the physical ones) to run at another memory pressure."""
        num_blocks = num_blocks or self.num_blocks
        assert num_blocks <= self.num_blocks, "cannot use more blocks than the cache holds"
        self.policy.update(policy)
        self.bm = BlockManager(num_blocks, self.block_size)
        self.scheduler = Scheduler(self.bm, max_model_len=self.max_model_len, **self.policy)
        self.step_log = []

    @staticmethod
    def kv_bytes(cfg, num_blocks, block_size, dtype) -> int:
        return num_blocks * block_size * cfg.kv_bytes_per_token(dtype)

    # ------------------------------------------------------------------ inputs
    def _tensor(self, data, dtype):
        t = torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda")
        return t.to(self.device, non_blocking=True)

    def _block_tables(self, seqs):
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [self.scratch_block] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def prepare(self, batch: Batch):
        """Packed inputs of one step: (input_ids (T,), positions (T,), AttnMeta, last_index (B,))."""
        seqs, bs = batch.seqs, self.block_size
        ctx = [len(s.tokens) for s in seqs]
        if batch.is_prefill:  # every token not in the prefix cache (a preempted one recomputes its output too)
            ids, slots, positions, q_lens = [], [], [], []
            for s, n in zip(seqs, ctx):
                m = s.num_cached  # positions 0 .. m-1 are cached: the new tokens are m .. n-1
                ids += s.tokens[m:]
                positions += range(m, n)
                for j in range(m // bs, -(-n // bs)):  # block by block: a Python call per token costs ms at 8K
                    lo, hi = max(m, j * bs) - j * bs, min(n, j * bs + bs) - j * bs
                    slots += range(s.block_table[j] * bs + lo, s.block_table[j] * bs + hi)
                q_lens.append(n - m)
            cu = [0]
            for q in q_lens:
                cu.append(cu[-1] + q)
            meta = AttnMeta(True, self._tensor(slots, torch.int64), self._tensor(ctx, torch.int32),
                            self._block_tables(seqs), self._tensor(cu, torch.int32), max(q_lens), ctx, q_lens,
                            self.backend)
            last = [c - 1 for c in cu[1:]]
        else:  # one token per sequence: the last sampled one, at position len - 1
            ids = [s.tokens[-1] for s in seqs]
            positions = [n - 1 for n in ctx]
            slots = [self.bm.slot(s.block_table, n - 1) for s, n in zip(seqs, ctx)]
            meta = AttnMeta(False, self._tensor(slots, torch.int64), self._tensor(ctx, torch.int32),
                            self._block_tables(seqs), None, 1, ctx, None, self.backend)
            last = list(range(len(seqs)))
        return self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), meta, last

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Block dst := block src in every layer's K and V cache."""
        src = self._tensor([a for a, _ in copies], torch.int64)
        dst = self._tensor([b for _, b in copies], torch.int64)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    # ------------------------------------------------------------------ model and sampling
    def forward(self, ids, positions, meta):
        if self.graphs is not None and not meta.is_prefill and ids.shape[0] <= self.graphs.max_bs:
            return self.graphs.run(ids, positions, meta)
        return self.model(ids, positions, self.kv_caches, meta)

    def sample(self, logits, seqs):
        tokens = logits.argmax(dim=-1)  # greedy
        temps = [s.temperature for s in seqs]
        if any(t > 0 for t in temps):
            t = torch.tensor(temps, device=logits.device).clamp_min(1e-6)[:, None]
            drawn = torch.multinomial(torch.softmax(logits / t, dim=-1), 1, generator=self.generator)[:, 0]
            tokens = torch.where(t[:, 0] > 1e-6, drawn, tokens)
        return tokens.tolist()

    # ------------------------------------------------------------------ the loop
    def add_request(self, prompt: list[int], max_new_tokens: int, arrival: float = 0.0, temperature: float = 0.0):
        seq = Sequence(self._next_id, list(prompt), max_new_tokens, arrival, temperature)
        self._next_id += 1
        self.scheduler.add(seq)
        return seq

    def step(self, now=time.perf_counter) -> list[Sequence]:
        """One model call; returns the sequences that finished. `now()` stamps the tokens."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        ids, positions, meta, last = self.prepare(batch)
        if batch.copies:  # copy-on-write of partially matched blocks (radix cache), before anything writes there
            self.copy_blocks(batch.copies)
        t_host = time.perf_counter() - t0  # scheduling + input preparation: the GPU waits for it
        hidden = self.forward(ids, positions, meta)
        tokens = self.sample(self.model.logits(hidden[last]), batch.seqs)  # .tolist() waits for the GPU
        finished = self.scheduler.postprocess(batch, tokens, now())
        # (kind, sequences, tokens, host seconds, step seconds)
        self.step_log.append(("prefill" if batch.is_prefill else "decode", len(batch.seqs), ids.shape[0], t_host,
                              time.perf_counter() - t0))
        return finished

    def run(self, requests: list[Request], step_clock: bool = False, progress: bool = False) -> list[Sequence]:
        """Serve `requests`, each entering the queue at its arrival time (seconds from the start; with
        ``step_clock`` in scheduler steps, which makes a run reproducible). Returns the finished sequences in
        request order, with arrival and token times relative to the start."""
        pending = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival))
        seqs: list[Sequence | None] = [None] * len(requests)
        steps = 0
        start = time.perf_counter()
        clock = (lambda: float(steps)) if step_clock else (lambda: time.perf_counter() - start)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(requests), desc="requests", leave=False)
        while pending or self.scheduler.has_work():
            now = clock()
            while pending and requests[pending[0]].arrival <= now:
                i = pending.popleft()
                r = requests[i]
                seqs[i] = self.add_request(r.prompt, r.max_new_tokens, r.arrival, r.temperature)
            if not self.scheduler.has_work():  # idle until the next arrival
                if step_clock:
                    steps = int(requests[pending[0]].arrival) + (requests[pending[0]].arrival % 1 > 0)
                else:
                    time.sleep(max(0.0, requests[pending[0]].arrival - now))
                continue
            done = self.step(clock)
            steps += 1
            if bar is not None:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return seqs


class DecodeGraphs:
    """CUDA graphs of the decode step for batch sizes 1, 2, 4, 8 and multiples of 16 up to max_bs (as
    nano-vllm does); a batch runs in the smallest graph that holds it, its extra rows pointed at the
    scratch block. Inputs are copied into static buffers; block tables are max_model_len / block_size wide."""

    def __init__(self, engine: Engine, max_bs: int):
        self.engine, self.max_bs = engine, max_bs
        dev, scratch_slot = engine.device, engine.scratch_block * engine.block_size
        width = -(-engine.max_model_len // engine.block_size)
        self.ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slots = torch.full((max_bs,), scratch_slot, dtype=torch.int64, device=dev)
        self.ctx = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.tables = torch.full((max_bs, width), engine.scratch_block, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(max_bs, engine.model.cfg.hidden_size, dtype=engine.dtype, device=dev)
        self.sizes = sorted({b for b in [1, 2, 4, 8, *range(16, max_bs + 1, 16), max_bs] if b <= max_bs})
        self.graphs, pool = {}, None
        for bs in reversed(self.sizes):  # largest first: the smaller ones fit in its memory pool
            meta = AttnMeta(False, self.slots[:bs], self.ctx[:bs], self.tables[:bs], backend="triton")
            run = lambda bs=bs, meta=meta: self.hidden[:bs].copy_(
                engine.model(self.ids[:bs], self.positions[:bs], engine.kv_caches, meta))
            run()  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                run()
            pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize()

    def run(self, ids, positions, meta: AttnMeta):
        b = ids.shape[0]
        bs = next(s for s in self.sizes if s >= b)
        self.ids[:b].copy_(ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(meta.slot_mapping)
        self.slots[b:bs].fill_(self.engine.scratch_block * self.engine.block_size)
        self.ctx[:b].copy_(meta.context_lens)
        self.ctx[b:bs].fill_(1)
        self.tables[:b, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[bs].replay()
        return self.hidden[:b]
