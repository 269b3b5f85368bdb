"""The k × seed ICL sweep over a results folder's evaluation sets (notebook 02).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import data, logs
from ..distill.training import float32_copy
from ..models import weights_sha256
from ..patterns import get_pattern
from ..progress import RunCounter
from ..scoring.evaluation import HALF_DTYPES, evaluate, full_prompt_cost, precision_flips
from ..store import provenance
from .keys import icl_key, pool_digest, precision_tag
from .plan import EvalOptions, ICLPlan
from .rows import device_columns, eval_set_columns, predictions_file, process_columns, run_columns
from .schema import StudyTable, write_predictions

log = logs.get(__name__)


def run_sweep(lm, out_dir, plan: ICLPlan, ev: EvalOptions = EvalOptions()):
    """The ICL sweep of ``plan`` over every evaluation set in ``out_dir/manifest.json``, scored as ``ev`` says.

    Each finished (eval set, k, seed) appends one row to ``out_dir/icl.csv`` atomically and writes its
    per-example predictions to ``out_dir/predictions/``; rows already present are skipped unless
    ``ev.force``. k = 0 has no demonstrations and runs once (seed recorded as 0). Returns the plan's rows.
    """
    out_dir = Path(out_dir)
    manifest = data.load_manifest(out_dir)
    pattern = get_pattern(plan.pattern)
    table = StudyTable(out_dir / "icl.csv")
    done = set() if ev.force else table.done()
    prov = {**provenance(), "model_weights_sha256": weights_sha256(lm)}
    model_name = ev.model_name or lm.name
    pools = {name: data.read_split(out_dir, info) for name, info in manifest["demo_pools"].items()}
    ref = fidelity_reference(lm, ev.fidelity_sample)
    planned, runs = [], list(plan.runs(manifest["eval_sets"]))
    counter = RunCounter(len(runs))
    for es, k, seed in runs:
        info = manifest["eval_sets"][es]
        pool = pool_digest(data.file_sha256(out_dir / manifest["demo_pools"][info["demo_pool"]]["file"]))
        key = icl_key(model_name, es, pattern.name, k, seed, info["ids_digest"], precision_tag(lm), pool)
        planned.append(key)
        if key in done:
            log.info(f"skip (done): {key}")
            counter.skip()
            continue
        frame = data.read_split(out_dir, info)
        demos = data.sample_demonstrations(pools[info["demo_pool"]], k, seed, exclude=frame)
        log.info(counter.start(f"ICL {es}  k={k}  seed={seed}  n={len(frame)}"))
        metrics, preds = evaluate(lm, frame, pattern, demos, batch_size=ev.batch_size, on_too_long=ev.on_too_long,
                                  progress=ev.progress, max_tokens=ev.max_tokens)
        cost = full_prompt_cost(lm, frame, pattern, demos, plan.full_prompt_sample, ev.batch_size,
                                ev.max_tokens) if k else {}
        fid = precision_flips(ref, preds, frame, pattern, demos, ev.fidelity_sample, ev.batch_size,
                              ev.max_tokens) if ref is not None else {}
        pfile = predictions_file("icl", key)
        write_predictions(preds, out_dir / pfile)
        row = {**run_columns(key, "zero-shot" if k == 0 else "icl", model_name, lm), "n_params": lm.n_params,
               **device_columns(lm), "task": info["task"], "split": info["split"], "pattern": pattern.name, "k": k,
               "seed": seed, **eval_set_columns(info), "demo_pool": info["demo_pool"],
               "demo_ids": ";".join(map(str, demos["idx"])), "batch_size": ev.batch_size,
               "max_batch_tokens": ev.max_tokens, **process_columns(lm), "profile": ev.profile,
               "predictions_file": pfile, **metrics, **cost, **fid, **prov}
        table.append([row])
        _report(lm, metrics, fid)
    out = table.read()
    return out[out["run_key"].isin(planned)].reset_index(drop=True)


def fidelity_reference(lm, sample: int):
    """For a bfloat16/float16 model (and ``sample`` > 0): a float32 copy of its weights, against which every run
    measures how many of its predictions the precision flips (:func:`scoring.evaluation.precision_flips`), with
    a notice saying so. Otherwise None. The copy costs the weights' memory twice over."""
    if lm.dtype not in HALF_DTYPES or sample <= 0:
        return None
    log.warning(f"{lm.dtype} on {lm.device}: 16-bit scoring flips near-tied predictions (by 3-9% of this study's "
                f"predictions on a GPU, docs/gpu.md). Each run here scores its first {sample} queries again with a "
                "float32 copy of the weights and records the share that changed (fidelity_flip_rate in icl.csv); "
                "dtype=auto keeps float32.")
    return dataclasses.replace(lm, model=float32_copy(lm.model).eval(), dtype="float32")


def _report(lm, metrics: dict, fid: dict) -> None:
    if metrics["n_eval"] == 0:
        log.warning(f"  nothing evaluated: all {metrics['n_skipped_too_long']} prompts exceed the model's context "
                    f"of {lm.max_context} tokens (prefix {metrics['prefix_tokens']}); recorded with NaN metrics and "
                    "left out of the summary. Use fewer demonstrations or a longer-context model.")
        return
    skipped = f", {metrics['n_skipped_too_long']} too long and skipped" if metrics["n_skipped_too_long"] else ""
    log.info(f"  acc={metrics['score_acc']:.3f} (majority {metrics['majority_acc']:.3f}{skipped})  "
             f"{metrics['s_per_query']*1000:.1f} ms/query  peak {metrics['peak_mem_mb']:.0f} MB")
    if fid:
        log.info(f"  {lm.dtype} vs float32 on {fid['fidelity_n']} queries: {fid['fidelity_flip_rate']:.1%} of the "
                 f"predictions flipped (largest |d log-prob| {fid['fidelity_max_dlogp']:.3g})")
