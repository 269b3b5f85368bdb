"""tools/migrate_keys.py: a results folder written before the pool entered the keys gets exactly the keys the
current code gives the same runs (checked on the golden smoke run with its pools taken out again)."""
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import migrate_keys  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "smoke"


def test_old_keys_get_the_current_keys(tmp_path):
    old = tmp_path / "run"
    shutil.copytree(GOLDEN, old)
    for name in ("icl.csv", "cd.csv"):
        t = pd.read_csv(old / name)
        t["run_key"] = [re.sub(r"\|pool[0-9a-f]+", "", k) for k in t["run_key"]]
        t.to_csv(old / name, index=False)
    got = migrate_keys.migrate(old)
    assert got["icl.csv"] == 3 and got["cd.csv"] == 16  # every k > 0 ICL row and every student row; k = 0 rows keep theirs
    for name in ("icl.csv", "cd.csv"):
        assert list(pd.read_csv(old / name)["run_key"]) == list(pd.read_csv(GOLDEN / name)["run_key"])
    assert migrate_keys.migrate(old) == {"icl.csv": 0, "cd.csv": 0}  # twice is once
