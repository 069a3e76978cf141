"""The disk outbox: events wait here until the broker has acknowledged them.

paho keeps unsent messages only in memory, so a broker outage or a crash of the daemon would
lose them. Each event is written to SQLite (WAL) before it is published and deleted when its
PUBACK arrives; after a reconnect or a restart the remaining rows are sent again in order.
The table is bounded: past ``max_rows`` the oldest rows are dropped and counted.

``synchronous=NORMAL`` with WAL survives the process being killed (``kill -9``) without an
fsync per event; only a power cut can lose the last few hundred milliseconds.

One thread owns an Outbox; ``depth`` and ``dropped`` may be read from any thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError

_LOGGER = logging.getLogger(__name__)

FILENAME = "mqtt-outbox.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(EdgeError):
    code = "mqtt.outbox"


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int


class Outbox:
    def __init__(self, path: Path, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.path = Path(path)
        self.max_rows = max_rows
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise OutboxError(f"MQTT outbox: cannot create the state directory {self.path.parent}: "
                              f"{err.strerror}; set device.state_dir or EDGE_VOICE_STATE_DIR to a "
                              "writable directory") from None
        try:
            self._db = self._open()
        except sqlite3.OperationalError as err:  # permissions, locked, disk full: not damage
            raise OutboxError(f"MQTT outbox: cannot open {self.path}: {err}; check that the state "
                              "directory is writable by the service user") from None
        except sqlite3.DatabaseError as err:
            # A damaged outbox must not keep the device offline: keep it for inspection, start empty.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            _LOGGER.error("MQTT outbox %s is unreadable (%s); moved it to %s and starting empty",
                          self.path, err, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as err2:
                raise OutboxError(f"MQTT outbox: cannot create {self.path}: {err2}") from None
        self.depth: int = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self.dropped: int = self._meta("dropped")
        self.next_seq: int = max(self._meta("next_seq"), 1)

    def _open(self) -> sqlite3.Connection:
        # Opened here, used by the bridge's outbox thread only.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        try:
            os.chmod(self.path, 0o600)  # transcripts are personal data
        except OSError:
            pass
        return db

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def add(self, items: Sequence[tuple[str, bytes, int]]) -> int:
        """Store ``(topic, json_object_utf8, qos)`` items in one transaction.

        Each payload gets ``"seq": N`` as its first field: the per-device sequence number is
        given out here, in the transaction that makes the event durable, so numbers are
        never reused after a crash and a gap always means a dropped event.
        Returns how many old rows were dropped to stay within ``max_rows``.
        """
        if not items:
            return 0
        seq = self.next_seq
        now = time.time()
        rows = []
        for topic, body, qos in items:
            rows.append((topic, b'{"seq":%d,%s' % (seq, body[1:]), qos, now))
            seq += 1
        over = max(0, self.depth + len(rows) - self.max_rows)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO outbox (topic, payload, qos, created) VALUES (?, ?, ?, ?)", rows)
            if over:
                db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (over,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self.dropped + over,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (seq,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.next_seq = seq
        self.depth += len(rows) - over
        self.dropped += over
        return over

    def count_dropped(self, n: int) -> None:
        """Count events lost before they reached the outbox (hand-off overflow, disk errors)."""
        if n <= 0:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self.dropped + n,))
        except sqlite3.Error:
            pass  # the count is still reported from memory
        self.dropped += n

    def pending(self, after_id: int, limit: int) -> list[Row]:
        """The oldest rows with ``id > after_id``, in order."""
        cur = self._db.execute("SELECT id, topic, payload, qos FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                               (after_id, limit))
        return [Row(i, t, bytes(p), q) for i, t, p, q in cur]

    def remove(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows; ids already dropped are ignored."""
        params = [(i,) for i in ids]
        if not params:
            return 0
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.executemany("DELETE FROM outbox WHERE id = ?", params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        removed = max(cur.rowcount, 0)
        self.depth -= removed
        return removed

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:
            pass
