"""Turn a Piper voice (``<voice>.onnx`` + ``<voice>.onnx.json``) into what sherpa-onnx loads.

sherpa-onnx reads a VITS voice's settings from the ONNX model's metadata (``metadata_props``)
and its symbol table from ``tokens.txt``; a Piper release keeps both in the JSON file beside
the model. This step writes ``model.onnx`` (the model plus that metadata) and ``tokens.txt``.

The model is not parsed with the ``onnx`` package: on a Pi that would hold the whole 60+ MB
protobuf in memory twice and make ``onnx`` a device dependency. ``metadata_props`` is the
repeated field 14 of ``ModelProto``, and a protobuf parser appends repeated entries in the
order it meets them wherever they sit in the message, so the model is stream-copied with its
own entries for our keys left out and ours appended at the end. Same input, same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from edge.errors import ModelError
from edge.models.store import fsync_dir
from edge.onnxmeta import read_onnx_metadata  # noqa: F401  (re-exported)

_LOGGER = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENS_FILE = "tokens.txt"

# ModelProto field numbers (onnx.proto3); a file with any other top-level field is not ONNX.
_MODEL_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 25}
_IR_VERSION, _GRAPH, _OPSET_IMPORT, _METADATA_PROPS = 1, 7, 8, 14
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_MAX_ENTRY = 1 << 20  # a metadata entry larger than this is not a setting
_COPY_BLOCK = 1 << 20

# What sherpa-onnx's VITS loader reads without a default; it exits the process (no
# exception) when one of these is missing.
REQUIRED_VITS_KEYS = ("sample_rate", "n_speakers", "language", "comment")


@dataclass(frozen=True)
class _Field:
    number: int
    start: int  # offset of the tag
    end: int  # offset just past the value
    value: bytes | None = None  # the payload, kept only for metadata entries


def _read_varint(f: BinaryIO, what: str) -> int:
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError(f"file ends inside {what}")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError(f"malformed varint in {what}")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _WIRE_LEN) + _encode_varint(len(payload)) + payload


def _scan_model(f: BinaryIO, size: int) -> list[_Field]:
    """The top-level fields of a ModelProto, without reading the graph into memory."""
    fields: list[_Field] = []
    pos = f.seek(0)
    while pos < size:
        tag = _read_varint(f, "a field tag")
        number, wire = tag >> 3, tag & 7
        if number not in _MODEL_FIELDS:
            raise ValueError(f"unexpected top-level field {number} at byte {pos}")
        payload: bytes | None = None
        if wire == _WIRE_VARINT:
            _read_varint(f, f"field {number}")
        elif wire == _WIRE_I64:
            f.seek(8, os.SEEK_CUR)
        elif wire == _WIRE_I32:
            f.seek(4, os.SEEK_CUR)
        elif wire == _WIRE_LEN:
            length = _read_varint(f, f"the length of field {number}")
            if number == _METADATA_PROPS:
                if length > _MAX_ENTRY:
                    raise ValueError(f"metadata entry of {length} bytes at byte {pos}")
                payload = f.read(length)
                if len(payload) != length:
                    raise ValueError("file ends inside a metadata entry")
            else:
                f.seek(length, os.SEEK_CUR)
        else:
            raise ValueError(f"unsupported wire type {wire} at byte {pos}")
        end = f.tell()
        if end > size:
            raise ValueError(f"field {number} runs past the end of the file (truncated?)")
        fields.append(_Field(number, pos, end, payload))
        pos = end
    numbers = {x.number for x in fields}
    for needed, name in ((_IR_VERSION, "ir_version"), (_GRAPH, "graph"), (_OPSET_IMPORT, "opset_import")):
        if needed not in numbers:
            raise ValueError(f"no {name}")
    return fields


def _decode_entry(payload: bytes) -> tuple[str, str]:
    """A StringStringEntryProto: key is field 1, value field 2."""
    out = {1: b"", 2: b""}
    i = 0
    while i < len(payload):
        tag, i = _varint_at(payload, i)
        number, wire = tag >> 3, tag & 7
        if wire != _WIRE_LEN:
            raise ValueError("malformed metadata entry")
        length, i = _varint_at(payload, i)
        if i + length > len(payload):
            raise ValueError("malformed metadata entry")
        if number in out:
            out[number] = payload[i:i + length]
        i += length
    return out[1].decode("utf-8", "replace"), out[2].decode("utf-8", "replace")


def _varint_at(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("malformed varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _encode_entry(key: str, value: str) -> bytes:
    return _len_field(_METADATA_PROPS, _len_field(1, key.encode()) + _len_field(2, value.encode()))


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def piper_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The metadata sherpa-onnx needs for a Piper voice, from the voice's JSON config.

    Keys follow sherpa-onnx's ``scripts/piper/add_meta_data.py``; the inference scales are
    kept too (sherpa does not read them; our synthesizer passes them to sherpa).
    """
    sample_rate = int(config["audio"]["sample_rate"])
    if sample_rate == 22500:  # a known typo in a few Piper releases
        sample_rate = 22050
    voice = config.get("lang_code") or config["espeak"]["voice"]
    language = config.get("language") or {}
    lang_name = (language.get("name_english") if isinstance(language, dict) else None) or str(voice)
    inference = config.get("inference") or {}
    meta: dict[str, Any] = {
        "model_type": "vits",
        "comment": "piper",  # sherpa-onnx treats the model as Piper's because of this word
        "language": lang_name,
        "voice": voice,
        "has_espeak": 1,
        "n_speakers": int(config["num_speakers"]),
        "sample_rate": sample_rate,
        # Piper's own ids already intersperse the pad symbol; sherpa must not add blanks.
        "add_blank": 0,
        "punctuation": " ".join(sorted(p for p in ";:,.!?¡¿—…\"«»“”()" if p in config["phoneme_id_map"])),
        "noise_scale": float(inference.get("noise_scale", 0.667)),
        "length_scale": float(inference.get("length_scale", 1.0)),
        "noise_scale_w": float(inference.get("noise_w", 0.8)),
    }
    return {k: _fmt(v) for k, v in meta.items()}


def piper_tokens(config: dict[str, Any]) -> list[tuple[str, int]]:
    """``(symbol, id)`` pairs for tokens.txt, in id order.

    sherpa-onnx reads one symbol of exactly one character per line and exits the process on
    anything else, so such entries are rejected (or, for whitespace it cannot read, skipped).
    """
    id_map = config["phoneme_id_map"]
    if not isinstance(id_map, dict) or not id_map:
        raise ValueError("phoneme_id_map is empty or not an object")
    out: list[tuple[str, int]] = []
    for symbol, ids in id_map.items():
        if isinstance(ids, list):
            ids = ids[0] if ids else None
        if isinstance(ids, bool) or not isinstance(ids, int) or ids < 0:
            raise ValueError(f"phoneme_id_map[{symbol!r}] is not a non-negative id")
        if len(symbol) != 1:
            raise ValueError(f"phoneme_id_map key {symbol!r} is not a single character")
        if symbol.isspace() and symbol != " ":
            continue  # "\n" and friends: sherpa's reader cannot hold them, espeak never emits them
        out.append((symbol, ids))
    missing = [s for s in "_^$" if s not in {sym for sym, _ in out}]
    if missing:
        raise ValueError(f"phoneme_id_map lacks the pad/start/end symbols {' '.join(missing)}")
    return sorted(out, key=lambda p: (p[1], p[0]))


def _load_config(json_path: Path) -> tuple[dict[str, str], list[tuple[str, int]]]:
    try:
        config = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{json_path}: voice config not found", code="model.missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{json_path}: not a readable Piper voice config: {err}", code="model.invalid") from None
    if not isinstance(config, dict):
        raise ModelError(f"{json_path}: not a Piper voice config (expected a JSON object)", code="model.invalid")
    try:
        return piper_metadata(config), piper_tokens(config)
    except KeyError as err:
        raise ModelError(f"{json_path}: Piper voice config lacks the key {err.args[0]!r}",
                         code="model.invalid") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{json_path}: bad Piper voice config: {err}", code="model.invalid") from None


def _atomic_write(dest: Path, write: Any) -> None:
    """Write through ``write(file)`` into a temp file beside ``dest``, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; the service user must read it
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _copy_ranges(src: BinaryIO, dst: BinaryIO, ranges: Iterable[tuple[int, int]]) -> None:
    for start, end in ranges:
        src.seek(start)
        left = end - start
        while left:
            block = src.read(min(_COPY_BLOCK, left))
            if not block:
                raise OSError("source model changed while it was being copied")
            dst.write(block)
            left -= len(block)


def prepare_piper_voice(onnx_path: Path, json_path: Path, out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/model.onnx`` and ``out_dir/tokens.txt`` for sherpa-onnx.

    Everything is checked before anything is written; each file appears whole or not at all.
    Raises ModelError with one line naming the bad file.
    """
    onnx_path, json_path, out_dir = Path(onnx_path), Path(json_path), Path(out_dir)
    meta, tokens = _load_config(json_path)
    try:
        src = open(onnx_path, "rb")
    except FileNotFoundError:
        raise ModelError(f"{onnx_path}: voice model not found", code="model.missing") from None
    except OSError as err:
        raise ModelError(f"{onnx_path}: cannot read the voice model: {err.strerror or err}") from None
    with src:
        size = os.fstat(src.fileno()).st_size
        try:
            fields = _scan_model(src, size)
            kept = [f for f in fields if f.value is None or _decode_entry(f.value)[0] not in meta]
        except ValueError as err:
            raise ModelError(f"{onnx_path}: not an ONNX model ({err})", code="model.invalid") from None
        # Merge adjacent kept fields into runs so the copy is a few large reads.
        ranges: list[tuple[int, int]] = []
        for f in kept:
            if ranges and ranges[-1][1] == f.start:
                ranges[-1] = (ranges[-1][0], f.end)
            else:
                ranges.append((f.start, f.end))
        tail = b"".join(_encode_entry(k, v) for k, v in meta.items())
        try:
            out_dir.mkdir(parents=True, exist_ok=True)

            def write_model(dst: BinaryIO) -> None:
                _copy_ranges(src, dst, ranges)
                dst.write(tail)

            model_out = out_dir / MODEL_FILE
            tokens_out = out_dir / TOKENS_FILE
            _atomic_write(model_out, write_model)
            text = "".join(f"{sym} {i}\n" for sym, i in tokens).encode("utf-8")
            _atomic_write(tokens_out, lambda dst: dst.write(text))
            fsync_dir(out_dir)
        except OSError as err:
            raise ModelError(f"{out_dir}: cannot write the prepared voice: {err.strerror or err}",
                             code="model.write") from None
    _LOGGER.info("prepared Piper voice %s: %s, %d tokens, %s Hz", onnx_path.name, meta["voice"],
                 len(tokens), meta["sample_rate"])
    return {"model": model_out, "tokens": tokens_out}
