"""End of turn: Smart Turn's features against pipecat's, the real model on real speech, the rule."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edge.cpu import CpuPolicy
from edge.errors import ConfigError, ModelError, StageError
from edge.models.registry import ModelRegistry
from edge.turn import TurnRule, combine, make_turn_detector
from edge.turn.base import TurnDetector
from edge.turn.features import FRAMES, N_MELS, WINDOW_SAMPLES, features, last_window, log_mel


def _signal() -> np.ndarray:
    """A voiced, gliding harmonic tone of 2 s in 2.5 s: deterministic, no random numbers."""
    t = np.arange(int(2.5 * 16000)) / 16000.0
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000.0
    env = np.clip(np.sin(np.pi * t / 2.0), 0, None) ** 2 * (t < 2.0)
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * env * 8000
    return np.round(x).astype(np.int16)


# The same signal through pipecat 1.14.0's own code (smart_turn/_whisper_features.py, which
# matches transformers' WhisperFeatureExtractor to 2.4e-7) and its LocalSmartTurnAnalyzerV3.
PIPECAT = {"sum": 1076.4160070702274, "max": 1.8766168355941772, "min": -0.12338311970233917,
           "at": [(3, 600, 1.710905909538269), (10, 650, 1.5274715423583984), (20, 700, 1.3055332899093628),
                  (30, 620, 1.1925888061523438), (50, 680, -0.12338311970233917)],
           "p": 0.005710512399673462}


@functools.lru_cache(maxsize=1)
def _detector() -> TurnDetector:
    d = make_turn_detector("smart-turn", ModelRegistry().resolve("smart-turn-v3.2").files)
    assert d is not None
    return d


def test_the_features_are_pipecats() -> None:
    x = _signal()
    assert int(np.abs(x.astype(np.int64)).sum()) == 97141596  # the input itself is what pipecat saw
    f = features(x)
    assert f.shape == (1, N_MELS, FRAMES) and f.dtype == np.float32
    assert float(f.astype(np.float64).sum()) == pytest.approx(PIPECAT["sum"], abs=1e-3)
    assert float(f.max()) == pytest.approx(PIPECAT["max"], abs=1e-6)
    assert float(f.min()) == pytest.approx(PIPECAT["min"], abs=1e-6)
    for mel, frame, value in PIPECAT["at"]:
        assert float(f[0, mel, frame]) == pytest.approx(value, abs=1e-5), (mel, frame)


def test_the_window_is_the_last_8_s_padded_in_front() -> None:
    short = np.full(16000, 16384, dtype=np.int16)
    w = last_window(short)
    assert w.shape == (WINDOW_SAMPLES,) and w.dtype == np.float32
    assert not w[:-16000].any() and np.allclose(w[-16000:], 0.5)
    long = np.arange(10 * 16000, dtype=np.float32) / 1e6
    assert np.array_equal(last_window(long), long[-WINDOW_SAMPLES:])
    with pytest.raises(ValueError):
        log_mel(np.zeros(100, np.float32))


def test_smart_turn_gives_pipecats_probability() -> None:
    assert _detector().complete_probability(_signal()) == pytest.approx(PIPECAT["p"], abs=2e-3)


def test_smart_turn_hears_a_finished_question_and_an_unfinished_one() -> None:
    from edge.devtools.turn_set import piper_voice  # the dev voice, deterministic

    speak = piper_voice()
    pad = np.zeros(4800, np.int16)
    d = _detector()
    done = d.complete_probability(np.concatenate([pad, speak("What time does the museum open?"), pad[:3200]]))
    unfinished = d.complete_probability(np.concatenate([pad, speak("What time does the, um,"), pad[:3200]]))
    print(f"complete {done:.3f}, unfinished {unfinished:.3f}, {1000 * getattr(d, 'last_s', 0):.0f} ms a call")
    assert done > 0.5 > unfinished


class _Watch(CpuPolicy):
    """A CPU policy that records whether another stage computed during each report."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[bool] = []

    @contextmanager
    def computing(self) -> Iterator[None]:
        with super().computing():
            self.reports.append(self.others_busy)
            yield


def test_smart_turn_tells_the_cpu_policy_while_it_computes() -> None:
    cpu = _Watch()
    d = make_turn_detector("smart-turn", ModelRegistry().resolve("smart-turn-v3.2").files, cpu=cpu)
    assert d is not None
    d.complete_probability(np.zeros(8000, np.int16))
    assert cpu.reports == [True] and not cpu.others_busy
    d.close()
    with pytest.raises(StageError) as err:
        d.complete_probability(np.zeros(8000, np.int16))
    assert err.value.code == "turn.closed"


def test_a_bad_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        make_turn_detector("smart-turn", {"smart-turn-v3.2-cpu.onnx": tmp_path / "gone.onnx"})
    assert err.value.code == "model.missing" and "gone.onnx" in str(err.value)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError) as err:
        make_turn_detector("smart-turn", {"junk.onnx": junk})
    assert err.value.code == "model.invalid" and "junk.onnx" in str(err.value)
    vad = ModelRegistry().resolve("silero-vad").files  # a real ONNX model of another shape
    with pytest.raises(ModelError) as err:
        make_turn_detector("smart-turn", vad)
    assert err.value.code == "model.invalid" and "Smart Turn" in str(err.value)
    with pytest.raises(ModelError):
        make_turn_detector("smart-turn", {})
    with pytest.raises(ConfigError):
        make_turn_detector("vad-only", {})
    assert make_turn_detector("none") is None


def test_the_rule_ends_now_waits_or_falls_back() -> None:
    rule = TurnRule(complete_at=0.7, incomplete_below=0.2, silence_s=0.6, max_silence_s=1.6,
                    weights={"audio": 1.0, "text": 1.0})
    assert rule.silence_needed({"audio": 0.9, "text": 0.9}) == 0.0
    assert rule.silence_needed({"audio": 0.05, "text": 0.1}) == 1.6
    assert rule.silence_needed({"audio": 0.5, "text": 0.5}) == 0.6
    assert rule.silence_needed({}) == 0.6  # no view: today's fixed silence
    assert rule.silence_needed({"other": 0.99}) == 0.6  # a view the rule does not weigh
    # One confident view is not washed out by an unsure one (log-odds, not probabilities).
    assert combine({"audio": 0.99, "text": 0.5}, {"audio": 1.0, "text": 1.0}) == pytest.approx(0.909, abs=1e-3)
    assert combine({"audio": 0.9}, {"text": 1.0}) == 0.5
    with pytest.raises(ValueError):
        TurnRule(complete_at=0.3, incomplete_below=0.5)
    with pytest.raises(ValueError):
        TurnRule(silence_s=2.0, max_silence_s=1.0)
