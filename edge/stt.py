"""Speech-to-text: the ``Recognizer`` stage interface, its updates, and the factory.

Two sherpa-onnx engines sit behind one interface:

- ``streaming`` (:mod:`edge.stt_streaming`): ``OnlineRecognizer`` with a streaming transducer,
  Paraformer or NeMo CTC model; partials come from the running decode, the endpoint from
  sherpa-onnx's trailing-silence rules.
- ``vad-offline`` (:mod:`edge.stt_vad`): silero VAD cuts the speech, an ``OfflineRecognizer``
  (Whisper, Moonshine, SenseVoice) decodes it; partials re-decode the growing segment.

A recognizer is used from one worker thread: ``start`` (with pre-roll), ``accept`` per chunk,
maybe ``finish``; after a ``final`` it ignores audio until the next ``start``. Times in updates
are seconds on the audio timeline of the chunks fed (``AudioChunk.start``).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from edge.audio.chunk import SAMPLE_RATE, AudioChunk
from edge.errors import AudioError, ConfigError, MissingDependency, StageError

if TYPE_CHECKING:
    from edge.config import SttConfig

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

    kind: str  # "speech_start" | "partial" | "pause" | "resume" | "final"
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

    def close(self) -> None:
        """Free the models; the recognizer cannot be used afterwards."""


def make_recognizer(cfg: SttConfig, model_dir_files: Mapping[str, Path],
                    vad_files: Mapping[str, Path] | None = None, *,
                    model_type: str | None = None) -> Recognizer:
    """Build the recognizer ``cfg.engine`` names from installed model files.

    ``model_dir_files`` (and ``vad_files``) map the model's file names to installed paths. The
    model kind is read from the file names and ONNX metadata unless ``model_type`` names it
    (transducer, paraformer, nemo_ctc, whisper, moonshine, sense_voice). Every file is checked
    before sherpa-onnx sees it; a bad one raises ModelError naming the file and what is wrong.
    """
    from edge.stt_models import identify_stt_model, identify_vad_model

    model = identify_stt_model(model_dir_files, model_type)
    if cfg.engine == "streaming":
        if not model.streaming:
            raise ConfigError(f"stt.engine is 'streaming' but stt.model {cfg.model or '?'!r} is an "
                              f"offline {model.kind} model: set stt.engine = \"vad-offline\" or pick "
                              "a streaming model")
        from edge.stt_streaming import StreamingRecognizer

        return StreamingRecognizer(cfg, model)
    if model.streaming:
        raise ConfigError(f"stt.engine is 'vad-offline' but stt.model {cfg.model or '?'!r} is a "
                          f"streaming {model.kind} model: set stt.engine = \"streaming\" or pick an "
                          "offline model (Whisper, Moonshine, SenseVoice)")
    if not vad_files:
        raise ConfigError("stt.engine 'vad-offline' needs a VAD model: set stt.vad_model "
                          "(e.g. \"silero-vad\") and install it with `edge-voice models`")
    vad_path = identify_vad_model(vad_files)
    from edge.stt_vad import VadOfflineRecognizer

    return VadOfflineRecognizer(cfg, model, vad_path)


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
