"""Check a saved student with nothing of this kit but its checksums: the sha256 of every weight file against
the ones its ``student.json`` recorded at saving, then a load with transformers alone and, for a student of
a results folder, the accuracy its row in ``cd.csv`` records, recomputed with plain code (one prompt at a
time, prompt and verbalizer encoded together, log-probs summed over the verbalizer's tokens).

    llmft-study verify-student results/default                  # the first student under students/
    llmft-study verify-student results/default --student students/cd-mnli-k4-s0-... --task mnli
    llmft-study verify-student students/mine                    # a `llmft-study distill --out` folder
    python tools/verify_student.py ...                          # the same

A ``distill`` folder (``report.json`` and ``student/``) has no labelled evaluation set: its weights are
checked and loaded, and one forward of the pattern shows that the student runs. Exit status 0: verified;
1: a check failed (the lines say which); 2: the folder is not a student, a results folder or a distill folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def find_student(folder: Path, student: str = "") -> tuple[Path, str]:
    """``(student folder, kind)``: kind ``results`` (a results folder's student), ``distill`` or ``student``."""
    if student:
        sdir = folder / student
    elif (folder / "student.json").is_file():
        return folder, "student"
    elif (folder / "student" / "student.json").is_file():
        return folder / "student", "distill"
    else:
        found = sorted(p.parent for p in (folder / "students").glob("*/student.json"))
        if not found:
            raise FileNotFoundError(f"{folder}: no saved student here (expected students/*/student.json in a results "
                                    "folder, student/ in a `llmft-study distill --out` folder, or student.json)")
        sdir = found[0]
    if not (sdir / "student.json").is_file():
        raise FileNotFoundError(f"{sdir}: no student.json: not a saved student")
    return sdir, "results"


def plain_accuracy(sdir: Path, ev, template: str, verbalizers) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sdir)
    model = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32).eval()
    correct = 0
    with torch.inference_mode():
        for p, h, y in zip(ev["premise"], ev["hypothesis"], ev["label"]):
            ctx = template.format(premise=p, hypothesis=h)
            n_ctx = len(tok(ctx)["input_ids"])
            scores = []
            for v in verbalizers:
                ids = tok(ctx + v)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
                scores.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
            correct += int(max(range(len(verbalizers)), key=scores.__getitem__) == y)
    return correct / len(ev)


def verify(folder, student: str = "", task: str = "") -> dict:
    import pandas as pd

    from .distill.export import check_weights

    folder = Path(folder)
    sdir, kind = find_student(folder, student)
    card = json.loads((sdir / "student.json").read_text())
    out = {"student": str(sdir), "kind": kind, "weights": check_weights(sdir) or "sha256 as recorded"}
    if isinstance(out["weights"], list):
        out["ok"] = False
        return out
    tpl, verb = card["pattern"]["template"], card["pattern"]["verbalizers"]
    if kind != "results":
        one = pd.DataFrame({"premise": ["A man is sleeping."], "hypothesis": ["A man rests."], "label": [0]})
        plain_accuracy(sdir, one, tpl, verb)  # loads with transformers alone and runs
        out.update(loaded="transformers alone, one forward per verbalizer", ok=True)
        return out
    from .study import schema

    task = task or card["train_task"]
    cd = schema.read_table(folder / "cd.csv", missing_ok=False)
    rows = cd[(cd["student_dir"] == str(sdir.relative_to(folder))) & (cd["task"] == task)]
    if rows.empty:
        raise LookupError(f"{folder / 'cd.csv'}: no row evaluates {sdir.relative_to(folder)} on {task!r}")
    row = rows.iloc[0]
    ev = pd.read_json(folder / "prepared" / f"{task}__{row['split']}.jsonl", lines=True)
    acc = plain_accuracy(sdir, ev, tpl, verb)
    out.update(task=task, n=len(ev), acc_plain_transformers=acc, acc_row=float(row["score_acc"]),
               n_row=int(row["n_eval"]), ok=acc == float(row["score_acc"]) and len(ev) == int(row["n_eval"]))
    return out


def main(argv=None) -> int:
    from .cli import HelpFormatter, add_config_flag, parse

    ap = argparse.ArgumentParser(prog="llmft-study verify-student", description=__doc__, formatter_class=HelpFormatter)
    add_config_flag(ap, "flags (not the folder)")
    ap.add_argument("folder", help="a results folder, a `distill --out` folder or a student folder")
    ap.add_argument("--student", default="", help="the student folder, relative to FOLDER (default: the first)")
    ap.add_argument("--task", default="", help="evaluation task (default: the student's training task)")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="a traceback with an error's message")
    a, _ = parse(ap, argv)
    from .logs import run_verb

    return run_verb("verify-student", lambda: _run(a), a.verbose)


def _run(a) -> int:
    try:
        out = verify(a.folder, a.student, a.task)
    except (FileNotFoundError, LookupError, json.JSONDecodeError) as e:
        print(f"verify-student: {e}", file=sys.stderr)
        return 2
    if isinstance(out["weights"], list):
        print("verify-student: the weights are not the ones saved:\n  " + "\n  ".join(out["weights"]), file=sys.stderr)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
