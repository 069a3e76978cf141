"""Speech-to-text: model checks, the streaming engine on a synthetic model, Whisper + VAD on speech.

Speech is generated with espeak-ng, resampled to 16 kHz and fed in 20 ms chunks exactly as the
pipeline does. The streaming engine runs the real sherpa-onnx OnlineRecognizer on the random
model from ``synth_streaming`` (no trained streaming model is available offline): its text is
gibberish, but partials, endpoints and resets are sherpa-onnx's own behaviour.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.audio.chunk import SAMPLE_RATE, AudioChunk, resample
from edge.config import SttConfig
from edge.errors import AudioError, ConfigError, ModelError, StageError
from edge.stt import Recognizer, SttUpdate, UpdateKind, make_recognizer
from edge.stt import vad as stt_vad
from edge.stt.common import Timeline, clean_transcript
from edge.stt.files import identify_stt_model, identify_vad_model, read_onnx_info, read_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_streaming import build_nemo_ctc_streaming  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHUNK = 320
SPEECH_START, PARTIAL, PAUSE, RESUME, FINAL = (UpdateKind.SPEECH_START, UpdateKind.PARTIAL, UpdateKind.PAUSE,
                                                UpdateKind.RESUME, UpdateKind.FINAL)


# --- audio helpers ---------------------------------------------------------------------------

def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.int16)


def noise(seconds: float, dbfs: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amp = 32768 * 10 ** (dbfs / 20)
    return np.clip(rng.standard_normal(int(seconds * SAMPLE_RATE)) * amp, -32768, 32767).astype(np.int16)


def chunks(audio: np.ndarray, start: int = 0) -> list[AudioChunk]:
    n = len(audio) // CHUNK * CHUNK
    return [AudioChunk(audio[i:i + CHUNK].copy(), start + i) for i in range(0, n, CHUNK)]


def run(rec: Recognizer, audio: np.ndarray, *, start: int = 0, preroll_s: float = 0.2) -> list[SttUpdate]:
    cs = chunks(audio, start)
    k = int(preroll_s * SAMPLE_RATE) // CHUNK
    rec.start(cs[:k])
    return [u for c in cs[k:] for u in rec.accept(c)]


def kinds(updates: list[SttUpdate]) -> list[str]:
    return [u.kind for u in updates]


@pytest.fixture(scope="session")
def say(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], np.ndarray]:
    """espeak-ng speech at 16 kHz with its own leading/trailing silence trimmed."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("speech")
    cache: dict[str, np.ndarray] = {}

    def _say(text: str) -> np.ndarray:
        if text not in cache:
            path = folder / f"{len(cache)}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text],
                           check=True, capture_output=True)
            with wave.open(str(path), "rb") as w:
                x = np.frombuffer(w.readframes(w.getnframes()), np.int16)
                x = resample(x, w.getframerate(), SAMPLE_RATE)
            voiced = np.flatnonzero(np.abs(x) > 200)
            cache[text] = x[voiced[0]:voiced[-1] + 1]
        return cache[text]

    return _say


def wer(ref: str, hyp: str) -> tuple[int, int]:
    """(word errors, reference words) after lower-casing and dropping punctuation."""
    def norm(s: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]", " ", s.lower()).split()
    r, h = norm(ref), norm(hyp)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)], len(r)


# --- pure pieces -----------------------------------------------------------------------------

def test_timeline_maps_fed_samples_across_a_gap() -> None:
    tl = Timeline()
    tl.push(AudioChunk(np.zeros(320, np.int16), 16000))
    tl.push(AudioChunk(np.zeros(320, np.int16), 16320))
    tl.push(AudioChunk(np.zeros(320, np.int16), 32000))  # capture dropped a second
    assert tl.fed == 960
    assert tl.seconds(0) == 1.0
    assert tl.seconds(639) == pytest.approx((16320 + 319) / 16000)
    assert tl.seconds(640) == 2.0
    assert tl.seconds(10**6) == tl.end_s == pytest.approx(32320 / 16000)


@pytest.mark.parametrize("raw, clean", [
    (" What is the capital of France? ", "What is the capital of France?"),
    ("[ Silence ]", ""), ("(wind howling)", ""), ("*cough*", ""), ("♪♪", ""),
    ("[BLANK_AUDIO] turn it on", "Turn it on"), ("  ...  ", ""), ("[BLANK", ""), ("(laughs", ""),
    # One decode writes "How", the next "how": a prefilled prompt must stay a prefix of the final.
    ("how many legs", "How many legs"), ("42 steps", "42 steps"), ("éclair", "Éclair"),
])
def test_clean_transcript_drops_sound_annotations(raw: str, clean: str) -> None:
    assert clean_transcript(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("Tell me a joke about computers Tell me a joke about computers Tell me a joke about",
     "Tell me a joke about computers"),
    ("turn it on. Turn it on. turn it on", "Turn it on."),
    ("bye bye", "Bye bye"), ("no no no no", "No no no no"),  # short phrases can be meant
    ("what is the capital of France?", "What is the capital of France?"),
    ("I said the time, I said the time", "I said the time,"),
])
def test_a_looping_decode_is_collapsed(raw: str, clean: str) -> None:
    assert clean_transcript(raw) == clean


def test_wer_helper() -> None:
    assert wer("what is the capital of France", "What is the capital of France?") == (0, 6)
    assert wer("will it rain", "we'll train") == (3, 3)


# --- model files -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def synth_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_nemo_ctc_streaming(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="session")
def whisper_files(whisper_paths: dict[str, Path]) -> dict[str, Path]:
    for p in whisper_paths.values():
        if not p.exists():
            pytest.skip(f"{p} not available")
    return {p.name: p for p in whisper_paths.values()}


@pytest.fixture(scope="session")
def vad_files(silero_vad_path: Path) -> dict[str, Path]:
    return {silero_vad_path.name: silero_vad_path}


def test_onnx_header_scanner_matches_onnx(synth_files: dict[str, Path],
                                          whisper_files: dict[str, Path]) -> None:
    onnx = pytest.importorskip("onnx")
    for path in [synth_files["model.onnx"], *[p for p in whisper_files.values() if p.suffix == ".onnx"]]:
        info = read_onnx_info(path)
        m = onnx.load(str(path), load_external_data=False)
        assert info.ir_version == m.ir_version
        assert info.metadata == {p.key: p.value for p in m.metadata_props}
        assert list(info.inputs) == [i.name for i in m.graph.input]
        assert list(info.outputs) == [o.name for o in m.graph.output]


def test_onnx_header_scanner_rejects_bad_files(tmp_path: Path, synth_files: dict[str, Path]) -> None:
    with pytest.raises(ModelError) as err:
        read_onnx_info(tmp_path / "absent.onnx")
    assert err.value.code == "model.missing" and "absent.onnx" in str(err.value)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(synth_files["model.onnx"].read_bytes()[:-37])
    with pytest.raises(ModelError) as err:
        read_onnx_info(cut)
    assert err.value.code == "model.invalid" and "cut.onnx" in str(err.value)
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ModelError):
        read_onnx_info(text)


def test_identifies_whisper_and_prefers_int8(tmp_path: Path, whisper_files: dict[str, Path]) -> None:
    model = identify_stt_model(whisper_files)
    assert model.kind == "whisper" and not model.streaming
    assert model.files["encoder"].name == "tiny.en-encoder.int8.onnx"
    # A float export beside the int8 one: the int8 file wins.
    both = dict(whisper_files)
    for name, path in whisper_files.items():
        if name.endswith(".int8.onnx"):
            alias = tmp_path / name.replace(".int8", "")
            alias.symlink_to(path)
            both[alias.name] = alias
    assert identify_stt_model(both).files["decoder"].name == "tiny.en-decoder.int8.onnx"


def test_identifies_synthetic_streaming_ctc(synth_files: dict[str, Path]) -> None:
    model = identify_stt_model(synth_files)
    assert model.kind == "nemo_ctc" and model.streaming
    assert read_tokens(synth_files["tokens.txt"])["<blk>"] == 24


@pytest.mark.parametrize("key", ["chunk_shift", "cache_last_time_dim3", "vocab_size"])
def test_missing_metadata_names_file_and_key(tmp_path: Path, key: str) -> None:
    files = build_nemo_ctc_streaming(tmp_path, drop_metadata=(key,))
    with pytest.raises(ModelError) as err:
        identify_stt_model(files)
    assert key in str(err.value) and str(files["model.onnx"]) in str(err.value)
    assert err.value.code == "model.invalid"


def test_ir_version_too_new_is_refused(tmp_path: Path) -> None:
    files = build_nemo_ctc_streaming(tmp_path, ir_version=14)
    with pytest.raises(ModelError, match="IR version 14"):
        identify_stt_model(files)


def test_whisper_metadata_is_checked(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def tiny(path: Path, meta: dict[str, str]) -> None:
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        for k, v in meta.items():
            e = m.metadata_props.add()
            e.key, e.value = k, v
        path.write_bytes(m.SerializeToString())

    meta = {k: "1" for k in ("n_mels", "n_text_layer", "n_text_ctx", "n_text_state", "n_vocab", "sot",
                             "blank_id", "translate", "transcribe", "no_timestamps", "no_speech",
                             "sot_sequence")}
    meta["is_multilingual"] = "0"  # "eot" is left out
    tiny(tmp_path / "x-encoder.onnx", meta)
    tiny(tmp_path / "x-decoder.onnx", {})
    (tmp_path / "x-tokens.txt").write_text("IQ== 0\n")
    files = {p.name: p for p in tmp_path.iterdir()}
    with pytest.raises(ModelError, match="'eot'") as err:
        identify_stt_model(files, "whisper")
    assert "x-encoder.onnx" in str(err.value)


def test_tokens_must_fit_the_model(tmp_path: Path) -> None:
    files = build_nemo_ctc_streaming(tmp_path)
    tokens = files["tokens.txt"]
    lines = tokens.read_text().splitlines()
    tokens.write_text("\n".join(lines[:-1]) + "\n")  # no blank
    with pytest.raises(ModelError, match="blank"):
        identify_stt_model(files)
    tokens.write_text("\n".join(lines) + "\nextra 99\n")
    with pytest.raises(ModelError, match="do not belong together"):
        identify_stt_model(files)
    tokens.unlink()
    with pytest.raises(ModelError) as err:
        identify_stt_model(files)
    assert err.value.code == "model.missing"


def test_unknown_layouts_are_refused(tmp_path: Path, synth_files: dict[str, Path]) -> None:
    with pytest.raises(ModelError) as err:
        identify_stt_model({"a.onnx": synth_files["model.onnx"], "b.onnx": synth_files["model.onnx"]})
    assert err.value.code == "model.unsupported"
    with pytest.raises(ModelError, match="unknown speech-to-text model type"):
        identify_stt_model(synth_files, "kaldi")


def test_vad_model_layout_is_checked(vad_files: dict[str, Path], synth_files: dict[str, Path]) -> None:
    assert identify_vad_model(vad_files) == next(iter(vad_files.values()))
    with pytest.raises(ModelError, match="not a silero VAD model"):
        identify_vad_model({"model.onnx": synth_files["model.onnx"]})


def test_bad_model_fails_with_an_error_not_a_dead_process(tmp_path: Path) -> None:
    # sherpa-onnx would end the interpreter with status 255 on this model; the check must come first.
    build_nemo_ctc_streaming(tmp_path, drop_metadata=("window_size",))
    code = (
        "import sys; from pathlib import Path\n"
        "from edge.config import SttConfig\nfrom edge.stt import make_recognizer\n"
        "from edge.errors import ModelError\n"
        f"d = Path({str(tmp_path)!r})\n"
        "try:\n"
        "    make_recognizer(SttConfig(), {p.name: p for p in d.iterdir()}, None)\n"
        "except ModelError as e:\n"
        "    print(e.code, e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("model.invalid") and "'window_size'" in proc.stdout


def test_engine_and_model_must_match(synth_files: dict[str, Path], whisper_files: dict[str, Path],
                                     vad_files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="vad-offline"):
        make_recognizer(SttConfig(engine="streaming"), whisper_files, None)
    with pytest.raises(ConfigError, match="streaming"):
        make_recognizer(SttConfig(engine="vad-offline"), synth_files, vad_files)
    with pytest.raises(ConfigError, match="VAD model"):
        make_recognizer(SttConfig(engine="vad-offline"), whisper_files, None)


# --- streaming engine on the synthetic model ---------------------------------------------------

@pytest.fixture(scope="module")
def streaming(synth_files: dict[str, Path]) -> Iterator[Recognizer]:
    rec = make_recognizer(SttConfig(engine="streaming", endpoint_silence_s=0.8), synth_files, None)
    yield rec
    rec.close()


def test_streaming_partials_grow_then_endpoint_after_silence(streaming: Recognizer, say) -> None:
    speech = say("what is the capital of france")
    audio = np.concatenate([silence(0.6), speech, silence(2.0)])
    updates = run(streaming, audio, start=48000)
    onset, offset = 3.0 + 0.6, 3.0 + 0.6 + len(speech) / SAMPLE_RATE
    assert kinds(updates)[0] == SPEECH_START and kinds(updates)[-1] == FINAL
    assert kinds(updates).count(SPEECH_START) == 1 and kinds(updates).count(FINAL) == 1
    partials = [u for u in updates if u.kind == PARTIAL]
    assert len(partials) >= 3
    for a, b in zip(partials, partials[1:]):
        assert b.text.startswith(a.text) and len(b.text) > len(a.text)
        assert b.audio_time - a.audio_time >= 0.3 - 1e-9  # partial_interval_s
    final = updates[-1]
    assert final.text.startswith(partials[-1].text)
    assert abs(updates[0].audio_time - onset) < 0.2
    assert onset < final.speech_end <= offset + 0.1
    # Rule 2: the endpoint fires once endpoint_silence_s of trailing blanks were decoded.
    assert 0.8 <= final.audio_time - final.speech_end <= 0.8 + 0.4
    assert final.audio_time < offset + 0.8 + 0.5
    # After the final the utterance is over: more audio changes nothing.
    assert all(streaming.accept(c) == [] for c in chunks(np.concatenate([speech, silence(1)]), 200000))
    assert streaming.finish() is None


@pytest.mark.parametrize("endpoint_s", [0.4, 1.5])
def test_streaming_endpoint_follows_config(synth_files: dict[str, Path], say, endpoint_s: float) -> None:
    rec = make_recognizer(SttConfig(engine="streaming", endpoint_silence_s=endpoint_s), synth_files)
    updates = run(rec, np.concatenate([silence(0.5), say("turn on the lights"), silence(2.5)]))
    final = updates[-1]
    assert final.kind == FINAL
    assert endpoint_s <= final.audio_time - final.speech_end <= endpoint_s + 0.4
    rec.close()


def test_streaming_silence_and_quiet_noise_give_nothing(streaming: Recognizer) -> None:
    assert run(streaming, np.concatenate([silence(2), noise(2, -50)])) == []
    assert streaming.finish() is None


def test_streaming_restart_mid_utterance_is_clean(streaming: Recognizer, say) -> None:
    audio = np.concatenate([silence(0.5), say("where is the nearest train station"), silence(1.5)])
    reference = run(streaming, audio)
    assert kinds(reference)[-1] == FINAL
    # Abandon an utterance half way, then start again at a later point of the timeline.
    half = run(streaming, audio[: len(audio) // 2])
    assert PARTIAL in kinds(half) and FINAL not in kinds(half)
    again = run(streaming, audio, start=10 * SAMPLE_RATE)
    assert [(u.kind, u.text) for u in again] == [(u.kind, u.text) for u in reference]
    for a, b in zip(again, reference):
        assert a.audio_time == pytest.approx(b.audio_time + 10, abs=1e-6)


def test_streaming_second_utterance_after_final(streaming: Recognizer, say) -> None:
    first = run(streaming, np.concatenate([silence(0.5), say("tell me a joke"), silence(1.5)]))
    second = run(streaming, np.concatenate([silence(0.5), say("how do i get to the airport"), silence(1.5)]),
                 start=5 * SAMPLE_RATE)
    assert kinds(first)[-1] == FINAL and kinds(second)[-1] == FINAL
    assert second[0].kind == SPEECH_START and second[0].audio_time > 5
    assert first[-1].text != second[-1].text


def test_streaming_max_utterance_counts_from_first_word(synth_files: dict[str, Path], say) -> None:
    rec = make_recognizer(SttConfig(engine="streaming", max_utterance_s=1.0), synth_files)
    speech = say("can you recommend a good restaurant nearby")
    # A long silence first must not eat into the question's time.
    updates = run(rec, np.concatenate([silence(3.5), speech, silence(1)]))
    assert kinds(updates)[0] == SPEECH_START and kinds(updates)[-1] == FINAL
    start, final = updates[0], updates[-1]
    assert abs(start.audio_time - 3.5) < 0.2
    assert 1.0 <= final.audio_time - start.audio_time <= 1.0 + 0.2
    assert final.speech_end == final.audio_time  # cut while speaking
    rec.close()


def test_streaming_finish_mid_speech(synth_files: dict[str, Path], say) -> None:
    rec = make_recognizer(SttConfig(engine="streaming"), synth_files)
    speech = say("can you recommend a good restaurant nearby")
    audio = np.concatenate([silence(0.3), speech[: len(speech) // 2]])
    part = run(rec, audio)
    assert FINAL not in kinds(part)
    final = rec.finish()
    assert final is not None and final.kind == FINAL
    assert final.text.startswith([u for u in part if u.kind == PARTIAL][-1].text)
    assert final.audio_time == pytest.approx(len(audio) // CHUNK * CHUNK / SAMPLE_RATE)
    assert rec.finish() is None
    rec.close()


def test_streaming_utterance_inside_preroll_comes_with_next_chunk(streaming: Recognizer, say) -> None:
    audio = np.concatenate([silence(0.5), say("tell me a joke"), silence(1.5)])
    cs = chunks(audio)
    streaming.start(cs)
    updates = streaming.accept(chunks(silence(0.1), len(cs) * CHUNK)[0])
    assert kinds(updates)[0] == SPEECH_START and kinds(updates)[-1] == FINAL
    assert streaming.accept(chunks(silence(0.1), len(cs) * CHUNK + CHUNK)[0]) == []


def test_streaming_guards(streaming: Recognizer, synth_files: dict[str, Path]) -> None:
    streaming.start([])
    with pytest.raises(AudioError, match="16000 Hz"):
        streaming.accept(AudioChunk(np.zeros(160, np.int16), 0, rate=8000))
    rec = make_recognizer(SttConfig(), synth_files)
    rec.close()
    with pytest.raises(StageError):
        rec.start([])


# --- VAD + Whisper on speech -----------------------------------------------------------------

SENTENCES = [
    "what is the capital of france",
    "turn on the lights in the kitchen",
    "how much does a ticket to the museum cost",
    "tell me a joke about computers",
    "where is the nearest train station",
    "what time does the library close today",
    "can you recommend a good restaurant nearby",
    "how do i get to the airport",
]


@pytest.fixture(scope="module")
def whisper(whisper_files: dict[str, Path], vad_files: dict[str, Path]) -> Iterator[Recognizer]:
    # Partials every second (not 0.3 s) keep these tests quick; partial timing has its own test.
    cfg = SttConfig(engine="vad-offline", endpoint_silence_s=0.8, partial_interval_s=1.0)
    rec = make_recognizer(cfg, whisper_files, vad_files)
    yield rec
    rec.close()


def test_whisper_transcribes_questions(whisper: Recognizer, say) -> None:
    errors = words = 0
    for i, text in enumerate(SENTENCES):
        speech = say(text)
        t0 = 100.0 * i
        updates = run(whisper, np.concatenate([silence(0.6), speech, silence(1.5)]),
                      start=int(t0 * SAMPLE_RATE))
        onset, offset = t0 + 0.6, t0 + 0.6 + len(speech) / SAMPLE_RATE
        assert kinds(updates)[0] == SPEECH_START and kinds(updates)[-1] == FINAL, (text, updates)
        assert kinds(updates).count(FINAL) == 1 and kinds(updates).count(SPEECH_START) == 1
        assert PARTIAL in kinds(updates)
        final = updates[-1]
        assert abs(updates[0].audio_time - onset) <= 0.35, (text, updates[0])
        assert abs(final.speech_end - offset) <= 0.25, (text, final)
        assert 0.75 <= final.audio_time - final.speech_end <= 0.9, (text, final)
        e, n = wer(text, final.text)
        errors, words = errors + e, words + n
    assert errors / words <= 0.1, f"word error rate {errors / words:.3f}"


def test_whisper_short_pause_does_not_end_the_question(whisper: Recognizer, say) -> None:
    audio = np.concatenate([silence(0.5), say("turn on the lights"), silence(0.35),
                            say("in the kitchen"), silence(1.5)])
    updates = run(whisper, audio)
    assert kinds(updates).count(FINAL) == 1
    assert wer("turn on the lights in the kitchen", updates[-1].text)[0] <= 1


def test_whisper_silence_and_noise_give_no_final(whisper: Recognizer) -> None:
    for audio in (silence(3), noise(3, -40), noise(3, -25, seed=3)):
        updates = run(whisper, audio)
        assert FINAL not in kinds(updates)
        assert whisper.finish() is None


def test_whisper_restart_and_finish(whisper: Recognizer, say) -> None:
    speech = say("what is the weather like this weekend")
    # Abandon mid-speech; the next utterance must not carry any of it.
    half = run(whisper, np.concatenate([silence(0.5), say("tell me a joke about computers")[:16000]]))
    assert kinds(half)[0] == SPEECH_START and FINAL not in kinds(half)
    audio = np.concatenate([silence(0.5), speech, silence(1.5)])
    updates = run(whisper, audio, start=30 * SAMPLE_RATE)
    assert kinds(updates)[0] == SPEECH_START and updates[0].audio_time > 30
    assert wer("what is the weather like this weekend", updates[-1].text)[0] <= 1
    # finish() while speaking: a final from what was heard; without speech: None.
    cut = np.concatenate([silence(0.5), speech[: len(speech) * 2 // 3]])
    part = run(whisper, cut)
    assert FINAL not in kinds(part)
    final = whisper.finish()
    assert final is not None and final.kind == FINAL
    assert final.text.lower().startswith("what is the weather")
    assert final.audio_time == pytest.approx(len(cut) // CHUNK * CHUNK / SAMPLE_RATE)
    assert whisper.finish() is None


def test_whisper_partials_follow_interval(whisper_files: dict[str, Path], vad_files: dict[str, Path],
                                          say) -> None:
    # Without the pause VAD: with it, the voice going quiet brings a decode at once (tested below).
    cfg = SttConfig(engine="vad-offline", partial_interval_s=0.3, pause_s=0.0)
    rec = make_recognizer(cfg, whisper_files, vad_files)
    updates = run(rec, np.concatenate([silence(0.5), say("can you recommend a good restaurant nearby"),
                                       silence(1.5)]))
    partials = [u for u in updates if u.kind == PARTIAL]
    # How many depends on how fast this machine decodes right now; at least the first comes.
    assert partials and partials[0].text.lower().startswith("can")
    # Never closer than the interval, nor than twice the decode that produced the previous one.
    for a, b in zip(partials, partials[1:]):
        assert b.audio_time - a.audio_time >= max(0.3, 2 * a.decode_s) - 0.02
    assert updates[-1].kind == FINAL
    assert wer("can you recommend a good restaurant nearby", updates[-1].text)[0] <= 1
    rec.close()


# --- pauses: the cue for a speculative reply ---------------------------------------------------

def test_whisper_pause_comes_before_the_final_and_the_final_reuses_it(whisper: Recognizer, say) -> None:
    speech = say("turn on the kitchen lights please")
    updates = run(whisper, np.concatenate([silence(0.6), speech, silence(1.5)]))
    k = kinds(updates)
    assert k.count(PAUSE) == 1 and k.index(PAUSE) < k.index(FINAL) and RESUME not in k
    pause, final = updates[k.index(PAUSE)], updates[-1]
    offset = 0.6 + len(speech) / SAMPLE_RATE
    # The pause is noticed a fraction of a second after the words end, long before the endpoint.
    assert pause.audio_time - pause.speech_end <= 0.45 and final.audio_time - pause.audio_time >= 0.3
    assert abs(pause.speech_end - offset) <= 0.25
    assert final.text == pause.text and final.decode_s == 0.0, "the final reuses the pause's decode"
    assert pause.decode_s == 0.0, "the pause reuses the decode made when the voice went quiet"
    assert wer("turn on the kitchen lights please", final.text)[0] == 0, "a decode that early lost no word"


def test_one_decode_between_the_last_sound_and_the_pause(whisper_files: dict[str, Path],
                                                        vad_files: dict[str, Path], say,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Partials as often as they can come: without the quiet rule one would start at every chunk.
    monkeypatch.setattr(stt_vad, "PARTIAL_LOAD", 0.0)
    rec = make_recognizer(SttConfig(engine="vad-offline", partial_interval_s=0.05), whisper_files, vad_files)
    ends: list[int] = []
    decode = rec._decode
    monkeypatch.setattr(rec, "_decode", lambda start, end: (ends.append(end), decode(start, end))[1])
    speech = say("where is the nearest train station")
    try:
        updates = run(rec, np.concatenate([silence(0.6), speech, silence(1.5)]), preroll_s=0.0)
    finally:
        rec.close()
    last_sound = int(0.6 * SAMPLE_RATE) + int(np.flatnonzero(np.abs(speech) > 300)[-1])
    pause = next(u for u in updates if u.kind == PAUSE)
    after = [e for e in ends if e > last_sound]
    late = [round((e - last_sound) / SAMPLE_RATE, 2) for e in after]
    assert len(after) == 1, f"decodes {late} s after the last sound"
    assert after[0] - last_sound <= 0.15 * SAMPLE_RATE  # as soon as the voice went quiet
    assert pause.decode_s == 0.0 and updates[-1].text == pause.text
    assert wer("where is the nearest train station", pause.text)[0] == 0


def test_whisper_speech_after_a_pause_resumes(whisper: Recognizer, say) -> None:
    audio = np.concatenate([silence(0.5), say("turn on the lights"), silence(0.45),
                            say("in the kitchen"), silence(1.5)])
    updates = run(whisper, audio)
    k = kinds(updates)
    assert k.count(FINAL) == 1 and k.count(PAUSE) == 2
    first, second = (u for u in updates if u.kind == PAUSE)
    assert k.index(RESUME) < k.index(FINAL) and updates.index(first) < k.index(RESUME)
    assert wer("turn on the lights", first.text)[0] <= 1
    assert updates[-1].text == second.text and wer("turn on the lights in the kitchen", second.text)[0] <= 1


def test_pause_can_be_turned_off(whisper_files: dict[str, Path], vad_files: dict[str, Path], say) -> None:
    cfg = SttConfig(engine="vad-offline", endpoint_silence_s=0.8, partial_interval_s=1.0, pause_s=0.0)
    rec = make_recognizer(cfg, whisper_files, vad_files)
    try:
        updates = run(rec, np.concatenate([silence(0.5), say("turn on the lights"), silence(1.5)]))
    finally:
        rec.close()
    assert PAUSE not in kinds(updates) and kinds(updates)[-1] == FINAL and updates[-1].decode_s > 0


def test_streaming_pause_before_endpoint(streaming: Recognizer, say) -> None:
    updates = run(streaming, np.concatenate([silence(0.5), say("hello there how are you"), silence(1.5)]))
    k = kinds(updates)
    if FINAL not in k:
        pytest.skip("the random model decoded no words for this audio")
    assert PAUSE in k and k.index(PAUSE) < k.index(FINAL)
    # Every pause whose text did not stand is followed by a resume; the last one is the final's.
    pauses = [i for i, kind in enumerate(k) if kind == PAUSE]
    for i, j in zip(pauses, pauses[1:]):
        assert RESUME in k[i:j]
    pause, final = updates[pauses[-1]], updates[-1]
    assert pause.text == final.text and pause.audio_time < final.audio_time


def test_speech_that_ends_inside_the_preroll_is_not_a_question(whisper: Recognizer, say) -> None:
    tail = say("hey jarvis")[-int(0.3 * SAMPLE_RATE):]  # what the pre-roll holds of the wake word
    updates = run(whisper, np.concatenate([tail, silence(2.5)]), preroll_s=0.3)
    assert FINAL not in kinds(updates) and PAUSE not in kinds(updates), updates
    # ...and a question after it is still heard.
    updates = run(whisper, np.concatenate([tail, silence(1.2), say("what time is it"), silence(1.5)]),
                  preroll_s=0.3)
    assert kinds(updates)[-1] == FINAL and wer("what time is it", updates[-1].text)[0] == 0


# -- end of turn: the conversation moves the endpoint at a pause ------------------------------------

def _run_deciding(rec: Recognizer, audio: np.ndarray, decide: Callable[[int], float | None]) -> list[SttUpdate]:
    """Feed ``audio``; at the n-th pause call ``set_endpoint(decide(n))`` (None: leave it)."""
    cs = chunks(audio)
    rec.start(cs[:10])
    out: list[SttUpdate] = []
    pauses = 0
    for c in cs[10:]:
        for u in rec.accept(c):
            out.append(u)
            if u.kind == PAUSE:
                silence_s = decide(pauses)
                pauses += 1
                if silence_s is not None and (final := rec.set_endpoint(silence_s)) is not None:
                    out.append(final)
        if out and out[-1].kind == FINAL:
            break
    return out


@pytest.fixture(scope="module")
def whisper_turns(whisper_files: dict[str, Path], vad_files: dict[str, Path]) -> Iterator[Recognizer]:
    cfg = SttConfig(engine="vad-offline", endpoint_silence_s=0.8, partial_interval_s=1.0)
    rec = make_recognizer(cfg, whisper_files, vad_files, max_silence_s=1.8)
    yield rec
    rec.close()


def test_whisper_endpoint_moves_with_the_end_of_turn_decision(whisper_turns: Recognizer, say) -> None:
    audio = np.concatenate([silence(0.5), say("turn on the lights"), silence(1.1), say("in the kitchen"),
                            silence(2.5)])
    # Left alone, a 1.1 s pause inside the sentence ends the turn at the 0.8 s endpoint: a cut-off.
    cut = _run_deciding(whisper_turns, audio, lambda n: None)
    assert cut[-1].kind == FINAL and "kitchen" not in cut[-1].text.lower()
    # "Unfinished": the sentence is given 1.8 s, so the rest of it is heard.
    whole = _run_deciding(whisper_turns, audio, lambda n: 1.8 if n == 0 else None)
    assert whole[-1].kind == FINAL and RESUME in kinds(whole), kinds(whole)
    assert wer("turn on the lights in the kitchen", whole[-1].text)[0] <= 1, whole[-1].text
    # "Finished" at the second pause: the final comes at once, with that pause's words, long before
    # the endpoint silence.
    now = _run_deciding(whisper_turns, audio, lambda n: 1.8 if n == 0 else 0.0)
    pause, final = now[-2], now[-1]
    assert (pause.kind, final.kind) == (PAUSE, FINAL) and final.text == pause.text and final.decode_s == 0.0
    assert final.audio_time == pause.audio_time and final.speech_end is not None
    assert final.audio_time - final.speech_end < 0.5 < 0.8


def test_streaming_endpoint_moves_with_the_end_of_turn_decision(synth_files: dict[str, Path], say) -> None:
    rec = make_recognizer(SttConfig(engine="streaming", endpoint_silence_s=0.8), synth_files, None, max_silence_s=1.8)
    try:
        audio = np.concatenate([silence(0.5), say("hello there how are you"), silence(3.0)])
        default = _run_deciding(rec, audio, lambda n: None)
        later = _run_deciding(rec, audio, lambda n: 1.8)
        now = _run_deciding(rec, audio, lambda n: 0.0)
    finally:
        rec.close()
    wait = [u.audio_time - (u.speech_end or 0.0) for u in (default[-1], later[-1], now[-1])]
    assert [u.kind for u in (default[-1], later[-1], now[-1])] == [FINAL] * 3
    assert 0.8 <= wait[0] < 1.3 and 1.8 <= wait[1] < 2.3 and wait[2] < 0.8, wait
    assert now[-1].text == now[-2].text  # the pause's words, at the pause
