"""Build the pipeline's stages from config: resolve model ids, then load each backend.

Models are resolved first, all of them, so that a device missing two models says so in one
line with one fetch command, before anything slow is loaded. Nothing here downloads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from edge.config import Config
from edge.errors import ModelError

_LOGGER = logging.getLogger(__name__)

ROLES = ("wake", "stt", "vad", "llm", "tts")


@dataclass
class Stages:
    wake: Any = None
    recognizer: Any = None
    chat: Any = None
    synth: Any = None
    load_ms: dict[str, float] | None = None

    def close(self) -> None:
        for stage in (self.wake, self.recognizer, self.chat, self.synth):
            close = getattr(stage, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    _LOGGER.exception("closing %s failed", type(stage).__name__)


def resolve_models(cfg: Config, roles: tuple[str, ...] = ROLES) -> dict[str, Any]:
    """Model id → installed model for every role the config uses; one error for all missing."""
    from edge.models.registry import ModelRegistry

    registry = ModelRegistry(cfg.models_dir)
    wanted = {role: mid for role, mid in cfg.model_ids().items() if role in roles}
    found: dict[str, Any] = {}
    missing: list[tuple[str, ModelError]] = []
    for role, model_id in wanted.items():
        try:
            found[role] = registry.resolve(model_id)
        except ModelError as err:
            missing.append((model_id, err))
    if len(missing) == 1:
        raise missing[0][1]
    if missing:
        ids = " ".join(f"--model {mid}" for mid, _ in missing)
        raise ModelError(
            f"models {', '.join(mid for mid, _ in missing)} are not installed and verified in "
            f"{cfg.models_dir}: run `edge-voice models fetch {ids} --root {cfg.models_dir}`",
            code="model.missing")
    return found


def load_stages(cfg: Config, roles: tuple[str, ...] = ROLES) -> Stages:
    models = resolve_models(cfg, roles)
    stages = Stages(load_ms={})
    try:
        if "wake" in models:
            from edge.wake import make_wake_detector

            stages.wake = _timed(stages, "wake", make_wake_detector, cfg.wake, models["wake"].files)
        if "stt" in models:
            from edge.stt import make_recognizer

            vad = models["vad"].files if "vad" in models else None
            stages.recognizer = _timed(stages, "stt", make_recognizer, cfg.stt, models["stt"].files, vad)
        if "llm" in models:
            from edge.llm import make_chat_model

            stages.chat = _timed(stages, "llm", make_chat_model, cfg.llm, _gguf(models["llm"]))
        if "tts" in models:
            from edge.tts import make_synthesizer

            stages.synth = _timed(stages, "tts", make_synthesizer, cfg.tts, models["tts"].files)
    except BaseException:
        stages.close()
        raise
    return stages


def _gguf(model: Any) -> Any:
    for name, path in model.files.items():
        if name.endswith(".gguf"):
            return path
    raise ModelError(f"model {model.id!r} has no .gguf file", code="model.bad")


def _timed(stages: Stages, role: str, fn: Any, *args: Any) -> Any:
    t0 = time.monotonic()
    obj = fn(*args)
    ms = round(1000 * (time.monotonic() - t0), 1)
    assert stages.load_ms is not None
    stages.load_ms[role] = ms
    _LOGGER.info("%s model loaded in %.0f ms", role, ms)
    return obj
