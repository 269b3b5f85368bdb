"""The scoring interface: answer-position logits (:func:`answer_logits`) and verbalizer scores
(:func:`score_prompts`) of ``prefix + query`` prompts, and the tensor memory of the largest batch.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from .. import models
from ..probes import tensor_memory
from ..progress import bar
from . import attention
from .attention import uses_split_attention
from .errors import PromptTooLongError
from .forward import Prefix, forward_rows, plan_batches, run_groups
from .reuse import encode_prefix, plan_reuse, standalone_row
from .tokens import Row, build_rows, split_prefix


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None

    return bar(total, desc, "row")


def answer_logits(lm, prefix_text: str, queries: list[str], extract, batch_size: int = 8, progress: bool = False,
                  max_tokens: int = 0):
    """``extract(logits)`` of the answer-position logits of every ``prefix_text + query`` prompt, computed with
    the reused prefix cache where that is exact (see :func:`score_prompts`), batch by batch on the model's
    device: ``extract`` takes (B, V) float32 logits and returns a tensor or a tuple of tensors (or None)
    with the batch first; the result is the same structure over all queries, in query order, on the CPU.
    Raises :class:`PromptTooLongError` for prompts beyond the context."""
    prefix_ids, split = split_prefix(lm.tokenizer, prefix_text, queries)
    longest = max(len(ids) + (0 if standalone else len(prefix_ids)) for ids, standalone in split)
    if longest > lm.max_context:
        raise PromptTooLongError(f"a prompt of {longest} tokens exceeds the model's context of {lm.max_context}; "
                                 "use fewer demonstrations or a longer-context model")
    rows = [Row(i, ids, [[]], -1, standalone) for i, (ids, standalone) in enumerate(split)]
    reuse_rows, full_rows, _ = plan_reuse(lm.model, prefix_ids, rows)
    pbar = _progress(len(rows), "teacher", progress)
    single = []  # whether extract returns one tensor (recorded at its first call), not a tuple

    def as_tuple(logits):
        e = extract(logits)
        if not single:
            single.append(not isinstance(e, tuple))
        return (e,) if single[0] else e

    done, _ = run_groups(lm, prefix_ids, reuse_rows, full_rows, batch_size, pbar, as_tuple, max_tokens)
    if pbar is not None:
        pbar.close()
    if not single:  # this process scored no batch (fewer batches than processes): ask extract what it returns
        as_tuple(torch.zeros((1, lm.model.config.get_text_config(decoder=True).vocab_size), device=lm.device))
    out = None
    for group, _, _, ex in done:
        if out is None:
            out = [None if e is None else e.new_empty((len(queries), *e.shape[1:])) for e in ex]
        qi = torch.tensor([r.qi for r in group])
        for o, e in zip(out, ex):
            if o is not None:
                o[qi] = e
    return out[0] if single[0] else tuple(out)


def score_prompts(lm, prefix_text: str, queries: list[str], verbalizers: tuple, batch_size: int = 8,
                  reuse_prefix: bool = True, on_too_long: str = "error", progress: bool = False,
                  max_tokens: int = 0) -> dict:
    """Score every query (text after the prefix) for each verbalizer.

    Returns ``logprobs`` (n_queries × n_labels; NaN rows for skipped queries), ``top1`` token ids,
    ``first_ids`` (verbalizer first tokens), ``skipped`` mask, token counts, ``n_prefix_fallback`` (queries
    scored on full prompts although ``reuse_prefix``) and ``prefix_reuse_note``: why the model's attention
    kept queries off the reused prefix ("" when it did not; see :func:`exact_reuse_length`).
    ``reuse_prefix=False`` is the naive baseline: every prompt is run in full. Batches: ``batch_size``
    rows, or up to ``max_tokens`` padded tokens when > 0 (see :func:`plan_batches`).
    """
    if on_too_long not in ("error", "skip"):
        raise ValueError("on_too_long must be 'error' or 'skip'")
    prefix_ids, rows, single, first_ids = build_rows(lm.tokenizer, prefix_text, queries, verbalizers)
    P = len(prefix_ids)
    lengths = np.array([len(r.ids) + (0 if r.standalone else P) for r in rows])
    too_long = lengths > lm.max_context
    if too_long.any() and on_too_long == "error":
        raise PromptTooLongError(_too_long_message(lengths, lm.max_context, P) + "; on_too_long='skip' drops and "
                                 "counts them.")
    skipped_q = np.zeros(len(queries), dtype=bool)
    for r, bad in zip(rows, too_long):
        skipped_q[r.qi] |= bad
    live = [r for r in rows if not skipped_q[r.qi]]
    reuse_rows, full_rows, note = plan_reuse(lm.model, prefix_ids, live) if reuse_prefix else \
        ([], [standalone_row(r, prefix_ids) for r in live], "")
    pbar = _progress(len(live), "scoring", progress)
    logprobs = np.full((len(queries), len(verbalizers)), np.nan)
    top1 = np.full(len(queries), -1, dtype=np.int64)
    done, tokens = run_groups(lm, prefix_ids, reuse_rows, full_rows, batch_size, pbar, max_tokens=max_tokens)
    for group, scores, tops, _ in done:
        for r, sc, t in zip(group, scores, tops):
            for lab in range(len(verbalizers)):
                if not np.isnan(sc[lab]):
                    logprobs[r.qi, lab] = sc[lab]
            if r.sets[0] or single:
                top1[r.qi] = t
    if pbar is not None:
        pbar.close()
    return {"logprobs": logprobs, "top1": top1, "first_ids": first_ids, "skipped": skipped_q,
            "single_token": single, "prefix_tokens": P, "tokens_processed": int(tokens),
            "n_prefix_fallback": len({r.qi for r in full_rows}) if reuse_prefix else 0, "prefix_reuse_note": note,
            "query_tokens": lengths - np.array([0 if r.standalone else P for r in rows])}


def _too_long_message(lengths: np.ndarray, context: int, P: int) -> str:
    return (f"{int((lengths > context).sum())} of {len(lengths)} prompts exceed the model's context of {context} "
            f"tokens (longest {int(lengths.max())}; prefix {P}). Use fewer demonstrations (k), a shorter prefix "
            "or a model with a longer context")


def check_context(tokenizer, context: int, prefix_text: str, queries: list[str], verbalizers: tuple) -> int:
    """Raise :class:`PromptTooLongError` when a ``prefix + query + verbalizer`` prompt, tokenised as
    :func:`score_prompts` tokenises it, is longer than ``context``; the tokenizer alone decides, so this runs
    before any weights load. Returns the longest prompt's length."""
    prefix_ids, rows, _, _ = build_rows(tokenizer, prefix_text, queries, verbalizers)
    P = len(prefix_ids)
    lengths = np.array([len(r.ids) + (0 if r.standalone else P) for r in rows])
    if (lengths > context).any():
        raise PromptTooLongError(_too_long_message(lengths, context, P) + ".")
    return int(lengths.max())


def largest_batch_memory(lm, prefix_text: str, queries: list[str], verbalizers: tuple, batch_size: int = 8,
                         reuse_prefix: bool = True, max_tokens: int = 0):
    """Tensor memory (:func:`probes.tensor_memory`) of scoring the largest batch (most padded tokens) that
    :func:`score_prompts` forms for these queries, the prefix cache built inside the measurement: the
    model's weights, the prefix KV cache, the batch's activations and logits at their joint peak. The
    peak of a whole evaluation is this batch's (every other batch is smaller), measured the same way on
    every device, in a process of any age."""
    prefix_ids, rows, _, _ = build_rows(lm.tokenizer, prefix_text, queries, verbalizers)
    P = len(prefix_ids)
    rows = [r for r in rows if len(r.ids) + (0 if r.standalone else P) <= lm.max_context]
    reuse_rows, full_rows, _ = plan_reuse(lm.model, prefix_ids, rows) if reuse_prefix else \
        ([], [standalone_row(r, prefix_ids) for r in rows], "")
    pad_id = models.pad_id(lm.tokenizer)
    best = None  # (padded tokens incl. the prefix, group, batch, uses the prefix)
    for group, use_prefix in ((reuse_rows, True), (full_rows, False)):
        for b in (plan_batches(group, batch_size, max_tokens) if group else []):
            tokens = len(b) * (max(len(group[i].ids) for i in b) + (P if use_prefix else 0))
            if best is None or tokens > best[0]:
                best = (tokens, group, b, use_prefix)
    key = None if best is None else _memory_key(lm, [best[1][i] for i in best[2]], P if best[3] else 0)
    if key is not None and key in _BATCH_MEMORY:
        return dataclasses.replace(_BATCH_MEMORY[key], by_kind_mb=dict(_BATCH_MEMORY[key].by_kind_mb or {}))
    with tensor_memory(lm.model) as m:
        if best is not None:
            _, group, b, use_prefix = best
            kv = encode_prefix(lm.model, prefix_ids, lm.device) if (use_prefix and prefix_ids) else None
            forward_rows(lm.model, group, Prefix(prefix_ids, kv), pad_id, lm.device, [b])
    if key is not None:
        _BATCH_MEMORY[key] = dataclasses.replace(m, by_kind_mb=dict(m.by_kind_mb or {}))
    return m


# Tensor bytes of a forward depend on shapes, not values: the same model structure (parameter names, shapes,
# dtypes; config; attention kernel), device and batch layout (each row's length, answer offset and label-set
# offsets, the prefix length) give the same bytes. A study scores many students of one base model on the
# same queries, so the measurement of each such batch is kept for the process and reused
# (tests/test_memory.py measures a second model of the same shape afresh and gets the same bytes).
_BATCH_MEMORY: dict = {}


def _memory_key(lm, rows: list, prefix_len: int) -> tuple:
    model = lm.model
    structure = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in (*model.named_parameters(), *model.named_buffers()))
    cfg = getattr(model, "config", None)
    conf = {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"} if cfg is not None else {}
    return (type(model).__qualname__, structure, json.dumps(conf, sort_keys=True, default=str),
            getattr(cfg, "_attn_implementation", None), str(lm.device), attention.SPLIT_KERNEL, attention.MATH_MAX_SCORES,
            uses_split_attention(model, lm.device), torch.__version__, prefix_len,
            tuple((len(r.ids), r.answer_offset, r.standalone, tuple(tuple(o for o, _ in st) for st in r.sets))
                  for r in rows))
