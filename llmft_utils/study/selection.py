"""The CD recipe is chosen on the development split, never on the evaluation sets.

Notebook 01 holds ``dev_n`` rows out of each demonstration pool (``manifest["dev_sets"]``): they are never a
demonstration or a transfer query. :func:`run_selection` turns those dev sets into the evaluation sets of a
separate results folder and runs the study's own code there (``study.icl_sweep.run_sweep`` for the teachers and the
zero-shot model, ``study.cd_sweep.run_cd_sweep`` once per candidate recipe), so a candidate is scored exactly as
the study would score it. :func:`choose` applies the rule below, declared before any candidate ran:

    RULE: keep the candidates whose answer format stays within ``FORMAT_GAP`` of the teacher's on every
    task (mean over seeds of the student's share of queries whose full-vocabulary top-1 token is not a
    verbalizer, minus the teacher's); among them take the highest mean agreement with the teacher (over
    tasks and seeds); ties go to the earlier candidate. If none keeps the format, the smallest gap wins and
    the choice says that the format criterion failed.

``tools/select_recipe.py`` runs it for a profile and writes ``selection.csv`` and ``choice.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..store import atomic_write_json
from .cd_sweep import run_cd_sweep
from .icl_sweep import run_sweep
from .plan import CDPlan, EnsembleSpec, EvalOptions, ICLPlan
from .schema import read_table

FORMAT_GAP = 0.05
# candidate recipes: overrides of the profile's CD parameters, in order of preference on ties
CANDIDATES = {
    "verbalizer": {"target": "verbalizer"},
    "topk20": {"target": "topk", "topk": 20},
    "topk20-lr1e-4": {"target": "topk", "topk": 20, "lr": 1e-4},
}
RECIPE_KEYS = ("target", "topk", "loss", "temperature", "alpha", "epochs", "lr", "lr_schedule", "train_batch_size",
               "mixed_precision", "n_transfer")


def dev_manifest(study_manifest: dict) -> dict:
    """A manifest whose evaluation sets are the study's development sets (same prepared files)."""
    dev = study_manifest.get("dev_sets") or {}
    if not dev:
        raise ValueError("the prepared data has no development split: run notebook 01 with dev_n > 0")
    sets = {name: {**info, "demo_pool": info["held_out_of"], "full_size": info["n"], "subsampled": False}
            for name, info in dev.items()}
    return {**study_manifest, "eval_sets": sets}


def run_selection(lm, out_dir, p: dict, candidates: dict = CANDIDATES, tasks=None, k: int | None = None,
                  seeds=(0, 1), progress: bool = False) -> pd.DataFrame:
    """Score every candidate recipe on the development sets in ``out_dir`` (prepared by
    ``data.prepare_study_data(..., dev_n=...)``; its manifest is kept as ``manifest_study.json``). ``p``: the
    profile's parameters (the recipe each candidate overrides). One CD student per (candidate, task, seed) at
    ``k`` (default: the profile's largest cd_k). Returns one row per student with the candidate's name."""

    out_dir = Path(out_dir)
    study = out_dir / "manifest_study.json"
    if not study.is_file():
        (out_dir / "manifest.json").replace(study)
    atomic_write_json(out_dir / "manifest.json", dev_manifest(json.loads(study.read_text())))
    k = k or max(p["cd_ks"])
    tasks = list(tasks or p["cd_tasks"])
    # the study's own plans, narrowed to the dev sets' teachers and one CD student per (candidate, task, seed)
    ev = EvalOptions.from_params(p, progress).narrowed(profile="selection", force=False, max_tokens=0, on_too_long="error")
    run_sweep(lm, out_dir, ICLPlan.from_params(p).narrowed(ks=(0, k), seeds=tuple(seeds), full_prompt_sample=0), ev)
    rows = []
    for name, over in candidates.items():
        q = {**p, **over}
        cd = CDPlan.from_params(q).narrowed(train_tasks=tuple(tasks), ks=(k,), seeds=tuple(seeds), pbft_n=0,
                                            ood_train_tasks=(), controls=(), ensemble=EnsembleSpec(),
                                            save_students="none", log_with="")
        got = run_cd_sweep(lm, out_dir, cd, ev.narrowed(batch_size=q["batch_size"], model_name=q["model"]))
        tags = pd.DataFrame({"candidate": name, **{f"recipe_{a}": [q[a]] * len(got) for a in RECIPE_KEYS}},
                            index=got.index)
        rows.append(pd.concat([got, tags], axis=1))  # one concat: no fragmented frame from many inserts
    table = pd.concat(rows, ignore_index=True)
    icl_rows = read_table(out_dir / "icl.csv")
    teach = icl_rows[icl_rows["k"] == k].set_index(["task", "seed"])["non_verbalizer_frac"]
    table["teacher_non_verbalizer_frac"] = [teach.get((t, s)) for t, s in zip(table["task"], table["seed"])]
    table["format_gap"] = table["non_verbalizer_frac"] - table["teacher_non_verbalizer_frac"]
    return table


def choose(table: pd.DataFrame, candidates=None, max_gap: float = FORMAT_GAP) -> dict:
    """The module's RULE applied to :func:`run_selection`'s table: the chosen candidate, its recipe and every
    candidate's per-task format gap and mean agreement with the teacher."""
    order = list(candidates or dict.fromkeys(table["candidate"]))
    per = table.groupby(["candidate", "task"])[["format_gap", "agree_teacher_student", "score_acc",
                                                 "kappa_teacher_student", "kl_teacher_student"]].mean()
    summary = {}
    for c in order:
        g = per.loc[c]
        summary[c] = {"format_gap_by_task": g["format_gap"].round(4).to_dict(),
                      "worst_format_gap": float(g["format_gap"].max()),
                      "agree_teacher_mean": float(g["agree_teacher_student"].mean()),
                      "kappa_teacher_mean": float(g["kappa_teacher_student"].mean()),
                      "kl_teacher_mean": float(g["kl_teacher_student"].mean()),
                      "dev_acc_mean": float(g["score_acc"].mean())}
    keep = [c for c in order if summary[c]["worst_format_gap"] <= max_gap]
    if keep:
        best = max(keep, key=lambda c: (summary[c]["agree_teacher_mean"], -order.index(c)))
        note = f"format within {max_gap} of the teacher on every task; highest agreement with the teacher"
    else:
        best = min(order, key=lambda c: (summary[c]["worst_format_gap"], order.index(c)))
        note = f"no candidate kept the format within {max_gap}: the smallest gap was taken (criterion failed)"
    recipe = table[table["candidate"] == best].iloc[0]
    return {"chosen": best, "format_criterion_met": bool(keep), "rule": note, "max_format_gap": max_gap,
            "recipe": {a: (recipe[f"recipe_{a}"].item() if hasattr(recipe[f"recipe_{a}"], "item")
                           else recipe[f"recipe_{a}"]) for a in RECIPE_KEYS},
            "candidates": summary}
