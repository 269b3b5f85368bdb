"""The student's side of the data: zero-shot prompts with their teacher targets, and the left-padded
batches whose last column is every row's answer position.
"""
from __future__ import annotations

import torch

from ..patterns import query_texts
from ..scoring.attention import mask_arguments
from ..scoring.errors import PromptTooLongError


def student_examples(tokenizer, pattern, examples, teacher: dict | None, max_context: int) -> list[dict]:
    """Zero-shot student prompts (token ids) with their teacher targets and gold labels."""
    texts = query_texts(pattern, examples, False)
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
    arguments of :func:`scoring.attention.mask_arguments` (no wait for the device)."""
    return model(input_ids=batch["input_ids"], logits_to_keep=1,
                 **mask_arguments(model, batch["attention_mask"], batch["position_ids"])).logits[:, -1]
