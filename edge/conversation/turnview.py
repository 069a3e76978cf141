"""The end-of-turn model's worker: reads the audio view at a pause, off the audio thread.

An audio model (Smart Turn: 30-140 ms a call) must neither delay the audio the owner feeds to
the recognizer nor wait behind the LLM, so it runs on a thread of its own. Only the newest pause
matters: a job still queued when another comes is dropped. The view is posted to the owner,
which decides the endpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from edge.conversation.mailbox import Jobs
from edge.conversation.messages import Control, TurnView
from edge.conversation.turn import Reply
from edge.turn.base import TurnDetector

_LOGGER = logging.getLogger(__name__)


class AudioViews:
    def __init__(self, post: Callable[[Control], None], detector: TurnDetector) -> None:
        self._post = post
        self.detector = detector
        self._jobs: Jobs[tuple[Reply, np.ndarray] | None] = Jobs()
        self._thread = threading.Thread(target=self._run, name="turn-view", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.discard(lambda job: True)
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def ask(self, reply: Reply, audio: np.ndarray) -> None:
        self._jobs.discard(lambda job: True)
        self._jobs.put((reply, audio))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            reply, audio = job
            if reply.scope.cancelled:
                continue
            t0 = time.monotonic()
            p = None
            try:
                p = self.detector.complete_probability(audio)
            except Exception:  # no view: the LLM's, or the fixed silence, decides
                _LOGGER.warning("the end-of-turn model failed", exc_info=True)
            self._post(TurnView(reply, "audio", p, time.monotonic() - t0))
