"""The conversation: one thread owns the turn, the reply and the state machine.

    IDLE ──wake / push-to-talk──► LISTENING ──final transcript──► THINKING ──first audio──► SPEAKING
      ▲                              │ no speech                                              │
      └──────────────────────────────┴───────────────── turn.end ◄─────────────────────────────┘

Threads:
- the owner (``conversation``) handles the inbox, control messages before audio. It alone
  touches the turn and reply state, the wake detector and the recognizer (audio is fed to them
  in order, and the owner switches between them at exactly the chunk where a turn starts or
  ends), and it alone emits events;
- the responder runs the LLM: prefills while the visitor speaks, then the reply, cut into
  clauses (:mod:`edge.conversation.responder`);
- the speech worker synthesizes clauses into the speaker (:mod:`edge.conversation.speech`).

Each turn has one cancel scope; each reply attempt a child of it. Barge-in, cancel, mute and
shutdown all end in :meth:`Conversation._abort`, which cancels the turn's scope (the LLM stops
between tokens, synthesis between sentences) and flushes the speaker. Everything observable
leaves as an :class:`~edge.events.Event`; other threads read the conversation through an
immutable :class:`Snapshot`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from edge.audio.base import Clock, Speaker
from edge.audio.buffers import PreRoll
from edge.audio.chunk import AudioChunk
from edge.config import Config
from edge.conversation import messages as m
from edge.conversation.mailbox import Inbox
from edge.conversation.messages import Outcome, State, Trigger
from edge.conversation.responder import Prefill, Responder
from edge.conversation.session import Sessions
from edge.conversation.speech import SpeechOutput
from edge.conversation.turn import Reply, Turn, same_words
from edge.conversation.turnview import AudioViews
from edge.errors import EdgeError
from edge.events import Event, EventBus, EventType, new_id
from edge.knowledge.venue import FaqAnswer, Venue
from edge.llm.base import ChatModel
from edge.signals import CancelScope, Flag
from edge.stt.base import Recognizer, SttUpdate, UpdateKind
from edge.tts.base import Synthesizer
from edge.turn import TurnDetector, TurnRule, rule_from_config
from edge.wake.base import WakeDetector

_LOGGER = logging.getLogger(__name__)

# A conversation that fails on this many chunks in a row (2 s of audio) is broken beyond a
# cancelled turn: its thread ends, and the daemon exits non-zero for systemd to restart it.
FEED_FAILURES_MAX = 100
ANSWER_TIMEOUT_S = 5.0  # longest a caller waits for the owner to answer (cancel)


@dataclass(frozen=True)
class Snapshot:
    """What other threads may know of the conversation, replaced after every message."""

    state: State = State.IDLE
    in_turn: bool = False
    answering: bool = False  # a reply is being prepared or spoken: wall time is what the visitor feels
    muted: bool = False
    continuous: bool = False  # a handset is off the hook: listening turn after turn
    turns_done: int = 0


class Conversation:
    def __init__(self, cfg: Config, *, bus: EventBus, clock: Clock, speaker: Speaker,
                 wake: WakeDetector | None, recognizer: Recognizer | None,
                 chat: ChatModel | None, synth: Synthesizer | None, venue: Venue | None = None,
                 turn_detector: TurnDetector | None = None) -> None:
        """``venue``: the venue's knowledge (FAQ answers, the LLM's prompt per question), if any;
        ``turn_detector``: an audio end-of-turn model, read at each pause (``[turn] detector``)."""
        self._cfg = cfg
        self.venue = venue
        self.bus = bus
        self.clock = clock
        self.speaker = speaker
        self._wake = wake
        self._recognizer = recognizer
        self._chat = chat
        self._synth = synth
        self.sessions = Sessions(cfg.llm.session_idle_s, cfg.llm.memory_tokens,
                                 chat.count_tokens if chat is not None else None)
        # (a visitor who talks over the device is heard from where their speech began)
        voice_ms = int(1000 * cfg.conversation.barge_in_speech_s) + 600 if cfg.conversation.barge_in == "speech" else 0
        self.preroll = PreRoll(max(cfg.audio.preroll_ms, voice_ms))
        self._inbox = Inbox()
        self._state = State.IDLE
        self._turn: Turn | None = None
        self._muted = False
        self._continuous = False
        self._turns_done = 0
        self._prefills: list[CancelScope] = []  # scopes of prefills not yet cancelled
        self._feed_failures = 0
        self.snapshot = Snapshot()
        self.speech = SpeechOutput(self._inbox.post, speaker)
        self.responder = Responder(self._inbox.post, self.speech, llm=lambda: self._cfg.llm,
                                   tts=lambda: self._cfg.tts)
        self._audio_views = AudioViews(self._inbox.post, turn_detector) if turn_detector is not None else None
        self._rule: tuple[Config, TurnRule | None] | None = None
        self._last_chunk: AudioChunk | None = None
        # The wake words as spoken ("hey_jarvis" -> hey jarvis): a transcript that starts with one
        # heard the wake word's tail.
        self._wake_phrases = [tuple(w.name.lower().replace("_", " ").split()) for w in cfg.wake.word_list()
                              if cfg.wake.engine == "openwakeword" and w.name]
        self._thread = threading.Thread(target=self._run, name="conversation", daemon=True)
        self.failed: BaseException | None = None
        self._handlers: dict[type, Callable[[Any], None]] = {
            m.Audio: self._on_audio, m.Listen: self._on_listen, m.TextTurn: self._on_text_turn,
            m.Cancel: self._on_cancel, m.Mute: self._on_mute, m.Handset: self._on_handset,
            m.EndSession: self._on_end_session,
            m.Settings: self._on_settings, m.ReplaceStages: self._on_replace_stages,
            m.FollowUp: self._on_follow_up, m.FirstToken: self._on_first_token,
            m.FirstClause: self._on_first_clause, m.Answered: self._on_answered,
            m.FirstAudio: self._on_first_audio, m.Playing: self._on_playing,
            m.PlaybackDone: self._on_playback_done, m.Failed: self._on_failed, m.TurnView: self._on_turn_view,
        }

    # -- lifecycle (any thread) --------------------------------------------------------------
    def start(self) -> None:
        self.speech.start()
        self.responder.start()
        if self._audio_views is not None:
            self._audio_views.start()
        self._thread.start()

    def stop(self) -> None:
        """Cancel the turn in progress and stop the threads."""
        if self._thread.is_alive():
            self._inbox.post(m.Cancel(Outcome.SHUTDOWN))
            self._inbox.post(m.Stop())
            self._thread.join(timeout=5)
        self.responder.stop()
        self.speech.stop()
        if self._audio_views is not None:
            self._audio_views.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- what other threads may read ----------------------------------------------------------
    @property
    def cfg(self) -> Config:
        """The settings in force (replaced, never changed, by :meth:`apply_settings`)."""
        return self._cfg

    @property
    def state(self) -> State:
        return self.snapshot.state

    @property
    def muted(self) -> bool:
        return self.snapshot.muted

    @property
    def continuous(self) -> bool:
        return self.snapshot.continuous

    @property
    def turns_done(self) -> int:
        return self.snapshot.turns_done

    def idle(self) -> bool:
        """No turn, nothing to do: all that was asked of it has been handled."""
        s = self.snapshot
        return not self._inbox.control_pending and not s.in_turn and s.state == State.IDLE

    def answering(self) -> bool:
        return self.snapshot.answering

    # -- requests (any thread) ----------------------------------------------------------------
    def feed(self, chunk: AudioChunk) -> None:
        """The next chunk of microphone audio; waits while the owner is far behind."""
        self._inbox.post_audio(m.Audio(chunk))

    def process(self, chunk: AudioChunk, timeout: float | None = None) -> bool:
        """Feed a chunk and wait until it has been handled (lock-step feeding, as in ``simulate``)."""
        done = Flag()
        if not self._inbox.post_audio(m.Audio(chunk, done)):
            return False
        return done.wait(timeout)

    def push_to_talk(self) -> None:
        """Start listening now, without the wake word (MQTT ``listen``, a kiosk button)."""
        self._inbox.post(m.Listen(Trigger.PUSH_TO_TALK))

    def interrupted_by_speech(self, since: float) -> None:
        """A visitor has talked over the device since audio time ``since``: stop and listen to
        them from there (``conversation.barge_in = "speech"``)."""
        self._inbox.post(m.Listen(Trigger.SPEECH, since))

    def say(self, text: str) -> str:
        """Speak ``text`` (an operator announcement); interrupts a turn in progress."""
        return self._text_turn(Trigger.SAY, text)

    def ask(self, text: str) -> str:
        """A typed question: through the LLM, spoken and published like a spoken one."""
        return self._text_turn(Trigger.ASK, text)

    def _text_turn(self, trigger: Trigger, text: str) -> str:
        turn_id = new_id()
        self._inbox.post(m.TextTurn(trigger, text, turn_id))
        return turn_id

    def cancel(self, reason: Outcome = Outcome.CANCELLED) -> bool:
        """Stop whatever turn is in progress. True if there was one."""
        msg = m.Cancel(reason)
        self._ask(msg)
        return msg.result.result(ANSWER_TIMEOUT_S) if self._thread.is_alive() else False

    def mute(self) -> None:
        """Stop the turn in progress and hear nothing until :meth:`unmute`; returns once in effect."""
        self._ask(m.Mute(True))

    def unmute(self) -> None:
        self._ask(m.Mute(False))

    def _ask(self, msg: m.Cancel | m.Mute) -> None:
        """Post a message whose result the caller waits for (handled at once on the owner thread)."""
        if threading.current_thread() is self._thread:
            self._run_handler(msg)
        elif self._thread.is_alive():
            self._inbox.post(msg)
            if isinstance(msg, m.Mute):
                msg.result.result(ANSWER_TIMEOUT_S)

    def off_hook(self, greeting: str = "") -> None:
        """A handset was lifted: a fresh session, a greeting, then listening turn after turn."""
        self._inbox.post(m.Handset(True, greeting))

    def on_hook(self) -> None:
        """The handset was put down: stop, and forget the conversation."""
        self._inbox.post(m.Handset(False))

    def end_session(self) -> None:
        """Forget the conversation so far: the next question starts a new session."""
        self._inbox.post(m.EndSession())

    def apply_settings(self, changes: dict[str, Any]) -> None:
        """Runtime settings ("section.key" → value, already validated); used from the next turn."""
        self._inbox.post(m.Settings(dict(changes)))

    def replace_stages(self, stages: Any) -> Future[Any]:
        """Cancel the turn and use reloaded stages; the future gives the old ones, to be closed."""
        msg = m.ReplaceStages(stages)
        self._inbox.post(msg)
        return msg.retired

    # -- the owner thread ---------------------------------------------------------------------
    def _run_handler(self, msg: Any) -> None:
        self._handlers[type(msg)](msg)

    def _run(self) -> None:
        try:
            while True:
                msg = self._inbox.get()
                if isinstance(msg, m.Stop):
                    self._inbox.handled(msg)
                    return
                try:
                    self._run_handler(msg)
                    if isinstance(msg, m.Audio):
                        self._feed_failures = 0
                except Exception as err:
                    if not self._survive(msg, err):
                        self.failed = err
                        return
                finally:
                    if isinstance(msg, m.Audio) and msg.done is not None:
                        msg.done.set()
                    self._publish()
                    self._inbox.handled(msg)
        finally:
            self._inbox.close()

    def _survive(self, msg: Any, err: Exception) -> bool:
        """A failure on one message cancels the turn; failing on every chunk ends the thread."""
        if isinstance(msg, (m.Cancel, m.Mute)) and not msg.result.done():
            msg.result.set_exception(err)
        if not isinstance(msg, m.Audio):
            _LOGGER.exception("the conversation failed on %s", type(msg).__name__)
            return True
        self._feed_failures += 1
        if self._feed_failures == 1:
            _LOGGER.exception("the conversation failed on an audio chunk; cancelling the turn")
            try:
                self._stop_turn(Outcome.ERROR)
            except Exception:
                _LOGGER.exception("cancelling the turn failed too")
        if self._feed_failures >= FEED_FAILURES_MAX:
            _LOGGER.error("the conversation failed on %d chunks in a row; giving up", self._feed_failures)
            return False
        return True

    def _publish(self) -> None:
        turn = self._turn
        self.snapshot = Snapshot(
            state=self._state, in_turn=turn is not None,
            answering=turn is not None and (self._state != State.LISTENING or turn.reply is not None),
            muted=self._muted, continuous=self._continuous, turns_done=self._turns_done)

    # -- events --------------------------------------------------------------------------------
    def _emit(self, etype: EventType, turn: Turn | None = None, audio_time: float | None = None,
              **data: Any) -> None:
        self.bus.emit(Event(etype, data, turn_id=turn.id if turn else None,
                            session_id=turn.session_id if turn else None,
                            audio_time=self.clock.now() if audio_time is None else audio_time))

    def _set_state(self, state: State, turn: Turn | None = None) -> None:
        if self._state != state:
            self._state = state
            self._emit(EventType.STATE, turn, state=state.value)

    def _new_turn(self, trigger: Trigger, turn_id: str | None = None) -> Turn:
        turn = Turn(trigger=trigger, session_id=self.sessions.current().id)
        if turn_id:
            turn.id = turn_id
        return turn

    # -- audio -----------------------------------------------------------------------------------
    def _on_audio(self, msg: m.Audio) -> None:
        chunk = msg.chunk
        self.preroll.append(chunk)
        self._last_chunk = chunk
        if self._muted:
            return
        if self._state == State.LISTENING:
            self._listen(chunk)
            return
        cfg = self._cfg.conversation
        if self._wake is None or (self._state == State.IDLE and cfg.mode != "wake"):
            return
        if self._state != State.IDLE and cfg.barge_in == "none":
            return
        hits = self._wake.process(chunk)
        if not hits:
            return
        hit = max(hits, key=lambda h: h.score)
        current = self._turn
        if current is not None:
            self._emit(EventType.BARGE_IN, current, audio_time=hit.audio_time, word=hit.word)
            self._abort(current, Outcome.BARGE_IN)
        turn = self._new_turn(Trigger.WAKE)
        self._emit(EventType.WAKE, turn, audio_time=hit.audio_time, word=hit.word, score=round(hit.score, 3))
        self._start_listening(turn, self.preroll.since(hit.audio_time - self._cfg.audio.preroll_ms / 1000))

    def _start_listening(self, turn: Turn, preroll: list[AudioChunk]) -> None:
        assert self._recognizer is not None
        turn.listen_start = self.clock.now()
        self._recognizer.start(preroll)
        self._turn = turn
        self._emit(EventType.TURN_START, turn, trigger=turn.trigger.value)
        self._set_state(State.LISTENING, turn)

    def _listen(self, chunk: AudioChunk) -> None:
        turn = self._turn
        if turn is None or self._recognizer is None:
            self._set_state(State.IDLE)
            return
        if self._audio_views is not None:
            turn.heard.append(chunk)
            keep = int((self._audio_views.detector.window_s + 0.5) * chunk.rate / max(1, len(chunk)))
            del turn.heard[:-keep]
        for upd in self._recognizer.accept(chunk):
            if upd.text and self._wake_phrases:
                upd = self._without_wake_phrase(upd)
                if not upd.text and upd.kind == UpdateKind.FINAL:
                    # Only the wake word's own tail (heard over the device's voice, or said twice):
                    # not a question. Keep listening.
                    self._listen_again(turn)
                    continue
                if not upd.text and upd.kind != UpdateKind.SPEECH_START:
                    continue
            if upd.kind == UpdateKind.SPEECH_START:
                turn.speech_started = True
                turn.listen_deadline = None
                self._emit(EventType.SPEECH_START, turn, audio_time=upd.audio_time)
            elif upd.kind == UpdateKind.PARTIAL:
                text = upd.text.strip()
                if text and text != turn.last_partial:
                    turn.last_partial = text
                    self._emit(EventType.TRANSCRIPT_PARTIAL, turn, audio_time=upd.audio_time, text=text)
                    if turn.reply is None:
                        self._prefill(turn, text)
            elif upd.kind == UpdateKind.PAUSE:
                self._on_pause(turn, upd.text.strip())
            elif upd.kind == UpdateKind.RESUME:
                self._drop_speculation(turn)
            elif upd.kind == UpdateKind.FINAL:
                self._on_final(turn, upd, chunk)
                return
        now = chunk.end_s
        stt = self._cfg.stt
        start = turn.listen_start or 0.0
        timed_out = not turn.speech_started and not self._continuous and (
            now - start > stt.no_speech_timeout_s
            or (turn.listen_deadline is not None and now > turn.listen_deadline))
        too_long = turn.speech_started and now - start > stt.max_utterance_s
        if timed_out or too_long:
            final = self._recognizer.finish()
            if final is not None:
                final = self._without_wake_phrase(final)
            if final is not None and final.text.strip():
                self._on_final(turn, final, chunk)
            else:
                self._finish_turn(turn, Outcome.NO_SPEECH)

    def _listen_again(self, turn: Turn) -> None:
        """What was heard was no question: drop any reply started for it and listen afresh, with
        the no-speech limit from now."""
        assert self._recognizer is not None
        self._drop_speculation(turn)
        self._recognizer.start([])
        turn.speech_started = False
        turn.listen_start = self.clock.now()

    def _without_wake_phrase(self, upd: SttUpdate) -> SttUpdate:
        """``upd`` without a leading wake phrase in its text ("Hey Jarvis. Where is..." -> "Where
        is..."): the recognizer heard the wake word's tail. Every final passes through here,
        whichever way it came (a chunk, the end-of-turn views, a time limit)."""
        words = upd.text.split()
        key = [w.strip(".,!?;:").lower() for w in words]
        for phrase in self._wake_phrases:
            if key[:len(phrase)] == list(phrase):
                rest = " ".join(words[len(phrase):]).lstrip(".,!?;: ")
                return dataclasses.replace(upd, text=rest[:1].upper() + rest[1:])
        return upd

    def _prefill(self, turn: Turn, text: str) -> None:
        if self._chat is None:
            return
        scope = turn.scope.child()
        self._prefills.append(scope)
        system = self.venue.system_prompt(text) if self.venue is not None else None
        self.responder.prefill(Prefill(tuple(self.sessions.history()), text, self._chat, scope, system))

    def _cancel_prefills(self) -> None:
        for scope in self._prefills:
            scope.cancel()
        self._prefills.clear()

    def _on_pause(self, turn: Turn, text: str) -> None:
        """The visitor paused: start the reply now, to be played only if they are done."""
        if not text or (self._chat is None and self.venue is None):
            return
        if turn.reply is not None and same_words(turn.reply.question, text):
            return
        self._drop_speculation(turn)
        if text != turn.last_partial:
            turn.last_partial = text
            self._emit(EventType.TRANSCRIPT_PARTIAL, turn, text=text)
        _LOGGER.debug("pause: starting a speculative reply to %r", text)
        self._start_reply(turn, text, speculative=True)
        self._ask_views(turn)

    # -- end of turn -------------------------------------------------------------------------------
    def _turn_rule(self) -> TurnRule | None:
        if self._rule is None or self._rule[0] is not self._cfg:
            self._rule = (self._cfg, rule_from_config(self._cfg))
        return self._rule[1]

    def _ask_views(self, turn: Turn) -> None:
        """At a pause: ask each view whether the visitor has finished (the LLM's before it answers,
        the audio model's on its worker); the owner decides once they have answered."""
        rule, reply = self._turn_rule(), turn.reply
        turn.views, turn.views_awaited, turn.endpoint_s = {}, set(), None
        if rule is None or reply is None:
            return
        if reply.view:
            turn.views_awaited.add("text")
        if self._audio_views is not None and rule.weights.get("audio", 0) > 0 and turn.heard:
            import numpy as np

            turn.views_awaited.add("audio")
            self._audio_views.ask(reply, np.concatenate([c.samples for c in turn.heard]))

    def _on_turn_view(self, msg: m.TurnView) -> None:
        turn = self._current(msg.reply)
        rule = self._turn_rule()
        if turn is None or rule is None or self._state != State.LISTENING or msg.kind not in turn.views_awaited:
            return
        turn.views_awaited.discard(msg.kind)
        if msg.probability is not None:
            turn.views[msg.kind] = msg.probability
        _LOGGER.debug("end of turn: %s view %s (%.0f ms)", msg.kind, msg.probability, 1000 * msg.cost_s)
        if turn.views_awaited or self._recognizer is None:
            return
        turn.endpoint_s = rule.silence_needed(turn.views)
        final = self._recognizer.set_endpoint(turn.endpoint_s)
        if final is None or self._last_chunk is None:
            return
        final = self._without_wake_phrase(final)
        if final.text.strip():
            self._on_final(turn, final, self._last_chunk)
        else:  # only the wake word's tail: keep listening, as for a final heard in a chunk
            self._listen_again(turn)

    def _drop_speculation(self, turn: Turn) -> None:
        turn.views, turn.views_awaited, turn.endpoint_s = {}, set(), None
        reply = turn.reply
        if reply is not None and not reply.hold.confirmed.is_set():
            reply.scope.cancel()
            self.speaker.flush()
            turn.reply = None

    def _on_final(self, turn: Turn, upd: SttUpdate, chunk: AudioChunk) -> None:
        text = upd.text.strip()
        turn.listen_deadline = None
        if not text:
            self._finish_turn(turn, Outcome.NO_SPEECH)
            return
        turn.text = text
        t = turn.timings
        t.ref_audio = upd.audio_time
        t.speech_end = upd.speech_end if upd.speech_end is not None else upd.audio_time
        t.ref_wall = chunk.wall or time.monotonic()
        t.marks["final"] = time.monotonic()
        self._emit(EventType.SPEECH_END, turn, audio_time=t.speech_end)
        extra: dict[str, Any] = {}
        if turn.endpoint_s is not None:  # what ended the turn: the views' decision, not only the silence
            extra["end_of_turn"] = {"silence_s": turn.endpoint_s,
                                    "views": {k: float(f"{p:.3g}") for k, p in turn.views.items()}}
        self._emit(EventType.TRANSCRIPT_FINAL, turn, audio_time=upd.audio_time, text=text, **extra)
        self._set_state(State.THINKING, turn)
        if self._wake is not None:
            self._wake.reset()  # it was not fed while listening
        reply = turn.reply
        faq = self.venue.ready_answer(text) if self.venue is not None else None
        same = reply is not None and not reply.scope.cancelled and (
            same_words(reply.question, text)
            or (reply.faq is not None and faq is not None and reply.faq.entry_id == faq.entry_id))
        if reply is not None and same:
            _LOGGER.debug("the speculative reply answers the final transcript: keeping it")
            reply.hold.confirm()
            if reply.faq is not None:
                # The visitor has finished: a ready answer need not wait for the LLM's view (on a
                # busy CPU its prefill of the question can take seconds). An LLM reply lets it
                # run: its prompt is what the view was evaluating.
                reply.view_scope.cancel("the turn ended")
            if turn.answered is reply:
                self._publish_answer(turn, reply)
        else:
            self._drop_speculation(turn)
            self._start_reply(turn, text, speculative=False, faq=faq)

    def _start_reply(self, turn: Turn, question: str, *, speculative: bool, speak_as_is: bool = False,
                     faq: FaqAnswer | None | bool = True) -> None:
        """A reply to ``question``: an FAQ entry's ready answer when the venue has one (``faq``: the
        entry already matched, None for none, True to match here), else the LLM's."""
        venue = self.venue
        if speak_as_is or venue is None:
            faq = None
        elif faq is True:
            faq = venue.ready_answer(question)
        answer = faq if isinstance(faq, FaqAnswer) else None
        system = venue.system_prompt(question) if venue is not None and answer is None else None
        rule = self._turn_rule()
        view = (speculative and rule is not None and rule.weights.get("text", 0) > 0 and self._chat is not None
                and self._state == State.LISTENING)
        reply = Reply(question, tuple(self.sessions.history()), turn.scope.child(), self._chat, self._synth,
                      max_tokens=self._cfg.llm.max_tokens, speculative=speculative, speak_as_is=speak_as_is,
                      faq=answer, system=system, view=view)
        turn.reply = reply
        turn.answered = None
        turn.playing = False
        turn.timings.new_reply()
        self._cancel_prefills()  # a prefill under way stops at its next slice
        self.responder.respond(reply)

    # -- commands ----------------------------------------------------------------------------------
    def _on_listen(self, msg: m.Listen) -> None:
        current = self._turn
        if self._muted or (current is not None and self._state == State.LISTENING):
            return
        if msg.trigger == Trigger.SPEECH and (current is None or self._state not in (State.THINKING, State.SPEAKING)):
            return  # the device has stopped talking meanwhile: the wake word starts turns
        if current is not None:
            self._emit(EventType.BARGE_IN, current, trigger=msg.trigger.value)
            self._abort(current, Outcome.BARGE_IN)
        preroll = self.preroll.since(msg.since - self._cfg.audio.preroll_ms / 1000) if msg.since is not None else []
        self._start_listening(self._new_turn(msg.trigger), preroll)

    def _on_follow_up(self, msg: m.FollowUp) -> None:
        """Listen again after a turn (a follow-up window, a lifted handset), unless a turn began."""
        if self._turn is not None or self._muted:
            return
        msg.turn.listen_deadline = msg.deadline
        self._start_listening(msg.turn, [])

    def _on_text_turn(self, msg: m.TextTurn) -> None:
        self._stop_turn(Outcome.INTERRUPTED)
        turn = self._new_turn(msg.trigger, msg.turn_id)
        turn.timings.ref_wall = time.monotonic()
        self._turn = turn
        self._emit(EventType.TURN_START, turn, trigger=msg.trigger.value)
        if msg.trigger == Trigger.ASK:
            turn.text = msg.text
            self._emit(EventType.TRANSCRIPT_FINAL, turn, text=msg.text, source="text")
            self._set_state(State.THINKING, turn)
        self._start_reply(turn, msg.text, speculative=False, speak_as_is=msg.trigger == Trigger.SAY)

    def _on_cancel(self, msg: m.Cancel) -> None:
        msg.result.set_result(self._stop_turn(msg.reason))

    def _stop_turn(self, reason: Outcome) -> bool:
        """End the turn in progress, whatever its state; True if there was one."""
        turn = self._turn
        if turn is None:
            return False
        if self._state == State.LISTENING and turn.reply is None:
            if self._recognizer is not None:
                self._recognizer.finish()
            self._finish_turn(turn, reason)
        else:
            self._abort(turn, reason)
        return True

    def _on_mute(self, msg: m.Mute) -> None:
        self._muted = msg.muted
        if msg.muted:
            self._stop_turn(Outcome.MUTED)
        msg.result.set_result(None)

    def _on_handset(self, msg: m.Handset) -> None:
        reason = Outcome.OFF_HOOK if msg.off_hook else Outcome.ON_HOOK
        self._continuous = msg.off_hook
        self._stop_turn(reason)
        ended = self.sessions.end()
        self._emit(EventType.SESSION_END, None, reason=reason.value, ended=ended.id)
        if not msg.off_hook:
            return
        if msg.greeting:
            self._on_text_turn(m.TextTurn(Trigger.SAY, msg.greeting, new_id()))
        else:
            self._on_listen(m.Listen(Trigger.PUSH_TO_TALK))

    def _on_end_session(self, msg: m.EndSession) -> None:
        ended = self.sessions.end()
        self._emit(EventType.SESSION_END, None, reason="reset", ended=ended.id)

    def _on_settings(self, msg: m.Settings) -> None:
        cfg = self._cfg
        for key, value in msg.changes.items():
            section, _, name = key.partition(".")
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
        self._cfg = cfg

    def _on_replace_stages(self, msg: m.ReplaceStages) -> None:
        self._stop_turn(Outcome.RELOAD)
        new = msg.stages
        views = self._audio_views
        old = dataclasses.replace(new, wake=self._wake, recognizer=self._recognizer, chat=self._chat,
                                  synth=self._synth, turn=views.detector if views is not None else None)
        self._wake, self._recognizer, self._chat, self._synth = new.wake, new.recognizer, new.chat, new.synth
        if views is not None:
            views.stop()
        self._audio_views = AudioViews(self._inbox.post, new.turn) if new.turn is not None else None
        if self._audio_views is not None:
            self._audio_views.start()
        msg.retired.set_result(old)

    # -- what the workers report ------------------------------------------------------------------
    def _current(self, reply: Reply) -> Turn | None:
        """The turn ``reply`` belongs to, if it is still the reply in progress."""
        turn = self._turn
        if turn is None or turn.reply is not reply or reply.scope.cancelled:
            return None
        return turn

    def _on_first_token(self, msg: m.FirstToken) -> None:
        if (turn := self._current(msg.reply)) is not None:
            turn.timings.reply_marks.setdefault("first_token", msg.at)

    def _on_first_clause(self, msg: m.FirstClause) -> None:
        if (turn := self._current(msg.reply)) is not None:
            turn.timings.reply_marks.setdefault("first_clause", msg.at)

    def _on_first_audio(self, msg: m.FirstAudio) -> None:
        if (turn := self._current(msg.reply)) is not None:
            turn.timings.reply_marks.setdefault("tts_first_audio", msg.at)

    def _on_answered(self, msg: m.Answered) -> None:
        turn = self._current(msg.reply)
        if turn is None:
            return
        reply = msg.reply
        if not reply.speak_as_is:
            turn.timings.reply_marks["reply_done"] = msg.at
            turn.timings.tokens = msg.tokens
        turn.answered = reply
        turn.answered_text = msg.text
        if reply.hold.confirmed.is_set():
            self._publish_answer(turn, reply)

    def _publish_answer(self, turn: Turn, reply: Reply) -> None:
        turn.answer = turn.answered_text
        if not reply.speak_as_is:
            extra: dict[str, Any] = {"faq_id": reply.faq.entry_id} if reply.faq is not None else {}
            self._emit(EventType.REPLY_FINAL, turn, text=turn.answer, tokens=turn.timings.tokens, path=reply.path,
                       **extra)

    def _on_playing(self, msg: m.Playing) -> None:
        turn = self._current(msg.reply)
        if turn is None:
            return
        turn.playing = True
        turn.timings.reply_marks["first_play"] = msg.at
        self._set_state(State.SPEAKING, turn)
        self._emit(EventType.TTS_START, turn, timings_ms=turn.timings.as_ms())

    def _on_playback_done(self, msg: m.PlaybackDone) -> None:
        turn = self._current(msg.reply)
        if turn is None:
            return
        if turn.playing:
            self._emit(EventType.TTS_END, turn, interrupted=False)
        self._finish_turn(turn, Outcome.DONE)

    def _on_failed(self, msg: m.Failed) -> None:
        turn = self._current(msg.reply)
        if turn is None:
            _LOGGER.debug("a cancelled reply's %s failed: %s", msg.stage, msg.error)
            return
        err = msg.error
        if msg.reply.speculative and not msg.reply.hold.confirmed.is_set():
            _LOGGER.warning("speculative reply failed in %s: %s", msg.stage, err)
            self._drop_speculation(turn)
            return
        if isinstance(err, EdgeError):
            _LOGGER.error("turn %s failed: %s", turn.id, err)
            self._emit(EventType.ERROR, turn, code=err.code, message=err.message)
        else:
            _LOGGER.error("turn %s failed", turn.id, exc_info=err)
            self._emit(EventType.ERROR, turn, code="internal", message=f"{type(err).__name__}: {err}")
        self._abort(turn, Outcome.ERROR)

    # -- turn endings ------------------------------------------------------------------------------
    def _abort(self, turn: Turn, reason: Outcome) -> None:
        turn.scope.cancel(reason.value)  # the LLM, synthesis and any held audio of every reply
        self._cancel_prefills()
        self.speaker.flush()
        if turn.playing:
            self._emit(EventType.TTS_END, turn, interrupted=True)
        self._finish_turn(turn, reason)

    def _finish_turn(self, turn: Turn, outcome: Outcome) -> None:
        if self._turn is not turn:
            return
        self._turn = None
        self._cancel_prefills()
        if outcome == Outcome.DONE and turn.text and turn.answer and turn.trigger != Trigger.SAY:
            self.sessions.add_exchange(turn.text, turn.answer)
        self.sessions.touch()
        reply = turn.reply
        self._emit(EventType.TURN_END, turn, outcome=outcome.value, trigger=turn.trigger.value,
                   text=turn.text, reply=turn.answer, speculative=bool(reply and reply.speculative),
                   path=reply.path if reply is not None else None, timings_ms=turn.timings.as_ms())
        self._turns_done += 1
        self._set_state(State.IDLE)
        follow = self._cfg.conversation.follow_up_s
        if self._continuous and not self._muted and outcome not in (Outcome.ON_HOOK, Outcome.OFF_HOOK,
                                                                      Outcome.SHUTDOWN):
            self._inbox.post(m.FollowUp(self._new_turn(Trigger.HANDSET), None))
        elif outcome == Outcome.DONE and follow > 0 and not self._muted and turn.trigger != Trigger.SAY:
            self._inbox.post(m.FollowUp(self._new_turn(Trigger.FOLLOW_UP), self.clock.now() + follow))
