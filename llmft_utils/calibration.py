"""Label-bias corrections of a scorer's answer distribution, applied after scoring (pure functions).

With ``p(y | x)`` the scorer's distribution over the labels (the verbalizers' summed log-probs,
renormalised over the labels) and a *prior* ``q(y)`` estimated without the gold labels, the calibrated
prediction is

    ŷ(x) = argmax_y  p(y | x) / q(y)        (log space: log p(y|x) − log q(y), renormalised)

* ``contextual`` (Zhao et al. 2021, "Calibrate Before Use"): ``q`` = the mean of ``p(· | x_cf)`` over
  content-free inputs ``x_cf`` (:data:`CONTENT_FREE`: each put in every slot of the pattern), scored with
  the same prefix (demonstrations) as the queries; ``W = diag(q)^-1``, ``b = 0``.
* ``batch`` (Zhou et al. 2023, "Batch Calibration"): ``q`` = the mean of ``p(· | x)`` over the evaluation
  queries themselves (the whole evaluation set as one batch).

Both only move the decision threshold between the labels: what survives them in a method's accuracy is
not label bias. ``scoring.evaluation.evaluate`` reports both beside the raw numbers for every scorer (zero-shot, ICL, CD,
PBFT students).
"""
from __future__ import annotations

import numpy as np

CONTENT_FREE = ("N/A", "", "[MASK]")
CALIBRATIONS = ("contextual", "batch")


def normalize(logp) -> np.ndarray:
    """Rows of log-probabilities renormalised over the labels (NaN rows stay NaN)."""
    lp = np.asarray(logp, dtype=float)
    m = np.max(lp, axis=-1, keepdims=True)
    return lp - (m + np.log(np.exp(lp - m).sum(-1, keepdims=True)))


def prior(logp) -> np.ndarray:
    """log of the mean label distribution over the rows of ``logp`` (content-free inputs, or the batch)."""
    return np.log(np.exp(normalize(logp)).mean(0))


def calibrate(logp, log_prior) -> np.ndarray:
    """``log p(y|x) − log q(y)``, renormalised over the labels."""
    return normalize(normalize(logp) - np.asarray(log_prior, dtype=float))
