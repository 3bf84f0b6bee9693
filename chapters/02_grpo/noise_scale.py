"""Chapter 02: how much of a GRPO step is signal? The gradient noise scale of the GRPO loss at the chapter's start.

Why. In the H200 learning-rate calibration at 0f44d09 (calibration/h200-0f44d09-learning-rates.json) no constant rate
from 3e-6 to 1e-4 let 40 GRPO steps of 64 prompts x 16 completions raise validation pass@1; the larger the rate, the
larger the loss. A CPU diagnostic on a small policy (2 terms of 1-2 digits, start at ~32% pass@1, 8 prompts x 8
completions a step) showed the same thing: GRPO at AdamW 3e-4 took pass@1 to 18% in 30 steps while continued SFT at
the same rate kept it near 29%, although the GRPO gradient pointed the right way (its mean over 6 batches had cosine
+0.28 with the SFT gradient on worked solutions of the same prompts) and the 6 batch gradients were orthogonal to
each other (mean pairwise cosine -0.006): each batch was mostly noise, which Adam turns into full-size steps.
Measured here on that CPU start, B for GRPO was not resolved by 96 groups (B > 102 prompts), SFT's was 13 problems.
With 128 prompts a step instead of 8 (same start, same rate 3e-4, 30 steps, one seed), GRPO no longer collapsed:
pass@1 31.7% -> 34.4%, beside continued SFT's 34.7% (96 problems x 16 samples at T = 1; at 1e-4 and 20 steps, 33.4%
and 33.1%; the larger batch also saw 16x the prompts). That points at the batch size, not the gradient's direction;
and at this scale GRPO and continued SFT gained about as much, which is the comparison rl-beats-continued-sft grades.

What this measures. McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv:1812.06162, §2 and
Appendix A) define the simple noise scale B = tr(Σ) / |G|², where G is the true gradient and Σ the covariance of a
one-example gradient: the batch size at which a step's noise and its signal are of equal size. Here the "example" is
one prompt's group of completions (GRPO's advantages are computed within a group), so B is in prompts: a step of B
prompts has as much noise as signal, and the chapter's 64 prompts a step are far below it when B is in the thousands.
From n per-group gradients g_i with mean ḡ, unbiasedly (their Appendix A estimates from two batch sizes; here 1 and n):

    tr(Σ) ≈ n/(n-1) (mean |g_i|² - |ḡ|²),      |G|² ≈ |ḡ|² - tr(Σ)/n,      B ≈ tr(Σ) / |G|².

|G|² can come out at or below zero when the signal is below what n groups can resolve; then B itself is not
reported (``resolved`` is False), only the lower bound tr(Σ) / |ḡ|² (|ḡ|² overestimates |G|² by tr(Σ)/n on average).

Usage (one H200 call, ~3-4 minutes at 512 groups; carry=[".whl"] with chapter 02's wheels; HASH is ``git rev-parse HEAD``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && REPRO_COMMIT=HASH \\
      HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src python3 chapters/02_grpo/noise_scale.py \\
      --out $OUT/ch02_noise.json

    PYTHONPATH=$PWD/src python3 chapters/02_grpo/noise_scale.py --dry-run --out /tmp/ch02_noise.json  # CPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
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
GROUPS = 512  # prompts whose group gradients are measured on the GPU (the dry run: 8); a B up to a few
#                hundred prompts is resolvable from this many (the CPU diagnostic's was above 102)


class Moments:
    """Running sums over unit gradients: their vector sum and the sum of their squared norms (float64, on the
    gradients' device). That is all the simple noise scale needs, so n gradients never have to be held at once."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, None, 0.0

    def add(self, g: torch.Tensor) -> None:
        g = g.reshape(-1).double()
        self.sum = g.clone() if self.sum is None else self.sum.add_(g)
        self.sq += float(g @ g)
        self.n += 1

    def mean(self) -> torch.Tensor:
        return self.sum / self.n


def noise_scale_of(m: Moments) -> dict:
    """The simple noise scale from the moments of n >= 2 unit gradients.

    Returns ``trace_cov`` (tr Σ of one unit's gradient), ``signal_sq`` (|G|², unbiased; may be negative),
    ``mean_sq`` (|ḡ|²), ``B`` (tr Σ / |G|² in units, or None when |G|² <= 0), ``B_lower`` (a lower bound on B from
    what n units can resolve: tr Σ / |ḡ|², since |G|² <= |ḡ|² in expectation) and ``resolved`` (|G|² > 0)."""
    n = m.n
    if n < 2:
        raise ValueError(f"the noise scale needs at least 2 unit gradients, got {n}")
    if not (math.isfinite(m.sq) and bool(torch.isfinite(m.sum).all())):
        raise ValueError("a unit gradient is not finite (nan or inf): no noise scale can be read from it")
    mean = m.mean()
    mean_sq = float(mean @ mean)
    trace_cov = n / (n - 1) * (m.sq / n - mean_sq)
    signal_sq = mean_sq - trace_cov / n
    return {"units": n, "trace_cov": trace_cov, "signal_sq": signal_sq, "mean_sq": mean_sq,
            "B": trace_cov / signal_sq if signal_sq > 0 else None,
            "B_lower": trace_cov / mean_sq if mean_sq > 0 else None, "resolved": signal_sq > 0}


def noise_scale(unit_grads: torch.Tensor) -> dict:
    """``noise_scale_of`` for n per-unit gradients held at once, shape (n, P), n >= 2."""
    if unit_grads.dim() != 2 or unit_grads.shape[0] < 2:
        raise ValueError(f"unit_grads must be (n >= 2, P), not {tuple(unit_grads.shape)}")
    m = Moments()
    for g in unit_grads:
        m.add(g)
    return noise_scale_of(m)


class SplitMoments:
    """Moments of all units, and of the even- and odd-numbered units apart: B from each half says how stable the
    estimate is (a half has half the units, so it resolves a signal only half as small)."""

    def __init__(self):
        self.all, self.halves = Moments(), (Moments(), Moments())

    def add(self, g: torch.Tensor) -> None:
        self.halves[self.all.n % 2].add(g)
        self.all.add(g)

    def report(self) -> dict:
        r = noise_scale_of(self.all)
        r["halves"] = [noise_scale_of(h) for h in self.halves] if self.halves[1].n >= 2 else None
        return r


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def _group_slice(inputs: dict, lo: int, hi: int, batch: int) -> dict:
    """The rows lo:hi of every per-completion tensor in TRL's generation output (the rest as is)."""
    return {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
            for k, v in inputs.items()}


CHUNKS = (32, 64, 128, 256)  # prompts generated per call, in turn (then 32 again, ...): the time of each call is
#                                recorded, so the run also says how generation time grows with the batch


def chunk_sizes(n: int, sizes=CHUNKS) -> list[int]:
    """Split n prompts into generation calls of the sizes in ``sizes``, cycling, the last one cut to fit."""
    out, i = [], 0
    while sum(out) < n:
        out.append(min(sizes[i % len(sizes)], n - sum(out)))
        i += 1
    return out


def grpo_group_moments(trainer, rows: list[dict], group_size: int, sizes=None):
    """The GRPO loss's gradient for each prompt's group, accumulated into moments: TRL generates and scores a
    chunk of prompts' groups at a time (its own sampler order: each prompt ``group_size`` times in a row; chunk
    sizes from ``chunk_sizes``), then ``compute_loss`` runs on each group's rows alone. Returns the moments; per
    group, 1.0 if its advantages are not all zero (it has signal); and per generation call, its prompts,
    completions and seconds (synchronized on a GPU)."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    moments, has_signal, calls, lo = SplitMoments(), [], [], 0
    for n in chunk_sizes(len(rows), sizes or CHUNKS):
        part_rows, lo = rows[lo:lo + n], lo + n
        _sync()
        t = time.perf_counter()
        inputs = trainer._generate_and_score_completions([r for r in part_rows for _ in range(group_size)])
        _sync()
        calls.append({"prompts": n, "completions": n * group_size, "seconds": time.perf_counter() - t})
        batch = n * group_size
        model.train()
        for i in range(n):
            part = _group_slice(inputs, i * group_size, (i + 1) * group_size, batch)
            model.zero_grad(set_to_none=True)
            trainer.compute_loss(model, part).backward()
            moments.add(_flat_grad(params))
            has_signal.append(float(part["advantages"].abs().sum() > 0))
    model.zero_grad(set_to_none=True)
    return moments, has_signal, calls


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sft_unit_moments(model, tok, entries: list[dict], device, *, seed: int = 0, filler_prob: float = 0.0) -> SplitMoments:
    """The supervised loss's gradient for each problem, accumulated into moments, on the sequences the
    continued-SFT arm trains on (``encode_sft``: prompt, worked solution with its optional checks and fillers, eos;
    the loss is the mean over the solution's tokens)."""
    params = [p for p in model.parameters() if p.requires_grad]
    X, M, Y = G.encode_sft(tok, entries, device, seed=seed, filler_prob=filler_prob)
    moments = SplitMoments()
    model.train()
    for i in range(len(entries)):
        T = int(M[i].sum())  # right-padded: the sequence without its padding
        model.zero_grad(set_to_none=True)
        model(input_ids=X[i:i + 1, :T], labels=Y[i:i + 1, :T]).loss.backward()
        moments.add(_flat_grad(params))
    model.zero_grad(set_to_none=True)
    return moments


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
    if len(sets["rl"]) < groups:
        raise ValueError(f"groups={groups}, but this setting has only {len(sets['rl'])} RL prompts "
                         f"(grpo_steps x prompts_per_step)")
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
    t1 = time.perf_counter()
    g_rl, signal, gen_calls = grpo_group_moments(trainer, rows, P["group_size"])
    t_rl = time.perf_counter() - t1
    g_sft = sft_unit_moments(trainer.model, tok, sets["rl"][:groups], device, seed=seed, filler_prob=P["filler_prob"])
    m_rl, m_sft = g_rl.all.mean(), g_sft.all.mean()
    res = {"chapter": "02_grpo", "script": "noise_scale.py", "profile": "dry-run" if dry_run else "gpu", "seed": seed,
           "parameters": P, "fingerprint": script_fingerprint(device, ROOT, packages=("transformers", "trl")),
           "groups": groups, "group_size": P["group_size"], "warm_up_s": t_warm,
           "start_val_pass1": 100 * w.curve[-1][1] if w.curve else None,
           "groups_with_signal": sum(signal) / len(signal),
           "grpo_measure_s": t_rl, "generation_calls": gen_calls, "grpo": g_rl.report(), "sft": g_sft.report(),
           "cosine_grpo_sft": float(m_rl @ m_sft / (m_rl.norm() * m_sft.norm() + 1e-30)),
           "wall_s": time.perf_counter() - t0}
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
    return res


def describe_B(r: dict) -> str:
    """A noise-scale report in words: B, or the bound when n units could not resolve the signal."""
    if r["resolved"]:
        return f"{r['B']:.0f}"
    if r["B_lower"] is None:  # |ḡ|² = 0: the mean gradient is exactly zero (no group had a reward to learn from)
        return f"not measurable (the mean of {r['units']} unit gradients is zero)"
    return f"> {r['B_lower']:.0f} (signal not resolved by {r['units']} units)"


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
        halves = ", ".join(describe_B(h) for h in r["halves"] or [])
        print(f"{arm}: noise scale B = {describe_B(r)} {'prompts' if arm == 'grpo' else 'problems'}"
              + (f" (from each half of the units: {halves})" if halves else ""))
    per = {}
    for c in res["generation_calls"]:
        per.setdefault(c["completions"], []).append(c["seconds"])
    print("generation: " + "; ".join(f"{k} completions {min(v):.2f} s" for k, v in sorted(per.items()))
          + " (fastest call of each size)")
    print(f"cosine between the mean GRPO and SFT gradients: {res['cosine_grpo_sft']:+.3f}; groups with signal "
          f"{100 * res['groups_with_signal']:.0f}%; wrote {args.out} in {res['wall_s']:.0f} s")
    return res


if __name__ == "__main__":
    main()
