"""Chapter 07's workloads: seeded request traces whose prompts share prefixes the way real ones do.

A workload is a list of ROUNDS; a round's requests enter the queue together, when the previous round has
finished (a closed loop: the next chat turn, agent step or tree level is written after the last answer). Token
ids are random (seeded), so two parts of a prompt share tokens only where the generator says they do. Outputs
are not fed back: where a later prompt contains an earlier answer (chat, agent, tree), it is a seeded stand-in
of the answer's length, because the trace must be fixed before the run (the model's weights are random).

Shapes (defaults; every generator takes them as arguments):

| workload        | what is shared                                | per request                                     |
|-----------------|-----------------------------------------------|-------------------------------------------------|
| system_prompt   | one system prompt of S = 512 / 2K / 8K tokens | + a suffix of 80-120 tokens (~100)              |
| few_shot        | vLLM §6.4's prefix: 1-shot 80, 5-shot 341     | + a sentence of 20-60 tokens to translate       |
| multi_turn      | the conversation so far (turn t extends t-1)  | + a user turn of 20-80 tokens; answers 50-150   |
| agent_loop      | a 2K-token scaffold + every earlier step      | + a tool result of 200-400 tokens per step      |
| tree_of_thought | the question and the path of thoughts to here | branching 3, depth 3, thoughts of 40-80 tokens  |
| no_sharing      | nothing (a distinct first token per prompt)   | prompts of 100-1,024 tokens (the control)       |
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tinyserve.workload import Request


@dataclass
class Workload:
    name: str
    rounds: list[list[Request]]
    shape: str  # one line, for settings and tables

    @property
    def requests(self) -> list[Request]:
        return [r for rnd in self.rounds for r in rnd]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]  # 0 is left out: it pads HF's batches elsewhere


def system_prompt(system_len: int = 2048, n: int = 32, suffix: tuple[int, int] = (80, 120), new_tokens: int = 32,
                  vocab: int = 128256, seed: int = 0) -> Workload:
    """n requests = one shared system prompt + a private suffix each, all in one round."""
    rng = random.Random(seed)
    system = _tokens(rng, system_len, vocab)
    reqs = [Request(system + _tokens(rng, rng.randint(*suffix), vocab), new_tokens) for _ in range(n)]
    return Workload(f"system_prompt_{system_len}", [reqs],
                    f"{n} requests: a {system_len}-token system prompt + {suffix[0]}-{suffix[1]}-token suffixes, "
                    f"{new_tokens} new tokens each")


def few_shot(shots: int = 5, n: int = 32, query: tuple[int, int] = (20, 60), new_tokens: int = 32,
             vocab: int = 128256, seed: int = 0) -> Workload:
    """vLLM §6.4's translation prompts: an instruction and examples shared by all (80 tokens with 1 example, 341
    with 5, as stated for Fig. 16), then the sentence to translate."""
    prefix_len = {1: 80, 5: 341}[shots]
    rng = random.Random(seed)
    prefix = _tokens(rng, prefix_len, vocab)
    reqs = [Request(prefix + _tokens(rng, rng.randint(*query), vocab), new_tokens) for _ in range(n)]
    return Workload(f"few_shot_{shots}", [reqs], f"{n} requests: a {prefix_len}-token {shots}-shot prefix + "
                    f"{query[0]}-{query[1]}-token sentences, {new_tokens} new tokens each")


def multi_turn(conversations: int = 16, turns: int = 4, system_len: int = 256, user: tuple[int, int] = (20, 80),
               answer: tuple[int, int] = (50, 150), vocab: int = 128256, seed: int = 0) -> Workload:
    """Round t holds turn t of every conversation: its prompt is turn t-1's prompt + turn t-1's answer + a new user
    message. Each conversation has its own system prompt (sharing is within a conversation only)."""
    rng = random.Random(seed)
    history = [_tokens(rng, system_len, vocab) for _ in range(conversations)]
    rounds = []
    for _ in range(turns):
        rnd = []
        for c in range(conversations):
            history[c] = history[c] + _tokens(rng, rng.randint(*user), vocab)
            reply = rng.randint(*answer)
            rnd.append(Request(list(history[c]), reply))
            history[c] = history[c] + _tokens(rng, reply, vocab)  # the answer, as the next turn will quote it
        rounds.append(rnd)
    return Workload("multi_turn", rounds, f"{conversations} conversations x {turns} turns: {system_len}-token system "
                    f"prompt each, user {user[0]}-{user[1]}, answers {answer[0]}-{answer[1]} tokens")


def agent_loop(agents: int = 16, steps: int = 8, scaffold_len: int = 2048, tool: tuple[int, int] = (200, 400),
               action_tokens: int = 16, vocab: int = 128256, seed: int = 0) -> Workload:
    """An agent's step t sees one scaffold (instructions and tool specifications, shared by all agents) and the
    actions and tool results of its steps 0 .. t-1, plus its latest tool result; it writes a short action."""
    rng = random.Random(seed)
    scaffold = _tokens(rng, scaffold_len, vocab)
    context = [list(scaffold) + _tokens(rng, rng.randint(*tool), vocab) for _ in range(agents)]  # the task
    rounds = []
    for _ in range(steps):
        rounds.append([Request(list(ctx), action_tokens) for ctx in context])
        for a in range(agents):
            context[a] += _tokens(rng, action_tokens, vocab) + _tokens(rng, rng.randint(*tool), vocab)
    return Workload("agent_loop", rounds, f"{agents} agents x {steps} steps: a {scaffold_len}-token shared scaffold, "
                    f"tool results of {tool[0]}-{tool[1]} tokens, {action_tokens}-token actions")


def tree_of_thought(problems: int = 8, branching: int = 3, depth: int = 3, question_len: int = 256,
                    thought: tuple[int, int] = (40, 80), vocab: int = 128256, seed: int = 0) -> Workload:
    """Round d expands every node of depth d: a node's prompt is its problem and the thoughts on its path; each
    request writes one thought, and each of its `branching` children continues from a different stand-in."""
    rng = random.Random(seed)
    frontier = [_tokens(rng, question_len, vocab) for _ in range(problems)]
    rounds = []
    for _ in range(depth):
        lengths = [rng.randint(*thought) for _ in frontier]
        rounds.append([Request(list(p), n) for p, n in zip(frontier, lengths)])
        frontier = [p + _tokens(rng, n, vocab) for p, n in zip(frontier, lengths) for _ in range(branching)]
    return Workload("tree_of_thought", rounds, f"{problems} problems, branching {branching}, depth {depth}: "
                    f"{question_len}-token questions, thoughts of {thought[0]}-{thought[1]} tokens")


def no_sharing(n: int = 64, prompt_len: tuple[int, int] = (100, 1024), new_tokens: int = 128, vocab: int = 128256,
               seed: int = 0) -> Workload:
    """The control: no two prompts share even their first token, so no cache can hit."""
    assert n < vocab - 1
    rng = random.Random(seed)
    firsts = rng.sample(range(1, vocab), n)
    reqs = [Request([f] + _tokens(rng, rng.randint(*prompt_len) - 1, vocab), new_tokens) for f in firsts]
    return Workload("no_sharing", [reqs], f"{n} unrelated prompts of {prompt_len[0]}-{prompt_len[1]} tokens, "
                    f"{new_tokens} new tokens each")


def all_workloads(scale: str = "gpu", vocab: int = 128256, seed: int = 0) -> list[Workload]:
    """Every workload at the run's scale: "gpu" as in the table above; "dry" and "test" small enough for a CPU."""
    if scale == "gpu":
        return [system_prompt(s, vocab=vocab, seed=seed) for s in (512, 2048, 8192)] + [
            few_shot(1, vocab=vocab, seed=seed), few_shot(5, vocab=vocab, seed=seed),
            multi_turn(vocab=vocab, seed=seed), agent_loop(vocab=vocab, seed=seed),
            tree_of_thought(vocab=vocab, seed=seed), no_sharing(vocab=vocab, seed=seed)]
    small = dict(vocab=vocab, seed=seed)
    return [system_prompt(s, n=6, suffix=(8, 14), new_tokens=4, **small) for s in (20, 45)] + [
        few_shot(1, n=4, query=(5, 9), new_tokens=3, **small),
        multi_turn(conversations=3, turns=3, system_len=12, user=(3, 7), answer=(2, 5), **small),
        agent_loop(agents=3, steps=3, scaffold_len=30, tool=(5, 11), action_tokens=3, **small),
        tree_of_thought(problems=2, branching=2, depth=3, question_len=13, thought=(3, 6), **small),
        no_sharing(n=5, prompt_len=(10, 30), new_tokens=4, **small)]
