"""Rewrite a results folder's tables at the current schema version (llmft_utils/study/schema.py).

    python tools/migrate_results.py results/reference     # icl.csv, cd.csv, train_log.csv and the checks tables

Readers migrate an older table in memory (and say so); this writes the result back, so the folder reads
without migrations from then on. Version 1 -> 2 gives the run keys of ICL rows at k > 0 and of students
their demonstration pool's digest, taken from the folder's own ``manifest.json`` (the pool the rows were
made from as long as notebook 01 was not rerun into the folder with other data afterwards). Each table is
checked against its schema and rewritten atomically; a table already at the current version is left as it
is, so the tool can be run twice. Prediction files are read as they are (their layout did not change).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmft_utils.study import schema  # noqa: E402


def migrate(folder: Path) -> dict:
    """``{table: number of run keys changed}`` for each table rewritten (absent: already current)."""
    changed = {}
    for name, sch in schema.SCHEMAS.items():
        path = Path(folder) / name
        if not path.is_file() or name == "predictions":
            continue
        raw = pd.read_csv(path, dtype={"demo_ids": str})
        if schema.VERSION_COLUMN in raw and (raw[schema.VERSION_COLUMN] == sch.version).all():
            continue
        new = schema.read_table(path)
        keys = [c for c in ("run_key", "student") if c in raw]
        changed[name] = int(sum((raw[c] != new[c]).sum() for c in keys))
        schema.write_table(new, path)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    a = ap.parse_args(argv)
    done = migrate(a.folder)
    for name, n in done.items():
        print(f"{a.folder / name}: rewritten at schema version {schema.SCHEMAS[name].version} ({n} keys changed)")
    if not done:
        print(f"{a.folder}: every table is at the current schema version")
    return 0


if __name__ == "__main__":
    sys.exit(main())
