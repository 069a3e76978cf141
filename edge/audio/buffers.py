"""Bounded buffers for audio: a drop-oldest queue and the pre-roll ring.

Policy: audio that cannot be processed in time is old audio; when the capture queue is
full the *oldest* chunk goes and a counter says so (metrics report it). A live microphone
must never block.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

from edge.audio.chunk import AudioChunk

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    """Thread-safe bounded FIFO; ``put`` never blocks, it evicts the oldest item."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._items: collections.deque[T] = collections.deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self.dropped = 0
        self._closed = False

    def put(self, item: T) -> None:
        with self._cond:
            if len(self._items) >= self._maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """Next item, or None on timeout or once closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


class PreRoll:
    """The last ``ms`` milliseconds of audio, so speech said just before a trigger is kept."""

    def __init__(self, ms: int, chunk_ms: int = 20) -> None:
        self._chunks: collections.deque[AudioChunk] = collections.deque(maxlen=max(1, ms // chunk_ms) if ms else 1)
        self._enabled = ms > 0

    def append(self, chunk: AudioChunk) -> None:
        self._chunks.append(chunk)

    def since(self, audio_time: float) -> list[AudioChunk]:
        """Chunks ending after ``audio_time`` (seconds on the audio timeline)."""
        if not self._enabled:
            return []
        return [c for c in self._chunks if c.end_s > audio_time]

    def all(self) -> list[AudioChunk]:
        return list(self._chunks) if self._enabled else []

    def clear(self) -> None:
        self._chunks.clear()
