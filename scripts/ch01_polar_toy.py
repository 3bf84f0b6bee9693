"""Chapter 01, §4 on a CPU: the toy behind the declaration of ns5-vs-exact-polar-tuned (issue 16).

Trains record 4's architecture at a toy scale with Muon under four orthogonalisations (NS5, the exact polar factor
U V^T from polar_newton, and the quintic cut to 1 or 2 steps) over a grid of Muon learning rates and a few seeds, and
prints the final validation loss of each run, the best rate of each arm (and whether it is inside its grid), and the
paired differences at each arm's own best rate. It chose the control arm and the rate grids declared in claims.yaml;
it grades nothing. One process per core:

    REPRO_DATA_DIR=../shared/data PYTHONPATH=src python3 scripts/ch01_polar_toy.py --out /tmp/toy --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "chapters" / "01_speedrun_muon"))

GRIDS = {"ns5": [0.0025, 0.005, 0.01, 0.02, 0.04, 0.08], "newton": [0.0025, 0.005, 0.01, 0.02, 0.04],
         "ns2": [0.005, 0.01, 0.02, 0.04, 0.08], "ns1": [0.01, 0.02, 0.04, 0.08, 0.16]}


def one(job: tuple) -> dict:
    import muon_speedrun as ms
    import torch

    from repro_utils import data as rdata

    torch.set_num_threads(1)
    ortho, lr, seed, steps, a = job
    train, val = rdata.tokens("train", corpus="corpus-xl"), rdata.tokens("val", corpus="corpus-xl")
    train, val = ms.shrink_vocab(train, val, a["vocab"])
    cfg = replace(dict(ms.ladder_configs(ms.GPTConfig(vocab_size=a["vocab"], n_layer=a["n_layer"], n_head=a["n_head"],
                                                      n_embd=a["n_embd"], seq_len=a["seq_len"])))["+ rotary"])
    rc = ms.RunConfig(optimizer="muon", lr=lr, adam_lr=0.0036, embed_lr=0.0036, batch_size=a["batch_size"],
                      tokens=steps * a["batch_size"] * a["seq_len"], eval_every=0, eval_tokens=a["eval_tokens"],
                      seed=seed, ortho=ortho)
    vf = ms.val_set(val, cfg.seq_len, a["eval_tokens"], seed=1)
    h, _, _ = ms.train(cfg, rc, train, vf, val_final=vf)
    return dict(ortho=ortho, lr=lr, seed=seed, steps=steps, final=h.final_val, seconds=h.seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, nargs="+", default=[300])
    ap.add_argument("--arms", nargs="+", default=list(GRIDS))
    ap.add_argument("--lrs", type=float, nargs="*", default=None, help="these rates only (default: each arm's grid)")
    ap.add_argument("--skip", default=None, help="a toy.json whose runs are not repeated (their rows are kept)")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    a = ap.parse_args()
    cfg = dict(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, seq_len=a.seq_len, batch_size=a.batch_size,
               vocab=a.vocab, eval_tokens=a.eval_tokens)
    rows = json.loads(Path(a.skip).read_text())["runs"] if a.skip else []
    done = {(r["ortho"], r["lr"], r["seed"], r["steps"]) for r in rows}
    jobs = [(o, lr, s, n, cfg) for n, o, s in itertools.product(a.steps, a.arms, a.seeds)
            for lr in (a.lrs if a.lrs else GRIDS[o]) if (o, lr, s, n) not in done]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(a.workers) as pool:
        for r in pool.map(one, jobs):
            rows.append(r)
            print(json.dumps(r), flush=True)
            (out / "toy.json").write_text(json.dumps(dict(config=cfg, grids=GRIDS, runs=rows), indent=1))


if __name__ == "__main__":
    main()
