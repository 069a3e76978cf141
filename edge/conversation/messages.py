"""What the conversation's owner thread handles: its inbox messages and their vocabulary.

Control messages (commands, worker results, interrupts) always go before audio: a barge-in or a
cancel is never queued behind chunks of sound. Workers never touch the turn's state; they post
what happened, with the wall time it happened at, and the owner decides what it means.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from edge.audio.chunk import AudioChunk
from edge.signals import Flag

if TYPE_CHECKING:
    from edge.conversation.turn import Reply, Turn


class State(str, Enum):
    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


class Trigger(str, Enum):
    """What started a turn (the ``trigger`` of ``turn.start`` and ``turn.end``)."""

    WAKE = "wake"
    PUSH_TO_TALK = "push-to-talk"
    SPEECH = "speech"  # a visitor talking over the device (conversation.barge_in = "speech")
    FOLLOW_UP = "follow-up"
    HANDSET = "handset"
    SAY = "say"
    ASK = "ask"


class Outcome(str, Enum):
    """How a turn ended (``turn.end``'s ``outcome``); also the reasons a caller may cancel one."""

    DONE = "done"
    NO_SPEECH = "no_speech"
    BARGE_IN = "barge_in"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # a say/ask command replaced it
    ERROR = "error"
    MUTED = "muted"
    SHUTDOWN = "shutdown"
    RELOAD = "reload"
    MIC_LOST = "mic_lost"
    SPEAKER_LOST = "speaker_lost"
    OFF_HOOK = "off_hook"
    ON_HOOK = "on_hook"


# -- from the audio source ---------------------------------------------------------------------
@dataclass(frozen=True)
class Audio:
    chunk: AudioChunk
    done: Flag | None = None  # set once the chunk has been handled (lock-step feeding)


# -- commands (any thread) --------------------------------------------------------------------
@dataclass(frozen=True)
class Listen:
    """Start listening now, without the wake word (push-to-talk, the ``listen`` command, a
    visitor talking over the device: then from ``since``, the audio time their speech began)."""

    trigger: Trigger = Trigger.PUSH_TO_TALK
    since: float | None = None


@dataclass(frozen=True)
class TextTurn:
    """An operator's ``say`` (spoken as is) or ``ask`` (through the LLM); replaces any turn."""

    trigger: Trigger
    text: str
    turn_id: str


@dataclass(frozen=True)
class Cancel:
    reason: Outcome
    result: Future[bool] = field(default_factory=Future, compare=False)


@dataclass(frozen=True)
class Mute:
    muted: bool
    result: Future[None] = field(default_factory=Future, compare=False)


@dataclass(frozen=True)
class Handset:
    """Off the hook (a fresh session, the greeting, then listening turn after turn) or on it."""

    off_hook: bool
    greeting: str = ""


@dataclass(frozen=True)
class EndSession:
    """Forget the conversation so far (the next visitor, an operator's reset)."""


@dataclass(frozen=True)
class Settings:
    """New runtime settings (``set`` commands), applied from the next turn on."""

    changes: dict[str, Any]


@dataclass(frozen=True)
class ReplaceStages:
    """Reloaded models: cancel the turn, then use these (the old ones go to ``retired``)."""

    stages: Any
    retired: Future[Any] = field(default_factory=Future, compare=False)


@dataclass(frozen=True)
class FollowUp:
    """Listen again after a turn (a follow-up window, a lifted handset) unless a turn began."""

    turn: Turn
    deadline: float | None  # audio time; None: no limit


@dataclass(frozen=True)
class Stop:
    pass


# -- from the workers -------------------------------------------------------------------------
@dataclass(frozen=True)
class FirstToken:
    reply: Reply
    at: float  # time.monotonic()


@dataclass(frozen=True)
class FirstClause:
    reply: Reply
    at: float


@dataclass(frozen=True)
class Answered:
    """The LLM is done: the whole answer, as it will be spoken."""

    reply: Reply
    text: str
    tokens: int
    at: float


@dataclass(frozen=True)
class FirstAudio:
    """Synthesis produced the reply's first audio."""

    reply: Reply
    at: float


@dataclass(frozen=True)
class Playing:
    """The speaker started playing the reply."""

    reply: Reply
    at: float


@dataclass(frozen=True)
class PlaybackDone:
    reply: Reply


@dataclass(frozen=True)
class TurnView:
    """A view on whether the visitor has finished, read at the pause ``reply`` started at."""

    reply: Reply
    kind: str  # "text" (the LLM's) | "audio" (an end-of-turn model)
    probability: float | None  # None: this view could not tell
    cost_s: float


@dataclass(frozen=True)
class Failed:
    """A worker's stage failed on this reply."""

    reply: Reply
    error: Exception
    stage: str  # "llm" | "tts"


Control = (Listen | TextTurn | Cancel | Mute | Handset | EndSession | Settings | ReplaceStages | FollowUp | Stop
           | FirstToken | FirstClause | Answered | FirstAudio | Playing | PlaybackDone | TurnView | Failed)
Message = Control | Audio
