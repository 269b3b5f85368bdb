"""Bring a results folder's run keys to the current format: the demonstration pool's digest in every ICL key
at k > 0 and every student key (llmft_utils/study/keys.py).

    python tools/migrate_keys.py results/reference          # rewrites icl.csv, cd.csv, train_log.csv in place

Rows written before the pool entered the keys hold keys without it, so `llmft-study compare` would find none
of them in a current run. The pool of each row is taken from the folder's own ``manifest.json`` (the sha256
it records for each pool's prepared file), which is the pool the rows were made from as long as notebook 01
was not rerun into the folder with other data afterwards. Keys that already hold a pool are left alone, so
the tool can be run twice; every table is rewritten atomically. Nothing else in a row changes (prediction
file names keep the digest of the old key: rows name their file in ``predictions_file``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmft_utils import data  # noqa: E402
from llmft_utils.store import atomic_write_csv  # noqa: E402
from llmft_utils.study.keys import pool_digest  # noqa: E402


def with_pool(key: str, at: int, pool: str) -> str:
    """``key`` with ``pool<pool>`` inserted as field ``at`` (fields separated by ``|``), unless it has a pool."""
    fields = key.split("|")
    if any(f.startswith("pool") for f in fields):
        return key
    return "|".join([*fields[:at], f"pool{pool}", *fields[at:]])


def migrate(folder: Path) -> dict:
    manifest = data.load_manifest(folder)
    pools = {name: pool_digest(info["sha256"]) for name, info in manifest["demo_pools"].items()}
    pool_of_task = {task: pools[manifest["eval_sets"][data.student_eval_sets(manifest, task, False)[0]]["demo_pool"]]
                    for task in {info["task"] for info in manifest["eval_sets"].values()} if task in data.TASKS}
    changed = {}
    icl_path = folder / "icl.csv"
    if icl_path.is_file():
        icl = pd.read_csv(icl_path)
        new = [with_pool(k, 6, pools[p]) if kk > 0 else k for k, kk, p in zip(icl["run_key"], icl["k"], icl["demo_pool"])]
        changed["icl.csv"] = int(sum(a != b for a, b in zip(icl["run_key"], new)))
        atomic_write_csv(icl.assign(run_key=new), icl_path)
    cd_path = folder / "cd.csv"
    if cd_path.is_file():
        cd = pd.read_csv(cd_path)
        new = [with_pool(k, 8, pool_of_task[t]) for k, t in zip(cd["run_key"], cd["train_task"])]
        changed["cd.csv"] = int(sum(a != b for a, b in zip(cd["run_key"], new)))
        atomic_write_csv(cd.assign(run_key=new), cd_path)
    log_path = folder / "train_log.csv"
    if log_path.is_file():
        tl = pd.read_csv(log_path)  # student = the student's key: method|model|task|...
        students = [with_pool(s, 8, pool_of_task[s.split("|")[2]]) for s in tl["student"]]
        changed["train_log.csv"] = int(sum(a != b for a, b in zip(tl["student"], students)))
        atomic_write_csv(tl.assign(run_key=[s + "|" + k.rsplit("|", 1)[1] for s, k in zip(students, tl["run_key"])],
                                   student=students), log_path)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    a = ap.parse_args(argv)
    for name, n in migrate(a.folder).items():
        print(f"{a.folder / name}: {n} keys given their pool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
