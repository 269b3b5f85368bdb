"""Tidy result tables: provenance, atomic writes, resume-by-key, seed aggregation."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS_DIR_ENV = "LLMFT_RESULTS_DIR"


def repo_root() -> Path:
    """The checkout this package lives in (falls back to the current directory)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "notebooks").is_dir():
        return here
    return Path.cwd()


def results_dir(results_dir: str = "", profile: str = "smoke") -> Path:
    """Explicit argument, else $LLMFT_RESULTS_DIR, else ``<repo>/results/<profile>``; created if missing."""
    d = results_dir or os.environ.get(RESULTS_DIR_ENV, "")
    p = Path(d) if d else repo_root() / "results" / profile
    if not p.is_absolute():
        p = repo_root() / p
    p.mkdir(parents=True, exist_ok=True)
    return p


def git_commit() -> str:
    try:
        root = repo_root()
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict:
    """What produced a row: code version, library versions, hardware, time."""
    import torch
    import transformers

    from . import __version__
    from .probes import hardware

    return {"git_commit": git_commit(), "llmft_utils": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "hardware": hardware(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def ids_digest(ids) -> str:
    """Short stable digest of a list of example ids (identifies an evaluation or demonstration set)."""
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:10]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(df: pd.DataFrame, path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def atomic_write_parquet(df: pd.DataFrame, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class ResultTable:
    """A CSV of result rows keyed by ``run_key``; appends are atomic, so an interrupted run leaves
    either the old file or the old file plus complete new rows, never a partial row."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> pd.DataFrame:
        if not self.path.is_file():
            return pd.DataFrame()
        return pd.read_csv(self.path)

    def done(self) -> set:
        df = self.read()
        return set(df["run_key"]) if "run_key" in df else set()

    def append(self, rows: list[dict]) -> None:
        old = self.read()
        new = pd.DataFrame(rows)
        if "run_key" in old and len(old):
            old = old[~old["run_key"].isin(set(new["run_key"]))]  # a forced rerun replaces its rows
        atomic_write_csv(pd.concat([old, new], ignore_index=True) if len(old) else new, self.path)


def t_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval over seeds; a single value gives (v, nan, nan)."""
    from scipy import stats

    v = np.asarray([x for x in values if not pd.isna(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - h, m + h


def summarize(df: pd.DataFrame, by: list, metrics: list) -> pd.DataFrame:
    """One row per group: ``n_seeds`` and, per metric, mean with a 95% t-interval over seeds."""
    out = []
    for keys, g in df.groupby(by, sort=True, dropna=False):
        row = dict(zip(by, keys if isinstance(keys, tuple) else (keys,)))
        row["n_seeds"] = int(g["seed"].nunique()) if "seed" in g else len(g)
        for m in metrics:
            mean, lo, hi = t_ci(g[m])
            row[f"{m}_mean"], row[f"{m}_ci_lo"], row[f"{m}_ci_hi"] = mean, lo, hi
        out.append(row)
    return pd.DataFrame(out)
