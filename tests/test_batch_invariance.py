"""Scores do not depend on how queries are batched (docs/reproducibility.md).

Batch size, a token budget (``max_batch_tokens``), the order of the queries and the padding a query gets
from longer neighbours change no prediction, and no verbalizer log-probability by more than
``BATCH_EPS``. Left padding is masked and positions are taken per row, so a query's forward pass sees
the same numbers whatever shares its batch; what remains is the summation order of differently shaped
matmuls (~1e-6 in float32). Other harnesses report scores that move with batch size: this is the check
that ours do not.
"""
import numpy as np
import pandas as pd
import pytest
import torch
import toy_data

from llmft_utils import data, distill, models, patterns, scoring

GPT3 = patterns.get_pattern("gpt-3")
MULTI = patterns.Pattern("multi", "{premise} question: {hypothesis} Yes or No? answer:", (" Absolutely", " Nope"))
BATCH_EPS = 2e-5  # largest |delta log-prob| allowed between two batchings (measured: 7.6e-6 on the tiny models, ATen avx512 and default)


def _variants(ev: pd.DataFrame, seed: int = 0) -> dict:
    """name -> (frame, evaluate kwargs): the same queries batched, ordered and padded differently."""
    rng = np.random.default_rng(seed)
    long = ev.iloc[:1].assign(idx=10_000, premise=" ".join(["doctor"] * 60))  # pads every query of its batch
    return {"bs1": (ev, {"batch_size": 1}),
            "bs3": (ev, {"batch_size": 3}),
            "bs_all": (ev, {"batch_size": len(ev)}),
            "tokens_96": (ev, {"batch_size": 8, "max_tokens": 96}),
            "tokens_400": (ev, {"batch_size": 8, "max_tokens": 400}),
            "reversed": (ev.iloc[::-1].reset_index(drop=True), {"batch_size": 4}),
            "shuffled": (ev.sample(frac=1.0, random_state=int(rng.integers(1 << 30))).reset_index(drop=True),
                         {"batch_size": 5}),
            "padded_by_a_long_query": (pd.concat([long, ev], ignore_index=True), {"batch_size": len(ev) + 1})}


def _scores(lm, frame, pattern, demos, **kw) -> pd.DataFrame:
    _, preds = scoring.evaluate(lm, frame, pattern, demos, progress=False, extras=(), **kw)
    return preds.set_index("idx")


def assert_same_scores(base: pd.DataFrame, other: pd.DataFrame, what: str, eps: float = BATCH_EPS) -> float:
    other = other.loc[base.index]
    d = np.abs(base[["logp_label0", "logp_label1"]].to_numpy() - other[["logp_label0", "logp_label1"]].to_numpy())
    assert (base["pred"] == other["pred"]).all(), f"{what}: {(base['pred'] != other['pred']).sum()} predictions changed"
    assert d.max() <= eps, f"{what}: max |delta log-prob| {d.max():.2e} > {eps:g}"
    return float(d.max())


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("pattern", [GPT3, MULTI], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("k", [0, 4])
def test_scores_do_not_depend_on_batching_order_or_padding(tiny_lms, arch, pattern, k):
    lm = tiny_lms[arch]
    ev, pool = toy_data.frames(14, 24, seed=3, premise=(2, 30))  # lengths from 2 to 30 words: uneven padding
    demos = data.sample_demonstrations(pool, k, seed=1, exclude=ev)
    variants = _variants(ev)
    base_frame, _ = variants.pop("bs1")
    base = _scores(lm, base_frame, pattern, demos, batch_size=1)
    for name, (frame, kw) in variants.items():
        assert_same_scores(base, _scores(lm, frame, pattern, demos, **kw), f"{arch} k={k} {name}")


def test_teacher_targets_do_not_depend_on_batching(tiny_lms):
    """The teacher's cached distribution (what CD trains on) is batch-invariant too."""
    lm = tiny_lms["llama"]
    ev, pool = toy_data.frames(11, 20, seed=4, premise=(2, 25))
    demos = data.sample_demonstrations(pool, 4, seed=0, exclude=ev)
    cfg = distill.DistillConfig(target="topk", topk=5)
    one = distill.teacher_targets(lm, GPT3, demos, ev, cfg, batch_size=1)
    for kw in ({"batch_size": 4}, {"batch_size": 11}, {"batch_size": 8, "max_tokens": 120}):
        other = distill.teacher_targets(lm, GPT3, demos, ev, cfg, **kw)
        assert float((one["logp"] - other["logp"]).abs().max()) <= BATCH_EPS, kw
        assert (one["topk_ids"] == other["topk_ids"]).all(), kw


def test_the_check_catches_a_batch_dependent_score(tiny_lms, monkeypatch):
    """The assertion itself fails when padding leaks into a score (mutation: positions ignore the left padding)."""
    lm = tiny_lms["llama"]
    ev, pool = toy_data.frames(8, 20, seed=5, premise=(2, 30))
    demos = data.sample_demonstrations(pool, 0, seed=0, exclude=ev)
    base = _scores(lm, ev, GPT3, demos, batch_size=1)
    real = scoring.mask_arguments

    def leaky(*a, **kw):  # padding neither masked nor skipped by the positions: queries attend to their pads
        out = dict(real(*a, **kw))
        out.pop("attention_mask")
        out["position_ids"] = torch.arange(out["position_ids"].shape[1]).expand_as(out["position_ids"])
        return out
    monkeypatch.setattr(scoring.forward, "mask_arguments", leaky)
    with pytest.raises(AssertionError):
        assert_same_scores(base, _scores(lm, ev, GPT3, demos, batch_size=len(ev)), "leaky padding")


def test_real_model_scores_do_not_depend_on_batching(data_dir):
    """The embedded SmolLM2 on 24 MNLI queries with 4 demonstrations: batch sizes 1 and 8, a token budget and
    the reversed order give the same predictions and log-probs within BATCH_EPS."""
    try:
        lm = models.load_model("smollm2-135m", device="cpu")
    except models.ModelError as e:
        pytest.skip(str(e))
    ev = data.stratified_subsample(data.load_split("mnli", "validation_matched", data_dir), 24, seed=0)
    pool = data.load_split("mnli", "train", data_dir).head(300)
    demos = data.sample_demonstrations(pool, 4, seed=0, exclude=ev)
    base = _scores(lm, ev, GPT3, demos, batch_size=1)
    for name, frame, kw in (("bs8", ev, {"batch_size": 8}), ("tokens_600", ev, {"batch_size": 8, "max_tokens": 600}),
                            ("reversed", ev.iloc[::-1].reset_index(drop=True), {"batch_size": 6})):
        assert_same_scores(base, _scores(lm, frame, GPT3, demos, **kw), f"smollm2 {name}")
