"""Wake stage: hear the wake word in the microphone stream.

Two engines sit behind one small interface (:class:`~edge.wake.base.WakeDetector`):

- ``openwakeword`` (:mod:`edge.wake.oww`): openWakeWord ONNX models run with onnxruntime,
  one model per word, each with its own threshold and refractory period.
- ``kws`` (:mod:`edge.wake.kws`): sherpa-onnx's KeywordSpotter, a small streaming
  transducer with keywords typed in the config as the model's tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.config import WakeConfig
from edge.errors import ConfigError
from edge.wake.base import Trigger, WakeDetector, WakeHit

_LOGGER = logging.getLogger(__name__)

__all__ = ["WakeHit", "WakeDetector", "Trigger", "make_wake_detector"]


def make_wake_detector(cfg: WakeConfig, files: dict[str, Path]) -> WakeDetector | None:
    """Build the configured wake engine, or None for engine "none".

    ``files`` maps the installed file names of the wake model (``cfg.model``) to their paths.
    Raises ConfigError for a bad word or keyword list, ModelError for a missing or unusable
    model file, MissingDependency when the engine's library is not installed.
    """
    if cfg.engine == "none":
        _LOGGER.info("wake word disabled (engine none)")
        return None
    if cfg.engine == "openwakeword":
        from edge.wake.oww import OpenWakeWordDetector

        return OpenWakeWordDetector(cfg, files)
    if cfg.engine == "kws":
        from edge.wake.kws import KeywordSpotterDetector

        return KeywordSpotterDetector(cfg, files)
    raise ConfigError(f"wake.engine: {cfg.engine!r} is not one of openwakeword, kws, none")
