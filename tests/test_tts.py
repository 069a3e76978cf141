"""Text-to-speech with the real dev Piper voice, checked by ear (Whisper tiny.en)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge.audio.chunk import resample
from edge.config import TtsConfig
from edge.errors import ConfigError, ModelError, StageError
from edge.models.piper import prepare_piper_voice
from edge.signals import CancelScope
from edge.tts import make_synthesizer
from edge.tts.phonemize import Phonemizer
from edge.tts.sherpa import SherpaSynthesizer, check_tokens
from edge.tts.text import normalize_for_speech

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def piper_voice(piper_raw, tmp_path_factory) -> dict[str, Path]:
    out = prepare_piper_voice(piper_raw["onnx"], piper_raw["json"], tmp_path_factory.mktemp("piper-voice"))
    return {"model.onnx": out["model"], "tokens.txt": out["tokens"]}


@pytest.fixture(scope="module")
def synth(piper_voice):
    s = make_synthesizer(TtsConfig(num_threads=1), piper_voice)
    yield s
    s.close()


@pytest.fixture(scope="module")
def whisper(whisper_paths):
    import sherpa_onnx

    rec = sherpa_onnx.OfflineRecognizer.from_whisper(
        encoder=str(whisper_paths["encoder"]), decoder=str(whisper_paths["decoder"]),
        tokens=str(whisper_paths["tokens"]), language="en", task="transcribe", num_threads=1)

    def transcribe(pcm: np.ndarray, rate: int) -> str:
        audio = resample(pcm, rate, 16000)
        # Whisper drops a first word that starts with no leading silence.
        audio = np.concatenate([np.zeros(4800, np.int16), audio, np.zeros(4800, np.int16)])
        stream = rec.create_stream()
        stream.accept_waveform(16000, audio.astype(np.float32) / 32768.0)
        rec.decode_stream(stream)
        return stream.result.text

    return transcribe


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def speak(synth, text: str, cancel: threading.Event | None = None) -> list[np.ndarray]:
    return list(synth.synthesize(text, cancel or CancelScope()))


def test_hello(synth):
    pieces = speak(synth, "Hello, how can I help you today?")
    assert synth.sample_rate == 22050
    assert pieces and all(p.dtype == np.int16 and p.ndim == 1 for p in pieces)
    pcm = np.concatenate(pieces)
    seconds = len(pcm) / synth.sample_rate
    assert 1.0 < seconds < 4.0  # seven words, spoken
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300  # not silence
    stats = synth.last_stats
    assert stats.samples == len(pcm) and stats.sentences == stats.generated == 1
    assert stats.first_audio_s is not None and stats.elapsed_s > 0
    print(f"\nsynthesis real-time factor {stats.rtf:.3f}, first audio after {stats.first_audio_s:.3f} s")


@pytest.mark.parametrize("text", [
    "Hello, how can I help you today?",
    "The museum opens early in the morning and closes late in the evening.",
    "**Welcome!** Ask me about the exhibits 😀, the shop, or the cafe.",
])
def test_intelligible(synth, whisper, text):
    pcm = np.concatenate(speak(synth, text))
    heard = words(whisper(pcm, synth.sample_rate))
    expected = words(normalize_for_speech(text))
    missing = [w for w in expected if w not in heard]
    assert len(missing) <= len(expected) // 10, f"heard {heard}, missing {missing}"


def test_money_and_abbreviations_are_read_as_words(synth, whisper):
    pcm = np.concatenate(speak(synth, "Dr. Smith paid $3.50, e.g. for a coffee."))
    heard = " ".join(words(whisper(pcm, synth.sample_rate)))
    assert "smith" in heard and "coffee" in heard
    assert "3.50" in heard or "3 50" in heard or "three dollars" in heard or "3 dollars" in heard
    assert "for example" in heard


def test_streams_each_sentence_as_it_is_ready(synth):
    text = ("Yes, I can do that. The second sentence is a good deal longer, so that the model needs "
            "noticeably more time to say every single word of it.")
    started = time.monotonic()
    arrivals = []
    for pcm in synth.synthesize(text, CancelScope()):
        arrivals.append((time.monotonic() - started, len(pcm)))
    stats = synth.last_stats
    assert stats.sentences == 2 and len(arrivals) == 2
    # The first sentence's audio reached us before the whole text was synthesized.
    assert arrivals[0][0] < stats.elapsed_s
    assert stats.first_audio_s < stats.elapsed_s * 0.6
    assert arrivals[1][1] > arrivals[0][1]


def test_cancel_stops_generation_early(synth):
    text = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 9))
    cancel = CancelScope()
    got = []
    for pcm in synth.synthesize(text, cancel):
        got.append(pcm)
        cancel.set()
    assert len(got) == 1
    assert synth.wait_idle(10.0)
    stats = synth.last_stats
    assert stats.cancelled and stats.sentences == 8 and stats.generated <= 2
    # And the synthesizer is ready for the next turn.
    assert speak(synth, "Okay then.")


def test_cancel_before_start_and_leaving_early(synth):
    cancel = CancelScope()
    cancel.set()
    assert speak(synth, "Nothing to hear here.", cancel) == []
    gen = synth.synthesize("First sentence here. Second sentence here. Third one here.", CancelScope())
    assert next(gen).size > 0
    gen.close()  # a consumer that stops listening stops the worker too
    assert synth.wait_idle(10.0)
    assert synth.last_stats.generated < 3


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "** 😀 👍 **", "..."])
def test_nothing_to_say_gives_nothing(synth, text):
    assert speak(synth, text) == []


def test_text_without_phonemes_is_an_error_not_silence(synth):
    class NoPhonemes:
        voice = "en-us"

        def phonemize(self, text: str) -> list[list[int]]:
            return [[ord(",")], []]

    silent = SherpaSynthesizer(synth._tts, NoPhonemes(), language="en")
    with pytest.raises(StageError) as err:
        speak(silent, "Hello there.")
    assert err.value.code == "tts.empty"


def test_speed(piper_voice, synth):
    text = "The museum opens early in the morning."
    normal = sum(len(p) for p in speak(synth, text))
    fast = make_synthesizer(TtsConfig(speed=1.5), piper_voice)
    try:
        quick = sum(len(p) for p in speak(fast, text))
    finally:
        fast.close()
    assert 0.55 < quick / normal < 0.8


def test_closed_synthesizer(piper_voice):
    s = make_synthesizer(TtsConfig(), piper_voice)
    s.close()
    s.close()
    with pytest.raises(StageError):
        speak(s, "Hello.")


# --- files checked before sherpa-onnx sees them ------------------------------------------------

def test_model_without_metadata_is_a_model_error_not_an_exit(piper_raw, piper_voice):
    # sherpa-onnx would end the process with status 255: run it where that cannot take pytest down.
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from edge.config import TtsConfig\n"
        "from edge.errors import ModelError\n"
        "from edge.tts import make_synthesizer\n"
        "try:\n"
        "    make_synthesizer(TtsConfig(), {'model.onnx': Path(sys.argv[1]), 'tokens.txt': Path(sys.argv[2])})\n"
        "except ModelError as err:\n"
        "    print(json.dumps(err.as_dict()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(piper_raw["onnx"]), str(piper_voice["tokens.txt"])],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    err = json.loads(proc.stdout)
    assert err["code"] == "model.invalid"
    assert str(piper_raw["onnx"]) in err["message"] and "'sample_rate'" in err["message"]


def test_missing_files(piper_voice, tmp_path):
    with pytest.raises(ModelError) as err:
        make_synthesizer(TtsConfig(), {"model.onnx": piper_voice["model.onnx"]})
    assert err.value.code == "model.missing" and "tokens.txt" in str(err.value)
    with pytest.raises(ModelError) as err:
        make_synthesizer(TtsConfig(), {"model.onnx": tmp_path / "gone.onnx", "tokens.txt": piper_voice["tokens.txt"]})
    assert err.value.code == "model.missing"


def test_model_named_after_the_voice(piper_voice, tmp_path):
    named = tmp_path / "en_US-joe-medium.onnx"
    named.symlink_to(piper_voice["model.onnx"])
    s = make_synthesizer(TtsConfig(), {"en_US-joe-medium.onnx": named, "tokens.txt": piper_voice["tokens.txt"]})
    try:
        assert s.sample_rate == 22050
    finally:
        s.close()


def test_not_an_onnx_model(piper_voice, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    with pytest.raises(ModelError, match="not an ONNX model"):
        make_synthesizer(TtsConfig(), {"model.onnx": bad, "tokens.txt": piper_voice["tokens.txt"]})


@pytest.mark.parametrize("content,why", [
    ("_ 0\n^ 1\nab 2\n", "line 3"),
    ("_ 0\n^ 1\n$ x\n", "line 3"),
    ("_ 0\n_ 1\n", "line 2"),
    ("", "empty"),
    ("_ 0\n^ 1\n  2\n", "lacks"),
])
def test_bad_tokens_file(piper_voice, tmp_path, content, why):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(content, encoding="utf-8")
    with pytest.raises(ModelError, match=why):
        make_synthesizer(TtsConfig(), {"model.onnx": piper_voice["model.onnx"], "tokens.txt": tokens})


def test_tokens_file_of_the_prepared_voice_is_accepted(piper_voice):
    symbols = check_tokens(piper_voice["tokens.txt"], required="_^$")
    assert " " in symbols and "ə" in symbols


def test_speaker_id_out_of_range(piper_voice):
    with pytest.raises(ConfigError, match="tts.speaker_id"):
        make_synthesizer(TtsConfig(speaker_id=3), piper_voice)


# --- phonemizer and text --------------------------------------------------------------------------

def test_phonemizer():
    p = Phonemizer("en-us")
    sentences = p.phonemize("Hello there. How are you?")
    assert len(sentences) == 2
    assert all(isinstance(c, int) for s in sentences for c in s)
    assert "".join(map(chr, sentences[0])).startswith("h")
    assert p.phonemize("") == [] and p.phonemize("  ") == []
    with pytest.raises(ModelError):
        Phonemizer("xx-not-a-voice")


def test_phonemizer_is_safe_across_threads():
    p, q = Phonemizer("en-us"), Phonemizer("en-gb-x-rp")
    texts = [f"Sentence number {i} is about the {w} today." for i, w in enumerate(["weather", "museum", "shop"] * 5)]
    expected = {("us", t): p.phonemize(t) for t in texts} | {("gb", t): q.phonemize(t) for t in texts}
    results: dict = {}

    def work(name, ph):
        for t in texts * 3:
            results.setdefault((name, t), []).append(ph.phonemize(t))

    threads = [threading.Thread(target=work, args=a) for a in (("us", p), ("gb", q))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r == expected[k] for k, runs in results.items() for r in runs)
    assert expected[("us", texts[0])] != expected[("gb", texts[0])]


@pytest.mark.parametrize("text,expected", [
    ("It costs $3.50.", "It costs 3 dollars and 50 cents."),
    ("Only $1 today", "Only 1 dollar today"),
    ("A $5 million grant", "A 5 million dollars grant"),
    ("Tickets are €12 or £1.01", "Tickets are 12 euros or 1 pound and 1 penny"),
    ("Price: $1,200.00", "Price: 1,200 dollars"),
    ("Dr. Smith said so", "Doctor Smith said so"),
    ("Mr. Brown, e.g. him", "Mister Brown, for example, him"),
    ("cats vs. dogs", "cats versus dogs"),
    ("**Bold** and 😀 emoji", "Bold and emoji"),
])
def test_normalize_for_speech(text, expected):
    assert normalize_for_speech(text) == expected


def test_normalize_leaves_other_languages_alone():
    assert normalize_for_speech("Dr. Müller zahlt $3.50", "de") == "Dr. Müller zahlt $3.50"
