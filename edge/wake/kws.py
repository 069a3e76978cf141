"""sherpa-onnx KeywordSpotter: a small streaming transducer that listens for typed keywords.

Keywords are written as the model's tokens, one keyword per entry, in sherpa-onnx's
keywords-file syntax: tokens separated by spaces, then optionally ``:boost``, ``#threshold``
(0..1) and ``@NAME`` (the name reported), e.g. ``▁HE Y ▁J AR VI S @HEY_JARVIS``.
``sherpa-onnx-cli text2token`` turns plain text into tokens for a given model.

sherpa-onnx ends the whole process (status 255, no exception) when a model lacks the
metadata it reads or a keyword holds a token it does not know, so everything it would
trip over is checked here first and reported as a ModelError or ConfigError.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

from edge.audio.chunk import SAMPLE_RATE, AudioChunk
from edge.config import WakeConfig, WakeWord
from edge.errors import ConfigError, MissingDependency, ModelError, StageError
from edge.onnxmeta import read_onnx_metadata
from edge.wake.base import Trigger, WakeHit

_LOGGER = logging.getLogger(__name__)

FRAME_SHIFT_S = 0.01  # sherpa's fbank: 10 ms hop, 25 ms window
FEATURE_DIM = 80
# WakeConfig has no refractory for keywords; take the wake words' default.
REFRACTORY_S = WakeWord().refractory_s

# Encoder metadata each transducer type reads in sherpa-onnx 2.0 (online-*-transducer-model.cc).
# Lists are comma-separated ints, one per encoder stack, and must be equally long.
_ENCODER_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "zipformer2": (("encoder_dims", "query_head_dims", "value_head_dims", "num_heads", "num_encoder_layers",
                    "cnn_module_kernels", "left_context_len"), ("T", "decode_chunk_len")),
    "zipformer": (("encoder_dims", "attention_dims", "num_encoder_layers", "cnn_module_kernels",
                   "left_context_len"), ("T", "decode_chunk_len")),
    "lstm": ((), ("num_encoder_layers", "T", "decode_chunk_len", "rnn_hidden_size", "d_model")),
    "conformer": ((), ("num_encoder_layers", "T", "decode_chunk_len", "left_context", "encoder_dim",
                       "pad_length", "cnn_module_kernel")),
}


# --- checks before sherpa sees the files --------------------------------------------------------

def _pick(files: dict[str, Path], role: str, model_id: str) -> Path:
    names = sorted(n for n in files if role in n.lower() and n.lower().endswith(".onnx"))
    if len(names) > 1:  # release archives ship float and int8 copies; int8 is faster on a CPU
        names = [n for n in names if ".int8." in n.lower()] or names
    if len(names) != 1:
        why = "none" if not names else "several: " + ", ".join(names)
        raise ModelError(f"keyword spotter {model_id!r}: expected one {role} .onnx file, found {why}",
                         code="model.missing" if not names else "model.invalid")
    return Path(files[names[0]])


def _ints(meta: dict[str, str], key: str, path: Path, what: str) -> list[int]:
    if key not in meta:
        raise ModelError(f"{path}: the {what} lacks metadata {key!r} that sherpa-onnx needs; "
                         "export it with icefall's export-onnx script", code="model.invalid")
    try:
        values = [int(v) for v in meta[key].split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ModelError(f"{path}: {what} metadata {key}={meta[key]!r} is not a list of integers",
                         code="model.invalid")
    return values


def check_transducer(encoder: Path, decoder: Path, joiner: Path) -> dict[str, int]:
    """Check the metadata sherpa-onnx reads; returns T, decode_chunk_len, vocab_size, context_size."""
    meta = read_onnx_metadata(encoder)
    model_type = meta.get("model_type", "")
    if model_type not in _ENCODER_KEYS:
        known = ", ".join(_ENCODER_KEYS)
        why = f"model_type {model_type!r}" if model_type else "no model_type metadata"
        raise ModelError(f"{encoder}: encoder has {why}; keyword spotting takes a streaming transducer ({known})",
                         code="model.invalid")
    lists, scalars = _ENCODER_KEYS[model_type]
    lengths = {key: len(_ints(meta, key, encoder, "encoder")) for key in lists}
    if len(set(lengths.values())) > 1:
        raise ModelError(f"{encoder}: encoder metadata lists differ in length ({lengths})", code="model.invalid")
    info = {key: _ints(meta, key, encoder, "encoder")[0] for key in scalars}
    dec = read_onnx_metadata(decoder)
    for key in ("vocab_size", "context_size"):
        info[key] = _ints(dec, key, decoder, "decoder")[0]
    read_onnx_metadata(joiner)
    if info["T"] < 1 or info["decode_chunk_len"] < 1 or info["vocab_size"] < 2 or info["context_size"] < 1:
        raise ModelError(f"{encoder}: implausible transducer metadata {info}", code="model.invalid")
    return info


def read_tokens(path: Path, vocab_size: int) -> set[str]:
    """Symbols of sherpa's tokens.txt (``symbol id`` per line); ids must fit the model."""
    if not path.is_file():
        raise ModelError(f"{path}: tokens file not found", code="model.missing")
    symbols: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot read tokens: {err}", code="model.invalid") from None
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            sym, tid = (parts[0], int(parts[1])) if len(parts) == 2 else (" ", int(parts[0]))
        except (ValueError, IndexError):
            raise ModelError(f"{path}:{n}: expected 'symbol id', got {line!r}", code="model.invalid") from None
        if len(parts) > 2 or not 0 <= tid < vocab_size:
            raise ModelError(f"{path}:{n}: {line!r} does not fit a model of {vocab_size} tokens; "
                             "tokens.txt and the model files must come from the same release", code="model.invalid")
        symbols.add(sym)
    if not symbols:
        raise ModelError(f"{path}: no tokens", code="model.invalid")
    return symbols


def check_keyword(line: str, tokens: set[str], where: str, tokens_name: str) -> str:
    """Validate one keywords-file line as sherpa parses it; returns the name it reports."""
    words = line.split()
    name, n_tokens = "", 0
    for word in words:
        if word in tokens:
            n_tokens += 1
            continue
        mark, rest = word[0], word[1:]
        if mark in ":#":
            try:
                value = float(rest)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or (mark == "#" and not 0 <= value <= 1):
                what = "boost (:number)" if mark == ":" else "threshold (#0..1)"
                raise ConfigError(f"{where}: {word!r} is not a valid {what}")
        elif mark == "@" and rest:
            name = rest
        else:
            raise ConfigError(f"{where}: {word!r} is not a token of this model ({tokens_name}); write keywords "
                              "as the model's tokens (`sherpa-onnx-cli text2token` converts text)")
    if n_tokens == 0:
        raise ConfigError(f"{where}: {line!r} has no tokens")
    # Without @NAME sherpa reports the tokens joined, less the first character (the word mark).
    return name or "".join(w for w in words if w in tokens)[1:]


class KeywordSpotterDetector:
    """The ``kws`` engine: sherpa-onnx KeywordSpotter over the configured keywords."""

    def __init__(self, cfg: WakeConfig, files: dict[str, Path]) -> None:
        encoder, decoder, joiner = (_pick(files, r, cfg.model) for r in ("encoder", "decoder", "joiner"))
        tokens_name = next((n for n in sorted(files) if n.endswith("tokens.txt")), None)
        if tokens_name is None:
            raise ModelError(f"keyword spotter {cfg.model!r} lacks tokens.txt", code="model.missing")
        info = check_transducer(encoder, decoder, joiner)
        tokens = read_tokens(Path(files[tokens_name]), info["vocab_size"])
        lines, source = self._keyword_lines(cfg, files)
        names = [check_keyword(line, tokens, f"{source}[{i}]", tokens_name) for i, line in enumerate(lines)]
        try:
            import sherpa_onnx
        except ImportError:
            raise MissingDependency.for_module("sherpa_onnx", "stt") from None

        # sherpa reads keywords only from a file; it is parsed in the constructor.
        fd, kw_path = tempfile.mkstemp(prefix="edge-voice-kws-", suffix=".txt")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            self._kws = sherpa_onnx.KeywordSpotter(
                tokens=str(files[tokens_name]), encoder=str(encoder), decoder=str(decoder), joiner=str(joiner),
                keywords_file=kw_path, num_threads=cfg.num_threads, sample_rate=SAMPLE_RATE,
                feature_dim=FEATURE_DIM, keywords_score=cfg.kws_score, keywords_threshold=cfg.kws_threshold,
                provider="cpu")
        except (RuntimeError, ValueError, AssertionError) as err:
            raise ModelError(f"keyword spotter {cfg.model!r}: sherpa-onnx cannot load it: {err}",
                             code="model.invalid") from None
        finally:
            os.unlink(kw_path)
        self._chunk_frames = info["T"]
        self._shift_frames = info["decode_chunk_len"]
        self._triggers: dict[str, Trigger] = {n: Trigger(1.0, REFRACTORY_S) for n in names}
        self._closed = False
        self.reset()
        _LOGGER.info("wake: keyword spotter %s with %s on %d thread(s)", cfg.model, ", ".join(names),
                     cfg.num_threads)

    @staticmethod
    def _keyword_lines(cfg: WakeConfig, files: dict[str, Path]) -> tuple[list[str], str]:
        if cfg.keywords:
            lines = [k.strip() if isinstance(k, str) else "" for k in cfg.keywords]
            for i, line in enumerate(lines):
                if not line or "\n" in line or "\r" in line:
                    raise ConfigError(f"wake.keywords[{i}]: expected one keyword as a line of tokens, "
                                      f"got {cfg.keywords[i]!r}")
            return lines, "wake.keywords"
        if "keywords.txt" in files:
            path = Path(files["keywords.txt"])
            try:
                lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as err:
                raise ModelError(f"{path}: cannot read keywords: {err}", code="model.invalid") from None
            if lines:
                return lines, str(path)
        raise ConfigError("wake.keywords: no keywords configured and the model ships no keywords.txt; "
                          "add keywords written as the model's tokens")

    @property
    def words(self) -> list[str]:
        return list(self._triggers)

    def reset(self) -> None:
        if self._closed:
            return
        # A new stream drops buffered audio, features, encoder state and partial hypotheses.
        self._stream = self._kws.create_stream()
        self._origin: int | None = None  # timeline sample where the stream's audio begins
        self._decodes = 0
        for t in self._triggers.values():
            t.reset()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stream = None
            self._kws = None

    def process(self, chunk: AudioChunk) -> list[WakeHit]:
        if self._closed:
            raise StageError("the wake detector is closed", code="wake.closed")
        if chunk.rate != SAMPLE_RATE:
            raise StageError(f"wake: audio must be {SAMPLE_RATE} Hz, got {chunk.rate} Hz", code="wake.rate")
        if len(chunk) == 0:
            return []
        if self._origin is None:
            self._origin = chunk.start
        hits: list[WakeHit] = []
        try:
            self._stream.accept_waveform(SAMPLE_RATE, chunk.float32())
            while self._kws.is_ready(self._stream):
                self._kws.decode_stream(self._stream)
                self._decodes += 1
                name = self._kws.get_result(self._stream)
                if not name:
                    continue
                self._kws.reset_stream(self._stream)
                t = self._decoded_until()
                trigger = self._triggers.get(name)
                if trigger is None:  # sherpa names a keyword by its tokens when it has no @NAME
                    trigger = self._triggers.setdefault(name, Trigger(1.0, REFRACTORY_S))
                if trigger.event(t):
                    _LOGGER.info("wake keyword %s at %.2f s", name, t)
                    hits.append(WakeHit(name, 1.0, t))
        except RuntimeError as err:
            raise StageError(f"wake: keyword spotter failed: {err}") from err
        return hits

    def _decoded_until(self) -> float:
        """Timeline seconds at the end of the audio the last decoded chunk saw.

        Each decode consumes ``decode_chunk_len`` feature frames and looks at ``T`` of them;
        sherpa's reset after a detection keeps that frame count, so it stays on the timeline.
        """
        frames = (self._decodes - 1) * self._shift_frames + self._chunk_frames
        samples = int(round((frames * FRAME_SHIFT_S + 0.015) * SAMPLE_RATE))  # + rest of the 25 ms window
        return ((self._origin or 0) + samples) / SAMPLE_RATE
