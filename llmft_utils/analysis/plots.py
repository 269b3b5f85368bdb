"""Figures of the study, each a pure function of the tidy tables in :mod:`llmft_utils.analysis.tables`.

Every interval drawn is the summary table's: a 95% t-interval over the data seeds, and for a group of one run
(the zero-shot model, a teacher ensemble of one seed) the Wilson 95% interval of its accuracy over the evaluation
examples; each figure says which, in its caption below the panels."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..store import atomic_write
from .tables import (EXPLORER_METRICS, T_INTERVAL, WILSON_INTERVAL, group_interval, interval_text, is_proportion,
                     method_order, t_ci, teacher_seconds)

COLORS = {"zero-shot": "#7f7f7f", "ICL": "#4c72b0", "CD": "#dd8452", "PBFT": "#55a868"}
CONTROL_COLOR = "#8172b2"  # the control students (shuffled targets, self-distillation)
# marker of each method, by the start of its label (first match); hollow: teacher ensembles
MARKERS = (("zero-shot", "D"), ("ICL ensemble", "o"), ("CD ensemble", "s"), ("CD shuffled", "x"), ("CD self", "P"),
           ("ICL", "o"), ("CD", "s"), ("PBFT", "^"))
SET_COLORS = ["#1b9e77", "#a6761d", "#e7298a", "#66a61e", "#666666"]  # one per evaluation set (not a method's)


def _color(label: str) -> str:
    return COLORS.get(label.split(" ")[0], CONTROL_COLOR)


def _style(label: str) -> tuple[str, str, bool]:
    """``(marker, colour, hollow)`` of a method label."""
    for prefix, marker in MARKERS:
        if label.startswith(prefix):
            control = prefix in ("CD shuffled", "CD self")
            return marker, CONTROL_COLOR if control else _color(label), "ensemble" in prefix
    return "o", _color(label), False


def _err(g, col):
    m = g[f"{col}_mean"]
    lo = (m - g[f"{col}_ci_lo"]).fillna(0).clip(lower=0)
    hi = (g[f"{col}_ci_hi"] - m).fillna(0).clip(lower=0)
    return np.vstack([lo, hi])


def _summary_intervals(rows: pd.DataFrame, suffix: str = "") -> str:
    """What the error bars of summary-table rows are: the t-interval over their seeds, and the Wilson interval
    of the one-run rows (named)."""
    n = rows[f"n_seeds{suffix}"] if f"n_seeds{suffix}" in rows else pd.Series(dtype=int)
    kind = rows.get(f"score_acc_interval{suffix}", pd.Series("t over seeds", index=rows.index))
    one = [str(m) for m in dict.fromkeys(rows.loc[kind.astype(str).str.startswith("Wilson"), "method_label"])]
    seeds = sorted({int(x) for x in n[n > 1]}) if len(n) else []
    text = f"error bars: {T_INTERVAL}" + (f" (n = {', '.join(map(str, seeds))})" if seeds else "")
    if one:
        text += f"; one run ({', '.join(one)}): {WILSON_INTERVAL}"
    return text


def _legend_below(fig, handles: dict, caption: str, ncol: int = 4):
    """One legend for the whole figure below its panels, and the caption (what markers and error bars are)
    under it; lays the figure out so that neither overlaps the panels."""
    height = fig.get_size_inches()[1]
    rows = -(-len(handles) // ncol)
    cap_lines = caption.count("\n") + 1
    cap_h, leg_h = 0.16 * cap_lines + 0.08, 0.2 * rows + 0.1
    fig.text(0.5, 0.02 / height, caption, ha="center", va="bottom", fontsize=7)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, cap_h / height))
    fig.tight_layout(rect=(0, (cap_h + leg_h + 0.05) / height, 1, 1))


def _majority(ax, value: float, handles: dict) -> str:
    """Draws the majority-class line of one panel (dotted); returns the text its title ends with (the value)."""
    handles.setdefault("majority class (its value in each panel's title)", ax.axhline(value, color="k", ls=":", lw=1))
    return f"majority {value:.3f}"


def _first(handles: dict, *names) -> dict:
    """The legend's entries with those starting with ``names`` first, in that order."""
    head = [k for n in names for k in handles if k.startswith(n)]
    return {k: handles[k] for k in head + [k for k in handles if k not in head]}


def _seeds_text(seeds) -> str:
    seeds = sorted(int(s) for s in seeds)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def accuracy_vs_k(summary: pd.DataFrame):
    """Score accuracy against k for ICL and CD per evaluation set, on one y scale; k = 0 is the zero-shot model;
    triangles: PBFT at its n; × and +: the shuffled-target and self-distillation control students (drawn at the
    largest CD k); dotted: majority class. Line style = training task. Error bars: the summary table's intervals
    (95% t over seeds; the zero-shot model, one run: Wilson over the examples). Methods at the same k are drawn
    side by side (a small horizontal offset), and the k axis has whole-number ticks. One legend, below."""
    sets = list(dict.fromkeys(summary["eval_set"]))
    styles, handles = {}, {}
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(4.4 * max(1, len(sets)), 4.6), squeeze=False, sharey=True)
    step = 0.03 * max(1.0, float(summary["k"].max()) if len(summary) else 1.0)
    offset = {"ICL": -1.5 * step, "CD": -0.5 * step, "PBFT": 0.5 * step, "CD shuffled": 1.5 * step, "CD self": 2.5 * step}

    def point(ax, rows, x, label):
        marker, color, _ = _style(rows["method_label"].iloc[0])
        handles.setdefault(label, ax.errorbar(x, rows["score_acc_mean"], yerr=_err(rows, "score_acc"), marker=marker,
                                              capsize=3, color=color, ls="none"))

    for ax, es in zip(axes[0], sets):
        g = summary[summary["eval_set"] == es]
        zs = g[g["method_label"] == "zero-shot"]
        for fam in ("ICL", "CD"):
            for tt, gg in g[g["method_label"].str.startswith(fam + " k=")].groupby("train_task"):
                ls = styles.setdefault(tt, ["-", "--", "-.", ":"][len(styles) % 4])
                gg = gg.sort_values("k")
                x = np.concatenate([zs["k"].to_numpy(float), gg["k"].to_numpy(float) + offset[fam]])
                y = np.concatenate([zs["score_acc_mean"].to_numpy(), gg["score_acc_mean"].to_numpy()])
                ax.plot(x, y, color=COLORS[fam], ls=ls, lw=1.2)
                point(ax, gg, gg["k"] + offset[fam], f"{fam} ({tt})")
        for tt, pb in g[g["method_label"].str.startswith("PBFT")].groupby("train_task"):
            point(ax, pb, pb["k"] + offset["PBFT"], f"PBFT n ({tt})")
        for name in ("CD shuffled", "CD self"):  # control students, at the k they control
            for tt, cc in g[g["method_label"].str.startswith(name)].groupby("train_task"):
                kx = cc["k"].where(cc["k"] > 0, g.loc[g["method_label"].str.startswith("CD k="), "k"].max())
                point(ax, cc, kx + offset[name], f"{name} control ({tt})")
        if len(zs):
            point(ax, zs, zs["k"], "zero-shot")
        maj = _majority(ax, g["majority_acc_mean"].max(), handles) if len(g) else ""
        ax.set_xticks(sorted({int(k) for k in g["k"]}))
        ax.set(title=f"{es} · {maj}" if maj else es, xlabel="demonstrations k (PBFT: labelled n)", ylabel="score accuracy")
        ax.yaxis.set_tick_params(labelleft=True)
    drawn = summary[~summary["method_label"].str.contains("ensemble")]
    _legend_below(fig, _first(handles, "zero-shot", "majority"),
                  "line style: training task / demonstration pool; " + _summary_intervals(drawn), ncol=5)
    return fig


def accuracy_vs_total_demos(runs: pd.DataFrame):
    """Accuracy against the labelled demonstrations behind each method (``tables.total_demonstrations``: k for
    ICL and CD, m·k for a teacher ensemble at inference or distilled, n for PBFT, 0 zero-shot), raw (top row)
    and after batch calibration (bottom row), per evaluation set, all panels on one y scale. Where teacher
    ensembles exist only the seeds that have one are drawn, so every point averages the same seeds. Markers:
    the mean (one run where one seed), error bars the summary table's kind of interval (:func:`tables.group_interval`:
    95% t over seeds, Wilson over the examples for one run); small dots: single seeds where there are several;
    methods at the same x side by side (hollow: teacher ensembles); dotted: majority class. One legend, below."""
    r = runs[runs["method"].isin(["zero-shot", "icl", "cd", "icl_ensemble", "cd_ensemble", "pbft"])].copy()
    ens_seeds = sorted(set(r.loc[r["method"] == "cd_ensemble", "seed"]))
    if ens_seeds:
        r = r[(r["method"] == "zero-shot") | r["seed"].isin(ens_seeds)]
    sets = list(dict.fromkeys(r["eval_set"]))
    kinds = [("score_acc", "raw")] + ([("score_acc_batch", "batch-calibrated")]
                                      if "score_acc_batch" in r and r["score_acc_batch"].notna().any() else [])
    fig, axes = plt.subplots(len(kinds), max(len(sets), 1), figsize=(4.4 * max(len(sets), 1), 3.2 * len(kinds) + 1.2),
                             squeeze=False, sharey=True)
    # x factor: methods at the same x drawn side by side on the log axis
    shift = {"zero-shot": 1.0, "icl": 0.86, "cd": 1.0, "pbft": 1.16, "icl_ensemble": 0.93, "cd_ensemble": 1.08}
    names = {"zero-shot": "zero-shot", "icl": "ICL, one prompt (k)", "cd": "CD, one prompt (k)", "pbft": "PBFT (n)",
             "icl_ensemble": "ICL ensemble, m prompts (m·k)", "cd_ensemble": "CD from the ensemble (m·k)"}
    label = {"zero-shot": "zero-shot", "icl": "ICL", "cd": "CD", "pbft": "PBFT", "icl_ensemble": "ICL ensemble",
             "cd_ensemble": "CD ensemble"}
    handles, used = {}, set()
    xmax = max(1, int(r["total_demos"].max())) if len(r) else 1
    for row, (col, what) in enumerate(kinds):
        for ax, es in zip(axes[row], sets):
            g = r[(r["eval_set"] == es) & r[col].notna()]
            for method, fx in shift.items():
                marker, color, hollow = _style(label[method])
                for (tt, x), gx in g[g["method"] == method].groupby(["train_task", "total_demos"]):
                    mean, lo, hi, kind = group_interval(gx, col)
                    used.add(kind)
                    if gx["seed"].nunique() > 1:
                        ax.scatter(gx["total_demos"] * fx, gx[col], s=8, color=color, alpha=0.35, marker=marker)
                    yerr = [[max(mean - lo, 0)], [max(hi - mean, 0)]] if lo == lo and hi == hi else None
                    handles.setdefault(names[method], ax.errorbar(
                        [x * fx], [mean], yerr=yerr, marker=marker, ms=7, ls="none", color=color, capsize=3,
                        mfc="white" if hollow else color, mew=1.5))
            maj = _majority(ax, g["majority_acc"].max(), handles) if len(g) else ""
            ax.set_xscale("symlog", base=2, linthresh=1)
            ticks = sorted({int(x) for x in g["total_demos"]}) if len(g) else [0]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlim(-0.6, xmax * 1.6)
            ax.set(xlabel="labelled demonstrations behind the method",
                   ylabel="accuracy" if what == "raw" else "accuracy, batch-calibrated")
            ax.set_title(f"{es} ({what})" + (f"\n{maj}" if maj else ""), fontsize=10)
            ax.yaxis.set_tick_params(labelleft=True)
    seeds = sorted(set(r["seed"])) if len(r) else []
    if ens_seeds:
        who = f"{_seeds_text(ens_seeds)} only (those with a teacher ensemble)"
    else:
        who = f"{_seeds_text(seeds)}" if seeds else "no runs"
    marks = "markers: one run each" if r.groupby(["eval_set", "method", "train_task", "total_demos"])["seed"].nunique().max() <= 1 \
        else "markers: mean over the seeds, small dots: single seeds"
    _legend_below(fig, _first(handles, "zero-shot", "majority"), f"{who}; {marks}; error bars: {interval_text(used)}\n"
                  "hollow: teacher ensembles; methods at the same x are drawn side by side", ncol=4)
    return fig


def in_vs_out_of_domain(summary: pd.DataFrame, in_domain: str = "mnli/validation_matched",
                        out_domain: str = "hans/validation", train_task: str = "mnli"):
    """In-domain vs out-of-domain accuracy per method (mean with the summary table's 95% intervals on both axes;
    dashed: majority class of each set); methods told apart by marker and colour in a legend beside the panel."""
    a = summary[(summary["eval_set"] == in_domain) & summary["train_task"].isin([train_task, "none"])]
    b = summary[(summary["eval_set"] == out_domain) & summary["train_task"].isin([train_task, "none"])]
    m = a.merge(b, on=["method_label", "train_task", "k"], suffixes=("_in", "_out"))
    m = m.assign(_r=m["method_label"].map({x: i for i, x in enumerate(method_order(m["method_label"]))})).sort_values("_r")
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    for _, r in m.iterrows():
        xe = [[max(r["score_acc_mean_in"] - r["score_acc_ci_lo_in"], 0) if pd.notna(r["score_acc_ci_lo_in"]) else 0],
              [max(r["score_acc_ci_hi_in"] - r["score_acc_mean_in"], 0) if pd.notna(r["score_acc_ci_hi_in"]) else 0]]
        ye = [[max(r["score_acc_mean_out"] - r["score_acc_ci_lo_out"], 0) if pd.notna(r["score_acc_ci_lo_out"]) else 0],
              [max(r["score_acc_ci_hi_out"] - r["score_acc_mean_out"], 0) if pd.notna(r["score_acc_ci_hi_out"]) else 0]]
        marker, color, hollow = _style(r["method_label"])
        ax.errorbar(r["score_acc_mean_in"], r["score_acc_mean_out"], xerr=xe, yerr=ye, marker=marker, ms=8, capsize=3,
                    color=color, mfc="white" if hollow else color, ls="none", elinewidth=1, label=r["method_label"])
    if len(a) and len(b):
        ax.axvline(a["majority_acc_mean"].iloc[0], color="k", ls="--", lw=0.8,
                   label=f"majority class ({a['majority_acc_mean'].iloc[0]:.3f} in, {b['majority_acc_mean'].iloc[0]:.3f} out)")
        ax.axhline(b["majority_acc_mean"].iloc[0], color="k", ls="--", lw=0.8)
    ax.set(xlabel=f"in-domain accuracy ({in_domain})", ylabel=f"out-of-domain accuracy ({out_domain})",
           title=f"Trained / prompted on {train_task}: in- vs out-of-domain")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    caption = _summary_intervals(m.assign(method_label=m["method_label"]), "_in") + ", on both axes" if len(m) else ""
    fig.text(0.02, 0.01, caption, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _memory_column(runs: pd.DataFrame, *choices) -> tuple:
    """The first ``(column, label)`` of ``choices`` that ``runs`` has with a value: measured tensor memory
    where the rows carry it (older rows: the RSS-based columns they have)."""
    for col, label in choices:
        if col in runs and runs[col].notna().any():
            return col, label
    return choices[-1]


def _by_k(rows: pd.DataFrame, col: str, scale: float = 1.0) -> pd.DataFrame:
    """Per k: the mean of ``col`` over the seeds with its 95% t-interval (NaN for one run; a cost is never below
    0), times ``scale``."""
    out = {k: t_ci(g[col], bounds=(0.0, np.inf)) for k, g in rows.groupby("k")}
    return pd.DataFrame.from_dict(out, orient="index", columns=["mean", "lo", "hi"]).sort_index() * scale


def _yerr(s: pd.DataFrame) -> np.ndarray:
    return np.vstack([(s["mean"] - s["lo"]).fillna(0).clip(lower=0), (s["hi"] - s["mean"]).fillna(0).clip(lower=0)])


def cost_vs_k(runs: pd.DataFrame):
    """Per-query latency, tensor memory and prompt tokens of ICL against k (solid, circles), and of the CD
    student (dashed, squares, at the k of its teacher); one colour per evaluation set; means over seeds with
    95% t-intervals over seeds (k = 0, the zero-shot model: one run). One legend, below."""
    icl = runs[runs["method"].isin(["zero-shot", "icl"])]
    cd = runs[runs["method"] == "cd"]
    mem, mem_label = _memory_column(runs, ("mem_tensors_peak_mb", "tensor memory, largest batch (MB)"),
                                    ("peak_mem_delta_mb", "working memory above resident (MB)"),
                                    ("peak_mem_mb", "peak memory (MB)"))
    metrics = [("s_per_query", 1000, "ms per query"), (mem, 1, mem_label), ("prompt_tokens", 1, "prompt tokens per query")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    handles = {}
    for ax, (col, scale, lab) in zip(axes, metrics):
        for i, (es, g) in enumerate(icl.groupby("eval_set")):
            color = SET_COLORS[i % len(SET_COLORS)]
            for who, rows, marker, ls in (("ICL", g, "o", "-"), ("CD student", cd[cd["eval_set"] == es], "s", "--")):
                if len(rows):
                    s = _by_k(rows, col, scale)
                    handles.setdefault(f"{who}, {es}", ax.errorbar(s.index, s["mean"], yerr=_yerr(s), marker=marker,
                                                                    ls=ls, color=color, capsize=3))
        ax.set(xlabel="demonstrations k (CD student: its teacher's k)", ylabel=lab)
        ax.set_xticks(sorted(set(icl["k"]) | set(cd["k"])))  # whole k only
    fig.suptitle("Inference cost: ICL pays for the prompt, the CD student answers at zero-shot cost")
    _legend_below(fig, handles, f"means over seeds; error bars: {T_INTERVAL} (k = 0, the zero-shot model: one run); "
                  "tensor memory: weights + KV cache + activations of the largest batch", ncol=3)
    return fig


def cost_break_even(table: pd.DataFrame, n_max: float = 1e6):
    """Cumulative wall time against queries served (log-log), one panel per evaluation set: ICL with the
    prefix cached (solid) and without (dotted), CD = its one-off teacher + training cost plus the
    student's per-query cost (dashed), one colour per k; dots mark the break-even points
    (:func:`tables.break_even`; means over seeds). One legend, below."""
    sets = sorted(table["eval_set"].unique()) if len(table) else []
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(4.6 * max(1, len(sets)), 4.0), squeeze=False)
    n = np.logspace(0, np.log10(n_max), 200)
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860"]
    handles = {}
    for ax, es in zip(axes[0], sets):
        for i, r in enumerate(table[table["eval_set"] == es].sort_values("k").itertuples()):
            col = palette[i % len(palette)]
            handles.setdefault(f"ICL k={r.k}, prefix cached", ax.plot(n, r.s_per_query_icl * n, color=col)[0])
            if r.s_per_query_full_prompt == r.s_per_query_full_prompt:
                handles.setdefault(f"ICL k={r.k}, full prompts (no cache)",
                                   ax.plot(n, r.s_per_query_full_prompt * n, color=col, ls=":")[0])
            handles.setdefault(f"CD k={r.k}: teacher + training, then per query",
                               ax.plot(n, r.cd_once_s + r.s_per_query_student * n, color=col, ls="--")[0])
            for be, c_other in ((r.break_even_cached, r.s_per_query_icl), (r.break_even_full, r.s_per_query_full_prompt)):
                if be == be and np.isfinite(be) and be <= n_max:
                    ax.plot([be], [c_other * be], "o", color=col, ms=5)
                    handles.setdefault("break-even point", Line2D([], [], marker="o", ls="none", color="#555555", ms=5))
        ax.set(xscale="log", yscale="log", xlabel="queries served", ylabel="cumulative wall time (s)",
               title=f"{es} ({table.loc[table['eval_set'] == es, 'train_task'].iloc[0]} demos / students)")
    if not sets:
        axes[0][0].text(0.5, 0.5, "no CD runs to compare", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle("When does distilling pay? Break-even points (dots): CD's one-off cost against ICL's per-query cost",
                 fontsize=10)
    _legend_below(fig, handles, "wall time on this run's hardware, means over seeds (break_even.csv)", ncol=4)
    return fig


def hans_heatmap(subcases: pd.DataFrame, train_task: str = "mnli"):
    """HANS accuracy per heuristic/subcase (rows) and method (columns), mean over seeds."""
    s = subcases[subcases["train_task"].isin([train_task, "none"])]
    piv = s.groupby(["heuristic", "subcase", "method_label"])["acc"].mean().unstack("method_label")
    piv = piv[method_order(piv.columns)]
    piv = piv.sort_index(level=["heuristic", "subcase"])
    fig, ax = plt.subplots(figsize=(1.1 * piv.shape[1] + 4.0, 0.24 * len(piv) + 1.5))
    im = ax.imshow(piv.to_numpy(), cmap="RdBu", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(piv.shape[1]), piv.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(piv)), [f"{h} · {sc}" for h, sc in piv.index], fontsize=7)
    for i in range(piv.shape[0]):
        for j in range(piv.shape[1]):
            v = piv.iat[i, j]
            if pd.notna(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if abs(v - 0.5) > 0.3 else "k")
    fig.colorbar(im, ax=ax, label="accuracy (mean over seeds)", fraction=0.04)
    ax.set_title(f"HANS by heuristic · subcase ({train_task} demos / training);\n"
                 "subcase prefix: first letter = heuristic, e = entailed, n = not entailed", fontsize=10)
    fig.tight_layout()
    return fig


def training_cost(runs: pd.DataFrame):
    """Teacher caching + training time and training-step memory of CD, teacher-ensemble CD and PBFT students,
    means over seeds with 95% t-intervals over seeds (of the total time, and of the memory). A student whose
    teacher came from the cache (the shuffled control computes CD's first) is charged what computing it cost
    (:func:`tables.teacher_seconds`), as in the break-even table. One legend, below."""
    t = runs[runs["method"].isin(["cd", "cd_ensemble", "pbft"])].drop_duplicates(["method", "train_task", "k", "seed"])
    t = t.assign(teacher_cache_s=teacher_seconds(runs, t))
    mem, mem_label = _memory_column(t, ("train_mem_tensors_peak_mb", "training step tensor memory (MB)"),
                                    ("train_mem_delta_mb", "training memory above resident (MB)"),
                                    ("train_peak_mem_mb", "peak training memory (MB)"))
    t = t.assign(total_s=t["teacher_cache_s"].fillna(0) + t["train_s"])
    rows = []
    for (tt, ml), g in t.groupby(["train_task", "method_label"]):
        rows.append({"train_task": tt, "method_label": ml, "teacher_cache_s": g["teacher_cache_s"].mean(),
                     "train_s": g["train_s"].mean(), "n": g["seed"].nunique(),
                     **{f"{c}_{p}": v for c in ("total_s", mem) for p, v in zip(("mean", "ci_lo", "ci_hi"), t_ci(g[c], bounds=(0.0, np.inf)))}})
    g = pd.DataFrame(rows, columns=["train_task", "method_label", "teacher_cache_s", "train_s", "n"]
                     + [f"{c}_{p}" for c in ("total_s", mem) for p in ("mean", "ci_lo", "ci_hi")])
    rank = {m: i for i, m in enumerate(method_order(g["method_label"]))}
    g = g.assign(_r=g["method_label"].map(rank)).sort_values(["train_task", "_r"]).reset_index(drop=True)
    labels = [f"{r.train_task}\n{r.method_label.replace(' ensemble ', ' ensemble' + chr(10))}" for r in g.itertuples()]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(g)), 4.2))
    x = np.arange(len(g))
    colors = [_color(m) for m in g["method_label"]]
    axes[0].bar(x, g["teacher_cache_s"].fillna(0), color="#c44e52")
    axes[0].bar(x, g["train_s"], bottom=g["teacher_cache_s"].fillna(0), color=colors)
    has = g["n"].to_numpy() > 1  # one seed: no interval, no whisker
    axes[0].errorbar(x[has], g["total_s_mean"][has], yerr=_err(g, "total_s")[:, has], fmt="none", ecolor="k", capsize=3,
                     lw=1)
    axes[0].set(ylabel="seconds per student (mean over seeds)", title="Training cost")
    axes[1].bar(x, g[f"{mem}_mean"], color=colors)
    axes[1].errorbar(x[has], g[f"{mem}_mean"][has], yerr=_err(g, mem)[:, has], fmt="none", ecolor="k", capsize=3, lw=1)
    axes[1].set(ylabel=mem_label, title="Training memory (weights, gradients, optimizer state, activations)")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("training task · method")
        if g.empty:  # notebook 03 has not run (yet)
            ax.text(0.5, 0.5, "no CD or PBFT runs in cd.csv", ha="center", va="center", transform=ax.transAxes)
    handles = {"teacher caching (charged to the student)": Patch(color="#c44e52")}
    handles.update({f"training: {fam}": Patch(color=COLORS[fam]) for fam in ("CD", "PBFT")
                    if g["method_label"].str.startswith(fam).any()})
    one = sorted(set(g.loc[g["n"] == 1, "method_label"]))
    _legend_below(fig, handles, f"means over seeds; error bars: {T_INTERVAL}"
                  + (f" (one seed, no interval: {', '.join(one)})" if one else ""), ncol=3)
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


def explorer_chart(table: pd.DataFrame, metric: str, baseline: tuple | None = None):
    """The explorer's chart (notebook 04) of :func:`tables.explorer_table`: one horizontal bar per group (its
    readable label), the mean, whiskers = the group's interval (the x label says which kind), and for
    accuracies a dashed line at ``baseline`` (``(value, name)``, :func:`tables.explorer_baseline`) with its
    legend entry. Proportions are drawn on [0, 1]."""
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(table), 1) + 1.5))
    y = np.arange(len(table))[::-1]  # the table's first row on top
    m = table["mean"].astype(float)
    ax.barh(y, m, color=[_color(lab) for lab in table["label"]])
    has = table["ci_lo"].notna().to_numpy() & table["ci_hi"].notna().to_numpy()  # one run, no interval: no whisker
    err = np.vstack([(m - table["ci_lo"]).clip(lower=0), (table["ci_hi"] - m).clip(lower=0)])[:, has]
    ax.errorbar(m[has], y[has], xerr=err.astype(float), fmt="none", ecolor="k", capsize=3, lw=1)
    ax.set_yticks(y, list(table["label"]), fontsize=8)
    if baseline is not None:
        ax.axvline(baseline[0], color="k", ls="--", lw=1, label=f"{baseline[1]} ({baseline[0]:.3f})")
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    if is_proportion(metric):
        ax.set_xlim(0, 1)
    kinds = interval_text(table["interval"]) if len(table) else "no runs"
    ax.set_xlabel(f"{metric}: {EXPLORER_METRICS.get(metric, metric)}\nbars: mean; whiskers: {kinds}", fontsize=8)
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
