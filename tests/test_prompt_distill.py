"""Distilling any prompt (llmft-study distill) on a tiny model: a student, its report and its controls."""
import json
from pathlib import Path

import pytest
import torch
import toy_data

from llmft_utils import data, distill, models, patterns, pipeline, prompt_distill

GPT3 = patterns.get_pattern("gpt-3")


def _teacher_model(tok):
    """A tiny random Llama (its answer depends on the prefix)."""
    return models.tiny_model("llama", tok, seed=3, max_positions=1024)


def test_distilled_prompt_student_beats_the_untrained_model_and_is_saved(tmp_path):
    tok = models.tiny_tokenizer()
    lm = models.wrap(_teacher_model(tok), tok, name="tiny")
    ev, pool = toy_data.frames(n_eval=120, n_pool=40)
    prefix = patterns.build_prefix(GPT3, data.sample_demonstrations(pool, 4, seed=0))
    (tmp_path / "demos.txt").write_text(prefix)
    lines = [json.dumps({"premise": p, "hypothesis": h}) for p, h in zip(ev.premise, ev.hypothesis)]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    cfg = distill.DistillConfig(target="verbalizer", epochs=6, lr=3e-3, batch_size=8, mixed_precision="no")
    r = prompt_distill.distill_prompt(lm, prefix, prompt_distill.read_queries(tmp_path / "q.jsonl"),
                                      tmp_path / "out", GPT3, cfg, holdout=0.25)
    h = r["heldout"]
    assert r["n_heldout"] == 30 and r["n_train"] == 90
    assert h["student_vs_teacher"]["kl"] < h["zeroshot_vs_teacher"]["kl"]
    assert h["student_vs_teacher"]["agreement"] > h["zeroshot_vs_teacher"]["agreement"]
    # the control for any agreement claim: this tiny teacher always says label 1, so a constant agrees fully
    assert h["constant_vs_teacher"]["agreement"] == max(h["teacher_label1_frac"], 1 - h["teacher_label1_frac"])
    # ... so no held-out set can tell a student from it: the report says so instead of claiming agreement
    assert not h["student_vs_constant"]["resolvable"] and "too few to tell any student" in r["warnings"][0]
    lo, hi = h["student_vs_teacher"]["agreement_ci95"]
    assert lo <= h["student_vs_teacher"]["agreement"] <= hi and hi - lo > 0.05
    assert "**Warning:**" in (tmp_path / "out" / "report.md").read_text()
    assert r["cost"]["tokens_per_query_teacher"] > r["cost"]["tokens_per_query_student"] + r["prefix_tokens"] - 1
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "student")
    assert all(p.dtype == torch.float32 for p in student.parameters())
    import os

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*")}
    assert modes["model.safetensors"] == 0o666 & ~mask, modes  # transformers leaves it 0600: owner-only
    assert set(modes.values()) <= {0o666 & ~mask, 0o777 & ~mask}, modes
    info = json.loads((tmp_path / "out" / "student" / "student.json").read_text())
    assert info["prefix"] == prefix and (tmp_path / "out" / "report.md").read_text().startswith("# Distilled prompt")


def test_versus_constant_tells_a_student_from_the_constant_only_when_the_set_can():
    import numpy as np

    def logp(labels):
        return np.log(np.eye(2)[labels] * 0.98 + 0.01)

    teacher = np.array([0, 1] * 10)
    perfect = prompt_distill.versus_constant(logp(teacher), logp(teacher))
    assert perfect["resolvable"] and perfect["p"] < 0.01 and perfect["only_student"] == 10
    constant = prompt_distill.versus_constant(logp(teacher), logp(np.zeros(20, int)))
    assert constant["p"] == 1.0
    few = prompt_distill.versus_constant(logp(np.array([0] * 15 + [1] * 5)), logp(np.array([0] * 15 + [1] * 5)))
    assert not few["resolvable"]  # 5 discordant queries at most: 2 * 0.5^5 > 0.05
    r = {"n_heldout": 20, "heldout": {"student_vs_constant": constant}}
    assert "not distinguishable from a constant answer" in prompt_distill.small_set_warning(r)
    assert prompt_distill.small_set_warning({"n_heldout": 20, "heldout": {"student_vs_constant": perfect}}) == ""


def test_topk_target_trains_on_the_teachers_top_tokens(tmp_path):
    tok = models.tiny_tokenizer()
    lm = models.wrap(_teacher_model(tok), tok, name="tiny")
    ev, pool = toy_data.frames(n_eval=24, n_pool=40)
    prefix = patterns.build_prefix(GPT3, data.sample_demonstrations(pool, 4, seed=0))
    queries = [{"premise": p, "hypothesis": h} for p, h in zip(ev.premise, ev.hypothesis)]
    cfg = distill.DistillConfig(epochs=3, lr=3e-3, batch_size=8, mixed_precision="no", target="topk", topk=5)
    r = prompt_distill.distill_prompt(lm, prefix, queries, tmp_path / "out", GPT3, cfg, holdout=0.25)
    assert r["recipe"]["target"] == "topk" and r["recipe"]["topk"] == 5
    assert r["loss_last"] < r["loss_first"]
    info = json.loads((tmp_path / "out" / "student" / "student.json").read_text())
    assert info["recipe"]["target"] == "topk"


def test_distill_command_refuses_bad_queries_before_loading_a_model(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("demo")
    (tmp_path / "q.jsonl").write_text('{"premise": "a", "hypothesis": "b"}\nnot json\n')
    rc = pipeline.main(["distill", "--model", "no-such/model", "--prefix", str(tmp_path / "p.txt"),
                        "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "q.jsonl:2: not JSON" in capsys.readouterr().err
    (tmp_path / "few.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="need at least 4"):
        prompt_distill.read_queries(tmp_path / "few.jsonl")


def test_distill_refuses_nulls_control_characters_an_empty_prefix_and_a_read_only_out_before_the_model(
        tmp_path, capsys, monkeypatch):
    from llmft_utils import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    good = "\n".join(json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}"}) for i in range(6)) + "\n"
    (tmp_path / "p.txt").write_text("A demonstration. Yes\n")
    (tmp_path / "q.jsonl").write_text(good)
    args = lambda **kw: ["distill", "--model", kw.get("model", "smollm2-135m"), "--prefix",  # noqa: E731
                         str(tmp_path / kw.get("prefix", "p.txt")), "--queries", str(tmp_path / kw.get("q", "q.jsonl")),
                         "--out", str(kw.get("out", tmp_path / "o"))]
    (tmp_path / "null.jsonl").write_text(good + '{"premise": null, "hypothesis": "h"}\n')
    assert pipeline.main(args(q="null.jsonl")) == 2
    assert "null.jsonl:7: 'premise' must be a string, got null" in capsys.readouterr().err
    (tmp_path / "ctl.jsonl").write_text('{"text": "\\u0000\\u0001\\u0007\\u001b"}\n' + good)
    assert pipeline.main(args(q="ctl.jsonl")) == 2 and "ctl.jsonl:1: 'text' holds the control character U+0000" in \
        capsys.readouterr().err
    assert pipeline.main(args(prefix="missing.txt")) == 2 and "--prefix" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    assert pipeline.main(args(prefix="empty.txt")) == 2 and "nothing to distil" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")  # an --out under a file cannot be written (as a read-only folder, even for root)
    assert pipeline.main(args(out=tmp_path / "a_file" / "student")) == 2 and "not writable" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _model_dir(tmp_path, max_positions=1024):
    tok = models.tiny_tokenizer()
    folder = tmp_path / "tiny"
    models.tiny_model("llama", tok, seed=3, max_positions=max_positions).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _inputs(tmp_path, prefix="The cat sat . question: A cat sat . Yes or No? answer: Yes\n\n", n=10):
    (tmp_path / "p.txt").write_text(prefix)
    ev, _ = toy_data.frames(n_eval=n)
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"premise": p, "hypothesis": h}) + "\n"
                                              for p, h in zip(ev.premise, ev.hypothesis)))
    return ["--prefix", str(tmp_path / "p.txt"), "--queries", str(tmp_path / "q.jsonl")]


def test_an_over_long_prefix_is_one_line_and_status_2_before_the_weights_load(tmp_path, capsys, monkeypatch):
    folder = _model_dir(tmp_path, max_positions=64)

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    capsys.readouterr()  # the tiny model's save bar
    rc = pipeline.main(["distill", "--model", str(folder), *_inputs(tmp_path, prefix="the cat sat on the mat . " * 40),
                        "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("[distill ")]  # not the progress lines
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "10 of 10 prompts exceed the model's context of 64 tokens" in err and "shorter prefix" in err
    assert not (tmp_path / "o").exists()
    # the same check, through the embedded model's tokenizer and context (8192), without its weights
    rc = pipeline.main(["distill", "--model", "smollm2-135m", *_inputs(tmp_path, prefix="the cat sat on the mat . " * 1500),
                        "--out", str(tmp_path / "o")])
    assert rc == 2 and "exceed the model's context of 8192 tokens" in capsys.readouterr().err


def test_a_second_run_into_a_locked_folder_is_refused_and_a_killed_run_leaves_nothing(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    folder, out = _model_dir(tmp_path), tmp_path / "o"
    args = ["distill", "--model", str(folder), *_inputs(tmp_path), "--out", str(out), "--epochs", "1"]
    # a run that holds the folder and has begun writing it, as a distill run does from before its model loads
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
from llmft_utils import store
with store.folder_lock({str(out)!r}, "distill run"), store.atomic_folder({str(out)!r}) as tmp:
    (tmp / "report.json").write_text("half")
    print("held", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        assert pipeline.main(args) == 2
        err = capsys.readouterr().err
        assert f"is being written by another distill run (pid {holder.pid}" in err and time.perf_counter() - t0 < 20
        assert not out.exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # killed mid-write: its temporary folder stays, named as such
        holder.wait()
    assert not out.exists() and len(list(tmp_path.glob(".o.*.tmp"))) == 1
    assert pipeline.main(args) == 0  # the lock died with its process; the stale temporary folder is cleared
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "student"]
    assert json.loads((out / "report.json").read_text())["n_train"] == 8
    assert not list(tmp_path.glob(".o.*.tmp")) and not list(tmp_path.glob(".o.*.old"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # a folder of other files is never replaced
    args[args.index(str(out))] = str(tmp_path / "other")
    assert pipeline.main(args) == 2 and "holds other files" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_run_that_fails_while_saving_leaves_the_earlier_output_whole(tmp_path, monkeypatch):
    tok = models.tiny_tokenizer()
    lm = models.wrap(_teacher_model(tok), tok, name="tiny")
    queries = [{"premise": p, "hypothesis": h} for p, h in zip(*toy_data.frames(n_eval=10)[0][["premise", "hypothesis"]].T.values)]
    cfg = distill.DistillConfig(target="verbalizer", epochs=1, lr=1e-3, batch_size=8, mixed_precision="no")
    out = tmp_path / "o"
    prompt_distill.distill_prompt(lm, "A demo . Yes\n\n", queries, out, GPT3, cfg)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(model, tokenizer, folder, info):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(distill, "save_student", broken)
    with pytest.raises(OSError, match="disk full"):
        prompt_distill.distill_prompt(lm, "Another demo . No\n\n", queries, out, GPT3, cfg)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.lock", "o"]


def test_the_shipped_examples_are_valid_inputs(tmp_path):
    """examples/distill: the config names only real flags, the queries parse, the prefix is demonstrations
    in the config's pattern, and the whole is accepted by the checks that run before the weights load."""
    from llmft_utils import cli
    from llmft_utils.store import repo_root

    root = repo_root() / "examples" / "distill"
    ap = prompt_distill.build_parser()
    argv, _ = cli.with_config(ap, ["--config", str(root / "config.yaml"), "--out", str(tmp_path / "o")])
    a = ap.parse_args(argv)
    a.prefix, a.queries = str(repo_root() / a.prefix), str(repo_root() / a.queries)
    prefix, queries, pattern, _ = prompt_distill.checked_inputs(a)
    assert len(queries) == 16 and all(set(q) == {"premise", "hypothesis"} for q in queries)
    blocks = prefix.split(pattern.separator)
    assert len(blocks) == 4 and all(b.endswith(pattern.verbalizers) for b in blocks)


def _fake_tensorboard(monkeypatch):
    """accelerate's ``tensorboard`` tracker replaced by one that writes each logged step as a JSON line to
    ``<logging_dir>/<run name>/events.jsonl`` and says it is installed (tensorboard is not a requirement of this
    kit): the wiring from ``--log-with`` to the files is the real one."""
    import accelerate.tracking
    import accelerate.utils
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import LoggerType

    class FakeBoard(GeneralTracker):
        name, requires_logging_directory = "tensorboard", True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            self.folder = Path(logging_dir) / run_name

        @property
        def tracker(self):
            return self

        def start(self):
            self.folder.mkdir(parents=True)
            self.events = (self.folder / "events.jsonl").open("w")

        def store_init_configuration(self, values):
            (self.folder / "hparams.json").write_text(json.dumps(values))

        def log(self, values, step=None, **kwargs):
            self.events.write(json.dumps({"step": step, **values}) + "\n")

        def finish(self):
            self.events.close()

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeBoard)


def test_log_with_writes_the_training_curve_into_out_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    _fake_tensorboard(monkeypatch)
    folder, out = _model_dir(tmp_path), tmp_path / "o"
    (tmp_path / "c.yaml").write_text("log_with: tensorboard\nepochs: 2\nbatch_size: 4\n")  # from --config too
    assert pipeline.main(["distill", "--model", str(folder), *_inputs(tmp_path), "--out", str(out),
                          "--config", str(tmp_path / "c.yaml")]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["tracker"] == {"log_with": "tensorboard", "run_name": "prompt-cd_tiny_gpt-3_n8", "logging_dir": "trackers"}
    assert "tensorboard run `prompt-cd_tiny_gpt-3_n8`, its files in `trackers/`" in (out / "report.md").read_text()
    run = out / "trackers" / "prompt-cd_tiny_gpt-3_n8"
    steps = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]  # 2 epochs of 2 batches of 4 training queries
    assert steps[0]["loss"] == pytest.approx(r["loss_first"]) and steps[-1]["loss"] == pytest.approx(r["loss_last"])
    assert all({"lr", "grad_norm"} <= set(s) for s in steps)
    assert json.loads((run / "hparams.json").read_text())["epochs"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "student", "trackers"]
    assert not list(tmp_path.glob(".o.*.tmp"))
    # a run that fails after training leaves the earlier output whole: no curve of the failed run in it
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(distill, "save_student", broken)
    lm = models.load_model(str(folder), device="cpu", dtype="float32")
    queries = prompt_distill.read_queries(tmp_path / "q.jsonl")
    cfg = distill.DistillConfig(target="verbalizer", epochs=1, lr=1e-3, batch_size=4, mixed_precision="no")
    with pytest.raises(OSError, match="disk full"):
        prompt_distill.distill_prompt(lm, "A demo . Yes\n\n", queries, out, GPT3, cfg, log_with="tensorboard")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".o.*.tmp"))


def test_an_unknown_or_missing_tracker_is_one_line_and_status_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import accelerate.utils

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(models, "load_tokenizer", no_load)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    args = ["distill", "--model", "smollm2-135m", *_inputs(tmp_path), "--out", str(tmp_path / "o")]
    assert pipeline.main([*args, "--log-with", "wandb"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[distill ")]
    assert err == ["distill: the tracker 'wandb' is not installed: pip install wandb (or leave log_with empty)"]
    with pytest.raises(SystemExit) as e:  # not one of accelerate's trackers: the parser's usage error
        pipeline.main([*args, "--log-with", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    (tmp_path / "c.json").write_text('{"log-with": "nope"}')
    with pytest.raises(SystemExit) as e:
        pipeline.main([*args, "--config", str(tmp_path / "c.json")])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown tracker 'nope'"):  # the function, before any work (no model here)
        prompt_distill.distill_prompt(None, "A demo", [], tmp_path / "o", GPT3, log_with="nope")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.lock").exists()
