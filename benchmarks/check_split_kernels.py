"""Is the fused prefix-attention kernel of the split-prefix path right, and how much faster is it?

1. Random tensors of the k = 16 scoring shape (SmolLM2: 3 key/value heads, 3 query heads each, head dim 64;
   a batch of 256 queries × 50 tokens folded into 38,400 query rows; a 769-token prefix): ``scoring.attention._attend``
   with the fused kernel (CUDA: memory-efficient attention; CPU: flash) against ``scoring.attention._math_lse`` (float32
   matmuls): max |Δ| of output and log-sum-exp, and the time of each (warm-up, synchronised, median of 10).
2. A random-init SmolLM2-shaped model scores ``--n`` MNLI queries at k = 16 with ``SPLIT_KERNEL="fused"`` and
   with ``"math"``: share of equal predictions, max |Δ log-prob|, both runs' prefix-reuse self-check.

    python benchmarks/check_split_kernels.py --json out.json            # on the GPU
    python benchmarks/check_split_kernels.py --device cpu --n 32 --rows 2048   # a dry run on CPU
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from llmft_utils import data, models, patterns, scoring
from llmft_utils.probes import _sync


def _time(fn, device: str, reps: int = 10) -> float:
    fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def tensors(a) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 3, a.rows, 64, generator=g).to(a.device)
    k = torch.randn(1, 3, a.prefix, 64, generator=g).to(a.device)
    v = torch.randn(1, 3, a.prefix, 64, generator=g).to(a.device)
    scale = 64 ** -0.5
    scoring.attention.SPLIT_KERNEL = "fused"
    fused = lambda: scoring.attention._attend(q, k, v, None, scale)  # noqa: E731
    math_ = lambda: scoring.attention._math_lse(q, k, v, None, scale)  # noqa: E731
    (o1, l1), (o2, l2) = fused(), math_()
    res = {"rows": a.rows, "prefix": a.prefix, "fused_kernel": "efficient" if a.device == "cuda" else "cpu flash",
           "max_abs_diff_out": float((o1 - o2).abs().max()), "max_abs_diff_lse": float((l1 - l2).abs().max()),
           "shapes_equal": tuple(o1.shape) == tuple(o2.shape) and tuple(l1.shape) == tuple(l2.shape),
           "fused_s": _time(fused, a.device), "math_s": _time(math_, a.device)}
    res["speedup"] = res["math_s"] / res["fused_s"]
    print(f"tensors: |Δout| {res['max_abs_diff_out']:.2e}  |Δlse| {res['max_abs_diff_lse']:.2e}  "
          f"fused {res['fused_s'] * 1e3:.2f} ms vs math {res['math_s'] * 1e3:.2f} ms ({res['speedup']:.1f}x)", flush=True)
    return res


def model_check(a) -> dict:
    ev = data.load_split("mnli", "validation_matched").head(a.n)
    pool = data.load_split("mnli", "train")
    pat = patterns.get_pattern("gpt-3")
    demos = data.sample_demonstrations(pool, 16, 0, exclude=ev)
    out = {}
    for dtype in a.dtypes.split(","):
        lm = models.load_model(models.RANDOM_PREFIX + "smollm2-135m", device=a.device, dtype=dtype)
        got = {}
        for kernel in ("fused", "math"):
            scoring.attention.SPLIT_KERNEL = kernel
            scoring.tokens._rows_cache.clear()
            scoring.evaluate(lm, ev.head(16), pat, demos, progress=False, extras=("calibration",))  # warm-up
            _sync(a.device)
            t0 = time.perf_counter()
            m, p = scoring.evaluate(lm, ev, pat, demos, progress=False, extras=("calibration",), max_tokens=a.max_tokens)
            _sync(a.device)
            got[kernel] = (m, p, time.perf_counter() - t0)
        scoring.attention.SPLIT_KERNEL = "auto"
        (ma, pa, ta), (mm, pm, tm) = got["fused"], got["math"]
        d = np.abs(pa[["logp_label0", "logp_label1"]].to_numpy() - pm[["logp_label0", "logp_label1"]].to_numpy())
        out[dtype] = {"n": len(ev), "same_pred": float((pa["pred"] == pm["pred"]).mean()),
                      "max_abs_diff_logp": float(np.nanmax(d)), "fused_s": ta, "math_s": tm,
                      "fused_q_per_s": len(ev) / ta, "math_q_per_s": len(ev) / tm,
                      "fused_note": ma["prefix_reuse_note"], "math_note": mm["prefix_reuse_note"],
                      "fused_fallback": ma["n_prefix_fallback"], "math_fallback": mm["n_prefix_fallback"]}
        r = out[dtype]
        print(f"model {dtype}: same predictions {r['same_pred']:.4f}  max |Δlogp| {r['max_abs_diff_logp']:.2e}  "
              f"fused {r['fused_q_per_s']:.0f} q/s vs math {r['math_q_per_s']:.0f} q/s  notes: {r['fused_note']!r} / "
              f"{r['math_note']!r}", flush=True)
        del lm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=38_400)
    ap.add_argument("--prefix", type=int, default=769)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--dtypes", default="float32,tf32")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.device == "cpu":
        a.dtypes = "float32"
    res = {"device": a.device, "torch": torch.__version__,
           "card": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
           "tensors": tensors(a), "model": model_check(a)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
