"""Distillation losses, pure and in log space (formulas in each docstring), on the chosen target support.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import LOSS_KINDS, TARGET_KINDS


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
        if topk_ids is None:
            raise ValueError("target 'topk' needs the teacher's top-k token ids, and these training rows carry none: "
                             "make them with teacher_targets(..., cfg) of the same recipe, or use target='verbalizer'")
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
