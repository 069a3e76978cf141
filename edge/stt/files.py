"""Speech-to-text model files: what kind of model they are, and whether sherpa-onnx can load them.

sherpa-onnx ends the whole process (status 255, no exception) when a model lacks metadata it
expects, has the wrong inputs, or a tokens file lacks the blank symbol. So before a file goes
near sherpa-onnx, this module reads each ONNX file's header — IR version, metadata, graph
input and output names — with a small protobuf scanner that seeks over the weights (no
onnx/onnxruntime needed, milliseconds even for a 90 MB decoder), and checks the keys that
sherpa-onnx's loader for that model type reads. The required keys mirror sherpa-onnx 2.0.x's
``sherpa-onnx/csrc/*-model.cc``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import ModelError
from edge.onnxmeta import OnnxInfo, read_onnx_info

_LOGGER = logging.getLogger(__name__)

# onnxruntime 1.2x (bundled with sherpa-onnx 2.0.x) reads up to IR 13; recent `onnx` writes 14.
MAX_IR_VERSION = 13

# kind -> is it a streaming (OnlineRecognizer) model
KINDS: dict[str, bool] = {
    "transducer": True,
    "paraformer": True,
    "nemo_ctc": True,
    "whisper": False,
    "moonshine": False,
    "sense_voice": False,
}

_NEMO_CTC_KEYS = ("window_size", "chunk_shift", "subsampling_factor", "vocab_size",
                  "cache_last_channel_dim1", "cache_last_channel_dim2", "cache_last_channel_dim3",
                  "cache_last_time_dim1", "cache_last_time_dim2", "cache_last_time_dim3")
_WHISPER_KEYS = ("n_mels", "n_text_layer", "n_text_ctx", "n_text_state", "n_vocab", "sot", "eot",
                 "blank_id", "translate", "transcribe", "is_multilingual", "no_timestamps",
                 "no_speech", "sot_sequence")
_WHISPER_MULTILINGUAL_KEYS = ("all_language_tokens", "all_language_codes")
_PARAFORMER_KEYS = ("vocab_size", "lfr_window_size", "lfr_window_shift", "encoder_output_size",
                    "decoder_num_blocks", "decoder_kernel_size", "neg_mean", "inv_stddev")
_SENSE_VOICE_KEYS = ("vocab_size", "lfr_window_size", "lfr_window_shift", "normalize_samples",
                     "with_itn", "without_itn", "lang_auto", "lang_zh", "lang_en", "lang_ja",
                     "lang_ko", "lang_yue", "neg_mean", "inv_stddev")
# Streaming transducer encoders, by their model_type metadata. Other types sherpa-onnx knows
# (conformer, lstm, ebranchformer) are checked for model_type and the decoder keys only.
_TRANSDUCER_ENCODER_KEYS: dict[str, tuple[str, ...]] = {
    "zipformer2": ("encoder_dims", "query_head_dims", "value_head_dims", "num_heads",
                   "num_encoder_layers", "cnn_module_kernels", "left_context_len", "T",
                   "decode_chunk_len"),
    "zipformer": ("encoder_dims", "attention_dims", "num_encoder_layers", "cnn_module_kernels",
                  "left_context_len", "T", "decode_chunk_len"),
    "conformer": (),
    "lstm": (),
    "ebranchformer": (),
}
_TRANSDUCER_DECODER_KEYS = ("vocab_size", "context_size")
# Integer-list keys: sherpa-onnx parses them with atoi and misbehaves on garbage.
_FLOAT_LIST_KEYS = {"neg_mean", "inv_stddev"}
_STRING_KEYS = {"all_language_codes", "model_type"}
_CTC_BLANKS = ("<blk>", "<eps>", "<blank>")


@dataclass(frozen=True)
class SttModel:
    """A recognised speech-to-text model: its kind and its files by role."""

    kind: str
    files: dict[str, Path]  # role -> path: tokens, model | encoder, decoder, joiner | ...
    # Metadata of the encoder or the single model file.
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def streaming(self) -> bool:
        return KINDS[self.kind]


# --- checks ----------------------------------------------------------------------------------

def _require_keys(path: Path, info: OnnxInfo, keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if key not in info.metadata:
            raise ModelError(f"{path}: metadata key {key!r} is missing, which sherpa-onnx needs for "
                             f"a {what} model: re-export it with sherpa-onnx's export script",
                             code="model.invalid")
        value = info.metadata[key].strip()
        if key in _STRING_KEYS:
            continue
        parts = [p for p in value.split(",") if p.strip()] if "," in value else [value]
        try:
            for p in parts:
                float(p) if key in _FLOAT_LIST_KEYS else int(p)
        except ValueError:
            raise ModelError(f"{path}: metadata key {key!r} has the value {value[:40]!r}, which is "
                             "not a number list sherpa-onnx can read", code="model.invalid") from None


def _check_ir(path: Path, info: OnnxInfo) -> None:
    if info.ir_version > MAX_IR_VERSION:
        raise ModelError(f"{path} was written with ONNX IR version {info.ir_version}; sherpa-onnx's "
                         f"runtime reads up to {MAX_IR_VERSION}: re-save it with "
                         f"model.ir_version = {MAX_IR_VERSION} or lower", code="model.invalid")


def read_tokens(path: Path) -> dict[str, int]:
    """A sherpa-onnx ``tokens.txt``: one ``symbol id`` per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"speech-to-text tokens file {path} is missing: reinstall the model with "
                         "`edge-voice models`", code="model.missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"cannot read tokens file {path}: {err}", code="model.unreadable") from None
    tokens: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        sym, _, idx = line.rstrip("\n").rpartition(" ")
        if not idx.strip().lstrip("-").isdigit():
            # Whisper-style token files carry base64 symbols and ids; one column is an error.
            raise ModelError(f"{path}:{n}: expected 'symbol id', got {line[:40]!r}",
                             code="model.invalid")
        tokens[sym if sym else " "] = int(idx)
    if not tokens:
        raise ModelError(f"tokens file {path} is empty: reinstall the model", code="model.invalid")
    return tokens


def _pick(names: Mapping[str, Path], *, has: str, lacks: tuple[str, ...] = (),
          suffix: str = ".onnx") -> Path | None:
    """The file whose name contains ``has``; an int8 variant wins over a float one."""
    hits = [n for n in names if has in n and n.endswith(suffix) and not any(x in n for x in lacks)]
    if len(hits) > 1:
        int8 = [n for n in hits if "int8" in n]
        hits = int8 if int8 else hits
    if len(hits) > 1:
        raise ModelError(f"several files could be the {has} ({', '.join(sorted(hits))}): the model "
                         "entry should list one", code="model.invalid")
    return names[hits[0]] if hits else None


def _guess_kind(names: Mapping[str, Path]) -> str:
    if _pick(names, has="preprocess") and _pick(names, has="cached_decode", lacks=("uncached",)):
        return "moonshine"
    if _pick(names, has="joiner"):
        return "transducer"
    encoder = _pick(names, has="encoder")
    if encoder and _pick(names, has="decoder"):
        meta = read_onnx_info(encoder).metadata
        if "n_text_layer" in meta or meta.get("model_type", "").startswith("whisper"):
            return "whisper"
        if "lfr_window_size" in meta:
            return "paraformer"
        raise ModelError(f"{encoder}: cannot tell whether this encoder/decoder pair is Whisper or "
                         "Paraformer from its metadata: set the model type explicitly",
                         code="model.unsupported")
    onnx_files = [n for n in names if n.endswith(".onnx")]
    if len(onnx_files) == 1:
        meta = read_onnx_info(names[onnx_files[0]]).metadata
        if "cache_last_channel_dim1" in meta or "window_size" in meta:
            return "nemo_ctc"
        if "with_itn" in meta or "lang_auto" in meta:
            return "sense_voice"
        raise ModelError(f"{names[onnx_files[0]]}: its metadata matches no supported speech-to-text "
                         "model (streaming NeMo CTC, SenseVoice)", code="model.unsupported")
    raise ModelError("speech-to-text model files " + ", ".join(sorted(names)) + " match no supported "
                     "layout (transducer encoder/decoder/joiner, Whisper or Paraformer "
                     "encoder/decoder, one NeMo CTC or SenseVoice model.onnx, Moonshine)",
                     code="model.unsupported")


def identify_stt_model(files: Mapping[str, Path], kind: str | None = None) -> SttModel:
    """Work out the model kind from the file names (or take ``kind``) and check its files.

    ``files`` maps file names (as in the model registry) to installed paths.
    """
    names = {Path(k).name: Path(v) for k, v in files.items()}
    if kind is not None and kind not in KINDS:
        raise ModelError(f"unknown speech-to-text model type {kind!r} (known: {', '.join(KINDS)})",
                         code="model.unsupported")
    kind = kind or _guess_kind(names)
    tokens = _pick(names, has="tokens", suffix=".txt")
    if tokens is None:
        raise ModelError(f"the {kind} speech-to-text model has no tokens file (*tokens.txt) among "
                         f"{', '.join(sorted(names))}", code="model.missing")
    layouts: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
        "transducer": {"encoder": ("encoder", ()), "decoder": ("decoder", ()), "joiner": ("joiner", ())},
        "paraformer": {"encoder": ("encoder", ()), "decoder": ("decoder", ())},
        "whisper": {"encoder": ("encoder", ()), "decoder": ("decoder", ())},
        "moonshine": {"preprocessor": ("preprocess", ()), "encoder": ("encode", ("uncached", "cached")),
                      "uncached_decoder": ("uncached_decode", ()),
                      "cached_decoder": ("cached_decode", ("uncached",))},
        "nemo_ctc": {"model": ("", ())},
        "sense_voice": {"model": ("", ())},
    }
    roles = layouts[kind]
    paths: dict[str, Path] = {"tokens": tokens}
    for role, (has, lacks) in roles.items():
        p = _pick(names, has=has, lacks=lacks)
        if p is None:
            raise ModelError(f"the {kind} speech-to-text model has no {role} file among "
                             f"{', '.join(sorted(names))}", code="model.missing")
        paths[role] = p
    infos = {role: read_onnx_info(p) for role, p in paths.items() if role != "tokens"}
    for role, info in infos.items():
        _check_ir(paths[role], info)
    main = infos.get("encoder") or infos.get("model") or next(iter(infos.values()))
    _check_metadata(kind, paths, infos)
    token_table = read_tokens(tokens)
    if kind == "nemo_ctc":
        if not any(b in token_table for b in _CTC_BLANKS):
            raise ModelError(f"{tokens}: a CTC model's tokens need a blank symbol "
                             f"({', '.join(_CTC_BLANKS)})", code="model.invalid")
        vocab = int(main.metadata["vocab_size"]) + 1  # NeMo leaves the blank out of vocab_size
        if max(token_table.values()) >= vocab:
            raise ModelError(f"{tokens} has ids up to {max(token_table.values())} but "
                             f"{paths['model']} outputs {vocab} classes: tokens and model do not "
                             "belong together", code="model.invalid")
    _LOGGER.debug("speech-to-text model %s: %s", kind, {k: str(v) for k, v in paths.items()})
    return SttModel(kind, paths, dict(main.metadata))


def _check_metadata(kind: str, paths: dict[str, Path], infos: dict[str, OnnxInfo]) -> None:
    if kind == "nemo_ctc":
        _require_keys(paths["model"], infos["model"], _NEMO_CTC_KEYS, "streaming NeMo CTC")
        info = infos["model"]
        if len(info.inputs) != 5 or len(info.outputs) != 5:
            raise ModelError(f"{paths['model']}: a streaming NeMo CTC model has 5 inputs and 5 "
                             f"outputs (features, length, 3 caches; log-probs, length, 3 caches), "
                             f"this one has {len(info.inputs)} and {len(info.outputs)}",
                             code="model.invalid")
    elif kind == "whisper":
        info = infos["encoder"]
        _require_keys(paths["encoder"], info, _WHISPER_KEYS, "Whisper")
        if info.metadata["is_multilingual"].strip() not in ("", "0"):
            _require_keys(paths["encoder"], info, _WHISPER_MULTILINGUAL_KEYS, "multilingual Whisper")
    elif kind == "paraformer":
        _require_keys(paths["encoder"], infos["encoder"], _PARAFORMER_KEYS, "Paraformer")
    elif kind == "sense_voice":
        _require_keys(paths["model"], infos["model"], _SENSE_VOICE_KEYS, "SenseVoice")
    elif kind == "transducer":
        enc = infos["encoder"]
        _require_keys(paths["encoder"], enc, ("model_type",), "streaming transducer")
        model_type = enc.metadata["model_type"]
        if model_type not in _TRANSDUCER_ENCODER_KEYS:
            raise ModelError(f"{paths['encoder']}: model_type {model_type!r} is not a streaming "
                             f"transducer sherpa-onnx knows ({', '.join(_TRANSDUCER_ENCODER_KEYS)})",
                             code="model.unsupported")
        _require_keys(paths["encoder"], enc, _TRANSDUCER_ENCODER_KEYS[model_type],
                      f"{model_type} transducer")
        _require_keys(paths["decoder"], infos["decoder"], _TRANSDUCER_DECODER_KEYS, "transducer")


# silero VAD layouts sherpa-onnx accepts: v5 (input, state, sr) and v4 (input, sr, h, c).
_SILERO_LAYOUTS = {
    (("input", "state", "sr"), ("output", "stateN")),
    (("input", "sr", "h", "c"), ("output", "hn", "cn")),
}


def identify_vad_model(files: Mapping[str, Path]) -> Path:
    """The silero VAD ONNX file among ``files``, checked for the layout sherpa-onnx runs."""
    names = {Path(k).name: Path(v) for k, v in files.items()}
    path = _pick(names, has="")
    if path is None:
        raise ModelError("the VAD model has no .onnx file among " + ", ".join(sorted(names)),
                         code="model.missing")
    info = read_onnx_info(path)
    _check_ir(path, info)
    if (info.inputs, info.outputs) not in _SILERO_LAYOUTS:
        raise ModelError(f"{path} is not a silero VAD model sherpa-onnx can run (inputs "
                         f"{', '.join(info.inputs) or 'none'}; expected input, state, sr for v5 or "
                         "input, sr, h, c for v4)", code="model.invalid")
    return path
