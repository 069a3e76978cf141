"""End of turn: has the visitor finished the sentence, or only paused?

- :mod:`edge.turn.base`: the :class:`TurnDetector` protocol and the :class:`TurnRule` that turns
  the views' probabilities into the silence after which the turn ends;
- :mod:`edge.turn.smart_turn`: pipecat's Smart Turn v3 (audio only) on onnxruntime, with
  :mod:`edge.turn.features` computing its Whisper log-mel input in NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from edge.cpu import CpuPolicy
from edge.errors import ConfigError, ModelError
from edge.turn.base import TurnDetector, TurnRule, combine

__all__ = ["TurnDetector", "TurnRule", "combine", "make_turn_detector", "DETECTORS"]

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
