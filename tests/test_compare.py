"""llmft-study compare: rows, examples and verdicts of two results folders; provenance and the cache key's runtime."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import toy_data

from llmft_utils import compare, data, distill, models, patterns, pipeline, probes, store
from llmft_utils.study import keys
from llmft_utils.study.plan import EvalOptions, ICLPlan

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference"


@pytest.fixture(scope="module")
def ref_copy(tmp_path_factory):
    """A copy of the committed reference's tables and prediction files (compare reads nothing else)."""
    dest = tmp_path_factory.mktemp("ref") / "a"
    (dest / "predictions").mkdir(parents=True)
    for name in ("icl.csv", "cd.csv", "run_manifest.json"):
        shutil.copy(REFERENCE / name, dest / name)
    for p in (REFERENCE / "predictions").glob("*.parquet"):
        shutil.copy(p, dest / "predictions" / p.name)
    return dest


def _clone(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _row_file(folder: Path, method: str, eval_set: str = "mnli/validation_matched", seed: int = 0) -> Path:
    runs = compare.load_runs(folder)
    r = runs[(runs["method"] == method) & (runs["eval_set"] == eval_set) & (runs["seed"] == seed)].iloc[0]
    return folder / r["predictions_file"]


def test_a_run_equals_itself_exactly(ref_copy):
    c = compare.compare(ref_copy, ref_copy, "exact")
    counts = c.counts()
    assert c.ok and counts["rows_compared"] == 46 and counts["predictions_changed"] == 0
    assert counts["max_dlogp_inference"] == 0.0 and counts["verdicts_changed"] == 0
    assert counts["verdicts_compared"] > 100  # every claim table's verdicts, recomputed from the rows
    assert "SAME within tolerance" in c.report()


def test_inference_rows_are_held_to_their_epsilon(ref_copy, tmp_path):
    b = _clone(ref_copy, tmp_path / "b")
    path = _row_file(b, "icl")
    p = pd.read_parquet(path)
    p.loc[3, "logp_label0"] += 5e-5  # within the cpu bound of 1e-4
    p.to_parquet(path)
    assert compare.compare(ref_copy, b, "cpu").ok and not compare.compare(ref_copy, b, "exact").ok
    p.loc[3, "logp_label0"] += 1e-3  # past it
    p.to_parquet(path)
    c = compare.compare(ref_copy, b, "cpu")
    assert not c.ok and len(c.rows_over) == 1 and c.rows_over.iloc[0]["kind"] == "inference"


def test_trained_rows_have_their_own_bound_and_noise_driven_rows_are_shown_not_gated(ref_copy, tmp_path):
    b = _clone(ref_copy, tmp_path / "b")
    cd, self_ = _row_file(b, "cd"), _row_file(b, "cd_self")
    p = pd.read_parquet(cd)
    p["logp_label1"] += 1e-3  # within the trained bound (2e-3), over the inference one
    p.to_parquet(cd)
    assert compare.compare(ref_copy, b, "cpu").ok
    s = pd.read_parquet(self_)
    s["logp_label1"] += 3.0  # the self-distillation control: rounding noise decides it (module docstring)
    s["pred"] = (s["logp_label1"] > s["logp_label0"]).astype(int)
    s.to_parquet(self_)
    c = compare.compare(ref_copy, b, "cpu")
    assert c.ok and c.counts()["max_dlogp_noise_driven"] == pytest.approx(3.0)
    assert not compare.compare(ref_copy, b, "exact").ok
    p["logp_label1"] += 5e-3
    p.to_parquet(cd)
    assert not compare.compare(ref_copy, b, "cpu").ok


def test_a_changed_verdict_fails_and_is_named(ref_copy, tmp_path):
    """One CD student's predictions replaced by its teacher's: the row moves and the transfer verdicts follow."""
    b = _clone(ref_copy, tmp_path / "b")
    student, teacher = _row_file(b, "cd"), _row_file(b, "icl")
    shutil.copy(teacher, student)
    c = compare.compare(ref_copy, b, "loose")  # rows are not gated for trained students here: only verdicts
    assert not c.ok and len(c.gated_verdicts_changed)
    assert set(c.gated_verdicts_changed["table"]) & {"transfer_checks", "distribution_checks", "calibrated_checks"}
    assert "changed verdicts" in c.report()


def test_missing_rows_fail(ref_copy, tmp_path):
    b = _clone(ref_copy, tmp_path / "b")
    cd = pd.read_csv(b / "cd.csv")
    cd.iloc[1:].to_csv(b / "cd.csv", index=False)
    c = compare.compare(ref_copy, b, "cpu")
    assert not c.ok and len(c.only_a) == 1 and not c.only_b


def test_cli_exit_status_table_and_json(ref_copy, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert pipeline.main(["compare", str(ref_copy), str(ref_copy), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rows: 46 compared, 0 over tolerance" in text and "SAME within tolerance" in text
    blob = json.loads(out.read_text())
    assert blob["ok"] and blob["counts"]["rows_compared"] == 46 and len(blob["verdicts"]) == blob["counts"]["verdicts_compared"]
    b = _clone(ref_copy, tmp_path / "b")
    path = _row_file(b, "zero-shot")
    p = pd.read_parquet(path)
    p["logp_label0"] -= 0.01
    p.to_parquet(path)
    assert pipeline.main(["compare", str(ref_copy), str(b)]) == 1
    assert "DIFFERENT" in capsys.readouterr().out
    assert pipeline.main(["compare", str(ref_copy), str(tmp_path / "nowhere")]) == 2


def test_provenance_names_the_kernels_and_threads():
    prov = store.provenance()
    for field in ("cpu_model", "cpu_capability", "blas", "onednn", "num_threads", "deterministic_algorithms",
                  "cudnn_deterministic", "isa_env", "gpu_name", "cuda", "cudnn", "torch", "transformers", "git_commit"):
        assert field in prov, field
    assert prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert prov["num_threads"] == torch.get_num_threads()
    assert probes.device_capability("cpu").startswith(prov["cpu_capability"])


def test_rows_carry_provenance_and_the_weights_hash(tmp_path):
    from llmft_utils.study import icl_sweep

    lm, out = toy_data.results_folder(tmp_path)
    rows = icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0], [0]), EvalOptions(progress=False))
    r = rows.iloc[0]
    assert r["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and r["num_threads"] == torch.get_num_threads()
    assert r["model_weights_sha256"] == models.weights_sha256(lm) and len(r["model_weights_sha256"]) == 64


def test_weights_hash_follows_the_weights(tiny_lms):
    tok = models.tiny_tokenizer()
    a = models.wrap(models.tiny_model("llama", tok, seed=0), tok)
    b = models.wrap(models.tiny_model("llama", tok, seed=0), tok)
    c = models.wrap(models.tiny_model("llama", tok, seed=1), tok)
    assert models.weights_sha256(a) == models.weights_sha256(b) != models.weights_sha256(c)
    d = models.wrap(models.tiny_model("llama", tok, seed=0), tok)
    with torch.no_grad():
        next(d.model.parameters()).view(-1)[0] += 1e-6  # one weight, one ulp-sized change
    assert models.weights_sha256(d) != models.weights_sha256(a)


def _other_capability() -> str:
    """A CPU capability that is not this host's (an AVX2-only host's own is "AVX2")."""
    return "AVX512" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "AVX2"


def test_teacher_cache_key_holds_weights_versions_and_capability(tiny_lms):
    ev, pool = toy_data.frames(4, 20)
    demos = data.sample_demonstrations(pool, 4, seed=0, exclude=ev)
    lm = tiny_lms["llama"]
    rt = distill.teacher_runtime(lm)
    assert set(rt) == {"weights_sha256", "torch", "transformers", "capability"}
    assert rt["capability"].startswith(torch.backends.cpu.get_cpu_capability())
    key = lambda runtime: distill.teacher_cache_key(distill.TeacherModel("tiny", "float32", "cpu", runtime), "rte", "gpt-3", 4,
                                                    0, demos, ev, distill.DistillConfig(target="verbalizer"))
    base = key(rt)
    assert key(dict(rt)) == base
    for field, other in (("weights_sha256", "0" * 64), ("torch", "2.99.0"), ("transformers", "5.99.0"),
                         ("capability", _other_capability())):
        assert key({**rt, field: other}) != base, field


def test_a_cache_from_another_capability_is_recomputed(tiny_lms, tmp_path, monkeypatch):
    """A teacher cache written under one CPU capability is not read under another (the key differs)."""
    ev, pool = toy_data.frames(4, 20)
    demos = data.sample_demonstrations(pool, 4, seed=0, exclude=ev)
    lm, cfg, pat = tiny_lms["llama"], distill.DistillConfig(target="verbalizer"), patterns.get_pattern("gpt-3")
    k1 = distill.teacher_cache_key(distill.TeacherModel.of(lm, "tiny"), "rte", "gpt-3", 4, 0, demos, ev, cfg)
    assert not distill.teacher_targets(lm, pat, demos, ev, cfg, distill.TeacherCache(tmp_path, k1))["cache_hit"]
    assert distill.teacher_targets(lm, pat, demos, ev, cfg, distill.TeacherCache(tmp_path, k1))["cache_hit"]
    monkeypatch.setattr(probes, "device_capability", lambda device: _other_capability())
    k2 = distill.teacher_cache_key(distill.TeacherModel.of(lm, "tiny"), "rte", "gpt-3", 4, 0, demos, ev, cfg)
    assert k2 != k1 and not distill.teacher_targets(lm, pat, demos, ev, cfg, distill.TeacherCache(tmp_path, k2))["cache_hit"]
    assert np.isfinite(distill.teacher_targets(lm, pat, demos, ev, cfg, distill.TeacherCache(tmp_path, k2))["logp"].numpy()).all()


def _as_float32_run(src: Path, dest: Path) -> Path:
    """``src`` as if its students had trained in float32: cfg_mixed_precision 'no' and another recipe digest in
    every student key (what a real float32 run's keys hold), predictions unchanged."""
    b = _clone(src, dest)
    cd = pd.read_csv(b / "cd.csv")
    student = cd["cfg_mixed_precision"].notna()
    cd.loc[student, "cfg_mixed_precision"] = "no"
    cd.loc[student, "run_key"] = cd.loc[student, "run_key"].map(lambda k: keys.with_recipe(k, "f32digest00"))
    cd.to_csv(b / "cd.csv", index=False)
    return b


def _flip(path: Path, n: int) -> None:
    p = pd.read_parquet(path)
    p.loc[p.index[:n], "pred"] = 1 - p.loc[p.index[:n], "pred"]
    p.to_parquet(path)


def test_with_recipe_replaces_the_recipe_digest_of_a_student_key():
    base = lambda recipe: keys.student_key_base("cd", "m", "mnli", "gpt-3", 16, 0, 64, recipe, "abc", "float32@cpu")  # noqa: E731
    assert keys.with_recipe(base("41af743ac0"), "other") == base("other")
    row = keys.eval_key(base("41af743ac0") + "|m4-prob", "mnli/validation_matched", "e0")
    assert keys.with_recipe(row, "other") == keys.eval_key(base("other") + "|m4-prob", "mnli/validation_matched", "e0")


def test_across_precision_matches_students_on_everything_but_the_field(ref_copy, tmp_path, capsys):
    b = _as_float32_run(ref_copy, tmp_path / "b")
    assert not len(compare.compare_rows(compare.load_runs(ref_copy), compare.load_runs(b), ref_copy, b,
                                        compare.TOLERANCES["loose"])[0].query("kind == 'trained'"))  # keys differ
    x = compare.compare_across(ref_copy, b, "mixed_precision")
    assert x.values == {"a": ["bf16"], "b": ["no"]} and not x.only_a and not x.only_b
    rates = x.rates()
    assert rates["inference"]["rows"] == 14 and rates["trained"]["rows"] == 26 and rates["noise"]["rows"] == 6
    assert rates["trained"]["flipped"] == 0 and x.within_bar
    # 3% of one CD row: the pooled rate stays far under 2%, the row under 5%: within; 6% of it: that row is over
    cd_row = _row_file(b, "cd")
    _flip(cd_row, 12)  # 12 of 400
    x = compare.compare_across(ref_copy, b, "mixed_precision")
    assert x.rates()["trained"]["flipped"] == 12 and x.rates()["trained"]["max_row_flip_rate"] == pytest.approx(0.03)
    assert x.within_bar
    p = pd.read_parquet(cd_row)
    p.loc[p.index[:24], "pred"] = 1 - pd.read_parquet(_row_file(ref_copy, "cd")).loc[p.index[:24], "pred"]
    p.to_parquet(cd_row)
    x = compare.compare_across(ref_copy, b, "mixed_precision")
    assert x.rates()["trained"]["max_row_flip_rate"] == pytest.approx(0.06) and not x.within_bar
    # the noise-driven self control is shown, not counted
    _flip(_row_file(b, "cd_self"), 200)
    assert compare.compare_across(ref_copy, b).rates()["noise"]["flipped"] == 200
    assert compare.compare_across(ref_copy, b).rates()["trained"]["flipped"] == 24
    # the CLI: exit 1 when not within the bar, 2 when the runs share the field's value, JSON written
    out = tmp_path / "x.json"
    assert pipeline.main(["compare", str(ref_copy), str(b), "--across", "mixed_precision", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "NOT within" in text and "bf16" in text
    assert json.loads(out.read_text())["within_bar"] is False
    assert pipeline.main(["compare", str(ref_copy), str(ref_copy), "--across", "mixed_precision"]) == 2
    assert pipeline.main(["compare", str(ref_copy), str(b), "--across", "no_such_field"]) == 2


F32 = REFERENCE.parent / "reference-f32-seed0"


@pytest.mark.skipif(not (F32 / "predictions").is_dir(), reason="no committed float32 run")
def test_the_committed_bf16_against_float32_measurement_is_its_files():
    """The measurement behind the profiles' float32 training (results/reproducibility/default_bf16_vs_float32.*)
    recomputes from the two committed runs, and the numbers the README and the docs quote are its numbers."""
    x = compare.compare_across(REFERENCE, F32, "mixed_precision")
    r = x.rates()
    assert (r["trained"]["rows"], r["trained"]["flipped"], r["trained"]["predictions"]) == (7, 173, 3040)
    assert r["inference"]["flipped"] == 0 and r["inference"]["predictions"] == 2437 and not x.within_bar
    stored = json.loads((REFERENCE.parent / "reproducibility" / "default_bf16_vs_float32.json").read_text())
    for kind, numbers in r.items():
        assert stored["rates"][kind] == pytest.approx(numbers), kind
    assert stored["within_bar"] is False
    pooled, worst = f"{r['trained']['flip_rate']:.1%}", f"{r['trained']['max_row_flip_rate']:.0%}"
    root = REFERENCE.parent.parent
    for doc in ("README.md", "docs/reproducibility.md", "docs/performance.md"):
        text = (root / doc).read_text()
        assert f"{r['trained']['flipped']} of {r['trained']['predictions']}" in text and pooled in text \
            and worst in text, doc


def test_across_another_recipe_field_reports_flips_without_a_bar(ref_copy, tmp_path, capsys):
    """--across lr: rows matched on everything but the lr, flips reported; the precision bar does not apply."""
    b = _clone(ref_copy, tmp_path / "b")
    cd = pd.read_csv(b / "cd.csv")
    student = cd["cfg_lr"].notna()
    cd.loc[student, "cfg_lr"] = cd.loc[student, "cfg_lr"] * 10
    cd.loc[student, "run_key"] = cd.loc[student, "run_key"].map(lambda k: keys.with_recipe(k, "lrdigest000"))
    cd.to_csv(b / "cd.csv", index=False)
    _flip(_row_file(b, "cd"), 40)
    x = compare.compare_across(ref_copy, b, "lr")
    assert x.bar is None and x.within_bar is None and x.rates()["trained"]["flipped"] == 40
    assert not x.only_a and not x.only_b
    assert pipeline.main(["compare", str(ref_copy), str(b), "--across", "lr"]) == 0
    out = capsys.readouterr().out
    assert "across lr" in out and "bar for a bf16" not in out
