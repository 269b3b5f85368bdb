# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · In-context learning baselines
#
# For every evaluation set, k ∈ `ks` and data seed: k balanced, shuffled demonstrations from the
# training pool (MNLI train for HANS), then the query. The prediction is the verbalizer with the
# higher log-probability at the answer position (**score accuracy**); the full-vocabulary top-1 and
# the share of non-verbalizer top-1 predictions are reported too. The demonstration prefix is
# encoded once per (k, seed) and its key/value cache reused for every batch of queries.
#
# Every row records model, pattern, k, seed, sizes, versions, git commit, hardware, wall time and
# peak memory; rows already in `icl.csv` are skipped (set `force=True` to recompute).

# %% tags=["parameters"]
profile: str = "smoke"  # name of the run; results go to results/<profile>/ unless results_dir is set
results_dir: str = ""  # folder written by 01_data_prep; empty: $LLMFT_RESULTS_DIR, else results/<profile>
model: str = "smollm2-135m"  # embedded name, Hugging Face id or local model directory
pattern: str = "gpt-3"  # prompt pattern: minimal, gpt-3 or eval-harness
ks: list = [0, 4]  # numbers of demonstrations; 0 is zero-shot; odd k: one extra of a seeded label
seeds: list = [0]  # data seeds for the demonstrations (k > 0)
batch_size: int = 8  # queries per forward pass
max_batch_tokens: int = 0  # > 0: batches of up to this many padded tokens instead of batch_size queries (GPUs)
device: str = "auto"  # auto, cpu or cuda
dtype: str = "auto"  # auto (float32 on CPU, tf32 on CUDA: both measured faithful), float32, tf32, bfloat16, float16
on_too_long: str = "error"  # prompts longer than the context: error, or skip (counted in the table)
force: bool = False  # recompute rows that already exist

# %%
import pandas as pd

from llmft_utils import models, params, store
from llmft_utils.analysis import tables
from llmft_utils.study import icl_sweep
from llmft_utils.study.plan import EvalOptions, ICLPlan

params.validate_namespace(globals())  # every bad value at once, before the model loads
out = store.results_dir(results_dir, profile)
lm = models.load_model(model, device=device, dtype=dtype)
print(f"{lm.name}: {lm.n_params/1e6:.1f}M parameters, context {lm.max_context}, {lm.dtype} on {lm.device} ({lm.source})")

# %%
# the plan (pattern, ks, seeds) and the scoring options (batch size, too-long prompts, force, ...) from the parameters
table = icl_sweep.run_sweep(lm, out, ICLPlan.from_params(globals()), EvalOptions.from_params(globals()))

# %% [markdown]
# ## Results per run

# %%
# numbers vary in their last bits with the CPU: checked in code (tests/golden_check.py, docs/reproducibility.md)
rows = table  # the rows of this notebook's plan (earlier runs with other parameters stay in icl.csv)
cols = ["task", "split", "k", "seed", "n_eval", "majority_acc", "score_acc", "top1_acc", "non_verbalizer_frac",
        "pred_label1_frac", "prefix_tokens"]
print(rows[cols].sort_values(["task", "k", "seed"]).round(3).to_string(index=False))

# %% [markdown]
# Cost per run (wall time, per-query latency, tokens processed, peak memory and the working memory above what was resident):

# %%
cost = ["task", "k", "seed", "score_acc_lo", "score_acc_hi", "tokens_processed", "wall_s", "s_per_query",
        "peak_mem_mb", "peak_mem_delta_mb", "mem_kind"]
rows[cost].sort_values(["task", "k", "seed"]).round(4)

# %% [markdown]
# ## Mean over seeds with 95% t-intervals (one run for k = 0)

# %%
summary = tables.summarize(rows, ["task", "split", "k"], ["score_acc", "majority_acc", "s_per_query", "peak_mem_mb"])
summary.round(4)

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for (task, split), g in summary.groupby(["task", "split"]):
    g = g.sort_values("k")
    err = [g["score_acc_mean"] - g["score_acc_ci_lo"].fillna(g["score_acc_mean"]),
           g["score_acc_ci_hi"].fillna(g["score_acc_mean"]) - g["score_acc_mean"]]
    line = axes[0].errorbar(g["k"], g["score_acc_mean"], yerr=err, marker="o", capsize=3, label=f"{task}/{split}")
    axes[0].axhline(g["majority_acc_mean"].iloc[0], color=line[0].get_color(), ls=":", lw=1)
    axes[1].plot(g["k"], g["s_per_query_mean"] * 1000, marker="o", label=f"{task}/{split}")
axes[0].set(xlabel="demonstrations k", ylabel="score accuracy", title="ICL accuracy (dotted: majority class)")
axes[1].set(xlabel="demonstrations k", ylabel="ms per query", title="Per-query latency")
axes[0].legend(fontsize=8); fig.tight_layout()

# %%
# Checks: one row per planned run, sizes as declared in the manifest, metrics in range.
manifest = __import__("llmft_utils.data", fromlist=["x"]).load_manifest(out)
expected = sum(len(seeds) if k > 0 else 1 for k in ks) * len(manifest["eval_sets"])
assert len(rows) == expected, (len(rows), expected)
for _, r in rows.iterrows():
    info = manifest["eval_sets"][f"{r.task}/{r.split}"]
    assert r.n_eval + r.n_skipped_too_long == info["n"], r.run_key
    if r.n_eval == 0:  # every prompt too long and skipped: recorded as such, never scored 0
        assert pd.isna(r.score_acc) and pd.isna(r.majority_acc), r.run_key
        continue
    assert 0.0 <= r.score_acc <= 1.0 and 0.0 <= r.non_verbalizer_frac <= 1.0
    assert abs(r.majority_acc - info["majority_acc"]) < 1e-9 or r.n_skipped_too_long > 0
print("ok:", len(rows), "rows")
