"""What both speech-to-text engines share: feeding, the timeline, transcript clean-up, sherpa-onnx."""

from __future__ import annotations

import bisect
import re
from typing import Any

from edge.audio.chunk import SAMPLE_RATE, AudioChunk
from edge.errors import AudioError, MissingDependency, StageError
from edge.stt.base import SttUpdate


def import_sherpa() -> Any:
    try:
        import sherpa_onnx
    except ImportError:
        raise MissingDependency.for_module("sherpa_onnx", "stt") from None
    return sherpa_onnx


def check_chunk(chunk: AudioChunk) -> None:
    if chunk.rate != SAMPLE_RATE:
        raise AudioError(f"speech-to-text takes {SAMPLE_RATE} Hz chunks, got {chunk.rate} Hz: "
                         "resample before the recognizer")


def closed_error() -> StageError:
    return StageError("speech-to-text recognizer used after close()", code="stt.closed")


class FeedingRecognizer:
    """What both engines share: updates made while the pre-roll is fed come out with the next
    chunk, and nothing is fed once an utterance is final. Engines implement ``_feed``."""

    _closed: bool
    _done: bool
    _pending: list[SttUpdate]

    def _feed(self, chunk: AudioChunk) -> list[SttUpdate]:
        raise NotImplementedError

    def _feed_preroll(self, preroll: list[AudioChunk]) -> None:
        for chunk in preroll:
            self._pending.extend(self._feed(chunk))
            if self._done:
                break

    def accept(self, chunk: AudioChunk) -> list[SttUpdate]:
        if self._closed:
            raise closed_error()
        updates, self._pending = self._pending, []
        if not self._done:
            updates.extend(self._feed(chunk))
        return updates


class Timeline:
    """Maps a position in the samples fed to a recognizer to the audio timeline.

    Chunks normally follow each other, but capture drops the oldest chunk when its queue is
    full, so a gap can open; each discontinuity is recorded as a breakpoint.
    """

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self._fed: list[int] = []  # positions in the fed samples where a run begins
        self._at: list[int] = []  # the timeline sample of each run's first sample
        self.fed = 0  # samples fed so far

    def push(self, chunk: AudioChunk) -> None:
        expected = self._at[-1] + (self.fed - self._fed[-1]) if self._fed else None
        if chunk.start != expected:
            self._fed.append(self.fed)
            self._at.append(chunk.start)
        self.fed += len(chunk)

    def seconds(self, fed_pos: int) -> float:
        """Timeline seconds of fed sample ``fed_pos`` (clamped to what was fed)."""
        if not self._fed:
            return 0.0
        pos = min(max(fed_pos, 0), self.fed)
        i = max(bisect.bisect_right(self._fed, pos) - 1, 0)
        return (self._at[i] + pos - self._fed[i]) / self.rate

    @property
    def end_s(self) -> float:
        return self.seconds(self.fed)


# Whisper writes sound descriptions for non-speech: "[ Silence ]", "(wind howling)", "*cough*".
_NON_SPEECH = re.compile(r"\[[^\]]*(\]|$)|\([^)]*(\)|$)|\*[^*]*\*|♪+")


def clean_transcript(text: str) -> str:
    """The spoken words of a transcript: sound annotations removed, spaces tidied, the first
    letter a capital; "" if none.

    Whisper writes the same first word "How" in one decode and "how" in the next: the prompt a
    partial prefilled must stay a prefix of the final one, or the whole question is evaluated
    again when the reply starts (half a second for a Phi-3-mini on two cores).
    """
    text = _NON_SPEECH.sub(" ", text)
    text = collapse_repeats(" ".join(text.split()))
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    return text if any(c.isalnum() for c in text) else ""


def collapse_repeats(text: str, min_words: int = 3) -> str:
    """Whisper's decoding loop: "turn it on now turn it on now turn it" → "turn it on now".

    Only when the whole text is one phrase of at least ``min_words`` words said again and again
    (the last time maybe cut short): a person rarely repeats a whole sentence verbatim in one
    breath, a looping decoder always does.
    """
    words = text.split()
    key = [w.strip(".,!?;:").lower() for w in words]
    for period in range(min_words, len(words) // 2 + 1):
        if all(key[i] == key[i + period] for i in range(len(words) - period)):
            return " ".join(words[:period])
    return text
