"""Run by the tests under torchrun: ICL scoring and teacher targets on a tiny model, sharded over the
processes (scoring.forward.run_groups); rank 0 writes what every process got back.

    python -m torch.distributed.run --nproc_per_node N tests/shard_worker.py OUT.pt
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import toy_data  # noqa: E402

from llmft_utils import (  # noqa: E402
    data,
    distill,  # noqa: E402
    models,
    patterns,
    scoring,  # noqa: E402
)


def compute():
    tok = models.tiny_tokenizer(add_bos=True)
    lm = models.wrap(models.tiny_model("opt", tok, seed=1, max_positions=1024), tok, name="tiny-opt")
    ev, pool = toy_data.frames(n_eval=23, n_pool=30)
    ev.loc[5, "premise"] = " ".join(["doctor"] * 30)
    pat = patterns.get_pattern("gpt-3")
    demos = data.sample_demonstrations(pool, 4, seed=0, exclude=ev)
    m, preds = scoring.evaluate(lm, ev, pat, demos, batch_size=4, progress=False)
    teacher = distill.teacher_targets(lm, pat, demos, ev, distill.DistillConfig(target="topk", topk=5), batch_size=3)
    # one query: one batch for two processes, so one of them scores nothing and gets the other's result
    lone = scoring.answer_logits(lm, patterns.build_prefix(pat, demos), [patterns.query_text(pat, "A b.", "C.", True)],
                             lambda z: torch.log_softmax(z, -1))
    return {"lone": lone,
            "logp": preds[["logp_label0", "logp_label1"]].to_numpy(), "pred": preds["pred"].to_numpy(),
            "top1": preds["top1_token"].to_numpy(), "teacher_logp": teacher["logp"], "teacher_ids": teacher["topk_ids"],
            "tokens": m["tokens_processed"]}


def main(out: str) -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    res = compute()
    res["world"] = dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # see ddp_worker.py: gloo teardown can abort after the work is done
