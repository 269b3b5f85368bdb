"""Figures of the study, each a pure function of the tidy tables in :mod:`llmft_utils.analysis.tables`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..store import atomic_write
from .tables import method_order, teacher_seconds

COLORS = {"zero-shot": "#7f7f7f", "ICL": "#4c72b0", "CD": "#dd8452", "PBFT": "#55a868"}


def _color(label: str) -> str:
    return COLORS.get(label.split(" ")[0], "#8172b2")


def _err(g, col):
    m = g[f"{col}_mean"]
    lo = (m - g[f"{col}_ci_lo"]).fillna(0).clip(lower=0)
    hi = (g[f"{col}_ci_hi"] - m).fillna(0).clip(lower=0)
    return np.vstack([lo, hi])


def accuracy_vs_k(summary: pd.DataFrame):
    """Score accuracy against k for ICL and CD per evaluation set; k = 0 is the zero-shot model; triangles:
    PBFT at its n; × and +: the shuffled-target and self-distillation control students (drawn at the largest
    CD k); dotted: majority class. Line style = training task. Bars: 95% t-interval over seeds,
    and for the zero-shot model (one run) the Wilson interval over examples. Methods at the same k are
    drawn side by side (a small horizontal offset), and the k axis has whole-number ticks."""
    sets = list(dict.fromkeys(summary["eval_set"]))
    styles = {}
    fig, axes = plt.subplots(1, len(sets), figsize=(4.4 * len(sets), 3.7), squeeze=False)
    span = max(1.0, float(summary["k"].max()) if len(summary) else 1.0)
    offset = {"ICL": -0.012 * span, "CD": 0.012 * span, "PBFT": 0.024 * span}
    for ax, es in zip(axes[0], sets):
        g = summary[summary["eval_set"] == es]
        zs = g[g["method_label"] == "zero-shot"]
        for fam, marker in (("ICL", "o"), ("CD", "s")):
            for tt, gg in g[g["method_label"].str.startswith(fam + " k=")].groupby("train_task"):
                ls = styles.setdefault(tt, ["-", "--", "-.", ":"][len(styles) % 4])
                gg = gg.sort_values("k")
                x = np.concatenate([zs["k"].to_numpy(float), gg["k"].to_numpy(float) + offset[fam]])
                y = np.concatenate([zs["score_acc_mean"].to_numpy(), gg["score_acc_mean"].to_numpy()])
                ax.plot(x, y, color=COLORS[fam], ls=ls, lw=1.2)
                ax.errorbar(gg["k"] + offset[fam], gg["score_acc_mean"], yerr=_err(gg, "score_acc"), marker=marker,
                            capsize=3, color=COLORS[fam], ls="none", label=f"{fam} ({tt})")
        for tt, pb in g[g["method_label"].str.startswith("PBFT")].groupby("train_task"):
            ax.errorbar(pb["k"] + offset["PBFT"], pb["score_acc_mean"], yerr=_err(pb, "score_acc"), marker="^",
                        capsize=3, ls="none", color=COLORS["PBFT"], label=f"PBFT ({tt})")
        for name, marker in (("CD shuffled", "x"), ("CD self", "+")):  # control students, at the k they control
            for tt, cc in g[g["method_label"].str.startswith(name)].groupby("train_task"):
                kx = cc["k"].where(cc["k"] > 0, g.loc[g["method_label"].str.startswith("CD k="), "k"].max())
                ax.errorbar(kx + 2 * offset["PBFT"], cc["score_acc_mean"], yerr=_err(cc, "score_acc"), marker=marker,
                            capsize=3, ls="none", color="#8172b2", label=f"{name} control ({tt})")
        if len(zs):
            ax.errorbar(zs["k"], zs["score_acc_mean"], yerr=_err(zs, "score_acc"), marker="D", capsize=3,
                        color=COLORS["zero-shot"], ls="none", label="zero-shot (Wilson interval)")
        ax.axhline(g["majority_acc_mean"].max(), color="k", ls=":", lw=1, label="majority class")
        ax.set_xticks(sorted({int(k) for k in g["k"]}))
        ax.set(title=es, xlabel="demonstrations k (PBFT: labelled n)", ylabel="score accuracy")
        ax.legend(fontsize=6)
    fig.text(0.5, 0.005, "bars: 95% t-interval over seeds (zero-shot: Wilson interval over the examples)",
             ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def accuracy_vs_total_demos(runs: pd.DataFrame):
    """Accuracy against the labelled demonstrations behind each method (``tables.total_demonstrations``: k for
    ICL and CD, m·k for a teacher ensemble at inference or distilled, n for PBFT, 0 zero-shot), raw (top row)
    and after batch calibration (bottom row), per evaluation set. Where teacher ensembles exist only the seeds
    that have one are drawn, so every point averages the same seeds; small dots are single seeds, large
    markers their mean, methods at the same x side by side (hollow: teacher ensembles). Dotted: majority
    class. One legend for the figure, below it."""
    r = runs[runs["method"].isin(["zero-shot", "icl", "cd", "icl_ensemble", "cd_ensemble", "pbft"])].copy()
    ens_seeds = sorted(set(r.loc[r["method"] == "cd_ensemble", "seed"]))
    if ens_seeds:
        r = r[(r["method"] == "zero-shot") | r["seed"].isin(ens_seeds)]
    sets = list(dict.fromkeys(r["eval_set"]))
    kinds = [("score_acc", "raw")] + ([("score_acc_batch", "batch-calibrated")]
                                      if "score_acc_batch" in r and r["score_acc_batch"].notna().any() else [])
    fig, axes = plt.subplots(len(kinds), max(len(sets), 1), figsize=(4.4 * max(len(sets), 1), 3.2 * len(kinds) + 0.8),
                             squeeze=False)
    # marker, colour, hollow, x factor (methods at the same x drawn side by side on the log axis)
    style = {"zero-shot": ("D", COLORS["zero-shot"], False, 1.0), "icl": ("o", COLORS["ICL"], False, 0.86),
             "cd": ("s", COLORS["CD"], False, 1.0), "pbft": ("^", COLORS["PBFT"], False, 1.16),
             "icl_ensemble": ("o", COLORS["ICL"], True, 0.93), "cd_ensemble": ("s", COLORS["CD"], True, 1.08)}
    names = {"zero-shot": "zero-shot", "icl": "ICL, one prompt (k)", "cd": "CD, one prompt (k)",
             "icl_ensemble": "ICL ensemble, m prompts (m·k)", "cd_ensemble": "CD from the ensemble (m·k)",
             "pbft": "PBFT (n)"}
    handles = {}
    xmax = max(1, int(r["total_demos"].max())) if len(r) else 1
    for row, (col, what) in enumerate(kinds):
        for ax, es in zip(axes[row], sets):
            g = r[(r["eval_set"] == es) & r[col].notna()]
            for method in style:
                marker, color, hollow, fx = style[method]
                for tt, gt in g[g["method"] == method].groupby("train_task"):
                    mean = gt.groupby("total_demos")[col].mean().sort_index()
                    ax.scatter(gt["total_demos"] * fx, gt[col], s=8, color=color, alpha=0.35, marker=marker)
                    h, = ax.plot(mean.index * fx, mean.to_numpy(), marker=marker, ms=8, ls="none", color=color,
                                 mfc="white" if hollow else color, mew=1.5)
                    handles.setdefault(names[method], h)  # the training task: the set's own (HANS: MNLI's)
            if len(g):
                handles.setdefault("majority class", ax.axhline(g["majority_acc"].max(), color="k", ls=":", lw=1))
            ax.set_xscale("symlog", base=2, linthresh=1)
            ticks = sorted({int(x) for x in g["total_demos"]}) if len(g) else [0]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlim(-0.6, xmax * 1.6)
            ax.set(title=f"{es} ({what})", xlabel="labelled demonstrations behind the method", ylabel="accuracy")
    seeds = f"seeds {ens_seeds} (those with a teacher ensemble)" if ens_seeds else "all seeds"
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.02))
    fig.text(0.5, 0.005, f"small dots: single seeds; markers: mean over {seeds}; hollow: teacher ensembles; "
             "methods at the same x are drawn side by side", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


def in_vs_out_of_domain(summary: pd.DataFrame, in_domain: str = "mnli/validation_matched",
                        out_domain: str = "hans/validation", train_task: str = "mnli"):
    """In-domain vs out-of-domain accuracy per method (mean ± 95% CI over seeds; dashed: majority)."""
    a = summary[(summary["eval_set"] == in_domain) & summary["train_task"].isin([train_task, "none"])]
    b = summary[(summary["eval_set"] == out_domain) & summary["train_task"].isin([train_task, "none"])]
    m = a.merge(b, on=["method_label", "train_task", "k"], suffixes=("_in", "_out"))
    fig, ax = plt.subplots(figsize=(5.4, 4.4))
    for _, r in m.iterrows():
        xe = [[max(r["score_acc_mean_in"] - r["score_acc_ci_lo_in"], 0) if pd.notna(r["score_acc_ci_lo_in"]) else 0],
              [max(r["score_acc_ci_hi_in"] - r["score_acc_mean_in"], 0) if pd.notna(r["score_acc_ci_hi_in"]) else 0]]
        ye = [[max(r["score_acc_mean_out"] - r["score_acc_ci_lo_out"], 0) if pd.notna(r["score_acc_ci_lo_out"]) else 0],
              [max(r["score_acc_ci_hi_out"] - r["score_acc_mean_out"], 0) if pd.notna(r["score_acc_ci_hi_out"]) else 0]]
        ax.errorbar(r["score_acc_mean_in"], r["score_acc_mean_out"], xerr=xe, yerr=ye, marker="o", capsize=3,
                    color=_color(r["method_label"]), ls="none")
        ax.annotate(r["method_label"], (r["score_acc_mean_in"], r["score_acc_mean_out"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    if len(a):
        ax.axvline(a["majority_acc_mean"].iloc[0], color="k", ls="--", lw=0.8)
    if len(b):
        ax.axhline(b["majority_acc_mean"].iloc[0], color="k", ls="--", lw=0.8)
    ax.set(xlabel=f"in-domain accuracy ({in_domain})", ylabel=f"out-of-domain accuracy ({out_domain})",
           title=f"Trained / prompted on {train_task}: in- vs out-of-domain")
    fig.tight_layout()
    return fig


def _memory_column(runs: pd.DataFrame, *choices) -> tuple:
    """The first ``(column, label)`` of ``choices`` that ``runs`` has with a value: measured tensor memory
    where the rows carry it (older rows: the RSS-based columns they have)."""
    for col, label in choices:
        if col in runs and runs[col].notna().any():
            return col, label
    return choices[-1]


def cost_vs_k(runs: pd.DataFrame):
    """Per-query latency, peak memory and prompt tokens of ICL against k, and of the CD student."""
    icl = runs[runs["method"].isin(["zero-shot", "icl"])]
    cd = runs[runs["method"] == "cd"]
    mem, mem_label = _memory_column(runs, ("mem_tensors_peak_mb", "tensor memory at the largest batch (MB):\n"
                                                                    "weights + KV cache + activations"),
                                    ("peak_mem_delta_mb", "working memory above resident (MB)"),
                                    ("peak_mem_mb", "peak memory (MB)"))
    metrics = [("s_per_query", 1000, "ms per query"), (mem, 1, mem_label), ("prompt_tokens", 1, "prompt tokens per query")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, (col, scale, lab) in zip(axes, metrics):
        for es, g in icl.groupby("eval_set"):
            s = g.groupby("k")[col].mean() * scale
            line = ax.plot(s.index, s.values, marker="o", label=f"ICL {es}")[0]
            c = cd[cd["eval_set"] == es]
            if len(c):
                s2 = c.groupby("k")[col].mean() * scale
                ax.plot(s2.index, s2.values, marker="s", ls="--", color=line.get_color(), label=f"CD student {es}")
        ax.set(xlabel="demonstrations k", ylabel=lab)
        ax.set_xticks(sorted(set(icl["k"]) | set(cd["k"])))  # whole k only
    axes[0].legend(fontsize=7)
    fig.suptitle("Inference cost: ICL pays for the prompt, the CD student answers at zero-shot cost")
    fig.tight_layout()
    return fig


def cost_break_even(table: pd.DataFrame, n_max: float = 1e6):
    """Cumulative wall time against queries served (log-log), one panel per evaluation set: ICL with the
    prefix cached (solid) and without (dotted), CD = its one-off teacher + training cost plus the
    student's per-query cost (dashed), one colour per k; dots mark the break-even points
    (:func:`tables.break_even`)."""
    sets = sorted(table["eval_set"].unique()) if len(table) else []
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(4.6 * max(1, len(sets)), 3.6), squeeze=False)
    n = np.logspace(0, np.log10(n_max), 200)
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860"]
    for ax, es in zip(axes[0], sets):
        for i, r in enumerate(table[table["eval_set"] == es].sort_values("k").itertuples()):
            col = palette[i % len(palette)]
            ax.plot(n, r.s_per_query_icl * n, color=col, label=f"ICL k={r.k} (prefix cached)")
            if r.s_per_query_full_prompt == r.s_per_query_full_prompt:
                ax.plot(n, r.s_per_query_full_prompt * n, color=col, ls=":", label=f"ICL k={r.k} (full prompts)")
            ax.plot(n, r.cd_once_s + r.s_per_query_student * n, color=col, ls="--", label=f"CD k={r.k}")
            for be, c_other in ((r.break_even_cached, r.s_per_query_icl), (r.break_even_full, r.s_per_query_full_prompt)):
                if be == be and np.isfinite(be) and be <= n_max:
                    ax.plot([be], [c_other * be], "o", color=col, ms=5)
        ax.set(xscale="log", yscale="log", xlabel="queries served", ylabel="cumulative wall time (s)",
               title=f"{es} ({table.loc[table['eval_set'] == es, 'train_task'].iloc[0]} demos / students)")
        ax.legend(fontsize=6)
    if not sets:
        axes[0][0].text(0.5, 0.5, "no CD runs to compare", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle("When does distilling pay? Break-even points (dots): CD's one-off cost against ICL's per-query cost",
                 fontsize=10)
    fig.tight_layout()
    return fig


def hans_heatmap(subcases: pd.DataFrame, train_task: str = "mnli"):
    """HANS accuracy per heuristic/subcase (rows) and method (columns), mean over seeds."""
    s = subcases[subcases["train_task"].isin([train_task, "none"])]
    piv = s.groupby(["heuristic", "subcase", "method_label"])["acc"].mean().unstack("method_label")
    piv = piv[method_order(piv.columns)]
    piv = piv.sort_index(level=["heuristic", "subcase"])
    fig, ax = plt.subplots(figsize=(1.1 * piv.shape[1] + 3.5, 0.24 * len(piv) + 1.5))
    im = ax.imshow(piv.to_numpy(), cmap="RdBu", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(piv.shape[1]), piv.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(piv)), [f"{h[:4]} · {sc}" for h, sc in piv.index], fontsize=7)
    for i in range(piv.shape[0]):
        for j in range(piv.shape[1]):
            v = piv.iat[i, j]
            if pd.notna(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="k")
    fig.colorbar(im, ax=ax, label="accuracy", fraction=0.04)
    ax.set_title(f"HANS by subcase ({train_task} demos / training); e = entailed, n = not")
    fig.tight_layout()
    return fig


def training_cost(runs: pd.DataFrame):
    """Teacher caching + training time and peak training memory of CD, teacher-ensemble CD and PBFT students. A
    student whose teacher came from the cache (the shuffled control computes CD's first) is charged what
    computing it cost (:func:`tables.teacher_seconds`), as in the break-even table."""

    t = runs[runs["method"].isin(["cd", "cd_ensemble", "pbft"])].drop_duplicates(["method", "train_task", "k", "seed"])
    t = t.assign(teacher_cache_s=teacher_seconds(runs, t))
    mem, mem_label = _memory_column(t, ("train_mem_tensors_peak_mb", "training step tensor memory (MB)"),
                                    ("train_mem_delta_mb", "training memory above resident (MB)"),
                                    ("train_peak_mem_mb", "peak training memory (MB)"))
    g = t.groupby(["train_task", "method_label"])[["teacher_cache_s", "train_s", mem, "n_train"]].mean()
    g = g.reset_index()
    rank = {m: i for i, m in enumerate(method_order(g["method_label"]))}
    g = g.assign(_r=g["method_label"].map(rank)).sort_values(["train_task", "_r"]).reset_index(drop=True)
    labels = [f"{r.train_task}\n{r.method_label.replace(' ensemble ', ' ensemble' + chr(10))}" for r in g.itertuples()]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(g)), 3.6))
    x = np.arange(len(g))
    axes[0].bar(x, g["teacher_cache_s"].fillna(0), color="#c44e52", label="teacher caching")
    axes[0].bar(x, g["train_s"], bottom=g["teacher_cache_s"].fillna(0), color=[_color(m) for m in g["method_label"]],
                label="training")
    axes[0].set(ylabel="seconds per student (mean over seeds)", title="Training cost")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, g[mem], color=[_color(m) for m in g["method_label"]])
    axes[1].set(ylabel=mem_label,
                title="Training memory (weights, gradients, optimizer state, activations)")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("training task · method")
        if g.empty:  # notebook 03 has not run (yet)
            ax.text(0.5, 0.5, "no CD or PBFT runs in cd.csv", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def loss_curves(log: pd.DataFrame):
    """Training loss per batch of every student (``train_log.csv``), one panel per method (CD, PBFT), one
    line per student, coloured by its training task."""
    kinds = [m for m in ("cd", "pbft") if log["student"].str.startswith(m + "|").any()] or ["cd"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.2), squeeze=False)
    tasks = sorted({s.split("|")[2] for s in log["student"]}) if len(log) else []
    colors = dict(zip(tasks, ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2"] * 3))
    for ax, kind in zip(axes[0], kinds):
        for student, g in log[log["student"].str.startswith(kind + "|")].groupby("student", sort=True):
            task = student.split("|")[2]
            ax.plot(g["batch"], g["loss"], color=colors[task], alpha=0.5, lw=1,
                    label=task if task not in ax.get_legend_handles_labels()[1] else None)
        ax.set(xlabel="batch", ylabel="KL to the teacher" if kind == "cd" else "cross-entropy",
               title=f"{kind.upper()} training loss, every student")
        if ax.lines:
            ax.legend(fontsize=8, title="training task")
        else:
            ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def save(fig, folder, name: str) -> list:
    """Write ``name``.png (and .svg) under ``folder``; returns the paths. Byte-identical for the same figure
    (no date, a fixed SVG id salt), so rerunning the analysis on committed results leaves git clean."""
    from pathlib import Path


    paths = []
    with plt.rc_context({"svg.hashsalt": "llmft"}):
        for ext in ("png", "svg"):
            paths.append(atomic_write(Path(folder) / f"{name}.{ext}", lambda tmp: fig.savefig(
                tmp, dpi=110, bbox_inches="tight", format=ext, metadata={"Date": None} if ext == "svg" else None)))
    return paths
