"""CD training throughput: cached, batched teacher vs an online teacher with one example per step.

* cached/batched (this kit): the teacher's answer distribution for all N transfer queries is computed
  once with the reused demonstration prefix, then the student trains on batches of ``--batch-size``.
  The teacher time is charged to this side in full.
* online/one-example (the public anchors' way): every step runs the teacher on its full prompt
  (k demonstrations + query), then one student forward/backward and one optimizer step.

Both sides process the same N × epochs examples with the same model, loss, optimizer, gradient clipping
and student precision (``--mixed-precision``; the teacher runs in float32 on both sides). Timing is a
synchronised wall clock after one untimed warm-up step on each side.

    python benchmarks/bench_cd_throughput.py --k 16 --n 32 --epochs 4 --batch-size 8

The defaults are the ``default`` profile's CD settings (k = 16, 4 epochs, batches of 8, a float32 student;
``--mixed-precision bf16`` gives the bf16 autocast the profile used until 2026-12-07 and docs/performance.md's
numbers), with 32 instead of 64 transfer queries to keep the online side under 4 minutes.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from llmft_utils import data, distill, models, patterns
from llmft_utils.probes import _sync, hardware


def online_loop(lm, pattern, demos, examples, cfg, vids, epochs, warmup=1):
    prefix = patterns.build_prefix(pattern, demos)
    student = copy.deepcopy(lm.model).train()
    device_type = lm.device.split(":")[0]
    opt = distill.training.make_optimizer(list(student.parameters()), cfg)  # the same optimizer as the kit's loop
    tok = lm.tokenizer
    items = list(zip(examples["premise"], examples["hypothesis"]))

    def step(p, h):
        with torch.no_grad():
            t_ids = tok(prefix + patterns.query_text(pattern, p, h, bool(prefix)), return_tensors="pt").input_ids
            z = lm.model(t_ids.to(lm.device), logits_to_keep=1).logits[:, -1].float()
            t_logp = torch.log_softmax(distill.support_logits(z / cfg.temperature, cfg.target, vids), -1)
        s_ids = tok(patterns.query_text(pattern, p, h, False), return_tensors="pt").input_ids.to(lm.device)
        with distill.training.student_autocast(device_type, cfg.mixed_precision):  # as in train_student
            logits = student(s_ids, logits_to_keep=1).logits[:, -1].float()
        loss = distill.distill_loss(logits, t_logp, cfg.loss, cfg.temperature, cfg.target, vids)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()

    with distill.training.training_attention(student, cfg.train_attention, device_type):  # as in train_student
        for p, h in items[:warmup]:
            step(p, h)
        _sync(lm.device)
        t0 = time.perf_counter()
        for _ in range(epochs):
            for p, h in items:
                step(p, h)
        _sync(lm.device)
        return time.perf_counter() - t0


def cached_loop(lm, pattern, demos, examples, cfg, vids, teacher_batch_size):
    t0 = time.perf_counter()
    teacher = distill.teacher_targets(lm, pattern, demos, examples, cfg, batch_size=teacher_batch_size)
    rows = distill.student_examples(lm.tokenizer, pattern, examples, teacher, lm.max_context)
    _, stats = distill.train_student(lm.model, lm.tokenizer, rows, cfg, vids)
    _sync(lm.device)
    return time.perf_counter() - t0, teacher["seconds"], stats["train_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--task", default="mnli")
    ap.add_argument("--pattern", default="gpt-3")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--n", type=int, default=32, help="transfer queries")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="training batch size (cached side)")
    ap.add_argument("--teacher-batch-size", type=int, default=8, help="queries per teacher forward (cached side)")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                    help="student forward precision, the same on both sides (the teacher is float32 on both)")
    ap.add_argument("--data-dir", default=os.environ.get(data.DATA_DIR_ENV, ""))
    a = ap.parse_args()

    spec = data.get_task(a.task)
    ev_name = next(s for s in spec.splits if s.startswith("validation"))
    ev = data.load_split(a.task, ev_name, a.data_dir)
    pool = data.load_split(spec.demo_task, spec.demo_split, a.data_dir)
    demos = data.sample_demonstrations(pool, a.k, 0, exclude=ev)
    examples = data.transfer_set(pool, a.n, 0, [demos, ev])
    pat = patterns.get_pattern(a.pattern)
    lm = models.load_model(a.model)
    vids = distill.answer_token_ids(lm.tokenizer, pat)
    cfg = distill.DistillConfig(epochs=a.epochs, batch_size=a.batch_size, lr=1e-5, mixed_precision=a.mixed_precision)
    warm = distill.DistillConfig(epochs=1, batch_size=a.batch_size, lr=1e-5, mixed_precision=a.mixed_precision)
    cached_loop(lm, pat, demos, examples.head(a.batch_size), warm, vids, a.teacher_batch_size)  # warm-up
    total, teach_s, train_s = cached_loop(lm, pat, demos, examples, cfg, vids, a.teacher_batch_size)
    online = online_loop(lm, pat, demos, examples, cfg, vids, a.epochs)
    n = a.n * a.epochs
    print(f"hardware: {hardware()}  model: {a.model} ({lm.n_params/1e6:.1f}M params, {lm.dtype})")
    print(f"task: {a.task}  k={a.k}  transfer N={a.n}  epochs={a.epochs}  examples processed={n}  "
          f"student precision: {a.mixed_precision}")
    print(f"cached+batched (batch {a.batch_size}): {total:.1f} s  (teacher {teach_s:.1f} s, training {train_s:.1f} s)"
          f"  -> {n / total:.2f} examples/s")
    print(f"online teacher, 1 example/step:    {online:.1f} s  -> {n / online:.2f} examples/s")
    print(f"throughput ratio (cached / online): {online / total:.1f}x")


if __name__ == "__main__":
    main()
