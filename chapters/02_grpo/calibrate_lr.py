"""Chapter 02's learning-rate calibration: at which rate does each arm improve on its start, judged on validation problems?

Why. In the H200 run at d347304 (results/gpu/02_grpo/nvidia-h200.json) both arms lost pass@1 against their start:
GRPO -6.5 points [-7.4, -5.6] over three seeds, continued SFT about -2.8. Both arms restart AdamW at a constant rate
(``grpo_lr`` = ``sft_arm_lr`` = 1e-4) after a warm-up whose cosine schedule ended at zero, so the restart itself may be
what costs pass@1. A claim whose control fails (GRPO did not raise pass@1) is Unverified, so before the next graded run
each arm's rate is chosen here, on problems the grade never sees.

The rule, declared before this script's first GPU call:
  - the rates: ``RATES`` (3e-6, 1e-5, 3e-5, 1e-4), each with seed 0, from one warm-up (the notebook's gpu profile and
    its declared task), each arm as the notebook runs it (``grpo_steps`` steps of ``prompts_per_step`` x
    ``group_size``; continued SFT as many steps and sequences, constant rate);
  - judged on the validation problems only (``problem_sets``' ``val``: 128 problems, none of them in training or in the
    held-out set that the claims are graded on), ``VAL_SAMPLES`` samples each at the evaluation temperature;
  - for each arm, the rate with the highest validation pass@1; a rate within ``TIE_POINTS`` of the best counts as a tie,
    and ties go to the smaller rate (the smaller move from a converged start).
The held-out problems are never evaluated here, so choosing rates by these numbers cannot tilt a graded result. The
rates chosen are then declared in claims.yaml (``grpo_lr``, ``sft_arm_lr``) with this file's JSON committed beside the
task calibration's, in ``calibration/``.

Usage (one H200 call, about 6 minutes with the install, timeout_s 600; carry=[".whl"] with chapter 02's wheels from
``bash scripts/ch02-wheels.sh``; HASH is ``git rev-parse HEAD`` of the tree sent):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && REPRO_COMMIT=HASH \\
      HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src python3 chapters/02_grpo/calibrate_lr.py \\
      --out $OUT/ch02_lr.json

    PYTHONPATH=$PWD/src python3 chapters/02_grpo/calibrate_lr.py --dry-run --out /tmp/ch02_lr.json  # CPU, ~30 s

Time on the H200 (from the d347304 run): problems and warm-up ~75 s; per rate, GRPO ~60 s, continued SFT ~4 s and two
validation evaluations of 128 x 32 samples ~5 s: ~70 s. Four rates and the start: ~360 s. A rate starts only if its
estimate (the slowest rate so far, or ``PRIOR_RATE_S`` before the first) still fits ``--budget-s``; the rates run from
the smallest up, so a budget cut drops the rate already measured in the d347304 run.

Output (JSON, rewritten after every part): ``parameters`` (the gpu profile's), ``parts["start"]`` (warm-up curve, the
start's validation pass@1), ``parts["lr=<rate>"]`` (each arm's validation pass@1, its gain over the start, GRPO's mean
training reward and zero-signal share, seconds), and ``chosen`` ({"grpo_lr": rate, "sft_arm_lr": rate} by the rule, or
None for an arm with no rate measured). A dry run uses the smoke profile made smaller still: numbers that mean nothing.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_task as C  # noqa: E402  (puts src/ on the path and silences reasoning-gym's import warnings)
import grpo_rlvr as G  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from repro_utils.bench import Parts, script_args, script_fingerprint  # noqa: E402
from repro_utils.run import seed_everything  # noqa: E402

ROOT = C.ROOT
RATES = (3e-6, 1e-5, 3e-5, 1e-4)  # the arms' constant AdamW rate; 1e-4 is the d347304 run's
VAL_SAMPLES = 32  # samples per validation problem (the dry run: 4)
TIE_POINTS = 1.0  # a rate within this many pass@1 points of the best ties with it; ties go to the smaller rate
BUDGET_S = 480.0
PRIOR_RATE_S = 75.0  # one rate on the H200 before any was timed (d347304: GRPO 58-78 s, SFT 4 s, evaluations ~5 s)
DRY = dict(C.DRY, grpo_steps=2)


def part_name(rate: float) -> str:
    return f"lr={rate:g}"


def choose(rates: dict[float, float], tie_points: float = TIE_POINTS) -> float | None:
    """The rule: the smallest rate whose validation pass@1 (in points) is within ``tie_points`` of the best; None if
    no rate was measured."""
    if not rates:
        return None
    best = max(rates.values())
    return min(r for r, v in rates.items() if v >= best - tie_points)


def start_part(P: dict, *, device: torch.device, seed: int, val_samples: int, state: dict) -> dict:
    """Problems, the scratch policy and its whole warm-up (as the notebook runs them), saved for the arms; the
    start's pass@1 on the validation problems."""
    seed_everything(seed)
    sets = G.problem_sets(P, seed)
    tok = G.char_tokenizer()
    model = G.tiny_policy(tok, P["model_dim"], P["model_layers"], seed=seed).to(device)
    EVAL = G.eval_settings(P)
    w = G.warm_up(model, tok, sets["sft_pool"], sets["val"], P, device=device, seed=seed, eval_kw=EVAL)
    path = tempfile.mkdtemp(prefix="grpo-lr-start-")
    model.save_pretrained(path)
    ev = G.evaluate(model, tok, sets["val"], val_samples, **EVAL, seed=seed)
    state.update(path=path, cls=type(model), sets=sets, tok=tok, EVAL=EVAL, start_pass1=100 * ev.pass1)
    return {"task": G.describe_task(G.chapter_task(P)), "warm_up": {"steps": len(w.losses), "seconds": w.seconds,
                                                                     "curve": [list(c) for c in w.curve]},
            "val_problems": len(sets["val"]), "val_samples": val_samples, "start_val_pass1": 100 * ev.pass1}


def rate_part(P: dict, rate: float, *, device: torch.device, seed: int, val_samples: int, state: dict) -> dict:
    """Both arms at ``rate`` from the saved start, each judged on the validation problems."""
    cuda = device.type == "cuda"
    sets, tok, EVAL = state["sets"], state["tok"], state["EVAL"]
    n_rows = P["grpo_steps"] * P["prompts_per_step"]
    rows = [{"prompt": G.prompt_of(e), "entry": json.dumps(e)} for e in sets["rl"][:n_rows]]
    log: list = []
    trainer = G.grpo_trainer(state["path"], tok, rows, G.make_reward_fn(log), loss_type="grpo", steps=P["grpo_steps"],
                             group_size=P["group_size"], prompts_per_step=P["prompts_per_step"], lr=rate,
                             beta=P["beta"], max_completion_length=P["max_completion_length"], seed=seed,
                             output_dir=tempfile.mkdtemp(prefix="grpo-lr-"), cuda=cuda)
    t0 = time.perf_counter()
    trainer.train()
    t_grpo = time.perf_counter() - t0
    rl = G.evaluate(trainer.model, tok, sets["val"], val_samples, **EVAL, seed=seed)
    history = trainer.state.log_history
    del trainer
    sft_model = state["cls"].from_pretrained(state["path"]).to(device)
    t0 = time.perf_counter()
    G.sft(sft_model, tok, sets["rl"][:n_rows], steps=P["grpo_steps"], batch_size=P["prompts_per_step"] * P["group_size"],
          lr=rate, seed=seed, device=device, schedule="constant", filler_prob=P["filler_prob"])
    t_sft = time.perf_counter() - t0
    sft = G.evaluate(sft_model, tok, sets["val"], val_samples, **EVAL, seed=seed)
    del sft_model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    rewards = [h["reward"] for h in history if "reward" in h]
    zero = [h["frac_reward_zero_std"] for h in history if "frac_reward_zero_std" in h]
    s0 = state["start_pass1"]
    return {"rate": rate,
            "grpo": {"val_pass1": 100 * rl.pass1, "gain": 100 * rl.pass1 - s0, "seconds": t_grpo,
                     "mean_reward": float(np.mean(rewards)) if rewards else None,
                     "zero_signal_share": float(np.mean(zero)) if zero else None},
            "sft": {"val_pass1": 100 * sft.pass1, "gain": 100 * sft.pass1 - s0, "seconds": t_sft}}


def calibrate(rates=RATES, *, dry_run: bool, out=None, seed: int = 0, budget_s: float = BUDGET_S,
              progress: bool = True, prompts_per_step: int | None = None) -> dict:
    """The start, then every rate from the smallest up (each only if it fits the budget), then the rule's choice.
    ``prompts_per_step`` (default: the profile's) sets both arms' batch: GRPO's prompts a step, and continued SFT's
    sequences a step as that times group_size."""
    rates = sorted(set(rates))
    if not rates or min(rates) <= 0:
        raise ValueError(f"rates must be positive, not {rates}")
    device = C.calibration_device(dry_run, budget_s)
    cuda = device.type == "cuda"
    batch = {} if prompts_per_step is None else {"prompts_per_step": prompts_per_step}
    P = C.dry_params({**DRY, **batch}, seed=seed) if dry_run else C.setting_params(batch, seed=seed)
    val_samples = 4 if dry_run else VAL_SAMPLES
    res = {"chapter": "02_grpo", "script": "calibrate_lr.py", "profile": "dry-run" if dry_run else "gpu", "seed": seed,
           "budget_s": budget_s, "rule": {"rates": rates, "val_samples": val_samples, "tie_points": TIE_POINTS},
           "parameters": P,
           "fingerprint": {**script_fingerprint(device, ROOT, packages=("transformers", "trl")),
                           "reasoning_gym": importlib.metadata.version("reasoning-gym")},
           "parts": {}, "chosen": None}
    names = ["start"] + [part_name(r) for r in rates]
    part = Parts(res, names, out=out, budget_s=budget_s, desc="ch02 learning rates", progress=progress)
    part.setup_done()
    state: dict = {}
    part("start", lambda: start_part(P, device=device, seed=seed, val_samples=val_samples, state=state))
    done: list[float] = []
    for rate in rates:
        name = part_name(rate)
        if "path" not in state:  # the start failed or was skipped: nothing to train from
            res["parts"][name] = {"skipped": "no start", "part_wall_s": 0.0}
            part.bar.update(1)
            continue
        need = max(done, default=PRIOR_RATE_S if cuda else 0.0)
        part(name, lambda rate=rate: rate_part(P, rate, device=device, seed=seed, val_samples=val_samples,
                                               state=state), need_s=need)
        r = res["parts"][name]
        if "grpo" in r:
            done.append(r["part_wall_s"])
        if progress:
            tqdm.write(row(name, r))
    measured = {r["rate"]: r for r in res["parts"].values() if "grpo" in r}
    res["chosen"] = {"grpo_lr": choose({k: v["grpo"]["val_pass1"] for k, v in measured.items()}),
                     "sft_arm_lr": choose({k: v["sft"]["val_pass1"] for k, v in measured.items()})}
    part.close()
    return res


def row(name: str, r: dict) -> str:
    if "grpo" not in r:
        return f"{name:10s}  {r.get('skipped') or r.get('error') or 'not run'}"
    g, s = r["grpo"], r["sft"]
    return (f"{name:10s}  GRPO val pass@1 {g['val_pass1']:5.1f} ({g['gain']:+5.1f})  continued SFT "
            f"{s['val_pass1']:5.1f} ({s['gain']:+5.1f})  {r['part_wall_s']:4.0f} s")


def main(argv=None):
    def extra(ap):
        ap.add_argument("--prompts-per-step", type=int, default=None,
                        help="both arms' batch in prompts a step (default: the gpu profile's prompts_per_step)")

    args, names = script_args(__doc__, [part_name(r) for r in RATES], budget_s=BUDGET_S, reps_help=None, extra=extra,
                              argv=argv)
    rates = [r for r in RATES if part_name(r) in names]
    try:
        res = calibrate(rates, dry_run=args.dry_run, out=args.out, seed=args.seed, budget_s=args.budget_s,
                        prompts_per_step=args.prompts_per_step)
    except (ValueError, RuntimeError) as e:
        print(f"calibrate_lr.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    start = res["parts"].get("start", {})
    if "start_val_pass1" in start:
        print(f"start: validation pass@1 {start['start_val_pass1']:.1f} ({start['val_problems']} problems x "
              f"{start['val_samples']} samples)")
    print(f"chosen by the rule: {res['chosen']}")
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")
    errors = {n: r["error"] for n, r in res["parts"].items() if "error" in r}
    if errors:
        print(f"calibrate_lr.py: parts failed: {errors}", file=sys.stderr)
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
