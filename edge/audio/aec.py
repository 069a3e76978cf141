"""Acoustic echo cancellation with what the device played as the reference, and echo for tests.

The daemon knows exactly what it plays. :class:`EchoCanceller` keeps it (the *far end*) on a
clock shared with the microphone and, for every 20 ms microphone chunk (the *near end*), hands
the engine the far-end samples that were leaving the loudspeaker while the chunk was captured;
the engine subtracts the echo it has learned and returns the cleaned chunk, before the wake word
and the VAD see it.

Delay. A block written to the speaker is heard ``Speaker.latency`` later, plus a few ms of air,
and a chunk read from the microphone was captured ``input_latency_s`` before it arrived. Both
ends are timestamped by the caller on one clock (``time.monotonic()`` in the daemon, the audio
timeline in ``simulate``): the far end with when its first sample leaves the loudspeaker, the
near end with when its first sample was captured. The reference handed to the engine is then
taken ``delay_ms`` earlier than the chunk, so it always leads the echo (an adaptive filter can
only model a delay forwards); the engine learns the rest: WebRTC AEC3 estimates the remaining
delay itself (up to about half a second), speexdsp's filter spans ``tail_ms``.

Engines, chosen by measurement (``edge.devtools.echo_eval``: 52 replies, a visitor's "hey Jarvis"
over each, echo at 0 and -10 dB):

- ``speex`` (the default): speexdsp's MDF echo canceller and residual-echo suppressor through
  ctypes on the system's ``libspeexdsp.so.1`` (BSD-3-Clause; Debian/Raspberry Pi OS
  ``libspeexdsp1``, already there wherever PulseAudio or PipeWire is; no Python package). It
  keeps the visitor's voice through double talk: the wake word over the reply was heard 51 of
  52 times at both levels, against 11 and 41 with WebRTC. It converges slowly (about one reply).
- ``webrtc``: WebRTC's AEC3 through the ``pywebrtc-audio`` wheel (Apache-2.0; wheels for x86_64
  and aarch64, CPython 3.10-3.14): more echo removed (30-40 dB) and from the first reply, and it
  finds the delay itself, but its suppressor eats the visitor's words while the device speaks.
- ``none``: pass-through (for measuring).

Echo for tests: :func:`room_impulse_response`, :func:`mix_echo` (whole signals) and
:class:`EchoPath` (streaming, for ``simulate``) add the device's own output to a microphone
signal with a delay, a short synthetic room response and a gain relative to the visitor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, Resampler
from edge.errors import AudioError, ConfigError, MissingDependency

_LOGGER = logging.getLogger(__name__)

ENGINES = ("webrtc", "speex", "none")
FAR_KEEP_S = 10.0  # far-end audio kept for lookup (a speaker may report a few seconds ahead)
FRAME_10MS = SAMPLE_RATE // 100
ERLE_SMOOTHING = 0.01  # per 20 ms chunk: the ERLE estimate follows the last ~2 s of the device's sound


@dataclass(frozen=True)
class AecSettings:
    """How the echo canceller runs (the ``[audio]`` AEC keys)."""

    engine: str = "speex"  # speex | webrtc | none
    # Seconds by which the reference leads the microphone beyond the two timestamps: covers what
    # the timestamps do not (the air, a driver's unreported buffer). Too large costs the speex
    # filter length; the reference must never lag the echo.
    delay_ms: int = 0
    input_latency_ms: int = 0  # capture latency when near-end times come from ``chunk.wall``
    tail_ms: int = 200  # speex: echo path length the filter spans (delay mismatch + room)
    suppress: bool = True  # speex: residual-echo suppression after the filter
    # Find the delay the timestamps miss by cross-correlating what was played with what was heard
    # (up to max_delay_ms), and lead the reference by that less a margin; for speex, whose filter
    # spans only tail_ms, this is what makes an unreported buffer harmless.
    auto_delay: bool = True
    max_delay_ms: int = 500

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"audio.aec_engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if not 0 <= self.delay_ms <= 1000 or not 0 <= self.input_latency_ms <= 1000:
            raise ConfigError("audio.aec_delay_ms and audio.aec_input_latency_ms must be within 0-1000")
        if not 20 <= self.tail_ms <= 1000:
            raise ConfigError("audio.aec_tail_ms must be within 20-1000")
        if not 50 <= self.max_delay_ms <= 2000:
            raise ConfigError("audio.aec_max_delay_ms must be within 50-2000")


# -- the far end ------------------------------------------------------------------------------

class FarEnd:
    """What the loudspeaker played, as 16 kHz samples on the caller's clock. Thread-safe:
    the speaker's thread adds, the audio thread reads."""

    def __init__(self, keep_s: float = FAR_KEEP_S) -> None:
        self._keep = int(keep_s * SAMPLE_RATE)
        self._buf = np.zeros(self._keep, dtype=np.int16)
        self._base: int | None = None  # clock sample (round(t * rate)) of _buf[0]
        self._lock = threading.Lock()
        self._resampler: Resampler | None = None
        self._next: tuple[int, float] | None = None  # (input rate, clock time the next input sample plays)
        self._out_at = 0  # clock sample of the resampler's next output sample
        self.last_end = -math.inf  # clock seconds where the last audio added ends

    def add(self, samples: np.ndarray, rate: int, at: float) -> None:
        """``samples`` (int16 mono at ``rate``) leave the loudspeaker from clock time ``at``."""
        x = np.asarray(samples, dtype=np.int16)
        if not len(x):
            return
        with self._lock:
            continuous = (self._next is not None and self._next[0] == rate
                          and abs(self._next[1] - at) < 0.005)
            if not continuous or self._resampler is None:
                self._resampler = Resampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
                self._out_at = int(round(at * SAMPLE_RATE))
            y = self._resampler.process(x) if self._resampler is not None else x
            self._write(self._out_at, y)
            self._out_at += len(y)
            self._next = (rate, at + len(x) / rate)
            self.last_end = max(self.last_end, at + len(x) / rate)

    def _write(self, start: int, y: np.ndarray) -> None:
        if not len(y):
            return
        if self._base is None:
            self._base = start
        end = start + len(y)
        if end > self._base + self._keep:  # slide the window forwards
            shift = end - (self._base + self._keep)
            if shift >= self._keep:
                self._buf[:] = 0
            else:
                self._buf[:-shift] = self._buf[shift:]
                self._buf[-shift:] = 0
            self._base += shift
        lo = max(start, self._base)
        if lo < end:
            self._buf[lo - self._base:end - self._base] = y[lo - start:]

    def take(self, at: float, n: int) -> np.ndarray:
        """``n`` samples from clock time ``at``; silence where nothing was played (or kept)."""
        out = np.zeros(n, dtype=np.int16)
        start = int(round(at * SAMPLE_RATE))
        with self._lock:
            if self._base is None:
                return out
            lo, hi = max(start, self._base), min(start + n, self._base + self._keep)
            if lo < hi:
                out[lo - start:hi - start] = self._buf[lo - self._base:hi - self._base]
        return out

    def clear(self) -> None:
        with self._lock:
            self._buf[:] = 0
            self._resampler = None
            self._next = None


# -- engines ----------------------------------------------------------------------------------

class _Engine(Protocol):
    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        """One chunk (a whole number of 10 ms frames, int16) of microphone and reference."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class _PassThrough:
    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        return near

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class _WebRtc:
    """WebRTC AEC3 (``pywebrtc_audio.EchoCanceller``): high-pass, linear filter, suppressor."""

    def __init__(self, settings: AecSettings) -> None:
        try:
            import pywebrtc_audio
        except ImportError:
            raise MissingDependency.for_module("pywebrtc_audio", "aec") from None
        self._mod = pywebrtc_audio
        self._ec: Any = pywebrtc_audio.EchoCanceller(sample_rate=SAMPLE_RATE, num_channels=1, stream_delay_ms=0)

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        return np.asarray(self._ec.process(near, far), dtype=np.int16)

    def reset(self) -> None:
        self._ec.reset()

    def close(self) -> None:
        self._ec = None


SPEEX_ECHO_SET_SAMPLING_RATE = 24
SPEEX_PREPROCESS_SET_DENOISE = 0
SPEEX_PREPROCESS_SET_ECHO_STATE = 24


def _load_speexdsp() -> Any:
    name = ctypes.util.find_library("speexdsp") or "libspeexdsp.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise MissingDependency("the speexdsp library is not installed: install it with "
                                "`apt-get install libspeexdsp1` or set audio.aec_engine = \"webrtc\"") from None
    vp, i16p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int16)
    for fn, args, res in (
            ("speex_echo_state_init", [ctypes.c_int, ctypes.c_int], vp),
            ("speex_echo_state_destroy", [vp], None),
            ("speex_echo_state_reset", [vp], None),
            ("speex_echo_ctl", [vp, ctypes.c_int, vp], ctypes.c_int),
            ("speex_echo_cancellation", [vp, i16p, i16p, i16p], None),
            ("speex_preprocess_state_init", [ctypes.c_int, ctypes.c_int], vp),
            ("speex_preprocess_state_destroy", [vp], None),
            ("speex_preprocess_ctl", [vp, ctypes.c_int, vp], ctypes.c_int),
            ("speex_preprocess_run", [vp, i16p], ctypes.c_int)):
        f = getattr(lib, fn)
        f.argtypes, f.restype = args, res
    return lib


class _Speex:
    """speexdsp MDF echo canceller on 10 ms frames, then its residual-echo suppressor."""

    def __init__(self, settings: AecSettings) -> None:
        self._lib = _load_speexdsp()
        self._suppress = settings.suppress
        self._tail = int(settings.tail_ms * SAMPLE_RATE / 1000)
        self._echo: Any = None
        self._pre: Any = None
        self._open()

    def _open(self) -> None:
        lib = self._lib
        self._echo = lib.speex_echo_state_init(FRAME_10MS, self._tail)
        rate = ctypes.c_int(SAMPLE_RATE)
        lib.speex_echo_ctl(self._echo, SPEEX_ECHO_SET_SAMPLING_RATE, ctypes.byref(rate))
        if self._suppress:
            self._pre = lib.speex_preprocess_state_init(FRAME_10MS, SAMPLE_RATE)
            off = ctypes.c_int(0)
            lib.speex_preprocess_ctl(self._pre, SPEEX_PREPROCESS_SET_DENOISE, ctypes.byref(off))
            lib.speex_preprocess_ctl(self._pre, SPEEX_PREPROCESS_SET_ECHO_STATE, ctypes.c_void_p(self._echo))

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        lib = self._lib
        n = np.ascontiguousarray(near, dtype=np.int16)
        f = np.ascontiguousarray(far, dtype=np.int16)
        out = np.empty_like(n)
        p16 = ctypes.POINTER(ctypes.c_int16)
        for i in range(0, len(n), FRAME_10MS):
            o = out[i:i + FRAME_10MS].ctypes.data_as(p16)
            lib.speex_echo_cancellation(self._echo, n[i:i + FRAME_10MS].ctypes.data_as(p16),
                                        f[i:i + FRAME_10MS].ctypes.data_as(p16), o)
            if self._pre is not None:
                lib.speex_preprocess_run(self._pre, o)
        return out

    def reset(self) -> None:
        self.close()
        self._open()

    def close(self) -> None:
        if self._pre is not None:
            self._lib.speex_preprocess_state_destroy(self._pre)
            self._pre = None
        if self._echo is not None:
            self._lib.speex_echo_state_destroy(self._echo)
            self._echo = None


def _engine(settings: AecSettings) -> _Engine:
    if settings.engine == "webrtc":
        return _WebRtc(settings)
    if settings.engine == "speex":
        return _Speex(settings)
    return _PassThrough()


# -- the delay the timestamps miss ----------------------------------------------------------------

DELAY_WINDOW_S = 1.0  # microphone audio correlated at each estimate
DELAY_EVERY = 25  # chunks (0.5 s) between estimates
DELAY_AGREE = 3  # estimates in a row within 2 ms before the delay is taken
DELAY_MARGIN_S = 0.03  # the reference leads the estimated echo by this much
ROOM_S = 0.1  # what the filter's tail must keep for the room's response after the delay


class DelayEstimator:
    """The echo's delay behind the timestamped reference, by GCC-PHAT over the last second.

    Fed each chunk's microphone samples and the reference for the same clock time (no lead);
    every half second of the device's sound it correlates the last second of the microphone with
    the reference up to ``max_delay_s`` before it. A delay is reported once several estimates in
    a row agree (double talk and pauses give scattered peaks that never agree).
    """

    def __init__(self, max_delay_s: float) -> None:
        self._max = int(max_delay_s * SAMPLE_RATE)
        self._win = int(DELAY_WINDOW_S * SAMPLE_RATE)
        self._near = np.zeros(self._win, np.float64)
        self._far = np.zeros(self._win + self._max, np.float64)
        self._count = 0
        self._votes: list[int] = []
        self.delay_s: float | None = None

    def push(self, near: np.ndarray, far: np.ndarray) -> float | None:
        """Returns a new agreed delay (seconds) when one is found, else None."""
        n = len(near)
        self._near = np.concatenate([self._near[n:], near.astype(np.float64)])
        self._far = np.concatenate([self._far[n:], far.astype(np.float64)])
        self._count += 1
        if self._count % DELAY_EVERY or not self._far[-self._win:].any():
            return None
        size = 1 << int(math.ceil(math.log2(len(self._far) + self._win)))
        spec = np.fft.rfft(self._near, size) * np.conj(np.fft.rfft(self._far, size))
        corr = np.fft.irfft(spec / (np.abs(spec) + 1e-9), size)
        # corr[k] = sum near[i + k] far[i]; near[j] hears far[j + max - lag], so lag <-> k = lag - max.
        lags = corr[(np.arange(self._max + 1) - self._max) % size]  # index: lag in samples
        lag = int(np.argmax(lags))
        if lags[lag] < 6 * np.median(np.abs(lags)):
            self._votes.clear()
            return None
        self._votes = [*self._votes[-(DELAY_AGREE - 1):], lag]
        if len(self._votes) == DELAY_AGREE and max(self._votes) - min(self._votes) <= SAMPLE_RATE // 500:
            est = float(np.median(self._votes)) / SAMPLE_RATE
            if self.delay_s is None or abs(est - self.delay_s) > 0.005:
                self.delay_s = est
                return est
        return None


# -- the canceller ------------------------------------------------------------------------------

class EchoCanceller:
    """Removes the device's own sound from the microphone chunks.

    ``played`` comes from the speaker's thread, ``process`` from the audio thread (the one that
    feeds the wake word and the recognizer); nothing else is shared between them.
    """

    def __init__(self, settings: AecSettings | None = None) -> None:
        self.settings = settings or AecSettings()
        self.far = FarEnd()
        self._engine = _engine(self.settings)
        self._lead_s = self.settings.delay_ms / 1000
        # WebRTC's AEC3 finds the delay itself; speexdsp's filter must be handed the echo within its tail.
        self._delay = (DelayEstimator(self.settings.max_delay_ms / 1000)
                       if self.settings.auto_delay and self.settings.engine == "speex" else None)
        self.chunks = 0  # chunks processed
        self.with_reference = 0  # of which the far end was playing
        self.busy_s = 0.0  # thread CPU seconds spent in the engine
        self._e_in = 0.0  # smoothed energy in and out while the far end plays (ERLE estimate)
        self._e_out = 0.0
        # How much of the last chunk was taken out, in dB (0 when nothing played): high when the
        # chunk was the device's own sound, low when a visitor's voice (which stays) was in it.
        self.last_removed_db = 0.0

    def played(self, samples: np.ndarray, rate: int, at: float) -> None:
        """The speaker played ``samples`` (int16 mono at ``rate``), heard from clock time ``at``."""
        self.far.add(samples, rate, at)

    def capture_time(self, chunk: AudioChunk) -> float:
        """When ``chunk``'s first sample was captured, from ``chunk.wall`` (monotonic seconds)."""
        return (chunk.wall or time.monotonic()) - len(chunk) / chunk.rate - self.settings.input_latency_ms / 1000

    def process(self, chunk: AudioChunk, at: float | None = None) -> AudioChunk:
        """``chunk`` without the echo; ``at``: clock time of its first sample (default: from its wall time)."""
        if chunk.rate != SAMPLE_RATE or len(chunk) % FRAME_10MS:
            raise AudioError(f"the echo canceller takes 16 kHz chunks of whole 10 ms frames, got "
                             f"{len(chunk)} samples at {chunk.rate} Hz")
        t = self.capture_time(chunk) if at is None else at
        if self._delay is not None and t <= self.far.last_end + self.settings.tail_ms / 1000:
            found = self._delay.push(chunk.samples, self.far.take(t - self.settings.delay_ms / 1000, len(chunk)))
            if found is not None:
                seen = self.settings.delay_ms / 1000 + found - self._lead_s  # the delay the filter must span
                if not 0.0 <= seen <= self.settings.tail_ms / 1000 - ROOM_S:
                    lead = self.settings.delay_ms / 1000 + max(found - DELAY_MARGIN_S, 0.0)
                    _LOGGER.info("echo canceller: the echo comes %.0f ms after the reference; leading it by %.0f ms",
                                 1000 * found, 1000 * lead)
                    self._lead_s = lead
                    self._engine.reset()  # what it learned was for the old alignment
        far = self.far.take(t - self._lead_s, len(chunk))
        self.chunks += 1
        if not far.any() and t - self._lead_s > self.far.last_end + self.settings.tail_ms / 1000:
            # Nothing has played for longer than an echo lasts: pass the chunk as it is and spare
            # the CPU. The engine keeps what it learned; it always sees near and far in step.
            self.last_removed_db = 0.0
            return chunk
        self.with_reference += bool(far.any())
        c0 = time.thread_time()
        out = self._engine.process(chunk.samples, far)
        self.busy_s += time.thread_time() - c0
        e_in = float(np.mean(chunk.samples.astype(np.float64) ** 2))
        e_out = float(np.mean(out.astype(np.float64) ** 2))
        self.last_removed_db = 10 * math.log10((e_in + 1.0) / (e_out + 1.0))
        if far.any():
            a = ERLE_SMOOTHING
            self._e_in += a * (e_in - self._e_in)
            self._e_out += a * (e_out - self._e_out)
        return AudioChunk(out, chunk.start, chunk.rate, chunk.wall)

    @property
    def erle_db(self) -> float:
        """Echo removed lately, in dB (energy in over energy out while the device played; about the
        last 2 s of its sound). A visitor talking over the device lowers it for a while; 0 before
        anything played. A sign of convergence: below ~15 dB the device may still hear itself."""
        if self._e_in <= 0 or self._e_out <= 0:
            return 0.0
        return 10 * math.log10(self._e_in / self._e_out)

    def reset(self) -> None:
        """Forget the learned echo path and the far end (a new output device, a volume jump)."""
        self._engine.reset()
        self.far.clear()

    def close(self) -> None:
        self._engine.close()


def make_echo_canceller(settings: AecSettings) -> EchoCanceller | None:
    """The configured canceller, or None for engine ``none``."""
    return None if settings.engine == "none" else EchoCanceller(settings)


# -- echo for tests and simulate -------------------------------------------------------------------

def room_impulse_response(rt60_s: float = 0.3, length_s: float = 0.12, *, seed: int = 0,
                          rate: int = SAMPLE_RATE) -> np.ndarray:
    """A short synthetic room response: the direct path, a few early reflections and an
    exponentially decaying noise tail reaching -60 dB at ``rt60_s``; unit energy (float64)."""
    rng = np.random.default_rng(seed)
    n = max(int(length_s * rate), 1)
    t = np.arange(n) / rate
    h = rng.standard_normal(n) * 10 ** (-3 * t / rt60_s) * 0.2
    h[0] = 1.0
    for _ in range(4):
        k = int(rng.uniform(0.002, 0.02) * rate)
        if k < n:
            h[k] += rng.uniform(0.2, 0.6) * rng.choice([-1.0, 1.0])
    return h / np.sqrt(np.sum(h ** 2))


def active_level_dbfs(x: np.ndarray, frame: int = CHUNK_SAMPLES) -> float:
    """The level of the active (speech) part of ``x``: RMS over the 20 ms frames within 40 dB of
    the loudest one, in dBFS (-inf for silence)."""
    y = np.asarray(x, dtype=np.float64)
    n = len(y) // frame
    if n == 0:
        return -math.inf
    e = np.mean(y[: n * frame].reshape(n, frame) ** 2, axis=1)
    if e.max() <= 0:
        return -math.inf
    active = e[e >= e.max() * 1e-4]
    return 10 * math.log10(float(active.mean()) / 32768.0 ** 2)


def echo_gain(device_dbfs: float, visitor_dbfs: float, relative_db: float) -> float:
    """Linear gain that brings the device's output (active level ``device_dbfs``) to
    ``relative_db`` relative to the visitor's voice at the microphone."""
    return float(10 ** ((visitor_dbfs + relative_db - device_dbfs) / 20))


def make_echo(device: np.ndarray, *, delay_s: float, rir: np.ndarray, gain: float) -> np.ndarray:
    """The echo (float64) of ``device`` (int16, on the microphone's timeline), same length."""
    d = int(round(delay_s * SAMPLE_RATE))
    y = np.convolve(np.asarray(device, dtype=np.float64), rir)[: len(device)] * gain
    out = np.zeros(len(device))
    if d < len(device):
        out[d:] = y[: len(device) - d]
    return out


def mix_echo(mic: np.ndarray, device: np.ndarray, *, delay_s: float = 0.05, relative_db: float = 0.0,
             rir: np.ndarray | None = None, visitor_dbfs: float | None = None) -> np.ndarray:
    """``mic`` with the device's own output mixed in as a loudspeaker in the room would put it.

    ``device`` (int16, same timeline and rate as ``mic``: sample i is played while sample i is
    recorded) reaches the microphone ``delay_s`` later through ``rir`` (default: a 0.3 s
    RT60 room), at ``relative_db`` relative to the visitor's voice (``visitor_dbfs``, default the
    active level of ``mic``; -20 dBFS when ``mic`` is silent). Clipped to int16.
    """
    mic = np.asarray(mic, dtype=np.int16)
    dev = np.zeros(len(mic), dtype=np.int16)
    dev[: min(len(device), len(mic))] = np.asarray(device, dtype=np.int16)[: len(mic)]
    h = room_impulse_response() if rir is None else rir
    level = active_level_dbfs(mic) if visitor_dbfs is None else visitor_dbfs
    if not math.isfinite(level):
        level = -20.0
    dev_level = active_level_dbfs(dev)
    if not math.isfinite(dev_level):
        return mic.copy()
    echo = make_echo(dev, delay_s=delay_s, rir=h, gain=echo_gain(dev_level, level, relative_db))
    return np.clip(np.round(mic.astype(np.float64) + echo), -32768, 32767).astype(np.int16)


class EchoPath:
    """Streaming :func:`mix_echo` for ``simulate``: the device's output, as it is played, is
    mixed into the microphone chunks ``delay_s`` later through ``rir`` with a fixed ``gain``
    (see :func:`echo_gain`). Positions are samples on the microphone's timeline. Thread-safe."""

    def __init__(self, *, delay_s: float = 0.05, gain: float = 1.0, rir: np.ndarray | None = None,
                 keep_s: float = 5.0) -> None:
        self._h = room_impulse_response() if rir is None else np.asarray(rir, dtype=np.float64)
        self._delay = int(round(delay_s * SAMPLE_RATE))
        self.gain = gain
        self._far = FarEnd(keep_s)

    def play(self, samples: np.ndarray, rate: int, at_sample: int) -> None:
        """The device plays ``samples`` (int16 at ``rate``) from microphone position ``at_sample``."""
        self._far.add(samples, rate, at_sample / SAMPLE_RATE)

    def mix(self, chunk: AudioChunk) -> AudioChunk:
        k = len(self._h)
        start = chunk.start - self._delay - (k - 1)
        src = self._far.take(start / SAMPLE_RATE, len(chunk) + k - 1).astype(np.float64)
        if not src.any():
            return chunk
        echo = np.convolve(src, self._h, mode="valid") * self.gain
        y = np.clip(np.round(chunk.samples.astype(np.float64) + echo), -32768, 32767).astype(np.int16)
        return AudioChunk(y, chunk.start, chunk.rate, chunk.wall)
