"""Resume keys: the strings that say a result row is done. A row whose key is in its table is not run again
(unless ``force``); every key holds what decides the row's numbers (model, evaluation set and its ids,
pattern, k, seed, precision, the demonstration pool the row drew from and, for students, the recipe),
never the hardware.

The pool enters as ``pool<digest>`` (:func:`pool_digest`: the first 12 hex digits of the sha256 of the
prepared pool file), in every key whose row draws from it: ICL at k > 0 and every student (CD, PBFT and
controls train on pool rows). Zero-shot rows draw nothing from a pool and keep one key whatever the pool.
So rows made from another pool (another ``dev_n``, data mirror or duplicate policy) are never reused.
"""
from __future__ import annotations


def precision_tag(lm) -> str:
    """``dtype@device kind`` (e.g. ``float32@cpu``): part of every resume key, so that runs at another precision
    or on another kind of device never count as done, nor get mixed with these."""
    return f"{lm.dtype}@{str(lm.device).split(':')[0]}"


def pool_digest(pool_sha256: str) -> str:
    """The pool's part of a key: the first 12 hex digits of its prepared file's sha256."""
    return pool_sha256[:12]


def icl_key(model_name: str, es: str, pattern: str, k: int, seed: int, eval_digest: str, precision: str,
            pool: str) -> str:
    """The run key of one ICL (or zero-shot) row; ``pool``: :func:`pool_digest` of its demonstration pool."""
    return f"{model_name}|{es}|{pattern}|k{k}|s{seed}|eval{eval_digest}|" + (f"pool{pool}|" if k else "") + precision


def student_key_base(method: str, model_name: str, task: str, pattern: str, k: int, seed: int, n_train: int,
                     recipe: str, pool: str, precision: str) -> str:
    """A student's part of its rows' keys (``recipe``: the digest of its DistillConfig, ``infer`` for an ICL
    ensemble; ``pool``: :func:`pool_digest` of the pool its demonstrations and transfer set come from). An
    ensemble's key adds ``|m<m>-<combine>`` (:attr:`EnsembleSpec.tag`)."""
    return f"{method}|{model_name}|{task}|{pattern}|k{k}|s{seed}|n{n_train}|{recipe}|pool{pool}|{precision}"


# where the recipe digest sits in a student key (and in every row key built on it), read off the key itself
_RECIPE_PART = student_key_base("", "", "", "", 0, 0, 0, "\x00", "", "").split("|").index("\x00")


def with_recipe(key: str, recipe: str) -> str:
    """A student row's key (:func:`student_key_base`, :func:`eval_key`) with its recipe digest replaced by
    ``recipe``: ``llmft-study compare --across`` matches two runs' students on everything else this way."""
    parts = key.split("|")
    parts[_RECIPE_PART] = recipe
    return "|".join(parts)


def eval_key(key_base: str, es: str, eval_digest: str) -> str:
    """The run key of a student's row on evaluation set ``es``."""
    return f"{key_base}|{es}|eval{eval_digest}"
