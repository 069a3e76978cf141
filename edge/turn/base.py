"""The end-of-turn stage's one protocol and its types.

After a short silence the conversation asks whether the visitor has finished: a
:class:`TurnDetector` scores the audio of the turn so far, and a :class:`TurnRule` turns the
scores it has (audio, and the LLM's view of the transcript) into the silence after which the
turn ends: at once when the sentence is surely complete, after the usual endpoint silence when
unsure, after a longer limit when the sentence is surely unfinished. Pure logic here; the model
lives in its backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class TurnDetector(Protocol):
    """Scores whether a turn is complete from its audio. Used from one worker thread."""

    window_s: float  # the detector looks at no more than the last this many seconds

    def complete_probability(self, audio16k: np.ndarray) -> float:
        """P(the visitor has finished) for the turn's audio up to now: 16 kHz mono, int16 (or
        float in [-1, 1]), from a little before the speech began to the present, silence included."""
        ...

    def close(self) -> None:
        """Free the model; idempotent."""
        ...


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


def combine(probabilities: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """A weighted mean of the views' log-odds, as a probability.

    Views without a weight are ignored; with no weighted view at all the answer is 0.5 (no
    opinion). Log-odds, so that one confident view is not washed out by an unsure one.
    """
    total = sum(weights.get(k, 0.0) for k in probabilities)
    if total <= 0:
        return 0.5
    z = sum(weights.get(k, 0.0) * logit(p) for k, p in probabilities.items()) / total
    return 1.0 / (1.0 + math.exp(-z))


@dataclass(frozen=True)
class TurnRule:
    """When a turn ends, given how sure the views are that the sentence is complete.

    The probability is read at the pause (``stt.pause_s`` of silence). At or above
    ``complete_at`` the turn ends there; below ``incomplete_below`` it ends only after
    ``max_silence_s`` of silence (a mid-sentence pause is not cut off); in between, and with no
    view at all, after ``silence_s`` (today's fixed endpoint, the fallback).
    """

    complete_at: float = 0.5
    incomplete_below: float = 0.5
    silence_s: float = 0.6
    max_silence_s: float = 1.6
    weights: Mapping[str, float] = field(default_factory=lambda: {"audio": 1.0})

    def __post_init__(self) -> None:
        if not 0.0 <= self.incomplete_below <= self.complete_at <= 1.0:
            raise ValueError("need 0 <= incomplete_below <= complete_at <= 1")
        if not 0.0 < self.silence_s <= self.max_silence_s:
            raise ValueError("need 0 < silence_s <= max_silence_s")

    def probability(self, views: Mapping[str, float]) -> float | None:
        """The combined probability of the views this rule weighs, or None when it weighs none."""
        used = {k: p for k, p in views.items() if self.weights.get(k, 0.0) > 0}
        return combine(used, self.weights) if used else None

    def silence_needed(self, views: Mapping[str, float]) -> float:
        """Seconds of silence after the speech after which the turn ends (0: now, at the pause)."""
        p = self.probability(views)
        if p is None:
            return self.silence_s
        if p >= self.complete_at:
            return 0.0
        if p < self.incomplete_below:
            return self.max_silence_s
        return self.silence_s
