"""The CD sweep (notebook 03): control students, PBFT, CD students and teacher ensembles per training task,
each trained, evaluated in and out of domain, compared with its teacher and the controls, and written.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import data, dist, logs
from ..data import transfer_set
from ..distill import student_data, teacher, training
from ..distill.config import ENSEMBLE_COMBINE, DistillConfig
from ..distill.export import save_student, should_save
from ..distill.teacher import answer_token_ids, teacher_cache_key, teacher_runtime
from ..distill.training import check_tracker, training_log, training_step_memory
from ..models import wrap
from ..patterns import get_pattern
from ..scoring.evaluation import evaluate, evaluate_ensemble
from ..store import ResultTable, atomic_write_parquet, ids_digest, provenance
from .keys import precision_tag
from .lookup import icl_predictions, icl_runs, missing_icl_runs
from .paired import agreement, controls_vs, paired_vs
from .plan import CONTROL_METHODS, PlannedStudent, config_from_params

log = logs.get(__name__)


def sweep_from_params(lm, out_dir, p: dict, progress: bool = False, **narrow):
    """Notebook 03's :func:`run_cd_sweep` with the notebook parameters ``p`` (a profile's, the CLI's);
    ``narrow`` replaces ``train_tasks``, ``ks``, ``seeds`` or ``pbft_n`` (e.g. one seed at a time)."""
    a = {"train_tasks": p["cd_tasks"], "ks": p["cd_ks"], "seeds": p["seeds"], "pbft_n": p["pbft_n"], **narrow}
    return run_cd_sweep(lm, out_dir, p["pattern"], a["train_tasks"], a["ks"], a["seeds"], p["n_transfer"], a["pbft_n"],
                        config_from_params(p), p["pbft_epochs"], eval_batch_size=p["batch_size"], force=p["force"],
                        model_name=p["model"], profile=p["profile"], progress=progress,
                        ood_train_tasks=p["ood_train_tasks"], pbft_lr=p["pbft_lr"],
                        eval_max_tokens=p["max_batch_tokens"], save_students=p["save_students"], log_with=p["log_with"],
                        controls=p.get("controls", ()), control_tasks=p.get("control_tasks"),
                        ensemble_m=p.get("ensemble_m", 0), ensemble_ks=p.get("ensemble_ks", ()),
                        ensemble_seeds=p.get("ensemble_seeds"), ensemble_tasks=p.get("ensemble_tasks"),
                        ensemble_combine=p.get("ensemble_combine", "prob"), ensemble_ood=p.get("ensemble_ood", True))


def _ensemble_rows(lm, out_dir, manifest, frames, icl_rows, table, pattern, model_name, precision, task, es_in, k,
                   seed, sets, combine, eval_sets, keys, batch_size, max_tokens, progress, largest_icl, profile, prov,
                   main, say) -> dict:
    """The ``icl_ensemble`` rows of :func:`run_cd_sweep`: the m prompts of ``sets`` at inference on each evaluation
    set (set 0 reuses the single-prompt ICL run's predictions where its demonstrations are the same), with exact
    McNemar tests against the zero-shot model and the single-prompt ICL run of the largest k (``icl_k``);
    written to ``table`` and returned as ``{run_key: row}``."""
    demo_text = "|".join(";".join(map(str, d["idx"])) for d in sets)
    rows = []
    for es, key in zip(eval_sets, keys):
        einfo, ev = manifest["eval_sets"][es], frames[es]
        known = {}
        row0, preds0 = icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, k, seed, precision)
        if str(row0["demo_ids"]) == ";".join(map(str, sets[0]["idx"])):
            m0 = {c: row0[c] for c in ("score_acc", "wall_s", "s_per_query", "tokens_processed", "prefix_tokens",
                                       "n_prefix_fallback", "query_tokens_mean", "scoring", "peak_mem_mb",
                                       "peak_mem_delta_mb", "mem_kind", "single_token_verbalizers")}
            m0["prefix_reuse_note"] = row0["prefix_reuse_note"] if isinstance(row0["prefix_reuse_note"], str) else ""
            known[0] = (m0, preds0)
        metrics, preds = evaluate_ensemble(lm, ev, pattern, sets, combine, batch_size=batch_size, progress=progress,
                                           max_tokens=max_tokens, known=known)
        pfile = f"predictions/icl_ensemble__{ids_digest([key])}.parquet"
        if main:
            atomic_write_parquet(preds, out_dir / pfile)
        zrow, zpreds = icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, 0, 0, precision)
        ik, ipreds = largest_icl(es, seed)
        rows.append({
            "run_key": key, "method": "icl_ensemble", "model": model_name, "model_source": lm.source,
            "device": lm.device, "dtype": lm.dtype, "random_init": lm.source.startswith("random-init"),
            "n_processes": dist.world()[0], "train_task": task, "task": einfo["task"], "split": einfo["split"],
            "in_domain": es == es_in, "pattern": pattern.name, "k": k, "seed": seed,
            "eval_full_size": einfo["full_size"], "eval_subsampled": einfo["subsampled"],
            "eval_ids_digest": einfo["ids_digest"], "demo_ids": demo_text, "zeroshot_acc": zrow["score_acc"],
            "member0_reused": bool(known), **metrics, **paired_vs(preds, zpreds, "zeroshot"),
            **paired_vs(preds, ipreds, "icl"), "icl_k": ik, "predictions_file": pfile, "profile": profile, **prov,
            "student_dir": ""})
        say(f"  {es}: acc={metrics['score_acc']:.3f} (members {metrics['member_acc_min']:.3f}-"
            f"{metrics['member_acc_max']:.3f}; ICL k={ik} {ipreds['pred'].eq(ipreds['label']).mean():.3f}, zero-shot "
            f"{zrow['score_acc']:.3f})  {metrics['s_per_query'] * 1000:.0f} ms/query")
    if main:
        table.append(rows)
    dist.barrier()
    return {r["run_key"]: r for r in rows}


def run_cd_sweep(lm, out_dir, pattern_name: str, train_tasks, ks, seeds, n_transfer: int, pbft_n: int,
                 cfg: DistillConfig, pbft_epochs: int, eval_batch_size: int = 8, force: bool = False,
                 model_name: str | None = None, profile: str = "", progress: bool = True, ood_train_tasks=None,
                 pbft_lr: float | None = None, eval_max_tokens: int = 0, save_students: str = "none",
                 log_with: str = "", controls=(), control_tasks=None, ensemble_m: int = 0, ensemble_ks=(),
                 ensemble_seeds=None, ensemble_tasks=None, ensemble_combine: str = "prob", ensemble_ood: bool = True):
    """CD students for every (train task, k, seed) and PBFT students for every (train task, seed); each is
    evaluated zero-shot on its in-domain set (and on HANS when its train task is in ``ood_train_tasks``,
    default: all) with :func:`llmft_utils.scoring.evaluation.evaluate`, and
    compared with its ICL teacher and with the untrained zero-shot model (agreement, κ, KL).
    PBFT students train with ``cfg`` except alpha = 1, ``pbft_epochs`` and ``pbft_lr`` (default: cfg.lr).
    Rows go to ``out_dir/cd.csv`` (atomic, resumable). Students chosen by ``save_students``
    (:func:`llmft_utils.distill.export.should_save`) are saved under ``out_dir/students/`` as Hugging Face model
    folders with a model card; their rows name the folder in ``student_dir``. ``log_with``: an experiment
    tracker (see :func:`train_student`) logging under ``out_dir/trackers/``.

    ``controls`` (``shuffled``, ``self``) adds control students for the tasks in ``control_tasks`` (default:
    all), trained before the CD students with the CD recipe on the same transfer set of each (task, seed):
    ``cd_shuffled`` at the largest k (that k's teacher targets permuted across the transfer queries) and
    ``cd_self`` (k = 0: the zero-shot model's own targets). Their rows compare them with the largest k's
    teacher (``controls_k``); each CD row is tested against them (:func:`controls_vs`).

    ``ensemble_m`` ≥ 2 adds, for the tasks in ``ensemble_tasks``, each k in ``ensemble_ks`` and each seed in
    ``ensemble_seeds`` (defaults: all), a **teacher ensemble** of m disjoint demonstration sets of k
    (:func:`llmft_utils.data.demonstration_sets`: set 0 is the single teacher's; all are disjoint from the
    transfer set and the evaluation queries): ``icl_ensemble`` rows score the ensemble at inference (m forwards
    per query, :func:`llmft_utils.scoring.evaluation.evaluate_ensemble`), and a ``cd_ensemble`` student distils it (the
    m prompts' distributions combined by ``ensemble_combine``, :func:`teacher_targets`) on the same transfer
    set as CD, scored out of domain too unless ``ensemble_ood`` is False. Both carry exact McNemar tests against the single-prompt ICL run of the largest k in
    ``icl.csv`` (``icl_k``); the student also against single-prompt CD of the same k and seed."""
    import gc

    import pandas as pd


    out_dir = Path(out_dir)
    manifest = data.load_manifest(out_dir)
    pattern = get_pattern(pattern_name)
    model_name = model_name or lm.name
    table = ResultTable(out_dir / "cd.csv")
    old_rows = table.read()
    done = set() if force or "run_key" not in old_rows else set(old_rows["run_key"])
    icl_rows = ResultTable(out_dir / "icl.csv").read()
    vids = answer_token_ids(lm.tokenizer, pattern)
    runtime = teacher_runtime(lm)
    prov = {**provenance(), "model_weights_sha256": runtime["weights_sha256"]}
    precision = precision_tag(lm)
    frames = {es: data.read_split(out_dir, info) for es, info in manifest["eval_sets"].items()}
    pools = {p: data.read_split(out_dir, info) for p, info in manifest["demo_pools"].items()}
    plan = []
    bad = sorted(set(controls) - set(CONTROL_METHODS))
    if bad:
        raise ValueError(f"controls: unknown {bad}; use any of {list(CONTROL_METHODS)}")
    kc = max(ks) if ks else 0
    if ensemble_m and ensemble_m < 2:
        raise ValueError(f"ensemble_m: {ensemble_m} sets is no ensemble; use 0 (none) or >= 2")
    if ensemble_combine not in ENSEMBLE_COMBINE:
        raise ValueError(f"ensemble_combine: {ensemble_combine!r} is not one of {list(ENSEMBLE_COMBINE)}")
    # the ensemble seeds among this sweep's seeds (a sweep narrowed to one seed runs that seed's ensemble, if any)
    ens_seeds = [s_ for s_ in seeds if ensemble_seeds is None or s_ in ensemble_seeds]
    ens_tag = f"m{ensemble_m}-{ensemble_combine}"
    sets_of_task = {}  # training task -> the evaluation sets of its CD students (in domain first)
    for task in train_tasks:
        task_sets = data.student_eval_sets(manifest, task, ood_train_tasks is None or task in ood_train_tasks)
        sets_of_task[task] = task_sets
        ctl = [c for c in controls if control_tasks is None or task in control_tasks] if kc else []
        runs = ([("cd_self", 0, s) for s in seeds if "self" in ctl]
                + [("cd_shuffled", kc, s) for s in seeds if "shuffled" in ctl]
                + ([("pbft", pbft_n, s) for s in seeds] if pbft_n else []) + [("cd", k, s) for k in ks for s in seeds])
        if ensemble_m and (ensemble_tasks is None or task in ensemble_tasks):
            runs += [(m_, k, s) for k in ensemble_ks for s in ens_seeds for m_ in ("icl_ensemble", "cd_ensemble")]
        for method, k, seed in runs:
            mcfg = cfg if method != "pbft" else DistillConfig(**{**asdict(cfg), "alpha": 1.0, "epochs": pbft_epochs,
                                                                 "lr": pbft_lr or cfg.lr})
            n_train = n_transfer if method != "pbft" else k
            recipe = ids_digest([json.dumps(asdict(mcfg), sort_keys=True)]) if method != "icl_ensemble" else "infer"
            key_base = (f"{method}|{model_name}|{task}|{pattern.name}|k{k}|s{seed}|n{n_train}|{recipe}|{precision}"
                        + (f"|{ens_tag}" if method.endswith("_ensemble") else ""))
            eval_sets = list(task_sets) if ensemble_ood or not method.endswith("_ensemble") else task_sets[:1]
            keys = [f"{key_base}|{es}|eval{manifest['eval_sets'][es]['ids_digest']}" for es in eval_sets]
            plan.append(PlannedStudent(method, task, eval_sets[0], k, seed, mcfg, n_train, key_base, eval_sets, keys))

    check_tracker(log_with)  # before any work

    main = dist.world()[1] == 0
    say = log.info if main else (lambda msg: None)

    order = [(p.method, p.task, p.k, p.seed) for p in plan if p.method != "icl_ensemble"]
    keep = [p.method != "icl_ensemble" and should_save(save_students, p.method, p.task, p.k, p.seed, order)
            for p in plan]
    missing = missing_icl_runs(icl_rows, model_name, pattern.name, plan, precision)
    if missing:  # before any teacher or student runs: the comparisons need these rows
        raise FileNotFoundError(f"{len(missing)} ICL runs this CD sweep compares with are not in {out_dir / 'icl.csv'} "
                                f"({model_name}, {pattern.name}, {precision}): {', '.join(missing)}. Run "
                                "notebooks/02_icl_baselines with the same model, pattern, dtype and device, with 0 and "
                                "every cd_k in ks and the same seeds, first")
    planned = []
    keys_of = {(p.method, p.task, p.k, p.seed): dict(zip(p.eval_sets, p.keys)) for p in plan}
    step_memory = {}  # (transfer set, recipe) -> training_step_memory
    # run_key -> row, of this sweep and of earlier ones (resume): the predictions of PBFT and control students
    run_rows = {r["run_key"]: r for r in old_rows.to_dict("records")} if "run_key" in old_rows else {}

    def student_preds(method, task, k, seed, es):  # a planned student's predictions on es, once its rows exist
        import pandas as pd

        row = run_rows.get(keys_of.get((method, task, k, seed), {}).get(es))
        return None if row is None else pd.read_parquet(out_dir / row["predictions_file"])

    def control_preds(task, k, seed, es, method="cd"):  # the control students' predictions for a CD student on es
        got = {"self": student_preds("cd_self", task, 0, seed, es),  # the shuffled control permutes one teacher's targets
               "shuffled": student_preds("cd_shuffled", task, k, seed, es) if k == kc and method == "cd" else None}
        return {name: p for name, p in got.items() if p is not None}

    transfer_sets = {}  # (task, seed) -> its transfer set

    def transfer_of(task, seed):  # one transfer set per (task, seed), the same for every k and every student kind:
        if (task, seed) not in transfer_sets:  # disjoint from every k's demos and the task's evaluation sets
            es_in, *_ = sets = sets_of_task[task]
            pool = pools[manifest["eval_sets"][es_in]["demo_pool"]]
            seed_demos = [data.sample_demonstrations(pool, kk, seed, exclude=frames[es_in]) for kk in ks]
            transfer_sets[task, seed] = transfer_set(pool, n_transfer, seed, [*seed_demos, *(frames[es] for es in sets)])
        return transfer_sets[task, seed]

    def ensemble_sets(task, k, seed):  # m disjoint sets; set 0 is the single teacher's
        es_in, *_ = sets = sets_of_task[task]
        return data.demonstration_sets(pools[manifest["eval_sets"][es_in]["demo_pool"]], k, ensemble_m, seed, exclude=[
            frames[es_in], transfer_of(task, seed), *(frames[es] for es in sets)])

    def largest_icl(es, seed):  # the single-prompt ICL run with the most demonstrations for (es, seed)
        sel = icl_runs(icl_rows, model_name, es, pattern.name, precision)
        kmax = int(sel.loc[(sel["seed"] == seed) & (sel["k"] > 0) & (sel["n_eval"] > 0), "k"].max())
        return kmax, icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, kmax, seed, precision)[1]

    for (method, task, es_in, k, seed, mcfg, n_train, key_base, eval_sets, keys), save in zip(plan, keep):
        info = manifest["eval_sets"][es_in]
        pool = pools[info["demo_pool"]]
        demos = data.sample_demonstrations(pool, k, seed, exclude=frames[es_in])
        planned += keys
        if all(k_ in done for k_ in keys):
            say(f"skip (done): {key_base}")
            continue
        if method == "icl_ensemble":
            say(f"ICL ENSEMBLE  {task}  {ensemble_m} x k={k}  seed={seed}")
            run_rows.update(_ensemble_rows(
                lm, out_dir, manifest, frames, icl_rows, table, pattern, model_name, precision, task, es_in, k, seed,
                ensemble_sets(task, k, seed), ensemble_combine, eval_sets, keys, eval_batch_size,
                eval_max_tokens, progress, largest_icl, profile, prov, main, say))
            continue
        say(f"{method.upper()}  {task}  k={k}  seed={seed}  train n={n_train}"
            + (f"  ({ensemble_m} demonstration sets)" if method == "cd_ensemble" else ""))
        teach = {"seconds": 0.0, "cache_hit": None}
        demo_text = ";".join(map(str, demos["idx"]))
        if method != "pbft":  # one transfer set per (task, seed), the same for every k: disjoint from all their demos
            train = transfer_of(task, seed)
            tdemos = ensemble_sets(task, k, seed) if method == "cd_ensemble" else demos
            tkey = teacher_cache_key(f"{model_name}:{lm.source}", info["demo_pool"], pattern, k, seed, tdemos, train,
                                     mcfg, lm.dtype, lm.device, combine=ensemble_combine, runtime=runtime)
            teach = teacher.teacher_targets(lm, pattern, tdemos, train, mcfg, out_dir / "teacher_cache", tkey,
                                    batch_size=eval_batch_size, progress=progress, force=force,
                                    max_tokens=eval_max_tokens, combine=ensemble_combine)
            if method == "cd_ensemble":  # every set, sets separated by '|'
                demo_text = "|".join(";".join(map(str, d["idx"])) for d in tdemos)
            if method == "cd_shuffled":  # the same targets, each given to another transfer query
                perm = torch.from_numpy(np.random.default_rng(20_000 + seed).permutation(len(train)))
                teach = {**teach, "logp": teach["logp"][perm],
                         "topk_ids": None if teach.get("topk_ids") is None else teach["topk_ids"][perm]}
            rows = student_data.student_examples(lm.tokenizer, pattern, train, teach, lm.max_context)
        else:
            rows = student_data.student_examples(lm.tokenizer, pattern, demos, None, lm.max_context)
            train = demos
        student, st = training.train_student(lm.model, lm.tokenizer, rows, mcfg, vids, progress=progress, log_with=log_with,
                                    run_name=key_base, logging_dir=out_dir / "trackers")
        mkey = (ids_digest(list(map(str, train["idx"]))), json.dumps(asdict(mcfg), sort_keys=True))
        if mkey not in step_memory:  # the same inputs and recipe (CD and its control students): the same step
            step_memory[mkey] = training_step_memory(lm.model, lm.tokenizer, rows, mcfg, vids)
        tmem = step_memory[mkey]
        # evaluated at the run's precision, like its teacher and the zero-shot model (trained in float32)
        slm = wrap(student.to(next(lm.model.parameters()).dtype), lm.tokenizer, name=f"{method}-student",
                   device=lm.device)
        new_rows = []
        for es, key in zip(eval_sets, keys):
            einfo, ev = manifest["eval_sets"][es], frames[es]
            metrics, preds = evaluate(slm, ev, pattern, ev.iloc[0:0], batch_size=eval_batch_size, progress=progress,
                                      max_tokens=eval_max_tokens)
            pfile = f"predictions/{method}__{ids_digest([key])}.parquet"
            if main:
                atomic_write_parquet(preds, out_dir / pfile)
            zrow, zpreds = icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, 0, 0, precision)
            ag_z = paired_vs(preds, zpreds, "zeroshot")
            if method != "pbft":  # CD and its control students: compared with the (largest k's) teacher
                tk = k if method in ("cd", "cd_ensemble") else kc
                if method == "cd_ensemble":  # its teacher: the same ensemble at inference
                    trow = run_rows[keys_of[("icl_ensemble", task, k, seed)][es]]
                    tpreds, same_demos = pd.read_parquet(out_dir / trow["predictions_file"]), True
                    ik, ipreds = largest_icl(es, seed)
                    ag_z = {**ag_z, **paired_vs(preds, ipreds, "icl"), "icl_k": ik, "ensemble_m": ensemble_m,
                            "ensemble_combine": ensemble_combine,
                            **(paired_vs(preds, c1, "cd") if (c1 := student_preds("cd", task, k, seed, es)) is not None
                               else {})}
                else:
                    trow, tpreds = icl_predictions(out_dir, icl_rows, model_name, es, pattern.name, tk, seed, precision)
                    same_demos = trow["demo_ids"] == ";".join(map(str, demos["idx"]))
                a_s, a_z = agreement(tpreds, preds), agreement(tpreds, zpreds)
                student = method in ("cd", "cd_ensemble")
                ag_z = {**ag_z, **paired_vs(preds, tpreds, "teacher"), "controls_k": tk,
                        **(controls_vs(preds, tpreds, zpreds, control_preds(task, k, seed, es, method)) if student else {}),
                        **(paired_vs(preds, pb, "pbft") if student
                           and (pb := student_preds("pbft", task, pbft_n, seed, es)) is not None else {}),
                        "teacher_acc": trow["score_acc"], "teacher_same_demos": bool(same_demos),
                        "agree_teacher_student": a_s["agreement"], "kappa_teacher_student": a_s["kappa"],
                        "kl_teacher_student": a_s["kl"], "agree_teacher_zeroshot": a_z["agreement"],
                        "kappa_teacher_zeroshot": a_z["kappa"], "kl_teacher_zeroshot": a_z["kl"]}
            new_rows.append({
                "run_key": key, "method": method, "model": model_name, "model_source": lm.source,
                "device": lm.device, "dtype": lm.dtype, "random_init": lm.source.startswith("random-init"),
                "n_processes": dist.world()[0],
                "train_task": task, "task": einfo["task"],
                "split": einfo["split"], "in_domain": es == es_in, "pattern": pattern.name, "k": k, "seed": seed,
                "n_train": n_train, "train_ids_digest": ids_digest(list(map(str, train["idx"]))),
                "eval_full_size": einfo["full_size"], "eval_subsampled": einfo["subsampled"],
                "eval_ids_digest": einfo["ids_digest"], "demo_ids": demo_text,
                "zeroshot_acc": zrow["score_acc"], **{f"cfg_{a}": b for a, b in asdict(mcfg).items()},
                "teacher_cache_s": teach["seconds"], "teacher_cache_hit": teach["cache_hit"],
                "train_s": st["train_s"], "train_peak_mem_mb": st["train_peak_mem_mb"],
                "train_mem_delta_mb": st["train_mem_delta_mb"], "train_steps": st["steps"],
                "train_mem_tensors_peak_mb": tmem.peak_mb, "train_mem_work_mb": tmem.work_mb,
                "loss_first": st["losses"][0], "loss_last": st["losses"][-1],
                **metrics, **ag_z, "predictions_file": pfile, "profile": profile, **prov})
            say(f"  {es}: acc={metrics['score_acc']:.3f} (zero-shot {zrow['score_acc']:.3f}, majority "
                  f"{metrics['majority_acc']:.3f})" + (f"  agree(teacher) {ag_z['agree_teacher_student']:.3f} vs "
                                                       f"zero-shot {ag_z['agree_teacher_zeroshot']:.3f}, constant "
                                                       f"{ag_z.get('agree_teacher_constant', float('nan')):.3f}"
                                                       if "agree_teacher_student" in ag_z else ""))
        student_dir = f"students/{method}-{task}-k{k}-s{seed}-{ids_digest([key_base])}" if save else ""
        if save and main:

            metrics_by_set = {r["task"] + "/" + r["split"]: {c: r.get(c) for c in (
                "n_eval", "score_acc", "zeroshot_acc", "teacher_acc", "agree_teacher_student", "kl_teacher_student")}
                for r in new_rows}
            for v in metrics_by_set.values():
                v["n"] = v.pop("n_eval")
            save_student(slm.model, lm.tokenizer, out_dir / student_dir, {
                "student_key": key_base, "method": method, "train_task": task, "k": k, "seed": seed,
                "n_train": n_train, "base_model": model_name, "base_model_source": lm.source,
                "base_model_reference": (lm.info or {}).get("reference"), "demo_pool": info["demo_pool"],
                "demo_ids": [int(i) if str(i).isdigit() else str(i) for i in demo_text.replace("|", ";").split(";") if i],
                "pattern": {"name": pattern.name, "template": pattern.template,
                            "verbalizers": list(pattern.verbalizers)},
                "dtype": lm.dtype, "device": lm.device, "recipe": asdict(mcfg), "metrics": metrics_by_set,
                "profile": profile, "provenance": prov, "command": f"profile {profile!r}: " + " ".join(sys.argv)})
            say(f"  saved: {student_dir}")
        for r in new_rows:
            r["student_dir"] = student_dir
        if main:  # under a launcher (accelerate launch, torchrun) the main process writes; all compute
            ResultTable(out_dir / "train_log.csv").append(training_log(key_base, st, mcfg.grad_accum),
                                                          replace="student")
            table.append(new_rows)  # last: a student whose rows exist has its predictions and training log too
        run_rows.update({r["run_key"]: r for r in new_rows})
        dist.barrier()
        del student, slm
        gc.collect()
    out = table.read()
    return out[out["run_key"].isin(planned)].reset_index(drop=True)
