"""When the shared prefix's keys/values may be reused exactly (full attention: always; sliding windows:
within the window; anything else: never), and encoding the prefix once.
"""
from __future__ import annotations

import math

import torch

from .. import logs
from .tokens import Row

log = logs.get(__name__)

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


def standalone_row(r: Row, prefix_ids: list) -> Row:
    """``r`` as a full prompt (prefix ids + its ids), scored without the prefix cache."""
    return r if r.standalone else Row(r.qi, prefix_ids + r.ids, r.sets, r.answer_offset, True)


def plan_reuse(model, prefix_ids: list, rows: list) -> tuple[list, list, str]:
    """``(reuse_rows, full_rows, note)``: the rows scored on the reused prefix, those scored on full
    prompts (tokenisation mismatches, and rows too long for :func:`exact_reuse_length`), and the
    reason for the latter ("" when there are none). Decided before any prefix cache is built. Every
    reused row fits the limit on its own, so every batch of them does too, padding included."""
    P = len(prefix_ids)
    limit, reason = exact_reuse_length(model.config) if P else (math.inf, "")
    fits = [not r.standalone and P + len(r.ids) <= limit for r in rows]
    reuse = [r for r, f in zip(rows, fits) if f]
    full = [standalone_row(r, prefix_ids) for r, f in zip(rows, fits) if not f]
    moved = {r.qi for r, f in zip(rows, fits) if not (f or r.standalone)}
    if not moved:
        return reuse, full, ""
    note = (f"{model.config.model_type}: {reason} (prefix {P}); {len(moved)} of {len({r.qi for r in rows})} "
            "queries scored on full prompts")
    log.warning(note)
    return reuse, full, note


def encode_prefix(model, prefix_ids: list, device: str):
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values
    if hasattr(pkv, "layers"):
        return [(layer.keys.contiguous(), layer.values.contiguous()) for layer in pkv.layers]
    return [(k.contiguous(), v.contiguous()) for k, v in pkv]  # legacy tuple format
