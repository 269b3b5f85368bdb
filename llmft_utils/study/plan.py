"""The CD sweep's plan: the students it trains, as data.
"""
from __future__ import annotations

from typing import NamedTuple

from ..distill.config import DistillConfig

CONTROL_METHODS = {"shuffled": "cd_shuffled", "self": "cd_self"}  # control students: name -> method


def config_from_params(p: dict) -> DistillConfig:
    """The CD recipe from notebook parameters (a profile's, a notebook's ``globals()``, the CLI's)."""
    return DistillConfig(target=p["target"], topk=p["topk"], loss=p["loss"], temperature=p["temperature"],
                         alpha=p["alpha"], epochs=p["epochs"], batch_size=p["train_batch_size"], lr=p["lr"],
                         lr_schedule=p["lr_schedule"], mixed_precision=p["mixed_precision"], lora_r=p["lora_r"])


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
