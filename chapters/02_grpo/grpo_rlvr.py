"""GRPO on verifiable rewards: the code that chapter 02 studies.

The trainer is TRL's ``GRPOTrainer`` (trl 1.16); this module holds what the chapter wraps around it and what the
library hides:

1. the task and its verifier: reasoning-gym problems from one generator setting (``task_config``, ``problem_sets``),
   worked solutions for supervised warm-up, and reasoning-gym's own scorer as the reward (``make_problems``,
   ``worked_solution``, ``score``, ``make_reward_fn``);
2. the policy when the hub is out of reach: a character tokenizer and a small Llama that the chapter trains itself
   (``char_tokenizer``, ``tiny_policy``, ``sft``, ``warm_up``); and the hub path (``load_hub_policy``,
   ``gsm8k_problems``);
3. the GRPO math, written from the papers, to be compared with TRL's numbers: the group advantage
   (``group_advantages``), the clipped surrogate with its KL term (``grpo_loss``), and a check that both equal what
   TRL computes inside a real step (``check_against_trl``);
4. the measurement: sampling, the unbiased pass@k estimator of Chen et al. (2021) (``pass_at_k``), bootstrap
   intervals, and a callback that splits each GRPO step into generation and training time (``StepClock``).
"""

from __future__ import annotations

import functools
import json
import math
import random
import string
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainerCallback

# ---------------------------------------------------------------------------------------------------------------
# 1. The task and its verifier
# ---------------------------------------------------------------------------------------------------------------

# reasoning-gym's chain_sum: "State the final answer to the following arithmetic problem: 12 + 45 - 67 =".
# 2-4 terms of 2-5 digits, declared from a start-only calibration (calibrate_task.py; calibration/ holds its
# record): carries and borrows across up to five digits keep the converged warm-up short of always right (pass@1
# about 0.6-0.7), though pass@256 stays near 0.9 at every setting tried. Earlier runs used 1-2 and 1-3 digits
# (pass@256 96.5%: a ceiling).
# The chapter's parameters max_terms, min_digits and max_digits override these (``task_config``).
TASKS = {"chain_sum": dict(min_terms=2, max_terms=4, min_digits=2, max_digits=5)}  # declared 2026-12-04 (claims.yaml)
# The answer format reasoning-gym's own prompts ask for, read back by reasoning_gym.utils.extract_answer.
INSTRUCTION = "Give the final answer as <answer>NUMBER</answer>."
# Share of the warm-up's solution steps that carry a check (the inverse operation): the policy learns that a check
# is optional, so the length of its answers is its own choice, which is what the length-bias claim needs.
CHECK_PROB = 0.5
# The length channel that is free of correctness: a filler line that says nothing and changes nothing. In the warm-up
# data each step is followed by a geometric number of them (continue with probability ``filler_prob``), so the policy
# learns that their count is its own choice, without a bound short of max_completion_length. A filler has no digits,
# no ';' and no tags: it can neither change the answer nor be mistaken for a check.
FILLER = "let me see"


def task_config(task: str = "chain_sum", **overrides) -> dict:
    """The generator settings of ``task``: ``TASKS[task]`` with ``overrides`` (None keeps the default), checked, so
    that a bad setting fails here with its name rather than inside reasoning-gym."""
    cfg = dict(TASKS[task])
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"{task} has no setting {unknown[0]!r}; its settings: {', '.join(cfg)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    for lo, hi in (("min_terms", "max_terms"), ("min_digits", "max_digits")):
        if not 1 <= cfg[lo] <= cfg[hi]:
            raise ValueError(f"{task}: need 1 <= {lo} <= {hi}, got {lo} = {cfg[lo]}, {hi} = {cfg[hi]}")
    return cfg


def chapter_task(P: dict) -> dict:
    """chain_sum's generator settings from the chapter's parameters ``P`` (min_terms stays 2)."""
    return task_config("chain_sum", max_terms=P["max_terms"], min_digits=P["min_digits"], max_digits=P["max_digits"])


def describe_task(cfg: dict) -> str:
    """The setting in words, e.g. "2-4 terms of 1-3 digits"."""
    return f"{cfg['min_terms']}-{cfg['max_terms']} terms of {cfg['min_digits']}-{cfg['max_digits']} digits"


def make_problems(n: int, seed: int, task: str = "chain_sum", exclude: set[str] | frozenset = frozenset(),
                  **config) -> list[dict]:
    """``n`` reasoning-gym problems (dicts with question, answer, metadata), none whose question is in ``exclude``.
    ``config`` overrides the task's generator settings (``task_config``; for chain_sum min_terms, max_terms,
    min_digits, max_digits)."""
    import reasoning_gym

    cfg = task_config(task, **config)
    out: list[dict] = []
    size = n
    while len(out) < n:  # overshoot, then drop excluded questions (held-out sets must not repeat training ones)
        ds = reasoning_gym.create_dataset(task, size=size + len(exclude) // 4 + 8, seed=seed, **cfg)
        out = [e for e in ds if e["question"] not in exclude][:n]
        size *= 2
    return out


def problem_sets(P: dict, seed: int) -> dict[str, list[dict]]:
    """The chapter's chain_sum problems for run seed ``seed``, all from one generator setting (``chapter_task``), each
    set from its own seed: ``rl`` (the GRPO prompts, and the length-bias runs'), ``sft_pool`` (the warm-up's worked
    solutions; none for a hub policy), ``test`` (the held-out problems of pass@k: no question of rl or sft_pool) and
    ``val`` (the warm-up's probe: no question of the other three)."""
    cfg = chapter_task(P)
    rl = make_problems(max(P["grpo_steps"], P["length_steps"]) * P["prompts_per_step"], seed=1000 + seed, **cfg)
    sft_pool = ([] if P["policy"] != "scratch" else
                make_problems(max(2000, min(50_000, 128 * P["sft_steps"])), seed=2000 + seed, **cfg))
    seen = {e["question"] for e in rl + sft_pool}
    test = make_problems(P["eval_problems"], seed=3000 + seed, exclude=seen, **cfg)
    val = make_problems(128, seed=4000 + seed, exclude=seen | {e["question"] for e in test}, **cfg)
    return {"rl": rl, "sft_pool": sft_pool, "test": test, "val": val}


def worked_solution(entry: dict, check_prob: float = 0.0, rng: random.Random | None = None,
                    filler_prob: float = 0.0) -> str:
    """The step-by-step solution the small policy imitates before RL, one partial sum per line.

    With ``check_prob`` 0 (the terse solution, the reference for lengths): ``12+45=57\n57-67=-10\n<answer>-10</answer>``.
    Otherwise each line, with probability ``check_prob``, also undoes its step as a check: ``12+45=57; 57-45=12``.
    A check never changes the answer; it only makes the solution longer (about 1.4x with every line checked).
    With ``filler_prob`` > 0, each line is followed by ``FILLER`` lines, one more each time with probability
    ``filler_prob`` (a geometric count, mean filler_prob / (1 - filler_prob)): length without arithmetic.
    """
    tokens = entry["metadata"]["expression"].split()
    acc, lines = int(tokens[0]), []
    for op, x in zip(tokens[1::2], tokens[2::2]):
        new = acc + int(x) if op == "+" else acc - int(x)
        line = f"{acc}{op}{x}={new}"
        if check_prob and (rng or random).random() < check_prob:
            line += f"; {new}{'-' if op == '+' else '+'}{x}={acc}"
        lines.append(line)
        while filler_prob and (rng or random).random() < filler_prob:
            lines.append(FILLER)
        acc = new
    assert str(acc) == entry["answer"], (entry, acc)
    return "\n".join(lines) + f"\n<answer>{entry['answer']}</answer>"


def count_checks(completion: str) -> int:
    """How many lines of a completion carry a check."""
    return completion.split("<answer>")[0].count(";")


def count_fillers(completion: str) -> int:
    """How many filler lines a completion writes before its answer."""
    return sum(line.strip() == FILLER for line in completion.split("<answer>")[0].splitlines())


def prompt_of(entry: dict) -> str:
    """What the small policy sees: reasoning-gym's question, verbatim, and a newline."""
    return entry["question"] + "\n"


@functools.cache
def _scorer(source: str):
    from reasoning_gym import get_score_answer_fn

    return get_score_answer_fn(source)


def score(completion: str, entry: dict) -> float:
    """reasoning-gym's verdict: extract ``<answer>..</answer>``, then the task's own ``score_answer``.

    1.0 for a correct answer; 0.0 for a wrong or missing one. (chain_sum's scorer gives partial credit
    len(oracle)/len(answer) when the oracle is a substring of a wrong answer: "4" in "41" scores 0.5.)
    """
    from reasoning_gym.utils import compute_decimal_reward, extract_answer

    answer = extract_answer(completion)
    source = entry["metadata"]["source_dataset"]
    if source == "gsm8k":  # not a reasoning-gym task: its numeric scorer on GSM8K's final answer
        return float(compute_decimal_reward(answer, oracle_answer=entry["answer"]))
    return float(_scorer(source)(answer, entry))


def binary_reward(completion: str, entry: dict) -> float:
    """The reward GRPO trains on: 1.0 when reasoning-gym scores the answer exactly right, else 0.0.

    reasoning-gym's chain_sum scorer pays partial credit len(oracle)/len(answer) when the right answer is a substring
    of a wrong one ("<answer>2237</answer>" for 223 scores 0.75): a reward that pays for padding a wrong answer with
    digits. The chapter's text promises "1 for a correct final answer, 0 otherwise", and this is that reward."""
    return 1.0 if score(completion, entry) == 1.0 else 0.0


def reference_length(entry: dict) -> float:
    """Tokens of the terse worked solution (no checks) plus eos, for the character tokenizer (NaN where the task
    has none): the yardstick of the length-bias measurement."""
    if entry["metadata"]["source_dataset"] != "chain_sum":
        return float("nan")
    return float(len(worked_solution(entry)) + 1)


def make_reward_fn(log: list):
    """A TRL reward function ``(completions, completion_ids, entry, **kwargs) -> list[float]``: the binary reward
    (``binary_reward``), and, appended to ``log`` for each generation batch, the step, the completion lengths
    (tokens), the lengths of the problems' terse worked solutions, the checks and fillers written and the rewards: the
    record behind the length-bias plots."""

    def reasoning_gym_reward(completions, completion_ids, entry, trainer_state=None, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or chat completions
        entries = [json.loads(e) for e in entry]
        rewards = [binary_reward(t, e) for t, e in zip(texts, entries)]
        log.append({"step": trainer_state.global_step if trainer_state is not None else len(log),
                    "lengths": [len(ids) for ids in completion_ids],
                    "ref_lengths": [reference_length(e) for e in entries],
                    "checks": [count_checks(t) for t in texts], "fillers": [count_fillers(t) for t in texts],
                    "rewards": rewards})
        return rewards

    return reasoning_gym_reward


# ---------------------------------------------------------------------------------------------------------------
# 2. The policy
# ---------------------------------------------------------------------------------------------------------------

def char_tokenizer():
    """A character-level tokenizer over printable ASCII: 99 tokens, one per character, plus pad/eos/unk."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space; newline
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: each character is a token
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_policy(tokenizer, d_model: int = 256, n_layers: int = 4, seed: int = 0):
    """A small Llama (RoPE, RMSNorm, SwiGLU) for the offline path, initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=4 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=max(1, d_model // 64),
                      max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_sft(tokenizer, entries: list[dict], device="cpu", check_prob: float = CHECK_PROB, seed: int = 0,
               filler_prob: float = 0.0):
    """Tokenize prompt + worked solution (each line checked with probability ``check_prob``, followed by fillers at
    ``filler_prob``) + eos once, right-padded: (input_ids, attention_mask, labels), where labels are -100 on the prompt
    and the padding (the prompt is context, not a target)."""
    rng = random.Random(seed)
    prompts = tokenizer([prompt_of(e) for e in entries])["input_ids"]
    sols = tokenizer([worked_solution(e, check_prob, rng, filler_prob) for e in entries])["input_ids"]
    T = max(len(p) + len(c) + 1 for p, c in zip(prompts, sols))
    x = torch.full((len(entries), T), tokenizer.pad_token_id)
    y = torch.full((len(entries), T), -100)
    for i, (p, c) in enumerate(zip(prompts, sols)):
        c = c + [tokenizer.eos_token_id]
        x[i, :len(p) + len(c)] = torch.tensor(p + c)
        y[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return x.to(device), (x != tokenizer.pad_token_id).long().to(device), y.to(device)


def sft(model, tokenizer, pool: list[dict], *, steps: int, batch_size: int, lr: float, seed: int = 0,
        device="cpu", callback=None, every: int = 0, schedule: str = "cosine", filler_prob: float = 0.0,
        micro_batch: int = 0) -> list[float]:
    """Supervised training on worked solutions (AdamW). Returns the losses.

    ``schedule="cosine"``: the warm-up (linear warm-up, then cosine decay to 0 over ``steps``; AdamW as nanoGPT sets
    it); ``"constant"``: the continued-SFT arm that the RL arm is compared with (the same constant learning rate,
    steps and sequences per step as GRPO, and AdamW as TRL sets it for GRPO: betas (0.9, 0.999), no weight decay).
    ``micro_batch``: sequences per forward pass (0: the whole batch at once); a step's gradient is summed over its
    micro-batches, each weighted by its share of the batch's target tokens, so it is the whole batch's mean-token
    gradient whatever the split. ``callback(step)`` runs every ``every`` steps (the chapter evaluates pass@1 there);
    when it returns True training stops at that step."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
    if micro_batch < 0:
        raise ValueError(f"micro_batch must be 0 (whole batch) or positive, not {micro_batch}")
    model.to(device).train()
    X, M, Y = encode_sft(tokenizer, pool, device, seed=seed, filler_prob=filler_prob)
    betas, decay = ((0.9, 0.95), 0.01) if schedule == "cosine" else ((0.9, 0.999), 0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: 1.0) if schedule == "constant" else (
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    gen = torch.Generator().manual_seed(seed)
    use_bf16 = str(device).startswith("cuda")
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(X), (batch_size,), generator=gen).to(X.device)
        targets = (Y[idx, 1:] != -100).sum()                          # the tokens the batch's mean loss is over
        step_loss = 0.0
        for part in idx.split(micro_batch or batch_size):
            T = int(M[part].sum(1).max())                             # trim to the micro-batch's longest sequence
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(input_ids=X[part, :T], attention_mask=M[part, :T], labels=Y[part, :T]).loss
            share = (Y[part, 1:T] != -100).sum() / targets               # 1 when the batch is one part
            (loss * share).backward()
            step_loss = step_loss + loss.detach() * share
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if callback is not None and every and (step + 1) % every == 0:
            stop = callback(step + 1)
            model.train()
            if stop:
                break
    return [float(v) for v in torch.stack(losses).cpu()] if losses else []


# The warm-up's probe: samples per validation problem (and the share of zero-signal groups among them).
PROBE_SAMPLES = 16


def eval_settings(P: dict, prompt_fn=prompt_of, hub: bool = False) -> dict:
    """The keyword arguments of every ``evaluate`` in the chapter: ``eval_temperature`` with top-p 0.95 (Yue et al.'s
    protocol), up to ``max_completion_length`` new tokens, batches of 16,384 sequences (512 for a hub model)."""
    return dict(temperature=P["eval_temperature"], top_p=0.95, max_new_tokens=P["max_completion_length"],
                prompt_fn=prompt_fn, batch_size=512 if hub else 16384)


@dataclass
class WarmUp:
    """What ``warm_up`` returns: the losses, the probe curve (step, pass@1, zero-signal share), the seconds from the
    first step to the last (probes included, the step-0 probe not), and the probe's size."""

    losses: list[float]
    curve: list[tuple[int, float, float]]
    seconds: float
    probe_problems: int
    probe_group: int


def warm_up(model, tokenizer, pool: list[dict], val: list[dict], P: dict, *, device, seed: int,
            eval_kw: dict) -> WarmUp:
    """The chapter's supervised warm-up of the scratch policy: ``sft`` over ``P["sft_steps"]`` cosine steps at
    ``P["sft_lr"]`` (batches of 256 worked solutions on a GPU, 32 on the CPU), probed before the first step and every
    150 steps (on the CPU twice in all) on the validation problems (all of them on a GPU, 8 on the CPU) with
    ``PROBE_SAMPLES`` samples each. A positive ``P["sft_target"]`` stops it at the first probe whose pass@1 reaches it.
    The probes reseed torch's global generator (``sample``), which the training does not use: it draws its batches
    from its own generator and the policy has no dropout, so the probes do not change the trained weights."""
    cuda = torch.device(device).type == "cuda"
    model.to(device)
    probe_set = val if cuda else val[:8]
    group = min(P["group_size"], PROBE_SAMPLES)
    curve = []

    def probe(step):
        ev = evaluate(model, tokenizer, probe_set, PROBE_SAMPLES, **eval_kw, seed=step)
        curve.append((step, ev.pass1, zero_signal_share(ev.correct, PROBE_SAMPLES, group)))
        return P["sft_target"] > 0 and ev.pass1 >= P["sft_target"]  # True stops the warm-up here (0: never)

    probe(0)
    t0 = time.perf_counter()
    losses = sft(model, tokenizer, pool, steps=P["sft_steps"], batch_size=256 if cuda else 32, lr=P["sft_lr"],
                 seed=seed, device=device, callback=probe, every=150 if cuda else max(1, P["sft_steps"] // 2),
                 filler_prob=P["filler_prob"])
    return WarmUp(losses, curve, time.perf_counter() - t0, len(probe_set), group)


# The online path (full profile, hub reachable): an instruct model and GSM8K. Not run on the offline H100.
HUB_POLICIES = ("Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct")


def load_hub_policy(name: str):
    """An instruct model and its tokenizer from the Hugging Face hub (bf16 weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
    return model, tokenizer


def gsm8k_problems(split: str, n: int) -> list[dict]:
    """GSM8K through ``datasets``, shaped like reasoning-gym entries (the final answer follows '####')."""
    import datasets

    ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
    return [{"question": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", ""),
             "metadata": {"source_dataset": "gsm8k"}} for r in ds.select(range(min(n, len(ds))))]


def chat_prompt(entry: dict) -> list[dict]:
    """The conversational prompt an instruct model gets (TRL applies its chat template)."""
    return [{"role": "user", "content": entry["question"] + "\n" + INSTRUCTION}]


def grpo_trainer(policy: str, tokenizer, rows: list[dict], reward_fn, *, loss_type: str, steps: int,
                 group_size: int, prompts_per_step: int, lr: float, beta: float, max_completion_length: int,
                 seed: int, output_dir: str, cuda: bool, micro_batch: int = 0):
    """TRL's GRPOTrainer with every field this chapter sets. ``policy``: a hub id or a folder written by
    ``save_pretrained`` (TRL loads the reference model from the same path when beta > 0).

    rows: {"prompt": str or chat messages, "entry": json of the reasoning-gym problem} per training prompt.
    loss_type "grpo" pairs with std scaling of the rewards (DeepSeekMath); "dr_grpo" with none (Dr. GRPO).
    micro_batch: completions per forward pass (0: the whole step at once). A step still generates all
    prompts_per_step × group_size completions at once and computes their advantages over whole groups; TRL then
    splits them into gradient_accumulation_steps micro-batches, and both loss types divide each micro-batch's loss by
    their number, which for equal micro-batches is the whole batch's loss.
    """
    completions = prompts_per_step * group_size
    per_pass = micro_batch if 0 < micro_batch < completions else completions
    if micro_batch < 0 or completions % per_pass:
        raise ValueError(f"micro_batch ({micro_batch}) must be 0 or divide the {completions} completions of a step")
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=output_dir, seed=seed, max_steps=steps, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, bf16=cuda, use_cpu=not cuda,
        per_device_train_batch_size=per_pass,                          # completions per forward (TRL counts completions)
        gradient_accumulation_steps=completions // per_pass,           # one generation batch per optimizer step
        num_generations=group_size,                                    # G completions of each prompt
        max_completion_length=max_completion_length, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=beta,                                                     # KL to the starting policy (TRL default: 0)
        epsilon=0.2, num_iterations=1,                                 # one update per batch: ratio = 1, clip inactive
        loss_type=loss_type,                                           # TRL default is "dapo"
        scale_rewards="group" if loss_type == "grpo" else "none",
        mask_truncated_completions=False, disable_dropout=True, remove_unused_columns=False,
        model_init_kwargs={"dtype": torch.float32},                    # fp32 master weights; bf16 autocast on GPU
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_fn, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(rows))
    trainer.remove_callback(PrinterCallback)  # the log history stays in trainer.state.log_history
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# 3. The GRPO math (DeepSeekMath §4.1; Dr. GRPO §3.1), to compare with TRL
# ---------------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Outcome advantage of each completion, shared by all its tokens (DeepSeekMath eq. 3 ff.).

    rewards: (B*G,) rewards, the G completions of one prompt consecutive.
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps) with scale="group" (GRPO; std with Bessel's correction, as
    TRL computes it); A_i = r_i - mean(r_group) with scale="none" (Dr. GRPO removes the std: a group whose rewards
    barely differ no longer gets its small differences blown up to unit scale).
    """
    r = rewards.view(-1, group_size)                                  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)                             # baseline: the group mean, no critic
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)                # std(unbiased=True): TRL's nanstd
    elif scale != "none":
        raise ValueError(f"scale must be 'group' or 'none', not {scale!r}")
    return adv.reshape(-1)                                            # (B*G,)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) estimate, DeepSeekMath eq. 4: π_ref/π_θ − log(π_ref/π_θ) − 1 (≥ 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp, old_logp, adv, mask, *, ref_logp=None, beta: float = 0.0, epsilon: float = 0.2,
              loss_type: str = "grpo", max_completion_length: int | None = None) -> torch.Tensor:
    """The GRPO objective, negated to a loss.

    logp, old_logp, ref_logp, mask: (B, T) per-token log-probs of the sampled tokens under π_θ, π_θ_old, π_ref,
    and 1 on completion tokens; adv: (B,) one advantage per completion.

        ratio_t = π_θ / π_θ_old,   l_t = −min(ratio_t·A, clip(ratio_t, 1−ε, 1+ε)·A) + β·KL_t
        grpo:     mean over completions of (Σ_t l_t) / |o_i|          (DeepSeekMath eq. 3: per-response length 1/|o_i|)
        dr_grpo:  (Σ_i Σ_t l_t) / (G_total · max_completion_length)   (Dr. GRPO: a constant instead of |o_i|)

    As in TRL 1.16 (``use_bias_correction_kl=True``), the KL term is weighted by the ratio, which is 1 in value
    on-policy and changes only its gradient.
    """
    ratio = torch.exp(logp - old_logp)
    A = adv.unsqueeze(1)                                              # (B, 1): the same advantage for every token
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * A)
    if beta:
        per_token = per_token + beta * k3_kl(logp, ref_logp) * ratio
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    raise ValueError(f"loss_type must be 'grpo' or 'dr_grpo', not {loss_type!r}")


def check_against_trl(trainer, rows: list[dict], reward_log: list[dict]) -> dict:
    """Run one real TRL generation+scoring on ``rows`` and compare TRL's advantages and loss with ours.

    Our side recomputes every per-token log-prob with a plain forward pass (logits / temperature, log-softmax,
    gather), takes the rewards that reasoning-gym gave (the last record of ``reward_log``), and applies
    ``group_advantages`` and ``grpo_loss``; TRL's side is its own ``_generate_and_score_completions`` and
    ``compute_loss``. Call it after training (TRL sets its accumulation state then).
    """
    args = trainer.args
    model = trainer.model
    model.train()
    G = args.num_generations
    inputs = trainer._generate_and_score_completions([r for r in rows for _ in range(G)])  # TRL's sampler order
    rewards = torch.tensor(reward_log[-1]["rewards"], dtype=torch.float32)
    scale = "none" if args.scale_rewards in ("none", False) else "group"
    ours_adv = group_advantages(rewards, G, scale)
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"].float()
    ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = completion_ids.size(1)
    with torch.no_grad():
        # TRL divides the loss by the accumulation steps; undo that to compare the objective itself
        trl_loss = trainer.compute_loss(model, inputs).item() * trainer.current_gradient_accumulation_steps
        with trainer.accelerator.autocast():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, -T - 1:-1].float() / args.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        ours_loss = grpo_loss(logp, logp, ours_adv.to(logp.device), mask, ref_logp=inputs.get("ref_per_token_logps"),
                              beta=args.beta, epsilon=args.epsilon, loss_type=args.loss_type,
                              max_completion_length=args.max_completion_length).item()
    return {"rewards": rewards.tolist(), "trl_advantages": inputs["advantages"].float().cpu().tolist(),
            "our_advantages": ours_adv.tolist(), "trl_loss": trl_loss, "our_loss": ours_loss,
            "completions": trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)}


# ---------------------------------------------------------------------------------------------------------------
# 4. Measurement
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, *, temperature: float, top_p: float = 1.0,
           max_new_tokens: int = 64, batch_size: int = 4096, seed: int = 0) -> tuple[list[list[str]], int, float]:
    """``n`` sampled completions per prompt. Returns (completions[prompt][j], generated tokens, seconds).

    The model is left in the mode it came in (TRL reads ``model.training`` to file its metrics under train or eval).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    texts, n_tokens = [], 0
    t0 = time.perf_counter()
    tokenizer.padding_side = "left"
    for i in range(0, len(flat), batch_size):
        enc = tokenizer(flat[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        gen = out[:, enc["input_ids"].size(1):]
        n_tokens += int((gen != tokenizer.pad_token_id).sum())
        texts += tokenizer.batch_decode(gen, skip_special_tokens=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return [texts[j * n:(j + 1) * n] for j in range(len(prompts))], n_tokens, seconds


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1): 1 − C(n−c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))  # the product form, stable for large n


@dataclass
class Evaluation:
    """Per-problem correct counts out of ``n`` samples, and the pass@k curve over the problems."""

    n: int
    correct: np.ndarray                       # (P,) correct samples per problem
    ks: list[int] = field(default_factory=list)
    pass_k: dict[int, float] = field(default_factory=dict)
    lengths_correct: float = float("nan")     # mean completion length in characters
    lengths_incorrect: float = float("nan")
    tokens: int = 0
    seconds: float = 0.0
    examples: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def pass1(self) -> float:
        return self.pass_k[1]


def evaluate(model, tokenizer, problems: list[dict], n: int, *, temperature: float, top_p: float,
             max_new_tokens: int, prompt_fn=prompt_of, seed: int = 0, batch_size: int = 4096) -> Evaluation:
    """Sample ``n`` completions for each problem, score each with reasoning-gym, and estimate pass@k for k = 1, 2, 4,
    ... ≤ n (averaged over problems)."""
    comps, n_tokens, seconds = sample(model, tokenizer, [prompt_fn(e) for e in problems], n, temperature=temperature,
                                      top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    scores = np.array([[score(c, e) for c in cs] for cs, e in zip(comps, problems)])  # (P, n)
    ok = scores == 1.0
    correct = ok.sum(1)
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)]
    lens = np.array([[len(c) for c in cs] for cs in comps])
    ev = Evaluation(n=n, correct=correct, ks=ks, tokens=n_tokens, seconds=seconds,
                    pass_k={k: float(np.mean([pass_at_k(n, int(c), k) for c in correct])) for k in ks},
                    lengths_correct=float(lens[ok].mean()) if ok.any() else float("nan"),
                    lengths_incorrect=float(lens[~ok].mean()) if (~ok).any() else float("nan"))
    ev.examples = [(e["question"], cs[0], float(s[0])) for e, cs, s in zip(problems[:8], comps[:8], scores[:8])]
    return ev


def bootstrap_ci(per_problem: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of ``per_problem`` (resampling problems)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(per_problem, dtype=float)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def pass_k_per_problem(correct, n: int, ks: list[int]) -> np.ndarray:
    """(P, len(ks)) unbiased pass@k of each problem, from its ``correct`` count out of ``n`` samples."""
    return np.array([[pass_at_k(n, int(c), k) for k in ks] for c in np.asarray(correct)])


def paired_pass_k(correct_a, n_a: int, correct_b, n_b: int, ks: list[int], *, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict[int, tuple[float, float, float]]:
    """pass@k of policy A minus policy B on the same problems, for each k: (difference, lo, hi), the interval a 95%
    percentile bootstrap that resamples problems and keeps each problem's pair together (paired)."""
    d = pass_k_per_problem(correct_a, n_a, ks) - pass_k_per_problem(correct_b, n_b, ks)      # (P, K)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), (n_boot, len(d)))
    means = d[idx].mean(1)                                                                  # (n_boot, K)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {k: (float(d[:, j].mean()), float(lo[j]), float(hi[j])) for j, k in enumerate(ks)}


def crossover_k(correct_start, correct_rl, n: int, ks: list[int], *, n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict:
    """Where the starting policy catches up: the smallest k in ``ks`` at which its pass@k reaches the RL policy's.

    Returns {"k": the point estimate (None if it never catches up within ``ks``), "log2_k": log2 of it, with
    log2(max(ks)) + 1 standing for "beyond the largest k", "lo"/"hi": the 95% percentile bootstrap interval of log2_k
    over problems (paired)}."""
    a, b = pass_k_per_problem(correct_start, n, ks), pass_k_per_problem(correct_rl, n, ks)
    beyond = math.log2(max(ks)) + 1

    def first(sa, sb):
        hit = np.nonzero(sa.mean(0) >= sb.mean(0))[0]
        return math.log2(ks[hit[0]]) if len(hit) else beyond

    point = first(a, b)
    rng = np.random.default_rng(seed)
    boots = [first(a[i], b[i]) for i in rng.integers(0, len(a), (n_boot, len(a)))]
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"k": None if point == beyond else int(round(2 ** point)), "log2_k": point, "lo": float(lo), "hi": float(hi)}


def crossing_k(before: Evaluation, after: Evaluation) -> int | None:
    """The smallest k at which the starting policy's pass@k reaches the RL policy's (None if it never does)."""
    for k in before.ks:
        if before.pass_k[k] >= after.pass_k[k]:
            return k
    return None


def lengths_by_outcome(reward_log: list[dict]) -> dict[str, list[float]]:
    """Per generation batch: mean length (tokens) of correct (reward 1) and incorrect completions, the same relative
    to each problem's terse worked solution (``*_rel``: 1.0 = as long as the solution without checks), and the mean
    number of checks and of filler lines per completion (``checks_*``, ``fillers_*``)."""
    out = defaultdict(list)
    for rec in reward_log:
        L, R = np.array(rec["lengths"], float), np.array(rec["rewards"])
        ref = np.array(rec.get("ref_lengths", [np.nan] * len(L)), float)
        C = np.array(rec.get("checks", [np.nan] * len(L)), float)
        F = np.array(rec.get("fillers", [np.nan] * len(L)), float)
        ok = R == 1.0
        out["step"].append(rec["step"])
        out["reward"].append(float(R.mean()))
        for name, sel in (("correct", ok), ("incorrect", ~ok)):
            out[name].append(float(L[sel].mean()) if sel.any() else float("nan"))
            out[name + "_rel"].append(float((L[sel] / ref[sel]).mean()) if sel.any() else float("nan"))
            out["checks_" + name].append(float(C[sel].mean()) if sel.any() else float("nan"))
            out["fillers_" + name].append(float(F[sel].mean()) if sel.any() else float("nan"))
    return dict(out)


def zero_signal_share(correct, n: int, group_size: int) -> float:
    """The share of GRPO groups that carry no learning signal: the chance that ``group_size`` samples of a problem,
    drawn from its ``n`` evaluated samples of which ``correct[p]`` are right, are all right or all wrong (their
    advantages are then all zero), averaged over problems. Exact (hypergeometric) for the evaluated samples."""
    if not 2 <= group_size <= n:
        raise ValueError(f"group_size must lie in [2, n={n}], not {group_size}")
    total = math.comb(n, group_size)
    return float(np.mean([(math.comb(int(c), group_size) + math.comb(n - int(c), group_size)) / total
                          for c in np.asarray(correct)]))


def useful_share(correct, n: int, group_size: int) -> float:
    """The share of samples that carry a GRPO signal at group size ``group_size``: the chance that ``group_size``
    samples of a problem, drawn without replacement from its ``n`` samples of which ``correct[p]`` are right, are
    neither all right nor all wrong, 1 - (C(c, G) + C(n - c, G)) / C(n, G), averaged over problems: 1 minus
    ``zero_signal_share`` (exact: integer binomials), which needs G >= 2. G = n gives the indicator that a
    problem's n samples are mixed, G = 1 gives 0 (one sample is never mixed). BroRL's "dynamic sampling pass rate" (Table 2) at G."""
    n, group_size = int(n), int(group_size)
    if not 1 <= group_size <= n:
        raise ValueError(f"group_size must lie in [1, n={n}], not {group_size}")
    counts = [int(c) for c in np.asarray(correct).ravel()]
    if not counts:
        raise ValueError("no problems")
    if any(not 0 <= c <= n for c in counts):
        raise ValueError(f"a correct count lies outside [0, n={n}]: {counts}")
    return 0.0 if group_size == 1 else 1.0 - zero_signal_share(counts, n, group_size)


def check_probe_params(P: dict) -> None:
    """The group probe's parameters against each other (claims.yaml bounds each alone): a nonzero
    ``group_probe_samples`` must exceed ``group_size``, or the useful share at G = group_probe_samples compares a
    group with itself. Raises ParameterError (a ValueError) naming the parameter."""
    from repro_utils.profiles import ParameterError

    n, g = P["group_probe_samples"], P["group_size"]
    if n and n <= g:
        raise ParameterError(f"parameter 'group_probe_samples': {n} must exceed group_size={g} (or be 0: no probe)")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Splits each GRPO step's wall time into generation (``model.generate`` inside TRL) and the rest (scoring,
    log-probs of the reference model, forward, backward, optimizer), and runs ``every``-step evaluations outside the
    clock. Install with ``StepClock.install(trainer, ...)``: it wraps the trainer's generation method."""

    def __init__(self, evaluate_fn=None, every: int = 0):
        self.evaluate_fn, self.every = evaluate_fn, every
        self.step_s, self.gen_s, self.gen_tokens = [], [], []
        self.evals: list[tuple[int, float]] = []
        self._t0 = None
        self._gen = 0.0
        self._tok = 0

    @classmethod
    def install(cls, trainer, evaluate_fn=None, every: int = 0) -> StepClock:
        clock = cls(evaluate_fn, every)
        inner = trainer._generate_single_turn

        def timed(*args, **kwargs):
            _sync()
            t = time.perf_counter()
            completion_ids, logprobs = inner(*args, **kwargs)
            _sync()
            clock._gen += time.perf_counter() - t
            clock._tok += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        trainer._generate_single_turn = timed  # an instance attribute shadows the method
        trainer.add_callback(clock)
        return clock

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._t0, self._gen, self._tok = time.perf_counter(), 0.0, 0

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.step_s.append(time.perf_counter() - self._t0)
        self.gen_s.append(self._gen)
        self.gen_tokens.append(self._tok)
        if self.evaluate_fn is not None and self.every and state.global_step % self.every == 0:
            self.evals.append((state.global_step, self.evaluate_fn()))

    def summary(self, skip: int = 2) -> dict:
        """Totals over the steps after the first ``skip`` (warm-up: allocator, kernels)."""
        s = slice(skip if len(self.step_s) > skip else 0, None)
        step, gen, tok = sum(self.step_s[s]), sum(self.gen_s[s]), sum(self.gen_tokens[s])
        return {"steps": len(self.step_s[s]), "step_s": step, "generate_s": gen, "train_s": step - gen,
                "generate_share": gen / step if step else float("nan"),
                "rollout_tokens_per_s": tok / gen if gen else float("nan"),
                "ms_per_step": 1e3 * step / max(1, len(self.step_s[s]))}


# ---------------------------------------------------------------------------------------------------------------
# 5. The run's own bookkeeping: a wall-clock budget, and replicates checked before the ledger is written
# ---------------------------------------------------------------------------------------------------------------

class Budget:
    """The notebook's wall-clock budget: elapsed time per section, and whether a section may still start.

    ``t0`` is when the run started (``time.time()`` seconds); a section that would start after ``budget_s`` (or
    could not finish by then, given ``need_s``) is skipped and its claims recorded untested ("time budget")."""

    def __init__(self, budget_s: float, t0: float | None = None, clock=time.time):
        self.budget_s, self.clock = float(budget_s), clock
        self.t0 = clock() if t0 is None else t0
        self._last = self.clock()
        self.sections: dict[str, float] = {}

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def allows(self, need_s: float = 0.0) -> bool:
        """Whether a section that takes ``need_s`` seconds still ends inside the budget."""
        return self.elapsed() + need_s <= self.budget_s

    def mark(self, name: str) -> float:
        """Close the section ``name`` (the time since the previous mark), print it, and return its seconds."""
        now = self.clock()
        self.sections[name] = now - self._last
        self._last = now
        print(f"[time] {name}: {self.sections[name]:.0f} s; {self.elapsed():.0f} s of the {self.budget_s:.0f} s budget")
        return self.sections[name]


def short_replicates(ledger: dict) -> list[str]:
    """Every measured claim or goal in a ledger (``run.to_dict()``) whose values, or whose control's values, are not
    as many as it declares: in a gpu run any of them makes ``run.finish()`` refuse the run, so the chapter checks
    before it finishes (and the smoke run, which cannot refuse, is checked the same way)."""
    out = []
    for e in ledger["claims"] + ledger.get("goals", []):
        m, need = e["measured"], e["declared"].get("replicates")
        if not m or m.get("why_untested") or not need:
            continue
        n = len(m.get("values") or ())
        if n != need:
            out.append(f"{e['id']}: {n} values, {need} declared")
        control = m.get("control")
        if e["declared"].get("control") and control is not None and len(control.get("values") or ()) != need:
            out.append(f"{e['id']} (control): {len(control.get('values') or ())} values, {need} declared")
    return out
