import gzip
import json

import numpy as np
import pandas as pd
import pytest

from llmft_utils import data
from llmft_utils.study.plan import CDPlan, EnsembleSpec, EvalOptions, ICLPlan


def test_rte_labels_and_sizes(data_dir):
    tr, va = data.load_split("rte", "train", data_dir), data.load_split("rte", "validation", data_dir)
    assert (len(tr), len(va)) == (2490 - 2, 277)  # GLUE's train file repeats 2 pairs (dropped, counted)
    assert [(d["at"].rsplit("/", 1)[-1], d["first"].rsplit("/", 1)[-1]) for d in tr.attrs["duplicates"]] == [
        ("train.jsonl:527", "train.jsonl:421"), ("train.jsonl:2242", "train.jsonl:460")]
    assert va["label"].value_counts().to_dict() == {0: 146, 1: 131}
    assert set(va.loc[va.label == 0, "orig_label"]) == {"entailment"}
    assert set(va.loc[va.label == 1, "orig_label"]) == {"not_entailment"}


def test_mnli_is_binary_like_llmft(data_dir):
    m = data.load_split("mnli", "validation_matched", data_dir)
    assert len(m) == 3479 + 3213  # neutral dropped
    assert set(m["orig_label"]) == {"entailment", "contradiction"}
    assert (m.loc[m.orig_label == "contradiction", "label"] == 1).all()
    mm = data.load_split("mnli", "validation_mismatched", data_dir)
    assert len(mm) == 3463 + 3240 - 2  # two entailment pairs repeated in the file (dropped, counted)
    assert data.label_stats(m)["majority_acc"] == pytest.approx(3479 / 6692)


def test_hans_full_with_heuristics(data_dir):
    h = data.load_split("hans", "validation", data_dir)
    assert len(h) == 30000 and h["subcase"].nunique() == 30 and h["heuristic"].nunique() == 3
    assert (h.groupby("subcase").size() == 1000).all()
    # ln/sn/cn subcases are non-entailment, le/se/ce entailment
    assert (h.loc[h.subcase.str[1] == "n", "label"] == 1).all()
    assert (h.loc[h.subcase.str[1] == "e", "label"] == 0).all()


def test_stratified_subsample_fixed_and_proportional(data_dir):
    m = data.load_split("mnli", "validation_matched", data_dir)
    a = data.stratified_subsample(m, n=1000, seed=0)
    b = data.stratified_subsample(m, n=1000, seed=0)
    assert a.index.equals(b.index) and len(a) == 1000
    assert a["label"].value_counts().to_dict() == {0: 520, 1: 480}
    assert not a.index.equals(data.stratified_subsample(m, n=1000, seed=1).index)
    h = data.stratified_subsample(data.load_split("hans", "validation", data_dir), n=1500, by="subcase")
    assert (h.groupby("subcase").size() == 50).all()
    assert data.stratified_subsample(m, n=0) is m


def _pool(n=40):
    return pd.DataFrame({"idx": range(n), "premise": [f"p{i}" for i in range(n)],
                         "hypothesis": [f"h{i}" for i in range(n)], "label": [i % 2 for i in range(n)]})


def test_demonstrations_balanced_deterministic_query_free():
    pool = _pool()
    queries = pool.iloc[:30]  # most of the pool is also a query
    d1 = data.sample_demonstrations(pool, 8, seed=3, exclude=queries)
    d2 = data.sample_demonstrations(pool, 8, seed=3, exclude=queries)
    assert list(d1["idx"]) == list(d2["idx"])
    assert d1["label"].value_counts().to_dict() == {0: 4, 1: 4}
    assert set(d1["idx"]).isdisjoint(queries["idx"])
    assert len(data.sample_demonstrations(pool, 0, seed=0)) == 0
    others = {tuple(data.sample_demonstrations(pool, 4, seed=s)["idx"]) for s in range(5)}
    assert len(others) > 1  # seeds differ
    labels = [list(data.sample_demonstrations(pool, 8, seed=s)["label"]) for s in range(5)]
    assert any(lab != sorted(lab) for lab in labels)  # shuffled, not grouped by label


def test_odd_k_rule_one_extra_demonstration_of_a_seeded_label():
    """k = 1, 3: ⌊k/2⌋ per label plus one of a label drawn with the seed (both labels occur over seeds);
    deterministic; k = 2 is one per label."""
    pool = _pool()
    extra = []
    for s in range(12):
        d1, d3 = data.sample_demonstrations(pool, 1, seed=s), data.sample_demonstrations(pool, 3, seed=s)
        assert len(d1) == 1 and sorted(d3["label"].value_counts().to_list()) == [1, 2]
        assert list(d3["idx"]) == list(data.sample_demonstrations(pool, 3, seed=s)["idx"])
        extra.append(int(d1["label"].iloc[0]))
    assert set(extra) == {0, 1}
    assert data.sample_demonstrations(pool, 2, seed=0)["label"].value_counts().to_dict() == {0: 1, 1: 1}


def test_demonstrations_bad_k_and_small_pool():
    with pytest.raises(ValueError, match="non-negative"):
        data.sample_demonstrations(_pool(), -2, seed=0)
    with pytest.raises(data.DataError, match="only"):
        data.sample_demonstrations(_pool(4), 8, seed=0)


def _write(tmp_path, rel, lines):
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return tmp_path


GOOD = json.dumps({"idx": 0, "premise": "A man sleeps.", "hypothesis": "A man rests.", "label": "entailment"})


@pytest.mark.parametrize("bad, match", [
    ('{"idx": 1, "premise": "x", "hypothesis": "y", "label": "maybe"}', "label 'maybe'"),
    ('{"idx": 1, "premise": "  ", "hypothesis": "y", "label": "entailment"}', "non-empty"),
    ('{"idx": 1, "premise": "x", "label": "entailment"}', "missing field"),
    ('{"idx": 1, "premise": "x", "hypothesis": "y", "label": ', "not valid JSON"),
    ('{"idx": 0, "premise": "x", "hypothesis": "y", "label": "entailment"}', r"validation.jsonl:2 \(idx=0\): duplicate idx 0 \(first at .*validation.jsonl:1\)"),
    ('{"idx": 1, "premise": "\\u0000\\u0001\\u0007\\u001b", "hypothesis": "y", "label": "entailment"}', r"validation.jsonl:2 .*'premise' holds the control character U\+0000"),
    ('{"idx": 1, "premise": "x", "hypothesis": "a\\u001bb", "label": "entailment"}', "control character U\\+001B"),
    ('{"idx": 1, "premise": null, "hypothesis": "y", "label": "entailment"}', "'premise' must be a string, got null"),
    ('{"idx": 1, "premise": "x", "hypothesis": 7, "label": "entailment"}', "must be a string, got int"),
    ('{"idx": 1, "premise": "A man sleeps. ", "hypothesis": "A man rests.", "label": "not_entailment"}',
     r"validation.jsonl:2 \(idx=1\): the same premise and hypothesis as .*validation.jsonl:1 with another label"),
])
def test_malformed_rows_fail_clearly(tmp_path, bad, match):
    d = _write(tmp_path, "rte/validation.jsonl", [GOOD, bad])
    with pytest.raises(data.DataError, match=match):
        data.load_split("rte", "validation", d)


def test_hans_gz_and_missing_columns(tmp_path):
    p = tmp_path / "hans" / "validation.jsonl.gz"
    p.parent.mkdir(parents=True)
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"idx": 0, "premise": "a", "hypothesis": "b", "label": "entailment"}) + "\n")
    with pytest.raises(data.DataError, match="heuristic"):
        data.load_split("hans", "validation", tmp_path)


def test_unknown_and_missing_inputs(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="unknown task 'qnli'.*known tasks"):
        data.load_split("qnli", "train", tmp_path)
    with pytest.raises(data.DataError, match="no split 'test'"):
        data.load_split("rte", "test", tmp_path)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_split("rte", "validation", tmp_path / "nope")
    with pytest.raises(data.DataError, match="not found"):
        data.load_split("rte", "validation", tmp_path)
    # neither a data directory nor the Hub: one error that names both ways
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "mirror_beside_checkout", lambda: None)
    with pytest.raises(data.DataError, match=r"LLMFT_DATA_DIR.*online"):
        data.load_split("rte", "validation")
    with pytest.raises(data.DataError, match="no Hugging Face Hub copy.*LLMFT_DATA_DIR"):  # PAWS-QQP: the mirror only
        data.load_split("paws_qqp", "dev_and_test")


def test_env_var_is_used(data_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(data_dir))
    assert len(data.load_split("rte", "validation")) == 277


def test_prepare_study_data_writes_manifest(data_dir, tmp_path):
    manifest, stats = data.prepare_study_data(tmp_path, eval_sizes={"mnli": 100, "hans": 60, "rte": 0},
                                              data_dir=data_dir)
    es = manifest["eval_sets"]
    assert es["mnli/validation_matched"]["n"] == 100 and es["mnli/validation_matched"]["subsampled"]
    assert es["rte/validation"]["n"] == 277 and not es["rte/validation"]["subsampled"]
    assert es["hans/validation"]["demo_pool"] == "mnli/train"
    hans = data.read_prepared(tmp_path / es["hans/validation"]["file"])
    assert (hans.groupby("subcase").size() == 2).all()
    assert set(manifest["demo_pools"]) == {"mnli/train", "rte/train"}
    assert len(stats) == 5 and np.isclose(stats["majority_acc"].max(), stats["majority_acc"].max())
    with pytest.raises(data.DataError, match="01_data_prep"):
        data.load_manifest(tmp_path / "elsewhere")


def test_dev_split_is_held_out_of_the_pools(data_dir, tmp_path):
    """dev_n rows per pool, stratified by label, written apart and removed from the pool that is written: no
    demonstration or transfer query can be a development example; same rows for the same seed."""
    manifest, stats = data.prepare_study_data(tmp_path, eval_sizes={"mnli": 40, "hans": 30, "rte": 20},
                                              data_dir=data_dir, dev_n=50)
    full = {p: data.load_split(*p.split("/"), data_dir=data_dir) for p in ("mnli/train", "rte/train")}
    assert set(manifest["dev_sets"]) == {"mnli/train_dev", "rte/train_dev"}
    for name, info in manifest["dev_sets"].items():
        dev = data.read_split(tmp_path, info)
        pool_info = manifest["demo_pools"][info["held_out_of"]]
        pool = data.read_split(tmp_path, pool_info)
        assert len(dev) == 50 and abs(dev["label"].mean() - full[info["held_out_of"]]["label"].mean()) < 0.03
        assert not set(dev["idx"]) & set(pool["idx"]) and len(pool) + 50 == len(full[info["held_out_of"]])
        assert pool_info["dev_held_out"] == 50
    again, _ = data.prepare_study_data(tmp_path / "b", eval_sizes={"mnli": 40, "hans": 30, "rte": 20},
                                       data_dir=data_dir, dev_n=50)
    assert again["dev_sets"]["rte/train_dev"]["ids_digest"] == manifest["dev_sets"]["rte/train_dev"]["ids_digest"]
    assert "dev (held out of the pool)" in set(stats["role"])
    none, _ = data.prepare_study_data(tmp_path / "c", eval_sizes={"mnli": 40, "hans": 30, "rte": 20}, data_dir=data_dir)
    assert "dev_sets" not in none and len(data.read_split(tmp_path / "c", none["demo_pools"]["rte/train"])) == len(full["rte/train"])
    with pytest.raises(data.DataError, match="dev_n"):
        data.prepare_study_data(tmp_path / "d", eval_sizes={"rte": 20}, eval_sets=("rte/validation",),
                                data_dir=data_dir, dev_n=5000)


def test_llmft_out_of_domain_grid_mnli_mismatched_qqp_and_paws(data_dir, tmp_path):
    """MNLI-mismatched (binary like MNLI), QQP (duplicate -> Yes) and PAWS-QQP (paraphrase -> Yes) load with
    llmft's label conventions; QQP's in-domain set is held out of its train subset (disjoint from the pool that
    is written); each training task's students are scored out of domain on the sets that name it."""
    mm = data.load_split("mnli_mismatched", "validation", data_dir)
    assert len(mm) == 3461 + 3240 and mm["label"].value_counts().to_dict() == {0: 3461, 1: 3240}  # 2 pairs repeated
    assert len(mm.attrs["duplicates"]) == 2
    q = data.load_split("qqp", "train", data_dir)
    assert q["label"].value_counts().to_dict() == {1: 6370, 0: 3629}
    assert set(q.loc[q["label"] == 0, "orig_label"]) == {"duplicate"}
    anli = {r: data.load_split("anli", f"dev_r{r}", data_dir) for r in (1, 2, 3)}  # binary like MNLI
    assert {r: len(a) for r, a in anli.items()} == {1: 667, 2: 667, 3: 798}
    assert set(anli[3].loc[anli[3]["label"] == 1, "orig_label"]) == {"contradiction"}
    paws = data.load_split("paws_qqp", "dev_and_test", data_dir)
    assert len(paws) == 671 and paws["label"].value_counts().to_dict() == {1: 481, 0: 190}  # 6 pairs repeated
    assert len(paws.attrs["duplicates"]) == 6
    assert set(paws.loc[paws["label"] == 0, "orig_label"]) == {"paraphrase"}
    sets = data.STUDY_EVAL_SETS + data.EXTRA_EVAL_SETS
    manifest, stats = data.prepare_study_data(tmp_path, sets, {"mnli": 40, "hans": 30, "rte": 20, "qqp": 100,
                                                               "mnli_mismatched": 40}, data_dir=data_dir, dev_n=20)
    heldout = data.read_split(tmp_path, manifest["eval_sets"]["qqp/heldout"])
    pool = data.read_split(tmp_path, manifest["demo_pools"]["qqp/train"])
    assert len(heldout) == 100 and not set(heldout["idx"]) & set(pool["idx"])
    assert len(pool) == 9999 - 100 - 20 and manifest["eval_sets"]["qqp/heldout"]["held_out_of"] == "qqp/train"
    assert manifest["eval_sets"]["paws_qqp/dev_and_test"]["demo_pool"] == "qqp/train"
    assert manifest["eval_sets"]["mnli_mismatched/validation"]["demo_pool"] == "mnli/train"
    assert data.student_eval_sets(manifest, "mnli") == ["mnli/validation_matched", "hans/validation",
                                                        "mnli_mismatched/validation"]
    assert data.student_eval_sets(manifest, "qqp") == ["qqp/heldout", "paws_qqp/dev_and_test"]
    assert data.student_eval_sets(manifest, "rte") == ["rte/validation", "hans/validation"]
    assert data.student_eval_sets(manifest, "rte", out_of_domain=False) == ["rte/validation"]
    with pytest.raises(data.DataError, match="give it a size"):
        data.prepare_study_data(tmp_path / "b", ("qqp/heldout",), {}, data_dir=data_dir)
    # the sweeps over that grid, on a tiny model: ICL on every set with its own pool's demonstrations; MNLI
    # students scored on MNLI, HANS and MNLI-mismatched; QQP students (and a QQP teacher ensemble) on QQP and PAWS
    from llmft_utils import distill, models
    from llmft_utils.study import cd_sweep, icl_sweep

    small = tmp_path / "small"
    data.prepare_study_data(small, sets, {"mnli": 8, "hans": 30, "rte": 8, "qqp": 8, "mnli_mismatched": 8},
                            data_dir=data_dir)
    manifest = data.load_manifest(small)
    for es in list(manifest["eval_sets"]):  # PAWS and HANS cut to 8 rows to keep the test fast
        f = small / manifest["eval_sets"][es]["file"]
        if manifest["eval_sets"][es]["n"] > 8:
            data.write_jsonl(data.read_prepared(f).head(8), f)
            manifest["eval_sets"][es].update(sha256=data.file_sha256(f), n=8)
    (small / "manifest.json").write_text(__import__("json").dumps(manifest))
    tok = models.tiny_tokenizer()
    lm = models.wrap(models.tiny_model("llama", tok, max_positions=4096), tok, name="tiny-llama")
    rows = icl_sweep.run_sweep(lm, small, ICLPlan("gpt-3", [0, 2], [0]), EvalOptions(progress=False))
    assert len(rows) == 2 * 6 and (rows["n_eval"] == 8).all()
    pools = rows.set_index(rows["task"] + "/" + rows["split"])["demo_pool"]
    assert pools["paws_qqp/dev_and_test"].iloc[0] == "qqp/train" and pools["mnli_mismatched/validation"].iloc[0] == "mnli/train"
    cd = cd_sweep.run_cd_sweep(lm, small, CDPlan("gpt-3", ["mnli", "qqp"], [2], [0], 8, 0, distill.DistillConfig(target="verbalizer", epochs=1, batch_size=4), 1, ensemble=EnsembleSpec(m=2, ks=[2], tasks=["qqp"])), EvalOptions(progress=False))
    sets_of = cd.groupby(["method", "train_task"])["task"].apply(list).to_dict()
    assert sets_of[("cd", "mnli")] == ["mnli", "hans", "mnli_mismatched"]
    assert sets_of[("cd", "qqp")] == sets_of[("cd_ensemble", "qqp")] == sets_of[("icl_ensemble", "qqp")] == ["qqp", "paws_qqp"]
    assert (cd.loc[cd["task"] != cd["train_task"], "in_domain"] == False).all()  # noqa: E712


def test_icl_and_cd_sweeps_run_at_k_1(tmp_path):
    """k = 1 end to end on a toy model: an ICL row with one demonstration, and a CD student taught by it."""
    import toy_data

    from llmft_utils import distill
    from llmft_utils.study import cd_sweep, icl_sweep

    lm, out = toy_data.results_folder(tmp_path, n=8, max_positions=512, n_pool=40)
    rows = icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0, 1], [3]), EvalOptions(progress=False))
    one = rows[rows["k"] == 1].iloc[0]
    assert len(str(one["demo_ids"]).split(";")) == 1 and one["n_eval"] == 8
    cd = cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [1], [3], 8, 0, distill.DistillConfig(target="verbalizer", epochs=1, batch_size=4), 1), EvalOptions(progress=False))
    assert len(cd) == 1 and cd["k"].item() == 1 and cd["teacher_same_demos"].item()


def test_rows_from_another_pool_are_never_reused(tmp_path):
    """The demonstration pool's digest is in every ICL key at k > 0 and in every student key: after the pool
    changes (same ids, one word of every premise edited), the ICL run at k = 2 and the CD and PBFT students
    run again instead of being skipped as done; the zero-shot row, which draws nothing from the pool, is kept."""
    import toy_data

    from llmft_utils import distill
    from llmft_utils.study import cd_sweep, icl_sweep

    lm, out = toy_data.results_folder(tmp_path, n=6, max_positions=512, n_pool=30)
    icl_plan, ev = ICLPlan("gpt-3", [0, 2], [0]), EvalOptions(progress=False)
    cd_plan = CDPlan("gpt-3", ["toy"], [2], [0], 6, 2, distill.DistillConfig(target="verbalizer", epochs=1, batch_size=4), 1)
    first = set(icl_sweep.run_sweep(lm, out, icl_plan, ev)["run_key"])
    first_cd = set(cd_sweep.run_cd_sweep(lm, out, cd_plan, ev)["run_key"])
    assert len(first) == 2 and len(first_cd) == 2
    pool_file = out / "prepared/toy__train.jsonl"
    pool = data.read_prepared(pool_file)
    data.write_jsonl(pool.assign(premise="a " + pool["premise"]), pool_file)
    second = icl_sweep.run_sweep(lm, out, icl_plan, ev)
    second_cd = cd_sweep.run_cd_sweep(lm, out, cd_plan, ev)
    assert set(second["run_key"]) & first == {second.loc[second["k"] == 0, "run_key"].item()}
    assert not set(second_cd["run_key"]) & first_cd and len(second_cd) == 2
    assert len(pd.read_csv(out / "icl.csv")) == 3 and len(pd.read_csv(out / "cd.csv")) == 4  # the old rows stay


def test_repeated_pairs_are_dropped_counted_and_never_reach_a_pool_dev_split_or_prompt(tmp_path):
    """A pair repeated within a file is dropped (first copy kept) and listed with file:line; a pool row with
    the pair of an evaluation row is dropped from the pool and listed; so the development split has no twin
    in the pool, and no demonstration set holds a pair twice. Tabs, newlines and C1 mojibake (GLUE's RTE has
    it) stay allowed."""
    rows = [{"idx": i, "premise": f"Premise number {i} here.", "hypothesis": f"Hypothesis {i}.",
             "label": "entailment" if i % 2 else "not_entailment"} for i in range(60)]
    train = rows + [{**rows[3], "idx": 100, "premise": rows[3]["premise"] + "  "},  # the same pair (whitespace)
                    {**rows[8], "idx": 101}, {"idx": 102, "premise": "Twin of\tvalidation row.",
                                              "hypothesis": "It is \u00e2\u0080\u0099 here.", "label": "entailment"}]
    val = [{"idx": 0, "premise": "Twin of\tvalidation row.", "hypothesis": "It is \u00e2\u0080\u0099 here.",
            "label": "entailment"}, {"idx": 1, "premise": "Another.", "hypothesis": "Fine.", "label": "not_entailment"}]
    _write(tmp_path, "rte/train.jsonl", [json.dumps(r) for r in train])
    _write(tmp_path, "rte/validation.jsonl", [json.dumps(r) for r in val])
    tr = data.load_split("rte", "train", tmp_path)
    assert len(tr) == 61 and [d["idx"] for d in tr.attrs["duplicates"]] == [100, 101]
    assert tr.attrs["duplicates"][0]["at"].endswith("train.jsonl:61") and tr.attrs["duplicates"][0]["first"].endswith(":4")
    out = tmp_path / "out"
    manifest, _ = data.prepare_study_data(out, eval_sets=("rte/validation",), data_dir=tmp_path, dev_n=20)
    pool_info = manifest["demo_pools"]["rte/train"]
    assert pool_info["duplicates_dropped"] == 2 and pool_info["duplicates"][1] == {
        "at": "rte/train.jsonl:62", "first": "rte/train.jsonl:9", "idx": 101}  # relative to the data directory
    assert pool_info["eval_twins_removed"] == 1 and pool_info["eval_twins"] == [
        {"at": "rte/train.jsonl:63", "idx": 102, "twin_in": "rte/validation"}]
    assert manifest["eval_sets"]["rte/validation"]["duplicates_dropped"] == 0
    pool = data.read_split(out, pool_info)
    dev = data.read_split(out, manifest["dev_sets"]["rte/train_dev"])
    ev = data.read_split(out, manifest["eval_sets"]["rte/validation"])
    keys = lambda f: {data.pair_key(p, h) for p, h in zip(f["premise"], f["hypothesis"])}  # noqa: E731
    assert len(pool) + len(dev) == 60 and not keys(pool) & keys(dev) and not keys(pool) & keys(ev)
    assert len(keys(pool)) == len(pool)
    for seed in range(20):  # every row drawn: no pair twice
        d = data.sample_demonstrations(pool, 40, seed)
        assert len(keys(d)) == 40
    twice = pd.concat([pool, pool.assign(idx=pool["idx"] + 1000)], ignore_index=True)  # not through load_split
    with pytest.raises(data.DataError, match="same \\(premise, hypothesis\\) pair more than once"):
        data.sample_demonstrations(twice, 60, 0)


def test_sizes_the_pools_cannot_supply_are_refused_from_the_manifest_alone(data_dir, tmp_path, monkeypatch):
    """ensemble_m, n_transfer and k against the prepared pools' counts: refused right after notebook 01 by
    the pipeline (no model loaded, no ICL row written) and in a notebook's first cell."""
    from llmft_utils import params, pipeline

    manifest, _ = data.prepare_study_data(tmp_path, eval_sizes={"mnli": 40, "hans": 30, "rte": 20},
                                          data_dir=data_dir, dev_n=16)
    ok = {**pipeline.PROFILES["smoke"]}
    assert data.size_checks(manifest, ok) == []
    errs = data.size_checks(manifest, {**ok, "ensemble_m": 2000})
    assert len(errs) == 1 and errs[0].startswith("ensemble_m: 2000 disjoint sets of k=4 for mnli") and "use ensemble_m <=" in errs[0]
    rte_n = manifest["demo_pools"]["rte/train"]["n"]
    errs = data.size_checks(manifest, {**ok, "n_transfer": rte_n})
    assert [e.split(" for ")[1][:3] for e in errs] == ["rte"] and f"use n_transfer <= {rte_n - 4}" in errs[0]
    assert data.size_checks(manifest, {**ok, "ks": [0, 4, 100_000]})[0].startswith("ks: k=100000")
    # a notebook's first cell (params.validate_namespace) reads the manifest of its results folder
    with pytest.raises(params.ParameterError, match="cannot supply:\n  - ensemble_m: 2000"):
        params.validate_namespace({"results_dir": str(tmp_path), "profile": "smoke", "model": "random:opt-125m",
                                   **{k: ok[k] for k in ("cd_tasks", "ks", "cd_ks", "n_transfer", "ensemble_ks",
                                                         "ensemble_tasks")}, "ensemble_m": 2000})
    # the pipeline: after notebook 01 (here its data preparation alone), before 02 loads a model
    ran = []

    def fake_run(src, dest, p):
        ran.append(src.name)
        if src.name.startswith("01"):
            data.prepare_study_data(p["results_dir"], eval_sizes={"mnli": 40, "hans": 30, "rte": 20}, data_dir=data_dir)
        return 0.1

    monkeypatch.setattr(pipeline, "run_notebook", fake_run)
    out = tmp_path / "run"
    assert pipeline.run_profile("smoke", {"results_dir": str(out), "ensemble_m": 2000}) == 2
    assert ran == ["01_data_prep.ipynb"] and not (out / "icl.csv").exists()
    assert "ensemble_m: 2000" in json.loads((out / "run_manifest.json").read_text())["stopped"]
