"""Chapter 05, for the next GPU session: one device call that answers what the CPU could not.

    PYTHONPATH=src:chapters/05_moe_routing python3 scratch_05_next/probe.py 2>&1 | tee $OUT/probe.txt

(the device's plain python3 has torch and triton; nothing else is needed). It prints, and writes to
$OUT/probe.json when $OUT is set:

  1. host syncs (torch.cuda.set_sync_debug_mode): the whole grouped layer forward + backward, cold (first call
     at a shape, as the notebook's count was) and warm, with the old router (route_autograd) and the new one
     (route: the _Router function, Triton on the GPU); then every stage alone; and, for any warm sync left, the
     first one raised in "error" mode with anomaly detection (the forward traceback of the backward node);
  2. the new router against the old on the GPU: same top-k choices, scores, gates, dx, dW;
  3. timings at the claim's shape (16,384 tokens, d_model 1024, d_expert 2048, 8 experts, top-2, bf16):
     old and new router, the grouped layer with each, the dense FFN: forward, forward + backward eager (the
     graded way) and forward + backward as CUDA-graph replays (GPU time only); then bench_parts, and
     bench_layer's own output (its supplementary_cuda_graph block included).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "chapters" / "05_moe_routing")]

import moe_routing as moe  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from repro_utils.bench import time_fn  # noqa: E402

dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))  # PROBE_DEVICE=cpu: a dry run of the code, tiny shapes
DRY = dev.type != "cuda"
report: dict = {"device": "CPU (dry run)" if DRY else torch.cuda.get_device_name(0), "torch": torch.__version__}


def syncs(fn) -> tuple[int, list[str]]:
    """How many synchronizing CUDA calls fn() made, and from which Python lines (forward ops point at our
    code; a sync inside the backward points at torch/autograd: see first_sync)."""
    if DRY:
        fn()
        return 0, []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    return len(hits), sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})


def first_sync(fn) -> str | None:
    """The first synchronizing call of fn(), raised ("error" mode); under anomaly detection a failing
    backward node also reports the forward line that created it."""
    if DRY:
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autograd.detect_anomaly(check_nan=False):
                fn()
            return None
        except RuntimeError:
            return traceback.format_exc(limit=-6) + "\n".join(str(w.message) for w in caught
                                                                if "Traceback of forward" in str(w.message))
        finally:
            torch.cuda.set_sync_debug_mode(0)


def tensors(n, d, h, e=8, k=2, seed=0):
    t = moe._bench_tensors(n, d, h, e, k, dev, seed)
    return t, [t["x"], t["router"], t["w1"], t["w2"]]


def layer(t, k, old_router=False):
    def f():
        x, router = t["x"], t["router"]
        r = moe.route_autograd(x, router, k) if old_router else None
        return moe.moe_ffn(x, router, t["w1"], t["w2"], k, r)
    return f


def fwdbwd(f, params, g):
    def run():
        torch.autograd.grad(f(), params, g)
    return run


# ------------------------------------------------------------------------------------- 1. host syncs
print("== 1. host syncs (torch.cuda.set_sync_debug_mode)")
K = 2
sync_rows = {}
for old in (False, True):  # cold: the first call at the notebook's sync-count shape, for each router
    t, params = tensors(*((256 + 64 * old, 64, 128) if DRY else (4096 + 64 * old, 256, 512)))  # a fresh shape for each: both calls cold
    name = "old router" if old else "new router"
    sync_rows[f"layer fwd+bwd, {name}, COLD"] = syncs(fwdbwd(layer(t, K, old), params, t["dy"]))
    sync_rows[f"layer fwd+bwd, {name}, warm"] = syncs(fwdbwd(layer(t, K, old), params, t["dy"]))
t, params = tensors(*((256, 64, 128) if DRY else (4096, 256, 512)))
x, router, w1, w2, dy = t["x"], t["router"], t["w1"], t["w2"], t["dy"]
with torch.no_grad():
    r = moe.route(x, router, K)
    d = moe.dispatch(r.top_idx, 8)
    xs = moe.to_experts(x, d)
    h1 = moe.grouped_mm(xs, w1, d.offsets)
    y = moe.grouped_mm(F.gelu(h1), w2, d.offsets)
leaf = lambda v: v.detach().requires_grad_()  # noqa: E731
xs_, h1_, h_, y_, g_ = leaf(xs), leaf(h1), leaf(F.gelu(h1)), leaf(y), leaf(r.gates)
stages = {
    "router new (route)": (lambda: moe.route(x, router, K).gates, [x, router]),
    "router old (route_autograd)": (lambda: moe.route_autograd(x, router, K).gates, [x, router]),
    "dispatch (sort, offsets)": (lambda: moe.dispatch(r.top_idx, 8).pos, None),
    "to_experts": (lambda: moe.to_experts(x, d), [x]),
    "grouped_mm 1": (lambda: moe.grouped_mm(xs_, w1, d.offsets), [xs_, w1]),
    "gelu": (lambda: F.gelu(h1_), [h1_]),
    "grouped_mm 2": (lambda: moe.grouped_mm(h_, w2, d.offsets), [h_, w2]),
    "combine": (lambda: moe.combine(y_, d, g_), [y_, g_]),
    "loop layer fwd (contrast)": (lambda: moe.experts_loop(x, r.top_idx, r.gates.to(x.dtype), w1, w2), None),
}
for name, (f, ps) in stages.items():
    f()  # warm
    sync_rows[f"{name} fwd"] = syncs(f)
    if ps is not None:
        gr = torch.randn_like(f())
        run = fwdbwd(f, ps, gr)
        run()
        sync_rows[f"{name} fwd+bwd"] = syncs(run)
for k_, (n, where) in sync_rows.items():
    print(f"  {k_:<42} {n:3d}  {' '.join(where)}")
report["syncs"] = {k_: {"count": n, "where": w} for k_, (n, w) in sync_rows.items()}
for old in (False, True):
    tb = first_sync(fwdbwd(layer(t, K, old), params, dy))
    key = f"first warm sync, layer fwd+bwd, {'old' if old else 'new'} router"
    print(f"  {key}: {'none' if tb is None else ''}")
    if tb:
        print("    " + tb.replace("\n", "\n    "))
    report[key] = tb

# ---------------------------------------------------------------- 2. new router vs old, on the GPU
print("== 2. new router (Triton) vs old (autograd) at the claim's shape, bf16 x, fp32 router")
N, D, H, E = (256, 64, 128, 8) if DRY else (16384, 1024, 2048, 8)
t, params = tensors(N, D, H, E, K)
x, router = t["x"], t["router"]
g_gates = torch.randn(N, K, device=dev)
res = {}
for name, fn in (("old", moe.route_autograd), ("new", moe.route), ("torch path", None)):
    a, b = x.detach().requires_grad_(), router.detach().requires_grad_()
    rr = moe.route(a, b, K, kernel="torch") if fn is None else fn(a, b, K)
    torch.autograd.backward(rr.gates, g_gates)
    res[name] = tuple(v.detach() for v in (rr.top_idx, rr.scores, rr.gates, a.grad.float(), b.grad))
cmp = {}
for name in ("new", "torch path"):
    o, nw = res["old"], res[name]
    rel = lambda u, v: float((u - v).norm() / v.norm())  # noqa: E731
    cmp[name] = {"same_top_k_rows": float((o[0] == nw[0]).all(-1).float().mean()),
                 "max_abs_scores": float((o[1] - nw[1]).abs().max()), "max_abs_gates": float((o[2] - nw[2]).abs().max()),
                 "rel_dx": rel(nw[3], o[3]), "rel_dW": rel(nw[4], o[4])}
    print(f"  {name:>10} vs old: {cmp[name]}")
report["router_agreement"] = cmp

# ------------------------------------------------------------------------------------- 3. timings
print(f"== 3. timings, {report['device']}, {N} tokens, d_model {D}, 8 x {H}, top-2, bf16 (ms, median)")


def timed(fn, graph=False):
    try:
        return round(time_fn(fn, graph=graph).ms, 4)
    except RuntimeError as e:
        return "capture failed: " + str(e).strip().splitlines()[0][:160]


dense = lambda: moe.dense_ffn(x, t["dense1"], t["dense2"])  # noqa: E731
rows = {
    "router old": (lambda: moe.route_autograd(x, router, K).gates, [x, router], g_gates),
    "router new": (lambda: moe.route(x, router, K).gates, [x, router], g_gates),
    "grouped layer, old router": (layer(t, K, True), params, t["dy"]),
    "grouped layer, new router": (layer(t, K, False), params, t["dy"]),
    "dense FFN": (dense, [x, t["dense1"], t["dense2"]], t["dy"]),
}
times = {}
print(f"  {'':<28} {'fwd':>9} {'fwd+bwd':>9} {'fwd+bwd graphed':>16}")
for name, (f, ps, g) in rows.items():
    times[name] = {"fwd": timed(f), "fwdbwd": timed(fwdbwd(f, ps, g)), "fwdbwd_graph": timed(fwdbwd(f, ps, g), True)}
    v = times[name]
    print(f"  {name:<28} {v['fwd']!s:>9} {v['fwdbwd']!s:>9} {v['fwdbwd_graph']!s:>16}")
dn = times["dense FFN"]
for name in ("grouped layer, old router", "grouped layer, new router"):
    gv = times[name]
    ratio = {k_: (dn[k_] / gv[k_] if isinstance(dn[k_], float) and isinstance(gv[k_], float) else None)
             for k_ in ("fwdbwd", "fwdbwd_graph")}
    print(f"  dense/grouped tokens/s ({name}): eager {ratio['fwdbwd']}, graphed {ratio['fwdbwd_graph']}  (claim: >= 0.7 eager)")
    times[name]["dense_over_grouped"] = ratio
report["timings_ms"] = times

print("  kernels alone (no autograd), eager / graphed: is a stage's time the GPU's or the host's?")
with torch.no_grad():
    rt = moe.route(x, router, K)
    dd = moe.dispatch(rt.top_idx, E)
    yk = torch.randn(dd.slot.numel(), D, device=dev, dtype=x.dtype)
    wk = rt.gates.t().reshape(-1).contiguous()
    dl = torch.randn(N, E, device=dev)
    xf = x.detach().float()
    kernels = {
        "router fwd, Triton (logits+softmax+top-k)": lambda: moe._router_fwd_triton(x.detach(), router.detach(), None, K, True),
        "router bwd, Triton (dx + dW partials)": lambda: moe._router_bwd_triton(None, g_gates, x.detach(), router.detach(),
                                                                               rt.scores, rt.top_idx, True),
        "old router: x.float()": lambda: x.detach().float(),
        "old router: logits = F.linear(x32, W)": lambda: F.linear(xf, router.detach()),
        "old router: dW = dlᵀ x32 (fp32 mm, K = N)": lambda: dl.t() @ xf,
        "old router: dx = dl W (fp32 mm, K = E)": lambda: dl @ router.detach(),
        "combine fwd, Triton gather-sum": lambda: moe._gather_sum_triton(yk, dd.pos, wk, K),
        "combine bwd, Triton": lambda: moe._combine_bwd_triton(t["dy"], yk, dd.pos, wk, dd.slot, dd.token, K),
        "to_experts bwd, Triton gather-sum": lambda: moe._gather_sum_triton(yk, dd.pos, None, K),
        "dispatch (sort, searchsorted, scatter)": lambda: moe.dispatch(rt.top_idx, E),
    }
    for name, f in kernels.items():
        times[name] = {"eager": timed(f), "graph": timed(f, True)}
        print(f"    {name:<46} {times[name]['eager']!s:>9} {times[name]['graph']!s:>9}")

print("  bench_parts (new router):")
parts = moe.bench_parts(N, D, H, E, K, dev, time_fn)
for s, v in parts.items():
    print(f"    {s:>18} fwd {v['fwd']:.3f}  fwd+bwd {v.get('fwdbwd', float('nan')):.3f}")
report["bench_parts"] = parts
bl = moe.bench_layer(N, D, H, E, K, dev, time_fn)
print(f"  bench_layer: grouped fwd+bwd {bl['ms']['grouped_fwdbwd']:.3f}, dense {bl['ms']['dense_fwdbwd']:.3f}, "
      f"loop {bl['ms']['loop_fwdbwd']:.3f} -> graded ratio {bl['ms']['dense_fwdbwd'] / bl['ms']['grouped_fwdbwd']:.3f}")
print(f"  bench_layer supplementary_cuda_graph: {bl.get('supplementary_cuda_graph')}")
report["bench_layer"] = bl

if os.environ.get("OUT"):
    Path(os.environ["OUT"], "probe.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {os.environ['OUT']}/probe.json")
