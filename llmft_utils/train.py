"""Notebook 03's step (CD and PBFT students) as a command, for one process or a launcher.

    python -m llmft_utils.train --profile default                       # one process, as the notebook runs it
    accelerate launch --config_file configs/ddp.yaml -m llmft_utils.train --profile gpu --set device=cuda
    torchrun --nproc_per_node 2 -m llmft_utils.train --profile smoke --set results_dir=/tmp/r

The parameters are the notebook's (a profile, ``--set NAME=VALUE`` overrides), checked before anything
runs; notebooks 01 and 02 must have written the results folder. Under a launcher every process loads
the model; teacher caching and every evaluation are split over the processes and gathered back, each
student trains data-parallel (accelerate: DDP, or FSDP/DeepSpeed from the config file on GPUs), and
the main process alone writes — the same rows as the notebook path. The frozen teacher is not
needed while training: its outputs are cached before the student's first step.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from . import models, params, pipeline, store
    from .study import cd_sweep

    ap = argparse.ArgumentParser(prog="python -m llmft_utils.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, choices=sorted(pipeline.PROFILES))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    p = pipeline.resolve_params(a.profile, pipeline.parse_sets(ap, a.set), a.force)
    try:
        pipeline.check_run(p, ["03_context_distillation.ipynb"])
    except params.ParameterError as e:
        print(f"nothing was run: {e}", file=sys.stderr)
        return 2
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # joins the launcher's process group, if any
    if state.num_processes > 1 and p["device"] == "auto":
        p["device"] = str(state.device)  # each process on its own GPU
    out = store.results_dir(p["results_dir"], p["profile"])
    lm = models.load_model(p["model"], device=p["device"], dtype=p["dtype"])
    cd_sweep.sweep_from_params(lm, out, p)
    return 0


if __name__ == "__main__":
    rc = main()
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(rc)
