import numpy as np
import pytest
import torch
import toy_data

from llmft_utils import data, models, patterns, scoring

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
    m1, p1 = scoring.evaluate(lm, ev, pattern, demos, batch_size=5, reuse_prefix=True, progress=False)
    m2, p2 = scoring.evaluate(lm, ev, pattern, demos, batch_size=3, reuse_prefix=False, progress=False)
    for c in ("logp_label0", "logp_label1"):
        assert np.abs(p1[c] - p2[c]).max() <= 1e-4
    assert (p1["top1_token"] == p2["top1_token"]).all()
    assert m1["single_token_verbalizers"] == (pattern is GPT3)
    assert m1["n_prefix_fallback"] == 0
    if k:
        assert m1["tokens_processed"] < m2["tokens_processed"]


@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_split_prefix_attention_equals_broadcast_cache(tiny_lms, arch, kernel, monkeypatch):
    """The split attention (prefix attended once, merged by log-sum-exp) gives the same log-probs as a
    key/value cache broadcast over the batch, for left-padded rows of different lengths, with either of
    its kernels: torch's fused CPU kernel (``auto`` on CPU) and the float32 matmul kernel that GPUs use
    (``math``; chunked here into pieces of a few query rows, to test the chunking too). It is the path
    taken on every device for these model types."""
    lm = tiny_lms[arch]
    ev, pool = _frames(9)
    ev.loc[0, "premise"] = " ".join(["doctor"] * 40)  # much longer than the others: lots of left padding
    demos = data.sample_demonstrations(pool, 6, seed=2, exclude=ev)
    prefix = patterns.build_prefix(GPT3, demos)
    queries = [patterns.query_text(GPT3, p, h, True) for p, h in zip(ev.premise, ev.hypothesis)]
    prefix_ids, rows, _, _ = scoring.build_rows(lm.tokenizer, prefix, queries, GPT3.verbalizers)
    kv = scoring.reuse.encode_prefix(lm.model, prefix_ids, "cpu")
    calls = []
    name = "_flash_lse" if kernel == "auto" else "_math_lse"
    real = getattr(scoring.attention, name)
    monkeypatch.setattr(scoring.attention, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(scoring.attention, "SPLIT_KERNEL", kernel)
    if kernel == "math":
        monkeypatch.setattr(scoring.attention, "MATH_MAX_SCORES", 3 * len(prefix_ids) * lm.model.config.num_attention_heads)
    assert scoring.uses_split_attention(lm.model, "cpu") and scoring.uses_split_attention(lm.model, "cuda")
    batches = scoring.forward.plan_batches(rows, 4)
    split = scoring.forward.forward_rows(lm.model, rows, scoring.forward.Prefix(prefix_ids, kv), 0, "cpu", batches,
                                          split=True)
    assert len(calls) == 2 * lm.model.config.num_hidden_layers * 3  # 2 partial attentions per layer and batch
    cache = scoring.forward.forward_rows(lm.model, rows, scoring.forward.Prefix(prefix_ids, kv), 0, "cpu", batches,
                                          split=False)
    assert np.abs(split[0] - cache[0]).max() < 1e-5 and (split[1] == cache[1]).all()
    assert lm.model.config._attn_implementation == "sdpa"  # restored after the split forward


def test_token_budget_batches_and_device_side_gather_match_fixed_batches(tiny_lms):
    """Batches filled up to a token budget give the same scores as fixed-size batches (every batch within
    the budget, padded size counted), and the device-side gather of multi-token label sets equals an
    independent per-row sum over a plain forward."""
    lm = tiny_lms["llama"]
    ev, pool = _frames(12)
    ev.loc[3, "premise"] = " ".join(["lawyer"] * 30)
    demos = data.sample_demonstrations(pool, 2, seed=1, exclude=ev)
    prefix = patterns.build_prefix(GPT3, demos)
    queries = [patterns.query_text(GPT3, p, h, True) for p, h in zip(ev.premise, ev.hypothesis)]
    multi = ("  maybe so", " no way at all")  # several tokens per label: one row per (query, label)
    prefix_ids, rows, single, _ = scoring.build_rows(lm.tokenizer, prefix, queries, multi)
    assert not single
    budget = 3 * max(len(r.ids) for r in rows)
    batches = scoring.forward.plan_batches(rows, 4, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    assert all(len(b) * max(len(rows[i].ids) for i in b) <= budget for b in batches) and len(batches) > 2
    kv = scoring.reuse.encode_prefix(lm.model, prefix_ids, "cpu")
    prefix_kv = scoring.forward.Prefix(prefix_ids, kv)
    fixed = scoring.forward.forward_rows(lm.model, rows, prefix_kv, 0, "cpu", scoring.forward.plan_batches(rows, 4))
    tok = scoring.forward.forward_rows(lm.model, rows, prefix_kv, 0, "cpu", batches)
    assert np.abs(fixed[0] - tok[0]).max(where=~np.isnan(fixed[0]), initial=0) < 1e-5
    assert (np.isnan(fixed[0]) == np.isnan(tok[0])).all() and (fixed[1] == tok[1]).all()
    for r, sc in zip(rows, fixed[0]):  # each label set's log-prob: summed over its tokens on the full prompt
        ids = torch.tensor([prefix_ids + r.ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
        for s, tset in enumerate(r.sets):
            if tset:
                want = sum(float(logp[len(r.ids) + len(prefix_ids) + o, t]) for o, t in tset)
                assert abs(sc[s] - want) < 1e-4
            else:
                assert np.isnan(sc[s])


@pytest.mark.parametrize("k", [0, 2])
def test_scoring_and_teacher_make_no_host_sync_per_batch(tiny_lms, k):
    """ICL scoring (with and without the reused prefix) and teacher caching wait for the device a fixed
    number of times per run, not per batch: batches of 2 make as many host syncs as batches of 16."""
    from host_syncs import HostSyncs

    from llmft_utils import distill

    lm = tiny_lms["llama"]
    ev, pool = _frames(32)
    demos = data.sample_demonstrations(pool, k, seed=0, exclude=ev) if k else pool.iloc[0:0]
    counts = {}
    for bs in (16, 2):
        with HostSyncs() as s:
            scoring.evaluate(lm, ev, GPT3, demos, batch_size=bs, progress=False)
            if k:
                distill.teacher_targets(lm, GPT3, demos, ev, distill.DistillConfig(target="verbalizer"), batch_size=bs)
        counts[bs] = s.total, dict(s.calls)
    assert counts[2] == counts[16], counts


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_mask_arguments_give_the_same_logits(tiny_lms, arch):
    """The 4D mask of :func:`scoring.attention.mask_arguments` (no host read of the mask) gives the logits of the 2D mask
    that transformers expands itself, bit for bit, on a padded and an unpadded batch, with SDPA and eager."""
    lm = tiny_lms[arch]
    ids = torch.randint(5, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    for lengths in ([9, 6, 3], [9, 9, 9]):
        mask = torch.zeros_like(ids)
        for r, n in enumerate(lengths):
            mask[r, 9 - n:] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        for impl in ("sdpa", "eager"):
            with torch.no_grad(), models.attention_implementation(lm.model, impl):
                kw = scoring.mask_arguments(lm.model, mask, pos)
                assert (kw["attention_mask"].dim() == 4) == (impl == "sdpa")
                want = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                got = lm.model(input_ids=ids, **kw).logits
            keep = mask.bool()  # padded positions' outputs are not used
            assert torch.equal(want[keep], got[keep]), (lengths, impl)


def test_split_kernel_from_the_environment():
    """``$LLMFT_SPLIT_KERNEL`` sets ``scoring.attention.SPLIT_KERNEL`` at import; an unknown name stops the import with the choices."""
    import os
    import subprocess
    import sys

    run = lambda v: subprocess.run([sys.executable, "-c", "from llmft_utils import scoring; print(scoring.attention.SPLIT_KERNEL)"],
                                   capture_output=True, text=True, env={**os.environ, scoring.attention.SPLIT_KERNEL_ENV: v})
    ok, bad = run("math"), run("flash")
    assert ok.returncode == 0 and ok.stdout.strip() == "math", ok.stderr[-500:]
    assert bad.returncode != 0 and "LLMFT_SPLIT_KERNEL='flash': use one of ('auto', 'fused', 'math')" in bad.stderr


def test_naive_reference_is_independent_forward(tiny_lms):
    """The scorer's log-probs equal a plain, unbatched forward pass over the whole prompt text."""
    lm = tiny_lms["opt"]
    ev, pool = _frames(4)
    demos = data.sample_demonstrations(pool, 2, seed=0)
    _, preds = scoring.evaluate(lm, ev, GPT3, demos, batch_size=4, progress=False)
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
    with pytest.raises(scoring.PromptTooLongError, match="exceed the model's context of 64"):
        scoring.evaluate(lm, ev, GPT3, pool.iloc[0:0], progress=False)
    m, p = scoring.evaluate(lm, ev, GPT3, pool.iloc[0:0], on_too_long="skip", progress=False)
    assert m["n_skipped_too_long"] == 1 and m["n_eval"] == 5 and p["skipped"].sum() == 1
    with pytest.raises(ValueError, match="on_too_long"):
        scoring.evaluate(lm, ev, GPT3, pool.iloc[0:0], on_too_long="truncate", progress=False)


def test_metrics_consistent(tiny_lms):
    lm = tiny_lms["llama"]
    ev, pool = _frames(10)
    m, p = scoring.evaluate(lm, ev, GPT3, data.sample_demonstrations(pool, 2, 0), progress=False)
    assert m["score_acc"] == pytest.approx((p.pred == p.label).mean())
    assert m["majority_acc"] == 0.5 and m["n_eval"] == 10
    assert m["non_verbalizer_frac"] == pytest.approx(1 - p.top1_is_verbalizer.mean())
    assert m["score_acc_lo"] <= m["score_acc"] <= m["score_acc_hi"]
    assert m["wall_s"] > 0 and m["peak_mem_mb"] > 0 and m["mem_kind"].startswith("cpu")
    assert (p.pred == (p.logp_label1 > p.logp_label0).astype(int)).all()


def test_wilson_reference():
    lo, hi = scoring.wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


def _whole_split(tok, prefix, queries):
    """split_prefix's definition: every prefix + query tokenised whole."""
    prefix_ids = tok([prefix])["input_ids"][0]
    out = []
    for ids in tok([prefix + q for q in queries])["input_ids"]:
        standalone = ids[:len(prefix_ids)] != prefix_ids
        out.append((ids if standalone else ids[len(prefix_ids):], standalone))
    return prefix_ids, out


@pytest.mark.parametrize("which", ["tiny-bos", "tiny", "smollm2"])
def test_tail_tokenisation_equals_whole_prompt_tokenisation(which, smollm2_tokenizer):
    """split_prefix tokenises only the prefix's tail with each query (for tokenizers where that is exact) and
    gets the ids of whole-prompt tokenisation, also for queries that merge with the prefix's end (standalone
    rows), digits, whitespace runs and non-ASCII text."""
    tok = {"tiny-bos": models.tiny_tokenizer(add_bos=True), "tiny": models.tiny_tokenizer(),
           "smollm2": smollm2_tokenizer}[which]
    assert scoring.tokens._local_tokenizer(tok)
    ev, pool = _frames(80, 40)
    odd = ["\n\nQuestion: x", "12345 cats", "  spaced  out", "Ünïcödé — text?", "", "es no", ":", "\t\n 7", "terday"]
    for pattern in patterns.PATTERNS:
        pat = patterns.get_pattern(pattern)
        prefix = patterns.build_prefix(pat, data.sample_demonstrations(pool, 8, seed=3))
        queries = [patterns.query_text(pat, p, h, True) for p, h in zip(ev.premise, ev.hypothesis)] + odd
        fast = scoring.tokens._tail_split(tok, prefix, tok([prefix])["input_ids"][0], queries)
        assert fast is not None and (prefix_ids_and := scoring.split_prefix(tok, prefix, queries))[1] == fast
        assert prefix_ids_and == _whole_split(tok, prefix, queries)
    if which == "smollm2":  # "... answer: Yes" + "terday": the query merges with the prefix's last token
        assert fast[-1][1] and fast[-1][0] == smollm2_tokenizer([prefix + "terday"])["input_ids"][0]


def test_tail_tokenisation_is_refused_where_not_exact(monkeypatch):
    """A tokenizer with an added prefix space is not local: whole prompts are tokenised. A tail that
    tokenises differently from the whole prompt on the checked queries falls back to whole prompts."""
    from tokenizers import pre_tokenizers

    tok = models.tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok._llmft_local = None
    assert not scoring.tokens._local_tokenizer(tok)
    ev, pool = _frames(80, 40)
    prefix = patterns.build_prefix(GPT3, data.sample_demonstrations(pool, 8, seed=3))
    queries = [patterns.query_text(GPT3, p, h, True) for p, h in zip(ev.premise, ev.hypothesis)]
    assert scoring.split_prefix(tok, prefix, queries) == _whole_split(tok, prefix, queries)
    tok = models.tiny_tokenizer()
    real = scoring.tokens._tok
    monkeypatch.setattr(scoring.tokens, "_tok", lambda t, texts, special: [ids[:-1] if not special and len(texts) > 1 else ids
                                                                  for ids in real(t, texts, special)])
    assert scoring.tokens._tail_split(tok, prefix, real(tok, [prefix], True)[0], queries) is None


def test_build_rows_is_cached_by_texts_and_tokenizer(monkeypatch):
    """Scoring the same queries again reuses their tokenisation; another text, verbalizer or tokenizer
    object does not."""
    tok, other = models.tiny_tokenizer(), models.tiny_tokenizer()
    calls = []
    real = scoring.tokens._build_rows
    monkeypatch.setattr(scoring.tokens, "_build_rows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(scoring.tokens, "_rows_cache", [])
    qs = ["A cat sat. question: a cat? Yes or No? answer:", "A dog ran. question: a dog? Yes or No? answer:"]
    first = scoring.build_rows(tok, "", qs, GPT3.verbalizers)
    assert scoring.build_rows(tok, "", list(qs), GPT3.verbalizers) is first and len(calls) == 1
    scoring.build_rows(tok, "", [qs[0], qs[1] + " "], GPT3.verbalizers)
    scoring.build_rows(tok, "x", qs, GPT3.verbalizers)
    scoring.build_rows(tok, "", qs, (" True", " False"))
    scoring.build_rows(other, "", qs, GPT3.verbalizers)
    assert len(calls) == 5
    assert scoring.build_rows(tok, "", qs, GPT3.verbalizers) is first and len(calls) == 5


@pytest.mark.parametrize("which", ["tiny-bos", "smollm2"])
def test_continuations_from_distinct_tails_equal_whole_context_encoding(which, smollm2_tokenizer, monkeypatch):
    """continuation_ids encodes only the distinct tails of the contexts with each verbalizer (one tail for
    a whole evaluation set) and gets what whole-context encoding gets, for every pattern; a verbalizer
    that merges with the prompt's end is still refused."""
    tok = {"tiny-bos": models.tiny_tokenizer(add_bos=True), "smollm2": smollm2_tokenizer}[which]
    ev, _ = _frames(80, 10)
    calls = []
    real = scoring.tokens._continuation_ids
    monkeypatch.setattr(scoring.tokens, "_continuation_ids", lambda t, ctx, v: calls.append(len(ctx)) or real(t, ctx, v))
    for pattern in patterns.PATTERNS:
        pat = patterns.get_pattern(pattern)
        ctx = [patterns.query_text(pat, p, h, False) for p, h in zip(ev.premise, ev.hypothesis)] + ["Ünï 12 ?  x:"]
        calls.clear()
        assert scoring.continuation_ids(tok, ctx, pat.verbalizers) == real(tok, ctx, pat.verbalizers)
        assert len(calls) == 2 and calls[1] <= scoring.tokens.FAST_SPLIT_CHECK  # the distinct tails, then the check
        if pattern == "gpt-3":  # every prompt ends "... Yes or No? answer:": one tail (+ the odd context's)
            assert calls[0] <= 2
    with pytest.raises(ValueError, match="merges with the end of the prompt"):
        scoring.continuation_ids(tok, ["Is it so? answer: Y"] * 70, ("es",))


def test_scoring_and_teacher_targets_sharded_over_two_processes_equal_one_process(tmp_path):
    """Under torchrun (2 processes, gloo), every process scores its share of the batches and gets all results
    back in query order: bit for bit the log-probs, predictions, top-1 tokens, teacher targets and token
    count of one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("shard_worker.py")
    got = {}
    for n in (1, 2):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                            str(worker), str(tmp_path / f"{n}.pt")], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        got[n] = torch.load(tmp_path / f"{n}.pt", weights_only=False)
    one, two = got[1], got[2]
    assert one["world"] == 1 and two["world"] == 2
    np.testing.assert_array_equal(two["logp"], one["logp"])  # bit for bit: every batch is one process's batch
    assert (two["pred"] == one["pred"]).all() and (two["top1"] == one["top1"]).all()
    assert torch.equal(two["teacher_logp"], one["teacher_logp"])
    assert torch.equal(two["teacher_ids"], one["teacher_ids"]) and two["tokens"] == one["tokens"]
    assert torch.equal(two["lone"], one["lone"])  # fewer batches than processes


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_contextual_and_batch_calibration_by_hand(tiny_lms, arch):
    """Calibrate Before Use, recomputed with plain forwards: each content-free input ("N/A", "", "[MASK]" in
    both slots) after the demonstrations, the softmax over the two verbalizer tokens at the answer position,
    averaged; the calibrated prediction is argmax p(y|x) / q(y). Batch calibration divides by the mean of
    p(·|x) over the evaluation queries instead. Both match ``scoring.evaluation.evaluate``'s columns."""
    from llmft_utils import calibration

    lm = tiny_lms[arch]
    ev, pool = _frames(12)
    demos = data.sample_demonstrations(pool, 4, 0)
    m, preds = scoring.evaluate(lm, ev, GPT3, demos, progress=False, extras=("calibration",))
    prefix = patterns.build_prefix(GPT3, demos)
    vids = [lm.tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in GPT3.verbalizers]

    def label_probs(text):
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, -1, vids].double()
        return torch.softmax(logits, -1).numpy()

    q = np.mean([label_probs(prefix + patterns.query_text(GPT3, c, c, True)) for c in calibration.CONTENT_FREE], 0)
    p = np.stack([label_probs(prefix + patterns.query_text(GPT3, a, b, True)) for a, b in zip(ev.premise, ev.hypothesis)])
    np.testing.assert_array_equal(preds["pred_contextual"], (p / q).argmax(1))
    assert m["prior_label1_contextual"] == pytest.approx(q[1], abs=1e-5)
    assert m["score_acc_contextual"] == ((p / q).argmax(1) == ev["label"].to_numpy()).mean()
    qb = p.mean(0)
    np.testing.assert_array_equal(preds["pred_batch"], (p / qb).argmax(1))
    assert m["prior_label1_batch"] == pytest.approx(qb[1], abs=1e-5)
    # batch calibration moves the threshold to where the mean answer is uniform: both labels get predicted
    assert 0 < m["pred_label1_frac_batch"] < 1


def test_evaluate_extras_are_what_it_measures_besides_the_scores():
    """``extras``: the memory probe and the calibrated columns only when asked for; an unknown name is refused
    before anything is scored."""
    tok = models.tiny_tokenizer()
    lm = models.wrap(models.tiny_model("llama", tok), tok)
    ev, pool = _frames(4)
    demos = data.sample_demonstrations(pool, 2, 0)
    plain, _ = scoring.evaluate(lm, ev, GPT3, demos, progress=False, extras=())
    both, _ = scoring.evaluate(lm, ev, GPT3, demos, progress=False)
    assert "score_acc_contextual" in both and "score_acc_contextual" not in plain
    assert both["mem_tensors_peak_mb"] > 0 and not plain["mem_tensors_peak_mb"] > 0
    assert plain["score_acc"] == both["score_acc"]
    with pytest.raises(ValueError, match="unknown extras.*calibrate"):
        scoring.evaluate(lm, ev, GPT3, demos, progress=False, extras=("calibrate",))
