"""The speech-to-text stage's one protocol and its types: ``Recognizer`` and ``SttUpdate``.

A recognizer is used from one worker thread: ``start`` (with pre-roll), ``accept`` per chunk,
maybe ``finish``; after a ``final`` it ignores audio until the next ``start``. Times in updates
are seconds on the audio timeline of the chunks fed (``AudioChunk.start``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from edge.audio.chunk import AudioChunk


class UpdateKind(str, Enum):
    SPEECH_START = "speech_start"
    PARTIAL = "partial"
    PAUSE = "pause"
    RESUME = "resume"
    FINAL = "final"


@dataclass(frozen=True)
class SttUpdate:
    """What the recognizer heard.

    ``pause`` comes when the visitor has been silent for ``stt.pause_s`` (well before the
    endpoint), with the transcript so far: the conversation may start the reply then, to be
    played only if the final transcript is the same. ``resume`` says speech went on after a
    pause. A final whose speech ended where the pause's did carries the pause's text.
    """

    kind: UpdateKind
    text: str  # "" for speech_start and resume
    # Seconds on the audio timeline: speech_start → when speech began; partial → end of the
    # audio decoded so far; pause → when the pause was noticed; final → when the endpoint
    # fired (or the audio ended, on finish()).
    audio_time: float
    speech_end: float | None = None  # pause and final: when the speech itself ended
    # Wall seconds the recognizer spent decoding in the call that produced this update.
    decode_s: float = 0.0


class Recognizer(Protocol):
    sample_rate: int

    def start(self, preroll: list[AudioChunk]) -> None:
        """Begin a new utterance (any previous state is dropped) and feed the pre-roll."""

    def accept(self, chunk: AudioChunk) -> list[SttUpdate]:
        """Feed one 16 kHz chunk; return what it produced (usually nothing)."""

    def finish(self) -> SttUpdate | None:
        """Force the end (timeout, push-to-talk release): the final, or None if nothing was said."""

    def set_endpoint(self, silence_s: float) -> SttUpdate | None:
        """The silence after the speech that ends this utterance, from the last pause on (until
        speech resumes: then ``stt.endpoint_silence_s`` again, up to the longest the recognizer
        was built for). 0, or a silence already heard, ends it now: the final, with the pause's
        transcript, is returned. None when no pause is in progress or the silence is still to come."""

    def transcribe(self, samples: np.ndarray) -> tuple[str, float]:
        """Decode a whole 16 kHz utterance at once, apart from any stream: (text, seconds).
        What a sequential pipeline does; the benchmark's baseline uses it."""

    def close(self) -> None:
        """Free the models; the recognizer cannot be used afterwards."""


