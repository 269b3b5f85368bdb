"""The declared schema of every results table, with its version, and the one way to read and write them.

Each table of a results folder (``icl.csv``, ``cd.csv``, ``train_log.csv``, the checks tables of notebook
04, the per-example ``predictions/*.parquet`` and ``run_manifest.json``) has a :class:`TableSchema`: the
columns every row must have, with their kind (``str``, ``int``, ``float``, ``bool``), the columns a row of
a given method must have, the known optional columns, and a version. The version is stored with the data:
a ``schema_version`` column in every CSV row, ``llmft_schema_version`` in a parquet file's metadata, a
``schema_version`` key in the manifest. A file without one was written before versions existed (version 1).

Readers go through :func:`read_table` / :func:`read_predictions` / :func:`read_run_manifest`. A missing or
mistyped column, or a version this code does not know, raises :class:`SchemaError` naming the file, the
column and the version that wrote it. An older version is migrated when a migration exists (each step is
reported once per file); nothing is filled in with NaN. Writers go through :class:`StudyTable` (appends,
resume by key), :func:`write_table` and :func:`write_predictions`, which stamp the current version and
refuse rows that do not meet the schema (a writer cannot drift from the declaration).

Version history (every table): 1, before versions (keys of ICL rows at k > 0 and of students had no
demonstration pool); 2, the pool's digest in those keys (:mod:`.keys`) and the version stamp.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .. import data
from ..store import ResultTable, atomic_write, atomic_write_csv, file_lock
from .keys import pool_digest

log = logging.getLogger(__name__)

VERSION_COLUMN = "schema_version"
PARQUET_KEY = b"llmft_schema_version"
KINDS = ("str", "int", "float", "bool")


class SchemaError(ValueError):
    """A results file that does not meet its declared schema (a user-facing error: names file and column)."""


def cols(spec: str) -> dict:
    """``"str: a b; int: c"`` -> ``{"a": "str", "b": "str", "c": "int"}`` (the compact form used below)."""
    out = {}
    for part in filter(str.strip, spec.split(";")):
        kind, names = part.split(":")
        assert kind.strip() in KINDS, kind
        out.update(dict.fromkeys(names.split(), kind.strip()))
    return out


@dataclass(frozen=True)
class Migration:
    """One step from ``version`` to ``version + 1``: ``apply(frame, folder) -> frame``."""
    version: int
    what: str
    apply: Callable[[pd.DataFrame, Path], pd.DataFrame]
    quiet: bool = False  # a step that changes nothing but the stamp is not reported


@dataclass(frozen=True)
class TableSchema:
    name: str  # the file name (``predictions`` for the per-example parquet files)
    version: int
    required: dict  # column -> kind, in every row
    by_method: dict = field(default_factory=dict)  # method -> {column: kind}: required in that method's rows
    optional: dict = field(default_factory=dict)  # column -> kind, checked where present
    migrations: tuple = ()  # Migration steps, oldest first

    def kind(self, column: str) -> str | None:
        for d in (self.required, self.optional, *self.by_method.values()):
            if column in d:
                return d[column]
        return None


# -- migrations ------------------------------------------------------------------------------------------------

def _with_pool(key: str, at: int, pool: str) -> str:
    """``key`` with ``pool<pool>`` inserted as field ``at`` (fields split at ``|``), unless it has a pool."""
    fields = key.split("|")
    if any(f.startswith("pool") for f in fields):
        return key
    return "|".join([*fields[:at], f"pool{pool}", *fields[at:]])


def _pools(folder: Path) -> tuple[dict, dict]:
    """The folder's pools (name -> digest) and each training task's pool digest, from its manifest.json."""
    manifest = data.load_manifest(folder)
    pools = {name: pool_digest(info["sha256"]) for name, info in manifest["demo_pools"].items()}
    of_task = {task: pools[manifest["eval_sets"][data.student_eval_sets(manifest, task, False)[0]]["demo_pool"]]
               for task in {info["task"] for info in manifest["eval_sets"].values()} if task in data.TASKS}
    return pools, of_task


def _icl_pool_keys(t: pd.DataFrame, folder: Path) -> pd.DataFrame:
    pools, _ = _pools(folder)
    return t.assign(run_key=[_with_pool(k, 6, pools[p]) if kk > 0 else k
                             for k, kk, p in zip(t["run_key"], t["k"], t["demo_pool"])])


def _cd_pool_keys(t: pd.DataFrame, folder: Path) -> pd.DataFrame:
    _, of_task = _pools(folder)
    return t.assign(run_key=[_with_pool(k, 8, of_task[task]) for k, task in zip(t["run_key"], t["train_task"])])


def _log_pool_keys(t: pd.DataFrame, folder: Path) -> pd.DataFrame:
    _, of_task = _pools(folder)  # student = the student's key: method|model|task|...; run_key = student|epoch...
    students = [_with_pool(s, 8, of_task[s.split("|")[2]]) for s in t["student"]]
    return t.assign(run_key=[s + "|" + k.rsplit("|", 1)[1] for s, k in zip(students, t["run_key"])], student=students)


def _unchanged(t: pd.DataFrame, folder: Path) -> pd.DataFrame:
    return t


_POOL = "run keys given their demonstration pool's digest (from the folder's manifest.json)"
_SAME = (Migration(1, "layout unchanged (version stamp added)", _unchanged, quiet=True),)


# -- the declarations ------------------------------------------------------------------------------------------

_PROVENANCE = cols("str: git_commit llmft_utils python torch transformers hardware timestamp")
_PROVENANCE_MORE = cols("str: cpu_model machine cpu_capability blas onednn isa_env gpu_name gpu_capability cuda "
                        "cudnn model_weights_sha256 cudnn_deterministic cudnn_benchmark tf32_matmul; "
                        "int: num_threads num_interop_threads; bool: deterministic_algorithms")  # GPU fields: '' on CPU
_SCORED = cols(  # what scoring.evaluate reports for every evaluated row
    "str: run_key method model model_source device dtype task split pattern eval_ids_digest predictions_file "
    "scoring mem_kind profile; "
    "int: k seed eval_full_size n_eval n_skipped_too_long majority_label n_processes; "
    "bool: eval_subsampled random_init single_token_verbalizers; "
    "float: majority_acc score_acc score_acc_lo score_acc_hi pred_label1_frac acc_label0 acc_label1 balanced_acc "
    "ece prefix_tokens query_tokens_mean tokens_processed n_prefix_fallback wall_s s_per_query peak_mem_mb "
    "peak_mem_delta_mb score_acc_contextual balanced_acc_contextual pred_label1_frac_contextual "
    "prior_label1_contextual score_acc_batch balanced_acc_batch pred_label1_frac_batch prior_label1_batch")
_MEMORY = cols("float: top1_acc non_verbalizer_frac mem_tensors_peak_mb mem_weights_mb mem_work_mb; str: mem_method")
_FIDELITY = cols("str: fidelity_reference; float: fidelity_n fidelity_flip_rate fidelity_max_dlogp")
_TRAINED = cols(
    "float: n_train cfg_topk cfg_beta cfg_temperature cfg_alpha cfg_epochs cfg_batch_size cfg_grad_accum cfg_lr "
    "cfg_weight_decay cfg_max_grad_norm cfg_warmup_ratio cfg_lora_r cfg_lora_alpha cfg_seed train_s train_steps "
    "train_peak_mem_mb train_mem_delta_mb train_mem_tensors_peak_mb train_mem_work_mb loss_first loss_last "
    "teacher_cache_s; "
    "str: train_ids_digest cfg_target cfg_loss cfg_lr_schedule cfg_mixed_precision cfg_train_attention")
_DISTILLED = {**_TRAINED, **cols("float: teacher_acc agree_teacher_student kappa_teacher_student kl_teacher_student "
                                 "agree_teacher_zeroshot kappa_teacher_zeroshot kl_teacher_zeroshot")}
_ENSEMBLE = cols("float: ensemble_m icl_k; str: ensemble_combine")

ICL = TableSchema("icl.csv", 2, {**_SCORED, **_MEMORY, **cols("str: demo_pool; int: n_params batch_size "
                                                            "max_batch_tokens"), **_PROVENANCE},
                  by_method={"icl": cols("str: demo_ids")},
                  optional={**_PROVENANCE_MORE, **_FIDELITY, **cols("float: s_per_query_full_prompt "
                                                                    "n_full_prompt_sample; str: prefix_reuse_note")},
                  migrations=(Migration(1, _POOL, _icl_pool_keys),))
CD = TableSchema(
    "cd.csv", 2,
    {**_SCORED, **cols("str: train_task; bool: in_domain; float: zeroshot_acc mcnemar_p_vs_zeroshot; "
                       "int: student_only_right_vs_zeroshot zeroshot_only_right"), **_PROVENANCE},
    by_method={"cd": {**_DISTILLED, **_MEMORY, **cols(
                   "str: demo_ids controls_checked; bool: beats_controls; "
                   "float: agree_teacher_constant agree_teacher_bias_matched mcnemar_p_vs_teacher")},
               "cd_shuffled": {**_DISTILLED, **_MEMORY}, "cd_self": {**_DISTILLED, **_MEMORY},
               "pbft": {**_TRAINED, **_MEMORY, **cols("str: demo_ids")},
               "cd_ensemble": {**_DISTILLED, **_MEMORY, **_ENSEMBLE},
               "icl_ensemble": {**_ENSEMBLE, **cols("str: demo_ids; float: member_acc_mean member_acc_min "
                                                    "member_acc_max mcnemar_p_vs_icl")}},
    optional={**_PROVENANCE_MORE, **_FIDELITY, **cols(
        "str: student_dir teacher_cache_hit teacher_same_demos member0_reused; float: controls_k "
        "member_label1_frac_min member_label1_frac_max "
        "student_only_right_vs_teacher teacher_only_right agree_teacher_shuffled agree_teacher_self "
        "mcnemar_p_vs_constant_control mcnemar_p_vs_bias_matched_control mcnemar_p_vs_shuffled_control "
        "mcnemar_p_vs_self_control kl_teacher_shuffled kl_teacher_self student_only_right_vs_pbft pbft_only_right "
        "mcnemar_p_vs_pbft student_only_right_vs_icl icl_only_right student_only_right_vs_cd cd_only_right "
        "mcnemar_p_vs_cd; str: prefix_reuse_note")},
    migrations=(Migration(1, _POOL, _cd_pool_keys),))
TRAIN_LOG = TableSchema("train_log.csv", 2, cols("str: run_key student; int: batch; float: loss lr grad_norm"),
                        migrations=(Migration(1, _POOL, _log_pool_keys),))
_GROUP = cols("str: model pattern eval_set train_task config; int: k")
CHECKS = {s.name: s for s in [  # notebook 04's tables
    TableSchema("summary.csv", 2, {**_GROUP, **cols(
        "str: method_label score_acc_interval; int: n_seeds; float: score_acc_mean score_acc_ci_lo score_acc_ci_hi "
        "majority_acc_mean s_per_query_mean peak_mem_mb_mean balanced_acc_mean")}, migrations=_SAME),
    TableSchema("transfer_checks.csv", 2, {**_GROUP, **cols(
        "int: seed; str: controls_checked; bool: beats_controls; float: agree_teacher_student agree_teacher_zeroshot "
        "agree_teacher_constant agree_teacher_bias_matched kl_teacher_student")}, migrations=_SAME),
    TableSchema("distribution_checks.csv", 2, {**_GROUP, **cols("int: seed; float: kl_student")}, migrations=_SAME),
    TableSchema("calibrated_checks.csv", 2, cols(
        "str: eval_set train_task a b calibration direction; int: k seed n only_a only_b; float: acc_a acc_b p"), migrations=_SAME),
    TableSchema("ensemble_checks.csv", 2, cols(
        "str: eval_set train_task; int: k seed m total_demos; float: acc_zeroshot acc_icl acc_cd acc_cd_ensemble "
        "acc_icl_ensemble"), optional=cols("float: member_acc_mean member_acc_max member_label1_frac_min "
                                           "member_label1_frac_max"), migrations=_SAME),
    TableSchema("ensemble_members.csv", 2, cols(
        "str: eval_set train_task member_accs member_label1_fracs vs_best_member; int: k seed m n best_member "
        "only_ensemble_right only_best_right; float: gold_label1_frac acc_icl_ensemble acc_member_mean "
        "ensemble_minus_mean_member ci_lo ci_hi p_vs_mean_member acc_member_best p_vs_best_member"), migrations=_SAME),
    TableSchema("break_even.csv", 2, {**_GROUP, **cols(
        "int: n_seeds n_students; float: s_per_query_icl s_per_query_student cd_once_s break_even_cached")}, migrations=_SAME),
    TableSchema("contrasts.csv", 2, cols(
        "str: family contrast a b measure column model pattern eval_set train_task config seeds verdict; "
        "int: k n_seeds n_examples; float: estimate ci_lo ci_hi ci_examples_lo ci_examples_hi ci_seeds_lo ci_seeds_hi "
        "p p_holm"), optional=cols("float: margin p_equivalence p_not_worse; bool: equivalent; str: question"),
        migrations=_SAME),
    TableSchema("hans_subcases.csv", 2, cols(
        "str: run_key method_label train_task heuristic subcase; int: k seed label n; float: acc"), migrations=_SAME),
]}
PREDICTIONS = TableSchema("predictions", 2, cols("int: idx label pred; float: logp_label0 logp_label1; bool: skipped"),
                          optional=cols("int: top1_token pred_contextual pred_batch; bool: top1_is_verbalizer; "
                                        "str: heuristic subcase"), migrations=_SAME)
RUN_MANIFEST_VERSION = 2
RUN_MANIFEST_KEYS = ("label", "notebooks", "parameters", "profile", "provenance")
SCHEMAS = {s.name: s for s in (ICL, CD, TRAIN_LOG, *CHECKS.values(), PREDICTIONS)}


def versions() -> dict:
    """Every table's current schema version (written into the run manifest)."""
    return {**{n: s.version for n, s in SCHEMAS.items()}, "run_manifest.json": RUN_MANIFEST_VERSION}


# -- checking --------------------------------------------------------------------------------------------------

def _kind_problem(s: pd.Series, kind: str) -> str:
    """Why ``s`` is not of ``kind`` ('' when it is). Missing values are allowed except in ``int`` columns."""
    v = s.dropna()
    if kind == "int" and len(v) < len(s):
        return f"has {len(s) - len(v)} missing values"
    if kind == "str" or not len(v):
        return ""
    if kind == "bool":  # CSV gives True/False, or their text where a column also holds other values
        bad = [x for x in v if not isinstance(x, (bool, np.bool_)) and x not in ("True", "False")]
        return f"holds non-booleans (e.g. {_plain(bad[0])!r})" if bad else ""
    if pd.api.types.is_bool_dtype(v):
        return f"holds booleans (e.g. {v.iloc[0]!r})"
    num = pd.to_numeric(v, errors="coerce")
    if num.isna().any():
        return f"holds non-numbers (e.g. {_plain(v[num.isna()].iloc[0])!r})"
    frac = num[np.mod(num.to_numpy(float), 1) != 0]
    return f"holds non-integers (e.g. {_plain(frac.iloc[0])!r})" if kind == "int" and len(frac) else ""


def _plain(x):
    """A numpy scalar as the Python value it holds (for messages: 2.5, not np.float64(2.5))."""
    return x.item() if isinstance(x, np.generic) else x


def check_frame(df: pd.DataFrame, schema: TableSchema, where, version: int, writing: bool = False) -> None:
    """Raise :class:`SchemaError` unless ``df`` has every required column of ``schema`` (and of each method
    present) with the right kind, and its optional columns have theirs. ``where``: the file, for messages;
    ``version``: the version that wrote it; ``writing``: rows about to be written (a bug, not a user's file)."""
    if not len(df.columns):  # an empty table (a check with nothing to check): no rows, no columns
        return
    by = (f"(schema version {version} of {schema.name})" if version == schema.version else
          f"(written by schema version {version} of {schema.name}; this code reads version {schema.version})")
    for c in schema.required:
        if c not in df:
            raise SchemaError(f"{where}: no column {c!r}, which every row must have {by}" + (
                "" if writing else "; rerun the notebook that writes it (or restore the file) instead of editing it"))
    for method, extra in schema.by_method.items():
        rows = df[df["method"] == method] if "method" in df else df.iloc[0:0]
        for c, kind in extra.items() if len(rows) else ():
            if c not in df:
                raise SchemaError(f"{where}: no column {c!r}, which {method} rows must have {by}")
            p = _kind_problem(rows[c], kind)
            if p:
                raise SchemaError(f"{where}: column {c!r} of the {method} rows should be {kind} but {p} {by}")
    for c in df.columns:
        kind = schema.required.get(c) or schema.optional.get(c)
        p = _kind_problem(df[c], kind) if kind else ""
        if p:
            raise SchemaError(f"{where}: column {c!r} should be {kind} but {p} {by}")


def _migrate(df: pd.DataFrame, schema: TableSchema, version: int, where, folder: Path) -> pd.DataFrame:
    if version == schema.version:
        return df
    if not isinstance(version, (int, np.integer)) or version > schema.version or version < 1:
        raise SchemaError(f"{where}: written by schema version {version!r} of {schema.name}, which this code does not "
                          f"know (it reads up to version {schema.version}): update llmft_utils, or rerun")
    for m in schema.migrations:
        if m.version == version:
            df = m.apply(df, folder)
            if not m.quiet:
                _report(where, f"schema version {version} -> {version + 1}: {m.what}")
            version += 1
    if version != schema.version:
        raise SchemaError(f"{where}: written by schema version {version} of {schema.name}; no migration to version "
                          f"{schema.version} exists: rerun the notebooks into a fresh results folder")
    return df


_REPORTED: set = set()


def _report(where, what: str) -> None:
    if (str(where), what) not in _REPORTED:
        _REPORTED.add((str(where), what))
        log.warning(f"{where}: read with {what} (in memory; the file is rewritten at the next append, or now with "
                    "`python tools/migrate_results.py FOLDER`)")


def _csv_versions(df: pd.DataFrame, where) -> list:
    if VERSION_COLUMN not in df:
        return [1]
    v = df[VERSION_COLUMN]
    num = pd.to_numeric(v, errors="coerce")
    if num.isna().any() or (num % 1 != 0).any():
        raise SchemaError(f"{where}: column {VERSION_COLUMN!r} holds {v[num.isna() | (num % 1 != 0)].iloc[0]!r}, not a "
                          "schema version")
    return sorted({int(x) for x in num})


def conform(df: pd.DataFrame, schema: TableSchema, where, folder) -> pd.DataFrame:
    """``df`` as read from ``where``: migrated to the current version (per version present) and checked,
    without the version column (writers stamp it again)."""
    if not len(df.columns):
        return df
    parts = []
    for version in _csv_versions(df, where):
        part = df[df[VERSION_COLUMN] == version] if VERSION_COLUMN in df else df
        part = _migrate(part.drop(columns=[VERSION_COLUMN], errors="ignore"), schema, version, where, Path(folder))
        check_frame(part, schema, where, version)
        parts.append(part)
    return pd.concat(parts).sort_index() if len(parts) > 1 else parts[0]


def schema_for(path) -> TableSchema:
    name = Path(path).name
    if name not in SCHEMAS:
        raise KeyError(f"{name}: not a declared results table (llmft_utils/study/schema.py: {', '.join(SCHEMAS)})")
    return SCHEMAS[name]


def read_table(path, missing_ok: bool = True) -> pd.DataFrame:
    """A results CSV, checked against its schema and migrated (an absent file: an empty frame if ``missing_ok``)."""
    path = Path(path)
    schema = schema_for(path)
    if not path.is_file():
        if missing_ok:
            return pd.DataFrame()
        raise SchemaError(f"{path} not found: the notebook that writes {path.name} has not run into this folder")
    return conform(ResultTable(path).read(), schema, path, path.parent)


def stamped(df: pd.DataFrame, schema: TableSchema, where) -> pd.DataFrame:
    """``df`` checked as written by this code, with the version column."""
    df = df.drop(columns=[VERSION_COLUMN], errors="ignore")
    check_frame(df, schema, where, schema.version, writing=True)
    return pd.concat([df, pd.Series(schema.version, index=df.index, name=VERSION_COLUMN)], axis=1)


def write_table(df: pd.DataFrame, path) -> None:
    """Write a whole results CSV (the checks tables of notebook 04), checked and stamped, atomically."""
    atomic_write_csv(stamped(df, schema_for(path), path), path)


class StudyTable(ResultTable):
    """:class:`store.ResultTable` for a declared table: reads are checked and migrated, appends are checked and
    stamped (an older file is rewritten whole at the current version)."""

    def __init__(self, path):
        super().__init__(path)
        self.schema = schema_for(path)

    def read(self) -> pd.DataFrame:
        raw = super().read()
        return conform(raw, self.schema, self.path, self.path.parent)

    def append(self, rows: list[dict], replace: str = "run_key") -> None:
        new = pd.DataFrame(rows)
        check_frame(new, self.schema, f"{self.path} (new rows)", self.schema.version, writing=True)
        with file_lock(self.path):
            old = self.read()
            if replace in old and len(old):
                old = old[~old[replace].isin(set(new[replace]))]
            table = pd.concat([old, new], ignore_index=True) if len(old) else new
            atomic_write_csv(stamped(table, self.schema, self.path), self.path)


# -- predictions and the run manifest --------------------------------------------------------------------------

def write_predictions(df: pd.DataFrame, path) -> None:
    """A per-example predictions file, checked, with its schema version in the parquet metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_frame(df, PREDICTIONS, path, PREDICTIONS.version, writing=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           PARQUET_KEY: str(PREDICTIONS.version).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_predictions(path) -> pd.DataFrame:
    """A per-example predictions file, checked against its schema (version from its metadata; none: 1)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: the predictions file a row names is missing: the results folder is incomplete "
                          "(copy it whole, or rerun the notebook that wrote the row)")
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PARQUET_KEY, b"1").decode()
    version = int(raw) if raw.isdigit() else raw
    df = _migrate(pd.read_parquet(path), PREDICTIONS, version, path, path.parent)
    check_frame(df, PREDICTIONS, path, version)
    return df


def read_run_manifest(path) -> dict:
    """``run_manifest.json`` checked: a known version (none: 1) and the keys every reader uses."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: not readable as JSON ({e})") from None
    version = m.get(VERSION_COLUMN, 1)
    if not isinstance(version, int) or not 1 <= version <= RUN_MANIFEST_VERSION:
        raise SchemaError(f"{path}: written by schema version {version!r} of run_manifest.json, which this code "
                          f"does not know (it reads up to version {RUN_MANIFEST_VERSION}): update llmft_utils")
    missing = [k for k in RUN_MANIFEST_KEYS if k not in m]
    if missing:
        raise SchemaError(f"{path}: no key {missing[0]!r}, which every run manifest has (written by schema version "
                          f"{version})")
    return m
