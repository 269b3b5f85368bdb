"""Memory is measured, not inferred: the tensor bytes of each run's largest batch (``probes.tensor_memory``)
grow with the number of demonstrations, are the same for a student as for the zero-shot model it came
from, and are larger for a training step than for inference; the process's RSS, which the kit recorded
before, cannot attribute memory to a run in a process that has already run larger ones."""
import pytest
import toy_data

from llmft_utils import data, distill, models, patterns, scoring

GPT3 = patterns.get_pattern("gpt-3")


@pytest.fixture(scope="module")
def setup():
    tok = models.tiny_tokenizer(add_bos=True)
    lm = models.wrap(models.tiny_model("llama", tok, max_positions=4096), tok, name="tiny-llama")
    ev, pool = toy_data.frames(24, 48, 0, premise=(3, 16))
    return lm, ev, pool


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_icl_memory_grows_with_k_and_a_student_matches_zero_shot(arch, tiny_lms):
    lm = tiny_lms[arch]
    ev, pool = toy_data.frames(24, 48, 0, premise=(3, 16))
    work = {}
    for k in (0, 4, 16):
        m, _ = scoring.evaluate(lm, ev, GPT3, data.sample_demonstrations(pool, k, 0), progress=False)
        assert m["mem_method"] == "torch_tensor_bytes"
        assert m["mem_weights_mb"] == pytest.approx(sum(p.numel() * 4 for p in lm.model.parameters()) / 2**20, rel=0.05)
        work[k] = m["mem_work_mb"]
    assert 0 < work[0] < work[4] < work[16], work  # the prefix KV cache and the longer attention
    zero, _ = scoring.evaluate(lm, ev, GPT3, pool.iloc[0:0], progress=False)
    cfg = distill.DistillConfig(target="verbalizer", alpha=1.0, epochs=1, batch_size=8, lr=1e-3)
    vids = distill.answer_token_ids(lm.tokenizer, GPT3)
    rows = distill.student_examples(lm.tokenizer, GPT3, pool, None, lm.max_context)
    student, _ = distill.train_student(lm.model, lm.tokenizer, rows, cfg, vids)
    s, _ = scoring.evaluate(models.wrap(student, lm.tokenizer, name="student"), ev, GPT3, pool.iloc[0:0], progress=False)
    assert s["mem_tensors_peak_mb"] == pytest.approx(zero["mem_tensors_peak_mb"], rel=0.05)
    # training (weights + gradients + AdamW states + activations) exceeds inference on the same model
    step = distill.training_step_memory(lm.model, lm.tokenizer, rows, cfg, vids)
    assert step.peak_mb > 3 * step.weights_mb and step.peak_mb > zero["mem_tensors_peak_mb"]
    assert step.by_kind_mb["optimizer_states_before"] >= 1.9 * step.weights_mb  # AdamW: two moments per weight


def test_checkpointing_lowers_the_measured_training_memory(setup):
    lm, ev, pool = setup
    cfg = distill.DistillConfig(target="verbalizer", epochs=1, batch_size=16, lr=1e-3)
    t = distill.teacher_targets(lm, GPT3, data.sample_demonstrations(pool, 4, 0), ev, cfg)
    rows = distill.student_examples(lm.tokenizer, GPT3, ev, t, lm.max_context)
    vids = distill.answer_token_ids(lm.tokenizer, GPT3)
    plain = distill.training_step_memory(lm.model, lm.tokenizer, rows, cfg, vids)
    ckpt = distill.training_step_memory(lm.model, lm.tokenizer, rows, cfg, vids, checkpointing=True)
    assert ckpt.work_mb < plain.work_mb and ckpt.weights_mb == plain.weights_mb


@pytest.mark.parametrize("arch,mixed_precision,lora_r", [("llama", "no", 0), ("opt", "no", 0), ("llama", "bf16", 0),
                                                         ("llama", "no", 4)])
def test_training_step_memory_after_a_zero_gradient_step_equals_after_a_real_step(tiny_lms, arch, mixed_precision,
                                                                                   lora_r):
    """The optimizer states the measured step starts with come from an optimizer step on zero gradients (no
    forward or backward); the measured bytes are those after a real first step, to the byte."""
    lm = tiny_lms[arch]
    _, pool = toy_data.frames(8, 48, 0, premise=(3, 16))
    cfg = distill.DistillConfig(target="verbalizer", alpha=1.0, epochs=1, batch_size=8, lr=1e-3, mixed_precision=mixed_precision,
                                lora_r=lora_r)
    vids = distill.answer_token_ids(lm.tokenizer, GPT3)
    rows = distill.student_examples(lm.tokenizer, GPT3, pool, None, lm.max_context)
    fast = distill.training_step_memory(lm.model, lm.tokenizer, rows, cfg, vids)
    real = distill.training_step_memory(lm.model, lm.tokenizer, rows, cfg, vids, warm_step="real")
    assert (fast.peak_mb, fast.weights_mb, fast.by_kind_mb) == (real.peak_mb, real.weights_mb, real.by_kind_mb)
    assert fast.by_kind_mb["optimizer_states_before"] > 0


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_batch_memory_depends_on_shapes_not_weights_so_a_kept_measurement_is_exact(arch, monkeypatch):
    """icl.largest_batch_memory keeps each measurement per model structure and batch layout: a model of the
    same shape with other weights, measured afresh, gives the same bytes as the kept measurement (with and
    without a prefix); another batch layout (k) is measured, not looked up."""
    tok = models.tiny_tokenizer(add_bos=True)
    ev, pool = toy_data.frames(24, 48, 0, premise=(3, 16))
    a, b = (models.wrap(models.tiny_model(arch, tok, seed=s, max_positions=4096), tok) for s in (0, 1))
    monkeypatch.setattr(scoring.scorer, "_BATCH_MEMORY", {})
    got = {}
    for k in (0, 4):
        demos = data.sample_demonstrations(pool, k, 0)
        kept, _ = scoring.evaluate(a, ev, GPT3, demos, progress=False, extras=("memory",))
        scoring.scorer._BATCH_MEMORY.clear()
        fresh, _ = scoring.evaluate(b, ev, GPT3, demos, progress=False, extras=("memory",))
        reused, _ = scoring.evaluate(b, ev, GPT3, demos, progress=False, extras=("memory",))
        cols = ("mem_tensors_peak_mb", "mem_weights_mb", "mem_work_mb", "mem_method")
        assert [kept[c] for c in cols] == [fresh[c] for c in cols] == [reused[c] for c in cols]
        got[k] = fresh["mem_work_mb"]
    assert got[0] < got[4]
