"""Wall-time and peak-memory probes.

GPU: ``torch.cuda.synchronize`` around a ``perf_counter`` timer, ``reset_peak_memory_stats`` before and
``max_memory_allocated`` after. CPU: peak resident set size of this process; Linux lets us reset the
high-water mark (``/proc/self/clear_refs`` ← 5), so the peak is the block's own. Where that reset is not
possible the row says ``cpu_peak_rss_process`` (peak over the whole process so far). ``mem_delta_mb`` is
the peak minus what was resident when the block started: the block's own working memory (KV cache,
activations, optimizer state), comparable between ICL and a student evaluated in a busier process.

RSS on a CPU does not attribute memory to work done in a long-lived process: freed blocks stay with the
allocator, so a later run that fits in them shows ~0 MB. :func:`tensor_memory` measures instead what
the tensors of one piece of work occupy at their peak (the weights, plus every storage its torch ops
create while it is alive), the same quantity on every device and in any process; the kit applies it to
each run's largest batch and to one training step.
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


# Environment variables that change which CPU kernels run (and so the last bits of a float sum), then those that
# change how the work is split or what else is recorded: all go into provenance, the first into device_capability
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
ISA_ENV = KERNEL_ENV + ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "CUBLAS_WORKSPACE_CONFIG")


def _env_text(names) -> str:
    import os

    return ";".join(f"{k}={os.environ[k]}" for k in names if os.environ.get(k))


def cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model name")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_versions() -> dict:
    """BLAS and oneDNN as torch was built with them (from ``torch.__config__.show()``)."""
    import re

    try:
        text = torch.__config__.show()
    except Exception:  # noqa: BLE001 - an exotic build: record what is known
        return {}
    out = {}
    m = re.search(r"Math Kernel Library Version ([\w.\-]+)", text)
    blas = re.search(r"BLAS_INFO=(\w+)", text)
    out["blas"] = (f"mkl {m.group(1)}" if m else (blas.group(1) if blas else "unknown"))
    d = re.search(r"(?:MKL-DNN|oneDNN) v([\w.]+)", text)
    out["onednn"] = d.group(1) if d else ""
    return out


def environment() -> dict:
    """What decides the last bits of this process's numbers, one flat dict (recorded in every result row and
    run manifest): CPU model and architecture, the CPU kernel set ATen dispatches to
    (``torch.backends.cpu.get_cpu_capability()``), BLAS and oneDNN versions, intra-/inter-op threads, the
    determinism switches, the environment variables that restrict instruction sets, and on CUDA the GPU's
    name, compute capability and the CUDA/cuDNN versions."""
    import platform

    env = {"cpu_model": cpu_model(), "machine": platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), **_build_versions(),
           "num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads(),
           "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
           "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
           "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
           "isa_env": _env_text(ISA_ENV),
           "gpu_name": "", "gpu_capability": "", "cuda": "", "cudnn": "", "tf32_matmul": ""}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        env.update(gpu_name=torch.cuda.get_device_name(0), gpu_capability=f"sm_{major}{minor}",
                   cuda=torch.version.cuda or "", cudnn=str(torch.backends.cudnn.version() or ""),
                   tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    return env


def device_capability(device: str) -> str:
    """The kernel set that computes on ``device``: ``sm_90`` for a CUDA GPU, ATen's CPU capability
    (``AVX512``, ``AVX2``, ``DEFAULT``, ...) plus any instruction-set restriction from the environment."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        return f"sm_{major}{minor}"
    isa = _env_text(KERNEL_ENV)
    return torch.backends.cpu.get_cpu_capability() + (f"[{isa}]" if isa else "")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX: oneDNN's bf16 kernels). Without it bf16
    runs through conversions: on an AVX2-only AMD EPYC, bf16 scoring took 7x and a bf16-autocast training step
    24x the float32 time (benchmarks/results/efficiency-2026-12-06-epyc-avx2.json). True when torch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@dataclass
class TensorMemory:
    peak_mb: float = float("nan")  # weights (+ optimizer states) + the block's own tensors at their peak
    weights_mb: float = float("nan")  # parameters and buffers of the given modules
    work_mb: float = float("nan")  # peak minus weights: activations, KV cache, temporaries, gradients, optimizer
    by_kind_mb: dict | None = None  # weights, optimizer states (held before the block), the block's tensors
    method: str = ""


def _storage_bytes(tensors) -> dict:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


class _LiveBytes:
    """Counts the bytes of the storages created by torch ops while active, and their peak: each output
    storage is counted once, and released when the storage is freed (a weak reference's callback)."""

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live, self.peak = 0, 0
        self.seen: dict = {}

        def release(key):
            tracker.live -= tracker.seen.pop(key, (0, None))[0]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = id(st), st.data_ptr()
                        if st.data_ptr() and key not in tracker.seen and st.nbytes():
                            try:
                                ref = weakref.ref(st, lambda _r, key=key: release(key))
                            except TypeError:  # a storage without weak references: counted, never released
                                ref = None
                            tracker.seen[key] = (st.nbytes(), ref)
                            tracker.live += st.nbytes()
                            tracker.peak = max(tracker.peak, tracker.live)
                return out

        self.mode = Mode()


@contextmanager
def tensor_memory(*modules, optimizer=None):
    """``with tensor_memory(model) as m: work()`` then ``m.peak_mb``, ``m.weights_mb``, ``m.work_mb``: the peak
    bytes of live tensors during the block: the given modules' parameters and buffers and ``optimizer``'s
    states held when the block starts, plus the storages the block's torch ops create (activations, KV
    cache, logits, gradients, new optimizer states), counted while alive (a ``TorchDispatchMode`` and weak
    references on the storages). Device-independent: on a CPU the analogue of CUDA's
    ``max_memory_allocated`` for the block, allocator caching and fragmentation not counted; a few ms of
    overhead per forward."""
    r = TensorMemory()
    weights = _storage_bytes([t for m in modules for t in (*m.parameters(), *m.buffers())])
    states = {}
    if optimizer is not None:
        states = _storage_bytes([v for st in optimizer.state.values() for v in st.values()])
    lb = _LiveBytes()
    with lb.mode:
        yield r
    w, o, new = sum(weights.values()) / 2**20, sum(states.values()) / 2**20, lb.peak / 2**20
    r.weights_mb, r.peak_mb = w, w + o + new
    r.work_mb = r.peak_mb - w
    r.by_kind_mb = {"weights": round(w, 3), "optimizer_states_before": round(o, 3), "block_tensors_peak": round(new, 3)}
    r.method = "torch_tensor_bytes"
