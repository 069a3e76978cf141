"""Conversation memory: one session's past turns, within a token budget and an idle timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.events import new_id


@dataclass
class Session:
    id: str = field(default_factory=new_id)
    history: list[dict[str, str]] = field(default_factory=list)
    last_active: float = field(default_factory=time.monotonic)


class Sessions:
    """Hands out the current session; starts a fresh one after ``idle_s`` without a turn.

    ``count_tokens`` measures a message so the history can be trimmed, oldest exchange
    first, to ``budget_tokens``. A kiosk serves strangers one after another: forgetting
    is a feature, not a loss.
    """

    def __init__(self, idle_s: float, budget_tokens: int,
                 count_tokens: Callable[[str], int] | None = None) -> None:
        self.idle_s = idle_s
        self.budget_tokens = budget_tokens
        self._count = count_tokens or (lambda text: max(1, len(text) // 4))
        self._lock = threading.Lock()
        self._current = Session()

    def current(self, now: float | None = None) -> Session:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.idle_s and now - self._current.last_active > self.idle_s:
                self._current = Session(last_active=now)
            return self._current

    def touch(self, now: float | None = None) -> None:
        with self._lock:
            self._current.last_active = time.monotonic() if now is None else now

    def end(self) -> Session:
        """Forget the current conversation (handset hung up, operator reset)."""
        with self._lock:
            old, self._current = self._current, Session()
            return old

    def history(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._current.history)

    def add_exchange(self, user: str, assistant: str) -> None:
        with self._lock:
            h = self._current.history
            h.extend([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])
            self._current.last_active = time.monotonic()
            if self.budget_tokens <= 0:
                h.clear()
                return
            while h and sum(self._count(m["content"]) + 4 for m in h) > self.budget_tokens:
                del h[:2]
