"""Wall-time and peak-memory probes.

GPU: ``torch.cuda.synchronize`` around a ``perf_counter`` timer, ``reset_peak_memory_stats`` before and
``max_memory_allocated`` after. CPU: peak resident set size of this process; Linux lets us reset the
high-water mark (``/proc/self/clear_refs`` ← 5), so the peak is the block's own. Where that reset is not
possible the row says ``cpu_peak_rss_process`` (peak over the whole process so far). ``mem_delta_mb`` is
the peak minus what was resident when the block started: the block's own working memory (KV cache,
activations, optimizer state), comparable between ICL and a student evaluated in a busier process.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def _sync(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM`` peak RSS, ``VmRSS`` current RSS) in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class ProbeResult:
    wall_s: float = float("nan")
    peak_mem_mb: float = float("nan")  # peak of the whole process (CPU RSS) / all CUDA allocations
    mem_delta_mb: float = float("nan")  # peak minus what was already resident when the block started
    mem_kind: str = ""


@contextmanager
def probe(device: str = "cpu"):
    """``with probe(device) as r: ...`` then read ``r.wall_s``, ``r.peak_mem_mb``, ``r.mem_kind``."""
    r = ProbeResult()
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        reset_ok = _reset_hwm()
        start = _proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    try:
        yield r
    finally:
        _sync(device)
        r.wall_s = time.perf_counter() - t0
        if cuda:
            r.peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
            r.mem_delta_mb = r.peak_mem_mb - start / 2**20
            r.mem_kind = "cuda_max_allocated"
        else:
            hwm = _proc_status_bytes("VmHWM") if reset_ok else None
            if hwm is not None:
                r.peak_mem_mb, r.mem_kind = hwm / 2**20, "cpu_peak_rss"
                if start is not None:
                    r.mem_delta_mb = (hwm - start) / 2**20
            else:
                ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                r.peak_mem_mb = ru / 2**20 if sys.platform == "darwin" else ru / 1024
                r.mem_kind = "cpu_peak_rss_process"


def hardware() -> str:
    """One line describing where this ran."""
    import platform

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{cpu} x{torch.get_num_threads()} threads"
