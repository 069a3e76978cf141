"""Microphones and speakers behind one small interface, the factory that picks them, and
``edge-voice devices``.

``audio.input_device`` / ``audio.output_device`` name a PortAudio device (index, name or a
unique part of its name) or ``file:PATH``: a WAV or raw 16 kHz PCM file read in real time
(or a FIFO, read as its writer delivers it), and a WAV file written as audio plays. File
devices let the daemon run headless and let tests drive it; reads from a FIFO block like a
hung capture driver does.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edge.audio.base import Microphone, Speaker
from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, Resampler, to_mono_int16
from edge.audio.playback import QueuedSpeaker
from edge.config import AudioConfig
from edge.errors import AudioError

_LOGGER = logging.getLogger(__name__)


class FileMicrophone:
    """Reads a WAV or raw PCM file at real-time pace, or a FIFO as its writer delivers.

    A regular file is followed by endless silence. A FIFO is a live source: its writer sets
    the pace (a capture driver's clock), so a writer may deliver idle stretches faster than
    real time and the pipeline takes them as fast as it can. Reads happen on the caller's
    thread, so a writer that stalls stalls the reader, exactly like a capture driver that
    stops returning, and a writer that goes away is a lost device (:class:`AudioError`), to
    be reopened.
    """

    def __init__(self, path: str | os.PathLike, *, realtime: bool = True, end_silence: bool = True) -> None:
        self.path = Path(path)
        self.realtime = realtime
        self.end_silence = end_silence
        self.dropped = 0
        self._f: BinaryIO | None = None
        self._wave: wave.Wave_read | None = None
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
        if self._wave is not None:
            return self._wave.readframes(frames)
        assert self._f is not None
        return self._f.read(frames * 2)

    def read(self, timeout: float) -> AudioChunk | None:
        if self._f is None and self._wave is None:
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
        if self.realtime and not self.is_fifo:
            delay = self._due - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, timeout))
            self._due = max(self._due + CHUNK_SAMPLES / SAMPLE_RATE, time.monotonic() - 0.5)
        chunk = AudioChunk(block.copy(), self._pos, SAMPLE_RATE, time.monotonic())
        self._pos += CHUNK_SAMPLES
        return chunk

    def close(self) -> None:
        if self._wave is not None:
            self._wave.close()
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
            self._file: BinaryIO | None = open(self.path, "wb")
        except OSError as err:
            raise AudioError(f"{self.path}: cannot write output audio: {err.strerror}", code="audio.output") from None
        self._w: wave.Wave_write | None = wave.open(self._file, "wb")
        self._w.setnchannels(1)
        self._w.setsampwidth(2)
        self._w.setframerate(rate)
        self._due = 0.0

    @property
    def audible_until(self) -> float:
        """When the last block written has been played (monotonic seconds)."""
        return self._due

    def _output(self, block: np.ndarray) -> None:
        now = time.monotonic()
        if self._due < now - 0.1:
            self._due = now
        if self._due > now:
            time.sleep(self._due - now)
        self._due += len(block) / self.rate
        with self._lock:
            if self._w is not None and self._file is not None:
                self._w.writeframes(block.astype("<i2").tobytes())
                self._file.flush()  # keep the data on disk, not in a buffer

    def _on_close(self) -> None:
        with self._lock:
            if self._w is not None:
                self._w.close()
                self._w = None
            if self._file is not None:
                self._file.close()
                self._file = None


def open_microphone(cfg: AudioConfig) -> Microphone:
    spec = cfg.input_device
    if spec.startswith("file:"):
        return FileMicrophone(spec[5:])
    from edge.audio.pyaudio_io import PyAudioMicrophone

    return PyAudioMicrophone(spec, rate=cfg.input_rate, queue_chunks=cfg.queue_chunks)


def open_speaker(cfg: AudioConfig, rate: int, on_state: Callable[[str, str], None] | None = None) -> Speaker:
    """The configured speaker. A PortAudio one that cannot be opened yet starts out ``lost``
    (``on_state`` hears of it) and keeps trying, so a kiosk booted before its speaker works."""
    spec = cfg.output_device
    if spec.startswith("file:"):
        return FileSpeaker(spec[5:], rate, volume=cfg.volume)
    from edge.audio.pyaudio_io import PyAudioSpeaker

    return PyAudioSpeaker(spec, rate, volume=cfg.volume, on_state=on_state,
                          backoff_max_s=cfg.reopen_backoff_max_s)


# -- edge-voice devices ---------------------------------------------------------------------
def _khz(rates: tuple[int, ...]) -> str:
    return " ".join(f"{r / 1000:g}" for r in rates) if rates else "-"


def _selection(devices: list[Any], spec: str, is_input: bool, want_rate: int = 0) -> dict[str, Any]:
    """Which listed device a config's ``input_device``/``output_device`` picks, and how."""
    from edge.audio.pyaudio_io import capture_rates, find_device

    kind = "input" if is_input else "output"
    out: dict[str, Any] = {"role": kind, "spec": spec}
    if spec.startswith("file:"):
        out["file"] = spec[5:]
        return out

    class _Listed:  # find_device over the listing, so the answer is the daemon's own
        def get_device_count(self) -> int:
            return len(devices)

        def get_device_info_by_index(self, i: int) -> dict[str, Any]:
            d = devices[i]
            return {"name": d.name, "maxInputChannels": d.max_input_channels,
                    "maxOutputChannels": d.max_output_channels}

    try:
        index = find_device(_Listed(), spec, is_input)
    except AudioError as err:
        out["error"] = err.message
        return out
    if index is None:
        out["default"] = True
        return out
    d = devices[index]
    rates = d.input_rates if is_input else d.output_rates
    channels = d.input_channels if is_input else d.output_channels
    out.update(index=index, name=d.name, rates=list(rates), channels=channels)
    if is_input and rates:
        order = capture_rates(want_rate, d.default_rate)  # as PyAudioMicrophone tries them
        out["capture_rate"] = next((r for r in order if r in rates), order[0])
    return out


def describe_devices(cfg: Any | None) -> dict[str, Any]:
    """Every PortAudio device, and what ``cfg`` (if given) selects."""
    from edge.audio.pyaudio_io import list_devices, quiet_stderr

    with quiet_stderr():  # PortAudio prints a line for every format a device refuses
        devices = list_devices()
    report: dict[str, Any] = {"devices": [dict(d.__dict__) for d in devices]}
    if cfg is not None:
        report["config"] = cfg.source
        report["selected"] = [_selection(devices, cfg.audio.input_device, True, cfg.audio.input_rate),
                              _selection(devices, cfg.audio.output_device, False)]
    return report


def format_devices(report: dict[str, Any]) -> str:
    rows = [("#", "name", "api", "in ch", "out ch", "default Hz", "capture kHz", "playback kHz")]
    for d in report["devices"]:
        ins = _khz(tuple(d["input_rates"])) + (" (stereo)" if d["input_channels"] == 2 else "")
        outs = _khz(tuple(d["output_rates"])) + (" (stereo)" if d["output_channels"] == 2 else "")
        rows.append((str(d["index"]), d["name"], d["host_api"], str(d["max_input_channels"]),
                     str(d["max_output_channels"]), str(d["default_rate"]), ins, outs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if not report["devices"]:
        lines.append("(no audio devices: PortAudio found none; check `arecord -l`, `aplay -l` and that "
                     "the user is in the audio group)")
    for sel in report.get("selected", []):
        what = f"{sel['role']:<6} {sel['spec']!r}" if sel["spec"] else f"{sel['role']:<6} (default)"
        if "file" in sel:
            lines.append(f"{report['config']}: {what} -> the file {sel['file']}")
        elif "error" in sel:
            lines.append(f"{report['config']}: {what} -> {sel['error']}")
        elif sel.get("default"):
            lines.append(f"{report['config']}: {what} -> the system default device")
        else:
            how = f"{_khz(tuple(sel['rates']))} kHz, {sel['channels']} channel(s)" if sel["rates"] else \
                "no common rate accepted"
            if "capture_rate" in sel:
                how += f"; captured at {sel['capture_rate']} Hz" + (
                    "" if sel["capture_rate"] == SAMPLE_RATE else f", resampled to {SAMPLE_RATE} Hz")
            lines.append(f"{report['config']}: {what} -> #{sel['index']} {sel['name']} ({how})")
    return "\n".join(lines)


def run_devices(config: str | None, as_json: bool) -> int:
    """``edge-voice devices``: exit status 1 when the config names a device that is not there."""
    import json

    from edge.config import load_config

    cfg = load_config(config) if config else None
    report = describe_devices(cfg)
    print(json.dumps(report, indent=2) if as_json else format_devices(report))
    return 1 if any("error" in s for s in report.get("selected", [])) else 0
