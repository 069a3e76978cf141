"""Read an ONNX file's header (IR version, metadata, graph input/output names) without the weights.

sherpa-onnx ends the whole process when a model lacks metadata it needs, so every stage checks
first, and loading a 90 MB model to look at its metadata would cost more than the check is worth.
This scans just deep enough into the protobuf ``ModelProto``: no ``onnx`` or onnxruntime needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge.errors import ModelError

_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12


@dataclass(frozen=True)
class OnnxInfo:
    ir_version: int
    metadata: dict[str, str]  # metadata_props; a later entry for a key wins, as in onnxruntime
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(f: BinaryIO, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (field number, wire type, value or length) until offset ``end``.

    For length-delimited fields the caller reads or skips the payload; ``_fields`` seeks to
    where the payload ends before reading the next tag.
    """
    while f.tell() < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, _varint(f)
        elif wire == 1:
            f.seek(8, 1)
        elif wire == 5:
            f.seek(4, 1)
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            if start + length > end:
                raise ValueError("field runs past its message")
            yield number, wire, length
            f.seek(start + length)
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if f.tell() != end:
        raise ValueError("field runs past its message")


def _string_fields(f: BinaryIO, length: int, wanted: tuple[int, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for number, wire, value in _fields(f, f.tell() + length):
        if wire == 2 and number in wanted:
            out[number] = f.read(value).decode("utf-8", errors="replace")
    return out


def read_onnx_info(path: Path) -> OnnxInfo:
    """The header of an ONNX model; ModelError naming the file when it is missing or not ONNX."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            ir_version = 0
            has_graph = False
            metadata: dict[str, str] = {}
            inputs: list[str] = []
            outputs: list[str] = []
            for number, wire, value in _fields(f, size):
                if number == _IR_VERSION and wire == 0:
                    ir_version = value
                elif number == _METADATA_PROPS and wire == 2:
                    kv = _string_fields(f, value, (1, 2))
                    metadata[kv.get(1, "")] = kv.get(2, "")
                elif number == _GRAPH and wire == 2:
                    has_graph = True
                    for gnum, gwire, glen in _fields(f, f.tell() + value):
                        if gwire == 2 and gnum in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                            name = _string_fields(f, glen, (1,)).get(1, "")
                            (inputs if gnum == _GRAPH_INPUT else outputs).append(name)
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found: reinstall the model with `edge-voice models fetch`",
                         code="model.missing") from None
    except IsADirectoryError:
        raise ModelError(f"{path}: is a directory, not an ONNX model", code="model.invalid") from None
    except OSError as err:
        raise ModelError(f"{path}: cannot read the model: {err.strerror or err}", code="model.unreadable") from None
    except (EOFError, ValueError) as err:
        why = "truncated" if isinstance(err, EOFError) else str(err)
        raise ModelError(f"{path}: not an ONNX model ({why}): reinstall the model with `edge-voice models fetch`",
                         code="model.invalid") from None
    if ir_version == 0 or not has_graph:
        raise ModelError(f"{path}: not an ONNX model (no {'IR version' if not ir_version else 'graph'}): "
                         "reinstall the model with `edge-voice models fetch`", code="model.invalid")
    return OnnxInfo(ir_version, metadata, tuple(inputs), tuple(outputs))


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """Just the ``metadata_props`` of an ONNX model (see :func:`read_onnx_info`)."""
    return read_onnx_info(path).metadata
