"""openWakeWord models run with onnxruntime.

The pipeline, frame by frame (80 ms = 1280 samples at 16 kHz), exactly as the openwakeword
package (0.6.x, ``AudioFeatures._streaming_features`` and ``Model.predict``) buffers it, so
scores match what openwakeword itself would produce on the same audio:

1. melspectrogram.onnx on the frame plus the 480 samples before it (3 hops of context, so
   the 25 ms windows straddle frame boundaries): 8 mel frames of 32 bins, then ``x/10 + 2``.
2. embedding_model.onnx on the last 76 mel frames: one 96-value embedding per frame.
3. each word model on its last N embeddings (16 for most): a score 0..1.

As in openwakeword, the buffers start from the embeddings of low-level noise (seeded here,
so runs repeat) and the first 5 frames after a start or reset score 0 while real audio
replaces that filler.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, AudioChunk
from edge.config import WakeConfig, WakeWord
from edge.errors import ConfigError, MissingDependency, ModelError, StageError
from edge.wake.base import Trigger, WakeHit

_LOGGER = logging.getLogger(__name__)

FRAME = 1280  # 80 ms: the hop of openWakeWord's embeddings
MEL_CONTEXT = 480  # samples before the frame fed to the mel model (3 hops of 160)
MEL_BINS = 32
MEL_WINDOW = 76  # mel frames per embedding
EMBED_DIM = 96
MAX_EMBEDDINGS = 120  # openwakeword keeps ~10 s of embeddings; no model may ask for more
WARMUP_FRAMES = 5  # frames scored 0 after start/reset, as openwakeword does
MEL_FILE = "melspectrogram.onnx"
EMBED_FILE = "embedding_model.onnx"
_VERSION = re.compile(r"_v\d+(\.\d+)*$")  # hey_jarvis_v0.1 -> hey_jarvis


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _Onnx:
    """One onnxruntime session with its single input's name and declared shapes."""

    def __init__(self, ort: Any, path: Path, opts: Any) -> None:
        self.path = path
        if not path.is_file():
            raise ModelError(f"{path}: model file not found", code="model.missing")
        try:
            self.sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises several unrelated types for a bad file
            raise ModelError(f"{path}: not a usable ONNX model ({_first_line(err)})",
                             code="model.invalid") from None
        inputs, outputs = self.sess.get_inputs(), self.sess.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise self.wrong(f"expected 1 input and at least 1 output, it has {len(inputs)} and {len(outputs)}")
        self.input = inputs[0].name
        self.in_shape: list[Any] = list(inputs[0].shape)
        self.out_shape: list[Any] = list(outputs[0].shape)
        if inputs[0].type != "tensor(float)":
            raise self.wrong(f"expected a float input, it takes {inputs[0].type}")

    def wrong(self, why: str) -> ModelError:
        return ModelError(f"{self.path}: not an openWakeWord-format model: {why}", code="model.invalid")

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input: x})[0]

    def probe(self, x: np.ndarray) -> np.ndarray:
        """Run once at load, so a model whose shapes only fail at run time fails here."""
        try:
            return np.asarray(self.run(x))
        except Exception as err:
            raise self.wrong(f"it fails on input of shape {list(x.shape)} ({_first_line(err)})") from None


@dataclass
class _Word:
    name: str
    model: _Onnx
    n: int  # embeddings the model scores
    classes: int  # outputs; >1 for multi-class models like timer_v0.1 (class 0 = none)
    trigger: Trigger


def _session_options(ort: Any, threads: int) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Busy-waiting worker threads would cost a core each between 80 ms frames.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def _resolve(word: WakeWord, index: int, cfg: WakeConfig, files: dict[str, Path]) -> Path:
    if not word.model:
        raise ConfigError(f"wake.words[{index}].model: empty; name a word model file such as hey_jarvis_v0.1.onnx")
    if word.model in files:
        return Path(files[word.model])
    path = Path(word.model).expanduser()
    if path.is_file():
        return path
    known = ", ".join(sorted(n for n in files if n not in (MEL_FILE, EMBED_FILE))) or "none"
    raise ModelError(f"wake.words[{index}].model: {word.model!r} is neither a word model of wake model "
                     f"{cfg.model!r} (it has: {known}) nor an existing file", code="model.missing")


class OpenWakeWordDetector:
    """openWakeWord wake words; see the module docstring for the pipeline."""

    def __init__(self, cfg: WakeConfig, files: dict[str, Path]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependency.for_module("onnxruntime", "wake") from None
        words = cfg.word_list()
        if not words:
            raise ConfigError('wake.words: no wake words configured; add one or set wake.engine = "none"')
        for need in (MEL_FILE, EMBED_FILE):
            if need not in files:
                raise ModelError(f"wake model {cfg.model!r} lacks {need}: reinstall it with `edge-voice models`",
                                 code="model.missing")
        opts = _session_options(ort, cfg.num_threads)
        self._mel = _Onnx(ort, Path(files[MEL_FILE]), opts)
        self._emb = _Onnx(ort, Path(files[EMBED_FILE]), opts)
        if len(self._mel.in_shape) != 2 or self._mel.out_shape[-1:] != [MEL_BINS]:
            raise self._mel.wrong(f"expected input (1, samples) and output (..., {MEL_BINS}), it has "
                                  f"{self._mel.in_shape} and {self._mel.out_shape}")
        if self._emb.in_shape[1:] != [MEL_WINDOW, MEL_BINS, 1] or self._emb.out_shape[-1:] != [EMBED_DIM]:
            raise self._emb.wrong(f"expected input (batch, {MEL_WINDOW}, {MEL_BINS}, 1) and output "
                                  f"(..., {EMBED_DIM}), it has {self._emb.in_shape} and {self._emb.out_shape}")
        probe = self._mel.probe(np.zeros((1, MEL_CONTEXT + FRAME), dtype=np.float32))
        if probe.size != 8 * MEL_BINS:
            raise self._mel.wrong(f"expected 8 mel frames per 80 ms, it gives output of shape {list(probe.shape)}")

        self._words: list[_Word] = []
        names: set[str] = set()
        for i, w in enumerate(words):
            model = _Onnx(ort, _resolve(w, i, cfg, files), opts)
            word = self._check_word(model, w.name or _VERSION.sub("", model.path.stem), w)
            if word.name in names:
                raise ConfigError(f"wake.words[{i}].name: {word.name!r} is used twice; give each word its own name")
            names.add(word.name)
            self._words.append(word)

        self._keep = max(w.n for w in self._words)
        self._filler = self._noise_embeddings(self._keep)
        self._closed = False
        self.reset()
        _LOGGER.info("wake: openWakeWord %s on %d thread(s)",
                     ", ".join(f"{w.name} (threshold {w.trigger.threshold}, refractory {w.trigger.refractory_s} s)"
                               for w in self._words), cfg.num_threads)

    def _check_word(self, model: _Onnx, name: str, w: WakeWord) -> _Word:
        shape = model.in_shape
        ok = (len(shape) == 3 and (shape[0] == 1 or not isinstance(shape[0], int))
              and isinstance(shape[1], int) and 1 <= shape[1] <= MAX_EMBEDDINGS and shape[2] == EMBED_DIM)
        if not ok:
            raise model.wrong(f"expected input (1, N, {EMBED_DIM}) with N <= {MAX_EMBEDDINGS} embeddings, "
                              f"it takes {shape}")
        n = int(shape[1])
        out = model.probe(np.zeros((1, n, EMBED_DIM), dtype=np.float32))
        if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
            raise model.wrong(f"expected output (1, scores), it gives {list(out.shape)}")
        return _Word(name, model, n, int(out.shape[1]), Trigger(w.threshold, w.refractory_s))

    def _noise_embeddings(self, n: int) -> np.ndarray:
        """openwakeword fills its buffer with embeddings of 4 s of noise in [-1000, 1000)."""
        mel_frames = MEL_WINDOW + 8 * (n - 1)
        samples = max(4 * SAMPLE_RATE, (mel_frames + 3) * 160)
        noise = np.random.default_rng(1234).integers(-1000, 1000, samples).astype(np.float32)
        mel = self._mel.probe(noise[None]).reshape(-1, MEL_BINS) / 10 + 2
        windows = [mel[i:i + MEL_WINDOW] for i in range(0, mel.shape[0] - MEL_WINDOW + 1, 8)]
        batch = np.asarray(windows, dtype=np.float32)[..., None]
        out = self._emb.probe(batch)
        if out.size != len(windows) * EMBED_DIM:
            raise self._emb.wrong(f"expected {EMBED_DIM} values per window, it gives {list(out.shape)}")
        return out.reshape(-1, EMBED_DIM)[-n:].astype(np.float32)

    @property
    def words(self) -> list[str]:
        return [w.name for w in self._words]

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)
        self._pending_end = 0  # timeline sample just after the last pending sample
        self._context = np.zeros(0, dtype=np.float32)
        self._melbuf: np.ndarray = np.ones((MEL_WINDOW, MEL_BINS), dtype=np.float32)
        self._feats = self._filler.copy()
        self._frames = 0
        for w in self._words:
            w.trigger.reset()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._words = []
            del self._mel, self._emb

    def process(self, chunk: AudioChunk) -> list[WakeHit]:
        if self._closed:
            raise StageError("the wake detector is closed", code="wake.closed")
        if chunk.rate != SAMPLE_RATE:
            raise StageError(f"wake: audio must be {SAMPLE_RATE} Hz, got {chunk.rate} Hz", code="wake.rate")
        if len(chunk) == 0:
            return []
        self._pending = np.concatenate((self._pending, chunk.samples)) if len(self._pending) else chunk.samples
        self._pending_end = chunk.end
        hits: list[WakeHit] = []
        while len(self._pending) >= FRAME:
            frame, self._pending = self._pending[:FRAME], self._pending[FRAME:]
            end = self._pending_end - len(self._pending)
            try:
                scores = self.scores(frame)
            except Exception as err:
                raise StageError(f"wake: openWakeWord failed: {_first_line(err)}") from err
            t = end / SAMPLE_RATE
            for word, score in zip(self._words, scores):
                if word.trigger.score(score, t):
                    _LOGGER.info("wake word %s (score %.3f) at %.2f s", word.name, score, t)
                    hits.append(WakeHit(word.name, score, t))
        return hits

    def scores(self, frame: np.ndarray) -> list[float]:
        """Push one 1280-sample frame through the models; one score per word, in config order.

        Public for tools that plot scores; ``process`` is the stage's entry point.
        """
        if len(frame) != FRAME:
            raise ValueError(f"a frame is {FRAME} samples, got {len(frame)}")
        x = frame.astype(np.float32)
        mel_in = np.concatenate((self._context, x))
        self._context = mel_in[-MEL_CONTEXT:]
        mel = self._mel.run(mel_in[None]).reshape(-1, MEL_BINS) / 10 + 2
        self._melbuf = np.concatenate((self._melbuf, mel))[-MEL_WINDOW:]
        emb = self._emb.run(self._melbuf[None, :, :, None]).reshape(1, EMBED_DIM)
        self._feats = np.concatenate((self._feats[1:], emb.astype(np.float32)))
        self._frames += 1
        if self._frames <= WARMUP_FRAMES:
            return [0.0] * len(self._words)
        return [self._word_score(w) for w in self._words]

    def _word_score(self, w: _Word) -> float:
        y = w.model.run(self._feats[None, -w.n:])
        # Multi-class models (timer_v0.1) put "no wake word" in class 0.
        return float(y[0, 0]) if w.classes == 1 else float(np.max(y[0, 1:]))
