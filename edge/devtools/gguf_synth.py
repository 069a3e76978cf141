"""Random-weight GGUF files shaped like Phi-3, for tests and benchmarks.

``write_tiny_phi3`` builds a model of a few hundred kilobytes with Phi-3's architecture,
special tokens and chat template. Its weights are random except for one designed path: the
attention and feed-forward outputs are nearly zero, so the next token depends only on the
current one, and the output matrix maps ``<|assistant|>`` to a fixed reply (``TINY_REPLY``)
that ends with ``<|end|>``. Tests can therefore check templates, streaming, stop tokens and
multi-byte characters against a known answer without a real model.

``write_phi3_mini_shaped`` builds a 2.2 GB file with Phi-3-mini-4k-instruct's exact shapes and
Q4_K weights: its text is meaningless but its speed and memory use are those of the real model.

    python -m edge.gguf_synth {tiny-phi3|phi3-mini-shaped} OUT.gguf

``gguf`` and ``numpy`` are imported inside the functions; ``gguf`` is in the ``bench`` and
``test`` extras.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import EdgeError, MissingDependency

if TYPE_CHECKING:
    import numpy as np

_LOGGER = logging.getLogger(__name__)

# The template stored in Microsoft's Phi-3-mini-4k-instruct-q4.gguf. It renders no system
# message, which is why the chat stage replaces it with an explicit Phi-3 template.
PHI3_GGUF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)

# Phi-3's added tokens, by id from 32000 in the real 32064-token vocabulary.
PHI3_SPECIAL_TOKENS: dict[int, str] = {
    0: "<|endoftext|>",
    1: "<|assistant|>",
    2: "<|placeholder1|>",
    3: "<|placeholder2|>",
    4: "<|placeholder3|>",
    5: "<|placeholder4|>",
    6: "<|system|>",
    7: "<|end|>",
    8: "<|placeholder5|>",
    9: "<|placeholder6|>",
    10: "<|user|>",
}

# What the tiny model answers to anything (greedy or not): the text of TINY_REPLY_PIECES.
# "é" is not in the vocabulary, so it is produced as two byte tokens: a streamer that splits
# UTF-8 characters shows up here.
TINY_REPLY_PIECES: tuple[str, ...] = (
    "▁Hello", "▁from", "▁a", "▁tiny", "▁Phi", "-", "3", ",", "▁caf", "<0xC3>", "<0xA9>", "!",
)
TINY_REPLY = "Hello from a tiny Phi-3, café!"

_SPM_SPACE = "▁"
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 2, 3, 6
_QK_K = 256
_Q4_K_BLOCK_BYTES = 144


class SynthError(EdgeError):
    code = "gguf_synth.error"


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependency.for_module("gguf", "bench") from None
    return gguf


def _spm_vocab(normal_pieces: Sequence[str], n_vocab: int | None,
               specials: dict[int, str]) -> tuple[list[str], list[float], list[int]]:
    """A Llama-style SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, pieces, specials.

    ``specials`` maps ids (counted from the first special token) to added tokens; with
    ``n_vocab`` None the vocabulary holds all pieces, else pieces fill the ids below
    ``n_vocab - 1 - max(specials)`` and unused control tokens fill the gaps.
    llama.cpp sets Phi-3's token attributes by looking up <unk>, <s> and </s> when the model
    name contains "phi3", so they must exist; the byte tokens let any text tokenize.
    """
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_CONTROL] + [_TOKEN_BYTE] * 256
    unique = list(dict.fromkeys(p for p in normal_pieces if p not in tokens))
    if n_vocab is None:
        n_vocab = len(tokens) + len(unique) + max(specials) + 1
    first_special = n_vocab - max(specials) - 1
    if len(tokens) + len(unique) < first_special:
        raise SynthError(f"vocabulary: {len(unique)} pieces cannot fill ids up to {first_special}")
    tokens += unique[: first_special - len(tokens)]
    types += [_TOKEN_NORMAL] * (first_special - len(types))
    for i in range(n_vocab - first_special):
        tokens.append(specials.get(i, f"<|unused{first_special + i}|>"))
        types.append(_TOKEN_CONTROL)
    # SentencePiece merges the highest-scoring pair first; longer pieces win.
    scores = [0.0] * 3 + [0.0] * 256 + [
        float(len(t)) - i * 1e-6 for i, t in enumerate(tokens[259:first_special])
    ] + [0.0] * (n_vocab - first_special)
    return tokens, scores, types


def _prefixes(word: str) -> list[str]:
    return [word[:i] for i in range(1, len(word) + 1)]


def _tiny_pieces() -> list[str]:
    chars = [chr(c) for c in range(0x21, 0x7F)]
    pieces = [_SPM_SPACE] + chars + [_SPM_SPACE + c for c in chars]
    for piece in TINY_REPLY_PIECES:
        if not piece.startswith("<0x"):
            pieces += _prefixes(piece)
    for word in ("the", "is", "what", "of", "capital", "France", "you", "are", "hello", "assistant"):
        pieces += _prefixes(_SPM_SPACE + word)
    return pieces


# One-syllable pseudo-words: 40 onsets x 15 vowels x 50 codas = 30,000, enough for the vocabulary.
_ONSETS = ("b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j", "k",
           "l", "m", "n", "p", "pl", "pr", "r", "s", "sh", "sk", "sl", "sm", "sn", "sp", "st", "t", "th", "tr",
           "v", "w", "y", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ay", "ee", "ea", "oo", "ou", "ow", "oa", "oi", "ie")
_CODAS = ("", "b", "ck", "d", "f", "ft", "g", "k", "l", "ld", "lf", "lk", "lm", "lp", "lt", "m", "mp", "n", "nd",
          "ng", "nk", "nt", "p", "pt", "r", "rb", "rd", "rf", "rg", "rk", "rl", "rm", "rn", "rp", "rt", "s", "sk",
          "sp", "ss", "st", "t", "th", "x", "sh", "ch", "tch", "nch", "rst", "rth", "mb")


def _mini_pieces() -> list[str]:
    """A 32k vocabulary whose random text reads at English's pace.

    Characters and letter pairs let any prompt be tokenized. The rest are one-syllable
    pseudo-words: three in four start a word (``▁blant``), one in four continues one (``stoo``),
    so random text runs at about 1.3 tokens and 1.3 syllables a word, as English does with
    Phi-3's tokenizer: the first clause takes as many tokens as a real one, and the voice takes
    as long to say it.
    """
    lower = "abcdefghijklmnopqrstuvwxyz"
    chars = [chr(c) for c in range(0x21, 0x7F)]
    pieces = [_SPM_SPACE] + chars + [_SPM_SPACE + c for c in chars]
    pairs = [a + b for a in lower for b in lower]
    pieces += pairs + [_SPM_SPACE + p for p in pairs] + [_SPM_SPACE + a.upper() + b for a in lower for b in lower]
    words = [o + v + c for v in _VOWELS for c in _CODAS for o in _ONSETS]
    for i, w in enumerate(words):
        pieces.append(w if i % 4 == 3 else _SPM_SPACE + w)
    return pieces


def _add_phi3_metadata(w: Any, *, name: str, n_ctx_train: int, n_embd: int, n_ff: int, n_layer: int,
                       n_head: int, file_type: int, tokens: list[str], scores: list[float],
                       types: list[int], chat_template: str | None) -> None:
    w.add_name(name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(file_type)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_unk_token_id(0)
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def _write_atomically(path: Path, build: Any) -> Path:
    """Write through a temporary file beside ``path`` so a failure leaves nothing half-written."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise SynthError(f"{path.parent}: no such directory")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        build(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _finish(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_phi3(path: Path, *, chat_template: str | None = PHI3_GGUF_CHAT_TEMPLATE,
                    seed: int = 0) -> Path:
    """A tiny phi3-architecture GGUF that answers ``TINY_REPLY`` then ``<|end|>``.

    ``chat_template``: the template stored in the file (default: the one in Microsoft's Phi-3
    GGUF); ``None`` stores none.
    """
    gguf = _require_gguf()
    import numpy as np

    # 32-wide heads: quantized KV caches (q8_0, q4_0) need a multiple of 32.
    n_embd, n_head, n_ff, n_layer = 128, 4, 256, 2
    tokens, scores, types = _spm_vocab(_tiny_pieces(), None, PHI3_SPECIAL_TOKENS)
    n_vocab = len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    chain = ["<|assistant|>", *TINY_REPLY_PIECES, "<|end|>"]
    missing = [t for t in chain if t not in index]
    if missing:
        raise SynthError(f"tiny vocabulary lacks {missing}")

    rng = np.random.default_rng(seed)
    f32 = np.float32
    embd = rng.standard_normal((n_vocab, n_embd)).astype(f32)
    # Unit-norm embeddings: the designed logit margins then do not depend on the draw.
    embd /= np.linalg.norm(embd, axis=1, keepdims=True)
    embd *= np.sqrt(n_embd)
    output = (0.02 * rng.standard_normal((n_vocab, n_embd))).astype(f32)
    for cur, nxt in zip(chain, chain[1:]):
        output[index[nxt]] += 6.0 * embd[index[cur]] / np.sqrt(n_embd)

    def build(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, "phi3")
        _add_phi3_metadata(w, name="phi3 tiny random", n_ctx_train=4096, n_embd=n_embd, n_ff=n_ff,
                           n_layer=n_layer, n_head=n_head, file_type=0, tokens=tokens,
                           scores=scores, types=types, chat_template=chat_template)
        w.add_tensor("token_embd.weight", embd)
        w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=f32))
        w.add_tensor("output.weight", output)
        for i in range(n_layer):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=f32))
            w.add_tensor(p + "attn_qkv.weight",
                         (rng.standard_normal((3 * n_embd, n_embd)) / np.sqrt(n_embd)).astype(f32))
            # Near-zero output projections keep the residual stream on the token embedding,
            # which is what makes the reply predictable; they are not exactly zero so the
            # attention and feed-forward paths still affect the numbers.
            w.add_tensor(p + "attn_output.weight", (1e-3 * rng.standard_normal((n_embd, n_embd))).astype(f32))
            w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=f32))
            w.add_tensor(p + "ffn_up.weight",
                         (rng.standard_normal((2 * n_ff, n_embd)) / np.sqrt(n_embd)).astype(f32))
            w.add_tensor(p + "ffn_down.weight", (1e-3 * rng.standard_normal((n_embd, n_ff))).astype(f32))
        _finish(w)

    return _write_atomically(path, build)


TINY_LORA_FIRST = "▁the"  # what the tiny model says first with write_tiny_lora's adapter applied


def write_tiny_lora(path: Path, *, arch: str = "phi3", n_embd: int = 128, seed: int = 0) -> Path:
    """A rank-1 LoRA adapter (llama.cpp's GGUF format) for ``write_tiny_phi3``'s model.

    It changes ``output.weight`` so that after ``<|assistant|>`` the model says ``TINY_LORA_FIRST``
    instead of the first piece of ``TINY_REPLY``: a test can see that the adapter is applied.
    ``arch`` and ``n_embd`` other than the tiny model's make an adapter that does not fit it.
    """
    gguf = _require_gguf()
    import numpy as np

    tokens, _, _ = _spm_vocab(_tiny_pieces(), None, PHI3_SPECIAL_TOKENS)
    index = {t: i for i, t in enumerate(tokens)}
    # The tiny model's embeddings, drawn exactly as write_tiny_phi3 draws them.
    rng = np.random.default_rng(seed)
    embd = rng.standard_normal((len(tokens), 128)).astype(np.float32)
    embd /= np.linalg.norm(embd, axis=1, keepdims=True)
    embd *= np.sqrt(128)
    source = np.zeros(n_embd, dtype=np.float32)
    source[: min(n_embd, 128)] = embd[index["<|assistant|>"]][: min(n_embd, 128)]
    # delta W = B @ A (alpha / rank = 1): raises TINY_LORA_FIRST's logit given <|assistant|>.
    lora_a = (source / np.sqrt(n_embd)).reshape(1, n_embd).astype(np.float32)  # (rank, n_embd)
    lora_b = np.zeros((len(tokens), 1), dtype=np.float32)  # (n_vocab, rank)
    lora_b[index[TINY_LORA_FIRST], 0] = 12.0

    def build(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 1.0)
        w.add_tensor("output.weight.lora_a", lora_a)
        w.add_tensor("output.weight.lora_b", lora_b)
        _finish(w)

    return _write_atomically(path, build)


def _random_q4_k(rng: Any, n_rows: int, n_cols: int) -> np.ndarray:
    """Valid Q4_K blocks with random scales and quants, as a (rows, bytes per row) uint8 array.

    d and dmin are fixed so every weight is finite and about N(0, 0.026²)-sized:
    w = d·scale·q − dmin·min with scale, min in 0..63 and q in 0..15; dmin = 7.5·d centres it.
    """
    import numpy as np

    if n_cols % _QK_K:
        raise SynthError(f"Q4_K rows need a multiple of {_QK_K} columns, got {n_cols}")
    n_blocks = n_rows * n_cols // _QK_K
    blocks = np.frombuffer(rng.bytes(n_blocks * _Q4_K_BLOCK_BYTES), dtype=np.uint8).copy()
    blocks = blocks.reshape(n_blocks, _Q4_K_BLOCK_BYTES)
    dm = np.array([1e-4, 7.5e-4], dtype=np.float16).view(np.uint8)
    blocks[:, 0:4] = dm
    return blocks.reshape(n_rows, n_cols // _QK_K * _Q4_K_BLOCK_BYTES)


MINI_N_VOCAB = 32064


def _mini_vocab() -> tuple[list[str], list[float], list[int]]:
    """Phi-3-mini's vocabulary layout: pieces up to id 31999, Phi-3's added tokens from 32000,
    unused ids up to 32063."""
    specials = dict(PHI3_SPECIAL_TOKENS)
    specials[MINI_N_VOCAB - 32000 - 1] = f"<|unused{MINI_N_VOCAB - 1}|>"
    return _spm_vocab(_mini_pieces(), MINI_N_VOCAB, specials)


def write_phi3_mini_shaped(path: Path, *, seed: int = 0,
                           chat_template: str | None = PHI3_GGUF_CHAT_TEMPLATE) -> Path:
    """Random Q4_K weights with Phi-3-mini-4k-instruct's exact shapes (about 2.2 GB).

    Every layer shares one random draw per matrix shape: the file is still 2.2 GB of distinct
    pages to read and multiply, and it is written in seconds instead of quantized for minutes.
    """
    gguf = _require_gguf()
    import numpy as np

    n_embd, n_head, n_ff, n_layer, n_vocab = 3072, 32, 8192, 32, MINI_N_VOCAB
    tokens, scores, types = _mini_vocab()
    rng = np.random.default_rng(seed)
    q4k = gguf.GGMLQuantizationType.Q4_K
    f32 = np.float32
    embd = _random_q4_k(rng, n_vocab, n_embd)
    output = _random_q4_k(rng, n_vocab, n_embd)
    qkv = _random_q4_k(rng, 3 * n_embd, n_embd)
    attn_out = _random_q4_k(rng, n_embd, n_embd)
    up = _random_q4_k(rng, 2 * n_ff, n_embd)
    down = _random_q4_k(rng, n_embd, n_ff)
    ones = np.ones(n_embd, dtype=f32)

    def build(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, "phi3")
        _add_phi3_metadata(w, name="phi3 mini shaped random", n_ctx_train=4096, n_embd=n_embd,
                           n_ff=n_ff, n_layer=n_layer, n_head=n_head,
                           file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M, tokens=tokens,
                           scores=scores, types=types, chat_template=chat_template)
        w.add_tensor("token_embd.weight", embd, raw_dtype=q4k)
        w.add_tensor("output_norm.weight", ones)
        w.add_tensor("output.weight", output, raw_dtype=q4k)
        for i in range(n_layer):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", ones)
            w.add_tensor(p + "attn_qkv.weight", qkv, raw_dtype=q4k)
            w.add_tensor(p + "attn_output.weight", attn_out, raw_dtype=q4k)
            w.add_tensor(p + "ffn_norm.weight", ones)
            w.add_tensor(p + "ffn_up.weight", up, raw_dtype=q4k)
            w.add_tensor(p + "ffn_down.weight", down, raw_dtype=q4k)
        _finish(w)

    return _write_atomically(path, build)


_Q4_0_BLOCK = 32
_Q4_0_BLOCK_BYTES = 18


def _random_q4_0(rng: Any, n_rows: int, n_cols: int) -> np.ndarray:
    """Valid Q4_0 blocks (an f16 scale and 32 nibbles) with random quants, as a (rows, bytes) array:
    the quantization llama.cpp repacks for ARM's dot-product and for AVX2."""
    import numpy as np

    if n_cols % _Q4_0_BLOCK:
        raise SynthError(f"Q4_0 rows need a multiple of {_Q4_0_BLOCK} columns, got {n_cols}")
    n_blocks = n_rows * n_cols // _Q4_0_BLOCK
    blocks = np.frombuffer(rng.bytes(n_blocks * _Q4_0_BLOCK_BYTES), dtype=np.uint8).copy()
    blocks = blocks.reshape(n_blocks, _Q4_0_BLOCK_BYTES)
    blocks[:, 0:2] = np.array([3e-3], dtype=np.float16).view(np.uint8)
    return blocks.reshape(n_rows, n_cols // _Q4_0_BLOCK * _Q4_0_BLOCK_BYTES)


@dataclass(frozen=True)
class Shape:
    """A published small model's architecture, as llama.cpp sees it."""

    arch: str  # llama | qwen2 | phi3
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    rope_base: float = 10000.0
    tied: bool = True  # the output matrix is the token embedding

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# The shapes of models a Pi-class device could run instead of Phi-3-mini (from their configs).
SHAPES: dict[str, Shape] = {
    "llama3.2-1b": Shape("llama", 2048, 8192, 16, 32, 8, 128256, rope_base=500000.0),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 8960, 28, 12, 2, 151936, rope_base=1000000.0),
    "qwen2.5-0.5b": Shape("qwen2", 896, 4864, 24, 14, 2, 151936, rope_base=1000000.0),
    # Phi-3-mini itself in Q4_0 (the quantization llama.cpp repacks for the Pi 5's dot-product
    # instructions), as llama's separate q/k/v and gate/up: the same arithmetic as phi3's fused ones.
    "phi3-mini-q4_0": Shape("llama", 3072, 8192, 32, 32, 32, 32064, tied=False),
}


def write_shaped(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """Random Q4_0 weights with ``shape``'s exact sizes (separate q/k/v with grouped-query heads,
    gated feed-forward), Phi-3's chat tokens in a vocabulary of the model's size: its text is
    meaningless, its speed and memory are the real model's."""
    gguf = _require_gguf()
    import numpy as np

    specials = dict(PHI3_SPECIAL_TOKENS)
    tokens, scores, types = _spm_vocab(_mini_pieces() + _more_pieces(shape.n_vocab), shape.n_vocab, specials)
    rng = np.random.default_rng(seed)
    q40 = gguf.GGMLQuantizationType.Q4_0
    f32 = np.float32
    kv = shape.n_head_kv * shape.head_dim
    embd = _random_q4_0(rng, shape.n_vocab, shape.n_embd)
    wq, wk, wv = (_random_q4_0(rng, n, shape.n_embd) for n in (shape.n_embd, kv, kv))
    wo = _random_q4_0(rng, shape.n_embd, shape.n_embd)
    gate, up = (_random_q4_0(rng, shape.n_ff, shape.n_embd) for _ in range(2))
    down = _random_q4_0(rng, shape.n_embd, shape.n_ff)
    ones = np.ones(shape.n_embd, dtype=f32)
    bias = {n: np.zeros(n, dtype=f32) for n in (shape.n_embd, kv)}

    def build(tmp: Path) -> None:
        a = shape.arch
        w = gguf.GGUFWriter(tmp, a)
        w.add_name(f"{a} shaped random")
        w.add_context_length(4096)
        w.add_embedding_length(shape.n_embd)
        w.add_feed_forward_length(shape.n_ff)
        w.add_block_count(shape.n_layer)
        w.add_head_count(shape.n_head)
        w.add_head_count_kv(shape.n_head_kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(shape.head_dim)
        w.add_rope_freq_base(shape.rope_base)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(tokens.index("<|endoftext|>"))
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(PHI3_GGUF_CHAT_TEMPLATE)
        w.add_tensor("token_embd.weight", embd, raw_dtype=q40)
        w.add_tensor("output_norm.weight", ones)
        if not shape.tied:
            w.add_tensor("output.weight", embd, raw_dtype=q40)
        for i in range(shape.n_layer):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", ones)
            w.add_tensor(p + "attn_q.weight", wq, raw_dtype=q40)
            w.add_tensor(p + "attn_k.weight", wk, raw_dtype=q40)
            w.add_tensor(p + "attn_v.weight", wv, raw_dtype=q40)
            if a == "qwen2":
                w.add_tensor(p + "attn_q.bias", bias[shape.n_embd])
                w.add_tensor(p + "attn_k.bias", bias[kv])
                w.add_tensor(p + "attn_v.bias", bias[kv])
            w.add_tensor(p + "attn_output.weight", wo, raw_dtype=q40)
            w.add_tensor(p + "ffn_norm.weight", ones)
            w.add_tensor(p + "ffn_gate.weight", gate, raw_dtype=q40)
            w.add_tensor(p + "ffn_up.weight", up, raw_dtype=q40)
            w.add_tensor(p + "ffn_down.weight", down, raw_dtype=q40)
        _finish(w)

    return _write_atomically(path, build)


def _more_pieces(n_vocab: int) -> list[str]:
    """Two-syllable pseudo-words to fill a vocabulary larger than Phi-3's."""
    words = [a + b for a in ("ba", "ke", "lo", "mi", "nu", "pa", "ri", "so", "tu", "ve", "wa", "zo", "da", "fe",
                             "gi", "ho", "ja", "ku", "le", "mo")
             for b in (o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS[:20])]
    return [_SPM_SPACE + w for w in words[: max(0, n_vocab - 32000)]]


def _shaped_writer(shape: Shape) -> Callable[[Path], Path]:
    return lambda out: write_shaped(out, shape)


_WRITERS: dict[str, Callable[[Path], Path]] = {
    "tiny-phi3": write_tiny_phi3, "phi3-mini-shaped": write_phi3_mini_shaped,
    **{f"{name}-shaped": _shaped_writer(shape) for name, shape in SHAPES.items()},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.gguf_synth",
                                     description="Write a random-weight Phi-3-shaped GGUF for tests and benchmarks.")
    parser.add_argument("kind", choices=sorted(_WRITERS))
    parser.add_argument("out", type=Path, help="output .gguf file")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        out = _WRITERS[args.kind](args.out)
    except EdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {args.out}: cannot write: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
