"""Run by tests/test_distill.py: the CD steps of tests/ddp_worker.py (with clipping at 5), sharded with
FSDP2 on CPU (gloo).

    python -m accelerate.commands.launch --config_file configs/fsdp.yaml --num_processes N \
        tests/fsdp_worker.py OUT_DIR PER_PROCESS_BATCH      # FSDP2, N processes
    python tests/fsdp_worker.py OUT_DIR PER_PROCESS_BATCH   # the single-process reference (no FSDP)

Under ``accelerate launch`` with an FSDP config, accelerate passes the config to the processes as
environment variables (``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION=2``, ``FSDP_AUTO_WRAP_POLICY``, ...)
and ``Accelerator()`` builds a ``FullyShardedDataParallelPlugin`` from them; but ``AcceleratorState``
(accelerate 1.15, state.py, the ``elif self.distributed_type in [MULTI_GPU, ..., MULTI_NEURON]`` branch)
switches to ``DistributedType.FSDP`` only on an accelerator device, never on ``MULTI_CPU``, so on a
machine without one the processes would silently run DDP. torch's FSDP2 (``fully_shard``) runs on CPU
over gloo, so this worker, and only it, makes that one switch for ``MULTI_CPU``: the distributed type
becomes FSDP and the state keeps the plugin. Everything after that is accelerate's own FSDP2 path
(``Accelerator.prepare`` -> ``_prepare_fsdp2`` -> ``fsdp2_prepare_model``) and the kit's code.

Each process writes ``OUT_DIR/rank<R>.pt``: the losses, whether the prepared model's parameters were
DTensors (and which were split between the processes), the gradient norms, and the returned student's
state dict.
"""
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from ddp_worker import rows

from llmft_utils import distill, models


def allow_fsdp_on_cpu() -> None:
    """Let ``AcceleratorState`` take the FSDP plugin on ``MULTI_CPU`` as it does on ``MULTI_GPU``: the
    three assignments accelerate makes there (distributed type, plugin's mixed precision, plugin), and,
    like the end of ``AcceleratorState.__init__``, the distributed type copied into ``PartialState``,
    whose shared state every later ``AcceleratorState()`` is refreshed from."""
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = __init__


def main(out_dir: str, per_process_batch: int) -> int:
    torch.set_num_threads(1)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp:
        allow_fsdp_on_cpu()
    acc = Accelerator(cpu=True)
    assert (acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2) == fsdp, acc.distributed_type
    prepared = []
    real_prepare = acc.prepare

    def prepare(*args, **kwargs):  # keep the prepared student to look at its parameters
        out = real_prepare(*args, **kwargs)
        prepared.append(out[0])
        return out

    acc.prepare = prepare
    tok = models.tiny_tokenizer()
    model = models.tiny_model("llama", tok, seed=0)
    cfg = distill.DistillConfig(target="verbalizer", epochs=2, batch_size=per_process_batch, lr=5e-3, shuffle=False, max_grad_norm=5.0)
    vids = [tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")]
    student, stats = distill.train_student(model, tok, rows(tok), cfg, vids, accelerator=acc)

    from torch.distributed.tensor import DTensor

    params = dict(prepared[0].named_parameters())
    dtensor = {n: isinstance(p, DTensor) for n, p in params.items()}
    split = [n for n, p in params.items() if isinstance(p, DTensor) and p.to_local().shape != p.shape]
    mesh = {tuple(p.device_mesh.shape) for p in params.values() if isinstance(p, DTensor)}
    is_fsdp = acc.distributed_type == DistributedType.FSDP
    torch.save({"losses": stats["losses"], "grad_norms": stats["grad_norms"], "world": acc.num_processes,
                "distributed_type": str(acc.distributed_type), "fsdp2": acc.is_fsdp2,
                "fsdp_version": acc.state.fsdp_plugin.fsdp_version if is_fsdp else None,
                "backend": str(acc.state.backend), "dtensor": dtensor, "split": split, "mesh": sorted(mesh),
                "student_dtensor": any(isinstance(p, DTensor) for p in student.parameters()),
                "student_dtypes": sorted({str(p.dtype) for p in student.parameters()}),
                "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}},
               os.path.join(out_dir, f"rank{acc.process_index}.pt"))
    acc.wait_for_everyone()  # no rank tears the process group down while another still uses it
    acc.end_training()
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1], int(sys.argv[2]))
    # As in ddp_worker.py: skip interpreter teardown (gloo on CPU occasionally aborts in a C++ destructor).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
