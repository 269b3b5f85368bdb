"""The declared contrasts (llmft_utils.analysis.contrasts) on prediction files whose truth is known."""
import re

import numpy as np
import pandas as pd
import pytest

from llmft_utils.analysis import contrasts
from llmft_utils.store import repo_root
from llmft_utils.study import schema

N = 600
REFERENCE = repo_root() / "results" / "reference"


def _preds(folder, name, label, pred, calibrated=None):
    df = pd.DataFrame({"idx": np.arange(len(label)), "label": label, "pred": pred, "logp_label0": -0.7,
                       "logp_label1": -0.7, "skipped": False,
                       "pred_batch": pred if calibrated is None else calibrated})
    schema.write_predictions(df, folder / f"{name}.parquet")
    return f"{name}.parquet"


def _runs(folder, cd_flip: float, shuffled_agree: float, seed_shift=(0.0, 0.0, 0.0)):
    """ICL teacher at 0.6 accuracy; CD = the teacher with a share ``cd_flip`` of its answers flipped (per seed,
    plus ``seed_shift``); the shuffled control agrees with the teacher on a share ``shuffled_agree``."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, N)
    zs = np.where(rng.random(N) < 0.5, label, 1 - label)
    rows = [{"method": "zero-shot", "seed": 0, "k": 0, "train_task": "none", "predictions_file": _preds(folder, "zs", label, zs)}]
    for s in (0, 1, 2):
        teacher = np.where(rng.random(N) < 0.6, label, 1 - label)
        flip = rng.random(N) < max(cd_flip + seed_shift[s], 0)
        cd = np.where(flip, 1 - teacher, teacher)
        sh = np.where(rng.random(N) < shuffled_agree, teacher, 1 - teacher)
        for method, pred in (("icl", teacher), ("cd", cd), ("cd_shuffled", sh)):
            rows.append({"method": method, "seed": s, "k": 16, "train_task": "mnli",
                         "predictions_file": _preds(folder, f"{method}{s}", label, pred)})
    runs = pd.DataFrame(rows).assign(model="m", pattern="gpt-3", eval_set="mnli/validation_matched", dtype="float32",
                                     config="c", controls_k=16.0)
    return runs


def _row(table, name):
    return table[table["contrast"] == name].iloc[0]


def test_a_student_that_copies_its_teacher_is_equivalent_and_beats_a_control(tmp_path):
    runs = _runs(tmp_path, cd_flip=0.0, shuffled_agree=0.6)
    t = contrasts.contrast_table(runs, tmp_path, n_boot=1000)
    same = _row(t, "CD − ICL teacher, in domain")
    assert same["estimate"] == 0 and same["verdict"] == "equivalent within 0.05" and same["n_seeds"] == 3
    transfer = _row(t, "CD − shuffled control, agreement with the teacher")
    assert transfer["estimate"] == pytest.approx(0.4, abs=0.03) and transfer["verdict"] == "a > b"
    assert transfer["p_holm"] >= transfer["p"]
    assert set(t["family"]) == {"primary", "secondary"} and (t["p_holm"] >= t["p"]).all()
    schema.write_table(t, tmp_path / "contrasts.csv")  # the declared schema takes it
    assert len(schema.read_table(tmp_path / "contrasts.csv")) == len(t)


def test_a_worse_student_is_below_and_a_noisy_difference_is_undecided(tmp_path):
    worse = contrasts.contrast_table(_runs(tmp_path, cd_flip=0.3, shuffled_agree=0.6), tmp_path, n_boot=1000)
    row = _row(worse, "CD − ICL teacher, in domain")
    assert row["estimate"] < -0.03 and row["verdict"] == "a < b"
    # every seed is below, by 0.04 to 0.2: the two-way bootstrap (3 seeds resampled) excludes 0 at Holm p < 0.05,
    # the t-interval over the 3 seed means does not; the verdict waits for the conservative one
    (tmp_path / "b").mkdir()
    spread = contrasts.contrast_table(_runs(tmp_path / "b", cd_flip=0.5, shuffled_agree=0.6, seed_shift=(-0.2, 0.0, 0.5)),
                                      tmp_path / "b", n_boot=1000)
    row = _row(spread, "CD − ICL teacher, in domain")
    assert row["ci_hi"] < 0 and row["p_holm"] < 0.05 and row["ci_seeds_lo"] < 0 < row["ci_seeds_hi"]
    assert row["verdict"] == "undecided"
    assert row["ci_seeds_hi"] - row["ci_seeds_lo"] > 2 * (row["ci_examples_hi"] - row["ci_examples_lo"])


def test_contrasts_are_declared_before_results():
    """The four primary contrasts of the study's questions, with the equivalence margin stated in code."""
    names = [c.name for c in contrasts.PRIMARY]
    assert len(names) == 4 and len(set(names)) == 4
    assert contrasts.EQUIVALENCE_MARGIN == 0.05
    assert {c.margin for c in contrasts.PRIMARY if c.a == "cd" and c.b == "icl"} == {0.05}


@pytest.mark.skipif(not (REFERENCE / "predictions").is_dir(), reason="no committed reference predictions")
def test_reference_contrasts_recompute_from_committed_predictions():
    """contrasts.csv in results/reference is what the committed predictions give (the README's numbers)."""
    from llmft_utils.analysis import tables

    runs, _ = tables.evaluated(tables.unify(schema.read_table(REFERENCE / "icl.csv"), schema.read_table(REFERENCE / "cd.csv")))
    again = contrasts.contrast_table(runs, REFERENCE)
    stored = schema.read_table(REFERENCE / "contrasts.csv")
    pd.testing.assert_frame_equal(again.reset_index(drop=True), stored[again.columns].reset_index(drop=True),
                                  check_dtype=False, atol=1e-12)


def test_a_distribution_claim_must_beat_the_teacher_mean_constant():
    from llmft_utils.analysis import tables

    rng = np.random.default_rng(0)
    p1 = np.clip(rng.normal(0.7, 0.15, 300), 0.01, 0.99)  # the teacher's P(label 1) per example
    frame = lambda q: pd.DataFrame({"logp_label0": np.log(1 - q), "logp_label1": np.log(q), "skipped": False})
    teacher = frame(p1)
    copy = tables.teacher_mean_check(teacher, frame(np.clip(p1 + rng.normal(0, 0.01, 300), 0.01, 0.99)))
    assert copy["closer_than_teacher_mean"] and copy["kl_student"] < copy["kl_teacher_mean"]
    constant = tables.teacher_mean_check(teacher, frame(np.full(300, p1.mean())))  # knows the bias, nothing else
    assert not constant["closer_than_teacher_mean"]
    assert constant["kl_student"] == pytest.approx(constant["kl_teacher_mean"])


def _doc_rows(path):
    """The headline table's rows of a Markdown document: {(eval set, signal from, method): [cells after it]}."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0].endswith(("/validation", "/validation_matched")):
            rows[(cells[0], cells[1], cells[2].replace(" (control)", ""))] = cells[3:]
    return rows


@pytest.mark.parametrize("doc", ["docs/results.md"])
@pytest.mark.skipif(not (REFERENCE / "summary.csv").is_file(), reason="no committed reference results")
def test_headline_table_is_the_reference_summary(doc):
    """Every number of the SmolLM2 reference's headline table (docs/results.md) is summary.csv's, as rounded there."""
    summary = schema.read_table(REFERENCE / "summary.csv")
    rows = _doc_rows(repo_root() / doc)
    assert len(rows) == 20
    for key, cells in rows.items():
        es, tt, label = key
        label = label.replace(" (seed 0)", "").replace("×", "x")
        r = summary[(summary["eval_set"] == es) & (summary["train_task"] == tt) & (summary["method_label"] == label)]
        assert len(r) == 1, key
        r = r.iloc[0]
        shown = [float(x) for x in re.findall(r"-?\d+\.\d+|(?<![\w.])\d+(?![\w.])", " ".join(cells).replace("–", "nan"))]
        want = [r["n_seeds"], r["score_acc_mean"], r["score_acc_ci_lo"], r["score_acc_ci_hi"], r["acc_label0_mean"],
                r["acc_label1_mean"], r["balanced_acc_mean"], r["score_acc_batch_mean"], r["non_verbalizer_frac_mean"],
                r["s_per_query_mean"] * 1000]
        if cells[6] == "–":  # the ensemble at inference forms no top-1
            want.pop(8)
        assert len(shown) == len(want), (key, shown)
        for got, exp in zip(shown, want):  # as rounded in the table: 3 decimals, ms to the unit
            assert got == pytest.approx(exp, abs=0.5 if exp > 5 else 5e-4 + 1e-9), (key, got, exp)


@pytest.mark.skipif(not (REFERENCE / "contrasts.csv").is_file(), reason="no committed reference results")
def test_results_doc_shows_the_committed_contrasts_and_the_readme_their_verdict():
    t = schema.read_table(REFERENCE / "contrasts.csv")
    doc = (repo_root() / "docs" / "results.md").read_text()
    assert contrasts.markdown(t, "primary") in doc and contrasts.markdown(t, "secondary") in doc
    cal = schema.read_table(REFERENCE / "calibrated_checks.csv")
    assert (f"{int((cal['p'] < 0.05).sum())} of {len(cal)} are at p < 0.05, {int((cal['p_holm'] < 0.05).sum())} after "
            f"Holm and {int((cal['p_bh'] < 0.05).sum())} after Benjamini-Hochberg") in " ".join(doc.split())
    # README: "none of the four primary questions is answered" (the one 'equivalent' is RTE's near-constant pair)
    primary = t[t["family"] == "primary"]
    decided = primary[primary["verdict"] != "undecided"]
    assert list(zip(decided["eval_set"], decided["verdict"])) == [("rte/validation", "equivalent within 0.05")]
    summary = schema.read_table(REFERENCE / "summary.csv")  # README: "no method is more than 0.04 above the majority"
    assert (summary["score_acc_mean"] - summary["majority_acc_mean"]).max() < 0.04


def test_a_verdict_from_one_seed_says_so(tmp_path):
    runs = _runs(tmp_path, cd_flip=0.0, shuffled_agree=0.6)
    one = runs[runs["seed"] == 0]
    t = contrasts.contrast_table(one, tmp_path, n_boot=500)
    row = _row(t, "CD − shuffled control, agreement with the teacher")
    assert row["n_seeds"] == 1 and np.isnan(row["ci_seeds_lo"]) and row["verdict"] == "a > b (one seed)"


def test_four_questions_take_accuracy_from_the_contrasts_and_cost_per_seed_from_the_rows(tmp_path):
    """In domain and out of domain are the primary "CD − ICL teacher" rows as they are; time is the student's
    seconds per query over its own ICL teacher's (same seed), memory the difference of their scoring tensors,
    each with a t-interval over the seeds, and a verdict only where that interval excludes 1 (or 0)."""
    runs = _runs(tmp_path, cd_flip=0.3, shuffled_agree=0.6)
    cost = {"icl": (0.40, 900.0), "cd": (0.10, 300.0)}  # s per query, MB: the student 4x faster, 600 MB less
    runs["s_per_query"] = [cost.get(m, (0.1, 300.0))[0] * (1 + 0.05 * s) for m, s in zip(runs["method"], runs["seed"])]
    runs["mem_tensors_peak_mb"] = [cost.get(m, (0.1, 300.0))[1] + 7 * s for m, s in zip(runs["method"], runs["seed"])]
    runs["n_eval"] = N
    t = contrasts.contrast_table(runs, tmp_path, n_boot=1000)
    q = contrasts.four_questions(t, runs).set_index("question")
    acc = _row(t, "CD − ICL teacher, in domain")
    assert q.loc["in domain", "estimate"] == acc["estimate"] and q.loc["in domain", "verdict"] == acc["verdict"] == "a < b"
    assert q.loc["time", "estimate"] == pytest.approx(0.25) and q.loc["time", "ci_hi"] < 1 and q.loc["time", "verdict"] == "a < b"
    assert q.loc["memory", "estimate"] == pytest.approx(-600) and q.loc["memory", "verdict"] == "a < b"
    assert (q["n_seeds"] == 3).all() and "out of domain" not in q.index  # no HANS rows here
    runs.loc[(runs["method"] == "cd") & (runs["seed"] == 2), "s_per_query"] = 1.0  # one seed slower than its teacher
    q = contrasts.four_questions(t, runs).set_index("question")
    assert q.loc["time", "ci_lo"] < 1 < q.loc["time", "ci_hi"] and q.loc["time", "verdict"] == "undecided"
    md = contrasts.four_questions_markdown(contrasts.four_questions(t, runs))
    assert md.count("\n") == 1 + len(q) and "| time | seconds per query, CD student ÷ ICL teacher |" in md


QWEN_REFERENCE = repo_root() / "results" / "reference-qwen"


@pytest.mark.skipif(not (QWEN_REFERENCE / "contrasts.csv").is_file(), reason="no committed Qwen reference run")
def test_the_qwen_reference_answers_the_four_questions_as_the_readme_says():
    """results/reference-qwen (profile qwen): its contrasts.csv is what its committed predictions give, and the
    README and docs/results.md show its four-questions table and docs/results.md its contrast tables, as computed."""
    from llmft_utils.analysis import tables

    runs, _ = tables.evaluated(tables.unify(schema.read_table(QWEN_REFERENCE / "icl.csv"),
                                            schema.read_table(QWEN_REFERENCE / "cd.csv")))
    again = contrasts.contrast_table(runs, QWEN_REFERENCE)
    stored = schema.read_table(QWEN_REFERENCE / "contrasts.csv")
    pd.testing.assert_frame_equal(again.reset_index(drop=True), stored[again.columns].reset_index(drop=True),
                                  check_dtype=False, atol=1e-12)
    table = contrasts.four_questions_markdown(contrasts.four_questions(stored, runs))
    readme, doc = ((repo_root() / f).read_text() for f in ("README.md", "docs/results.md"))
    assert table in readme and table in doc
    assert contrasts.markdown(stored, "primary") in doc and contrasts.markdown(stored, "secondary") in doc
    assert set(runs["model"]) == {"qwen2.5-coder-0.5b"} and set(runs["seed"]) == {0, 1, 2, 3, 4}


@pytest.mark.skipif(not (QWEN_REFERENCE / "summary.csv").is_file(), reason="no committed Qwen reference run")
def test_the_readme_prose_on_the_qwen_run_is_its_files():
    """The numbers the README's prose quotes about the Qwen run and SmolLM2's prompts, from the committed files."""
    import json

    readme = " ".join((repo_root() / "README.md").read_text().split())
    s = schema.read_table(QWEN_REFERENCE / "summary.csv")
    mnli = s[s["eval_set"] == "mnli/validation_matched"].set_index("method_label")
    icl, zero = mnli.loc["ICL k=8"], mnli.loc["zero-shot"]
    assert (f"from {zero['score_acc_mean']:.3f} (zero-shot" in readme and f"to {icl['score_acc_mean']:.3f} "
            f"[{icl['score_acc_ci_lo']:.3f}, {icl['score_acc_ci_hi']:.3f}] (majority class {icl['majority_acc_mean']:.3f}" in readme)
    d = schema.read_table(QWEN_REFERENCE / "distribution_checks.csv")
    assert f"{int((~d['closer_than_teacher_mean'].astype(bool)).sum())} of {len(d)})" in readme
    b = schema.read_table(QWEN_REFERENCE / "break_even.csv").set_index("eval_set").loc["mnli/validation_matched"]
    assert f"training ({b['cd_once_s']:.0f} s)" in readme and f"or {b['break_even_full']:.0f} without a prefix cache" in readme
    assert f"about {round(b['break_even_cached'], -1):,.0f} cached-prefix queries" in readme
    probe = [json.loads(x) for x in (repo_root() / "benchmarks/results/icl-prompts-smollm2-2026-12-07.jsonl").read_text().splitlines()]
    chat = {r["k"]: r["acc"] for r in probe if r["pattern"] == "chatml"}
    assert f"gives {chat[0]:.3f} at k = 0 and {chat[16]:.3f} at k = 16" in readme
    k32 = [r["acc"] for r in probe if r["k"] == 32]
    assert f"patterns {min(k32):.3f}–{max(k32):.3f}" in readme
    cal = [v for r in probe if r["pattern"] == "gpt-3" and r["k"] == 16 for v in (r["acc_batch"], r["acc_contextual"])]
    assert f"calibrated: {min(cal):.3f}–{max(cal):.3f})" in readme


@pytest.mark.skipif(not (QWEN_REFERENCE / "train_log.csv").is_file(), reason="no committed Qwen reference run")
def test_the_qwen_training_diagnosis_is_its_files():
    """Why the Qwen student does not move toward its teacher (README, docs/results.md): the first-step loss jump in
    the reference's CD students, the 32-step follow-up and the learning rates tried on the development split."""
    root = repo_root()
    readme, doc = (root / "README.md").read_text(), (root / "docs" / "results.md").read_text()
    log = pd.read_csv(QWEN_REFERENCE / "train_log.csv")
    cd = log[log["student"].str.startswith("cd|")].groupby("student")
    first, second, last = cd["loss"].nth(0), cd["loss"].nth(1), cd.tail(1)["loss"]
    span = lambda s, f: f"{f(s.min())}–{f(s.max())}"  # noqa: E731
    two = lambda v: f"{v:.2f}"  # noqa: E731
    one = lambda v: f"{v:.1f}"  # noqa: E731
    assert len(first) == 5 and span(first, two) == "0.05–0.13" and span(second, one) == "3.9–7.4"
    assert span(last, two) == "0.04–0.59" and (cd["lr"].nth(0) == 3e-5).all()
    grad = cd["grad_norm"]
    assert f"{grad.nth(1).min():.0f}–{grad.nth(1).max():.0f}" == "261–457"
    assert f"{grad.nth(0).min():.0f}–{grad.nth(0).max():.0f}" == "26–54"
    for text in (readme, doc):
        assert "0.05–0.13" in text and "3.9–7.4" in text
    assert "261–457" in doc and "26–54" in doc and "0.04–0.59" in doc
    # the 32-step follow-up (two seeds)
    part = root / "results" / "qwen-n64-partial"
    long_log = pd.read_csv(part / "train_log.csv").groupby("student")
    assert (long_log["lr"].nth(0) == 7.5e-6).all() and (long_log.size() == 32).all()
    jumps = sorted(f"{v:.1f}" for v in long_log["loss"].nth(1))
    assert f"to {jumps[0]} and {jumps[1]} nats" in doc
    rows = pd.read_csv(part / "cd.csv")
    mnli = rows[rows["task"] == "mnli"].sort_values("seed")
    assert list(mnli["n_train"]) == [64, 64] and list(mnli["seed"]) == [0, 1]
    assert f"end at {mnli['score_acc'].iloc[0]:.4f} and {mnli['score_acc'].iloc[1]:.3f}" in doc
    assert f"teachers at {mnli['teacher_acc'].iloc[0]:.3f} and {mnli['teacher_acc'].iloc[1]:.4f}" in doc
    # the learning rates on the development split
    sel = pd.read_csv(root / "results" / "recipe_selection_qwen" / "selection.csv").set_index("candidate")
    kl = [f"{sel.loc[c, 'kl_teacher_student']:.3f}" for c in ("lr3e-06", "lr1e-05", "lr3e-05")]
    agree = [f"{sel.loc[c, 'agree_teacher_student']:.3f}" for c in ("lr3e-06", "lr1e-05", "lr3e-05")]
    assert all(float(k) > sel["kl_teacher_zeroshot"].iloc[0] for k in kl)
    assert f"{', '.join(kl)} against the zero-shot model's {sel['kl_teacher_zeroshot'].iloc[0]:.3f}" in doc
    assert f"agreement {', '.join(agree)} against {sel['agree_teacher_zeroshot'].iloc[0]:.3f}" in doc
    import json
    choice = json.loads((root / "results" / "recipe_selection_qwen" / "choice.json").read_text())
    best = sel.loc[choice["chosen"]]
    assert choice["chosen"] == "lr1e-06" and f"(agreement {best['agree_teacher_student']:.3f}, KL " \
        f"{best['kl_teacher_student']:.3f})" in doc
    assert f"{choice['wall_s'] / 60:.0f} min" in doc and f"({best['teacher_acc']:.3f}; majority" in doc
