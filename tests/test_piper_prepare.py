"""prepare_piper_voice on the real dev voice and on small real ONNX files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edge.errors import ModelError
from edge.models.piper import prepare_piper_voice, read_onnx_metadata


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def voice_json(piper_raw) -> dict:
    return json.loads(piper_raw["json"].read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prepared(piper_raw, tmp_path_factory) -> dict[str, Path]:
    return prepare_piper_voice(piper_raw["onnx"], piper_raw["json"], tmp_path_factory.mktemp("voice"))


def tiny_onnx(path: Path, metadata: dict[str, str] | None = None) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, producer_name="test")
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, path)
    return path


def tiny_json(path: Path, **changes) -> Path:
    config = {"audio": {"sample_rate": 16000}, "espeak": {"voice": "en-gb"}, "num_speakers": 3,
              "phoneme_id_map": {"_": [0], "^": [1], "$": [2], " ": [3], "a": [4], "\n": [5]},
              "inference": {"noise_scale": 0.5, "length_scale": 1.25, "noise_w": 0.7}}
    config.update(changes)
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_writes_model_and_tokens(prepared, piper_raw, voice_json):
    assert set(prepared) == {"model", "tokens"}
    assert prepared["model"].name == "model.onnx" and prepared["tokens"].name == "tokens.txt"
    meta = read_onnx_metadata(prepared["model"])
    assert meta["model_type"] == "vits"
    assert meta["comment"] == "piper"
    assert meta["language"] == "English"
    assert meta["voice"] == voice_json["espeak"]["voice"] == "en-us"
    assert meta["has_espeak"] == "1"
    assert meta["n_speakers"] == str(voice_json["num_speakers"])
    assert meta["sample_rate"] == str(voice_json["audio"]["sample_rate"]) == "22050"
    assert meta["add_blank"] == "0"
    assert float(meta["noise_scale"]) == voice_json["inference"]["noise_scale"]
    assert float(meta["noise_scale_w"]) == voice_json["inference"]["noise_w"]


def test_model_is_the_same_network_with_metadata_added(prepared, piper_raw):
    src = onnx.load(str(piper_raw["onnx"]))
    out = onnx.load(str(prepared["model"]))
    assert out.graph == src.graph
    assert out.opset_import == src.opset_import and out.ir_version == src.ir_version
    keys = [p.key for p in out.metadata_props]
    assert len(keys) == len(set(keys))  # no duplicated keys
    assert {p.key: p.value for p in out.metadata_props} == read_onnx_metadata(prepared["model"])
    onnx.checker.check_model(str(prepared["model"]))
    size_added = prepared["model"].stat().st_size - piper_raw["onnx"].stat().st_size
    assert 0 < size_added < 1000


def test_tokens_match_the_phoneme_id_map(prepared, voice_json):
    lines = prepared["tokens"].read_text(encoding="utf-8").splitlines()
    parsed = {}
    for line in lines:
        sym, ident = (" ", line[1:].strip()) if line.startswith(" ") else line.split(" ")
        parsed[sym] = int(ident)
    expected = {s: ids[0] for s, ids in voice_json["phoneme_id_map"].items() if s != "\n"}
    assert parsed == expected
    ids = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert ids == sorted(ids)


def test_output_is_deterministic_and_idempotent(prepared, piper_raw, tmp_path):
    again = prepare_piper_voice(piper_raw["onnx"], piper_raw["json"], tmp_path / "again")
    assert sha256(again["model"]) == sha256(prepared["model"])
    assert sha256(again["tokens"]) == sha256(prepared["tokens"])
    # Preparing the prepared model replaces our keys instead of adding a second set.
    twice = prepare_piper_voice(prepared["model"], piper_raw["json"], tmp_path / "twice")
    assert sha256(twice["model"]) == sha256(prepared["model"])
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["model.onnx", "tokens.txt"]


def test_existing_metadata_is_replaced_and_others_kept(tmp_path):
    model = tiny_onnx(tmp_path / "v.onnx", {"sample_rate": "8000", "author": "someone", "voice": "xx"})
    out = prepare_piper_voice(model, tiny_json(tmp_path / "v.json"), tmp_path / "out")
    loaded = onnx.load(str(out["model"]))
    pairs = [(p.key, p.value) for p in loaded.metadata_props]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys))
    meta = dict(pairs)
    assert meta["sample_rate"] == "16000" and meta["voice"] == "en-gb" and meta["author"] == "someone"
    assert meta["n_speakers"] == "3" and meta["language"] == "en-gb"
    assert meta["length_scale"] == "1.25" and meta["noise_scale"] == "0.5" and meta["noise_scale_w"] == "0.7"
    assert loaded.graph.node[0].op_type == "Identity"
    assert out["tokens"].read_text(encoding="utf-8") == "_ 0\n^ 1\n$ 2\n  3\na 4\n"


def test_lang_code_and_the_22500_typo(tmp_path):
    model = tiny_onnx(tmp_path / "v.onnx")
    cfg = tiny_json(tmp_path / "v.json", lang_code="cmn", audio={"sample_rate": 22500})
    meta = read_onnx_metadata(prepare_piper_voice(model, cfg, tmp_path / "out")["model"])
    assert meta["voice"] == "cmn" and meta["sample_rate"] == "22050"


# --- bad input: one line, nothing written -------------------------------------------------------

def assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize("missing", ["audio", "espeak", "num_speakers", "phoneme_id_map"])
def test_json_missing_a_key(tmp_path, missing):
    cfg = json.loads(tiny_json(tmp_path / "v.json").read_text())
    del cfg[missing]
    (tmp_path / "v.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as err:
        prepare_piper_voice(tiny_onnx(tmp_path / "v.onnx"), tmp_path / "v.json", tmp_path / "out")
    assert err.value.code == "model.invalid"
    assert missing in str(err.value) and "v.json" in str(err.value) and "\n" not in str(err.value)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("id_map,why", [
    ({"_": [0], "^": [1], "$": [2], "ab": [3]}, "single character"),
    ({"_": [0], "^": [1], "a": [3]}, "lacks"),
    ({"_": [0], "^": [1], "$": [2], "a": ["x"]}, "id"),
    ({}, "empty"),
])
def test_json_with_a_bad_phoneme_map(tmp_path, id_map, why):
    cfg = tiny_json(tmp_path / "v.json", phoneme_id_map=id_map)
    with pytest.raises(ModelError, match=why):
        prepare_piper_voice(tiny_onnx(tmp_path / "v.onnx"), cfg, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_json_that_is_not_json(tmp_path):
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(ModelError, match="v.json"):
        prepare_piper_voice(tiny_onnx(tmp_path / "v.onnx"), tmp_path / "v.json", tmp_path / "out")


def test_not_an_onnx_model(tmp_path, piper_raw):
    cfg = tiny_json(tmp_path / "v.json")
    truncated = tmp_path / "truncated.onnx"
    with open(piper_raw["onnx"], "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model\n" * 10)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(100))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for bad in (truncated, text, gguf, empty):
        with pytest.raises(ModelError) as err:
            prepare_piper_voice(bad, cfg, tmp_path / "out")
        assert err.value.code == "model.invalid"
        assert str(err.value).startswith(str(bad)) and "not an ONNX model" in str(err.value)
        assert_nothing_written(tmp_path / "out")
        with pytest.raises(ModelError):
            read_onnx_metadata(bad)


def test_missing_files(tmp_path):
    with pytest.raises(ModelError) as err:
        prepare_piper_voice(tmp_path / "nope.onnx", tiny_json(tmp_path / "v.json"), tmp_path / "out")
    assert err.value.code == "model.missing"
    with pytest.raises(ModelError) as err:
        prepare_piper_voice(tiny_onnx(tmp_path / "v.onnx"), tmp_path / "nope.json", tmp_path / "out")
    assert err.value.code == "model.missing"
    assert_nothing_written(tmp_path / "out")


def test_replaces_an_earlier_install_in_place(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    (out / "tokens.txt").write_text("old")
    got = prepare_piper_voice(tiny_onnx(tmp_path / "v.onnx"), tiny_json(tmp_path / "v.json"), out)
    assert read_onnx_metadata(got["model"])["comment"] == "piper"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokens.txt"]  # no temp files left
    for path in got.values():
        assert path.stat().st_mode & 0o777 == 0o644  # readable by the service user
