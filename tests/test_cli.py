"""The command line: verbs, help with defaults, config files, and one source for every time estimate."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from llmft_utils import cli, pipeline, profiles, prompt_distill
from llmft_utils.store import repo_root

ROOT = repo_root()


@pytest.fixture
def ran(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run_profile", lambda *a, **k: calls.append((a, k)) or 0)
    return calls


def test_run_verb_is_the_bare_form(ran, tmp_path):
    args = ["--profile", "smoke", "--only", "01", "--set", f"results_dir={tmp_path}"]
    assert pipeline.main(["run", *args]) == 0 and pipeline.main(args) == 0
    assert len(ran) == 2 and ran[0] == ran[1] and ran[0][0][0] == "smoke"


@pytest.mark.parametrize("verb", list(pipeline.VERBS))
def test_every_verb_has_help_with_defaults(verb, capsys):
    with pytest.raises(SystemExit) as e:
        pipeline.main([verb, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: llmft-study")
    if verb != "profiles":
        assert "--config FILE" in text, verb
    if verb in ("distill", "compare"):
        assert "(default: " in text, verb


def test_top_help_lists_every_verb_and_distill_shows_the_study_recipe(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--help"])
    text = capsys.readouterr().out
    for verb in pipeline.VERBS:
        assert f"\n  {verb} " in text, verb
    with pytest.raises(SystemExit):
        pipeline.main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    default = profiles.PROFILES["default"]
    for flag, name, _ in prompt_distill.STUDY_FLAGS:  # every study flag has a help text and the study's default
        assert f"(study parameter {name})" in text, flag
    for flag, value in (("--target", default["target"]), ("--epochs", default["epochs"]), ("--lr", default["lr"]),
                        ("--batch-size", default["train_batch_size"]), ("--holdout", 0.2), ("--seed", 0)):
        chunk = text[text.index(f" {flag} "):]
        chunk = chunk[:chunk.index(" --", 3)]
        assert f"(default: {value})" in chunk, (flag, chunk)


def test_profiles_verb_equals_list_profiles_and_prints_host_and_date(capsys):
    assert pipeline.main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert pipeline.main(["--list-profiles"]) == 0 and capsys.readouterr().out == out
    for name, t in profiles.TIMINGS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert t.minutes() in line and t.host in line and t.date in line, line
    assert pipeline.main(["profiles", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["default"]["timing"]["notebooks_s"] == profiles.TIMINGS["default"].notebooks_s
    assert data["smoke"]["parameters"] == profiles.PROFILES["smoke"]


@pytest.mark.parametrize("name", ["smoke", "qwen"])
def test_timings_are_the_committed_manifests(name):
    """The measured times are the run manifests' wall time, host and date, not numbers typed in twice."""
    t = profiles.TIMINGS[name]
    manifest = json.loads((ROOT / t.source).read_text())
    assert manifest["profile"] == name and t.measured
    assert t.notebooks_s == manifest["wall_s"]
    assert t.host == manifest["provenance"]["hardware"]
    assert manifest["provenance"]["timestamp"].startswith(t.date)


def test_the_default_estimate_is_the_one_seed_runs_rows_scaled():
    """`default` trains in float32 since bf16 failed its flip bar; its time is estimated from a measured one-seed
    run of its grid (plus the RTE controls) on this kind of host: notebooks 01 and 04 and each notebook's overhead
    as measured, zero-shot once, ICL and the per-seed students three times, the MNLI ensemble as measured and the
    RTE ensemble scaled by RTE's ICL cost."""
    t = profiles.TIMINGS["default"]
    folder = ROOT / "results" / "reference-f32-seed0"
    m = json.loads((folder / "run_manifest.json").read_text())
    nb = {k: v["wall_s"] for k, v in m["notebooks"].items()}
    cd, icl = pd.read_csv(folder / "cd.csv"), pd.read_csv(folder / "icl.csv")

    def student(method, task):
        d = cd[(cd.method == method) & (cd.train_task == task)]
        return d["train_s"].fillna(0).iloc[0] + d["teacher_cache_s"].fillna(0).iloc[0] + d["wall_s"].sum()

    zs, k16 = icl[icl.k == 0].wall_s.sum(), icl[icl.k == 16].wall_s.sum()
    every = sum(student(*x) for x in cd[["method", "train_task"]].drop_duplicates().itertuples(index=False))
    per_seed = sum(student(*x) for x in [("cd", "mnli"), ("cd_self", "mnli"), ("cd_shuffled", "mnli"), ("pbft", "mnli"),
                                         ("cd", "rte"), ("pbft", "rte")])
    rte = icl[(icl.task == "rte") & (icl.k == 16)].wall_s.iloc[0] / icl[(icl.task == "mnli") & (icl.k == 16)].wall_s.iloc[0]
    ens_mnli = student("icl_ensemble", "mnli") + student("cd_ensemble", "mnli")
    ens_rte = student("icl_ensemble", "mnli") * rte + student("cd", "rte") \
        + cd[cd.method == "cd_ensemble"].teacher_cache_s.iloc[0] * rte
    est = nb["01_data_prep.ipynb"] + nb["04_analysis.ipynb"] + (nb["02_icl_baselines.ipynb"] - zs - k16) + zs + 3 * k16 \
        + (nb["03_context_distillation.ipynb"] - every) + 3 * per_seed + ens_mnli + ens_rte
    assert not t.measured and t.notebooks_s == pytest.approx(est, abs=0.5)
    assert m["parameters"]["mixed_precision"] == profiles.PROFILES["default"]["mixed_precision"] == "no"
    assert t.host.startswith(m["provenance"]["hardware"].split(" x")[0]) and m["provenance"]["timestamp"].startswith(t.date)


def test_every_quoted_time_comes_from_the_profiles(capsys):
    readme = (ROOT / "README.md").read_text()
    study = next(line for line in readme.splitlines() if line.startswith("make study"))
    test = next(line for line in readme.splitlines() if line.startswith("make test "))
    default, smoke, suite = profiles.TIMINGS["default"], profiles.TIMINGS["smoke"], profiles.TEST_SUITE
    assert f"{default.minutes()} on 2 CPU cores with set-up, {'measured' if default.measured else 'estimated'} " \
        f"{default.date}" in study
    assert f"{default.minutes()} with set-up" in readme.split("**Time budget of `default`")[1][:900]
    assert f"{suite.minutes()} with set-up: {suite.notebooks_s:.0f} s on a clean clone" in test and suite.date in test
    makefile = (ROOT / "Makefile").read_text()
    smoke_line = next(line for line in makefile.splitlines() if line.startswith("smoke:"))
    assert f"{smoke.notebooks_s:.0f} s of notebooks, measured {smoke.date}" in smoke_line
    dev = (ROOT / "docs" / "development.md").read_text()
    assert f"{smoke.notebooks_s:.0f} s of notebooks, measured {smoke.date}" in dev
    with pytest.raises(SystemExit):
        pipeline.main([])
    err = capsys.readouterr().err
    assert f"smoke {smoke.minutes()}" in err and f"default {default.minutes()}" in err


def test_run_config_file_flags_and_parameters(ran, tmp_path, capsys):
    """A JSON or YAML file gives flags and notebook parameters by name; the command line wins over it."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"profile: smoke\nonly: ['01']\nforce: true\nks: [0]\nresults_dir: {tmp_path / 'r'}\n")
    assert pipeline.main(["run", "--config", str(cfg)]) == 0
    (profile, over, only, force), _ = ran[-1]
    assert (profile, over["ks"], only, force) == ("smoke", [0], ["01"], True)
    cfg_json = tmp_path / "run.json"
    cfg_json.write_text(json.dumps({"profile": "smoke", "ks": [0], "results_dir": str(tmp_path / "r")}))
    assert pipeline.main(["--config", str(cfg_json), "--profile", "default", "--set", "ks=[0,16]"]) == 0
    (profile, over, only, force), _ = ran[-1]
    assert (profile, over["ks"], only, force) == ("default", [0, 16], None, False)
    cfg_json.write_text(json.dumps({"profile": "smoke", "patern": "gpt-3", "results_dir": str(tmp_path / "r")}))
    assert pipeline.main(["--config", str(cfg_json)]) == 2  # a misspelt parameter: checked before any run
    assert "patern: unknown parameter" in capsys.readouterr().err and len(ran) == 2


@pytest.mark.parametrize("text, message", [
    ('{"epochs": 2', "not valid JSON"),
    ('[1, 2]', "expected an object of settings"),
    ('{"epoch": 2}', "unknown setting 'epoch'"),
    ('{"epochs": "two"}', "invalid int value: 'two'"),
    ('{"verbose": "yes"}', "'verbose' is a switch"),
    ('{"lr": [1, 2]}', "takes one value"),
])
def test_distill_config_errors_are_clear(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        prompt_distill.main(["--config", str(cfg), "--model", "m", "--prefix", "p", "--queries", "q", "--out", "o"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_distill_config_values_and_precedence(tmp_path):
    ap = prompt_distill.build_parser()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": "smollm2-135m", "prefix": "p.txt", "queries": "q.jsonl", "out": "o",
                               "batch-size": 4, "lr": 1e-4, "epochs": 3, "verbalizers": [" Yes", " No"]}))
    argv, rest = cli.with_config(ap, ["--config", str(cfg), "--epochs", "1"])
    a = ap.parse_args(argv)
    assert rest == {} and (a.batch_size, a.lr, a.epochs, a.model) == (4, 1e-4, 1, "smollm2-135m")
    assert a.verbalizers == [" Yes", " No"]
    with pytest.raises(cli.ConfigError, match="cannot read the config file"):
        cli.with_config(ap, ["--config", str(tmp_path / "missing.json")])
