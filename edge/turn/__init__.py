"""End of turn: has the visitor finished the sentence, or only paused?

- :mod:`edge.turn.base`: the :class:`TurnDetector` protocol and the :class:`TurnRule` that turns
  the views' probabilities into the silence after which the turn ends;
- :mod:`edge.turn.smart_turn`: pipecat's Smart Turn v3 (audio only) on onnxruntime, with
  :mod:`edge.turn.features` computing its Whisper log-mel input in NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edge.cpu import CpuPolicy
from edge.errors import ConfigError, ModelError
from edge.turn.base import TurnDetector, TurnRule, combine

if TYPE_CHECKING:
    from edge.config import Config

__all__ = ["TurnDetector", "TurnRule", "combine", "make_turn_detector", "rule_from_config", "DETECTORS"]

DETECTORS = ("none", "smart-turn")


def make_turn_detector(detector: str, files: Mapping[str, Path] | None = None, *, threads: int = 1,
                       cpu: CpuPolicy | None = None) -> TurnDetector | None:
    """Build the audio end-of-turn detector ``detector`` names ("none": None).

    ``files`` maps the installed model's file names to paths (``ModelRegistry.resolve(id).files``).
    """
    if detector == "none":
        return None
    if detector == "smart-turn":
        onnx = [p for name, p in (files or {}).items() if name.endswith(".onnx")]
        if len(onnx) != 1:
            raise ModelError("the Smart Turn model must be one .onnx file; install it with "
                             "`edge-voice models fetch --model smart-turn-v3.2`", code="model.missing")
        from edge.turn.smart_turn import SmartTurnDetector

        return SmartTurnDetector(onnx[0], threads=threads, cpu=cpu)
    raise ConfigError(f"turn.detector: {detector!r} is not one of {', '.join(DETECTORS)}")


def rule_from_config(cfg: Config) -> TurnRule | None:
    """The end-of-turn rule of ``[turn]`` (the fixed ``stt.endpoint_silence_s`` as the fallback),
    or None when the turn is ended by the fixed silence alone."""
    t = cfg.turn
    weights = {"text": t.llm_weight if t.llm_view else 0.0,
               "audio": t.audio_weight if t.detector != "none" else 0.0}
    if not t.enabled or not any(weights.values()) or not 0 < cfg.stt.pause_s < cfg.stt.endpoint_silence_s:
        return None
    return TurnRule(complete_at=t.complete_at, incomplete_below=t.incomplete_below,
                    silence_s=cfg.stt.endpoint_silence_s,
                    max_silence_s=max(t.max_silence_s, cfg.stt.endpoint_silence_s), weights=weights)
