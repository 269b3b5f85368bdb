"""Run by tests/test_distill.py under torchrun: a few CD steps on a tiny model; rank 0 writes the losses.

    python -m torch.distributed.run --nproc_per_node N tests/ddp_worker.py OUT.json PER_PROCESS_BATCH
"""
import json
import os
import sys

import torch
from accelerate import Accelerator

from llmft_utils import distill, models


def rows(tok, n=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = tok(f"The cat sat {'on the mat ' * (i % 3)}question: A cat sat . Yes or No? answer:").input_ids
        out.append({"input_ids": ids, "label": i % 2, "teacher_logp": torch.log_softmax(torch.randn(2, generator=g), -1)})
    return out


def main(out_path: str, per_process_batch: int) -> None:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    tok = models.tiny_tokenizer()
    model = models.tiny_model("llama", tok, seed=0)
    cfg = distill.DistillConfig(epochs=2, batch_size=per_process_batch, lr=5e-3, shuffle=False, max_grad_norm=0.0)
    vids = [tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")]
    _, stats = distill.train_student(model, tok, rows(tok), cfg, vids, accelerator=acc)
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"losses": stats["losses"], "world": acc.num_processes,
                       "backend": str(acc.state.backend)}, f)
    acc.wait_for_everyone()  # no rank tears the process group down while another still uses it
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    # Skip interpreter teardown: with gloo on CPU, a rank occasionally aborts in a C++ destructor
    # ("terminate called without an active exception") after the work is done and the group destroyed,
    # which would make this test flaky for reasons outside the code under test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
