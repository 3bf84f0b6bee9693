"""Chapter 02: how much of a GRPO step is signal? The gradient noise scale of the GRPO loss at the chapter's start.

Why. In the H200 learning-rate calibration at 0f44d09 (calibration/h200-0f44d09-learning-rates.json) no constant rate
from 3e-6 to 1e-4 let 40 GRPO steps of 64 prompts x 16 completions raise validation pass@1; the larger the rate, the
larger the loss. A CPU diagnostic on a small policy (2 terms of 1-2 digits, start at ~32% pass@1, 8 prompts x 8
completions a step) showed the same thing: GRPO at AdamW 3e-4 took pass@1 to 18% in 30 steps while continued SFT at
the same rate kept it near 29%, although the GRPO gradient pointed the right way (its mean over 6 batches had cosine
+0.28 with the SFT gradient on worked solutions of the same prompts) and the 6 batch gradients were orthogonal to
each other (mean pairwise cosine -0.006): each batch was mostly noise, which Adam turns into full-size steps.

What this measures. McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv:1812.06162, §2 and
Appendix A) define the simple noise scale B = tr(Σ) / |G|², where G is the true gradient and Σ the covariance of a
one-example gradient: the batch size at which a step's noise and its signal are of equal size. Here the "example" is
one prompt's group of completions (GRPO's advantages are computed within a group), so B is in prompts: a step of B
prompts has as much noise as signal, and the chapter's 64 prompts a step are far below it when B is in the thousands.
From n per-group gradients g_i with mean ḡ, unbiasedly (their Appendix A estimates from two batch sizes; here 1 and n):

    tr(Σ) ≈ n/(n-1) (mean |g_i|² - |ḡ|²),      |G|² ≈ |ḡ|² - tr(Σ)/n,      B ≈ tr(Σ) / |G|².

|G|² can come out at or below zero when the signal is below what n groups can resolve; then B itself is not
reported (``resolved`` is False), only the lower bound tr(Σ) / |ḡ|² (|ḡ|² overestimates |G|² by tr(Σ)/n on average).

Usage (one H200 call, ~3 minutes; carry=[".whl"] with chapter 02's wheels; HASH is ``git rev-parse HEAD``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && REPRO_COMMIT=HASH \\
      HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src python3 chapters/02_grpo/noise_scale.py \\
      --out $OUT/ch02_noise.json

    PYTHONPATH=$PWD/src python3 chapters/02_grpo/noise_scale.py --dry-run --out /tmp/ch02_noise.json  # CPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_task as C  # noqa: E402  (puts src/ on the path)
import grpo_rlvr as G  # noqa: E402
import torch  # noqa: E402

from repro_utils.bench import script_fingerprint  # noqa: E402
from repro_utils.run import seed_everything  # noqa: E402

ROOT = C.ROOT
GROUPS = 128  # prompts whose group gradients are measured on the GPU (the dry run: 8)


def noise_scale(unit_grads: torch.Tensor) -> dict:
    """The simple noise scale from n per-unit gradients, shape (n, P), n >= 2 (float64 inside).

    Returns ``trace_cov`` (tr Σ of one unit's gradient), ``signal_sq`` (|G|², unbiased; may be negative),
    ``mean_sq`` (|ḡ|²), ``B`` (tr Σ / |G|² in units, or None when |G|² <= 0), ``B_lower`` (a lower bound on B from
    what n units can resolve: tr Σ / |ḡ|², since |G|² <= |ḡ|² in expectation) and ``resolved`` (|G|² > 0)."""
    g = unit_grads.double()
    n = g.shape[0]
    if g.dim() != 2 or n < 2:
        raise ValueError(f"unit_grads must be (n >= 2, P), not {tuple(unit_grads.shape)}")
    mean = g.mean(0)
    mean_sq = float(mean @ mean)
    per_unit_sq = float((g * g).sum(1).mean())
    trace_cov = n / (n - 1) * (per_unit_sq - mean_sq)
    signal_sq = mean_sq - trace_cov / n
    return {"units": n, "trace_cov": trace_cov, "signal_sq": signal_sq, "mean_sq": mean_sq,
            "B": trace_cov / signal_sq if signal_sq > 0 else None,
            "B_lower": trace_cov / mean_sq if mean_sq > 0 else None, "resolved": signal_sq > 0}


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def _group_slice(inputs: dict, lo: int, hi: int, batch: int) -> dict:
    """The rows lo:hi of every per-completion tensor in TRL's generation output (the rest as is)."""
    return {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
            for k, v in inputs.items()}


def grpo_group_gradients(trainer, rows: list[dict], group_size: int) -> tuple[torch.Tensor, list[float]]:
    """One gradient of the GRPO loss per prompt's group: TRL generates and scores all groups at once (its own
    sampler order: each prompt ``group_size`` times in a row), then ``compute_loss`` on each group's rows alone.
    Returns (n_groups, P) gradients on the CPU and, per group, 1.0 if its advantages are not all zero (it has signal)."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = trainer._generate_and_score_completions([r for r in rows for _ in range(group_size)])
    batch = len(rows) * group_size
    grads, has_signal = [], []
    model.train()
    for i in range(len(rows)):
        part = _group_slice(inputs, i * group_size, (i + 1) * group_size, batch)
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, part).backward()
        grads.append(_flat_grad(params).cpu())
        has_signal.append(float(part["advantages"].abs().sum() > 0))
    model.zero_grad(set_to_none=True)
    return torch.stack(grads), has_signal


def sft_unit_gradients(model, tok, entries: list[dict], device, *, seed: int = 0, filler_prob: float = 0.0) -> torch.Tensor:
    """One gradient of the supervised loss per problem, on the sequences the continued-SFT arm trains on
    (``encode_sft``: prompt, worked solution with its optional checks and fillers, eos; the loss is the mean over
    the solution's tokens)."""
    params = [p for p in model.parameters() if p.requires_grad]
    X, M, Y = G.encode_sft(tok, entries, device, seed=seed, filler_prob=filler_prob)
    grads = []
    model.train()
    for i in range(len(entries)):
        T = int(M[i].sum())  # right-padded: the sequence without its padding
        model.zero_grad(set_to_none=True)
        model(input_ids=X[i:i + 1, :T], labels=Y[i:i + 1, :T]).loss.backward()
        grads.append(_flat_grad(params).cpu())
    model.zero_grad(set_to_none=True)
    return torch.stack(grads)


def measure(*, dry_run: bool, out=None, seed: int = 0, groups: int | None = None) -> dict:
    """Warm up the chapter's start (its gpu profile and declared task), then the noise scale of GRPO's group
    gradients and of SFT's per-problem gradients there, and the cosine between their means."""
    t0 = time.perf_counter()
    device = C.calibration_device(dry_run, 600.0)
    P = C.dry_params(C.DRY, seed=seed) if dry_run else C.setting_params({}, seed=seed)
    groups = groups or (8 if dry_run else GROUPS)
    if groups < 2:
        raise ValueError(f"groups must be at least 2, not {groups}")
    seed_everything(seed)
    sets = G.problem_sets(P, seed)
    tok = G.char_tokenizer()
    model = G.tiny_policy(tok, P["model_dim"], P["model_layers"], seed=seed).to(device)
    w = G.warm_up(model, tok, sets["sft_pool"], sets["val"], P, device=device, seed=seed, eval_kw=G.eval_settings(P))
    path = tempfile.mkdtemp(prefix="grpo-noise-start-")
    model.save_pretrained(path)
    t_warm = time.perf_counter() - t0
    rows = [{"prompt": G.prompt_of(e), "entry": json.dumps(e)} for e in sets["rl"][:groups]]
    trainer = G.grpo_trainer(path, tok, rows, G.make_reward_fn([]), loss_type="grpo", steps=1,
                             group_size=P["group_size"], prompts_per_step=groups, lr=0.0, beta=P["beta"],
                             max_completion_length=P["max_completion_length"], seed=seed,
                             output_dir=tempfile.mkdtemp(prefix="grpo-noise-"), cuda=device.type == "cuda")
    trainer.train()  # one step at lr 0: TRL sets up its accelerator and reference model; the weights do not move
    g_rl, signal = grpo_group_gradients(trainer, rows, P["group_size"])
    g_sft = sft_unit_gradients(trainer.model, tok, sets["rl"][:groups], device, seed=seed, filler_prob=P["filler_prob"])
    m_rl, m_sft = g_rl.double().mean(0), g_sft.double().mean(0)
    res = {"chapter": "02_grpo", "script": "noise_scale.py", "profile": "dry-run" if dry_run else "gpu", "seed": seed,
           "parameters": P, "fingerprint": script_fingerprint(device, ROOT, packages=("transformers", "trl")),
           "groups": groups, "group_size": P["group_size"], "warm_up_s": t_warm,
           "start_val_pass1": 100 * w.curve[-1][1] if w.curve else None,
           "groups_with_signal": sum(signal) / len(signal),
           "grpo": noise_scale(g_rl), "sft": noise_scale(g_sft),
           "cosine_grpo_sft": float(m_rl @ m_sft / (m_rl.norm() * m_sft.norm() + 1e-30)),
           "wall_s": time.perf_counter() - t0}
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--dry-run", action="store_true", help="the smoke profile made smaller, on the CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", type=int, default=None, help=f"prompts measured (default {GROUPS}; dry run 8)")
    args = ap.parse_args(argv)
    try:
        res = measure(dry_run=args.dry_run, out=args.out, seed=args.seed, groups=args.groups)
    except (ValueError, RuntimeError) as e:
        print(f"noise_scale.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    for arm in ("grpo", "sft"):
        r = res[arm]
        b = f"{r['B']:.0f}" if r["resolved"] else f"> {r['B_lower']:.0f} (signal not resolved by {r['units']} units)"
        print(f"{arm}: noise scale B = {b} {'prompts' if arm == 'grpo' else 'problems'}")
    print(f"cosine between the mean GRPO and SFT gradients: {res['cosine_grpo_sft']:+.3f}; groups with signal "
          f"{100 * res['groups_with_signal']:.0f}%; wrote {args.out} in {res['wall_s']:.0f} s")
    return res


if __name__ == "__main__":
    main()
