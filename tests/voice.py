"""Test speech in the dev voice, and hearing it back: conversation WAVs and word error rate.

``piper(text)`` speaks with the installed dev-profile Piper voice (16 kHz int16), the voice the
openWakeWord models recognise most reliably; ``espeak`` voices come from ``speech.say``.
``Ears`` transcribes audio with the dev Whisper model, to check that replies are intelligible.
Syntheses are cached per process, and the same in every run (the voice's noise is off).
"""

from __future__ import annotations

import functools
import re

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, resample
from edge.signals import CancelScope


@functools.lru_cache(maxsize=1)
def _synth():
    """The voice without its sampled noise: a VITS voice draws random noise for every sentence
    (its length and sound differ from run to run, and now and then Whisper mishears a word), so a
    test would hear different speech each run. With both noise scales at 0 a text always sounds
    the same."""
    import sherpa_onnx

    from edge.config import TtsConfig
    from edge.models.registry import ModelRegistry
    from edge.tts import make_synthesizer

    vits = sherpa_onnx.OfflineTtsVitsModelConfig

    def without_noise(**kw: object) -> object:
        return vits(**{**kw, "noise_scale": 0.0, "noise_scale_w": 0.0})

    sherpa_onnx.OfflineTtsVitsModelConfig = without_noise
    try:
        return make_synthesizer(TtsConfig(), ModelRegistry().resolve("piper-en-us-joe-medium").files)
    finally:
        sherpa_onnx.OfflineTtsVitsModelConfig = vits


@functools.lru_cache(maxsize=64)
def _piper(text: str) -> bytes:
    s = _synth()
    audio = np.concatenate(list(s.synthesize(text, CancelScope())))
    return resample(audio, s.sample_rate, SAMPLE_RATE).tobytes()


def piper(text: str) -> np.ndarray:
    return np.frombuffer(_piper(text), dtype=np.int16).copy()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SAMPLE_RATE * seconds), dtype=np.int16)


def conversation(*parts) -> np.ndarray:
    """Strings are spoken by the Piper voice, numbers are seconds of silence."""
    return np.concatenate([silence(p) if isinstance(p, (int, float)) else piper(p) for p in parts])


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after dropping case and punctuation."""
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / max(1, len(ref))


class Ears:
    """Whisper tiny.en from the dev profile, for listening to what the device said."""

    def __init__(self) -> None:
        import sherpa_onnx

        from edge.models.registry import ModelRegistry

        m = ModelRegistry().resolve("whisper-tiny-en")
        self._rec = sherpa_onnx.OfflineRecognizer.from_whisper(
            encoder=str(m.path("encoder")), decoder=str(m.path("decoder")), tokens=str(m.path("tokens")),
            language="en", task="transcribe", num_threads=1, tail_paddings=3000)

    def hear(self, audio: np.ndarray, rate: int) -> str:
        x = resample(np.asarray(audio, dtype=np.int16), rate, SAMPLE_RATE)
        texts = []
        # Whisper sees 30 s at a time: cut longer audio into windows.
        step = 25 * SAMPLE_RATE
        for i in range(0, len(x), step):
            piece = np.concatenate([silence(0.3), x[i : i + step], silence(0.3)])
            s = self._rec.create_stream()
            s.accept_waveform(SAMPLE_RATE, piece.astype(np.float32) / 32768.0)
            self._rec.decode_stream(s)
            texts.append(s.result.text.strip())
        return " ".join(texts)
