"""The LLM worker: prefills the prompt while the visitor speaks, then streams each reply into clauses.

Jobs come from the owner: a prefill (the newest partial transcript; older queued ones are
dropped) or a reply. The reply's text is cut into clauses as it streams and handed to the
speech worker; after the first clause the LLM waits (up to ``FIRST_AUDIO_YIELD_S``) for its
audio, so that on a small CPU the first sound gets the cores first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.config import LlmConfig, TtsConfig
from edge.conversation.mailbox import Jobs
from edge.conversation.messages import Answered, Control, Failed, FirstClause, FirstToken, TurnView
from edge.conversation.speech import END, SpeechOutput
from edge.conversation.turn import Reply
from edge.errors import StageError
from edge.llm.base import ChatModel, Message
from edge.signals import Flag, wait_any
from edge.tts.clauses import ClauseSplitter

_LOGGER = logging.getLogger(__name__)

FIRST_AUDIO_YIELD_S = 2.0  # longest the LLM waits for the first clause's audio


@dataclass(frozen=True)
class Prefill:
    history: tuple[Message, ...]
    text: str
    chat: ChatModel
    cancel: Flag
    system: str | None = None


class Responder:
    def __init__(self, post: Callable[[Control], None], speech: SpeechOutput, *,
                 llm: Callable[[], LlmConfig], tts: Callable[[], TtsConfig]) -> None:
        """``llm`` and ``tts`` return the settings in force (they change at run time)."""
        self._post = post
        self._speech = speech
        self._llm = llm
        self._tts = tts
        self._jobs: Jobs[Prefill | Reply | None] = Jobs()
        self._thread = threading.Thread(target=self._run, name="responder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.discard(lambda job: True)
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def prefill(self, job: Prefill) -> None:
        """Only the newest partial matters: it replaces any prefill still queued."""
        self._jobs.discard(lambda j: isinstance(j, Prefill))
        self._jobs.put(job)

    def respond(self, reply: Reply) -> None:
        self._jobs.discard(lambda j: isinstance(j, Prefill))
        self._jobs.put(reply)

    # -- the worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, Prefill):
                if not job.cancel.is_set():
                    try:
                        job.chat.prefill(list(job.history), job.text, cancel=job.cancel, system=job.system)
                    except Exception:  # a prefill is an optimisation: the reply will say what is wrong
                        _LOGGER.warning("prefill failed", exc_info=True)
                continue
            if job.scope.cancelled:
                continue
            try:
                if job.view:
                    self._view(job)
                if job.faq is not None:
                    self._answer_faq(job)
                elif job.speak_as_is:
                    self._speak_as_is(job)
                else:
                    self._respond(job)
            except Exception as err:  # the owner decides what a failure means for the turn
                self._post(Failed(job, err, "llm"))
            finally:
                job.generated.set()

    def _view(self, reply: Reply) -> None:
        """The LLM's view on whether the visitor has finished: read before the reply, from what the
        prefill evaluated (one token, usually), and posted for the owner to decide the endpoint."""
        t0 = time.monotonic()
        p = None
        if reply.chat is not None:
            try:
                p = reply.chat.end_of_turn_probability(list(reply.history), reply.question, cancel=reply.view_scope,
                                                       system=reply.system)
            except Exception:  # no view: the fixed silence decides
                _LOGGER.warning("the LLM's end-of-turn view failed", exc_info=True)
        self._post(TurnView(reply, "text", p, time.monotonic() - t0))

    def _respond(self, reply: Reply) -> None:
        chat = reply.chat
        if chat is None:
            raise StageError("no language model is configured (llm.model)", code="llm.missing")
        llm, tts = self._llm(), self._tts()
        # Run-on text is cut at 24 words: synthesis memory and time grow with a sentence's length.
        splitter = ClauseSplitter(tts.first_clause_min_words, long_words=16, max_words=24,
                                  first_max_words=max(tts.first_clause_max_words, tts.first_clause_min_words))
        deadline = time.monotonic() + llm.reply_timeout_s
        parts: list[str] = []
        clauses = tokens = 0
        for piece in chat.stream(list(reply.history), reply.question, cancel=reply.scope,
                                 max_tokens=reply.max_tokens, deadline=deadline, system=reply.system):
            tokens += 1
            if tokens == 1:
                self._post(FirstToken(reply, time.monotonic()))
            parts.append(piece)
            for clause in splitter.push(piece):
                if clauses == 0:
                    self._post(FirstClause(reply, time.monotonic()))
                clauses += 1
                self._speech.queue(reply, clause)
                if clauses == 1:
                    # The stream is lazy: not pulling the next token pauses the LLM. On a small CPU
                    # the first sound waits for this synthesis, while the rest of the reply has the
                    # length of the first clause's playback to catch up.
                    wait_any(reply.first_audio, reply.scope, timeout=FIRST_AUDIO_YIELD_S)
        done_at = time.monotonic()
        tokens = chat.last_stats.generated_tokens or tokens
        if reply.scope.cancelled:
            return
        for clause in splitter.flush():
            if clauses == 0:
                self._post(FirstClause(reply, time.monotonic()))
            clauses += 1
            self._speech.queue(reply, clause)
        answer = "".join(parts).strip()
        if clauses == 0:
            # The model said nothing speakable: silence would leave the visitor waiting.
            answer = llm.fallback_reply
            self._post(FirstClause(reply, time.monotonic()))
            self._speech.queue(reply, answer)
        reply.generated.set()
        self._post(Answered(reply, answer, tokens, done_at))
        self._speech.queue(reply, END)

    def _answer_faq(self, reply: Reply) -> None:
        """A ready answer: its audio when it was synthesized ahead of time, else its text."""
        faq = reply.faq
        assert faq is not None
        self._post(FirstClause(reply, time.monotonic()))
        if faq.audio is not None:
            self._speech.queue(reply, faq.audio)
        else:
            splitter = ClauseSplitter(self._tts().first_clause_min_words)
            for clause in splitter.push(faq.text) + splitter.flush():
                self._speech.queue(reply, clause)
        reply.generated.set()
        self._post(Answered(reply, faq.text, 0, time.monotonic()))
        self._speech.queue(reply, END)

    def _speak_as_is(self, reply: Reply) -> None:
        splitter = ClauseSplitter(self._tts().first_clause_min_words)
        for clause in splitter.push(reply.question) + splitter.flush():
            self._speech.queue(reply, clause)
        reply.generated.set()
        self._post(Answered(reply, reply.question, 0, time.monotonic()))
        self._speech.queue(reply, END)
