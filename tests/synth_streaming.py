"""Build a structurally valid streaming NeMo CTC model with random weights.

No trained streaming speech-to-text model ships with the test environment, yet the streaming
engine's own code (feeding, batched decoding, partials, endpointing, reset) must run in CI
against the real ``sherpa_onnx.OnlineRecognizer``. This writes a tiny model in the layout that
sherpa-onnx's ``OnlineNeMoCtcModel`` loads (``sherpa-onnx/csrc/online-nemo-ctc-model.cc``):

inputs, in this order (sherpa feeds them by position):
    audio_signal            float32 (N, 80, window_size)   fbank frames, channels first
    length                  int64   (N,)
    cache_last_channel      float32 (N, d1, d2, d3)
    cache_last_time         float32 (N, t1, t2, t3)
    cache_last_channel_len  int64   (N,)
outputs, in this order (sherpa drops the second and feeds the last three back):
    logprobs                float32 (N, chunk_shift / 4, vocab + 1)   blank is the last id
    encoded_lengths         int64   (N,)
    cache_last_channel_next, cache_last_time_next, cache_last_channel_len_next
metadata (integers): window_size, chunk_shift, subsampling_factor, vocab_size (without the
blank), cache_last_channel_dim1..3, cache_last_time_dim1..3.

sherpa-onnx's CTC endpointing counts trailing blanks times 4 frames of 10 ms, so the model
emits one output frame per 4 input frames. The "acoustics" are deliberately simple: a frame
whose mean log-mel energy is above a threshold prefers a non-blank token chosen by a fixed
random projection of its spectral shape, so speech yields a growing token string and silence
yields blanks (so does quiet broadband noise) — which is what partials, endpoints and resets need
to be exercised. The caches are carried (decayed and counted) so the state round-trip is real.

Run as a script to write the files: ``python tests/synth_streaming.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

FEATURE_DIM = 80
SUBSAMPLING = 4
# Tokens are short syllables; "▁" marks a word start as in sentencepiece vocabularies.
SYLLABLES = ["ba", "do", "ke", "li", "mo", "nu", "pa", "ri", "so", "tu", "ve", "zo"]
TOKENS = ["▁" + s for s in SYLLABLES] + SYLLABLES
BLANK = "<blk>"
# Mean log-mel (natural log, samples in [-1, 1]) of the lowest mel bins that separates speech
# from silence: digital silence gives about -15.9; with -8, espeak-ng speech at -20 and -30 dBFS
# yields a token every 100-150 ms while white noise up to -40 dBFS yields none.
ENERGY_THRESHOLD = -8.0
# The "energy" is the mean over the lowest mel bins (below ~1 kHz), where voiced speech is
# strong and broadband noise is weak.
LOW_BINS = 24
# IR 8 / opset 17: loadable by sherpa-onnx's bundled onnxruntime and by older device builds.
IR_VERSION = 8
OPSET = 17


def build_nemo_ctc_streaming(out_dir: Path, *, window_size: int = 20, chunk_shift: int = 16,
                             seed: int = 1234, drop_metadata: tuple[str, ...] = (),
                             ir_version: int = IR_VERSION,
                             energy_threshold: float = ENERGY_THRESHOLD) -> dict[str, Path]:
    """Write ``model.onnx`` and ``tokens.txt`` into ``out_dir``; return {file name: path}.

    ``drop_metadata`` leaves keys out (to test the metadata check); ``ir_version`` can be
    raised to test the IR check.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if chunk_shift % SUBSAMPLING or chunk_shift > window_size:
        raise ValueError("chunk_shift must be a multiple of 4 and at most window_size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_tok = len(TOKENS)
    t_out = chunk_shift // SUBSAMPLING
    d1, d2, d3 = 2, 4, 8  # cache_last_channel (layers, left context, model dim)
    t1, t2, t3 = 2, 8, 3  # cache_last_time (layers, model dim, conv context)

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        const("starts", np.array([0], np.int64)),
        const("ends", np.array([chunk_shift], np.int64)),
        const("axis2", np.array([2], np.int64)),
        const("low_bins", np.array([LOW_BINS], np.int64)),
        const("frames_shape", np.array([-1, t_out, SUBSAMPLING, FEATURE_DIM], np.int64)),
        const("proj", (rng.standard_normal((FEATURE_DIM, n_tok)) * 3 / np.sqrt(FEATURE_DIM)).astype(np.float32)),
        const("tok_bias", (0.5 * rng.standard_normal(n_tok)).astype(np.float32)),
        const("threshold", np.array(energy_threshold, np.float32)),
        const("blank_gain", np.array(3.0, np.float32)),
        const("decay", np.array(0.9, np.float32)),
        const("sub", np.array(SUBSAMPLING, np.int64)),
        const("t_out", np.array(t_out, np.int64)),
    ]
    nodes = [
        helper.make_node("Slice", ["audio_signal", "starts", "ends", "axis2"], ["x"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["xt", "frames_shape"], ["xr"]),
        helper.make_node("ReduceMean", ["xr"], ["pooled"], axes=[2], keepdims=0),
        helper.make_node("Slice", ["pooled", "starts", "low_bins", "axis2"], ["low"]),
        helper.make_node("ReduceMean", ["low"], ["energy"], axes=[2], keepdims=1),
        helper.make_node("ReduceMean", ["pooled"], ["level"], axes=[2], keepdims=1),
        helper.make_node("Sub", ["pooled", "level"], ["shape"]),
        helper.make_node("MatMul", ["shape", "proj"], ["tok_raw"]),
        helper.make_node("Add", ["tok_raw", "tok_bias"], ["tok_logits"]),
        helper.make_node("Sub", ["threshold", "energy"], ["margin"]),
        helper.make_node("Mul", ["margin", "blank_gain"], ["blank_logit"]),
        helper.make_node("Concat", ["tok_logits", "blank_logit"], ["logits"], axis=2),
        helper.make_node("LogSoftmax", ["logits"], ["logprobs"], axis=2),
        helper.make_node("Div", ["length", "sub"], ["encoded_lengths"]),
        helper.make_node("Mul", ["cache_last_channel", "decay"], ["cache_last_channel_next"]),
        helper.make_node("Mul", ["cache_last_time", "decay"], ["cache_last_time_next"]),
        helper.make_node("Add", ["cache_last_channel_len", "t_out"], ["cache_last_channel_len_next"]),
    ]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("audio_signal", f32, ["N", FEATURE_DIM, window_size]),
        helper.make_tensor_value_info("length", i64, ["N"]),
        helper.make_tensor_value_info("cache_last_channel", f32, ["N", d1, d2, d3]),
        helper.make_tensor_value_info("cache_last_time", f32, ["N", t1, t2, t3]),
        helper.make_tensor_value_info("cache_last_channel_len", i64, ["N"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logprobs", f32, ["N", t_out, n_tok + 1]),
        helper.make_tensor_value_info("encoded_lengths", i64, ["N"]),
        helper.make_tensor_value_info("cache_last_channel_next", f32, ["N", d1, d2, d3]),
        helper.make_tensor_value_info("cache_last_time_next", f32, ["N", t1, t2, t3]),
        helper.make_tensor_value_info("cache_last_channel_len_next", i64, ["N"]),
    ]
    graph = helper.make_graph(nodes, "synthetic_nemo_ctc_streaming", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edge-voice tests")
    model.ir_version = ir_version
    meta = {
        "model_type": "EncDecCTCModelBPE",
        "window_size": window_size,
        "chunk_shift": chunk_shift,
        "subsampling_factor": SUBSAMPLING,
        "vocab_size": n_tok,
        "cache_last_channel_dim1": d1,
        "cache_last_channel_dim2": d2,
        "cache_last_channel_dim3": d3,
        "cache_last_time_dim1": t1,
        "cache_last_time_dim2": t2,
        "cache_last_time_dim3": t3,
    }
    for key, value in meta.items():
        if key not in drop_metadata:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
    onnx.checker.check_model(model)

    model_path = out_dir / "model.onnx"
    tokens_path = out_dir / "tokens.txt"
    tmp = model_path.with_suffix(".onnx.tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(model_path)
    lines = [f"{tok} {i}" for i, tok in enumerate(TOKENS)] + [f"{BLANK} {n_tok}"]
    tokens_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"model.onnx": model_path, "tokens.txt": tokens_path}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/synth_streaming.py OUT_DIR", file=sys.stderr)
        return 2
    files = build_nemo_ctc_streaming(Path(argv[0]))
    for name, path in files.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
