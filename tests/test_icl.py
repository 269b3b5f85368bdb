import numpy as np
import pytest
import torch

import toy_data
from llmft_utils import data, icl, models, patterns

GPT3 = patterns.get_pattern("gpt-3")
MULTI = patterns.Pattern("multi", "{premise} question: {hypothesis} Yes or No? answer:", (" Absolutely", " Nope"))


def _frames(n_eval=12, n_pool=20):
    return toy_data.frames(n_eval, n_pool)


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("pattern", [GPT3, MULTI], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("k", [0, 4])
def test_prefix_reuse_equals_full_prompt(tiny_lms, arch, pattern, k):
    lm = tiny_lms[arch]
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, k, seed=1, exclude=ev)
    m1, p1 = icl.evaluate(lm, ev, pattern, demos, batch_size=5, reuse_prefix=True, progress=False)
    m2, p2 = icl.evaluate(lm, ev, pattern, demos, batch_size=3, reuse_prefix=False, progress=False)
    for c in ("logp_label0", "logp_label1"):
        assert np.abs(p1[c] - p2[c]).max() <= 1e-4
    assert (p1["top1_token"] == p2["top1_token"]).all()
    assert m1["single_token_verbalizers"] == (pattern is GPT3)
    assert m1["n_prefix_fallback"] == 0
    if k:
        assert m1["tokens_processed"] < m2["tokens_processed"]


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_split_prefix_attention_equals_broadcast_cache(tiny_lms, arch, monkeypatch):
    """The split attention (prefix attended once, merged by log-sum-exp) gives the same log-probs as a
    key/value cache broadcast over the batch, for left-padded rows of different lengths; and it is the
    path taken on CPU."""
    lm = tiny_lms[arch]
    ev, pool = _frames(9)
    ev.loc[0, "premise"] = " ".join(["doctor"] * 40)  # much longer than the others: lots of left padding
    demos = data.sample_demonstrations(pool, 6, seed=2, exclude=ev)
    prefix = patterns.build_prefix(GPT3, demos)
    queries = [patterns.query_text(GPT3, p, h, True) for p, h in zip(ev.premise, ev.hypothesis)]
    prefix_ids, rows, _, _ = icl.build_rows(lm.tokenizer, prefix, queries, GPT3.verbalizers)
    kv = icl._prefix_kv(lm.model, prefix_ids, "cpu")
    calls = []
    real = icl._flash_lse
    monkeypatch.setattr(icl, "_flash_lse", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert icl.uses_split_attention(lm.model, "cpu") and not icl.uses_split_attention(lm.model, "cuda")
    split = icl._forward_rows(lm.model, rows, prefix_ids, kv, 0, "cpu", 4, split=True)
    assert len(calls) == 2 * lm.model.config.num_hidden_layers * 3  # 2 partial attentions per layer and batch
    cache = icl._forward_rows(lm.model, rows, prefix_ids, kv, 0, "cpu", 4, split=False)
    assert np.abs(split[0] - cache[0]).max() < 1e-5 and (split[1] == cache[1]).all()
    assert lm.model.config._attn_implementation == "sdpa"  # restored after the split forward


def test_naive_reference_is_independent_forward(tiny_lms):
    """The scorer's log-probs equal a plain, unbatched forward pass over the whole prompt text."""
    lm = tiny_lms["opt"]
    ev, pool = _frames(4)
    demos = data.sample_demonstrations(pool, 2, seed=0)
    _, preds = icl.evaluate(lm, ev, GPT3, demos, batch_size=4, progress=False)
    prefix = patterns.build_prefix(GPT3, demos)
    for i, (p, h) in enumerate(zip(ev.premise, ev.hypothesis)):
        text = prefix + patterns.query_text(GPT3, p, h, True)
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
        yes, no = (lm.tokenizer(text + v, add_special_tokens=False).input_ids[-1] for v in GPT3.verbalizers)
        assert abs(float(logp[yes]) - preds.logp_label0[i]) < 1e-4
        assert abs(float(logp[no]) - preds.logp_label1[i]) < 1e-4


def test_too_long_prompts_error_or_skip():
    tok = models.tiny_tokenizer()
    lm = models.wrap(models.tiny_model("llama", tok, max_positions=64), tok)
    ev, pool = _frames(6)
    ev.loc[0, "premise"] = " ".join(["doctor"] * 200)
    with pytest.raises(icl.PromptTooLongError, match="exceed the model's context of 64"):
        icl.evaluate(lm, ev, GPT3, pool.iloc[0:0], progress=False)
    m, p = icl.evaluate(lm, ev, GPT3, pool.iloc[0:0], on_too_long="skip", progress=False)
    assert m["n_skipped_too_long"] == 1 and m["n_eval"] == 5 and p["skipped"].sum() == 1
    with pytest.raises(ValueError, match="on_too_long"):
        icl.evaluate(lm, ev, GPT3, pool.iloc[0:0], on_too_long="truncate", progress=False)


def test_metrics_consistent(tiny_lms):
    lm = tiny_lms["llama"]
    ev, pool = _frames(10)
    m, p = icl.evaluate(lm, ev, GPT3, data.sample_demonstrations(pool, 2, 0), progress=False)
    assert m["score_acc"] == pytest.approx((p.pred == p.label).mean())
    assert m["majority_acc"] == 0.5 and m["n_eval"] == 10
    assert m["non_verbalizer_frac"] == pytest.approx(1 - p.top1_is_verbalizer.mean())
    assert m["score_acc_lo"] <= m["score_acc"] <= m["score_acc_hi"]
    assert m["wall_s"] > 0 and m["peak_mem_mb"] > 0 and m["mem_kind"].startswith("cpu")
    assert (p.pred == (p.logp_label1 > p.logp_label0).astype(int)).all()


def test_wilson_reference():
    lo, hi = icl.wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
