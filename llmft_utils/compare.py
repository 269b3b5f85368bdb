"""Compare two results folders of the same study: per row and per example, and every claim's verdict.

    llmft-study compare RUN_A RUN_B                     # the default tolerances (docs/reproducibility.md)
    llmft-study compare RUN_A RUN_B --tolerance exact   # any difference at all fails
    llmft-study compare RUN_A RUN_B --json out.json     # the whole comparison as JSON too

Rows are matched by ``run_key`` (which holds model, evaluation set, pattern, k, seed, the evaluated ids, the
precision and, for students, the recipe: never the hardware). For each matched row: the accuracy in each
run and their difference, the share of examples with the same prediction, and the largest absolute
difference of a verbalizer log-probability over the examples (``max_dlogp``). Rows are of two kinds:
*inference* rows (zero-shot, ICL, a teacher ensemble at inference: a frozen model's forward passes) and
*trained* rows (CD, PBFT, control and ensemble students: a training run, then inference). Each kind has a
log-probability tolerance; a row passes when ``max_dlogp`` is within it. A prediction can flip only where
|log p(label 1) - log p(label 0)| <= 2 * max_dlogp, so a row within tolerance flips near-ties only.

Then every claim table (transfer_checks, distribution_checks, calibrated_checks, ensemble_checks and
break_even) is recomputed from each run's rows with this code, and its verdict columns are compared key by
key. A differing verdict, a row over its tolerance, or a row present in one run only makes the comparison
fail (exit status 1), with two exceptions that are shown but do not fail: verdicts that rest on a
noise-driven student (:data:`NOISE_DRIVEN_METHODS`) and break_even's verdicts, which rest on wall time on
each run's host (``--gate-timing`` gates them, for two runs on one quiet machine).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import store
from .analysis import tables
from .study import schema
from .study.keys import with_recipe

INFERENCE_METHODS = ("zero-shot", "icl", "icl_ensemble")
# Students whose training signal is zero up to rounding: the self-distillation control learns the zero-shot
# model's own distribution, so its loss starts at ~0 and its gradients are rounding noise, which Adam's
# normalised update turns into steps of about lr per weight in a direction the rounding picks. Measured on
# the smoke profile: 6-8 nats of |delta log-prob| between two CPU kernel sets in float32, where every other
# student moves by <= 2e-4. Their rows and the verdicts that rest on them are shown but not gated.
NOISE_DRIVEN_METHODS = ("cd_self",)
LOGP_COLUMNS = ("logp_label0", "logp_label1")


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed |delta log-prob| of a verbalizer, per row kind (docs/reproducibility.md)."""
    name: str
    inference_logp: float
    trained_logp: float
    note: str = ""
    noise_logp: float = math.inf  # rows of NOISE_DRIVEN_METHODS (and verdicts resting on them): not gated by default


# Measured with tools/capability_matrix.py (docs/reproducibility.md): the smoke profile under ATen
# default/avx2/avx512, oneDNN with and without AMX and an AVX2-only emulation (MKL, oneDNN and ATen
# restricted to AVX2) on one Xeon host. The largest spread seen is written beside each bound; the bound
# keeps a margin for CPUs not run here (aarch64, AMD).
TOLERANCES = {
    "exact": Tolerance("exact", 0.0, 0.0, "bit-identical log-probs, every row and verdict gated", noise_logp=0.0),
    "cpu": Tolerance("cpu", 1e-4, 2e-3, "float32 across CPU kernels: inference and float32 training (smoke)"),
    "loose": Tolerance("loose", 1e-4, math.inf, "inference within the cpu bound; trained rows by their verdicts only"),
}
DEFAULT_TOLERANCE = "cpu"


@dataclass
class Comparison:
    run_a: str
    run_b: str
    tolerance: Tolerance
    rows: pd.DataFrame
    only_a: list = field(default_factory=list)
    only_b: list = field(default_factory=list)
    verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)
    environments: dict = field(default_factory=dict)
    gate_timing: bool = False  # break_even's verdicts rest on wall time: gated only when asked (same host, quiet)

    @property
    def rows_over(self) -> pd.DataFrame:
        return self.rows[~self.rows["within_tolerance"]] if len(self.rows) else self.rows

    @property
    def verdicts_changed(self) -> pd.DataFrame:
        return self.verdicts[~self.verdicts["same"]] if len(self.verdicts) else self.verdicts

    @property
    def gated_verdicts_changed(self) -> pd.DataFrame:
        v = self.verdicts_changed
        if not len(v):
            return v
        gated = (v["rests_on"] == "") | ((v["rests_on"] == "noise") & (self.tolerance.noise_logp == 0.0)) \
            | ((v["rests_on"] == "timing") & self.gate_timing)
        return v[gated]

    @property
    def ok(self) -> bool:
        return not (len(self.rows_over) or len(self.gated_verdicts_changed) or self.only_a or self.only_b)

    def counts(self) -> dict:
        r = self.rows
        pred_total = int(r["n_examples"].sum()) if len(r) else 0
        return {"rows_compared": int(len(r)), "rows_only_in_a": len(self.only_a), "rows_only_in_b": len(self.only_b),
                "rows_over_tolerance": int(len(self.rows_over)),
                "predictions_compared": pred_total,
                "predictions_changed": int(r["n_flipped"].sum()) if len(r) else 0,
                "predictions_changed_inference": int(r.loc[r["kind"] == "inference", "n_flipped"].sum()) if len(r) else 0,
                "predictions_changed_trained": int(r.loc[r["kind"] == "trained", "n_flipped"].sum()) if len(r) else 0,
                "predictions_changed_noise_driven": int(r.loc[r["kind"] == "noise", "n_flipped"].sum()) if len(r) else 0,
                "max_dlogp_inference": _max(r.loc[r["kind"] == "inference", "max_dlogp"]) if len(r) else float("nan"),
                "max_dlogp_trained": _max(r.loc[r["kind"] == "trained", "max_dlogp"]) if len(r) else float("nan"),
                "verdicts_compared": int(len(self.verdicts)),
                "verdicts_changed": int(len(self.verdicts_changed)),
                "verdicts_changed_gated": int(len(self.gated_verdicts_changed)),
                "max_dlogp_noise_driven": _max(r.loc[r["kind"] == "noise", "max_dlogp"]) if len(r) else float("nan")}

    def to_json(self) -> dict:
        def clean(frame):
            return json.loads(frame.to_json(orient="records", double_precision=10)) if len(frame) else []
        return {"run_a": self.run_a, "run_b": self.run_b, "tolerance": asdict(self.tolerance), "ok": self.ok,
                "counts": self.counts(), "environments": self.environments, "only_a": self.only_a,
                "only_b": self.only_b, "rows": clean(self.rows), "verdicts": clean(self.verdicts)}

    def report(self, all_rows: bool = False) -> str:
        """A readable report: environments, counts, the rows (all, or those that changed) and changed verdicts."""
        c, t = self.counts(), self.tolerance
        lines = _header(self.run_a, self.run_b, self.environments)
        lines.append(f"tolerance {t.name!r}: |dlogp| <= {t.inference_logp:g} (inference rows), "
                     f"<= {t.trained_logp:g} (trained rows), <= {t.noise_logp:g} (noise-driven rows: "
                     f"{', '.join(NOISE_DRIVEN_METHODS)})" + (f"  [{t.note}]" if t.note else ""))
        lines.append(f"rows: {c['rows_compared']} compared, {c['rows_over_tolerance']} over tolerance, "
                     f"{c['rows_only_in_a']} only in A, {c['rows_only_in_b']} only in B")
        lines.append(f"predictions: {c['predictions_changed']} of {c['predictions_compared']} changed "
                     f"({c['predictions_changed_inference']} in inference rows, {c['predictions_changed_trained']} "
                     f"in trained rows, {c['predictions_changed_noise_driven']} in noise-driven rows); max |dlogp| {c['max_dlogp_inference']:.3g} (inference), "
                     f"{c['max_dlogp_trained']:.3g} (trained), {c['max_dlogp_noise_driven']:.3g} (noise-driven)")
        lines.append(f"verdicts: {c['verdicts_changed']} of {c['verdicts_compared']} changed "
                     f"({c['verdicts_changed_gated']} of them gated)")
        if len(self.rows):
            show = self.rows if all_rows else self.rows[(self.rows["n_flipped"] > 0) | ~self.rows["within_tolerance"]]
            if len(show):
                cols = ["kind", "method", "eval_set", "train_task", "k", "seed", "acc_a", "acc_b", "acc_diff",
                        "agreement", "n_flipped", "max_dlogp", "within_tolerance"]
                lines.append("")
                lines.append(("every row" if all_rows else "rows with a changed prediction or over tolerance") + ":")
                with pd.option_context("display.width", 250, "display.max_columns", 50):
                    lines.append(show[cols].round(4).to_string(index=False))
        if len(self.verdicts_changed):
            lines.append("")
            lines.append("changed verdicts:")
            with pd.option_context("display.width", 250, "display.max_colwidth", 60):
                v = self.verdicts_changed.assign(gated=self.verdicts_changed.index.isin(self.gated_verdicts_changed.index))
                lines.append(v[["table", "key", "verdict", "a", "b", "rests_on", "gated"]].to_string(index=False))
        for side, keys in (("A", self.only_a), ("B", self.only_b)):
            if keys:
                lines.append(f"\nonly in {side}: " + "; ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
        lines.append("")
        lines.append("SAME within tolerance" if self.ok else "DIFFERENT (see above)")
        return "\n".join(lines)


def _header(run_a, run_b, environments: dict) -> list[str]:
    """The first lines of a comparison report: the two folders and where each was made."""
    lines = [f"compare  A = {run_a}", f"         B = {run_b}"]
    for side in ("a", "b"):
        env = environments.get(side, {})
        lines.append(f"  {side.upper()}: " + ", ".join(f"{k}={v}" for k, v in env.items() if v not in (None, "")))
    return lines


def _max(s) -> float:
    s = pd.Series(s, dtype=float).dropna()
    return float(s.max()) if len(s) else float("nan")


def load_runs(folder) -> pd.DataFrame:
    """Every evaluated row of a results folder (``icl.csv`` and ``cd.csv``, unified)."""
    folder = Path(folder)
    if not (folder / "icl.csv").is_file():
        raise FileNotFoundError(f"{folder}: no icl.csv here; give a results folder written by the study "
                                "(e.g. results/default)")
    icl = schema.read_table(folder / "icl.csv")
    cd = schema.read_table(folder / "cd.csv")
    return tables.evaluated(tables.unify(icl, cd if len(cd) else None))[0]


def row_kind(method: str) -> str:
    """``inference`` (a frozen model's forwards), ``noise`` (:data:`NOISE_DRIVEN_METHODS`) or ``trained``."""
    return "inference" if method in INFERENCE_METHODS else ("noise" if method in NOISE_DRIVEN_METHODS else "trained")


def compare_predictions(a: pd.DataFrame | None, b: pd.DataFrame | None) -> dict:
    """Per-example comparison of two prediction tables (indexed by ``idx``): examples in both, the share with
    the same prediction, how many changed, and the largest |delta log-prob| of either verbalizer."""
    if a is None or b is None:
        return {"n_examples": 0, "agreement": float("nan"), "n_flipped": 0, "max_dlogp": float("nan"),
                "n_flipped_batch": 0, "predictions": "missing"}
    if "skipped" in a:
        a = a[~a["skipped"].astype(bool)]
    if "skipped" in b:
        b = b[~b["skipped"].astype(bool)]
    common = a.index.intersection(b.index)
    if len(common) != len(a) or len(common) != len(b):
        return {"n_examples": int(len(common)), "agreement": float("nan"), "n_flipped": 0, "max_dlogp": float("inf"),
                "n_flipped_batch": 0, "predictions": f"different examples ({len(a)} vs {len(b)}, {len(common)} shared)"}
    a, b = a.loc[common], b.loc[common]
    same = a["pred"].to_numpy() == b["pred"].to_numpy()
    d = np.abs(a[list(LOGP_COLUMNS)].to_numpy(float) - b[list(LOGP_COLUMNS)].to_numpy(float))
    out = {"n_examples": int(len(common)), "agreement": float(same.mean()) if len(common) else float("nan"),
           "n_flipped": int((~same).sum()), "max_dlogp": float(np.nanmax(d)) if d.size else 0.0, "predictions": "ok"}
    out["n_flipped_batch"] = int((a["pred_batch"].to_numpy() != b["pred_batch"].to_numpy()).sum()) \
        if "pred_batch" in a and "pred_batch" in b else 0
    return out


def compare_rows(runs_a: pd.DataFrame, runs_b: pd.DataFrame, root_a, root_b, tol: Tolerance) -> tuple:
    """``(rows, only_a, only_b)``: one row per run key present in both runs."""
    ka, kb = dict(zip(runs_a["run_key"], runs_a.index)), dict(zip(runs_b["run_key"], runs_b.index))
    out = []
    for key in [k for k in runs_a["run_key"] if k in kb]:
        ra, rb = runs_a.loc[ka[key]], runs_b.loc[kb[key]]
        kind = row_kind(ra["method"])
        pa = tables.read_predictions(root_a, ra.get("predictions_file"))
        pb = tables.read_predictions(root_b, rb.get("predictions_file"))
        cmp = compare_predictions(pa, pb)
        bound = {"inference": tol.inference_logp, "trained": tol.trained_logp, "noise": tol.noise_logp}[kind]
        within = cmp["predictions"] == "ok" and cmp["max_dlogp"] <= bound
        out.append({"run_key": key, "kind": kind, "method": ra["method"], "method_label": ra["method_label"],
                    "eval_set": ra["eval_set"], "train_task": ra["train_task"], "k": int(ra["k"]), "seed": int(ra["seed"]),
                    "acc_a": float(ra["score_acc"]), "acc_b": float(rb["score_acc"]),
                    "acc_diff": float(rb["score_acc"] - ra["score_acc"]), **cmp, "tolerance": bound,
                    "within_tolerance": bool(within)})
    rows = pd.DataFrame(out)
    only_a = sorted(set(ka) - set(kb))
    only_b = sorted(set(kb) - set(ka))
    return rows, only_a, only_b


# Per claim table: the columns that identify a claim, and the verdict columns compared.
def _verdict_frames(runs: pd.DataFrame, root) -> dict:
    out = {}
    out["transfer_checks"] = (tables.transfer_checks(runs), ["model", "pattern", "eval_set", "train_task", "k", "seed", "config"],
                                 ["beats_controls"])
    dist = tables.distribution_checks(runs, root)
    out["distribution_checks"] = (dist, ["model", "pattern", "eval_set", "train_task", "k", "seed", "config"],
                                     [c for c in dist if c.startswith("closer_than_")])
    out["calibrated_checks"] = (tables.calibrated_checks(runs, root),
                                   ["eval_set", "train_task", "k", "seed", "a", "b", "calibration"], ["direction"])
    ens = tables.ensemble_checks(runs)
    out["ensemble_checks"] = (ens, ["eval_set", "train_task", "k", "m", "seed"],
                                 [c for c in ("cd_ensemble_vs_cd", "cd_ensemble_vs_icl", "cd_ensemble_vs_teacher",
                                              "icl_ensemble_vs_icl") if c in ens])
    be = tables.break_even(runs)
    if len(be):  # the verdict is whether the student answers cheaper than ICL (then CD pays off at some volume)
        be = be.assign(student_cheaper_than_cached_icl=be["s_per_query_student"] < be["s_per_query_icl"],
                       student_cheaper_than_full_prompt=be["s_per_query_student"] < be["s_per_query_full_prompt"])
    out["break_even"] = (be, ["model", "pattern", "eval_set", "train_task", "k", "config"],
                            ["student_cheaper_than_cached_icl", "student_cheaper_than_full_prompt"])
    return out


def _text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    return str(v)


def compare_verdicts(runs_a, runs_b, root_a, root_b) -> pd.DataFrame:
    """One row per (claim table, claim, verdict column) present in either run: the verdict in each run."""
    ta, tb = _verdict_frames(runs_a, root_a), _verdict_frames(runs_b, root_b)
    out = []
    for name, (fa, key_cols, verdict_cols) in ta.items():
        fb = tb[name][0]
        cols = [c for c in verdict_cols if c in fa or c in fb]
        def index(frame):
            if not len(frame):
                return {}
            keys = [c for c in key_cols if c in frame]
            return {"|".join(_text(v) for v in row[keys]): row for _, row in frame.iterrows()}
        ia, ib = index(fa), index(fb)
        for key in sorted(set(ia) | set(ib)):
            for col in cols:
                va = _text(ia[key].get(col)) if key in ia else "(absent)"
                vb = _text(ib[key].get(col)) if key in ib else "(absent)"
                noisy = any(rests_on_noise(name, col, side[key]) for side in (ia, ib) if key in side)
                out.append({"table": name, "key": key, "verdict": col, "a": va, "b": vb, "same": va == vb,
                            "rests_on": "timing" if name in TIMING_TABLES else ("noise" if noisy else "")})
    return pd.DataFrame(out, columns=["table", "key", "verdict", "a", "b", "same", "rests_on"])


TIMING_TABLES = ("break_even",)  # verdicts decided by wall time on the run's host


def rests_on_noise(table: str, column: str, row) -> bool:
    """Whether a verdict compares with a :data:`NOISE_DRIVEN_METHODS` student (then it is shown, not gated)."""
    noisy = {m.removeprefix("cd_") for m in NOISE_DRIVEN_METHODS}
    if table == "transfer_checks":
        return bool(noisy & set(str(row.get("controls_checked", "")).split(";")))
    if table == "distribution_checks":
        return column.removeprefix("closer_than_") in noisy
    if table == "calibrated_checks":
        return row.get("a") in NOISE_DRIVEN_METHODS or row.get("b") in NOISE_DRIVEN_METHODS
    return False


ENV_FIELDS = ("hardware", "cpu_capability", "blas", "onednn", "num_threads", "torch", "transformers", "git_commit",
              "isa_env")


def environment(runs: pd.DataFrame, folder) -> dict:
    """Where a run was made: from its run manifest when present, else from its rows."""
    prov = {}
    mpath = Path(folder) / "run_manifest.json"
    if mpath.is_file():
        prov = schema.read_run_manifest(mpath).get("provenance", {})
    row = runs.iloc[0] if len(runs) else {}
    return {f: prov.get(f, row.get(f) if len(runs) else None) for f in ENV_FIELDS}


def compare(run_a, run_b, tolerance: str | Tolerance = DEFAULT_TOLERANCE, gate_timing: bool = False) -> Comparison:
    """Compare two results folders (see the module docstring); ``tolerance`` a name in :data:`TOLERANCES`;
    ``gate_timing``: a changed break_even verdict fails too (for two runs on one quiet host)."""
    tol = TOLERANCES[tolerance] if isinstance(tolerance, str) else tolerance
    ra, rb = load_runs(run_a), load_runs(run_b)
    rows, only_a, only_b = compare_rows(ra, rb, run_a, run_b, tol)
    verdicts = compare_verdicts(ra, rb, run_a, run_b)
    return Comparison(str(run_a), str(run_b), tol, rows, only_a, only_b, verdicts,
                      {"a": environment(ra, run_a), "b": environment(rb, run_b)}, gate_timing)


# The bar a bf16-autocast CPU training path must clear against float32 students of the same recipe, seeds and
# queries before it may be a CPU default (issue 23), declared before the first measurement (2026-12-07): over
# every signal-bearing student prediction (the noise-driven self control is shown, not counted) at most 2% may
# change, and in no one student row more than 5%: a row whose predictions change by a share f can change its
# accuracy by at most f, so no row may move by more than the equivalence margin (0.05), and the rows on average
# by at most 0.02. It applies to ``--across mixed_precision`` only.
@dataclass(frozen=True)
class PrecisionBar:
    pooled_flip_rate: float = 0.02
    row_flip_rate: float = 0.05


PRECISION_BAR = PrecisionBar()

def rekey_across(runs: pd.DataFrame, field: str) -> pd.DataFrame:
    """``runs`` with each student row's recipe digest (:func:`~llmft_utils.study.keys.with_recipe`) replaced by its
    recipe without ``field`` (every ``cfg_*`` column but ``cfg_<field>``), so that two runs differing in that one
    recipe field match row for row. Rows without a recipe (zero-shot, ICL, teacher ensembles) keep their key."""
    cfg = sorted(c for c in runs.columns if c.startswith("cfg_") and c != f"cfg_{field}")
    if f"cfg_{field}" not in runs.columns:
        raise ValueError(f"no column cfg_{field}: {field!r} is not a recipe field of these rows")
    out = runs.copy()
    for i, row in runs.iterrows():
        if pd.isna(row[f"cfg_{field}"]) or row[f"cfg_{field}"] == "":
            continue
        recipe = "recipe-but-" + field + ":" + ",".join(f"{c[4:]}={_text(row[c])}" for c in cfg)
        out.at[i, "run_key"] = with_recipe(str(row["run_key"]), recipe)
    return out


@dataclass
class AcrossComparison:
    """Two runs of the same study differing in one recipe field (``llmft-study compare A B --across FIELD``);
    ``bar``: the precision bar when that field is ``mixed_precision``, else None (nothing to pass or fail)."""
    field: str
    rows: pd.DataFrame
    only_a: list
    only_b: list
    values: dict  # the field's values in each run's student rows: {"a": [...], "b": [...]}
    run_a: str = ""
    run_b: str = ""
    environments: dict = field(default_factory=dict)
    bar: PrecisionBar | None = None

    def rates(self) -> dict:
        """Flip counts and rates per row kind; the bar's two numbers over the signal-bearing students."""
        r = self.rows
        out = {}
        for kind in ("inference", "trained", "noise"):
            part = r[r["kind"] == kind] if len(r) else r
            n, f = (int(part["n_examples"].sum()), int(part["n_flipped"].sum())) if len(part) else (0, 0)
            out[kind] = {"rows": int(len(part)), "predictions": n, "flipped": f,
                         "flip_rate": f / n if n else float("nan"),
                         "max_row_flip_rate": float((part["n_flipped"] / part["n_examples"]).max()) if len(part) else float("nan"),
                         "max_abs_acc_diff": float(part["acc_diff"].abs().max()) if len(part) else float("nan"),
                         "max_dlogp": _max(part["max_dlogp"]) if len(part) else float("nan")}
        return out

    @property
    def within_bar(self) -> bool | None:
        """Whether the students' flips are within :attr:`bar` (None without a bar)."""
        if self.bar is None:
            return None
        t = self.rates()["trained"]
        return bool(t["rows"]) and t["flip_rate"] <= self.bar.pooled_flip_rate \
            and t["max_row_flip_rate"] <= self.bar.row_flip_rate

    def to_json(self) -> dict:
        rows = json.loads(self.rows.to_json(orient="records", double_precision=10)) if len(self.rows) else []
        return {"run_a": self.run_a, "run_b": self.run_b, "environments": self.environments,
                "field": self.field, "values": self.values, "bar": asdict(self.bar) if self.bar else None,
                "rates": self.rates(),
                "within_bar": self.within_bar, "only_a": self.only_a, "only_b": self.only_b, "rows": rows}

    def report(self) -> str:
        rates, b = self.rates(), self.bar
        lines = _header(self.run_a, self.run_b, self.environments)
        lines.append(f"across {self.field}: A = {self.values['a']}, B = {self.values['b']} "
                     f"(rows matched on everything else; claim verdicts are not compared)")
        for kind, what in (("trained", "students"), ("noise", "noise-driven students (not counted)"),
                           ("inference", "inference rows (the control: no recipe, expected unchanged)")):
            x = rates[kind]
            lines.append(f"  {what}: {x['rows']} rows, {x['flipped']} of {x['predictions']} predictions changed "
                         f"({x['flip_rate']:.2%}; worst row {x['max_row_flip_rate']:.2%}); max |acc diff| "
                         f"{x['max_abs_acc_diff']:.3f}, max |dlogp| {x['max_dlogp']:.3g}")
        if len(self.rows):
            show = self.rows[self.rows["kind"] != "inference"].assign(
                flip_rate=lambda d: d["n_flipped"] / d["n_examples"])
            cols = ["method", "train_task", "eval_set", "seed", "acc_a", "acc_b", "acc_diff", "n_examples",
                    "n_flipped", "flip_rate", "max_dlogp"]
            with pd.option_context("display.width", 250, "display.max_columns", 50):
                lines += ["", show[cols].round(4).to_string(index=False)]
        for side, keys in (("A", self.only_a), ("B", self.only_b)):
            if keys:
                lines.append(f"\n{len(keys)} rows only in {side} (not compared)")
        if b is not None:
            lines.append("")
            lines.append(f"bar for a bf16 CPU default (declared before the measurement): pooled student flip rate <= "
                         f"{b.pooled_flip_rate:.0%} and every student row <= {b.row_flip_rate:.0%}: "
                         + ("WITHIN" if self.within_bar else "NOT within"))
        return "\n".join(lines)


def compare_across(run_a, run_b, field: str = "mixed_precision") -> AcrossComparison:
    """Two results folders whose students differ in the recipe field ``field`` only (e.g. bf16 autocast against
    float32): rows matched on everything else (:func:`rekey_across`), per-example flips per row. Refuses when
    the two runs share a value of ``field`` in their student rows (then plain :func:`compare` is the tool)."""
    ra, rb = load_runs(run_a), load_runs(run_b)
    values = {}
    for side, runs in (("a", ra), ("b", rb)):
        col = runs.get(f"cfg_{field}")
        values[side] = sorted({_text(v) for v in col.dropna() if _text(v) != ""}) if col is not None else []
    if not values["a"] or not values["b"]:
        raise ValueError(f"compare --across {field}: a run has no student rows with cfg_{field}")
    if set(values["a"]) & set(values["b"]):
        raise ValueError(f"compare --across {field}: both runs have {field} = {sorted(set(values['a']) & set(values['b']))}; "
                         "compare them without --across")
    rows, only_a, only_b = compare_rows(rekey_across(ra, field), rekey_across(rb, field), run_a, run_b,
                                        TOLERANCES["loose"])
    return AcrossComparison(field, rows, only_a, only_b, values, str(run_a), str(run_b),
                            {"a": environment(ra, run_a), "b": environment(rb, run_b)},
                            PRECISION_BAR if field == "mixed_precision" else None)


def main(argv=None) -> int:
    import argparse

    from .cli import HelpFormatter, add_config_flag, parse

    ap = argparse.ArgumentParser(prog="llmft-study compare", description=__doc__, formatter_class=HelpFormatter)
    add_config_flag(ap, "flags (not the two folders)")
    ap.add_argument("run_a", help="a results folder (e.g. results/reference)")
    ap.add_argument("run_b", help="another results folder of the same study")
    ap.add_argument("--tolerance", default=DEFAULT_TOLERANCE, choices=sorted(TOLERANCES),
                    help="log-prob tolerances: " + "; ".join(f"{t.name}: inference {t.inference_logp:g}, trained "
                                                            f"{t.trained_logp:g}" for t in TOLERANCES.values()))
    ap.add_argument("--gate-timing", action="store_true",
                    help="a changed break_even verdict (wall time) fails too: for two runs on one quiet host")
    ap.add_argument("--all-rows", action="store_true", help="list every row, not only those that changed")
    ap.add_argument("--across", metavar="FIELD", help="the runs' students differ in this recipe field only (e.g. "
                    "mixed_precision: bf16 against float32): match rows on everything else and report the flips, "
                    "and, for mixed_precision, the bar a bf16 CPU default must clear (exit 1 when it does not)")
    ap.add_argument("--json", metavar="FILE", help="also write the whole comparison as JSON")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="a traceback with an error's message")
    a, _ = parse(ap, argv)
    from .logs import run_verb

    return run_verb("compare", lambda: _run(a), a.verbose)


def _run(a) -> int:
    if a.across:
        try:
            x = compare_across(a.run_a, a.run_b, a.across)
        except (FileNotFoundError, ValueError) as e:
            print(f"compare: {e}", file=sys.stderr)
            return 2
        print(x.report())
        if a.json:
            store.atomic_write_json(a.json, x.to_json())
        return 1 if x.within_bar is False else 0
    try:
        c = compare(a.run_a, a.run_b, a.tolerance, a.gate_timing)
    except FileNotFoundError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(c.report(all_rows=a.all_rows))
    if a.json:
        store.atomic_write_json(a.json, c.to_json())
    return 0 if c.ok else 1
