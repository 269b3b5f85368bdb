"""llmft's prompt patterns as data.

A demonstration is ``query_text + verbalizer[label]``; the query for scoring is ``query_text`` and the
model is scored on the continuation ``verbalizer[label]`` (leading space included, as in llmft's
``ĠYes``/``ĠNo`` target tokens). Demonstrations are joined by ``separator`` and the separator is put
*in front of* each query (``...answer: Yes`` | ``\\n\\n{premise} ...``) so that the shared prefix ends on a
word and byte-level BPE cannot merge across the boundary.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    name: str
    template: str  # uses {premise} and {hypothesis}
    verbalizers: tuple  # continuation for label 0 (entailment), label 1 (not entailment)
    separator: str = "\n\n"

    def query(self, premise: str, hypothesis: str) -> str:
        return self.template.format(premise=premise, hypothesis=hypothesis)

    def demonstration(self, premise: str, hypothesis: str, label: int) -> str:
        return self.query(premise, hypothesis) + self.verbalizers[int(label)]


# llmft (Mosbach et al. 2023) patterns: pattern + target_prefix, targets ĠYes/ĠNo or ĠTrue/ĠFalse.
PATTERNS: dict[str, Pattern] = {
    "minimal": Pattern("minimal", "{premise} {hypothesis} ?", (" Yes", " No")),
    "gpt-3": Pattern("gpt-3", "{premise} question: {hypothesis} Yes or No? answer:", (" Yes", " No")),
    "eval-harness": Pattern("eval-harness", "{premise} \nQuestion: {hypothesis} True or False?\nAnswer:",
                            (" True", " False")),
    # Not llmft's: the instruction models' own turn format (ChatML, used by SmolLM2-Instruct and Qwen2.5-Instruct;
    # no system turn). Each demonstration is a user turn and the assistant's answer; the separator closes the
    # answer's turn, so the query starts with <|im_end|>, a special token no merge can cross.
    "chatml": Pattern("chatml", "<|im_start|>user\n{premise}\nQuestion: Does this imply that \"{hypothesis}\"? "
                      "Yes or No?<|im_end|>\n<|im_start|>assistant\n", ("Yes", "No"), separator="<|im_end|>\n"),
}


def get_pattern(name: str) -> Pattern:
    try:
        return PATTERNS[name]
    except KeyError:
        raise ValueError(f"unknown pattern {name!r}; known patterns: {', '.join(PATTERNS)}") from None


def build_prefix(pattern: Pattern, demos) -> str:
    """The shared demonstration prefix (empty for k = 0). ``demos``: DataFrame with premise/hypothesis/label."""
    return pattern.separator.join(
        pattern.demonstration(p, h, y) for p, h, y in zip(demos["premise"], demos["hypothesis"], demos["label"]))


def query_text(pattern: Pattern, premise: str, hypothesis: str, has_prefix: bool) -> str:
    """The per-query part that follows the prefix (the separator leads when there is a prefix)."""
    return (pattern.separator if has_prefix else "") + pattern.query(premise, hypothesis)


def query_texts(pattern: Pattern, table, has_prefix: bool) -> list[str]:
    """:func:`query_text` of every row of ``table`` (premise/hypothesis columns: a DataFrame or a dataset)."""
    return [query_text(pattern, p, h, has_prefix) for p, h in zip(table["premise"], table["hypothesis"])]


def verbalizer_token_ids(tokenizer, pattern: Pattern, context: str = "x answer:") -> list[list[int]]:
    """Token ids of each verbalizer as the tokenizer splits it *after a context* (encoded together)."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for v in pattern.verbalizers:
        full = tokenizer(context + v, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base:
            raise ValueError(f"tokenizer merges the verbalizer {v!r} into its context; cannot score it cleanly")
        out.append(full[len(base):])
    return out
