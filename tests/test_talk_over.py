"""Talking over the device: the silero VAD behind ``conversation.barge_in = "speech"``, fed the
echo-cancelled microphone chunk by chunk with how much echo the canceller took out of each.

The chunks are the Piper voice; which of them were drowned by the device's own voice is set by
hand (the real canceller in a synthetic room is ``test_echo.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import speech
from voice import conversation

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from edge.config import SttConfig
from edge.stt.vad import TALK_OVER_REMOVED_DB, TalkOver

DROWNED = TALK_OVER_REMOVED_DB + 6  # the canceller took this much out: the device's own sound
CLEAR = 1.0  # ...and this little: a visitor's voice, which it leaves alone
VISITOR = "Sorry, where are the toilets in this building?"  # about 2 s of speech


def _hear(talk: TalkOver, chunks: list[AudioChunk], removed: Callable[[int], float]) -> list[tuple[float, float]]:
    """(when it fired, where it says the speech began), in seconds, for every interruption, as
    the device says one more reply."""
    talk.hear(chunks[0], False)
    fired = []
    for i, c in enumerate(chunks):
        since = talk.hear(c, True, removed(i))
        if since is not None:
            fired.append((c.end / SAMPLE_RATE, since))
    return fired


@pytest.fixture
def talk_over(silero_vad_path: Path) -> TalkOver:
    return TalkOver(SttConfig(), silero_vad_path, 1.2)


def test_a_visitor_is_heard_through_the_gaps_the_device_s_voice_leaves(talk_over: TalkOver) -> None:
    """The device as loud as the visitor drowns 0.2 s of every 0.5 s of them: still one stretch
    (fed to the VAD as silence, each gap ended it)."""
    chunks = speech.chunks(conversation(0.5, VISITOR, 0.5))
    per_half_s = int(0.5 * SAMPLE_RATE) // CHUNK_SAMPLES
    fired = _hear(talk_over, chunks, lambda i: DROWNED if i % per_half_s >= per_half_s - 10 else CLEAR)
    assert len(fired) == 1, fired
    at, since = fired[0]
    # The speech begins at 0.5 s; 1.2 s of it, as heard (the gaps count), interrupts.
    assert 0.3 <= since <= 0.9 and at - since >= 1.2 and at <= 2.3, fired


def test_the_device_s_own_voice_does_not_interrupt_it(talk_over: TalkOver) -> None:
    """Speech the canceller took most of (or added itself: its filter still finding the echo) is
    the device's, however much of it there is."""
    chunks = speech.chunks(conversation(0.5, VISITOR, 0.5, VISITOR, 0.5))
    assert _hear(talk_over, chunks, lambda i: DROWNED) == []
    assert _hear(talk_over, chunks, lambda i: -DROWNED) == []


def test_speech_heard_only_in_snatches_is_the_device_s(talk_over: TalkOver) -> None:
    """Speech-like sound caught one chunk in four, between chunks of the device's own voice, is
    what the canceller left of that voice (a visitor's voice is not drowned three quarters of
    the time)."""
    chunks = speech.chunks(conversation(0.5, VISITOR, 0.5, VISITOR, 0.5))
    assert _hear(talk_over, chunks, lambda i: CLEAR if i % 4 == 0 else DROWNED) == []
    # ...while one chunk in three drowned leaves most of a voice heard: the visitor's.
    assert len(_hear(talk_over, chunks, lambda i: DROWNED if i % 3 == 0 else CLEAR)) >= 1


def test_a_long_drowned_stretch_breaks_the_visitor_s_speech(talk_over: TalkOver) -> None:
    """The device drowning the visitor for 0.8 s splits their speech into two stretches, each
    shorter than 1.2 s; for 0.3 s it does not."""
    chunks = speech.chunks(conversation(0.5, VISITOR, 0.5))

    def drowned_for(seconds: float) -> Callable[[int], float]:
        start, end = int(1.0 * SAMPLE_RATE) // CHUNK_SAMPLES, int((1.0 + seconds) * SAMPLE_RATE) // CHUNK_SAMPLES
        return lambda i: DROWNED if start <= i < end else CLEAR

    assert _hear(talk_over, chunks, drowned_for(0.8)) == []
    assert len(_hear(talk_over, chunks, drowned_for(0.3))) == 1


def test_it_listens_only_while_the_device_talks(silero_vad_path: Path) -> None:
    """A stretch is speech over one reply: the device falling quiet in the middle of the visitor's
    2 s (a reply ended, the next began) starts it afresh, and neither half lasts 1.5 s."""
    talk_over = TalkOver(SttConfig(), silero_vad_path, 1.5)
    chunks = speech.chunks(conversation(0.5, VISITOR, 0.5))
    half = int(1.5 * SAMPLE_RATE) // CHUNK_SAMPLES
    fired = [talk_over.hear(c, not half <= i < half + 5, CLEAR) for i, c in enumerate(chunks)]
    assert fired == [None] * len(chunks)
    assert len(_hear(talk_over, chunks, lambda i: CLEAR)) == 1  # the same speech over one reply
