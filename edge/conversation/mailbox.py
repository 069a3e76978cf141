"""The queues between the conversation's threads: the owner's inbox and each worker's jobs.

Both block instead of polling: a reader waits on a condition until something arrives, and a
writer that must wait for room wakes up at once when its work is cancelled.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from edge.conversation.messages import Audio, Control, Message
from edge.signals import Flag

T = TypeVar("T")


class Inbox:
    """The owner thread's messages: control before audio.

    Audio is bounded (``audio_max`` chunks): a source that runs ahead waits (the live
    microphone's own queue then drops its oldest chunk and counts it). Control messages are
    few and never dropped.
    """

    def __init__(self, audio_max: int = 200) -> None:
        self._cond = threading.Condition()
        self._control: collections.deque[Control] = collections.deque()
        self._audio: collections.deque[Audio] = collections.deque()
        self._audio_max = audio_max
        self._unfinished = 0  # control messages posted and not yet handled
        self._closed = False

    def post(self, msg: Control) -> None:
        with self._cond:
            self._control.append(msg)
            self._unfinished += 1
            self._cond.notify_all()

    def post_audio(self, msg: Audio) -> bool:
        """Queue a chunk, waiting while the audio queue is full; False once the inbox is closed."""
        with self._cond:
            while len(self._audio) >= self._audio_max and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._audio.append(msg)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """The owner is gone: audio is refused from now on."""
        with self._cond:
            self._closed = True
            self._audio.clear()
            self._cond.notify_all()

    def get(self) -> Message:
        with self._cond:
            while not self._control and not self._audio:
                self._cond.wait()
            msg: Message = self._control.popleft() if self._control else self._audio.popleft()
            self._cond.notify_all()
            return msg

    def handled(self, msg: Message) -> None:
        if not isinstance(msg, Audio):
            with self._cond:
                self._unfinished -= 1

    @property
    def control_pending(self) -> bool:
        """Control messages are waiting or being handled."""
        return self._unfinished > 0

    @property
    def audio_queued(self) -> int:
        return len(self._audio)


class Jobs(Generic[T]):
    """A worker's job queue, bounded when ``maxsize`` > 0; ``put`` gives up once ``cancel`` is set."""

    def __init__(self, maxsize: int = 0) -> None:
        self._cond = threading.Condition()
        self._items: collections.deque[T] = collections.deque()
        self._max = maxsize

    def put(self, item: T, cancel: Flag | None = None) -> bool:
        undo = cancel.on_set(self._wake) if cancel is not None else None
        try:
            with self._cond:
                while self._max and len(self._items) >= self._max:
                    if cancel is not None and cancel.is_set():
                        return False
                    self._cond.wait()
                self._items.append(item)
                self._cond.notify_all()
                return True
        finally:
            if undo is not None:
                undo()

    def get(self) -> T:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def discard(self, drop: Callable[[T], bool]) -> None:
        """Remove every queued item ``drop`` says to."""
        with self._cond:
            self._items = collections.deque(i for i in self._items if not drop(i))
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
