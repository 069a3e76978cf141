"""VAD + offline speech-to-text: silero VAD (sherpa-onnx) segments, an OfflineRecognizer decodes.

The VAD sees every chunk (one silero window per 32 ms, a fraction of a percent of a core).
While it reports speech, the growing segment is re-decoded every ``partial_interval_s`` of
audio for partials — never more often than twice the last decode's wall time, so a slow
device drops partials instead of falling behind — and once as soon as the voice goes quiet.
A second VAD reports a pause after ``pause_s`` of silence (the cue for a speculative reply),
reusing the decode made when the voice went quiet. When the VAD has heard
``endpoint_silence_s`` of silence it closes the segment; the final reuses the pause's text if
nothing was said since, else the whole segment is decoded once more.

The segment handed to the model starts ``LEAD_S`` before the VAD's speech start: Whisper drops
a first word that begins with no leading silence.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, AudioChunk
from edge.cpu import CpuPolicy
from edge.errors import ModelError
from edge.stt.base import SttUpdate, UpdateKind
from edge.stt.common import FeedingRecognizer, Timeline, check_chunk, clean_transcript, closed_error, import_sherpa

if TYPE_CHECKING:
    from pathlib import Path

    from edge.config import SttConfig
    from edge.stt.files import SttModel

_LOGGER = logging.getLogger(__name__)

LEAD_S = 0.3  # audio kept before the VAD's speech start
TAIL_S = 0.25  # audio kept after the VAD's speech end
# Silence a pause's decode needs after the VAD's speech end. The pause VAD closes its segment
# after ``stt.pause_s`` of silence, which already covers it at the default: the decode starts at
# once. (On 24 spoken questions, two voices, Whisper tiny.en gave the same words with 0.1 s to
# 0.25 s of tail; with none it misheard one last word.)
PAUSE_TAIL_S = 0.1
VAD_WINDOW = 512  # silero v5 at 16 kHz takes exactly this
MIN_SPEECH_S = 0.25  # shorter bursts (clicks, knocks) do not start speech
WHISPER_MAX_S = 29.0  # Whisper sees at most 30 s of audio
# Silence appended to every Whisper input, in 10 ms feature frames. With sherpa-onnx's default
# (about 10 s) tiny.en repeats short commands two or three times; 15 s stops that on our test
# set at 0.16 s a decode and ~400 MB resident, where Whisper's full 30 s window costs 0.25 s and
# ~600 MB. clean_transcript() also collapses a repeated phrase, should one still get through.
WHISPER_TAIL_FRAMES = 1500
PARTIAL_LOAD = 2.0  # wait at least this many times the last decode's wall time between partials
# The voice has gone quiet when every chunk for QUIET_S is QUIET_DB below the utterance's loudest.
# That is 0.02-0.07 s after the last sound, where the pause VAD closes 0.16-0.29 s after it (28
# spoken questions, two voices). So the segment is decoded once as soon as the voice goes quiet,
# and the pause reuses that decode if the voice stayed quiet: its reply starts without a decode of
# its own (on those 28 questions Whisper gave the same words as a decode at the pause). While
# quiet, no partial starts (it would hold the audio thread, and with it the pause, for a whole
# decode) and the LLM's prefill keeps to one thread (``CpuPolicy.decode_likely``). In speech a quiet stretch
# (a stop, a breath) only costs a partial decode at a word boundary.
QUIET_DB = 25.0
QUIET_S = 0.06
QUIET_REUSE_S = 0.2  # ...but not if the VAD's speech end is this far past that decode (a soft last word)
EXPECT_S = 0.1  # how long one quiet chunk keeps the LLM expecting a decode (the next renews it)
SAME_END_S = 0.15  # a final whose speech ends this close to the pause's reuses the pause's text
# Speech ending no later than this after the pre-roll is the wake word's tail (the VAD's segment
# end trails the sound by up to a couple of windows).
PREROLL_TAIL_S = 0.25
# Audio kept while no speech has started: the lead plus the VAD's own look-back
# (2 windows + MIN_SPEECH_S), with margin.
IDLE_KEEP_S = 2.0


def build_offline_recognizer(cfg: SttConfig, model: SttModel) -> Any:
    so = import_sherpa()
    f = {role: str(p) for role, p in model.files.items()}
    try:
        if model.kind == "whisper":
            multilingual = model.metadata.get("is_multilingual", "0").strip() not in ("", "0")
            return so.OfflineRecognizer.from_whisper(
                encoder=f["encoder"], decoder=f["decoder"], tokens=f["tokens"],
                language="" if multilingual else "en", task="transcribe",
                num_threads=cfg.num_threads, decoding_method="greedy_search",
                tail_paddings=WHISPER_TAIL_FRAMES)
        if model.kind == "moonshine":
            return so.OfflineRecognizer.from_moonshine(
                preprocessor=f["preprocessor"], encoder=f["encoder"],
                uncached_decoder=f["uncached_decoder"], cached_decoder=f["cached_decoder"],
                tokens=f["tokens"], num_threads=cfg.num_threads)
        if model.kind == "sense_voice":
            return so.OfflineRecognizer.from_sense_voice(
                model=f["model"], tokens=f["tokens"], num_threads=cfg.num_threads, use_itn=True)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ModelError(f"sherpa-onnx could not load the {model.kind} model "
                         f"{next(iter(f.values()))}: {err}", code="model.invalid") from err
    raise ModelError(f"{model.kind} is not an offline model type", code="model.unsupported")


def build_vad(cfg: SttConfig, vad_path: Path, max_utterance_s: float, silence_s: float | None = None) -> Any:
    """A silero VAD whose segments close after ``silence_s`` (default: the endpoint silence)."""
    so = import_sherpa()
    vc = so.VadModelConfig()
    vc.silero_vad.model = str(vad_path)
    vc.silero_vad.threshold = cfg.vad_threshold
    vc.silero_vad.min_silence_duration = cfg.endpoint_silence_s if silence_s is None else silence_s
    vc.silero_vad.min_speech_duration = MIN_SPEECH_S
    vc.silero_vad.window_size = VAD_WINDOW
    # Past max_speech_duration sherpa-onnx tightens its thresholds to force a cut; the cut at
    # max_utterance_s is ours, so keep its rule out of the way.
    vc.silero_vad.max_speech_duration = max_utterance_s + 5.0
    vc.sample_rate = SAMPLE_RATE
    vc.num_threads = 1
    if not vc.validate():
        raise ModelError(f"sherpa-onnx rejected the VAD configuration for {vad_path}",
                         code="model.invalid")
    try:
        return so.VoiceActivityDetector(vc, buffer_size_in_seconds=max_utterance_s + 10.0)
    except RuntimeError as err:
        raise ModelError(f"sherpa-onnx could not load the VAD model {vad_path}: {err}",
                         code="model.invalid") from err


class _Audio:
    """The utterance's samples, indexed by position in the samples fed."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.base = 0  # fed position of the first kept sample
        self.size = 0

    def append(self, samples: np.ndarray) -> None:
        self._parts.append(samples)
        self.size += len(samples)

    def keep_last(self, n: int) -> None:
        while self._parts and self.size - len(self._parts[0]) >= n:
            self.size -= len(self._parts[0])
            self.base += len(self._parts.pop(0))

    def span(self, start: int, end: int) -> np.ndarray:
        data = np.concatenate(self._parts) if len(self._parts) != 1 else self._parts[0]
        self._parts = [data]
        return data[max(start - self.base, 0):max(end - self.base, 0)]


class VadOfflineRecognizer(FeedingRecognizer):
    """``Recognizer``: silero VAD + an offline model (Whisper, Moonshine, SenseVoice)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, cfg: SttConfig, model: SttModel, vad_path: Path, cpu: CpuPolicy | None = None, *,
                 max_silence_s: float | None = None) -> None:
        self._cfg = cfg
        self._cpu = cpu or CpuPolicy()
        self.kind = model.kind
        self._max_utt = cfg.max_utterance_s
        if model.kind == "whisper" and self._max_utt > WHISPER_MAX_S:
            _LOGGER.warning("stt.max_utterance_s %.0f is longer than Whisper takes; cutting at %.0f s",
                            self._max_utt, WHISPER_MAX_S)
            self._max_utt = WHISPER_MAX_S
        t0 = time.monotonic()
        self._rec: Any = build_offline_recognizer(cfg, model)
        self._vad: Any = build_vad(cfg, vad_path, self._max_utt)
        # A second, quicker VAD notices a pause long before the endpoint, so the reply can start
        # speculatively (silero costs a fraction of a percent of a core per instance).
        use_pause = 0 < cfg.pause_s < cfg.endpoint_silence_s
        self._pause_vad: Any = build_vad(cfg, vad_path, self._max_utt, cfg.pause_s) if use_pause else None
        # A third closes only after the longest silence an end-of-turn decision may give a sentence
        # that sounds unfinished (set_endpoint): while such a decision holds, it ends the turn.
        longest = max_silence_s or 0.0
        self._long_vad: Any = (build_vad(cfg, vad_path, self._max_utt, longest)
                               if use_pause and longest > cfg.endpoint_silence_s else None)
        _LOGGER.info("speech-to-text: VAD + offline %s model loaded in %.2f s (%d threads)",
                     model.kind, time.monotonic() - t0, cfg.num_threads)
        self._closed = False
        self._done = True
        self._reset_state()

    def _reset_state(self) -> None:
        self._timeline = Timeline()
        self._audio = _Audio()
        self._pending: list[SttUpdate] = []
        self._speech_at: int | None = None  # fed position where speech began
        self._last_partial = ""
        self._last_partial_pos = 0
        self._partial_gap = int(self._cfg.partial_interval_s * SAMPLE_RATE)
        self._pause: tuple[int, str] | None = None  # (speech end, text) of the pause in progress
        self._pause_at: int | None = None  # speech end of a pause waiting for its silent tail
        self._listen_from = 0  # fed position where the pre-roll ends
        self._heard: tuple[int, str] = (0, "")  # (fed position, text) of the latest partial decode
        self._loudest = -math.inf  # dBFS of the utterance's loudest chunk
        self._quiet_since: int | None = None  # fed position where the voice went quiet
        self._extended = False  # an end-of-turn decision gave this sentence the longest silence

    # -- Recognizer ---------------------------------------------------------------------------

    def start(self, preroll: list[AudioChunk]) -> None:
        if self._closed:
            raise closed_error()
        self._vad.reset()
        if self._pause_vad is not None:
            self._pause_vad.reset()
        if self._long_vad is not None:
            self._long_vad.reset()
        self._reset_state()
        self._done = False
        # Speech that ends inside the pre-roll is the tail of the wake word, not a question.
        self._listen_from = sum(len(c) for c in preroll)
        self._feed_preroll(preroll)

    def finish(self) -> SttUpdate | None:
        if self._closed:
            raise closed_error()
        if self._done:
            return None
        self._done = True
        if self._speech_at is None:
            return None
        fed = self._timeline.fed
        text, took = self._decode(self._speech_at, fed)
        if not text:
            return None
        end = self._timeline.end_s
        return SttUpdate(UpdateKind.FINAL, text, end, end, took)

    def set_endpoint(self, silence_s: float) -> SttUpdate | None:
        if self._closed:
            raise closed_error()
        if self._done or self._pause_vad is None:
            return None
        if silence_s <= 0:
            pause = self._pause
            return self._final(pause[0], pause[0])[0] if pause is not None else None
        self._extended = silence_s > self._cfg.endpoint_silence_s and self._long_vad is not None
        return None

    def transcribe(self, samples: np.ndarray) -> tuple[str, float]:
        """Decode a whole utterance at once (a sequential pipeline's way); (text, seconds)."""
        if self._closed:
            raise closed_error()
        return self._recognize(samples)

    def close(self) -> None:
        self._closed = True
        self._rec = None
        self._vad = None
        self._pause_vad = None

    # -- internals -----------------------------------------------------------------------------

    def _decode(self, speech_at: int, end: int) -> tuple[str, float]:
        start = max(speech_at - int(LEAD_S * SAMPLE_RATE), self._audio.base)
        return self._recognize(self._audio.span(start, end))

    def _recognize(self, samples: np.ndarray) -> tuple[str, float]:
        """Decode ``samples`` with the offline model; (text, seconds)."""
        t0 = time.perf_counter()
        with self._cpu.computing("stt"):  # the features too: a prefill slice must not start beside the decode
            stream = self._rec.create_stream()
            stream.accept_waveform(SAMPLE_RATE, samples.astype(np.float32) / 32768.0)
            self._rec.decode_stream(stream)
        took = time.perf_counter() - t0
        text = clean_transcript(stream.result.text)
        _LOGGER.debug("decoded %.2f s of audio in %.3f s", len(samples) / SAMPLE_RATE, took)
        return text, took

    def _feed(self, chunk: AudioChunk) -> list[SttUpdate]:
        check_chunk(chunk)
        self._timeline.push(chunk)
        self._audio.append(chunk.samples)
        x = chunk.float32()
        self._vad.accept_waveform(x)
        if self._pause_vad is not None:
            self._pause_vad.accept_waveform(x)
        if self._long_vad is not None:
            self._long_vad.accept_waveform(x)
        fed = self._timeline.fed
        out: list[SttUpdate] = []
        if self._speech_at is None:
            if self._vad.is_speech_detected():
                self._speech_at = max(int(self._vad.current_segment.start), 0)
            elif not self._vad.empty():  # speech began and ended within this chunk
                self._speech_at = max(int(self._vad.front.start), 0)
            else:
                self._audio.keep_last(int(IDLE_KEEP_S * SAMPLE_RATE))
                return out
            self._last_partial_pos = fed
            out.append(SttUpdate(UpdateKind.SPEECH_START, "", self._timeline.seconds(self._speech_at)))
        self._track_loudness(chunk, fed)
        long_end = self._long_segment_end()
        if not self._vad.empty():
            seg = self._vad.front
            speech_end = int(seg.start) + len(seg.samples)
            self._vad.pop()
            if not self._extended:
                return out + self._final(speech_end, min(speech_end + int(TAIL_S * SAMPLE_RATE), fed))
        if self._extended and long_end is not None:
            return out + self._final(long_end, min(long_end + int(TAIL_S * SAMPLE_RATE), fed))
        if fed - self._speech_at >= int(self._max_utt * SAMPLE_RATE):
            return out + self._final(fed, fed)
        pause = self._check_pause(fed)
        if pause is not None:
            self._cpu.decode_likely(0)  # the reply comes now, on every core
            return out + [pause]
        if self._pause is not None:
            return out  # silent since the pause: nothing new to decode
        quiet_s = self._quiet_for_s(fed)
        if quiet_s > 0.0:
            self._cpu.decode_likely(EXPECT_S)  # a decode, then the reply, may be next
        if quiet_s >= QUIET_S:
            if not self._heard_in_quiet():
                out.extend(self._partial(fed))
        elif quiet_s == 0.0 and fed - self._last_partial_pos >= self._partial_gap:
            out.extend(self._partial(fed))  # (a partial due as the voice drops waits to see if it is over)
        return out

    def _long_segment_end(self) -> int | None:
        """Where the speech the long VAD closed ended (None: nothing closed)."""
        lv = self._long_vad
        if lv is None or lv.empty():
            return None
        seg = lv.front
        end = int(seg.start) + len(seg.samples)
        while not lv.empty():
            lv.pop()
        return end if not self._in_preroll(end) else None

    def _partial(self, fed: int) -> list[SttUpdate]:
        assert self._speech_at is not None
        text, took = self._decode(self._speech_at, fed)
        self._last_partial_pos = fed
        self._heard = (fed, text)
        self._partial_gap = max(int(self._cfg.partial_interval_s * SAMPLE_RATE),
                                int(PARTIAL_LOAD * took * SAMPLE_RATE))
        if text and text != self._last_partial:
            self._last_partial = text
            return [SttUpdate(UpdateKind.PARTIAL, text, self._timeline.end_s, None, took)]
        return []

    def _quiet_for_s(self, fed: int) -> float:
        return 0.0 if self._quiet_since is None else (fed - self._quiet_since) / SAMPLE_RATE

    def _heard_in_quiet(self) -> bool:
        """The latest decode was made after the voice had been quiet QUIET_S, and it still is."""
        return self._quiet_since is not None and self._heard[0] >= self._quiet_since + int(QUIET_S * SAMPLE_RATE)

    def _track_loudness(self, chunk: AudioChunk, fed: int) -> None:
        """Where the voice went quiet; only a pause can use it, so only with the pause VAD."""
        if self._pause_vad is None or fed <= self._listen_from:
            return  # (the pre-roll holds the wake word, often louder than the question)
        db = chunk.rms_dbfs()
        self._loudest = max(self._loudest, db)
        if db >= self._loudest - QUIET_DB:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = fed - len(chunk)

    def _check_pause(self, fed: int) -> SttUpdate | None:
        """A pause: the quick VAD closed a segment. Resume: it hears speech again.

        The pause is reported once ``PAUSE_TAIL_S`` of silence follows the speech: Whisper can
        mishear a last word that has no silence after it.
        """
        pv = self._pause_vad
        if pv is None:
            return None
        tail = int(PAUSE_TAIL_S * SAMPLE_RATE)
        if not pv.empty():
            seg = pv.front
            end = int(seg.start) + len(seg.samples)
            while not pv.empty():
                pv.pop()
            if not ((self._pause is not None and self._pause[0] == end) or self._in_preroll(end)):
                self._pause_at = end
        if self._pause_at is not None and pv.is_speech_detected():
            self._pause_at = None  # speech went on before the pause was reported
        if self._pause_at is not None and fed >= self._pause_at + tail:
            end, self._pause_at = self._pause_at, None
            heard_pos, heard = self._heard
            if heard and (heard_pos >= end + tail or (
                    self._heard_in_quiet() and end <= heard_pos + int(QUIET_REUSE_S * SAMPLE_RATE))):
                # The last decode already heard all of the speech: made after it, or once the voice
                # had gone quiet for good.
                text, took = heard, 0.0
            else:
                assert self._speech_at is not None  # a pause comes after speech began
                text, took = self._decode(self._speech_at, fed)
            if not text:
                return None
            self._pause = (end, text)
            self._last_partial_pos = fed
            return SttUpdate(UpdateKind.PAUSE, text, self._timeline.end_s, self._timeline.seconds(end), took)
        if self._pause is not None and pv.is_speech_detected():
            self._pause = None
            self._extended = False  # the next pause is judged afresh
            return SttUpdate(UpdateKind.RESUME, "", self._timeline.end_s)
        return None

    def _in_preroll(self, speech_end: int) -> bool:
        return self._listen_from > 0 and speech_end <= self._listen_from + int(PREROLL_TAIL_S * SAMPLE_RATE)

    def _final(self, speech_end: int, decode_end: int) -> list[SttUpdate]:
        assert self._speech_at is not None
        pause, self._pause = self._pause, None
        if self._in_preroll(speech_end):
            # The wake word's tail, heard in the pre-roll and then silence: keep listening.
            return self._keep_listening()
        if pause is not None and abs(pause[0] - speech_end) <= int(SAME_END_S * SAMPLE_RATE):
            # Nothing was said since the pause: its transcript is the final one, no second decode.
            self._done = True
            end_s = self._timeline.seconds(speech_end)
            return [SttUpdate(UpdateKind.FINAL, pause[1], self._timeline.end_s, end_s, 0.0)]
        text, took = self._decode(self._speech_at, decode_end)
        if not text:
            # A cough, a knock, noise the model hears no words in: not a question; keep listening.
            return self._keep_listening()
        self._done = True
        return [SttUpdate(UpdateKind.FINAL, text, self._timeline.end_s, self._timeline.seconds(speech_end), took)]

    def _keep_listening(self) -> list[SttUpdate]:
        """The segment that just closed was no question: wait for speech to start again."""
        self._speech_at = None
        self._last_partial = ""
        self._extended = False
        self._loudest, self._quiet_since = -math.inf, None
        self._heard = (0, "")
        return []


TALK_OVER_REMOVED_DB = 6.0  # a chunk the canceller took more than this out of was the device's own sound
TALK_OVER_HOLE_S = 0.5  # the device's voice drowning the visitor's for longer ends their stretch
TALK_OVER_HEARD = 0.5  # at least this share of a stretch must have reached the VAD


class TalkOver:
    """Hears a visitor talking over the device (``conversation.barge_in = "speech"``): a silero VAD
    on the echo-cancelled microphone while the device thinks or speaks; ``speech_s`` of speech
    without a break is an interruption.

    A chunk that was mostly the device's own sound (the canceller took over TALK_OVER_REMOVED_DB
    out of it, or added as much: its filter still finding the echo) tells nothing of the visitor:
    what is left of an echo sounds like speech to the VAD, so it never sees such a chunk, and a
    run of them shorter than TALK_OVER_HOLE_S does not break a stretch either. With the device as
    loud as the visitor, its voice drowns their quieter syllables for 0.1-0.3 s at a time; fed to
    the VAD as silence, those holes cut every stretch short and kept it from starting at all.
    A stretch is timed as heard: holes within it count, but the VAD's look-back over the start
    is taken at its shortest (as if it spanned no hole), and at least TALK_OVER_HEARD of it must
    have been heard: speech caught only in snatches between the device's words is what the
    canceller left of the device's own voice."""

    def __init__(self, cfg: SttConfig, vad_path: Path, speech_s: float) -> None:
        self._vad = build_vad(cfg, vad_path, 30.0, silence_s=0.2)
        self._need = int(speech_s * SAMPLE_RATE)
        self._max_hole = int(TALK_OVER_HOLE_S * SAMPLE_RATE)
        self._active = False
        self._restart()

    def _restart(self) -> None:
        self._vad.reset()
        self._fed = 0  # samples the VAD has seen since its reset
        self._hole = 0  # samples of the device's own sound since it last saw one
        self._start: int | None = None  # audio position where the stretch it hears began
        self._fired = False

    def hear(self, chunk: AudioChunk, device_talking: bool, removed_db: float = 0.0) -> float | None:
        """Feed a chunk (``removed_db``: how much echo was taken out of it); the audio time the
        visitor's speech began, once it has lasted long enough."""
        if not device_talking:
            self._active = False
            return None
        if not self._active:
            self._active = True
            self._restart()
        if abs(removed_db) > TALK_OVER_REMOVED_DB:
            self._hole += len(chunk)
            if self._hole > self._max_hole and self._fed:
                self._restart()
            return None
        self._hole = 0
        self._vad.accept_waveform(chunk.float32())
        self._fed += len(chunk)
        while not self._vad.empty():
            self._vad.pop()
            self._start, self._fired = None, False  # that stretch ended: a new one must last on its own
        if not self._vad.is_speech_detected():
            self._start = None
            return None
        heard = self._fed - int(self._vad.current_segment.start)  # samples of it the VAD saw
        if self._start is None:
            self._start = chunk.end - heard
        if self._fired or chunk.end - self._start < self._need or heard < TALK_OVER_HEARD * (chunk.end - self._start):
            return None
        self._fired = True
        return self._start / SAMPLE_RATE
