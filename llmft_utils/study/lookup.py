"""Looking up the ICL rows (and their predictions) that a CD sweep compares its students with.
"""
from __future__ import annotations

from pathlib import Path

from .plan import CONTROL_METHODS
from .schema import read_predictions


def icl_runs(icl_rows, model: str, es: str, pattern: str, precision: str):
    """The ICL rows of (model, eval set, pattern) at ``precision`` (``dtype@device``), every k and seed."""
    kind = icl_rows["device"].astype(str).str.split(":").str[0]
    return icl_rows[(icl_rows["model"] == model) & (icl_rows["task"] + "/" + icl_rows["split"] == es)
                    & (icl_rows["pattern"] == pattern) & (icl_rows["dtype"].astype(str) + "@" + kind == precision)]


def _icl_row(icl_rows, model: str, es: str, pattern: str, k: int, seed: int, precision: str):
    """The ICL row of (model, eval set, pattern, k, seed) at ``precision`` (``dtype@device``), or None."""
    sel = icl_runs(icl_rows, model, es, pattern, precision)
    sel = sel[(sel["k"] == k) & (sel["seed"] == (seed if k else 0))]
    return None if sel.empty else sel.iloc[-1]


def icl_predictions(out_dir: Path, icl_rows, model: str, es: str, pattern: str, k: int, seed: int, precision: str):
    row = _icl_row(icl_rows, model, es, pattern, k, seed, precision)
    if row is None:
        raise FileNotFoundError(f"no ICL row for {model} {es} {pattern} k={k} seed={seed} ({precision}) in icl.csv: run "
                                "notebooks/02_icl_baselines with the same model, pattern, ks, seeds, dtype and device first")
    return row, read_predictions(out_dir / row["predictions_file"])


def missing_icl_runs(icl_rows, model: str, pattern: str, plan: list, precision: str) -> list[str]:
    """The ICL runs the CD sweep compares with (zero-shot per eval set, the teacher per CD student and eval
    set) that are not in ``icl.csv``, as readable strings: checked before the first student trains."""
    need = {(es, 0, 0) for p in plan for es in p.eval_sets}
    need |= {(es, p.k, p.seed) for p in plan if p.method in ("cd", "icl_ensemble", "cd_ensemble") for es in p.eval_sets}
    need |= {(es, max(q.k for q in plan if q.method == "cd"), p.seed) for p in plan
             if p.method in CONTROL_METHODS.values() for es in p.eval_sets}
    return [f"{es} k={k} seed={seed}" for es, k, seed in sorted(need)
            if icl_rows.empty or _icl_row(icl_rows, model, es, pattern, k, seed, precision) is None]
