"""The study's contrasts, declared before any result is read: paired differences on the same examples, with
intervals over seeds and examples, equivalence tests where the claim is "matches", and multiplicity control.

A contrast compares method ``a`` with its partner ``b`` (:func:`tables.partner_rows`: the ICL teacher of the
same k and seed, the control student of the same seed, the zero-shot run, ...) on one evaluation set, per
example and per data seed: ``measure`` is ``correct`` (the prediction, or a calibrated one, equals the gold
label) or ``agrees`` (it equals the teacher's: transfer). The difference matrix (seeds × examples) goes to
:func:`llmft_utils.stats.paired_contrast`: the effect size, a 95% interval from a two-way cluster bootstrap
(seeds and examples resampled), the example-level and the seed-level intervals in their own columns, a
bootstrap p-value and, where a margin is declared, a TOST equivalence test.

:data:`PRIMARY` holds the four contrasts the study's questions rest on; their margins are fixed here, in code,
before the contrasts were first computed on any results folder. :data:`SECONDARY` holds the rest. Each family
gets Holm-adjusted p-values (``p_holm``) within it, and the table shows raw and adjusted p.

A verdict (``verdict``) needs all of: the two-way interval excludes 0, the seed-level t-interval excludes 0
(with 3 seeds the bootstrap's seed component cannot see more spread than 3 seeds show, so the t-interval is
the conservative check) and Holm p < 0.05: ``a > b`` or ``a < b``. ``equivalent within δ``: TOST p < 0.05
and the seed-level interval inside (−δ, δ). Anything else is ``undecided``: the data cannot tell.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..stats import holm, paired_contrast
from .tables import partner_predictions, partner_rows, read_predictions, t_ci

EQUIVALENCE_MARGIN = 0.05  # accuracy (or agreement) points: "matches" means |a − b| < 0.05, fixed before any result
N_BOOT = 4000


@dataclass(frozen=True)
class Contrast:
    """``a − b`` on the evaluation sets ``where`` selects (``in_domain``: the set of the training task;
    ``hans``: HANS; ``all``), per example: ``measure`` ``correct`` (``column`` equals the gold label;
    ``pred_batch``: after batch calibration) or ``agrees`` (equals the ICL teacher's ``pred``)."""
    name: str
    a: str
    b: str
    where: str = "all"
    measure: str = "correct"
    column: str = "pred"
    margin: float | None = None  # the equivalence margin of a "matches" / "not worse" claim
    question: str = ""


PRIMARY = (
    Contrast("CD − ICL teacher, in domain", "cd", "icl", "in_domain", margin=EQUIVALENCE_MARGIN,
             question="in domain: does the student answer as well as the prompt it replaces?"),
    Contrast("CD − ICL teacher, HANS", "cd", "icl", "hans", margin=EQUIVALENCE_MARGIN,
             question="out of domain: does it on HANS?"),
    Contrast("CD − shuffled control, agreement with the teacher", "cd", "cd_shuffled", "all", measure="agrees",
             question="transfer: does the student copy its teacher per example beyond its label bias?"),
    Contrast("ICL − zero-shot, batch-calibrated, in domain", "icl", "zero-shot", "in_domain", column="pred_batch",
             question="do the demonstrations help beyond label bias?"),
)
SECONDARY = (
    Contrast("CD − zero-shot, in domain", "cd", "zero-shot", "in_domain",
             question="does the student beat the model it started from?"),
    Contrast("CD − PBFT, in domain", "cd", "pbft", "in_domain", question="CD against fine-tuning on the labels"),
    Contrast("CD − PBFT, HANS", "cd", "pbft", "hans", question="... out of domain"),
    Contrast("CD − self control, agreement with the teacher", "cd", "cd_self", "all", measure="agrees",
             question="transfer beyond what training on the model's own answers does"),
    Contrast("CD − ICL teacher, batch-calibrated, in domain", "cd", "icl", "in_domain", column="pred_batch",
             margin=EQUIVALENCE_MARGIN, question="does the student match its teacher once label bias is removed?"),
    Contrast("ICL − zero-shot, in domain", "icl", "zero-shot", "in_domain", question="do the demonstrations help, raw?"),
    Contrast("ICL − zero-shot, HANS", "icl", "zero-shot", "hans", question="... out of domain"),
)
FAMILIES = {"primary": PRIMARY, "secondary": SECONDARY}


def _selected(r, where: str) -> bool:
    es = str(r["eval_set"])
    if where == "in_domain":
        return es.split("/")[0] == str(r["train_task"])
    if where == "hans":
        return es.startswith("hans/")
    return True


def _scores(preds: pd.DataFrame, teacher: pd.DataFrame | None, c: Contrast) -> pd.Series:
    """Per example (index ``idx``): 1.0 where ``c.measure`` holds, NaN where the example was skipped."""
    col = preds[c.column] if c.column in preds else pd.Series(np.nan, index=preds.index)
    ref = preds["label"] if c.measure == "correct" else teacher["pred"].reindex(preds.index)
    ok = (col >= 0) & ~preds["skipped"] & ref.notna()
    return (col == ref).astype(float).where(ok)


def difference_matrix(runs: pd.DataFrame, rows: pd.DataFrame, c: Contrast, results_root) -> tuple[np.ndarray, list]:
    """``(diff, seeds)``: ``a − b`` of ``c.measure`` per seed (rows of ``diff``) and example (columns: the examples
    every seed scored, in ``idx`` order) for one group of ``a`` rows; empty when a prediction file is missing."""
    per_seed = {}
    for _, r in rows.sort_values("seed").iterrows():
        pa = read_predictions(results_root, r["predictions_file"])
        pb = partner_predictions(runs, c.b, r, results_root)
        teacher = partner_predictions(runs, "icl", r, results_root) if c.measure == "agrees" else None
        if pa is None or pb is None or (c.measure == "agrees" and teacher is None):
            return np.empty((0, 0)), []
        per_seed[int(r["seed"])] = _scores(pa, teacher, c) - _scores(pb, teacher, c).reindex(pa.index)
    frame = pd.DataFrame(per_seed).T.dropna(axis=1)
    return frame.to_numpy(), list(frame.index)


def contrast_rows(runs: pd.DataFrame, results_root, family: str = "primary", n_boot: int = N_BOOT) -> list[dict]:
    """One row per contrast of ``family`` × group of ``a`` runs (model, pattern, evaluation set, training task, k,
    configuration): what is compared, on how many seeds and examples, and :func:`stats.paired_contrast`."""
    out = []
    for c in FAMILIES[family]:
        a = runs[runs["method"] == c.a]
        a = a[[_selected(r, c.where) for _, r in a.iterrows()]] if len(a) else a
        keys = ["model", "pattern", "eval_set", "train_task", "k", "config"]
        for vals, rows in a.groupby(keys, sort=True, dropna=False):
            diff, seeds = difference_matrix(runs, rows, c, results_root)
            if not diff.size:
                continue
            stats = paired_contrast(diff, c.margin, n_boot=n_boot)
            out.append({"family": family, "contrast": c.name, "a": c.a, "b": c.b, "measure": c.measure,
                        "column": c.column, **dict(zip(keys, vals)), "seeds": ";".join(map(str, seeds)),
                        "margin": c.margin, "question": c.question, **stats})
    return out


def verdict(row) -> str:
    """What a row of :func:`contrast_table` lets one say (module docstring); from one seed, a verdict says so
    (it holds for that seed's demonstrations and training, with nothing known of the spread over seeds)."""
    seeds_lo, seeds_hi = row.get("ci_seeds_lo"), row.get("ci_seeds_hi")
    one_seed = row.get("n_seeds", 1) < 2
    said = ""
    margin, equivalent = row.get("margin"), row.get("equivalent")
    if row["p_holm"] < 0.05 and (row["ci_lo"] > 0) and (one_seed or seeds_lo > 0):
        said = "a > b"
    elif row["p_holm"] < 0.05 and (row["ci_hi"] < 0) and (one_seed or seeds_hi < 0):
        said = "a < b"
    elif isinstance(equivalent, (bool, np.bool_)) and equivalent and \
            (one_seed or (-margin < seeds_lo and seeds_hi < margin)):
        said = f"equivalent within {margin:g}"
    return "undecided" if not said else said + (" (one seed)" if one_seed else "")


def contrast_table(runs: pd.DataFrame, results_root, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Every declared contrast (:data:`FAMILIES`) on every group of runs that has it, with Holm-adjusted p-values
    within each family (``p_holm``) and the :func:`verdict`."""
    parts = []
    for family in FAMILIES:
        t = pd.DataFrame(contrast_rows(runs, results_root, family, n_boot))
        if len(t):
            t["p_holm"] = holm(t["p"])
            parts.append(t)
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts, ignore_index=True)
    for col in ("margin", "p_equivalence", "p_not_worse", "equivalent"):
        if col not in t:
            t[col] = np.nan
    t["verdict"] = [verdict(r) for _, r in t.iterrows()]
    return t


def markdown(table: pd.DataFrame, family: str = "primary") -> str:
    """The rows of one family of :func:`contrast_table` as the Markdown table docs/results.md shows (a test checks
    that the document holds exactly this text for the committed reference)."""
    f3 = lambda v: "–" if v != v or v is None else f"{v:+.3f}"
    ci = lambda lo, hi: "–" if lo != lo else f"[{lo:+.3f}, {hi:+.3f}]"
    pv = lambda v: "–" if v != v or v is None else ("< 0.001" if v < 0.001 else f"{v:.3f}")
    lines = ["| contrast | eval set | seeds × examples | a − b | 95% CI, seeds and examples | examples only | seeds only (t) "
             "| p | p, Holm | TOST p (±0.05) | verdict |", "|" + "---|" * 11]
    for _, r in table[table["family"] == family].iterrows():
        lines.append(f"| {r['contrast']} | {r['eval_set']} | {r['n_seeds']} × {r['n_examples']} | {f3(r['estimate'])} | "
                     f"{ci(r['ci_lo'], r['ci_hi'])} | {ci(r['ci_examples_lo'], r['ci_examples_hi'])} | "
                     f"{ci(r['ci_seeds_lo'], r['ci_seeds_hi'])} | {pv(r['p'])} | {pv(r['p_holm'])} | "
                     f"{pv(r.get('p_equivalence', float('nan')))} | {r['verdict']} |")
    return "\n".join(lines)


# The seed paper's four questions, one row each per (evaluation set, k): accuracy in domain and out of domain (the
# primary contrasts above), and what a query costs the student against its ICL teacher in time and in memory
# (per seed, the student's and the teacher's runs on the same queries).
COST_MEASURES = (
    ("time", "s_per_query", "ratio", "seconds per query, CD student ÷ ICL teacher"),
    ("memory", "mem_tensors_peak_mb", "difference", "tensor memory of the largest scoring batch (MB), CD student − ICL teacher"),
)


def _cost_rows(runs: pd.DataFrame) -> list[dict]:
    """Time and memory of each CD group on its in-domain set: per seed the student's value against its ICL
    teacher's (same model, pattern, set, k and seed), then the mean and a 95% t-interval over seeds."""
    out = []
    cd = runs[runs["method"] == "cd"]
    cd = cd[[_selected(r, "in_domain") for _, r in cd.iterrows()]] if len(cd) else cd
    keys = ["model", "pattern", "eval_set", "train_task", "k", "config"]
    for question, col, kind, measure in COST_MEASURES:
        if col not in runs:  # tables written before the column was recorded
            continue
        for vals, rows in cd.groupby(keys, sort=True, dropna=False):
            per_seed = {}
            for _, r in rows.iterrows():
                teacher = partner_rows(runs, "icl", r)
                a, b = r[col], teacher[col].iloc[-1] if len(teacher) else np.nan
                if pd.notna(a) and pd.notna(b):
                    per_seed[int(r["seed"])] = a / b if kind == "ratio" else a - b
            if not per_seed:
                continue
            est, lo, hi = t_ci(list(per_seed.values()))  # one seed: NaN bounds, so undecided below
            null = 1.0 if kind == "ratio" else 0.0
            said = "a < b" if hi < null else ("a > b" if lo > null else "undecided")
            out.append({"question": question, "measure": measure, "kind": kind, **dict(zip(keys, vals)),
                        "n_seeds": len(per_seed), "n_examples": int(rows["n_eval"].iloc[0]), "estimate": est,
                        "ci_lo": lo, "ci_hi": hi, "interval": "95% t-interval over seeds", "verdict": said})
    return out


def four_questions(contrasts: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One table for the four questions: in domain and out of domain, the primary contrasts "CD − ICL teacher"
    (accuracy difference; interval of the two-way bootstrap over seeds and examples; verdict as
    :func:`verdict`); time and memory, :func:`_cost_rows` (ratio or difference per seed; t-interval over seeds;
    ``a < b`` where the interval lies below 1 or 0)."""
    acc = [("in domain", "CD − ICL teacher, in domain"), ("out of domain", "CD − ICL teacher, HANS")]
    rows = []
    for question, name in acc:
        sel = contrasts[contrasts["contrast"] == name] if len(contrasts) else contrasts
        for _, r in sel.iterrows():
            rows.append({"question": question, "measure": "accuracy, CD student − ICL teacher", "kind": "difference",
                         **{c: r[c] for c in ("model", "pattern", "eval_set", "train_task", "k", "config", "n_seeds",
                                              "n_examples", "estimate", "ci_lo", "ci_hi")},
                         "interval": "95% two-way bootstrap, seeds and examples", "verdict": r["verdict"]})
    return pd.DataFrame(rows + _cost_rows(runs))


def four_questions_markdown(table: pd.DataFrame) -> str:
    """:func:`four_questions` as the Markdown table the README shows (a test checks the README holds this text)."""
    f3 = lambda v: f"{v:+.3f}" if abs(v) < 10 else f"{v:+.0f}"
    lines = ["| question | measure | eval set (k) | seeds × examples | estimate | 95% interval | over | verdict |",
             "|" + "---|" * 8]
    for _, r in table.iterrows():
        ratio = r["kind"] == "ratio"
        est = f"{r['estimate']:.2f}×" if ratio else f3(r["estimate"])
        ci = f"[{r['ci_lo']:.2f}, {r['ci_hi']:.2f}]" if ratio else f"[{f3(r['ci_lo'])}, {f3(r['ci_hi'])}]"
        lines.append(f"| {r['question']} | {r['measure']} | {r['eval_set']} ({int(r['k'])}) | {int(r['n_seeds'])} × "
                     f"{int(r['n_examples'])} | {est} | {ci} | {r['interval'].removeprefix('95% ')} | {r['verdict']} |")
    return "\n".join(lines)
