"""A turn (owned by the conversation's thread) and a reply (the handle its workers share).

A :class:`Reply` is what the owner hands to the LLM and speech workers: the question, a
snapshot of the history, its cancel scope, and the signals the workers give each other (first
audio, generation done) and the owner gives them (confirmed). Nothing on it is written by two
threads. A :class:`Turn` and its :class:`Timings` are touched by the owner thread only.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.audio.base import Speaker
from edge.audio.chunk import AudioChunk
from edge.conversation.messages import Trigger
from edge.events import new_id
from edge.knowledge.venue import FaqAnswer
from edge.llm.base import ChatModel, Message
from edge.signals import CancelScope, Flag
from edge.tts.base import Synthesizer

_WORDS = re.compile(r"[^\w']+")
_REPLY_IDS = itertools.count(1)


def same_words(a: str, b: str) -> bool:
    """Two transcripts say the same thing (case and punctuation aside)."""
    return _WORDS.sub(" ", a.lower()).split() == _WORDS.sub(" ", b.lower()).split()


class Hold:
    """A speculative reply's audio waits in the speaker until the question is confirmed.

    The speech worker begins the utterance (held or not) and the owner confirms, in either
    order; the lock makes "begin held, then release" and "confirm, then begin free" both right.
    """

    def __init__(self, held: bool) -> None:
        self._lock = threading.Lock()
        self.confirmed = Flag()
        self._speaker: Speaker | None = None
        self._gen = 0
        if not held:
            self.confirmed.set()

    def begin(self, speaker: Speaker, on_start: Callable[[float], None]) -> int:
        with self._lock:
            self._speaker = speaker
            self._gen = speaker.begin(on_start, hold=not self.confirmed.is_set())
            return self._gen

    def confirm(self) -> None:
        with self._lock:
            self.confirmed.set()
            if self._speaker is not None:
                self._speaker.release(self._gen)


@dataclass(eq=False)
class Reply:
    """One attempt at answering a turn: LLM → clauses → TTS → speaker.

    A speculative reply starts at a pause, before the endpoint, and is held (generated,
    synthesized, queued, not played) until the final transcript confirms the question it
    answers; otherwise it is cancelled and a new one starts from the final transcript.
    """

    question: str
    history: tuple[Message, ...]
    scope: CancelScope
    chat: ChatModel | None
    synth: Synthesizer | None
    max_tokens: int
    speculative: bool = False
    speak_as_is: bool = False  # an operator's announcement: no LLM
    faq: FaqAnswer | None = None  # the FAQ entry it answers: no LLM, the answer's audio is ready
    system: str | None = None  # the LLM's system prompt for this question; None: the warmed one
    view: bool = False  # read the LLM's view on whether the visitor has finished, before answering
    hold: Hold = field(init=False)
    view_scope: CancelScope = field(init=False)  # owner → LLM worker: the view is no longer wanted
    first_audio: Flag = field(default_factory=Flag)  # speech worker → LLM worker: the first clause sounds
    generated: Flag = field(default_factory=Flag)  # LLM worker → speech worker: no more clauses to wait for
    id: int = field(default_factory=lambda: next(_REPLY_IDS))

    def __post_init__(self) -> None:
        self.hold = Hold(held=self.speculative)
        self.view_scope = self.scope.child()

    @property
    def path(self) -> str:
        """How it is answered: ``faq`` (an FAQ entry's ready answer), ``fallback`` (the pack is not about
        the question), ``llm`` or ``say`` (an announcement)."""
        return "say" if self.speak_as_is else self.faq.path if self.faq is not None else "llm"


# Milestones a turn's timings report, by the name they are reported under.
_REPORTED = {
    "final": "stt_final",
    "first_token": "llm_first_token",
    "first_clause": "first_clause",
    "tts_first_audio": "tts_first_audio",
    "first_play": "end_of_speech_to_first_audio",
    "reply_done": "llm_done",
}


class Timings:
    """Wall times of a turn's milestones, reported in ms from the end of the question.

    The reference is the endpoint: the audio time it fired (``ref_audio``) and the wall time its
    chunk was available (``ref_wall``); the silence between the end of speech and the endpoint
    is added back, so the figures are what a listener waited.
    """

    def __init__(self) -> None:
        self.speech_end: float | None = None  # audio time the question ended
        self.ref_audio: float | None = None  # audio time the endpoint fired
        self.ref_wall: float | None = None  # wall time the endpoint's chunk was available
        self.marks: dict[str, float] = {}  # the turn's own: "final"
        self.reply_marks: dict[str, float] = {}  # the current reply's
        self.tokens = 0

    def new_reply(self) -> None:
        self.reply_marks = {}
        self.tokens = 0

    def since_end_of_speech_ms(self, wall: float) -> float | None:
        if self.ref_wall is None:
            return None
        lead = (self.ref_audio - self.speech_end) if self.ref_audio is not None and self.speech_end is not None else 0.0
        return round(1000 * (lead + wall - self.ref_wall), 1)

    def as_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.ref_audio is not None and self.speech_end is not None:
            out["endpoint_delay"] = round(1000 * (self.ref_audio - self.speech_end), 1)
        marks = {**self.marks, **self.reply_marks}
        for mark, name in _REPORTED.items():
            if mark in marks:
                v = self.since_end_of_speech_ms(marks[mark])
                if v is not None:
                    out[name] = v
        if self.tokens > 1 and "first_token" in marks and "reply_done" in marks:
            span = marks["reply_done"] - marks["first_token"]
            if span > 0:
                out["llm_tokens_per_s"] = round((self.tokens - 1) / span, 2)
        return out


@dataclass(eq=False)
class Turn:
    """One exchange, from its trigger to its end. Audio times are timeline seconds."""

    trigger: Trigger
    session_id: str
    scope: CancelScope = field(default_factory=CancelScope)
    id: str = field(default_factory=new_id)
    listen_start: float | None = None  # audio time listening began
    listen_deadline: float | None = None  # a follow-up window's end (audio time)
    speech_started: bool = False
    last_partial: str = ""
    text: str = ""
    answer: str = ""
    reply: Reply | None = None  # the reply in progress (maybe speculative)
    answered: Reply | None = None  # the reply whose answer is final (LLM done)
    answered_text: str = ""
    playing: bool = False  # the current reply's audio has started
    timings: Timings = field(default_factory=Timings)
    # End of turn: the views read at the current pause (kind -> P(finished)), the kinds still
    # awaited, and what was decided (the silence that ends the turn, and from which views).
    views: dict[str, float] = field(default_factory=dict)
    views_awaited: set[str] = field(default_factory=set)
    endpoint_s: float | None = None
    heard: list[AudioChunk] = field(default_factory=list)  # the turn's audio, for an end-of-turn model
