"""Wake stage: hear the wake word in the microphone stream.

Two engines sit behind one small interface:

- ``openwakeword`` (:mod:`edge.wake_oww`): openWakeWord ONNX models run with onnxruntime,
  one model per word, each with its own threshold and refractory period.
- ``kws`` (:mod:`edge.wake_kws`): sherpa-onnx's KeywordSpotter, a small streaming
  transducer with keywords typed in the config as the model's tokens.

The conversation feeds 20 ms chunks from one worker thread; a detector is not thread-safe
and needs no lock as long as process/reset/close come from that one thread.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge.audio.chunk import AudioChunk
from edge.config import WakeConfig

_LOGGER = logging.getLogger(__name__)

__all__ = ["WakeHit", "WakeDetector", "Trigger", "make_wake_detector"]


@dataclass(frozen=True)
class WakeHit:
    """One detection of a wake word."""

    word: str  # the configured name
    score: float  # 0..1
    audio_time: float  # seconds on the audio timeline where the detection frame ended


class WakeDetector(Protocol):
    def process(self, chunk: AudioChunk) -> list[WakeHit]:
        """Feed audio of any length; returns the hits whose detection frame ended in it."""
        ...

    def reset(self) -> None:
        """Forget buffered audio, features and scores (after a turn, so the reply cannot
        retrigger); the next chunk starts afresh wherever it sits on the timeline."""
        ...

    def close(self) -> None:
        """Free the models; idempotent."""
        ...


class Trigger:
    """Turns one word's scores into hits: threshold, rising edge and refractory period.

    A word fires when its score rises to the threshold outside the refractory period. A score
    that stays high fires once: a spoken wake word lasts several frames above the threshold,
    and a refractory period of 0 must not turn it into several hits.
    """

    def __init__(self, threshold: float, refractory_s: float) -> None:
        self.threshold = threshold
        self.refractory_s = refractory_s
        self.reset()

    def reset(self) -> None:
        self._armed = True
        self._quiet_until = -math.inf

    def score(self, score: float, t: float) -> bool:
        """Feed the score of the frame ending at ``t`` seconds; True when the word fires."""
        if score < self.threshold:
            self._armed = True
            return False
        fire = self._armed and t >= self._quiet_until
        self._armed = False
        if fire:
            self._quiet_until = t + self.refractory_s
        return fire

    def event(self, t: float) -> bool:
        """A detection reported as an event (no score stream): only the refractory applies."""
        if t < self._quiet_until:
            return False
        self._quiet_until = t + self.refractory_s
        return True


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
        from edge.wake_oww import OpenWakeWordDetector

        return OpenWakeWordDetector(cfg, files)
    if cfg.engine == "kws":
        from edge.wake_kws import KeywordSpotterDetector

        return KeywordSpotterDetector(cfg, files)
    from edge.errors import ConfigError

    raise ConfigError(f"wake.engine: {cfg.engine!r} is not one of openwakeword, kws, none")
