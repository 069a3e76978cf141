"""Microphones and speakers behind one small interface, and the factory that picks them.

``audio.input_device`` / ``audio.output_device`` name a PortAudio device (index or part of
its name) or ``file:PATH``: a WAV or raw 16 kHz PCM file (or FIFO) read in real time, and a
WAV file written as audio plays. File devices let the daemon run headless and let tests
drive it; reads from a FIFO block like a hung capture driver does.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import wave
from pathlib import Path
from typing import Protocol

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, Resampler, to_mono_int16
from edge.audio.playback import QueuedSpeaker
from edge.config import AudioConfig
from edge.errors import AudioError

_LOGGER = logging.getLogger(__name__)


class Microphone(Protocol):
    dropped: int

    def open(self) -> None: ...
    def read(self, timeout: float) -> AudioChunk | None: ...
    def close(self) -> None: ...


class FileMicrophone:
    """Reads a WAV or raw PCM file (or FIFO) at real-time pace.

    A regular file is followed by endless silence. A FIFO is a live source: reads happen on
    the caller's thread, so a writer that stalls stalls the reader, exactly like a capture
    driver that stops returning, and a writer that goes away is a lost device
    (:class:`AudioError`), to be reopened.
    """

    def __init__(self, path: str | os.PathLike, *, realtime: bool = True, end_silence: bool = True) -> None:
        self.path = Path(path)
        self.realtime = realtime
        self.end_silence = end_silence
        self.dropped = 0
        self._f = None
        self._resampler: Resampler | None = None
        self._channels = 1
        self._width = 2
        self._pending = np.zeros(0, dtype=np.int16)
        self._pos = 0
        self._due = 0.0
        self.eof = False
        self.is_fifo = False

    def open(self) -> None:
        try:
            f = open(self.path, "rb")
        except OSError as err:
            raise AudioError(f"{self.path}: cannot open input audio: {err.strerror}", code="audio.input") from None
        self._f = f
        self.eof = False
        self._pending = np.zeros(0, dtype=np.int16)
        self.is_fifo = is_fifo = stat.S_ISFIFO(os.fstat(f.fileno()).st_mode)
        if not is_fifo and self.path.suffix.lower() == ".wav":
            f.close()
            w = wave.open(str(self.path), "rb")
            self._wave = w
            self._channels, self._width = w.getnchannels(), w.getsampwidth()
            if self._width != 2:
                raise AudioError(f"{self.path}: file microphone needs 16-bit PCM WAV", code="audio.input")
            self._resampler = Resampler(w.getframerate(), SAMPLE_RATE)
            self._f = None
        self._due = time.monotonic()

    def _read_raw(self, frames: int) -> bytes:
        if getattr(self, "_wave", None) is not None:
            return self._wave.readframes(frames)
        assert self._f is not None
        return self._f.read(frames * 2)

    def read(self, timeout: float) -> AudioChunk | None:
        if self._f is None and getattr(self, "_wave", None) is None:
            raise AudioError(f"{self.path}: input is not open", code="audio.input")
        while len(self._pending) < CHUNK_SAMPLES and not self.eof:
            raw = self._read_raw(CHUNK_SAMPLES)
            if not raw:
                self.eof = True
                if self.is_fifo:
                    raise AudioError(f"{self.path}: the audio source closed", code="audio.lost")
                break
            x = np.frombuffer(raw[: len(raw) - len(raw) % (2 * self._channels)], dtype="<i2")
            if self._channels > 1:
                x = to_mono_int16(x.reshape(-1, self._channels))
            if self._resampler is not None:
                x = self._resampler.process(x)
            self._pending = np.concatenate([self._pending, x.astype(np.int16)])
        if len(self._pending) < CHUNK_SAMPLES:
            if not self.end_silence and not len(self._pending):
                return None
            self._pending = np.concatenate(
                [self._pending, np.zeros(CHUNK_SAMPLES - len(self._pending), dtype=np.int16)])
        block, self._pending = self._pending[:CHUNK_SAMPLES], self._pending[CHUNK_SAMPLES:]
        if self.realtime:
            delay = self._due - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, timeout))
            self._due = max(self._due + CHUNK_SAMPLES / SAMPLE_RATE, time.monotonic() - 0.5)
        chunk = AudioChunk(block.copy(), self._pos, SAMPLE_RATE, time.monotonic())
        self._pos += CHUNK_SAMPLES
        return chunk

    def close(self) -> None:
        w = getattr(self, "_wave", None)
        if w is not None:
            w.close()
            self._wave = None
        if self._f is not None:
            self._f.close()
            self._f = None


class FileSpeaker(QueuedSpeaker):
    """Plays in real time into a WAV file, written as it goes (a killed daemon leaves audio)."""

    def __init__(self, path: str | os.PathLike, rate: int, *, volume: float = 1.0) -> None:
        super().__init__(rate, volume=volume)
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._w = wave.open(str(self.path), "wb")
        except OSError as err:
            raise AudioError(f"{self.path}: cannot write output audio: {err.strerror}", code="audio.output") from None
        self._w.setnchannels(1)
        self._w.setsampwidth(2)
        self._w.setframerate(rate)
        self._due = 0.0

    def _output(self, block: np.ndarray) -> None:
        now = time.monotonic()
        if self._due < now - 0.1:
            self._due = now
        if self._due > now:
            time.sleep(self._due - now)
        self._due += len(block) / self.rate
        with self._lock:
            if self._w is not None:
                self._w.writeframes(block.astype("<i2").tobytes())
                self._w._file.flush()  # keep the data on disk, not in a buffer

    def _on_close(self) -> None:
        with self._lock:
            if self._w is not None:
                self._w.close()
                self._w = None


def open_microphone(cfg: AudioConfig) -> Microphone:
    spec = cfg.input_device
    if spec.startswith("file:"):
        return FileMicrophone(spec[5:])
    from edge.audio.pyaudio_io import PyAudioMicrophone

    return PyAudioMicrophone(spec, rate=cfg.input_rate, queue_chunks=cfg.queue_chunks)


def open_speaker(cfg: AudioConfig, rate: int):
    spec = cfg.output_device
    if spec.startswith("file:"):
        return FileSpeaker(spec[5:], rate, volume=cfg.volume)
    from edge.audio.pyaudio_io import PyAudioSpeaker

    return PyAudioSpeaker(spec, rate, volume=cfg.volume)
