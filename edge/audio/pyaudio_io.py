"""PyAudio (PortAudio) microphone and speaker.

The capture callback runs on PortAudio's thread and never blocks: it converts the block to
16 kHz mono and appends it to a bounded drop-oldest queue. Playback is a blocking write of
20 ms blocks from the speaker's own thread, so a flush takes effect within a block plus the
device's buffer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from edge.audio.buffers import DropOldestQueue
from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, Rechunker, Resampler
from edge.audio.playback import QueuedSpeaker
from edge.errors import AudioError, MissingDependency

_LOGGER = logging.getLogger(__name__)


def _pyaudio():
    try:
        import pyaudio
    except ImportError:
        raise MissingDependency.for_module("pyaudio", "audio") from None
    return pyaudio


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_rate: int
    input_rates: tuple[int, ...]
    output_rates: tuple[int, ...]


_PROBE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


def list_devices() -> list[DeviceInfo]:
    """Every PortAudio device with the common rates it accepts for mono (or its channels)."""
    pyaudio = _pyaudio()
    pa = pyaudio.PyAudio()
    try:
        out = []
        for i in range(pa.get_device_count()):
            d = pa.get_device_info_by_index(i)
            api = pa.get_host_api_info_by_index(d["hostApi"])["name"]
            ins, outs = [], []
            for rate in _PROBE_RATES:
                if d["maxInputChannels"] > 0 and _supported(pa, pyaudio, i, rate, True):
                    ins.append(rate)
                if d["maxOutputChannels"] > 0 and _supported(pa, pyaudio, i, rate, False):
                    outs.append(rate)
            out.append(DeviceInfo(i, d["name"], api, int(d["maxInputChannels"]),
                                  int(d["maxOutputChannels"]), int(d["defaultSampleRate"]),
                                  tuple(ins), tuple(outs)))
        return out
    finally:
        pa.terminate()


def _supported(pa, pyaudio, index: int, rate: int, is_input: bool) -> bool:
    try:
        kw = {"input_device": index, "input_channels": 1, "input_format": pyaudio.paInt16} if is_input else \
             {"output_device": index, "output_channels": 1, "output_format": pyaudio.paInt16}
        return bool(pa.is_format_supported(rate, **kw))
    except ValueError:
        return False


def find_device(pa, spec: str, is_input: bool) -> int | None:
    """A device index from an index or a case-insensitive part of its name; None = default."""
    if spec == "":
        return None
    key = "maxInputChannels" if is_input else "maxOutputChannels"
    kind = "input" if is_input else "output"
    count = pa.get_device_count()
    if spec.isdigit():
        idx = int(spec)
        if idx >= count or pa.get_device_info_by_index(idx)[key] < 1:
            raise AudioError(f"audio {kind} device {idx} does not exist; `edge-voice devices` lists them",
                             code="audio.no_device")
        return idx
    for i in range(count):
        d = pa.get_device_info_by_index(i)
        if d[key] > 0 and spec.lower() in d["name"].lower():
            return i
    raise AudioError(f"no audio {kind} device matches {spec!r}; `edge-voice devices` lists them",
                     code="audio.no_device")


class PyAudioMicrophone:
    def __init__(self, device: str = "", *, rate: int = 0, queue_chunks: int = 100) -> None:
        self.device = device
        self.want_rate = rate
        self._q: DropOldestQueue[AudioChunk] = DropOldestQueue(queue_chunks)
        self._pa = None
        self._stream = None
        self._rechunker = Rechunker(CHUNK_SAMPLES, SAMPLE_RATE)
        self._resampler: Resampler | None = None
        self.rate = 0
        self.channels = 1
        self.last_audio = 0.0

    @property
    def dropped(self) -> int:
        return self._q.dropped

    def open(self) -> None:
        pyaudio = _pyaudio()
        self._pa = pyaudio.PyAudio()
        try:
            index = find_device(self._pa, self.device, True)
            info = (self._pa.get_device_info_by_index(index) if index is not None
                    else self._pa.get_default_input_device_info())
        except OSError as err:
            self.close()
            raise AudioError(f"no audio input device: {err}", code="audio.no_device") from None
        except AudioError:
            self.close()
            raise
        rates = [self.want_rate] if self.want_rate else [SAMPLE_RATE, int(info["defaultSampleRate"]), 48000, 44100]
        last_err = None
        for rate in dict.fromkeys(rates):
            try:
                self._stream = self._pa.open(
                    format=pyaudio.paInt16, channels=1, rate=rate, input=True,
                    input_device_index=index, frames_per_buffer=max(1, rate // 50),
                    stream_callback=self._callback)
                self.rate = rate
                break
            except (OSError, ValueError) as err:
                last_err = err
        if self._stream is None:
            self.close()
            raise AudioError(f"cannot open audio input {info['name']!r}: {last_err}", code="audio.open_failed")
        self._resampler = Resampler(self.rate, SAMPLE_RATE) if self.rate != SAMPLE_RATE else None
        self.last_audio = time.monotonic()
        _LOGGER.info("microphone %r open at %d Hz", info["name"], self.rate)

    def _callback(self, in_data, frame_count, time_info, status):
        pyaudio = _pyaudio()
        x = np.frombuffer(in_data, dtype="<i2")
        if self._resampler is not None:
            x = self._resampler.process(x)
        now = time.monotonic()
        self.last_audio = now
        for chunk in self._rechunker.push(x, now):
            self._q.put(chunk)
        return (None, pyaudio.paContinue)

    def read(self, timeout: float) -> AudioChunk | None:
        return self._q.get(timeout)

    def active(self) -> bool:
        return self._stream is not None and self._stream.is_active()

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.stop_stream()
                self._stream.close()
            except OSError:
                pass
            self._stream = None
        if self._pa is not None:
            self._pa.terminate()
            self._pa = None


class PyAudioSpeaker(QueuedSpeaker):
    def __init__(self, device: str, rate: int, *, volume: float = 1.0) -> None:
        super().__init__(rate, volume=volume)
        self.device = device
        self._pa = None
        self._stream = None
        self._resampler: Resampler | None = None
        self._open()

    def _open(self) -> None:
        pyaudio = _pyaudio()
        self._pa = pyaudio.PyAudio()
        index = find_device(self._pa, self.device, False)
        for out_rate in dict.fromkeys([self.rate, 48000, 44100]):
            try:
                self._stream = self._pa.open(format=pyaudio.paInt16, channels=1, rate=out_rate, output=True,
                                             output_device_index=index, frames_per_buffer=out_rate // 50)
                self._resampler = Resampler(self.rate, out_rate) if out_rate != self.rate else None
                return
            except (OSError, ValueError) as err:
                last = err
        self._pa.terminate()
        self._pa = None
        raise AudioError(f"cannot open audio output {self.device or 'default'!r}: {last}", code="audio.open_failed")

    def _output(self, block: np.ndarray) -> None:
        if self._stream is None:
            return
        if self._resampler is not None:
            block = self._resampler.process(block)
        self._stream.write(block.astype("<i2").tobytes(), exception_on_underflow=False)

    def _on_close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.stop_stream()
                self._stream.close()
            except OSError:
                pass
            self._stream = None
        if self._pa is not None:
            self._pa.terminate()
            self._pa = None
