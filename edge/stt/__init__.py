"""Speech-to-text: the factory that builds a :class:`~edge.stt.base.Recognizer` from config.

Two sherpa-onnx engines sit behind one interface:

- ``streaming`` (:mod:`edge.stt.streaming`): ``OnlineRecognizer`` with a streaming transducer,
  Paraformer or NeMo CTC model; partials come from the running decode, the endpoint from
  sherpa-onnx's trailing-silence rules.
- ``vad-offline`` (:mod:`edge.stt.vad`): silero VAD cuts the speech, an ``OfflineRecognizer``
  (Whisper, Moonshine, SenseVoice) decodes it; partials re-decode the growing segment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edge.cpu import CpuPolicy
from edge.errors import ConfigError
from edge.stt.base import Recognizer, SttUpdate, UpdateKind

if TYPE_CHECKING:
    from edge.config import SttConfig

__all__ = ["Recognizer", "SttUpdate", "UpdateKind", "make_recognizer"]


def make_recognizer(cfg: SttConfig, model_dir_files: Mapping[str, Path],
                    vad_files: Mapping[str, Path] | None = None, *,
                    model_type: str | None = None, cpu: CpuPolicy | None = None,
                    max_silence_s: float | None = None) -> Recognizer:
    """Build the recognizer ``cfg.engine`` names from installed model files.

    ``model_dir_files`` (and ``vad_files``) map the model's file names to installed paths. The
    model kind is read from the file names and ONNX metadata unless ``model_type`` names it
    (transducer, paraformer, nemo_ctc, whisper, moonshine, sense_voice). Every file is checked
    before sherpa-onnx sees it; a bad one raises ModelError naming the file and what is wrong.
    ``cpu`` is the pipeline's CPU policy, told when a decode computes. ``max_silence_s``: the
    longest silence an end-of-turn decision may give a turn (``set_endpoint``).
    """
    from edge.stt.files import identify_stt_model, identify_vad_model

    cpu = cpu or CpuPolicy()
    model = identify_stt_model(model_dir_files, model_type)
    if cfg.engine == "streaming":
        if not model.streaming:
            raise ConfigError(f"stt.engine is 'streaming' but stt.model {cfg.model or '?'!r} is an "
                              f"offline {model.kind} model: set stt.engine = \"vad-offline\" or pick "
                              "a streaming model")
        from edge.stt.streaming import StreamingRecognizer

        return StreamingRecognizer(cfg, model, cpu, max_silence_s=max_silence_s)
    if model.streaming:
        raise ConfigError(f"stt.engine is 'vad-offline' but stt.model {cfg.model or '?'!r} is a "
                          f"streaming {model.kind} model: set stt.engine = \"streaming\" or pick an "
                          "offline model (Whisper, Moonshine, SenseVoice)")
    if not vad_files:
        raise ConfigError("stt.engine 'vad-offline' needs a VAD model: set stt.vad_model "
                          "(e.g. \"silero-vad\") and install it with `edge-voice models`")
    vad_path = identify_vad_model(vad_files)
    from edge.stt.vad import VadOfflineRecognizer

    return VadOfflineRecognizer(cfg, model, vad_path, cpu, max_silence_s=max_silence_s)
