"""Prefix reuse is exact for every model it accepts, and says so when it is not taken.

The reference for every comparison is independent of the scorer: each prompt's text tokenised alone and
run alone (batch 1, no padding, no cache), as in tests/test_icl.py::test_naive_reference_is_independent_forward.
The sliding-window models get a window of 16 tokens and a prefix of ~100, with one query far longer than the
others so that the short ones carry heavy left padding: the case where a padded row on a reused prefix loses
prefix tokens its full prompt still sees."""
import contextlib

import numpy as np
import pytest
import torch
import toy_data
import transformers

from llmft_utils import data, models, patterns, scoring

GPT3 = patterns.get_pattern("gpt-3")
WINDOW = 16


def _config(arch: str, vocab: int, window: int = WINDOW):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if arch == "mistral":
        return transformers.MistralConfig(num_hidden_layers=2, sliding_window=window, **common)
    if arch == "gemma3-hybrid":
        return transformers.Gemma3TextConfig(num_hidden_layers=4, head_dim=8, sliding_window=window, **common,
                                             layer_types=["sliding_attention", "full_attention"] * 2)
    if arch == "qwen2-hybrid":  # layers from max_window_layers on slide
        return transformers.Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=window,
                                        max_window_layers=1, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=4096,
                                       initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    raise ValueError(arch)


def _lm(arch: str, tok, window: int = WINDOW):
    if arch in models.TINY_ARCHS:  # opt, llama, qwen2 (the structure of qwen2.5-coder-0.5b)
        return models.wrap(models.tiny_model(arch, tok, max_positions=4096), tok, name=f"tiny-{arch}")
    torch.manual_seed(0)
    return models.wrap(transformers.AutoModelForCausalLM.from_config(_config(arch, len(tok), window)), tok,
                       name=f"tiny-{arch}")


ARCHS = ["opt", "llama", "qwen2", "gpt2", "mistral", "gemma3-hybrid", "qwen2-hybrid"]
SLIDING = ("mistral", "gemma3-hybrid", "qwen2-hybrid")


@pytest.fixture(scope="module")
def lms():
    tok = models.tiny_tokenizer()
    return {arch: _lm(arch, tok) for arch in ARCHS}


def _frames(n_eval=9, n_pool=20):
    ev, pool = toy_data.frames(n_eval, n_pool)
    ev.loc[0, "premise"] = " ".join(["doctor"] * 40)  # much longer than the others: lots of left padding
    return ev, pool


def _queries(ev) -> list[str]:
    return [patterns.query_text(GPT3, p, h, True) for p, h in zip(ev.premise, ev.hypothesis)]


def _reference(lm, prefix: str, ev) -> list[torch.Tensor]:
    """Per query, the answer-position log-softmax of its whole prompt run alone."""
    out = []
    for q in _queries(ev):
        ids = lm.tokenizer(prefix + q, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1))
    return out


def _verbalizer_ids(lm, prefix: str, ev) -> np.ndarray:
    return np.array([[lm.tokenizer(prefix + q + v, add_special_tokens=False).input_ids[-1] for v in GPT3.verbalizers]
                     for q in _queries(ev)])


def _assert_matches_reference(lm, prefix, ev, preds, ref):
    vids = _verbalizer_ids(lm, prefix, ev)
    want = np.array([[float(r[t]) for t in v] for r, v in zip(ref, vids)])
    got = preds[["logp_label0", "logp_label1"]].to_numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert (preds["pred"].to_numpy() == want.argmax(1)).all()
    assert (preds["top1_token"].to_numpy() == np.array([int(r.argmax()) for r in ref])).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_reuse_equals_independent_reference(lms, arch):
    """ICL scores and teacher distributions with ``reuse_prefix=True`` equal each prompt run alone, on
    full-attention models (reused) and on sliding-window ones with the prefix longer than the window
    (scored on full prompts: neither wrong, as before on Mistral/Qwen2, nor a crash, as on hybrid Gemma 3)."""
    lm = lms[arch]
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, 4, seed=1, exclude=ev)
    prefix = patterns.build_prefix(GPT3, demos)
    m, preds = scoring.evaluate(lm, ev, GPT3, demos, batch_size=4, reuse_prefix=True, progress=False)
    assert m["prefix_tokens"] > WINDOW
    ref = _reference(lm, prefix, ev)
    _assert_matches_reference(lm, prefix, ev, preds, ref)
    teacher = scoring.answer_logits(lm, prefix, _queries(ev), lambda z: torch.log_softmax(z, -1), batch_size=4)
    assert max(float((t - r).abs().max()) for t, r in zip(teacher, ref)) <= 1e-4
    if arch in SLIDING:
        assert m["n_prefix_fallback"] == len(ev) and "sliding-window attention (window 16)" in m["prefix_reuse_note"]
    else:
        assert m["n_prefix_fallback"] == 0 and m["prefix_reuse_note"] == ""


def test_sliding_window_reuses_the_rows_that_fit():
    """With a window longer than the prefix, the rows whose prefix + length fit it (the boundary included)
    are scored on the reused prefix, the others on full prompts, all exactly; the note says how many."""
    tok = models.tiny_tokenizer()
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, 2, seed=1, exclude=ev)
    prefix = patterns.build_prefix(GPT3, demos)
    prefix_ids, rows, _, _ = scoring.build_rows(tok, prefix, _queries(ev), GPT3.verbalizers)
    lengths = sorted(len(r.ids) for r in rows)
    window = len(prefix_ids) + lengths[-3]  # the two longest queries do not fit
    lm = _lm("mistral", tok, window)
    m, preds = scoring.evaluate(lm, ev, GPT3, demos, batch_size=8, reuse_prefix=True, progress=False)
    _assert_matches_reference(lm, prefix, ev, preds, _reference(lm, prefix, ev))
    assert m["n_prefix_fallback"] == 2 and "2 of 9 queries scored on full prompts" in m["prefix_reuse_note"]


@pytest.mark.parametrize("config, limit", [
    (transformers.LlamaConfig(), np.inf), (transformers.GPT2Config(), np.inf),
    (transformers.MistralConfig(sliding_window=None), np.inf), (transformers.MistralConfig(sliding_window=16), 16),
    (transformers.Qwen2Config(use_sliding_window=False), np.inf),
    (transformers.Gemma3Config(text_config={"sliding_window": 16}), 16),  # multimodal: read from its text config
    (transformers.Llama4TextConfig(), 0), (transformers.Qwen3NextConfig(), 0), (transformers.MambaConfig(), 0),
], ids=lambda x: type(x).__name__ if not isinstance(x, (int, float)) else str(x))
def test_exact_reuse_length_by_layer_types(config, limit):
    """Full attention: reuse always; sliding windows: within the window; chunked, linear or recurrent layers: never."""
    got, reason = scoring.exact_reuse_length(config)
    assert got == limit and (reason == "") == (limit == np.inf)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_split_kernel_that_did_not_run_raises(lms, arch, monkeypatch):
    """A model that ignores the switch to the split kernel would score without the prefix: it must raise."""
    monkeypatch.setattr(scoring.forward, "attention_implementation", lambda model, name: contextlib.nullcontext())
    ev, pool = _frames(4)
    with pytest.raises(RuntimeError, match="AttentionInterface"):
        scoring.evaluate(lms[arch], ev, GPT3, data.sample_demonstrations(pool, 2, seed=0), progress=False)


@pytest.mark.parametrize("arch", ["opt", "gpt2", "qwen2"], ids=["split", "broadcast", "broadcast-qwen2"])
@pytest.mark.parametrize("teacher", [False, True], ids=["score", "teacher"])
def test_self_check_catches_a_corrupted_prefix(lms, arch, teacher, monkeypatch):
    """Prefix values off by one position (the reference, run without the prefix cache, is untouched): the
    self-check raises on both prefix paths, for ICL scoring and for the teacher."""
    real = scoring.reuse.encode_prefix
    monkeypatch.setattr(scoring.forward, "encode_prefix", lambda *a: [(k, v.roll(1, dims=2)) for k, v in real(*a)])
    ev, pool = _frames(6)
    demos = data.sample_demonstrations(pool, 4, seed=0)
    with pytest.raises(RuntimeError, match="differs from the full prompt") as err:
        if teacher:
            scoring.answer_logits(lms[arch], patterns.build_prefix(GPT3, demos), _queries(ev), lambda z: z, batch_size=4)
        else:
            scoring.evaluate(lms[arch], ev, GPT3, demos, batch_size=4, progress=False)
    assert err.type.__name__ == "PrefixReuseMismatch" and "reuse_prefix=False" in str(err.value)


def test_self_check_catches_the_sliding_window_error(lms, monkeypatch):
    """Were a sliding-window model's rows reused beyond the window (the reported bug), the self-check's
    most padded row would show it."""
    monkeypatch.setattr(scoring.reuse, "exact_reuse_length", lambda config: (np.inf, ""))
    ev, pool = _frames()
    with pytest.raises(scoring.PrefixReuseMismatch, match="mistral: scoring on the reused prefix differs"):
        scoring.evaluate(lms["mistral"], ev, GPT3, data.sample_demonstrations(pool, 4, seed=1, exclude=ev), batch_size=4,
                     progress=False)


@pytest.mark.parametrize("arch", ["opt", "gpt2"], ids=["split", "broadcast"])
def test_self_check_costs_one_forward(lms, arch, monkeypatch):
    """An honest run passes the self-check, which re-scores the most padded row on its full prompt:
    one batch-1 forward per run on top of the prefix and the batches of queries (the memory
    measurement, one more prefix and batch, and the calibration's content-free prompts are switched off here)."""
    monkeypatch.setattr(scoring.evaluation, "calibrated_scores", lambda *a, **k: ({}, {}))
    lm = lms[arch]
    ev, pool = _frames(9)
    demos = data.sample_demonstrations(pool, 2, seed=0)
    shapes = []
    hook = lm.model.register_forward_pre_hook(lambda mod, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                              with_kwargs=True)
    try:
        m, _ = scoring.evaluate(lm, ev, GPT3, demos, batch_size=4, progress=False, extras=("calibration",))
    finally:
        hook.remove()
    assert [s[0] for s in shapes] == [1, 4, 4, 1, 1]  # prefix, 3 batches of queries, the check
    longest = m["prefix_tokens"] + shapes[1][1]
    assert m["prefix_tokens"] < shapes[-1][1] < longest  # a whole prompt, not the longest (unpadded) one
