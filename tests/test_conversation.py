"""The conversation state machine with fakes that implement the real stage protocols.

Audio is tagged by content: every sample of a chunk carries a code (0 silence, 1 wake word,
2 speech), so the fakes decide from the audio itself, as the real models do. Every wait
has a timeout. Real models run in the pipeline tests; this file is about the logic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from edge.audio.chunk import AudioChunk
from edge.audio.playback import WavSpeaker
from edge.config import Config, ConversationConfig
from edge.conversation import Conversation, State
from edge.errors import StageError
from edge.events import EventBus
from edge.llm.base import ReplyStats
from edge.simulate import FeedClock, feed_wav
from edge.stt.base import SttUpdate, UpdateKind
from edge.wake.base import WakeHit

SILENCE, WAKE, SPEECH = 0, 1, 2


def Upd(kind: str, text: str, audio_time: float, speech_end: float | None = None) -> SttUpdate:  # noqa: N802
    return SttUpdate(UpdateKind(kind), text, audio_time, speech_end)


class FakeWake:
    """A WakeDetector that fires once at the end of a run of wake-tagged audio."""

    def __init__(self) -> None:
        self.in_word = False
        self.resets = 0

    def process(self, chunk: AudioChunk) -> list[WakeHit]:
        tagged = bool(chunk.samples[0] == WAKE)
        fired = self.in_word and not tagged
        self.in_word = tagged
        return [WakeHit("hey_test", 0.9, chunk.start_s)] if fired else []

    def reset(self) -> None:
        self.in_word = False
        self.resets += 1

    def close(self) -> None:
        pass


class FakeRecognizer:
    """A Recognizer that counts speech chunks as words; endpoint after 10 silent chunks (200 ms).

    With ``pause_after`` it also reports a pause after that many silent chunks, and a
    resume when speech comes back before the endpoint.
    """

    sample_rate = 16000

    def __init__(self, pause_after: int = 0) -> None:
        self.words = 0
        self.silent = 0
        self.started = 0
        self.speech_end: float | None = None
        self.pause_after = pause_after
        self.paused = False

    def start(self, preroll: list[AudioChunk]) -> None:
        self.words, self.silent, self.speech_end = 0, 0, None
        self.started += 1

    def accept(self, chunk: AudioChunk) -> list[SttUpdate]:
        out = []
        if chunk.samples[0] == SPEECH:
            if self.words == 0:
                out.append(Upd("speech_start", "", chunk.start_s))
            if self.paused:
                self.paused = False
                out.append(Upd("resume", "", chunk.start_s))
            self.words += 1
            self.silent = 0
            self.speech_end = chunk.end_s
            if self.words % 5 == 0:
                out.append(Upd("partial", self.text(), chunk.end_s))
        elif self.words:
            self.silent += 1
            if self.pause_after and self.silent == self.pause_after:
                self.paused = True
                out.append(Upd("pause", self.text(), chunk.end_s, self.speech_end))
            if self.silent == 10:
                self.paused = False
                out.append(Upd("final", self.text(), chunk.end_s, self.speech_end))
                self.words = 0
        return out

    def text(self) -> str:
        return " ".join(["word"] * self.words)

    def finish(self) -> SttUpdate | None:
        if self.words:
            return Upd("final", self.text(), self.speech_end or 0.0, self.speech_end)
        return None

    def transcribe(self, samples: np.ndarray) -> tuple[str, float]:
        return " ".join(["word"] * int(np.sum(samples == SPEECH) // 320)), 0.0

    def close(self) -> None:
        pass


class FakeChat:
    """A ChatModel that says ``reply`` a word at a time, ``delay`` seconds a word."""

    def __init__(self, reply: str = "Sure, here is a short answer. And a second sentence.",
                 delay: float = 0.005, fail: bool = False, later: str | None = None) -> None:
        self.reply = reply
        self.later = later  # the reply to every call after the first
        self.delay = delay
        self.fail = fail
        self.prefills: list[str] = []
        self.calls: list[tuple[list, str]] = []
        self.systems: list[str | None] = []
        self.stopped_by_cancel = threading.Event()
        self.words_said = 0
        self.last_stats = ReplyStats()

    def warm(self, system_prompt: str) -> None:
        pass

    def prefill(self, history, user_text: str, cancel=None, *, system=None) -> None:
        self.prefills.append(user_text)
        self.prefill_cancel = cancel

    def stream(self, history, user_text, *, cancel, max_tokens=None, deadline=None, system=None):
        self.calls.append((list(history), user_text))
        self.systems.append(system)
        self.last_stats = ReplyStats()
        if self.fail:
            raise StageError("model exploded", code="llm.failed")
        reply = self.later if self.later is not None and len(self.calls) > 1 else self.reply
        for word in reply.split(" ") if reply else []:
            if cancel.is_set():
                self.stopped_by_cancel.set()
                return
            time.sleep(self.delay)
            self.words_said += 1
            self.last_stats.generated_tokens += 1
            yield word + " "

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def forget(self) -> None:
        pass

    def set_sampling(self, *, temperature=None, top_p=None) -> None:
        pass

    def close(self) -> None:
        pass


class FakeSynth:
    """A Synthesizer: ``seconds_per_word`` of audio per word, produced at once."""

    sample_rate = 16000

    def __init__(self, seconds_per_word: float = 0.05) -> None:
        self.spw = seconds_per_word
        self.texts: list[str] = []
        self.cancelled = threading.Event()

    def synthesize(self, text: str, cancel):
        self.texts.append(text)
        for _ in text.split():
            if cancel.is_set():
                self.cancelled.set()
                return
            yield np.full(int(self.sample_rate * self.spw), 100, dtype=np.int16)

    def close(self) -> None:
        pass


def audio(*parts: tuple[int, float]) -> np.ndarray:
    return np.concatenate([np.full(int(16000 * s), code, dtype=np.int16) for code, s in parts])


def make(cfg: Config | None = None, chat: FakeChat | None = None, synth: FakeSynth | None = None,
         recognizer: FakeRecognizer | None = None, no_speech_timeout_s: float = 1.0):
    cfg = cfg or Config()
    cfg = replace(cfg, stt=replace(cfg.stt, no_speech_timeout_s=no_speech_timeout_s))
    bus = EventBus()
    events: list = []
    bus.subscribe(events.append)
    clock = FeedClock()
    synth = synth or FakeSynth()
    speaker = WavSpeaker(synth.sample_rate, None, clock)
    conv = Conversation(cfg, bus=bus, clock=clock, speaker=speaker, wake=FakeWake(),
                        recognizer=recognizer or FakeRecognizer(), chat=chat or FakeChat(), synth=synth)
    conv.start()
    return conv, clock, events, speaker


def types(events) -> list[str]:
    return [e.type.value for e in events if e.type.value != "state"]


def run(conv, clock, samples, realtime=False):
    try:
        feed_wav(conv, clock, samples, realtime=realtime, max_tail_s=20)
    finally:
        conv.stop()


def test_wake_question_reply_turn() -> None:
    conv, clock, events, speaker = make()
    run(conv, clock, audio((SILENCE, 0.5), (WAKE, 0.4), (SILENCE, 0.3), (SPEECH, 1.0), (SILENCE, 0.5)))
    t = types(events)
    assert t[:3] == ["wake", "turn.start", "speech.start"]
    for name in ("transcript.partial", "transcript.final", "reply.final", "tts.start", "tts.end", "turn.end"):
        assert t.count(name) == (t.count(name) if name == "transcript.partial" else 1), name
    assert t.index("transcript.final") < t.index("tts.start") < t.index("tts.end") < t.index("turn.end")
    end = [e for e in events if e.type.value == "turn.end"][0]
    assert end.data["outcome"] == "done"
    timings = end.data["timings_ms"]
    # Endpoint after 10 silent chunks of 20 ms.
    assert timings["endpoint_delay"] == pytest.approx(200, abs=1)
    for key in ("stt_final", "llm_first_token", "first_clause", "tts_first_audio", "end_of_speech_to_first_audio"):
        assert key in timings
    assert timings["end_of_speech_to_first_audio"] >= timings["tts_first_audio"] >= timings["first_clause"]
    # All turn events carry the turn's id.
    ids = {e.turn_id for e in events if e.type.value not in ("state",)}
    assert len(ids) == 1 and None not in ids
    # The reply was spoken: 10 words x 50 ms, plus nothing else.
    assert len(speaker.audio()) == pytest.approx(16000 * 0.05 * 10, abs=400)
    assert conv.state == State.IDLE


def test_partials_prefill_the_llm() -> None:
    chat = FakeChat()
    conv, clock, events, _ = make(chat=chat)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 1.0), (SILENCE, 0.5)))
    partials = [e.data["text"] for e in events if e.type.value == "transcript.partial"]
    assert len(partials) >= 3
    assert chat.prefills and chat.prefills[-1] in partials
    # The reply's job stops a prefill under way (at its next slice): its cancel is set.
    assert "reply.final" in types(events)
    assert chat.prefill_cancel is not None and chat.prefill_cancel.is_set()


def test_no_wake_no_turn() -> None:
    conv, clock, events, speaker = make()
    run(conv, clock, audio((SPEECH, 2.0), (SILENCE, 0.5)))
    assert types(events) == []
    assert len(speaker.audio()) == 0


def test_wake_then_silence_ends_with_no_speech() -> None:
    conv, clock, events, _ = make()
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 2.0)))
    end = [e for e in events if e.type.value == "turn.end"]
    assert [e.data["outcome"] for e in end] == ["no_speech"]
    assert "reply.final" not in types(events)


def test_empty_llm_reply_speaks_fallback() -> None:
    chat = FakeChat(reply="")
    synth = FakeSynth()
    conv, clock, events, speaker = make(chat=chat, synth=synth)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 0.5)))
    reply = [e for e in events if e.type.value == "reply.final"][0]
    assert reply.data["text"] == Config().llm.fallback_reply
    assert synth.texts and " ".join(synth.texts).startswith("Sorry")
    assert len(speaker.audio()) > 0


def test_llm_failure_reports_error_and_recovers() -> None:
    chat = FakeChat(fail=True)
    conv, clock, events, _ = make(chat=chat)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 0.5),
                           (WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 0.5)))
    errors = [e for e in events if e.type.value == "error"]
    assert len(errors) == 2 and errors[0].data["code"] == "llm.failed"
    assert [e.data["outcome"] for e in events if e.type.value == "turn.end"] == ["error", "error"]


def _turn_events(events, turn_id: str) -> list[str]:
    return [e.type.value for e in events if e.turn_id == turn_id and e.type.value != "state"]


def _assert_second_turn_answered(events, first_id: str) -> None:
    ends = [e for e in events if e.type.value == "turn.end"]
    assert ends[0].turn_id == first_id and ends[0].data["outcome"] == "barge_in"
    assert ends[-1].data["outcome"] == "done" and ends[-1].turn_id != first_id


def test_barge_in_while_speaking_cancels_the_llm_and_the_voice() -> None:
    # A long reply still being generated (40 ms a word) and spoken (100 ms a word) when the wake
    # word comes again.
    chat = FakeChat(reply=" ".join(["word"] * 150) + ".", delay=0.04, later="Sure, a short answer.")
    synth = FakeSynth(seconds_per_word=0.1)
    conv, clock, events, speaker = make(chat=chat, synth=synth)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 2.5),
                           (WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 0.5)))
    t = types(events)
    assert t.count("wake") == 2 and t.count("barge_in") == 1
    barge = next(e for e in events if e.type.value == "barge_in")
    first = barge.turn_id
    assert "tts.start" in _turn_events(events, first)
    interrupted = [e for e in events if e.type.value == "tts.end" and e.data.get("interrupted")]
    assert [e.turn_id for e in interrupted] == [first], "the first reply's speech was cut"
    # Output stopped within 150 ms of audio time after the wake word fired.
    assert interrupted[0].audio_time - barge.audio_time <= 0.15
    # The LLM saw the cancel between tokens, long before the end of its 151 words...
    assert chat.stopped_by_cancel.is_set()
    assert chat.calls[0][1] and len(chat.calls) == 2
    # ...and synthesis of the first reply stopped: nothing near its 151 words was synthesized.
    first_reply_words = sum(t.split().count("word") for t in synth.texts)
    assert first_reply_words < 120
    _assert_second_turn_answered(events, first)


def test_barge_in_while_thinking_cancels_the_llm_before_any_sound() -> None:
    # The LLM takes 0.5 s a word: the first clause (3 words) would sound 1.5 s after the question.
    chat = FakeChat(reply="one two three four five six seven eight nine ten.", delay=0.5,
                    later="Sure, a short answer.")
    conv, clock, events, speaker = make(chat=chat)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 0.6),
                           (WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 0.5)), realtime=True)
    barge = next(e for e in events if e.type.value == "barge_in")
    first = barge.turn_id
    states = [e.data["state"] for e in events if e.type.value == "state" and e.time <= barge.time]
    assert states[-1] == "thinking"
    assert "tts.start" not in _turn_events(events, first)  # not a sound of the first reply
    assert chat.stopped_by_cancel.is_set()
    _assert_second_turn_answered(events, first)


def test_push_to_talk_barges_in_while_speaking() -> None:
    chat = FakeChat(reply=" ".join(["word"] * 150) + ".", delay=0.04, later="Sure, a short answer.")
    synth = FakeSynth(seconds_per_word=0.1)
    # The button is pressed while the reply plays; the next question comes within 5 s of it.
    conv, clock, events, speaker = make(chat=chat, synth=synth, no_speech_timeout_s=5.0)

    def press_when_speaking() -> None:
        deadline = time.monotonic() + 20
        while conv.state != State.SPEAKING and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        conv.push_to_talk()

    presser = threading.Thread(target=press_when_speaking, daemon=True)
    presser.start()
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 3.5),
                           (SPEECH, 0.5), (SILENCE, 0.5)))
    presser.join(5)
    barge = [e for e in events if e.type.value == "barge_in"]
    assert len(barge) == 1 and barge[0].data["trigger"] == "push-to-talk"
    first = barge[0].turn_id
    interrupted = [e for e in events if e.type.value == "tts.end" and e.data.get("interrupted")]
    assert [e.turn_id for e in interrupted] == [first]
    assert interrupted[0].audio_time - barge[0].audio_time <= 0.15
    assert chat.stopped_by_cancel.is_set()
    starts = [e.data["trigger"] for e in events if e.type.value == "turn.start"]
    assert starts == ["wake", "push-to-talk"]
    _assert_second_turn_answered(events, first)


def test_push_to_talk_starts_turn_without_wake() -> None:
    cfg = Config(conversation=ConversationConfig(mode="push-to-talk"))
    conv, clock, events, _ = make(cfg)
    samples = audio((WAKE, 0.3), (SILENCE, 0.5), (SPEECH, 0.6), (SILENCE, 0.5))
    # The wake word does nothing in push-to-talk mode; the button does.
    conv.push_to_talk()
    run(conv, clock, samples)
    t = types(events)
    assert "wake" not in t
    assert t.count("turn.start") == 1 and "transcript.final" in t and "reply.final" in t


def test_follow_up_window_listens_without_wake() -> None:
    cfg = Config(conversation=ConversationConfig(follow_up_s=2.0))
    chat = FakeChat()
    conv, clock, events, _ = make(cfg, chat=chat)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 1.5),
                           (SPEECH, 0.5), (SILENCE, 3.5)))
    starts = [e.data["trigger"] for e in events if e.type.value == "turn.start"]
    assert starts[:2] == ["wake", "follow-up"]
    assert types(events).count("reply.final") == 2
    # The memory carried over: the second question saw the first exchange.
    assert len(chat.calls[1][0]) == 2


def test_say_and_ask_text_turns() -> None:
    chat = FakeChat()
    conv, clock, events, speaker = make(chat=chat)
    conv.say("Attention please, the booth closes soon.")
    deadline = time.monotonic() + 10
    while not conv.idle() and time.monotonic() < deadline:
        time.sleep(0.02)
    conv.ask("what time is it")
    while not conv.idle() and time.monotonic() < deadline:
        time.sleep(0.02)
    conv.stop()
    ends = [e for e in events if e.type.value == "turn.end"]
    assert [e.data["trigger"] for e in ends] == ["say", "ask"]
    assert all(e.data["outcome"] == "done" for e in ends)
    assert chat.calls[-1][1] == "what time is it"
    assert "end_of_speech_to_first_audio" in ends[1].data["timings_ms"]


def test_cancel_and_mute() -> None:
    chat = FakeChat(reply=" ".join(["word"] * 200), delay=0.01)
    conv, clock, events, _ = make(chat=chat)
    conv.ask("tell me a long story")
    time.sleep(0.3)
    assert conv.cancel()
    conv.mute()
    assert not conv.cancel()
    conv.stop()
    ends = [e for e in events if e.type.value == "turn.end"]
    assert [e.data["outcome"] for e in ends] == ["cancelled"]


def test_reply_started_at_a_pause_is_kept_when_the_final_agrees() -> None:
    chat = FakeChat(delay=0.0)
    conv, clock, events, speaker = make(chat=chat, recognizer=FakeRecognizer(pause_after=3))
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.6), (SILENCE, 0.6)))
    assert len(chat.calls) == 1, "one LLM call: the speculative one"
    kinds = types(events)
    # Nothing is heard before the question is final.
    assert kinds.index("transcript.final") < kinds.index("tts.start")
    end = [e for e in events if e.type.value == "turn.end"][0]
    assert end.data["outcome"] == "done" and end.data["speculative"] is True
    t = end.data["timings_ms"]
    # The reply was ready before the endpoint: the first token came during the pause.
    assert t["llm_first_token"] < t["endpoint_delay"] <= t["end_of_speech_to_first_audio"]
    assert len(speaker.audio()) == pytest.approx(16000 * 0.05 * 10, abs=400)


def test_reply_started_at_a_pause_is_dropped_when_the_visitor_goes_on() -> None:
    chat = FakeChat(delay=0.02)
    synth = FakeSynth()
    conv, clock, events, speaker = make(chat=chat, synth=synth, recognizer=FakeRecognizer(pause_after=3))
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.5), (SILENCE, 0.1), (SPEECH, 0.3),
                           (SILENCE, 0.6)))
    questions = [q for _, q in chat.calls]
    # The first pause's reply is abandoned when speech resumes; the second pause's is kept.
    assert questions == [" ".join(["word"] * 25), " ".join(["word"] * 40)]
    replies = [e for e in events if e.type.value == "reply.final"]
    assert len(replies) == 1
    end = [e for e in events if e.type.value == "turn.end"][0]
    assert end.data["outcome"] == "done" and end.data["speculative"] is True
    assert end.data["text"] == questions[-1]
    # Only the kept reply was ever played.
    assert len(speaker.audio()) == pytest.approx(16000 * 0.05 * 10, abs=400)


def test_final_that_differs_from_the_pause_gets_a_fresh_reply() -> None:
    class Rewriting(FakeRecognizer):
        def accept(self, chunk):
            return [Upd(u.kind, u.text + " indeed", u.audio_time, u.speech_end) if u.kind == "final" else u
                    for u in super().accept(chunk)]

    chat = FakeChat(delay=0.0)
    conv, clock, events, speaker = make(chat=chat, recognizer=Rewriting(pause_after=3))
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.6), (SILENCE, 0.6)))
    assert [q for _, q in chat.calls] == [" ".join(["word"] * 30), " ".join(["word"] * 30) + " indeed"]
    end = [e for e in events if e.type.value == "turn.end"][0]
    assert end.data["speculative"] is False and end.data["outcome"] == "done"
    assert len(speaker.audio()) == pytest.approx(16000 * 0.05 * 10, abs=400)


def test_handset_greets_listens_without_wake_and_forgets_on_hook() -> None:
    chat = FakeChat(delay=0.0)
    synth = FakeSynth()
    conv, clock, events, _ = make(chat=chat, synth=synth)
    conv.off_hook("Hello, how can I help?")
    # Two questions with no wake word, then a long silence: a handset keeps listening.
    samples = audio((SILENCE, 1.5), (SPEECH, 0.4), (SILENCE, 1.5), (SPEECH, 0.4), (SILENCE, 8.0))
    done = threading.Event()

    def hang_up_later() -> None:
        while sum(1 for e in events if e.type.value == "reply.final") < 2:
            time.sleep(0.02)
        time.sleep(0.5)
        conv.on_hook()
        done.set()

    threading.Thread(target=hang_up_later, daemon=True).start()
    run(conv, clock, samples)
    assert done.wait(10)
    starts = [e.data["trigger"] for e in events if e.type.value == "turn.start"]
    assert starts[:3] == ["say", "handset", "handset"]
    assert synth.texts[0] == "Hello, how can I help?"
    assert "wake" not in types(events)
    # The second question remembered the first; hanging up forgot both.
    assert len(chat.calls[1][0]) == 2
    ends = [e for e in events if e.type.value == "turn.end"]
    assert ends[-1].data["outcome"] == "on_hook"
    assert not [e for e in events if e.type.value == "turn.end" and e.data["outcome"] == "no_speech"]
    assert conv.sessions.history() == []
    assert [e.data["reason"] for e in events if e.type.value == "session.end"] == ["off_hook", "on_hook"]


def test_later_clauses_wait_while_the_llm_generates_and_the_speaker_has_audio() -> None:
    # The speech worker holds the next clause while the LLM generates and the speaker has more
    # than TTS_LEAD_S in hand: it waits on the speaker's level and the LLM's end, not on a timer.
    from edge.conversation.speech import TTS_LEAD_S, SpeechOutput
    from edge.conversation.turn import Reply
    from edge.signals import CancelScope

    clock = FeedClock()
    speaker = WavSpeaker(16000, None, clock)
    speech = SpeechOutput(lambda msg: None, speaker)
    try:
        held = TTS_LEAD_S + 0.5  # more than the lead, within the 1.5 s queue
        assert held < 1.5
        reply = Reply("q", (), CancelScope(), None, FakeSynth(), max_tokens=10)

        def wait_for_synthesis(reply: Reply = reply) -> threading.Thread:
            gen = speaker.begin(hold=True)
            speaker.write(np.zeros(int(speaker.rate * held), np.int16), gen)
            assert speaker.buffered_s == pytest.approx(held, abs=0.05)
            waiter = threading.Thread(target=speech._let_the_llm_run, args=(reply,))
            waiter.start()
            time.sleep(0.3)
            assert waiter.is_alive()  # the LLM is still generating and the speaker has audio: wait
            return waiter

        assert speaker.buffered_s == 0.0
        waiter = wait_for_synthesis()
        speaker.flush()  # the speaker runs low: the next clause goes, though the LLM generates on
        waiter.join(2)
        assert not waiter.is_alive() and speaker.buffered_s == 0.0
        waiter = wait_for_synthesis()
        reply.generated.set()  # the LLM is done: nothing to wait for
        waiter.join(2)
        assert not waiter.is_alive()
        speaker.flush()
        other = Reply("q", (), CancelScope(), None, FakeSynth(), max_tokens=10)
        waiter = wait_for_synthesis(other)
        other.scope.cancel()  # and a cancelled reply stops waiting
        waiter.join(2)
        assert not waiter.is_alive()
    finally:
        speaker.close()


# -- the venue: FAQ answers ready to play, the LLM's prompt per question -------------------------

class FakeVenue:
    """Answers any question with "open" in it from its FAQ; gives other questions their own prompt."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.audio = np.full(int(16000 * 0.4), 77, dtype=np.int16)

    def ready_answer(self, question: str):
        from edge.knowledge.venue import FaqAnswer

        self.asked.append(question)
        return FaqAnswer("hours", "We open at ten.", self.audio) if "open" in question else None

    def system_prompt(self, question: str) -> str:
        return f"facts for: {question}"


class SayingRecognizer(FakeRecognizer):
    """Says ``first`` at the pause and ``final`` at the endpoint (the visitor may go on)."""

    def __init__(self, first: str, final: str) -> None:
        super().__init__(pause_after=3)
        self.first, self.final = first, final

    def accept(self, chunk: AudioChunk) -> list[SttUpdate]:
        out = []
        for u in super().accept(chunk):
            text = {"pause": self.first, "final": self.final}.get(u.kind.value, u.text)
            out.append(SttUpdate(u.kind, text, u.audio_time, u.speech_end))
        return out


def _venue_conversation(recognizer: FakeRecognizer):
    chat, venue = FakeChat(delay=0.0), FakeVenue()
    conv, clock, events, speaker = make(chat=chat, recognizer=recognizer)
    conv.venue = venue
    return conv, clock, events, speaker, chat, venue


def test_an_faq_question_is_answered_from_the_ready_audio_at_the_pause_without_the_llm() -> None:
    rec = SayingRecognizer("When do you open?", "When do you open?")
    conv, clock, events, speaker, chat, venue = _venue_conversation(rec)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.6), (SILENCE, 0.6)))
    assert chat.calls == [], "the LLM was asked an FAQ question"
    assert venue.asked[0] == "When do you open?"
    kinds = types(events)
    assert kinds.index("transcript.final") < kinds.index("tts.start")  # held until the question was final
    reply = next(e for e in events if e.type.value == "reply.final")
    assert reply.data["text"] == "We open at ten." and reply.data["path"] == "faq" and reply.data["faq_id"] == "hours"
    end = next(e for e in events if e.type.value == "turn.end")
    assert end.data["outcome"] == "done" and end.data["path"] == "faq" and end.data["speculative"] is True
    assert "end_of_speech_to_first_audio" in end.data["timings_ms"]
    played = speaker.audio()
    assert len(played) == len(venue.audio) and set(np.unique(played)) == {77}


def test_a_visitor_who_goes_on_after_an_faq_pause_gets_the_llm_with_the_venues_prompt() -> None:
    rec = SayingRecognizer("When do you open?", "When do you open the shop for members only?")
    # the final asks something else: the venue's FAQ does not cover it (no "open" match for this fake)
    rec.final = "Is the shop for members only?"
    conv, clock, events, speaker, chat, venue = _venue_conversation(rec)
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.6), (SILENCE, 0.6)))
    assert [q for _, q in chat.calls] == ["Is the shop for members only?"]
    assert chat.systems == ["facts for: Is the shop for members only?"]
    end = next(e for e in events if e.type.value == "turn.end")
    assert end.data["path"] == "llm" and end.data["speculative"] is False
    assert 77 not in set(np.unique(speaker.audio())), "the dropped FAQ answer was heard"


class SlowViewChat(FakeChat):
    """The LLM's end-of-turn view on a busy CPU: it evaluates until it is told to stop (at most 10 s)."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.views = 0
        self.view_stopped = threading.Event()

    def end_of_turn_probability(self, history, user_text, *, cancel=None, system=None):
        self.views += 1
        if cancel is not None and cancel.wait(10.0):
            self.view_stopped.set()
            return None
        return 0.9


def test_a_confirmed_faq_answer_does_not_wait_for_the_llm_s_view() -> None:
    """The FAQ answer started at the pause waits (on the LLM worker) behind the LLM's view of the
    pause; once the final transcript confirms it, the view is stopped and the answer plays."""
    rec = SayingRecognizer("When do you open?", "When do you open?")
    chat, venue = SlowViewChat(), FakeVenue()
    conv, clock, events, speaker = make(chat=chat, recognizer=rec)
    conv.venue = venue
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.6), (SILENCE, 0.6)))
    assert chat.views == 1 and chat.view_stopped.is_set(), "the view was not stopped at the final transcript"
    assert chat.calls == []
    end = next(e for e in events if e.type.value == "turn.end")
    assert end.data["outcome"] == "done" and end.data["path"] == "faq" and end.data["speculative"] is True
    assert set(np.unique(speaker.audio())) == {77}



class EndpointRecognizer(SayingRecognizer):
    """Ends the turn when the end-of-turn views say the visitor has finished (``set_endpoint(0)``),
    with ``final`` decoded afresh: here it has caught the wake word's tail."""

    def __init__(self, first: str, final: str) -> None:
        super().__init__(first, final)
        self.endpoints: list[float] = []

    def set_endpoint(self, silence_s: float) -> SttUpdate | None:
        self.endpoints.append(silence_s)
        if silence_s > 0 or not self.words:
            return None
        self.words, self.paused = 0, False
        return Upd("final", self.final, 0.0, self.speech_end)


class ViewChat(FakeChat):
    def end_of_turn_probability(self, history, user_text, *, cancel=None, system=None):
        return 0.9  # finished


@pytest.mark.parametrize("final", ["Hey Jarvis, when do you open?", "Hey Jarvis."])
def test_a_final_from_the_end_of_turn_views_drops_the_wake_word_s_tail(final: str) -> None:
    """However the turn ends, the transcript is the visitor's question without the wake word the
    recognizer heard the end of ("Hey Jarvis, can I bring my dog?" once reached the fleet and the
    venue's FAQ); a final that was only the wake word is not a question: listening goes on."""
    rec = EndpointRecognizer("When do you open?", final)
    chat, venue = ViewChat(delay=0.0), FakeVenue()
    conv, clock, events, speaker = make(chat=chat, recognizer=rec)
    conv.venue = venue
    run(conv, clock, audio((WAKE, 0.3), (SILENCE, 0.1), (SPEECH, 0.6), (SILENCE, 1.4)), realtime=True)
    assert 0 in rec.endpoints, "the views did not end the turn"
    finals = [e.data["text"] for e in events if e.type.value == "transcript.final"]
    ends = [e.data["outcome"] for e in events if e.type.value == "turn.end"]
    if final == "Hey Jarvis.":
        assert finals == [] and ends == ["no_speech"] and rec.started == 2
        # ... and the no-speech limit (1 s here) counts again from there, not the 15 s utterance limit
        end = next(e for e in events if e.type.value == "turn.end")
        assert end.audio_time is not None and end.audio_time < 5.0, end.as_dict()
    else:
        assert finals == ["When do you open?"]
        assert ends == ["done"]
