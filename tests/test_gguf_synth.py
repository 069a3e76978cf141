"""Random-weight Phi-3 GGUF files: valid, loadable, and the tiny one answers as designed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge.devtools import gguf_synth
from edge.devtools.gguf_synth import (
    PHI3_GGUF_CHAT_TEMPLATE,
    TINY_REPLY,
    SynthError,
    write_phi3_mini_shaped,
    write_tiny_phi3,
)

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[1]


def _fields(path: Path) -> tuple[dict, gguf.GGUFReader]:
    reader = gguf.GGUFReader(path)
    out = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(field.parts[field.data[0]]).decode()
        elif field.types and field.types[0] == gguf.GGUFValueType.ARRAY and name == "tokenizer.ggml.tokens":
            out[name] = [bytes(field.parts[i]).decode() for i in field.data]
        elif len(field.data) == 1:
            out[name] = field.parts[field.data[0]][0]
    return out, reader


def test_tiny_phi3_is_small_quick_and_phi3_shaped(tmp_path: Path) -> None:
    t0 = time.monotonic()
    path = write_tiny_phi3(tmp_path / "tiny.gguf")
    print(f"\ntiny phi3 GGUF written in {time.monotonic() - t0:.2f} s")
    assert path.stat().st_size < 5_000_000
    meta, _ = _fields(path)
    assert meta["general.architecture"] == "phi3"
    assert "phi3" in meta["general.name"]
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.chat_template"] == PHI3_GGUF_CHAT_TEMPLATE
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    for special in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"):
        assert special in tokens
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|endoftext|>"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no temporary file left


def test_tiny_phi3_without_template(tmp_path: Path) -> None:
    meta, _ = _fields(write_tiny_phi3(tmp_path / "bare.gguf", chat_template=None))
    assert "tokenizer.chat_template" not in meta


def test_tiny_phi3_generates_its_designed_reply_in_llama_cpp(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_tiny_phi3(tmp_path / "tiny.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        prompt = llm.tokenize(b"<s><|user|>\nAnything at all?<|end|>\n<|assistant|>\n", add_bos=False,
                              special=True)
        out = []
        for tok in llm.generate(prompt, temp=0.0):
            if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), tok):
                end = llm.detokenize([tok], special=True)
                break
            out.append(tok)
            assert len(out) < 40, "the tiny model should stop at <|end|>"
        assert end == b"<|end|>"
        assert llm.detokenize(out).decode().strip() == TINY_REPLY
    finally:
        llm.close()


def test_random_q4_k_blocks_dequantize_to_sane_weights() -> None:
    rng = np.random.default_rng(1)
    rows = gguf_synth._random_q4_k(rng, 8, 512)
    assert rows.shape == (8, 2 * 144) and rows.dtype == np.uint8
    weights = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType.Q4_K)
    assert weights.shape == (8, 512)
    assert np.isfinite(weights).all()
    assert abs(float(weights.mean())) < 0.01
    assert 0.01 < float(weights.std()) < 0.05


def test_missing_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SynthError, match="no such directory"):
        write_tiny_phi3(tmp_path / "nope" / "tiny.gguf")


def test_cli_writes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    done = subprocess.run([sys.executable, "-m", "edge.devtools.gguf_synth", "tiny-phi3", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and str(out) in done.stdout
    bad = subprocess.run([sys.executable, "-m", "edge.devtools.gguf_synth", "tiny-phi3",
                          str(tmp_path / "x" / "y.gguf")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "no such directory" in bad.stderr


@pytest.mark.slow
def test_phi3_mini_shaped_has_the_real_shapes_and_runs(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "mini.gguf"
    try:
        t0 = time.monotonic()
        write_phi3_mini_shaped(path)
        print(f"\nPhi-3-mini-shaped GGUF written in {time.monotonic() - t0:.1f} s")
        assert 2.0e9 < path.stat().st_size < 2.3e9
        meta, reader = _fields(path)
        assert meta["general.architecture"] == "phi3"
        assert (meta["phi3.embedding_length"], meta["phi3.feed_forward_length"], meta["phi3.block_count"],
                meta["phi3.attention.head_count"], meta["phi3.context_length"]) == (3072, 8192, 32, 32, 4096)
        assert len(meta["tokenizer.ggml.tokens"]) == 32064
        assert meta["tokenizer.ggml.tokens"][32007] == "<|end|>"
        tensors = {t.name: t for t in reader.tensors}
        assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
        assert list(tensors["blk.31.ffn_up.weight"].shape) == [3072, 16384]
        assert list(tensors["token_embd.weight"].shape) == [3072, 32064]
        del reader

        llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=32, n_threads=2, verbose=False)
        try:
            prompt = llm.tokenize(b"<|user|>\nHello<|end|>\n<|assistant|>\n", add_bos=True, special=True)
            llm.eval(prompt)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            assert np.isfinite(logits).all() and logits.std() > 0
            assert 0 <= llm.sample(temp=0.0) < 32064
        finally:
            llm.close()
    finally:
        path.unlink(missing_ok=True)


def test_phi3_mini_shaped_vocabulary_reads_at_english_pace() -> None:
    # Random weights pick tokens about uniformly: the text they make must be as long, in tokens,
    # letters and syllables a word, as English, or the benchmark's first clause and synthesis
    # would cost more (or less) than a real reply's.
    import random
    import re

    tokens, _, types = gguf_synth._mini_vocab()
    pieces = [t for t, kind in zip(tokens, types) if kind == gguf_synth._TOKEN_NORMAL]
    rng = random.Random(7)
    sample = [rng.choice(pieces) for _ in range(20000)]
    words = "".join(sample).replace("\u2581", " ").split()
    letters = sum(len(w) for w in words) / len(words)
    syllables = sum(len(re.findall(r"[aeiouy]+", w.lower())) or 1 for w in words) / len(words)
    assert 1.2 < len(sample) / len(words) < 1.5
    assert 4.0 < letters < 7.0
    assert 1.0 < syllables < 1.8


def test_random_q4_0_blocks_dequantize_to_sane_weights() -> None:
    rows = gguf_synth._random_q4_0(np.random.default_rng(1), 4, 256)
    assert rows.shape == (4, 8 * 18) and rows.dtype == np.uint8
    weights = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType.Q4_0)
    assert weights.shape == (4, 256) and np.isfinite(weights).all()
    assert abs(float(weights.mean())) < 0.005 and 0.01 < float(weights.std()) < 0.05
    with pytest.raises(SynthError, match="multiple of 32"):
        gguf_synth._random_q4_0(np.random.default_rng(1), 1, 40)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shaped_writer_follows_the_shape_and_runs(tmp_path: Path, arch: str) -> None:
    """The writer behind the bench's Llama/Qwen profiles, on a small shape of the same kind:
    grouped-query heads, Q4_0 weights (Qwen's q/k/v biases), a vocabulary above Phi-3's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    shape = gguf_synth.Shape(arch, 128, 256, 2, 4, 2, 33000, rope_base=1e6)
    path = gguf_synth.write_shaped(tmp_path / f"{arch}.gguf", shape)
    meta, reader = _fields(path)
    assert meta["general.architecture"] == arch
    assert (meta[f"{arch}.embedding_length"], meta[f"{arch}.feed_forward_length"], meta[f"{arch}.block_count"],
            meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]) == (128, 256, 2, 4, 2)
    assert len(meta["tokenizer.ggml.tokens"]) == 33000
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.1.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert list(tensors["blk.1.attn_k.weight"].shape) == [128, 64]  # 2 kv heads of 32
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [256, 128]
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    del reader
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.eval(llm.tokenize(b"<|user|>\nHello<|end|>\n<|assistant|>\n", add_bos=True, special=True))
        assert 0 <= llm.sample(temp=0.0) < 33000
    finally:
        llm.close()


def test_shapes_match_the_published_models() -> None:
    """The bench compares these with Phi-3-mini: sizes from each model's config.json."""
    s = gguf_synth.SHAPES
    assert (s["llama3.2-1b"].n_embd, s["llama3.2-1b"].n_layer, s["llama3.2-1b"].n_head_kv) == (2048, 16, 8)
    assert (s["qwen2.5-1.5b"].n_embd, s["qwen2.5-1.5b"].n_ff, s["qwen2.5-1.5b"].n_layer) == (1536, 8960, 28)
    assert (s["qwen2.5-0.5b"].n_embd, s["qwen2.5-0.5b"].n_head, s["qwen2.5-0.5b"].n_vocab) == (896, 14, 151936)
