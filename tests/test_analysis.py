import numpy as np
import pandas as pd
import pytest

from llmft_utils.analysis import plots, tables
from llmft_utils.store import repo_root
from llmft_utils.study import schema

REFERENCE = repo_root() / "results" / "reference"


def _icl_rows():
    rows = []
    for task, split, pool in (("mnli", "validation_matched", "mnli/train"), ("hans", "validation", "mnli/train")):
        for k, seeds in ((0, [0]), (4, [0, 1, 2])):
            for s in seeds:
                acc = 0.5 + 0.01 * k + 0.005 * s + (0.02 if task == "mnli" else 0)
                rows.append({"run_key": f"{task}{k}{s}", "model": "m", "pattern": "gpt-3", "task": task, "split": split,
                             "k": k, "seed": s, "demo_pool": pool, "score_acc": acc, "acc_label0": acc + 0.1,
                             "acc_label1": acc - 0.1, "majority_acc": 0.52 if task == "mnli" else 0.5,
                             "s_per_query": 0.05 + 0.01 * k, "peak_mem_mb": 1000 + 10 * k,
                             "peak_mem_delta_mb": 10 * k, "prefix_tokens": 40 * k, "query_tokens_mean": 45.0,
                             "predictions_file": "none"})
    return pd.DataFrame(rows)


def _cd_rows():
    rows = []
    for method, k in (("cd", 4), ("pbft", 16)):
        for task, split in (("mnli", "validation_matched"), ("hans", "validation")):
            for s in (0, 1, 2):
                rows.append({"run_key": f"{method}{task}{s}", "method": method, "model": "m", "pattern": "gpt-3",
                             "train_task": "mnli", "task": task, "split": split, "k": k, "seed": s,
                             "score_acc": 0.55 + 0.01 * s, "acc_label0": 0.6, "acc_label1": 0.5,
                             "majority_acc": 0.52 if task == "mnli" else 0.5, "s_per_query": 0.05,
                             "peak_mem_mb": 3000.0, "peak_mem_delta_mb": 5.0, "prefix_tokens": 0,
                             "query_tokens_mean": 45.0, "teacher_cache_s": 10.0 if method == "cd" else 0.0,
                             "train_s": 60.0 + s, "train_peak_mem_mb": 4000.0, "train_mem_delta_mb": 2000.0,
                             "n_train": 64 if method == "cd" else 16, "predictions_file": "none"})
    return pd.DataFrame(rows)


def test_summary_recomputes_from_raw_rows():
    runs = tables.unify(_icl_rows(), _cd_rows())
    s = tables.summary_table(runs)
    assert set(s["method_label"]) == {"zero-shot", "ICL k=4", "CD k=4", "PBFT n=16"}
    for _, r in s.iterrows():
        g = runs[(runs["eval_set"] == r["eval_set"]) & (runs["method_label"] == r["method_label"])
                 & (runs["train_task"] == r["train_task"])]
        m, lo, hi = tables.t_ci(g["score_acc"], bounds=(0, 1))
        assert 0 <= r["acc_label0_ci_lo"] <= r["acc_label0_ci_hi"] <= 1 or np.isnan(r["acc_label0_ci_lo"])
        assert r["score_acc_mean"] == pytest.approx(m) and r["n_seeds"] == g["seed"].nunique()
        assert (np.isnan(lo) and np.isnan(r["score_acc_ci_lo"])) or r["score_acc_ci_lo"] == pytest.approx(lo)
        assert r["acc_label0_mean"] == pytest.approx(g["acc_label0"].mean())
    zs = s[s["method_label"] == "zero-shot"]
    assert (zs["train_task"] == "none").all() and zs["score_acc_ci_lo"].isna().all()


@pytest.mark.parametrize("fn", ["accuracy_vs_k", "in_vs_out_of_domain", "cost_vs_k", "training_cost"])
def test_figures_have_labelled_axes(fn):
    import matplotlib

    matplotlib.use("Agg")
    runs = tables.unify(_icl_rows(), _cd_rows())
    arg = tables.summary_table(runs) if fn in ("accuracy_vs_k", "in_vs_out_of_domain") else runs
    fig = getattr(plots, fn)(arg)
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() and ax.get_ylabel()
    assert any(len(ax.lines) + len(ax.patches) + len(ax.collections) for ax in fig.axes)


@pytest.mark.parametrize("fn", ["accuracy_vs_k", "in_vs_out_of_domain", "cost_vs_k", "training_cost"])
def test_figures_before_notebook_03_has_run(fn):
    """Notebook 04 on a folder with icl.csv only (03 not run yet) draws every figure instead of a KeyError."""
    import matplotlib

    matplotlib.use("Agg")
    runs = tables.unify(_icl_rows(), None)
    arg = tables.summary_table(runs) if fn in ("accuracy_vs_k", "in_vs_out_of_domain") else runs
    assert getattr(plots, fn)(arg).axes


def test_hans_heatmap_from_tidy_subcases():
    import matplotlib

    matplotlib.use("Agg")
    sub = pd.DataFrame([{"method_label": m, "train_task": t, "heuristic": "lexical_overlap", "subcase": sc, "acc": a}
                        for m, t in (("zero-shot", "none"), ("ICL k=4", "mnli"))
                        for sc, a in (("ln_passive", 0.2), ("le_passive", 0.9))])
    fig = plots.hans_heatmap(sub)
    assert fig.axes[0].images[0].get_array().shape == (2, 2)


@pytest.mark.skipif(not (REFERENCE / "summary.csv").is_file(), reason="no committed reference results")
def test_committed_reference_summary_matches_its_raw_rows():
    """The committed summary table (and so every number drawn from it) is exactly what the raw rows give."""
    again = tables.summary_table(tables.unify(schema.read_table(REFERENCE / "icl.csv"), schema.read_table(REFERENCE / "cd.csv")))
    pd.testing.assert_frame_equal(again, schema.read_table(REFERENCE / "summary.csv"), check_dtype=False, atol=1e-12)
    figs = {p.stem for p in (REFERENCE / "figures").glob("*.png")}
    assert figs >= {"accuracy_vs_k", "in_vs_out_of_domain", "cost_vs_k", "hans_subcases", "training_cost"}


@pytest.mark.skipif(not (REFERENCE / "summary.csv").is_file(), reason="no committed reference results")
def test_committed_figures_are_reproduced_byte_for_byte(tmp_path):
    """Notebook 04's figures, drawn again from the committed tables, equal the committed PNG and SVG files
    (no date, a fixed SVG id salt): rerunning 04 on results/reference/ leaves git clean."""
    import matplotlib

    matplotlib.use("Agg")
    runs, _ = tables.evaluated(tables.unify(schema.read_table(REFERENCE / "icl.csv"), schema.read_table(REFERENCE / "cd.csv")))
    summary = tables.summary_table(runs)
    figs = {"accuracy_vs_k": plots.accuracy_vs_k(summary), "in_vs_out_of_domain": plots.in_vs_out_of_domain(summary),
            "cost_vs_k": plots.cost_vs_k(runs), "training_cost": plots.training_cost(runs),
            "hans_subcases": plots.hans_heatmap(schema.read_table(REFERENCE / "hans_subcases.csv")),
            "break_even": plots.cost_break_even(tables.break_even(runs)),
            "accuracy_vs_total_demos": plots.accuracy_vs_total_demos(runs)}
    pd.testing.assert_frame_equal(tables.break_even(runs), schema.read_table(REFERENCE / "break_even.csv"), check_dtype=False)
    for name, fig in figs.items():
        for path in plots.save(fig, tmp_path, name):
            assert path.read_bytes() == (REFERENCE / "figures" / path.name).read_bytes(), path.name


def test_summary_never_pools_two_recipes_or_precisions():
    """Rows that differ only in seed share a configuration; two learning rates (or two dtypes) in one table
    give two summary rows with their own n_seeds, not one mean over both."""
    cd = _cd_rows().assign(cfg_lr=3e-5)
    two = pd.concat([cd, cd.assign(cfg_lr=cd["cfg_lr"] * 10, run_key=cd["run_key"] + "|lr",
                                   score_acc=cd["score_acc"] - 0.1)], ignore_index=True)
    s = tables.summary_table(tables.unify(_icl_rows(), two))
    one = tables.summary_table(tables.unify(_icl_rows(), cd))
    cd_rows = lambda t: t[t["method_label"].str.startswith("CD")]
    assert len(cd_rows(s)) == 2 * len(cd_rows(one))
    assert sorted(cd_rows(s)["n_seeds"]) == sorted(list(cd_rows(one)["n_seeds"]) * 2)
    assert sorted(cd_rows(s)["score_acc_mean"].round(6)) == sorted(
        list(cd_rows(one)["score_acc_mean"].round(6)) + list((cd_rows(one)["score_acc_mean"] - 0.1).round(6)))
    icl = _icl_rows().assign(dtype="float32")
    f32 = tables.unify(icl, None)
    mixed = tables.unify(pd.concat([icl, icl.assign(dtype="bfloat16", run_key=icl["run_key"] + "|bf16")]), None)
    assert len(tables.summary_table(mixed)) == 2 * len(tables.summary_table(f32))
    assert tables.unify(icl, None).groupby(["task", "k"])["config"].nunique().eq(1).all()


def test_loss_curves_one_line_per_student_per_method():
    log = pd.DataFrame([{"student": f"{m}|tiny|{t}|gpt-3|k4|s{s}|n8|abc|float32@cpu", "batch": b,
                         "loss": 1.0 / (b + 1), "lr": 1e-3, "grad_norm": 1.0}
                        for m in ("cd", "pbft") for t in ("mnli", "rte") for s in (0, 1) for b in range(5)])
    fig = plots.loss_curves(log)
    assert [len(ax.lines) for ax in fig.axes if ax.lines] == [4, 4]
    assert {t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()} == {"mnli", "rte"}
    empty = plots.loss_curves(log.iloc[0:0])
    assert not empty.axes[0].lines


def test_break_even_of_distillation_against_cached_and_uncached_icl():
    """ICL k=4 costs 0.09 s/query cached and 0.5 s/query on full prompts; the CD students cost 0.05 s/query
    after 10 s of teacher caching + 61 s of training (mean over 3 students): break-even at 71 / 0.04 = 1,775
    queries against cached ICL and 71 / 0.45 ≈ 158 against uncached ICL. A student no cheaper than ICL never
    breaks even."""
    import matplotlib

    matplotlib.use("Agg")
    runs = tables.unify(_icl_rows().assign(s_per_query_full_prompt=0.5), _cd_rows())
    t = tables.break_even(runs)
    assert set(t["eval_set"]) == {"mnli/validation_matched", "hans/validation"} and (t["k"] == 4).all()
    r = t[t["eval_set"] == "mnli/validation_matched"].iloc[0]
    assert r["cd_once_s"] == pytest.approx(71.0) and r["n_students"] == 3 and r["n_seeds"] == 3
    assert r["break_even_cached"] == pytest.approx(71.0 / (0.09 - 0.05))
    assert r["break_even_full"] == pytest.approx(71.0 / (0.5 - 0.05))
    slow = tables.break_even(tables.unify(_icl_rows(), _cd_rows().assign(s_per_query=0.2)))
    assert np.isinf(slow["break_even_cached"]).all() and slow["break_even_full"].isna().all()  # no full-prompt sample
    fig = plots.cost_break_even(t)
    assert len(fig.axes) == 2 and all(ax.get_xscale() == "log" for ax in fig.axes)


def test_break_even_charges_a_cached_teacher_what_computing_it_cost():
    """The shuffled-target control computes the CD teacher (same key) and the CD student then hits the cache
    (0 s): the CD student's one-off cost still includes the teacher's 10 s; a hit no row explains is unknown."""
    cd = _cd_rows().assign(train_ids_digest="t", teacher_cache_hit=False)
    hit = cd["method"] == "cd"
    shuffled = cd[hit].assign(method="cd_shuffled", run_key=lambda d: d["run_key"] + "sh")
    cd.loc[hit, "teacher_cache_s"], cd.loc[hit, "teacher_cache_hit"] = 0.0, True
    t = tables.break_even(tables.unify(_icl_rows(), pd.concat([shuffled, cd], ignore_index=True)))
    assert t.loc[t["eval_set"] == "mnli/validation_matched", "cd_once_s"].item() == pytest.approx(71.0)
    orphan = tables.break_even(tables.unify(_icl_rows(), cd))
    assert orphan["cd_once_s"].isna().all() and orphan["break_even_cached"].isna().all()


def test_transfer_checks_table_never_passes_undecided_rows():
    runs = tables.unify(_icl_rows(), _cd_rows())
    old = tables.transfer_checks(runs)  # rows from before the controls existed
    assert len(old) == 6 and old["beats_controls"].isna().all() and old["agree_teacher_bias_matched"].isna().all()
    cd = _cd_rows().assign(agree_teacher_student=0.9, agree_teacher_constant=0.7, agree_teacher_bias_matched=0.75,
                           mcnemar_p_vs_constant_control=0.001, mcnemar_p_vs_bias_matched_control=0.01,
                           beats_controls=True)
    new = tables.transfer_checks(tables.unify(_icl_rows(), cd))
    assert new["beats_controls"].astype(bool).all() and (new["method"] if "method" in new else new["k"]).notna().all()
    assert list(new.columns[-len(tables.TRANSFER_CHECK_COLUMNS):]) == tables.TRANSFER_CHECK_COLUMNS


def test_zero_shot_rows_get_a_wilson_interval():
    from llmft_utils.scoring import wilson_ci

    icl = _icl_rows().assign(score_acc_lo=np.nan, score_acc_hi=np.nan, n_eval=1000)
    z = icl["k"] == 0
    icl.loc[z, "score_acc_lo"] = [wilson_ci(round(a * 1000), 1000)[0] for a in icl.loc[z, "score_acc"]]
    icl.loc[z, "score_acc_hi"] = [wilson_ci(round(a * 1000), 1000)[1] for a in icl.loc[z, "score_acc"]]
    s = tables.summary_table(tables.unify(icl, _cd_rows()))
    zs = s[s["method_label"] == "zero-shot"]
    assert len(zs) == 2 and (zs["score_acc_interval"] == "Wilson (one run)").all()
    assert (zs["score_acc_ci_lo"] < zs["score_acc_mean"]).all() and (zs["score_acc_mean"] < zs["score_acc_ci_hi"]).all()
    assert (s.loc[s["method_label"] != "zero-shot", "score_acc_interval"] == "t over seeds").all()


def test_summary_counts_seeds_significantly_above_and_below_teacher_and_pbft():
    """Per group, the seeds whose exact McNemar test against the teacher (PBFT, zero-shot) has p < 0.05, by
    direction; a seed with p >= 0.05 counts as tested only."""
    rows = pd.DataFrame({"model": "m", "pattern": "p", "eval_set": "e", "train_task": "t", "method_label": "CD k=16",
                         "k": 16, "config": "c", "seed": [0, 1, 2],
                         "mcnemar_p_vs_teacher": [0.01, 0.001, 0.2], "student_only_right_vs_teacher": [3, 30, 5],
                         "teacher_only_right": [20, 2, 9], "mcnemar_p_vs_pbft": [0.04, np.nan, 0.5],
                         "student_only_right_vs_pbft": [9, np.nan, 1], "pbft_only_right": [1, np.nan, 2]})
    c = tables.paired_counts(rows, ["model", "pattern", "eval_set", "train_task", "method_label", "k", "config"]).iloc[0]
    assert (c["n_seeds_below_teacher"], c["n_seeds_above_teacher"], c["n_seeds_tested_teacher"]) == (1, 1, 3)
    assert (c["n_seeds_above_pbft"], c["n_seeds_below_pbft"], c["n_seeds_tested_pbft"]) == (1, 0, 2)


@pytest.mark.skipif(not (REFERENCE / "predictions").is_dir(), reason="no committed reference predictions")
def test_committed_reference_predictions_reproduce_agreement_kappa_and_controls():
    """Every CD row of the committed reference is recomputed from the committed per-example predictions: its
    agreement and κ with the teacher, the zero-shot model's, the controls' agreement (constant, bias-matched,
    and the control students') and beats_controls; every row's accuracy from its own file."""
    from llmft_utils.study import paired, plan

    icl = schema.read_table(REFERENCE / "icl.csv")
    cd = schema.read_table(REFERENCE / "cd.csv")
    read = lambda f: pd.read_parquet(REFERENCE / f)  # noqa: E731
    for _, r in pd.concat([icl, cd]).iterrows():
        p = read(r["predictions_file"])
        p = p[~p["skipped"]]
        assert (p["pred"] == p["label"]).mean() == pytest.approx(r["score_acc"], abs=1e-12), r["run_key"]
    by_key = cd.set_index("run_key")
    checked = 0
    for _, r in cd[cd["method"] == "cd"].iterrows():
        es = r["task"] + "/" + r["split"]
        t = icl[(icl["task"] + "/" + icl["split"] == es) & (icl["k"] == r["k"]) & (icl["seed"] == r["seed"])]
        z = icl[(icl["task"] + "/" + icl["split"] == es) & (icl["k"] == 0)]
        tp, zp, sp = read(t["predictions_file"].item()), read(z["predictions_file"].item()), read(r["predictions_file"])
        a = paired.agreement(tp, sp)
        assert a["agreement"] == pytest.approx(r["agree_teacher_student"], abs=1e-12)
        assert a["kappa"] == pytest.approx(r["kappa_teacher_student"], abs=1e-12, nan_ok=True)  # NaN: both constant
        assert paired.agreement(tp, zp)["agreement"] == pytest.approx(r["agree_teacher_zeroshot"], abs=1e-12)
        ctl = {}
        for name, method in plan.CONTROL_METHODS.items():
            c = cd[(cd["method"] == method) & (cd["train_task"] == r["train_task"]) & (cd["seed"] == r["seed"])
                   & (cd["task"] + "/" + cd["split"] == es) & (cd["controls_k"] == r["k"])]
            if len(c):
                ctl[name] = read(c["predictions_file"].item())
        again = paired.controls_vs(sp, tp, zp, ctl)
        for c in ("constant", "bias_matched", *ctl):
            assert again[f"agree_teacher_{c}"] == pytest.approx(r[f"agree_teacher_{c}"], abs=1e-12)
            assert again[f"mcnemar_p_vs_{c}_control"] == pytest.approx(r[f"mcnemar_p_vs_{c}_control"], rel=1e-9)
        assert again["beats_controls"] == bool(r["beats_controls"]) and again["controls_checked"] == r["controls_checked"]
        checked += 1
    assert checked and len(by_key) == len(cd)
    # the teacher-ensemble students against their teacher, the ensemble at inference, from the same files
    ens = 0
    for _, r in cd[cd["method"] == "cd_ensemble"].iterrows():
        t = cd[(cd["method"] == "icl_ensemble") & (cd["train_task"] == r["train_task"]) & (cd["seed"] == r["seed"])
               & (cd["k"] == r["k"]) & (cd["task"] == r["task"]) & (cd["split"] == r["split"])]
        tp, sp = read(t["predictions_file"].item()), read(r["predictions_file"])
        assert paired.agreement(tp, sp)["agreement"] == pytest.approx(r["agree_teacher_student"], abs=1e-12)
        assert r["teacher_acc"] == t["score_acc"].item() and r["demo_ids"] == t["demo_ids"].item()
        es = r["task"] + "/" + r["split"]  # and the paired tests it carries against single-prompt CD and ICL
        one = cd[(cd["method"] == "cd") & (cd["train_task"] == r["train_task"]) & (cd["seed"] == r["seed"])
                 & (cd["k"] == r["k"]) & (cd["task"] + "/" + cd["split"] == es)]
        icl_k = icl[(icl["task"] + "/" + icl["split"] == es) & (icl["k"] == r["icl_k"]) & (icl["seed"] == r["seed"])]
        for name, other in (("cd", one), ("icl", icl_k), ("teacher", t)):
            again = paired.paired_vs(sp, read(other["predictions_file"].item()), name)
            assert again[f"mcnemar_p_vs_{name}"] == pytest.approx(r[f"mcnemar_p_vs_{name}"], rel=1e-9), (name, r["run_key"])
        ens += 1
    assert ens == (cd["method"] == "cd_ensemble").sum()
    runs, _ = tables.evaluated(tables.unify(icl, cd))  # the ensemble table is what these rows give
    pd.testing.assert_frame_equal(tables.ensemble_checks(runs), schema.read_table(REFERENCE / "ensemble_checks.csv"),
                                  check_dtype=False)


def _runs_with_wilson():
    """The synthetic rows with a Wilson interval and n_eval on every run (what the scorer writes)."""
    from llmft_utils.scoring import wilson_ci

    def wilson(d):
        d = d.assign(n_eval=400)
        ci = [wilson_ci(round(a * 400), 400) for a in d["score_acc"]]
        return d.assign(score_acc_lo=[c[0] for c in ci], score_acc_hi=[c[1] for c in ci])
    return tables.unify(wilson(_icl_rows()), wilson(_cd_rows()).assign(mem_tensors_peak_mb=540.0))


def test_explorer_table_has_readable_labels_and_the_summary_tables_intervals():
    """Every explorer row is one summary-table group: a readable label (no tuple), the same mean, interval and
    seed count; the t-interval over seeds where there are several, the Wilson interval of the one zero-shot run."""
    runs = _runs_with_wilson()
    s = tables.summary_table(runs)
    for es in sorted(runs["eval_set"].unique()):
        for metric in ("score_acc", "acc_label0"):
            t = tables.explorer_table(runs, es, "all", metric)
            assert len(t) == (s["eval_set"] == es).sum() == 4
            assert all(isinstance(x, str) and "('" not in x and "," not in x for x in t["label"])
            assert "CD k=4 (from mnli)" in set(t["label"]) and "zero-shot" in set(t["label"])
            for _, r in s[s["eval_set"] == es].iterrows():
                e = t[t["label"] == tables.explorer_label(r["method_label"], r["train_task"])].iloc[0]
                assert e["mean"] == pytest.approx(r[f"{metric}_mean"]) and e["n_seeds"] == r["n_seeds"]
                if metric == "score_acc" or r["n_seeds"] > 1:
                    assert (e["ci_lo"], e["ci_hi"]) == pytest.approx((r[f"{metric}_ci_lo"], r[f"{metric}_ci_hi"]))
                else:  # one run, a per-label accuracy: no interval (the summary has none either)
                    assert np.isnan(e["ci_lo"]) and np.isnan(r[f"{metric}_ci_lo"]) and e["interval"] == tables.NO_INTERVAL
                if metric == "score_acc":
                    assert e["interval"] == (tables.WILSON_INTERVAL if r["n_seeds"] == 1 else tables.T_INTERVAL)
                    assert (r["score_acc_interval"] == "Wilson (one run)") == (r["n_seeds"] == 1)
    cd = tables.explorer_table(runs, "mnli/validation_matched", "CD", "score_acc")
    assert list(cd["label"]) == ["CD k=4 (from mnli)"]
    assert tables.explorer_table(runs, "mnli/validation_matched", "zero-shot", "train_s").empty  # no value: no row


def test_explorer_offers_tensor_memory_not_process_memory():
    runs = _runs_with_wilson()
    offered = tables.explorer_metrics(runs)
    assert "peak_mem_mb" not in offered and "peak_mem_delta_mb" not in offered
    assert {"score_acc", "s_per_query", "mem_tensors_peak_mb", "train_s"} <= set(offered)
    assert "train_mem_tensors_peak_mb" not in offered  # no value in these rows: not offered


def test_explorer_chart_names_the_interval_and_draws_the_majority_line_for_accuracies():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")  # the figures earlier tests left open
    runs = _runs_with_wilson()
    es = "mnli/validation_matched"
    t = tables.explorer_table(runs, es, "all", "score_acc")
    base = tables.explorer_baseline(runs, es, "score_acc")
    assert base == (0.52, "majority class")
    ax = plots.explorer_chart(t, "score_acc", base).axes[0]
    top_down = sorted(ax.get_yticklabels(), key=lambda x: -x.get_position()[1])
    assert [x.get_text() for x in top_down] == list(t["label"])  # the table's order, first row on top
    assert "score_acc" in ax.get_xlabel() and tables.T_INTERVAL in ax.get_xlabel()
    assert tables.WILSON_INTERVAL in ax.get_xlabel()  # the zero-shot row
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_xdata()[0] == pytest.approx(0.52)
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["majority class (0.520)"]
    assert len(ax.patches) == len(t)
    caption = tables.explorer_caption(t, "score_acc", base)
    assert "mean over 3 seeds" in caption and tables.T_INTERVAL in caption and "majority class 0.520" in caption
    for metric in ("s_per_query", "acc_label1", "mem_tensors_peak_mb"):
        t = tables.explorer_table(runs, es, "all", metric)
        base = tables.explorer_baseline(runs, es, metric)
        ax = plots.explorer_chart(t, metric, base).axes[0]
        assert base is None and ax.get_legend() is None
        assert not [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert metric in ax.get_xlabel() and tables.T_INTERVAL in ax.get_xlabel()
        assert "majority" not in tables.explorer_caption(t, metric, base)


def test_accuracy_figures_share_one_y_scale_and_say_which_interval():
    """accuracy_vs_total_demos and accuracy_vs_k: every panel on one y range, error bars on every point, one
    legend with the majority class, a caption naming the interval kind (no Python list in it)."""
    import matplotlib

    matplotlib.use("Agg")
    runs = _runs_with_wilson().assign(score_acc_batch=lambda d: d["score_acc"] + 0.01)
    for fig in (plots.accuracy_vs_total_demos(runs), plots.accuracy_vs_k(tables.summary_table(runs))):
        axes = [ax for ax in fig.axes if ax.has_data()]
        assert len(axes) >= 2 and len({ax.get_ylim() for ax in axes}) == 1
        assert all(ax.containers for ax in axes)  # error bars
        assert len(fig.legends) == 1
        assert {"zero-shot"} <= {t.get_text() for t in fig.legends[0].get_texts()}
        assert any(t.get_text().startswith("majority class") for t in fig.legends[0].get_texts())
        caption = " ".join(t.get_text() for t in fig.texts)
        assert tables.T_INTERVAL in caption and tables.WILSON_INTERVAL in caption and "[" not in caption
    demos = plots.accuracy_vs_total_demos(runs)
    bars = [c for ax in demos.axes for c in ax.containers]
    assert all(c.lines[1] for c in bars)  # every point has its interval (caps drawn)
    # with teacher ensembles (seed 0 only): one run per point, Wilson intervals, the seed named in words
    cd = _cd_rows()
    ens = cd[(cd["method"] == "cd") & (cd["seed"] == 0)]
    ens = pd.concat([ens.assign(method=m, ensemble_m=4, run_key=ens["run_key"] + m) for m in ("cd_ensemble", "icl_ensemble")])
    with_ens = tables.unify(_icl_rows().assign(n_eval=400), pd.concat([cd, ens]).assign(n_eval=400))
    caption = " ".join(t.get_text() for t in plots.accuracy_vs_total_demos(with_ens).texts)
    assert "seed 0 only" in caption and tables.WILSON_INTERVAL in caption and "[" not in caption, caption


def test_training_cost_legend_names_every_bar_colour():
    import matplotlib

    matplotlib.use("Agg")
    fig = plots.training_cost(tables.unify(_icl_rows(), _cd_rows()))
    names = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"training: CD", "training: PBFT"} <= names and any(n.startswith("teacher caching") for n in names)


def _ensemble_fixture(tmp_path, member_right, ensemble_right, label1=None):
    """One icl_ensemble row whose prediction file stores members with the given per-example correctness."""
    n = len(ensemble_right)
    gold = np.zeros(n, dtype=int) if label1 is None else np.asarray(label1)
    flip = lambda right: np.where(np.asarray(right, bool), gold, 1 - gold)  # noqa: E731
    preds = pd.DataFrame({"idx": np.arange(n), "label": gold, "pred": flip(ensemble_right),
                          "logp_label0": -0.5, "logp_label1": -0.9, "skipped": False})
    for j, right in enumerate(member_right):
        preds[f"member{j}_pred"] = flip(right)
    (tmp_path / "predictions").mkdir(exist_ok=True)
    preds.to_parquet(tmp_path / "predictions" / "ens.parquet")
    return pd.DataFrame([{"method": "icl_ensemble", "eval_set": "mnli/validation_matched", "train_task": "mnli",
                          "k": 4, "seed": 0, "ensemble_m": len(member_right), "predictions_file": "predictions/ens.parquet"}])


def test_ensemble_members_compares_with_the_mean_and_the_best_member(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    best = rng.random(n) < 0.75
    members = [rng.random(n) < 0.5, best, rng.random(n) < 0.55]
    ens = best.copy()
    ens[:60] = ~best[:60]  # 60 discordant pairs against the best member, split by where best was right
    runs = _ensemble_fixture(tmp_path, members, ens)
    row = tables.ensemble_members(runs, tmp_path).iloc[0]
    accs = [m.mean() for m in members]
    assert row["best_member"] == 1 and row["acc_member_best"] == pytest.approx(max(accs))
    assert row["acc_member_mean"] == pytest.approx(np.mean(accs))
    assert row["ensemble_minus_mean_member"] == pytest.approx(ens.mean() - np.mean(accs))
    assert row["ci_lo"] < row["ensemble_minus_mean_member"] < row["ci_hi"]
    only_e, only_b = int((ens & ~best).sum()), int((~ens & best).sum())
    assert (row["only_ensemble_right"], row["only_best_right"]) == (only_e, only_b) and only_e + only_b == 60
    assert row["vs_best_member"] == ("below" if row["p_vs_best_member"] < 0.05 else "n.s.") and only_b > only_e
    assert row["member_accs"] == ";".join(f"{a:.4f}" for a in accs)
    # label-1 rates: every gold label is 0 here, so a member's label-1 rate is its error rate
    assert row["member_label1_fracs"] == ";".join(f"{1 - a:.4f}" for a in accs)
    # rows written before member predictions were stored are left out, not guessed
    pd.read_parquet(tmp_path / "predictions" / "ens.parquet").drop(
        columns=[f"member{j}_pred" for j in range(3)]).to_parquet(tmp_path / "predictions" / "ens.parquet")
    assert tables.ensemble_members(runs, tmp_path).empty


F32 = repo_root() / "results" / "reference-f32-seed0"


@pytest.mark.skipif(not (F32 / "predictions").is_dir(), reason="no committed float32 run")
def test_committed_ensemble_members_recompute_from_the_predictions():
    runs, _ = tables.evaluated(tables.unify(schema.read_table(F32 / "icl.csv"), schema.read_table(F32 / "cd.csv")))
    again = tables.ensemble_members(runs, F32)
    pd.testing.assert_frame_equal(again, schema.read_table(F32 / "ensemble_members.csv"), check_dtype=False)
    row = again.iloc[0]
    doc = (repo_root() / "docs" / "results.md").read_text()
    for quoted in (f"{row['acc_icl_ensemble']:.3f}", f"{row['acc_member_mean']:.3f}", f"{row['acc_member_best']:.3f}",
                   f"{row['ensemble_minus_mean_member']:+.3f} [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}]",
                   f"p = {row['p_vs_best_member']:.2f}"):
        assert quoted in doc, quoted
