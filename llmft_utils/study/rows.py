"""The columns every result row shares, built in one place: who ran (run key, method, model), on what
(the evaluation set) and where its per-example predictions are. ``icl.csv`` and ``cd.csv`` put them in
different orders (kept as they were when the tables were first written), so each sweep composes these
pieces in its own order; a piece's own columns are always in the order below.
"""
from __future__ import annotations

from .. import dist
from ..store import ids_digest


def run_columns(key: str, method: str, model_name: str, lm) -> dict:
    """``run_key``, ``method``, ``model`` (the name rows and keys carry) and ``model_source``: every row's first
    four columns."""
    return {"run_key": key, "method": method, "model": model_name, "model_source": lm.source}


def device_columns(lm) -> dict:
    """Where the model computed: ``device`` and ``dtype``."""
    return {"device": lm.device, "dtype": lm.dtype}


def process_columns(lm) -> dict:
    """``random_init`` (random weights of a real shape) and ``n_processes`` (of the torch.distributed group)."""
    return {"random_init": lm.source.startswith("random-init"), "n_processes": dist.world()[0]}


def eval_set_columns(info: dict) -> dict:
    """An evaluation set from the folder's manifest (``info``): its full size, whether it was subsampled and the
    digest of the ids scored."""
    return {"eval_full_size": info["full_size"], "eval_subsampled": info["subsampled"],
            "eval_ids_digest": info["ids_digest"]}


def predictions_file(method: str, key: str) -> str:
    """The predictions file of the run ``key``, relative to the results folder."""
    return f"predictions/{method}__{ids_digest([key])}.parquet"
