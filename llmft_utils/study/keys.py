"""Resume keys: the strings that say a result row is done.
"""
from __future__ import annotations


def precision_tag(lm) -> str:
    """``dtype@device kind`` (e.g. ``float32@cpu``): part of every resume key, so that runs at another precision
    or on another kind of device never count as done, nor get mixed with these."""
    return f"{lm.dtype}@{str(lm.device).split(':')[0]}"
