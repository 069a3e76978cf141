"""Text-to-speech with sherpa-onnx: voice checks, loading, and the ``Synthesizer`` backend.

A synthesizer turns one clause of text into int16 mono audio at its own ``sample_rate``,
yielding each sentence's audio as soon as the model has it, so playback starts while the
rest is still being computed. Cancelling stops it between sentences (sherpa-onnx's progress
callback returns 0) and ends the iteration at once.

sherpa-onnx 2.x has no espeak-ng: the text is phonemized here (:mod:`edge.tts.phonemize`) and
handed over as codepoints. sherpa-onnx also ends the process (exit status 255, no
exception) when a model lacks metadata it needs, so the files are checked before loading.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.audio.chunk import to_mono_int16
from edge.config import TtsConfig
from edge.cpu import CpuPolicy
from edge.errors import ConfigError, MissingDependency, ModelError, StageError
from edge.onnxmeta import read_onnx_metadata
from edge.signals import Flag
from edge.tts.base import SynthesisStats
from edge.tts.text import has_words, normalize_for_speech

_LOGGER = logging.getLogger(__name__)

MODEL = "model.onnx"
TOKENS = "tokens.txt"
KOKORO_VOICES = "voices.bin"
MATCHA_VOCODER = "vocoder.onnx"

# sherpa-onnx's VITS loader has no default for these (see offline-tts-vits-model.cc).
_VITS_REQUIRED = ("sample_rate", "n_speakers", "language", "comment")


# --- checks before sherpa-onnx sees a file ----------------------------------------------

def check_vits_model(path: Path) -> dict[str, str]:
    """The model's metadata, or ModelError naming the file and the first missing key."""
    meta = read_onnx_metadata(path)
    for key in _VITS_REQUIRED:
        if key not in meta:
            raise ModelError(f"{path}: the voice model lacks the metadata key {key!r}: install the voice "
                             "with `edge-voice models` (it adds what sherpa-onnx needs)", code="model.invalid")
    for key in ("sample_rate", "n_speakers"):
        try:
            value = int(meta[key])
        except ValueError:
            value = -1
        if value < (1 if key == "sample_rate" else 0):
            raise ModelError(f"{path}: metadata {key}={meta[key]!r} is not a valid number", code="model.invalid")
    if not any(word in meta["comment"] for word in ("piper", "coqui")):
        raise ModelError(f"{path}: not a Piper voice (comment={meta['comment']!r}); only espeak-ng "
                         "phoneme voices are supported", code="model.invalid")
    return meta


def check_tokens(path: Path, required: str = "") -> set[str]:
    """tokens.txt as sherpa-onnx reads it (one character and an id per line); sherpa-onnx
    exits the process on a bad line, so it is checked here first."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path}: tokens file not found", code="model.missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot read the tokens file: {err}", code="model.invalid") from None
    symbols: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() and not line.startswith(" "):
            continue
        if line.startswith(" "):  # the word separator itself
            sym, ident = " ", line[1:].strip()
        else:
            sym, _, ident = line.strip().rpartition(" ")
        if not ident.isdigit() or len(sym) != 1 or sym in symbols:
            raise ModelError(f"{path}: line {n} is not 'symbol id' with a single, new symbol: {line!r}",
                             code="model.invalid")
        symbols.add(sym)
    if not symbols:
        raise ModelError(f"{path}: the tokens file is empty", code="model.invalid")
    missing = [s for s in required if s not in symbols]
    if missing:
        raise ModelError(f"{path}: lacks the symbols {' '.join(missing)} a Piper voice needs", code="model.invalid")
    return symbols


# --- the sherpa-onnx backend ------------------------------------------------------------

_DONE = object()


@dataclass
class _Job:
    sentences: list[list[int]]
    cancel: Flag
    started: float
    stop: Flag = field(default_factory=Flag)
    # A clause's sentences, as the model finishes them. Unbounded on purpose: a clause holds a
    # few sentences at most (the clause splitter cuts at 24 words), and the model's callback
    # must never wait for the consumer, or it would sit in a native call holding its core.
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    generated: int = 0
    samples: int = 0
    first_audio: float | None = None

    def stopped(self) -> bool:
        return self.stop.is_set() or self.cancel.is_set()


class SherpaSynthesizer:
    """sherpa-onnx ``OfflineTts`` with phonemes from ``Phonemizer``; one generation at a time,
    each on a worker thread whose sentences the caller's iteration yields."""

    def __init__(self, tts: Any, phonemizer: Any, *, language: str, speaker_id: int = 0,
                 speed: float = 1.0, name: str = "tts", cpu: CpuPolicy | None = None) -> None:
        self._tts = tts
        self._phonemizer = phonemizer
        self._language = language
        self._speaker_id = speaker_id
        self._speed = speed
        self._name = name
        self._cpu = cpu or CpuPolicy()
        self.sample_rate = int(tts.sample_rate)
        self._lock = threading.Lock()  # sherpa-onnx does not promise a re-entrant generate()
        self._thread: threading.Thread | None = None
        self._job: _Job | None = None
        self._closed = False
        self.last_stats: SynthesisStats | None = None

    def synthesize(self, text: str, cancel: Flag) -> Iterator[np.ndarray]:
        if self._closed:
            raise StageError("text-to-speech is closed", code="tts.closed")
        started = time.monotonic()
        spoken = normalize_for_speech(text, self._language)
        if not has_words(spoken) or cancel.is_set():
            return
        sentences = [s for s in self._phonemizer.phonemize(spoken) if any(chr(c).isalpha() for c in s)]
        if not sentences:
            raise StageError(f"no phonemes for {spoken[:60]!r} in voice {self._phonemizer.voice!r}",
                             code="tts.empty")
        job = _Job(sentences, cancel, started)
        thread = threading.Thread(target=self._generate, args=(job,), name=f"{self._name}-generate", daemon=True)
        self._job, self._thread = job, thread
        undo = cancel.on_set(lambda: job.pieces.put(_DONE))  # wakes the wait below at once
        thread.start()
        try:
            while True:
                item = job.pieces.get()
                if item is _DONE or cancel.is_set():
                    break
                if isinstance(item, BaseException):
                    raise StageError(f"text-to-speech failed: {item}", code="tts.failed") from item
                yield item
            if job.samples == 0 and not cancel.is_set():
                raise StageError(f"the voice produced no audio for {spoken[:60]!r}", code="tts.empty")
        finally:
            undo()
            job.stop.set()  # a consumer that leaves early stops the worker at its next sentence

    def _generate(self, job: _Job) -> None:
        import sherpa_onnx

        with self._lock:
            try:
                if job.stopped():
                    return
                gen = sherpa_onnx.GenerationConfig()
                gen.sid = self._speaker_id
                gen.speed = self._speed
                gen.phoneme_codepoints = job.sentences

                def on_audio(samples: np.ndarray, progress: float) -> int:
                    if job.stopped():
                        return 0
                    # Copy now: sherpa-onnx frees the buffer when the callback returns.
                    pcm = to_mono_int16(np.asarray(samples, dtype=np.float32))
                    job.generated += 1
                    if len(pcm):
                        if job.first_audio is None:
                            job.first_audio = time.monotonic()
                        job.samples += len(pcm)
                        job.pieces.put(pcm)
                    return 0 if job.stopped() else 1

                with self._cpu.computing("tts"):
                    self._tts.generate("", gen, on_audio)
            except Exception as err:  # reported to the consumer, which raises StageError
                job.pieces.put(err)
            finally:
                now = time.monotonic()
                stats = self.last_stats = SynthesisStats(
                    sentences=len(job.sentences), generated=job.generated, samples=job.samples,
                    audio_s=job.samples / self.sample_rate,
                    first_audio_s=None if job.first_audio is None else job.first_audio - job.started,
                    elapsed_s=now - job.started, cancelled=job.stopped())
                _LOGGER.debug("synthesized %d/%d sentence(s): %.2f s of audio, first after %s s, rtf %.3f%s",
                              stats.generated, stats.sentences, stats.audio_s,
                              "-" if stats.first_audio_s is None else f"{stats.first_audio_s:.3f}",
                              stats.rtf if stats.audio_s else 0.0, " (stopped)" if stats.cancelled else "")
                job.pieces.put(_DONE)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for a generation still finishing its sentence after a cancel; True when idle."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._job is not None:
            self._job.stop.set()
        if not self.wait_idle(30.0):
            _LOGGER.warning("text-to-speech did not stop within 30 s; leaving it to finish")
            return
        self._tts = None  # frees the model


def _select_kind(files: dict[str, Path]) -> str:
    if KOKORO_VOICES in files:
        return "kokoro"
    if MATCHA_VOCODER in files:
        return "matcha"
    return "vits"


def _need(files: dict[str, Path], name: str) -> Path:
    path = files.get(name)
    if path is None:
        raise ModelError(f"the text-to-speech voice has no {name}: reinstall it with `edge-voice models`",
                         code="model.missing")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found: reinstall the voice with `edge-voice models`",
                         code="model.missing")
    return path


def load_voice(cfg: TtsConfig, files: dict[str, Path], cpu: CpuPolicy | None = None) -> SherpaSynthesizer:
    """Load the voice in ``files`` (installed file name → path) with sherpa-onnx.

    Piper/VITS voices need ``model.onnx`` and ``tokens.txt``; a ``voices.bin`` selects
    Kokoro, a ``vocoder.onnx`` Matcha (both best effort). ``espeak-ng-data/`` is not used.
    """
    kind = _select_kind(files)
    if MODEL not in files:
        # sherpa-onnx's own voice archives name the model after the voice.
        onnx = [n for n in files if n.endswith(".onnx") and n != MATCHA_VOCODER]
        if len(onnx) == 1:
            files = {**files, MODEL: files[onnx[0]]}
    model, tokens = _need(files, MODEL), _need(files, TOKENS)
    if kind == "vits":
        meta = check_vits_model(model)
        check_tokens(tokens, required="_^$" if "piper" in meta["comment"] else "")
        n_speakers = int(meta["n_speakers"])
        if n_speakers and cfg.speaker_id >= n_speakers:
            raise ConfigError(f"tts.speaker_id: {cfg.speaker_id} is out of range: the voice has "
                              f"{n_speakers} speaker(s), 0 to {n_speakers - 1}")
    else:
        meta = read_onnx_metadata(model)
        if "sample_rate" not in meta:
            raise ModelError(f"{model}: the {kind} model lacks the metadata key 'sample_rate'",
                             code="model.invalid")
        check_tokens(tokens)
    try:
        import sherpa_onnx
    except ImportError:
        raise MissingDependency.for_module("sherpa_onnx", "tts") from None
    from edge.tts.phonemize import Phonemizer

    voice = meta.get("voice") or "en-us"
    phonemizer = Phonemizer(voice)
    speed = cfg.speed
    model_cfg = sherpa_onnx.OfflineTtsModelConfig(num_threads=cfg.num_threads, provider="cpu")
    if kind == "vits":
        # sherpa-onnx replaces the voice's own length scale by 1/speed when speed != 1;
        # folding the speed into the length scale keeps the voice's pacing.
        length_scale = float(meta.get("length_scale", 1.0)) / cfg.speed
        model_cfg.vits = sherpa_onnx.OfflineTtsVitsModelConfig(
            model=str(model), tokens=str(tokens),
            noise_scale=float(meta.get("noise_scale", 0.667)),
            noise_scale_w=float(meta.get("noise_scale_w", 0.8)),
            length_scale=length_scale)
        speed = 1.0
    elif kind == "kokoro":
        model_cfg.kokoro = sherpa_onnx.OfflineTtsKokoroModelConfig(
            model=str(model), voices=str(_need(files, KOKORO_VOICES)), tokens=str(tokens))
    else:
        model_cfg.matcha = sherpa_onnx.OfflineTtsMatchaModelConfig(
            acoustic_model=str(model), vocoder=str(_need(files, MATCHA_VOCODER)), tokens=str(tokens))
    # One sentence per model run, so each sentence's audio comes out as soon as it is ready.
    config = sherpa_onnx.OfflineTtsConfig(model=model_cfg, max_num_sentences=1)
    if not config.validate():
        raise ModelError(f"{model}: sherpa-onnx rejected the {kind} voice configuration", code="model.invalid")
    started = time.monotonic()
    tts = sherpa_onnx.OfflineTts(config)
    _LOGGER.info("text-to-speech: %s voice %s (%s, %d Hz, %d thread(s)) loaded in %.2f s", kind, model.parent.name,
                 voice, tts.sample_rate, cfg.num_threads, time.monotonic() - started)
    return SherpaSynthesizer(tts, phonemizer, language=voice.split("-")[0].lower(),
                             speaker_id=cfg.speaker_id, speed=speed, name="tts", cpu=cpu)
