"""Count the calls that make the host wait for the device (``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)``,
``.cpu()``, ...), by where they are made: on CPU nothing waits, but on a GPU each one stalls the queue of kernels,
so a loop over batches or steps must not make one per iteration."""
import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
         torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as s: ...``; then ``s.total`` and ``s.calls`` ({(method, "file:line"): count})."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            caller = traceback.extract_stack()[-2]
            self.calls[(func.__name__, f"{caller.filename.split('site-packages/')[-1]}:{caller.lineno}")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())
