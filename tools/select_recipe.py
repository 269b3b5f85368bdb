"""Choose the CD recipe on the development split (``llmft_utils.selection``; the rule is in its docstring).

    python tools/select_recipe.py --profile default --out results/recipe_selection      # ~10 min on 2 cores
    python tools/select_recipe.py --profile qwen --seeds 0 --lrs 3e-5,3e-6,1e-6 --out results/recipe_selection_qwen

Prepares the profile's data with its ``dev_n`` (the same development rows notebook 01 holds out of the
pools), scores the teacher (largest ``cd_k``) and zero-shot model there, trains one CD student per
candidate × task × seed with the study's own code and writes ``selection.csv`` (one row per student) and
``choice.json`` (the rule's choice, the recipe and every candidate's format gap and agreement). The profile
in ``llmft_utils/pipeline.py`` then carries the chosen recipe (``tests/test_pipeline.py`` checks that it
matches the committed ``choice.json``). The evaluation sets are never scored here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmft_utils import data, models, pipeline  # noqa: E402
from llmft_utils.store import atomic_write_json, provenance  # noqa: E402
from llmft_utils.study import selection  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default", choices=sorted(pipeline.PROFILES))
    ap.add_argument("--out", default="results/recipe_selection")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lrs", default="", help="instead of the module's candidates, the profile's recipe at each of "
                    "these peak learning rates (comma-separated, in order of preference on ties), e.g. 3e-5,1e-5,3e-6")
    a = ap.parse_args(argv)
    candidates = ({f"lr{float(x):g}": {"lr": float(x)} for x in a.lrs.split(",")} if a.lrs
                  else selection.CANDIDATES)
    p = dict(pipeline.PROFILES[a.profile])
    out = Path(a.out)
    work = out / "work"
    t0 = time.perf_counter()
    sizes = {"mnli": p["mnli_eval_n"], "rte": p["rte_eval_n"], "hans": p["hans_eval_n"]}
    data.prepare_study_data(work, data.STUDY_EVAL_SETS, sizes, data_dir=p["data_dir"] or None, seed=p["eval_seed"],
                            dev_n=p["dev_n"])
    lm = models.load_model(p["model"], device=p["device"], dtype=p["dtype"])
    table = selection.run_selection(lm, work, p, candidates, seeds=[int(s) for s in a.seeds.split(",")], progress=False)
    choice = selection.choose(table, candidates)
    keep = ["candidate", "task", "split", "seed", "k", "n_eval", "score_acc", "agree_teacher_student",
            "kappa_teacher_student", "kl_teacher_student", "agree_teacher_zeroshot", "kl_teacher_zeroshot",
            "non_verbalizer_frac",
            "teacher_non_verbalizer_frac", "format_gap", "teacher_acc", "zeroshot_acc", "train_s",
            *[c for c in table if c.startswith("recipe_")]]
    out.mkdir(parents=True, exist_ok=True)
    table[keep].to_csv(out / "selection.csv", index=False, float_format="%.6g")
    atomic_write_json(out / "choice.json", {**choice, "profile": a.profile, "dev_n": p["dev_n"],
                                            "seeds": a.seeds, "wall_s": round(time.perf_counter() - t0, 1),
                                            "provenance": provenance()})
    print(json.dumps({k: choice[k] for k in ("chosen", "format_criterion_met", "rule", "recipe")}, indent=1))
    for c, v in choice["candidates"].items():
        print(f"{c:16s} format gap by task {v['format_gap_by_task']}  agreement {v['agree_teacher_mean']:.3f}  "
              f"kappa {v['kappa_teacher_mean']:.3f}  KL {v['kl_teacher_mean']:.4f}  dev acc {v['dev_acc_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
