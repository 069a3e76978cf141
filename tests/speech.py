"""Synthetic test speech: espeak-ng speaks, sox converts to the pipeline's format.

``say()``, ``silence()`` and ``trim()`` return 16 kHz mono int16 samples as a 1-D
``np.ndarray``, so results concatenate with ``np.concatenate`` and feed ``chunks()``::

    from speech import chunks, say, silence, trim   # pytest puts tests/ on sys.path
    audio = np.concatenate([silence(1), say("hey jarvis"), silence(0.5)])
    wake = trim(say("hey jarvis", "en-gb", 175))   # without espeak's lead-in and tail
    for chunk in chunks(audio):          # 20 ms AudioChunks on the audio timeline
        detector.process(chunk)

Synthesis is cached on disk ($EDGE_VOICE_TEST_CACHE, default <tmp>/edge-voice-test-speech),
keyed by text, voice, rate and pitch, so a test suite pays for each phrase once. espeak-ng
and sox must be installed (Debian: ``apt-get install espeak-ng sox``); if either is missing
the calling test is skipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk

__all__ = ["say", "silence", "trim", "chunks", "read_wav", "write_wav", "cache_dir"]


def cache_dir() -> Path:
    base = os.environ.get("EDGE_VOICE_TEST_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                   "edge-voice-test-speech")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _need(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        import pytest

        pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    return exe


def say(text: str, voice: str = "en-us", rate: int = 150, pitch: int = 50) -> np.ndarray:
    """``text`` spoken by espeak-ng ``voice`` at ``rate`` words per minute, 16 kHz int16.

    ``voice`` is any espeak-ng voice name, optionally with a variant (``"en-us+f3"``).
    The result keeps espeak's own short lead-in and tail silence.
    """
    key = hashlib.sha256(f"{text}\0{voice}\0{rate}\0{pitch}".encode()).hexdigest()[:24]
    path = cache_dir() / f"say-{key}.wav"
    if not path.exists():
        espeak, sox = _need("espeak-ng"), _need("sox")
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            raw = Path(tmp) / "raw.wav"
            out = Path(tmp) / "out.wav"
            subprocess.run([espeak, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(raw), text],
                           check=True, capture_output=True, timeout=60)
            subprocess.run([sox, str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
                            "-e", "signed-integer", str(out)], check=True, capture_output=True, timeout=60)
            # Atomic, so tests running in parallel never read half a file.
            os.replace(out, path)
    return read_wav(path)


def silence(seconds: float) -> np.ndarray:
    """Digital silence of ``seconds`` at 16 kHz."""
    return np.zeros(int(round(seconds * SAMPLE_RATE)), dtype=np.int16)


def trim(samples: np.ndarray, level: int = 300) -> np.ndarray:
    """``samples`` without the leading and trailing stretch quieter than ``level`` (of 32767)."""
    loud = np.nonzero(np.abs(samples.astype(np.int32)) > level)[0]
    return samples[loud[0]:loud[-1] + 1].copy() if len(loud) else samples[:0].copy()


def chunks(samples: np.ndarray, size: int = CHUNK_SAMPLES, start: int = 0) -> list[AudioChunk]:
    """Cut ``samples`` into AudioChunks of ``size`` (the last may be shorter) from ``start``."""
    samples = np.asarray(samples, dtype=np.int16)
    return [AudioChunk(samples[i:i + size].copy(), start + i) for i in range(0, len(samples), size)]


def read_wav(path: str | os.PathLike) -> np.ndarray:
    """A 16 kHz mono 16-bit WAV file as int16 samples."""
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit, got {w.getframerate()} Hz, "
                             f"{w.getnchannels()} channels, {8 * w.getsampwidth()}-bit")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


def write_wav(path: str | os.PathLike, samples: np.ndarray) -> Path:
    """Write int16 samples as a 16 kHz mono WAV file; returns the path."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return Path(path)
