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
# # 04 · Analysis
#
# Reads only the result tables of notebooks 02 and 03 (`icl.csv`, `cd.csv`, and the per-example
# prediction files for the HANS breakdown) and renders the study's summary table and figures into
# `figures/`. Means are over data seeds with 95% Student-t intervals (one run for zero-shot);
# the majority-class baseline of each evaluated set is shown beside every accuracy.

# %% tags=["parameters"]
profile: str = "smoke"  # name of the run; reads results/<profile>/ unless results_dir is set
results_dir: str = ""  # folder written by notebooks 01-03; empty: $LLMFT_RESULTS_DIR, else results/<profile>
model: str = "smollm2-135m"  # model whose runs the figures show (the summary table keeps every model)
pattern: str = "gpt-3"  # pattern whose runs the figures show (the summary table keeps every pattern)
compare_with: str = ""  # another results folder: every row, example and verdict compared with it (llmft-study compare)

# %%
import pandas as pd

from llmft_utils import params, store
from llmft_utils.analysis import plots, tables
from llmft_utils.study import schema

params.validate_namespace(globals(), check_model=False)
out = store.results_dir(results_dir, profile)
icl = schema.read_table(out / "icl.csv")
cd = schema.read_table(out / "cd.csv")
all_runs, skipped = tables.evaluated(tables.unify(icl, cd))
if len(skipped):  # every prompt longer than the context: recorded in the tables, left out of every mean
    print(f"left out: {len(skipped)} runs that evaluated nothing:", ", ".join(skipped["run_key"]))
summary_all = tables.summary_table(all_runs)
schema.write_table(summary_all, out / "summary.csv")
runs = all_runs[(all_runs["model"] == model) & (all_runs["pattern"] == pattern)]
summary = summary_all[(summary_all["model"] == model) & (summary_all["pattern"] == pattern)]
assert len(runs), f"no rows for model={model!r}, pattern={pattern!r}; have {sorted(set(all_runs['model']))}"
print(f"{len(icl)} ICL rows, {len(cd)} CD/PBFT rows -> summary.csv with {len(summary_all)} rows; "
      f"figures for {model} / {pattern}")

# %% [markdown]
# ## Summary: accuracy per evaluation set and method
#
# `score_acc`: verbalizer-score accuracy; `acc_label0` / `acc_label1`: accuracy on entailment /
# non-entailment examples (for HANS: the heuristic-consistent and heuristic-inconsistent halves);
# `train_task`: where the labelled signal came from (demonstration pool or training task).

# %%
# numbers vary in their last bits with the CPU: checked in code (tests/golden_check.py, docs/reproducibility.md)
cols = ["eval_set", "train_task", "method_label", "n_seeds", "score_acc_mean", "score_acc_ci_lo", "score_acc_ci_hi",
        "acc_label0_mean", "acc_label1_mean", "majority_acc_mean"]
print(summary[cols].round(3).to_string(index=False))

# %% [markdown]
# ## Balanced accuracy, calibration and answer format
#
# `balanced_acc`: mean of the two per-label accuracies (0.5 for any constant answer; the always-majority and
# always-minority baselines are `majority_acc` and `minority_acc`); `ece`: expected calibration error of the
# verbalizer distribution (10 bins); `non_verbalizer_frac`: share of queries whose full-vocabulary top-1
# token is not an answer word (the *format*: a student that forgets to answer " Yes"/" No" shows it here).

# %%
cols = ["eval_set", "train_task", "method_label", "balanced_acc_mean", "majority_acc_mean", "minority_acc_mean",
        "ece_mean", "non_verbalizer_frac_mean"]
print(summary[[c for c in cols if c in summary]].round(3).to_string(index=False))

# %% [markdown]
# ## Raw vs calibrated
#
# Two label-bias corrections applied after scoring, to every scorer (`llmft_utils.calibration`):
# *contextual* (Zhao et al. 2021: divide by the answer distribution on content-free inputs such as "N/A"
# with the same demonstrations) and *batch* (Zhou et al. 2023: divide by the mean answer distribution over
# the evaluation set). What a method keeps after them is not label bias. (Runs that predate the columns
# show NaN.)

# %%
cols = ["eval_set", "train_task", "method_label", "score_acc_mean", "score_acc_contextual_mean", "score_acc_batch_mean"]
if {"score_acc_contextual_mean", "score_acc_batch_mean"} <= set(summary):
    print(summary[cols].round(3).to_string(index=False))
else:
    print("no calibrated columns in these rows (they predate them)")

# %% [markdown]
# ## The study's contrasts: effect sizes with intervals over seeds and examples
#
# Declared in code before any result (`llmft_utils.analysis.contrasts`: four primary contrasts, the
# equivalence margin 0.05, the secondary ones): per evaluation set, the paired difference a − b on the same
# examples (accuracy, or agreement with the ICL teacher), its 95% interval from a two-way cluster bootstrap
# (seeds and examples resampled), the example-level and the seed-level (t over seeds) intervals in their own
# columns, Holm-adjusted p within each family and, for "matches" claims, a TOST equivalence test. A verdict
# needs the two-way and the seed-level intervals to exclude 0 and Holm p < 0.05; "equivalent" needs TOST p < 0.05
# and the seed-level interval inside ±0.05; anything else is "undecided" (`contrasts.csv`).

# %%
from llmft_utils.analysis import contrasts

con = contrasts.contrast_table(runs, out)
if len(con):
    schema.write_table(con, out / "contrasts.csv")
    show = ["family", "contrast", "eval_set", "n_seeds", "n_examples", "estimate", "ci_lo", "ci_hi", "ci_examples_lo",
            "ci_examples_hi", "ci_seeds_lo", "ci_seeds_hi", "p", "p_holm", "p_equivalence", "verdict"]
    print(con[show].round(3).to_string(index=False))
elif (out / "contrasts.csv").is_file():
    print(schema.read_table(out / "contrasts.csv").to_string(index=False))
else:
    print("no contrast has its prediction files in these rows")

# %% [markdown]
# ## Does the student copy its teacher, per example?
#
# Agreement with the teacher (the ICL run with the same demonstrations) of the CD student, the zero-shot
# model, and the controls: two that copy only the teacher's label bias, a constant (always the teacher's
# majority label) and the zero-shot model re-thresholded to the teacher's label rate (bias-matched); and,
# where the profile trains them (`controls`, `control_tasks`), two control *students* with the CD recipe on
# the same transfer queries: `shuffled` (the teacher's targets permuted across the queries: the label rate
# is kept, which target belongs to which query is not) and `self` (k = 0: the zero-shot model's own
# targets). Transfer is claimed only where the student beats every control present, each by an exact
# McNemar test at p < 0.05 (`beats_controls`, `controls_checked`; `transfer_checks.csv`).

# %%
checks = tables.transfer_checks(runs)
schema.write_table(checks, out / "transfer_checks.csv")
decided = checks["beats_controls"].dropna()
print(f"CD beats both controls in {int(decided.astype(bool).sum())} of {len(decided)} student × evaluation-set checks"
      + (f" ({len(checks) - len(decided)} predate the controls: not decided)" if len(decided) < len(checks) else ""))
show = ["eval_set", "train_task", "k", "seed", "agree_teacher_student", "agree_teacher_zeroshot", "agree_teacher_constant",
        "agree_teacher_bias_matched", "agree_teacher_shuffled", "agree_teacher_self", "beats_controls"]
print(checks[show].round(3).to_string(index=False))

# %% [markdown]
# ## ... and in distribution?
#
# Per example, KL(teacher ‖ student) against KL(teacher ‖ control) over the verbalizers, with a two-sided
# Wilcoxon signed-rank test of the paired differences (`closer_than_<control>`: lower mean KL at p < 0.05;
# `distribution_checks.csv`). The first control, for every student: the constant distribution at the teacher's
# mean answer distribution (`teacher_mean`: the label bias, nothing per example); then the control students. A student can be closer to its teacher's *probabilities* than a
# control without agreeing with more of its *labels*.

# %%
dist = tables.distribution_checks(runs, out)
if len(dist):
    schema.write_table(dist, out / "distribution_checks.csv")
    print(dist.drop(columns=["model", "pattern", "config"]).round(4).to_string(index=False))
elif (out / "distribution_checks.csv").is_file():  # tables without prediction files: the stored result
    print(schema.read_table(out / "distribution_checks.csv").round(4).to_string(index=False))
else:
    print("no CD student with control students (or no prediction files) in these rows")

# %% [markdown]
# ## Paired tests after calibration
#
# Exact McNemar tests of "right after calibration" on the same examples, per seed: ICL against the
# zero-shot model, and CD against the zero-shot model, its control students and PBFT
# (`calibrated_checks.csv`). Counts of seeds significantly above / below at p < 0.05, raw and after Holm's
# correction over every test of the table (one family: `p_holm`, `direction_holm`; `p_bh` for the FDR).

# %%
cal = tables.calibrated_checks(runs, out)
if len(cal):
    schema.write_table(cal, out / "calibrated_checks.csv")
    for col in ("direction", "direction_holm"):
        counts = (cal.groupby(["eval_set", "a", "b", "calibration"])[col].value_counts().unstack(fill_value=0))
        print(f"{col} ({len(cal)} tests):\n{counts.to_string()}\n")
elif (out / "calibrated_checks.csv").is_file():
    print(schema.read_table(out / "calibrated_checks.csv").to_string(index=False))
else:
    print("no calibrated predictions in these rows (they predate them, or no prediction files)")

# %% [markdown]
# ## Paired tests on the same examples
#
# Per student group: in how many seeds the student is significantly above or below (exact McNemar,
# p < 0.05) its teacher, the PBFT student of the same seed and the zero-shot model, and (ensemble students)
# single-prompt CD and ICL (`n_seeds_tested_*`: seeds with the test; the rest of the tested seeds are not
# significant either way).

# %%
paired = [c for c in summary if c.startswith("n_seeds_")]
if paired:
    st = summary[summary["method_label"].str.startswith(("CD", "PBFT"))]
    print(st[["eval_set", "train_task", "method_label"] + paired].to_string(index=False))

# %% [markdown]
# ## Teacher ensembles: more demonstrations than one prompt holds
#
# A teacher ensemble is m prompts with m disjoint demonstration sets of k (m·k demonstrations; set 0 is the
# single-prompt teacher's). At inference (`icl_ensemble`) every query pays m forwards; distilled into one
# student (`cd_ensemble`, the same transfer queries as CD) it answers at zero-shot cost. Per seed and
# evaluation set, exact McNemar tests on the same examples: the ensemble student against single-prompt CD, against
# single-prompt ICL at the largest k run (`icl_k`) and against its teacher; the ensemble at inference
# against single-prompt ICL (`ensemble_checks.csv`). The finding below is written from these numbers. Then the
# ensemble at inference against its own members, from the member predictions it stores
# (`ensemble_members.csv`): its mean member (difference with a 95% interval over the examples) and its best
# member (exact McNemar; the best is picked on these same examples, which favours it), and each member's
# label-1 rate, which says whether the members' label biases could cancel.

# %%
ens = tables.ensemble_checks(runs)
if len(ens):
    schema.write_table(ens, out / "ensemble_checks.csv")
    show = ["eval_set", "train_task", "k", "m", "seed", "acc_zeroshot", "acc_icl", "acc_icl_ensemble", "acc_cd",
            "acc_cd_ensemble", "cd_ensemble_vs_cd", "cd_ensemble_vs_icl", "cd_ensemble_vs_teacher", "icl_ensemble_vs_icl"]
    print(ens[show].round(3).to_string(index=False))
print(tables.ensemble_finding(ens))
members = tables.ensemble_members(runs, out)
if len(members):
    schema.write_table(members, out / "ensemble_members.csv")
    print(members[["eval_set", "seed", "m", "acc_icl_ensemble", "acc_member_mean", "ensemble_minus_mean_member",
                   "ci_lo", "ci_hi", "acc_member_best", "p_vs_best_member", "vs_best_member", "member_label1_fracs",
                   "gold_label1_frac"]].round(3).to_string(index=False))

# %% [markdown]
# ## Accuracy against the number of demonstrations

# %%
figs = {}
figs["accuracy_vs_k"] = plots.accuracy_vs_k(summary)

# %% [markdown]
# ## Accuracy against the demonstrations behind each method, raw and calibrated
#
# k for ICL and CD, m·k for the teacher ensembles, n for PBFT. The bottom row is after batch calibration:
# what is left when the label bias is removed.

# %%
figs["accuracy_vs_total_demos"] = plots.accuracy_vs_total_demos(runs)

# %% [markdown]
# ## In-domain vs out-of-domain (MNLI → HANS)

# %%
figs["in_vs_out_of_domain"] = plots.in_vs_out_of_domain(summary)

# %% [markdown]
# ## Inference cost against k: ICL vs the CD student

# %%
figs["cost_vs_k"] = plots.cost_vs_k(runs)

# %% [markdown]
# ## When does distilling pay?
#
# CD costs a teacher pass and a training run once, then answers at zero-shot cost; ICL pays for its
# prompt with every query — little with the demonstrations' KV cache reused, much more without
# (`s_per_query_full_prompt`, timed on a sample of each ICL run). Break-even = one-off cost / per-query
# saving, in queries (`break_even.csv`; means over seeds; wall time on this run's hardware).

# %%
breakeven = tables.break_even(runs)
schema.write_table(breakeven, out / "break_even.csv")
if len(breakeven):
    print(breakeven[["eval_set", "k", "s_per_query_icl", "s_per_query_full_prompt", "s_per_query_student",
                     "cd_once_s", "break_even_cached", "break_even_full"]].round(4).to_string(index=False))
figs["break_even"] = plots.cost_break_even(breakeven)

# %% [markdown]
# ## HANS by heuristic and subcase

# %%
sub_path = out / "hans_subcases.csv"
try:
    subcases = tables.hans_subcases(runs, out)
    schema.write_table(subcases, sub_path)
except FileNotFoundError as e:  # a checkout with the committed tables but without prediction files
    print(f"prediction files not found ({e}); using {sub_path.name}")
    subcases = schema.read_table(sub_path)
figs["hans_subcases"] = plots.hans_heatmap(subcases)

# %% [markdown]
# ## Training cost: CD vs PBFT

# %%
figs["training_cost"] = plots.training_cost(runs)
if (out / "train_log.csv").is_file():  # written by notebook 03 (per batch: loss, lr, gradient norm)
    figs["loss_curves"] = plots.loss_curves(schema.read_table(out / "train_log.csv"))
else:
    print("no train_log.csv (notebook 03 writes it): no loss curves")
for name, fig in figs.items():
    plots.save(fig, out / "figures", name)
print("figures:", ", ".join(sorted(p.name for p in (out / "figures").glob("*.png"))))

# %% [markdown]
# ## Explorer (interactive in JupyterLab)
#
# One evaluation set, one method family, one metric: bars are the mean over seeds (one run where there is one
# seed), whiskers the same 95% intervals as the summary table (t over seeds; one run: Wilson over the examples),
# the dashed line the majority class for accuracies. Memory is the measured tensor memory, not the process's.

# %%
import ipywidgets as w
import matplotlib.pyplot as plt


def explore(eval_set, method, metric):
    t = tables.explorer_table(runs, eval_set, method, metric)
    if t.empty:
        print(f"no {method} runs with {metric} on {eval_set}"); return
    base = tables.explorer_baseline(runs, eval_set, metric)
    # the chart first, as a finished image, then the text: drawn the other way round, JupyterLab shows the
    # redrawn chart blank after a dropdown change (tests/test_lab_browser.py)
    fig = plots.explorer_chart(t, metric, base)
    display(fig); plt.close(fig)
    print(tables.explorer_caption(t, metric, base))
    display(t.round(4))


w.interact(explore, eval_set=sorted(runs["eval_set"].unique()), method=list(tables.METHOD_FAMILIES),
           metric=tables.explorer_metrics(runs));

# %% [markdown]
# ## Against another run
#
# With `compare_with` set (e.g. `results/reference`, or the same study on another machine): per row both
# accuracies, per-example agreement and the largest |delta log-prob|, then every claim's verdict in both
# runs (docs/reproducibility.md for the tolerances).

# %%
if compare_with:
    from llmft_utils import compare

    print(compare.compare(compare_with, out).report())

# %%
# Checks: the summary is exactly recomputable from the raw rows, and every figure was written.
again = tables.summary_table(tables.unify(schema.read_table(out / "icl.csv"),
                                            schema.read_table(out / "cd.csv")))
pd.testing.assert_frame_equal(again, schema.read_table(out / "summary.csv"), check_dtype=False, atol=1e-12)
assert len(summary) == len(again[(again["model"] == model) & (again["pattern"] == pattern)])
assert {p.stem for p in (out / "figures").glob("*.png")} >= set(figs)
print("ok")
