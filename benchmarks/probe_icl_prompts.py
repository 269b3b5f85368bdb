"""What an embedded model reaches by in-context learning on MNLI-binary, per pattern and k, raw and calibrated.

Accuracy only (no timing): ``scoring.evaluate`` on ``n`` stratified MNLI-binary validation_matched rows
(``data.stratified_subsample(..., seed=0)``), demonstrations balanced from the MNLI train pool
(``data.sample_demonstrations``, seeds 0 and 1 for k > 0, the evaluation rows excluded), the prefix reused,
float32 on CPU. Prints one JSON line per run and writes them all to ``--out``:

    python benchmarks/probe_icl_prompts.py --model smollm2-135m --n 200 --ks 0 16 32 \
        --patterns gpt-3 eval-harness chatml --out benchmarks/results/icl-prompts-smollm2.jsonl

``acc_contextual`` / ``acc_batch``: contextual and batch calibration (``scoring.calibrated_scores``);
``label1``: the share of "not entailment" answers (a near-constant predictor sits near 0 or 1).
"""
from __future__ import annotations

import argparse
import json

from llmft_utils import data, models, patterns, scoring


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 16, 32])
    ap.add_argument("--patterns", nargs="+", default=list(patterns.PATTERNS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    lm = models.load_model(a.model, device="cpu", dtype="float32")
    ev = data.stratified_subsample(data.load_split("mnli", "validation_matched"), a.n, seed=0)
    pool = data.load_split("mnli", "train")
    out = []
    for name in a.patterns:
        pat = patterns.get_pattern(name)
        for k in a.ks:
            for seed in ([0] if k == 0 else a.seeds):
                demos = data.sample_demonstrations(pool, k, seed, exclude=ev)
                m, _ = scoring.evaluate(lm, ev, pat, demos, progress=False, on_too_long="skip", extras=("calibration",))
                row = {"model": a.model, "task": "mnli", "pattern": name, "k": k, "seed": seed, "n": m["n_eval"],
                       "majority": round(m["majority_acc"], 3), "acc": round(m["score_acc"], 3),
                       "acc_contextual": round(m["score_acc_contextual"], 3), "acc_batch": round(m["score_acc_batch"], 3),
                       "label1": round(m["pred_label1_frac"], 3)}
                print(json.dumps(row), flush=True)
                out.append(row)
    if a.out:
        with open(a.out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in out)
    return out


if __name__ == "__main__":
    main()
