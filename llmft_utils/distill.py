"""Context distillation (CD) and pattern-based fine-tuning (PBFT) in one loop.

Teacher: the frozen base model prompted with k demonstrations + the query. Student: a trainable copy
of the same model prompted with the query alone. The loss is taken at each example's *own* answer
position (prompts are left-padded, so that position is the last column for every row whatever the
teacher's or the student's prompt length):

    loss = (1 - alpha) * T² * D(p_T^τ, p_S^τ) + alpha * CE(gold, p_S over the verbalizers)

where D is forward KL (default), reverse KL or generalized JSD on the chosen target support
(``verbalizer`` tokens, ``topk`` tokens + one "rest" bucket, or the ``full`` vocabulary) and τ = T is the
temperature. ``alpha = 1`` is PBFT (no teacher at all). Teacher outputs are computed once and cached on
disk, keyed by everything that determines them. Training runs on ``accelerate`` (DDP/FSDP/DeepSpeed are
configuration); LoRA through ``peft`` is optional; a NaN/inf loss or gradient norm on any process stops
every process.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import logs

TARGET_KINDS = ("verbalizer", "topk", "full")
CONTROL_METHODS = {"shuffled": "cd_shuffled", "self": "cd_self"}  # control students: name -> method
LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd")
LR_SCHEDULES = ("constant", "linear")
MIXED_PRECISION = ("no", "bf16")
TRAIN_ATTENTION = ("auto", "eager", "sdpa")

log = logs.get(__name__)


# ----------------------------------------------------------------------------- losses (pure, log-space)

def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_T ‖ p_S) = Σ_v p_T(v) · (log p_T(v) − log p_S(v)), averaged over the batch.

    Both inputs are log-probabilities over the same support, shape (batch, support)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_S ‖ p_T) = Σ_v p_S(v) · (log p_S(v) − log p_T(v)), averaged over the batch (mode-seeking)."""
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1).mean()


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence (as in TRL's GKD):

        m = β·p_T + (1 − β)·p_S,   JSD_β = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m),   0 < β < 1,

    computed in log-space (log m by logsumexp). Symmetric in (p_S, p_T) at β = 0.5."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}; use forward_kl / reverse_kl for the limits")
    log_m = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0)
    kl_t = (teacher_logp.exp() * (teacher_logp - log_m)).sum(-1)
    kl_s = (student_logp.exp() * (student_logp - log_m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def divergence(kind: str, student_logp, teacher_logp, beta: float = 0.5):
    if kind == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if kind == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    if kind == "jsd":
        return generalized_jsd(student_logp, teacher_logp, beta)
    raise ValueError(f"unknown loss {kind!r}; use one of {LOSS_KINDS}")


def support_logits(logits: torch.Tensor, kind: str, verbalizer_ids=None, topk_ids: torch.Tensor | None = None):
    """Project full-vocabulary logits (batch, V) onto the target support.

    ``verbalizer``: the verbalizer tokens' logits (their softmax renormalises over the labels).
    ``topk``: the logits at ``topk_ids`` plus one "rest" logit log(Σ_{v∉topk} e^{z_v}), so that the
    softmax of the result is exactly (p(top_1), …, p(top_k), 1 − Σ p(top)). ``full``: unchanged."""
    if kind == "verbalizer":
        return logits[..., list(verbalizer_ids)]
    if kind == "full":
        return logits
    if kind == "topk":
        top = logits.gather(-1, topk_ids)
        lse_all = torch.logsumexp(logits, -1, keepdim=True)
        lse_top = torch.logsumexp(top, -1, keepdim=True)
        rest = lse_all + torch.log1p(-torch.exp(lse_top - lse_all).clamp(max=1 - 1e-7))
        return torch.cat([top, rest], -1)
    raise ValueError(f"unknown target kind {kind!r}; use one of {TARGET_KINDS}")


def distill_loss(student_logits, teacher_logp, kind: str = "forward_kl", temperature: float = 1.0,
                 target: str = "verbalizer", verbalizer_ids=None, topk_ids=None, beta: float = 0.5):
    """T² · D(teacher, student) with the student's answer logits projected on the target support at
    temperature T; ``teacher_logp`` is already on that support at the same temperature (as cached)."""
    s = torch.log_softmax(support_logits(student_logits.float() / temperature, target, verbalizer_ids, topk_ids), -1)
    return divergence(kind, s, teacher_logp.float(), beta) * temperature ** 2


def gold_ce(student_logits, labels, verbalizer_ids):
    """Cross-entropy of the gold label under the student's distribution over the verbalizers."""
    return F.cross_entropy(student_logits.float()[..., list(verbalizer_ids)], labels)


# ----------------------------------------------------------------------------- configuration

@dataclass
class DistillConfig:
    target: str = "verbalizer"  # verbalizer | topk | full
    topk: int = 20  # support size for target="topk"
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # JSD mixture weight
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the gold-label CE; 1.0 = PBFT
    epochs: int = 2
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_schedule: str = "linear"  # constant | linear (warm-up, then linear decay to 0)
    warmup_ratio: float = 0.1  # share of optimizer steps spent warming up (linear schedule)
    mixed_precision: str = "no"  # no | bf16: autocast of the student's forward (weights stay float32)
    train_attention: str = "auto"  # attention kernel while training: auto (eager on CPU, else the model's) | eager | sdpa
    group_by_length: bool = True  # batches of similar length (less padding); random order of batches
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 16
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.target not in TARGET_KINDS:
            raise ValueError(f"unknown target {self.target!r}; use one of {TARGET_KINDS}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {self.loss!r}; use one of {LOSS_KINDS}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use one of {LR_SCHEDULES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; use one of {MIXED_PRECISION}")
        if self.train_attention not in TRAIN_ATTENTION:
            raise ValueError(f"unknown train_attention {self.train_attention!r}; use one of {TRAIN_ATTENTION}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def config_from_params(p: dict) -> DistillConfig:
    """The CD recipe from notebook parameters (a profile's, a notebook's ``globals()``, the CLI's)."""
    return DistillConfig(target=p["target"], topk=p["topk"], loss=p["loss"], temperature=p["temperature"],
                         alpha=p["alpha"], epochs=p["epochs"], batch_size=p["train_batch_size"], lr=p["lr"],
                         lr_schedule=p["lr_schedule"], mixed_precision=p["mixed_precision"], lora_r=p["lora_r"])


# ----------------------------------------------------------------------------- teacher cache

def _verbalizer_ids(tokenizer, pattern) -> list[int]:
    from .patterns import verbalizer_token_ids

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

    from .models import weights_sha256
    from .probes import device_capability

    return {"weights_sha256": weights_sha256(lm), "torch": torch.__version__, "transformers": transformers.__version__,
            "capability": device_capability(lm.device)}


def teacher_cache_key(model_id: str, task: str, pattern, k: int, seed: int, demos, examples, cfg: DistillConfig,
                      dtype, device, combine: str | None = None, runtime: dict | None = None) -> str:
    """Key of a teacher-cache file: a digest of everything that changes the cached values.

    ``model_id`` (name and source), the teacher's ``dtype`` and ``device`` type (``cuda:0`` and ``cuda:1``
    compute alike; cpu and cuda, or float32 and bfloat16, do not), the pattern's name, template, verbalizers
    and separator (``pattern``: a :class:`~llmft_utils.patterns.Pattern`, or the name of a registered one),
    ``k``, ``seed``, the ids of ``demos`` and ``examples`` (DataFrames) with :func:`rows_digest` of their
    ``DEMO_COLUMNS`` / ``QUERY_COLUMNS`` (an edited text under an unchanged id changes the key), the target,
    ``topk`` (for ``target="topk"`` only), the temperature, ``CACHE_FORMAT`` and ``runtime``
    (:func:`teacher_runtime`: the weights' content hash, torch/transformers versions, device capability). A teacher ensemble passes
    ``demos`` as a list of frames (every set's ids and digest enter the key) and its ``combine`` rule. Pure: the
    same arguments give the same key in every process."""
    from .patterns import get_pattern

    p = get_pattern(pattern) if isinstance(pattern, str) else pattern
    sets = list(demos) if isinstance(demos, (list, tuple)) else [demos]
    ids = [[str(i) for i in d["idx"]] for d in sets]
    digests = [rows_digest(d, DEMO_COLUMNS) for d in sets]
    single = not isinstance(demos, (list, tuple))
    fields = {"format": CACHE_FORMAT, "model": model_id, "task": task,
              "dtype": str(dtype).removeprefix("torch."), "device": torch.device(device).type,
              "pattern": [p.name, p.template, list(p.verbalizers), p.separator], "k": k, "seed": seed,
              "demos": ids[0] if single else ids, "demo_digest": digests[0] if single else digests,
              "examples": [str(i) for i in examples["idx"]],
              "example_digest": rows_digest(examples, QUERY_COLUMNS),
              "target": cfg.target, "topk": cfg.topk if cfg.target == "topk" else None,
              "temperature": cfg.temperature}
    if not single:
        fields["combine"] = combine or "prob"
    if runtime is not None:  # teacher_runtime(lm): weights hash, library versions, device capability
        fields["runtime"] = dict(runtime)
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


ENSEMBLE_COMBINE = ("prob", "logprob")  # a teacher ensemble's mean: of probabilities, or of log-probabilities


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


def teacher_targets(lm, pattern, demos, examples, cfg: DistillConfig, cache_dir=None, key: str | None = None,
                    batch_size: int = 8, progress: bool = False, force: bool = False, max_tokens: int = 0,
                    combine: str = "prob") -> dict:
    """Teacher log-probs on the target support (temperature applied) for every example, with the
    demonstrations as a reused prefix. Cached at ``cache_dir/<key>.pt`` when both are given; the
    returned dict has ``logp`` (N, S), ``topk_ids`` (N, K) or None, ``cache_hit`` and ``seconds``.

    A **teacher ensemble** passes ``demos`` as a list of m demonstration sets: each prompt's full-vocabulary
    distribution at temperature T is computed, the m are combined (:func:`combine_logp`, ``combine``) and the
    result is projected on the target support exactly as one teacher's logits would be (top-k of the combined
    distribution + rest, or the verbalizers). With one set it equals the single teacher.

    A cache file is used only when :func:`cache_problem` finds nothing wrong with it; otherwise (and
    always with ``force=True``) the targets are recomputed and the file is replaced atomically
    (:func:`llmft_utils.results.atomic_write`), with a warning that names the file and the reason.
    Non-finite teacher log-probs raise :class:`FloatingPointError` and nothing is written."""
    from .icl import answer_logits
    from .patterns import build_prefix, query_text
    from .results import atomic_write

    if combine not in ENSEMBLE_COMBINE:
        raise ValueError(f"unknown ensemble combine {combine!r}; use one of {ENSEMBLE_COMBINE}")
    path = Path(cache_dir) / f"{key}.pt" if (cache_dir and key) else None
    n_labels = len(pattern.verbalizers)
    topk = cfg.topk if cfg.target == "topk" else None
    if path is not None and path.is_file() and not force:
        t0 = time.perf_counter()
        blob, reason = _read_cache(path, key, len(examples), support_size(cfg, n_labels, lm.model.config.vocab_size),
                                   topk, n_labels)
        if blob is not None:
            return {**blob, "cache_hit": True, "seconds": time.perf_counter() - t0, "path": str(path)}
        msg = f"teacher cache {path} is not usable ({reason}); recomputing it"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    vids = _verbalizer_ids(lm.tokenizer, pattern)
    ensemble = isinstance(demos, (list, tuple))
    prefix = "" if ensemble else build_prefix(pattern, demos)
    queries = [query_text(pattern, p, h, bool(prefix)) for p, h in zip(examples["premise"], examples["hypothesis"])]
    T = cfg.temperature

    def extract(logits):  # a batch (B, V) of answer-position logits, on the model's device
        z = logits / T
        if cfg.target == "topk":
            ids = torch.topk(logits, cfg.topk).indices
            return torch.log_softmax(support_logits(z, "topk", topk_ids=ids), -1), ids
        return torch.log_softmax(support_logits(z, cfg.target, vids), -1), None

    t0 = time.perf_counter()
    with torch.inference_mode():
        if ensemble:  # an ensemble: combine full distributions (one prompt at a time), then project like one teacher
            def member(d):  # one prompt's full-vocabulary log-probs at temperature T, (N, V)
                pre = build_prefix(pattern, d)
                qs = [query_text(pattern, p, h, bool(pre)) for p, h in zip(examples["premise"], examples["hypothesis"])]
                return answer_logits(lm, pre, qs, lambda z: torch.log_softmax(z.float() / T, -1),
                                     batch_size=batch_size, progress=progress, max_tokens=max_tokens)

            comb = combine_logp((member(d) for d in demos), combine)
            logp, top_ids = extract(comb * T)  # extract divides by T: the combined log-probs act as the logits
        else:
            logp, top_ids = answer_logits(lm, prefix, queries, extract, batch_size=batch_size, progress=progress,
                                          max_tokens=max_tokens)
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
            "topk_ids": top_ids if topk else None,
            "verbalizer_ids": torch.tensor(vids)}
    blob["sha256"] = tensors_sha256(blob)
    seconds = time.perf_counter() - t0
    if path is not None:
        from .icl import _world

        if _world()[1] == 0:  # under a launcher every process has the same blob; the main one writes it
            atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return {**blob, "cache_hit": False, "seconds": seconds, "path": str(path) if path else None}


# ----------------------------------------------------------------------------- data for the student

def student_examples(tokenizer, pattern, examples, teacher: dict | None, max_context: int) -> list[dict]:
    """Zero-shot student prompts (token ids) with their teacher targets and gold labels."""
    from .icl import PromptTooLongError
    from .patterns import query_text

    texts = [query_text(pattern, p, h, False) for p, h in zip(examples["premise"], examples["hypothesis"])]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    too_long = [len(x) for x in ids if len(x) > max_context]
    if too_long:
        raise PromptTooLongError(f"{len(too_long)} student prompts exceed the context of {max_context} tokens")
    out = []
    for i, (x, y) in enumerate(zip(ids, examples["label"])):
        ex = {"input_ids": x, "label": int(y)}
        if teacher is not None:
            ex["teacher_logp"] = teacher["logp"][i]
            if teacher.get("topk_ids") is not None:
                ex["topk_ids"] = teacher["topk_ids"][i]
        out.append(ex)
    return out


def collate(batch: list[dict], pad_id: int) -> dict:
    """Left padding: every row's answer position is the last column; positions skip the padding."""
    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, L - n:] = torch.tensor(b["input_ids"])
        mask[i, L - n:] = 1
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
           "labels": torch.tensor([b["label"] for b in batch])}
    if "teacher_logp" in batch[0]:
        out["teacher_logp"] = torch.stack([b["teacher_logp"] for b in batch]).float()
    if "topk_ids" in batch[0]:
        out["topk_ids"] = torch.stack([b["topk_ids"] for b in batch])
    return out


def answer_position_logits(model, batch) -> torch.Tensor:
    """Logits at each row's last (answer) position of a left-padded batch: (batch, V), with the mask
    arguments of :func:`icl.mask_arguments` (no wait for the device)."""
    from .icl import mask_arguments

    return model(input_ids=batch["input_ids"], logits_to_keep=1,
                 **mask_arguments(model, batch["attention_mask"], batch["position_ids"])).logits[:, -1]


# ----------------------------------------------------------------------------- training

def params_digest(model) -> str:
    """Checksum of a model's parameters (to prove the teacher was not trained)."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def make_optimizer(params, cfg: DistillConfig):
    """AdamW; the fused kernel where this torch build has it for the parameters' device (on CPU it is
    ~10x faster than the per-tensor loop, which otherwise dominates small-batch steps)."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def student_autocast(device_type: str, mixed_precision: str):
    """The autocast context of the student's forward: bf16 when ``mixed_precision == "bf16"``, else a no-op."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def training_attention(model, choice: str, device_type: str):
    """Switch ``model``'s attention kernel for training, and back afterwards (evaluation always runs with
    the model's own kernel). ``auto`` is ``eager`` on CPU: for prompts of a few dozen tokens, torch's
    CPU flash-attention backward costs more than plain matmuls (~10% of a training step here)."""
    from .models import attention_implementation

    name = ("eager" if device_type == "cpu" else None) if choice == "auto" else choice
    return attention_implementation(model, name)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of indices with similar lengths, so that little compute goes to padding.

    Each epoch: a seeded permutation (identity without ``shuffle``), cut into mega-batches of
    ``batch_size × mega`` examples, each sorted by length (longest first, stable) and cut into
    batches; the batch order is then shuffled. Every example appears exactly once per epoch."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True, mega: int = 16):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.mega = list(lengths), batch_size, seed, shuffle, mega
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        size = self.batch_size * self.mega
        out = []
        for m in range(0, n, size):
            chunk = sorted(order[m:m + size], key=lambda i: -self.lengths[i])
            out += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out

    def __iter__(self):
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def lr_lambda(schedule: str, total_steps: int, warmup_ratio: float):
    """Multiplier of the base learning rate at optimizer step ``t`` (0-based): 1 for ``constant``;
    for ``linear``, (t+1)/w during w = ceil(warmup_ratio · total) warm-up steps, then a linear decay
    that reaches 0 after the last step."""
    if schedule == "constant":
        return lambda t: 1.0
    w = math.ceil(warmup_ratio * total_steps)

    def f(t: int) -> float:
        if t < w:
            return (t + 1) / w
        return max(0.0, (total_steps - t) / max(1, total_steps - w))
    return f


def float32_copy(model):
    """A deep copy of ``model`` with float32 parameters and floating buffers: the student's master weights,
    whatever the base model's dtype. Cast tensor by tensor (``Module.float()`` refuses models that
    transformers flags as quantised, e.g. a de-quantised GGUF); a float32 model is copied unchanged."""
    out = copy.deepcopy(model)
    for t in [*out.parameters(), *out.buffers()]:
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    return out


def batch_loss(student, batch: dict, cfg: DistillConfig, verbalizer_ids, device_type: str) -> torch.Tensor:
    """The training loss of one batch: ``(1 − α)·distill_loss + α·gold_ce`` at the answer position."""
    with student_autocast(device_type, cfg.mixed_precision):
        logits = answer_position_logits(student, batch).float()
    loss = torch.zeros((), device=logits.device)
    if cfg.alpha < 1.0:
        loss = loss + (1 - cfg.alpha) * distill_loss(
            logits, batch["teacher_logp"], cfg.loss, cfg.temperature, cfg.target, verbalizer_ids,
            batch.get("topk_ids"), cfg.beta)
    if cfg.alpha > 0.0:
        loss = loss + cfg.alpha * gold_ce(logits, batch["labels"], verbalizer_ids)
    return loss


def training_step_memory(base_model, tokenizer, examples: list[dict], cfg: DistillConfig, verbalizer_ids,
                         checkpointing: bool = False, warm_step: str = "zero_grad"):
    """Tensor memory (:func:`probes.tensor_memory`) of one optimizer step of this training on its largest
    batch (the ``batch_size`` longest examples), measured on a throw-away float32 copy whose optimizer
    states already exist, as in every step after the first: weights, gradients, AdamW states, activations
    and temporaries at their joint peak, one process, no DDP buffers. The states are made by one optimizer
    step on zero gradients (no forward or backward: the same states' shapes and dtypes as after a real
    first step, at a tenth of its cost; tests/test_distill.py checks the two give the same bytes). The
    student that :func:`train_student` trains is not touched."""
    from .probes import tensor_memory

    if warm_step not in ("zero_grad", "real"):
        raise ValueError(f"warm_step must be 'zero_grad' or 'real', got {warm_step!r}")
    device = next(base_model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))[:cfg.batch_size]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = {k: v.to(device) for k, v in collate([examples[i] for i in order], pad_id).items()}
    model = _new_student(base_model, cfg)
    if checkpointing:
        set_checkpointing(model, True)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trained, cfg)
    with training_attention(model, cfg.train_attention, device.type):
        if warm_step == "zero_grad":
            for p in trained:
                p.grad = torch.zeros_like(p)
        else:  # "real": one untracked step on the batch (the reference the zero-gradient step is tested against)
            batch_loss(model, batch, cfg, verbalizer_ids, device.type).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with tensor_memory(model, optimizer=opt) as m:
            batch_loss(model, batch, cfg, verbalizer_ids, device.type).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    del model, opt
    return m


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing of every decoder layer on or off (non-reentrant), through transformers'
    ``activation_checkpointing_*`` (5.x) or the older ``gradient_checkpointing_*`` names."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def checkpointing_on(model) -> bool:
    """Whether activation checkpointing is on (either of transformers' property names)."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def _new_student(base_model, cfg: DistillConfig):
    """The float32 copy of ``base_model`` that is trained (with LoRA adapters when ``cfg.lora_r``)."""
    student = float32_copy(base_model)
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    return student


def _plain_student(acc, student, base_model, cfg: DistillConfig):
    """The trained student as a plain module with whole float32 weights on every process, ready for the
    sharded evaluation (in which processes run different numbers of forwards, so no forward may need a
    collective) and for saving. DDP: the unwrapped module. FSDP (1 or 2): the full state dict, gathered on
    every process, loaded into a fresh copy. DeepSpeed ZeRO-3: the partitioned parameters gathered
    (``deepspeed.zero.GatheredParameters``) and copied likewise. Only the first two run in this kit's tests
    (FSDP through torch on CPU, see tests/test_distill.py); ZeRO-3 needs CUDA and DeepSpeed."""
    from accelerate.utils import DistributedType

    model = acc.unwrap_model(student)
    kind = acc.distributed_type
    zero3 = (kind == DistributedType.DEEPSPEED
             and getattr(getattr(acc.state, "deepspeed_plugin", None), "zero_stage", 0) == 3)
    if kind != DistributedType.FSDP and not zero3 and not _is_sharded(model):
        return model
    fresh = _new_student(base_model, cfg)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    fresh.load_state_dict({k: v.to(acc.device) for k, v in state.items()}, strict=False)
    missing = [k for k, _ in fresh.named_parameters() if k not in state]
    if missing:
        raise RuntimeError(f"gathering the sharded student lost {len(missing)} parameters, e.g. {missing[:3]}")
    return fresh.to(acc.device)


def _is_sharded(model) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2's shards)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


TRACKERS = ("", "tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "trackio", "swanlab")


def check_tracker(log_with) -> None:
    """Raise a clear error, before any training, when the experiment tracker ``log_with`` (one of
    :data:`TRACKERS`, or an accelerate ``GeneralTracker`` instance) is unknown or not installed."""
    if not log_with or not isinstance(log_with, str):
        return
    if log_with not in TRACKERS:
        raise ValueError(f"unknown tracker {log_with!r}; use one of {', '.join(t for t in TRACKERS if t)} or ''")
    import importlib.util

    import accelerate.utils as au

    probe = getattr(au, f"is_{log_with}_available", None)
    available = probe() if probe else importlib.util.find_spec(log_with) is not None
    if log_with == "tensorboard" and not available:
        available = importlib.util.find_spec("tensorboardX") is not None
    if not available:
        raise ValueError(f"the tracker {log_with!r} is not installed: pip install {log_with.replace('_', '-')} "
                         "(or leave log_with empty)")


CHECK_EVERY_ACCELERATOR = 32  # optimizer steps between the host's finiteness checks off CPU (train_student)


def train_student(base_model, tokenizer, examples: list[dict], cfg: DistillConfig, verbalizer_ids,
                  accelerator=None, progress: bool = False, log_with=None, run_name: str = "student",
                  logging_dir=None, checkpointing: bool = False, check_every: int | None = None) -> tuple:
    """Train a *copy* of ``base_model`` on ``examples`` (from :func:`student_examples`).

    Returns ``(student, stats)`` with per-batch ``losses`` (mean over processes), per-optimizer-step
    ``grad_norms`` (total L2 norm before clipping) and ``lrs``, wall time and peak memory. The base model
    is never modified (LoRA adapters are injected into the copy). The copy has float32 weights whatever
    the base model's dtype: a bf16 copy would round away every AdamW update below half a bf16 step
    (``mixed_precision="bf16"`` autocasts the forward only); the student is returned in float32.

    Every process stops together, and the loop never waits for the device between checks: each step's
    losses are gathered from all processes and its gradient norm computed on the device, and every
    ``check_every`` optimizer steps (default: 1 on a CPU, where waiting costs nothing;
    ``CHECK_EVERY_ACCELERATOR`` on a GPU, where a host copy per step would stall the queue of kernels) one
    copy to the host checks them, *before* that step's update. Every process checks at the same steps, on
    the same gathered losses and all-reduced gradients, so a non-finite loss on any of them, or a
    non-finite gradient norm, raises :class:`FloatingPointError` on all, naming the first such step
    (with ``check_every = 1``, before any non-finite gradient is applied; otherwise up to
    ``check_every - 1`` later steps may have run, on a student that is then discarded). The recorded
    losses, norms and lrs do not depend on ``check_every``. Nothing is written to disk, except by an experiment tracker: ``log_with``
    (e.g. ``"tensorboard"``, or an accelerate ``GeneralTracker``) gets the loss, lr and gradient norm of
    every optimizer step under ``run_name`` (files under ``logging_dir``); it does not change training.
    ``checkpointing``: activation (gradient) checkpointing — each layer's activations are recomputed in
    the backward pass instead of kept, so training memory grows with the batch by a layer's activations,
    not all of them, for about one more forward of compute; the gradients are the same."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from .probes import probe

    if cfg.alpha < 1.0 and "teacher_logp" not in examples[0]:
        raise ValueError("alpha < 1 needs teacher targets; pass teacher= to student_examples (or alpha=1 for PBFT)")
    check_tracker(log_with)
    cuda = torch.cuda.is_available()
    acc = accelerator or Accelerator(cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum,
                                     log_with=[log_with] if log_with else None,
                                     project_dir=str(logging_dir) if logging_dir else None,
                                     # pinned batches copied without waiting for the device
                                     dataloader_config=DataLoaderConfiguration(non_blocking=cuda))
    if log_with:
        acc.init_trackers(run_name.replace("|", "_").replace("/", "_"), config=asdict(cfg))
    set_seed(cfg.seed)
    student = _new_student(base_model, cfg)
    if checkpointing:
        set_checkpointing(student, True)
        student.config.use_cache = False
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.group_by_length:
        sampler = LengthGroupedBatches([len(e["input_ids"]) for e in examples], cfg.batch_size, cfg.seed, cfg.shuffle)
        loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=lambda b: collate(b, pad_id),
                                             pin_memory=cuda)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = torch.utils.data.DataLoader(examples, batch_size=cfg.batch_size, shuffle=cfg.shuffle, generator=gen,
                                             collate_fn=lambda b: collate(b, pad_id), pin_memory=cuda)
    student, opt, loader = acc.prepare(student, opt, loader)
    params = [p for p in student.parameters() if p.requires_grad]  # FSDP2 replaces them with DTensors
    total_steps = cfg.epochs * math.ceil(len(loader) / cfg.grad_accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer,  # the optimizer inside accelerate's wrapper
                                              lr_lambda(cfg.lr_schedule, total_steps, cfg.warmup_ratio))
    losses, grad_norms, lrs, step = [], [], [], 0
    every = check_every or (1 if acc.device.type == "cpu" else CHECK_EVERY_ACCELERATOR)
    pending = []  # (epoch, step, per-process losses, gradient norm or None, lr or None): on the device, unchecked
    pbar = None
    if progress and acc.is_main_process:
        from .progress import bar
        pbar = bar(cfg.epochs * len(loader), "train", "batch")

    def check():
        """One copy to the host of the steps not yet checked: their losses and gradient norms are recorded
        (and logged), and the first non-finite one stops every process (they all check at the same steps,
        on the same gathered values)."""
        if not pending:
            return
        values = torch.stack([torch.cat([rl.float(), (n if n is not None else rl.new_zeros(())).float().reshape(1)])
                              for _, _, rl, n, _ in pending]).tolist()  # per step: the ranks' losses, then the norm
        for (ep, st, _, n, lr), (*rank_losses, norm) in zip(pending, values):
            norm = norm if n is not None else None
            bad = [r for r, v in enumerate(rank_losses) if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"loss is {rank_losses[bad[0]]} at epoch {ep}, step {st} on rank(s) {bad} of "
                    f"{len(rank_losses)} (losses {rank_losses}): every process stops. Lower the learning "
                    "rate, use float32 (mixed_precision='no'), or check the teacher targets (recompute them "
                    "with force=True).")
            losses.append(sum(rank_losses) / len(rank_losses))
            if norm is not None:
                if not math.isfinite(norm):
                    raise FloatingPointError(
                        f"gradient norm is {norm} at epoch {ep}, step {st} with a finite loss ({losses[-1]:.6g}): "
                        "every process stops" + (" before the optimizer step" if every == 1 else "") +
                        ". Lower the learning rate, use float32 (mixed_precision='no'), or check the model for "
                        "overflowing activations.")
                grad_norms.append(norm)
            if log_with:
                acc.log({"loss": losses[-1], **({"lr": lr} if lr is not None else {}),
                         **({"grad_norm": norm} if norm is not None else {})}, step=st)
        pending.clear()
        if pbar is not None:
            pbar.set_postfix(loss=f"{losses[-1]:.4f}")

    with probe(str(acc.device)) as pr, training_attention(acc.unwrap_model(student), cfg.train_attention, acc.device.type):
        for epoch in range(cfg.epochs):
            for batch in loader:
                with acc.accumulate(student):
                    loss = batch_loss(student, batch, cfg, verbalizer_ids, acc.device.type)
                    rank_losses = acc.gather(loss.detach()[None])  # one value per process, left on the device
                    acc.backward(loss)
                    norm = lr = None
                    if acc.sync_gradients:
                        # max_norm = inf: the norm without clipping (the gradients are multiplied by 1)
                        norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                        lrs.append(lr := sched.get_last_lr()[0])
                        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                            norm = norm.full_tensor()
                        if norm is not None:  # DeepSpeed clips inside its engine and may report no norm
                            norm = (norm.detach() if torch.is_tensor(norm)
                                    else torch.tensor(float(norm), device=rank_losses.device))
                    pending.append((epoch, step, rank_losses, norm, lr))
                    if acc.sync_gradients and len(pending) >= every:
                        check()  # before this step's update: with every = 1, no non-finite gradient is applied
                    opt.step()
                    opt.zero_grad()
                    if acc.sync_gradients:
                        sched.step()
                step += 1
                if pbar is not None:
                    pbar.update(1)
        check()
    if pbar is not None:
        pbar.close()
    if log_with:
        acc.end_training()
    student = _plain_student(acc, student, base_model, cfg)
    if cfg.lora_r:
        student = student.merge_and_unload()
    if checkpointing:
        set_checkpointing(student, False)
        student.config.use_cache = getattr(base_model.config, "use_cache", True)
    student.eval()
    return student, {"losses": losses, "grad_norms": grad_norms, "lrs": lrs, "train_s": pr.wall_s,
                     "train_peak_mem_mb": pr.peak_mem_mb, "train_mem_delta_mb": pr.mem_delta_mb,
                     "mem_kind": pr.mem_kind, "steps": step, "config": asdict(cfg),
                     "checkpointing": checkpointing}


def training_log(student_key: str, stats: dict, grad_accum: int = 1) -> list[dict]:
    """Tidy per-batch rows of a training run: ``loss`` (mean over processes), and at each optimizer step
    (every ``grad_accum`` batches) its ``lr`` and pre-clipping ``grad_norm`` (NaN where none was taken or
    reported). ``run_key`` = ``<student_key>|b<batch>`` (rows of a forced rerun replace the old ones)."""
    rows = []
    for b, loss in enumerate(stats["losses"]):
        opt_step = (b + 1) // grad_accum - 1 if (b + 1) % grad_accum == 0 else None
        at = lambda xs: float(xs[opt_step]) if opt_step is not None and opt_step < len(xs) else float("nan")
        rows.append({"run_key": f"{student_key}|b{b:05d}", "student": student_key, "batch": b, "loss": float(loss),
                     "lr": at(stats.get("lrs", [])), "grad_norm": at(stats.get("grad_norms", []))})
    return rows


# ----------------------------------------------------------------------------- agreement metrics

def agreement(teacher_preds, other_preds) -> dict:
    """Agreement, Cohen's κ and mean KL(teacher ‖ other) over the verbalizer distribution, on the
    examples both scored (prediction tables from :func:`llmft_utils.icl.evaluate`, aligned by ``idx``)."""
    t = teacher_preds.set_index("idx")
    o = other_preds.set_index("idx").loc[t.index]
    ok = ~(t["skipped"].to_numpy() | o["skipped"].to_numpy())
    from .stats import agreement_stats, verbalizer_logp

    return {**agreement_stats(t["pred"].to_numpy()[ok], o["pred"].to_numpy()[ok], verbalizer_logp(t[ok]),
                              verbalizer_logp(o[ok])), "n": int(ok.sum())}


def sweep_from_params(lm, out_dir, p: dict, progress: bool = False, **narrow):
    """Notebook 03's :func:`run_cd_sweep` with the notebook parameters ``p`` (a profile's, the CLI's);
    ``narrow`` replaces ``train_tasks``, ``ks``, ``seeds`` or ``pbft_n`` (e.g. one seed at a time)."""
    a = {"train_tasks": p["cd_tasks"], "ks": p["cd_ks"], "seeds": p["seeds"], "pbft_n": p["pbft_n"], **narrow}
    return run_cd_sweep(lm, out_dir, p["pattern"], a["train_tasks"], a["ks"], a["seeds"], p["n_transfer"], a["pbft_n"],
                        config_from_params(p), p["pbft_epochs"], eval_batch_size=p["batch_size"], force=p["force"],
                        model_name=p["model"], profile=p["profile"], progress=progress,
                        ood_train_tasks=p["ood_train_tasks"], pbft_lr=p["pbft_lr"],
                        eval_max_tokens=p["max_batch_tokens"], save_students=p["save_students"], log_with=p["log_with"],
                        controls=p.get("controls", ()), control_tasks=p.get("control_tasks"),
                        ensemble_m=p.get("ensemble_m", 0), ensemble_ks=p.get("ensemble_ks", ()),
                        ensemble_seeds=p.get("ensemble_seeds"), ensemble_tasks=p.get("ensemble_tasks"),
                        ensemble_combine=p.get("ensemble_combine", "prob"), ensemble_ood=p.get("ensemble_ood", True))


def _barrier() -> None:
    from .icl import _world

    if _world()[0] > 1:
        torch.distributed.barrier()


def paired_vs(student_preds, other_preds, name: str) -> dict:
    """Exact McNemar test of the student against ``other`` (the zero-shot model or the teacher) on the examples
    both scored: ``student_only_right_vs_<name>``, ``<name>_only_right``, ``mcnemar_p_vs_<name>``."""
    from .stats import mcnemar_exact

    s = student_preds.set_index("idx")
    o = other_preds.set_index("idx").loc[s.index]
    ok = ~(s["skipped"].to_numpy() | o["skipped"].to_numpy())
    r = mcnemar_exact((s["pred"] == s["label"]).to_numpy()[ok], (o["pred"] == o["label"]).to_numpy()[ok])
    return {f"student_only_right_vs_{name}": r["only_a"], f"{name}_only_right": r["only_b"],
            f"mcnemar_p_vs_{name}": r["p"]}


def controls_vs(student_preds, teacher_preds, zeroshot_preds, student_controls=None) -> dict:
    """:func:`stats.control_tests` on the examples that the student, its teacher, the zero-shot model (and
    every control student in ``student_controls``: name -> prediction table) all scored, matched by ``idx``:
    each control's agreement with the teacher, the McNemar p-values of the student against each,
    ``beats_controls`` and ``controls_checked``; for the control students also their mean
    KL(teacher ‖ control) over the verbalizers (``kl_teacher_<name>``; the student's is ``kl_teacher_student``)."""
    from .stats import STUDENT_CONTROLS, control_tests

    student_controls = {n: c for n, c in (student_controls or {}).items() if c is not None}
    s = student_preds.set_index("idx")
    t = teacher_preds.set_index("idx").reindex(s.index)
    z = zeroshot_preds.set_index("idx").reindex(s.index)
    cs = {n: c.set_index("idx").reindex(s.index) for n, c in student_controls.items()}
    ok = ~(s["skipped"].to_numpy(bool) | t["skipped"].fillna(True).to_numpy(bool) | z["skipped"].fillna(True).to_numpy(bool))
    for c in cs.values():
        ok &= ~c["skipped"].fillna(True).to_numpy(bool)
    out = control_tests(s["pred"].to_numpy()[ok], t["pred"].to_numpy()[ok].astype(int),
                        (z["logp_label1"] - z["logp_label0"]).to_numpy()[ok],
                        student_controls={n: c["pred"].to_numpy()[ok].astype(int) for n, c in cs.items()})
    for n in STUDENT_CONTROLS:
        out[f"kl_teacher_{n}"] = (agreement(t[ok].reset_index(), cs[n][ok].reset_index())["kl"] if n in cs
                                  else float("nan"))
    return out


# ----------------------------------------------------------------------------- the notebook-03 sweep

def transfer_set(pool, n: int, seed: int, exclude_frames) -> "pd.DataFrame":
    """``n`` unlabelled training queries from ``pool`` (labels kept only for bookkeeping), disjoint from
    every frame in ``exclude_frames`` (the demonstrations and the evaluation queries)."""
    from .data import DataError, disjoint_rows

    cand = disjoint_rows(pool, exclude_frames)
    if len(cand) < n:
        raise DataError(f"only {len(cand)} pool examples are disjoint from the demonstrations and queries; need {n}")
    rng = np.random.default_rng(10_000 + seed)
    return cand.loc[np.sort(rng.choice(cand.index.to_numpy(), size=n, replace=False))]


def _icl_runs(icl_rows, model: str, es: str, pattern: str, precision: str):
    """The ICL rows of (model, eval set, pattern) at ``precision`` (``dtype@device``), every k and seed."""
    kind = icl_rows["device"].astype(str).str.split(":").str[0]
    return icl_rows[(icl_rows["model"] == model) & (icl_rows["task"] + "/" + icl_rows["split"] == es)
                    & (icl_rows["pattern"] == pattern) & (icl_rows["dtype"].astype(str) + "@" + kind == precision)]


def _icl_row(icl_rows, model: str, es: str, pattern: str, k: int, seed: int, precision: str):
    """The ICL row of (model, eval set, pattern, k, seed) at ``precision`` (``dtype@device``), or None."""
    sel = _icl_runs(icl_rows, model, es, pattern, precision)
    sel = sel[(sel["k"] == k) & (sel["seed"] == (seed if k else 0))]
    return None if sel.empty else sel.iloc[-1]


def _icl_predictions(out_dir: Path, icl_rows, model: str, es: str, pattern: str, k: int, seed: int, precision: str):
    import pandas as pd

    row = _icl_row(icl_rows, model, es, pattern, k, seed, precision)
    if row is None:
        raise FileNotFoundError(f"no ICL row for {model} {es} {pattern} k={k} seed={seed} ({precision}) in icl.csv: run "
                                "notebooks/02_icl_baselines with the same model, pattern, ks, seeds, dtype and device first")
    return row, pd.read_parquet(out_dir / row["predictions_file"])


class PlannedStudent(NamedTuple):
    """One CD or PBFT student of :func:`run_cd_sweep`'s plan."""
    method: str  # cd | pbft
    task: str  # training task
    es_in: str  # its in-domain evaluation set
    k: int  # teacher demonstrations (CD) or labelled examples (PBFT)
    seed: int
    cfg: DistillConfig
    n_train: int
    key_base: str  # the student's part of its rows' run keys
    eval_sets: list  # in-domain first, then out of domain
    keys: list  # one run key per evaluation set


def _missing_icl_runs(icl_rows, model: str, pattern: str, plan: list, precision: str) -> list[str]:
    """The ICL runs the CD sweep compares with (zero-shot per eval set, the teacher per CD student and eval
    set) that are not in ``icl.csv``, as readable strings: checked before the first student trains."""
    need = {(es, 0, 0) for p in plan for es in p.eval_sets}
    need |= {(es, p.k, p.seed) for p in plan if p.method in ("cd", "icl_ensemble", "cd_ensemble") for es in p.eval_sets}
    need |= {(es, max(q.k for q in plan if q.method == "cd"), p.seed) for p in plan
             if p.method in CONTROL_METHODS.values() for es in p.eval_sets}
    return [f"{es} k={k} seed={seed}" for es, k, seed in sorted(need)
            if icl_rows.empty or _icl_row(icl_rows, model, es, pattern, k, seed, precision) is None]


def _ensemble_rows(lm, out_dir, manifest, frames, icl_rows, table, pattern, model_name, precision, task, es_in, k,
                   seed, sets, combine, eval_sets, keys, batch_size, max_tokens, progress, largest_icl, profile, prov,
                   main, say) -> dict:
    """The ``icl_ensemble`` rows of :func:`run_cd_sweep`: the m prompts of ``sets`` at inference on each evaluation
    set (set 0 reuses the single-prompt ICL run's predictions where its demonstrations are the same), with exact
    McNemar tests against the zero-shot model and the single-prompt ICL run of the largest k (``icl_k``);
    written to ``table`` and returned as ``{run_key: row}``."""
    from .icl import _world, evaluate_ensemble
    from .results import atomic_write_parquet, ids_digest

    import pandas as pd

    demo_text = "|".join(";".join(map(str, d["idx"])) for d in sets)
    rows = []
    for es, key in zip(eval_sets, keys):
        einfo, ev = manifest["eval_sets"][es], frames[es]
        known = {}
        row0, preds0 = _icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, k, seed, precision)
        if str(row0["demo_ids"]) == ";".join(map(str, sets[0]["idx"])):
            m0 = {c: row0[c] for c in ("score_acc", "wall_s", "s_per_query", "tokens_processed", "prefix_tokens",
                                       "n_prefix_fallback", "query_tokens_mean", "scoring", "peak_mem_mb",
                                       "peak_mem_delta_mb", "mem_kind", "single_token_verbalizers")}
            m0["prefix_reuse_note"] = row0["prefix_reuse_note"] if isinstance(row0["prefix_reuse_note"], str) else ""
            known[0] = (m0, preds0)
        metrics, preds = evaluate_ensemble(lm, ev, pattern, sets, combine, batch_size=batch_size, progress=progress,
                                           max_tokens=max_tokens, known=known)
        pfile = f"predictions/icl_ensemble__{ids_digest([key])}.parquet"
        if main:
            atomic_write_parquet(preds, out_dir / pfile)
        zrow, zpreds = _icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, 0, 0, precision)
        ik, ipreds = largest_icl(es, seed)
        rows.append({
            "run_key": key, "method": "icl_ensemble", "model": model_name, "model_source": lm.source,
            "device": lm.device, "dtype": lm.dtype, "random_init": lm.source.startswith("random-init"),
            "n_processes": _world()[0], "train_task": task, "task": einfo["task"], "split": einfo["split"],
            "in_domain": es == es_in, "pattern": pattern.name, "k": k, "seed": seed,
            "eval_full_size": einfo["full_size"], "eval_subsampled": einfo["subsampled"],
            "eval_ids_digest": einfo["ids_digest"], "demo_ids": demo_text, "zeroshot_acc": zrow["score_acc"],
            "member0_reused": bool(known), **metrics, **paired_vs(preds, zpreds, "zeroshot"),
            **paired_vs(preds, ipreds, "icl"), "icl_k": ik, "predictions_file": pfile, "profile": profile, **prov,
            "student_dir": ""})
        say(f"  {es}: acc={metrics['score_acc']:.3f} (members {metrics['member_acc_min']:.3f}-"
            f"{metrics['member_acc_max']:.3f}; ICL k={ik} {ipreds['pred'].eq(ipreds['label']).mean():.3f}, zero-shot "
            f"{zrow['score_acc']:.3f})  {metrics['s_per_query'] * 1000:.0f} ms/query")
    if main:
        table.append(rows)
    _barrier()
    return {r["run_key"]: r for r in rows}


def run_cd_sweep(lm, out_dir, pattern_name: str, train_tasks, ks, seeds, n_transfer: int, pbft_n: int,
                 cfg: DistillConfig, pbft_epochs: int, eval_batch_size: int = 8, force: bool = False,
                 model_name: str | None = None, profile: str = "", progress: bool = True, ood_train_tasks=None,
                 pbft_lr: float | None = None, eval_max_tokens: int = 0, save_students: str = "none",
                 log_with: str = "", controls=(), control_tasks=None, ensemble_m: int = 0, ensemble_ks=(),
                 ensemble_seeds=None, ensemble_tasks=None, ensemble_combine: str = "prob", ensemble_ood: bool = True):
    """CD students for every (train task, k, seed) and PBFT students for every (train task, seed); each is
    evaluated zero-shot on its in-domain set (and on HANS when its train task is in ``ood_train_tasks``,
    default: all) with :func:`llmft_utils.icl.evaluate`, and
    compared with its ICL teacher and with the untrained zero-shot model (agreement, κ, KL).
    PBFT students train with ``cfg`` except alpha = 1, ``pbft_epochs`` and ``pbft_lr`` (default: cfg.lr).
    Rows go to ``out_dir/cd.csv`` (atomic, resumable). Students chosen by ``save_students``
    (:func:`llmft_utils.students.should_save`) are saved under ``out_dir/students/`` as Hugging Face model
    folders with a model card; their rows name the folder in ``student_dir``. ``log_with``: an experiment
    tracker (see :func:`train_student`) logging under ``out_dir/trackers/``.

    ``controls`` (``shuffled``, ``self``) adds control students for the tasks in ``control_tasks`` (default:
    all), trained before the CD students with the CD recipe on the same transfer set of each (task, seed):
    ``cd_shuffled`` at the largest k (that k's teacher targets permuted across the transfer queries) and
    ``cd_self`` (k = 0: the zero-shot model's own targets). Their rows compare them with the largest k's
    teacher (``controls_k``); each CD row is tested against them (:func:`controls_vs`).

    ``ensemble_m`` ≥ 2 adds, for the tasks in ``ensemble_tasks``, each k in ``ensemble_ks`` and each seed in
    ``ensemble_seeds`` (defaults: all), a **teacher ensemble** of m disjoint demonstration sets of k
    (:func:`llmft_utils.data.demonstration_sets`: set 0 is the single teacher's; all are disjoint from the
    transfer set and the evaluation queries): ``icl_ensemble`` rows score the ensemble at inference (m forwards
    per query, :func:`llmft_utils.icl.evaluate_ensemble`), and a ``cd_ensemble`` student distils it (the
    m prompts' distributions combined by ``ensemble_combine``, :func:`teacher_targets`) on the same transfer
    set as CD, scored out of domain too unless ``ensemble_ood`` is False. Both carry exact McNemar tests against the single-prompt ICL run of the largest k in
    ``icl.csv`` (``icl_k``); the student also against single-prompt CD of the same k and seed."""
    import gc

    import pandas as pd

    from . import data
    from .icl import evaluate, precision_tag
    from .models import wrap
    from .patterns import get_pattern
    from .results import ResultTable, atomic_write_parquet, ids_digest, provenance

    out_dir = Path(out_dir)
    manifest = data.load_manifest(out_dir)
    pattern = get_pattern(pattern_name)
    model_name = model_name or lm.name
    table = ResultTable(out_dir / "cd.csv")
    old_rows = table.read()
    done = set() if force or "run_key" not in old_rows else set(old_rows["run_key"])
    icl_rows = ResultTable(out_dir / "icl.csv").read()
    vids = _verbalizer_ids(lm.tokenizer, pattern)
    runtime = teacher_runtime(lm)
    prov = {**provenance(), "model_weights_sha256": runtime["weights_sha256"]}
    precision = precision_tag(lm)
    frames = {es: data.read_split(out_dir, info) for es, info in manifest["eval_sets"].items()}
    pools = {p: data.read_split(out_dir, info) for p, info in manifest["demo_pools"].items()}
    plan = []
    bad = sorted(set(controls) - set(CONTROL_METHODS))
    if bad:
        raise ValueError(f"controls: unknown {bad}; use any of {list(CONTROL_METHODS)}")
    kc = max(ks) if ks else 0
    if ensemble_m and ensemble_m < 2:
        raise ValueError(f"ensemble_m: {ensemble_m} sets is no ensemble; use 0 (none) or >= 2")
    if ensemble_combine not in ENSEMBLE_COMBINE:
        raise ValueError(f"ensemble_combine: {ensemble_combine!r} is not one of {list(ENSEMBLE_COMBINE)}")
    # the ensemble seeds among this sweep's seeds (a sweep narrowed to one seed runs that seed's ensemble, if any)
    ens_seeds = [s_ for s_ in seeds if ensemble_seeds is None or s_ in ensemble_seeds]
    ens_tag = f"m{ensemble_m}-{ensemble_combine}"
    sets_of_task = {}  # training task -> the evaluation sets of its CD students (in domain first)
    for task in train_tasks:
        task_sets = data.student_eval_sets(manifest, task, ood_train_tasks is None or task in ood_train_tasks)
        sets_of_task[task] = task_sets
        ctl = [c for c in controls if control_tasks is None or task in control_tasks] if kc else []
        runs = ([("cd_self", 0, s) for s in seeds if "self" in ctl]
                + [("cd_shuffled", kc, s) for s in seeds if "shuffled" in ctl]
                + ([("pbft", pbft_n, s) for s in seeds] if pbft_n else []) + [("cd", k, s) for k in ks for s in seeds])
        if ensemble_m and (ensemble_tasks is None or task in ensemble_tasks):
            runs += [(m_, k, s) for k in ensemble_ks for s in ens_seeds for m_ in ("icl_ensemble", "cd_ensemble")]
        for method, k, seed in runs:
            mcfg = cfg if method != "pbft" else DistillConfig(**{**asdict(cfg), "alpha": 1.0, "epochs": pbft_epochs,
                                                                 "lr": pbft_lr or cfg.lr})
            n_train = n_transfer if method != "pbft" else k
            recipe = ids_digest([json.dumps(asdict(mcfg), sort_keys=True)]) if method != "icl_ensemble" else "infer"
            key_base = (f"{method}|{model_name}|{task}|{pattern.name}|k{k}|s{seed}|n{n_train}|{recipe}|{precision}"
                        + (f"|{ens_tag}" if method.endswith("_ensemble") else ""))
            eval_sets = list(task_sets) if ensemble_ood or not method.endswith("_ensemble") else task_sets[:1]
            keys = [f"{key_base}|{es}|eval{manifest['eval_sets'][es]['ids_digest']}" for es in eval_sets]
            plan.append(PlannedStudent(method, task, eval_sets[0], k, seed, mcfg, n_train, key_base, eval_sets, keys))
    from .icl import _world
    from .students import should_save

    check_tracker(log_with)  # before any work

    main = _world()[1] == 0
    say = log.info if main else (lambda msg: None)

    order = [(p.method, p.task, p.k, p.seed) for p in plan if p.method != "icl_ensemble"]
    keep = [p.method != "icl_ensemble" and should_save(save_students, p.method, p.task, p.k, p.seed, order)
            for p in plan]
    missing = _missing_icl_runs(icl_rows, model_name, pattern.name, plan, precision)
    if missing:  # before any teacher or student runs: the comparisons need these rows
        raise FileNotFoundError(f"{len(missing)} ICL runs this CD sweep compares with are not in {out_dir / 'icl.csv'} "
                                f"({model_name}, {pattern.name}, {precision}): {', '.join(missing)}. Run "
                                "notebooks/02_icl_baselines with the same model, pattern, dtype and device, with 0 and "
                                "every cd_k in ks and the same seeds, first")
    planned = []
    keys_of = {(p.method, p.task, p.k, p.seed): dict(zip(p.eval_sets, p.keys)) for p in plan}
    step_memory = {}  # (transfer set, recipe) -> training_step_memory
    # run_key -> row, of this sweep and of earlier ones (resume): the predictions of PBFT and control students
    run_rows = {r["run_key"]: r for r in old_rows.to_dict("records")} if "run_key" in old_rows else {}

    def student_preds(method, task, k, seed, es):  # a planned student's predictions on es, once its rows exist
        import pandas as pd

        row = run_rows.get(keys_of.get((method, task, k, seed), {}).get(es))
        return None if row is None else pd.read_parquet(out_dir / row["predictions_file"])

    def control_preds(task, k, seed, es, method="cd"):  # the control students' predictions for a CD student on es
        got = {"self": student_preds("cd_self", task, 0, seed, es),  # the shuffled control permutes one teacher's targets
               "shuffled": student_preds("cd_shuffled", task, k, seed, es) if k == kc and method == "cd" else None}
        return {name: p for name, p in got.items() if p is not None}

    transfer_sets = {}  # (task, seed) -> its transfer set

    def transfer_of(task, seed):  # one transfer set per (task, seed), the same for every k and every student kind:
        if (task, seed) not in transfer_sets:  # disjoint from every k's demos and the task's evaluation sets
            es_in, *_ = sets = sets_of_task[task]
            pool = pools[manifest["eval_sets"][es_in]["demo_pool"]]
            seed_demos = [data.sample_demonstrations(pool, kk, seed, exclude=frames[es_in]) for kk in ks]
            transfer_sets[task, seed] = transfer_set(pool, n_transfer, seed, [*seed_demos, *(frames[es] for es in sets)])
        return transfer_sets[task, seed]

    def ensemble_sets(task, k, seed):  # m disjoint sets; set 0 is the single teacher's
        es_in, *_ = sets = sets_of_task[task]
        return data.demonstration_sets(pools[manifest["eval_sets"][es_in]["demo_pool"]], k, ensemble_m, seed, exclude=[
            frames[es_in], transfer_of(task, seed), *(frames[es] for es in sets)])

    def largest_icl(es, seed):  # the single-prompt ICL run with the most demonstrations for (es, seed)
        sel = _icl_runs(icl_rows, model_name, es, pattern.name, precision)
        kmax = int(sel.loc[(sel["seed"] == seed) & (sel["k"] > 0) & (sel["n_eval"] > 0), "k"].max())
        return kmax, _icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, kmax, seed, precision)[1]

    for (method, task, es_in, k, seed, mcfg, n_train, key_base, eval_sets, keys), save in zip(plan, keep):
        info = manifest["eval_sets"][es_in]
        pool = pools[info["demo_pool"]]
        demos = data.sample_demonstrations(pool, k, seed, exclude=frames[es_in])
        planned += keys
        if all(k_ in done for k_ in keys):
            say(f"skip (done): {key_base}")
            continue
        if method == "icl_ensemble":
            say(f"ICL ENSEMBLE  {task}  {ensemble_m} x k={k}  seed={seed}")
            run_rows.update(_ensemble_rows(
                lm, out_dir, manifest, frames, icl_rows, table, pattern, model_name, precision, task, es_in, k, seed,
                ensemble_sets(task, k, seed), ensemble_combine, eval_sets, keys, eval_batch_size,
                eval_max_tokens, progress, largest_icl, profile, prov, main, say))
            continue
        say(f"{method.upper()}  {task}  k={k}  seed={seed}  train n={n_train}"
            + (f"  ({ensemble_m} demonstration sets)" if method == "cd_ensemble" else ""))
        teach = {"seconds": 0.0, "cache_hit": None}
        demo_text = ";".join(map(str, demos["idx"]))
        if method != "pbft":  # one transfer set per (task, seed), the same for every k: disjoint from all their demos
            train = transfer_of(task, seed)
            tdemos = ensemble_sets(task, k, seed) if method == "cd_ensemble" else demos
            tkey = teacher_cache_key(f"{model_name}:{lm.source}", info["demo_pool"], pattern, k, seed, tdemos, train,
                                     mcfg, lm.dtype, lm.device, combine=ensemble_combine, runtime=runtime)
            teach = teacher_targets(lm, pattern, tdemos, train, mcfg, out_dir / "teacher_cache", tkey,
                                    batch_size=eval_batch_size, progress=progress, force=force,
                                    max_tokens=eval_max_tokens, combine=ensemble_combine)
            if method == "cd_ensemble":  # every set, sets separated by '|'
                demo_text = "|".join(";".join(map(str, d["idx"])) for d in tdemos)
            if method == "cd_shuffled":  # the same targets, each given to another transfer query
                perm = torch.from_numpy(np.random.default_rng(20_000 + seed).permutation(len(train)))
                teach = {**teach, "logp": teach["logp"][perm],
                         "topk_ids": None if teach.get("topk_ids") is None else teach["topk_ids"][perm]}
            rows = student_examples(lm.tokenizer, pattern, train, teach, lm.max_context)
        else:
            rows = student_examples(lm.tokenizer, pattern, demos, None, lm.max_context)
            train = demos
        student, st = train_student(lm.model, lm.tokenizer, rows, mcfg, vids, progress=progress, log_with=log_with,
                                    run_name=key_base, logging_dir=out_dir / "trackers")
        mkey = (ids_digest(list(map(str, train["idx"]))), json.dumps(asdict(mcfg), sort_keys=True))
        if mkey not in step_memory:  # the same inputs and recipe (CD and its control students): the same step
            step_memory[mkey] = training_step_memory(lm.model, lm.tokenizer, rows, mcfg, vids)
        tmem = step_memory[mkey]
        # evaluated at the run's precision, like its teacher and the zero-shot model (trained in float32)
        slm = wrap(student.to(next(lm.model.parameters()).dtype), lm.tokenizer, name=f"{method}-student",
                   device=lm.device)
        new_rows = []
        for es, key in zip(eval_sets, keys):
            einfo, ev = manifest["eval_sets"][es], frames[es]
            metrics, preds = evaluate(slm, ev, pattern, ev.iloc[0:0], batch_size=eval_batch_size, progress=progress,
                                      max_tokens=eval_max_tokens)
            pfile = f"predictions/{method}__{ids_digest([key])}.parquet"
            if main:
                atomic_write_parquet(preds, out_dir / pfile)
            zrow, zpreds = _icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, 0, 0, precision)
            ag_z = paired_vs(preds, zpreds, "zeroshot")
            if method != "pbft":  # CD and its control students: compared with the (largest k's) teacher
                tk = k if method in ("cd", "cd_ensemble") else kc
                if method == "cd_ensemble":  # its teacher: the same ensemble at inference
                    trow = run_rows[keys_of[("icl_ensemble", task, k, seed)][es]]
                    tpreds, same_demos = pd.read_parquet(out_dir / trow["predictions_file"]), True
                    ik, ipreds = largest_icl(es, seed)
                    ag_z = {**ag_z, **paired_vs(preds, ipreds, "icl"), "icl_k": ik, "ensemble_m": ensemble_m,
                            "ensemble_combine": ensemble_combine,
                            **(paired_vs(preds, c1, "cd") if (c1 := student_preds("cd", task, k, seed, es)) is not None
                               else {})}
                else:
                    trow, tpreds = _icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, tk, seed, precision)
                    same_demos = trow["demo_ids"] == ";".join(map(str, demos["idx"]))
                a_s, a_z = agreement(tpreds, preds), agreement(tpreds, zpreds)
                student = method in ("cd", "cd_ensemble")
                ag_z = {**ag_z, **paired_vs(preds, tpreds, "teacher"), "controls_k": tk,
                        **(controls_vs(preds, tpreds, zpreds, control_preds(task, k, seed, es, method)) if student else {}),
                        **(paired_vs(preds, pb, "pbft") if student
                           and (pb := student_preds("pbft", task, pbft_n, seed, es)) is not None else {}),
                        "teacher_acc": trow["score_acc"], "teacher_same_demos": bool(same_demos),
                        "agree_teacher_student": a_s["agreement"], "kappa_teacher_student": a_s["kappa"],
                        "kl_teacher_student": a_s["kl"], "agree_teacher_zeroshot": a_z["agreement"],
                        "kappa_teacher_zeroshot": a_z["kappa"], "kl_teacher_zeroshot": a_z["kl"]}
            new_rows.append({
                "run_key": key, "method": method, "model": model_name, "model_source": lm.source,
                "device": lm.device, "dtype": lm.dtype, "random_init": lm.source.startswith("random-init"),
                "n_processes": _world()[0],
                "train_task": task, "task": einfo["task"],
                "split": einfo["split"], "in_domain": es == es_in, "pattern": pattern.name, "k": k, "seed": seed,
                "n_train": n_train, "train_ids_digest": ids_digest(list(map(str, train["idx"]))),
                "eval_full_size": einfo["full_size"], "eval_subsampled": einfo["subsampled"],
                "eval_ids_digest": einfo["ids_digest"], "demo_ids": demo_text,
                "zeroshot_acc": zrow["score_acc"], **{f"cfg_{a}": b for a, b in asdict(mcfg).items()},
                "teacher_cache_s": teach["seconds"], "teacher_cache_hit": teach["cache_hit"],
                "train_s": st["train_s"], "train_peak_mem_mb": st["train_peak_mem_mb"],
                "train_mem_delta_mb": st["train_mem_delta_mb"], "train_steps": st["steps"],
                "train_mem_tensors_peak_mb": tmem.peak_mb, "train_mem_work_mb": tmem.work_mb,
                "loss_first": st["losses"][0], "loss_last": st["losses"][-1],
                **metrics, **ag_z, "predictions_file": pfile, "profile": profile, **prov})
            say(f"  {es}: acc={metrics['score_acc']:.3f} (zero-shot {zrow['score_acc']:.3f}, majority "
                  f"{metrics['majority_acc']:.3f})" + (f"  agree(teacher) {ag_z['agree_teacher_student']:.3f} vs "
                                                       f"zero-shot {ag_z['agree_teacher_zeroshot']:.3f}, constant "
                                                       f"{ag_z.get('agree_teacher_constant', float('nan')):.3f}"
                                                       if "agree_teacher_student" in ag_z else ""))
        student_dir = f"students/{method}-{task}-k{k}-s{seed}-{ids_digest([key_base])}" if save else ""
        if save and main:
            from .students import save_student

            metrics_by_set = {r["task"] + "/" + r["split"]: {c: r.get(c) for c in (
                "n_eval", "score_acc", "zeroshot_acc", "teacher_acc", "agree_teacher_student", "kl_teacher_student")}
                for r in new_rows}
            for v in metrics_by_set.values():
                v["n"] = v.pop("n_eval")
            save_student(slm.model, lm.tokenizer, out_dir / student_dir, {
                "student_key": key_base, "method": method, "train_task": task, "k": k, "seed": seed,
                "n_train": n_train, "base_model": model_name, "base_model_source": lm.source,
                "base_model_reference": (lm.info or {}).get("reference"), "demo_pool": info["demo_pool"],
                "demo_ids": [int(i) if str(i).isdigit() else str(i) for i in demo_text.replace("|", ";").split(";") if i],
                "pattern": {"name": pattern.name, "template": pattern.template,
                            "verbalizers": list(pattern.verbalizers)},
                "dtype": lm.dtype, "device": lm.device, "recipe": asdict(mcfg), "metrics": metrics_by_set,
                "profile": profile, "provenance": prov, "command": f"profile {profile!r}: " + " ".join(sys.argv)})
            say(f"  saved: {student_dir}")
        for r in new_rows:
            r["student_dir"] = student_dir
        if main:  # under a launcher (accelerate launch, torchrun) the main process writes; all compute
            ResultTable(out_dir / "train_log.csv").append(training_log(key_base, st, mcfg.grad_accum),
                                                          replace="student")
            table.append(new_rows)  # last: a student whose rows exist has its predictions and training log too
        run_rows.update({r["run_key"]: r for r in new_rows})
        _barrier()
        del student, slm
        gc.collect()
    out = table.read()
    return out[out["run_key"].isin(planned)].reset_index(drop=True)
