"""Streaming speech-to-text: sherpa-onnx ``OnlineRecognizer`` with its endpoint rules.

Audio goes into one ``OnlineStream`` per utterance; the model decodes whenever a full chunk of
feature frames is ready (``is_ready``/``decode_stream``), so most 20 ms chunks cost only
feature extraction. Endpointing is sherpa-onnx's:

- rule 2: trailing silence of ``endpoint_silence_s`` after decoded words → final. With pauses
  reported (``stt.pause_s``), the endpoint is counted from the pause instead, so that an
  end-of-turn decision can move it (``set_endpoint``), and rule 2 is the longest wait.

Rules 1 and 3 are switched off: they count from the start of the stream, and a reset after a
silent stretch would make rule 3 cut a question at a random point. ``max_utterance_s`` is
counted here from the first decoded word instead, as the VAD engine counts it from speech start.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, AudioChunk
from edge.cpu import CpuPolicy
from edge.errors import ModelError
from edge.stt.base import SttUpdate, UpdateKind
from edge.stt.common import FeedingRecognizer, Timeline, check_chunk, closed_error, import_sherpa

if TYPE_CHECKING:
    from edge.config import SttConfig
    from edge.stt.files import SttModel

_LOGGER = logging.getLogger(__name__)

# Silence appended on finish() so the model's right context covers the last word.
TAIL_PADDING_S = 0.5
# One output frame of these models: 10 ms feature shift x subsampling 4.
OUTPUT_FRAME_S = 0.04
NEVER_S = 1e6  # an endpoint rule threshold that is never reached


def build_online_recognizer(cfg: SttConfig, model: SttModel, endpoint_s: float | None = None) -> Any:
    """The sherpa-onnx OnlineRecognizer for ``model``, endpoint rules from ``cfg`` (rule 2's
    trailing silence ``endpoint_s``, default ``stt.endpoint_silence_s``)."""
    so = import_sherpa()
    f = {role: str(p) for role, p in model.files.items()}
    common = dict(
        tokens=f["tokens"],
        num_threads=cfg.num_threads,
        sample_rate=SAMPLE_RATE,
        feature_dim=80,
        enable_endpoint_detection=True,
        rule1_min_trailing_silence=NEVER_S,
        rule2_min_trailing_silence=cfg.endpoint_silence_s if endpoint_s is None else endpoint_s,
        rule3_min_utterance_length=NEVER_S,
    )
    if cfg.decoding_method != "greedy_search" and model.kind != "transducer":
        # sherpa-onnx exits the process for beam search on CTC/Paraformer models.
        _LOGGER.info("stt.decoding_method %s applies to transducers only; %s uses greedy_search",
                     cfg.decoding_method, model.kind)
    try:
        if model.kind == "transducer":
            return so.OnlineRecognizer.from_transducer(
                encoder=f["encoder"], decoder=f["decoder"], joiner=f["joiner"],
                decoding_method=cfg.decoding_method,
                model_type=model.metadata.get("model_type", ""), **common)
        if model.kind == "paraformer":
            return so.OnlineRecognizer.from_paraformer(
                encoder=f["encoder"], decoder=f["decoder"], decoding_method="greedy_search", **common)
        if model.kind == "nemo_ctc":
            return so.OnlineRecognizer.from_nemo_ctc(
                model=f["model"], decoding_method="greedy_search", **common)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ModelError(f"sherpa-onnx could not load the {model.kind} model "
                         f"{next(iter(f.values()))}: {err}", code="model.invalid") from err
    raise ModelError(f"{model.kind} is not a streaming model type", code="model.unsupported")


class StreamingRecognizer(FeedingRecognizer):
    """``Recognizer`` over a sherpa-onnx streaming model."""

    sample_rate = SAMPLE_RATE

    def __init__(self, cfg: SttConfig, model: SttModel, cpu: CpuPolicy | None = None, *,
                 max_silence_s: float | None = None) -> None:
        self._cfg = cfg
        self._cpu = cpu or CpuPolicy()
        self.kind = model.kind
        t0 = time.monotonic()
        # With pauses reported, the endpoint is counted here from the pause (set_endpoint moves
        # it); sherpa-onnx's rule 2 closes only after the longest silence a turn may be given.
        use_pause = 0 < cfg.pause_s < cfg.endpoint_silence_s
        self._longest = max(cfg.endpoint_silence_s, max_silence_s or 0.0) if use_pause else cfg.endpoint_silence_s
        self._endpoint_s = cfg.endpoint_silence_s
        self._rec: Any = build_online_recognizer(cfg, model, self._longest)
        _LOGGER.info("speech-to-text: streaming %s model loaded in %.2f s (%d threads)",
                     model.kind, time.monotonic() - t0, cfg.num_threads)
        self._closed = False
        self._stream: Any = None
        self._timeline = Timeline()
        self._pending: list[SttUpdate] = []
        self._done = True
        self._speech_at = -1.0  # timeline seconds of the first decoded word; -1 before it
        self._last_partial = ""
        self._last_partial_pos = 0
        self._pause_text: str | None = None  # transcript at the pause in progress
        self._decode_s = 0.0  # decode time within the current call

    # -- Recognizer ---------------------------------------------------------------------------

    def start(self, preroll: list[AudioChunk]) -> None:
        if self._closed:
            raise closed_error()
        # A fresh stream is the clean reset: features, decoder result and model caches.
        self._stream = self._rec.create_stream()
        self._timeline = Timeline()
        self._pending = []
        self._done = False
        self._speech_at = -1.0
        self._last_partial = ""
        self._last_partial_pos = 0
        self._pause_text = None
        self._pause_end = 0.0
        self._endpoint_s = self._cfg.endpoint_silence_s
        self._feed_preroll(preroll)

    def finish(self) -> SttUpdate | None:
        if self._closed:
            raise closed_error()
        if self._done or self._stream is None:
            return None
        self._done = True
        self._decode_s = 0.0
        s = self._stream
        s.accept_waveform(SAMPLE_RATE, np.zeros(int(TAIL_PADDING_S * SAMPLE_RATE), np.float32))
        s.input_finished()
        self._decode_ready()
        res = self._rec.get_result_all(s)
        text = res.text.strip()
        if not text:
            return None
        end = self._timeline.end_s
        return SttUpdate(UpdateKind.FINAL, text, end, min(self._token_end(res), end), self._decode_s)

    def set_endpoint(self, silence_s: float) -> SttUpdate | None:
        if self._closed:
            raise closed_error()
        if self._done or self._stream is None:
            return None
        self._endpoint_s = min(silence_s, self._longest)
        return self._endpoint_reached()

    def _endpoint_reached(self) -> SttUpdate | None:
        if self._pause_text is None or self._timeline.end_s - self._pause_end < self._endpoint_s:
            return None
        self._done = True
        end = self._timeline.end_s
        return SttUpdate(UpdateKind.FINAL, self._pause_text, end, self._pause_end, 0.0)

    def transcribe(self, samples: np.ndarray) -> tuple[str, float]:
        """Decode a whole utterance at once, in a stream of its own; (text, seconds)."""
        if self._closed:
            raise closed_error()
        t0 = time.perf_counter()
        with self._cpu.computing("stt"):
            s = self._rec.create_stream()
            s.accept_waveform(SAMPLE_RATE, samples.astype(np.float32) / 32768.0)
            s.accept_waveform(SAMPLE_RATE, np.zeros(int(TAIL_PADDING_S * SAMPLE_RATE), np.float32))
            s.input_finished()
            while self._rec.is_ready(s):
                self._rec.decode_stream(s)
            text = self._rec.get_result_all(s).text.strip()
        return text, time.perf_counter() - t0

    def close(self) -> None:
        self._closed = True
        self._stream = None
        self._rec = None

    # -- internals -----------------------------------------------------------------------------

    def _decode_ready(self) -> bool:
        if not self._rec.is_ready(self._stream):
            return False
        t0 = time.perf_counter()
        with self._cpu.computing("stt"):
            while self._rec.is_ready(self._stream):
                self._rec.decode_stream(self._stream)
        self._decode_s += time.perf_counter() - t0
        return True

    def _token_end(self, res: Any) -> float:
        """Timeline seconds just after the last decoded token."""
        if not res.timestamps:
            return self._timeline.end_s
        t = res.start_time + res.timestamps[-1] + OUTPUT_FRAME_S
        return self._timeline.seconds(int(round(t * SAMPLE_RATE)))

    def _feed(self, chunk: AudioChunk) -> list[SttUpdate]:
        check_chunk(chunk)
        self._timeline.push(chunk)
        self._stream.accept_waveform(SAMPLE_RATE, chunk.float32())
        self._decode_s = 0.0
        if not self._decode_ready():
            final = self._endpoint_reached()
            return [final] if final is not None else []
        res = self._rec.get_result_all(self._stream)
        text = res.text.strip()
        out: list[SttUpdate] = []
        if text and self._speech_at < 0:
            first = res.start_time + (res.timestamps[0] if res.timestamps else 0.0)
            self._speech_at = self._timeline.seconds(int(first * SAMPLE_RATE))
            out.append(SttUpdate(UpdateKind.SPEECH_START, "", self._speech_at))
        end = self._timeline.end_s
        if text and self._rec.is_endpoint(self._stream):  # rule 2: words, then silence
            self._done = True
            out.append(SttUpdate(UpdateKind.FINAL, text, end, min(self._token_end(res), end), self._decode_s))
            return out
        if text and end - self._speech_at >= self._cfg.max_utterance_s:
            self._done = True  # cut while still speaking
            out.append(SttUpdate(UpdateKind.FINAL, text, end, end, self._decode_s))
            return out
        pause_s = self._cfg.pause_s
        if text and 0 < pause_s < self._cfg.endpoint_silence_s:
            if self._pause_text is not None and text != self._pause_text:
                self._pause_text = None
                self._endpoint_s = self._cfg.endpoint_silence_s
                out.append(SttUpdate(UpdateKind.RESUME, "", end))
            token_end = min(self._token_end(res), end)
            if self._pause_text is None and end - token_end >= pause_s:
                self._pause_text, self._pause_end = text, token_end
                out.append(SttUpdate(UpdateKind.PAUSE, text, end, token_end, self._decode_s))
                return out
            final = self._endpoint_reached()
            if final is not None:
                return out + [final]
        fed = self._timeline.fed
        interval = int(self._cfg.partial_interval_s * SAMPLE_RATE)
        if text and text != self._last_partial and fed - self._last_partial_pos >= interval:
            self._last_partial, self._last_partial_pos = text, fed
            out.append(SttUpdate(UpdateKind.PARTIAL, text, end, None, self._decode_s))
        return out
