"""Chapter 02's task calibration (calibrate_task.py): its settings fit the policy, bad ones fail before anything runs,
the budget valve skips what would not fit, and a dry run on the CPU writes the JSON the GPU session will read.
CPU only, offline, seeded; about 20 s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "chapters" / "02_grpo"
sys.path.insert(0, str(CHAPTER))

pytest.importorskip("reasoning_gym")

import calibrate_task as C  # noqa: E402
import grpo_rlvr as G  # noqa: E402


def strict_json(path):
    """The file as JSON, refusing NaN and infinities (which json.dumps writes and strict readers reject)."""
    def refuse(c):
        raise ValueError(f"non-finite number {c} in {path}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_every_setting_fits_the_policy_and_its_longest_solution():
    for name, overrides in C.SETTINGS.items():
        P = C.setting_params(overrides)
        cfg = G.chapter_task(P)
        problems = G.make_problems(3000, seed=5, **cfg)
        assert {e["metadata"]["num_digits"] for e in problems} == set(range(cfg["min_digits"], cfg["max_digits"] + 1))
        assert max(e["metadata"]["num_terms"] for e in problems) == cfg["max_terms"]
        # the constructed bounds hold for sampled problems; a completion as long as the longest checked solution fits
        sampled = max(len(G.worked_solution(e, check_prob=1.0)) + 1 for e in problems)
        assert sampled <= C.longest_solution(cfg) <= P["max_completion_length"], name
        assert max(len(G.prompt_of(e)) for e in problems) <= C.longest_prompt(cfg)
        assert C.longest_prompt(cfg) + P["max_completion_length"] <= C.positions() == 256
    # the setting declared from the calibration (2-4 terms of 2-5 digits) is the default, at max_completion_length 152
    P = C.setting_params({})
    assert G.chapter_task(P) == G.TASKS["chain_sum"] and P["max_completion_length"] == 152
    assert C.SETTINGS["t2-4_d2-5"] == {k: P[k] for k in ("max_terms", "min_digits", "max_digits")}


@pytest.mark.parametrize("bad", [{"max_terms": 6, "max_digits": 5},   # 348 tokens: past the policy's 256 positions
                                 {"min_digits": 4, "max_digits": 3},  # an empty range
                                 {"max_digits": 6}, {"max_terms": 1}, {"min_digits": 0},  # outside claims.yaml's bounds
                                 {"sft_step": 10}, {"task": "gsm8k"}, {"seed": -1}])
def test_bad_settings_fail_before_anything_runs(bad):
    with pytest.raises(ValueError):  # ParameterError is a ValueError
        C.setting_params(bad)


def test_task_config_names_what_is_wrong():
    with pytest.raises(ValueError, match="min_digits <= max_digits"):
        G.task_config(min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="no setting 'digits'"):
        G.make_problems(2, seed=0, digits=3)
    assert G.task_config(max_digits=None) == G.TASKS["chain_sum"]  # None keeps the default
    assert G.describe_task(G.task_config(max_terms=5, min_digits=2, max_digits=4)) == "2-5 terms of 2-4 digits"


def test_command_line_refuses_bad_arguments(tmp_path, capsys):
    out = str(tmp_path / "c.json")
    for argv, said in [(["--parts", "t2-4_d1-5,t9"], "unknown parts"), (["--budget-s", "0"], "budget_s must be positive"),
                       (["--seed", "-1"], "'seed'")]:
        with pytest.raises(SystemExit):
            C.main(["--dry-run", "--out", out, *argv])
        assert said in capsys.readouterr().err
    assert not Path(out).exists()  # nothing ran


def test_estimate_is_the_prior_scaled_by_the_slowest_measured_ratio():
    P = C.setting_params(C.SETTINGS["t2-4_d1-5"])
    prior = C.prior_s(P)
    # 8 s of problems + 65 s of warm-up per 1,200 steps (2,400 declared) + 24 s x 152/128 of evaluation, from the
    # H200 call at 8f8ced7
    assert prior == pytest.approx(8 + 65 * 2400 / 1200 + 24 * 152 / 128)
    assert C.estimate_s(P, [], cuda=True) == prior and C.estimate_s(P, [], cuda=False) == 0.0
    assert C.estimate_s(P, [(100.0, 50.0), (100.0, 80.0)], cuda=True) == pytest.approx(0.8 * prior)


def test_dry_run_writes_the_json_and_the_budget_skips_what_would_not_fit(tmp_path):
    out = tmp_path / "cal.json"
    # the second setting asks for a billion warm-up steps: once the first has been timed, its estimate is far past the
    # hour of budget, so it is recorded as skipped without running
    settings = {"t2-4_d1-5": C.SETTINGS["t2-4_d1-5"], "huge": {**C.SETTINGS["t2-4_d1-3"], "sft_steps": 10**9}}
    res = C.calibrate(settings, dry_run=True, out=out, budget_s=3600, progress=False)
    got = strict_json(out)
    assert got["parts"].keys() == {"t2-4_d1-5", "huge"} and got["profile"] == "dry-run"
    assert got["settings"]["t2-4_d1-5"] == {"max_terms": 4, "min_digits": 1, "max_digits": 5,
                                            "max_completion_length": 152, "model_dim": 128,
                                            "model_layers": 2, "sft_steps": 2400}  # as the GPU runs it
    assert got["parameters"]["max_digits"] == 5 and got["window"] == {"pass1": [0.3, 0.6], "pass_kmax": [0.6, 0.8]}
    r = got["parts"]["t2-4_d1-5"]
    assert "error" not in r and "skipped" not in r, r
    n, kmax = C.DRY["eval_problems"], C.DRY["eval_samples"]
    s = r["start"]
    assert s["kmax"] == kmax and set(s["pass_k"]) == {"1", "2", "4"} and 0 <= s["pass1"] <= s["pass_kmax"] <= 1
    assert sum(c["problems"] for c in s["by_digits"].values()) == n == sum(c["problems"] for c in s["by_terms"].values())
    assert {int(d) for d in s["by_digits"]} <= {1, 2, 3, 4, 5}
    assert all(len(v) == n for v in r["per_problem"].values())
    assert r["warm_up"]["steps"] == C.DRY["sft_steps"] and len(r["warm_up"]["curve"]) == 3  # probes at 0, 2, 4
    assert r["task"]["max_digits"] == 5 and r["parameters"]["max_completion_length"] == C.DRY["max_completion_length"]
    assert isinstance(r["in_window"], bool) and r["graded_run_estimate_s"] is None  # no GPU: no estimate
    assert r["estimate_s"] == 0.0 and r["part_wall_s"] > 0  # the first setting on a CPU: nothing to estimate from
    huge = got["parts"]["huge"]
    assert huge["skipped"].startswith("time budget: would not fit") and huge["estimate_s"] > 3600
    assert "huge" in C.table(res) and "t2-4_d1-5" in C.table(res)
    # a budget already spent: every setting is skipped, and the JSON still says which and why
    res = C.calibrate({"t2-4_d1-3": {}}, dry_run=True, out=out, budget_s=1e-9, progress=False)
    assert strict_json(out)["parts"]["t2-4_d1-3"]["skipped"].startswith("time budget")


# --- calibrate_lr.py: the arms' learning rate, chosen on the validation problems ---------------------------------

import calibrate_lr as L  # noqa: E402


def test_lr_rule_takes_the_best_rate_and_breaks_ties_toward_the_smaller():
    assert L.choose({3e-6: 60.0, 1e-5: 64.5, 3e-5: 65.0, 1e-4: 58.0}) == 1e-5  # 64.5 is within 1 point of 65
    assert L.choose({3e-6: 60.0, 1e-5: 63.9, 3e-5: 65.0}) == 3e-5
    assert L.choose({1e-4: 50.0}) == 1e-4 and L.choose({}) is None
    assert list(L.RATES) == sorted(L.RATES) and 1e-4 in L.RATES  # the d347304 run's rate is among them


def test_lr_dry_run_judges_on_validation_problems_only(tmp_path):
    out = tmp_path / "lr.json"
    res = L.calibrate([1e-4], dry_run=True, out=out, budget_s=3600, progress=False)
    got = strict_json(out)
    assert got["parts"].keys() == {"start", "lr=0.0001"} and got["profile"] == "dry-run"
    r = got["parts"]["lr=0.0001"]
    assert {"val_pass1", "gain", "seconds"} <= r["grpo"].keys() and {"val_pass1", "gain"} <= r["sft"].keys()
    assert got["parts"]["start"]["val_problems"] == 128  # problem_sets' val, disjoint from training and held-out
    assert res["chosen"] == {"grpo_lr": 1e-4, "sft_arm_lr": 1e-4}
    with pytest.raises(ValueError, match="rates"):
        L.calibrate([0.0], dry_run=True)


def test_lr_calibration_takes_a_batch_size(tmp_path):
    res = L.calibrate([1e-4], dry_run=True, out=tmp_path / "lr.json", budget_s=3600, progress=False, prompts_per_step=8)
    assert res["parameters"]["prompts_per_step"] == 8 != L.C.dry_params(L.DRY)["prompts_per_step"]
    with pytest.raises(ValueError, match="prompts_per_step"):
        L.calibrate([1e-4], dry_run=True, prompts_per_step=0)


def test_model_size_settings_record_and_describe_the_policy_they_train():
    P = C.setting_params(C.SETTINGS["t2-4_d2-5_w128_l2"])
    assert (P["model_dim"], P["model_layers"]) == (128, 2) and G.chapter_task(P) == G.TASKS["chain_sum"]
    res = C.calibrate({"t2-4_d2-5_w128_l2": C.SETTINGS["t2-4_d2-5_w128_l2"]}, dry_run=True, budget_s=3600,
                      progress=False)
    assert res["settings"]["t2-4_d2-5_w128_l2"]["model_dim"] == 128
    assert res["parts"]["t2-4_d2-5_w128_l2"]["describe"].endswith(", d=128 x 2")


def test_noise_scale_recovers_a_known_signal_and_noise():
    torch = pytest.importorskip("torch")
    import noise_scale as N

    gen = torch.Generator().manual_seed(0)
    P, n, sigma = 2000, 400, 0.5
    G_true = torch.zeros(P, dtype=torch.float64)
    G_true[:10] = 1.0  # |G|² = 10
    g = G_true + sigma * torch.randn(n, P, generator=gen, dtype=torch.float64)  # tr Σ = P sigma² = 500
    r = N.noise_scale(g)
    # sd of the estimates: tr Σ ~0.3%, |G|² ~1.6% (its cross term with the noise); without the - tr Σ / n
    # correction |G|² would come out 12.5% high (11.25)
    assert r["resolved"] and abs(r["trace_cov"] / 500 - 1) < 0.02 and abs(r["signal_sq"] / 10 - 1) < 0.06
    assert 46 < r["B"] < 54  # 500 / 10 = 50 units
    pure = N.noise_scale(sigma * torch.randn(n, P, generator=gen, dtype=torch.float64))  # no signal at all
    # |ḡ|² of pure noise is (tr Σ / n) χ²_P / P: 1.25 +- 0.04 here, and the estimator takes that 1.25 away
    assert abs(pure["signal_sq"]) < 0.2 and pure["B_lower"] > 0.9 * n
    with pytest.raises(ValueError, match="unit_grads"):
        N.noise_scale(torch.zeros(1, 5))


def test_noise_scale_moments_stream_what_the_batch_formula_computes():
    torch = pytest.importorskip("torch")
    import noise_scale as N

    gen = torch.Generator().manual_seed(1)
    g = 0.3 + torch.randn(9, 50, generator=gen, dtype=torch.float64)
    m = N.SplitMoments()
    for row in g:
        m.add(row.float())  # float32 in, as the gradients come; float64 inside
    r = m.report()
    mean = g.mean(0)
    trace_cov = 9 / 8 * (float((g * g).sum(1).mean()) - float(mean @ mean))
    assert r["units"] == 9 and abs(r["trace_cov"] - trace_cov) < 1e-5 * trace_cov
    assert abs(r["signal_sq"] - (float(mean @ mean) - trace_cov / 9)) < 1e-5
    even, odd = r["halves"]  # units 0, 2, 4, 6, 8 and 1, 3, 5, 7
    assert (even["units"], odd["units"]) == (5, 4)
    assert abs(odd["mean_sq"] - float(g[1::2].mean(0) @ g[1::2].mean(0))) < 1e-5
    with pytest.raises(ValueError, match="at least 2"):
        N.noise_scale_of(N.Moments())
    assert N.describe_B({"resolved": True, "B": 49.6, "B_lower": 40.0, "units": 9}) == "50"
    assert N.describe_B({"resolved": False, "B": None, "B_lower": 102.4, "units": 96}).startswith("> 102 (signal not")
    assert "mean of 4 unit gradients is zero" in N.describe_B({"resolved": False, "B": None, "B_lower": None, "units": 4})
    bad = N.Moments()
    for row in (torch.ones(3), torch.tensor([1.0, float("nan"), 0.0])):
        bad.add(row)
    with pytest.raises(ValueError, match="not finite"):
        N.noise_scale_of(bad)


def test_noise_scale_generation_chunks_cover_every_prompt_once():
    import noise_scale as N

    assert N.chunk_sizes(512) == [32, 64, 128, 256, 32]  # the gpu default: each size timed, 32 twice
    assert N.chunk_sizes(100) == [32, 64, 4] and N.chunk_sizes(4) == [4]
    assert N.chunk_sizes(7, sizes=(2,)) == [2, 2, 2, 1]


def test_noise_scale_dry_run_measures_both_arms(tmp_path):
    import noise_scale as N

    out = tmp_path / "noise.json"
    res = N.measure(dry_run=True, out=out, groups=4)
    got = strict_json(out)  # an unresolved B is null, never NaN
    assert got["grpo"]["B"] == res["grpo"]["B"]
    assert got["groups"] == 4 and got["profile"] == "dry-run"
    for arm in ("grpo", "sft"):
        assert got[arm]["units"] == 4 and got[arm]["trace_cov"] >= 0
        assert [h["units"] for h in got[arm]["halves"]] == [2, 2]
    assert [(c["prompts"], c["completions"]) for c in got["generation_calls"]] == [(4, 4 * got["group_size"])]
    assert -1.0 <= got["cosine_grpo_sft"] <= 1.0
    with pytest.raises(ValueError, match="groups"):
        N.measure(dry_run=True, groups=1)
    with pytest.raises(ValueError, match="only .* RL prompts"):  # never fewer groups than asked for, silently
        N.measure(dry_run=True, groups=10_000)


def test_noise_scale_dry_run_generates_in_chunks(tmp_path, monkeypatch):
    """On the GPU the 512 groups are generated 32 to 256 prompts at a time, fewer than the trainer's batch: the
    same path on the CPU, with chunks of 2 and 4 prompts."""
    import noise_scale as N

    monkeypatch.setattr(N, "CHUNKS", (2, 4))
    res = N.measure(dry_run=True, out=tmp_path / "noise.json", groups=8)
    assert [c["prompts"] for c in res["generation_calls"]] == [2, 4, 2]
    assert res["grpo"]["units"] == 8 and res["sft"]["units"] == 8
