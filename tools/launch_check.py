"""The CD step launched three ways on one machine, compared with the notebook path: same rows?

Prepares one results folder (notebook 01's data, notebook 02's ICL rows at k = 0 and 4) and copies it per
launch, then runs ``python -m llmft_utils.train`` (the notebook path: one process, in-process training)
and, on a GPU, the same module under ``torchrun --nproc_per_node 1`` (DDP on one process: ``accelerate
launch`` refuses ``configs/ddp.yaml`` with fewer than 2 processes) and under
``accelerate launch --config_file configs/fsdp.yaml --num_processes 1`` (FSDP2). Per launch: wall time,
the students' training peak memory (from the rows), and, against the notebook path, the share of the
same predicted labels and the largest label log-prob difference. JSON with ``--json``.

    python tools/launch_check.py --model random:smollm2-135m --json launch.json     # on a GPU
    python tools/launch_check.py --model tiny --launches plain,torchrun_cpu          # a CPU dry run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAUNCHES = {
    "plain": [],
    "torchrun_ddp1": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"],
    "torchrun_cpu": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    "accelerate_fsdp1": ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/fsdp.yaml"),
                         "--num_processes", "1"],
}


def main() -> int:
    import numpy as np
    import pandas as pd

    from llmft_utils import data as d
    from llmft_utils import models
    from llmft_utils.study import icl_sweep, schema
    from llmft_utils.study.plan import EvalOptions, ICLPlan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:smollm2-135m", help="a model name, or 'tiny' (built in code)")
    ap.add_argument("--out", default="/tmp/launch_check")
    ap.add_argument("--launches", default="plain,torchrun_ddp1,accelerate_fsdp1")
    ap.add_argument("--sizes", default="mnli=256,rte=64,hans=256")
    ap.add_argument("--n-transfer", type=int, default=64)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = a.model
    if model == "tiny":
        tok = models.tiny_tokenizer()
        model = str(out / "tiny")
        models.tiny_model("llama", tok, seed=0, max_positions=2048).save_pretrained(model)
        tok.save_pretrained(model)
    base = out / "base"
    sizes = {k: int(v) for k, v in (x.split("=") for x in a.sizes.split(","))}
    d.prepare_study_data(base, d.STUDY_EVAL_SETS, sizes, seed=0)
    lm = models.load_model(model)
    icl_sweep.run_sweep(lm, base, ICLPlan("gpt-3", [0, 4], [0]), EvalOptions(model_name=model, progress=False, max_tokens=32768 if lm.device.startswith("cuda") else 0))
    del lm
    common = ["--profile", "smoke", "--set", f"model={model}", "--set", "cd_tasks=['rte']",
              "--set", "ood_train_tasks=['rte']", "--set", f"n_transfer={a.n_transfer}", "--set", "lr=0.001",
              "--set", "epochs=2"]
    report = {"model": model, "runs": []}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    tables = {}
    for name in a.launches.split(","):
        folder = out / name
        shutil.copytree(base, folder)
        batch = 4 if name == "torchrun_cpu" else 8  # 2 processes × 4 = one process's 8
        cmd = [sys.executable, *LAUNCHES[name], "-m", "llmft_utils.train", *common,
               "--set", f"results_dir={folder}", "--set", f"train_batch_size={batch}"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        run = {"launch": name, "returncode": r.returncode, "wall_s": round(wall, 1)}
        if r.returncode != 0:
            run["error"] = (r.stdout[-1500:] + r.stderr[-3000:])
            print(f"{name}: FAILED (rc {r.returncode}) after {wall:.1f} s\n{run['error'][-2500:]}", flush=True)
        else:
            t = schema.read_table(folder / "cd.csv")
            tables[name] = (folder, t)
            run.update(rows=len(t), n_processes=sorted(t["n_processes"].unique().tolist()),
                       train_s=t.groupby("run_key")["train_s"].first().round(2).tolist(),
                       train_peak_mem_mb=t["train_peak_mem_mb"].round(1).unique().tolist(),
                       mem_kind=sorted(t.get("mem_kind", pd.Series(["?"])).astype(str).unique().tolist()))
            print(f"{name}: {len(t)} rows in {wall:.1f} s; train_s {run['train_s']}, "
                  f"peak MB {run['train_peak_mem_mb']}", flush=True)
        report["runs"].append(run)
    if "plain" in tables:
        f0, t0_ = tables["plain"]
        key = ["method", "task", "k", "seed"]
        for run in report["runs"]:
            if run["launch"] == "plain" or run["launch"] not in tables:
                continue
            f1, t1 = tables[run["launch"]]
            same, dmax, accs = [], 0.0, []
            for (_, ra), (_, rb) in zip(t0_.sort_values(key).iterrows(), t1.sort_values(key).iterrows()):
                pa, pb = (schema.read_predictions(f / r["predictions_file"]) for f, r in ((f0, ra), (f1, rb)))
                same.append(float((pa["pred"] == pb["pred"]).mean()))
                dmax = max(dmax, float(np.abs(pa[["logp_label0", "logp_label1"]].to_numpy()
                                              - pb[["logp_label0", "logp_label1"]].to_numpy()).max()))
                accs.append((round(float(ra["score_acc"]), 4), round(float(rb["score_acc"]), 4)))
            run.update(same_rows=sorted(t0_["run_key"]) == sorted(t1["run_key"]), same_prediction=same,
                       max_abs_logp_diff=dmax, acc_plain_vs_this=accs)
            print(f"{run['launch']} vs plain: same run keys {run['same_rows']}, same predictions {same}, "
                  f"max |dlogp| {dmax:.2e}, acc {accs}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0 if all(r["returncode"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
