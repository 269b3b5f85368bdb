import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import toy_data

from llmft_utils import data, distill, models, patterns, scoring, stats
from llmft_utils.study import cd_sweep, icl_sweep, paired
from llmft_utils.study.plan import CDPlan, EnsembleSpec, EvalOptions, ICLPlan

GPT3 = patterns.get_pattern("gpt-3")
REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"


def _logp(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


# ----------------------------------------------------------------------------- losses

def test_identical_inputs_give_zero():
    t = torch.log_softmax(torch.randn(4, 7, dtype=torch.float64), -1)
    for fn in (distill.forward_kl, distill.reverse_kl, distill.generalized_jsd):
        assert float(fn(t, t)) == pytest.approx(0.0, abs=1e-12)


def test_forward_kl_reference_and_kl_div():
    s, t = _logp([0.9, 0.1]), _logp([0.5, 0.5])
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(teacher || student) = 0.5108
    assert float(distill.forward_kl(s, t)) == pytest.approx(want, abs=1e-12)
    s, t = torch.log_softmax(torch.randn(5, 11), -1), torch.log_softmax(torch.randn(5, 11), -1)
    ref = F.kl_div(s, t, log_target=True, reduction="batchmean")
    assert float(distill.forward_kl(s, t)) == pytest.approx(float(ref), rel=1e-5)


def test_reverse_kl_swaps_arguments():
    s, t = torch.log_softmax(torch.randn(3, 6), -1), torch.log_softmax(torch.randn(3, 6), -1)
    assert float(distill.reverse_kl(s, t)) == pytest.approx(float(distill.forward_kl(t, s)), rel=1e-6)
    ref = F.kl_div(t, s, log_target=True, reduction="batchmean")
    assert float(distill.reverse_kl(s, t)) == pytest.approx(float(ref), rel=1e-5)


def test_jsd_symmetric_bounded_and_reference():
    s, t = torch.log_softmax(torch.randn(3, 6, dtype=torch.float64), -1), torch.log_softmax(torch.randn(3, 6, dtype=torch.float64), -1)
    a, b = distill.generalized_jsd(s, t, 0.5), distill.generalized_jsd(t, s, 0.5)
    assert float(a) == pytest.approx(float(b), rel=1e-9) and 0 < float(a) <= math.log(2)
    # disjoint supports reach the bound log 2
    s2, t2 = _logp([1 - 1e-15, 1e-15]), _logp([1e-15, 1 - 1e-15])
    assert float(distill.generalized_jsd(s2, t2)) == pytest.approx(math.log(2), abs=1e-9)
    m = 0.3 * t.exp() + 0.7 * s.exp()
    ref = 0.3 * (t.exp() * (t - m.log())).sum(-1) + 0.7 * (s.exp() * (s - m.log())).sum(-1)
    assert float(distill.generalized_jsd(s, t, 0.3)) == pytest.approx(float(ref.mean()), rel=1e-9)
    with pytest.raises(ValueError, match="beta"):
        distill.generalized_jsd(s, t, 0.0)


def test_temperature_scaling():
    zs, zt = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    T = 2.5
    teacher = torch.log_softmax(zt / T, -1)
    got = distill.distill_loss(zs, teacher, "forward_kl", T, "full")
    want = T * T * F.kl_div(torch.log_softmax(zs / T, -1), teacher, log_target=True, reduction="batchmean")
    assert float(got) == pytest.approx(float(want), rel=1e-6)  # the loss computes in float32
    # a higher temperature flattens both distributions: the unscaled divergence shrinks
    assert float(distill.distill_loss(zs, torch.log_softmax(zt / 10, -1), "forward_kl", 10, "full")) / 100 < \
        float(distill.distill_loss(zs, torch.log_softmax(zt, -1), "forward_kl", 1, "full"))


def test_topk_support_is_exact():
    z = torch.randn(3, 50, dtype=torch.float64)
    ids = torch.topk(z, 5).indices
    lp = torch.log_softmax(distill.support_logits(z, "topk", topk_ids=ids), -1)
    full = torch.softmax(z, -1)
    assert torch.allclose(lp[:, :5].exp(), full.gather(-1, ids))
    assert torch.allclose(lp[:, 5].exp(), 1 - full.gather(-1, ids).sum(-1))
    v = distill.support_logits(z, "verbalizer", verbalizer_ids=[3, 7])
    assert torch.equal(v, z[:, [3, 7]])


def test_topk_target_without_teacher_ids_says_what_to_do():
    with pytest.raises(ValueError, match="top-k token ids.*teacher_targets"):
        distill.support_logits(torch.randn(2, 50), "topk")


def test_the_recipe_default_lives_in_distill_config():
    """DistillConfig's defaults are the study's recipe: the CPU profiles state none of it (float32 training since bf16
    autocast failed its flip bar; only the gpu profile adds bf16 autocast), and recipe_params / config_from_params
    are inverses."""
    from llmft_utils.profiles import PROFILES
    from llmft_utils.study.plan import config_from_params, recipe_params

    for name in ("default", "qwen"):
        assert config_from_params(PROFILES[name]) == distill.DistillConfig(), name
    assert config_from_params(PROFILES["full"]) == distill.DistillConfig(epochs=2)
    assert config_from_params(PROFILES["gpu"]) == distill.DistillConfig(mixed_precision="bf16")
    cfg = distill.DistillConfig(target="full", topk=7, loss="jsd", temperature=2.0, alpha=0.5, epochs=3, batch_size=2,
                                lr=1e-3, lr_schedule="constant", mixed_precision="bf16", lora_r=4)
    assert config_from_params(recipe_params(cfg)) == cfg


def test_config_validation():
    with pytest.raises(ValueError, match="unknown target"):
        distill.DistillConfig(target="logits")
    with pytest.raises(ValueError, match="alpha"):
        distill.DistillConfig(target="verbalizer", alpha=1.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        distill.DistillConfig(target="verbalizer", lr_schedule="cosine")
    with pytest.raises(ValueError, match="mixed_precision"):
        distill.DistillConfig(target="verbalizer", mixed_precision="fp8")


def test_linear_schedule_warms_up_and_decays_to_zero():
    f = distill.training.lr_lambda("linear", 10, 0.2)  # 2 warm-up steps, then 8 decaying ones
    assert [round(f(t), 4) for t in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert f(10) == 0.0
    assert all(distill.training.lr_lambda("constant", 10, 0.2)(t) == 1.0 for t in range(10))
    g = distill.training.lr_lambda("linear", 4, 0.0)  # no warm-up
    assert [g(t) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_length_grouped_batches_cover_each_example_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=203).tolist()
    s = distill.training.LengthGroupedBatches(lengths, batch_size=8, seed=3, mega=4)
    e0, e1 = list(iter(s)), list(iter(s))
    for ep in (e0, e1):
        flat = [i for b in ep for i in b]
        assert sorted(flat) == list(range(203)) and len(ep) == len(s) == 26
    assert e0 != e1  # a new order every epoch ...
    assert distill.training.LengthGroupedBatches(lengths, 8, seed=3, mega=4).batches(0) == e0  # ... and deterministic

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)
    plain = [list(range(i, min(i + 8, 203))) for i in range(0, 203, 8)]
    assert padded(e0) < 0.8 * padded(plain)
    fixed = distill.training.LengthGroupedBatches(lengths, 8, shuffle=False, mega=1000)
    assert [i for b in fixed.batches(0) for i in b] == sorted(range(203), key=lambda i: -lengths[i])


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny():
    tok = models.tiny_tokenizer(add_bos=True)
    return models.wrap(models.tiny_model("llama", tok, max_positions=4096), tok, name="tiny-llama")


def _frames(n=12, n_pool=24, seed=0):
    return toy_data.frames(n, n_pool, seed, premise=(3, 16))


# ----------------------------------------------------------------------------- alignment regression

def test_answer_position_alignment_with_mixed_lengths(tiny):
    """Student prompts of very different lengths in one batch give each row its own answer logits."""
    ex, _ = _frames(6)
    ex.loc[0, "premise"] = " ".join(["doctor"] * 60)  # one much longer prompt
    rows = distill.student_examples(tiny.tokenizer, GPT3, ex, None, tiny.max_context)
    batch = distill.collate(rows, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        got = distill.answer_position_logits(tiny.model, batch)
        for i, r in enumerate(rows):
            alone = tiny.model(torch.tensor([r["input_ids"]])).logits[0, -1]
            assert torch.allclose(got[i], alone, atol=1e-4)


def test_teacher_long_prefix_vs_student_short_prompt(tiny, tmp_path):
    """Teacher prompts (k demos + query) are far longer than the student's; the loss uses each one's own
    answer position: batched teacher targets equal one-at-a-time full-prompt forwards."""
    ev, pool = _frames(5)
    demos = data.sample_demonstrations(pool, 8, seed=0)
    cfg = distill.DistillConfig(target="verbalizer")
    t = distill.teacher_targets(tiny, GPT3, demos, ev, cfg, batch_size=4)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    prefix = patterns.build_prefix(GPT3, demos)
    for i, (p, h) in enumerate(zip(ev.premise, ev.hypothesis)):
        ids = tiny.tokenizer(prefix + patterns.query_text(GPT3, p, h, True), return_tensors="pt").input_ids
        with torch.no_grad():
            z = tiny.model(ids).logits[0, -1, vids]
        assert torch.allclose(t["logp"][i], torch.log_softmax(z, -1), atol=1e-4)
        assert ids.shape[1] > 4 * len(tiny.tokenizer(patterns.query_text(GPT3, p, h, False)).input_ids)
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, t, tiny.max_context)
    batch = distill.collate(rows, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = distill.distill_loss(distill.answer_position_logits(tiny.model, batch), batch["teacher_logp"],
                                       verbalizer_ids=vids)
        singles = [distill.distill_loss(distill.answer_position_logits(tiny.model, distill.collate([r], 0)),
                                        distill.collate([r], 0)["teacher_logp"], verbalizer_ids=vids) for r in rows]
    assert float(batched) == pytest.approx(float(torch.stack(singles).mean()), abs=1e-5)


def test_teacher_ensemble_is_the_mixture_of_its_prompts_projected_like_one_teacher(tiny, tmp_path):
    """m demonstration sets: disjoint, set 0 = the single teacher's; one set gives the single teacher's targets;
    two sets give, for each target kind, the projection of the by-hand mean of the two prompts' distributions
    (mean of probabilities, or normalised mean of log-probabilities)."""
    ev, pool = _frames(5, n_pool=40)
    sets = data.demonstration_sets(pool, 4, 3, seed=1, exclude=[ev])
    keys = [set(d["idx"]) for d in sets]
    assert all(len(s_) == 4 for s_ in keys) and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert sets[0]["idx"].tolist() == data.sample_demonstrations(pool, 4, 1, exclude=ev)["idx"].tolist()
    assert [(d["label"] == 0).sum() for d in sets] == [2, 2, 2]
    with pytest.raises(data.DataError, match="set 3 of 3"):
        data.demonstration_sets(pool.head(10), 4, 3, seed=0)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)

    def full(demos):  # one prompt's full-vocabulary log-probs at the answer position, one query at a time
        prefix = patterns.build_prefix(GPT3, demos)
        out = []
        for p, h in zip(ev.premise, ev.hypothesis):
            ids = tiny.tokenizer(prefix + patterns.query_text(GPT3, p, h, True), return_tensors="pt").input_ids
            with torch.no_grad():
                out.append(torch.log_softmax(tiny.model(ids).logits[0, -1].double() / 2.0, -1))
        return torch.stack(out)

    a, b = full(sets[0]), full(sets[1])
    for target in ("topk", "verbalizer", "full"):
        cfg = distill.DistillConfig(target=target, topk=5, temperature=2.0)
        one = distill.teacher_targets(tiny, GPT3, sets[0], ev, cfg)
        ens1 = distill.teacher_targets(tiny, GPT3, sets[:1], ev, cfg)
        assert torch.allclose(ens1["logp"].float(), one["logp"].float(), atol=5e-3 if target == "full" else 1e-4)
        for combine, mix in (("prob", torch.logsumexp(torch.stack([a, b]), 0) - math.log(2)),
                             ("logprob", torch.log_softmax((a + b) / 2, -1))):
            got = distill.teacher_targets(tiny, GPT3, sets[:2], ev, cfg, combine=combine)
            if target == "topk":
                ids = torch.topk(mix, 5).indices
                want = torch.log_softmax(distill.support_logits(mix, "topk", topk_ids=ids), -1)
                assert torch.equal(got["topk_ids"], ids)
            elif target == "verbalizer":
                want = torch.log_softmax(mix[:, vids], -1)
            else:
                want = mix
            assert torch.allclose(got["logp"].double(), want, atol=5e-3 if target == "full" else 1e-4), (target, combine)
    # the combined rule itself, in log space
    lp = torch.log_softmax(torch.randn(3, 4, 7, dtype=torch.float64), -1)
    assert torch.allclose(distill.combine_logp(lp, "prob").exp(), lp.exp().mean(0).float(), atol=1e-6)
    assert torch.allclose(distill.combine_logp(lp[:1], "logprob"), lp[0].float(), atol=1e-6)
    with pytest.raises(ValueError, match="combine"):
        distill.teacher_targets(tiny, GPT3, sets[:2], ev, distill.DistillConfig(target="verbalizer"), combine="median")
    # the key: every set and the rule enter it; a single teacher's key is unchanged by the new arguments
    kw = dict(model=distill.TeacherModel("tiny"), task="rte", pattern="gpt-3", k=4, seed=1, examples=ev,
              cfg=distill.DistillConfig(target="verbalizer"))
    keys = {distill.teacher_cache_key(demos=sets[0], **kw), distill.teacher_cache_key(demos=sets[:1], **kw),
            distill.teacher_cache_key(demos=sets[:2], **kw), distill.teacher_cache_key(demos=sets[:2], combine="logprob", **kw),
            distill.teacher_cache_key(demos=sets[::-1][:2], **kw)}
    assert len(keys) == 5
    assert distill.teacher_cache_key(demos=sets[0], **kw) == distill.teacher_cache_key(demos=sets[0], combine="logprob", **kw)


# ----------------------------------------------------------------------------- cache

def test_teacher_cache_hit_and_invalidation(tiny, tmp_path):
    ev, pool = _frames(6)
    demos = data.sample_demonstrations(pool, 4, seed=0)
    cfg = distill.DistillConfig(target="topk", topk=5)
    key = lambda **kw: distill.teacher_cache_key(**{**dict(model=distill.TeacherModel("tiny"), task="rte", pattern="gpt-3",
                                                            k=4, seed=0, demos=demos, examples=ev, cfg=cfg), **kw})
    k0 = key()
    a = distill.teacher_targets(tiny, GPT3, demos, ev, cfg, distill.TeacherCache(tmp_path, k0))
    b = distill.teacher_targets(tiny, GPT3, demos, ev, cfg, distill.TeacherCache(tmp_path, k0))
    assert not a["cache_hit"] and b["cache_hit"]
    assert torch.equal(a["logp"], b["logp"]) and torch.equal(a["topk_ids"], b["topk_ids"])
    assert a["logp"].shape == (6, 6)  # top-5 + rest
    changed = [key(k=16), key(seed=1), key(demos=demos.iloc[::-1]), key(examples=ev.iloc[:5]),
               key(cfg=distill.DistillConfig(target="verbalizer")), key(cfg=distill.DistillConfig(target="topk", topk=5, temperature=2.0)),
               key(model=distill.TeacherModel("other")), key(model=distill.TeacherModel("tiny", "bfloat16")),
               key(model=distill.TeacherModel("tiny", device="cuda:0"))]
    assert len({k0, *changed}) == len(changed) + 1


# ----------------------------------------------------------------------------- training

def test_training_moves_student_towards_teacher_and_freezes_teacher(tiny):
    ev, pool = _frames(16)
    demos = data.sample_demonstrations(pool, 4, seed=0)
    cfg = distill.DistillConfig(target="verbalizer", epochs=8, batch_size=8, lr=3e-3)
    t = distill.teacher_targets(tiny, GPT3, demos, ev, cfg)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, t, tiny.max_context)
    before = distill.training.params_digest(tiny.model)
    student, stats = distill.train_student(tiny.model, tiny.tokenizer, rows, cfg, vids)
    assert distill.training.params_digest(tiny.model) == before  # the teacher is never the object trained
    assert distill.training.params_digest(student) != before
    assert stats["losses"][-1] < stats["losses"][0] / 2 and stats["steps"] == 16
    # LoRA adapters go into the copy too
    lcfg = distill.DistillConfig(target="verbalizer", epochs=1, batch_size=8, lr=1e-3, lora_r=4)
    student2, _ = distill.train_student(tiny.model, tiny.tokenizer, rows, lcfg, vids)
    assert distill.training.params_digest(tiny.model) == before and not hasattr(tiny.model, "peft_config")
    # bf16 autocast of the forward: the student still learns, its weights stay float32
    bcfg = distill.DistillConfig(target="verbalizer", epochs=8, batch_size=8, lr=3e-3, mixed_precision="bf16", group_by_length=False)
    student3, bstats = distill.train_student(tiny.model, tiny.tokenizer, rows, bcfg, vids)
    assert bstats["losses"][-1] < bstats["losses"][0] / 2
    assert all(p.dtype == torch.float32 for p in student3.parameters())


def test_activation_checkpointing_keeps_fewer_activations_and_gives_the_same_student(tiny, monkeypatch):
    """``checkpointing=True`` keeps far fewer activations for the backward pass (bytes of the tensors
    autograd saves during each forward, counted with a saved-tensors hook) and trains the same student:
    losses and weights equal those of a run that keeps every activation."""
    ev, pool = _frames(16)
    cfg = distill.DistillConfig(target="verbalizer", epochs=2, batch_size=8, lr=3e-3, mixed_precision="no")
    t = distill.teacher_targets(tiny, GPT3, data.sample_demonstrations(pool, 4, seed=0), ev, cfg)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, t, tiny.max_context)
    real = distill.answer_position_logits
    saved = []

    def counted(model, batch):
        n = [0]

        def pack(x):
            n[0] += x.numel() * x.element_size()
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = real(model, batch)
        saved.append(n[0])
        return out

    monkeypatch.setattr(distill.student_data, "answer_position_logits", counted)
    runs, kept = {}, {}
    for ckpt in (False, True):
        saved.clear()
        runs[ckpt] = distill.train_student(tiny.model, tiny.tokenizer, rows, cfg, vids, checkpointing=ckpt)
        kept[ckpt] = sum(saved) / len(saved)
    (plain, sp), (ck, sc) = runs[False], runs[True]
    assert kept[True] < kept[False] / 3, kept
    assert sc["losses"] == pytest.approx(sp["losses"], rel=1e-5, abs=1e-7) and sc["checkpointing"]
    for (n, a), (_, b) in zip(plain.named_parameters(), ck.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert not distill.training.checkpointing_on(ck)  # handed back like the base model: ready to evaluate


def test_training_attention_is_switched_for_training_only(tiny, monkeypatch):
    """On CPU the student trains with eager attention (``train_attention="auto"``) and is handed back,
    like the base model, with the model's own kernel, so that evaluation is the same code as notebook 02."""
    ev, _ = _frames(8)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, None, tiny.max_context)
    seen = []
    real = distill.answer_position_logits
    monkeypatch.setattr(distill.student_data, "answer_position_logits",
                        lambda m, b: seen.append(m.config._attn_implementation) or real(m, b))
    own = tiny.model.config._attn_implementation
    for choice, want in (("auto", "eager"), ("sdpa", "sdpa"), ("eager", "eager")):
        seen.clear()
        student, _ = distill.train_student(tiny.model, tiny.tokenizer, rows,
                                           distill.DistillConfig(target="verbalizer", alpha=1.0, epochs=1, train_attention=choice), vids)
        assert seen and set(seen) == {want}
        assert student.config._attn_implementation == own == tiny.model.config._attn_implementation
    with pytest.raises(ValueError, match="train_attention"):
        distill.DistillConfig(target="verbalizer", train_attention="flash")


def test_pbft_needs_no_teacher_and_nan_stops(tiny):
    ev, _ = _frames(8)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, None, tiny.max_context)
    _, stats = distill.train_student(tiny.model, tiny.tokenizer, rows, distill.DistillConfig(target="verbalizer", alpha=1.0, epochs=1), vids)
    assert stats["steps"] == 1 and np.isfinite(stats["losses"]).all()
    with pytest.raises(ValueError, match="teacher targets"):
        distill.train_student(tiny.model, tiny.tokenizer, rows, distill.DistillConfig(target="verbalizer", alpha=0.0), vids)
    bad = {"logp": torch.full((8, 2), float("nan")), "topk_ids": None}
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, bad, tiny.max_context)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        distill.train_student(tiny.model, tiny.tokenizer, rows, distill.DistillConfig(target="verbalizer"), vids)


def test_agreement_metrics():
    t = pd.DataFrame({"idx": [1, 2, 3, 4], "pred": [0, 0, 1, 1], "logp_label0": np.log([0.9, 0.8, 0.2, 0.4]),
                      "logp_label1": np.log([0.1, 0.2, 0.8, 0.6]), "skipped": False})
    same = paired.agreement(t, t)
    assert same["agreement"] == 1.0 and same["kappa"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-12)
    o = t.assign(pred=[0, 1, 1, 0])[::-1]  # order does not matter: aligned by idx
    r = paired.agreement(t, o)
    assert r["agreement"] == 0.5 and r["kappa"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- two processes (gloo)

def _torchrun(nproc, out, batch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(worker), str(out), str(batch)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_two_process_losses_match_single_process(tmp_path):
    """DDP over gloo with 2 processes × batch 4 follows the same loss curve as 1 process × batch 8."""
    import json

    _torchrun(1, tmp_path / "one.json", 8)
    _torchrun(2, tmp_path / "two.json", 4)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["world"] == 1 and two["world"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 4
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, atol=1e-5)
    assert one["losses"][-1] < one["losses"][0]


# ----------------------------------------------------------------------------- the notebook-03 sweep

def test_cd_sweep_end_to_end_rows_predictions_and_training_log(tmp_path):
    lm, out = toy_data.results_folder(tmp_path, n=8, max_positions=512, n_pool=40)
    icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0, 2, 4], [0]), EvalOptions(progress=False))
    cfg = distill.DistillConfig(target="verbalizer", epochs=2, batch_size=4, lr=1e-3)
    rows = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2, 4], [0], 8, 2, cfg, 1), EvalOptions(progress=False))
    assert sorted(rows["method"]) == ["cd", "cd", "pbft"] and rows["n_eval"].eq(8).all()
    cd = rows[(rows["method"] == "cd") & (rows["k"] == 2)].iloc[0]
    # one transfer set per seed, whatever k (no "CD vs k" confound), disjoint from both k's demonstrations
    assert rows.loc[rows["method"] == "cd", "train_ids_digest"].nunique() == 1
    assert rows.loc[rows["method"] == "pbft", "train_ids_digest"].iloc[0] != cd["train_ids_digest"]
    assert 0 <= cd["agree_teacher_student"] <= 1 and cd["kl_teacher_student"] >= 0
    assert all((out / f).is_file() for f in rows["predictions_file"])
    # controls and paired tests: the constant control is the teacher's majority-label share; McNemar's
    # discordant counts give the accuracy difference on the same examples
    icl_rows = pd.read_csv(out / "icl.csv")
    teacher = pd.read_parquet(out / icl_rows[icl_rows["k"] == 2]["predictions_file"].iloc[0])
    assert cd["agree_teacher_constant"] == teacher["pred"].value_counts().max() / len(teacher)
    zero = pd.read_parquet(out / icl_rows[icl_rows["k"] == 0]["predictions_file"].iloc[0])
    assert cd["agree_teacher_bias_matched"] == stats.bias_matched_agreement(teacher, zero)
    wins = [cd["agree_teacher_student"] > cd[f"agree_teacher_{c}"] and cd[f"mcnemar_p_vs_{c}_control"] < 0.05
            for c in ("constant", "bias_matched")]
    assert cd["beats_controls"] == all(wins)
    for _, r in rows.iterrows():
        n = r["n_eval"]
        assert r["student_only_right_vs_zeroshot"] - r["zeroshot_only_right"] == round(n * (r["score_acc"] - r["zeroshot_acc"]))
        assert 0 < r["mcnemar_p_vs_zeroshot"] <= 1
        assert r["balanced_acc"] == pytest.approx((r["acc_label0"] + r["acc_label1"]) / 2) and 0 <= r["ece"] <= 1
    assert cd["student_only_right_vs_teacher"] - cd["teacher_only_right"] == round(8 * (cd["score_acc"] - cd["teacher_acc"]))
    pb = rows[rows["method"] == "pbft"].iloc[0]  # PBFT trains first: every CD row carries the paired test against it
    assert cd["student_only_right_vs_pbft"] - cd["pbft_only_right"] == round(8 * (cd["score_acc"] - pb["score_acc"]))
    assert 0 < cd["mcnemar_p_vs_pbft"] <= 1 and np.isnan(pb.get("mcnemar_p_vs_pbft", np.nan))
    log = pd.read_csv(out / "train_log.csv")
    assert log.groupby("student").size().to_dict() == {k.rsplit("|", 2)[0]: n for k, n in
                                                       zip(rows["run_key"], rows["train_steps"])}
    cd_log = log[log["student"] == cd["run_key"].rsplit("|", 2)[0]]
    assert cd_log["loss"].iloc[0] == pytest.approx(cd["loss_first"]) and cd_log["loss"].iloc[-1] == pytest.approx(cd["loss_last"])
    assert np.isfinite(cd_log[["loss", "lr", "grad_norm"]].to_numpy()).all() and (cd_log["grad_norm"] > 0).all()
    assert cd_log["lr"].max() == pytest.approx(1e-3)  # the linear schedule peaks at cfg.lr
    again = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2], [0], 8, 2, cfg, 1), EvalOptions(force=True, progress=False))
    assert len(pd.read_csv(out / "train_log.csv")) == len(log) and len(again) == 2  # a rerun replaces, never adds
    # every row's first columns (study/rows.py and the sweeps) in the order of the committed reference run; later
    # columns depend on which comparisons a table's rows have
    for table, last in (("icl.csv", "predictions_file"), ("cd.csv", "zeroshot_acc")):
        fresh, ref = (list(pd.read_csv(f / table, nrows=0).columns) for f in (out, REFERENCE))
        assert fresh[:fresh.index(last) + 1] == ref[:ref.index(last) + 1], table


def test_control_students_shuffled_and_self_and_the_cd_rows_tested_against_them(tmp_path, monkeypatch):
    """controls=["shuffled", "self"]: per seed a cd_self student (k = 0 teacher: the zero-shot model's own
    targets) and a cd_shuffled one (the largest k's targets permuted across the same transfer queries), both
    trained before CD with its recipe; the CD row at that k is tested against them (agreement with the teacher
    from their prediction files, exact McNemar, beats_controls over all four controls); a rerun resumes."""
    lm, out = toy_data.results_folder(tmp_path, n=8, max_positions=512, n_pool=40)
    icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0, 2, 4], [0]), EvalOptions(progress=False))
    cfg = distill.DistillConfig(target="verbalizer", epochs=1, batch_size=4, lr=1e-3)
    seen = []
    real = distill.student_examples
    monkeypatch.setattr(distill.student_data, "student_examples", lambda tok, pat, ex, teach, mc: seen.append(teach) or real(tok, pat, ex, teach, mc))
    rows = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2, 4], [0], 8, 0, cfg, 1, controls=["shuffled", "self"]), EvalOptions(progress=False))
    assert list(rows["method"]) == ["cd_self", "cd_shuffled", "cd", "cd"]
    assert rows["train_ids_digest"].nunique() == 1  # one transfer set for the controls and every k
    self_t, shuf_t, cd2_t, cd4_t = seen
    assert not torch.equal(shuf_t["logp"], cd4_t["logp"])  # permuted ...
    assert torch.equal(shuf_t["logp"].sort(0).values, cd4_t["logp"].sort(0).values)  # ... the same targets
    assert not torch.allclose(self_t["logp"], cd4_t["logp"])  # k = 0: the zero-shot model's own distribution
    assert rows.loc[rows["method"] == "cd_self", "k"].item() == 0
    ctl = rows.set_index("method")
    assert ctl.loc["cd_self", "controls_k"] == 4 and ctl.loc["cd_shuffled", "controls_k"] == 4
    cd4 = rows[(rows["method"] == "cd") & (rows["k"] == 4)].iloc[0]
    cd2 = rows[(rows["method"] == "cd") & (rows["k"] == 2)].iloc[0]
    assert cd4["controls_checked"] == "constant;bias_matched;shuffled;self"
    assert cd2["controls_checked"] == "constant;bias_matched;self"  # shuffled is trained at the largest k only
    icl_rows = pd.read_csv(out / "icl.csv")
    teacher = pd.read_parquet(out / icl_rows[icl_rows["k"] == 4]["predictions_file"].iloc[0]).set_index("idx")
    for name, method in (("shuffled", "cd_shuffled"), ("self", "cd_self")):
        c = pd.read_parquet(out / ctl.loc[method, "predictions_file"]).set_index("idx").loc[teacher.index]
        assert cd4[f"agree_teacher_{name}"] == (c["pred"] == teacher["pred"]).mean()
        assert cd4[f"agree_teacher_{name}"] == ctl.loc[method, "agree_teacher_student"]  # its own row says the same
        assert 0 < cd4[f"mcnemar_p_vs_{name}_control"] <= 1 and cd4[f"kl_teacher_{name}"] >= 0
    wins = [cd4["agree_teacher_student"] > cd4[f"agree_teacher_{c}"] and cd4[f"mcnemar_p_vs_{c}_control"] < 0.05
            for c in ("constant", "bias_matched", "shuffled", "self")]
    assert cd4["beats_controls"] == all(wins)
    from llmft_utils.analysis import tables

    dist = tables.distribution_checks(tables.unify(icl_rows, rows), out)  # in distribution, per example
    d4 = dist[dist["k"] == 4].iloc[0]
    assert d4["kl_student"] == pytest.approx(cd4["kl_teacher_student"]) and len(dist) == 2
    d2 = dist[dist["k"] == 2].iloc[0]  # no control students at k=2: the teacher-mean constant only
    assert np.isnan(d2["kl_shuffled"]) and d2["kl_teacher_mean"] >= 0 and 0 <= d2["kl_p_vs_teacher_mean"] <= 1
    for name in ("shuffled", "self"):
        assert d4[f"kl_{name}"] == pytest.approx(cd4[f"kl_teacher_{name}"]) and 0 <= d4[f"kl_p_vs_{name}"] <= 1
        assert d4[f"closer_than_{name}"] == (d4["kl_student"] < d4[f"kl_{name}"] and d4[f"kl_p_vs_{name}"] < 0.05)
    cal = tables.calibrated_checks(tables.unify(icl_rows, rows), out)  # paired tests after calibration
    c4 = cal[(cal["a"] == "cd") & (cal["b"] == "cd_shuffled") & (cal["calibration"] == "batch")].iloc[0]
    assert c4["acc_a"] == pytest.approx(cd4["score_acc_batch"]) and c4["k"] == 4
    assert c4["acc_b"] == pytest.approx(ctl.loc["cd_shuffled", "score_acc_batch"])
    assert round(c4["n"] * (c4["acc_a"] - c4["acc_b"])) == c4["only_a"] - c4["only_b"]
    assert set(cal["b"]) == {"zero-shot", "cd_shuffled", "cd_self"}  # no PBFT in this sweep
    seen.clear()
    again = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2, 4], [0], 8, 0, cfg, 1, controls=["shuffled", "self"]), EvalOptions(progress=False))
    assert not seen and len(again) == 4  # resumed: nothing retrained
    with pytest.raises(ValueError, match="controls"):
        cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [4], [0], 8, 0, cfg, 1, controls=["gold"]), EvalOptions(progress=False))


def test_teacher_ensemble_sweep_rows_inference_and_student_against_single_prompt(tmp_path, monkeypatch):
    """ensemble_m=3: per (task, k, seed) an icl_ensemble row (m prompts at inference, combined by hand from its
    members here) and a cd_ensemble student distilling the same ensemble on CD's transfer set; the three sets are
    disjoint, set 0 is the ICL/CD teacher's, none meets the transfer set; the student is tested against its
    ensemble teacher, single-prompt CD and the largest-k ICL run; a rerun resumes."""
    lm, out = toy_data.results_folder(tmp_path, n=8, max_positions=1024, n_pool=60)
    icl_rows = icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0, 2, 4], [0]), EvalOptions(progress=False))
    cfg = distill.DistillConfig(target="verbalizer", epochs=1, batch_size=4, lr=1e-3)
    seen = []
    real = distill.teacher_targets
    monkeypatch.setattr(distill.teacher, "teacher_targets", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    rows = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2], [0], 8, 0, cfg, 1, controls=["self"], ensemble=EnsembleSpec(m=3, ks=[2], combine="prob")), EvalOptions(progress=False))
    assert list(rows["method"]) == ["cd_self", "cd", "icl_ensemble", "cd_ensemble"]
    ens, student, cd = (rows[rows["method"] == m].iloc[0] for m in ("icl_ensemble", "cd_ensemble", "cd"))
    sets = [s_.split(";") for s_ in ens["demo_ids"].split("|")]
    assert len(sets) == 3 and all(len(s_) == 2 for s_ in sets) and len(set(sum(sets, []))) == 6
    single = icl_rows[(icl_rows["k"] == 2)].iloc[0]
    assert sets[0] == str(single["demo_ids"]).split(";") and student["demo_ids"] == ens["demo_ids"]
    assert student["train_ids_digest"] == cd["train_ids_digest"]  # the same transfer queries as single-prompt CD
    teacher_call = [c for c in seen if isinstance(c[0][2], list)]
    assert len(teacher_call) == 1 and teacher_call[0][1]["combine"] == "prob"
    train_ids = set(map(str, teacher_call[0][0][3]["idx"]))
    assert not train_ids & set(sum(sets, []))
    # the ensemble at inference, by hand: each member scored alone, probabilities averaged
    ev = data.read_split(out, data.load_manifest(out)["eval_sets"]["toy/validation"])
    pool = data.read_split(out, data.load_manifest(out)["demo_pools"]["toy/train"])
    pool = pool.set_index(pool["idx"].astype(str), drop=False)
    member_lp = []
    for ids in sets:
        _, p = scoring.evaluate(lm, ev, GPT3, pool.loc[ids], progress=False, extras=())
        member_lp.append(p[["logp_label0", "logp_label1"]].to_numpy())
    mix = np.log(np.mean(np.exp(member_lp), 0))
    got = pd.read_parquet(out / ens["predictions_file"])
    np.testing.assert_allclose(got[["logp_label0", "logp_label1"]].to_numpy(), mix, atol=1e-5)
    for j, lp in enumerate(member_lp):  # each member's own answers are stored with the ensemble's
        np.testing.assert_allclose(got[[f"member{j}_logp_label0", f"member{j}_logp_label1"]].to_numpy(), lp, atol=1e-5)
        assert (got[f"member{j}_pred"].to_numpy() == lp.argmax(1)).all()
    rates = [(lp.argmax(1) == 1).mean() for lp in member_lp]
    assert (ens["member_label1_frac_min"], ens["member_label1_frac_max"]) == pytest.approx((min(rates), max(rates)))
    assert ens["score_acc"] == (mix.argmax(1) == ev["label"].to_numpy()).mean()
    assert ens["ensemble_m"] == 3 and ens["member0_reused"] and ens["icl_k"] == 4
    assert ens["wall_s"] > single["wall_s"]  # m prompts cost more than one
    # the student: its teacher is the ensemble row, and it is tested against single-prompt CD and ICL
    sp = pd.read_parquet(out / student["predictions_file"]).set_index("idx")
    assert student["agree_teacher_student"] == (sp["pred"] == got.set_index("idx").loc[sp.index, "pred"]).mean()
    assert student["teacher_acc"] == ens["score_acc"] and student["icl_k"] == 4
    for other in ("teacher", "cd", "icl", "zeroshot"):
        assert 0 < student[f"mcnemar_p_vs_{other}"] <= 1
    assert student["controls_checked"] == "constant;bias_matched;self"
    # the summary names them, and counts the paired tests against single-prompt CD and ICL
    from llmft_utils.analysis import tables

    runs = tables.unify(pd.read_csv(out / "icl.csv"), rows)
    assert {"ICL ensemble 3x2", "CD ensemble 3x2"} <= set(runs["method_label"])
    summ = tables.summary_table(runs)
    s_row = summ[summ["method_label"] == "CD ensemble 3x2"].iloc[0]
    assert s_row["n_seeds_tested_cd"] == 1 and s_row["n_seeds_tested_icl"] == 1
    chk = tables.ensemble_checks(runs).iloc[0]  # the ICL accuracy beside the tests is that of the run they used
    k4 = icl_rows[icl_rows["k"] == 4].iloc[0]
    assert chk["icl_k"] == 4 and chk["acc_icl"] == k4["score_acc"] and chk["acc_icl_batch"] == k4["score_acc_batch"]
    assert chk["p_cd_ensemble_vs_icl"] == student["mcnemar_p_vs_icl"]
    again = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2], [0], 8, 0, cfg, 1, controls=["self"], ensemble=EnsembleSpec(m=3, ks=[2], combine="prob")), EvalOptions(progress=False))
    assert len(again) == 4 and len(pd.read_csv(out / "cd.csv")) == 4  # resumed, nothing added
    with pytest.raises(ValueError, match="ensemble_m"):
        cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2], [0], 8, 0, cfg, 1, ensemble=EnsembleSpec(m=1, ks=[2])), EvalOptions(progress=False))


def test_training_log_rows():
    stats = {"losses": [1.0, 0.9, 0.8, 0.7], "lrs": [1e-3, 5e-4], "grad_norms": [2.0, 1.5]}
    log = pd.DataFrame(distill.training.training_log("s", stats, grad_accum=2))
    assert list(log["batch"]) == [0, 1, 2, 3] and list(log["loss"]) == [1.0, 0.9, 0.8, 0.7]
    assert np.isnan(log["lr"][0]) and log["lr"][1] == 1e-3 and log["grad_norm"][3] == 1.5


def test_saved_students_load_with_transformers_alone_and_reproduce_their_rows(tmp_path):
    """save_students="all": every student is a Hugging Face folder (weights, tokenizer, student.json, model
    card) that AutoModelForCausalLM/AutoTokenizer load with no help from this kit and that gives its row's
    accuracy and per-example predictions exactly; "first" keeps only the first seed's CD student with the
    most demonstrations per task; a forced rerun replaces the folder, never adds one."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmft_utils import data, distill, models, patterns

    lm, out = toy_data.results_folder(tmp_path, n=8, max_positions=512, n_pool=40)
    icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0, 2, 4], [0, 1]), EvalOptions(progress=False))
    cfg = distill.DistillConfig(target="verbalizer", epochs=2, batch_size=4, lr=1e-3)
    rows = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2], [0], 8, 2, cfg, 1, save_students="all"), EvalOptions(progress=False))
    assert rows["student_dir"].str.startswith("students/").all()
    ev = data.read_split(out, data.load_manifest(out)["eval_sets"]["toy/validation"])
    for _, row in rows.iterrows():
        folder = out / row["student_dir"]
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        m, preds = scoring.evaluate(models.wrap(model, tok, name="loaded"), ev, patterns.get_pattern("gpt-3"), ev.iloc[0:0],
                                progress=False)
        assert m["score_acc"] == row["score_acc"]
        pd.testing.assert_frame_equal(preds, pd.read_parquet(out / row["predictions_file"]))
        info = json.loads((folder / "student.json").read_text())
        assert info["student_key"] == row["run_key"].rsplit("|", 2)[0] and info["method"] == row["method"]
        assert info["metrics"]["toy/validation"]["score_acc"] == row["score_acc"]
        card = (folder / "README.md").read_text()
        assert f"{row['score_acc']:.4f}" in card and "from_pretrained" in card and info["demo_ids"]
    cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2], [0], 8, 2, cfg, 1, save_students="all"), EvalOptions(force=True, progress=False))
    assert len(list((out / "students").iterdir())) == 2  # replaced, no leftovers
    plan = [(m, "toy", k, s) for s in (0, 1) for m, k in (("cd", 2), ("cd", 4), ("pbft", 2))]
    chosen = [p for p in plan if distill.export.should_save("first", *p, plan)]
    assert chosen == [("cd", "toy", 4, 0)]
    assert [p for p in plan if distill.export.should_save("first_seed", *p, plan)] == plan[:3]
    assert not any(distill.export.should_save("none", *p, plan) for p in plan)


def test_launched_cd_step_on_two_processes_writes_the_rows_of_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m llmft_utils.train`` (gloo, CPU): every process computes, teacher caching
    and evaluation are sharded, students train data-parallel (2 × batch 4 = one process's batch 8), and
    only the main process writes: the same rows (no duplicates), the same teacher caches and the same
    student predictions as one process running the same step."""
    import os
    import shutil
    import subprocess
    import sys

    from llmft_utils import data as d

    tok = models.tiny_tokenizer()
    model_dir = tmp_path / "tiny"
    models.tiny_model("llama", tok, seed=0, max_positions=2048).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    one = tmp_path / "one"
    d.prepare_study_data(one, d.STUDY_EVAL_SETS, {"mnli": 16, "rte": 8, "hans": 30}, seed=0)
    lm = models.load_model(str(model_dir), device="cpu")
    icl_sweep.run_sweep(lm, one, ICLPlan("gpt-3", [0, 4], [0]), EvalOptions(model_name=str(model_dir), progress=False))
    two = tmp_path / "two"
    shutil.copytree(one, two)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--profile", "smoke", "--set", f"model={model_dir}", "--set", "cd_tasks=['rte']",
              "--set", "ood_train_tasks=['rte']", "--set", "n_transfer=8", "--set", "lr=0.001"]
    for folder, launch, batch in ((one, [], 8), (two, ["-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node=2"], 4)):
        cmd = [sys.executable, *launch, "-m", "llmft_utils.train", *common, "--set", f"results_dir={folder}",
               "--set", f"train_batch_size={batch}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = pd.read_csv(one / "cd.csv"), pd.read_csv(two / "cd.csv")
    assert len(a) == len(b) == 4 and b["run_key"].is_unique  # cd + pbft on rte, each in domain and on HANS
    assert (a["n_processes"] == 1).all() and (b["n_processes"] == 2).all()
    assert sorted(os.listdir(two / "teacher_cache")) != [] and len(os.listdir(two / "teacher_cache")) == 1
    ta = torch.load(next((one / "teacher_cache").iterdir()), weights_only=True)
    tb = torch.load(next((two / "teacher_cache").iterdir()), weights_only=True)
    assert torch.equal(tb["logp"], ta["logp"])  # the sharded teacher cache is the single-process one, bit for bit
    key = ["method", "task", "k", "seed"]
    for (_, ra), (_, rb) in zip(a.sort_values(key).iterrows(), b.sort_values(key).iterrows()):
        pa, pb = (pd.read_parquet(f / r["predictions_file"]) for f, r in ((one, ra), (two, rb)))
        assert (pa["pred"] == pb["pred"]).mean() >= 0.9 and ra["n_eval"] == rb["n_eval"]
        # bf16 autocast, gradients summed in another order, 8 steps at lr 1e-3 on a random model: measured
        # 2.3e-3 at most with the top-k target (1e-3 with the verbalizer target)
        np.testing.assert_allclose(pb[["logp_label0", "logp_label1"]], pa[["logp_label0", "logp_label1"]], atol=5e-3)


def test_experiment_tracker_gets_every_step_and_missing_trackers_fail_early():
    """log_with: an accelerate tracker receives loss, lr and gradient norm at every optimizer step (the
    numbers of the training log); an unknown or uninstalled tracker is refused before training."""
    from accelerate.tracking import GeneralTracker

    class Collect(GeneralTracker):
        name, requires_logging_directory = "collect", False

        def __init__(self):
            super().__init__()
            self.logged, self.config = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kw):
            self.logged.append((step, dict(values)))

    tok = models.tiny_tokenizer()
    base = models.tiny_model("llama", tok, seed=0)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": tok(f"The cat sat {'on ' * (i % 3)}question: A cat . Yes or No? answer:").input_ids,
             "label": i % 2, "teacher_logp": torch.log_softmax(torch.randn(2, generator=g), -1)} for i in range(8)]
    vids = [tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")]
    cfg = distill.DistillConfig(target="verbalizer", epochs=2, batch_size=4, lr=1e-3)
    tracker = Collect()
    _, st = distill.train_student(base, tok, rows, cfg, vids, tracking=distill.Tracking(tracker, "cd|x"))
    assert [s for s, _ in tracker.logged] == list(range(4)) and tracker.config["lr"] == 1e-3
    assert [v["loss"] for _, v in tracker.logged] == st["losses"]
    assert [v["grad_norm"] for _, v in tracker.logged] == st["grad_norms"]
    with pytest.raises(ValueError, match="unknown tracker"):
        distill.train_student(base, tok, rows, cfg, vids, tracking=distill.Tracking("tensorbored"))
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            distill.train_student(base, tok, rows, cfg, vids, tracking=distill.Tracking("tensorboard"))


def test_two_process_fsdp2_matches_single_process(tmp_path):
    """``accelerate launch --config_file configs/fsdp.yaml`` with 2 CPU processes (gloo): FSDP2 really shards
    the student (every parameter of the prepared model is a DTensor split over a 2-process mesh), trains
    with the loss curve and gradient norms (clipping at 5 is active) of 1 process × batch 8 without FSDP,
    and ``train_student`` hands back a plain float32 module with the same whole weights on both processes,
    equal to the single-process student.

    What is patched, in tests/fsdp_worker.py only: accelerate 1.15 switches ``AcceleratorState`` to
    ``DistributedType.FSDP`` only on an accelerator device (state.py, the MULTI_GPU/.../MULTI_NEURON
    branch), so on a CPU machine the FSDP config would silently run as DDP (MULTI_CPU). torch's FSDP2
    (``fully_shard``) runs on CPU over gloo, so the worker wraps ``AcceleratorState.__init__`` to make, for
    MULTI_CPU, the same assignments accelerate makes for MULTI_GPU (distributed type FSDP, the plugin kept,
    the type copied into ``PartialState``). The launcher, the plugin built from the config's environment
    variables, ``Accelerator.prepare`` -> ``fsdp2_prepare_model``, clipping and the kit's code are unpatched."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    worker, config = here / "fsdp_worker.py", here.parent / "configs" / "fsdp.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--num_processes", "2", "--main_process_port", "0"]
    for folder, cmd, batch in (("one", [sys.executable], 8), ("two", launch, 4)):
        (tmp_path / folder).mkdir()
        r = subprocess.run([*cmd, str(worker), str(tmp_path / folder), str(batch)], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert one["world"] == 1 and one["distributed_type"] == "DistributedType.NO" and not any(one["dtensor"].values())
    for run in two:
        assert run["world"] == 2 and run["backend"] == "gloo"
        assert run["distributed_type"] == "DistributedType.FSDP" and run["fsdp2"] and run["fsdp_version"] == 2
        assert run["dtensor"] and all(run["dtensor"].values()) and run["mesh"] == [(2,)]  # sharded, not replicated
        assert set(run["split"]) == set(run["dtensor"])  # each process holds half of every parameter
        assert not run["student_dtensor"] and run["student_dtypes"] == ["torch.float32"]
        assert len(run["losses"]) == len(one["losses"]) == 4 and len(run["grad_norms"]) == 4
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run["grad_norms"], one["grad_norms"], rtol=1e-4, atol=1e-5)
        assert run["student"].keys() == one["student"].keys()
        for k, v in one["student"].items():
            torch.testing.assert_close(run["student"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for k, v in two[0]["student"].items():
        assert torch.equal(two[1]["student"][k], v), k  # the gathered weights are the same on both processes
    assert max(one["grad_norms"]) > 5.0  # clipping was active
    base = models.tiny_model("llama", models.tiny_tokenizer(), seed=0).state_dict()
    assert max((one["student"][k] - v).abs().max().item() for k, v in base.items()) > 1e-3  # the students trained
