"""Prefix-reuse ICL scoring vs naive full-prompt scoring on the same queries.

Prints the max abs difference of verbalizer log-probs and the speed ratio (naive / reuse).
Timing: one untimed warm-up batch per mode, then synchronised wall clock over the full query set.

    python benchmarks/bench_prefix_reuse.py --model smollm2-135m --task mnli --k 16 --n 64
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from llmft_utils import data, models, patterns, scoring
from llmft_utils.probes import hardware, probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--task", default="mnli")
    ap.add_argument("--split", default=None, help="evaluation split (default: the task's validation split)")
    ap.add_argument("--pattern", default="gpt-3")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--n", type=int, default=64, help="number of evaluation queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="queries per forward pass (the default profile's)")
    ap.add_argument("--attn", default=None, help="attn_implementation (sdpa, eager); default: the model's")
    ap.add_argument("--data-dir", default=os.environ.get(data.DATA_DIR_ENV, ""))
    a = ap.parse_args()

    spec = data.get_task(a.task)
    split = a.split or next(s for s in spec.splits if s.startswith("validation"))
    ev = data.stratified_subsample(data.load_split(a.task, split, a.data_dir), n=a.n, seed=a.seed)
    pool = data.load_split(spec.demo_task, spec.demo_split, a.data_dir)
    demos = data.sample_demonstrations(pool, a.k, a.seed, exclude=ev)
    pat = patterns.get_pattern(a.pattern)
    lm = models.load_model(a.model, attn_implementation=a.attn)
    warm = ev.head(min(len(ev), a.batch_size))
    res = {}
    for mode, reuse in (("reuse", True), ("naive", False)):
        scoring.evaluate(lm, warm, pat, demos, batch_size=a.batch_size, reuse_prefix=reuse, progress=False)
        with probe(lm.device) as pr:
            m, p = scoring.evaluate(lm, ev, pat, demos, batch_size=a.batch_size, reuse_prefix=reuse, progress=False)
        res[mode] = (pr.wall_s, m, p)
    (tr, mr, pr_), (tn, mn, pn) = res["reuse"], res["naive"]
    diff = float(np.nanmax(np.abs(pr_[["logp_label0", "logp_label1"]].to_numpy() - pn[["logp_label0", "logp_label1"]].to_numpy())))
    print(f"hardware: {hardware()}  model: {a.model} ({lm.n_params/1e6:.1f}M params, {lm.dtype}, attn={a.attn or 'default'})")
    print(f"task: {a.task}/{split}  pattern: {a.pattern}  k={a.k}  seed={a.seed}  queries={len(ev)}  batch={a.batch_size}")
    print(f"prefix tokens: {mr['prefix_tokens']}  mean query tokens: {mr['query_tokens_mean']:.1f}  "
          f"prefix fallbacks: {mr['n_prefix_fallback']}")
    print(f"tokens processed  reuse: {mr['tokens_processed']:,}  naive: {mn['tokens_processed']:,}")
    print(f"wall  reuse: {tr:.2f} s ({tr/len(ev)*1000:.1f} ms/query)  naive: {tn:.2f} s ({tn/len(ev)*1000:.1f} ms/query)")
    print(f"peak mem  reuse: {mr['peak_mem_mb']:.0f} MB  naive: {mn['peak_mem_mb']:.0f} MB ({mr['mem_kind']})")
    print(f"accuracy  reuse: {mr['score_acc']:.4f}  naive: {mn['score_acc']:.4f}  predictions equal: "
          f"{bool((pr_['pred'] == pn['pred']).all())}")
    print(f"max |logp difference|: {diff:.2e}")
    print(f"speed-up (naive / reuse): {tn / tr:.2f}x")


if __name__ == "__main__":
    main()
