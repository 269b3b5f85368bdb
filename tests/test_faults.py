"""Faults a new user meets: bad values, bad data, bad state, no network, a killed run. Each test asserts the
error text and that nothing partial is left behind (files, rows, predictions). Numbers in the comments
refer to the items of the reliability issue; prefix-reuse exactness (1) is in test_prefix_exact.py, the
teacher cache (3) and distributed stopping (7) in test_faults_distill.py."""
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import toy_data

from llmft_utils import data, hub, models, params, patterns, pipeline, store
from llmft_utils.analysis import tables
from llmft_utils.study import icl_sweep
from llmft_utils.study.plan import CDPlan, EvalOptions, ICLPlan

GPT3 = patterns.get_pattern("gpt-3")
SMOKE_SIZES = {"mnli": 40, "rte": 20, "hans": 30}


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ----------------------------------------------------------------------------- 2. skipped evaluations

def test_all_skipped_run_is_recorded_as_skipped_not_zero(tmp_path):
    lm, out = toy_data.results_folder(tmp_path)
    rows = icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0, 4], [0]), EvalOptions(on_too_long="skip", progress=False))
    r = rows.set_index("k").loc[4]
    assert r["n_eval"] == 0 and r["n_skipped_too_long"] == 6
    assert np.isnan(r["score_acc"]) and np.isnan(r["majority_acc"]) and np.isnan(r["score_acc_lo"])
    assert rows.set_index("k").loc[0, "n_eval"] == 6  # the zero-shot prompts fit and are scored
    summary = tables.summary_table(tables.unify(rows))
    assert list(summary["k"]) == [0], "a run that evaluated nothing must stay out of the summary"
    kept, skipped = tables.evaluated(tables.unify(rows))
    assert list(skipped["k"]) == [4] and list(kept["k"]) == [0]


# ----------------------------------------------------------------------------- 4. checks before work

def test_bad_values_all_reported_before_any_model_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "res"
    t0 = time.perf_counter()
    rc = pipeline.main(["--profile", "smoke", "--set", f"results_dir={out}", "--set", "pattern=gpt3",
                        "--set", "ood_train_tasks=['MNLI','RTE']", "--set", "ks=[0, -3]", "--set", "lr=-1",
                        "--set", "model=no-such-org/no-such-model", "--set", "on_too_long=truncate"])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and took < 5, (rc, took)
    for text in ("nothing was run", "8 invalid parameters", "needs ICL runs for k=[4]", "did you mean 'gpt-3'", "'MNLI' is not one of",
                 "did you mean 'mnli'", "ks[1]: -3 must be >= 0", "lr: -1 must be > 0", "no-such-org/no-such-model",
                 "on_too_long: 'truncate'"):
        assert text in err, (text, err)
    assert _files(out) == []


def test_cli_values_take_the_parameter_type():
    assert params.coerce_cli("force", "false") is False and params.coerce_cli("force", "True") is True
    assert params.coerce_cli("seeds", "0") == [0] and params.coerce_cli("ks", "[0, 4]") == [0, 4]
    assert params.coerce_cli("pattern", "gpt-3") == "gpt-3" and params.coerce_cli("lr", "3e-5") == 3e-5
    assert params.coerce_cli("model", "facebook/opt-125m") == "facebook/opt-125m"
    with pytest.raises(params.ParameterError, match="force: expected bool, got str 'false'"):
        params.validate({"force": "false"})  # a notebook user writing the string gets an error, not truthiness
    with pytest.raises(params.ParameterError, match=r"seeds: expected a list of ints, got int 0 \(e.g. seeds=\[0\]\)"):
        params.validate({"seeds": 0})


def test_profiles_notebooks_and_spec_agree():
    spec = set(params.spec())
    for name, prof in pipeline.PROFILES.items():
        assert set(prof) == spec, (name, set(prof) ^ spec)
        params.validate(dict(prof, results_dir=""), check_model=False, notebooks=pipeline.NOTEBOOKS)
    nb_names = set().union(*(pipeline.notebook_parameters(store.repo_root() / "notebooks" / n) for n in pipeline.NOTEBOOKS))
    assert nb_names == spec


def test_notebook_first_cell_validates_before_the_model(tmp_path):
    ns = {"profile": "smoke", "results_dir": str(tmp_path / "r"), "model": "smollm2-135m", "pattern": "GPT-3",
          "ks": [0, 4], "seeds": "0", "batch_size": 0, "device": "gpu", "In": [], "_": None}
    with pytest.raises(params.ParameterError) as e:
        params.validate_namespace(ns)
    msg = str(e.value)
    assert "4 invalid parameters" in msg and "did you mean 'gpt-3'" in msg and "batch_size: 0 must be >= 1" in msg
    assert "device: 'gpu' is not auto, cpu, cuda or cuda:N" in msg
    for name in ("01_data_prep.ipynb", "02_icl_baselines.ipynb", "03_context_distillation.ipynb", "04_analysis.ipynb"):
        nb = nbformat.read(store.repo_root() / "notebooks" / name, as_version=4)
        first = next(c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
        assert "params.validate_namespace(globals()" in first, name
        assert first.index("validate_namespace") < first.find("load_model") or "load_model" not in first, name


def test_unwritable_results_folder_fails_fast_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = pipeline.main(["--profile", "smoke", "--set", f"results_dir={blocker / 'res'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"the results folder {blocker / 'res'} is not writable" in err
    assert _files(tmp_path) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(PermissionError, match="is not writable"):
        store.ensure_writable(ro)


@pytest.mark.parametrize("sub", ["prepared", "predictions", "teacher_cache", "executed", "figures", "students",
                                 "trackers"])
def test_every_output_subfolder_is_proved_writable(tmp_path, monkeypatch, sub):
    """Every folder the study writes into is probed before any work (as root too: the write itself is made to
    fail for the one subfolder, where chmod would not stop root)."""
    (tmp_path / "res" / sub).mkdir(parents=True)
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.parent.name == sub:
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(PermissionError, match=f"the results folder {tmp_path / 'res' / sub} is not writable"):
        store.ensure_writable(tmp_path / "res")


def test_sweep_checked_whole_before_the_first_run(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(pipeline, "run_profile", lambda *a, **k: ran.append(a) or 0)
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps({"profile": "smoke", "runs": [{"pattern": "minimal"}, {"patern": "gpt-3"},
                                                               {"ks": [0, -5]}]}))
    rc = pipeline.main(["--sweep", str(sweep), "--set", f"results_dir={tmp_path / 'res'}"])
    err = capsys.readouterr().err
    assert rc == 2 and ran == []
    assert "run01: 1 invalid parameter" in err and "patern: unknown parameter (did you mean 'pattern'?)" in err
    assert "run02" in err and "ks[1]: -5 must be >= 0" in err
    # --profile wins over the file's own profile (sweeps/patterns.json --profile full: the whole llmft grid)
    sweep.write_text(json.dumps({"profile": "smoke", "runs": [{"pattern": "minimal"}]}))
    assert pipeline.main(["--sweep", str(sweep), "--profile", "full", "--set", f"results_dir={tmp_path / 'res'}"]) == 0
    assert ran[-1][0] == "full" and pipeline.main(["--sweep", str(sweep), "--set", f"results_dir={tmp_path}"]) == 0
    assert ran[-1][0] == "smoke"


def test_cd_plan_needs_its_icl_runs():
    with pytest.raises(params.ParameterError, match=r"needs ICL runs for k=\[16\]"):
        params.validate({"ks": [0, 4], "cd_ks": [4, 16]}, notebooks=pipeline.NOTEBOOKS)
    with pytest.raises(params.ParameterError, match=r"needs ICL runs for k=\[8\]"):  # an ensemble's set 0 is that run
        params.validate({"ks": [0, 4], "cd_ks": [4], "ensemble_m": 2, "ensemble_ks": [8]}, notebooks=pipeline.NOTEBOOKS)
    params.validate({"ks": [0, 4], "cd_ks": [4], "ensemble_m": 0, "ensemble_ks": [8]}, notebooks=pipeline.NOTEBOOKS)


def test_ensemble_and_task_grid_parameters_are_checked_together():
    bad = {"ensemble_m": 1, "ensemble_ks": [], "extra_eval_sets": ["qqp/heldout", "qqp/validation"], "qqp_eval_n": 0,
           "cd_tasks": ["mnli", "qqp"], "ensemble_combine": "median"}
    with pytest.raises(params.ParameterError) as e:
        params.validate(bad, check_model=False)
    for text in ("ensemble_m: 1 set is no ensemble", "ensemble_ks: empty while ensemble_m=1", "choose one QQP in-domain set",
                 "qqp_eval_n: qqp/heldout is drawn", "ensemble_combine: 'median' is not one of"):
        assert text in str(e.value), (text, str(e.value))
    with pytest.raises(params.ParameterError, match="qqp needs an in-domain QQP set"):
        params.validate({"cd_tasks": ["qqp"], "extra_eval_sets": []}, check_model=False)
    params.validate({k: v for k, v in pipeline.PROFILES["full"].items() if k != "results_dir"}, check_model=False,
                    notebooks=pipeline.NOTEBOOKS)


def test_cd_sweep_checks_its_icl_runs_before_training(tmp_path, monkeypatch):
    from llmft_utils import distill
    from llmft_utils.study import cd_sweep

    lm, out = toy_data.results_folder(tmp_path, max_positions=512)
    icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0, 4], [0]), EvalOptions(progress=False))  # no k=2 teacher, no seed 1
    monkeypatch.setattr(distill.training, "train_student", lambda *a, **k: pytest.fail("a student was trained"))
    monkeypatch.setattr(distill.teacher, "teacher_targets", lambda *a, **k: pytest.fail("a teacher was run"))
    cfg = distill.DistillConfig(target="verbalizer", epochs=1)
    with pytest.raises(FileNotFoundError, match=r"3 ICL runs .*: toy/validation k=2 seed=0, toy/validation k=2 "
                                                r"seed=1, toy/validation k=4 seed=1"):
        cd_sweep.run_cd_sweep(lm, out, CDPlan("gpt-3", ["toy"], [2, 4], [0, 1], 4, 0, cfg, 1), EvalOptions(progress=False))
    assert not (out / "cd.csv").exists() and not (out / "teacher_cache").exists()


# ----------------------------------------------------------------------------- 5. half-written state

@pytest.fixture()
def bad_mirror(tmp_path, data_dir):
    """A copy of the data mirror whose RTE validation file has a bad label on line 11."""
    m = tmp_path / "mirror"
    for sub in ("rte", "mnli", "hans"):
        shutil.copytree(data_dir / sub, m / sub)
    path = m / "rte" / "validation.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[10])
    rec["label"] = "maybe"
    lines[10] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    return m


def test_data_error_names_file_line_and_leaves_previous_state(tmp_path, data_dir, bad_mirror):
    out = tmp_path / "res"
    manifest, _ = data.prepare_study_data(out, eval_sizes=SMOKE_SIZES, data_dir=data_dir)
    before = {p: (out / p).read_bytes() for p in _files(out) if (out / p).is_file()}
    with pytest.raises(data.DataError, match=r"rte/validation.jsonl:11 \(idx=\d+\): label 'maybe'"):
        data.prepare_study_data(out, eval_sizes=SMOKE_SIZES, data_dir=bad_mirror)
    after = {p: (out / p).read_bytes() for p in _files(out) if (out / p).is_file()}
    assert after == before, "a failed preparation must leave the previous prepared/ and manifest untouched"
    fresh = tmp_path / "fresh"
    with pytest.raises(data.DataError):
        data.prepare_study_data(fresh, eval_sizes=SMOKE_SIZES, data_dir=bad_mirror)
    assert _files(fresh) == [], "nothing half-written in a new folder"


def test_failure_while_writing_keeps_the_previous_prepared_folder(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "res"
    data.prepare_study_data(out, eval_sizes=SMOKE_SIZES, data_dir=data_dir)
    before = {p: (out / p).read_bytes() for p in _files(out) if (out / p).is_file()}
    real, calls = data.write_jsonl, []

    def failing(df, path):  # the disk fills up on the third file
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(df, path)
    monkeypatch.setattr(data, "write_jsonl", failing)
    with pytest.raises(OSError, match="No space left"):
        data.prepare_study_data(out, eval_sizes={"mnli": 60, "rte": 30, "hans": 60}, data_dir=data_dir)
    after = {p: (out / p).read_bytes() for p in _files(out) if (out / p).is_file()}
    assert after == before, "prepared/ and the manifest are the previous complete set, with no temporary folder"


def test_prepared_file_changed_after_manifest_is_refused(tmp_path, data_dir):
    out = tmp_path / "res"
    manifest, _ = data.prepare_study_data(out, eval_sizes=SMOKE_SIZES, data_dir=data_dir)
    info = manifest["eval_sets"]["rte/validation"]
    assert len(data.read_split(out, info)) == 20
    with open(out / info["file"], "a") as f:
        f.write(json.dumps({"idx": 999999, "premise": "x", "hypothesis": "y", "label": 0}) + "\n")
    with pytest.raises(data.DataError, match="does not match manifest.json"):
        data.read_split(out, info)


def _append_many(path, who, n):
    t = store.ResultTable(path)
    for i in range(n):
        t.append([{"run_key": f"{who}-{i}", "v": i}])


def test_concurrent_table_writers_lose_no_rows(tmp_path):
    path = tmp_path / "icl.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w, 25)) for w in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    df = store.ResultTable(path).read()
    assert len(df) == 75 and df["run_key"].is_unique
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_writer_uses_unique_names_and_fsyncs(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    seen = []
    data.write_jsonl(pd.DataFrame({"a": [1, 2]}), tmp_path / "x.jsonl")
    store.atomic_write(tmp_path / "y.txt", lambda tmp: seen.append(tmp.name) or tmp.write_text("1"))
    store.atomic_write(tmp_path / "y.txt", lambda tmp: seen.append(tmp.name) or tmp.write_text("2"))
    assert len(synced) >= 4  # file and folder, each write
    assert seen[0] != seen[1] and all(n.startswith(".y.txt.") and n.endswith(".tmp") for n in seen)
    with pytest.raises(ZeroDivisionError):
        store.atomic_write(tmp_path / "y.txt", lambda tmp: (tmp.write_text("partial"), 1 / 0))
    assert (tmp_path / "y.txt").read_text() == "2" and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- 6. offline

def test_unknown_hub_model_offline_fails_in_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub._probe.cache_clear()
    t0 = time.perf_counter()
    try:
        with pytest.raises(models.ModelError, match="could not load model 'no-such-org/no-such-model'"):
            models.load_model("no-such-org/no-such-model")
    finally:
        hub._probe.cache_clear()
    assert time.perf_counter() - t0 < 5


def test_data_mirror_found_without_the_makefile(monkeypatch, data_dir):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    if data.mirror_beside_checkout() is None:
        pytest.skip("no ../shared/data beside this checkout")
    assert data.resolve_data_dir() == (store.repo_root().parent / "shared" / "data").resolve()
    assert data.load_split("rte", "validation").attrs["source"].endswith("rte/validation.jsonl")


# ----------------------------------------------------------------------------- 7. a killed pipeline

def test_kernel_of_a_dead_pipeline_writes_nothing(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setenv(store.PIPELINE_PID_ENV, str(dead.pid))
    with pytest.raises(RuntimeError, match=f"the pipeline \\(pid {dead.pid}\\) .* has exited; not writing"):
        store.atomic_write_text(tmp_path / "row.csv", "x")
    assert _files(tmp_path) == []
    monkeypatch.setenv(store.PIPELINE_PID_ENV, str(os.getpid()))  # alive: writes as usual
    store.atomic_write_text(tmp_path / "row.csv", "x")
    assert _files(tmp_path) == ["row.csv"]


def _children(pid: int) -> set:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def test_killed_pipeline_takes_its_kernel_and_its_rows_along(tmp_path):
    target = tmp_path / "row.csv"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("path: str = ''", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import time\ntime.sleep(8)\nfrom llmft_utils import store\n"
                                  "store.atomic_write_text(path, 'a row')"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    src = tmp_path / "slow.ipynb"
    nbformat.write(nb, src)
    code = ("import os, sys; from pathlib import Path; from llmft_utils import pipeline, store\n"
            f"os.environ[store.PIPELINE_PID_ENV] = str(os.getpid())\n"
            f"pipeline.run_notebook(Path({str(src)!r}), Path({str(tmp_path / 'out.ipynb')!r}), {{'path': {str(target)!r}}})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=store.repo_root())
    deadline = time.time() + 60
    while not _children(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    kernels = _children(proc.pid)
    assert kernels, "the kernel did not start"
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    time.sleep(10)  # past the cell's sleep: a surviving kernel would have written by now
    assert not target.exists()
    assert not any(Path(f"/proc/{k}").exists() for k in kernels), "the kernel outlived the pipeline"
