"""Notebooks 01-03 of a profile run directly through the library, and two results folders compared run by run.

For machines without Jupyter/papermill (a bare GPU box): the same calls the notebooks make
(``data.prepare_study_data``, ``study.icl_sweep.run_sweep``, ``study.cd_sweep.run_cd_sweep``), the same rows and files, the
same resume keys. Optional limits narrow a profile (``--ks``, ``--seeds``, ``--cd-ks``, ``--cd-tasks``,
``--pbft-n``) and ``--deadline`` stops starting new runs after that many seconds (finished runs are kept;
the same command resumes). The report ``<out>/direct_run.json`` records what ran, how long each step took
and where it stopped.

    python tools/study_direct.py run --profile default --out /tmp/ref_cpu --ks 0,16 --seeds 0,1 --cd-ks 16 \\
        --cd-tasks mnli --pbft-n 0
    python tools/study_direct.py run --profile gpu --out /tmp/gpu --deadline 420
    python tools/study_direct.py compare /tmp/ref_cpu /tmp/gpu     # prediction agreement per run

``compare`` pairs ICL rows by (model, eval set, pattern, k, seed) and CD rows by (method, model, train task,
eval set, pattern, k, seed, n_train), whatever the dtype and device, and reports per pair the share of
queries with the same predicted label and both accuracies (JSON with ``--json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmft_utils import data, models, params, pipeline  # noqa: E402
from llmft_utils.store import atomic_write_json  # noqa: E402
from llmft_utils.study import cd_sweep, icl_sweep, schema  # noqa: E402
from llmft_utils.study.plan import EvalOptions, ICLPlan  # noqa: E402


def _ints(s: str | None):
    return None if s is None else [int(x) for x in s.split(",") if x != ""]


def run(a) -> dict:
    p = dict(pipeline.PROFILES[a.profile])
    for name, value in (("ks", _ints(a.ks)), ("seeds", _ints(a.seeds)), ("cd_ks", _ints(a.cd_ks)),
                        ("pbft_n", a.pbft_n), ("model", a.model), ("device", a.device),
                        ("max_batch_tokens", a.max_batch_tokens), ("dtype", a.dtype),
                        ("cd_tasks", a.cd_tasks.split(",") if a.cd_tasks else None)):
        if value is not None:
            p[name] = value
    p["ood_train_tasks"] = [t for t in p["ood_train_tasks"] if t in p["cd_tasks"]]
    p["results_dir"] = str(a.out)
    params.validate(p, check_model=True)
    out = Path(a.out)
    report = {"profile": a.profile, "params": p, "steps": [], "stopped_early": False}
    t_start = time.perf_counter()

    def step(name, fn):
        t0 = time.perf_counter()
        fn()
        report["steps"].append({"step": name, "seconds": round(time.perf_counter() - t0, 2)})
        print(f"[{time.perf_counter() - t_start:7.1f} s] {name} ({report['steps'][-1]['seconds']} s)", flush=True)
        atomic_write_json(out / "direct_run.json", report)

    def late() -> bool:
        if a.deadline and time.perf_counter() - t_start > a.deadline:
            report["stopped_early"] = True
            return True
        return False

    sizes = {"mnli": p["mnli_eval_n"], "rte": p["rte_eval_n"], "hans": p["hans_eval_n"]}
    step("01 data", lambda: data.prepare_study_data(out, data.STUDY_EVAL_SETS, sizes, data_dir=p["data_dir"] or None,
                                                    seed=p["eval_seed"]))
    holder = {}
    step("load model", lambda: holder.update(lm=models.load_model(p["model"], device=p["device"], dtype=p["dtype"])))
    lm = holder["lm"]
    report["model"] = {"name": lm.name, "source": lm.source, "dtype": lm.dtype, "device": lm.device}
    icl_plan, ev = ICLPlan.from_params(p), EvalOptions.from_params(p, progress=False).narrowed(force=False)
    if 0 in p["ks"]:
        step("02 icl k=0", lambda: icl_sweep.run_sweep(lm, out, icl_plan.narrowed(ks=(0,), seeds=(0,)), ev))
    for seed in p["seeds"]:  # seed by seed (ICL, then CD and PBFT): a deadline leaves whole seeds done
        for k in [k for k in p["ks"] if k]:
            if late():
                break
            step(f"02 icl k={k} seed={seed}", lambda: icl_sweep.run_sweep(lm, out, icl_plan.narrowed(ks=(k,), seeds=(seed,)),
                                                                         ev))
        for task in p["cd_tasks"]:
            for ks, pbft_n in [([k], 0) for k in p["cd_ks"]] + ([([], p["pbft_n"])] if p["pbft_n"] else []):
                if late():
                    break
                step(f"03 {'cd k=' + str(ks[0]) if ks else 'pbft'} {task} seed={seed}",
                     lambda: cd_sweep.sweep_from_params(lm, out, p, train_tasks=[task], ks=ks, seeds=[seed],
                                                       pbft_n=pbft_n))
    report["total_s"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(out / "direct_run.json", report)
    print(f"done in {report['total_s']} s" + (" (stopped at the deadline)" if report["stopped_early"] else ""))
    return report


ICL_KEY = ["model", "task", "split", "pattern", "k", "seed"]
CD_KEY = ["method", "model", "train_task", "task", "split", "pattern", "k", "seed", "n_train"]


def compare(a_dir: Path, b_dir: Path) -> dict:
    out = {"icl": [], "cd": []}
    for table, key, kind in (("icl.csv", ICL_KEY, "icl"), ("cd.csv", CD_KEY, "cd")):
        ta, tb = schema.read_table(a_dir / table), schema.read_table(b_dir / table)
        if ta.empty or tb.empty:
            continue
        for _, ra in ta.iterrows():
            match = tb
            for c in key:
                match = match[match[c] == ra[c]]
            if match.empty:
                continue
            rb = match.iloc[-1]
            pa = schema.read_predictions(a_dir / ra["predictions_file"]).set_index("idx")
            pb = schema.read_predictions(b_dir / rb["predictions_file"]).set_index("idx").loc[pa.index]
            same = float((pa["pred"].to_numpy() == pb["pred"].to_numpy()).mean())
            row = {**{c: ra[c] for c in key}, "n": len(pa), "same_prediction": same,
                   "acc_a": float(ra["score_acc"]), "acc_b": float(rb["score_acc"]),
                   "precision_a": f"{ra['dtype']}@{ra['device']}", "precision_b": f"{rb['dtype']}@{rb['device']}",
                   "max_abs_logp_diff": float((pa[["logp_label0", "logp_label1"]].to_numpy()
                                               - pb[["logp_label0", "logp_label1"]].to_numpy()).__abs__().max())}
            for c in ("agree_teacher_student", "kl_teacher_student", "agree_teacher_zeroshot"):
                if c in ra and c in rb:
                    row[f"{c}_a"], row[f"{c}_b"] = float(ra[c]), float(rb[c])
            out[kind].append(row)
    icl_rows = out["icl"]
    n_all = sum(r["n"] for r in icl_rows)
    out["icl_queries"] = n_all
    out["icl_same_prediction"] = (sum(r["same_prediction"] * r["n"] for r in icl_rows) / n_all) if n_all else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--profile", required=True, choices=sorted(pipeline.PROFILES))
    r.add_argument("--out", required=True)
    for name in ("--ks", "--seeds", "--cd-ks", "--cd-tasks", "--model", "--device", "--dtype"):
        r.add_argument(name)
    r.add_argument("--pbft-n", type=int)
    r.add_argument("--max-batch-tokens", type=int)
    r.add_argument("--deadline", type=float, default=0, help="seconds after which no new run starts (0: none)")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", default="")
    a = ap.parse_args()
    if a.cmd == "run":
        run(a)
        return
    res = compare(Path(a.a), Path(a.b))
    for kind in ("icl", "cd"):
        for row in res[kind]:
            print(kind, " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if res["icl_same_prediction"] is not None:
        print(f"ICL: the same prediction on {res['icl_same_prediction']:.2%} of {res['icl_queries']} queries")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
