"""The speech worker: synthesizes a reply's clauses as they come and writes them to the speaker.

Its queue is bounded, so a slow voice pauses the LLM (which waits to queue its next clause), and
the speaker's queue is bounded, so a slow speaker pauses the voice. It tells the owner when a
reply's first audio is ready, when it starts to sound and when it has all been heard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np

from edge.audio.base import Speaker
from edge.conversation.mailbox import Jobs
from edge.conversation.messages import Control, Failed, FirstAudio, PlaybackDone, Playing
from edge.conversation.turn import Reply
from edge.errors import StageError
from edge.signals import wait_any

_LOGGER = logging.getLogger(__name__)

# While the LLM generates, synthesize the next clause once less than this is waiting in the
# speaker: synthesis and generation share a small CPU, and the LLM is the one that can fall
# behind (on a Pi 5 it generates at about the pace of speech), so it goes first.
TTS_LEAD_S = 0.5
QUEUED_CLAUSES = 8
END = "\0end"  # after a reply's last clause
_STOP = None


class SpeechOutput:
    def __init__(self, post: Callable[[Control], None], speaker: Speaker) -> None:
        self._post = post
        self.speaker = speaker
        self._jobs: Jobs[tuple[Reply, str | np.ndarray] | None] = Jobs(QUEUED_CLAUSES)
        self._begun: Reply | None = None  # the reply whose utterance the speaker has (this thread only)
        self._thread = threading.Thread(target=self._run, name="tts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.discard(lambda job: True)
        self._jobs.put(_STOP)
        self._thread.join(timeout=5)

    def queue(self, reply: Reply, clause: str | np.ndarray) -> bool:
        """Hand over a clause to synthesize, audio ready to play (int16 at the voice's rate) or
        ``END``; waits while the queue is full, False if cancelled."""
        return self._jobs.put((reply, clause), cancel=reply.scope)

    # -- the worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            reply, item = job
            if reply.scope.cancelled:
                continue
            try:
                if isinstance(item, np.ndarray):
                    self._play(reply, [item])
                elif item == END:
                    self._end(reply)
                else:
                    self._synthesize(reply, item)
            except Exception as err:  # the owner decides what a failure means for the turn
                self._post(Failed(reply, err, "tts"))

    def _synthesize(self, reply: Reply, clause: str) -> None:
        synth = reply.synth
        if synth is None:
            raise StageError("no text-to-speech voice is configured (tts.model)", code="tts.missing")
        if self._begun is reply:
            self._let_the_llm_run(reply)
        self._play(reply, synth.synthesize(clause, reply.scope))

    def _play(self, reply: Reply, pieces: Iterable[np.ndarray]) -> None:
        """Write audio to the reply's utterance (begun, maybe held, with its first piece)."""
        speaker = self.speaker
        if self._begun is not reply:
            self._begun = reply
            self._gen = reply.hold.begin(speaker, lambda wall: self._post(Playing(reply, wall)))
        for audio in pieces:
            if reply.scope.cancelled:
                return
            if not reply.first_audio.is_set():
                reply.first_audio.set()
                self._post(FirstAudio(reply, time.monotonic()))
            if not speaker.write(audio, self._gen):
                return

    def _let_the_llm_run(self, reply: Reply) -> None:
        """While the speaker has audio in hand and the LLM is still generating, wait."""
        if not reply.generated.is_set():
            wait_any(self.speaker.below(TTS_LEAD_S), reply.generated, reply.scope)

    def _end(self, reply: Reply) -> None:
        # A speculative reply is over only once it is confirmed (then released) and heard.
        wait_any(reply.hold.confirmed, reply.scope)
        if reply.scope.cancelled:
            return
        self.speaker.drain()  # returns early when flushed
        if not reply.scope.cancelled:
            self._post(PlaybackDone(reply))
