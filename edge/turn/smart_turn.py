"""pipecat's Smart Turn v3 (a Whisper-tiny encoder with a classifier head) on onnxruntime.

The features are computed in NumPy exactly as pipecat computes them (:mod:`edge.turn.features`);
the model reads the last 8 s of the turn and gives P(complete). One call is one encoder pass over
8 s of audio whatever the turn's length: ~60 ms on one x86 core here, 80-140 ms on a Pi-class
core, so it runs once per pause on the caller's worker thread, never per chunk, and reports to
the CPU policy while it computes (the LLM leaves it a core).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.cpu import CpuPolicy
from edge.errors import MissingDependency, ModelError, StageError
from edge.turn.features import FRAMES, N_MELS, WINDOW_S, features

_LOGGER = logging.getLogger(__name__)

INPUT = "input_features"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


class SmartTurnDetector:
    """``TurnDetector`` over a Smart Turn v3.x ONNX file (input ``input_features`` (batch, 80, 800))."""

    window_s = float(WINDOW_S)

    def __init__(self, model_path: Path, *, threads: int = 1, cpu: CpuPolicy | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependency.for_module("onnxruntime", "wake") from None
        self.path = Path(model_path)
        self._cpu = cpu or CpuPolicy()
        if not self.path.is_file():
            raise ModelError(f"{self.path}: Smart Turn model file not found; install it with "
                             "`edge-voice models fetch --model smart-turn-v3.2`", code="model.missing")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # A worker that spins between calls would hold a core the LLM wants.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self._sess: Any = ort.InferenceSession(str(self.path), sess_options=opts,
                                                   providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises several unrelated types for a bad file
            raise ModelError(f"{self.path}: not a usable ONNX model ({_first_line(err)}); re-install it "
                             "with `edge-voice models fetch --model smart-turn-v3.2`", code="model.invalid") from None
        self._check_shapes()
        self._closed = False
        self.last_s = 0.0  # wall seconds of the last call, features included
        _LOGGER.info("end of turn: Smart Turn %s on %d thread(s)", self.path.name, threads)

    def _wrong(self, why: str) -> ModelError:
        return ModelError(f"{self.path}: not a Smart Turn v3 model: {why}", code="model.invalid")

    def _check_shapes(self) -> None:
        inputs, outputs = self._sess.get_inputs(), self._sess.get_outputs()
        if len(inputs) != 1 or inputs[0].name != INPUT or list(inputs[0].shape)[1:] != [N_MELS, FRAMES]:
            got = [(i.name, list(i.shape)) for i in inputs]
            raise self._wrong(f"expected one input {INPUT!r} of shape (batch, {N_MELS}, {FRAMES}), it has {got}")
        if len(outputs) != 1 or list(outputs[0].shape)[1:] != [1]:
            raise self._wrong(f"expected one output of shape (batch, 1), it has {[list(o.shape) for o in outputs]}")

    def complete_probability(self, audio16k: np.ndarray) -> float:
        if self._closed:
            raise StageError("the end-of-turn model is closed", code="turn.closed")
        t0 = time.perf_counter()
        with self._cpu.computing():
            x = features(audio16k)
            try:
                out = self._sess.run(None, {INPUT: x})[0]
            except Exception as err:
                raise StageError(f"Smart Turn failed: {_first_line(err)}", code="turn.run") from None
        self.last_s = time.perf_counter() - t0
        # The exported graph ends in a sigmoid: its "logits" are already probabilities.
        return float(np.clip(np.asarray(out).reshape(-1)[0], 0.0, 1.0))

    def close(self) -> None:
        self._closed = True
        self._sess = None
