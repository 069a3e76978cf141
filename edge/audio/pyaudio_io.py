"""PyAudio (PortAudio) microphone and speaker, device lookup and listing.

Capture: a callback on PortAudio's thread that never blocks. It downmixes, resamples to
16 kHz and appends 20 ms chunks to a bounded drop-oldest queue. Its period is 64 ms: through
PulseAudio's ALSA plugin, 16 kHz capture with 20 ms periods can stall after the first one.

Playback: blocking writes of 20 ms blocks from the speaker's own thread, so a flush takes
effect within a block plus the device's buffer. Between sounds a second thread keeps writing
silence: a stream left to run dry underruns, and after an underrun (through PulseAudio, and on
many ALSA devices) the start of the next sound is swallowed, a short chime entirely.

One PortAudio per process (:class:`_Host`). PortAudio counts ``Pa_Initialize`` calls and only
enumerates devices on the first, so as long as the speaker held it, a microphone plugged back in
would stay invisible to a reopen. Reopening a lost device therefore restarts PortAudio for
everyone: the other devices close their streams, PortAudio is terminated and initialised
again (a fresh device list), and they reopen. That happens before every attempt to reopen a
lost device: a device that cannot be reached while PortAudio enumerates (a USB microphone
pulled out, a sound server that is down) is left out of the list until the next enumeration.
The back-off bounds how often the other device is interrupted.

A device is lost when its stream stops (capture) or a write fails (playback; the silence
between sounds means a speaker unplugged while idle is noticed within a block).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.audio.buffers import DropOldestQueue
from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, Rechunker, Resampler, to_mono_int16
from edge.audio.playback import QueuedSpeaker
from edge.errors import AudioError, MissingDependency

_LOGGER = logging.getLogger(__name__)

CAPTURE_PERIOD_S = 0.064
FILL_AFTER_S = 0.06  # no sound written for this long: the filler takes over with silence
_PROBE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


def _pyaudio() -> Any:
    try:
        import pyaudio
    except ImportError:
        raise MissingDependency.for_module("pyaudio", "audio") from None
    return pyaudio


# -- native libraries' chatter -------------------------------------------------------
# ALSA and JACK print to stderr while PortAudio enumerates devices ("cannot find card 0",
# "jack server is not running"): noise to a user, so it is dropped unless debugging.
_ALSA_HANDLER_T = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                   ctypes.c_char_p)
_JACK_HANDLER_T = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_keep: list[Any] = []  # the C callbacks must outlive every call into ALSA and JACK


def _quiet_native_libraries() -> None:
    if _keep or _LOGGER.isEnabledFor(logging.DEBUG):
        return
    os.environ.setdefault("JACK_NO_START_SERVER", "1")  # never spawn jackd while probing
    alsa_cb = _ALSA_HANDLER_T(lambda *args: None)
    jack_cb = _JACK_HANDLER_T(lambda msg: None)
    _keep.extend([alsa_cb, jack_cb])
    for name, setup in (("asound", lambda lib: lib.snd_lib_error_set_handler(alsa_cb)),
                        ("jack", lambda lib: (lib.jack_set_error_function(jack_cb),
                                              lib.jack_set_info_function(jack_cb)))):
        path = ctypes.util.find_library(name)
        if path is None:
            continue
        try:
            setup(ctypes.CDLL(path))
        except (OSError, AttributeError) as err:
            _LOGGER.debug("cannot quieten %s: %s", name, err)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (PortAudio's own error prints) for a single-threaded command."""
    if _LOGGER.isEnabledFor(logging.DEBUG):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def new_pyaudio() -> Any:
    pyaudio = _pyaudio()
    _quiet_native_libraries()
    return pyaudio.PyAudio()


class _Host:
    """The process's PortAudio, shared by its devices, restartable to see devices come back."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._pa: Any = None
        self._users: list[Any] = []

    def pa(self) -> Any:
        with self.lock:
            if self._pa is None:
                self._pa = new_pyaudio()
            return self._pa

    def register(self, user: Any) -> None:
        with self.lock:
            if user not in self._users:
                self._users.append(user)

    def unregister(self, user: Any) -> None:
        with self.lock:
            if user in self._users:
                self._users.remove(user)
            if not self._users and self._pa is not None:
                self._pa.terminate()
                self._pa = None

    def restart(self, requester: Any) -> None:
        """Terminate and initialise PortAudio again; the other users close and reopen around it."""
        with self.lock:
            others = [u for u in self._users if u is not requester]
            for u in others:
                u._host_closing()
            if self._pa is not None:
                self._pa.terminate()
                self._pa = None
            t0 = time.monotonic()
            pa = self.pa()
            _LOGGER.info("PortAudio re-initialised in %.0f ms: %d devices", 1000 * (time.monotonic() - t0),
                         pa.get_device_count())
            for u in others:
                u._host_reopened()


_HOST = _Host()


# -- devices -------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_rate: int
    input_rates: tuple[int, ...]  # rates capture opens at, with input_channels channels
    output_rates: tuple[int, ...]
    input_channels: int = 1  # 2 for a device that refuses mono
    output_channels: int = 1


def list_devices() -> list[DeviceInfo]:
    """Every PortAudio device with the common rates it accepts (mono, else stereo)."""
    pyaudio = _pyaudio()
    pa = new_pyaudio()
    try:
        out = []
        for i in range(pa.get_device_count()):
            d = pa.get_device_info_by_index(i)
            api = pa.get_host_api_info_by_index(d["hostApi"])["name"]
            ins, in_ch = _probe(pa, pyaudio, i, int(d["maxInputChannels"]), True)
            outs, out_ch = _probe(pa, pyaudio, i, int(d["maxOutputChannels"]), False)
            out.append(DeviceInfo(i, d["name"], api, int(d["maxInputChannels"]), int(d["maxOutputChannels"]),
                                  int(d["defaultSampleRate"]), ins, outs, in_ch, out_ch))
        return out
    finally:
        pa.terminate()


def _probe(pa: Any, pyaudio: Any, index: int, max_channels: int, is_input: bool) -> tuple[tuple[int, ...], int]:
    for channels in (1, 2):
        if channels > max_channels:
            break
        rates = tuple(r for r in _PROBE_RATES if _supported(pa, pyaudio, index, r, channels, is_input))
        if rates:
            return rates, channels
    return (), 1


def _supported(pa: Any, pyaudio: Any, index: int, rate: int, channels: int, is_input: bool) -> bool:
    try:
        kw = ({"input_device": index, "input_channels": channels, "input_format": pyaudio.paInt16} if is_input
              else {"output_device": index, "output_channels": channels, "output_format": pyaudio.paInt16})
        return bool(pa.is_format_supported(rate, **kw))
    except ValueError:
        return False


def find_device(pa: Any, spec: str, is_input: bool) -> int | None:
    """A device index from an index, a name, or a unique part of a name; None = the default.

    An exact name (case aside) wins over a partial one, so ``pulse`` is not ambiguous beside
    ``pulse_echo_cancel``; a partial name that fits several devices is refused with their names.
    """
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
    names = {i: pa.get_device_info_by_index(i) for i in range(count)}
    usable = {i: d["name"] for i, d in names.items() if d[key] > 0}
    exact = [i for i, name in usable.items() if name.lower() == spec.lower()]
    if exact:
        return exact[0]
    partial = [i for i, name in usable.items() if spec.lower() in name.lower()]
    if len(partial) == 1:
        return partial[0]
    if partial:
        shown = ", ".join(repr(usable[i]) for i in partial)
        raise AudioError(f"audio {kind} device {spec!r} is ambiguous ({shown}); give more of the name or "
                         "the index", code="audio.ambiguous_device")
    raise AudioError(f"no audio {kind} device matches {spec!r}; `edge-voice devices` lists them",
                     code="audio.no_device")


def _rates(wanted: list[int], default_rate: int) -> list[int]:
    return list(dict.fromkeys([r for r in [*wanted, default_rate, 48000, 44100] if r > 0]))


def capture_rates(want_rate: int, default_rate: int) -> list[int]:
    """The rates a microphone is opened at, in the order tried (``want_rate`` 0: any)."""
    return [want_rate] if want_rate else _rates([SAMPLE_RATE], default_rate)


def _device_info(pa: Any, spec: str, is_input: bool) -> tuple[int | None, dict]:
    """The index ``spec`` names (None: the default device) and its PortAudio info."""
    try:
        index = find_device(pa, spec, is_input)
        if index is not None:
            return index, pa.get_device_info_by_index(index)
        return None, pa.get_default_input_device_info() if is_input else pa.get_default_output_device_info()
    except OSError as err:
        kind = "input" if is_input else "output"
        raise AudioError(f"no audio {kind} device: {err}", code="audio.no_device") from None


def _open_first(info: dict, is_input: bool, rates: list[int],
                open_at: Callable[[int, int], Any]) -> tuple[Any, int, int]:
    """``(stream, rate, channels)`` from the first of ``rates`` that opens, mono before stereo."""
    key = "maxInputChannels" if is_input else "maxOutputChannels"
    last: Exception | None = None
    for rate in rates:
        for channels in (c for c in (1, 2) if c <= max(1, int(info[key]))):
            try:
                return open_at(rate, channels), rate, channels
            except (OSError, ValueError) as err:
                last = err
    kind = "input" if is_input else "output"
    raise AudioError(f"cannot open audio {kind} {info['name']!r}: {last}", code="audio.open_failed")


def _shut(stream: Any) -> None:
    """Stop and close a stream; a dead device's errors are ignored: closing is all that is left."""
    for op in (stream.stop_stream, stream.close):
        try:
            op()
        except OSError:
            pass


# -- capture -------------------------------------------------------------------------
class PyAudioMicrophone:
    """A PortAudio capture device as 16 kHz mono 20 ms chunks; ``open`` again after a loss."""

    def __init__(self, device: str = "", *, rate: int = 0, queue_chunks: int = 100) -> None:
        self.device = device
        self.want_rate = rate
        self._q: DropOldestQueue[AudioChunk] = DropOldestQueue(queue_chunks)
        self._lock = threading.Lock()
        self._stream: Any = None
        self._rechunker = Rechunker(CHUNK_SAMPLES, SAMPLE_RATE)
        self._resampler: Resampler | None = None
        self._opened_once = False
        self._open = False
        self._restarting = False
        self.name = device or "default"
        self.rate = 0
        self.channels = 1
        self.last_audio = 0.0

    @property
    def dropped(self) -> int:
        return self._q.dropped

    def open(self) -> None:
        """Open the device; a reopen restarts PortAudio first (see the module docstring)."""
        _pyaudio()
        with _HOST.lock:
            _HOST.register(self)
            if self._opened_once:
                _HOST.restart(self)
            self._open_stream()
        self._opened_once = True
        self._open = True

    def _open_stream(self) -> None:
        pyaudio = _pyaudio()
        pa = _HOST.pa()
        index, info = _device_info(pa, self.device, True)
        stream, self.rate, self.channels = _open_first(
            info, True, capture_rates(self.want_rate, int(info["defaultSampleRate"])),
            lambda rate, channels: pa.open(format=pyaudio.paInt16, channels=channels, rate=rate, input=True,
                                           input_device_index=index, frames_per_buffer=int(rate * CAPTURE_PERIOD_S),
                                           stream_callback=self._callback, start=False))
        self.name = info["name"]
        # The rechunker is kept: a reopened stream continues the audio timeline.
        self._resampler = Resampler(self.rate, SAMPLE_RATE) if self.rate != SAMPLE_RATE else None
        self.last_audio = time.monotonic()
        with self._lock:
            self._stream = stream
        try:
            stream.start_stream()
        except OSError as err:
            self._close_stream()
            raise AudioError(f"cannot start audio input {self.name!r}: {err}", code="audio.open_failed") from None
        _LOGGER.info("microphone %r open at %d Hz, %d channel(s)%s", self.name, self.rate, self.channels,
                     "" if self._resampler is None else f", resampled to {SAMPLE_RATE} Hz")

    def _callback(self, in_data: bytes, frame_count: int, time_info: Any, status: int) -> tuple[None, int]:
        x = np.frombuffer(in_data, dtype="<i2")
        if self.channels > 1:
            x = to_mono_int16(x[: len(x) - len(x) % self.channels].reshape(-1, self.channels))
        if self._resampler is not None:
            x = self._resampler.process(x)
        now = time.monotonic()
        self.last_audio = now
        for chunk in self._rechunker.push(x, now):
            self._q.put(chunk)
        return (None, 0)  # paContinue

    def read(self, timeout: float) -> AudioChunk | None:
        """The next chunk, or None after ``timeout``; AudioError once the stream has died."""
        chunk = self._q.get(timeout)
        if chunk is None and self._open and not self._restarting and not self.active():
            raise AudioError(f"audio input {self.name!r} stopped: the device went away", code="audio.lost")
        return chunk

    def active(self) -> bool:
        with self._lock:
            stream = self._stream
            try:
                return stream is not None and stream.is_active()
            except OSError:
                return False

    def _close_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            _shut(stream)

    # PortAudio restarts for another device.
    def _host_closing(self) -> None:
        self._restarting = True
        self._close_stream()

    def _host_reopened(self) -> None:
        try:
            if self._open:
                self._open_stream()
        except AudioError as err:
            # read() reports the loss and the daemon reopens it the usual way.
            _LOGGER.warning("microphone did not reopen after the PortAudio restart: %s", err.message)
        finally:
            self._restarting = False

    def close(self) -> None:
        self._open = False
        self._close_stream()
        self._q.clear()
        _HOST.unregister(self)


# -- playback ------------------------------------------------------------------------
class PyAudioSpeaker(QueuedSpeaker):
    """A PortAudio playback device that survives being unplugged.

    ``state`` is ``open`` or ``lost``; ``on_state(state, detail)`` is called on each change
    (from the speaker's threads). While lost, audio is dropped at once (nobody can hear it,
    and the conversation must not wait for it) and the device is reopened with back-off.
    ``audible_until`` is when the last block written will have left the loudspeaker.
    """

    def __init__(self, device: str, rate: int, *, volume: float = 1.0,
                 on_state: Callable[[str, str], None] | None = None, backoff_max_s: float = 30.0) -> None:
        _pyaudio()
        super().__init__(rate, volume=volume)
        self.device = device
        self.on_state = on_state
        self.backoff_max_s = backoff_max_s
        self._io = threading.Lock()
        self._stream: Any = None
        self._resampler: Resampler | None = None
        self._channels = 1
        self._silence = bytes(2)
        self._stop = threading.Event()
        self._sound_until = 0.0  # the speaker thread is writing sound: the filler keeps off
        self.name = device or "default"
        self.out_rate = 0
        self.latency = 0.0
        self.state = "closed"
        self.dropped_blocks = 0
        _HOST.register(self)
        try:
            with _HOST.lock:
                self._open_stream()
        except AudioError as err:
            self._lose(err.message)
        else:
            self._set_state("open", f"playing on {self.name!r}")
        self._watcher = threading.Thread(target=self._watch, name="speaker-watch", daemon=True)
        self._watcher.start()

    def _set_state(self, state: str, detail: str) -> None:
        if state == self.state:
            return
        self.state = state
        cb = self.on_state
        if cb is not None:
            try:
                cb(state, detail)
            except Exception:
                _LOGGER.exception("speaker state callback failed")

    def _open_stream(self) -> None:
        pyaudio = _pyaudio()
        pa = _HOST.pa()
        index, info = _device_info(pa, self.device, False)
        stream, out_rate, channels = _open_first(
            info, False, _rates([self.rate], int(info["defaultSampleRate"])),
            lambda rate, channels: pa.open(format=pyaudio.paInt16, channels=channels, rate=rate, output=True,
                                           output_device_index=index, frames_per_buffer=rate // 50))
        with self._io:
            self._stream = stream
            self._channels = channels
            self.out_rate = out_rate
            self._silence = bytes(2 * channels * max(1, out_rate // 50))  # one block, for the filler
            self._resampler = Resampler(self.rate, out_rate) if out_rate != self.rate else None
            self.latency = float(stream.get_output_latency())
        self.name = info["name"]
        _LOGGER.info("speaker %r open at %d Hz, %d channel(s), latency %.0f ms", self.name, out_rate,
                     channels, 1000 * self.latency)

    def _close_stream(self) -> None:
        with self._io:
            stream, self._stream = self._stream, None
        if stream is not None:
            _shut(stream)

    def _lose(self, why: str) -> None:
        if self.state != "lost":
            _LOGGER.warning("speaker %r lost: %s", self.name, why)
        self._close_stream()
        self._set_state("lost", why)

    def _write(self, data: bytes) -> bool:
        """One blocking write; False (and the speaker lost) if the device has gone."""
        with self._io:
            stream = self._stream
            if stream is None:
                return False
            try:
                stream.write(data, exception_on_underflow=False)
            except OSError as err:
                failed: str | None = f"playback failed: {err}"
            else:
                failed = None
        if failed is not None:
            self._lose(failed)
            return False
        return True

    def _output(self, block: np.ndarray) -> None:
        self._sound_until = time.monotonic() + FILL_AFTER_S  # before taking the lock from the filler
        if self._resampler is not None:
            block = self._resampler.process(block)
        if self._channels == 2:
            block = np.repeat(block, 2)
        if self._write(block.astype("<i2").tobytes()):
            now = time.monotonic()
            self._audible_until = now + self.latency
            self._sound_until = now + FILL_AFTER_S
        else:
            self.dropped_blocks += 1

    def _watch(self) -> None:
        """Fill silence between sounds; while lost, reopen with back-off."""
        backoff, next_try = 0.5, 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self.state == "lost":
                if now >= next_try:
                    try:
                        with _HOST.lock:
                            _HOST.restart(self)
                            self._open_stream()
                    except AudioError as err:
                        _LOGGER.warning("speaker unavailable (%s); retrying in %.1f s", err.message, backoff)
                        next_try, backoff = now + backoff, min(backoff * 2, self.backoff_max_s)
                    else:
                        backoff = 0.5
                        _LOGGER.info("speaker %r back", self.name)
                        self._set_state("open", f"playing on {self.name!r}")
                self._stop.wait(0.25)
            elif now < self._sound_until:
                self._stop.wait(0.01)
            else:
                # Blocking: the device paces this loop. The pause lets the speaker thread in.
                self._write(self._silence)
                self._stop.wait(0.002)

    # PortAudio restarts for another device.
    def _host_closing(self) -> None:
        self._close_stream()

    def _host_reopened(self) -> None:
        if self.state != "open":
            return
        try:
            self._open_stream()
        except AudioError as err:
            self._lose(err.message)

    def _on_close(self) -> None:
        self._stop.set()
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        self._close_stream()
        _HOST.unregister(self)
