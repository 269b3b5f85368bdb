"""Every notebook parameter as data (type, allowed values, meaning) and one validation for the pipeline,
the sweep files and each notebook's first cell.

The point is order: every bad value is reported *before* a model is loaded or a file is written, all
problems in one :class:`ParameterError`, each with what to do. ``validate`` is pure apart from two cheap
probes that need the outside world: whether a model name can be resolved without loading it
(:func:`llmft_utils.models.check_model_name`) and whether the results folder is writable.

Why not pydantic (installed, as a dependency): its per-field checks would replace :func:`_check_scalar` (~15
lines) and nothing else. What a user reads here is the cross-parameter and plan checks (03's teacher k against
02's ks, ensembles, QQP sets, the device, the tracker), spelling suggestions for names and choices, and one
message per problem saying what to do; pydantic's ("Input should be a valid integer") say none of that, and a
model class per notebook would be a second place where each parameter's type is written.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path


class ParameterError(ValueError):
    """One or more parameters are invalid; the message lists every problem found."""


@dataclass(frozen=True)
class Param:
    kind: str  # int | float | str | bool | list
    help: str
    choices: tuple = ()  # allowed values (of the items, for lists)
    item: str = ""  # item kind for lists: int | str
    min: float | None = None  # lowest allowed value (of the items, for lists)
    even: bool = False  # ints (or list items) must be even
    positive_open: bool = False  # float must be > min (not >=)
    max: float | None = None


def _study_tasks() -> tuple:
    from .data import ALL_EVAL_SETS, TASKS

    return tuple(t for t in dict.fromkeys(es.split("/")[0] for es in ALL_EVAL_SETS) if TASKS[t].demo_task == t)


def spec() -> dict[str, Param]:
    """Every parameter; built on call, from the modules that own the choices (patterns, tasks, dtypes, the
    distillation kinds), which are imported only then: where and on what a run runs, then what it studies."""
    return {**_run_params(), **_study_params()}


def _run_params() -> dict[str, Param]:
    """The parameters of where a run writes, its model, batching and evaluation data."""
    from . import models
    from .patterns import PATTERNS

    return {
        "profile": Param("str", "name of the run; results go to results/<profile>/ unless results_dir is set"),
        "data_dir": Param("str", "local data mirror; empty: $LLMFT_DATA_DIR, else ../shared/data beside the checkout, "
                                 "else the Hugging Face Hub"),
        "results_dir": Param("str", "output folder; empty: $LLMFT_RESULTS_DIR, else results/<profile>"),
        "compare_with": Param("str", "notebook 04: another results folder to compare this run with, row by row, example "
                                     "by example and verdict by verdict (llmft-study compare); empty: none"),
        "model": Param("str", "embedded name, alias, Hugging Face id or local model directory"),
        "pattern": Param("str", "prompt pattern", choices=tuple(PATTERNS)),
        "ks": Param("list", "numbers of demonstrations (0 is zero-shot; odd k: one extra of a seeded label)", item="int",
                    min=0),
        "seeds": Param("list", "data seeds for the demonstrations", item="int", min=0),
        "batch_size": Param("int", "queries per forward pass (evaluation, teacher caching)", min=1),
        "max_batch_tokens": Param("int", "> 0: evaluation and teacher batches of up to this many padded tokens "
                                         "instead of batch_size queries (GPUs); 0 uses batch_size", min=0),
        "device": Param("str", "auto, cpu or cuda[:N]"),
        "dtype": Param("str", "weights and evaluation precision; auto is float32 on CPU, tf32 on CUDA (both measured faithful)",
                       choices=models.DTYPES),
        "on_too_long": Param("str", "prompts longer than the context: error, or skip (counted)", choices=("error", "skip")),
        "force": Param("bool", "recompute rows (and teacher caches) that already exist"),
        "mnli_eval_n": Param("int", "MNLI-binary validation_matched rows, stratified; 0 keeps all", min=0),
        "rte_eval_n": Param("int", "RTE validation rows, stratified; 0 keeps all", min=0),
        "hans_eval_n": Param("int", "HANS rows, equal per subcase; 0 keeps all", min=0),
        "extra_eval_sets": Param("list", "evaluation sets beyond MNLI, RTE and HANS: MNLI-mismatched (sized by "
                                         "mnli_eval_n; out of domain for MNLI students), QQP in domain (heldout: rows "
                                         "held out of the local train subset; validation: GLUE dev, Hub only), "
                                         "PAWS-QQP (out of domain for QQP students, local mirror only) and the three "
                                         "ANLI dev rounds (binary, out of domain for MNLI students)", item="str",
                                 choices=EXTRA_SETS),
        "qqp_eval_n": Param("int", "QQP evaluation rows, stratified by label (qqp/heldout needs > 0)", min=0),
        "eval_seed": Param("int", "seed of the fixed evaluation subsets", min=0),
        "dev_n": Param("int", "development rows held out of each demonstration pool (recipe choices); 0: none", min=0),
    }


def _study_params() -> dict[str, Param]:
    """The parameters of what a run studies: its students, controls, ensembles and the training recipe."""
    from .distill import config as recipe
    from .distill.export import SAVE_STUDENTS

    tasks = _study_tasks()
    return {
        "cd_tasks": Param("list", "in-domain training tasks for CD and PBFT", item="str", choices=tasks),
        "ood_train_tasks": Param("list", "tasks whose students are also scored out of domain on HANS", item="str",
                                 choices=tasks),
        "cd_ks": Param("list", "teacher demonstrations k for CD (> 0)", item="int", min=1),
        "controls": Param("list", "control students beside CD at the largest cd_k: shuffled (teacher targets permuted "
                                  "across the transfer queries), self (k=0 self-distillation); [] for none",
                          item="str", choices=("shuffled", "self")),
        "control_tasks": Param("list", "training tasks that get the control students", item="str", choices=tasks),
        "ensemble_m": Param("int", "teacher ensembles: m disjoint demonstration sets of k per (task, k, seed), distilled "
                                   "into one student (cd_ensemble) and scored at inference (icl_ensemble); 0: none",
                            min=0),
        "ensemble_ks": Param("list", "demonstrations k per ensemble set (m·k in all; each k must be in ks)", item="int",
                             min=1),
        "ensemble_seeds": Param("list", "seeds that get the teacher ensemble (those not in seeds are not run)", item="int",
                                min=0),
        "ensemble_tasks": Param("list", "training tasks that get the teacher ensemble (among cd_tasks)", item="str",
                                choices=tasks),
        "ensemble_ood": Param("bool", "score the teacher ensembles (at inference and distilled) out of domain too"),
        "ensemble_combine": Param("str", "the ensemble's mean: of probabilities (prob) or of log-probabilities (logprob)",
                                  choices=recipe.ENSEMBLE_COMBINE),
        "n_transfer": Param("int", "unlabelled transfer queries per CD student", min=1),
        "pbft_n": Param("int", "labelled examples per PBFT student (the ICL demonstrations of k = pbft_n); 0 skips PBFT",
                        min=0),
        "target": Param("str", "distillation support", choices=recipe.TARGET_KINDS),
        "topk": Param("int", "support size when target is topk", min=1),
        "loss": Param("str", "distillation divergence", choices=recipe.LOSS_KINDS),
        "temperature": Param("float", "distillation temperature (> 0)", min=0.0, positive_open=True),
        "alpha": Param("float", "weight of the gold-label cross-entropy in CD (1.0 is PBFT)", min=0.0, max=1.0),
        "epochs": Param("int", "passes over the transfer set", min=1),
        "pbft_epochs": Param("int", "passes over the labelled examples for PBFT", min=1),
        "pbft_lr": Param("float", "AdamW peak learning rate for PBFT (> 0)", min=0.0, positive_open=True),
        "train_batch_size": Param("int", "examples per optimisation step", min=1),
        "lr": Param("float", "AdamW peak learning rate for CD (> 0)", min=0.0, positive_open=True),
        "lr_schedule": Param("str", "learning-rate schedule", choices=recipe.LR_SCHEDULES),
        "mixed_precision": Param("str", "student forward under bf16 autocast, or no", choices=recipe.MIXED_PRECISION),
        "lora_r": Param("int", "LoRA rank; 0 is full fine-tuning", min=0),
        "log_with": Param("str", "experiment tracker for training curves (tensorboard, wandb, mlflow, ...; must be "
                                 "installed); empty: none (train_log.csv is always written)", choices=recipe.TRACKERS),
        "save_students": Param("str", "students kept under <results>/students/ as Hugging Face folders with a model "
                                      "card: none, first (per task: first seed, largest k), first_seed, all",
                               choices=SAVE_STUDENTS),
    }


EXTRA_SETS = ("mnli_mismatched/validation", "qqp/heldout", "qqp/validation", "paws_qqp/dev_and_test", "anli/dev_r1",
              "anli/dev_r2", "anli/dev_r3")
_KIND = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _is(value, kind: str) -> bool:
    if kind in ("int", "float") and isinstance(value, bool):
        return False  # True is an int to Python, never a count or a rate here
    return isinstance(value, _KIND[kind])


def _suggest(value, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    lowered = [c for c in choices if str(c).lower() == str(value).lower()]
    hint = lowered or close
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _check_scalar(name: str, p: Param, value, kind: str) -> list[str]:
    if not _is(value, kind):
        return [f"{name}: expected {kind}, got {type(value).__name__} {value!r}"]
    errs = []
    if p.choices and value not in p.choices:
        errs.append(f"{name}: {value!r} is not one of {list(p.choices)}{_suggest(value, p.choices)}")
    if p.min is not None and kind in ("int", "float"):
        if value < p.min or (p.positive_open and value <= p.min):
            errs.append(f"{name}: {value!r} must be {'>' if p.positive_open else '>='} {p.min:g}")
    if p.max is not None and kind in ("int", "float") and value > p.max:
        errs.append(f"{name}: {value!r} must be <= {p.max:g}")
    if p.even and kind == "int" and value % 2:
        errs.append(f"{name}: {value!r} must be even (balanced demonstrations: k/2 per label)")
    return errs


def check_value(name: str, value, params: dict | None = None) -> list[str]:
    """Problems with one parameter value (empty list: fine)."""
    p = (params or spec()).get(name)
    if p is None:
        return []
    if p.kind != "list":
        return _check_scalar(name, p, value, p.kind)
    if not isinstance(value, (list, tuple)):
        return [f"{name}: expected a list of {p.item}s, got {type(value).__name__} {value!r} (e.g. {name}=[{value!r}])"]
    errs = [e for i, v in enumerate(value) for e in _check_scalar(f"{name}[{i}]", p, v, p.item)]
    if len(set(map(repr, value))) != len(value):
        errs.append(f"{name}: {list(value)!r} has duplicates")
    return errs


def _cross_checks(values: dict) -> list[str]:
    errs = []
    tracker = values.get("log_with")
    if isinstance(tracker, str) and tracker:
        from .distill.training import check_tracker

        try:
            check_tracker(tracker)
        except ValueError as e:
            if "not installed" in str(e):
                errs.append(f"log_with: {e}")
    dev = values.get("device")
    if isinstance(dev, str) and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev):
        errs.append(f"device: {dev!r} is not auto, cpu, cuda or cuda:N")
    elif isinstance(dev, str) and dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            errs.append(f"device: {dev!r} requested but CUDA is not available here; use device='cpu' or 'auto'")
    prof = values.get("profile")
    if isinstance(prof, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prof):
        errs.append(f"profile: {prof!r} must be a plain folder name (letters, digits, . _ -)")
    for name in ("ks", "seeds", "cd_tasks"):
        if isinstance(values.get(name), (list, tuple)) and not values[name]:
            errs.append(f"{name}: the list is empty; nothing would run")
    extra = values.get("extra_eval_sets")
    if isinstance(extra, (list, tuple)) and {"qqp/heldout", "qqp/validation"} <= set(extra):
        errs.append("extra_eval_sets: choose one QQP in-domain set, qqp/heldout (local) or qqp/validation (Hub)")
    if isinstance(extra, (list, tuple)) and "qqp/heldout" in extra and values.get("qqp_eval_n") == 0:
        errs.append("qqp_eval_n: qqp/heldout is drawn from the QQP train subset; give it a size > 0 (e.g. 1000)")
    cd_t = values.get("cd_tasks")
    if isinstance(extra, (list, tuple)) and isinstance(cd_t, (list, tuple)) and "qqp" in cd_t \
            and not {"qqp/heldout", "qqp/validation"} & set(extra):
        errs.append("cd_tasks: qqp needs an in-domain QQP set; add qqp/heldout (or qqp/validation) to extra_eval_sets")
    m = values.get("ensemble_m")
    if isinstance(m, int) and not isinstance(m, bool) and m:
        if m == 1:
            errs.append("ensemble_m: 1 set is no ensemble (that is single-prompt CD); use 0 (none) or >= 2")
        for name in ("ensemble_ks", "ensemble_seeds", "ensemble_tasks"):
            if isinstance(values.get(name), (list, tuple)) and not values[name]:
                errs.append(f"{name}: empty while ensemble_m={m}; list what gets the ensemble, or set ensemble_m=0")
    return errs


def precision_warnings(values: dict) -> list[str]:
    """What a run's bfloat16 settings cost on this machine, said before it starts: on a CPU without native bf16
    (:func:`probes.cpu_has_native_bf16`) bf16 autocast training and bf16 scoring are several times slower than
    float32, not faster. Warnings, not errors: the run is valid, only slow."""
    import torch

    from .probes import cpu_has_native_bf16

    on_cpu = values.get("device") == "cpu" or (values.get("device") in ("auto", None) and not torch.cuda.is_available())
    if not on_cpu or cpu_has_native_bf16():
        return []
    out = []
    if values.get("mixed_precision") == "bf16":
        out.append("mixed_precision=bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): bf16-autocast "
                   "training runs about 24x slower than float32 here (make bench); --set mixed_precision=no trains in "
                   "float32 (another recipe, so its students are trained anew)")
    if values.get("dtype") == "bfloat16":
        out.append("dtype=bfloat16 on a CPU without native bfloat16: scoring runs about 7x slower than float32 here "
                   "(make bench); --set dtype=float32")
    return out


def plan_checks(values: dict, notebooks) -> list[str]:
    """Problems between parameters of notebooks run together: 03 needs the ICL rows of 02 (its zero-shot
    run and one teacher per CD k and seed)."""
    nbs = " ".join(notebooks)
    errs = []
    if "02" in nbs and "03" in nbs and isinstance(values.get("ks"), list) and isinstance(values.get("cd_ks"), list):
        ens = values.get("ensemble_ks") if values.get("ensemble_m") else []
        missing = list(dict.fromkeys(k for k in [0, *values["cd_ks"], *(ens or [])] if k not in values["ks"]))
        if missing:
            errs.append(f"cd_ks/ks: notebook 03 needs ICL runs for k={missing} (zero-shot and every teacher k) "
                        f"(and every ensemble_k: its set 0 is that run) but ks={values['ks']}; add them to ks")
    return errs


def validate(values: dict, *, check_model: bool = True, notebooks=None, strict_names: bool = True) -> dict:
    """Check every known parameter in ``values`` (names, types, allowed values, case, ranges, the model
    name and the results folder) and raise one :class:`ParameterError` listing all problems. Names that
    are not parameters are errors when ``strict_names``. Returns ``values`` unchanged when all is well."""
    params = spec()
    errs = []
    if strict_names:
        for name in values:
            if name not in params:
                errs.append(f"{name}: unknown parameter{_suggest(name, params)}; known: {', '.join(sorted(params))}")
    for name, value in values.items():
        errs += check_value(name, value, params)
    errs += _cross_checks(values)
    if notebooks:
        errs += plan_checks(values, notebooks)
    if check_model and isinstance(values.get("model"), str) and values["model"]:
        from .models import ModelError, check_model_name

        try:
            check_model_name(values["model"])
        except ModelError as e:
            errs.append(f"model: {e}")
    if isinstance(values.get("data_dir"), str) and values["data_dir"]:
        from .data import DataError, resolve_data_dir

        try:
            resolve_data_dir(values["data_dir"])
        except DataError as e:
            errs.append(f"data_dir: {e}")
    if isinstance(values.get("compare_with"), str) and values["compare_with"]:
        if not (Path(values["compare_with"]).expanduser() / "icl.csv").is_file():
            errs.append(f"compare_with: {values['compare_with']!r} is not a results folder (no icl.csv in it)")
    if not errs and "results_dir" in values:
        from .store import ensure_writable, results_dir

        try:
            ensure_writable(results_dir(values.get("results_dir", ""), values.get("profile", "smoke"), create=False))
        except PermissionError as e:
            errs.append(f"results_dir: {e}")
    if errs:
        raise ParameterError(f"{len(errs)} invalid parameter{'s' if len(errs) > 1 else ''}:\n  - " + "\n  - ".join(errs))
    return values


def validate_namespace(namespace: dict, **kw) -> dict:
    """:func:`validate` the parameters found in a notebook's namespace (``globals()``): every name of
    :func:`spec` that it defines, and, where the results folder already holds notebook 01's manifest, what its
    pools cannot supply (:func:`data.size_checks`). For a notebook's first code cell, before any model load."""
    params = spec()
    values = validate({k: namespace[k] for k in params if k in namespace}, strict_names=False, **kw)
    if "cd_tasks" in values or "ks" in values:  # notebooks 02 and 03 (01 writes the manifest; it is not checked)
        from .data import load_manifest, size_checks
        from .store import results_dir

        out = results_dir(values.get("results_dir", ""), values.get("profile", "smoke"), create=False)
        if (out / "manifest.json").is_file():
            errs = size_checks(load_manifest(out), values)
            if errs:
                raise ParameterError(f"{len(errs)} parameter{'s' if len(errs) > 1 else ''} the prepared data in "
                                     f"{out} cannot supply:\n  - " + "\n  - ".join(errs))
    return values


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def coerce_cli(name: str, text: str):
    """A ``--set NAME=TEXT`` value as the parameter's type: a Python literal where it parses, booleans
    case-insensitively (``force=false`` is False, not the truthy string 'false'), a scalar for a list
    parameter as a one-item list (``seeds=0`` is [0])."""
    import ast

    p = spec().get(name)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if p is None:
        return value
    if p.kind == "bool" and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if p.kind == "bool" and isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if p.kind == "list" and isinstance(value, tuple):
        return list(value)
    if p.kind == "list" and not isinstance(value, list):
        return [value]
    if p.kind == "str" and not isinstance(value, str):
        return text  # e.g. model=123 or pattern=gpt-3 that happen to parse as literals
    return value
