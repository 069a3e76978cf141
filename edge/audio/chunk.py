"""The canonical audio chunk and conversions into it.

Inside the pipeline audio is 16 kHz, signed 16-bit, mono, in 20 ms chunks. A chunk carries
its rate and its position on the audio timeline (``start``, in samples since the stream
began), so stages can say *when* in the audio something happened, not only when the
computer noticed. Float32 appears only inside the model adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 320  # 20 ms at 16 kHz


@dataclass(frozen=True)
class AudioChunk:
    """Mono int16 samples at ``rate`` starting at sample ``start`` of the stream."""

    samples: np.ndarray
    start: int = 0
    rate: int = SAMPLE_RATE
    # Wall-clock time (time.monotonic()) when the chunk's last sample was available.
    wall: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if self.samples.dtype != np.int16 or self.samples.ndim != 1:
            raise ValueError("AudioChunk holds 1-D int16 samples")

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    @property
    def end(self) -> int:
        return self.start + len(self)

    @property
    def start_s(self) -> float:
        return self.start / self.rate

    @property
    def end_s(self) -> float:
        return self.end / self.rate

    def float32(self) -> np.ndarray:
        """Samples scaled to [-1, 1) for models that want float."""
        return self.samples.astype(np.float32) / 32768.0

    def rms_dbfs(self) -> float:
        if len(self) == 0:
            return -math.inf
        rms = float(np.sqrt(np.mean(self.samples.astype(np.float64) ** 2)))
        return 20 * math.log10(rms / 32768.0) if rms > 0 else -math.inf


def to_mono_int16(frames: np.ndarray) -> np.ndarray:
    """Down-mix ``(n, channels)`` or ``(n,)`` audio of any numeric type to mono int16.

    Integer input is taken at its own full scale (uint8 is offset binary, as in WAV);
    float input is taken as [-1, 1] and clipped.
    """
    data = np.asarray(frames)
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        x = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    elif data.dtype.kind == "f":
        x = data.astype(np.float32)
    else:
        raise ValueError(f"unsupported sample type {data.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError("audio must be (frames,) or (frames, channels)")
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


class Resampler:
    """Streaming polyphase resampler (Kaiser-windowed sinc) between integer rates.

    Feed int16 blocks of any length, get int16 out; the filter state carries across calls,
    so a live stream is resampled without clicks at block boundaries.
    """

    def __init__(self, in_rate: int, out_rate: int, zero_crossings: int = 16) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError("sample rates must be positive")
        g = math.gcd(in_rate, out_rate)
        self.up, self.down = out_rate // g, in_rate // g
        self.in_rate, self.out_rate = in_rate, out_rate
        self._h: np.ndarray | None = None
        if self.up == self.down:
            return
        # Half-width in input samples: wider when decimating, so the low-pass stays sharp.
        self._k = int(math.ceil(zero_crossings * max(1.0, self.down / self.up)))
        # Design on the upsampled grid (rate up * in_rate); cut just below the lower Nyquist.
        fc = 0.95 * min(1.0, self.up / self.down) / (2 * self.up)
        d = np.arange(-self._k * self.up, self._k * self.up + 1)
        h = 2 * fc * np.sinc(2 * fc * d) * np.kaiser(len(d), 8.6)
        self._h = h * (self.up / h.sum())  # zero-stuffing loses a factor ``up``
        self._hist = np.zeros(0, dtype=np.float64)  # input kept for the filter
        self._consumed = 0  # absolute index of _hist[0]
        self._next_out = 0  # absolute index of the next output sample

    def process(self, samples: np.ndarray) -> np.ndarray:
        x = np.asarray(samples)
        if self._h is None:
            return x.astype(np.int16, copy=True)
        self._hist = np.concatenate([self._hist, x.astype(np.float64)])
        total_in = self._consumed + len(self._hist)
        # Output n sits at input position n*down/up and needs inputs up to base + k.
        last = ((total_in - self._k) * self.up) // self.down
        if last < self._next_out:
            return np.zeros(0, dtype=np.int16)
        t = np.arange(self._next_out, last + 1) * self.down  # upsampled-grid positions
        base = t // self.up
        idx = base[:, None] + np.arange(-self._k + 1, self._k + 1)[None, :]
        taps = self._h[t[:, None] - idx * self.up + self._k * self.up]
        rel = idx - self._consumed
        vals = np.where(rel >= 0, self._hist[np.clip(rel, 0, len(self._hist) - 1)], 0.0)
        y = np.einsum("ij,ij->i", taps, vals)
        self._next_out = int(last) + 1
        keep_from = (self._next_out * self.down) // self.up - self._k
        drop = min(len(self._hist), max(0, keep_from - self._consumed))
        if drop:
            self._hist = self._hist[drop:]
            self._consumed += drop
        return np.clip(np.round(y), -32768, 32767).astype(np.int16)

    def flush(self) -> np.ndarray:
        """Push silence through so the last real samples come out."""
        if self._h is None:
            return np.zeros(0, dtype=np.int16)
        return self.process(np.zeros(self._k + 1, dtype=np.int16))


def resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Resample a whole int16 signal, trimmed to ``len * out_rate / in_rate`` samples."""
    if in_rate == out_rate:
        return np.asarray(samples).astype(np.int16, copy=True)
    r = Resampler(in_rate, out_rate)
    out = np.concatenate([r.process(samples), r.flush()])
    return out[: int(round(len(samples) * out_rate / in_rate))]


class Rechunker:
    """Cut a stream of arbitrary blocks into fixed-size chunks on the audio timeline."""

    def __init__(self, size: int = CHUNK_SAMPLES, rate: int = SAMPLE_RATE, start: int = 0) -> None:
        self.size = size
        self.rate = rate
        self._buf = np.zeros(0, dtype=np.int16)
        self._pos = start  # timeline position of _buf[0]

    def push(self, samples: np.ndarray, wall: float = 0.0) -> list[AudioChunk]:
        self._buf = np.concatenate([self._buf, samples.astype(np.int16, copy=False)])
        out = []
        while len(self._buf) >= self.size:
            piece, self._buf = self._buf[: self.size].copy(), self._buf[self.size :]
            out.append(AudioChunk(piece, self._pos, self.rate, wall))
            self._pos += self.size
        return out

    def flush(self, wall: float = 0.0) -> list[AudioChunk]:
        """Pad the remainder with silence to a whole chunk."""
        if len(self._buf) == 0:
            return []
        pad = np.zeros(self.size - len(self._buf), dtype=np.int16)
        return self.push(pad, wall)
