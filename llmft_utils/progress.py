"""Progress that reads well where the run is watched.

Interactive (a terminal, JupyterLab): ``tqdm.auto`` bars (widgets in Lab). Under the pipeline
(papermill streams each cell's output as text, where a widget bar would print once as a frozen
``0%`` line) — ``$LLMFT_PROGRESS=lines``, which the pipeline sets — plain lines instead: one when a
task starts, one at most every ``LINE_EVERY_S`` seconds with the count, rate and time left, one at
the end.
"""
from __future__ import annotations

import os
import sys
import time

PROGRESS_ENV = "LLMFT_PROGRESS"  # "lines": periodic text lines; anything else: tqdm.auto
LINE_EVERY_S = 15.0


class LineProgress:
    """A tqdm-like counter that prints ``desc: n/total unit (rate/s, elapsed, ~ETA left)`` lines."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = LINE_EVERY_S, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.postfix, self.stream = 0, "", stream or sys.stdout
        self.t0 = self.last = time.perf_counter()
        self._print(start=True)

    def _print(self, start: bool = False, end: bool = False) -> None:
        el = time.perf_counter() - self.t0
        if start:
            msg = f"{self.desc}: {self.total} {self.unit}s"
        else:
            rate = self.n / el if el > 0 else float("nan")
            left = (self.total - self.n) / rate if rate and rate == rate and rate > 0 else float("nan")
            tail = "done" if end else (f"~{left:.0f} s left" if left == left else "")
            msg = (f"{self.desc}: {self.n}/{self.total} {self.unit}s ({rate:.1f}/s, {el:.0f} s"
                   f"{', ' + tail if tail else ''}){' ' + self.postfix if self.postfix else ''}")
        print("  " + msg, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            self._print()

    def set_postfix(self, **kw) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        self._print(end=True)


RUN_PREFIX = "[run "  # the pipeline's quiet terminal shows the kernels' lines that start with this


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``1.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class RunCounter:
    """``[run i/n] label · 14 s/run · ~3 min left`` lines for the runs of a sweep: the rate is the mean wall
    time of the runs computed so far in this sweep (runs skipped as done count towards i, not the rate)."""

    def __init__(self, total: int, clock=time.perf_counter):
        self.total, self.i, self.computed, self.busy = total, 0, 0, 0.0
        self.clock, self.started = clock, None

    def _close(self) -> None:
        if self.started is not None:
            self.busy += self.clock() - self.started
            self.computed += 1
            self.started = None

    def skip(self) -> None:
        self._close()
        self.i += 1

    def start(self, label: str) -> str:
        """The line announcing the next computed run."""
        self._close()
        self.i += 1
        self.started = self.clock()
        line = f"{RUN_PREFIX}{self.i}/{self.total}] {label}"
        if self.computed:
            per = self.busy / self.computed
            line += f" · {duration(per)}/run · ~{duration(per * (self.total - self.i + 1))} left"
        return line


def bar(total: int, desc: str, unit: str = "it"):
    """A progress counter with ``update``, ``set_postfix`` and ``close``: :class:`LineProgress` under the
    pipeline (``$LLMFT_PROGRESS=lines``), a ``tqdm.auto`` bar otherwise."""
    if os.environ.get(PROGRESS_ENV) == "lines":
        return LineProgress(total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)
