"""Teacher targets: the frozen model WITH the demonstrations, scored once per transfer set and cached on
disk under a key of everything that determines the numbers (:func:`teacher_cache_key`), checksummed,
and validated on every load (:func:`cache_problem`). Teacher ensembles combine m prompts in log space.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist, logs, probes
from ..models import weights_sha256
from ..patterns import build_prefix, get_pattern, query_texts, verbalizer_token_ids
from ..scoring.scorer import answer_logits
from ..store import atomic_write
from .config import ENSEMBLE_COMBINE, DistillConfig
from .losses import support_logits

log = logs.get(__name__)


def answer_token_ids(tokenizer, pattern) -> list[int]:
    ids = verbalizer_token_ids(tokenizer, pattern, pattern.query("A man sleeps.", "A man rests."))
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"pattern {pattern.name!r} has multi-token verbalizers under this tokenizer "
                         f"({ids}); distillation at the answer position needs single-token verbalizers")
    return [i[0] for i in ids]


CACHE_FORMAT = 3  # version of the teacher-cache file layout (and of the key); bump it when either changes

DEMO_COLUMNS = ("premise", "hypothesis", "label")  # what a demonstration puts into the teacher's prompt

QUERY_COLUMNS = ("premise", "hypothesis")  # what a query puts into it (its label does not)

_CACHE_TENSORS = ("logp", "topk_ids", "verbalizer_ids")


def rows_digest(frame, columns) -> str:
    """sha256 of ``frame``'s ``columns``, row by row. The rows are hashed as JSON lists of strings, so no
    character inside a text can make two different frames hash alike (as a joined string could)."""
    rows = [[str(v) for v in row] for row in zip(*(frame[c] for c in columns))]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def teacher_runtime(lm) -> dict:
    """What besides the inputs decides a teacher's cached numbers: the content hash of the model's weights
    (:func:`models.weights_sha256`: the same name with other weights never hits), the torch and
    transformers versions, and the device's kernel set (:func:`probes.device_capability`: ``AVX512``,
    ``AVX2``, ``sm_90``, ...). Part of every teacher-cache key, so a cache copied from another host, library
    version or checkpoint is recomputed, not reused."""
    import transformers


    return {"weights_sha256": weights_sha256(lm), "torch": torch.__version__, "transformers": transformers.__version__,
            "capability": probes.device_capability(lm.device)}


@dataclass(frozen=True)
class TeacherModel:
    """Which model computes a teacher, and how: ``id`` (name and source), ``dtype``, ``device`` (only its type
    enters a key: ``cuda:0`` and ``cuda:1`` compute alike; cpu and cuda, or float32 and bfloat16, do not) and
    ``runtime`` (:func:`teacher_runtime`: the weights' content hash, torch/transformers versions, device
    capability; None leaves it out of the key)."""
    id: str
    dtype: object = "float32"
    device: str = "cpu"
    runtime: dict | None = None

    @classmethod
    def of(cls, lm, model_id: str) -> TeacherModel:
        """The loaded model ``lm`` under the name ``model_id``, with its :func:`teacher_runtime`."""
        return cls(model_id, lm.dtype, lm.device, teacher_runtime(lm))


@dataclass(frozen=True)
class TeacherCache:
    """Where a teacher's targets are cached: ``folder/<key>.pt``. ``force``: recompute them and replace the file."""
    folder: Path
    key: str
    force: bool = False

    @property
    def path(self) -> Path:
        return Path(self.folder) / f"{self.key}.pt"


def teacher_cache_key(model: TeacherModel, task: str, pattern, k: int, seed: int, demos, examples, cfg: DistillConfig,
                      combine: str | None = None) -> str:
    """Key of a teacher-cache file: a digest of everything that changes the cached values.

    ``model`` (:class:`TeacherModel`: name and source, dtype, device type, runtime), the pattern's name,
    template, verbalizers and separator (``pattern``: a :class:`~llmft_utils.patterns.Pattern`, or the name of
    a registered one), ``k``, ``seed``, the ids of ``demos`` and ``examples`` (DataFrames) with
    :func:`rows_digest` of their ``DEMO_COLUMNS`` / ``QUERY_COLUMNS`` (an edited text under an unchanged id
    changes the key), the target, ``topk`` (for ``target="topk"`` only), the temperature and
    ``CACHE_FORMAT``. A teacher ensemble passes ``demos`` as a list of frames (every set's ids and digest
    enter the key) and its ``combine`` rule. Pure: the same arguments give the same key in every process."""
    p = get_pattern(pattern) if isinstance(pattern, str) else pattern
    sets = list(demos) if isinstance(demos, (list, tuple)) else [demos]
    ids = [[str(i) for i in d["idx"]] for d in sets]
    digests = [rows_digest(d, DEMO_COLUMNS) for d in sets]
    single = not isinstance(demos, (list, tuple))
    fields = {"format": CACHE_FORMAT, "model": model.id, "task": task,
              "dtype": str(model.dtype).removeprefix("torch."), "device": torch.device(model.device).type,
              "pattern": [p.name, p.template, list(p.verbalizers), p.separator], "k": k, "seed": seed,
              "demos": ids[0] if single else ids, "demo_digest": digests[0] if single else digests,
              "examples": [str(i) for i in examples["idx"]],
              "example_digest": rows_digest(examples, QUERY_COLUMNS),
              "target": cfg.target, "topk": cfg.topk if cfg.target == "topk" else None,
              "temperature": cfg.temperature}
    if not single:
        fields["combine"] = combine or "prob"
    if model.runtime is not None:  # teacher_runtime(lm): weights hash, library versions, device capability
        fields["runtime"] = dict(model.runtime)
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tensors_sha256(blob: dict) -> str:
    """sha256 over the name, dtype, shape and raw bytes of each tensor of a teacher-cache blob (absent
    ones, e.g. ``topk_ids`` outside ``target="topk"``, are skipped); stored at write time, checked on load."""
    h = hashlib.sha256()
    for name in _CACHE_TENSORS:
        t = blob.get(name)
        if t is not None:
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def support_size(cfg: DistillConfig, n_labels: int, vocab_size: int) -> int:
    """Width S of the cached log-probs: the labels, the top-k tokens + one "rest" bucket, or the vocabulary."""
    return {"verbalizer": n_labels, "topk": cfg.topk + 1, "full": vocab_size}[cfg.target]


def cache_problem(blob, key: str, n: int, support: int, topk: int | None, n_labels: int) -> str | None:
    """Why a loaded teacher-cache ``blob`` cannot be trusted, or None when it can: a wrong format version,
    key or ``n``; ``logp`` not (n, support), ``topk_ids`` not (n, topk) (absent unless ``topk``),
    ``verbalizer_ids`` not (n_labels,); tensors whose checksum differs from the one stored with them; or
    non-finite log-probs. Checked in that order, so each reason names the first thing that is wrong."""
    if not isinstance(blob, dict):
        return f"not a teacher-cache dict but {type(blob).__name__}"
    if blob.get("format") != CACHE_FORMAT:
        return f"format {blob.get('format')!r}, expected {CACHE_FORMAT}"
    if blob.get("key") != key:
        return f"written under key {blob.get('key')!r}, expected {key!r}"
    if blob.get("n") != n:
        return f"n = {blob.get('n')!r}, expected {n}"
    want = {"logp": (n, support), "topk_ids": (n, topk) if topk else None, "verbalizer_ids": (n_labels,)}
    for name, shape in want.items():
        t = blob.get(name)
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
        if got != shape:
            return f"{name} has shape {got!r}, expected {shape!r}"
    if blob.get("sha256") != tensors_sha256(blob):
        return "checksum mismatch: the tensors are not the ones written"
    bad = int((~torch.isfinite(blob["logp"])).sum())
    return f"{bad} non-finite values in logp" if bad else None


def _read_cache(path: Path, key: str, n: int, support: int, topk: int | None, n_labels: int):
    """``(blob, None)`` for a trustworthy cache file, else ``(None, reason)``; any error while loading
    counts as a corrupt file."""
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, garbage, or not a torch file at all
        first_line = str(e).partition("\n")[0]
        return None, f"unreadable ({type(e).__name__}: {first_line})"
    reason = cache_problem(blob, key, n, support, topk, n_labels)
    return (None, reason) if reason else (blob, None)


def combine_logp(member_logp, combine: str = "prob") -> torch.Tensor:
    """One distribution from the log-probabilities (..., V) of m ensemble members (a tensor (m, ..., V) or any
    iterable of the m, e.g. a generator computing them one at a time), in log space:

        prob:     log p(v) = logsumexp_i log p_i(v) − log m            (the mixture, mean of probabilities)
        logprob:  log p(v) = mean_i log p_i(v) − logsumexp_v mean_i log p_i(v)   (normalised geometric mean)

    A running reduction: two members' tensors are held at a time, whatever m is. Over the full vocabulary the
    result is normalised; with one member it is that member's distribution."""
    if combine not in ENSEMBLE_COMBINE:
        raise ValueError(f"unknown ensemble combine {combine!r}; use one of {ENSEMBLE_COMBINE}")
    total, m = None, 0
    for lp in member_logp:
        lp = torch.as_tensor(lp).float()
        total = lp if total is None else (torch.logaddexp(total, lp) if combine == "prob" else total + lp)
        m += 1
    return total - math.log(m) if combine == "prob" else torch.log_softmax(total / m, -1)


def teacher_targets(lm, pattern, demos, examples, cfg: DistillConfig, cache: TeacherCache | None = None,
                    batch_size: int = 8, progress: bool = False, max_tokens: int = 0, combine: str = "prob") -> dict:
    """Teacher log-probs on the target support (temperature applied) for every example, with the
    demonstrations as a reused prefix. Cached at ``cache.path`` (:class:`TeacherCache`) when given; the
    returned dict has ``logp`` (N, S), ``topk_ids`` (N, K) or None, ``cache_hit`` and ``seconds``.

    A **teacher ensemble** passes ``demos`` as a list of m demonstration sets: each prompt's full-vocabulary
    distribution at temperature T is computed, the m are combined (:func:`combine_logp`, ``combine``) and the
    result is projected on the target support exactly as one teacher's logits would be (top-k of the combined
    distribution + rest, or the verbalizers). With one set it equals the single teacher.

    A cache file is used only when :func:`cache_problem` finds nothing wrong with it; otherwise (and
    always with ``cache.force``) the targets are recomputed and the file is replaced atomically
    (:func:`llmft_utils.store.atomic_write`), with a warning that names the file and the reason.
    Non-finite teacher log-probs raise :class:`FloatingPointError` and nothing is written."""
    if combine not in ENSEMBLE_COMBINE:
        raise ValueError(f"unknown ensemble combine {combine!r}; use one of {ENSEMBLE_COMBINE}")
    path, key = (cache.path, cache.key) if cache is not None else (None, None)
    if path is not None and path.is_file() and not cache.force:
        cached = _cached_targets(lm, pattern, examples, cfg, path, key)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    vids = answer_token_ids(lm.tokenizer, pattern)
    with torch.inference_mode():
        logp, top_ids = _teacher_logp(lm, pattern, demos, examples, cfg, vids, combine,
                                      dict(batch_size=batch_size, progress=progress, max_tokens=max_tokens))
    # full-vocabulary targets are stored in float16, which holds log-probs down to -65504 only
    logp = logp.to(torch.float32 if cfg.target != "full" else torch.float16)
    bad = ~torch.isfinite(logp).all(-1)  # checked as stored: a file that cache_problem would reject is never written
    if bad.any():
        raise FloatingPointError(
            f"the teacher's log-probs (target {cfg.target!r}, stored as {str(logp.dtype).removeprefix('torch.')}) are "
            f"non-finite for {int(bad.sum())} of {len(examples)} examples "
            f"(rows {bad.nonzero().flatten()[:10].tolist()}); "
            f"nothing was cached. Check the teacher ({lm.dtype}) for overflowing logits, or use a higher temperature "
            "or a smaller target support (topk, verbalizer).")
    blob = {"format": CACHE_FORMAT, "key": key, "n": len(examples), "logp": logp,
            "topk_ids": top_ids if cfg.target == "topk" else None,
            "verbalizer_ids": torch.tensor(vids)}
    blob["sha256"] = tensors_sha256(blob)
    seconds = time.perf_counter() - t0
    if path is not None and dist.world()[1] == 0:  # under a launcher every process has the same blob; one writes it
        # written through a file object: the archive inside is named "archive", not after the temporary file,
        # so the same targets give the same bytes in every run
        atomic_write(path, lambda tmp: _save(blob, tmp))
    return {**blob, "cache_hit": False, "seconds": seconds, "path": str(path) if path else None}


def _cached_targets(lm, pattern, examples, cfg: DistillConfig, path: Path, key: str) -> dict | None:
    """The targets of the cache file at ``path`` when :func:`cache_problem` finds nothing wrong with it; else
    None, with a warning naming the file and the reason."""
    t0 = time.perf_counter()
    n_labels = len(pattern.verbalizers)
    blob, reason = _read_cache(path, key, len(examples), support_size(cfg, n_labels, lm.model.config.vocab_size),
                               cfg.topk if cfg.target == "topk" else None, n_labels)
    if blob is not None:
        return {**blob, "cache_hit": True, "seconds": time.perf_counter() - t0, "path": str(path)}
    msg = f"teacher cache {path} is not usable ({reason}); recomputing it"
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return None


def target_extract(cfg: DistillConfig, vids):
    """``extract(logits) -> (logp, topk_ids)``: a batch (B, V) of answer-position logits as the teacher's
    log-probs on ``cfg.target``'s support at temperature T (``topk_ids`` the teacher's top-k tokens for
    ``target="topk"``, else None); what the cached and the prompt-distil teachers both store."""
    T = cfg.temperature

    def extract(logits):
        z = logits / T
        if cfg.target == "topk":
            ids = torch.topk(logits, cfg.topk).indices
            return torch.log_softmax(support_logits(z, "topk", topk_ids=ids), -1), ids
        return torch.log_softmax(support_logits(z, cfg.target, vids), -1), None

    return extract


def _teacher_logp(lm, pattern, demos, examples, cfg: DistillConfig, vids, combine: str, batching: dict):
    """``(logp, topk_ids)`` of the teacher on the target support: one prompt's answer-position logits, or
    (``demos`` a list) the m prompts' full distributions combined and projected like one teacher's logits."""
    T = cfg.temperature
    extract = target_extract(cfg, vids)
    if not isinstance(demos, (list, tuple)):
        prefix = build_prefix(pattern, demos)
        return answer_logits(lm, prefix, query_texts(pattern, examples, bool(prefix)), extract, **batching)

    def member(d):  # one prompt's full-vocabulary log-probs at temperature T, (N, V)
        pre = build_prefix(pattern, d)
        return answer_logits(lm, pre, query_texts(pattern, examples, bool(pre)),
                             lambda z: torch.log_softmax(z.float() / T, -1), **batching)

    comb = combine_logp((member(d) for d in demos), combine)
    return extract(comb * T)  # extract divides by T: the combined log-probs act as the logits


def _save(blob: dict, path) -> None:
    with open(path, "wb") as fh:
        torch.save(blob, fh)
