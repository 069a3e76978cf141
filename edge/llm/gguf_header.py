"""The header of a GGUF file: its metadata and its tensors' names and shapes, without the weights.

Enough to tell what a file is (a model or an adapter, which architecture) and whether a LoRA
adapter fits a base model, before llama.cpp is asked to load either: llama.cpp reports a
mismatch only as a log line and a failed load. Reads the first few megabytes of a file of any
size (the vocabulary is in the metadata); the weights are never read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from edge.errors import ModelError

_MAGIC = b"GGUF"
# value types: uint8, int8, uint16, int16, uint32, int32, float32, bool, string, array, uint64, int64, float64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]  # name -> shape as llama.cpp counts it (ne[0] first)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def is_lora(self) -> bool:
        return self.metadata.get("general.type") == "adapter" and self.metadata.get("adapter.type") == "lora"


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ModelError(f"{self.path}: the GGUF header is cut short: re-install the file", code="model.invalid")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 24:
            raise ModelError(f"{self.path}: not a GGUF file (a {n}-byte string in its header)", code="model.invalid")
        data = self.f.read(n)
        if len(data) != n:
            raise ModelError(f"{self.path}: the GGUF header is cut short: re-install the file", code="model.invalid")
        return data.decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            if item in _SCALARS and n > 64:  # long numeric arrays (token scores): skip, they are not needed
                self.f.seek(n * struct.calcsize(_SCALARS[item]), 1)
                return None
            return [self.value(item) for _ in range(n)]
        raise ModelError(f"{self.path}: unknown GGUF value type {vtype}: not a GGUF file llama.cpp can read",
                         code="model.invalid")


def read_gguf_header(path: str | Path) -> GgufHeader:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            r = _Reader(f, path)
            if f.read(4) != _MAGIC:
                raise ModelError(f"{path}: not a GGUF file", code="model.invalid")
            version = r.take("<I")
            if version not in (2, 3):
                raise ModelError(f"{path}: GGUF version {version} is not supported (2 or 3)", code="model.invalid")
            n_tensors, n_kv = r.take("<Q"), r.take("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                metadata[key] = r.value(r.take("<I"))
            tensors: dict[str, tuple[int, ...]] = {}
            for _ in range(n_tensors):
                name = r.string()
                dims = r.take("<I")
                tensors[name] = tuple(r.take("<Q") for _ in range(dims))
                r.take("<I")  # type
                r.take("<Q")  # offset
    except OSError as err:
        raise ModelError(f"{path}: cannot read the GGUF file: {err.strerror or err}", code="model.unreadable") from None
    return GgufHeader(path, metadata, tensors)


def check_lora_fits(adapter: GgufHeader, base: GgufHeader) -> None:
    """ModelError naming what does not fit, when ``adapter`` is not a LoRA adapter for ``base``."""
    where = f"LoRA adapter {adapter.path}"
    if not adapter.is_lora:
        raise ModelError(f"{where} is not a LoRA adapter (general.type {adapter.metadata.get('general.type')!r}, "
                         f"adapter.type {adapter.metadata.get('adapter.type')!r}): convert it with llama.cpp's "
                         "convert_lora_to_gguf.py", code="model.adapter")
    if adapter.architecture != base.architecture:
        raise ModelError(f"{where} was made for a {adapter.architecture or '?'} model, but llm.model is "
                         f"{base.architecture or '?'} ({base.path.name}): use an adapter trained on this base model",
                         code="model.adapter")
    pairs = {name[: -len(".lora_a")] for name in adapter.tensors if name.endswith(".lora_a")}
    if not pairs:
        raise ModelError(f"{where} holds no lora_a/lora_b tensors", code="model.adapter")
    for target in sorted(pairs):
        a, b = adapter.tensors[target + ".lora_a"], adapter.tensors.get(target + ".lora_b")
        w = base.tensors.get(target)
        if b is None:
            raise ModelError(f"{where}: {target}.lora_a has no {target}.lora_b", code="model.adapter")
        if w is None:
            raise ModelError(f"{where} changes {target}, which {base.path.name} does not have: the adapter was "
                             "made for another model", code="model.adapter")
        if len(a) < 2 or len(b) < 2 or len(w) < 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
            raise ModelError(f"{where}: {target} is {w} in {base.path.name} but the adapter's lora_a is {a} and "
                             f"lora_b {b}: the adapter was made for a model of another size", code="model.adapter")
