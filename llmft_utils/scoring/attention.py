"""Split-prefix attention: the queries of a batch attend to one copy of the prefix's keys/values and to
their own tokens, with log-sum-exp merging (three kernels: fused flash/efficient, or chunked math).
Registered in transformers' AttentionInterface at import; ``$LLMFT_SPLIT_KERNEL`` sets :data:`SPLIT_KERNEL`.
"""
from __future__ import annotations

import math
import os

import torch

from .reuse import layer_types

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
    Each call appends its layer to ``llmft_split_calls``: the proof, checked by :func:`forward_rows`,
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


def expand_cache(prefix_kv, batch: int):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), i)
    return cache
