"""Check a saved student with nothing of this kit: load it with transformers alone, score an evaluation set
with plain code (one prompt at a time, prompt and verbalizer encoded together, log-probs summed over the
verbalizer's tokens) and compare with the accuracy its row in ``cd.csv`` records.

    python tools/verify_student.py results/default                 # the first student under students/
    python tools/verify_student.py results/default --student students/cd-mnli-k4-s0-... --task mnli
"""
import argparse
import glob
import json
import sys
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmft_utils.study import schema  # noqa: E402  (only to read the row the student is checked against)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a results folder (with cd.csv, prepared/ and students/)")
    ap.add_argument("--student", default="", help="the student folder, relative to RESULTS (default: the first)")
    ap.add_argument("--task", default="", help="evaluation task (default: the student's training task)")
    a = ap.parse_args()
    folder = Path(a.results)
    sdir = folder / a.student if a.student else Path(sorted(glob.glob(str(folder / "students" / "*")))[0])
    card = json.loads((sdir / "student.json").read_text())
    task = a.task or card["train_task"]
    tok = AutoTokenizer.from_pretrained(sdir)
    model = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32).eval()
    cd = schema.read_table(folder / "cd.csv")
    row = cd[(cd["student_dir"] == str(sdir.relative_to(folder))) & (cd["task"] == task)].iloc[0]
    ev = pd.read_json(folder / "prepared" / f"{task}__{row['split']}.jsonl", lines=True)
    tpl, verb = card["pattern"]["template"], card["pattern"]["verbalizers"]
    correct = 0
    with torch.inference_mode():
        for p, h, y in zip(ev["premise"], ev["hypothesis"], ev["label"]):
            ctx = tpl.format(premise=p, hypothesis=h)
            n_ctx = len(tok(ctx)["input_ids"])
            scores = []
            for v in verb:
                ids = tok(ctx + v)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
                scores.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
            correct += int(max(range(len(verb)), key=scores.__getitem__) == y)
    out = {"student": str(sdir), "task": task, "n": len(ev), "acc_plain_transformers": correct / len(ev),
           "acc_row": float(row["score_acc"]), "n_row": int(row["n_eval"])}
    print(json.dumps(out))
    raise SystemExit(0 if out["acc_plain_transformers"] == out["acc_row"] and out["n"] == out["n_row"] else 1)


if __name__ == "__main__":
    main()
