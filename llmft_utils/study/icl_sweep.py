"""The k × seed ICL sweep over a results folder's evaluation sets (notebook 02).
"""
from __future__ import annotations

from .. import data, dist, logs
from ..models import weights_sha256
from ..patterns import get_pattern
from ..scoring.evaluation import evaluate, full_prompt_cost
from ..store import ResultTable, atomic_write_parquet, ids_digest, provenance
from .keys import precision_tag

log = logs.get(__name__)


def run_sweep(lm, out_dir, pattern_name: str, ks, seeds, batch_size: int = 8, on_too_long: str = "error",
              force: bool = False, model_name: str | None = None, profile: str = "", progress: bool = True,
              max_tokens: int = 0, full_prompt_sample: int = 4):
    """The k × seed ICL sweep over every evaluation set in ``out_dir/manifest.json``.

    Each finished (eval set, k, seed) appends one row to ``out_dir/icl.csv`` atomically and writes its
    per-example predictions to ``out_dir/predictions/``; rows already present are skipped unless
    ``force``. k = 0 has no demonstrations and runs once (seed recorded as 0).
    """
    from pathlib import Path


    out_dir = Path(out_dir)
    manifest = data.load_manifest(out_dir)
    pattern = get_pattern(pattern_name)
    table = ResultTable(out_dir / "icl.csv")
    done = set() if force else table.done()

    prov = {**provenance(), "model_weights_sha256": weights_sha256(lm)}
    model_name = model_name or lm.name
    pools = {name: data.read_split(out_dir, info) for name, info in manifest["demo_pools"].items()}
    plan = [(es, k, s) for es in manifest["eval_sets"] for k in ks for s in (seeds if k > 0 else [0])]
    planned = []
    for es, k, seed in plan:
        info = manifest["eval_sets"][es]
        key = f"{model_name}|{es}|{pattern.name}|k{k}|s{seed}|eval{info['ids_digest']}|{precision_tag(lm)}"
        planned.append(key)
        if key in done:
            log.info(f"skip (done): {key}")
            continue
        ev = data.read_split(out_dir, info)
        demos = data.sample_demonstrations(pools[info["demo_pool"]], k, seed, exclude=ev)
        log.info(f"{es}  k={k}  seed={seed}  n={len(ev)}")
        metrics, preds = evaluate(lm, ev, pattern, demos, batch_size=batch_size, on_too_long=on_too_long,
                                  progress=progress, max_tokens=max_tokens)
        cost = full_prompt_cost(lm, ev, pattern, demos, full_prompt_sample, batch_size, max_tokens) if k else {}
        atomic_write_parquet(preds, out_dir / "predictions" / f"icl__{ids_digest([key])}.parquet")
        row = {"run_key": key, "method": "zero-shot" if k == 0 else "icl", "model": model_name,
               "model_source": lm.source, "n_params": lm.n_params, "device": lm.device, "dtype": lm.dtype,
               "task": info["task"], "split": info["split"], "pattern": pattern.name, "k": k, "seed": seed,
               "eval_full_size": info["full_size"], "eval_subsampled": info["subsampled"],
               "eval_ids_digest": info["ids_digest"], "demo_pool": info["demo_pool"],
               "demo_ids": ";".join(map(str, demos["idx"])), "batch_size": batch_size,
               "max_batch_tokens": max_tokens, "random_init": lm.source.startswith("random-init"),
               "n_processes": dist.world()[0], "profile": profile,
               "predictions_file": f"predictions/icl__{ids_digest([key])}.parquet", **metrics, **cost, **prov}
        table.append([row])
        if metrics["n_eval"] == 0:
            log.warning(f"  nothing evaluated: all {metrics['n_skipped_too_long']} prompts exceed the model's context "
                        f"of {lm.max_context} tokens (prefix {metrics['prefix_tokens']}); recorded with NaN metrics and "
                        "left out of the summary. Use fewer demonstrations or a longer-context model.")
            continue
        skipped = f", {metrics['n_skipped_too_long']} too long and skipped" if metrics["n_skipped_too_long"] else ""
        log.info(f"  acc={metrics['score_acc']:.3f} (majority {metrics['majority_acc']:.3f}{skipped})  "
                 f"{metrics['s_per_query']*1000:.1f} ms/query  peak {metrics['peak_mem_mb']:.0f} MB")
    out = table.read()
    return out[out["run_key"].isin(planned)].reset_index(drop=True)
