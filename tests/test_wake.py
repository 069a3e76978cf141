"""Wake stage: real openWakeWord models on espeak-ng speech; sherpa-onnx KeywordSpotter on a
tiny transducer built here (no keyword-spotting model ships with the dev mirror)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from speech import chunks, say, silence, trim

from edge.audio.chunk import AudioChunk
from edge.config import WakeConfig
from edge.errors import ConfigError, ModelError, StageError
from edge.wake import Trigger, WakeHit, make_wake_detector

SR = 16000
VOICES = [("en-us", 150), ("en-gb", 150)]  # both peak above 0.99 on hey_jarvis_v0.1


def feed(det, audio: np.ndarray, size: int = 320, start: int = 0) -> list[WakeHit]:
    hits: list[WakeHit] = []
    for c in chunks(audio, size, start):
        hits += det.process(c)
    return hits


@pytest.fixture(scope="module")
def files(wake_dir: Path) -> dict[str, Path]:
    found = {p.name: p for p in wake_dir.glob("*.onnx")}
    if "hey_jarvis_v0.1.onnx" not in found:
        pytest.skip(f"openWakeWord models not found in {wake_dir}")
    return found


def oww(files: dict[str, Path], words: list[dict] | None = None, **kw):
    cfg = WakeConfig(words=words if words is not None else
                     [{"name": "hey_jarvis", "model": "hey_jarvis_v0.1.onnx"}], **kw)
    det = make_wake_detector(cfg, files)
    assert det is not None
    return det


# --- openWakeWord -------------------------------------------------------------------------------

@pytest.mark.parametrize("voice,rate", VOICES)
def test_wake_word_then_question_fires_once_at_the_end_of_the_word(files, voice, rate):
    det = oww(files)
    wake = trim(say("hey jarvis", voice, rate))
    audio = np.concatenate([silence(1.0), wake, silence(0.4),
                            say("what is the weather like today", voice, rate), silence(1.0)])
    hits = feed(det, audio)
    assert [h.word for h in hits] == ["hey_jarvis"]
    assert hits[0].score >= 0.5
    end = 1.0 + len(wake) / SR
    assert 1.0 < hits[0].audio_time and abs(hits[0].audio_time - end) <= 0.5
    det.close()


def test_speech_without_the_wake_word_fires_nothing(files):
    det = oww(files)
    audio = np.concatenate([
        silence(0.5), say("the quick brown fox jumps over the lazy dog"), silence(0.3),
        say("what time does the museum open tomorrow?", "en-gb"), silence(0.3),
        say("can you tell me where the nearest train station is", "en-us+f3"), silence(0.5)])
    peak = 0.0
    for i in range(0, len(audio) - 1279, 1280):
        peak = max(peak, det.scores(audio[i:i + 1280])[0])
    assert peak < 0.2
    det.reset()
    assert feed(det, audio) == []


@pytest.mark.parametrize("apart,refractory,expected", [(1.0, 2.0, 1), (3.0, 2.0, 2)])
def test_refractory_period(files, apart, refractory, expected):
    wake = trim(say("hey jarvis"))  # starts of the two utterances ``apart`` seconds apart
    audio = np.concatenate([silence(1.0), wake, silence(apart - len(wake) / SR), wake, silence(1.0)])
    det = oww(files, [{"name": "jarvis", "model": "hey_jarvis_v0.1.onnx", "refractory_s": refractory}])
    hits = feed(det, audio)
    assert len(hits) == expected
    assert hits[-1].audio_time - hits[0].audio_time == pytest.approx(apart if expected == 2 else 0, abs=0.25)
    # Control: without a refractory period the second word fires too.
    det = oww(files, [{"name": "jarvis", "model": "hey_jarvis_v0.1.onnx", "refractory_s": 0.0}])
    assert len(feed(det, audio)) >= 2


def test_a_score_that_stays_high_fires_once_even_without_refractory(files):
    det = oww(files, [{"name": "jarvis", "model": "hey_jarvis_v0.1.onnx", "refractory_s": 0.0,
                       "threshold": 0.3}])
    wake = say("hey jarvis", "en-gb")
    audio = np.concatenate([silence(1.0), wake, silence(1.0)])
    above = sum(det.scores(audio[i:i + 1280])[0] >= 0.3 for i in range(0, len(audio) - 1279, 1280))
    assert above >= 2  # the word holds the score up for several frames...
    det.reset()
    assert len(feed(det, audio)) == 1  # ...and still fires once


def test_reset_forgets_buffered_audio(files):
    wake = say("hey jarvis")
    audio = np.concatenate([silence(1.0), wake, silence(0.4), say("what is the weather like today")])
    det = oww(files)
    hit = feed(det, audio)[0]
    # Stop two frames before the detection frame, reset, then play the rest.
    cut = int(hit.audio_time * SR) - 2 * 1280
    det.reset()
    assert feed(det, audio[:cut]) == []
    det.reset()
    assert feed(det, audio[cut:], start=cut) == []
    # Without the reset the same split fires: the reset is what suppressed it.
    det.reset()
    assert len(feed(det, audio[:cut]) + feed(det, audio[cut:], start=cut)) == 1
    # After a reset the detector works again, on the timeline where the audio sits.
    det.reset()
    later = 60 * SR
    again = feed(det, np.concatenate([silence(1.0), wake, silence(0.5)]), start=later)
    assert [h.word for h in again] == ["hey_jarvis"]
    assert again[0].audio_time == pytest.approx(later / SR + hit.audio_time, abs=0.1)


@pytest.mark.parametrize("size", [1280, 1000, 4000, 77, 2560 + 320])
def test_any_chunk_size_gives_the_same_hits(files, size):
    audio = np.concatenate([silence(1.0), say("hey jarvis", "en-gb"), silence(0.5),
                            say("what is the weather like today"), silence(0.5), say("hey jarvis"), silence(1.0)])
    words = [{"name": "hey_jarvis", "model": "hey_jarvis_v0.1.onnx", "refractory_s": 0.0}]
    reference = feed(oww(files, words), audio, 320)
    assert len(reference) == 2
    det = oww(files, words)
    assert feed(det, audio, size) == reference
    det.reset()
    shifted = feed(det, audio, size, start=123 * SR)
    assert [(h.word, h.score) for h in shifted] == [(h.word, h.score) for h in reference]
    assert [h.audio_time - 123 for h in shifted] == pytest.approx([h.audio_time for h in reference])


def test_several_words_including_a_multi_class_model(files):
    det = oww(files, [{"name": "jarvis", "model": "hey_jarvis_v0.1.onnx"},
                      {"name": "timer", "model": "timer_v0.1.onnx", "threshold": 0.5}])
    audio = np.concatenate([silence(1.0), say("hey jarvis"), silence(1.0),
                            say("set a timer for five minutes", "en-gb"), silence(1.5)])
    assert [h.word for h in feed(det, audio)] == ["jarvis", "timer"]


def test_custom_model_path(files, tmp_path):
    custom = tmp_path / "kiosk_word_v2.onnx"
    shutil.copy(files["hey_jarvis_v0.1.onnx"], custom)
    det = oww(files, [{"name": "", "model": str(custom)}])
    hits = feed(det, np.concatenate([silence(1.0), say("hey jarvis"), silence(1.0)]))
    assert [h.word for h in hits] == ["kiosk_word"]  # named after the file, less its version


def test_bad_model_files_raise_model_error_naming_the_file(files, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model" * 40)
    with pytest.raises(ModelError, match="garbage.onnx") as err:
        oww(files, [{"name": "x", "model": str(garbage)}])
    assert err.value.code == "model.invalid"

    # A real ONNX model with the wrong shapes: the mel model in a word's place.
    wrong = tmp_path / "wrong_shape.onnx"
    shutil.copy(files["melspectrogram.onnx"], wrong)
    with pytest.raises(ModelError, match="wrong_shape.onnx.*input") as err:
        oww(files, [{"name": "x", "model": str(wrong)}])

    with pytest.raises(ModelError, match="nope.onnx") as err:
        oww(files, [{"name": "x", "model": "nope.onnx"}])
    assert err.value.code == "model.missing"

    partial = {k: v for k, v in files.items() if k != "embedding_model.onnx"}
    with pytest.raises(ModelError, match="embedding_model.onnx"):
        oww(partial)


def test_word_model_with_wrong_output_is_rejected(files, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 96])])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    with pytest.raises(ModelError, match="identity.onnx.*output"):
        oww(files, [{"name": "x", "model": str(path)}])


def test_config_mistakes(files):
    with pytest.raises(ConfigError, match="no wake words"):
        oww(files, [])
    with pytest.raises(ConfigError, match="used twice"):
        oww(files, [{"name": "a", "model": "hey_jarvis_v0.1.onnx"}, {"name": "a", "model": "alexa_v0.1.onnx"}])
    with pytest.raises(ConfigError, match=r"wake.words\[0\].model"):
        oww(files, [{"name": "a", "model": ""}])
    assert make_wake_detector(WakeConfig(engine="none"), files) is None


def test_wrong_rate_and_closed_detector(files):
    det = oww(files)
    with pytest.raises(StageError, match="16000 Hz"):
        det.process(AudioChunk(np.zeros(160, np.int16), 0, 8000))
    assert det.process(AudioChunk(np.zeros(0, np.int16), 0)) == []
    det.close()
    det.close()
    with pytest.raises(StageError, match="closed"):
        det.process(AudioChunk(np.zeros(320, np.int16), 0))


def test_cpu_cost_per_second_of_audio(files):
    det = oww(files)
    audio = np.concatenate([say("the quick brown fox jumps over the lazy dog"), silence(1.0)] * 3)
    feed(det, audio[:SR])  # warm up onnxruntime
    t0 = time.process_time()
    feed(det, audio)
    cpu = time.process_time() - t0
    share = cpu / (len(audio) / SR)
    print(f"openWakeWord, 1 word: {100 * share:.2f}% of a core")
    assert share < 0.05  # the whole wake + VAD budget; measured about 1% on x86_64


def test_scores_match_the_openwakeword_package(files):
    """The openwakeword package (0.6.x, a test dependency; the daemon does not need it) scores alike."""
    import openwakeword
    audio = np.concatenate([silence(2.0), say("hey jarvis"), silence(1.0),
                            say("what is the weather like today"), silence(1.0)])
    ref = openwakeword.Model(wakeword_models=[str(files["hey_jarvis_v0.1.onnx"])], inference_framework="onnx",
                             melspec_model_path=str(files["melspectrogram.onnx"]),
                             embedding_model_path=str(files["embedding_model.onnx"]))
    det = oww(files)
    theirs, ours = [], []
    for i in range(0, len(audio) - 1279, 1280):
        theirs.append(ref.predict(audio[i:i + 1280])["hey_jarvis_v0.1"])
        ours.append(det.scores(audio[i:i + 1280])[0])
    # Both start from filler (openwakeword's is unseeded noise); from 2 s on, only audio counts.
    assert np.allclose(ours[25:], theirs[25:], atol=1e-4)
    assert max(ours) > 0.5


def test_trigger_logic():
    t = Trigger(0.5, 2.0)
    assert [t.score(s, x) for s, x in [(0.1, 0.0), (0.6, 0.1), (0.9, 0.2), (0.2, 0.3), (0.7, 1.0), (0.1, 1.5),
                                        (0.7, 2.1), (0.8, 2.2)]] == [False, True, False, False, False, False,
                                                                     True, False]
    t.reset()
    assert t.score(0.9, 2.3)  # reset forgets the refractory period too
    assert t.event(10.0) and not t.event(11.0) and t.event(12.1)


# --- sherpa-onnx KeywordSpotter ---------------------------------------------------------------------

TOKENS = ["<blk>", "<unk>", "▁HE", "Y", "▁J", "AR", "VI", "S", "▁THE", "▁A"]
# The tiny model's decoder predicts the next token of this chain from the last one, so it spells
# ▁HE Y ▁J AR VI S whatever it hears: enough to drive sherpa's whole keyword path.
CHAIN = ["<blk>", "▁HE", "Y", "▁J", "AR", "VI", "S", "<blk>"]
JARVIS = "▁HE Y ▁J AR VI S @HEY_JARVIS"


def build_tiny_transducer(d: Path, encoder_meta: dict | None = None, decoder_meta: dict | None = None,
                          T: int = 16) -> dict[str, Path]:
    """An LSTM-type streaming transducer (sherpa's online-lstm-transducer-model.cc contract) with
    random encoder weights: x (N, T, 80), h, c -> encoder_out (N, T/4, V), next_h, next_c."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    def save(graph, name: str, meta: dict) -> None:
        m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
        for k, v in meta.items():
            if v is not None:
                m.metadata_props.add(key=k, value=str(v))
        onnx.save(m, str(d / name))

    V, sub, rng = len(TOKENS), T // 4, np.random.default_rng(0)
    enc = oh.make_graph(
        [oh.make_node("Reshape", ["x", "shape"], ["xr"]), oh.make_node("MatMul", ["xr", "W"], ["encoder_out"]),
         oh.make_node("Identity", ["h"], ["next_h"]), oh.make_node("Identity", ["c"], ["next_c"])], "encoder",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["N", T, 80]),
         oh.make_tensor_value_info("h", TP.FLOAT, [1, "N", 8]), oh.make_tensor_value_info("c", TP.FLOAT, [1, "N", 8])],
        [oh.make_tensor_value_info("encoder_out", TP.FLOAT, ["N", sub, V]),
         oh.make_tensor_value_info("next_h", TP.FLOAT, [1, "N", 8]),
         oh.make_tensor_value_info("next_c", TP.FLOAT, [1, "N", 8])],
        [nh.from_array((rng.standard_normal((320, V)) * 0.01).astype(np.float32), "W"),
         nh.from_array(np.array([-1, sub, 320], np.int64), "shape")])
    save(enc, "encoder-tiny.onnx", {"model_type": "lstm", "num_encoder_layers": 1, "T": T, "decode_chunk_len": T,
                                    "rnn_hidden_size": 8, "d_model": 8, **(encoder_meta or {})})
    table = np.zeros((V, V), np.float32)
    table[:, 0] = 12.0
    for a, b in zip(CHAIN, CHAIN[1:]):
        table[TOKENS.index(a)] = 0.0
        table[TOKENS.index(a), TOKENS.index(b)] = 12.0
    dec = oh.make_graph(
        [oh.make_node("Gather", ["y", "last"], ["yl"], axis=1), oh.make_node("Gather", ["E", "yl"], ["decoder_out"])],
        "decoder", [oh.make_tensor_value_info("y", TP.INT64, ["N", 2])],
        [oh.make_tensor_value_info("decoder_out", TP.FLOAT, ["N", V])],
        [nh.from_array(table, "E"), nh.from_array(np.array(1, np.int64), "last")])
    save(dec, "decoder-tiny.onnx", {"vocab_size": V, "context_size": 2, **(decoder_meta or {})})
    join = oh.make_graph(
        [oh.make_node("Tanh", ["encoder_out"], ["te"]), oh.make_node("MatMul", ["te", "Wj"], ["pe"]),
         oh.make_node("Add", ["pe", "decoder_out"], ["logit"])], "joiner",
        [oh.make_tensor_value_info("encoder_out", TP.FLOAT, ["N", V]),
         oh.make_tensor_value_info("decoder_out", TP.FLOAT, ["N", V])],
        [oh.make_tensor_value_info("logit", TP.FLOAT, ["N", V])],
        [nh.from_array((rng.standard_normal((V, V)) * 0.5).astype(np.float32), "Wj")])
    save(join, "joiner-tiny.onnx", {})
    (d / "tokens.txt").write_text("".join(f"{t} {i}\n" for i, t in enumerate(TOKENS)), encoding="utf-8")
    return {p.name: p for p in d.iterdir()}


@pytest.fixture()
def tiny_kws(tmp_path: Path) -> dict[str, Path]:
    pytest.importorskip("sherpa_onnx")
    return build_tiny_transducer(tmp_path)


def kws(files: dict[str, Path], keywords: list[str] | None = None):
    det = make_wake_detector(WakeConfig(engine="kws", model="tiny-kws",
                                        keywords=[JARVIS] if keywords is None else keywords), files)
    assert det is not None
    return det


def test_kws_loads_and_runs_on_speech(tiny_kws):
    det = kws(tiny_kws, [JARVIS, "▁THE ▁A @THE_A"])
    audio = np.concatenate([silence(0.5), say("hey jarvis"), silence(0.5), say("what is the weather like today")])
    hits = feed(det, audio)
    # The tiny model spells HEY_JARVIS every ~0.3 s; the 2 s refractory period spaces the hits.
    assert hits and {h.word for h in hits} == {"HEY_JARVIS"}
    times = [h.audio_time for h in hits]
    assert len(hits) >= 2 and all(2.0 <= b - a < 2.5 for a, b in zip(times, times[1:]))
    assert 0 < times[0] <= 0.5 and times[-1] <= len(audio) / SR
    # Reset starts a new stream at wherever the audio sits on the timeline.
    det.reset()
    later = feed(det, silence(1.0), start=100 * SR)
    assert later and later[0].audio_time == pytest.approx(100 + times[0], abs=0.05)
    det.close()
    with pytest.raises(StageError, match="closed"):
        det.process(AudioChunk(np.zeros(320, np.int16), 0))


def test_kws_keywords_the_model_never_spells_do_not_fire(tiny_kws):
    det = kws(tiny_kws, ["▁THE ▁A :2.0 #0.2 @THE_A"])
    assert feed(det, np.concatenate([silence(0.5), say("the a"), silence(1.0)])) == []


def test_kws_keywords_from_the_models_keywords_file(tiny_kws, tmp_path):
    (tmp_path / "keywords.txt").write_text(JARVIS + "\n", encoding="utf-8")
    files = {**tiny_kws, "keywords.txt": tmp_path / "keywords.txt"}
    assert [h.word for h in feed(kws(files, []), silence(1.0))] == ["HEY_JARVIS"]


def test_kws_keyword_errors_name_the_keyword(tiny_kws):
    with pytest.raises(ConfigError, match=r"wake.keywords\[1\]: 'JARVIS' is not a token"):
        kws(tiny_kws, [JARVIS, "▁HE Y JARVIS @X"])
    with pytest.raises(ConfigError, match=r"threshold"):
        kws(tiny_kws, ["▁HE Y #1.5"])
    with pytest.raises(ConfigError, match=r"no tokens"):
        kws(tiny_kws, ["@ONLY_A_NAME"])
    with pytest.raises(ConfigError, match=r"one keyword as a line"):
        kws(tiny_kws, [JARVIS + "\n▁THE ▁A"])
    with pytest.raises(ConfigError, match=r"no keywords configured"):
        kws(tiny_kws, [])


@pytest.mark.parametrize("encoder_meta,decoder_meta,match", [
    ({"d_model": None}, {}, "encoder-tiny.onnx.*'d_model'"),
    ({"model_type": None}, {}, "encoder-tiny.onnx.*no model_type"),
    ({"model_type": "transformer"}, {}, "model_type 'transformer'"),
    ({"T": "sixteen"}, {}, "T='sixteen'"),
    ({}, {"vocab_size": None}, "decoder-tiny.onnx.*'vocab_size'"),
    ({}, {"vocab_size": 5}, "tokens.txt.*5 tokens"),
])
def test_kws_metadata_checked_before_sherpa_would_exit(tmp_path, encoder_meta, decoder_meta, match):
    # sherpa-onnx ends the process with status 255 on each of these; we must raise instead.
    files = build_tiny_transducer(tmp_path, encoder_meta, decoder_meta)
    with pytest.raises(ModelError, match=match):
        kws(files)


def test_kws_missing_or_broken_files(tiny_kws, tmp_path):
    with pytest.raises(ModelError, match="joiner"):
        kws({k: v for k, v in tiny_kws.items() if "joiner" not in k})
    with pytest.raises(ModelError, match="tokens.txt"):
        kws({k: v for k, v in tiny_kws.items() if k != "tokens.txt"})
    broken = tmp_path / "joiner-broken.onnx"
    broken.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ModelError, match="joiner-broken.onnx.*not an ONNX model"):
        kws({**{k: v for k, v in tiny_kws.items() if "joiner" not in k}, "joiner-broken.onnx": broken})
    (tmp_path / "encoder-tiny.int8.onnx").write_bytes(tiny_kws["encoder-tiny.onnx"].read_bytes())
    det = kws({**tiny_kws, "encoder-tiny.int8.onnx": tmp_path / "encoder-tiny.int8.onnx"})
    det.close()


def test_onnx_metadata_reader_agrees_with_onnx(files, tiny_kws):
    onnx = pytest.importorskip("onnx")
    from edge.onnxmeta import read_onnx_metadata

    for path in (tiny_kws["encoder-tiny.onnx"], tiny_kws["decoder-tiny.onnx"], files["hey_jarvis_v0.1.onnx"]):
        expected = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert read_onnx_metadata(path) == expected
    with pytest.raises(ModelError):
        read_onnx_metadata(tiny_kws["tokens.txt"])
