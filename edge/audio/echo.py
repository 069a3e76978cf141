"""Keeping the device's own sound out of what it hears.

:class:`EchoGate` keeps the device's own sound out of speech-to-text when the microphone has no
echo canceller: while the conversation is idle or listening, microphone audio that arrives
while the device's sound (a chime, a reply's tail) can still be heard is replaced by silence.
While it thinks or speaks, audio passes: the conversation then listens only for the wake word,
which is what lets a visitor interrupt.
"""

from __future__ import annotations

import time

import numpy as np

from edge.audio.chunk import AudioChunk


class EchoGate:
    """Silences microphone chunks the device's own sound may be in."""

    def __init__(self, echo_cancel: bool, guard_ms: int) -> None:
        self.enabled = not echo_cancel
        self.guard_s = guard_ms / 1000
        self.hold_until = 0.0  # set when a sound is queued, before the speaker reports playing it
        self.silenced = 0  # chunks replaced by silence

    def hold(self, seconds: float) -> None:
        """The device is about to make a sound lasting ``seconds`` (output latency included)."""
        self.hold_until = max(self.hold_until, time.monotonic() + seconds)

    def admit(self, chunk: AudioChunk, state: str, audible_until: float) -> AudioChunk:
        """``chunk``, or silence in its place; ``state`` is the conversation's state value."""
        if not self.enabled or state in ("thinking", "speaking"):
            return chunk
        until = max(audible_until, self.hold_until) + self.guard_s
        if (chunk.wall or time.monotonic()) >= until:
            return chunk
        self.silenced += 1
        return AudioChunk(np.zeros_like(chunk.samples), chunk.start, chunk.rate, chunk.wall)
