"""tools/migrate_results.py: a results folder written before the schema versions (and before the pool entered
the keys) gets exactly the keys the current code gives the same runs, and the version stamp (checked on the
golden smoke run made old again: pools and stamps taken out)."""
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import migrate_results  # noqa: E402

from llmft_utils.study import schema  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "smoke"


def test_old_keys_get_the_current_keys(tmp_path):
    old = tmp_path / "run"
    shutil.copytree(GOLDEN, old)
    for name in ("icl.csv", "cd.csv"):
        t = pd.read_csv(old / name).drop(columns=[schema.VERSION_COLUMN], errors="ignore")
        t["run_key"] = [re.sub(r"\|pool[0-9a-f]+", "", k) for k in t["run_key"]]
        t.to_csv(old / name, index=False)
    got = migrate_results.migrate(old)
    assert got == {"icl.csv": 3, "cd.csv": 16}  # every k > 0 ICL row and every student row; k = 0 rows keep theirs
    for name in ("icl.csv", "cd.csv"):
        new = pd.read_csv(old / name)
        assert list(new["run_key"]) == list(pd.read_csv(GOLDEN / name)["run_key"])
        assert (new[schema.VERSION_COLUMN] == schema.SCHEMAS[name].version).all()
    assert migrate_results.migrate(old) == {}  # twice is once
