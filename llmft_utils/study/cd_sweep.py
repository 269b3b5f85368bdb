"""The CD sweep (notebook 03): control students, PBFT, CD students and teacher ensembles per training task,
each trained, evaluated in and out of domain, compared with its teacher and the controls, and written.

:func:`run_cd_sweep` runs a :class:`~llmft_utils.study.plan.CDPlan`. Every student of the plan (see
:meth:`CDPlan.runs`: controls, PBFT, CD at each k, ensembles) is evaluated zero-shot on its in-domain set
(and on HANS when its train task is in ``ood_train_tasks``, default: all) and compared with its ICL teacher
and with the untrained zero-shot model (agreement, κ, KL). PBFT students train with the recipe except
alpha = 1, ``pbft_epochs`` and ``pbft_lr`` (default: the recipe's lr). Rows go to ``out_dir/cd.csv``
(atomic, resumable). Students chosen by ``save_students`` (:func:`llmft_utils.distill.export.should_save`)
are saved under ``out_dir/students/`` as Hugging Face model folders with a model card; their rows name the
folder in ``student_dir``. ``log_with``: an experiment tracker logging under ``out_dir/trackers/``.

``controls`` (``shuffled``, ``self``) adds control students for the tasks in ``control_tasks`` (default: all),
trained before the CD students with the CD recipe on the same transfer set of each (task, seed):
``cd_shuffled`` at the largest k (that k's teacher targets permuted across the transfer queries) and
``cd_self`` (k = 0: the zero-shot model's own targets). Their rows compare them with the largest k's teacher
(``controls_k``); each CD row is tested against them (:func:`~llmft_utils.study.paired.controls_vs`).

An ensemble ``m`` ≥ 2 adds, for the tasks in ``ensemble.tasks``, each k in ``ensemble.ks`` and each seed in
``ensemble.seeds`` (defaults: all), a **teacher ensemble** of m disjoint demonstration sets of k
(:func:`llmft_utils.data.demonstration_sets`: set 0 is the single teacher's; all are disjoint from the transfer
set and the evaluation queries): ``icl_ensemble`` rows score the ensemble at inference (m forwards per query,
:func:`llmft_utils.scoring.evaluation.evaluate_ensemble`), and a ``cd_ensemble`` student distils it (the m
prompts' distributions combined by ``ensemble.combine``, :func:`~llmft_utils.distill.teacher.teacher_targets`)
on the same transfer set as CD, scored out of domain too unless ``ensemble.ood`` is False. Both carry exact
McNemar tests against the single-prompt ICL run of the largest k in ``icl.csv`` (``icl_k``); the student also
against single-prompt CD of the same k and seed.
"""
from __future__ import annotations

import gc
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import data, dist, logs
from ..data import transfer_set
from ..distill import student_data, teacher, training
from ..distill.export import run_command, save_student, should_save
from ..distill.teacher import TeacherCache, TeacherModel, answer_token_ids, teacher_cache_key, teacher_runtime
from ..distill.training import check_tracker, float32_copy, training_log, training_step_memory
from ..models import wrap
from ..patterns import get_pattern
from ..progress import RunCounter
from ..scoring.evaluation import HALF_DTYPES, evaluate, evaluate_ensemble, precision_flips
from ..store import ids_digest, provenance
from .keys import pool_digest, precision_tag
from .lookup import icl_predictions, icl_runs, missing_icl_runs
from .paired import agreement, controls_vs, paired_vs
from .plan import CDPlan, EvalOptions, PlannedStudent
from .rows import device_columns, eval_set_columns, predictions_file, process_columns, run_columns
from .schema import StudyTable, read_predictions, write_predictions

log = logs.get(__name__)


def sweep_from_params(lm, out_dir, p: dict, progress: bool = False, **narrow):
    """Notebook 03's sweep with the notebook parameters ``p`` (a profile's, the CLI's); ``narrow`` replaces
    plan fields, e.g. ``train_tasks``, ``ks``, ``seeds`` or ``pbft_n`` (one seed at a time)."""
    return run_cd_sweep(lm, out_dir, CDPlan.from_params(p).narrowed(**narrow), EvalOptions.from_params(p, progress))


def run_cd_sweep(lm, out_dir, plan: CDPlan, ev: EvalOptions = EvalOptions()) -> pd.DataFrame:
    """Run ``plan`` into the results folder ``out_dir`` (see the module's docstring); returns the plan's rows."""
    return CDSweep(lm, out_dir, plan, ev).run()


class CDSweep:
    """One run of a :class:`CDPlan`: the folder's manifest, frames and ICL rows, read once; then every planned
    student, in order, skipping those whose rows exist (unless ``ev.force``)."""

    def __init__(self, lm, out_dir, plan: CDPlan, ev: EvalOptions):
        self.lm, self.out_dir, self.plan, self.ev = lm, Path(out_dir), plan, ev
        self.manifest = data.load_manifest(self.out_dir)
        self.pattern = get_pattern(plan.pattern)
        self.model_name = ev.model_name or lm.name
        self.table = StudyTable(self.out_dir / "cd.csv")
        old_rows = self.table.read()
        self.done = set() if ev.force or "run_key" not in old_rows else set(old_rows["run_key"])
        self.icl_rows = StudyTable(self.out_dir / "icl.csv").read()
        self.vids = answer_token_ids(lm.tokenizer, self.pattern)
        self.runtime = teacher_runtime(lm)
        self.prov = {**provenance(), "model_weights_sha256": self.runtime["weights_sha256"]}
        self.precision = precision_tag(lm)
        self.frames = {es: data.read_split(self.out_dir, info) for es, info in self.manifest["eval_sets"].items()}
        self.pools = {p: data.read_split(self.out_dir, info) for p, info in self.manifest["demo_pools"].items()}
        # training task -> the evaluation sets of its students (in domain first)
        self.sets_of_task = {task: data.student_eval_sets(self.manifest, task, plan.ood_train_tasks is None
                                                          or task in plan.ood_train_tasks) for task in plan.train_tasks}
        pool_digests = {p: pool_digest(data.file_sha256(self.out_dir / info["file"]))
                        for p, info in self.manifest["demo_pools"].items()}
        self.students = plan.students(self.manifest, self.sets_of_task, self.model_name, self.pattern.name,
                                      self.precision, pool_digests)
        self.keys_of = {(p.method, p.task, p.k, p.seed): dict(zip(p.eval_sets, p.keys)) for p in self.students}
        self.step_memory = {}  # (transfer set, recipe) -> training_step_memory
        self.transfer_sets = {}  # (task, seed) -> its transfer set
        # run_key -> row, of this sweep and of earlier ones (resume): the predictions of PBFT and control students
        self.run_rows = {r["run_key"]: r for r in old_rows.to_dict("records")} if "run_key" in old_rows else {}
        self.main = dist.world()[1] == 0
        self.counter = RunCounter(len(self.students))  # the "[run i/n]" lines of run()

    def say(self, msg: str) -> None:
        if self.main:
            log.info(msg)

    def run(self) -> pd.DataFrame:
        plan, students = self.plan, self.students
        check_tracker(plan.log_with)  # before any work
        if self.lm.dtype in HALF_DTYPES and self.ev.fidelity_sample > 0 and self.main:
            log.warning(f"{self.lm.dtype} on {self.lm.device}: teachers and students are scored at 16 bits, which flips "
                        f"near-tied predictions; each student row records the share of its first "
                        f"{self.ev.fidelity_sample} queries that its float32 weights answer otherwise (fidelity_flip_rate)")
        order = [(p.method, p.task, p.k, p.seed) for p in students if p.method != "icl_ensemble"]
        keep = [p.method != "icl_ensemble" and should_save(plan.save_students, p.method, p.task, p.k, p.seed, order)
                for p in students]
        missing = missing_icl_runs(self.icl_rows, self.model_name, self.pattern.name, students, self.precision)
        if missing:  # before any teacher or student runs: the comparisons need these rows
            raise FileNotFoundError(
                f"{len(missing)} ICL runs this CD sweep compares with are not in {self.out_dir / 'icl.csv'} "
                f"({self.model_name}, {self.pattern.name}, {self.precision}): {', '.join(missing)}. Run "
                "notebooks/02_icl_baselines with the same model, pattern, dtype and device, with 0 and "
                "every cd_k in ks and the same seeds, first")
        planned = []
        for p, save in zip(students, keep):
            planned += p.keys
            if all(k_ in self.done for k_ in p.keys):
                self.say(f"skip (done): {p.key_base}")
                self.counter.skip()
            elif p.method == "icl_ensemble":
                self.say(self.counter.start(f"ICL ENSEMBLE  {p.task}  {plan.ensemble.m} x k={p.k}  seed={p.seed}"))
                self.run_rows.update(self.run_icl_ensemble(p))
            else:
                self.run_student(p, save)
        out = self.table.read()
        return out[out["run_key"].isin(planned)].reset_index(drop=True)

    # ------------------------------------------------------------------ inputs shared by several students

    def demos_of(self, p: PlannedStudent):
        """The k demonstrations of ``p``'s single-prompt teacher (PBFT: its labelled examples)."""
        pool = self.pools[self.manifest["eval_sets"][p.es_in]["demo_pool"]]
        return data.sample_demonstrations(pool, p.k, p.seed, exclude=self.frames[p.es_in])

    def transfer_of(self, task: str, seed: int):
        """One transfer set per (task, seed), the same for every k and every student kind: disjoint from every
        k's demonstrations and the task's evaluation sets."""
        if (task, seed) not in self.transfer_sets:
            es_in, *_ = sets = self.sets_of_task[task]
            pool = self.pools[self.manifest["eval_sets"][es_in]["demo_pool"]]
            seed_demos = [data.sample_demonstrations(pool, kk, seed, exclude=self.frames[es_in]) for kk in self.plan.ks]
            self.transfer_sets[task, seed] = transfer_set(pool, self.plan.n_transfer, seed,
                                                          [*seed_demos, *(self.frames[es] for es in sets)])
        return self.transfer_sets[task, seed]

    def ensemble_sets(self, task: str, k: int, seed: int) -> list:
        """m disjoint demonstration sets; set 0 is the single teacher's."""
        es_in, *_ = sets = self.sets_of_task[task]
        return data.demonstration_sets(self.pools[self.manifest["eval_sets"][es_in]["demo_pool"]], k,
                                       self.plan.ensemble.m, seed, exclude=[self.frames[es_in], self.transfer_of(task, seed),
                                                                            *(self.frames[es] for es in sets)])

    def icl(self, es: str, k: int, seed: int):
        """``(row, predictions)`` of the ICL run (k = 0: zero-shot) on ``es``."""
        return icl_predictions(self.out_dir, self.icl_rows, self.model_name, es, self.pattern.name, k, seed,
                               self.precision)

    def largest_icl(self, es: str, seed: int):
        """The single-prompt ICL run with the most demonstrations for (es, seed): ``(k, predictions)``."""
        sel = icl_runs(self.icl_rows, self.model_name, es, self.pattern.name, self.precision)
        kmax = int(sel.loc[(sel["seed"] == seed) & (sel["k"] > 0) & (sel["n_eval"] > 0), "k"].max())
        return kmax, self.icl(es, kmax, seed)[1]

    def student_preds(self, method: str, task: str, k: int, seed: int, es: str):
        """A planned student's predictions on ``es``, once its rows exist (else None)."""
        row = self.run_rows.get(self.keys_of.get((method, task, k, seed), {}).get(es))
        return None if row is None else read_predictions(self.out_dir / row["predictions_file"])

    def control_preds(self, task: str, k: int, seed: int, es: str, method: str = "cd") -> dict:
        """The control students' predictions for a CD student on ``es`` (the shuffled control permutes one
        teacher's targets: the largest k's)."""
        got = {"self": self.student_preds("cd_self", task, 0, seed, es),
               "shuffled": self.student_preds("cd_shuffled", task, k, seed, es)
               if k == self.plan.control_k and method == "cd" else None}
        return {name: p for name, p in got.items() if p is not None}

    def common_columns(self, key: str, method: str, task: str, es: str, es_in: str, k: int, seed: int) -> dict:
        """The first columns of every cd.csv row, in their order."""
        lm, einfo = self.lm, self.manifest["eval_sets"][es]
        return {**run_columns(key, method, self.model_name, lm), **device_columns(lm), **process_columns(lm),
                "train_task": task, "task": einfo["task"], "split": einfo["split"], "in_domain": es == es_in,
                "pattern": self.pattern.name, "k": k, "seed": seed}

    # ------------------------------------------------------------------ a teacher ensemble at inference

    def run_icl_ensemble(self, p: PlannedStudent) -> dict:
        """The ``icl_ensemble`` rows: the m prompts at inference on each evaluation set (set 0 reuses the
        single-prompt ICL run's predictions where its demonstrations are the same), with exact McNemar tests
        against the zero-shot model and the single-prompt ICL run of the largest k (``icl_k``); written to
        cd.csv and returned as ``{run_key: row}``."""
        sets, ens = self.ensemble_sets(p.task, p.k, p.seed), self.plan.ensemble
        demo_text = "|".join(";".join(map(str, d["idx"])) for d in sets)
        rows = []
        for es, key in zip(p.eval_sets, p.keys):
            einfo = self.manifest["eval_sets"][es]
            known = {}
            row0, preds0 = self.icl(es, p.k, p.seed)
            if str(row0["demo_ids"]) == ";".join(map(str, sets[0]["idx"])):
                m0 = {c: row0[c] for c in ("score_acc", "wall_s", "s_per_query", "tokens_processed", "prefix_tokens",
                                           "n_prefix_fallback", "query_tokens_mean", "scoring", "peak_mem_mb",
                                           "peak_mem_delta_mb", "mem_kind", "single_token_verbalizers",
                                           "pred_label1_frac")}
                m0["prefix_reuse_note"] = row0["prefix_reuse_note"] if isinstance(row0["prefix_reuse_note"], str) else ""
                known[0] = (m0, preds0)
            metrics, preds = evaluate_ensemble(self.lm, self.frames[es], self.pattern, sets, ens.combine,
                                               batch_size=self.ev.batch_size, progress=self.ev.progress,
                                               max_tokens=self.ev.max_tokens, known=known)
            pfile = predictions_file("icl_ensemble", key)
            if self.main:
                write_predictions(preds, self.out_dir / pfile)
            zrow, zpreds = self.icl(es, 0, 0)
            ik, ipreds = self.largest_icl(es, p.seed)
            rows.append({
                **self.common_columns(key, "icl_ensemble", p.task, es, p.es_in, p.k, p.seed),
                **eval_set_columns(einfo), "demo_ids": demo_text, "zeroshot_acc": zrow["score_acc"],
                "member0_reused": bool(known), **metrics, **paired_vs(preds, zpreds, "zeroshot"),
                **paired_vs(preds, ipreds, "icl"), "icl_k": ik, "predictions_file": pfile, "profile": self.ev.profile,
                **self.prov, "student_dir": ""})
            self.say(f"  {es}: acc={metrics['score_acc']:.3f} (members {metrics['member_acc_min']:.3f}-"
                     f"{metrics['member_acc_max']:.3f}; ICL k={ik} {ipreds['pred'].eq(ipreds['label']).mean():.3f}, "
                     f"zero-shot {zrow['score_acc']:.3f})  {metrics['s_per_query'] * 1000:.0f} ms/query")
        if self.main:
            self.table.append(rows)
        dist.barrier()
        return {r["run_key"]: r for r in rows}

    # ------------------------------------------------------------------ a student

    def training_inputs(self, p: PlannedStudent, demos):
        """``(examples, train frame, teacher, demo_ids text)`` of one student: for CD and its controls the
        transfer set with the (cached) teacher targets, for PBFT its labelled demonstrations."""
        lm, pattern = self.lm, self.pattern
        if p.method == "pbft":
            return (student_data.student_examples(lm.tokenizer, pattern, demos, None, lm.max_context), demos,
                    {"seconds": 0.0, "cache_hit": None}, ";".join(map(str, demos["idx"])))
        train = self.transfer_of(p.task, p.seed)
        tdemos = self.ensemble_sets(p.task, p.k, p.seed) if p.method == "cd_ensemble" else demos
        pool_name, combine = self.manifest["eval_sets"][p.es_in]["demo_pool"], self.plan.ensemble.combine
        model = TeacherModel(f"{self.model_name}:{lm.source}", lm.dtype, lm.device, self.runtime)
        tkey = teacher_cache_key(model, pool_name, pattern, p.k, p.seed, tdemos, train, p.cfg, combine=combine)
        teach = teacher.teacher_targets(lm, pattern, tdemos, train, p.cfg,
                                        TeacherCache(self.out_dir / "teacher_cache", tkey, self.ev.force),
                                        batch_size=self.ev.batch_size, progress=self.ev.progress,
                                        max_tokens=self.ev.max_tokens, combine=combine)
        demo_text = ";".join(map(str, demos["idx"]))
        if p.method == "cd_ensemble":  # every set, sets separated by '|'
            demo_text = "|".join(";".join(map(str, d["idx"])) for d in tdemos)
        if p.method == "cd_shuffled":  # the same targets, each given to another transfer query
            perm = torch.from_numpy(np.random.default_rng(20_000 + p.seed).permutation(len(train)))
            teach = {**teach, "logp": teach["logp"][perm],
                     "topk_ids": None if teach.get("topk_ids") is None else teach["topk_ids"][perm]}
        return student_data.student_examples(lm.tokenizer, pattern, train, teach, lm.max_context), train, teach, demo_text

    def run_student(self, p: PlannedStudent, save: bool) -> None:
        """Train, evaluate, compare, (save) and write one student: its rows go to cd.csv last, so a student
        whose rows exist has its predictions and training log too."""
        lm, ev = self.lm, self.ev
        self.say(self.counter.start(f"{p.method.upper()}  {p.task}  k={p.k}  seed={p.seed}  train n={p.n_train}"
                 + (f"  ({self.plan.ensemble.m} demonstration sets)" if p.method == "cd_ensemble" else "")))
        demos = self.demos_of(p)
        examples, train, teach, demo_text = self.training_inputs(p, demos)
        tracking = (training.Tracking(self.plan.log_with, p.key_base, self.out_dir / "trackers")
                    if self.plan.log_with else None)
        student, st = training.train_student(lm.model, lm.tokenizer, examples, p.cfg, self.vids, progress=ev.progress,
                                             tracking=tracking)
        mkey = (ids_digest(list(map(str, train["idx"]))), json.dumps(asdict(p.cfg), sort_keys=True))
        if mkey not in self.step_memory:  # the same inputs and recipe (CD and its control students): the same step
            self.step_memory[mkey] = training_step_memory(lm.model, lm.tokenizer, examples, p.cfg, self.vids)
        tmem = self.step_memory[mkey]
        # evaluated at the run's precision, like its teacher and the zero-shot model (trained in float32); at 16 bits
        # its float32 weights are kept to measure how many predictions the precision flips
        ref = (wrap(float32_copy(student), lm.tokenizer, name=f"{p.method}-student-float32", device=lm.device)
               if lm.dtype in HALF_DTYPES and ev.fidelity_sample > 0 else None)
        slm = wrap(student.to(next(lm.model.parameters()).dtype), lm.tokenizer, name=f"{p.method}-student",
                   device=lm.device)
        train_cols = {"n_train": p.n_train, "train_ids_digest": ids_digest(list(map(str, train["idx"])))}
        cost = {"teacher_cache_s": teach["seconds"], "teacher_cache_hit": teach["cache_hit"],
                "train_s": st["train_s"], "train_peak_mem_mb": st["train_peak_mem_mb"],
                "train_mem_delta_mb": st["train_mem_delta_mb"], "train_steps": st["steps"],
                "train_mem_tensors_peak_mb": tmem.peak_mb, "train_mem_work_mb": tmem.work_mb,
                "loss_first": st["losses"][0], "loss_last": st["losses"][-1]}
        new_rows = [self.student_row(p, slm, es, key, demos, demo_text, train_cols, cost, ref)
                    for es, key in zip(p.eval_sets, p.keys)]
        student_dir = f"students/{p.method}-{p.task}-k{p.k}-s{p.seed}-{ids_digest([p.key_base])}" if save else ""
        if save and self.main:
            self.save(p, slm, student_dir, new_rows, demo_text)
        for r in new_rows:
            r["student_dir"] = student_dir
        if self.main:  # under a launcher (accelerate launch, torchrun) the main process writes; all compute
            StudyTable(self.out_dir / "train_log.csv").append(training_log(p.key_base, st, p.cfg.grad_accum),
                                                               replace="student")
            self.table.append(new_rows)  # last: a student whose rows exist has its predictions and training log too
        self.run_rows.update({r["run_key"]: r for r in new_rows})
        dist.barrier()
        del student, slm, ref
        gc.collect()

    def student_row(self, p: PlannedStudent, slm, es: str, key: str, demos, demo_text: str, train_cols: dict,
                    cost: dict, ref=None) -> dict:
        """One student's row on ``es``: its metrics, predictions file and comparisons (``ref``: the student in
        float32, when it is evaluated at 16 bits: the row records how many predictions that flips)."""
        einfo, frame = self.manifest["eval_sets"][es], self.frames[es]
        metrics, preds = evaluate(slm, frame, self.pattern, frame.iloc[0:0], batch_size=self.ev.batch_size,
                                  progress=self.ev.progress, max_tokens=self.ev.max_tokens)
        pfile = predictions_file(p.method, key)
        if self.main:
            write_predictions(preds, self.out_dir / pfile)
        zrow, zpreds = self.icl(es, 0, 0)
        ag_z = self.comparisons(p, es, preds, zpreds, demos)
        fid = precision_flips(ref, preds, frame, self.pattern, frame.iloc[0:0], self.ev.fidelity_sample,
                              self.ev.batch_size, self.ev.max_tokens) if ref is not None else {}
        row = {**self.common_columns(key, p.method, p.task, es, p.es_in, p.k, p.seed), **train_cols,
               **eval_set_columns(einfo), "demo_ids": demo_text,
               "zeroshot_acc": zrow["score_acc"], **{f"cfg_{a}": b for a, b in asdict(p.cfg).items()},
               **cost, **metrics, **ag_z, **fid, "predictions_file": pfile, "profile": self.ev.profile, **self.prov}
        self.say(f"  {es}: acc={metrics['score_acc']:.3f} (zero-shot {zrow['score_acc']:.3f}, majority "
                 f"{metrics['majority_acc']:.3f})" + (f"  agree(teacher) {ag_z['agree_teacher_student']:.3f} vs "
                                                      f"zero-shot {ag_z['agree_teacher_zeroshot']:.3f}, constant "
                                                      f"{ag_z.get('agree_teacher_constant', float('nan')):.3f}"
                                                      if "agree_teacher_student" in ag_z else ""))
        return row

    def comparisons(self, p: PlannedStudent, es: str, preds, zpreds, demos) -> dict:
        """A student's paired comparisons on ``es``: with the zero-shot model; for CD and its controls with the
        (largest k's) teacher, and for CD students with the controls, PBFT and (ensembles) ICL and single CD."""
        ag_z = paired_vs(preds, zpreds, "zeroshot")
        if p.method == "pbft":
            return ag_z
        method, task, k, seed = p.method, p.task, p.k, p.seed
        tk = k if method in ("cd", "cd_ensemble") else self.plan.control_k
        if method == "cd_ensemble":  # its teacher: the same ensemble at inference
            trow = self.run_rows[self.keys_of[("icl_ensemble", task, k, seed)][es]]
            tpreds, same_demos = read_predictions(self.out_dir / trow["predictions_file"]), True
            ik, ipreds = self.largest_icl(es, seed)
            c1 = self.student_preds("cd", task, k, seed, es)
            ag_z = {**ag_z, **paired_vs(preds, ipreds, "icl"), "icl_k": ik, "ensemble_m": self.plan.ensemble.m,
                    "ensemble_combine": self.plan.ensemble.combine, **(paired_vs(preds, c1, "cd") if c1 is not None else {})}
        else:
            trow, tpreds = self.icl(es, tk, seed)
            same_demos = trow["demo_ids"] == ";".join(map(str, demos["idx"]))
        a_s, a_z = agreement(tpreds, preds), agreement(tpreds, zpreds)
        student = method in ("cd", "cd_ensemble")
        pb = self.student_preds("pbft", task, self.plan.pbft_n, seed, es) if student else None
        return {**ag_z, **paired_vs(preds, tpreds, "teacher"), "controls_k": tk,
                **(controls_vs(preds, tpreds, zpreds, self.control_preds(task, k, seed, es, method)) if student else {}),
                **(paired_vs(preds, pb, "pbft") if pb is not None else {}),
                "teacher_acc": trow["score_acc"], "teacher_same_demos": bool(same_demos),
                "agree_teacher_student": a_s["agreement"], "kappa_teacher_student": a_s["kappa"],
                "kl_teacher_student": a_s["kl"], "agree_teacher_zeroshot": a_z["agreement"],
                "kappa_teacher_zeroshot": a_z["kappa"], "kl_teacher_zeroshot": a_z["kl"]}

    def save(self, p: PlannedStudent, slm, student_dir: str, new_rows: list, demo_text: str) -> None:
        """The student as a Hugging Face model folder with its model card and student.json."""
        lm, profile = self.lm, self.ev.profile
        metrics_by_set = {r["task"] + "/" + r["split"]: {c: r.get(c) for c in (
            "n_eval", "score_acc", "zeroshot_acc", "teacher_acc", "agree_teacher_student", "kl_teacher_student")}
            for r in new_rows}
        for v in metrics_by_set.values():
            v["n"] = v.pop("n_eval")
        save_student(slm.model, lm.tokenizer, self.out_dir / student_dir, {
            "student_key": p.key_base, "method": p.method, "train_task": p.task, "k": p.k, "seed": p.seed,
            "n_train": p.n_train, "base_model": self.model_name, "base_model_source": lm.source,
            "base_model_reference": (lm.info or {}).get("reference"),
            "demo_pool": self.manifest["eval_sets"][p.es_in]["demo_pool"],
            "demo_ids": [int(i) if str(i).isdigit() else str(i) for i in demo_text.replace("|", ";").split(";") if i],
            "pattern": {"name": self.pattern.name, "template": self.pattern.template,
                        "verbalizers": list(self.pattern.verbalizers)},
            "dtype": lm.dtype, "device": lm.device, "recipe": asdict(p.cfg), "metrics": metrics_by_set,
            "profile": profile, "provenance": self.prov, "command": f"profile {profile!r}: " + run_command()})
        self.say(f"  saved: {student_dir}")
