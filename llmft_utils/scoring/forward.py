"""Forward passes over rows: batches of similar length, host tensors moved in one copy, log-prob sums per
label set, the prefix-reuse self-check, and sharding of batches over processes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .. import dist, models
from ..models import attention_implementation
from .attention import SPLIT_ATTENTION, expand_cache, mask_arguments, uses_split_attention
from .errors import PrefixReuseMismatch
from .reuse import CHECK_TOP, REUSE_TOLERANCE, encode_prefix, standalone_row
from .tokens import Row


def plan_batches(rows: list[Row], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
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
            for b in (order or plan_batches(rows, batch_size, max_tokens)) for i in b}
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


class Prefix(NamedTuple):
    """The demonstration prefix of a forward: its token ``ids`` and their key/value cache ``kv``
    (:func:`~llmft_utils.scoring.reuse.encode_prefix`; None: rows are scored as they are, without a prefix)."""
    ids: list
    kv: object = None


def forward_rows(model, rows: list[Row], prefix: Prefix, pad_id: int, device: str, batches: list[list[int]],
                  pbar=None, extract=None, split: bool | None = None, watch: int | None = None):
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
    fourth value returned (None without it), for :func:`_check_reuse`. ``batches``: lists of row indices
    (:func:`plan_batches`, or a subset of them): only those rows are scored, and the others keep NaN scores,
    top-1 0 and zero ``extract`` results."""
    prefix_ids, prefix_kv = prefix
    P = len(prefix_ids) if prefix_kv is not None else 0
    split = bool(P) and (uses_split_attention(model, device) if split is None else split)
    inputs = _to_device([_batch_inputs([rows[i] for i in idx], pad_id) for idx in batches]
                        + [{"rows": torch.tensor([i for idx in batches for i in idx])}], device)
    where = inputs.pop()["rows"]  # row index of each result, in batch order
    sums, tops, ext, finite, watched = [], [], [], torch.ones((), dtype=torch.bool, device=device), None
    for idx, bt in zip(batches, inputs):
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
            kw["past_key_values"] = expand_cache(prefix_kv, B)
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
    ref_scores, _, _, ref_logp = forward_rows(model, [standalone_row(row, prefix_ids)], Prefix(prefix_ids), pad_id,
                                               device, [[0]], watch=0)
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


def run_groups(lm, prefix_ids: list, reuse_rows: list, full_rows: list, batch_size: int, pbar, extract=None,
                max_tokens: int = 0):
    """Forward the prefix-reusing rows (one prefix cache, checked by :func:`_check_reuse` on its most
    padded row) and the standalone rows. Returns a list of ``(rows, scores, top1, extracted)`` per
    non-empty group (as :func:`forward_rows` returns them; ``extract`` returns a tuple) and the number
    of tokens run through the model (the check's forward not counted).

    Inside a torch.distributed group (``accelerate launch``/``torchrun``) each of the W processes scores
    the batches ``rank::W`` of each group — whole batches, exactly as one process would form them — (its
    own prefix cache and self-check) and every process gets all results back in row order
    (``all_gather_object``): bit for bit the values of one process, in about 1/W of the time."""
    pad_id = models.pad_id(lm.tokenizer)
    world, rank = dist.world()
    tokens = 0
    out = []
    for group, use_prefix in ((reuse_rows, True), (full_rows, False)):
        if not group:
            continue
        mine = plan_batches(group, batch_size, max_tokens)[rank::world]  # one process: every batch
        kv = encode_prefix(lm.model, prefix_ids, lm.device) if (use_prefix and prefix_ids and mine) else None
        watch = _most_padded(group, batch_size, max_tokens, mine) if kv is not None else None
        scores, top1, ex, watched = np.full((len(group), len(group[0].sets)), np.nan), np.zeros(len(group), np.int64), \
            None, None  # a process with no batch (fewer batches than processes) scores nothing
        if mine:
            scores, top1, ex, watched = forward_rows(lm.model, group, Prefix(prefix_ids, kv), pad_id, lm.device, mine,
                                                      pbar, extract, watch=watch)
        if kv is not None:
            _check_reuse(lm.model, prefix_ids, group[watch], scores[watch], watched, pad_id, lm.device)
        if world > 1:
            scores, top1, ex = dist.gather_shards([i for b in mine for i in b], scores, top1, ex, world)
        out.append((group, scores, top1, ex))
        tokens += sum(len(r.ids) for r in group) + (len(prefix_ids) if use_prefix and prefix_ids else 0)
    return out, tokens
