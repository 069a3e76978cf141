"""Which stages are computing right now, so the LLM can leave them a core.

llama.cpp's threads meet at a barrier after every layer and wait for each other there busily:
when another stage's thread takes a core from one of them, the others spin until it is back.
Measured on 2 cores with the Phi-3-mini-shaped model: 19.4 tokens/s alone with 2 threads,
7.5 tokens/s with a synthesis running beside it, 10.7 tokens/s with 1 thread either way. So the
LLM uses every thread it is given while nothing else computes and one fewer while speech-to-text
or text-to-speech does (``LlamaChatModel`` asks before every evaluation).

One process-wide share, because the cores are shared process-wide.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class CpuShare:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = 0
        self._idle_since = 0.0
        self._expected_until = 0.0

    def enter(self) -> None:
        with self._lock:
            self._busy += 1

    def leave(self) -> None:
        with self._lock:
            self._busy = max(0, self._busy - 1)
            if not self._busy:
                self._idle_since = time.monotonic()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a stretch of computing by a stage other than the LLM."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def expect(self, seconds: float) -> None:
        """Another stage will likely start computing within ``seconds`` (0: no longer).

        The recognizer says so while the voice is quiet: a decode, then a reply, is likely
        next, so a prefill slice starting now keeps to a core and to one token. Renewed by
        each quiet chunk, it lapses alone.
        """
        with self._lock:
            self._expected_until = time.monotonic() + seconds if seconds > 0 else 0.0

    @property
    def others_busy(self) -> bool:
        return self._busy > 0

    @property
    def expected(self) -> bool:
        return time.monotonic() < self._expected_until

    def idle_s(self) -> float:
        """Seconds since the last other stage stopped computing (0 while one computes)."""
        with self._lock:
            return 0.0 if self._busy else time.monotonic() - self._idle_since


SHARE = CpuShare()
