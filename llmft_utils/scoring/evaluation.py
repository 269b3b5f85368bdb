"""Evaluation of scored prompts: accuracy with Wilson intervals, label metrics, calibration, prompt
ensembles and the cost of ICL without a prefix cache.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..calibration import CONTENT_FREE, calibrate, prior
from ..patterns import Pattern, build_prefix, query_text, query_texts
from ..probes import TensorMemory, probe
from ..stats import balanced_accuracy, expected_calibration_error
from .scorer import largest_batch_memory, score_prompts


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Kept beside ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``, which it equals at the same z
    (tests/test_stats.py): scipy takes a confidence level, not z = 1.96, so it would move every interval the
    committed tables hold in its 5th decimal, and it raises at n = 0, where a run that scored nothing needs NaN."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (c - h, c + h)


def label_metrics(gold, lp, ok) -> tuple[np.ndarray, dict]:
    """``(pred, metrics)`` of verbalizer log-probs ``lp`` (n × labels) against ``gold`` on the rows ``ok``: the
    predictions (-1 where not ok) and the accuracy metrics every scorer reports (count, skipped, majority
    baseline, accuracy with its Wilson interval, label-1 rate, per-label and balanced accuracy, ECE)."""
    pred = np.where(ok, np.nan_to_num(lp, nan=-np.inf).argmax(1), -1)
    n = int(ok.sum())
    correct = int((pred[ok] == gold[ok]).sum())
    lo, hi = wilson_ci(correct, n)
    counts = np.bincount(gold[ok], minlength=2)
    maj = int(counts.argmax()) if n else -1  # n = 0: every prompt skipped; nothing to score, never "accuracy 0"
    return pred, {
        "n_eval": n, "n_skipped_too_long": int((~ok).sum()),
        "majority_label": maj, "majority_acc": float(counts[maj] / n) if n else float("nan"),
        "score_acc": correct / n if n else float("nan"), "score_acc_lo": lo, "score_acc_hi": hi,
        "pred_label1_frac": float((pred[ok] == 1).mean()) if n else float("nan"),
        "acc_label0": float((pred[ok & (gold == 0)] == 0).mean()) if (ok & (gold == 0)).any() else float("nan"),
        "acc_label1": float((pred[ok & (gold == 1)] == 1).mean()) if (ok & (gold == 1)).any() else float("nan"),
        "balanced_acc": balanced_accuracy(gold[ok], pred[ok]) if n else float("nan"),
        "ece": expected_calibration_error(gold[ok], lp[ok]) if n else float("nan")}


EXTRAS = ("memory", "calibration")  # what evaluate also measures, untimed, unless told otherwise


def evaluate(lm, eval_df: pd.DataFrame, pattern: Pattern, demos: pd.DataFrame, batch_size: int = 8,
             reuse_prefix: bool = True, on_too_long: str = "error", progress: bool = True, max_tokens: int = 0,
             extras=EXTRAS):
    """ICL evaluation of ``eval_df`` with the ``demos`` prefix. Returns ``(metrics, predictions)``.
    ``max_tokens > 0``: batches of up to that many padded tokens instead of ``batch_size`` rows.
    ``extras``, measured after the timed scoring: ``"memory"``, the tensor memory of the largest batch
    (:func:`largest_batch_memory`); ``"calibration"``, the contextual and batch calibrated predictions
    (:func:`calibrated_scores`). ``extras=()``: neither."""
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)}; choose from {EXTRAS}")
    memory, calibration = (e in extras for e in EXTRAS)
    prefix = build_prefix(pattern, demos)
    queries = query_texts(pattern, eval_df, bool(prefix))
    with probe(lm.device) as pr:
        s = score_prompts(lm, prefix, queries, pattern.verbalizers, batch_size=batch_size,
                          reuse_prefix=reuse_prefix, on_too_long=on_too_long, progress=progress,
                          max_tokens=max_tokens)
    mem = largest_batch_memory(lm, prefix, queries, pattern.verbalizers, batch_size, reuse_prefix, max_tokens) \
        if memory else TensorMemory()
    ok = ~s["skipped"]
    gold = eval_df["label"].to_numpy()
    lp = s["logprobs"]
    verb_first = s["first_ids"]
    top1_correct = np.array([t == vf[g] for t, vf, g in zip(s["top1"], verb_first, gold)])
    top1_in_verb = np.array([t in vf for t, vf in zip(s["top1"], verb_first)])
    pred, lm_ = label_metrics(gold, lp, ok)
    n = lm_["n_eval"]
    head = ("n_eval", "n_skipped_too_long", "majority_label", "majority_acc", "score_acc", "score_acc_lo", "score_acc_hi")
    metrics = {c: lm_[c] for c in head}  # the column order of every results table since the first one
    metrics.update({
        "top1_acc": float(top1_correct[ok].mean()) if n else float("nan"),
        "non_verbalizer_frac": float((~top1_in_verb[ok]).mean()) if n else float("nan"),
        **{c: v for c, v in lm_.items() if c not in head},
        "single_token_verbalizers": bool(s["single_token"]), "prefix_tokens": s["prefix_tokens"],
        "query_tokens_mean": float(np.mean(s["query_tokens"])), "tokens_processed": s["tokens_processed"],
        "n_prefix_fallback": s["n_prefix_fallback"], "prefix_reuse_note": s["prefix_reuse_note"],
        "scoring": "prefix_reuse" if reuse_prefix else "full_prompt",
        "wall_s": pr.wall_s, "s_per_query": pr.wall_s / max(len(queries), 1),
        "peak_mem_mb": pr.peak_mem_mb, "peak_mem_delta_mb": pr.mem_delta_mb, "mem_kind": pr.mem_kind,
        "mem_tensors_peak_mb": mem.peak_mb, "mem_weights_mb": mem.weights_mb, "mem_work_mb": mem.work_mb,
        "mem_method": mem.method,
    })
    preds = pd.DataFrame({"idx": eval_df["idx"].to_numpy(), "label": gold, "pred": pred,
                          "logp_label0": lp[:, 0], "logp_label1": lp[:, 1], "top1_token": s["top1"],
                          "top1_is_verbalizer": top1_in_verb, "skipped": ~ok})
    return _completed(metrics, preds, eval_df, calibrated_scores(lm, pattern, prefix, lp, ok, gold, batch_size,
                                                                  max_tokens) if calibration else ({}, {}))


def _completed(metrics: dict, preds: pd.DataFrame, eval_df: pd.DataFrame, calibrated: tuple):
    """``(metrics, preds)`` with the calibrated metrics and per-example columns (``calibrated``: what
    :func:`calibrated_scores` returns) and the HANS heuristic and subcase of each example."""
    cal_metrics, cal_preds = calibrated
    metrics.update(cal_metrics)
    for c, v in cal_preds.items():
        preds[c] = v
    for c in ("heuristic", "subcase"):
        if c in eval_df:
            preds[c] = eval_df[c].to_numpy()
    return metrics, preds


def content_free_logprobs(lm, pattern: Pattern, prefix: str, batch_size: int = 8, max_tokens: int = 0) -> np.ndarray:
    """Verbalizer log-probs (one row per content-free input of :data:`calibration.CONTENT_FREE`, NaN where too
    long) of the content-free queries after ``prefix``: contextual calibration's estimate of the label prior."""
    cf = [query_text(pattern, c, c, bool(prefix)) for c in CONTENT_FREE]
    return score_prompts(lm, prefix, cf, pattern.verbalizers, batch_size=batch_size, on_too_long="skip",
                         max_tokens=max_tokens)["logprobs"]


def calibrated_scores(lm, pattern: Pattern, prefix: str, lp, ok, gold, batch_size: int = 8, max_tokens: int = 0,
                      cf_lp=None):
    """Contextual and batch calibration (:mod:`llmft_utils.calibration`) of one run's verbalizer log-probs
    ``lp``: the content-free inputs are scored with the run's own prefix (untimed; a handful of prompts),
    the batch prior is the mean over the scored queries. Returns the metrics (``score_acc_<kind>``,
    ``balanced_acc_<kind>``, ``pred_label1_frac_<kind>``, ``prior_label1_<kind>``: the prior's label-1
    probability) and per-example predictions (``pred_<kind>``; -1 where skipped). ``cf_lp``: the content-free
    log-probs when already known (an ensemble's combined ones); else they are scored here."""
    cf_lp = content_free_logprobs(lm, pattern, prefix, batch_size, max_tokens) if cf_lp is None else cf_lp
    cf_lp = cf_lp[~np.isnan(cf_lp).any(1)]
    priors = {"contextual": prior(cf_lp) if len(cf_lp) else np.full(lp.shape[1], np.nan),
              "batch": prior(lp[ok]) if ok.any() else np.full(lp.shape[1], np.nan)}
    metrics, preds = {}, {}
    for kind, q in priors.items():
        usable = ok & bool(np.isfinite(q).all())
        pc = np.where(usable, np.nan_to_num(calibrate(lp, q), nan=-np.inf).argmax(1), -1)
        n = int(usable.sum())
        metrics[f"score_acc_{kind}"] = float((pc[usable] == gold[usable]).mean()) if n else float("nan")
        metrics[f"balanced_acc_{kind}"] = balanced_accuracy(gold[usable], pc[usable]) if n else float("nan")
        metrics[f"pred_label1_frac_{kind}"] = float((pc[usable] == 1).mean()) if n else float("nan")
        metrics[f"prior_label1_{kind}"] = float(np.exp(q[1])) if np.isfinite(q).all() else float("nan")
        preds[f"pred_{kind}"] = pc
    return metrics, preds


def combine_label_logprobs(member_lp, combine: str = "prob") -> np.ndarray:
    """An ensemble's label log-probs from its members' (m × n × labels, each the full-vocabulary log-prob of a
    verbalizer): ``prob`` the log of the mean probability (the mixture's own log-probs); ``logprob`` the mean
    log-prob (the normalised geometric mean up to a per-query constant, which neither the prediction nor the
    label-renormalised distribution sees)."""
    lp = np.asarray(member_lp, dtype=float)
    if combine == "prob":
        return np.logaddexp.reduce(lp, axis=0) - math.log(lp.shape[0])
    if combine == "logprob":
        return lp.mean(0)
    raise ValueError(f"unknown ensemble combine {combine!r}; use prob or logprob")


def evaluate_ensemble(lm, eval_df: pd.DataFrame, pattern: Pattern, demo_sets: list, combine: str = "prob",
                      batch_size: int = 8, progress: bool = True, max_tokens: int = 0, known: dict | None = None):
    """The prompt ensemble at inference: every query is scored after each of the m demonstration sets (m
    forwards per query, each with its own reused prefix) and the m answer distributions are combined
    (:func:`combine_label_logprobs`). ``known``: ``{j: (metrics, predictions)}`` of members already evaluated
    (the single-prompt ICL run of set 0). Returns ``(metrics, predictions)`` like :func:`evaluate`; the cost
    columns add up the members (``wall_s``, ``s_per_query``, prefix and query tokens read per query),
    ``peak_mem_mb`` is the largest member's, and the top-1 format columns are NaN (the combined top-1 token
    is not formed). The predictions hold each member's too (``member<j>_pred``, ``member<j>_logp_label0/1``) and the
    metrics the range of the members' label-1 rates. Contextual calibration combines the members' content-free
    answers the same way."""
    members = []
    for j, demos in enumerate(demo_sets):
        if known and j in known:
            members.append(known[j])
        else:
            members.append(evaluate(lm, eval_df, pattern, demos, batch_size=batch_size, progress=progress,
                                    max_tokens=max_tokens, extras=()))
    m = len(members)
    gold = eval_df["label"].to_numpy()
    ok = ~np.any([p["skipped"].to_numpy(bool) for _, p in members], 0)
    lp = combine_label_logprobs([p[["logp_label0", "logp_label1"]].to_numpy(float) for _, p in members], combine)
    lp[~ok] = np.nan
    pred, metrics = label_metrics(gold, lp, ok)
    cost = {c: float(sum(mm[c] for mm, _ in members)) for c in ("wall_s", "s_per_query", "tokens_processed",
                                                                "prefix_tokens", "n_prefix_fallback")}
    accs = [mm["score_acc"] for mm, _ in members]
    metrics.update({
        "top1_acc": float("nan"), "non_verbalizer_frac": float("nan"),
        "single_token_verbalizers": all(mm["single_token_verbalizers"] for mm, _ in members),
        **cost, "query_tokens_mean": float(sum(mm["query_tokens_mean"] for mm, _ in members)),
        "prefix_reuse_note": "; ".join(sorted({mm["prefix_reuse_note"] for mm, _ in members} - {""})),
        "scoring": f"ensemble of {m} prompts ({members[0][0]['scoring']})",
        "peak_mem_mb": float(max(mm["peak_mem_mb"] for mm, _ in members)),
        "peak_mem_delta_mb": float(max(mm["peak_mem_delta_mb"] for mm, _ in members)),
        "mem_kind": members[0][0]["mem_kind"], "ensemble_m": m, "ensemble_combine": combine,
        "member_acc_mean": float(np.mean(accs)), "member_acc_min": float(np.min(accs)),
        "member_acc_max": float(np.max(accs)),
        "member_label1_frac_min": float(min(mm["pred_label1_frac"] for mm, _ in members)),
        "member_label1_frac_max": float(max(mm["pred_label1_frac"] for mm, _ in members))})
    preds = pd.DataFrame({"idx": eval_df["idx"].to_numpy(), "label": gold, "pred": pred, "logp_label0": lp[:, 0],
                          "logp_label1": lp[:, 1], "top1_token": -1, "top1_is_verbalizer": np.nan, "skipped": ~ok})
    for j, (_, p) in enumerate(members):  # each member's own answers, so its label bias can be checked per example
        for c in ("pred", "logp_label0", "logp_label1"):
            preds[f"member{j}_{c}"] = p[c].to_numpy()
    cf = combine_label_logprobs([content_free_logprobs(lm, pattern, build_prefix(pattern, d), batch_size, max_tokens)
                                 for d in demo_sets], combine)
    return _completed(metrics, preds, eval_df, calibrated_scores(lm, pattern, "", lp, ok, gold, cf_lp=cf))


def full_prompt_cost(lm, ev: pd.DataFrame, pattern: Pattern, demos: pd.DataFrame, n: int, batch_size: int = 8,
                     max_tokens: int = 0) -> dict:
    """What ICL costs without a prefix cache: the first ``n`` queries of ``ev`` scored on full prompts (the
    demonstrations run again with every query), wall time per query. Prompts that do not fit are
    skipped. ``{}`` for ``n = 0``. With the run's own ``s_per_query`` (prefix reused) and a student's, it
    gives the break-even number of queries of context distillation (``analysis.tables.break_even``)."""
    if n <= 0 or not len(demos):
        return {}
    m, _ = evaluate(lm, ev.head(n), pattern, demos, batch_size=batch_size, reuse_prefix=False, on_too_long="skip",
                    progress=False, max_tokens=max_tokens, extras=())
    return {"s_per_query_full_prompt": m["s_per_query"], "n_full_prompt_sample": m["n_eval"]}


HALF_DTYPES = ("bfloat16", "float16")  # precisions whose scores are checked against a float32 reference


def precision_flips(ref, preds: pd.DataFrame, eval_df: pd.DataFrame, pattern: Pattern, demos: pd.DataFrame, n: int,
                    batch_size: int = 8, max_tokens: int = 0) -> dict:
    """How far a run at reduced precision is from float32, measured on its own first ``n`` queries: they are
    scored again by ``ref`` (the same weights in float32, same prompts and batching) and compared with the
    run's ``preds``. ``fidelity_flip_rate``: the share of the queries scored by both whose prediction differs;
    ``fidelity_max_dlogp``: the largest |Δ log-prob| of a verbalizer; ``fidelity_n``: the queries compared.
    Untimed (not part of the run's cost)."""
    head = eval_df.head(n)
    _, rp = evaluate(ref, head, pattern, demos, batch_size=batch_size, on_too_long="skip", progress=False,
                     max_tokens=max_tokens, extras=())
    mine = preds.head(len(head))
    ok = ~(mine["skipped"].to_numpy(bool) | rp["skipped"].to_numpy(bool))
    cols = ["logp_label0", "logp_label1"]
    flips = (mine["pred"].to_numpy() != rp["pred"].to_numpy())[ok]
    dlogp = np.abs(mine[cols].to_numpy(float) - rp[cols].to_numpy(float))[ok]
    return {"fidelity_reference": "float32", "fidelity_n": int(ok.sum()),
            "fidelity_flip_rate": float(flips.mean()) if ok.any() else float("nan"),
            "fidelity_max_dlogp": float(dlogp.max()) if ok.any() else float("nan")}
