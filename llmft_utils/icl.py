"""In-context learning evaluation with a shared, reused demonstration prefix.

Scoring ("score accuracy"): the prediction is the label whose verbalizer continuation has the highest
log-probability after the prompt. When every verbalizer is a single token, one forward pass per query
gives all labels (the log-softmax at the answer position); otherwise each (query, label) pair is scored
by the summed log-probability of its continuation tokens. Full-vocabulary top-1 at the answer position
is recorded too, to report how often the model would have said something else entirely.

Prefix reuse: the k demonstrations are encoded once per (model, k, seed) and their keys/values are
shared by every batch of queries. Every query is tokenised *together with* the prefix (as the model
would see the whole prompt) and the reuse is only taken when those ids start with the prefix's own ids;
otherwise that query is scored on its full prompt (counted in ``n_prefix_fallback``).

How the shared prefix is attended to: for Llama- and OPT-style models, on any device, by
:func:`split_prefix_attention` (the prefix's keys/values are never copied per row; on CPU ~3x faster
attention than a broadcast cache); otherwise by a key/value cache broadcast over the batch. Inputs go
to the device once per run and results come back once (:func:`_forward_rows`).

Exactness: a row is only scored on the reused prefix where that is exact for the model's kind of
attention (:func:`exact_reuse_length`: unlimited for full attention, within the window for sliding
windows, never for anything else); the other rows are scored on their full prompts, and the reason is
logged and returned as ``prefix_reuse_note``. Every run that reuses a prefix re-scores its most padded
row on its full prompt and raises :class:`PrefixReuseMismatch` if the two disagree.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import logs
from .models import attention_implementation
from .patterns import Pattern, build_prefix, query_text
from .probes import TensorMemory, probe
from .stats import balanced_accuracy, expected_calibration_error


log = logs.get(__name__)


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context window (never truncated silently)."""


class PrefixReuseMismatch(RuntimeError):
    """A row scored on the reused prefix disagrees with the same row scored on its full prompt."""


@dataclass
class Row:
    qi: int  # query index
    ids: list  # token ids after the prefix (query [+ continuation[:-1]])
    sets: list  # per label: list of (offset_from_end, token_id) whose log-probs are summed
    answer_offset: int  # offset from end of the position predicting the first answer token
    standalone: bool = False  # True: ids already hold the whole prompt (prefix-reuse fallback)


def _tok(tokenizer, texts, special: bool):
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def continuation_ids(tokenizer, contexts: list[str], verbalizers: tuple) -> list[list[list[int]]]:
    """Per context, per verbalizer: the continuation's token ids when encoded together with the context.

    From ``FAST_SPLIT_MIN`` contexts on, for tokenizers where it is exact (:func:`_local_tokenizer`), each
    context is cut at its third-last pre-token and only the distinct tails are encoded with the
    verbalizers (a pattern's prompts all end alike: usually one tail for all), checked on
    ``FAST_SPLIT_CHECK`` contexts against whole-context encoding."""
    if len(contexts) >= FAST_SPLIT_MIN and _local_tokenizer(tokenizer):
        fast = _continuations_by_tail(tokenizer, contexts, verbalizers)
        if fast is not None:
            return fast
    return _continuation_ids(tokenizer, contexts, verbalizers)


def _continuation_ids(tokenizer, contexts: list[str], verbalizers: tuple) -> list[list[list[int]]]:
    ctx = _tok(tokenizer, contexts, False)
    out = [[None] * len(verbalizers) for _ in contexts]
    for j, v in enumerate(verbalizers):
        whole = _tok(tokenizer, [c + v for c in contexts], False)
        for i, (w, c) in enumerate(zip(whole, ctx)):
            if w[: len(c)] != c or len(w) == len(c):
                raise ValueError(f"the verbalizer {v!r} merges with the end of the prompt under this tokenizer "
                                 f"(context ...{contexts[i][-30:]!r}); choose another pattern/verbalizer")
            out[i][j] = w[len(c):]
    return out


def _tail_start(tokenizer, text: str) -> int | None:
    """Where ``text``'s third-last pre-token starts (the cut of the tail tokenisations; exact for
    :func:`_local_tokenizer` tokenizers), or None when it has fewer than four pre-tokens."""
    chunks = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    return chunks[-3][1][0] if len(chunks) >= 4 else None


def _check_indices(n: int) -> list[int]:
    """Up to ``FAST_SPLIT_CHECK`` indices spread over ``range(n)``: the items a tail tokenisation is
    checked on against whole-text tokenisation."""
    return sorted(set(np.linspace(0, n - 1, min(FAST_SPLIT_CHECK, n)).astype(int).tolist()))


def _continuations_by_tail(tokenizer, contexts: list[str], verbalizers: tuple):
    tails = []
    for c in contexts:
        cut = _tail_start(tokenizer, c)
        if cut is None:
            return None
        tails.append(c[cut:])
    uniq = sorted(set(tails))
    table = dict(zip(uniq, _continuation_ids(tokenizer, uniq, verbalizers)))
    out = [table[t] for t in tails]
    probe_at = _check_indices(len(contexts))
    if _continuation_ids(tokenizer, [contexts[i] for i in probe_at], verbalizers) != [out[i] for i in probe_at]:
        log.warning("tail encoding of the verbalizers differs from whole-context encoding; encoding whole contexts")
        return None
    return out


_LOCAL_PRETOKENIZERS = ("ByteLevel", "Digits", "Split")
FAST_SPLIT_MIN = 64  # queries from which split_prefix tokenises tails instead of whole prompts
FAST_SPLIT_CHECK = 16  # queries re-tokenised whole to check the tail tokenisation


def _local_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is one whose encoding of ``text[:c] + rest`` is the encoding of ``text[:c]``
    followed by that of ``rest`` for any pre-token boundary ``c`` of ``text`` that lies before its last
    two pre-tokens: a fast BPE tokenizer with no normaliser whose pre-tokenizers only split by regex,
    bytes or digits (ByteLevel without an added prefix space, Digits, Split) — GPT-2, OPT, Llama 3,
    SmolLM2 and the like. Their pre-token boundaries depend on the text up to one character past them,
    and BPE merges never cross them."""
    cached = getattr(tokenizer, "_llmft_local", None)
    if cached is not None:
        return cached
    ok = False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        import json

        j = json.loads(backend.to_str())
        pre = j.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        ok = (j.get("normalizer") is None and (j.get("model") or {}).get("type") == "BPE" and bool(parts)
              and all(p.get("type") in _LOCAL_PRETOKENIZERS and not p.get("add_prefix_space", False)
                      and (p.get("type") != "Split" or p.get("behavior") == "Isolated") for p in parts))
    try:
        tokenizer._llmft_local = ok
    except AttributeError:
        pass
    return ok


def _tail_split(tokenizer, prefix_text: str, prefix_ids: list, queries: list[str]):
    """:func:`split_prefix`'s result computed from ``tail + query`` instead of ``prefix + query`` (tail: the
    prefix from its third-last pre-token on), or None where that is not known to be exact. Exact for
    :func:`_local_tokenizer` tokenizers whose prefix ids end with the tail's ids (the special tokens
    only at the start); checked again on ``FAST_SPLIT_CHECK`` queries against whole-prompt
    tokenisation (any difference: None, and the caller tokenises whole prompts)."""
    if not _local_tokenizer(tokenizer):
        return None
    cut = _tail_start(tokenizer, prefix_text)
    if cut is None:
        return None
    tail = prefix_text[cut:]
    tail_ids = _tok(tokenizer, [tail], False)[0]
    T = len(tail_ids)
    if not T or prefix_ids[-T:] != tail_ids:
        return None
    head = prefix_ids[:-T]
    out = []
    for ids in _tok(tokenizer, [tail + q for q in queries], False):
        out.append((ids[T:], False) if ids[:T] == tail_ids else (head + ids, True))
    probe_at = _check_indices(len(queries))
    whole = _tok(tokenizer, [prefix_text + queries[i] for i in probe_at], True)
    for i, w in zip(probe_at, whole):
        ids, standalone = out[i]
        if (ids if standalone else prefix_ids + ids) != w:
            log.warning("tail tokenisation differs from whole-prompt tokenisation for this tokenizer; "
                        "tokenising whole prompts")
            return None
    return out


def split_prefix(tokenizer, prefix_text: str, queries: list[str]):
    """Tokenise the prefix alone and every ``prefix + query`` together. Returns ``prefix_ids`` and, per query,
    ``(ids, standalone)``: the ids after the prefix, or the whole prompt's ids when its tokenisation does
    not start with the prefix's own ids (then the prefix cache cannot be reused for it).

    From ``FAST_SPLIT_MIN`` queries on, tokenizers for which it is exact (:func:`_tail_split`) tokenise only
    the prefix's last pre-tokens with each query, not the whole prefix again (same ids; 5-10x less work at
    k = 16)."""
    prefix_ids = _tok(tokenizer, [prefix_text], True)[0]
    if prefix_text and len(queries) >= FAST_SPLIT_MIN:
        fast = _tail_split(tokenizer, prefix_text, prefix_ids, queries)
        if fast is not None:
            return prefix_ids, fast
    P = len(prefix_ids)
    out = []
    for ids in _tok(tokenizer, [prefix_text + q for q in queries], True):
        standalone = ids[:P] != prefix_ids
        out.append((ids if standalone else ids[P:], standalone))
    return prefix_ids, out


ROWS_CACHE_SIZE = 8  # build_rows results kept (per process), most recently used first
_rows_cache: list = []


def build_rows(tokenizer, prefix_text: str, queries: list[str], verbalizers: tuple):
    """Tokenise prefix and queries; return (prefix_ids, rows, single_token, first verbalizer ids per query).

    The last ``ROWS_CACHE_SIZE`` results are kept, keyed by the tokenizer object and the texts: scoring the
    same queries again (every student on the same evaluation sets) does not tokenise them again. The
    result is shared: callers must not modify it."""
    import hashlib

    h = hashlib.sha256(prefix_text.encode())
    for q in queries:
        h.update(b"\0" + q.encode())
    key = (id(tokenizer), h.hexdigest(), len(queries), tuple(verbalizers))
    for i, (k, tok_ref, value) in enumerate(_rows_cache):
        if k == key and tok_ref is tokenizer:
            _rows_cache.insert(0, _rows_cache.pop(i))
            return value
    value = _build_rows(tokenizer, prefix_text, queries, verbalizers)
    _rows_cache.insert(0, (key, tokenizer, value))
    del _rows_cache[ROWS_CACHE_SIZE:]
    return value


def _build_rows(tokenizer, prefix_text: str, queries: list[str], verbalizers: tuple):
    prefix_ids, split = split_prefix(tokenizer, prefix_text, queries)
    conts = continuation_ids(tokenizer, queries, verbalizers)
    single = (all(len(c) == 1 for per_q in conts for c in per_q)
              and len({tuple(c[0] for c in per_q) for per_q in conts}) == 1)
    rows = []
    for qi, ((q_ids, standalone), per_q) in enumerate(zip(split, conts)):
        if single:
            rows.append(Row(qi, q_ids, [[(-1, c[0])] for c in per_q], -1, standalone))
        else:
            for lab, c in enumerate(per_q):
                sets = [[] for _ in per_q]  # only this label's set is scored on this row
                sets[lab] = [(-(len(c) - j), t) for j, t in enumerate(c)]
                rows.append(Row(qi, q_ids + c[:-1], sets, -len(c), standalone))
    return prefix_ids, rows, single, [[c[0] for c in per_q] for per_q in conts]


# ----------------------------------------------------------------------------- when reuse is exact

# nats, by the model's dtype (any other, e.g. quantised weights: the loosest); see _check_reuse.
# "tf32": float32 weights on CUDA with TF32 matmuls (models.set_tf32), measured on an H200: 0.0067 at most.
REUSE_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, "tf32": 0.05, torch.float16: 0.1, torch.bfloat16: 0.5}
CHECK_TOP = 5  # the self-check compares the reference's top tokens at the answer position too


def layer_types(config) -> list[str]:
    """Per decoder layer, its kind as transformers names it (``full_attention``, ``sliding_attention``,
    ``chunked_attention``, ``linear_attention``, ``mamba``...), read from the text config (the decoder
    of a multimodal model, e.g. Gemma 3's ``text_config``). Where the config does not list
    ``layer_types``, inferred as transformers' cache infers it: sliding where ``sliding_window`` is
    set (Mistral), chunked where ``attention_chunk_size`` is, full attention otherwise."""
    cfg = config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return list(types)
    if getattr(cfg, "sliding_window", None) is not None:
        kind = "sliding_attention"
    elif getattr(cfg, "attention_chunk_size", None) is not None:
        kind = "chunked_attention"
    else:
        kind = "full_attention"
    return [kind] * cfg.num_hidden_layers


def exact_reuse_length(config) -> tuple[float, str]:
    """The longest prefix + padded query (tokens) for which scoring on the reused prefix is exact,
    and, where that is limited, why.

    A reused row lies in cache positions as ``[prefix ; left padding ; query]``; its full prompt is
    ``[prefix ; query]``. Full attention: the padding is masked and the position ids skip it, so the
    row sees what its full prompt sees — unlimited. Sliding window W (a key is seen while query − key
    < W in cache positions, as transformers' mask and flash kernels define it): the padding counts in
    that distance, so a padded row would lose prefix tokens its full prompt still sees; a cache of the
    prefix alone would moreover keep only its last W − 1 tokens. When prefix + padded length ≤ W every
    distance is < W and the window masks nothing, on the reused prefix and on the full prompt alike:
    exact. (Left-padded full prompts are exact for any window: padding shifts all of a row's positions
    equally.) Any other layer kind (chunked, linear/recurrent, ...) or a window of unknown size: 0,
    never reused."""
    types = set(layer_types(config))
    if types <= {"full_attention"}:
        return math.inf, ""
    window = getattr(config.get_text_config(decoder=True), "sliding_window", None)
    if types <= {"full_attention", "sliding_attention"} and isinstance(window, int):
        return window, f"sliding-window attention (window {window}) is exact on a reused prefix only while " \
                       f"prefix + padded query <= {window} tokens"
    return 0, f"layer types {sorted(types - {'full_attention'})} cannot share a reused prefix exactly"


def _standalone(r: Row, prefix_ids: list) -> Row:
    """``r`` as a full prompt (prefix ids + its ids), scored without the prefix cache."""
    return r if r.standalone else Row(r.qi, prefix_ids + r.ids, r.sets, r.answer_offset, True)


def _plan_reuse(model, prefix_ids: list, rows: list) -> tuple[list, list, str]:
    """``(reuse_rows, full_rows, note)``: the rows scored on the reused prefix, those scored on full
    prompts (tokenisation mismatches, and rows too long for :func:`exact_reuse_length`), and the
    reason for the latter ("" when there are none). Decided before any prefix cache is built. Every
    reused row fits the limit on its own, so every batch of them does too, padding included."""
    P = len(prefix_ids)
    limit, reason = exact_reuse_length(model.config) if P else (math.inf, "")
    fits = [not r.standalone and P + len(r.ids) <= limit for r in rows]
    reuse = [r for r, f in zip(rows, fits) if f]
    full = [_standalone(r, prefix_ids) for r, f in zip(rows, fits) if not f]
    moved = {r.qi for r, f in zip(rows, fits) if not (f or r.standalone)}
    if not moved:
        return reuse, full, ""
    note = (f"{model.config.model_type}: {reason} (prefix {P}); {len(moved)} of {len({r.qi for r in rows})} "
            "queries scored on full prompts")
    log.warning(note)
    return reuse, full, note


def _prefix_kv(model, prefix_ids: list, device: str):
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values
    if hasattr(pkv, "layers"):
        return [(layer.keys.contiguous(), layer.values.contiguous()) for layer in pkv.layers]
    return [(k.contiguous(), v.contiguous()) for k, v in pkv]  # legacy tuple format


# ----------------------------------------------------------------------------- split prefix attention

SPLIT_ATTENTION = "llmft_split_prefix"  # the name it is registered under in transformers' AttentionInterface
SPLIT_MODEL_TYPES = ("llama", "opt")  # decoders whose attention modules dispatch through AttentionInterface


def _flash_lse(q, k, v, mask, scale):
    """Fused attention returning ``(output, logsumexp)`` (torch's CPU flash kernel, the one SDPA uses)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


MATH_MAX_SCORES = 2 ** 27  # attention scores held at once by _math_lse (float32: 512 MB); larger inputs are chunked


def _math_lse(q, k, v, bias, scale):
    """``(output, logsumexp)`` of softmax attention written out in float32 matmuls, for any device:

        s = q·kᵀ·scale + bias,   lse = logsumexp(s),   o = exp(s − lse)·v

    Query rows are processed in chunks of at most :data:`MATH_MAX_SCORES` scores. A row that sees no key
    (every bias −inf) gets ``lse = −inf`` and ``o = 0`` (the merge in :func:`split_prefix_attention` then
    takes nothing from it). ``q`` (…, M, D), ``k``/``v`` (…, N, D) with the same leading dims (or 1),
    ``bias`` broadcastable to (…, M, N) or None. Used where the fused CPU kernel is not available (GPUs):
    it never copies the keys per row."""
    M, N = q.shape[-2], k.shape[-2]
    lead = max(1, math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])))
    step = max(1, MATH_MAX_SCORES // (lead * max(N, 1)))
    kt, vf = k.float().transpose(-1, -2), v.float()
    outs, lses = [], []
    for s in range(0, M, step):
        sc = torch.matmul(q[..., s:s + step, :].float(), kt) * scale
        if bias is not None:
            sc = sc + bias[..., s:s + step, :] if bias.shape[-2] != 1 else sc + bias
        lse = torch.logsumexp(sc, -1)
        outs.append(torch.matmul(torch.exp(sc - lse.clamp_min(-1e30)[..., None]), vf))
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def _efficient_lse(q, k, v, scale):
    """Fused ``(output, logsumexp)`` on CUDA without a mask (torch's memory-efficient kernel, which SDPA uses
    for float32; its log-sum-exp comes padded to a multiple of 32 rows and is cut back here)."""
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
    return out, lse[..., :q.shape[-2]]


SPLIT_KERNELS = ("auto", "fused", "math")
SPLIT_KERNEL_ENV = "LLMFT_SPLIT_KERNEL"  # sets SPLIT_KERNEL at import (e.g. for tools/study_direct.py on a GPU)
# auto: the fused CPU kernel on CPU, _math_lse elsewhere | fused: also CUDA's memory-efficient kernel for the prefix
# part (not yet run on a GPU: benchmarks/check_split_kernels.py checks it against _math_lse; it becomes "auto" once
# measured) | math: _math_lse everywhere (tests, and the reference of that check)
SPLIT_KERNEL = os.environ.get(SPLIT_KERNEL_ENV, "auto")
if SPLIT_KERNEL not in SPLIT_KERNELS:
    raise ValueError(f"${SPLIT_KERNEL_ENV}={SPLIT_KERNEL!r}: use one of {SPLIT_KERNELS}")


def _attend(q, k, v, bias, scale):
    if SPLIT_KERNEL in ("auto", "fused") and q.device.type == "cpu" and _CPU_FLASH:
        return _flash_lse(q, k, v, bias, scale)
    if SPLIT_KERNEL == "fused" and q.device.type == "cuda" and bias is None and _CUDA_EFFICIENT:
        return _efficient_lse(q, k, v, scale)
    return _math_lse(q, k, v, bias, scale)


def split_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           llmft_prefix_kv=None, llmft_split_calls=None, **kwargs):
    """Attention of a batch of queries over ``[shared prefix ; own tokens]`` without copying the prefix per row.

    Softmax attention over a concatenation of key sets is the merge of the partial attentions by their
    log-sum-exp:

        o = o_P · exp(lse_P − lse) + o_Q · exp(lse_Q − lse),   lse = logaddexp(lse_P, lse_Q)

    where (o_P, lse_P) attend to the prefix (shared, un-masked: every query token sees all of it, so the
    batch is folded into the query axis and each key/value head runs one attention over the one copy of
    the prefix) and (o_Q, lse_Q) attend to the query's own tokens under the causal + padding mask.
    ``llmft_prefix_kv[layer]`` holds that layer's prefix keys/values, shape (1, kv_heads, P, head_dim),
    exactly as a cache stores them (after rotary embedding). Query heads map to key/value heads as in
    transformers' ``repeat_kv`` (head h uses kv head h // n_rep). Returns (batch, L, heads, head_dim).
    The partial attentions run in torch's fused CPU kernel on CPU and in :func:`_math_lse` elsewhere
    (``SPLIT_KERNEL="fused"``: the prefix part in CUDA's memory-efficient kernel, not yet measured on a GPU).
    Each call appends its layer to ``llmft_split_calls``: the proof, checked by :func:`_forward_rows`,
    that the model dispatched here rather than to a kernel that ignores the prefix."""
    pk, pv = llmft_prefix_kv[module.layer_idx]
    if llmft_split_calls is not None:
        llmft_split_calls.append(module.layer_idx)
    B, H, L, D = query.shape
    KVH = key.shape[1]
    rep = H // KVH
    scale = scaling if scaling is not None else D ** -0.5
    q = query.contiguous()
    qp = q.view(B, KVH, rep * L, D).transpose(0, 1).reshape(1, KVH, B * rep * L, D)
    o_p, lse_p = _attend(qp, pk.to(q.dtype), pv.to(q.dtype), None, scale)
    o_p = o_p.view(KVH, B, rep * L, D).transpose(0, 1).reshape(B, H, L, D)
    lse_p = lse_p.view(KVH, B, rep * L).transpose(0, 1).reshape(B, H, L)
    if attention_mask is None:  # no padding: plain causal
        attention_mask = torch.ones((L, L), dtype=torch.bool, device=q.device).tril()[None, None]
    bias = attention_mask if attention_mask.dtype != torch.bool else \
        torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attention_mask, float("-inf"))
    k_q, v_q = (key, value) if rep == 1 else (key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1))
    o_q, lse_q = _attend(q, k_q.contiguous(), v_q.contiguous(), bias.expand(B, 1, L, L), scale)
    lse = torch.logaddexp(lse_p, lse_q)
    w_q = torch.exp(lse_q - lse)[..., None]  # 0 where a (padding) row sees none of its own tokens
    out = o_p.float() * torch.exp(lse_p - lse)[..., None] + torch.where(w_q > 0, o_q.float() * w_q, 0.0)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register_split_attention() -> bool:
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(SPLIT_ATTENTION, split_prefix_attention)
        return True
    except Exception:  # an older transformers without the interface: the broadcast cache is used
        return False


_SPLIT_AVAILABLE = _register_split_attention()
_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
_CUDA_EFFICIENT = hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention")


def uses_split_attention(model, device: str) -> bool:
    """Whether prefix reuse runs through :func:`split_prefix_attention` for this model (any device)."""
    cfg = getattr(model, "config", None)
    return (_SPLIT_AVAILABLE and cfg is not None
            and getattr(cfg, "model_type", None) in SPLIT_MODEL_TYPES
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"))


def mask_arguments(model, mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """``attention_mask`` and ``position_ids`` for a forward with no prefix over a left-padded batch (``mask``
    (B, L), 1 = token), chosen so that transformers never reads the mask on the device. With a 2D mask its
    SDPA path tests ``mask.all()`` on the host, and without one it tests the positions for packed
    sequences; on a GPU each test waits for every queued kernel, once per forward. So for SDPA with full
    attention in every layer: the 4D causal-and-padding mask that transformers would build (it uses a 4D
    mask as given). Otherwise (eager attention reads nothing on the host; other kernels and layer kinds
    build their own masks) the 2D mask. The same scores on CPU, bit for bit (tested)."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if getattr(cfg, "_attn_implementation", None) == "sdpa" and set(layer_types(cfg)) <= {"full_attention"}:
        L = mask.shape[1]
        causal = torch.ones((L, L), dtype=torch.bool, device=mask.device).tril()
        return {"attention_mask": causal[None, None] & mask.bool()[:, None, None, :], "position_ids": position_ids}
    return {"attention_mask": mask, "position_ids": position_ids}


def _expand_cache(prefix_kv, batch: int):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), i)
    return cache


def _batches(rows: list[Row], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Row indices per batch: longest rows first, so rows of similar length share a batch. ``batch_size``
    rows per batch; or, with ``max_tokens > 0``, as many rows as keep the padded batch (rows × its
    longest row) within ``max_tokens`` tokens (at least one row), whatever ``batch_size``."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    if max_tokens <= 0:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    out, cur = [], []
    for i in order:  # the first row of a batch is its longest
        if cur and (len(cur) + 1) * len(rows[cur[0]].ids) > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def _most_padded(rows: list[Row], batch_size: int, max_tokens: int = 0, order=None) -> int:
    """Index of the row with the most left padding in its batch (the first in batch order on ties)."""
    pads = {i: max(len(rows[j].ids) for j in b) - len(rows[i].ids)
            for b in (order or _batches(rows, batch_size, max_tokens)) for i in b}
    return max(pads, key=pads.get)


def _batch_inputs(batch: list[Row], pad_id: int) -> dict:
    """Host tensors of one batch: left-padded ``ids`` and ``mask`` (B, L); the label-set gather ``pos`` /
    ``tok`` / ``valid`` (B, S, J) (J: the longest label set; positions counted from the first kept logit)
    and ``has`` (B, S); the answer position ``ans`` (B,); ``keep``, the logits to keep."""
    B, L = len(batch), max(len(r.ids) for r in batch)
    keep = max(max(-r.answer_offset, 1) for r in batch)
    S, J = len(batch[0].sets), max(1, max(len(t) for r in batch for t in r.sets))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    pos = torch.full((B, S, J), keep - 1, dtype=torch.long)
    tok = torch.zeros((B, S, J), dtype=torch.long)
    valid = torch.zeros((B, S, J), dtype=torch.long)
    for b, r in enumerate(batch):  # left padding: every row ends at the last column
        ids[b, L - len(r.ids):] = torch.tensor(r.ids)
        mask[b, L - len(r.ids):] = 1
        for s, tset in enumerate(r.sets):
            for j, (o, t) in enumerate(tset):
                pos[b, s, j], tok[b, s, j], valid[b, s, j] = keep + o, t, 1
    return {"ids": ids, "mask": mask, "pos": pos, "tok": tok, "valid": valid, "has": valid[..., 0].clone(),
            "ans": torch.tensor([keep + r.answer_offset for r in batch]), "keep": keep}


def _to_device(batches: list[dict], device: str) -> list[dict]:
    """Every batch's integer tensors moved in ONE host-to-device copy (pinned on CUDA), then split back."""
    names = [[n for n, v in b.items() if isinstance(v, torch.Tensor)] for b in batches]
    flat = torch.cat([b[n].reshape(-1) for b, ns in zip(batches, names) for n in ns])
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    out, at = [], 0
    for b, ns in zip(batches, names):
        d = dict(b)
        for n in ns:
            d[n] = flat[at:at + b[n].numel()].view(b[n].shape)
            at += b[n].numel()
        out.append(d)
    return out


def _forward_rows(model, rows: list[Row], prefix_ids: list, prefix_kv, pad_id: int, device: str,
                  batch_size: int, pbar=None, extract=None, split: bool | None = None, watch: int | None = None,
                  max_tokens: int = 0, order=None):
    """Log-prob sums per row and label set, the top-1 token at each row's answer position, ``extract``
    results and the watched row's answer-position log-probs.

    Everything stays on the model's device until the end (one host-to-device copy of all the batches'
    inputs before the first forward, one copy of the results back after the last; no per-row or
    per-batch synchronisation). ``extract(logits)`` (optional) is applied to each batch's raw
    answer-position logits (B, V) in float32 and returns a tuple of tensors (or None) with the batch as
    first dimension; the third value returned is that tuple over all rows, in row order, on the CPU (None
    without ``extract``; used to cache teacher distributions). ``split``: attend
    to the prefix with :func:`split_prefix_attention` (default: where supported); a forward in which it
    ran for fewer layers than the prefix cache has raises RuntimeError (the model would silently have
    scored without the prefix). ``watch``: a row index whose full answer-position log-softmax is the
    fourth value returned (None without it), for :func:`_check_reuse`. Batches: see :func:`_batches`, or
    ``order`` (lists of row indices) where given: then only those rows are scored, and the others keep
    NaN scores, top-1 0 and zero ``extract`` results."""
    P = len(prefix_ids) if prefix_kv is not None else 0
    split = bool(P) and (uses_split_attention(model, device) if split is None else split)
    order = order or _batches(rows, batch_size, max_tokens)
    batches = _to_device([_batch_inputs([rows[i] for i in idx], pad_id) for idx in order]
                         + [{"rows": torch.tensor([i for idx in order for i in idx])}], device)
    where = batches.pop()["rows"]  # row index of each result, in batch order
    sums, tops, ext, finite, watched = [], [], [], torch.ones((), dtype=torch.bool, device=device), None
    for idx, bt in zip(order, batches):
        B, L = bt["ids"].shape
        mask = bt["mask"]
        pos = (mask.cumsum(1) - 1).clamp(min=0) + P
        kw = {}
        if split:  # causal + padding mask over the queries' own tokens; the prefix is seen by all
            mask = torch.ones((L, L), dtype=torch.bool, device=mask.device).tril()[None, None] \
                & mask.bool()[:, None, None, :]
            kw["llmft_prefix_kv"] = prefix_kv
            kw["llmft_split_calls"] = calls = []
        elif P:
            kw["past_key_values"] = _expand_cache(prefix_kv, B)
            mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=mask.device), mask], 1)
        kw.update({"attention_mask": mask, "position_ids": pos} if P else
                  mask_arguments(model, mask, pos))
        with torch.inference_mode(), attention_implementation(model, SPLIT_ATTENTION if split else None):
            logits = model(input_ids=bt["ids"], use_cache=bool(P) and not split, logits_to_keep=bt["keep"],
                           **kw).logits
        if split and len(calls) < len(prefix_kv):
            raise RuntimeError(
                f"split prefix attention ran in {len(calls)} of {len(prefix_kv)} layers of "
                f"{getattr(model.config, 'model_type', type(model).__name__)}: its attention does not dispatch "
                "through transformers' AttentionInterface, so the rows were scored without the prefix. Use the "
                "broadcast cache (drop its model type from icl.SPLIT_MODEL_TYPES) or reuse_prefix=False.")
        with torch.inference_mode():
            logp = torch.log_softmax(logits.float(), dim=-1)
            finite &= torch.isfinite(logp).all()
            rb = torch.arange(B, device=logp.device)
            vals = logp[rb[:, None, None], bt["pos"], bt["tok"]]  # (B, S, J)
            acc = vals[..., 0]
            for j in range(1, vals.shape[-1]):  # summed in token order, as a running float32 sum
                acc = acc + torch.where(bt["valid"][..., j].bool(), vals[..., j], 0.0)
            sums.append(torch.where(bt["has"].bool(), acc, float("nan")))
            answer = logp[rb, bt["ans"]]  # (B, V): each row's answer-position log-softmax
            tops.append(answer.argmax(-1))
            if extract is not None:
                ext.append(extract(logits[rb, bt["ans"]].float()))
            if watch is not None and watch in idx:
                watched = answer[idx.index(watch)].clone()
        if pbar is not None:
            pbar.update(B)
    with torch.inference_mode():
        if not bool(finite):
            raise FloatingPointError("non-finite log-probabilities from the model (NaN/inf); check dtype and inputs")
        scores = torch.full((len(rows), len(rows[0].sets)), float("nan"), device=where.device)
        scores[where] = torch.cat(sums)
        top1 = torch.zeros(len(rows), dtype=torch.long, device=where.device)
        top1[where] = torch.cat(tops)
        extracted = None
        if extract is not None:
            extracted = tuple(None if p[0] is None else _placed(torch.cat(p), where, len(rows)).cpu()
                              for p in zip(*ext))
    return (scores.double().cpu().numpy(), top1.cpu().numpy(), extracted,
            (watched.cpu() if watched is not None else None))


def _placed(values: torch.Tensor, where: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` (one per index in ``where``) placed at those rows of an ``n``-row zero tensor."""
    out = values.new_zeros((n, *values.shape[1:]))
    out[where] = values
    return out


def _check_reuse(model, prefix_ids: list, row: Row, scores, answer_logp, pad_id: int, device: str):
    """Re-score ``row`` (scored on the reused prefix: label-set ``scores``, answer-position
    ``answer_logp``) on its full prompt, alone and unpadded, and raise :class:`PrefixReuseMismatch`
    if its label-set log-probs or the log-probs of the reference's top tokens at the answer position
    differ by more than ``REUSE_TOLERANCE`` for the model's dtype. One batch-1 forward per run.

    Honest noise (the reused prefix changes the summation order, not the computation), the largest
    difference over all rows of tiny random OPT/Llama/GPT-2/Mistral/Gemma 3 models and of SmolLM2-135M
    on CPU: float32 1.5e-5 nats, float16 0.034, bfloat16 0.25; SmolLM2-135M on an H200 GPU with TF32
    matmuls: 0.0067 (in float32 there it stayed within 1e-3). The tolerances are 60x, 3x, 2x and 7x that.
    A wrong prefix is off by ~0.1-1 nats (a sliding window cutting the prefix) or more (no prefix):
    float32 catches both; half precision only the gross errors."""
    ref_scores, _, _, ref_logp = _forward_rows(model, [_standalone(row, prefix_ids)], prefix_ids, None, pad_id,
                                               device, 1, watch=0)
    top = ref_logp.topk(CHECK_TOP).indices
    diffs = np.concatenate([np.abs(scores - ref_scores[0])[~np.isnan(scores)],
                            (answer_logp[top] - ref_logp[top]).abs().numpy()])
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        dtype = "tf32"
    tol = REUSE_TOLERANCE.get(dtype, max(REUSE_TOLERANCE.values()))
    if not diffs.max() <= tol:
        raise PrefixReuseMismatch(
            f"{getattr(model.config, 'model_type', type(model).__name__)}: scoring on the reused prefix differs from "
            f"the full prompt by {diffs.max():.3g} nats (tolerance {tol:g} for {str(dtype).replace('torch.', '')}) "
            f"on query {row.qi}. The prefix reuse is not exact for this model: pass reuse_prefix=False (full "
            "prompts) and report the model type (in half precision, first check whether float32 agrees).")


def _world() -> tuple[int, int]:
    """``(world size, rank)`` of the running torch.distributed group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _gather_shards(positions: list, scores, top1, ex, world: int):
    """Every process's results at its ``positions`` (the rows it scored), in one set of arrays on every
    process: each sends only its own rows (``all_gather_object``) and fills in the others'."""
    idx = np.asarray(positions, dtype=np.int64)
    part = (idx, scores[idx], top1[idx], None if ex is None else tuple(None if e is None else e[idx] for e in ex))
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, part)
    with torch.inference_mode():  # ex holds inference tensors (from _forward_rows)
        if ex is None:  # this process scored nothing: shaped like another's results
            first = next((g[3] for g in gathered if g[3] is not None), None)
            ex = None if first is None else tuple(None if e is None else e.new_zeros((len(scores), *e.shape[1:]))
                                                  for e in first)
        for pos, sc, t1, e in gathered:
            scores[pos], top1[pos] = sc, t1
            for out, got in zip(ex or (), e or ()):
                if out is not None:
                    out[torch.as_tensor(pos)] = got
    return scores, top1, ex


def _run_groups(lm, prefix_ids: list, reuse_rows: list, full_rows: list, batch_size: int, pbar, extract=None,
                max_tokens: int = 0):
    """Forward the prefix-reusing rows (one prefix cache, checked by :func:`_check_reuse` on its most
    padded row) and the standalone rows. Returns a list of ``(rows, scores, top1, extracted)`` per
    non-empty group (as :func:`_forward_rows` returns them; ``extract`` returns a tuple) and the number
    of tokens run through the model (the check's forward not counted).

    Inside a torch.distributed group (``accelerate launch``/``torchrun``) each of the W processes scores
    the batches ``rank::W`` of each group — whole batches, exactly as one process would form them — (its
    own prefix cache and self-check) and every process gets all results back in row order
    (``all_gather_object``): bit for bit the values of one process, in about 1/W of the time."""
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    world, rank = _world()
    tokens = 0
    out = []
    for group, use_prefix in ((reuse_rows, True), (full_rows, False)):
        if not group:
            continue
        mine = _batches(group, batch_size, max_tokens)[rank::world]  # one process: every batch
        kv = _prefix_kv(lm.model, prefix_ids, lm.device) if (use_prefix and prefix_ids and mine) else None
        watch = _most_padded(group, batch_size, max_tokens, mine) if kv is not None else None
        scores, top1, ex, watched = np.full((len(group), len(group[0].sets)), np.nan), np.zeros(len(group), np.int64), \
            None, None  # a process with no batch (fewer batches than processes) scores nothing
        if mine:
            scores, top1, ex, watched = _forward_rows(lm.model, group, prefix_ids, kv, pad_id, lm.device, batch_size,
                                                      pbar, extract, watch=watch, max_tokens=max_tokens, order=mine)
        if kv is not None:
            _check_reuse(lm.model, prefix_ids, group[watch], scores[watch], watched, pad_id, lm.device)
        if world > 1:
            scores, top1, ex = _gather_shards([i for b in mine for i in b], scores, top1, ex, world)
        out.append((group, scores, top1, ex))
        tokens += sum(len(r.ids) for r in group) + (len(prefix_ids) if use_prefix and prefix_ids else 0)
    return out, tokens


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from .progress import bar

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
    reuse_rows, full_rows, _ = _plan_reuse(lm.model, prefix_ids, rows)
    pbar = _progress(len(rows), "teacher", progress)
    single = []  # whether extract returns one tensor (recorded at its first call), not a tuple

    def as_tuple(logits):
        e = extract(logits)
        if not single:
            single.append(not isinstance(e, tuple))
        return (e,) if single[0] else e

    done, _ = _run_groups(lm, prefix_ids, reuse_rows, full_rows, batch_size, pbar, as_tuple, max_tokens)
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
    rows, or up to ``max_tokens`` padded tokens when > 0 (see :func:`_batches`).
    """
    if on_too_long not in ("error", "skip"):
        raise ValueError("on_too_long must be 'error' or 'skip'")
    prefix_ids, rows, single, first_ids = build_rows(lm.tokenizer, prefix_text, queries, verbalizers)
    P = len(prefix_ids)
    lengths = np.array([len(r.ids) + (0 if r.standalone else P) for r in rows])
    too_long = lengths > lm.max_context
    if too_long.any():
        worst = int(lengths.max())
        msg = (f"{int(too_long.sum())} of {len(rows)} prompts exceed the model's context of {lm.max_context} tokens "
               f"(longest {worst}; demonstration prefix {P}). Use fewer demonstrations (k), a model with a longer "
               "context, or on_too_long='skip' to drop and count them.")
        if on_too_long == "error":
            raise PromptTooLongError(msg)
    skipped_q = np.zeros(len(queries), dtype=bool)
    for r, bad in zip(rows, too_long):
        skipped_q[r.qi] |= bad
    live = [r for r in rows if not skipped_q[r.qi]]
    reuse_rows, full_rows, note = _plan_reuse(lm.model, prefix_ids, live) if reuse_prefix else \
        ([], [_standalone(r, prefix_ids) for r in live], "")
    pbar = _progress(len(live), "scoring", progress)
    logprobs = np.full((len(queries), len(verbalizers)), np.nan)
    top1 = np.full(len(queries), -1, dtype=np.int64)
    done, tokens = _run_groups(lm, prefix_ids, reuse_rows, full_rows, batch_size, pbar, max_tokens=max_tokens)
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


def largest_batch_memory(lm, prefix_text: str, queries: list[str], verbalizers: tuple, batch_size: int = 8,
                         reuse_prefix: bool = True, max_tokens: int = 0):
    """Tensor memory (:func:`probes.tensor_memory`) of scoring the largest batch (most padded tokens) that
    :func:`score_prompts` forms for these queries, the prefix cache built inside the measurement: the
    model's weights, the prefix KV cache, the batch's activations and logits at their joint peak. The
    peak of a whole evaluation is this batch's (every other batch is smaller), measured the same way on
    every device, in a process of any age."""
    from .probes import tensor_memory

    prefix_ids, rows, _, _ = build_rows(lm.tokenizer, prefix_text, queries, verbalizers)
    P = len(prefix_ids)
    rows = [r for r in rows if len(r.ids) + (0 if r.standalone else P) <= lm.max_context]
    reuse_rows, full_rows, _ = _plan_reuse(lm.model, prefix_ids, rows) if reuse_prefix else \
        ([], [_standalone(r, prefix_ids) for r in rows], "")
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    best = None  # (padded tokens incl. the prefix, group, batch, uses the prefix)
    for group, use_prefix in ((reuse_rows, True), (full_rows, False)):
        for b in (_batches(group, batch_size, max_tokens) if group else []):
            tokens = len(b) * (max(len(group[i].ids) for i in b) + (P if use_prefix else 0))
            if best is None or tokens > best[0]:
                best = (tokens, group, b, use_prefix)
    key = None if best is None else _memory_key(lm, [best[1][i] for i in best[2]], P if best[3] else 0)
    if key is not None and key in _BATCH_MEMORY:
        return dataclasses.replace(_BATCH_MEMORY[key], by_kind_mb=dict(_BATCH_MEMORY[key].by_kind_mb or {}))
    with tensor_memory(lm.model) as m:
        if best is not None:
            _, group, b, use_prefix = best
            kv = _prefix_kv(lm.model, prefix_ids, lm.device) if (use_prefix and prefix_ids) else None
            _forward_rows(lm.model, group, prefix_ids, kv, pad_id, lm.device, batch_size, order=[b])
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
            getattr(cfg, "_attn_implementation", None), str(lm.device), SPLIT_KERNEL, MATH_MAX_SCORES,
            uses_split_attention(model, lm.device), torch.__version__, prefix_len,
            tuple((len(r.ids), r.answer_offset, r.standalone, tuple(tuple(o for o, _ in st) for st in r.sets))
                  for r in rows))


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (c - h, c + h)


def label_metrics(gold, lp, ok) -> tuple[np.ndarray, dict]:
    """``(pred, metrics)`` of verbalizer log-probs ``lp`` (n × labels) against ``gold`` on the rows ``ok``: the
    predictions (-1 where not ok) and the accuracy metrics every scorer reports (count, skipped, majority
    baseline, accuracy with its Wilson interval, label-1 rate, per-label and balanced accuracy, ECE)."""
    pred = np.where(ok, np.nan_to_num(lp, nan=-np.inf).argmax(1), -1)
    n = int(ok.sum())
    correct = int((pred[ok] == gold[ok]).sum())
    lo, hi = wilson_ci(correct, n)
    counts = np.bincount(gold[ok], minlength=2)
    maj = int(counts.argmax()) if n else -1  # n = 0: every prompt skipped; nothing to score, never "accuracy 0"
    return pred, {
        "n_eval": n, "n_skipped_too_long": int((~ok).sum()),
        "majority_label": maj, "majority_acc": float(counts[maj] / n) if n else float("nan"),
        "score_acc": correct / n if n else float("nan"), "score_acc_lo": lo, "score_acc_hi": hi,
        "pred_label1_frac": float((pred[ok] == 1).mean()) if n else float("nan"),
        "acc_label0": float((pred[ok & (gold == 0)] == 0).mean()) if (ok & (gold == 0)).any() else float("nan"),
        "acc_label1": float((pred[ok & (gold == 1)] == 1).mean()) if (ok & (gold == 1)).any() else float("nan"),
        "balanced_acc": balanced_accuracy(gold[ok], pred[ok]) if n else float("nan"),
        "ece": expected_calibration_error(gold[ok], lp[ok]) if n else float("nan")}


def evaluate(lm, eval_df: pd.DataFrame, pattern: Pattern, demos: pd.DataFrame, batch_size: int = 8,
             reuse_prefix: bool = True, on_too_long: str = "error", progress: bool = True, max_tokens: int = 0,
             memory: bool = True, calibration: bool = True):
    """ICL evaluation of ``eval_df`` with the ``demos`` prefix. Returns ``(metrics, predictions)``.
    ``max_tokens > 0``: batches of up to that many padded tokens instead of ``batch_size`` rows.
    ``memory``: also measure the tensor memory of the largest batch (:func:`largest_batch_memory`; untimed).
    ``calibration``: also the contextual and batch calibrated predictions (:func:`calibrated_scores`; untimed)."""
    prefix = build_prefix(pattern, demos)
    queries = [query_text(pattern, p, h, bool(prefix)) for p, h in zip(eval_df["premise"], eval_df["hypothesis"])]
    with probe(lm.device) as pr:
        s = score_prompts(lm, prefix, queries, pattern.verbalizers, batch_size=batch_size,
                          reuse_prefix=reuse_prefix, on_too_long=on_too_long, progress=progress,
                          max_tokens=max_tokens)
    mem = largest_batch_memory(lm, prefix, queries, pattern.verbalizers, batch_size, reuse_prefix, max_tokens) \
        if memory else TensorMemory()
    ok = ~s["skipped"]
    gold = eval_df["label"].to_numpy()
    lp = s["logprobs"]
    verb_first = s["first_ids"]
    top1_correct = np.array([t == vf[g] for t, vf, g in zip(s["top1"], verb_first, gold)])
    top1_in_verb = np.array([t in vf for t, vf in zip(s["top1"], verb_first)])
    pred, lm_ = label_metrics(gold, lp, ok)
    n = lm_["n_eval"]
    head = ("n_eval", "n_skipped_too_long", "majority_label", "majority_acc", "score_acc", "score_acc_lo", "score_acc_hi")
    metrics = {c: lm_[c] for c in head}  # the column order of every results table since the first one
    metrics.update({
        "top1_acc": float(top1_correct[ok].mean()) if n else float("nan"),
        "non_verbalizer_frac": float((~top1_in_verb[ok]).mean()) if n else float("nan"),
        **{c: v for c, v in lm_.items() if c not in head},
        "single_token_verbalizers": bool(s["single_token"]), "prefix_tokens": s["prefix_tokens"],
        "query_tokens_mean": float(np.mean(s["query_tokens"])), "tokens_processed": s["tokens_processed"],
        "n_prefix_fallback": s["n_prefix_fallback"], "prefix_reuse_note": s["prefix_reuse_note"],
        "scoring": "prefix_reuse" if reuse_prefix else "full_prompt",
        "wall_s": pr.wall_s, "s_per_query": pr.wall_s / max(len(queries), 1),
        "peak_mem_mb": pr.peak_mem_mb, "peak_mem_delta_mb": pr.mem_delta_mb, "mem_kind": pr.mem_kind,
        "mem_tensors_peak_mb": mem.peak_mb, "mem_weights_mb": mem.weights_mb, "mem_work_mb": mem.work_mb,
        "mem_method": mem.method,
    })
    preds = pd.DataFrame({"idx": eval_df["idx"].to_numpy(), "label": gold, "pred": pred,
                          "logp_label0": lp[:, 0], "logp_label1": lp[:, 1], "top1_token": s["top1"],
                          "top1_is_verbalizer": top1_in_verb, "skipped": ~ok})
    return _completed(metrics, preds, eval_df, calibrated_scores(lm, pattern, prefix, lp, ok, gold, batch_size,
                                                                  max_tokens) if calibration else ({}, {}))


def _completed(metrics: dict, preds: pd.DataFrame, eval_df: pd.DataFrame, calibrated: tuple):
    """``(metrics, preds)`` with the calibrated metrics and per-example columns (``calibrated``: what
    :func:`calibrated_scores` returns) and the HANS heuristic and subcase of each example."""
    cal_metrics, cal_preds = calibrated
    metrics.update(cal_metrics)
    for c, v in cal_preds.items():
        preds[c] = v
    for c in ("heuristic", "subcase"):
        if c in eval_df:
            preds[c] = eval_df[c].to_numpy()
    return metrics, preds



def content_free_logprobs(lm, pattern: Pattern, prefix: str, batch_size: int = 8, max_tokens: int = 0) -> np.ndarray:
    """Verbalizer log-probs (one row per content-free input of :data:`calibration.CONTENT_FREE`, NaN where too
    long) of the content-free queries after ``prefix``: contextual calibration's estimate of the label prior."""
    from .calibration import CONTENT_FREE

    cf = [query_text(pattern, c, c, bool(prefix)) for c in CONTENT_FREE]
    return score_prompts(lm, prefix, cf, pattern.verbalizers, batch_size=batch_size, on_too_long="skip",
                         max_tokens=max_tokens)["logprobs"]


def calibrated_scores(lm, pattern: Pattern, prefix: str, lp, ok, gold, batch_size: int = 8, max_tokens: int = 0,
                      cf_lp=None):
    """Contextual and batch calibration (:mod:`llmft_utils.calibration`) of one run's verbalizer log-probs
    ``lp``: the content-free inputs are scored with the run's own prefix (untimed; a handful of prompts),
    the batch prior is the mean over the scored queries. Returns the metrics (``score_acc_<kind>``,
    ``balanced_acc_<kind>``, ``pred_label1_frac_<kind>``, ``prior_label1_<kind>``: the prior's label-1
    probability) and per-example predictions (``pred_<kind>``; -1 where skipped). ``cf_lp``: the content-free
    log-probs when already known (an ensemble's combined ones); else they are scored here."""
    from .calibration import calibrate, prior
    from .stats import balanced_accuracy

    cf_lp = content_free_logprobs(lm, pattern, prefix, batch_size, max_tokens) if cf_lp is None else cf_lp
    cf_lp = cf_lp[~np.isnan(cf_lp).any(1)]
    priors = {"contextual": prior(cf_lp) if len(cf_lp) else np.full(lp.shape[1], np.nan),
              "batch": prior(lp[ok]) if ok.any() else np.full(lp.shape[1], np.nan)}
    metrics, preds = {}, {}
    for kind, q in priors.items():
        usable = ok & bool(np.isfinite(q).all())
        pc = np.where(usable, np.nan_to_num(calibrate(lp, q), nan=-np.inf).argmax(1), -1)
        n = int(usable.sum())
        metrics[f"score_acc_{kind}"] = float((pc[usable] == gold[usable]).mean()) if n else float("nan")
        metrics[f"balanced_acc_{kind}"] = balanced_accuracy(gold[usable], pc[usable]) if n else float("nan")
        metrics[f"pred_label1_frac_{kind}"] = float((pc[usable] == 1).mean()) if n else float("nan")
        metrics[f"prior_label1_{kind}"] = float(np.exp(q[1])) if np.isfinite(q).all() else float("nan")
        preds[f"pred_{kind}"] = pc
    return metrics, preds


def combine_label_logprobs(member_lp, combine: str = "prob") -> np.ndarray:
    """An ensemble's label log-probs from its members' (m × n × labels, each the full-vocabulary log-prob of a
    verbalizer): ``prob`` the log of the mean probability (the mixture's own log-probs); ``logprob`` the mean
    log-prob (the normalised geometric mean up to a per-query constant, which neither the prediction nor the
    label-renormalised distribution sees)."""
    lp = np.asarray(member_lp, dtype=float)
    if combine == "prob":
        return np.logaddexp.reduce(lp, axis=0) - math.log(lp.shape[0])
    if combine == "logprob":
        return lp.mean(0)
    raise ValueError(f"unknown ensemble combine {combine!r}; use prob or logprob")


def evaluate_ensemble(lm, eval_df: pd.DataFrame, pattern: Pattern, demo_sets: list, combine: str = "prob",
                      batch_size: int = 8, progress: bool = True, max_tokens: int = 0, known: dict | None = None):
    """The prompt ensemble at inference: every query is scored after each of the m demonstration sets (m
    forwards per query, each with its own reused prefix) and the m answer distributions are combined
    (:func:`combine_label_logprobs`). ``known``: ``{j: (metrics, predictions)}`` of members already evaluated
    (the single-prompt ICL run of set 0). Returns ``(metrics, predictions)`` like :func:`evaluate`; the cost
    columns add up the members (``wall_s``, ``s_per_query``, prefix and query tokens read per query),
    ``peak_mem_mb`` is the largest member's, and the top-1 format columns are NaN (the combined top-1 token
    is not formed). Contextual calibration combines the members' content-free answers the same way."""
    members = []
    for j, demos in enumerate(demo_sets):
        if known and j in known:
            members.append(known[j])
        else:
            members.append(evaluate(lm, eval_df, pattern, demos, batch_size=batch_size, progress=progress,
                                    max_tokens=max_tokens, memory=False, calibration=False))
    m = len(members)
    gold = eval_df["label"].to_numpy()
    ok = ~np.any([p["skipped"].to_numpy(bool) for _, p in members], 0)
    lp = combine_label_logprobs([p[["logp_label0", "logp_label1"]].to_numpy(float) for _, p in members], combine)
    lp[~ok] = np.nan
    pred, metrics = label_metrics(gold, lp, ok)
    cost = {c: float(sum(mm[c] for mm, _ in members)) for c in ("wall_s", "s_per_query", "tokens_processed",
                                                                "prefix_tokens", "n_prefix_fallback")}
    accs = [mm["score_acc"] for mm, _ in members]
    metrics.update({
        "top1_acc": float("nan"), "non_verbalizer_frac": float("nan"),
        "single_token_verbalizers": all(mm["single_token_verbalizers"] for mm, _ in members),
        **cost, "query_tokens_mean": float(sum(mm["query_tokens_mean"] for mm, _ in members)),
        "prefix_reuse_note": "; ".join(sorted({mm["prefix_reuse_note"] for mm, _ in members} - {""})),
        "scoring": f"ensemble of {m} prompts ({members[0][0]['scoring']})",
        "peak_mem_mb": float(max(mm["peak_mem_mb"] for mm, _ in members)),
        "peak_mem_delta_mb": float(max(mm["peak_mem_delta_mb"] for mm, _ in members)),
        "mem_kind": members[0][0]["mem_kind"], "ensemble_m": m, "ensemble_combine": combine,
        "member_acc_mean": float(np.mean(accs)), "member_acc_min": float(np.min(accs)),
        "member_acc_max": float(np.max(accs))})
    preds = pd.DataFrame({"idx": eval_df["idx"].to_numpy(), "label": gold, "pred": pred, "logp_label0": lp[:, 0],
                          "logp_label1": lp[:, 1], "top1_token": -1, "top1_is_verbalizer": np.nan, "skipped": ~ok})
    cf = combine_label_logprobs([content_free_logprobs(lm, pattern, build_prefix(pattern, d), batch_size, max_tokens)
                                 for d in demo_sets], combine)
    return _completed(metrics, preds, eval_df, calibrated_scores(lm, pattern, "", lp, ok, gold, cf_lp=cf))


def full_prompt_cost(lm, ev: pd.DataFrame, pattern: Pattern, demos: pd.DataFrame, n: int, batch_size: int = 8,
                     max_tokens: int = 0) -> dict:
    """What ICL costs without a prefix cache: the first ``n`` queries of ``ev`` scored on full prompts (the
    demonstrations run again with every query), wall time per query. Prompts that do not fit are
    skipped. ``{}`` for ``n = 0``. With the run's own ``s_per_query`` (prefix reused) and a student's, it
    gives the break-even number of queries of context distillation (``results.break_even``)."""
    if n <= 0 or not len(demos):
        return {}
    m, _ = evaluate(lm, ev.head(n), pattern, demos, batch_size=batch_size, reuse_prefix=False, on_too_long="skip",
                    progress=False, max_tokens=max_tokens, memory=False, calibration=False)
    return {"s_per_query_full_prompt": m["s_per_query"], "n_full_prompt_sample": m["n_eval"]}


def precision_tag(lm) -> str:
    """``dtype@device kind`` (e.g. ``float32@cpu``): part of every resume key, so that runs at another precision
    or on another kind of device never count as done, nor get mixed with these."""
    return f"{lm.dtype}@{str(lm.device).split(':')[0]}"


def run_sweep(lm, out_dir, pattern_name: str, ks, seeds, batch_size: int = 8, on_too_long: str = "error",
              force: bool = False, model_name: str | None = None, profile: str = "", progress: bool = True,
              max_tokens: int = 0, full_prompt_sample: int = 4):
    """The k × seed ICL sweep over every evaluation set in ``out_dir/manifest.json``.

    Each finished (eval set, k, seed) appends one row to ``out_dir/icl.csv`` atomically and writes its
    per-example predictions to ``out_dir/predictions/``; rows already present are skipped unless
    ``force``. k = 0 has no demonstrations and runs once (seed recorded as 0).
    """
    from pathlib import Path

    from . import data
    from .patterns import get_pattern
    from .results import ResultTable, atomic_write_parquet, ids_digest, provenance

    out_dir = Path(out_dir)
    manifest = data.load_manifest(out_dir)
    pattern = get_pattern(pattern_name)
    table = ResultTable(out_dir / "icl.csv")
    done = set() if force else table.done()
    from .models import weights_sha256

    prov = {**provenance(), "model_weights_sha256": weights_sha256(lm)}
    model_name = model_name or lm.name
    pools = {name: data.read_split(out_dir, info) for name, info in manifest["demo_pools"].items()}
    plan = [(es, k, s) for es in manifest["eval_sets"] for k in ks for s in (seeds if k > 0 else [0])]
    planned = []
    for es, k, seed in plan:
        info = manifest["eval_sets"][es]
        key = f"{model_name}|{es}|{pattern.name}|k{k}|s{seed}|eval{info['ids_digest']}|{precision_tag(lm)}"
        planned.append(key)
        if key in done:
            log.info(f"skip (done): {key}")
            continue
        ev = data.read_split(out_dir, info)
        demos = data.sample_demonstrations(pools[info["demo_pool"]], k, seed, exclude=ev)
        log.info(f"{es}  k={k}  seed={seed}  n={len(ev)}")
        metrics, preds = evaluate(lm, ev, pattern, demos, batch_size=batch_size, on_too_long=on_too_long,
                                  progress=progress, max_tokens=max_tokens)
        cost = full_prompt_cost(lm, ev, pattern, demos, full_prompt_sample, batch_size, max_tokens) if k else {}
        atomic_write_parquet(preds, out_dir / "predictions" / f"icl__{ids_digest([key])}.parquet")
        row = {"run_key": key, "method": "zero-shot" if k == 0 else "icl", "model": model_name,
               "model_source": lm.source, "n_params": lm.n_params, "device": lm.device, "dtype": lm.dtype,
               "task": info["task"], "split": info["split"], "pattern": pattern.name, "k": k, "seed": seed,
               "eval_full_size": info["full_size"], "eval_subsampled": info["subsampled"],
               "eval_ids_digest": info["ids_digest"], "demo_pool": info["demo_pool"],
               "demo_ids": ";".join(map(str, demos["idx"])), "batch_size": batch_size,
               "max_batch_tokens": max_tokens, "random_init": lm.source.startswith("random-init"),
               "n_processes": _world()[0], "profile": profile,
               "predictions_file": f"predictions/icl__{ids_digest([key])}.parquet", **metrics, **cost, **prov}
        table.append([row])
        if metrics["n_eval"] == 0:
            log.warning(f"  nothing evaluated: all {metrics['n_skipped_too_long']} prompts exceed the model's context "
                        f"of {lm.max_context} tokens (prefix {metrics['prefix_tokens']}); recorded with NaN metrics and "
                        "left out of the summary. Use fewer demonstrations or a longer-context model.")
            continue
        skipped = f", {metrics['n_skipped_too_long']} too long and skipped" if metrics["n_skipped_too_long"] else ""
        log.info(f"  acc={metrics['score_acc']:.3f} (majority {metrics['majority_acc']:.3f}{skipped})  "
                 f"{metrics['s_per_query']*1000:.1f} ms/query  peak {metrics['peak_mem_mb']:.0f} MB")
    out = table.read()
    return out[out["run_key"].isin(planned)].reset_index(drop=True)
