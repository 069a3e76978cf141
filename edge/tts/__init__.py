"""Text-to-speech: the factory that loads a :class:`~edge.tts.base.Synthesizer` from a voice's files.

Voices are sherpa-onnx ``OfflineTts`` models (:mod:`edge.tts.sherpa`): Piper/VITS voices,
phonemized by piper-phonemize; Kokoro and Matcha best effort. :mod:`edge.tts.text` says what a
voice should read, :mod:`edge.tts.clauses` cuts a streamed reply into clauses to speak.
"""

from __future__ import annotations

from pathlib import Path

from edge.config import TtsConfig
from edge.cpu import CpuPolicy
from edge.tts.base import SynthesisStats, Synthesizer

__all__ = ["SynthesisStats", "Synthesizer", "make_synthesizer"]


def make_synthesizer(cfg: TtsConfig, files: dict[str, Path], *, cpu: CpuPolicy | None = None) -> Synthesizer:
    """Load the voice in ``files`` (installed file name → path).

    Piper/VITS voices need ``model.onnx`` and ``tokens.txt``; a ``voices.bin`` selects Kokoro, a
    ``vocoder.onnx`` Matcha. Raises ModelError naming a bad file before sherpa-onnx sees it.
    ``cpu`` is the pipeline's CPU policy, told when synthesis computes.
    """
    from edge.tts.sherpa import load_voice

    return load_voice(cfg, files, cpu)
