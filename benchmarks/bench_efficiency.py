"""How much of this CPU the study's hot paths use: achieved GFLOP/s of ICL scoring and of a training step
against the host's own matmul peak, in float32 and bfloat16.

- peak: a square matmul (``--matmul`` = n, 2·n³ FLOPs) at the current thread count, best of ``--repeats``;
- scoring: ``scoring.evaluate`` on ``--n`` MNLI queries at k = 0 (a student's cost) and at ``--k`` (ICL with
  the demonstrations' prefix reused), the model in that dtype;
- training: ``distill.train_student`` for one epoch of ``--n`` queries in batches of 8 (forward, backward, AdamW),
  float32 master weights, the bf16 row with bf16 autocast (the study's ``mixed_precision="bf16"``), on
  ``--train-n`` queries.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one untimed run of each
(every matmul, attention and convolution the code executed, backward included; it is also the warm-up); the
time is the best of up to ``--repeats`` runs without the counter (fewer after 60 s). GFLOP/s = counted FLOPs / that time. Prints a table
with the share of the matmul peak and writes ``--json``.

    python benchmarks/bench_efficiency.py --n 64 --k 16 --json benchmarks/results/efficiency.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from llmft_utils import data, distill, models, patterns, scoring
from llmft_utils.probes import hardware


def matmul_peak(n: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of an n×n by n×n product, the faster of ``torch.matmul`` and ``F.linear`` (the kernel a model's
    layers use: on a CPU without native bf16, bf16 ``matmul`` takes a path ~50x slower than bf16 ``linear``),
    best of ``repeats`` after one warm-up each."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for fn in (lambda: torch.matmul(a, b), lambda: torch.nn.functional.linear(a, b)):
        fn()
        best = min(best, *(_timed(fn) for _ in range(repeats)))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def counted(fn) -> int:
    """The FLOPs ``fn()`` executes (one untimed run under FlopCounterMode)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def measure(fn, repeats: int, budget_s: float = 60.0) -> dict:
    """``{"flops", "s", "gflops", "runs"}``: counted FLOPs (that run is the warm-up) and the best wall time of up
    to ``repeats`` timed runs, fewer once ``budget_s`` is spent (a bf16 training step on a CPU without native
    bf16 takes minutes)."""
    flops = counted(fn)
    times = [_timed(fn)]
    while len(times) < repeats and sum(times) < budget_s:
        times.append(_timed(fn))
    s = min(times)
    return {"flops": flops, "s": s, "gflops": flops / s / 1e9, "runs": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=64, help="MNLI queries scored")
    ap.add_argument("--train-n", type=int, default=16, help="MNLI queries of the timed training epoch")
    ap.add_argument("--k", type=int, default=16, help="demonstrations of the ICL scoring row")
    ap.add_argument("--matmul", type=int, default=2048, help="size of the peak matmul")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--data-dir", default=os.environ.get(data.DATA_DIR_ENV, ""))
    ap.add_argument("--json", default="", help="write the results here too")
    a = ap.parse_args()

    ev = data.stratified_subsample(data.load_split("mnli", "validation_matched", a.data_dir), n=a.n, seed=0)
    pool = data.load_split("mnli", "train", a.data_dir)
    demos = data.sample_demonstrations(pool, a.k, 0, exclude=ev)
    pat = patterns.get_pattern("gpt-3")
    out = {"hardware": hardware(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "model": a.model, "n": a.n, "train_n": a.train_n, "k": a.k, "rows": []}
    for dtype in a.dtypes:
        tdtype = getattr(torch, dtype)
        peak = matmul_peak(a.matmul, tdtype, a.repeats)
        lm = models.load_model(a.model, device="cpu", dtype=dtype)
        rows = {
            "scoring k=0": lambda: scoring.evaluate(lm, ev, pat, ev.iloc[0:0], progress=False, extras=()),
            f"scoring k={a.k}": lambda: scoring.evaluate(lm, ev, pat, demos, progress=False, extras=()),
        }
        base = models.load_model(a.model, device="cpu", dtype="float32") if dtype != "float32" else lm
        examples = distill.student_examples(base.tokenizer, pat, ev.head(a.train_n), None, base.max_context)
        cfg = distill.DistillConfig(target="verbalizer", alpha=1.0, epochs=1, batch_size=8,
                                    mixed_precision="bf16" if dtype == "bfloat16" else "no")
        vids = distill.answer_token_ids(base.tokenizer, pat)
        rows[f"training, {a.train_n} queries"] = lambda: distill.train_student(base.model, base.tokenizer, examples, cfg, vids)
        for name, fn in rows.items():
            m = measure(fn, a.repeats)
            out["rows"].append({"dtype": dtype, "what": name, "peak_gflops": peak, **m, "share_of_peak": m["gflops"] / peak})
            print(f"{dtype:9s} {name:24s} {m['flops'] / 1e9:9.1f} GFLOP in {m['s']:6.2f} s = {m['gflops']:6.1f} GFLOP/s "
                  f"({100 * m['gflops'] / peak:4.1f}% of the {peak:.0f} GFLOP/s matmul peak)", flush=True)
    print(f"hardware: {out['hardware']}, {out['threads']} threads, model {a.model}, {a.n} queries, k={a.k}")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
