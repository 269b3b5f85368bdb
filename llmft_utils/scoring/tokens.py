"""Tokenisation of prompts as the model sees them: the prefix, each query after it, the verbalizer
continuations, and the :class:`Row` each (query, label) becomes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import logs

log = logs.get(__name__)


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
