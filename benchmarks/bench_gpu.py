"""Throughput of the kit's own code paths on random-init models of real shapes (speed does not depend on
the weights' values), for a GPU (runs on CPU too, slowly: use --n to shrink it).

Per shape, through ``scoring.evaluation.evaluate``, ``distill.teacher.teacher_targets`` and ``distill.training.train_student``:

* ICL scoring of ``--n`` MNLI-binary validation_matched queries at k = 0 (= zero-shot and student
  scoring), 16 and 32, on the reused demonstration prefix, in batches of ``--max-tokens`` padded tokens;
* full prompts (no prefix reuse), k = 16, on ``--n-full`` queries;
* teacher caching (k = 16) of ``--n-teacher`` MNLI train queries;
* CD training on those cached targets for each ``--train`` variant ``BATCH:MIXED_PRECISION:CHECKPOINTING``
  (one epoch, float32 master weights; ``bf16`` autocasts the forward; ``ckpt`` recomputes each layer's
  activations in the backward pass instead of keeping them).

``--only icl|teacher|train`` narrows a run; ``--kernels N`` prints the N CUDA kernels that take the most
time in zero-shot and k = 16 scoring (torch profiler, 2,048 queries); ``--compile`` also times zero-shot
scoring with ``torch.compile``d forwards (compile time reported apart); ``--split-kernel fused`` runs the prefix
part of the split attention in CUDA's memory-efficient kernel (``scoring.attention.SPLIT_KERNEL``). ``--n-teacher`` larger than
the pool examples left after the demonstrations and queries uses all of them (and says so).

Each measurement follows an untimed warm-up of the same path and is a synchronised wall clock
(``probes.probe``): tokenisation, batching and the copies back to the host are included. Peak memory is
``torch.cuda.max_memory_allocated`` over the measurement (the model's weights included). Achieved
TFLOP/s counts the model's matmul FLOPs (2 per weight per token, attention 4·layers·d per query-key pair,
the LM head at the answer position only; training 3× the forward) and is set against the card's dense
bf16 peak where the card is known.

    python benchmarks/bench_gpu.py --shapes smollm2-135m,opt-125m,opt-1.3b --json bench_gpu.json
    python benchmarks/bench_gpu.py --shapes smollm2-135m --device cpu --n 64 --n-full 16 --n-teacher 64 \\
        --train 16:bf16:ckpt --json /tmp/bench.json          # a dry run on CPU

The tokenizer is the embedded SmolLM2 one for every shape (``--tokenizer DIR`` for another), so token
counts are SmolLM2's; OPT's own tokenizer gives similar lengths on this text.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from llmft_utils import data, distill, models, patterns, scoring
from llmft_utils.probes import _sync, hardware, probe

# Dense bf16 tensor-core peak (TFLOP/s, SXM parts); the reference for "share of the card".
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def card_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def model_dims(model) -> dict:
    cfg = model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"d": d, "layers": layers, "vocab": vocab, "n_params": n_params, "n_matmul": n_params - emb}


def forward_flops(dims: dict, lengths, prefix: int) -> float:
    """Matmul FLOPs of scoring rows of ``lengths`` tokens after a shared prefix of ``prefix`` tokens (the
    prefix itself computed once), the LM head at each row's answer position only."""
    lengths = np.asarray(lengths, dtype=float)
    mm = 2 * dims["n_matmul"] * (lengths.sum() + prefix)  # every weight once per token (embeddings excluded)
    attn = 4 * dims["layers"] * dims["d"] * float((lengths * prefix + lengths * (lengths + 1) / 2).sum())
    head = 2 * dims["d"] * dims["vocab"] * len(lengths)
    return mm + attn + head


def _measure(fn, device: str):
    _sync(device)
    with probe(device) as pr:
        out = fn()
    return out, pr.wall_s, pr.peak_mem_mb


def bench_shape(shape: str, a, frames: dict) -> dict:
    ev, pool = frames["ev"], frames["pool"]
    pat = patterns.get_pattern(a.pattern)
    t0 = time.perf_counter()
    lm = models.load_model(models.RANDOM_PREFIX + shape, device=a.device, dtype=a.dtype)
    load_s = time.perf_counter() - t0
    dims = model_dims(lm.model)
    peak = card_peak()
    res = {"shape": shape, "model": lm.name, "source": lm.source, "dtype": lm.dtype, "device": lm.device,
           "hardware": hardware(), "tf32": torch.backends.cuda.matmul.allow_tf32, "n_params": dims["n_params"],
           "max_tokens": a.max_tokens, "split_kernel": scoring.attention.SPLIT_KERNEL, "load_s": load_s, "card_peak_bf16_tflops": peak, "runs": []}

    def record(what, n, seconds, mem_mb, flops, unit="queries", **extra):
        tflops = flops / seconds / 1e12
        row = {"what": what, "n": n, "seconds": seconds, f"{unit}_per_s": n / seconds, "peak_mem_gb": mem_mb / 1024,
               "tflops": tflops, "share_of_bf16_peak": tflops / peak if peak else None, **extra}
        res["runs"].append(row)
        print(f"  {what:<34} {n:>6} {unit} {seconds:7.2f} s  {n / seconds:9.0f} {unit}/s  "
              f"peak {mem_mb / 1024:6.2f} GB  {tflops:6.1f} TFLOP/s" + (f" ({tflops / peak:.1%} of bf16 peak)" if peak else "")
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)

    demos = {k: data.sample_demonstrations(pool, k, 0, exclude=ev) for k in (16, 32)}
    demos[0] = pool.iloc[0:0]
    # warm-up: every path once, on a few queries
    for k in (0, 16):
        scoring.evaluate(lm, ev.head(64), pat, demos[k], max_tokens=a.max_tokens, progress=False)
    if a.kernels:
        res["kernels"] = kernel_tables(lm, ev.head(2048), pat, demos, a)
    for k in sorted(a.ks) if a.only in ("", "icl") else ():
        prefix = patterns.build_prefix(pat, demos[k])
        queries = [patterns.query_text(pat, p, h, bool(prefix)) for p, h in zip(ev.premise, ev.hypothesis)]
        t0 = time.perf_counter()
        scoring.build_rows(lm.tokenizer, prefix, queries, pat.verbalizers)
        tok_s = time.perf_counter() - t0
        (m, _), s, mem = _measure(lambda: scoring.evaluate(lm, ev, pat, demos[k], max_tokens=a.max_tokens, progress=False),
                                  lm.device)
        lengths = np.full(len(ev), m["query_tokens_mean"])
        record(f"icl k={k}" + (" (zero-shot/student)" if k == 0 else " prefix reuse"), len(ev), s, mem,
               forward_flops(dims, lengths, m["prefix_tokens"]), prefix_tokens=m["prefix_tokens"],
               tokenize_s=round(tok_s, 3))
    if a.compile and a.only in ("", "icl"):
        res["compiled"] = compiled_zero_shot(lm, ev, pat, demos[0], a, dims, record)
    if a.only == "icl":
        return _done(res, lm)
    if a.only == "":
        sub = ev.head(a.n_full)
        scoring.evaluate(lm, sub.head(8), pat, demos[16], reuse_prefix=False, max_tokens=a.max_tokens, progress=False)
        (m, _), s, mem = _measure(lambda: scoring.evaluate(lm, sub, pat, demos[16], reuse_prefix=False,
                                                       max_tokens=a.max_tokens, progress=False), lm.device)
        record("icl k=16 full prompts", len(sub), s, mem,
               forward_flops(dims, np.full(len(sub), m["query_tokens_mean"]), 0))

    cfg = distill.DistillConfig(epochs=1, lr=1e-5, mixed_precision=a.mixed_precision)
    free = len(data.disjoint_rows(pool, [demos[16], ev]))
    if a.n_teacher > free:  # the MNLI train subset minus the demonstrations and the queries
        print(f"  --n-teacher {a.n_teacher} > the {free} pool examples left: using {free}", flush=True)
    transfer = data.transfer_set(pool, min(a.n_teacher, free), 0, [demos[16], ev])
    distill.teacher_targets(lm, pat, demos[16], transfer.head(64), cfg, max_tokens=a.max_tokens)
    t, s, mem = _measure(lambda: distill.teacher_targets(lm, pat, demos[16], transfer, cfg, max_tokens=a.max_tokens),
                         lm.device)
    q_len = float(np.mean([len(x) for x in lm.tokenizer([patterns.query_text(pat, p, h, True) for p, h in
                                                         zip(transfer.premise, transfer.hypothesis)])["input_ids"]]))
    p_len = len(lm.tokenizer(patterns.build_prefix(pat, demos[16]))["input_ids"])
    record("teacher caching k=16", len(transfer), s, mem, forward_flops(dims, np.full(len(transfer), q_len), p_len))
    if a.only == "teacher":
        return _done(res, lm)

    rows = distill.student_examples(lm.tokenizer, pat, transfer, t, lm.max_context)
    vids = distill.answer_token_ids(lm.tokenizer, pat)
    s_len = float(np.mean([len(r["input_ids"]) for r in rows]))
    for variant in a.train:
        bs, mp, ckpt = variant
        c = distill.DistillConfig(epochs=1, batch_size=bs, lr=1e-5, mixed_precision=mp)
        distill.train_student(lm.model, lm.tokenizer, rows[: 2 * bs], c, vids, checkpointing=ckpt)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _, st = distill.train_student(lm.model, lm.tokenizer, rows, c, vids, checkpointing=ckpt)
        record(f"CD training batch {bs} ({mp}{', ckpt' if ckpt else ''})", len(rows), st["train_s"],
               st["train_peak_mem_mb"], 3 * forward_flops(dims, np.full(len(rows), s_len), 0),
               unit="examples")
        if a.kernels and variant == a.train[0]:  # where a training step spends its time (4 steps)
            res.setdefault("kernels", {})["train"] = train_kernel_table(lm, rows[: 4 * bs], c, vids, ckpt, a)
    return _done(res, lm)


def train_kernel_table(lm, rows, cfg, vids, ckpt: bool, a) -> str:
    """The ops/kernels that take the most time in 4 training steps (torch profiler; printed and returned)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        distill.train_student(lm.model, lm.tokenizer, rows, cfg, vids, checkpointing=ckpt)
        _sync(lm.device)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                      row_limit=a.kernels, max_name_column_width=60)
    print(f"  kernels, training batch {cfg.batch_size}, {len(rows)} examples:\n{table}", flush=True)
    return table


def _done(res: dict, lm) -> dict:
    lm.model.to("meta")  # free the device memory now (the caller may load the next shape)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def kernel_tables(lm, ev, pat, demos, a) -> dict:
    """The CUDA kernels that take the most device time in zero-shot and k = 16 scoring (printed; returned as text)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for k in (0, 16):
        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            scoring.evaluate(lm, ev, pat, demos[k], max_tokens=a.max_tokens, progress=False)
            _sync(lm.device)
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                          row_limit=a.kernels, max_name_column_width=60)
        print(f"  kernels, k={k}, {len(ev)} queries:\n{table}", flush=True)
        out[f"k{k}"] = table
    return out


def compiled_zero_shot(lm, ev, pat, demos0, a, dims, record) -> dict:
    """Zero-shot scoring with the model's forward under ``torch.compile(dynamic=True)``: the first call
    (compilation included) timed apart, then the measured run; the original forward is restored."""
    forward = lm.model.forward
    lm.model.forward = torch.compile(forward, dynamic=True)
    try:
        t0 = time.perf_counter()
        scoring.evaluate(lm, ev.head(2048), pat, demos0, max_tokens=a.max_tokens, progress=False)
        _sync(lm.device)
        first = time.perf_counter() - t0
        (m, _), s, mem = _measure(lambda: scoring.evaluate(lm, ev, pat, demos0, max_tokens=a.max_tokens, progress=False),
                                  lm.device)
        record("icl k=0 compiled", len(ev), s, mem, forward_flops(dims, np.full(len(ev), m["query_tokens_mean"]), 0),
               compile_and_first_s=round(first, 1))
        return {"first_call_s": first, "seconds": s}
    except Exception as e:  # noqa: BLE001 - an experiment: report and go on
        print(f"  torch.compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        lm.model.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,opt-125m,opt-1.3b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=list(models.DTYPES),
                    help="auto = float32 (the kit's faithful default); tf32 = float32 with TF32 tensor-core matmuls")
    ap.add_argument("--pattern", default="gpt-3")
    ap.add_argument("--ks", default="0,16,32")
    ap.add_argument("--n", type=int, default=0, help="MNLI queries (0: all 6,692)")
    ap.add_argument("--n-full", type=int, default=1000)
    ap.add_argument("--n-teacher", type=int, default=4096)
    ap.add_argument("--train", default="64:no:-,256:bf16:-,256:bf16:ckpt,1024:bf16:ckpt",
                    help="training variants BATCH:MIXED_PRECISION:CHECKPOINTING (no|bf16, ckpt|-), comma-separated")
    ap.add_argument("--only", default="", choices=["", "icl", "teacher", "train"])
    ap.add_argument("--kernels", type=int, default=0, help="print the N CUDA kernels that take the most time")
    ap.add_argument("--compile", action="store_true", help="also time zero-shot scoring with torch.compile")
    ap.add_argument("--split-kernel", default=scoring.attention.SPLIT_KERNEL, choices=scoring.attention.SPLIT_KERNELS,
                    help="icl.SPLIT_KERNEL: the prefix part of the split attention (fused = CUDA's memory-efficient kernel)")
    ap.add_argument("--max-tokens", type=int, default=32768, help="padded tokens per evaluation batch")
    ap.add_argument("--mixed-precision", default="no", choices=list(distill.config.MIXED_PRECISION))
    ap.add_argument("--tokenizer", default="", help="tokenizer directory (default: the embedded SmolLM2 one)")
    ap.add_argument("--data-dir", default=os.environ.get(data.DATA_DIR_ENV, ""))
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    a.ks = [int(k) for k in a.ks.split(",")]
    a.train = [(int(b), mp, c == "ckpt") for b, mp, c in (v.split(":") for v in a.train.split(",") if v)]
    a.device = models.pick_device(a.device)
    scoring.attention.SPLIT_KERNEL = a.split_kernel
    if a.tokenizer:
        os.environ[models.RANDOM_TOKENIZER_ENV] = a.tokenizer
    ev = data.load_split("mnli", "validation_matched", a.data_dir or None)
    ev = ev.head(a.n) if a.n else ev
    pool = data.load_split("mnli", "train", a.data_dir or None)
    out = {"hardware": hardware(), "torch": torch.__version__, "args": vars(a), "shapes": []}
    for shape in a.shapes.split(","):
        print(f"{shape} on {hardware()}, dtype {a.dtype}", flush=True)
        out["shapes"].append(bench_shape(shape, a, {"ev": ev, "pool": pool}))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    print(json.dumps(out)[:0], end="")


if __name__ == "__main__":
    main()
