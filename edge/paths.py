"""Where the daemon keeps its state, cache and models.

systemd hands the service ``$STATE_DIRECTORY`` and ``$CACHE_DIRECTORY`` (from
``StateDirectory=`` and ``CacheDirectory=``); ``EDGE_VOICE_STATE_DIR`` and
``EDGE_VOICE_CACHE_DIR`` override them. Without either, root uses the FHS paths and
other users their XDG directories, so nothing needs root to try the product.
"""

from __future__ import annotations

import os
from pathlib import Path


def _first_env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            # systemd may pass several colon-separated directories; the first is ours.
            return value.split(":")[0]
    return None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def state_dir() -> Path:
    env = _first_env("EDGE_VOICE_STATE_DIR", "STATE_DIRECTORY")
    if env:
        return Path(env)
    if _is_root():
        return Path("/var/lib/edge-voice")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-voice"


def cache_dir() -> Path:
    env = _first_env("EDGE_VOICE_CACHE_DIR", "CACHE_DIRECTORY")
    if env:
        return Path(env)
    if _is_root():
        return Path("/var/cache/edge-voice")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-voice"


def models_dir() -> Path:
    env = os.environ.get("EDGE_VOICE_MODELS_DIR")
    if env:
        return Path(env)
    return state_dir() / "models"
