"""The audio stage's protocols: ``Microphone`` (capture) and ``Speaker`` (playback), and ``Clock``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from edge.audio.chunk import AudioChunk
from edge.signals import Flag


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on the microphone's audio timeline."""
        ...


class Microphone(Protocol):
    @property
    def dropped(self) -> int:
        """Chunks dropped because the reader fell behind."""
        ...

    def open(self) -> None: ...

    def read(self, timeout: float) -> AudioChunk | None:
        """The next 20 ms chunk, or None if none came within ``timeout``; AudioError when lost."""
        ...

    def close(self) -> None: ...


class Speaker(Protocol):
    """Playback through a bounded queue, one utterance at a time, each with a generation number.

    ``write`` blocks while the queue is full, so a slow speaker pauses whoever writes;
    ``flush`` drops everything queued and bumps the generation, so stale writes are refused.
    """

    rate: int
    volume: float
    state: str  # open | lost | closed
    latency: float  # seconds from a block leaving the queue to its sound leaving the loudspeaker
    dropped_blocks: int  # blocks that could not be played (a device failing)

    @property
    def audible_until(self) -> float:
        """Monotonic time when the last block written will have left the loudspeaker."""
        ...

    def begin(self, on_start: Callable[[float], None] | None = None, *, hold: bool = False) -> int:
        """Start an utterance; returns its generation. ``on_start(wall)`` fires when its first
        block plays; with ``hold`` its audio waits in the queue until :meth:`release`."""
        ...

    def release(self, gen: int) -> None: ...

    def write(self, samples: np.ndarray, gen: int | None = None) -> bool:
        """Queue int16 audio for utterance ``gen`` (default: the current one); False once flushed."""
        ...

    @property
    def buffered_s(self) -> float:
        """Seconds of audio queued and not yet played."""
        ...

    def below(self, seconds: float) -> Flag:
        """A flag set once the queue holds at most ``seconds`` of audio (at once if it does)."""
        ...

    def on_played(self, tap: Callable[[np.ndarray, int, float], None]) -> None:
        """Call ``tap(block, rate, at)`` for each block as it is played (after the volume): the
        echo canceller's reference. ``at`` is when its first sample is heard, on the speaker's
        clock: ``time.monotonic()`` live, the microphone's timeline in a simulation."""
        ...

    def drain(self, timeout: float | None = None) -> bool: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
