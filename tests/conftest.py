"""Shared test fixtures: where the real dev-profile models are.

TEMPORARY: until the model registry lands, raw dev model files are read from
$EDGE_VOICE_RAW_MODELS (a folder with the files extracted from their PyPI wheels) and the
shared mirror beside the checkout. This will switch to the installed dev profile.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "models"


def _raw(name: str) -> Path:
    base = Path(os.environ.get("EDGE_VOICE_RAW_MODELS", "/nonexistent"))
    p = base / name
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def whisper_paths() -> dict[str, Path]:
    d = MIRROR / "whisper-tiny.en"
    return {
        "encoder": d / "tiny.en-encoder.int8.onnx",
        "decoder": d / "tiny.en-decoder.int8.onnx",
        "tokens": d / "tiny.en-tokens.txt",
    }


@pytest.fixture(scope="session")
def wake_dir() -> Path:
    return MIRROR / "openwakeword"


@pytest.fixture(scope="session")
def silero_vad_path() -> Path:
    return _raw("silero_vad.onnx")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _raw("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def piper_raw() -> dict[str, Path]:
    return {"onnx": _raw("en_US-joe-medium.onnx"), "json": _raw("en_US-joe-medium.onnx.json")}
