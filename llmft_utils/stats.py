"""Small pure statistics for paired comparisons and calibration (numpy/scipy in, floats out)."""
from __future__ import annotations

import numpy as np


def mcnemar_exact(a_correct, b_correct) -> dict:
    """Exact (binomial) McNemar test of two classifiers on the same examples.

    With ``b01`` = examples only B gets right and ``b10`` = examples only A gets right, under H0 (equal
    accuracy) ``b10 ~ Binomial(b01 + b10, 1/2)``; the two-sided p-value is
    ``min(1, 2 · P[X ≤ min(b01, b10)])`` (1 when there is no discordant pair)."""
    from scipy.stats import binom

    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same examples: {a.shape} vs {b.shape}")
    b10, b01 = int((a & ~b).sum()), int((~a & b).sum())
    n = b10 + b01
    p = 1.0 if n == 0 else float(min(1.0, 2 * binom.cdf(min(b10, b01), n, 0.5)))
    return {"only_a": b10, "only_b": b01, "p": p}


def verbalizer_logp(preds) -> np.ndarray:
    """Per example of a prediction table (``logp_label0``, ``logp_label1``), the log-probabilities renormalised
    over the two labels."""
    lp = preds[["logp_label0", "logp_label1"]].to_numpy(dtype=float)
    return lp - np.logaddexp(lp[:, :1], lp[:, 1:])


def kl_per_example(a_logp, b_logp) -> np.ndarray:
    """KL(a ‖ b) per row of two arrays of label log-probabilities (already normalised)."""
    return (np.exp(a_logp) * (a_logp - b_logp)).sum(1)


def agreement_stats(a_pred, b_pred, a_logp, b_logp) -> dict:
    """Agreement of two classifiers' labels, Cohen's κ, and mean KL(a ‖ b) of their label distributions
    (rows of log-probabilities over the labels, already normalised), on the same examples."""
    a, b = np.asarray(a_pred), np.asarray(b_pred)
    po = float((a == b).mean())
    pe = float(sum((a == c).mean() * (b == c).mean() for c in (0, 1)))
    kappa = (po - pe) / (1 - pe) if pe < 1 else float("nan")
    kl = float(kl_per_example(a_logp, b_logp).mean())
    return {"agreement": po, "kappa": kappa, "kl": kl}


def constant_agreement(reference_pred) -> float:
    """Agreement with ``reference_pred`` of a constant predictor that always gives its most frequent label:
    the floor any "agrees with the teacher" claim must clear."""
    r = np.asarray(reference_pred)
    return float(np.bincount(r).max() / len(r)) if len(r) else float("nan")


def balanced_accuracy(gold, pred) -> float:
    """Mean over the gold labels present of the accuracy on that label."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    accs = [float((pred[gold == c] == c).mean()) for c in np.unique(gold)]
    return float(np.mean(accs)) if accs else float("nan")


def expected_calibration_error(gold, logp_labels, bins: int = 10) -> float:
    """ECE of the label distribution (rows: log-probabilities over the labels, renormalised here): the
    confidence of the predicted label is binned in ``bins`` equal-width bins over [0, 1]; ECE =
    Σ_b (n_b / n) · |accuracy_b − mean confidence_b|."""
    lp = np.asarray(logp_labels, dtype=float)
    lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
    pred, conf = lp.argmax(1), np.exp(lp.max(1))
    correct = pred == np.asarray(gold)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def bias_matched_predictions(margin, rate: float) -> np.ndarray:
    """Labels 1 for the ``round(rate · n)`` examples with the largest ``margin`` (log p(label 1) − log p(label 0)),
    0 for the rest: a model's own ranking re-thresholded to a given label-1 rate. Ties are broken by
    position (stable sort), so the rate is met exactly."""
    margin = np.asarray(margin, dtype=float)
    n1 = int(round(float(rate) * len(margin)))
    out = np.zeros(len(margin), dtype=int)
    out[np.argsort(-margin, kind="stable")[:n1]] = 1
    return out


def bias_matched_agreement(teacher_preds, zeroshot_preds) -> float:
    """Agreement with the teacher of the zero-shot model re-thresholded to the teacher's label-1 rate on the
    same queries (:func:`bias_matched_predictions`): the control that has the teacher's label bias and the
    untrained model's per-example ranking. A student that "copies its teacher" must beat it, and the
    constant majority-of-teacher control, before per-example transfer is claimed. Both frames: ``idx``,
    ``pred``, ``logp_label0``, ``logp_label1``, ``skipped``; compared on queries neither skipped."""
    t = teacher_preds.set_index("idx")
    z = zeroshot_preds.set_index("idx").reindex(t.index)
    ok = ~(t["skipped"].to_numpy(bool) | z["skipped"].fillna(True).to_numpy(bool))
    if not ok.any():
        return float("nan")
    tp = t["pred"].to_numpy()[ok]
    margin = (z["logp_label1"] - z["logp_label0"]).to_numpy()[ok]
    return float((bias_matched_predictions(margin, (tp == 1).mean()) == tp).mean())


STUDENT_CONTROLS = ("shuffled", "self")  # control students trained beside CD (distill.run_cd_sweep)


def control_tests(student_pred, teacher_pred, zeroshot_margin, alpha: float = 0.05, student_controls=None) -> dict:
    """Does a student copy its teacher *per example* better than the controls that copy only its label bias
    or only the training procedure?

    Controls, on the same examples: ``constant`` (always the teacher's majority label), ``bias_matched``
    (the zero-shot model's margins re-thresholded to the teacher's label-1 rate,
    :func:`bias_matched_predictions`) and, when given in ``student_controls`` (name -> predictions),
    control *students* trained by the same recipe on the same transfer queries: ``shuffled`` (the
    teacher's targets permuted across the queries: the label marginal is kept, the per-example
    correspondence destroyed) and ``self`` (k = 0: the zero-shot model's own targets, i.e. what the
    optimiser does without demonstrations). For each: its agreement with the teacher
    (``agree_teacher_<control>``) and an exact McNemar test of "agrees with the teacher", student against
    control (``mcnemar_p_vs_<control>_control``). ``beats_controls``: the student agrees more often than
    every control present and each difference has p < ``alpha``; ``controls_checked`` names them."""
    s, t = np.asarray(student_pred), np.asarray(teacher_pred)
    student_controls = {k: v for k, v in (student_controls or {}).items() if v is not None}
    names = ["constant", "bias_matched", *STUDENT_CONTROLS]
    out = {f"agree_teacher_{n}": float("nan") for n in names}
    out.update({f"mcnemar_p_vs_{n}_control": float("nan") for n in names})
    if not len(t):
        return {**out, "beats_controls": False, "controls_checked": ""}
    controls = {"constant": np.full(len(t), np.bincount(t).argmax()),
                "bias_matched": bias_matched_predictions(zeroshot_margin, (t == 1).mean()),
                **{n: np.asarray(student_controls[n]) for n in STUDENT_CONTROLS if n in student_controls}}
    wins = []
    for name, c in controls.items():
        r = mcnemar_exact(s == t, c == t)
        out[f"agree_teacher_{name}"] = float((c == t).mean())
        out[f"mcnemar_p_vs_{name}_control"] = r["p"]
        wins.append(float((s == t).mean()) > out[f"agree_teacher_{name}"] and r["p"] < alpha)
    out["beats_controls"] = bool(all(wins))
    out["controls_checked"] = ";".join(controls)
    return out


def _adjusted(pvalues, step) -> np.ndarray:
    """``step(sorted_p, m)`` applied to the non-NaN p-values in ascending order, capped at 1, put back in place."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m:
        order = np.argsort(p[ok], kind="stable")
        vals = np.empty(m)
        vals[order] = np.minimum(step(p[ok][order], m), 1.0)
        out[ok] = vals
    return out


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control): with the m p-values sorted ascending,
    ``p_(i) · (m − i + 1)``, made monotone by a running maximum and capped at 1; NaN stays NaN and does not
    count in m."""
    return _adjusted(pvalues, lambda p, m: np.maximum.accumulate(p * (m - np.arange(m))))


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false-discovery-rate control): ``p_(i) · m / i``, made monotone
    from the largest down and capped at 1; NaN stays NaN and does not count in m."""
    return _adjusted(pvalues, lambda p, m: np.minimum.accumulate((p * m / np.arange(1, m + 1))[::-1])[::-1])


def two_way_bootstrap(diff, n_boot: int = 4000, seed: int = 0, seeds: bool = True, examples: bool = True) -> np.ndarray:
    """Bootstrap draws of the mean of ``diff`` (seeds × examples: a paired per-example difference for each data
    seed, on the same examples), resampling seeds and examples independently, each with replacement (a
    two-way cluster bootstrap: both the seed-to-seed and the example-to-example variation enter the
    interval). ``seeds=False`` / ``examples=False`` hold that dimension fixed (the example-level and seed-level
    intervals). Seeded: the same draws on every machine."""
    d = np.asarray(diff, dtype=float)
    if d.ndim != 2 or not d.size:
        raise ValueError(f"diff must be seeds × examples with at least one value, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    s, n = d.shape
    ws = rng.multinomial(s, np.full(s, 1 / s), size=n_boot) / s if seeds else np.full((n_boot, s), 1 / s)
    we = rng.multinomial(n, np.full(n, 1 / n), size=n_boot) / n if examples else np.full((n_boot, n), 1 / n)
    return np.einsum("bs,sn,bn->b", ws, d, we)


def paired_contrast(diff, margin: float | None = None, n_boot: int = 4000, seed: int = 0) -> dict:
    """Effect size and intervals of a paired difference ``diff`` (seeds × examples, e.g. ``correct_a −
    correct_b`` per example and seed):

    - ``estimate``: the mean over seeds and examples;
    - ``ci_lo``/``ci_hi``: 95% percentile interval of the two-way bootstrap (:func:`two_way_bootstrap`), seeds
      and examples resampled: the interval for the claim;
    - ``ci_examples_lo/hi``: the same with the seeds held fixed (variation over examples only);
    - ``ci_seeds_lo/hi``: 95% t-interval over the per-seed means (variation over seeds only; NaN for one seed);
    - ``p``: two-sided bootstrap p-value of "no difference" (twice the smaller tail at 0, in [1/n_boot, 1]);
    - with an equivalence ``margin`` δ (stated before the results): TOST, ``p_equivalence`` = the larger of
      P(d ≥ δ) and P(d ≤ −δ) under the two-way bootstrap, ``equivalent`` when it is < 0.05 (the 90% interval
      lies inside (−δ, δ)); ``p_not_worse`` = P(d ≤ −δ) for the one-sided "a not worse than b by δ"."""
    from scipy.stats import t as student_t

    d = np.asarray(diff, dtype=float)
    both = two_way_bootstrap(d, n_boot, seed)
    ex = two_way_bootstrap(d, n_boot, seed + 1, seeds=False)
    means = d.mean(1)
    out = {"estimate": float(d.mean()), "n_seeds": int(d.shape[0]), "n_examples": int(d.shape[1]),
           "ci_lo": float(np.quantile(both, 0.025)), "ci_hi": float(np.quantile(both, 0.975)),
           "ci_examples_lo": float(np.quantile(ex, 0.025)), "ci_examples_hi": float(np.quantile(ex, 0.975)),
           "ci_seeds_lo": float("nan"), "ci_seeds_hi": float("nan"),
           "p": float(min(1.0, max(2 * min((both <= 0).mean(), (both >= 0).mean()), 1 / n_boot)))}
    if len(means) > 1:
        h = student_t.ppf(0.975, len(means) - 1) * means.std(ddof=1) / np.sqrt(len(means))
        out["ci_seeds_lo"], out["ci_seeds_hi"] = float(means.mean() - h), float(means.mean() + h)
    if margin is not None:
        lower, upper = float((both <= -margin).mean()), float((both >= margin).mean())
        out.update({"margin": float(margin), "p_equivalence": max(lower, upper, 1 / n_boot),
                    "p_not_worse": max(lower, 1 / n_boot)})
        out["equivalent"] = bool(out["p_equivalence"] < 0.05)
    return out
