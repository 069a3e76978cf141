"""The whole pipeline on real dev-profile models: wake word → STT → LLM → TTS.

Conversations are spoken by the Piper dev voice (see ``voice.py``). The main test runs
``edge-voice simulate`` in a subprocess exactly as a user would; the others run the same
``simulate()`` in-process to look at the speaker's timeline.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from voice import Ears, conversation, wer, words

from edge.audio.wav import write_wav
from edge.config import load_config
from edge.knowledge import load_pack
from edge.simulate import simulate

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "config" / "dev.toml"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def ears() -> Ears:
    return Ears()


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def test_simulate_answers_a_spoken_question(tmp_path: Path, ears: Ears) -> None:
    wav = tmp_path / "conversation.wav"
    write_wav(wav, conversation(0.7, "Hey Jarvis.", 0.4, QUESTION, 1.5), 16000)
    out = tmp_path / "reply.wav"
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(wav), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    events = events_of(proc.stdout)
    assert len(of_type(events, "wake")) == 1
    assert of_type(events, "wake")[0]["word"] == "hey_jarvis"
    finals = of_type(events, "transcript.final")
    assert len(finals) == 1 and wer(QUESTION, finals[0]["text"]) <= 0.1, finals
    reply = of_type(events, "reply.final")[0]["text"]
    assert words(reply), "the reply has words"
    for kind in ("tts.start", "tts.end"):
        assert len(of_type(events, kind)) == 1
    end = of_type(events, "turn.end")[0]
    assert end["outcome"] == "done"
    timings = end["timings_ms"]
    for key in ("stt_final", "llm_first_token", "tts_first_audio", "end_of_speech_to_first_audio"):
        assert 0 < timings[key] < 30000, (key, timings)
    # Every event names its turn and its time.
    turn = end["turn_id"]
    assert all(e["turn_id"] == turn and e["time"] > 0 for e in events if e["type"] != "state")
    # The reply audio is there and says the reply.
    with wave.open(str(out)) as w:
        rate, audio = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    assert len(audio) / rate > 0.5
    heard = ears.hear(audio, rate)
    assert wer(reply, heard) <= 0.35, (reply, heard)


def test_speech_without_the_wake_word_gives_no_turn(tmp_path: Path) -> None:
    wav = tmp_path / "no-wake.wav"
    write_wav(wav, conversation(0.5, QUESTION, 0.5, "The quick brown fox jumps over the lazy dog.", 1.0), 16000)
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(wav))
    assert proc.returncode == 0, proc.stderr
    events = events_of(proc.stdout)
    assert not [e for e in events if e["type"] != "state"], events


def test_silence_and_noise_give_no_turn(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(16000 * 3) * 3000).astype(np.int16)
    wav = tmp_path / "noise.wav"
    write_wav(wav, np.concatenate([np.zeros(16000, np.int16), noise, np.zeros(16000, np.int16)]), 16000)
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(wav))
    assert proc.returncode == 0, proc.stderr
    assert not [e for e in events_of(proc.stdout) if e["type"] != "state"]


def test_barge_in_stops_the_reply_and_starts_a_new_turn(tmp_path: Path) -> None:
    cfg = load_config(DEV)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(
        cfg.llm, max_tokens=120,
        system_prompt="You are a storyteller. Always answer with a long story of at least five sentences."))
    # The second "hey jarvis" comes while the first (long) reply is being spoken.
    audio = conversation(0.5, "Hey Jarvis.", 0.4, "Tell me a story about a dragon.", 4.0,
                         "Hey Jarvis.", 0.4, QUESTION, 2.0)
    wav = tmp_path / "barge.wav"
    write_wav(wav, audio, 16000)
    result = simulate(cfg, wav, None)
    ev = [e.as_dict() for e in result.events]
    barge = of_type(ev, "barge_in")
    assert len(barge) == 1, [e["type"] for e in ev]
    assert len(of_type(ev, "wake")) == 2
    first_gen_blocks = [(t, n) for gen, t, n in result.played if gen == result.played[0][0]]
    stopped_at = max(t + n / result.reply_rate for t, n in first_gen_blocks)
    assert stopped_at - barge[0]["audio_time"] <= 0.15, (stopped_at, barge[0])
    interrupted = [e for e in of_type(ev, "tts.end") if e["interrupted"]]
    assert len(interrupted) == 1
    ends = of_type(ev, "turn.end")
    assert [e["outcome"] for e in ends] == ["barge_in", "done"]
    finals = of_type(ev, "transcript.final")
    assert wer(QUESTION, finals[-1]["text"]) <= 0.1


def test_streaming_engine_runs_in_the_pipeline(tmp_path: Path) -> None:
    """The production STT engine, on a random-weight streaming model: partials and an endpoint."""
    from synth_streaming import build_nemo_ctc_streaming

    from edge.app import load_stages
    from edge.config import SttConfig
    from edge.cpu import CpuPolicy
    from edge.stt import make_recognizer

    files = build_nemo_ctc_streaming(tmp_path / "stt")
    cfg = load_config(DEV)
    cfg = dataclasses.replace(cfg, stt=SttConfig(engine="streaming", model="synthetic", endpoint_silence_s=0.6))
    cpu = CpuPolicy()
    stages = load_stages(cfg, cpu, roles=("wake", "llm", "tts"))
    stages.recognizer = make_recognizer(cfg.stt, files, None, cpu=cpu)
    wav = tmp_path / "streaming.wav"
    write_wav(wav, conversation(0.5, "Hey Jarvis.", 0.4, QUESTION, 2.0), 16000)
    try:
        result = simulate(cfg, wav, None, stages=stages)
    finally:
        stages.close()
    kinds = [e.type.value for e in result.events]
    assert kinds.count("wake") == 1
    assert "transcript.partial" in kinds
    end = [e for e in result.events if e.type.value == "turn.end"][0]
    # Random weights give random text, maybe none; either way the turn ends cleanly.
    assert end.data["outcome"] in ("done", "no_speech")
    if end.data["outcome"] == "done":
        assert "reply.final" in kinds and "tts.end" in kinds


def test_a_long_pause_after_the_wake_word_keeps_the_question(tmp_path: Path) -> None:
    """People wait for the device after "hey jarvis" (more so with a chime): the pre-roll then
    holds only the wake word's tail, which must not end the turn before the question comes."""
    wav = tmp_path / "pause.wav"
    write_wav(wav, conversation(0.6, "Hey Jarvis.", 1.5, QUESTION, 1.5), 16000)
    result = simulate(load_config(DEV), wav, None)
    ev = [e.as_dict() for e in result.events]
    finals = of_type(ev, "transcript.final")
    assert len(finals) == 1 and wer(QUESTION, finals[0]["text"]) <= 0.1, finals
    assert [e["outcome"] for e in of_type(ev, "turn.end")] == ["done"]


PACK = REPO / "config" / "packs" / "harbour-museum"


def test_a_venue_answers_an_faq_question_from_ready_audio_and_others_from_its_facts(
        tmp_path: Path, ears: Ears, venue_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_VOICE_CACHE_DIR", str(venue_cache))  # answer audio and prompt state
    cfg = load_config(DEV)
    cfg = dataclasses.replace(cfg, knowledge=dataclasses.replace(cfg.knowledge, pack=str(PACK)))
    wav = tmp_path / "venue.wav"
    write_wav(wav, conversation(0.5, "Hey Jarvis.", 0.4, "How much is a ticket?", 11.0,
                                "Hey Jarvis.", 0.4, "Where can I park my bicycle?", 2.5), 16000)
    result = simulate(cfg, wav, None)
    ev = [e.as_dict() for e in result.events]
    replies = of_type(ev, "reply.final")
    assert [r["path"] for r in replies] == ["faq", "llm"], replies
    assert replies[0]["faq_id"] == "ticket-prices" and "12 pounds" in replies[0]["text"]
    ends = of_type(ev, "turn.end")
    assert [e["outcome"] for e in ends] == ["done", "done"] and [e["path"] for e in ends] == ["faq", "llm"]
    assert ends[0]["timings_ms"]["end_of_speech_to_first_audio"] > 0
    # The FAQ answer was heard as written: the audio made ahead of time, kept on disk for the next start.
    first = sum(n for gen, _, n in result.played if gen == result.played[0][0])  # the output's first reply
    assert result.reply_audio is not None
    said = ears.hear(result.reply_audio[:first], result.reply_rate)
    assert {"adult", "ticket", "pounds"} <= set(words(said)), said
    # (every answer's audio, and the fallback line's)
    assert len(list((venue_cache / "faq-audio").glob("*.npy"))) == len(load_pack(PACK).faq) + 1


def test_the_end_of_the_turn_is_decided_at_the_pause(tmp_path: Path) -> None:
    """A pause inside the sentence longer than the endpoint silence is not a cut-off when the LLM
    says the words so far are unfinished; a finished question ends at the pause, before the
    endpoint silence has passed."""
    cfg = load_config(DEV)
    # A slower endpoint than dev's, so that a loaded machine has time to read the view; the pause
    # inside the first question is longer still.
    cfg = dataclasses.replace(cfg, stt=dataclasses.replace(cfg.stt, endpoint_silence_s=1.0),
                              turn=dataclasses.replace(cfg.turn, max_silence_s=2.0))
    wav = tmp_path / "turns.wav"
    write_wav(wav, conversation(0.5, "Hey Jarvis.", 0.4, "Can you tell me,", 1.3, "where the nearest train station is?",
                                6.0, "Hey Jarvis.", 0.4, "How many legs does a spider have?", 2.5), 16000)
    ev = [e.as_dict() for e in simulate(cfg, wav, None, realtime=True).events]
    finals = of_type(ev, "transcript.final")
    assert len(finals) == 2, [e["type"] for e in ev]
    assert "train station" in finals[0]["text"].lower(), finals[0]  # the whole sentence, not "Can you tell me"
    assert finals[1]["end_of_turn"]["silence_s"] == 0.0, finals[1]
    assert finals[1]["end_of_turn"]["views"]["text"] >= cfg.turn.complete_at
    ends = of_type(ev, "turn.end")
    assert ends[1]["timings_ms"]["endpoint_delay"] < 1000 * cfg.stt.endpoint_silence_s, ends[1]["timings_ms"]
