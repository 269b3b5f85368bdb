import numpy as np
import pandas as pd
import pytest
from scipy import stats

from llmft_utils import probes, store
from llmft_utils.analysis import tables


def test_result_table_append_replace_resume(tmp_path):
    t = store.ResultTable(tmp_path / "r.csv")
    assert t.done() == set()
    t.append([{"run_key": "a", "acc": 0.5}])
    t.append([{"run_key": "b", "acc": 0.6}])
    t.append([{"run_key": "a", "acc": 0.7}])  # forced rerun replaces, never duplicates
    df = t.read()
    assert sorted(df.run_key) == ["a", "b"] and df.set_index("run_key").acc["a"] == 0.7
    assert not list(tmp_path.glob(".*.tmp"))


def test_t_ci_reference():
    v = [0.50, 0.54, 0.56]
    m, lo, hi = tables.t_ci(v)
    ref = stats.t.interval(0.95, 2, loc=np.mean(v), scale=stats.sem(v))
    assert m == pytest.approx(np.mean(v)) and (lo, hi) == pytest.approx(ref)
    assert np.isnan(tables.t_ci([0.5])[1])
    m, lo, hi = tables.t_ci([0.1, 0.9, 0.95], bounds=(0, 1))  # a wide interval of a proportion stays in [0, 1]
    assert (lo, hi) == (0.0, 1.0) and m == pytest.approx(0.65)
    assert tables.is_proportion("score_acc") and tables.is_proportion("acc_label1")
    assert not tables.is_proportion("s_per_query") and not tables.is_proportion("peak_mem_mb")


def test_summarize_groups():
    df = pd.DataFrame({"task": ["a"] * 3 + ["b"], "k": [4, 4, 4, 0], "seed": [0, 1, 2, 0], "acc": [0.5, 0.6, 0.7, 0.4]})
    s = tables.summarize(df, ["task", "k"], ["acc"]).set_index("task")
    assert s.loc["a", "n_seeds"] == 3 and s.loc["a", "acc_mean"] == pytest.approx(0.6)
    assert s.loc["b", "acc_mean"] == 0.4 and np.isnan(s.loc["b", "acc_ci_lo"])


def test_probe_measures_cpu_peak():
    with probes.probe("cpu") as r:
        x = np.ones(50_000_000)  # ~400 MB
        x.sum()
    assert r.wall_s > 0 and r.mem_kind.startswith("cpu_peak_rss") and r.peak_mem_mb > 350
    del x


def test_provenance_fields():
    p = store.provenance()
    assert {"git_commit", "torch", "transformers", "hardware", "timestamp"} <= set(p)
