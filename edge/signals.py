"""One-way flags and cancel scopes: how threads wait for each other without sleep-polling.

A :class:`Flag` is a ``threading.Event`` that can also call back when it is set, so one waiter
can wait for whichever of several things happens first (:func:`wait_any`): the first audio of
a reply *or* its cancellation, room in the speaker *or* the end of generation.

A :class:`CancelScope` is the flag a piece of work checks between steps (the LLM between
tokens, the synthesizer between sentences, the speaker by generation). Scopes nest: a turn
has one scope, each reply attempt a child of it, so barge-in cancels everything the turn
started with one call while a dropped speculative reply cancels only its own work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Callback = Callable[[], None]


class Flag:
    """Set once, never cleared; waiters and callbacks learn of it at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._set = False
        self._callbacks: list[Callback] = []

    def set(self) -> None:
        with self._cond:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for fn in callbacks:  # outside the lock: a callback may take other locks
            fn()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._set:
                self._cond.wait_for(lambda: self._set, timeout)
            return self._set

    def on_set(self, fn: Callback) -> Callback:
        """Call ``fn`` (once) when the flag is set, at once if it already is; returns an
        unsubscribe function."""
        with self._cond:
            if not self._set:
                self._callbacks.append(fn)
                return lambda: self._remove(fn)
        fn()
        return _nothing

    def _remove(self, fn: Callback) -> None:
        with self._cond:
            if fn in self._callbacks:
                self._callbacks.remove(fn)


def _nothing() -> None:
    pass


def wait_any(*flags: Flag, timeout: float | None = None) -> bool:
    """Wait until any of ``flags`` is set (True) or ``timeout`` passes (False)."""
    woken = threading.Event()
    unsubscribe = [f.on_set(woken.set) for f in flags]
    try:
        return woken.wait(timeout)
    finally:
        for undo in unsubscribe:
            undo()


class CancelScope(Flag):
    """A flag that says "stop": set by :meth:`cancel`, inherited by child scopes."""

    def __init__(self, parent: CancelScope | None = None) -> None:
        super().__init__()
        self.reason = ""
        if parent is not None:
            undo = parent.on_set(lambda: self.cancel(parent.reason))
            self.on_set(undo)  # a child cancelled first stops listening to its parent

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.is_set():
            self.reason = reason
        self.set()

    @property
    def cancelled(self) -> bool:
        return self.is_set()

    def child(self) -> CancelScope:
        return CancelScope(self)
