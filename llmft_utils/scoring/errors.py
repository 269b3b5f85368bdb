"""The errors of ICL scoring.
"""
from __future__ import annotations


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context window (never truncated silently)."""


class PrefixReuseMismatch(RuntimeError):
    """A row scored on the reused prefix disagrees with the same row scored on its full prompt."""
