"""Regenerate the study notebooks' source cells (outputs are produced by running them).

The notebooks are the source of truth users edit in JupyterLab; this script exists so that their
structure (one tagged ``parameters`` cell, thin code cells) is reviewable as code. Run:
``LLMFT_RESULTS_DIR=$(mktemp -d) python tools/make_notebooks.py --execute`` (stores smoke-profile outputs,
which nbval compares in the cells marked ``# NBVAL_CHECK_OUTPUT``).
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent / "notebooks"


def params_cell(src: str):
    return new_code_cell(src.strip(), metadata={"tags": ["parameters"]})


def checked(src: str):
    """A cell whose output nbval compares (deterministic data only)."""
    return new_code_cell("# NBVAL_CHECK_OUTPUT\n" + src.strip())


def code(src: str):
    return new_code_cell(src.strip())


def md(src: str):
    return new_markdown_cell(src.strip())


def save(name: str, cells) -> None:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating a notebook does not churn its diff
        cell.id = f"{Path(name).stem[:2]}-{i:02d}"
    nbformat.write(nb, ROOT / name)


DATA_PREP = [
    md("""
# 01 · Data preparation

Loads RTE, binary MNLI and HANS, validates every row, fixes the evaluation subsets of the chosen
profile and writes them with a manifest to the results folder. The later notebooks read only those
files.

* **Sources**: `data_dir` (or `$LLMFT_DATA_DIR`, e.g. `../shared/data`), else the Hugging Face Hub.
* **Binary labels** (llmft): 0 = entailment → " Yes", 1 = not entailment → " No"; MNLI drops *neutral*
  and maps *contradiction* to 1; HANS *non-entailment* → 1.
* **Subsets**: stratified by label (by subcase for HANS) with a fixed seed; `0` means the whole split.
"""),
    params_cell("""
profile: str = "smoke"  # name of the run; results go to results/<profile>/ unless results_dir is set
data_dir: str = ""  # local data mirror; empty: $LLMFT_DATA_DIR, else the Hugging Face Hub
results_dir: str = ""  # output folder; empty: $LLMFT_RESULTS_DIR, else results/<profile>
mnli_eval_n: int = 40  # MNLI-binary validation_matched rows, stratified by label; 0 keeps all 6692
rte_eval_n: int = 20  # RTE validation rows, stratified by label; 0 keeps all 277
hans_eval_n: int = 30  # HANS rows, equal per subcase; 0 keeps all 30000
eval_seed: int = 0  # seed of the fixed evaluation subsets
"""),
    code("""
import pandas as pd
from llmft_utils import data, params, results

params.validate_namespace(globals(), check_model=False)  # every bad value at once, before anything is written
out = results.results_dir(results_dir, profile)
sizes = {"mnli": mnli_eval_n, "rte": rte_eval_n, "hans": hans_eval_n}
manifest, stats = data.prepare_study_data(out, data.STUDY_EVAL_SETS, sizes, data_dir=data_dir or None, seed=eval_seed)
print("results folder:", out.name)
for name, info in {**manifest["eval_sets"], **manifest["demo_pools"]}.items():
    print(f"{name:28s} <- {info['source']}")
"""),
    md("## Split statistics and majority-class baselines"),
    checked("""
stats.round(4)
"""),
    md("HANS: the evaluation subset keeps every heuristic and subcase (1,000 of each in the full set)."),
    checked("""
hans = data.read_prepared(out / manifest["eval_sets"]["hans/validation"]["file"])
hans.groupby(["heuristic", "label"]).size().unstack("label")
"""),
    code("""
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.6))
s = stats.set_index("split")
(s[["n_label0", "n_label1"]].div(s["n"], axis=0)).plot.barh(stacked=True, ax=ax, color=["#4c72b0", "#dd8452"])
ax.set_xlabel("fraction of rows"); ax.set_ylabel(""); ax.legend(["entailment (Yes)", "not entailment (No)"], loc="lower right")
ax.set_title("Label balance"); fig.tight_layout()
"""),
    code("""
# Checks: every evaluation set is binary, non-empty and sized as declared.
for name, info in manifest["eval_sets"].items():
    assert info["n"] > 0 and info["n_label0"] + info["n_label1"] == info["n"], name
    want = sizes[info["task"]]
    assert info["n"] == (want if 0 < want < info["full_size"] else info["full_size"]), (name, info["n"], want)
print("ok")
"""),
]

ICL = [
    md("""
# 02 · In-context learning baselines

For every evaluation set, k ∈ `ks` and data seed: k balanced, shuffled demonstrations from the
training pool (MNLI train for HANS), then the query. The prediction is the verbalizer with the
higher log-probability at the answer position (**score accuracy**); the full-vocabulary top-1 and
the share of non-verbalizer top-1 predictions are reported too. The demonstration prefix is
encoded once per (k, seed) and its key/value cache reused for every batch of queries.

Every row records model, pattern, k, seed, sizes, versions, git commit, hardware, wall time and
peak memory; rows already in `icl.csv` are skipped (set `force=True` to recompute).
"""),
    params_cell("""
profile: str = "smoke"  # name of the run; results go to results/<profile>/ unless results_dir is set
results_dir: str = ""  # folder written by 01_data_prep; empty: $LLMFT_RESULTS_DIR, else results/<profile>
model: str = "smollm2-135m"  # embedded name, Hugging Face id or local model directory
pattern: str = "gpt-3"  # prompt pattern: minimal, gpt-3 or eval-harness
ks: list = [0, 4]  # numbers of demonstrations, even; 0 is zero-shot
seeds: list = [0]  # data seeds for the demonstrations (k > 0)
batch_size: int = 8  # queries per forward pass
max_batch_tokens: int = 0  # > 0: batches of up to this many padded tokens instead of batch_size queries (GPUs)
device: str = "auto"  # auto, cpu or cuda
dtype: str = "auto"  # auto (float32 on every device), float32, bfloat16 or float16
on_too_long: str = "error"  # prompts longer than the context: error, or skip (counted in the table)
force: bool = False  # recompute rows that already exist
"""),
    code("""
import pandas as pd
from llmft_utils import icl, models, params, results

params.validate_namespace(globals())  # every bad value at once, before the model loads
out = results.results_dir(results_dir, profile)
lm = models.load_model(model, device=device, dtype=dtype)
print(f"{lm.name}: {lm.n_params/1e6:.1f}M parameters, context {lm.max_context}, {lm.dtype} on {lm.device} ({lm.source})")
"""),
    code("""
table = icl.run_sweep(lm, out, pattern, ks, seeds, batch_size=batch_size, on_too_long=on_too_long,
                      force=force, model_name=model, profile=profile, max_tokens=max_batch_tokens)
"""),
    md("## Results per run"),
    checked("""
rows = table  # the rows of this notebook's plan (earlier runs with other parameters stay in icl.csv)
cols = ["task", "split", "k", "seed", "n_eval", "majority_acc", "score_acc", "top1_acc", "non_verbalizer_frac",
        "pred_label1_frac", "prefix_tokens"]
print(rows[cols].sort_values(["task", "k", "seed"]).round(3).to_string(index=False))
"""),
    md("Cost per run (wall time, per-query latency, tokens processed, peak memory and the working memory above what was resident):"),
    code("""
cost = ["task", "k", "seed", "score_acc_lo", "score_acc_hi", "tokens_processed", "wall_s", "s_per_query",
        "peak_mem_mb", "peak_mem_delta_mb", "mem_kind"]
rows[cost].sort_values(["task", "k", "seed"]).round(4)
"""),
    md("## Mean over seeds with 95% t-intervals (one run for k = 0)"),
    code("""
summary = results.summarize(rows, ["task", "split", "k"], ["score_acc", "majority_acc", "s_per_query", "peak_mem_mb"])
summary.round(4)
"""),
    code("""
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
"""),
    code("""
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
"""),
]

CD = [
    md("""
# 03 · Context distillation and PBFT

**CD**: the teacher is the frozen base model with the k demonstrations of an ICL run (same demos, same
seed as notebook 02); its answer distribution on N unlabelled training queries (disjoint from the
demonstrations and from every evaluation query) is computed once and cached in `teacher_cache/`.
A copy of the model — the student — sees only the query and is trained to match that distribution
(forward KL over the verbalizers by default) with `accelerate`.

**PBFT**: the same loop with α = 1 — cross-entropy on gold labels of the n labelled demonstrations,
no teacher.

Every student is evaluated zero-shot with exactly the evaluation code of notebook 02, in-domain and
on HANS, and compared with its ICL teacher and with the untrained zero-shot model: agreement, Cohen's
κ, and mean KL(teacher ‖ ·) over the verbalizer distribution (agreement alone misleads when a teacher
answers "No" to almost everything).
"""),
    params_cell("""
profile: str = "smoke"  # name of the run; results go to results/<profile>/ unless results_dir is set
results_dir: str = ""  # folder written by notebooks 01 and 02; empty: $LLMFT_RESULTS_DIR, else results/<profile>
model: str = "smollm2-135m"  # must match the model of notebook 02 (its ICL runs are the teachers)
pattern: str = "gpt-3"  # prompt pattern, as in notebook 02
cd_tasks: list = ["mnli", "rte"]  # in-domain training tasks
ood_train_tasks: list = ["mnli", "rte"]  # tasks whose students are also evaluated out of domain on HANS
cd_ks: list = [4]  # teacher demonstrations k for CD
seeds: list = [0]  # data seeds, as in notebook 02
n_transfer: int = 16  # unlabelled transfer queries per CD student
pbft_n: int = 4  # labelled examples per PBFT student: the ICL demonstrations of k equal to pbft_n; 0 skips PBFT
target: str = "verbalizer"  # distillation support: verbalizer, topk or full
topk: int = 20  # support size when target is topk
loss: str = "forward_kl"  # forward_kl, reverse_kl or jsd
temperature: float = 1.0  # distillation temperature (loss scaled by its square)
alpha: float = 0.0  # weight of gold-label cross-entropy in CD (1.0 is PBFT)
epochs: int = 1  # passes over the transfer set
pbft_epochs: int = 1  # passes over the labelled examples for PBFT
pbft_lr: float = 1e-4  # AdamW peak learning rate for PBFT (few examples, few steps: higher than CD's)
train_batch_size: int = 8  # examples per optimisation step
lr: float = 1e-4  # AdamW peak learning rate (full fine-tuning)
lr_schedule: str = "linear"  # linear (10% warm-up, decay to 0) or constant
mixed_precision: str = "bf16"  # student forward under bf16 autocast (weights float32); "no" for pure float32
lora_r: int = 0  # LoRA rank; 0 is full fine-tuning
save_students: str = "none"  # keep students as Hugging Face folders + model card: none, first, first_seed or all
log_with: str = ""  # experiment tracker for the training curves (tensorboard, wandb, ...; must be installed)
batch_size: int = 8  # queries per forward pass for teacher caching and evaluation
max_batch_tokens: int = 0  # > 0: batches of up to this many padded tokens instead of batch_size queries (GPUs)
device: str = "auto"  # auto, cpu or cuda
dtype: str = "auto"  # auto (float32 on every device), float32, bfloat16 or float16
force: bool = False  # retrain students whose rows already exist
"""),
    code("""
import pandas as pd
from llmft_utils import distill, models, params, results

params.validate_namespace(globals())  # every bad value at once, before the model loads
out = results.results_dir(results_dir, profile)
lm = models.load_model(model, device=device, dtype=dtype)
cfg = distill.config_from_params(globals())  # the recipe: target, loss, temperature, alpha, epochs, lr, ...
print(f"{lm.name}: {lm.n_params/1e6:.1f}M parameters on {lm.device}; {cfg}")
"""),
    code("""
table = distill.run_cd_sweep(lm, out, pattern, cd_tasks, cd_ks, seeds, n_transfer, pbft_n, cfg, pbft_epochs,
                             eval_batch_size=batch_size, force=force, model_name=model, profile=profile,
                             ood_train_tasks=ood_train_tasks, pbft_lr=pbft_lr, eval_max_tokens=max_batch_tokens,
                             save_students=save_students, log_with=log_with)
"""),
    md("## Students against their teachers and the zero-shot model"),
    checked("""
rows = table  # the rows of this notebook's plan (runs with other settings stay in cd.csv)
cols = ["method", "train_task", "task", "k", "seed", "n_train", "majority_acc", "zeroshot_acc", "teacher_acc",
        "score_acc", "agree_teacher_student", "agree_teacher_zeroshot", "agree_teacher_constant",
        "kappa_teacher_student", "kappa_teacher_zeroshot", "kl_teacher_student", "kl_teacher_zeroshot",
        "mcnemar_p_vs_zeroshot", "mcnemar_p_vs_teacher"]
print(rows[cols].sort_values(["method", "train_task", "task", "k", "seed"]).round(3).to_string(index=False))
"""),
    md("## Cost: teacher caching, training, student inference"),
    code("""
cost = ["method", "train_task", "task", "k", "seed", "teacher_cache_s", "teacher_cache_hit", "train_s",
        "train_peak_mem_mb", "train_mem_delta_mb", "loss_first", "loss_last", "s_per_query", "peak_mem_mb",
        "peak_mem_delta_mb"]
rows[cost].sort_values(["method", "train_task", "task", "k", "seed"]).round(4)
"""),
    code("""
summary = results.summarize(rows, ["method", "train_task", "task", "k"],
                            ["score_acc", "zeroshot_acc", "teacher_acc", "agree_teacher_student", "train_s"])
summary.round(4)
"""),
    code("""
# Checks: one row per student and evaluation set; CD rows carry teacher comparisons.
has_hans = (rows["task"] == "hans").any()
expected = sum(len(seeds) * (len(cd_ks) + (1 if pbft_n else 0)) * (2 if has_hans and t in ood_train_tasks else 1)
               for t in cd_tasks)
assert len(rows) == expected, (len(rows), expected)
cdr = rows[rows["method"] == "cd"]
assert cdr["agree_teacher_student"].between(0, 1).all() and (cdr["kl_teacher_student"] >= 0).all()
assert rows["score_acc"].between(0, 1).all() and (rows["train_s"] > 0).all()
print("ok:", len(rows), "rows")
"""),
]

ANALYSIS = [
    md("""
# 04 · Analysis

Reads only the result tables of notebooks 02 and 03 (`icl.csv`, `cd.csv`, and the per-example
prediction files for the HANS breakdown) and renders the study's summary table and figures into
`figures/`. Means are over data seeds with 95% Student-t intervals (one run for zero-shot);
the majority-class baseline of each evaluated set is shown beside every accuracy.
"""),
    params_cell("""
profile: str = "smoke"  # name of the run; reads results/<profile>/ unless results_dir is set
results_dir: str = ""  # folder written by notebooks 01-03; empty: $LLMFT_RESULTS_DIR, else results/<profile>
model: str = "smollm2-135m"  # model whose runs the figures show (the summary table keeps every model)
pattern: str = "gpt-3"  # pattern whose runs the figures show (the summary table keeps every pattern)
"""),
    code("""
import pandas as pd
from llmft_utils import params, plots, results

params.validate_namespace(globals(), check_model=False)
out = results.results_dir(results_dir, profile)
icl = results.ResultTable(out / "icl.csv").read()
cd = results.ResultTable(out / "cd.csv").read()
all_runs, skipped = results.evaluated(results.unify(icl, cd))
if len(skipped):  # every prompt longer than the context: recorded in the tables, left out of every mean
    print(f"left out: {len(skipped)} runs that evaluated nothing:", ", ".join(skipped["run_key"]))
summary_all = results.summary_table(all_runs)
results.atomic_write_csv(summary_all, out / "summary.csv")
runs = all_runs[(all_runs["model"] == model) & (all_runs["pattern"] == pattern)]
summary = summary_all[(summary_all["model"] == model) & (summary_all["pattern"] == pattern)]
assert len(runs), f"no rows for model={model!r}, pattern={pattern!r}; have {sorted(set(all_runs['model']))}"
print(f"{len(icl)} ICL rows, {len(cd)} CD/PBFT rows -> summary.csv with {len(summary_all)} rows; "
      f"figures for {model} / {pattern}")
"""),
    md("""
## Summary: accuracy per evaluation set and method

`score_acc`: verbalizer-score accuracy; `acc_label0` / `acc_label1`: accuracy on entailment /
non-entailment examples (for HANS: the heuristic-consistent and heuristic-inconsistent halves);
`train_task`: where the labelled signal came from (demonstration pool or training task).
"""),
    checked("""
cols = ["eval_set", "train_task", "method_label", "n_seeds", "score_acc_mean", "score_acc_ci_lo", "score_acc_ci_hi",
        "acc_label0_mean", "acc_label1_mean", "majority_acc_mean"]
print(summary[cols].round(3).to_string(index=False))
"""),
    md("## Accuracy against the number of demonstrations"),
    code("""
figs = {}
figs["accuracy_vs_k"] = plots.accuracy_vs_k(summary)
"""),
    md("## In-domain vs out-of-domain (MNLI → HANS)"),
    code("""
figs["in_vs_out_of_domain"] = plots.in_vs_out_of_domain(summary)
"""),
    md("## Inference cost against k: ICL vs the CD student"),
    code("""
figs["cost_vs_k"] = plots.cost_vs_k(runs)
"""),
    md("## HANS by heuristic and subcase"),
    code("""
sub_path = out / "hans_subcases.csv"
try:
    subcases = results.hans_subcases(runs, out)
    results.atomic_write_csv(subcases, sub_path)
except FileNotFoundError as e:  # a checkout with the committed tables but without prediction files
    print(f"prediction files not found ({e}); using {sub_path.name}")
    subcases = pd.read_csv(sub_path)
figs["hans_subcases"] = plots.hans_heatmap(subcases)
"""),
    md("## Training cost: CD vs PBFT"),
    code("""
figs["training_cost"] = plots.training_cost(runs)
if (out / "train_log.csv").is_file():  # written by notebook 03 (per batch: loss, lr, gradient norm)
    figs["loss_curves"] = plots.loss_curves(results.ResultTable(out / "train_log.csv").read())
else:
    print("no train_log.csv (notebook 03 writes it): no loss curves")
for name, fig in figs.items():
    plots.save(fig, out / "figures", name)
print("figures:", ", ".join(sorted(p.name for p in (out / "figures").glob("*.png"))))
"""),
    md("## Explorer (interactive in JupyterLab)"),
    code("""
import ipywidgets as w
import matplotlib.pyplot as plt

def explore(eval_set, method, metric):
    g = runs[(runs["eval_set"] == eval_set) & (runs["method_label"].str.startswith(method) | (method == "all"))]
    if g.empty:
        print("no runs"); return
    t = g.groupby(["method_label", "train_task"])[metric].agg(["mean", "std", "count"]).round(4)
    # the chart first, as a finished image, then the table: drawn the other way round, JupyterLab shows the
    # redrawn chart blank after a dropdown change (tests/test_lab_browser.py)
    fig, ax = plt.subplots(figsize=(6, 2.4))
    t["mean"].plot.barh(ax=ax, xerr=t["std"].fillna(0), color="#4c72b0"); ax.set_xlabel(metric)
    display(fig); plt.close(fig)
    display(t)

w.interact(explore, eval_set=sorted(runs["eval_set"].unique()), method=["all", "zero-shot", "ICL", "CD", "PBFT"],
           metric=["score_acc", "acc_label0", "acc_label1", "top1_acc", "non_verbalizer_frac", "s_per_query",
                   "peak_mem_mb", "prompt_tokens", "train_s"]);
"""),
    code("""
# Checks: the summary is exactly recomputable from the raw rows, and every figure was written.
again = results.summary_table(results.unify(results.ResultTable(out / "icl.csv").read(),
                                            results.ResultTable(out / "cd.csv").read()))
pd.testing.assert_frame_equal(again, pd.read_csv(out / "summary.csv"), check_dtype=False, atol=1e-12)
assert len(summary) == len(again[(again["model"] == model) & (again["pattern"] == pattern)])
assert {p.stem for p in (out / "figures").glob("*.png")} >= set(figs)
print("ok")
"""),
]


def execute_in_place(name: str) -> None:
    """Run a notebook with its own (smoke) parameters and store its outputs, as nbval will compare them."""
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / name, as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nb.metadata.pop("widgets", None)  # progress-bar widget state: large and meaningless when stored
    for cell in nb.cells:  # smoke-run images are not worth their bytes; results/<profile>/executed keeps real ones
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if "image/png" not in o.get("data", {})]
            cell.metadata.pop("execution", None)  # run timestamps only churn the diff
    nbformat.write(nb, ROOT / name)


if __name__ == "__main__":
    import sys

    save("01_data_prep.ipynb", DATA_PREP)
    save("02_icl_baselines.ipynb", ICL)
    save("03_context_distillation.ipynb", CD)
    save("04_analysis.ipynb", ANALYSIS)
    print("wrote", ", ".join(p.name for p in sorted(ROOT.glob("*.ipynb"))))
    if "--execute" in sys.argv:  # set LLMFT_RESULTS_DIR to a scratch folder first
        for name in ("01_data_prep.ipynb", "02_icl_baselines.ipynb", "03_context_distillation.ipynb", "04_analysis.ipynb"):
            execute_in_place(name)
            print("executed", name)
