"""Who may use how many cores: the one policy the stages report to and the LLM asks.

llama.cpp's threads meet at a barrier after every layer and wait for each other there busily:
when another stage's thread takes a core from one of them, the others spin until it is back.
Measured on 2 cores with the Phi-3-mini-shaped model: 19.4 tokens/s alone with 2 threads,
7.5 tokens/s with a synthesis running beside it, 10.7 tokens/s with 1 thread either way.

So the policy is:

- speech-to-text and text-to-speech say when they compute (:meth:`CpuPolicy.computing`);
- the recognizer says when a decode is likely soon (:meth:`CpuPolicy.decode_likely`): the voice
  has gone quiet, and a decode, then a reply, usually follows;
- the LLM asks, before each evaluation, how many threads it may use (:meth:`CpuPolicy.llm_share`):
  all of them while nothing else computes, one fewer while something does; a prefill (work that
  may be thrown away, done while the visitor speaks) always runs on one thread, beside the
  recognizer's decodes on the other core, in slices of one token while another stage computes or
  is expected to (so a reply that wants the model waits at most one token); so does an
  end-of-turn view, which is the same work. On a slow CPU the
  decodes of a growing utterance fill much of one core: a prefill that waited for quiet moments
  fell behind, and one on every core slowed the decodes (measured with the bench's timeline: one
  4-token slice on two threads beside a decode took 2.4 s).

One policy object per pipeline, made by the composition root and handed to each stage; a stage
built alone gets its own, which changes nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A stretch of computing, for a benchmark's timeline (monotonic seconds)."""

    kind: str  # stt | tts | llm-prefill | llm-prompt | llm-gen | ...
    start: float
    end: float
    detail: str = ""


class Trace:
    """Spans recorded while a benchmark looks (``CpuPolicy.trace``); nothing is kept otherwise."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[Span] = []

    def add(self, kind: str, start: float, end: float, detail: str = "") -> None:
        with self._lock:
            self.spans.append(Span(kind, start, end, detail))

    def take(self) -> list[Span]:
        with self._lock:
            out, self.spans = self.spans, []
            return out


@dataclass(frozen=True)
class LlmShare:
    """What the LLM may use for its next evaluation."""

    threads: tuple[int, int]  # (generation threads, batch threads)
    one_token: bool  # a prefill slice of one token: another stage computes or is about to


class CpuPolicy:
    def __init__(self, *, share: bool = True) -> None:
        """``share``: the LLM leaves a core while another stage computes (``llm.share_cores``)."""
        self.share = share
        self._cond = threading.Condition()
        self._busy = 0
        self._idle_since = 0.0
        self._expected_until = 0.0
        self.trace: Trace | None = None  # a benchmark's timeline, when one is recorded

    # -- what the other stages report ----------------------------------------------------
    @contextmanager
    def computing(self, kind: str = "other") -> Iterator[None]:
        """A stretch of computing by a stage other than the LLM (``kind``: stt, tts)."""
        with self._cond:
            self._busy += 1
        start = time.monotonic()
        try:
            yield
        finally:
            end = time.monotonic()
            with self._cond:
                self._busy -= 1
                if not self._busy:
                    self._idle_since = end
                    self._cond.notify_all()
            if self.trace is not None:
                self.trace.add(kind, start, end)

    def decode_likely(self, seconds: float) -> None:
        """A decode will likely start within ``seconds`` (0: no longer expected).

        The recognizer says so while the voice is quiet, renewing it with every quiet chunk;
        it lapses by itself.
        """
        with self._cond:
            self._expected_until = time.monotonic() + seconds if seconds > 0 else 0.0

    # -- what the LLM asks ---------------------------------------------------------------
    def llm_share(self, full: tuple[int, int], *, prefill: bool) -> LlmShare:
        """Threads for the next evaluation, given the LLM's own ``full`` (threads, batch threads)."""
        lean = self.others_busy or (prefill and self.expected)
        if prefill and self.share:
            return LlmShare((1, 1), one_token=lean)
        threads = (max(1, full[0] - 1), max(1, full[1] - 1)) if lean and self.share else full
        return LlmShare(threads, one_token=prefill and lean)

    # -- what anyone may read ------------------------------------------------------------
    @property
    def others_busy(self) -> bool:
        return self._busy > 0

    @property
    def expected(self) -> bool:
        return time.monotonic() < self._expected_until

    def idle_s(self) -> float:
        """Seconds since the last other stage stopped computing (0 while one computes)."""
        with self._cond:
            return 0.0 if self._busy else time.monotonic() - self._idle_since
