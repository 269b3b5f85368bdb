"""The library's logging: one ``llmft_utils`` logger for the progress reports of sweeps and runs.

Messages go to the *current* ``sys.stdout`` (so they appear in a notebook cell's output, in papermill's
streamed cell output and in a terminal) as plain lines, at INFO by default. The level comes from
``$LLMFT_VERBOSITY`` (``debug``, ``info``, ``warning``, ``error``; set by ``llmft-study -v`` / ``-q`` for
the notebook kernels it starts) or :func:`set_verbosity`. Under a launcher (``RANK`` > 0) only warnings
and errors are shown: the main process reports. An application that configures logging itself can
``logging.getLogger("llmft_utils").handlers.clear()`` and set ``propagate = True``.
"""
from __future__ import annotations

import logging
import os
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
ENV = "LLMFT_VERBOSITY"
ROOT = "llmft_utils"


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is when a record is emitted (Jupyter replaces it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


class _Formatter(logging.Formatter):
    """Plain messages; under the pipeline (``$LLMFT_PROGRESS=lines``) warnings start with ``warning:``, the
    mark by which its quiet terminal shows them among the streamed cell output."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.WARNING and os.environ.get("LLMFT_PROGRESS") == "lines":
            return "warning: " + msg
        return msg


def _main_process_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or int(os.environ.get("RANK", "0") or 0) == 0


def level_from(name: str | None) -> int:
    """The logging level of a verbosity name (case-insensitive); ``ValueError`` names the choices."""
    if not name:
        return logging.INFO
    try:
        return LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown verbosity {name!r}; use one of {', '.join(LEVELS)}") from None


def set_verbosity(name: str) -> None:
    """Show the library's messages from ``name`` (``debug``/``info``/``warning``/``error``) up."""
    logging.getLogger(ROOT).setLevel(level_from(name))


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(_Formatter("%(message)s"))
        handler.addFilter(_main_process_or_warning)
        root.addHandler(handler)
    root.propagate = False
    root.setLevel(level_from(os.environ.get(ENV)))
    return root


def get(name: str) -> logging.Logger:
    """The logger of a library module (``llmft_utils.icl`` ...), the handler installed once."""
    _install()
    return logging.getLogger(name)


# ----------------------------------------------------------------------------- user errors in the CLI verbs
# Errors that report a mistake in parameters, data, results files, the model or its inputs, or an output
# folder in use: not a bug. Every verb prints their message (a line or a few) and exits with status 2, with no
# traceback unless -v; any other exception is a bug and keeps its traceback.
USER_ERRORS = ("ParameterError", "ConfigError", "DataError", "SchemaError", "ModelError", "PromptTooLongError",
               "FolderBusy")


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is (a subclass of) one of :data:`USER_ERRORS`, matched by name so that this leaf module
    imports none of the modules that define them."""
    return any(c.__name__ in USER_ERRORS for c in type(e).__mro__)


def run_verb(verb: str, fn, verbose: int = 0) -> int:
    """``fn()``'s exit status; a user error becomes ``<verb>: <message>`` on stderr and status 2 (with its
    traceback too when ``verbose``), an interrupt status 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{verb}: {e}", file=sys.stderr)
        return 2
