"""The Hugging Face Hub, offline-aware: one cheap reachability probe instead of ~50 s of retries.

Without a network, ``from_pretrained`` / ``load_dataset`` retry for tens of seconds before they give up.
:func:`reachable` opens one TCP connection to the Hub's endpoint (or to the configured HTTPS proxy)
with a short timeout, once per process; :func:`offline_if_unreachable` puts ``huggingface_hub`` (and
``datasets``) into offline mode for the block when it fails, so that cached files still load and
missing ones fail in a second with the caller's clear error.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, TypeError, ValueError):
        return False


@lru_cache(maxsize=1)
def _probe(timeout: float) -> bool:
    """One TCP connection to the Hub (or the HTTPS proxy), bounded by ``timeout`` in all: the name lookup,
    which a socket timeout does not cover, runs in a daemon thread that is abandoned when it hangs."""
    import threading

    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    result = []
    t = threading.Thread(target=lambda: result.append(_connect(url.hostname, port, timeout)), daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached (False at once when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set)."""
    return not offline_requested() and _probe(timeout)


@contextmanager
def offline_if_unreachable(timeout: float = 3.0):
    """Inside the block the Hub libraries run in offline mode when the Hub cannot be reached (restored after).
    Yields whether the Hub is reachable."""
    ok = reachable(timeout)
    if ok:
        yield True
        return
    import huggingface_hub.constants as hc

    mods = [hc]
    try:
        import datasets.config as dc

        mods.append(dc)
    except ImportError:
        pass
    old = [m.HF_HUB_OFFLINE for m in mods]
    for m in mods:
        m.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        for m, v in zip(mods, old):
            m.HF_HUB_OFFLINE = v


def cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether ``filename`` of Hub repo ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an invalid repo id
        return False
