"""Plans as data: what a sweep runs (:class:`ICLPlan`, :class:`CDPlan`) and how it scores and records it
(:class:`EvalOptions`), each made from the notebook parameters by one adapter, ``from_params``.

The notebooks, ``python -m llmft_utils.train``, ``tools/study_direct.py`` and the recipe selection all build
their sweeps here, so a setting means the same thing on every path; the values themselves come from the
profiles (:mod:`llmft_utils.profiles`). ``narrowed(**changes)`` gives the same plan for a subset (one seed,
one task), as the step-by-step runners use it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import NamedTuple

from ..distill.config import ENSEMBLE_COMBINE, DistillConfig
from ..store import ids_digest
from .keys import eval_key, student_key_base

CONTROL_METHODS = {"shuffled": "cd_shuffled", "self": "cd_self"}  # control students: name -> method


def config_from_params(p: dict) -> DistillConfig:
    """The CD recipe from notebook parameters (a profile's, a notebook's ``globals()``, the CLI's)."""
    return DistillConfig(**{field: p[param] for field, param in RECIPE_PARAMS.items()})


RECIPE_PARAMS = {"target": "target", "topk": "topk", "loss": "loss", "temperature": "temperature", "alpha": "alpha",
                 "epochs": "epochs", "batch_size": "train_batch_size", "lr": "lr", "lr_schedule": "lr_schedule",
                 "mixed_precision": "mixed_precision", "lora_r": "lora_r"}  # DistillConfig field -> notebook parameter


def recipe_params(cfg: DistillConfig) -> dict:
    """The notebook parameters of a recipe: the inverse of :func:`config_from_params` (the profiles' recipe
    is ``recipe_params(DistillConfig())``)."""
    return {param: getattr(cfg, field) for field, param in RECIPE_PARAMS.items()}


def _tuple(v):
    return None if v is None else tuple(v)


@dataclass(frozen=True)
class EvalOptions:
    """How a sweep scores every model and what its rows record; never what it runs."""
    batch_size: int = 8  # queries per forward (or see max_tokens)
    max_tokens: int = 0  # > 0: batches of up to this many padded tokens instead of batch_size rows
    on_too_long: str = "error"  # a prompt beyond the context: error | skip (recorded as skipped)
    force: bool = False  # recompute rows that are already done
    model_name: str | None = None  # the name rows and keys carry (default: the loaded model's)
    profile: str = ""  # recorded in every row
    progress: bool = True  # progress bars
    fidelity_sample: int = 32  # bfloat16/float16 runs: queries per ICL run scored again in float32 (0: none)

    @classmethod
    def from_params(cls, p: dict, progress: bool = True) -> EvalOptions:
        return cls(batch_size=p["batch_size"], max_tokens=p["max_batch_tokens"], on_too_long=p.get("on_too_long", "error"),
                   force=p["force"], model_name=p["model"], profile=p["profile"], progress=progress)

    def narrowed(self, **changes) -> EvalOptions:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ICLPlan:
    """The k × seed ICL sweep over every evaluation set of a results folder (k = 0 runs once, seed 0)."""
    pattern: str
    ks: tuple
    seeds: tuple
    full_prompt_sample: int = 4  # queries also scored on full prompts per k > 0 run (the cost without a cache)

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(self.ks))
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @classmethod
    def from_params(cls, p: dict) -> ICLPlan:
        return cls(p["pattern"], p["ks"], p["seeds"])

    def narrowed(self, **changes) -> ICLPlan:
        return dataclasses.replace(self, **changes)

    def runs(self, eval_sets) -> list[tuple[str, int, int]]:
        """``(eval set, k, seed)`` in the order they run."""
        return [(es, k, s) for es in eval_sets for k in self.ks for s in (self.seeds if k > 0 else (0,))]


@dataclass(frozen=True)
class EnsembleSpec:
    """Teacher ensembles: m disjoint demonstration sets of each k in ``ks`` (``m = 0``: none)."""
    m: int = 0
    ks: tuple = ()
    seeds: tuple | None = None  # None: every seed of the plan
    tasks: tuple | None = None  # None: every training task
    combine: str = "prob"  # the members' mean: of probabilities, or of log-probabilities
    ood: bool = True  # score ensemble students out of domain too

    def __post_init__(self):
        for name in ("ks", "seeds", "tasks"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if self.m and self.m < 2:
            raise ValueError(f"ensemble_m: {self.m} sets is no ensemble; use 0 (none) or >= 2")
        if self.combine not in ENSEMBLE_COMBINE:
            raise ValueError(f"ensemble_combine: {self.combine!r} is not one of {list(ENSEMBLE_COMBINE)}")

    @property
    def tag(self) -> str:
        return f"m{self.m}-{self.combine}"


class PlannedStudent(NamedTuple):
    """One row group of the CD sweep: a student (CD, PBFT, control, ensemble) or an ICL ensemble at inference."""
    method: str  # cd | pbft | cd_shuffled | cd_self | cd_ensemble | icl_ensemble
    task: str  # training task
    es_in: str  # its in-domain evaluation set
    k: int  # teacher demonstrations (CD) or labelled examples (PBFT: k = pbft_n)
    seed: int
    cfg: DistillConfig
    n_train: int
    key_base: str  # the student's part of its rows' run keys
    eval_sets: list  # in-domain first, then out of domain
    keys: list  # one run key per evaluation set


@dataclass(frozen=True)
class CDPlan:
    """The CD sweep: per training task, control students, PBFT, CD at each k, teacher ensembles; every seed."""
    pattern: str
    train_tasks: tuple
    ks: tuple
    seeds: tuple
    n_transfer: int  # unlabelled transfer queries per (task, seed)
    pbft_n: int  # labelled examples of PBFT (0: no PBFT)
    recipe: DistillConfig
    pbft_epochs: int
    pbft_lr: float | None = None  # None: the recipe's lr
    ood_train_tasks: tuple | None = None  # tasks whose students are scored out of domain too (None: all)
    controls: tuple = ()  # shuffled | self
    control_tasks: tuple | None = None  # None: every training task
    ensemble: EnsembleSpec = EnsembleSpec()
    save_students: str = "none"
    log_with: str = ""  # experiment tracker

    def __post_init__(self):
        for name in ("train_tasks", "ks", "seeds", "ood_train_tasks", "controls", "control_tasks"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        bad = sorted(set(self.controls) - set(CONTROL_METHODS))
        if bad:
            raise ValueError(f"controls: unknown {bad}; use any of {list(CONTROL_METHODS)}")

    @classmethod
    def from_params(cls, p: dict) -> CDPlan:
        ens = EnsembleSpec(m=p.get("ensemble_m", 0), ks=p.get("ensemble_ks", ()), seeds=p.get("ensemble_seeds"),
                           tasks=p.get("ensemble_tasks"), combine=p.get("ensemble_combine", "prob"),
                           ood=p.get("ensemble_ood", True))
        return cls(p["pattern"], p["cd_tasks"], p["cd_ks"], p["seeds"], p["n_transfer"], p["pbft_n"],
                   config_from_params(p), p["pbft_epochs"], pbft_lr=p["pbft_lr"], ood_train_tasks=p["ood_train_tasks"],
                   controls=p.get("controls", ()), control_tasks=p.get("control_tasks"), ensemble=ens,
                   save_students=p["save_students"], log_with=p["log_with"])

    def narrowed(self, **changes) -> CDPlan:
        return dataclasses.replace(self, **changes)

    @property
    def control_k(self) -> int:
        """The k of the shuffled control and of the teacher the controls are compared with: the largest."""
        return max(self.ks) if self.ks else 0

    def pbft_recipe(self) -> DistillConfig:
        return DistillConfig(**{**asdict(self.recipe), "alpha": 1.0, "epochs": self.pbft_epochs,
                                "lr": self.pbft_lr or self.recipe.lr})

    def runs(self, task: str) -> list[tuple[str, int, int]]:
        """``(method, k, seed)`` of one training task, in the order they run: controls, PBFT, CD, ensembles."""
        kc, seeds, ens = self.control_k, self.seeds, self.ensemble
        ctl = [c for c in self.controls if self.control_tasks is None or task in self.control_tasks] if kc else []
        runs = ([("cd_self", 0, s) for s in seeds if "self" in ctl]
                + [("cd_shuffled", kc, s) for s in seeds if "shuffled" in ctl]
                + ([("pbft", self.pbft_n, s) for s in seeds] if self.pbft_n else [])
                + [("cd", k, s) for k in self.ks for s in seeds])
        if ens.m and (ens.tasks is None or task in ens.tasks):
            # the ensemble seeds among this plan's seeds (a plan narrowed to one seed runs that seed's ensemble, if any)
            ens_seeds = [s for s in seeds if ens.seeds is None or s in ens.seeds]
            runs += [(m_, k, s) for k in ens.ks for s in ens_seeds for m_ in ("icl_ensemble", "cd_ensemble")]
        return runs

    def students(self, manifest: dict, sets_of_task: dict, model_name: str, pattern_name: str, precision: str,
                 pools: dict) -> list[PlannedStudent]:
        """Every planned student with its recipe, evaluation sets and run keys (``sets_of_task``: the evaluation
        sets of each training task, in domain first; ``pools``: :func:`keys.pool_digest` of each demonstration pool)."""
        out = []
        for task in self.train_tasks:
            task_sets = sets_of_task[task]
            for method, k, seed in self.runs(task):
                mcfg = self.recipe if method != "pbft" else self.pbft_recipe()
                n_train = self.n_transfer if method != "pbft" else k
                recipe = ids_digest([json.dumps(asdict(mcfg), sort_keys=True)]) if method != "icl_ensemble" else "infer"
                pool = pools[manifest["eval_sets"][task_sets[0]]["demo_pool"]]
                key_base = (student_key_base(method, model_name, task, pattern_name, k, seed, n_train, recipe, pool,
                                             precision) + (f"|{self.ensemble.tag}" if method.endswith("_ensemble") else ""))
                eval_sets = list(task_sets) if self.ensemble.ood or not method.endswith("_ensemble") else task_sets[:1]
                keys = [eval_key(key_base, es, manifest["eval_sets"][es]["ids_digest"]) for es in eval_sets]
                out.append(PlannedStudent(method, task, eval_sets[0], k, seed, mcfg, n_train, key_base, eval_sets, keys))
        return out
