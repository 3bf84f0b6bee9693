"""Chapter 02 (GRPO): the reward wiring, the GRPO math against hand-computed examples and against TRL, pass@k, and
parameter validation. CPU only, offline, seeded."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "chapters" / "02_grpo"
sys.path.insert(0, str(CHAPTER))

import grpo_rlvr as G  # noqa: E402

from repro_utils.claims import load_chapter  # noqa: E402
from repro_utils.profiles import ParameterError, resolve  # noqa: E402

pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def problems():
    return G.make_problems(40, seed=7)


# --- the reward: reasoning-gym's own scorer -------------------------------------------------------------------

def test_correct_answer_scores_one_wrong_or_malformed_zero(problems):
    e = problems[0]
    right, wrong = e["answer"], str(int(e["answer"]) + 1)
    assert G.score(f"<answer>{right}</answer>", e) == 1.0
    assert G.score(G.worked_solution(e), e) == 1.0
    assert G.score(f"<answer>{wrong}</answer>", e) == 0.0
    assert G.score(right, e) == 0.0                      # no tags: reasoning-gym extracts nothing
    assert G.score("<answer></answer>", e) == 0.0
    assert G.score(f"<answer>{right}", e) == 0.0         # unclosed tag


def test_every_worked_solution_is_correct_by_the_verifier(problems):
    # the supervised targets must be right, or the warm-up teaches errors; checks must not change that
    assert all(G.score(G.worked_solution(e), e) == 1.0 for e in problems)
    assert all(G.score(G.worked_solution(e, check_prob=1.0), e) == 1.0 for e in problems)


def test_checks_are_optional_lines_that_undo_the_step():
    e = {"question": "q", "answer": "-10", "metadata": {"expression": "12 + 45 - 67", "source_dataset": "chain_sum"}}
    assert G.worked_solution(e) == "12+45=57\n57-67=-10\n<answer>-10</answer>"
    full = G.worked_solution(e, check_prob=1.0)
    assert full == "12+45=57; 57-45=12\n57-67=-10; -10+67=57\n<answer>-10</answer>"
    assert G.count_checks(full) == 2 and G.count_checks(G.worked_solution(e)) == 0
    assert G.count_checks("1+2=3\n<answer>3;</answer>") == 0          # only the lines before the answer count
    # about half the lines are checked in the warm-up data, and the choice is seeded
    import random
    rng = random.Random(0)
    n = sum(G.count_checks(G.worked_solution(e, G.CHECK_PROB, rng)) for _ in range(500))
    assert 400 < n < 600
    assert G.worked_solution(e, 0.5, random.Random(3)) == G.worked_solution(e, 0.5, random.Random(3))
    assert G.reference_length(e) == len(G.worked_solution(e)) + 1   # lengths are measured against the terse one


def test_longest_checked_solution_fits_the_gpu_completion_length():
    # a completion cut at max_completion_length has no answer and scores 0: the longest solution the warm-up teaches
    # (every line checked, plus eos) must fit, or the length of the checked style would be punished by truncation
    gpu = resolve(load_chapter(CHAPTER).parameters, {"profile": "gpu"}, cuda=True)
    longest = max(len(G.worked_solution(e, check_prob=1.0)) + 1 for e in G.make_problems(20_000, seed=11))
    assert longest <= gpu["max_completion_length"]
    # the bound by construction: a 3-digit first term, three steps of -999
    worst = {"question": "q", "answer": "-2897",
             "metadata": {"expression": "100 - 999 - 999 - 999", "source_dataset": "chain_sum"}}
    assert len(G.worked_solution(worst, check_prob=1.0)) + 1 <= gpu["max_completion_length"]


def test_reward_function_has_trl_signature_and_logs_lengths(problems):
    log: list = []
    fn = G.make_reward_fn(log)
    e = problems[1]
    completions = [f"<answer>{e['answer']}</answer>", "<answer>x</answer>", f"{e['answer']}"]
    out = fn(prompts=[G.prompt_of(e)] * 3, completions=completions, completion_ids=[[1] * 5, [1] * 7, [1] * 2],
             entry=[json.dumps(e)] * 3, trainer_state=None)
    assert out == [1.0, 0.0, 0.0]
    ref = len(G.worked_solution(e)) + 1
    assert log == [{"step": 0, "lengths": [5, 7, 2], "ref_lengths": [ref] * 3, "checks": [0, 0, 0],
                    "fillers": [0, 0, 0], "rewards": [1.0, 0.0, 0.0]}]
    rel = G.lengths_by_outcome(log)
    assert rel["correct_rel"] == [5 / ref] and rel["incorrect_rel"] == [pytest.approx(4.5 / ref)]
    assert rel["checks_correct"] == [0.0] and rel["checks_incorrect"] == [0.0]
    assert rel["fillers_correct"] == [0.0] and rel["fillers_incorrect"] == [0.0]
    chat = fn(completions=[[{"role": "assistant", "content": completions[0]}]], completion_ids=[[1]],
              entry=[json.dumps(e)])
    assert chat == [1.0]


def test_held_out_problems_exclude_seen_questions(problems):
    seen = {e["question"] for e in problems}
    test = G.make_problems(30, seed=7, exclude=seen)    # the same seed would repeat every question
    assert len(test) == 30 and not seen & {e["question"] for e in test}


def test_problem_sets_follow_the_task_parameters_and_stay_disjoint():
    # the notebook's problem sets, from the chapter's parameters: one generator setting for all four, none overlapping
    P = resolve(load_chapter(CHAPTER).parameters, {"profile": "smoke", "max_terms": 5, "min_digits": 2,
                                                   "max_digits": 4}, cuda=False)
    sets = G.problem_sets(P, seed=0)
    assert {k: len(v) for k, v in sets.items()} == {"rl": 8, "sft_pool": 5120, "test": 8, "val": 128}
    meta = [e["metadata"] for v in sets.values() for e in v]
    assert {m["num_digits"] for m in meta} == {2, 3, 4} and {m["num_terms"] for m in meta} == {2, 3, 4, 5}
    q = {k: {e["question"] for e in v} for k, v in sets.items()}
    assert not (q["test"] & (q["rl"] | q["sft_pool"])) and not (q["val"] & (q["rl"] | q["sft_pool"] | q["test"]))
    # the declared defaults give the chapter's setting as before
    P = resolve(load_chapter(CHAPTER).parameters, {"profile": "smoke"}, cuda=False)
    assert G.chapter_task(P) == G.TASKS["chain_sum"]
    assert G.describe_task(G.chapter_task(P)) == "2-4 terms of 2-5 digits"


def test_char_tokenizer_round_trips_a_solution(problems):
    tok = G.char_tokenizer()
    text = G.prompt_of(problems[2]) + G.worked_solution(problems[2])
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


# --- the GRPO math against hand computation ---------------------------------------------------------------------

def test_group_advantage_matches_hand_computed_example():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = G.group_advantages(r, 4, "group")
    # group 1: mean 1/2, sample std sqrt(1/3); group 2: mean 1/4, sample std 1/2; group 3: std 0 -> all zero.
    # TRL adds 1e-4 to the std; exact to float32 rounding (1e-6).
    s1, s2 = math.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    want = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0.75 / s2, -0.25 / s2, -0.25 / s2, -0.25 / s2, 0, 0, 0, 0]
    assert a.tolist() == pytest.approx(want, abs=1e-6)
    # Dr. GRPO: no std, just the centred reward
    assert G.group_advantages(r, 4, "none").tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], abs=1e-7)
    with pytest.raises(ValueError):
        G.group_advantages(r, 4, "batch")


def test_group_advantage_matches_trl_formula():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (8 * 6,), generator=g).float()
    grouped = r.view(-1, 6)
    trl = ((grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)).reshape(-1)
    assert torch.allclose(G.group_advantages(r, 6, "group"), trl, atol=1e-6)  # same float32 ops: rounding only


def test_grpo_loss_hand_examples():
    # two completions of lengths 3 and 1 (T = 3), on-policy (ratio 1), advantages +1 and -1, no KL
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    # grpo: mean over completions of (sum_t -A)/|o| = mean(-1, +1) = 0
    assert G.grpo_loss(logp, logp, adv, mask, loss_type="grpo").item() == pytest.approx(0.0, abs=1e-7)
    # dr_grpo: (3 x (-1) + 1 x (+1)) / (2 completions x max length 4) = -0.25: the long completion weighs more
    assert G.grpo_loss(logp, logp, adv, mask, loss_type="dr_grpo", max_completion_length=4).item() == pytest.approx(-0.25)
    # clipping: ratio 1.5 with A = +1 earns only 1 + eps = 1.2; ratio 0.5 with A = -1 is clipped at 0.8
    one = torch.ones(1, 1)
    up = G.grpo_loss(torch.log(1.5 * one), torch.zeros(1, 1), torch.tensor([1.0]), one, epsilon=0.2)
    down = G.grpo_loss(torch.log(0.5 * one), torch.zeros(1, 1), torch.tensor([-1.0]), one, epsilon=0.2)
    assert up.item() == pytest.approx(-1.2) and down.item() == pytest.approx(0.8)
    # KL (k3): pi_ref/pi - log(pi_ref/pi) - 1 with pi_ref/pi = 1/2 -> 0.5 + log 2 - 1
    assert G.k3_kl(torch.zeros(1), torch.log(torch.tensor([0.5]))).item() == pytest.approx(0.5 + math.log(2) - 1)
    kl_only = G.grpo_loss(logp, logp, torch.zeros(2), mask, ref_logp=logp + math.log(0.5), beta=0.1)
    assert kl_only.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1), rel=1e-6)


def test_pass_at_k_matches_the_binomial_formula():
    assert G.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert G.pass_at_k(4, 1, 2) == pytest.approx(0.5)      # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert G.pass_at_k(4, 0, 4) == 0.0
    assert G.pass_at_k(4, 2, 3) == 1.0                     # any 3 of 4 include a correct one
    for n, c, k in [(256, 3, 1), (256, 3, 64), (256, 40, 16), (100, 99, 2)]:
        assert G.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9)


def test_zero_signal_share_hand_example():
    # n = 4 samples per problem, groups of G = 2: a problem with 0 or 4 right always gives an all-equal group;
    # with 2 right, 2 of the C(4,2) = 6 pairs are all-equal (both right or both wrong)
    assert G.zero_signal_share([0, 2, 4], 4, 2) == pytest.approx((1 + 1 + 2 / 6) / 3)
    # the hypergeometric form, and with many samples close to the binomial p^G + (1-p)^G
    assert G.zero_signal_share([200], 256, 4) == pytest.approx((math.comb(200, 4) + math.comb(56, 4)) / math.comb(256, 4))
    assert G.zero_signal_share([200], 256, 4) == pytest.approx((200 / 256) ** 4 + (56 / 256) ** 4, rel=0.02)
    with pytest.raises(ValueError):
        G.zero_signal_share([1], 4, 8)


def test_useful_share_hand_examples():
    # n = 4, G = 2: with 2 right, 4 of the C(4,2) = 6 pairs are mixed; with 1 right, the 3 pairs holding it
    assert G.useful_share([2], 4, 2) == pytest.approx(4 / 6)
    assert G.useful_share([1], 4, 2) == pytest.approx(3 / 6)
    assert G.useful_share([1], 4, 3) == pytest.approx(3 / 4)            # only {the 3 wrong} is all equal
    assert G.useful_share([2, 1], 4, 2) == pytest.approx((4 / 6 + 3 / 6) / 2)   # averaged over problems
    assert G.useful_share([200], 256, 16) == pytest.approx(1 - G.zero_signal_share([200], 256, 16))


def test_useful_share_matches_enumeration_of_every_group():
    from itertools import combinations

    n = 7
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for g in range(1, n + 1):
            groups = list(combinations(samples, g))
            mixed = sum(0 < sum(grp) < g for grp in groups) / len(groups)
            assert G.useful_share([c], n, g) == pytest.approx(mixed, abs=1e-12), (c, g)


def test_useful_share_edges_and_monotone_in_group_size():
    correct = np.array([0, 1, 3, 4])
    assert G.useful_share(correct, 4, 4) == 0.5                          # G = n: whether the n samples are mixed
    assert G.useful_share(correct, 4, 1) == 0.0                          # one sample is never mixed
    assert G.useful_share([0, 512], 512, 16) == G.useful_share([0, 512], 512, 512) == 0.0   # never or always right
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 513, 64)
    shares = [G.useful_share(counts, 512, g) for g in (1, 2, 4, 16, 64, 256, 512)]
    assert all(a <= b + 1e-12 for a, b in zip(shares, shares[1:])) and shares[-1] > shares[1]
    assert shares[-1] == np.mean((counts > 0) & (counts < 512))
    for bad in (0, 5):                                                   # G outside [1, n]
        with pytest.raises(ValueError):
            G.useful_share([1], 4, bad)
    with pytest.raises(ValueError):
        G.useful_share([5], 4, 2)                                        # more right than samples


def test_sft_stops_when_the_callback_says_so(problems):
    tok = G.char_tokenizer()
    model = G.tiny_policy(tok, d_model=32, n_layers=1, seed=0)
    seen = []
    losses = G.sft(model, tok, problems, steps=10, batch_size=4, lr=1e-3, callback=lambda s: seen.append(s) or s >= 4,
                   every=2)
    assert seen == [2, 4] and len(losses) == 4 and model.training


def test_crossing_and_bootstrap():
    ks = [1, 2, 4]
    before = G.Evaluation(n=4, correct=None, ks=ks, pass_k={1: 0.2, 2: 0.5, 4: 0.9})
    after = G.Evaluation(n=4, correct=None, ks=ks, pass_k={1: 0.6, 2: 0.7, 4: 0.85})
    assert G.crossing_k(before, after) == 4 and G.crossing_k(after, before) == 1
    lo, hi = G.bootstrap_ci([1.0] * 50 + [0.0] * 50, seed=0)
    assert lo < 0.5 < hi and hi - lo < 0.3                 # 95% interval of a proportion 1/2 over 100 problems


# --- our equations against TRL's own computation inside a real (tiny, CPU) step -----------------------------------

@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_check_against_trl_agrees_with_our_math(tmp_path, problems, loss_type):
    tok = G.char_tokenizer()
    model = G.tiny_policy(tok, d_model=32, n_layers=1, seed=0)
    model.save_pretrained(tmp_path / "policy")
    log: list = []

    def parity_reward(completions, completion_ids, trainer_state=None, **kwargs):
        # a reward that varies within groups, so the advantages are not all zero
        rewards = [float(ids[0] % 2) for ids in completion_ids]  # parity of the first token
        log.append({"step": 0, "lengths": [len(ids) for ids in completion_ids], "rewards": rewards})
        return rewards

    rows = [{"prompt": G.prompt_of(e), "entry": json.dumps(e)} for e in problems[:4]]
    torch.manual_seed(0)
    trainer = G.grpo_trainer(str(tmp_path / "policy"), tok, rows, parity_reward, loss_type=loss_type, steps=1,
                             group_size=4, prompts_per_step=2, lr=1e-3, beta=0.04, max_completion_length=12, seed=0,
                             output_dir=str(tmp_path / "out"), cuda=False)
    trainer.train()
    c = G.check_against_trl(trainer, rows[:2], log)
    assert any(c["rewards"]) and not all(c["rewards"])
    # advantages: the same formula in float32 -> rounding only
    assert c["our_advantages"] == pytest.approx(c["trl_advantages"], abs=1e-5)
    # loss: our plain forward pass vs TRL's tiled fused LM head, fp32 on the CPU -> agree to 1e-5
    assert c["our_loss"] == pytest.approx(c["trl_loss"], abs=1e-5)


# --- parameters -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"grpo_steps": 0}, {"group_size": 1}, {"loss_types": ["ppo"]}, {"replicates": 2},
                                 {"max_digits": 0}, {"budget_s": 1.0}, {"filler_prob": 1.0},
                                 {"eval_samples": 100}, {"policy": "gpt2"}, {"task": "countdown"},
                                 {"beta": -0.1}, {"max_completion_length": "64"}, {"learning_rate": 1e-4},
                                 {"sft_target": 1.5}, {"max_terms": 7}, {"min_digits": 0}, {"max_digits": 6}])
def test_bad_parameters_fail_before_anything_runs(bad):
    params = load_chapter(CHAPTER).parameters
    with pytest.raises(ParameterError):
        resolve(params, bad, cuda=False)


@pytest.mark.parametrize("bad", [{"group_probe_samples": 16}, {"group_probe_samples": 8}])
def test_group_probe_must_sample_more_than_a_group(bad):
    params = load_chapter(CHAPTER).parameters
    P = resolve(params, {"profile": "gpu", **bad}, cuda=True)           # each value alone is in bounds
    with pytest.raises(ParameterError, match="group_probe_samples"):
        G.check_probe_params(P)


@pytest.mark.parametrize("bad", [{"group_probe_samples": -1}, {"group_probe_problems": 0}, {"kl_twin": 1},
                                 {"kl_twin": "yes"}, {"group_probe_samples": 8192}])
def test_bad_probe_parameters_fail_before_anything_runs(bad):
    with pytest.raises(ParameterError):
        resolve(load_chapter(CHAPTER).parameters, bad, cuda=False)


def test_pending_claims_run_where_declared():
    ch = load_chapter(CHAPTER)
    prof = {p: resolve(ch.parameters, {"profile": p}, cuda=p != "smoke") for p in ("smoke", "gpu", "full")}
    for P in prof.values():
        G.check_probe_params(P)                                           # every profile's defaults pass
    # smoke exercises both code paths at tiny size; gpu runs the group probe, not the KL twins (no length-bias runs)
    assert prof["smoke"]["kl_twin"] and prof["smoke"]["group_probe_samples"] > prof["smoke"]["group_size"]
    assert prof["smoke"]["length_steps"] > 0 and prof["smoke"]["beta"] > 0 == prof["smoke"]["length_beta"]
    assert not prof["gpu"]["kl_twin"] and prof["gpu"]["group_probe_samples"] == 512  # the probe runs in gpu since 2026-12-05
    # full: the claims' own protocol (512 samples against G = 16; the twin beside each length-bias run)
    full = prof["full"]
    assert full["kl_twin"] and full["length_steps"] > 0 and full["beta"] > 0 == full["length_beta"]
    assert full["group_probe_samples"] == 512 and full["group_size"] == 16 and full["group_probe_problems"] == 256
    assert full["group_probe_problems"] <= full["grpo_steps"] * full["prompts_per_step"]


def test_profiles_resolve_and_notebook_declares_the_parameters():
    from repro_utils.check import notebook_parameters
    from repro_utils.profiles import COMMON

    ch = load_chapter(CHAPTER)
    smoke = resolve(ch.parameters, {"profile": "smoke"}, cuda=False)
    gpu = resolve(ch.parameters, {"profile": "gpu"}, cuda=True)
    assert smoke["policy"] == gpu["policy"] == "scratch" and set(gpu["loss_types"]) == {"grpo", "dr_grpo"}
    assert gpu["eval_samples"] == 256                     # pass@256, as in Yue et al.
    # every profile runs as many seeds as the claims and goals declare: a gpu run with fewer is refused by
    # run.finish(), and the smoke run must exercise the same recording code with the same counts
    declared = {c.replicates for c in ch.claims if c.replicates} | {g.replicates for g in ch.goals if g.replicates}
    for prof in ("smoke", "gpu", "full"):
        assert resolve(ch.parameters, {"profile": prof}, cuda=prof != "smoke")["replicates"] >= max(declared)
    assert smoke["replicates"] == gpu["replicates"] == max(declared)
    # the gpu profile must end inside one 600 s device command (the machine's start is not counted; the wheels' install
    # and the kernel's start take ~30 s, and scripts/gpu-box.sh runs under timeout 585): the notebook's budget
    assert gpu["budget_s"] <= 520
    # the length-bias test as the claim declares it: room to grow, no KL pull, >= 150 steps (full)
    full = resolve(ch.parameters, {"profile": "full"}, cuda=True)
    assert full["length_max_completion"] >= 256 and full["length_beta"] == 0 and full["length_steps"] >= 150
    assert full["filler_prob"] > 0
    assert set(notebook_parameters(ch.source_notebook)) == set(COMMON) | set(ch.parameters)


def test_sampling_leaves_the_model_in_its_mode(problems):
    # TRL files its metrics under "train" only while model.training is True: a probe must not flip it
    tok = G.char_tokenizer()
    model = G.tiny_policy(tok, d_model=32, n_layers=1, seed=0).train()
    comps, n_tokens, _ = G.sample(model, tok, [G.prompt_of(problems[0])], 3, temperature=1.0, max_new_tokens=5)
    assert model.training and len(comps[0]) == 3 and 0 < n_tokens <= 15
    model.eval()
    G.sample(model, tok, [G.prompt_of(problems[0])], 1, temperature=1.0, max_new_tokens=5)
    assert not model.training


# --- issue 17: the binary reward, the length channel, paired intervals, pass@k below the ceiling ------------------

def test_binary_reward_drops_reasoning_gyms_partial_credit(problems):
    e = problems[3]
    padded = f"<answer>{e['answer']}7</answer>"          # the right answer with a digit appended: wrong
    assert 0 < G.score(padded, e) < 1                      # reasoning-gym pays partial credit for it ...
    assert G.binary_reward(padded, e) == 0.0               # ... the reward GRPO trains on does not
    assert G.binary_reward(f"<answer>{e['answer']}</answer>", e) == 1.0
    assert G.binary_reward(G.worked_solution(e, 1.0), e) == 1.0
    log: list = []
    assert G.make_reward_fn(log)(completions=[padded], completion_ids=[[1]], entry=[json.dumps(e)]) == [0.0]


def test_fillers_are_optional_lines_free_of_correctness(problems):
    import random

    e = {"question": "q", "answer": "-10", "metadata": {"expression": "12 + 45 - 67", "source_dataset": "chain_sum"}}
    rng = random.Random(0)
    sols = [G.worked_solution(e, G.CHECK_PROB, rng, filler_prob=0.5) for _ in range(2000)]
    # a filler never changes the verdict, never counts as a check, and carries no digits
    assert all(G.binary_reward(s, e) == 1.0 for s in sols)
    assert not any(ch.isdigit() or ch in ";<>" for ch in G.FILLER)
    assert all(G.count_checks(s) == G.count_checks(s.replace(G.FILLER + "\n", "")) for s in sols)
    # geometric count per line: mean p / (1 - p) = 1 at p = 0.5, two lines -> 2 per solution (+-0.1: 2,000 draws, sd 1.4)
    assert sum(G.count_fillers(s) for s in sols) / len(sols) == pytest.approx(2.0, abs=0.1)
    assert max(G.count_fillers(s) for s in sols) >= 8      # unbounded in principle: the tail reaches far
    assert G.worked_solution(e, 0.5, random.Random(1)) == G.worked_solution(e, 0.5, random.Random(1), 0.0)
    assert G.count_fillers(f"1+2=3\n{G.FILLER}\n{G.FILLER}\n<answer>3</answer>\n{G.FILLER}") == 2  # before the answer
    assert all(G.binary_reward(G.worked_solution(x, 1.0, random.Random(2), 0.7), x) == 1.0 for x in problems)


def test_length_channel_is_logged_by_outcome(problems):
    e = problems[4]
    log: list = []
    right = G.worked_solution(e) .replace("\n<answer>", f"\n{G.FILLER}\n<answer>")
    wrong = f"{G.FILLER}\n{G.FILLER}\n{G.FILLER}\n<answer>{int(e['answer']) + 1}</answer>"
    G.make_reward_fn(log)(completions=[right, wrong], completion_ids=[[1] * len(right), [1] * len(wrong)],
                          entry=[json.dumps(e)] * 2)
    L = G.lengths_by_outcome(log)
    assert L["fillers_correct"] == [1.0] and L["fillers_incorrect"] == [3.0]
    assert L["incorrect"] == [float(len(wrong))]


def test_pass_at_k_below_the_ceiling():
    # one correct sample of n: pass@k = k / n exactly (the chance that the one right sample is among k drawn)
    for k in (1, 2, 64, 128):
        assert G.pass_at_k(256, 1, k) == pytest.approx(k / 256, rel=1e-12)
    assert G.pass_at_k(256, 0, 256) == 0.0 and G.pass_at_k(256, 1, 256) == 1.0
    assert G.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)   # 1 - C(2,2)/C(4,2)
    # over problems, pass@256 with n = 256 is the share of problems solved at least once: 60% here, not a ceiling
    correct = np.array([0] * 40 + [1] * 20 + [50] * 40)
    P = G.pass_k_per_problem(correct, 256, [1, 256])
    assert P[:, 1].mean() == pytest.approx(0.6) and P[:, 0].mean() == pytest.approx((20 + 40 * 50) / 256 / 100)


def test_paired_pass_k_interval():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 33, 200)                           # correct counts of 32 samples, 200 problems
    same = G.paired_pass_k(a, 32, a, 32, [1, 32], seed=0)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())  # a policy against itself: exactly zero, no spread
    b = np.minimum(a + 3, 32)                              # three more right samples on every problem
    d, lo, hi = G.paired_pass_k(b, 32, a, 32, [1], seed=0)[1]
    assert lo > 0 and lo <= d <= hi
    # pairing: the paired interval is far narrower than the spread of either policy's own pass@1 over problems
    own_lo, own_hi = G.bootstrap_ci(a / 32, seed=0)
    assert hi - lo < 0.3 * (own_hi - own_lo)
    # different sample counts per arm (GRPO n = 256, SFT n = 32) are allowed: pass@1 is unbiased at any n
    d2 = G.paired_pass_k(np.full(10, 128), 256, np.full(10, 8), 32, [1], seed=0)[1]
    assert d2 == pytest.approx((0.25, 0.25, 0.25))


def test_crossover_k_with_its_interval():
    ks = [1, 2, 4, 8, 16]
    # RL: sharp on 50 problems (all right), never right on 50; start: right 1 in 16 samples on all 100 problems
    rl = np.array([16] * 50 + [0] * 50)
    start = np.array([1] * 100)
    c = G.crossover_k(start, rl, 16, ks, seed=0)
    # start pass@k = k/16: 0.0625, 0.125, 0.25, 0.5, 1.0 against RL's 0.5 at every k -> it catches up at k = 8
    assert c["k"] == 8 and c["log2_k"] == 3
    assert c["lo"] <= 3 <= c["hi"] and c["hi"] <= 4
    never = G.crossover_k(np.zeros(10, int), np.full(10, 8), 16, ks, seed=0)
    assert never["k"] is None and never["log2_k"] == 5 == never["lo"] == never["hi"]  # 5 = log2(16) + 1: beyond


def test_budget_marks_sections_and_refuses_past_the_end():
    now = [100.0]
    b = G.Budget(50, t0=90.0, clock=lambda: now[0])
    assert b.elapsed() == 10 and b.allows(40) and not b.allows(41)
    now[0] = 125.0
    assert b.mark("first") == 25 and b.sections == {"first": 25}
    now[0] = 141.0
    assert not b.allows() and b.mark("second") == 16


def test_short_replicates_finds_what_finish_would_refuse():
    def entry(cid, values, need, control=None, spec_control=False):
        m = {"setting": "s", "values": values}
        if control is not None:
            m["control"] = {"setting": "c", "values": control}
        d = {"replicates": need, **({"control": {"what": "w"}} if spec_control else {})}
        return {"id": cid, "declared": d, "measured": m}

    ok = {"claims": [entry("a", [1, 2, 3], 3, [1, 1, 1], True), {"id": "u", "declared": {"replicates": 3},
                                                                  "measured": {"why_untested": "budget"}}],
          "goals": [entry("g", [1, 2, 3], 3)]}
    assert G.short_replicates(ok) == []
    bad = {"claims": [entry("a", [1, 2], 3), entry("b", [1, 2, 3], 3, [1], True)], "goals": [entry("g", [1] * 4, 3)]}
    assert G.short_replicates(bad) == ["a: 2 values, 3 declared", "b (control): 1 values, 3 declared",
                                       "g: 4 values, 3 declared"]


def test_continued_sft_arm_keeps_its_learning_rate(problems):
    tok = G.char_tokenizer()
    model = G.tiny_policy(tok, d_model=32, n_layers=1, seed=0)
    losses = G.sft(model, tok, problems, steps=3, batch_size=4, lr=1e-3, schedule="constant", filler_prob=0.3)
    assert len(losses) == 3 and all(np.isfinite(losses))
    with pytest.raises(ValueError):
        G.sft(model, tok, problems, steps=1, batch_size=2, lr=1e-3, schedule="linear")


def _step_grads(problems, micro_batch):
    """The gradient of G.sft's first step (captured where it clips), from a fresh seeded policy."""
    tok = G.char_tokenizer()
    model = G.tiny_policy(tok, d_model=32, n_layers=1, seed=0)
    seen, clip = [], torch.nn.utils.clip_grad_norm_

    def record(params, *a, **k):
        params = list(params)
        seen.append([p.grad.detach().clone() for p in params])
        return clip(params, *a, **k)

    with mock.patch.object(torch.nn.utils, "clip_grad_norm_", record):
        losses = G.sft(model, tok, problems, steps=1, batch_size=8, lr=1e-3, schedule="constant",
                       micro_batch=micro_batch)
    return seen[0], losses[0]


def test_sft_micro_batches_give_the_whole_batch_gradient(problems):
    whole, loss = _step_grads(problems, 0)
    for mb in (3, 8):  # an uneven split (3 + 3 + 2 sequences of different lengths) and one part
        parts, part_loss = _step_grads(problems, mb)
        assert part_loss == pytest.approx(loss, rel=1e-6)
        for a, b in zip(whole, parts):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # the test can fail: an unweighted mean over micro-batches is not the batch's mean-token gradient
    tok = G.char_tokenizer()
    X, M, Y = G.encode_sft(tok, problems[:8])
    counts = (Y[:, 1:] != -100).sum(1)
    assert len(set(counts[:3].tolist() + counts[6:].tolist())) > 1
    with pytest.raises(ValueError, match="micro_batch"):
        G.sft(G.tiny_policy(tok, d_model=32, n_layers=1), tok, problems, steps=1, batch_size=2, lr=1e-3, micro_batch=-1)


def test_continued_sft_arm_uses_the_grpo_arms_adamw(problems):
    """The continued-SFT arm differs from GRPO only in what it learns from: AdamW as TRL sets it for GRPO (betas
    (0.9, 0.999), no weight decay); the warm-up keeps nanoGPT's (0.9, 0.95) and 0.01."""
    from transformers import TrainingArguments

    tok = G.char_tokenizer()
    made = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        made.append(kw)
        return real(params, **kw)

    with mock.patch.object(torch.optim, "AdamW", spy):
        for schedule in ("constant", "cosine"):
            G.sft(G.tiny_policy(tok, d_model=32, n_layers=1), tok, problems, steps=1, batch_size=2, lr=1e-3,
                  schedule=schedule)
    trl_args = TrainingArguments(output_dir="unused", report_to=[])
    assert made[0]["betas"] == (trl_args.adam_beta1, trl_args.adam_beta2) and made[0]["weight_decay"] == 0.0
    assert made[1]["betas"] == (0.9, 0.95) and made[1]["weight_decay"] == 0.01


def test_grpo_micro_batches_accumulate_to_the_whole_step(tmp_path, problems):
    """micro_batch splits a step's completions into gradient-accumulation passes: one generation per optimizer
    step, and the same gradient as the whole batch (TRL divides each pass's loss by the number of passes)."""
    from transformers import TrainerCallback

    tok = G.char_tokenizer()
    G.tiny_policy(tok, d_model=32, n_layers=1, seed=0).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rows = [{"prompt": G.prompt_of(e), "entry": json.dumps(e)} for e in problems[:4]]

    def parity_reward(completions, completion_ids, trainer_state=None, **kwargs):
        calls.append(len(completion_ids))
        return [float(ids[0] % 2) for ids in completion_ids]

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append([p.grad.detach().clone() for p in model.parameters() if p.grad is not None])

    out = {}
    for mb in (0, 4):
        calls, grads = [], []
        torch.manual_seed(0)
        trainer = G.grpo_trainer(str(tmp_path / "policy"), tok, rows, parity_reward, loss_type="grpo", steps=1,
                                 group_size=4, prompts_per_step=2, lr=1e-3, beta=0.04, max_completion_length=12,
                                 seed=0, output_dir=str(tmp_path / f"out{mb}"), cuda=False, micro_batch=mb)
        assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (
            (8, 1) if mb == 0 else (4, 2))
        trainer.add_callback(Grads())
        trainer.train()
        assert calls == [8] and len(grads) == 1  # one generation of all 8 completions, one optimizer step
        out[mb] = grads[0]
    for a, b in zip(out[0], out[4]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="micro_batch"):
        G.grpo_trainer(str(tmp_path / "policy"), tok, rows, parity_reward, loss_type="grpo", steps=1, group_size=4,
                       prompts_per_step=2, lr=1e-3, beta=0.04, max_completion_length=12, seed=0,
                       output_dir=str(tmp_path / "bad"), cuda=False, micro_batch=3)


def test_grpo_trainer_learns_a_learnable_reward(tmp_path, problems):
    """End to end through the chapter's trainer (TRL's GRPOTrainer with the chapter's settings): on a reward the
    policy can learn in a few steps (the parity of the first completion token), the batch's mean reward rises.
    Both published gpu runs saw GRPO lower held-out pass@1; this rules out a sign or plumbing error as the cause
    (the same seeds give the same rewards on the CPU: 0.50 over the first ten steps, 0.78 over the last ten)."""
    tok = G.char_tokenizer()
    G.tiny_policy(tok, d_model=32, n_layers=1, seed=0).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rows = [{"prompt": G.prompt_of(e), "entry": json.dumps(e)} for e in problems[:16]]
    means: list[float] = []

    def parity_reward(completions, completion_ids, trainer_state=None, **kwargs):
        rewards = [float(ids[0] % 2) for ids in completion_ids]
        means.append(sum(rewards) / len(rewards))
        return rewards

    torch.manual_seed(0)
    trainer = G.grpo_trainer(str(tmp_path / "policy"), tok, rows, parity_reward, loss_type="grpo", steps=40,
                             group_size=8, prompts_per_step=4, lr=3e-3, beta=0.04, max_completion_length=4, seed=0,
                             output_dir=str(tmp_path / "out"), cuda=False)
    trainer.train()
    assert len(means) == 40
    first, last = np.mean(means[:10]), np.mean(means[-10:])
    assert last >= first + 0.15, (first, last, means)


def test_each_seed_probes_its_own_draw_of_problems_for_the_redrawn_group_claim():
    """larger-group-more-signal-redrawn (2026-12-06): each seed's probe draws its own problems (seeded by the seed),
    so that the interval over seeds covers the problem draw; the retired id is no longer recorded."""
    import re

    nb = json.loads(load_chapter(CHAPTER).source_notebook.read_text())
    cell = next("".join(c["source"]) for c in nb["cells"]
                if c["cell_type"] == "code" and "useful share, G = n" in "".join(c["source"]))
    assert 'run.record("larger-group-more-signal-redrawn"' in cell and '"larger-group-more-signal"' not in cell
    assert "default_rng(s)" in cell and "probe_draw(s)" in cell and not re.search(r"\bprobe_problems\b", cell)
    # the draw itself, run as the notebook defines it: different seeds, different problems; one seed, one draw
    src = cell[cell.index("def probe_draw"):cell.index("\n\n\n", cell.index("def probe_draw"))]
    g = {"np": np, "trained": list(range(1000)), "n_drawn": 64}
    exec(src, g)
    assert g["probe_draw"](0) == g["probe_draw"](0) and g["probe_draw"](0) != g["probe_draw"](1)
    assert len(set(g["probe_draw"](2))) == 64
    claim = next(c for c in load_chapter(CHAPTER).claims if c.id == "larger-group-more-signal-redrawn")
    assert claim.replicates == 3 and claim.reduced_scale_if == {"at_least": 1.2} and "drawn afresh" in claim.metric
