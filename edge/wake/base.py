"""The wake stage's one protocol and its types: ``WakeDetector``, ``WakeHit``, ``Trigger``.

The conversation feeds 20 ms chunks from one worker thread; a detector is not thread-safe
and needs no lock as long as process/reset/close come from that one thread.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

from edge.audio.chunk import AudioChunk

_LOGGER = logging.getLogger(__name__)

__all__ = ["WakeHit", "WakeDetector", "Trigger"]


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
