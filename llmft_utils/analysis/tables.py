"""Reading written tables: seed aggregation, the summary, and the tables behind every claim (transfer,
distribution, calibrated and ensemble checks, break-even, HANS subcases).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..stats import kl_per_example, mcnemar_exact, paired_contrast, verbalizer_logp
from ..study import schema


def t_ci(values, confidence: float = 0.95, bounds: tuple | None = None) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval over seeds; a single value gives (v, nan, nan).
    ``bounds`` (e.g. (0, 1) for a proportion) clips the interval to the values the metric can take."""
    from scipy import stats

    v = np.asarray([x for x in values if not pd.isna(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    lo, hi = m - h, m + h
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return m, lo, hi


def is_proportion(metric: str) -> bool:
    """Metrics that live in [0, 1] (accuracies, fractions, agreement)."""
    return metric.endswith("acc") or metric.startswith("acc_") or metric.endswith("_frac") or metric.startswith("agree")


def summarize(df: pd.DataFrame, by: list, metrics: list) -> pd.DataFrame:
    """One row per group: ``n_seeds`` and, per metric, mean with a 95% t-interval over seeds."""
    out = []
    for keys, g in df.groupby(by, sort=True, dropna=False):
        row = dict(zip(by, keys if isinstance(keys, tuple) else (keys,)))
        row["n_seeds"] = int(g["seed"].nunique()) if "seed" in g else len(g)
        for m in metrics:
            mean, lo, hi = t_ci(g[m], bounds=(0.0, 1.0) if is_proportion(m) else None)
            row[f"{m}_mean"], row[f"{m}_ci_lo"], row[f"{m}_ci_hi"] = mean, lo, hi
        out.append(row)
    return pd.DataFrame(out)


def method_label(method: str, k: int, m=None) -> str:
    """The method as the tables and figures name it; ``m``: the sets of a teacher ensemble (``3x16``: 3 × k = 16)."""
    if method == "zero-shot" or (method == "icl" and k == 0):
        return "zero-shot"
    if method in ("icl_ensemble", "cd_ensemble"):
        return f"{'ICL' if method == 'icl_ensemble' else 'CD'} ensemble {int(m)}x{k}"
    return {"icl": f"ICL k={k}", "cd": f"CD k={k}", "pbft": f"PBFT n={k}", "cd_shuffled": f"CD shuffled k={k}",
            "cd_self": "CD self k=0"}[method]


def total_demonstrations(runs: pd.DataFrame) -> pd.Series:
    """Labelled demonstrations behind each row: k for ICL and single-prompt CD, m·k for a teacher ensemble (at
    inference or distilled), n for PBFT, 0 for the zero-shot model and the self-distillation control."""
    m = runs["ensemble_m"].fillna(1) if "ensemble_m" in runs else 1
    return (runs["k"] * m).where(runs["method"] != "cd_self", 0).astype(int)


def unify(icl: pd.DataFrame, cd: pd.DataFrame | None = None) -> pd.DataFrame:
    """One tidy frame of every evaluated run: ICL/zero-shot rows and CD/PBFT student rows.

    ``train_task``: where the labelled signal came from (the demonstration pool's task for ICL, the
    transfer/training task for CD and PBFT, none for zero-shot). ``prompt_tokens``: tokens the model
    reads per query at inference (prefix + query)."""
    parts = []
    if icl is not None and len(icl):
        a = icl.copy()
        a["method"] = np.where(a["k"] == 0, "zero-shot", "icl")
        a["train_task"] = np.where(a["k"] == 0, "none", a["demo_pool"].str.split("/").str[0])
        a["train_s"] = np.nan
        a["train_peak_mem_mb"] = np.nan
        a["teacher_cache_s"] = np.nan
        a["n_train"] = np.nan
        parts.append(a)
    if cd is not None and len(cd):
        parts.append(cd.copy())
    runs = pd.concat(parts, ignore_index=True, sort=False)
    ms = runs["ensemble_m"] if "ensemble_m" in runs else pd.Series(np.nan, index=runs.index)
    runs["method_label"] = [method_label(m, int(k), e) for m, k, e in zip(runs["method"], runs["k"], ms)]
    runs["total_demos"] = total_demonstrations(runs)
    runs["eval_set"] = runs["task"] + "/" + runs["split"]
    runs["config"] = run_configs(runs)
    runs["prompt_tokens"] = runs["prefix_tokens"].fillna(0) + runs["query_tokens_mean"]
    return runs


CONFIG_COLUMNS = ("dtype", "device_kind", "eval_ids_digest", "n_train")  # + every cfg_* column but cfg_seed


def run_configs(runs: pd.DataFrame) -> pd.Series:
    """Per row, a short digest of the settings besides the data seed that change its numbers: precision
    (dtype, device kind), the evaluation subset (``eval_ids_digest``), ``n_train`` and the whole training
    recipe (``cfg_*``: lr, loss, target, alpha, epochs, ...). Rows that differ only in seed share it, so
    means over seeds never pool two recipes or two precisions."""
    import hashlib
    import json

    frame = runs.assign(device_kind=runs["device"].astype(str).str.split(":").str[0]) if "device" in runs else runs
    cols = [c for c in CONFIG_COLUMNS if c in frame] + sorted(c for c in frame if c.startswith("cfg_") and c != "cfg_seed")
    def one(values) -> str:
        clean = [None if (isinstance(v, float) and v != v) else (float(v) if isinstance(v, (int, float, np.number))
                                                                  and not isinstance(v, bool) else str(v))
                 for v in values]
        return hashlib.sha1(json.dumps(dict(zip(cols, clean)), sort_keys=True).encode()).hexdigest()[:8]
    return pd.Series([one(v) for v in frame[cols].itertuples(index=False)], index=runs.index, dtype=object)


METHOD_ORDER = ["zero-shot", "ICL k=4", "ICL k=16", "CD k=4", "CD k=16", "CD shuffled k=16", "CD self k=0", "PBFT n=16"]


def method_order(labels) -> list:
    known = [m for m in METHOD_ORDER if m in set(labels)]
    rest = sorted(set(labels) - set(known), key=lambda s: ("ensemble" in s, s))  # ensembles after single prompts
    return known + rest


def evaluated(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(scored, skipped)``: rows that evaluated at least one example, and rows where every prompt was
    skipped as too long (``n_eval == 0``: their metrics are NaN, and they belong in no mean)."""
    if "n_eval" not in runs:
        return runs, runs.iloc[0:0]
    none = runs["n_eval"].fillna(0) == 0
    return runs[~none], runs[none]


# exact McNemar tests the student rows carry (distill.paired_vs); ensemble rows also against single-prompt CD and ICL
PAIRED_WITH = ("teacher", "pbft", "zeroshot", "cd", "icl")


def paired_counts(runs: pd.DataFrame, key: list, alpha: float = 0.05) -> pd.DataFrame:
    """Per group, how many seeds' students are significantly above / below the teacher, the PBFT student of the
    same seed and the zero-shot model in an exact McNemar test on the same examples (p < ``alpha``; columns
    ``n_seeds_above_<other>`` / ``n_seeds_below_<other>``, and ``n_seeds_tested_<other>``). Groups without the
    test (ICL rows; a results folder that predates it) are left out."""
    out = None
    for other in PAIRED_WITH:
        p, a, b = f"mcnemar_p_vs_{other}", f"student_only_right_vs_{other}", f"{other}_only_right"
        if not {p, a, b} <= set(runs):
            continue
        r = runs[runs[p].notna()]
        if r.empty:
            continue
        sig = r[p] < alpha
        g = r.assign(_above=sig & (r[a] > r[b]), _below=sig & (r[a] < r[b]), _n=1).groupby(key, dropna=False)
        part = g[["_above", "_below", "_n"]].sum().astype(int).rename(columns={
            "_above": f"n_seeds_above_{other}", "_below": f"n_seeds_below_{other}", "_n": f"n_seeds_tested_{other}"})
        out = part if out is None else out.join(part, how="outer")
    return pd.DataFrame() if out is None else out.reset_index()


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model, pattern, evaluation set, training task, method and configuration (:func:`run_configs`: two
    recipes or precisions in one table are two rows, never one mean): mean and 95% t-interval over seeds of score
    accuracy, and of accuracy on entailment (label 0) and non-entailment (label 1) examples, with the
    majority-class baseline, the always-minority baseline, balanced accuracy, ECE and the answer format
    (``non_verbalizer_frac``: top-1 token outside the verbalizers), and for students the paired tests against
    teacher, PBFT and zero-shot model as counts of seeds (:func:`paired_counts`). A group of one run (zero-shot) gets the Wilson interval of its accuracy over
    the evaluation examples instead (``score_acc_interval`` says which). Computed from the raw rows only; rows that evaluated nothing (every prompt
    skipped as too long) are left out."""
    runs, _ = evaluated(runs)
    runs = runs.assign(minority_acc=1.0 - runs["majority_acc"])  # the always-minority baseline (binary labels)
    t = summarize(runs, ["model", "pattern", "eval_set", "train_task", "method_label", "k", "config"],
                  ["score_acc", "acc_label0", "acc_label1", "majority_acc", "minority_acc", "s_per_query", "peak_mem_mb"]
                  + [c for c in ("balanced_acc", "ece", "non_verbalizer_frac", "mem_tensors_peak_mb",
                                 "score_acc_contextual", "score_acc_batch")
                     if c in runs and runs[c].notna().any()])
    t["score_acc_interval"] = "t over seeds"
    if {"score_acc_lo", "score_acc_hi"} <= set(runs):  # one run (zero-shot): its Wilson interval over examples
        key = ["model", "pattern", "eval_set", "train_task", "method_label", "k", "config"]
        one = runs.groupby(key, dropna=False).filter(lambda g: g["seed"].nunique() == 1 and len(g) == 1)
        wil = one.set_index(key)[["score_acc_lo", "score_acc_hi"]]
        idx = t.set_index(key).index
        hit = idx.isin(wil.index) & (t["n_seeds"] == 1).to_numpy()
        if hit.any():
            t.loc[hit, "score_acc_ci_lo"] = wil.loc[idx[hit], "score_acc_lo"].to_numpy()
            t.loc[hit, "score_acc_ci_hi"] = wil.loc[idx[hit], "score_acc_hi"].to_numpy()
            t.loc[hit, "score_acc_interval"] = "Wilson (one run)"
    paired = paired_counts(runs, key=["model", "pattern", "eval_set", "train_task", "method_label", "k", "config"])
    if len(paired):
        t = t.merge(paired, on=["model", "pattern", "eval_set", "train_task", "method_label", "k", "config"], how="left")
    t["method_order"] = t["method_label"].map({m: i for i, m in enumerate(method_order(t["method_label"]))})
    t = t.sort_values(["model", "pattern", "eval_set", "train_task", "method_order"]).drop(columns="method_order")
    return t.reset_index(drop=True)


TRANSFER_CHECK_COLUMNS = ["agree_teacher_student", "agree_teacher_zeroshot", "agree_teacher_constant",
                          "agree_teacher_bias_matched", "agree_teacher_shuffled", "agree_teacher_self",
                          "mcnemar_p_vs_constant_control", "mcnemar_p_vs_bias_matched_control",
                          "mcnemar_p_vs_shuffled_control", "mcnemar_p_vs_self_control", "kappa_teacher_student",
                          "kl_teacher_student", "kl_teacher_shuffled", "kl_teacher_self", "controls_checked",
                          "beats_controls"]


def transfer_checks(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per CD student and evaluation set: its agreement with its teacher beside the zero-shot model's
    and the controls' (constant majority-of-teacher, bias-matched zero-shot, and where trained the
    shuffled-target and self-distillation control students), the exact McNemar p-values of student vs
    control, κ, KL (the student's and the control students') and ``beats_controls`` (more agreement than every
    control in ``controls_checked``, each at p < 0.05; see ``stats.control_tests``). Columns a results folder predates are NaN
    (``beats_controls`` then is NaN: not decided, never a pass)."""
    cd = runs[runs["method"] == "cd"].copy()
    for c in TRANSFER_CHECK_COLUMNS:
        if c not in cd:
            cd[c] = np.nan
    keys = ["model", "pattern", "eval_set", "train_task", "k", "seed", "config"]
    return cd[keys + TRANSFER_CHECK_COLUMNS].sort_values(keys).reset_index(drop=True)


_PREDICTIONS: dict = {}  # (path, mtime, size) -> table: the claim checks read each file 4-8 times


def read_predictions(results_root, f):
    """A run's prediction table indexed by ``idx``, or None when the file is missing (tables-only checkout).
    Each file is read once per process while its size and modification time stay the same; callers get a copy."""
    path = Path(results_root) / f if isinstance(f, str) else None
    if path is None or not path.is_file():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _PREDICTIONS:
        if len(_PREDICTIONS) >= 2048:
            _PREDICTIONS.clear()
        _PREDICTIONS[key] = schema.read_predictions(path).set_index("idx")
    return _PREDICTIONS[key].copy()


def partner_rows(runs: pd.DataFrame, method: str, r) -> pd.DataFrame:
    """The rows of ``method`` that a paired test of row ``r`` compares with, on the same model, pattern,
    evaluation set and dtype: the zero-shot run; the ICL teacher of the same k and seed; the PBFT student of
    the same training task and seed; the control students of the same training task and seed trained for
    ``r``'s k (``controls_k``)."""
    sel = runs[(runs["method"] == method) & (runs["model"] == r["model"]) & (runs["pattern"] == r["pattern"])
               & (runs["eval_set"] == r["eval_set"]) & (runs["dtype"] == r["dtype"])]
    if method == "zero-shot":
        return sel
    sel = sel[sel["seed"] == r["seed"]]
    if method == "icl":
        return sel[sel["k"] == r["k"]]
    sel = sel[sel["train_task"] == r["train_task"]]
    if method == "icl_ensemble":
        return sel[(sel["k"] == r["k"]) & (sel["ensemble_m"] == r.get("ensemble_m"))]
    if method in ("cd_shuffled", "cd_self"):
        return sel[sel.get("controls_k", np.nan) == r["k"]]
    return sel if method == "pbft" else sel[sel["k"] == r["k"]]


def partner_predictions(runs, method, r, results_root):
    rows = partner_rows(runs, method, r)
    return read_predictions(results_root, rows["predictions_file"].iloc[-1]) if len(rows) else None


def distribution_checks(runs: pd.DataFrame, results_root) -> pd.DataFrame:
    """Transfer *in distribution*, per CD student and evaluation set, against the constant distribution at the
    teacher's mean (:func:`teacher_mean_check`, every student) and the control students trained beside it: per example, KL(teacher ‖ student) and KL(teacher ‖ control) over the verbalizers (from the
    prediction files), their means, and a two-sided Wilcoxon signed-rank test of the paired differences
    (``kl_p_vs_<control>``); ``closer_than_<control>``: the student's mean KL is lower at p < 0.05. Rows whose
    prediction files are missing are left out (a checkout with the tables only)."""
    out = []
    for _, r in runs[runs["method"] == "cd"].iterrows():
        tp, sp = partner_predictions(runs, "icl", r, results_root), read_predictions(results_root, r["predictions_file"])
        if tp is None or sp is None:
            continue
        row = {c: r[c] for c in ("model", "pattern", "eval_set", "train_task", "k", "seed", "config")}
        row.update(teacher_mean_check(tp, sp))
        for name, method in (("shuffled", "cd_shuffled"), ("self", "cd_self")):
            cp = partner_predictions(runs, method, r, results_root)
            if cp is None:
                continue
            idx = sp.index[~(sp["skipped"] | tp.loc[sp.index, "skipped"] | cp.loc[sp.index, "skipped"])]
            lt = verbalizer_logp(tp.loc[idx])
            kl_s = kl_per_example(lt, verbalizer_logp(sp.loc[idx]))
            kl_c = kl_per_example(lt, verbalizer_logp(cp.loc[idx]))
            pval, closer = paired_kl_test(kl_s, kl_c)
            row.update({"kl_student": float(kl_s.mean()), f"kl_{name}": float(kl_c.mean()),
                        f"kl_p_vs_{name}": pval, f"closer_than_{name}": closer})
        out.append(row)
    return pd.DataFrame(out)


def teacher_mean_check(teacher: pd.DataFrame, student: pd.DataFrame) -> dict:
    """The first control of a distribution claim: the constant answer distribution at the teacher's mean (over
    the evaluation set's examples) knows the teacher's label bias and nothing per example. Per example
    KL(teacher ‖ student) against KL(teacher ‖ that constant), with a two-sided Wilcoxon signed-rank test:
    ``kl_teacher_mean``, ``kl_p_vs_teacher_mean``, ``closer_than_teacher_mean`` (lower mean KL at p < 0.05)."""
    idx = student.index[~(student["skipped"] | teacher.loc[student.index, "skipped"])]
    lt = verbalizer_logp(teacher.loc[idx])
    kl_s = kl_per_example(lt, verbalizer_logp(student.loc[idx]))
    mean = np.log(np.exp(lt).mean(0, keepdims=True))
    kl_c = kl_per_example(lt, np.broadcast_to(mean, lt.shape))
    pval, closer = paired_kl_test(kl_s, kl_c)
    return {"kl_student": float(kl_s.mean()), "kl_teacher_mean": float(kl_c.mean()), "kl_p_vs_teacher_mean": pval,
            "closer_than_teacher_mean": closer}


def paired_kl_test(kl_a, kl_b, tol: float = 1e-12) -> tuple[float, bool]:
    """``(p, closer)``: a two-sided Wilcoxon signed-rank test of paired per-example KLs, differences within
    ``tol`` counted as ties (rounding, not evidence: an exact copy would otherwise test 'significant'), and
    whether ``a``'s mean KL is lower by more than ``tol`` at p < 0.05."""
    from scipy.stats import wilcoxon

    d = np.asarray(kl_a, float) - np.asarray(kl_b, float)
    d[np.abs(d) < tol] = 0.0
    pval = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return pval, bool(d.mean() < -tol and pval < 0.05)


CALIBRATED_PAIRS = (("icl", "zero-shot"), ("cd", "zero-shot"), ("cd", "cd_shuffled"), ("cd", "cd_self"), ("cd", "pbft"),
                    ("icl_ensemble", "icl"), ("cd_ensemble", "cd"), ("cd_ensemble", "icl"), ("cd_ensemble", "icl_ensemble"))


def calibrated_checks(runs: pd.DataFrame, results_root, kinds=("batch", "contextual")) -> pd.DataFrame:
    """Paired tests *after* label-bias calibration: per evaluation set, training task, k and seed, an exact
    McNemar test of "right after calibration" (``pred_<kind>`` of the prediction files) for each pair in
    :data:`CALIBRATED_PAIRS` (ICL vs zero-shot; CD vs zero-shot, the control students and PBFT of the same
    seed). One row per (pair, kind, seed): both accuracies, the discordant counts, ``p`` and ``direction``
    (``above``/``below`` at p < 0.05, else ``n.s.``), and the same after Holm's correction over the whole table
    (:func:`with_adjusted_p`). Rows without calibrated predictions are left out."""
    out = []
    for a_method, b_method in CALIBRATED_PAIRS:
        for _, r in runs[runs["method"] == a_method].iterrows():
            pa, pb = read_predictions(results_root, r["predictions_file"]), partner_predictions(runs, b_method, r, results_root)
            if pa is None or pb is None:
                continue
            for kind in kinds:
                col = f"pred_{kind}"
                if col not in pa or col not in pb:
                    continue
                idx = pa.index[(pa[col] >= 0) & (pb.loc[pa.index, col] >= 0)]
                ra, rb = (pa.loc[idx, col] == pa.loc[idx, "label"]), (pb.loc[idx, col] == pb.loc[idx, "label"])
                t = mcnemar_exact(ra.to_numpy(), rb.to_numpy())
                out.append({"eval_set": r["eval_set"], "train_task": r["train_task"], "k": r["k"], "seed": r["seed"],
                            "a": a_method, "b": b_method, "calibration": kind, "n": len(idx),
                            "acc_a": float(ra.mean()), "acc_b": float(rb.mean()), "only_a": t["only_a"],
                            "only_b": t["only_b"], "p": t["p"],
                            "direction": _direction(t["only_a"], t["only_b"], t["p"])})
    return with_adjusted_p(pd.DataFrame(out))


def with_adjusted_p(checks: pd.DataFrame) -> pd.DataFrame:
    """A table of paired tests with the family-wise and false-discovery corrections over all its rows (one
    family): ``p_holm`` (Holm), ``p_bh`` (Benjamini-Hochberg) and ``direction_holm`` (the verdict at Holm p)."""
    if not len(checks):
        return checks
    from ..stats import benjamini_hochberg, holm

    checks = checks.assign(p_holm=holm(checks["p"]), p_bh=benjamini_hochberg(checks["p"]))
    checks["direction_holm"] = [_direction(a, b, p) for a, b, p in zip(checks["only_a"], checks["only_b"], checks["p_holm"])]
    return checks


def _direction(only_a, only_b, p, alpha: float = 0.05) -> str:
    """A paired test's verdict: ``above`` / ``below`` (a right more / less often than b) at p < ``alpha``, else
    ``n.s.``; ``not tested`` for a NaN p."""
    if p != p:
        return "not tested"
    return ("above" if only_a > only_b else "below") if p < alpha else "n.s."


ENSEMBLE_TESTS = (("cd_ensemble", "cd", "single-prompt CD of the same k"),
                  ("cd_ensemble", "icl", "single-prompt ICL at the largest k run (icl_k)"),
                  ("cd_ensemble", "teacher", "its teacher, the ensemble at inference"),
                  ("icl_ensemble", "icl", "single-prompt ICL at the largest k run (icl_k)"))


def ensemble_checks(runs: pd.DataFrame) -> pd.DataFrame:
    """Teacher ensembles, per evaluation set, training task, k, m and seed: the accuracies (raw and after batch
    calibration) of the zero-shot model, single-prompt ICL at ``icl_k`` (the largest k run, which the tests compare
    with), the ensemble at inference, single-prompt CD and
    the ensemble student, the members' mean and best accuracy and the range of their label-1 rates (from the
    ensemble at inference; NaN for rows written before they were recorded), with the exact McNemar tests the rows carry (:data:`ENSEMBLE_TESTS`: ``p_<a>_vs_<b>``
    and ``<a>_vs_<b>``: above / below at p < 0.05, n.s., or not tested)."""
    out = []
    for _, r in runs[runs["method"] == "cd_ensemble"].iterrows():
        part = {m: partner_rows(runs, m, r) for m in ("icl_ensemble", "cd", "zero-shot")}
        # single-prompt ICL: the run of icl_k, which the McNemar tests compared with (k where icl_k is absent)
        at_icl_k = r.copy()
        if pd.notna(r.get("icl_k")):
            at_icl_k["k"] = r["icl_k"]
        part["icl"] = partner_rows(runs, "icl", at_icl_k)
        row = {c: r[c] for c in ("eval_set", "train_task", "k", "seed")}
        row.update({"m": int(r["ensemble_m"]), "total_demos": int(r["ensemble_m"] * r["k"]), "icl_k": r.get("icl_k")})
        for name, rows_ in (("zeroshot", part["zero-shot"]), ("icl", part["icl"]), ("icl_ensemble", part["icl_ensemble"]),
                            ("cd", part["cd"]), ("cd_ensemble", pd.DataFrame([r]))):
            for col, suffix in (("score_acc", ""), ("score_acc_batch", "_batch")):
                row[f"acc_{name}{suffix}"] = float(rows_[col].iloc[-1]) if len(rows_) and col in rows_ else float("nan")
        ens = part["icl_ensemble"].iloc[-1] if len(part["icl_ensemble"]) else {}
        for col in ("member_acc_mean", "member_acc_max", "member_label1_frac_min", "member_label1_frac_max"):
            row[col] = float(ens.get(col, float("nan")))  # the ensemble against its mean and its best member
        row["agree_teacher_cd_ensemble"] = r.get("agree_teacher_student", float("nan"))
        row["agree_teacher_cd"] = float(part["cd"]["agree_teacher_student"].iloc[-1]) if len(part["cd"]) else float("nan")
        for a, b, _ in ENSEMBLE_TESTS:
            src = r if a == "cd_ensemble" else (part["icl_ensemble"].iloc[-1] if len(part["icl_ensemble"]) else None)
            get = (lambda c: src.get(c, float("nan"))) if src is not None else (lambda c: float("nan"))
            pval = get(f"mcnemar_p_vs_{b}")
            row[f"p_{a}_vs_{b}"] = pval
            row[f"{a}_vs_{b}"] = _direction(get(f"student_only_right_vs_{b}"), get(f"{b}_only_right"), pval)
        out.append(row)
    return pd.DataFrame(out)


def ensemble_members(runs: pd.DataFrame, root) -> pd.DataFrame:
    """Each teacher ensemble at inference against its own members, on the same examples (from the member
    predictions its file stores: ``member<j>_pred``; rows written before they were stored are left out):

    - the mean member: ``ensemble_minus_mean_member`` = mean over examples of (ensemble right − share of members
      right), with its 95% bootstrap interval over the examples and two-sided p (:func:`llmft_utils.stats.paired_contrast`);
    - the best member (the most accurate on these very examples, so the comparison favours the member): exact
      McNemar, ``p_vs_best_member`` and ``vs_best_member`` (above / below at p < 0.05, n.s.);
    - each member's accuracy and label-1 rate (``member_accs``, ``member_label1_fracs``): members biased to
      opposite labels would show rates on both sides of the gold rate."""
    out = []
    for _, r in runs[runs["method"] == "icl_ensemble"].iterrows():
        preds = read_predictions(root, r.get("predictions_file"))
        if preds is None or "member0_pred" not in preds:
            continue
        if "skipped" in preds:
            preds = preds[~preds["skipped"].astype(bool)]
        m = int(r["ensemble_m"])
        gold = preds["label"].to_numpy()
        member_pred = np.stack([preds[f"member{j}_pred"].to_numpy() for j in range(m)])
        member_right = member_pred == gold
        right = preds["pred"].to_numpy() == gold
        accs = member_right.mean(1)
        best = int(np.argmax(accs))
        vs_mean = paired_contrast((right - member_right.mean(0))[None, :])
        mc = mcnemar_exact(right, member_right[best])
        out.append({"eval_set": r["eval_set"], "train_task": r["train_task"], "k": int(r["k"]), "seed": int(r["seed"]),
                    "m": m, "n": int(len(gold)), "gold_label1_frac": float(gold.mean()),
                    "acc_icl_ensemble": float(right.mean()),
                    "member_accs": ";".join(f"{a:.4f}" for a in accs),
                    "member_label1_fracs": ";".join(f"{f:.4f}" for f in member_pred.mean(1)),
                    "acc_member_mean": float(accs.mean()), "ensemble_minus_mean_member": vs_mean["estimate"],
                    "ci_lo": vs_mean["ci_lo"], "ci_hi": vs_mean["ci_hi"], "p_vs_mean_member": vs_mean["p"],
                    "best_member": best, "acc_member_best": float(accs[best]),
                    "only_ensemble_right": mc["only_a"], "only_best_right": mc["only_b"],
                    "p_vs_best_member": mc["p"],
                    "vs_best_member": _direction(mc["only_a"], mc["only_b"], mc["p"])})
    return pd.DataFrame(out)


def ensemble_finding(checks: pd.DataFrame) -> str:
    """A short written finding from :func:`ensemble_checks`: for each test, in how many seed × evaluation-set
    checks the first method is significantly above / below the second (p < 0.05), with the mean accuracies."""
    if checks is None or not len(checks):
        return "No teacher ensembles in these rows."
    lines = []
    for a, b, what in ENSEMBLE_TESTS:
        d = checks[f"{a}_vs_{b}"]
        tested = d[d != "not tested"]
        if not len(tested):
            continue
        acc_b = {"cd": "acc_cd", "icl": "acc_icl", "teacher": "acc_icl_ensemble"}[b]
        name = {"cd_ensemble": "The ensemble student", "icl_ensemble": "The ensemble at inference"}[a]
        lines.append(f"{name} vs {what}: above in {int((tested == 'above').sum())}, below in "
                     f"{int((tested == 'below').sum())}, not significant in {int((tested == 'n.s.').sum())} of "
                     f"{len(tested)} seed × set checks (mean accuracy {checks[f'acc_{a}'].mean():.3f} vs "
                     f"{checks[acc_b].mean():.3f}; after batch calibration {checks[f'acc_{a}_batch'].mean():.3f} vs "
                     f"{checks[acc_b + '_batch'].mean():.3f}).")
    return "\n".join(lines)


def teacher_seconds(runs: pd.DataFrame, students: pd.DataFrame) -> pd.Series:
    """Per student row, the seconds its teacher targets took to compute: its own ``teacher_cache_s`` when it
    computed them, else (``teacher_cache_hit``) that of the row that did — a student of the same training
    task, k, seed, transfer set and configuration that used the same teacher (the shuffled-target control
    trains first and computes the CD teacher) — else NaN (cached by an earlier run: cost unknown here)."""
    if "teacher_cache_hit" not in students:
        return students["teacher_cache_s"]
    key = ["train_task", "k", "seed", "train_ids_digest"]
    if not set(key) <= set(runs):
        return students["teacher_cache_s"].where(~students["teacher_cache_hit"].fillna(False).astype(bool))
    made = runs[runs["method"].isin(["cd", "cd_shuffled"]) & (runs["teacher_cache_hit"] == False)]  # noqa: E712
    made = made.groupby(key)["teacher_cache_s"].max()
    out = []
    for _, r in students.iterrows():
        hit = r.get("teacher_cache_hit")
        if hit is None or hit != hit or not bool(hit):
            out.append(r["teacher_cache_s"])
        else:
            out.append(made.get(tuple(r[c] for c in key), float("nan")))
    return pd.Series(out, index=students.index, dtype=float)


def break_even(runs: pd.DataFrame) -> pd.DataFrame:
    """The serving cost of ICL against CD's one-off cost, per model, pattern, evaluation set, training task, k
    and configuration (means over seeds):

        ICL, prefix cached:   c_icl · N          ICL, no prefix cache:   c_full · N
        CD:                   C_once + c_student · N,   C_once = teacher caching + training (one student)

    with c = wall seconds per query of the rows (``s_per_query``; ``s_per_query_full_prompt`` from the
    full-prompt sample of each ICL run). Break-even N* = C_once / (c_icl − c_student) queries (and the same
    with c_full); ``inf`` where the student is not cheaper per query. Rows: ``n_seeds`` (ICL rows),
    ``n_students``, the per-query costs, ``cd_once_s``, ``break_even_cached``, ``break_even_full``.
    A student whose teacher came from the cache is charged what computing that teacher cost
    (:func:`teacher_seconds`); where no row of the table computed it, its one-off cost is unknown (NaN)."""
    icl = runs[runs["method"] == "icl"]
    cd = runs[runs["method"] == "cd"].copy()
    if len(cd):
        cd["teacher_cache_s"] = teacher_seconds(runs, cd)
    keys = ["model", "pattern", "eval_set", "train_task", "k"]
    out = []
    for key, g in icl.groupby(keys):
        c = cd
        for col, v in zip(keys, key):
            c = c[c[col] == v]
        if not len(c):
            continue
        for cfg, cc in c.groupby("config"):
            students = cc.drop_duplicates(["train_task", "k", "seed"])
            once = float((students["teacher_cache_s"] + students["train_s"]).mean())
            c_icl = float(g["s_per_query"].mean())
            c_full = float(g["s_per_query_full_prompt"].mean()) if "s_per_query_full_prompt" in g else float("nan")
            c_st = float(cc["s_per_query"].mean())
            n_star = lambda other: once / (other - c_st) if other == other and other > c_st else (  # noqa: E731
                float("inf") if other == other else float("nan"))
            out.append({**dict(zip(keys, key)), "config": cfg, "n_seeds": int(g["seed"].nunique()),
                        "n_students": len(students), "s_per_query_icl": c_icl, "s_per_query_full_prompt": c_full,
                        "s_per_query_student": c_st, "cd_once_s": once,
                        "break_even_cached": n_star(c_icl), "break_even_full": n_star(c_full)})
    return pd.DataFrame(out)


def hans_subcases(runs: pd.DataFrame, results_root) -> pd.DataFrame:
    """Per HANS run, accuracy per heuristic × subcase from its prediction file (tidy, one row each)."""
    out = []
    h = runs[runs["task"] == "hans"]
    for _, r in h.iterrows():
        path = Path(results_root) / r["predictions_file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; rerun the notebook that wrote it (force=True)")
        p = schema.read_predictions(path)
        p = p[~p["skipped"]]
        for (heur, sub), g in p.groupby(["heuristic", "subcase"]):
            out.append({"run_key": r["run_key"], "method_label": r["method_label"], "train_task": r["train_task"],
                        "k": r["k"], "seed": r["seed"], "heuristic": heur, "subcase": sub,
                        "label": int(g["label"].iloc[0]), "n": len(g), "acc": float((g["pred"] == g["label"]).mean())})
    return pd.DataFrame(out)


# The explorer of notebook 04: one evaluation set, one method family, one metric, the same groups and intervals as
# the summary table. Memory is the measured tensor memory (``probes.tensor_memory``), never the process RSS.
EXPLORER_METRICS = {
    "score_acc": "accuracy (verbalizer score)",
    "score_acc_batch": "accuracy after batch calibration",
    "score_acc_contextual": "accuracy after contextual calibration",
    "balanced_acc": "balanced accuracy (mean of the two per-label accuracies)",
    "acc_label0": "accuracy on entailed examples",
    "acc_label1": "accuracy on non-entailed examples",
    "top1_acc": "full-vocabulary top-1 accuracy",
    "non_verbalizer_frac": "share of queries whose top-1 token is not an answer word",
    "s_per_query": "seconds per query",
    "prompt_tokens": "prompt tokens per query",
    "mem_tensors_peak_mb": "tensor memory at the largest batch (MB)",
    "train_s": "training seconds per student",
    "train_mem_tensors_peak_mb": "training-step tensor memory (MB)",
}
# proportions over the whole evaluation set: a one-run group gets their Wilson interval over its n_eval examples,
# and the majority class is their baseline
WHOLE_SET_PROPORTIONS = ("score_acc", "score_acc_batch", "score_acc_contextual", "top1_acc", "non_verbalizer_frac")
WHOLE_SET_ACCURACIES = ("score_acc", "score_acc_batch", "score_acc_contextual", "top1_acc")
T_INTERVAL, WILSON_INTERVAL, NO_INTERVAL = "95% t-interval over seeds", "Wilson 95% over examples", "none (one run)"
METHOD_FAMILIES = ("all", "zero-shot", "ICL", "CD", "PBFT")


def explorer_metrics(runs: pd.DataFrame) -> list:
    """The metrics of :data:`EXPLORER_METRICS` that ``runs`` has a value of, in that order."""
    return [m for m in EXPLORER_METRICS if m in runs and runs[m].notna().any()]


def one_run_interval(row, metric: str) -> tuple[float, float, str]:
    """``(lo, hi, kind)`` for a group of one run: the run's own Wilson interval of its accuracy (the one the
    summary table shows), the Wilson interval over its ``n_eval`` examples for the other whole-set proportions,
    else no interval."""
    from ..scoring.evaluation import wilson_ci

    v, n = row[metric], row.get("n_eval", float("nan"))
    if metric == "score_acc" and pd.notna(row.get("score_acc_lo")) and pd.notna(row.get("score_acc_hi")):
        return float(row["score_acc_lo"]), float(row["score_acc_hi"]), WILSON_INTERVAL
    if metric in WHOLE_SET_PROPORTIONS and pd.notna(v) and pd.notna(n) and n > 0:
        return (*wilson_ci(int(round(float(v) * n)), int(n)), WILSON_INTERVAL)
    return float("nan"), float("nan"), NO_INTERVAL


def group_interval(g: pd.DataFrame, metric: str) -> tuple[float, float, float, str]:
    """``(mean, lo, hi, kind)`` of ``metric`` over one group of runs, as the summary table gives it: over two or
    more seeds the 95% t-interval (bounded to [0, 1] for proportions), for one run :func:`one_run_interval`."""
    g = g[g[metric].notna()]
    if g["seed"].nunique() > 1:
        return (*t_ci(g[metric], bounds=(0.0, 1.0) if is_proportion(metric) else None), T_INTERVAL)
    if len(g) == 1:
        return (float(g[metric].iloc[0]), *one_run_interval(g.iloc[0], metric))
    return float(g[metric].mean()) if len(g) else float("nan"), float("nan"), float("nan"), NO_INTERVAL


def explorer_label(method_label: str, train_task: str) -> str:
    """``CD k=16 (from mnli)``: the method and where its labelled signal came from (zero-shot: the method alone)."""
    return method_label if train_task in ("none", "", None) else f"{method_label} (from {train_task})"


def explorer_table(runs: pd.DataFrame, eval_set: str, method: str = "all", metric: str = "score_acc") -> pd.DataFrame:
    """One row per summary-table group (model, pattern, training task, method, k, configuration) of ``eval_set``
    whose method label starts with ``method`` (``all``: every method) and that has a value of ``metric``:
    ``label`` (readable, :func:`explorer_label`; model, pattern or configuration appended only where two groups
    would share it), ``mean``, ``ci_lo``/``ci_hi`` (the summary table's interval: 95% t over seeds, bounded to
    [0, 1] for proportions; one run: :func:`one_run_interval`), ``n_seeds`` and ``interval`` (which kind)."""
    g = runs[(runs["eval_set"] == eval_set) & runs[metric].notna()] if metric in runs else runs.iloc[0:0]
    if method != "all":
        g = g[g["method_label"].str.startswith(method)]
    key = ["model", "pattern", "train_task", "method_label", "k", "config"]
    out = []
    for keys, grp in g.groupby(key, sort=False, dropna=False):
        row = dict(zip(key, keys))
        mean, lo, hi, kind = group_interval(grp, metric)
        out.append({**row, "label": explorer_label(row["method_label"], row["train_task"]), "mean": mean,
                    "ci_lo": lo, "ci_hi": hi, "n_seeds": int(grp["seed"].nunique()), "interval": kind})
    cols = ["label", "mean", "ci_lo", "ci_hi", "n_seeds", "interval"]
    if not out:
        return pd.DataFrame(columns=cols)
    t = pd.DataFrame(out)
    for extra in ("model", "pattern", "config"):  # told apart only where a label would otherwise repeat
        dup = t["label"].duplicated(keep=False)
        if t.loc[dup, extra].nunique() > 1:
            t.loc[dup, "label"] = t.loc[dup, "label"] + f" · {extra} " + t.loc[dup, extra].astype(str)
    order = {m: i for i, m in enumerate(method_order(t["method_label"]))}
    t = t.assign(_o=t["method_label"].map(order)).sort_values(["_o", "train_task", "label"])
    return t[cols].reset_index(drop=True)


def explorer_baseline(runs: pd.DataFrame, eval_set: str, metric: str) -> tuple[float, str] | None:
    """``(value, name)`` of the line the explorer draws under ``metric`` on ``eval_set``: the majority class
    (``majority_acc``) for accuracies over the whole set, 0.5 (any constant answer) for balanced accuracy; None
    for the rest (a per-label accuracy's constant baseline is 0 or 1; costs have none)."""
    if metric == "balanced_acc":
        return 0.5, "any constant answer"
    g = runs.loc[runs["eval_set"] == eval_set, "majority_acc"] if "majority_acc" in runs else pd.Series(dtype=float)
    if metric in WHOLE_SET_ACCURACIES and g.notna().any():
        return float(g.max()), "majority class"
    return None


def interval_text(kinds) -> str:
    """What the whiskers are, from the ``interval`` column of :func:`explorer_table`."""
    kinds = set(kinds)
    parts = [k for k in (T_INTERVAL, WILSON_INTERVAL) if k in kinds]
    text = " (one-run rows: ".join(parts) + (")" if len(parts) == 2 else "")
    if NO_INTERVAL in kinds:
        text = (text + "; " if text else "") + "no whisker: one run, no interval for this metric"
    return text


def explorer_caption(table: pd.DataFrame, metric: str, baseline: tuple | None = None) -> str:
    """One line saying what the explorer's chart shows, e.g. ``score_acc — bars: mean over 3 seeds (one run:
    zero-shot); whiskers: 95% t-interval over seeds (one-run rows: Wilson 95% over examples); dashed: majority
    class 0.520``."""
    n = table["n_seeds"]
    single = list(dict.fromkeys(re.sub(r" \(from [^)]*\)", "", x) for x in table.loc[n == 1, "label"]))
    if (n > 1).any():
        bars = f"mean over {int(n.max())} seeds" if n[n > 1].nunique() == 1 else f"mean over {int(n[n > 1].min())}-{int(n.max())} seeds"
        if single:
            bars += f" (one run: {', '.join(single[:3])}{', ...' if len(single) > 3 else ''})"
    else:
        bars = "one run each"
    text = f"{metric} — bars: {bars}; whiskers: {interval_text(table['interval'])}"
    if baseline is not None:
        text += f"; dashed: {baseline[1]} {baseline[0]:.3f}"
    return text
