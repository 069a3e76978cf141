"""The conversation: turn state machine, workers, barge-in and timings.

    IDLE ──wake / push-to-talk──► LISTENING ──final transcript──► THINKING ──first audio──► SPEAKING
      ▲                              │ no speech                                              │
      └──────────────────────────────┴───────────────── turn.end ◄─────────────────────────────┘

Threads, each owning its models:
- the audio thread calls :meth:`Conversation.feed` for every 20 ms chunk; it alone touches
  the wake detector and the recognizer. Other threads ask it for things (push-to-talk,
  follow-up listening, stop listening) through ``_requests``;
- the responder thread runs the LLM (prefill while the visitor speaks, then the reply) and
  cuts the streamed reply into clauses;
- the TTS thread synthesizes clauses as they come and writes audio to the speaker, whose
  bounded queue pauses TTS, whose bounded queue pauses the LLM.

Nothing here imports a model library: stages arrive as objects that satisfy the small
protocols below. Everything observable leaves as an :class:`~edge.events.Event`.
"""

from __future__ import annotations

import collections
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator, Protocol

import numpy as np

from edge.audio.buffers import PreRoll
from edge.audio.chunk import AudioChunk
from edge.clauses import ClauseSplitter
from edge.config import Config
from edge.errors import EdgeError, StageError
from edge.events import Event, EventBus, EventType, new_id
from edge.session import Sessions

_LOGGER = logging.getLogger(__name__)


class State(str, Enum):
    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


# -- the stages, as this module needs them ------------------------------------------
class WakeDetector(Protocol):
    def process(self, chunk: AudioChunk) -> list[Any]: ...
    def reset(self) -> None: ...


class Recognizer(Protocol):
    def start(self, preroll: list[AudioChunk]) -> None: ...
    def accept(self, chunk: AudioChunk) -> list[Any]: ...
    def finish(self) -> Any | None: ...


class ChatModel(Protocol):
    def warm(self, system_prompt: str) -> None: ...
    def prefill(self, history: list[dict[str, str]], user_text: str,
                cancel: threading.Event | None = None) -> None: ...
    def stream(self, history: list[dict[str, str]], user_text: str, *, cancel: threading.Event,
               max_tokens: int | None = None, deadline: float | None = None) -> Iterator[str]: ...
    def count_tokens(self, text: str) -> int: ...


class Synthesizer(Protocol):
    sample_rate: int

    def synthesize(self, text: str, cancel: threading.Event) -> Iterator[np.ndarray]: ...


class Clock(Protocol):
    def now(self) -> float: ...


_MARK_NAMES = {
    "final": "stt_final",
    "first_token": "llm_first_token",
    "first_clause": "first_clause",
    "tts_first_audio": "tts_first_audio",
    "first_play": "end_of_speech_to_first_audio",
    "reply_done": "llm_done",
}
_WORDS = re.compile(r"[^\w']+")


def same_words(a: str, b: str) -> bool:
    """Two transcripts say the same thing (case and punctuation aside)."""
    return _WORDS.sub(" ", a.lower()).split() == _WORDS.sub(" ", b.lower()).split()


@dataclass
class Reply:
    """One attempt at answering a turn: LLM → clauses → TTS → speaker.

    A speculative reply starts at a pause, before the endpoint, and is held (generated,
    synthesized, queued, not played) until the final transcript confirms the question it
    answers; otherwise it is cancelled and a new one starts from the final transcript.
    """

    question: str
    speculative: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    confirmed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    marks: dict[str, float] = field(default_factory=dict)  # wall times of milestones
    tts_started: bool = False
    gen: int = 0  # the speaker utterance it writes to
    answer: str = ""

    def confirm(self, speaker: Any) -> None:
        with self.lock:
            self.confirmed.set()
            if self.tts_started:
                speaker.release(self.gen)


@dataclass
class Turn:
    """One exchange. Wall times are ``time.monotonic()``; audio times are timeline seconds."""

    trigger: str
    session_id: str
    id: str = field(default_factory=new_id)
    cancel: threading.Event = field(default_factory=threading.Event)
    listen_start: float | None = None  # audio time listening began
    speech_started: bool = False
    last_partial: str = ""
    text: str = ""
    answer: str = ""
    reply: Reply | None = None  # the reply in progress (maybe speculative)
    speech_end: float | None = None  # audio time the question ended
    ref_audio: float | None = None  # audio time the endpoint fired
    ref_wall: float | None = None  # wall time the endpoint's chunk was available
    marks: dict[str, float] = field(default_factory=dict)
    finished: bool = False

    def since_end_of_speech_ms(self, wall: float) -> float | None:
        """Milliseconds a listener waited from the end of the question to ``wall``."""
        if self.ref_wall is None:
            return None
        lead = (self.ref_audio - self.speech_end) if self.ref_audio is not None and self.speech_end is not None else 0.0
        return round(1000 * (lead + wall - self.ref_wall), 1)

    def timings_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.ref_audio is not None and self.speech_end is not None:
            out["endpoint_delay"] = round(1000 * (self.ref_audio - self.speech_end), 1)
        marks = dict(self.marks)
        if self.reply is not None:
            marks.update(self.reply.marks)
        for mark, name in _MARK_NAMES.items():
            if mark in marks:
                v = self.since_end_of_speech_ms(marks[mark])
                if v is not None:
                    out[name] = v
        tokens = marks.get("tokens", 0)
        if tokens > 1 and "first_token" in marks and "reply_done" in marks:
            span = marks["reply_done"] - marks["first_token"]
            if span > 0:
                out["llm_tokens_per_s"] = round((tokens - 1) / span, 2)
        return out


_END = object()  # end of a reply's clauses
FIRST_AUDIO_YIELD_S = 2.0  # longest the LLM waits for the first clause's audio
TTS_LEAD_S = 0.5  # while the LLM generates, synthesize the next clause once less than this is queued


class Conversation:
    def __init__(self, cfg: Config, *, bus: EventBus, clock: Clock, speaker: Any,
                 wake: WakeDetector | None, recognizer: Recognizer | None,
                 chat: ChatModel | None, synth: Synthesizer | None) -> None:
        self.cfg = cfg
        self.bus = bus
        self.clock = clock
        self.speaker = speaker
        self.wake = wake
        self.recognizer = recognizer
        self.chat = chat
        self.synth = synth
        self.sessions = Sessions(cfg.llm.session_idle_s, cfg.llm.memory_tokens,
                                 chat.count_tokens if chat is not None else None)
        self.preroll = PreRoll(cfg.audio.preroll_ms)
        self.muted = False
        # Handset off the hook: listen again after every turn, with no wake word, until on-hook.
        self.continuous = False
        self._lock = threading.RLock()
        self._state = State.IDLE
        self._turn: Turn | None = None
        self._listen_deadline: float | None = None  # follow-up window end (audio time)
        self._requests: collections.deque[tuple[str, Any]] = collections.deque()
        self._jobs: collections.deque[tuple[str, Turn, Any]] = collections.deque()
        self._jobs_cond = threading.Condition()
        self._prefill_cancel = threading.Event()
        self._tts_q: queue.Queue[tuple[Turn, Reply, Any]] = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._responder_loop, name="responder", daemon=True),
            threading.Thread(target=self._tts_loop, name="tts", daemon=True),
        ]
        self.turns_done = 0

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Cancel the turn in progress and stop the workers."""
        self.cancel(reason="shutdown")
        self._stop.set()
        with self._jobs_cond:
            self._jobs_cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    @property
    def state(self) -> State:
        return self._state

    def busy(self) -> bool:
        """A turn is in progress."""
        with self._lock:
            return self._turn is not None or bool(self._requests)

    def answering(self) -> bool:
        """A reply is being prepared or spoken: wall-clock time is what the visitor feels."""
        with self._lock:
            return self._turn is not None and (self._state != State.LISTENING or self._turn.reply is not None)

    def idle(self) -> bool:
        with self._lock:
            return self._turn is None and not self._requests and self._state == State.IDLE

    # -- events --------------------------------------------------------------------
    def _emit(self, etype: EventType, turn: Turn | None = None, audio_time: float | None = None,
              **data: Any) -> None:
        self.bus.emit(Event(etype, data, turn_id=turn.id if turn else None,
                            session_id=turn.session_id if turn else None,
                            audio_time=self.clock.now() if audio_time is None else audio_time))

    def _set_state(self, state: State, turn: Turn | None = None) -> None:
        with self._lock:
            if self._state == state:
                return
            self._state = state
        self._emit(EventType.STATE, turn, state=state.value)

    # -- requests from other threads -----------------------------------------------
    def push_to_talk(self) -> None:
        """Start listening now, without the wake word (MQTT ``listen``, a kiosk button)."""
        with self._lock:
            self._requests.append(("listen", "push-to-talk"))

    def say(self, text: str) -> str:
        """Speak ``text`` (an operator announcement); interrupts a turn in progress."""
        return self._text_turn("say", text)

    def ask(self, text: str) -> str:
        """A typed question: through the LLM, spoken and published like a spoken one."""
        return self._text_turn("ask", text)

    def _text_turn(self, kind: str, text: str) -> str:
        self.cancel(reason="interrupted")
        turn = Turn(trigger=kind, session_id=self.sessions.current().id)
        turn.ref_wall = time.monotonic()
        with self._lock:
            self._turn = turn
        self._emit(EventType.TURN_START, turn, trigger=kind)
        if kind == "ask":
            turn.text = text
            self._emit(EventType.TRANSCRIPT_FINAL, turn, text=text, source="text")
            self._set_state(State.THINKING, turn)
        self._start_reply(turn, text, speculative=False, job=kind)
        return turn.id

    def cancel(self, reason: str = "cancelled") -> bool:
        """Stop whatever turn is in progress. True if there was one."""
        with self._lock:
            turn = self._turn
            if turn is None:
                return False
            if self._state == State.LISTENING:
                self._requests.append(("stop-listening", reason))
                return True
        self._abort(turn, reason)
        return True

    def off_hook(self, greeting: str = "") -> None:
        """A handset was lifted: a fresh session, a greeting, then listening turn after turn."""
        self._end_session("off_hook")
        self.continuous = True
        if greeting:
            self.say(greeting)
        else:
            self.push_to_talk()

    def on_hook(self) -> None:
        """The handset was put down: stop, and forget the conversation."""
        self.continuous = False
        self._end_session("on_hook")

    def _end_session(self, reason: str) -> None:
        self.cancel(reason=reason)
        ended = self.sessions.end()
        self._emit(EventType.SESSION_END, None, reason=reason, ended=ended.id)

    def mute(self) -> None:
        self.muted = True
        self.cancel(reason="muted")

    def unmute(self) -> None:
        self.muted = False

    # -- the audio thread ----------------------------------------------------------
    def feed(self, chunk: AudioChunk) -> None:
        self.preroll.append(chunk)
        while self._requests:
            self._handle_request(self._requests.popleft())
        if self.muted:
            return
        state = self._state
        if state == State.LISTENING:
            self._listen(chunk)
            return
        if self.wake is None or (state == State.IDLE and self.cfg.conversation.mode != "wake"):
            return
        if state != State.IDLE and self.cfg.conversation.barge_in == "none":
            return
        hits = self.wake.process(chunk)
        if not hits:
            return
        hit = max(hits, key=lambda h: h.score)
        with self._lock:
            current = self._turn
        if current is not None:
            self._emit(EventType.BARGE_IN, current, audio_time=hit.audio_time, word=hit.word)
            self._abort(current, "barge_in")
        turn = Turn(trigger="wake", session_id=self.sessions.current().id)
        self._emit(EventType.WAKE, turn, audio_time=hit.audio_time, word=hit.word, score=round(hit.score, 3))
        self._start_listening(turn, self.preroll.since(hit.audio_time - self.cfg.audio.preroll_ms / 1000))

    def _handle_request(self, req: tuple[str, Any]) -> None:
        kind, arg = req
        if kind == "listen":
            with self._lock:
                current = self._turn
            if current is not None and self._state == State.LISTENING:
                return
            if current is not None:
                self._emit(EventType.BARGE_IN, current, trigger=arg)
                self._abort(current, "barge_in")
            turn = Turn(trigger=arg, session_id=self.sessions.current().id)
            self._start_listening(turn, [])
        elif kind == "follow-up":
            turn, deadline = arg
            if self._turn is not None or self.muted:
                return
            self._listen_deadline = deadline
            self._start_listening(turn, [])
        elif kind == "stop-listening":
            with self._lock:
                turn = self._turn
            if turn is not None and self._state == State.LISTENING:
                self.recognizer.finish()
                self._end_listening(turn, arg)

    def _start_listening(self, turn: Turn, preroll: list[AudioChunk]) -> None:
        assert self.recognizer is not None
        turn.listen_start = self.clock.now()
        self.recognizer.start(preroll)
        # The turn and its state change together: a cancel from another thread sees both or neither.
        with self._lock:
            self._turn = turn
            self._state = State.LISTENING
        self._emit(EventType.TURN_START, turn, trigger=turn.trigger)
        self._emit(EventType.STATE, turn, state=State.LISTENING.value)

    def _listen(self, chunk: AudioChunk) -> None:
        turn = self._turn
        if turn is None or self.recognizer is None:  # cancelled between chunks
            self._set_state(State.IDLE)
            return
        for upd in self.recognizer.accept(chunk):
            if upd.kind == "speech_start":
                turn.speech_started = True
                self._listen_deadline = None
                self._emit(EventType.SPEECH_START, turn, audio_time=upd.audio_time)
            elif upd.kind == "partial":
                text = upd.text.strip()
                if text and text != turn.last_partial:
                    turn.last_partial = text
                    self._emit(EventType.TRANSCRIPT_PARTIAL, turn, audio_time=upd.audio_time, text=text)
                    if turn.reply is None:
                        self._submit(("prefill", turn, text))
            elif upd.kind == "pause":
                self._on_pause(turn, upd.text.strip())
            elif upd.kind == "resume":
                self._drop_speculation(turn)
            elif upd.kind == "final":
                self._on_final(turn, upd, chunk)
                return
        now = chunk.end_s
        stt = self.cfg.stt
        start = turn.listen_start or 0.0
        timed_out = not turn.speech_started and not self.continuous and (
            now - start > stt.no_speech_timeout_s
            or (self._listen_deadline is not None and now > self._listen_deadline))
        too_long = turn.speech_started and now - start > stt.max_utterance_s
        if timed_out or too_long:
            final = self.recognizer.finish()
            if final is not None and final.text.strip():
                self._on_final(turn, final, chunk)
            else:
                self._end_listening(turn, "no_speech")

    def _on_pause(self, turn: Turn, text: str) -> None:
        """The visitor paused: start the reply now, to be played only if they are done."""
        if not text or self.chat is None:
            return
        if turn.reply is not None and same_words(turn.reply.question, text):
            return
        self._drop_speculation(turn)
        if text != turn.last_partial:
            turn.last_partial = text
            self._emit(EventType.TRANSCRIPT_PARTIAL, turn, text=text)
        _LOGGER.debug("pause: starting a speculative reply to %r", text)
        self._start_reply(turn, text, speculative=True)

    def _drop_speculation(self, turn: Turn) -> None:
        reply = turn.reply
        if reply is not None and not reply.confirmed.is_set():
            reply.cancel.set()
            self.speaker.flush()
            turn.reply = None

    def _end_listening(self, turn: Turn, outcome: str) -> None:
        self._listen_deadline = None
        self._drop_speculation(turn)
        self._finish_turn(turn, outcome)

    def _on_final(self, turn: Turn, upd: Any, chunk: AudioChunk) -> None:
        text = upd.text.strip()
        self._listen_deadline = None
        if not text:
            self._end_listening(turn, "no_speech")
            return
        turn.text = text
        turn.ref_audio = upd.audio_time
        turn.speech_end = upd.speech_end if upd.speech_end is not None else upd.audio_time
        turn.ref_wall = chunk.wall or time.monotonic()
        turn.marks["final"] = time.monotonic()
        self._emit(EventType.SPEECH_END, turn, audio_time=turn.speech_end)
        self._emit(EventType.TRANSCRIPT_FINAL, turn, audio_time=upd.audio_time, text=text)
        self._set_state(State.THINKING, turn)
        if self.wake is not None:
            self.wake.reset()  # it was not fed while listening
        reply = turn.reply
        if reply is not None and not reply.cancel.is_set() and same_words(reply.question, text):
            _LOGGER.debug("the speculative reply answers the final transcript: keeping it")
            reply.confirm(self.speaker)
        else:
            self._drop_speculation(turn)
            self._start_reply(turn, text, speculative=False)

    def _start_reply(self, turn: Turn, question: str, *, speculative: bool, job: str = "respond") -> None:
        reply = Reply(question, speculative=speculative)
        if not speculative:
            reply.confirmed.set()
        turn.reply = reply
        self._submit((job, turn, reply))

    # -- turn endings (any thread) ---------------------------------------------------
    def _abort(self, turn: Turn, reason: str) -> None:
        turn.cancel.set()
        reply = turn.reply
        if reply is not None:
            reply.cancel.set()
        self.speaker.flush()
        if reply is not None and "first_play" in reply.marks:
            self._emit(EventType.TTS_END, turn, interrupted=True)
        self._finish_turn(turn, reason)

    def _finish_turn(self, turn: Turn, outcome: str) -> None:
        with self._lock:
            if turn.finished:
                return
            turn.finished = True
            if self._turn is turn:
                self._turn = None
        if outcome == "done" and turn.text and turn.answer and turn.trigger != "say":
            self.sessions.add_exchange(turn.text, turn.answer)
        self.sessions.touch()
        reply = turn.reply
        self._emit(EventType.TURN_END, turn, outcome=outcome, trigger=turn.trigger,
                   text=turn.text, reply=turn.answer, speculative=bool(reply and reply.speculative),
                   timings_ms=turn.timings_ms())
        self.turns_done += 1
        follow = self.cfg.conversation.follow_up_s
        with self._lock:
            no_turn = self._turn is None
        if no_turn:
            self._set_state(State.IDLE)
        if self.continuous and not self.muted and outcome not in ("on_hook", "off_hook", "shutdown"):
            nxt = Turn(trigger="handset", session_id=self.sessions.current().id)
            with self._lock:
                self._requests.append(("follow-up", (nxt, None)))
        elif outcome == "done" and follow > 0 and not self.muted and turn.trigger != "say":
            nxt = Turn(trigger="follow-up", session_id=self.sessions.current().id)
            with self._lock:
                self._requests.append(("follow-up", (nxt, self.clock.now() + follow)))

    # -- responder thread: the LLM ---------------------------------------------------
    def _submit(self, job: tuple[str, Turn, Any]) -> None:
        with self._jobs_cond:
            if job[0] == "prefill":
                # Only the newest partial matters.
                self._jobs = collections.deque(j for j in self._jobs if j[0] != "prefill")
            else:
                self._prefill_cancel.set()  # a reply is wanted: a prefill under way stops
            self._jobs.append(job)
            self._jobs_cond.notify()

    def _responder_loop(self) -> None:
        while not self._stop.is_set():
            with self._jobs_cond:
                while not self._jobs and not self._stop.is_set():
                    self._jobs_cond.wait(0.5)
                if self._stop.is_set():
                    return
                kind, turn, arg = self._jobs.popleft()
                if kind == "prefill":
                    if self._jobs:
                        continue  # a reply is waiting behind it
                    self._prefill_cancel.clear()
            if turn.cancel.is_set():
                continue
            try:
                if kind == "prefill":
                    # Never once a reply is under way: a prefill would cut its generation short.
                    if self.chat is not None and self._turn is turn and turn.reply is None:
                        self.chat.prefill(self.sessions.history(), arg, cancel=self._prefill_cancel)
                elif arg.cancel.is_set():
                    continue
                elif kind in ("respond", "ask"):
                    self._respond(turn, arg)
                elif kind == "say":
                    self._speak_text(turn, arg)
            except Exception as err:  # a stage failure ends the turn, never the daemon
                if kind != "prefill" and arg.speculative and not arg.confirmed.is_set():
                    _LOGGER.warning("speculative reply failed: %s", err)
                    arg.cancel.set()
                    continue
                self._stage_failed(turn, err)

    def _stage_failed(self, turn: Turn, err: Exception) -> None:
        if isinstance(err, EdgeError):
            _LOGGER.error("turn %s failed: %s", turn.id, err)
            self._emit(EventType.ERROR, turn, code=err.code, message=err.message)
        else:
            _LOGGER.exception("turn %s failed", turn.id)
            self._emit(EventType.ERROR, turn, code="internal", message=f"{type(err).__name__}: {err}")
        self._abort(turn, "error")

    def _queue_clause(self, turn: Turn, reply: Reply, item: Any) -> bool:
        while not reply.cancel.is_set() and not self._stop.is_set():
            try:
                self._tts_q.put((turn, reply, item), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _await_confirmation(self, reply: Reply) -> bool:
        """A speculative reply goes no further than the speaker's queue until confirmed."""
        while not reply.confirmed.wait(0.05):
            if reply.cancel.is_set() or self._stop.is_set():
                return False
        return not reply.cancel.is_set()

    def _respond(self, turn: Turn, reply: Reply) -> None:
        if self.chat is None:
            raise StageError("no language model is configured (llm.model)", code="llm.missing")
        llm, tts = self.cfg.llm, self.cfg.tts
        # Run-on text is cut at 24 words: synthesis memory and time grow with a sentence's length.
        splitter = ClauseSplitter(tts.first_clause_min_words, long_words=16, max_words=24,
                                  first_max_words=max(tts.first_clause_max_words, tts.first_clause_min_words))
        history = self.sessions.history()
        deadline = time.monotonic() + llm.reply_timeout_s
        parts: list[str] = []
        clauses = tokens = 0
        marks = reply.marks
        for piece in self.chat.stream(history, reply.question, cancel=reply.cancel, max_tokens=llm.max_tokens,
                                      deadline=deadline):
            tokens += 1
            if tokens == 1:
                marks["first_token"] = time.monotonic()
            parts.append(piece)
            for clause in splitter.push(piece):
                if clauses == 0:
                    marks["first_clause"] = time.monotonic()
                clauses += 1
                self._queue_clause(turn, reply, clause)
                if clauses == 1:
                    self._yield_to_first_audio(reply)
        marks["reply_done"] = time.monotonic()
        stats = getattr(self.chat, "last_stats", None)
        marks["tokens"] = getattr(stats, "generated_tokens", tokens) or tokens
        if reply.cancel.is_set():
            return
        for clause in splitter.flush():
            if clauses == 0:
                marks["first_clause"] = time.monotonic()
            clauses += 1
            self._queue_clause(turn, reply, clause)
        answer = "".join(parts).strip()
        if clauses == 0:
            # The model said nothing speakable: silence would leave the visitor waiting.
            answer = llm.fallback_reply
            marks.setdefault("first_clause", time.monotonic())
            self._queue_clause(turn, reply, answer)
        reply.answer = answer
        if not self._await_confirmation(reply):
            return
        turn.answer = answer
        self._emit(EventType.REPLY_FINAL, turn, text=answer, tokens=int(marks["tokens"]))
        self._queue_clause(turn, reply, _END)

    def _yield_to_first_audio(self, reply: Reply) -> None:
        """Let the first clause's synthesis have the CPU before generating on.

        The stream is lazy: not pulling the next token pauses the LLM. On a small CPU the
        first sound waits for that synthesis, while the rest of the reply has the length of
        the first clause's playback to catch up.
        """
        deadline = time.monotonic() + FIRST_AUDIO_YIELD_S
        while "tts_first_audio" not in reply.marks and time.monotonic() < deadline:
            if reply.cancel.is_set() or self._stop.is_set():
                return
            time.sleep(0.005)

    def _speak_text(self, turn: Turn, reply: Reply) -> None:
        splitter = ClauseSplitter(self.cfg.tts.first_clause_min_words)
        turn.answer = reply.answer = reply.question
        for clause in splitter.push(reply.question) + splitter.flush():
            self._queue_clause(turn, reply, clause)
        self._queue_clause(turn, reply, _END)

    # -- TTS thread ------------------------------------------------------------------
    def _tts_loop(self) -> None:
        while not self._stop.is_set():
            try:
                turn, reply, item = self._tts_q.get(timeout=0.5)
            except queue.Empty:
                continue
            if reply.cancel.is_set():
                continue
            try:
                if item is _END:
                    self._end_speaking(turn, reply)
                else:
                    self._synthesize(turn, reply, item)
            except Exception as err:
                if reply.speculative and not reply.confirmed.is_set():
                    _LOGGER.warning("speculative synthesis failed: %s", err)
                    reply.cancel.set()
                    continue
                self._stage_failed(turn, err)

    def _synthesize(self, turn: Turn, reply: Reply, clause: str) -> None:
        if self.synth is None:
            raise StageError("no text-to-speech voice is configured (tts.model)", code="tts.missing")
        self._let_the_llm_run(reply)
        with reply.lock:
            if not reply.tts_started:
                reply.tts_started = True
                reply.gen = self.speaker.begin(on_start=lambda wall: self._on_first_play(turn, reply, wall),
                                               hold=not reply.confirmed.is_set())
        for audio in self.synth.synthesize(clause, reply.cancel):
            if reply.cancel.is_set():
                return
            reply.marks.setdefault("tts_first_audio", time.monotonic())
            if not self.speaker.write(audio, reply.gen):
                return

    def _let_the_llm_run(self, reply: Reply) -> None:
        """While the speaker has audio in hand and the LLM is still generating, wait.

        Synthesis and generation share a small CPU; the LLM is the one that can fall behind
        (on a Pi 5 it generates at about the pace of speech), so it goes first, and the voice
        picks up the next clause when the speaker's queue runs low.
        """
        if not reply.tts_started or not hasattr(self.speaker, "buffered_s"):
            return  # the first clause (the LLM is waiting for it), or a speaker that cannot tell
        while ("first_token" in reply.marks and "reply_done" not in reply.marks
               and self.speaker.buffered_s > TTS_LEAD_S and not reply.cancel.is_set()):
            time.sleep(0.01)

    def _on_first_play(self, turn: Turn, reply: Reply, wall: float) -> None:
        if reply.cancel.is_set():
            return
        reply.marks["first_play"] = wall
        self._set_state(State.SPEAKING, turn)
        self._emit(EventType.TTS_START, turn, timings_ms=turn.timings_ms())

    def _end_speaking(self, turn: Turn, reply: Reply) -> None:
        while not self.speaker.drain(timeout=0.1):
            if reply.cancel.is_set():
                return
        if reply.cancel.is_set():
            return
        if reply.tts_started:
            self._emit(EventType.TTS_END, turn, interrupted=False)
        self._finish_turn(turn, "done")
