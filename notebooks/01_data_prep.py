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
# # 01 · Data preparation
#
# Loads RTE, binary MNLI and HANS, validates every row, fixes the evaluation subsets of the chosen
# profile and writes them with a manifest to the results folder. The later notebooks read only those
# files.
#
# * **Sources**: `data_dir` (or `$LLMFT_DATA_DIR`, e.g. `../shared/data`), else the Hugging Face Hub.
# * **Binary labels** (llmft): 0 = entailment → " Yes", 1 = not entailment → " No"; MNLI drops *neutral*
#   and maps *contradiction* to 1; HANS *non-entailment* → 1. With `extra_eval_sets` (the `full` and `gpu`
#   profile): MNLI-mismatched and ANLI like MNLI; QQP *duplicate* and PAWS-QQP *paraphrase* → 0, the rest → 1.
# * **Subsets**: stratified by label (by subcase for HANS) with a fixed seed; `0` means the whole split.
# * **Development split**: `dev_n` rows per demonstration pool, held out of it (never a demonstration or a
#   transfer query); recipe choices are made there (`tools/select_recipe.py`), the evaluation sets only report.

# %% tags=["parameters"]
profile: str = "smoke"  # name of the run; results go to results/<profile>/ unless results_dir is set
data_dir: str = ""  # local data mirror; empty: $LLMFT_DATA_DIR, else the Hugging Face Hub
results_dir: str = ""  # output folder; empty: $LLMFT_RESULTS_DIR, else results/<profile>
mnli_eval_n: int = 40  # MNLI-binary validation_matched rows, stratified by label; 0 keeps all 6692
rte_eval_n: int = 20  # RTE validation rows, stratified by label; 0 keeps all 277
hans_eval_n: int = 30  # HANS rows, equal per subcase; 0 keeps all 30000
extra_eval_sets: list = []  # beyond MNLI/RTE/HANS: mnli_mismatched/validation, qqp/heldout, paws_qqp/dev_and_test, anli/dev_r1..3
qqp_eval_n: int = 1000  # QQP rows held out of its train subset as its evaluation set (qqp/heldout), stratified
eval_seed: int = 0  # seed of the fixed evaluation subsets
dev_n: int = 16  # development rows held out of each demonstration pool (recipe choices are made there); 0: none

# %%
import pandas as pd

from llmft_utils import data, params, store

params.validate_namespace(globals(), check_model=False)  # every bad value at once, before anything is written
out = store.results_dir(results_dir, profile)
sizes = {"mnli": mnli_eval_n, "rte": rte_eval_n, "hans": hans_eval_n, "mnli_mismatched": mnli_eval_n, "qqp": qqp_eval_n}
manifest, stats = data.prepare_study_data(out, data.STUDY_EVAL_SETS + tuple(extra_eval_sets), sizes,
                                            data_dir=data_dir or None, seed=eval_seed, dev_n=dev_n)
print("results folder:", out.name)
print("sources (files relative to the data folder: data_dir, else $LLMFT_DATA_DIR, else ../shared/data):")
for name, info in {**manifest["eval_sets"], **manifest["demo_pools"], **manifest.get("dev_sets", {})}.items():
    print(f"{name:28s} <- {info['source']}")

# %% [markdown]
# ## Split statistics and majority-class baselines

# %%
# NBVAL_CHECK_OUTPUT
stats.round(4)

# %% [markdown]
# HANS: the evaluation subset keeps every heuristic and subcase (1,000 of each in the full set).

# %%
# NBVAL_CHECK_OUTPUT
hans = data.read_prepared(out / manifest["eval_sets"]["hans/validation"]["file"])
hans.groupby(["heuristic", "label"]).size().unstack("label")

# %% [markdown]
# ## Repeated pairs
#
# A (premise, hypothesis) pair that occurs twice in one file is kept once (the first copy; twins with
# different labels are refused), and a pool row that is the twin of an evaluation row is dropped from the
# pool, so no demonstration or transfer query repeats an evaluation query. Counted per split here; every
# one is listed with file:line in `manifest.json` (`duplicates`, `eval_twins`).

# %%
# NBVAL_CHECK_OUTPUT
splits = {**manifest["eval_sets"], **manifest["demo_pools"]}
first = lambda info: next((d["at"] + " = " + d["first"] for d in info.get("duplicates", [])), "")  # noqa: E731
pd.DataFrame({"split": list(splits), "repeated pairs dropped": [i.get("duplicates_dropped", 0) for i in splits.values()],
              "twins of evaluation rows dropped": [i.get("eval_twins_removed", 0) for i in splits.values()],
              "first repeat (file:line = first copy)": [first(i) for i in splits.values()]})

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.6))
s = stats.set_index("split")
(s[["n_label0", "n_label1"]].div(s["n"], axis=0)).plot.barh(stacked=True, ax=ax, color=["#4c72b0", "#dd8452"])
ax.set_xlabel("fraction of rows"); ax.set_ylabel(""); ax.legend(["entailment (Yes)", "not entailment (No)"], loc="lower right")
ax.set_title("Label balance"); fig.tight_layout()

# %%
# Checks: every evaluation set is binary, non-empty and sized as declared.
for name, info in manifest["eval_sets"].items():
    assert info["n"] > 0 and info["n_label0"] + info["n_label1"] == info["n"], name
    want = sizes.get(info["task"], 0)  # sets without a size parameter (PAWS-QQP, ANLI) are kept whole
    assert info["n"] == (want if 0 < want < info["full_size"] else info["full_size"]), (name, info["n"], want)
print("ok")
