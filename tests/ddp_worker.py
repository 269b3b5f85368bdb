"""Run by the tests under torchrun: a few CD steps on a tiny model; rank 0 writes the losses.

    python -m torch.distributed.run --nproc_per_node N tests/ddp_worker.py OUT.json PER_PROCESS_BATCH [MODE]

MODE ``nan-rank1``: rank 1's teacher targets are NaN. Every rank that stops with a FloatingPointError
prints ``rank R: FloatingPointError: ...`` and, once all ranks are there, exits with status 1.
"""
import json
import os
import sys

import torch
from accelerate import Accelerator

from llmft_utils import distill, models


def rows(tok, n=16, nan=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = tok(f"The cat sat {'on the mat ' * (i % 3)}question: A cat sat . Yes or No? answer:").input_ids
        logp = torch.log_softmax(torch.randn(2, generator=g), -1)
        out.append({"input_ids": ids, "label": i % 2, "teacher_logp": logp * float("nan") if nan else logp})
    return out


def main(out_path: str, per_process_batch: int, mode: str = "") -> int:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    tok = models.tiny_tokenizer()
    model = models.tiny_model("llama", tok, seed=0)
    cfg = distill.DistillConfig(target="verbalizer", epochs=2, batch_size=per_process_batch, lr=5e-3, shuffle=False, max_grad_norm=0.0)
    vids = [tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")]
    data = rows(tok, nan=mode == "nan-rank1" and acc.process_index == 1)
    try:
        _, stats = distill.train_student(model, tok, data, cfg, vids, accelerator=acc)
    except FloatingPointError as e:
        print(f"rank {acc.process_index}: FloatingPointError: {e}", file=sys.stderr, flush=True)
        acc.wait_for_everyone()  # both messages are out before torchrun stops the group on the first exit
        return 1
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"losses": stats["losses"], "world": acc.num_processes,
                       "backend": str(acc.state.backend)}, f)
    acc.wait_for_everyone()  # no rank tears the process group down while another still uses it
    acc.end_training()
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
    # Skip interpreter teardown: with gloo on CPU, a rank occasionally aborts in a C++ destructor
    # ("terminate called without an active exception") after the work is done and the group destroyed,
    # which would make this test flaky for reasons outside the code under test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
