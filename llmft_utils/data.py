"""NLI tasks as data: where each split lives, how its labels map to the binary Yes/No scheme.

Every loader returns a ``pandas.DataFrame`` with at least the columns
``idx`` (int, stable id inside the split), ``premise``, ``hypothesis`` (non-empty str),
``label`` (int: 0 = entailment → " Yes", 1 = not entailment → " No", llmft's convention)
and ``orig_label`` (the dataset's own label string). HANS adds ``heuristic`` and ``subcase``.

Source order: an explicit ``data_dir`` argument, else the ``LLMFT_DATA_DIR`` environment variable,
else the Hugging Face Hub through ``datasets``. When none works, one error names both ways.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .store import atomic_write, atomic_write_json, ids_digest, repo_root

DATA_DIR_ENV = "LLMFT_DATA_DIR"
LABEL_NAMES = ("entailment", "not_entailment")  # binary label ids 0, 1


class DataError(ValueError):
    """Missing or malformed data; the message says what to do."""


@dataclass(frozen=True)
class SplitSpec:
    local_file: str  # path relative to the data directory (.jsonl or .jsonl.gz)
    hub: tuple | None  # (path, config or None, split) for datasets.load_dataset; None: local mirror only
    description: str = ""
    held_out_of: str = ""  # a split of the same task whose rows this one is drawn from (and removed from)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    splits: dict  # split name -> SplitSpec
    label_map: dict  # original label (str) -> binary id, or None to drop the row
    hub_label_names: tuple  # HF integer label id -> original label string
    demo_task: str  # task whose training split supplies demonstrations
    demo_split: str = "train"
    extra_columns: tuple = ()
    stratify_by: tuple = ("label",)
    notes: str = ""
    field_names: dict = field(default_factory=lambda: {"premise": "premise", "hypothesis": "hypothesis"})
    ood_for: tuple = ()  # training tasks whose students are also scored on this task's sets (out of domain)


# three-way NLI sets scored out of domain for MNLI students, binarised like MNLI, with MNLI demonstrations
_MNLI_LIKE_OOD = dict(label_map={"entailment": 0, "neutral": None, "contradiction": 1},
                      hub_label_names=("entailment", "neutral", "contradiction"), demo_task="mnli",
                      notes="binary like MNLI: neutral dropped, contradiction -> No", ood_for=("mnli",))

TASKS: dict[str, TaskSpec] = {
    "rte": TaskSpec(
        name="rte",
        splits={
            "train": SplitSpec("rte/train.jsonl", ("nyu-mll/glue", "rte", "train"), "GLUE RTE train (2,490)"),
            "validation": SplitSpec("rte/validation.jsonl", ("nyu-mll/glue", "rte", "validation"), "GLUE RTE dev (277)"),
        },
        label_map={"entailment": 0, "not_entailment": 1},
        hub_label_names=("entailment", "not_entailment"),
        demo_task="rte",
        field_names={"premise": "sentence1", "hypothesis": "sentence2"},
    ),
    "mnli": TaskSpec(
        name="mnli",
        splits={
            "train": SplitSpec("mnli/train_subset.jsonl", ("nyu-mll/glue", "mnli", "train"),
                               "MNLI train; the local mirror holds a 9,999-example subset"),
            "validation_matched": SplitSpec("mnli/validation_matched.jsonl",
                                            ("nyu-mll/glue", "mnli", "validation_matched"), "MNLI dev matched"),
            "validation_mismatched": SplitSpec("mnli/validation_mismatched.jsonl",
                                               ("nyu-mll/glue", "mnli", "validation_mismatched"), "MNLI dev mismatched"),
        },
        # llmft's binary MNLI: neutral dropped, contradiction -> "No"
        label_map={"entailment": 0, "neutral": None, "contradiction": 1},
        hub_label_names=("entailment", "neutral", "contradiction"),
        demo_task="mnli",
        notes="binary: neutral dropped, contradiction -> No",
    ),
    "hans": TaskSpec(
        name="hans",
        splits={
            "validation": SplitSpec("hans/validation.jsonl.gz", ("jhu-cogsci/hans", None, "validation"),
                                    "HANS evaluation set (30,000; 1,000 per subcase)"),
        },
        label_map={"entailment": 0, "non-entailment": 1},
        hub_label_names=("entailment", "non-entailment"),
        demo_task="mnli",  # out-of-domain: demonstrations come from MNLI train
        extra_columns=("heuristic", "subcase"),
        stratify_by=("subcase",),
        ood_for=("mnli", "rte"),
    ),
    # MNLI-mismatched as its own task, so that MNLI students are scored on it out of domain (other genres)
    "mnli_mismatched": TaskSpec(
        name="mnli_mismatched",
        splits={"validation": SplitSpec("mnli/validation_mismatched.jsonl",
                                        ("nyu-mll/glue", "mnli", "validation_mismatched"),
                                        "MNLI dev mismatched (genres absent from MNLI train)")},
        **_MNLI_LIKE_OOD,
    ),
    # ANLI (adversarial NLI, three rounds): out of domain for MNLI students, binary like MNLI; no train split here
    "anli": TaskSpec(
        name="anli",
        splits={f"dev_r{r}": SplitSpec(f"anli/dev_r{r}.jsonl", ("facebook/anli", None, f"dev_r{r}"),
                                       f"ANLI round {r} dev") for r in (1, 2, 3)},
        **_MNLI_LIKE_OOD,
    ),
    # paraphrase identification with the NLI patterns (question 1 as premise, question 2 as hypothesis), as llmft
    # does: duplicate / paraphrase -> 0 (" Yes"), not -> 1 (" No")
    "qqp": TaskSpec(
        name="qqp",
        splits={
            "train": SplitSpec("qqp/train_subset.jsonl", ("nyu-mll/glue", "qqp", "train"),
                               "QQP train; the local mirror holds a 9,999-example subset"),
            "validation": SplitSpec("qqp/validation.jsonl", ("nyu-mll/glue", "qqp", "validation"),
                                    "GLUE QQP dev (40,430; not in the local mirror)"),
            "heldout": SplitSpec("qqp/train_subset.jsonl", None,
                                 "rows of the QQP train subset held out of the demonstration pool (the local mirror "
                                 "has no QQP dev set)", held_out_of="train"),
        },
        label_map={"duplicate": 0, "not_duplicate": 1},
        hub_label_names=("not_duplicate", "duplicate"),
        demo_task="qqp",
        field_names={"premise": "question1", "hypothesis": "question2"},
        notes="duplicate -> Yes, not_duplicate -> No",
    ),
    "paws_qqp": TaskSpec(
        name="paws_qqp",
        splits={"dev_and_test": SplitSpec("paws_qqp/dev_and_test.jsonl", None,
                                          "PAWS-QQP dev_and_test (677; built from QQP by the PAWS scripts, llmft's copy)")},
        label_map={"paraphrase": 0, "not_paraphrase": 1},
        hub_label_names=("not_paraphrase", "paraphrase"),
        demo_task="qqp",  # out-of-domain: demonstrations come from QQP train
        field_names={"premise": "sentence1", "hypothesis": "sentence2"},
        notes="paraphrase -> Yes, not_paraphrase -> No; adversarial word-swap pairs for QQP models",
        ood_for=("qqp",),
    ),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def get_split_spec(task: str, split: str) -> SplitSpec:
    spec = get_task(task)
    if split not in spec.splits:
        raise DataError(f"task {task!r} has no split {split!r}; known splits: {', '.join(spec.splits)}")
    return spec.splits[split]


def mirror_beside_checkout() -> Path | None:
    """``../shared/data`` next to the checkout (the layout of this project's machines), if it holds the data."""

    p = (repo_root().parent / "shared" / "data").resolve()
    return p if (p / "rte").is_dir() else None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The explicit argument wins, then $LLMFT_DATA_DIR, then ``../shared/data`` beside the checkout (so the
    pipeline finds the same data with or without the Makefile); None means 'use the Hub'."""
    d = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV, "")
    if not d:
        return mirror_beside_checkout()
    p = Path(d).expanduser().resolve()
    if not p.is_dir():
        raise DataError(f"data directory {p} does not exist; point {DATA_DIR_ENV} (or data_dir=) at a folder "
                        "laid out like shared/data (rte/, mnli/, hans/), or unset it to use the Hugging Face Hub")
    return p


def _read_jsonl(path: Path, lines: list | None = None) -> list[dict]:
    """Records of a JSONL file (blank lines skipped); ``lines``, when given, receives each record's line number."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
                if lines is not None:
                    lines.append(lineno)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); the file is malformed, "
                                "re-fetch it or fix the line") from None
    return rows


def _load_hub(task: TaskSpec, split: SplitSpec) -> list[dict]:
    import datasets  # heavy; only needed for the online path

    path, config, hub_split = split.hub
    ds = datasets.load_dataset(path, config, split=hub_split)
    fp, fh = task.field_names["premise"], task.field_names["hypothesis"]
    rows = []
    for i, r in enumerate(ds):
        lab = r["label"]
        if isinstance(lab, (int, np.integer)):
            lab = task.hub_label_names[lab] if 0 <= lab < len(task.hub_label_names) else str(lab)
        row = {"idx": r.get("idx", i), "premise": r.get(fp, r.get("premise")),
               "hypothesis": r.get(fh, r.get("hypothesis")), "label": lab}
        for c in task.extra_columns:
            row[c] = r.get(c)
        rows.append(row)
    return rows


# C0 control characters and DEL (NUL, BEL, ESC, ...) never belong in a premise or hypothesis; tab, newline and
# carriage return are whitespace. C1 characters (U+0080-U+009F) are allowed: GLUE's own RTE files hold them as
# mojibake of a UTF-8 apostrophe ("\u00e2\u0080\u0099"), 2 in train and 2 in validation.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def text_problem(value) -> str | None:
    """Why ``value`` cannot be a premise or hypothesis (None if it can): not a string (a JSON null, a number),
    empty or whitespace only, or holding a C0 control character (named by its code point)."""
    if not isinstance(value, str):
        return f"must be a string, got {'null' if value is None else type(value).__name__} {value!r}"
    bad = _CONTROL.search(value)
    if bad:
        return f"holds the control character U+{ord(bad.group()):04X} at position {bad.start()} ({value[:40]!r})"
    if not value.strip():
        return f"must be a non-empty string, got {value!r}"
    return None


def validate_rows(rows: list[dict], task: TaskSpec, source: str, lines: list | None = None) -> pd.DataFrame:
    """Check every row and map labels to the binary scheme; raise DataError naming the first bad row
    (``file:line`` when ``lines`` gives the records' line numbers, else the record's 0-based position).

    Duplicate (premise, hypothesis) pairs (:func:`pair_key`: the same texts up to surrounding whitespace) are
    **dropped and counted**: the first occurrence stays, each later one is dropped, and
    ``df.attrs["duplicates"]`` lists every dropped row as ``{"at": file:line, "first": file:line, "idx": id}``
    (:func:`prepare_study_data` writes them into the manifest). Twins with different labels are refused:
    which label is gold cannot be told. Duplicate ids are refused, naming both lines."""
    required = ("premise", "hypothesis", "label") + tuple(task.extra_columns)
    out, first_at, dropped, id_at = [], {}, [], {}
    for n, r in enumerate(rows):
        at = f"{source}:{lines[n]}" if lines else f"{source}, record {n}"
        where = at + f" (idx={r.get('idx', '?')})"
        missing = [c for c in required if c not in r]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; expected {list(required)}")
        for c in ("premise", "hypothesis"):
            problem = text_problem(r[c])
            if problem:
                raise DataError(f"{where}: field {c!r} {problem}")
        lab = r["label"]
        if lab not in task.label_map:
            raise DataError(f"{where}: label {lab!r} is not one of {sorted(task.label_map)} for task {task.name!r}")
        if task.label_map[lab] is None:
            continue  # e.g. MNLI neutral in the binary task
        row = {"idx": int(r.get("idx", n)), "premise": r["premise"], "hypothesis": r["hypothesis"],
               "label": task.label_map[lab], "orig_label": lab}
        if row["idx"] in id_at:
            raise DataError(f"{where}: duplicate idx {row['idx']} (first at {id_at[row['idx']]}); ids must be unique "
                            "within a split")
        id_at[row["idx"]] = at
        key = pair_key(row["premise"], row["hypothesis"])
        if key in first_at:
            first, first_label = first_at[key]
            if first_label != row["label"]:
                raise DataError(f"{where}: the same premise and hypothesis as {first} with another label "
                                f"({lab!r} here, binary {row['label']} vs {first_label}); fix or remove one of them")
            dropped.append({"at": at, "first": first, "idx": row["idx"]})
            continue
        first_at[key] = (at, row["label"])
        for c in task.extra_columns:
            row[c] = r[c]
        out.append(row)
    if not out:
        raise DataError(f"{source}: no usable rows")
    df = pd.DataFrame(out)
    df.attrs["duplicates"] = dropped
    return df


def load_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Load, validate and binarise one split. See the module docstring for the columns."""
    spec = get_task(task)
    sspec = get_split_spec(task, split)
    local = resolve_data_dir(data_dir)
    if local is not None:
        path = local / sspec.local_file
        if not path.is_file():
            raise DataError(f"{path} not found: the data directory {local} has no {task}/{split}. "
                            f"Fix {DATA_DIR_ENV} / data_dir, or unset it to download from the Hugging Face Hub.")
        lines: list = []
        records = _read_jsonl(path, lines)
        for r in records:  # a mirror file with the dataset's own field names (question1, sentence1, ...)
            for ours, theirs in spec.field_names.items():
                if ours not in r and theirs in r:
                    r[ours] = r.pop(theirs)
        df = validate_rows(records, spec, str(path), lines)
        df.attrs["source"] = str(path)
    else:
        from .hub import offline_if_unreachable

        if sspec.hub is None:
            raise DataError(f"{task}/{split} has no Hugging Face Hub copy ({sspec.description}); set {DATA_DIR_ENV}="
                            "/path/to/shared/data (or pass data_dir=) to read it from the local mirror")
        try:
            with offline_if_unreachable():  # offline: the datasets cache or this error in seconds, not retries
                rows = _load_hub(spec, sspec)
        except Exception as e:  # offline, missing package, renamed dataset ...
            raise DataError(
                f"could not load {task}/{split}: no data directory is set and the Hugging Face Hub failed "
                f"({type(e).__name__}: {str(e)[:200]}). Either set {DATA_DIR_ENV}=/path/to/shared/data "
                "(or pass data_dir=), or go online so `datasets` can download "
                f"{sspec.hub[0]}{'/' + sspec.hub[1] if sspec.hub[1] else ''}.") from e
        df = validate_rows(rows, spec, f"hub:{sspec.hub[0]}/{sspec.hub[1]}/{sspec.hub[2]}")
        df.attrs["source"] = f"hub:{sspec.hub[0]}/{sspec.hub[1]}/{sspec.hub[2]}"
    return df


def stratified_subsample(df: pd.DataFrame, n: int | None = None, by: str = "label", per_group: int | None = None,
                         seed: int = 0) -> pd.DataFrame:
    """A fixed stratified subsample, in original order.

    ``per_group`` takes that many rows from every group (e.g. 50 per HANS subcase); otherwise ``n`` rows
    are allocated proportionally (largest remainder). ``n=None`` / ``n >= len(df)`` returns ``df`` unchanged.
    """
    if per_group is None and (n is None or n <= 0 or n >= len(df)):
        return df
    rng = np.random.default_rng(seed)
    groups = {g: sub.index.to_numpy() for g, sub in df.groupby(by, sort=True)}
    if per_group is not None:
        alloc = {g: min(per_group, len(ix)) for g, ix in groups.items()}
    else:
        sizes = {g: len(ix) for g, ix in groups.items()}
        exact = {g: n * s / len(df) for g, s in sizes.items()}
        alloc = {g: int(np.floor(v)) for g, v in exact.items()}
        for g in sorted(exact, key=lambda g: exact[g] - alloc[g], reverse=True)[: n - sum(alloc.values())]:
            alloc[g] += 1
    keep = np.concatenate([rng.choice(ix, size=alloc[g], replace=False) for g, ix in groups.items()])
    return df.loc[np.sort(keep)]


def pair_key(premise: str, hypothesis: str) -> str:
    return premise.strip() + "\x1f" + hypothesis.strip()


def disjoint_rows(pool: pd.DataFrame, frames) -> pd.DataFrame:
    """The rows of ``pool`` (in order) whose (premise, hypothesis) pair occurs in none of ``frames``."""
    banned = {pair_key(p, h) for f in frames for p, h in zip(f["premise"], f["hypothesis"])}
    return pool[[pair_key(p, h) not in banned for p, h in zip(pool["premise"], pool["hypothesis"])]]


def sample_demonstrations(pool: pd.DataFrame, k: int, seed: int, exclude: pd.DataFrame | None = None) -> pd.DataFrame:
    """k balanced demonstrations, shuffled, deterministic in ``seed``: k/2 per label for even k; for odd k
    (k = 1, 3, ...) ⌊k/2⌋ per label plus one more of a label drawn uniformly with the same seed (the rule
    for odd k; k = 1 is one demonstration of a seeded label). Even k draws exactly as before odd k existed.

    Rows of ``pool`` whose (premise, hypothesis) pair occurs in ``exclude`` (the evaluation queries)
    are never chosen, so no query can see itself as a demonstration.
    """
    if k == 0:
        return pool.iloc[0:0]
    if k < 0:
        raise ValueError(f"k must be a non-negative number of demonstrations, got {k}")
    if exclude is not None and len(exclude):
        pool = disjoint_rows(pool, [exclude])
    rng = np.random.default_rng(seed)
    want = {0: k // 2, 1: k // 2}
    if k % 2:
        want[int(rng.integers(2))] += 1
    picks = []
    for lab in (0, 1):
        ix = pool.index[pool["label"] == lab].to_numpy()
        if len(ix) < want[lab]:
            raise DataError(f"the demonstration pool has only {len(ix)} examples of label {lab}, need {want[lab]}")
        picks.append(rng.choice(ix, size=want[lab], replace=False))
    order = rng.permutation(np.concatenate(picks))
    out = pool.loc[order]
    keys = [pair_key(p, h) for p, h in zip(out["premise"], out["hypothesis"])]
    if len(set(keys)) < len(keys):  # a pool that did not come through validate_rows (which drops duplicates)
        raise DataError(f"the demonstration pool holds the same (premise, hypothesis) pair more than once, and it was "
                        f"drawn twice into one set of k={k}; load the pool with data.load_split, which drops repeated pairs")
    return out


def demonstration_sets(pool: pd.DataFrame, k: int, m: int, seed: int, exclude=()) -> list[pd.DataFrame]:
    """``m`` pairwise-disjoint balanced sets of ``k`` demonstrations (a teacher ensemble's prompts; m·k in all).

    Set 0 is exactly :func:`sample_demonstrations` ``(pool, k, seed, exclude=exclude[0])``: the demonstrations of
    the single-prompt ICL run and CD teacher of the same k and seed, so the ensemble contains that teacher.
    Set j ≥ 1 is drawn the same way with the seed ``[seed, j]`` from the rows of ``pool`` not in any earlier set
    nor in any frame of ``exclude`` (evaluation queries, a transfer set)."""
    if m < 1:
        raise ValueError(f"an ensemble needs m >= 1 demonstration sets, got {m}")
    exclude = [f for f in exclude if f is not None and len(f)]
    first = sample_demonstrations(pool, k, seed, exclude=exclude[0] if exclude else None)
    sets = [first]
    for j in range(1, m):
        rest = disjoint_rows(pool, exclude + sets)
        try:
            sets.append(sample_demonstrations(rest, k, [seed, j]))
        except DataError as e:
            raise DataError(f"demonstration set {j + 1} of {m} (k={k}): {e}; use fewer sets or a smaller k") from None
    return sets


def label_stats(df: pd.DataFrame) -> dict:
    """Counts per binary label and the majority-class baseline accuracy."""
    counts = df["label"].value_counts().reindex([0, 1], fill_value=0)
    maj = int(counts.idxmax())
    return {"n": int(len(df)), "n_label0": int(counts[0]), "n_label1": int(counts[1]),
            "majority_label": maj, "majority_acc": float(counts[maj] / max(len(df), 1))}


def write_jsonl(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Atomic JSONL write (:func:`llmft_utils.store.atomic_write`: unique temporary file, fsync, rename)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in df.to_dict(orient="records"):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write(path, write)


def read_prepared(path: str | os.PathLike, sha256: str | None = None) -> pd.DataFrame:
    """Read a split written by :func:`write_jsonl` (notebook 01's output); with ``sha256`` (from the
    manifest) the file must be the one the manifest describes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run notebooks/01_data_prep first (or the pipeline), "
                        "which writes the prepared splits")
    if sha256 is not None and file_sha256(path) != sha256:
        raise DataError(f"{path} does not match manifest.json (checksum differs): the prepared data changed "
                        "after the manifest was written; rerun notebooks/01_data_prep")
    return pd.DataFrame(_read_jsonl(path))


def read_split(out_dir: str | os.PathLike, info: dict) -> pd.DataFrame:
    """The prepared split a manifest entry describes (checksum-verified when the manifest has one)."""
    return read_prepared(Path(out_dir) / info["file"], info.get("sha256"))


_FILE_SHA: dict = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered for this process while its inode, size and mtime stay the same)."""
    import hashlib

    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


STUDY_EVAL_SETS = ("mnli/validation_matched", "rte/validation", "hans/validation")
# llmft's out-of-domain grid beyond HANS: MNLI -> MNLI-mismatched, QQP -> PAWS-QQP (QQP in domain: held-out train rows)
EXTRA_EVAL_SETS = ("mnli_mismatched/validation", "qqp/heldout", "paws_qqp/dev_and_test")
ANLI_EVAL_SETS = ("anli/dev_r1", "anli/dev_r2", "anli/dev_r3")  # also out of domain for MNLI (binary; in "full")
ALL_EVAL_SETS = STUDY_EVAL_SETS + EXTRA_EVAL_SETS + ANLI_EVAL_SETS + ("qqp/validation",)


def student_eval_sets(manifest: dict, task: str, out_of_domain: bool = True) -> list[str]:
    """The evaluation sets of a student trained on ``task``: its in-domain set (the first of the manifest's sets of
    that task) and, with ``out_of_domain``, every set whose task lists ``task`` in ``ood_for`` (HANS for MNLI and
    RTE, MNLI-mismatched for MNLI, PAWS-QQP for QQP), in manifest order."""
    ind = [es for es, info in manifest["eval_sets"].items() if info["task"] == task]
    if not ind:
        raise ValueError(f"train task {task!r} has no evaluation set in the manifest ({list(manifest['eval_sets'])})")
    ood = [es for es, info in manifest["eval_sets"].items()
           if info["task"] in TASKS and task in TASKS[info["task"]].ood_for] if out_of_domain else []
    return [ind[0]] + [es for es in ood if es != ind[0]]


def _swap_in_folder(new: Path, dest: Path) -> None:
    """Replace folder ``dest`` by the complete folder ``new`` (same parent): two renames, so ``dest`` is
    always either the old complete folder or the new one (absent only between the two renames)."""
    import shutil

    old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


_REPORTED = 50  # rows listed per split in the manifest (the count is always complete)


def _relative(at: str, root: Path | None) -> str:
    """``file`` or ``file:line`` relative to the data directory (the manifest holds no machine's absolute paths;
    a Hub source as it is)."""
    return at.removeprefix(f"{root}/") if root is not None else at


def _duplicates_info(df: pd.DataFrame, root: Path | None) -> dict:
    """The manifest's record of the duplicate pairs :func:`validate_rows` dropped from ``df``'s file."""
    dups = [{**d, "at": _relative(d["at"], root), "first": _relative(d["first"], root)}
            for d in df.attrs.get("duplicates", [])[:_REPORTED]]
    return {"duplicates_dropped": len(df.attrs.get("duplicates", [])), "duplicates": dups}


def source_lines(source: str, ids) -> list[str]:
    """``file:line`` of each id in ``ids`` within a JSONL ``source`` (one pass over the file; ``source, idx=..``
    for a Hub source or an id not found)."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    found: dict = {}
    path = Path(source)
    if path.is_file():
        lines: list = []
        want = set(ids)
        for n, (r, line) in enumerate(zip(_read_jsonl(path, lines), lines)):
            i = int(r.get("idx", n))  # as validate_rows numbers records without an id
            if i in want:
                found.setdefault(i, f"{source}:{line}")
    return [found.get(i, f"{source}, idx={i}") for i in ids]


def prepare_study_data(out_dir: str | os.PathLike, eval_sets=STUDY_EVAL_SETS, eval_sizes: dict | None = None,
                       data_dir: str | os.PathLike | None = None, seed: int = 0, dev_n: int = 0):
    """Load, validate and subsample the evaluation sets and their demonstration pools; write them to
    ``out_dir/prepared/`` with ``out_dir/manifest.json``. ``eval_sizes`` maps task -> n (0 = all rows).
    Returns ``(manifest, stats)`` where ``stats`` has one row per written split.

    ``dev_n`` > 0 holds out a **development split** from each demonstration pool: ``dev_n`` rows, stratified
    by label (seed ``seed``), written as ``<task>__<split>_dev.jsonl`` (manifest ``dev_sets``) and *removed*
    from the pool that is written, so no demonstration or transfer query can be a development example.
    Recipe choices are made on it (:mod:`llmft_utils.selection`); the evaluation sets are for reporting.

    Duplicates: within a file, later copies of a (premise, hypothesis) pair are dropped (:func:`validate_rows`);
    across files, a pool row with the pair of an evaluation row that uses the pool is dropped from the pool.
    The manifest records both per split (``duplicates_dropped``/``duplicates``, ``eval_twins_removed``/
    ``eval_twins``, each with ``file:line``), so no demonstration set holds a pair twice and no development or
    evaluation row has a twin among the demonstrations and transfer queries.

    All-or-nothing: every split is loaded and validated before anything is written, the files go to a
    temporary folder that replaces ``prepared/`` only when complete, and the manifest (written last)
    records each file's sha256, which :func:`read_split` checks. A data error leaves the previous
    ``prepared/`` and manifest as they were."""
    out_dir = Path(out_dir)
    root = resolve_data_dir(data_dir)
    manifest: dict = {"eval_sets": {}, "demo_pools": {}, "eval_seed": seed}
    stats, pools, frames = [], {}, {}
    held: dict = {}  # pool -> ids of evaluation rows drawn from it (a split held out of the training file)
    subs: dict = {}  # evaluation set -> its (subsampled) rows
    for name in eval_sets:
        sub, info = _eval_split(name, int((eval_sizes or {}).get(name.partition("/")[0], 0) or 0), data_dir, seed, root)
        if "held_out_of" in info:
            held.setdefault(info["held_out_of"], set()).update(sub["idx"])
        frames[info["file"]] = subs[name] = sub
        pools.setdefault(info["demo_pool"], set()).add(name)
        manifest["eval_sets"][name] = info
        stats.append({"split": name, "role": "eval", **{k: info[k] for k in ("n", "full_size", "subsampled", "n_label0",
                                                                            "n_label1", "majority_label", "majority_acc")}})
    for pool in sorted(pools):
        task, _, split = pool.partition("/")
        df = load_split(task, split, data_dir)
        rel = f"prepared/{task}__{split}.jsonl"
        src = df.attrs["source"]
        dups = _duplicates_info(df, root)
        if pool in held:  # evaluation rows drawn from this file never serve as demonstrations or transfer queries
            df = df[~df["idx"].isin(held[pool])]
        df, twins = _without_twins(df, {es: subs[es] for es in sorted(pools[pool]) if es in subs}, src, root)
        if dev_n:
            if dev_n >= len(df) // 2:
                raise DataError(f"dev_n={dev_n} would take half or more of the {len(df)} rows of {pool}; use fewer")
            dev = stratified_subsample(df, n=dev_n, by="label", seed=seed)
            df = df.drop(dev.index)
            drel = f"prepared/{task}__{split}_dev.jsonl"
            frames[drel] = dev
            dstats = label_stats(dev)
            manifest.setdefault("dev_sets", {})[f"{task}/{split}_dev"] = {
                "file": drel, "task": task, "split": f"{split}_dev", "held_out_of": pool, "source": _relative(src, root),
                "ids_digest": ids_digest(dev["idx"]), **dstats}
            stats.append({"split": f"{task}/{split}_dev", "role": "dev (held out of the pool)", "n": len(dev),
                          "full_size": len(dev), "subsampled": True,
                          **{k: dstats[k] for k in ("n_label0", "n_label1", "majority_label", "majority_acc")}})
        frames[rel] = df
        info = {"file": rel, "task": task, "split": split, "source": _relative(src, root), "used_by": sorted(pools[pool]),
                "dev_held_out": int(dev_n), **dups, "eval_twins_removed": len(twins),
                "eval_twins": twins[:_REPORTED], **label_stats(df)}
        if task == "mnli" and len(df) < 100_000:
            info["note"] = "MNLI train subset (the local mirror holds 9,999 train examples), binarised"
        manifest["demo_pools"][pool] = info
        stats.append({"split": pool, "role": "demo pool", "n": info["n"], "full_size": info["n"], "subsampled": False,
                      **{k: info[k] for k in ("n_label0", "n_label1", "majority_label", "majority_acc")}})
    digests = _write_prepared(out_dir, frames)
    for info in [*manifest["eval_sets"].values(), *manifest["demo_pools"].values(),
                 *manifest.get("dev_sets", {}).values()]:
        info["sha256"] = digests[info["file"]]
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest, pd.DataFrame(stats)


def _eval_split(name: str, n: int, data_dir, seed: int, root: Path | None) -> tuple[pd.DataFrame, dict]:
    """``(rows, manifest entry)`` of evaluation set ``name`` (``task/split``) subsampled to ``n`` rows (0: all),
    stratified, with seed ``seed``."""
    task, _, split = name.partition("/")
    spec = get_task(task)
    sspec = get_split_spec(task, split)
    if sspec.held_out_of and (not n or f"{task}/{sspec.held_out_of}" != f"{spec.demo_task}/{spec.demo_split}"):
        raise DataError(f"{name} is drawn from {task}/{sspec.held_out_of}: give it a size ({task}_eval_n > 0), and "
                        "its rows are removed from that demonstration pool")
    full = load_split(task, split, data_dir)
    sub = stratified_subsample(full, n=n or None, by=spec.stratify_by[0], seed=seed)
    info = {"file": f"prepared/{task}__{split}.jsonl", "task": task, "split": split, "full_size": len(full),
            "subsampled": len(sub) < len(full), **_duplicates_info(full, root),
            **({"held_out_of": f"{task}/{sspec.held_out_of}"} if sspec.held_out_of else {}),
            "stratified_by": spec.stratify_by[0] if len(sub) < len(full) else None, "source": _relative(full.attrs["source"], root),
            "ids_digest": ids_digest(sub["idx"]), "demo_pool": f"{spec.demo_task}/{spec.demo_split}", **label_stats(sub)}
    return sub, info


def _without_twins(df: pd.DataFrame, evals: dict, src: str, root: Path | None) -> tuple[pd.DataFrame, list]:
    """``df`` (a demonstration pool) without the rows that have the pair of a row of one of ``evals`` (a twin in
    another file), and the manifest's record of those dropped (``file:line``, idx, the evaluation set)."""
    twin_of = {pair_key(p, h): es for es, sub in evals.items() for p, h in zip(sub["premise"], sub["hypothesis"])}
    twin = np.array([pair_key(p, h) in twin_of for p, h in zip(df["premise"], df["hypothesis"])], dtype=bool)
    twins = [{"at": _relative(at, root), "idx": int(i), "twin_in": twin_of[pair_key(p, h)]} for (i, p, h), at in zip(
        df.loc[twin, ["idx", "premise", "hypothesis"]].itertuples(index=False),
        source_lines(src, df.loc[twin, "idx"]))]
    return df[~twin], twins


def _write_prepared(out_dir: Path, frames: dict) -> dict:
    """Write every frame into a temporary folder that replaces ``out_dir/prepared`` once complete;
    ``{relative file: sha256}``."""
    import secrets
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".prepared.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        for rel, df in frames.items():
            write_jsonl(df, tmp / Path(rel).name)
        digests = {rel: file_sha256(tmp / Path(rel).name) for rel in frames}
        _swap_in_folder(tmp, out_dir / "prepared")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digests


def size_checks(manifest: dict, values: dict) -> list[str]:
    """What the prepared pools cannot supply for these parameters, known from ``manifest.json``'s counts alone
    (no draw, no model): every k needs ⌈k/2⌉ rows of each label; a CD transfer set of ``n_transfer`` queries
    must be disjoint from the largest k's demonstrations; a teacher ensemble of ``ensemble_m`` disjoint sets
    of k needs ⌈k/2⌉·m rows of each label, and m·k + n_transfer rows in all. Necessary conditions: a plan that
    passes can still meet a draw that fails (with its own error), one that fails here cannot run."""
    pool_of = {}  # training task -> (pool name, its counts)
    for info in manifest.get("eval_sets", {}).values():
        pool = info.get("demo_pool")
        if pool in manifest.get("demo_pools", {}):
            pool_of.setdefault(info["task"], (pool, manifest["demo_pools"][pool]))
    ints = lambda v: [int(x) for x in v] if isinstance(v, (list, tuple)) else []  # noqa: E731
    ks, cd_ks, ens_ks = ints(values.get("ks")), ints(values.get("cd_ks")), ints(values.get("ensemble_ks"))
    half = lambda k: -(-k // 2)  # noqa: E731  (rows of each label that k balanced demonstrations take)
    rarer = lambda info: min(int(info.get("n_label0", 0)), int(info.get("n_label1", 0)))  # noqa: E731
    errs = []
    for pool, info in sorted({p: i for p, i in pool_of.values()}.items()):
        for k in sorted(set(ks + cd_ks)):
            if half(k) > rarer(info):
                errs.append(f"ks: k={k} needs {half(k)} demonstrations of each label, but the {pool} pool has "
                            f"{rarer(info)} of its rarer label; use k <= {2 * rarer(info)}")
    tasks = values.get("cd_tasks") if isinstance(values.get("cd_tasks"), (list, tuple)) else []
    n_transfer = values.get("n_transfer") if isinstance(values.get("n_transfer"), int) else 0
    m = values.get("ensemble_m")
    ens_tasks = values.get("ensemble_tasks") if isinstance(values.get("ensemble_tasks"), (list, tuple)) else []
    kmax = max(ks + cd_ks, default=0)
    for task in tasks:
        if task not in pool_of:
            continue
        pool, info = pool_of[task]
        n, per_label = int(info.get("n", 0)), rarer(info)
        if n_transfer + kmax > n:
            errs.append(f"n_transfer: {n_transfer} transfer queries for {task} must be disjoint from its k={kmax} "
                        f"demonstrations, but the {pool} pool has {n} rows; use n_transfer <= {max(n - kmax, 0)}")
        if isinstance(m, int) and not isinstance(m, bool) and m >= 2 and task in ens_tasks:
            for k in ens_ks:
                need = m * half(k)
                if need > per_label or m * k + n_transfer > n:
                    errs.append(f"ensemble_m: {m} disjoint sets of k={k} for {task} need {need} rows of each label "
                                f"and {m * k + n_transfer} in all (with the {n_transfer} transfer queries); the {pool} "
                                f"pool has {per_label} of its rarer label and {n} in all; use ensemble_m <= "
                                f"{max(min(per_label // max(half(k), 1), (n - n_transfer) // max(k, 1)), 0)}")
    return errs


def load_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run notebooks/01_data_prep (or the pipeline) first")
    return json.loads(path.read_text())


def transfer_set(pool, n: int, seed: int, exclude_frames) -> pd.DataFrame:
    """``n`` unlabelled training queries from ``pool`` (labels kept only for bookkeeping), disjoint from
    every frame in ``exclude_frames`` (the demonstrations and the evaluation queries)."""
    cand = disjoint_rows(pool, exclude_frames)
    if len(cand) < n:
        raise DataError(f"only {len(cand)} pool examples are disjoint from the demonstrations and queries; need {n}")
    rng = np.random.default_rng(10_000 + seed)
    return cand.loc[np.sort(rng.choice(cand.index.to_numpy(), size=n, replace=False))]
