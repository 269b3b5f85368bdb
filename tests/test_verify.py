"""verify-student: a saved student records the sha256 of every weight file; the verb checks them before it loads
anything, loads the student with transformers alone, and in a results folder recomputes its row's accuracy with
plain code. It accepts a results folder, a `distill --out` folder or a student folder."""
import json
import shutil

import numpy as np
import pandas as pd
import toy_data

from llmft_utils import data, models, patterns, pipeline, scoring, verify
from llmft_utils.distill.export import save_student
from llmft_utils.study import schema

GPT3 = patterns.get_pattern("gpt-3")


def _student(folder):
    tok = models.tiny_tokenizer()
    info = {"student_key": "k", "method": "cd", "train_task": "mnli", "k": 4, "seed": 0, "n_train": 4,
            "base_model": "tiny", "base_model_source": "test", "base_model_reference": None, "demo_pool": "-",
            "demo_ids": "-", "prefix": "p", "pattern": {"name": GPT3.name, "template": GPT3.template,
                                                        "verbalizers": list(GPT3.verbalizers)},
            "dtype": "float32", "device": "cpu", "recipe": {}, "metrics": {}, "provenance": {}, "command": "test"}
    return save_student(models.tiny_model("llama", tok, seed=5), tok, folder, info)


def test_weights_are_checksummed_and_a_truncated_file_is_caught(tmp_path, capsys):
    sdir = _student(tmp_path / "out" / "student")
    (tmp_path / "out" / "report.json").write_text("{}")
    card = json.loads((sdir / "student.json").read_text())
    assert set(card["weights_sha256"]) == {"model.safetensors"}
    assert card["weights_sha256"]["model.safetensors"] == data.file_sha256(sdir / "model.safetensors")
    assert pipeline.main(["verify-student", str(tmp_path / "out")]) == 0  # a distill folder: found, checked, loaded
    assert json.loads(capsys.readouterr().out)["kind"] == "distill"
    w = sdir / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert verify.main([str(sdir)]) == 1  # a student folder
    err = capsys.readouterr().err
    assert "model.safetensors: sha256" in err and "differs from the" in err and "truncated or changed" in err
    w.unlink()
    assert verify.main([str(sdir)]) == 1 and "model.safetensors: missing" in capsys.readouterr().err


def test_a_folder_without_a_student_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "res").mkdir()
    assert verify.main([str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no saved student here" in err and "Traceback" not in err


def test_a_results_folder_student_is_scored_with_plain_code_as_its_row_records(tmp_path, capsys):
    res = tmp_path / "res"
    sdir = _student(res / "students" / "s")
    ev, _ = toy_data.frames(n_eval=24)
    data.write_jsonl(ev, res / "prepared" / "mnli__validation_matched.jsonl")
    lm = models.load_model(str(sdir))  # the kit's batched scorer, against verify's prompt-at-a-time plain code
    s = scoring.score_prompts(lm, "", [patterns.query_text(GPT3, p, h, False) for p, h in zip(ev.premise, ev.hypothesis)],
                              GPT3.verbalizers)
    acc = float(np.mean(s["logprobs"].argmax(1) == ev["label"].to_numpy()))
    row = schema.read_table("tests/golden/smoke/cd.csv").query("method == 'cd' and task == 'mnli'").iloc[[0]].copy()
    row["student_dir"], row["split"], row["n_eval"], row["score_acc"] = "students/s", "validation_matched", len(ev), acc
    schema.write_table(row, res / "cd.csv")
    assert verify.main([str(res)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "results" and out["acc_plain_transformers"] == acc and out["n"] == 24
    row["score_acc"] = acc + 1 / 24  # a row that records another accuracy than its student gives
    schema.write_table(row, res / "cd.csv")
    assert verify.main([str(res)]) == 1
    assert verify.main([str(res), "--task", "rte"]) == 2 and "no row evaluates students/s on 'rte'" in \
        capsys.readouterr().err
    shutil.copytree(sdir, res / "students" / "old")  # a student saved before the digests: said, not loaded
    card = json.loads((res / "students/old/student.json").read_text())
    del card["weights_sha256"]
    (res / "students/old/student.json").write_text(json.dumps(card))
    assert verify.main([str(res), "--student", "students/old"]) == 1
    assert "records no weights_sha256" in capsys.readouterr().err
    assert pd.read_csv(res / "cd.csv")["schema_version"].iloc[0] == schema.versions()["cd.csv"]
