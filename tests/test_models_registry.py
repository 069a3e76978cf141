"""ModelRegistry.resolve: cheap checks at load, verify for the full re-hash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from models_fixtures import file_entry, payload, write_manifest

from edge import paths
from edge.errors import ModelError
from edge.models import ModelRegistry, load_manifest
from edge.models.fetch import Fetcher
from edge.models.manage import verify
from edge.models.store import ModelStore


@pytest.fixture
def installed(tmp_path: Path) -> ModelRegistry:
    """Model "m" installed from a mirror folder by the real fetcher."""
    weights, tokens = payload(20_000, 1), b"a 0\n"
    mirror = tmp_path / "mirror" / "m-dir"
    mirror.mkdir(parents=True)
    (mirror / "w.bin").write_bytes(weights)
    (mirror / "tokens.txt").write_bytes(tokens)
    manifest = load_manifest(write_manifest(tmp_path / "manifest.toml", [{
        "id": "m", "kind": "stt-offline", "licence": "MIT", "dir": "m-dir",
        "file": [file_entry("w.bin", weights, role="encoder"), file_entry("tokens.txt", tokens, role="tokens")],
        "source": [{"type": "mirror"}]}, {
        "id": "other", "kind": "vad", "licence": "MIT", "file": [file_entry("v.onnx", b"v")],
        "source": [{"type": "mirror"}]}]))
    store = ModelStore(tmp_path / "root")
    lines: list[str] = []
    results = Fetcher(store, tmp_path / "cache", mirror=str(tmp_path / "mirror"), say=lines.append).fetch(
        [manifest.model("m")])
    assert [r.action for r in results] == ["installed"]
    return ModelRegistry(tmp_path / "root", manifest)


def test_resolve_gives_paths_by_name_and_role(installed: ModelRegistry) -> None:
    model = installed.resolve("m")
    assert model.id == "m" and model.kind == "stt-offline" and len(model.version) == 12
    assert model.path("encoder") == model.path("w.bin") == model.dir / "w.bin"
    assert model.files == {"w.bin": model.dir / "w.bin", "tokens.txt": model.dir / "tokens.txt"}
    assert model.path("tokens").read_bytes() == b"a 0\n"
    with pytest.raises(ModelError, match="has no file or role 'joiner'"):
        model.path("joiner")


def test_resolve_errors(installed: ModelRegistry) -> None:
    root = installed.root
    with pytest.raises(ModelError) as info:
        installed.resolve("other")
    assert info.value.code == "model.missing"
    assert str(info.value) == (f"model 'other' is not installed in {root}: "
                               f"run `edge-voice models fetch --model other --root {root}`")
    with pytest.raises(ModelError) as info:
        installed.resolve("ghost")
    assert info.value.code == "model.unknown" and "ghost" in str(info.value)


def test_a_touched_file_is_unverified_until_verify_rehashes_it(installed: ModelRegistry) -> None:
    path = installed.resolve("m").path("encoder")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelError) as info:
        installed.resolve("m")
    assert info.value.code == "model.unverified"
    assert "w.bin (modified since install)" in str(info.value)
    assert "edge-voice models fetch --model m" in str(info.value)
    # Same bytes: the full re-hash passes and records the new mtime.
    [result] = verify(ModelStore(installed.root), ["m"])
    assert result.problems == ()
    assert installed.resolve("m").path("encoder") == path


def test_a_changed_byte_is_found(installed: ModelRegistry) -> None:
    path = installed.resolve("m").path("encoder")
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the mtime put back ...
    [result] = verify(ModelStore(installed.root), ["m"])
    assert result.problems == ("w.bin (sha256 mismatch)",)  # ... the re-hash finds it
    with pytest.raises(ModelError, match="not installed"):
        ModelRegistry(installed.root / "elsewhere", installed.manifest).resolve("m")


def test_default_root_is_the_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_VOICE_MODELS_DIR", str(tmp_path / "models"))
    assert ModelRegistry().root == paths.models_dir() == tmp_path / "models"
