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
to the device once per run and results come back once (:func:`forward.forward_rows`).

Exactness: a row is only scored on the reused prefix where that is exact for the model's kind of
attention (:func:`exact_reuse_length`: unlimited for full attention, within the window for sliding
windows, never for anything else); the other rows are scored on their full prompts, and the reason is
logged and returned as ``prefix_reuse_note``. Every run that reuses a prefix re-scores its most padded
row on its full prompt and raises :class:`PrefixReuseMismatch` if the two disagree.
"""
from . import attention, errors, evaluation, forward, reuse, scorer, tokens
from .attention import mask_arguments, uses_split_attention
from .errors import PrefixReuseMismatch, PromptTooLongError
from .evaluation import (
                         calibrated_scores,
                         combine_label_logprobs,
                         content_free_logprobs,
                         evaluate,
                         evaluate_ensemble,
                         full_prompt_cost,
                         label_metrics,
                         wilson_ci,
)
from .reuse import exact_reuse_length, layer_types
from .scorer import answer_logits, check_context, largest_batch_memory, score_prompts
from .tokens import build_rows, continuation_ids, split_prefix

__all__ = ["attention", "errors", "evaluation", "forward", "reuse", "scorer", "tokens", "PrefixReuseMismatch",
           "PromptTooLongError", "answer_logits", "check_context", "build_rows", "calibrated_scores", "combine_label_logprobs",
           "content_free_logprobs", "continuation_ids", "evaluate", "evaluate_ensemble", "exact_reuse_length",
           "full_prompt_cost", "label_metrics", "largest_batch_memory", "layer_types", "mask_arguments", "score_prompts",
           "split_prefix", "uses_split_attention", "wilson_ci"]
