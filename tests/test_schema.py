"""Every results table is read against its declared schema: a dropped, renamed or mistyped column, or a
version this code does not know, is a clear error naming the file, the column and the version, never NaN;
an older version is migrated and reported; writers cannot write what the schema does not allow."""
import json
import logging
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from llmft_utils import pipeline
from llmft_utils.study import schema

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "smoke"
REFERENCE = ROOT / "results" / "reference"


def _copy(tmp_path, src=GOLDEN):
    out = tmp_path / "run"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("executed", "figures"))
    return out


def _edit(path, fn):
    t = pd.read_csv(path, dtype={"demo_ids": str})
    fn(t).to_csv(path, index=False)


def test_the_committed_runs_meet_their_schemas_at_the_current_version():
    for folder in (GOLDEN, REFERENCE):
        for name in schema.SCHEMAS:
            if (folder / name).is_file():
                raw = pd.read_csv(folder / name)
                assert (raw[schema.VERSION_COLUMN] == schema.SCHEMAS[name].version).all(), (folder, name)
                assert len(schema.read_table(folder / name)) == len(raw)
        for p in (folder / "predictions").glob("*.parquet"):
            schema.read_predictions(p)
        schema.read_run_manifest(folder / "run_manifest.json")


@pytest.mark.parametrize("table,column", [("icl.csv", "score_acc"), ("cd.csv", "score_acc"), ("cd.csv", "k"),
                                          ("icl.csv", "predictions_file")])
def test_a_dropped_or_renamed_column_names_file_column_and_version(tmp_path, table, column):
    out = _copy(tmp_path)
    for how in ("drop", "rename"):
        _edit(out / table, lambda t: t.drop(columns=[column]) if how == "drop" else t.rename(columns={column: "x"}))
        with pytest.raises(schema.SchemaError, match=rf"{table}: no column '{column}', .*schema version 2 of {table}"):
            schema.read_table(out / table)
        shutil.copy(GOLDEN / table, out / table)


def test_a_column_only_some_methods_have_is_required_in_their_rows(tmp_path):
    out = _copy(tmp_path)
    _edit(out / "cd.csv", lambda t: t.drop(columns=["ensemble_m"]))
    with pytest.raises(schema.SchemaError, match=r"no column 'ensemble_m', which (cd|icl)_ensemble rows must have"):
        schema.read_table(out / "cd.csv")


@pytest.mark.parametrize("column,value,message", [
    ("score_acc", "high", r"column 'score_acc' should be float but holds non-numbers \(e.g. 'high'\)"),
    ("k", 2.5, r"column 'k' should be int but holds non-integers \(e.g. 2.5\)"),
    ("seed", None, r"column 'seed' should be int but has 1 missing values"),
    ("eval_subsampled", "maybe", r"column 'eval_subsampled' should be bool but holds non-booleans \(e.g. 'maybe'\)"),
])
def test_a_mistyped_column_is_named_with_an_example(tmp_path, column, value, message):
    out = _copy(tmp_path)

    def spoil(t):
        t[column] = t[column].astype(object)
        t.loc[1, column] = value
        return t

    _edit(out / "icl.csv", spoil)
    with pytest.raises(schema.SchemaError, match=rf"icl.csv: {message} \(schema version 2 of icl.csv\)"):
        schema.read_table(out / "icl.csv")


def test_an_unknown_version_is_refused_and_an_older_one_migrated_and_reported(tmp_path, caplog):
    out = _copy(tmp_path)
    _edit(out / "icl.csv", lambda t: t.assign(schema_version=9))
    with pytest.raises(schema.SchemaError, match=r"icl.csv: written by schema version 9 of icl.csv, which this code "
                                                 r"does not know \(it reads up to version 2\)"):
        schema.read_table(out / "icl.csv")
    # version 1 (no stamp, keys without the pool): read as version 2, with the keys the current code gives
    _edit(out / "icl.csv", lambda t: t.drop(columns=["schema_version"]).assign(
        run_key=[k.replace(f"|{p}|", "|") for k, p in zip(t["run_key"], t["run_key"].str.extract(r"\|(pool\w+)\|")[0])]))
    with caplog.at_level(logging.WARNING):
        got = schema.read_table(out / "icl.csv")
    assert list(got["run_key"]) == list(schema.read_table(GOLDEN / "icl.csv")["run_key"])
    assert any("schema version 1 -> 2: run keys given their demonstration pool" in r.getMessage() for r in caplog.records)
    # a version-1 table that also lacks a column: the migration does not invent it
    _edit(out / "icl.csv", lambda t: t.drop(columns=["score_acc"]))
    with pytest.raises(schema.SchemaError, match=r"no column 'score_acc', .*written by schema version 1 of icl.csv"):
        schema.read_table(out / "icl.csv")


def test_writers_refuse_rows_the_schema_does_not_allow_and_leave_the_file(tmp_path):
    out = _copy(tmp_path)
    before = (out / "icl.csv").read_bytes()
    row = schema.read_table(out / "icl.csv").iloc[0].to_dict()
    with pytest.raises(schema.SchemaError, match=r"icl.csv \(new rows\): no column 'score_acc'"):
        schema.StudyTable(out / "icl.csv").append([{c: v for c, v in row.items() if c != "score_acc"}])
    with pytest.raises(schema.SchemaError, match=r"column 'k' should be int"):
        schema.StudyTable(out / "icl.csv").append([{**row, "k": "four"}])
    assert (out / "icl.csv").read_bytes() == before and not list(out.glob(".*.tmp"))  # nothing written or left
    with pytest.raises(schema.SchemaError, match="summary.csv: no column 'pattern'"):
        schema.write_table(pd.DataFrame({"model": ["m"]}), out / "summary.csv")
    assert not (out / "summary.csv").exists()


def test_prediction_files_and_the_run_manifest_are_checked(tmp_path):
    out = _copy(tmp_path)
    p = next((out / "predictions").glob("icl__*.parquet"))
    preds = schema.read_predictions(p)
    schema.write_predictions(preds, p)
    pd.testing.assert_frame_equal(schema.read_predictions(p), preds)
    import pyarrow.parquet as pq

    assert pq.read_schema(p).metadata[schema.PARQUET_KEY] == b"2"
    with pytest.raises(schema.SchemaError, match="no column 'logp_label1'"):
        schema.write_predictions(preds.drop(columns=["logp_label1"]), p)
    preds.drop(columns=["logp_label1"]).to_parquet(p)
    with pytest.raises(schema.SchemaError, match=rf"{p.name}: no column 'logp_label1', .*written by schema version 1"):
        schema.read_predictions(p)
    m = json.loads((out / "run_manifest.json").read_text())
    (out / "run_manifest.json").write_text(json.dumps({**m, "schema_version": 7}))
    with pytest.raises(schema.SchemaError, match="schema version 7 of run_manifest.json"):
        schema.read_run_manifest(out / "run_manifest.json")
    (out / "run_manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "parameters"}))
    with pytest.raises(schema.SchemaError, match="no key 'parameters'"):
        schema.read_run_manifest(out / "run_manifest.json")


def test_notebook_04_on_a_table_without_its_accuracy_stops_with_the_column_and_writes_nothing(tmp_path, capsys):
    """The case that wrote a summary of NaN accuracies and exited 0: now exit status 2, one message naming
    icl.csv and score_acc, and no summary, checks table or figure written."""
    out = _copy(tmp_path, REFERENCE)
    for name in list(schema.CHECKS):
        (out / name).unlink(missing_ok=True)
    _edit(out / "icl.csv", lambda t: t.drop(columns=["score_acc"]))
    before = sorted(p.relative_to(out) for p in out.rglob("*") if "executed" not in p.parts)
    rc = pipeline.main(["--profile", "default", "--only", "04", "--set", f"results_dir={out}", "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "SchemaError" in err and "icl.csv: no column 'score_acc'" in err
    # the pipeline's own records (executed copies, run manifest, run log) are written; no result of 04 is
    after = sorted(p.relative_to(out) for p in out.rglob("*") if not {"executed", "logs"} & set(p.parts)
                   and p.name != "run_manifest.json")
    assert after == [p for p in before if p.name != "run_manifest.json"]


def test_no_reader_bypasses_the_schema():
    """Results tables are read and written only through llmft_utils/study/schema.py (store.py is the raw I/O
    beneath it): no pd.read_csv / read_parquet / ResultTable of a results table anywhere else."""
    files = [*(ROOT / "llmft_utils").rglob("*.py"), *(ROOT / "notebooks").glob("*.py"), *(ROOT / "tools").glob("*.py")]
    allowed = {ROOT / "llmft_utils" / "study" / "schema.py", ROOT / "llmft_utils" / "store.py",
               ROOT / "tools" / "migrate_results.py"}  # reads the raw stamp to see whether to rewrite
    bad = [f"{f.relative_to(ROOT)}:{i}" for f in files if f not in allowed
           for i, line in enumerate(f.read_text().splitlines(), 1)
           if any(s in line for s in ("read_csv(", "read_parquet(", "ResultTable(", "atomic_write_parquet(")) and
           not line.lstrip().startswith("#")]
    assert not bad, "results tables read around the schema: " + ", ".join(bad)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
