"""Faults in context distillation: damaged or stale teacher caches, non-finite teacher outputs, non-finite
gradients, and a NaN loss on one DDP rank (every rank must stop, none may hang)."""
import copy
import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_data
from ddp_worker import rows as training_rows  # the DDP tests' training rows, with or without NaN targets

from llmft_utils import data, distill, models, patterns

GPT3 = patterns.get_pattern("gpt-3")
TOPK = distill.DistillConfig(target="topk", topk=5)


@pytest.fixture(scope="module")
def tiny():
    tok = models.tiny_tokenizer(add_bos=True)
    return models.wrap(models.tiny_model("llama", tok, max_positions=4096), tok, name="tiny-llama")


def _frames(n=6, n_pool=12, seed=0):
    return toy_data.frames(n, n_pool, seed, premise=(3, 12), hypothesis=(2, 5))


def _key(lm, demos, ev, cfg, pattern=GPT3, seed=0, dtype=None, device=None):
    """The key as run_cd_sweep builds it."""
    model = distill.TeacherModel(f"{lm.name}:{lm.source}", dtype or lm.dtype, device or lm.device)
    return distill.teacher_cache_key(model, "rte", pattern, len(demos), seed, demos, ev, cfg)


# ----------------------------------------------------------------------------- teacher cache

def test_the_same_teacher_targets_are_the_same_bytes(tiny, tmp_path):
    """A teacher cache written twice (two folders, two temporary names) is byte-identical: a copied or
    regenerated cache can be checked with sha256sum alone."""
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, 2, seed=0, exclude=ev)
    key = _key(tiny, demos, ev, TOPK)
    for sub in ("a", "b"):
        distill.teacher_targets(tiny, GPT3, demos, ev, TOPK, distill.TeacherCache(tmp_path / sub, key))
    assert (tmp_path / "a" / f"{key}.pt").read_bytes() == (tmp_path / "b" / f"{key}.pt").read_bytes()


def _resave(path, change):
    blob = torch.load(path, weights_only=True)
    change(blob)
    torch.save(blob, path)


def _nan_with_valid_checksum(blob):
    blob["logp"][0, 0] = float("nan")
    blob["sha256"] = distill.teacher.tensors_sha256(blob)  # only the values are wrong, so the finiteness check must catch it


DAMAGE = {  # name: (damage(path, write_other), reason the warning must give)
    "garbage": (lambda p, other: p.write_bytes(b"\x00not a torch file\xff" * 64), "unreadable"),
    "truncated": (lambda p, other: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    "nan": (lambda p, other: _resave(p, _nan_with_valid_checksum), "non-finite"),
    "checksum": (lambda p, other: _resave(p, lambda b: b["logp"].add_(0.25)), "checksum"),
    "other_key": (lambda p, other: os.replace(other(), p), "key"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_cache_file_is_recomputed_with_a_warning(tiny, tmp_path, caplog, damage):
    """Each damaged file (right ``n`` where it has one) is recomputed with a warning and a log record that
    name the file and the reason, the result equals a fresh computation, and the rewritten file is a hit."""
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, 4, seed=0)
    fresh = distill.teacher_targets(tiny, GPT3, demos, ev, TOPK)
    key = _key(tiny, demos, ev, TOPK)
    path = tmp_path / f"{key}.pt"
    distill.teacher_targets(tiny, GPT3, demos, ev, TOPK, distill.TeacherCache(tmp_path, key))

    def other():  # a valid file of the same n under another key (other demonstrations)
        d1 = data.sample_demonstrations(pool, 4, seed=1)
        written = distill.teacher_targets(tiny, GPT3, d1, ev, TOPK, distill.TeacherCache(tmp_path, _key(tiny, d1, ev, TOPK, seed=1)))
        return Path(written["path"])

    hurt, reason = DAMAGE[damage]
    hurt(path, other)
    with caplog.at_level(logging.WARNING, logger="llmft_utils.distill.teacher"), \
            pytest.warns(RuntimeWarning, match=re.escape(str(path)) + f".*{reason}"):
        got = distill.teacher_targets(tiny, GPT3, demos, ev, TOPK, distill.TeacherCache(tmp_path, key))
    assert any(str(path) in r.getMessage() and reason in r.getMessage() for r in caplog.records
               if r.name == "llmft_utils.distill.teacher")
    assert not got["cache_hit"]
    assert torch.equal(got["logp"], fresh["logp"]) and torch.equal(got["topk_ids"], fresh["topk_ids"])
    again = distill.teacher_targets(tiny, GPT3, demos, ev, TOPK, distill.TeacherCache(tmp_path, key))
    assert again["cache_hit"] and torch.equal(again["logp"], fresh["logp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


@pytest.mark.parametrize("target", ["verbalizer", "full"])  # topk: test_bad_cache_file_is_recomputed_with_a_warning
def test_force_recomputes_a_valid_cache_file(tiny, tmp_path, target):
    """A valid file of each target's shape is a hit; ``force=True`` recomputes and replaces it anyway."""
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, 4, seed=0)
    cfg = distill.DistillConfig(target=target)
    key = _key(tiny, demos, ev, cfg)
    first = distill.teacher_targets(tiny, GPT3, demos, ev, cfg, distill.TeacherCache(tmp_path, key))
    assert distill.teacher_targets(tiny, GPT3, demos, ev, cfg, distill.TeacherCache(tmp_path, key))["cache_hit"]
    inode = os.stat(first["path"]).st_ino
    forced = distill.teacher_targets(tiny, GPT3, demos, ev, cfg, distill.TeacherCache(tmp_path, key, force=True))
    assert not forced["cache_hit"] and torch.equal(forced["logp"], first["logp"])
    assert os.stat(forced["path"]).st_ino != inode  # a new file, renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.pt"]


def test_cache_key_covers_pattern_text_dtype_device_and_texts(tiny):
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, 4, seed=0)
    cfg = distill.DistillConfig(target="verbalizer")
    k0 = _key(tiny, demos, ev, cfg)
    assert k0 == _key(tiny, demos, ev, cfg, pattern="gpt-3", dtype=torch.float32)  # a name means the registered pattern
    assert _key(tiny, demos, ev, cfg, device="cuda:0") == _key(tiny, demos, ev, cfg, device="cuda:1")  # device type
    edited, relabelled, queries = demos.copy(), demos.copy(), ev.copy()
    edited.loc[edited.index[0], "premise"] += " again"
    relabelled.loc[relabelled.index[0], "label"] = 1 - relabelled["label"].iloc[0]
    queries.loc[queries.index[0], "hypothesis"] = "A dog ran ."
    changed = [_key(tiny, demos, ev, cfg, pattern=dataclasses.replace(GPT3, template="{premise} Q: {hypothesis} A:")),
               _key(tiny, demos, ev, cfg, pattern=dataclasses.replace(GPT3, verbalizers=(" True", " False"))),
               _key(tiny, demos, ev, cfg, pattern=dataclasses.replace(GPT3, separator="\n")),
               _key(tiny, demos, ev, cfg, dtype="bfloat16"), _key(tiny, demos, ev, cfg, device="cuda:0"),
               _key(tiny, edited, ev, cfg), _key(tiny, relabelled, ev, cfg), _key(tiny, demos, queries, cfg)]
    assert len({k0, *changed}) == len(changed) + 1
    assert list(edited["idx"]) == list(demos["idx"]) and list(queries["idx"]) == list(ev["idx"])  # same ids


def test_non_finite_teacher_outputs_raise_and_cache_nothing(tiny, tmp_path):
    """A near-zero temperature multiplies the logits' spread by 1/τ: the teacher's float32 log-probs stay
    finite (the scoring code's own check passes), but fall below float16's range (-65504), the dtype of
    full-vocabulary targets on disk. The -inf must raise, not be cached."""
    ev, pool = _frames()
    demos = data.sample_demonstrations(pool, 4, seed=0)
    cfg = distill.DistillConfig(target="full", temperature=1e-5)
    with pytest.raises(FloatingPointError, match=r"stored as float16\) are non-finite for 6 of 6 examples"):
        distill.teacher_targets(tiny, GPT3, demos, ev, cfg, distill.TeacherCache(tmp_path, _key(tiny, demos, ev, cfg)))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_finite_loss_with_non_finite_gradient_stops(tiny, max_grad_norm, every):
    """A hook turns one parameter's gradient into inf while the loss stays finite: training stops at the
    first optimizer step, before the optimizer sees the gradient (a single step, so no later NaN loss)."""
    model = models.tiny_model("llama", tiny.tokenizer, max_positions=4096)

    def poison(mod, args, out):  # a forward hook survives train_student's deepcopy; a tensor hook would not
        mod.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    model.model.norm.register_forward_hook(poison)
    ev, _ = _frames(8)
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, None, tiny.max_context)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    cfg = distill.DistillConfig(target="verbalizer", alpha=1.0, epochs=1, batch_size=8, max_grad_norm=max_grad_norm)
    with pytest.raises(FloatingPointError, match=r"gradient norm is (inf|nan) at epoch 0, step 0 with a finite loss"):
        distill.train_student(model, tiny.tokenizer, rows, cfg, vids, check_every=every)


def test_stats_record_grad_norms_and_lrs(tiny):
    ev, _ = _frames(16)
    rows = distill.student_examples(tiny.tokenizer, GPT3, ev, None, tiny.max_context)
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    cfg = distill.DistillConfig(target="verbalizer", alpha=1.0, epochs=1, batch_size=4, lr=1e-3, warmup_ratio=0.25, max_grad_norm=1e-3)
    _, st = distill.train_student(tiny.model, tiny.tokenizer, rows, cfg, vids)
    assert st["steps"] == len(st["losses"]) == len(st["grad_norms"]) == len(st["lrs"]) == 4
    assert np.isfinite(st["grad_norms"]).all() and min(st["grad_norms"]) > 1e-3  # the norm before clipping
    f = distill.training.lr_lambda("linear", 4, 0.25)
    assert st["lrs"] == pytest.approx([1e-3 * f(t) for t in range(4)])
    _, st0 = distill.train_student(tiny.model, tiny.tokenizer, rows, dataclasses.replace(cfg, max_grad_norm=0.0), vids)
    assert st0["grad_norms"][0] == pytest.approx(st["grad_norms"][0], rel=1e-6)  # same first step, no clipping


@pytest.mark.parametrize("attention", ["auto", "sdpa"])  # auto = eager on CPU; sdpa: a GPU's default
def test_training_loop_waits_for_the_device_only_at_checks(tiny, attention):
    """The host copies losses and gradient norms back once per ``check_every`` steps, not once per step (nor
    does transformers' mask builder read the mask per forward): with a check at the end only, 2 and 8 steps
    make the same number of host syncs; with a check every step, 8 steps make 6 more than 2. The losses,
    norms, lrs and trained weights do not depend on ``check_every``."""
    from host_syncs import HostSyncs

    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    rows = training_rows(tiny.tokenizer)
    counts, runs = {}, {}
    for every in (1, 10**6):
        for bs in (8, 2):
            cfg = distill.DistillConfig(target="verbalizer", epochs=1, batch_size=bs, lr=1e-3, max_grad_norm=1.0, train_attention=attention)
            with HostSyncs() as s:
                runs[every, bs] = distill.train_student(tiny.model, tiny.tokenizer, rows, cfg, vids, check_every=every)
            counts[every, bs] = s.total
    assert runs[1, 2][1]["steps"] == 8 and runs[1, 8][1]["steps"] == 2
    assert counts[10**6, 2] == counts[10**6, 8], (counts, s.calls)
    assert counts[1, 2] == counts[1, 8] + 6, counts
    for bs in (8, 2):
        (a, sa), (b, sb) = runs[1, bs], runs[10**6, bs]
        assert sa["losses"] == sb["losses"] and sa["grad_norms"] == sb["grad_norms"] and sa["lrs"] == sb["lrs"]
        assert distill.training.params_digest(a) == distill.training.params_digest(b)


@pytest.mark.parametrize("every", [1, 3])
def test_non_finite_loss_found_at_its_step_when_checks_are_sparse(tiny, every):
    """Rows 8-15 have NaN targets: in step order (no shuffling, batches of 2) the first bad step is 4, and
    that is the step named whether it is checked at once or with steps 3-5 together."""
    vids = distill.answer_token_ids(tiny.tokenizer, GPT3)
    rows = training_rows(tiny.tokenizer)[:8] + training_rows(tiny.tokenizer, nan=True)[8:]
    cfg = distill.DistillConfig(target="verbalizer", epochs=1, batch_size=2, shuffle=False, group_by_length=False, max_grad_norm=1.0)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 0, step 4 on rank\(s\) \[0\] of 1"):
        distill.train_student(tiny.model, tiny.tokenizer, rows, cfg, vids, check_every=every)


# ----------------------------------------------------------------------------- two processes (gloo)

def test_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    """Only rank 1 gets NaN teacher targets: both ranks raise the FloatingPointError (naming rank 1) and
    exit non-zero, nothing hangs, nothing is written."""
    out, log = tmp_path / "out.json", tmp_path / "torchrun.log"
    worker = Path(__file__).with_name("ddp_worker.py")
    with open(log, "w") as f:  # a file, not a pipe: a hung worker holding a pipe would block the test's read too
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(worker), str(out), "4", "nan-rank1"], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.terminate()  # torchrun passes it on to its workers (each in a session of its own), SIGKILL after 30 s
            p.wait(timeout=60)
            pytest.fail("the ranks hung: " + log.read_text()[-4000:])
    text = log.read_text()
    assert p.returncode != 0, text[-4000:]
    for rank in (0, 1):
        assert re.search(rf"rank {rank}: FloatingPointError: loss is nan at epoch 0, step 0 on rank\(s\) \[1\] of 2",
                         text), text[-4000:]
    exits = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: (-?\d+)", text))  # torchrun's report
    assert set(exits) == {"0", "1"} and "0" not in exits.values(), text[-4000:]
    assert not out.exists()


def test_student_trains_float32_master_weights_from_a_bf16_base():
    """A bf16 base model (what a GPU run may load) gives a float32 student whose weights move: a bf16 copy
    rounds most of these small AdamW updates away."""
    tok = models.tiny_tokenizer()
    base = models.tiny_model("llama", tok, seed=0).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": tok(f"The cat sat {'on the mat ' * (i % 3)}question: A cat sat . Yes or No? answer:").input_ids,
             "label": i % 2, "teacher_logp": torch.log_softmax(torch.randn(2, generator=g), -1)} for i in range(16)]
    vids = [tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")]
    cfg = distill.DistillConfig(target="verbalizer", epochs=2, batch_size=4, lr=1e-4, mixed_precision="bf16")
    student, _ = distill.train_student(base, tok, rows, cfg, vids)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(p.dtype == torch.bfloat16 for p in base.parameters())  # the base model is untouched
    flat = lambda m: torch.cat([p.detach().float().flatten() for n, p in m.named_parameters() if "embed" not in n])
    before, after = flat(base), flat(student)  # (embedding rows of tokens never seen get no update at all)
    assert (after != before).float().mean() > 0.5
    # the same training on a bf16 copy (the old behaviour) leaves most weights where they were
    bf = copy.deepcopy(base)
    opt = torch.optim.AdamW(bf.parameters(), lr=1e-4)
    for _ in range(8):
        batch = distill.collate(rows[:4], 0)
        loss = distill.distill_loss(distill.answer_position_logits(bf, batch).float(), batch["teacher_logp"],
                                    verbalizer_ids=vids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = flat(bf)
    print(f"changed: float32 masters {(after != before).float().mean():.2f}, bf16 copy {(moved != before).float().mean():.2f}")
    assert (moved != before).float().mean() < (after != before).float().mean()
