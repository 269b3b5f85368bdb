"""Reference values for the paired test, the constant control, balanced accuracy and ECE (by hand)."""
import math

import numpy as np
import pytest

from llmft_utils import stats


def test_mcnemar_exact_reference_values():
    a = np.array([1] * 9 + [0] * 1 + [1] * 5 + [0] * 5, dtype=bool)  # 9 only-A, 1 only-B, 10 concordant
    b = np.array([0] * 9 + [1] * 1 + [1] * 5 + [0] * 5, dtype=bool)
    r = stats.mcnemar_exact(a, b)
    assert (r["only_a"], r["only_b"]) == (9, 1)
    assert r["p"] == pytest.approx(2 * (1 + 10) / 2 ** 10)  # 2 · P[X <= 1], X ~ Bin(10, 1/2) = 0.021484375
    assert stats.mcnemar_exact(a, a)["p"] == 1.0
    assert stats.mcnemar_exact([1, 0], [0, 1])["p"] == 1.0  # 1 vs 1: min(1, 2 · 3/4)
    with pytest.raises(ValueError, match="same examples"):
        stats.mcnemar_exact([1, 0], [1])


def test_constant_control_balanced_accuracy_and_ece():
    assert stats.constant_agreement([1, 1, 1, 0]) == 0.75
    assert stats.balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)
    # two examples at confidence 0.9 (one right), two at 0.6 (both right): bins 9 and 6
    lp = np.log([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    gold = [0, 1, 0, 1]
    want = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert stats.expected_calibration_error(gold, lp) == pytest.approx(want)
    assert stats.expected_calibration_error(gold, lp + 3.0) == pytest.approx(want)  # renormalised
    assert math.isnan(stats.balanced_accuracy([], []))


def test_bias_matched_control_has_the_teachers_rate_and_the_models_ranking():
    import pandas as pd

    from llmft_utils.stats import bias_matched_agreement, bias_matched_predictions

    margin = np.array([0.5, -1.0, 2.0, 0.1, -0.3, 1.0])
    assert bias_matched_predictions(margin, 0.5).tolist() == [1, 0, 1, 0, 0, 1]  # the 3 largest margins
    assert bias_matched_predictions(margin, 0.0).sum() == 0 and bias_matched_predictions(margin, 1.0).sum() == 6
    # by hand: teacher says 1 on idx 0, 1, 2 (rate 1/2); zero-shot ranks idx 2 > 5 > 0 > 3 > 4 > 1
    teacher = pd.DataFrame({"idx": range(6), "pred": [1, 1, 1, 0, 0, 0], "skipped": False,
                            "logp_label0": 0.0, "logp_label1": 0.0})
    zero = pd.DataFrame({"idx": range(6), "pred": (margin > 0).astype(int), "skipped": False,
                         "logp_label0": 0.0, "logp_label1": margin})
    # control predicts 1 on idx 2, 5, 0: agrees on idx 0, 2 (1s) and 3, 4 (0s) = 4 of 6
    assert bias_matched_agreement(teacher, zero) == pytest.approx(4 / 6)
    # skipped queries are left out; rows are matched by idx, not position
    assert bias_matched_agreement(teacher.assign(skipped=[False] * 5 + [True]), zero.iloc[::-1]) == pytest.approx(
        float((bias_matched_predictions(margin[:5], 3 / 5) == np.array([1, 1, 1, 0, 0])).mean()))


def test_control_tests_decide_per_example_transfer():
    """A student that copies its teacher example by example beats both controls; one that only copies the
    teacher's label rate (it *is* the bias-matched control) does not, however high its agreement."""
    from llmft_utils.stats import bias_matched_predictions, control_tests

    rng = np.random.default_rng(0)
    n = 200
    teacher = (rng.random(n) < 0.7).astype(int)  # a "No"-biased teacher: 70% label 1
    margin = rng.normal(size=n)  # a zero-shot model whose ranking is unrelated to the teacher
    copy = teacher.copy()
    copy[:10] = 1 - copy[:10]  # 95% agreement
    r = control_tests(copy, teacher, margin)
    assert r["beats_controls"] and r["mcnemar_p_vs_constant_control"] < 1e-6
    assert r["agree_teacher_constant"] == pytest.approx((teacher == 1).mean())
    bias = bias_matched_predictions(margin, (teacher == 1).mean())
    r2 = control_tests(bias, teacher, margin)
    assert not r2["beats_controls"] and r2["mcnemar_p_vs_bias_matched_control"] == 1.0
    assert r2["agree_teacher_bias_matched"] == pytest.approx(float((bias == teacher).mean()))
    assert not control_tests(np.array([], int), np.array([], int), np.array([]))["beats_controls"]


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (3, 10), (52, 100), (277, 277), (140, 277), (1, 6692)])
def test_wilson_interval_is_scipys_at_the_same_z(k, n):
    from scipy.stats import binomtest, norm

    from llmft_utils.scoring.evaluation import wilson_ci

    ci = binomtest(k, n).proportion_ci(confidence_level=2 * norm.cdf(1.96) - 1, method="wilson")
    assert wilson_ci(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_holm_and_bh_against_reference_values():
    from scipy.stats import false_discovery_control

    p = [0.01, 0.04, 0.03, 0.005]
    # Holm by hand: sorted 0.005·4, 0.01·3, 0.03·2, 0.04·1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.benjamini_hochberg(p) == pytest.approx(false_discovery_control(p))
    assert stats.benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    withnan = stats.holm([0.01, np.nan, 0.04])  # NaN (not tested) does not count in m
    assert withnan[0] == pytest.approx(0.02) and np.isnan(withnan[1]) and withnan[2] == pytest.approx(0.04)
    assert (stats.holm([0.9, 0.8]) <= 1).all()


def test_paired_contrast_intervals_by_source_of_variation():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.3, size=(1, 400))
    same_seeds = np.repeat(0.1 + noise, 3, axis=0)  # three identical seeds: no seed variation
    r = stats.paired_contrast(same_seeds, n_boot=2000)
    assert r["estimate"] == pytest.approx(0.1 + noise.mean())
    assert r["ci_seeds_lo"] == pytest.approx(r["ci_seeds_hi"])  # seed-level interval has zero width
    assert r["ci_lo"] < r["estimate"] < r["ci_hi"] and r["ci_examples_lo"] < r["estimate"] < r["ci_examples_hi"]
    assert r["p"] < 0.01
    shifted = same_seeds + np.array([[-0.3], [0.0], [0.3]])  # seeds now disagree by ±0.3
    s = stats.paired_contrast(shifted, n_boot=2000)
    assert s["ci_seeds_hi"] - s["ci_seeds_lo"] > 1.0  # t over 3 seeds sees it
    assert s["ci_hi"] - s["ci_lo"] > 3 * (r["ci_hi"] - r["ci_lo"])  # the two-way bootstrap sees it too
    assert s["ci_examples_hi"] - s["ci_examples_lo"] == pytest.approx(r["ci_examples_hi"] - r["ci_examples_lo"], rel=0.2)
    assert stats.paired_contrast(np.zeros((2, 10)), n_boot=100)["p"] == 1.0  # no difference at all: p = 1, not 2
    one = stats.paired_contrast(same_seeds[:1], n_boot=500)
    assert np.isnan(one["ci_seeds_lo"]) and one["n_seeds"] == 1


def test_equivalence_needs_the_interval_inside_the_margin():
    rng = np.random.default_rng(1)
    tight = rng.choice([-1.0, 0.0, 1.0], p=[0.02, 0.96, 0.02], size=(3, 2000))  # |mean| ~ 0, little spread
    assert stats.paired_contrast(tight, margin=0.05, n_boot=2000)["equivalent"]
    loose = rng.choice([-1.0, 0.0, 1.0], p=[0.3, 0.4, 0.3], size=(3, 40))  # mean ~ 0 but 40 noisy examples
    r = stats.paired_contrast(loose, margin=0.05, n_boot=2000)
    assert not r["equivalent"] and r["p_equivalence"] > 0.05  # absence of evidence is not equivalence
    assert stats.two_way_bootstrap(tight, 100, seed=3).tolist() == stats.two_way_bootstrap(tight, 100, seed=3).tolist()
    with pytest.raises(ValueError, match="seeds × examples"):
        stats.two_way_bootstrap(np.zeros(5))
