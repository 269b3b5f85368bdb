"""The one switch between one process and a torch.distributed group (``accelerate launch``, ``torchrun``):
the world size and rank, whether this is the main process, a barrier, and gathering sharded results.
"""
from __future__ import annotations

import numpy as np
import torch


def world() -> tuple[int, int]:
    """``(world size, rank)`` of the running torch.distributed group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def gather_shards(positions: list, scores, top1, ex, world: int):
    """Every process's results at its ``positions`` (the rows it scored), in one set of arrays on every
    process: each sends only its own rows (``all_gather_object``) and fills in the others'."""
    idx = np.asarray(positions, dtype=np.int64)
    part = (idx, scores[idx], top1[idx], None if ex is None else tuple(None if e is None else e[idx] for e in ex))
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, part)
    with torch.inference_mode():  # ex holds inference tensors (from forward_rows)
        if ex is None:  # this process scored nothing: shaped like another's results
            first = next((g[3] for g in gathered if g[3] is not None), None)
            ex = None if first is None else tuple(None if e is None else e.new_zeros((len(scores), *e.shape[1:]))
                                                  for e in first)
        for pos, sc, t1, e in gathered:
            scores[pos], top1[pos] = sc, t1
            for out, got in zip(ex or (), e or ()):
                if out is not None:
                    out[torch.as_tensor(pos)] = got
    return scores, top1, ex


def barrier() -> None:
    if world()[0] > 1:
        torch.distributed.barrier()
