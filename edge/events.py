"""Pipeline events: one typed stream that MQTT, logging, systemd and ``simulate`` read.

Event types are a string enum whose values are the wire names (``transcript.final``); an
event's JSON form is the same everywhere it is shown or sent. Stages never call the network:
they emit events, and subscribers decide what to do with them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class EventType(str, Enum):
    READY = "ready"
    STATE = "state"  # the conversation's state changed (idle, listening, thinking, speaking)
    WAKE = "wake"
    TURN_START = "turn.start"
    SPEECH_START = "speech.start"
    SPEECH_END = "speech.end"
    TRANSCRIPT_PARTIAL = "transcript.partial"
    TRANSCRIPT_FINAL = "transcript.final"
    REPLY_PARTIAL = "reply.partial"
    REPLY_FINAL = "reply.final"
    TTS_START = "tts.start"
    TTS_END = "tts.end"
    BARGE_IN = "barge_in"
    TURN_END = "turn.end"
    SESSION_END = "session.end"
    ERROR = "error"

    def __str__(self) -> str:  # so f-strings and topics show the wire name
        return self.value


@dataclass(frozen=True)
class Event:
    """One thing that happened, with where it happened on the audio timeline.

    ``time`` is the wall clock (Unix seconds); ``audio_time`` is seconds since the
    microphone stream began, or None for events not tied to audio (a typed question).
    """

    type: EventType
    data: Mapping[str, Any] = field(default_factory=dict)
    turn_id: str | None = None
    session_id: str | None = None
    time: float = field(default_factory=time.time)
    audio_time: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type.value}
        out.update(self.data)
        out["turn_id"] = self.turn_id
        out["session_id"] = self.session_id
        out["time"] = round(self.time, 3)
        if self.audio_time is not None:
            out["audio_time"] = round(self.audio_time, 3)
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), ensure_ascii=False, separators=(",", ":"))


def new_id() -> str:
    """A short random id for turns, sessions and messages."""
    return uuid.uuid4().hex[:16]


Subscriber = Callable[[Event], None]


class EventBus:
    """Fan events out to subscribers. A failing subscriber is logged, never fatal.

    Subscribers must not block: anything slow (the network, the disk) queues the event
    and does its work elsewhere. Events come from several threads; each is delivered to every
    subscriber before the next one, so all subscribers see the same order.
    """

    def __init__(self) -> None:
        self._subs: list[Subscriber] = []
        self._lock = threading.RLock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subs.append(fn)
        return lambda: self._subs.remove(fn) if fn in self._subs else None

    def emit(self, event: Event) -> None:
        with self._lock:
            for fn in list(self._subs):
                try:
                    fn(event)
                except Exception:  # a subscriber's bug must not stop the pipeline
                    logging.getLogger(__name__).exception("event subscriber failed on %s", event.type)
