"""Speakers: a bounded playback queue with flush, drain and a first-sound callback.

The text-to-speech stage writes audio as it is produced; ``write`` blocks while more than
``queue_ms`` of audio is waiting, so a slow speaker pauses synthesis, which pauses the LLM.
``flush`` (barge-in, cancel) drops everything queued and stops within one block (20 ms).
Subclasses only say how one block reaches the output: :class:`WavSpeaker` plays in real
time into a WAV file for ``simulate``; the PyAudio speaker lives in ``pyaudio_io``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from edge.audio.base import Clock
from edge.audio.wav import write_wav
from edge.signals import Flag

_LOGGER = logging.getLogger(__name__)

BLOCK_S = 0.02


class QueuedSpeaker:
    """A :class:`~edge.audio.base.Speaker`: a playback thread fed by a bounded queue of 20 ms blocks."""


    def __init__(self, rate: int, *, volume: float = 1.0, queue_ms: int = 1500) -> None:
        self.rate = rate
        self.volume = volume
        self.state = "open"
        self.latency = 0.0
        self.dropped_blocks = 0
        self._audible_until = 0.0  # devices that know their output latency keep it up to date
        self._level_watch: list[tuple[float, Flag]] = []  # (seconds, flag) waiting for the queue to run low
        self._block = max(1, int(rate * BLOCK_S))
        self._max_blocks = max(2, queue_ms // int(BLOCK_S * 1000))
        self._q: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._cond = threading.Condition()
        self._gen = 0  # utterance generation; flush bumps it so stale writes are dropped
        self._held = False
        self._on_start: Callable[[float], None] | None = None
        self._started = True
        self._playing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="speaker", daemon=True)
        self._thread_started = False
        self.playing_gen = 0
        self._taps: list[Callable[[np.ndarray, int, float], None]] = []

    def on_played(self, tap: Callable[[np.ndarray, int, float], None]) -> None:
        self._taps.append(tap)

    # -- producer side -------------------------------------------------------------
    def begin(self, on_start: Callable[[float], None] | None = None, *, hold: bool = False) -> int:
        """Start an utterance; ``on_start(wall_time)`` fires when its first block plays.

        With ``hold`` its audio is queued but not played until :meth:`release` (a reply
        prepared before the visitor has surely finished speaking).
        """
        self._ensure_thread()
        with self._cond:
            self._on_start = on_start
            self._started = False
            self._held = hold
            return self._gen

    def release(self, gen: int) -> None:
        """Let a held utterance play (if it is still the current one)."""
        with self._cond:
            if gen == self._gen:
                self._held = False
                self._cond.notify_all()

    def write(self, samples: np.ndarray, gen: int | None = None) -> bool:
        """Queue audio; blocks while the queue is full. False once flushed."""
        self._ensure_thread()
        x = np.asarray(samples, dtype=np.int16)
        with self._cond:
            gen = self._gen if gen is None else gen
            for i in range(0, len(x), self._block):
                while len(self._q) >= self._max_blocks and gen == self._gen and not self._closed:
                    self._cond.wait(0.1)
                if gen != self._gen or self._closed:
                    return False
                self._q.append((gen, x[i : i + self._block]))
                self._cond.notify_all()
        return True

    @property
    def buffered_s(self) -> float:
        """Seconds of audio queued and not yet played."""
        return len(self._q) * BLOCK_S

    @property
    def audible_until(self) -> float:
        """When the last block written will have left the loudspeaker (monotonic seconds)."""
        return self._audible_until

    def below(self, seconds: float) -> Flag:
        """A flag set once the queue holds at most ``seconds`` of audio (at once if it does)."""
        flag = Flag()
        with self._cond:
            if self.buffered_s <= seconds or self._closed:
                flag.set()
            else:
                self._level_watch.append((seconds, flag))
        return flag

    def _check_level(self) -> None:
        """Called with the lock held after the queue shrank: set the flags whose level is reached."""
        if self._level_watch:
            level = self.buffered_s
            due = [f for s, f in self._level_watch if level <= s or self._closed]
            if due:
                self._level_watch = [(s, f) for s, f in self._level_watch if f not in due]
                for f in due:
                    f.set()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything written has been played (or flushed)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._q or self._playing:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(0.05, left))
        return True

    def flush(self) -> None:
        with self._cond:
            self._gen += 1
            self._held = False
            self._q.clear()
            self._check_level()
            self._cond.notify_all()
        self._after_flush()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._q.clear()
            self._check_level()
            self._cond.notify_all()
        if self._thread_started:
            self._thread.join(timeout=2)
        self._on_close()

    # -- playback thread -----------------------------------------------------------
    def _ensure_thread(self) -> None:
        if not self._thread_started:
            self._thread_started = True
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._q or self._held) and not self._closed:
                    self._playing = False
                    self._cond.notify_all()
                    self._cond.wait(0.1)
                if self._closed:
                    self._playing = False
                    self._cond.notify_all()
                    return
                gen, block = self._q.popleft()
                self._check_level()
                if gen != self._gen:
                    continue
                self._playing = True
                self.playing_gen = gen
                on_start = None
                if not self._started:
                    self._started, on_start = True, self._on_start
                self._cond.notify_all()
            if on_start is not None:
                try:
                    on_start(time.monotonic())
                except Exception:
                    _LOGGER.exception("speaker start callback failed")
            if self.volume != 1.0:
                block = np.clip(block.astype(np.float32) * self.volume, -32768, 32767).astype(np.int16)
            try:
                self._output(block)
            except Exception:
                _LOGGER.exception("speaker output failed; dropping queued audio")
                with self._cond:
                    self._q.clear()
                continue
            if self._taps:
                at = self._heard_at(block)
                for tap in self._taps:
                    try:
                        tap(block, self.rate, at)
                    except Exception:
                        _LOGGER.exception("a playback tap failed")

    # -- subclass hooks ------------------------------------------------------------
    def _output(self, block: np.ndarray) -> None:
        raise NotImplementedError

    def _heard_at(self, block: np.ndarray) -> float:
        """When the block just output starts to sound (``time.monotonic()``): a device that blocks
        until its buffer has room has it ``latency`` after the block entered the buffer."""
        return time.monotonic() + self.latency - len(block) / self.rate

    def _after_flush(self) -> None:
        pass

    def _on_close(self) -> None:
        pass


class WavSpeaker(QueuedSpeaker):
    """Plays in real time into memory and writes a WAV on close (``simulate``).

    ``clock`` maps playback onto the microphone's timeline so tests can say when, in
    audio time, output started and stopped.
    """

    def __init__(self, rate: int, path: str | None, clock: Clock | None = None, *,
                 realtime: bool = True, volume: float = 1.0, gap_s: float = 0.3) -> None:
        super().__init__(rate, volume=volume)
        self._path = path
        self._clock = clock
        self._realtime = realtime
        self._gap = np.zeros(int(rate * gap_s), dtype=np.int16)
        self._pieces: list[np.ndarray] = []
        self._next_due = 0.0
        # (utterance generation, audio time it played at, samples) for every block played,
        # so a test can say when, on the microphone's timeline, output really stopped.
        self.played: list[tuple[int, float, int]] = []

    def begin(self, on_start: Callable[[float], None] | None = None, *, hold: bool = False) -> int:
        if self._pieces:
            self._pieces.append(self._gap)
        return super().begin(on_start, hold=hold)

    def _output(self, block: np.ndarray) -> None:
        if self._realtime:
            now = time.monotonic()
            if self._next_due < now - 0.1:  # idle before: restart the pacing clock
                self._next_due = now
            delay = self._next_due - now
            if delay > 0:
                time.sleep(delay)
            self._next_due += len(block) / self.rate
        self._pieces.append(block)
        if self._clock is not None:
            self.played.append((self.playing_gen, self._clock.now(), len(block)))

    def _heard_at(self, block: np.ndarray) -> float:
        # On the microphone's timeline when there is one: the block plays from now.
        return self._clock.now() if self._clock is not None else time.monotonic()

    def audio(self) -> np.ndarray:
        return np.concatenate(self._pieces) if self._pieces else np.zeros(0, dtype=np.int16)

    def _on_close(self) -> None:
        if self._path:
            write_wav(self._path, self.audio(), self.rate)
