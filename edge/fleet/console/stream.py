"""Server-sent events to the pages: one bounded queue per page, a heartbeat, resync on overflow.

An update is serialised once (``event: KIND`` + ``data: JSON``) and appended to every page's
queue. A page that cannot keep up (its queue reaches ``QUEUE_MAX``) loses what was queued for
it, which is counted, and is sent a fresh snapshot instead: it is never behind for good and
never holds the others up. A page that hears nothing for ``HEARTBEAT_S`` gets a comment line,
so proxies keep the connection and a dead one is noticed on the next write.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Any

QUEUE_MAX = 2000  # messages waiting for one page
MAX_PAGES = 64  # pages following the stream at once
HEARTBEAT_S = 15.0
RETRY_MS = 2000  # how long a browser waits before it reconnects


def encode(kind: str, data: Any) -> bytes:
    """One SSE message; JSON has no raw newlines, so it is one ``data:`` line."""
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class Page:
    """One page's queue, written by the hub and drained by that page's HTTP thread."""

    def __init__(self, user: str, maxlen: int = QUEUE_MAX) -> None:
        self.user = user
        self._maxlen = maxlen
        self._items: deque[bytes] = deque()
        self._cond = threading.Condition()
        self.resync = False
        self.dropped = 0
        self.resyncs = 0
        self.closed = False

    def put(self, message: bytes) -> None:
        with self._cond:
            if self.closed:
                return
            if len(self._items) >= self._maxlen:
                self.dropped += len(self._items) + 1
                self._items.clear()
                self.resync = True
            else:
                self._items.append(message)
            self._cond.notify()

    def take(self, timeout: float) -> tuple[list[bytes], bool]:
        """What is queued (waiting up to ``timeout`` for something) and whether a resync is due."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self.resync or self.closed, timeout)
            items = list(self._items)
            self._items.clear()
            return items, self.resync

    def reset(self) -> None:
        """Forget what is queued (a snapshot is being sent); call with the model's lock held."""
        with self._cond:
            self._items.clear()
            if self.resync:
                self.resync = False
                self.resyncs += 1

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Hub:
    def __init__(self, max_pages: int = MAX_PAGES, queue_max: int = QUEUE_MAX) -> None:
        self._pages: list[Page] = []
        self._lock = threading.Lock()
        self._max_pages = max_pages
        self._queue_max = queue_max
        self.sent = 0
        self.dropped_total = 0
        self.refused = 0

    def add(self, user: str) -> Page | None:
        """A new page, or None when ``max_pages`` already follow the stream."""
        with self._lock:
            if len(self._pages) >= self._max_pages:
                self.refused += 1
                return None
            page = Page(user, self._queue_max)
            self._pages.append(page)
            return page

    def remove(self, page: Page) -> None:
        page.close()
        with self._lock:
            if page in self._pages:
                self._pages.remove(page)
                self.dropped_total += page.dropped

    def publish(self, kind: str, data: Any) -> None:
        message = encode(kind, data)
        with self._lock:
            pages = list(self._pages)
            self.sent += 1
        for page in pages:
            page.put(message)

    def close_all(self) -> None:
        with self._lock:
            pages, self._pages = list(self._pages), []
        for page in pages:
            page.close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"pages": len(self._pages), "sent": self.sent,
                    "dropped": self.dropped_total + sum(p.dropped for p in self._pages),
                    "resyncs": sum(p.resyncs for p in self._pages), "refused": self.refused}
