"""WAV files in and out.

Reading accepts what people actually hand us: PCM 8/16/24/32-bit, IEEE float, mono or
multi-channel, any rate, WAVE_FORMAT_EXTENSIBLE; it converts to 16 kHz mono int16. The
standard ``wave`` module rejects float files, so the RIFF chunks are parsed here. A file that
is not a WAV, or whose data is cut short, is an :class:`AudioError` with one clear line.
"""

from __future__ import annotations

import os
import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, resample, to_mono_int16
from edge.errors import AudioError

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


@dataclass(frozen=True)
class WavInfo:
    rate: int
    channels: int
    bits: int
    fmt: str  # "pcm" or "float"
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate if self.rate else 0.0


def _parse(data: bytes, name: str) -> tuple[WavInfo, np.ndarray]:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{name}: not a WAV file (no RIFF/WAVE header)", code="audio.bad_wav")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"{name}: WAV 'fmt ' chunk is truncated", code="audio.bad_wav")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise AudioError(f"{name}: WAV data comes before its 'fmt ' chunk", code="audio.bad_wav")
            if len(body) < size and size != 0xFFFFFFFF:
                raise AudioError(
                    f"{name}: WAV file is truncated ({len(body)} of {size} data bytes present); "
                    "re-record or re-export it", code="audio.truncated")
            return _decode(fmt, body, name)
        pos += 8 + size + (size & 1)
    raise AudioError(f"{name}: WAV file has no audio data chunk", code="audio.bad_wav")


def _decode(fmt: tuple[int, int, int, int], body: bytes, name: str) -> tuple[WavInfo, np.ndarray]:
    tag, channels, rate, bits = fmt
    if channels < 1 or rate < 1000 or rate > 384000:
        raise AudioError(f"{name}: WAV has {channels} channels at {rate} Hz, which is not usable",
                         code="audio.bad_wav")
    width = bits // 8
    if tag == _PCM and bits in (8, 16, 32):
        pcm = np.dtype({8: np.uint8, 16: np.int16, 32: np.int32}[bits]).newbyteorder("<")
        raw = np.frombuffer(body[: len(body) - len(body) % (width * channels)], dtype=pcm)
    elif tag == _PCM and bits == 24:
        usable = len(body) - len(body) % (3 * channels)
        b = np.frombuffer(body[:usable], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        raw = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8  # sign-extend through the top byte
        raw = raw.astype(np.int32)
    elif tag == _FLOAT and bits in (32, 64):
        ftype = np.dtype(np.float32 if bits == 32 else np.float64).newbyteorder("<")
        raw = np.frombuffer(body[: len(body) - len(body) % (width * channels)], dtype=ftype)
        raw = np.nan_to_num(raw.astype(np.float32))
    else:
        kind = {_PCM: "PCM", _FLOAT: "float"}.get(tag, f"format tag 0x{tag:04x}")
        raise AudioError(f"{name}: unsupported WAV encoding ({kind}, {bits} bits); use PCM or float",
                         code="audio.bad_wav")
    frames = raw.reshape(-1, channels)
    info = WavInfo(rate, channels, bits, "float" if tag == _FLOAT else "pcm", frames.shape[0])
    return info, frames


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, WavInfo]:
    """Read any WAV and return (16 kHz mono int16 samples, info about the original)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise AudioError(f"{p}: input WAV file not found", code="audio.missing") from None
    except OSError as err:
        raise AudioError(f"{p}: cannot read input WAV: {err.strerror}", code="audio.unreadable") from None
    info, frames = _parse(data, str(p))
    mono = to_mono_int16(frames)
    return resample(mono, info.rate, SAMPLE_RATE), info


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int) -> None:
    """Write mono int16 atomically (a reader never sees half a file)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype=np.int16).tobytes())
    os.replace(tmp, p)
