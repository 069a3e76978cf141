"""The text-to-speech stage's one protocol and its types: ``Synthesizer`` and ``SynthesisStats``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge.signals import Flag


class Synthesizer(Protocol):
    sample_rate: int

    def synthesize(self, text: str, cancel: Flag) -> Iterator[np.ndarray]:
        """int16 mono pieces at ``sample_rate``, each sentence as soon as it is ready; nothing
        for text with nothing to say.

        Raises StageError (code ``tts.empty``) when the voice yields no audio for text that
        has words. Stops early, without error, once ``cancel`` is set.
        """
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SynthesisStats:
    """How the last synthesis went, for logs and benchmarks (times from the call)."""

    sentences: int  # sentences handed to the model
    generated: int  # pieces of audio that came back (sherpa-onnx splits very long sentences)
    samples: int
    audio_s: float
    first_audio_s: float | None  # when the first audio was ready
    elapsed_s: float
    cancelled: bool

    @property
    def rtf(self) -> float:
        """Real-time factor: compute time over audio time (below 1 is faster than speech)."""
        return self.elapsed_s / self.audio_s if self.audio_s else float("inf")
