"""Where ``fleet record`` keeps events: SQLite (a file, the default) or PostgreSQL (a URL).

One table, ``events``: the event id (``message_id``, unique: a second copy of an event is
not stored, however many consumers receive it), the device, its sequence number, the type,
session, turn, the event's time and the time it was stored, the text of transcripts and
replies, and the whole event as JSON. Times are Unix seconds in SQLite and ``timestamptz`` in
PostgreSQL. Example queries are in the README ("Running a fleet").
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from edge.errors import MissingDependency
from edge.fleet.errors import StoreError

_LOGGER = logging.getLogger(__name__)

_TEXT_TYPES = frozenset({"transcript.partial", "transcript.final", "reply.partial", "reply.final", "turn.end"})
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class EventRow:
    message_id: str
    device_id: str
    seq: int | None
    type: str
    session_id: str | None
    turn_id: str | None
    time: float | None
    received: float
    text: str | None
    payload: str


def _clean(text: str) -> str:
    # PostgreSQL's text and jsonb refuse NUL; a NUL in a transcript is noise anyway.
    return text.replace("\x00", "\ufffd")


def _opt_str(value: Any) -> str | None:
    return _clean(value)[:256] if isinstance(value, str) and value else None


def parse_event(device_id: str, topic_type: str, payload: bytes, received: float) -> EventRow | None:
    """The row for one event message; None if it is not an event object with a message id."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    mid = body.get("message_id")
    if not isinstance(mid, str) or not _ID_RE.match(mid):
        return None
    seq = body.get("seq")
    t = body.get("time")
    kind = body.get("type") if isinstance(body.get("type"), str) else topic_type
    value = body.get("text") if kind in _TEXT_TYPES else None
    text = _clean(value) if isinstance(value, str) and value else None
    return EventRow(
        message_id=mid, device_id=device_id,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 else None,
        type=_clean(str(kind))[:64], session_id=_opt_str(body.get("session_id")),
        turn_id=_opt_str(body.get("turn_id")),
        time=float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1e11 else None,
        received=received, text=text,
        payload=_clean(json.dumps(body, ensure_ascii=False, separators=(",", ":"))).replace("\\u0000", "\\ufffd"))


class EventStore(Protocol):
    where: str  # for messages, without a password

    def add(self, rows: Sequence[EventRow]) -> int:
        """Store rows in one transaction; returns how many were new (the rest were duplicates)."""
        ...

    def count(self) -> int: ...

    def by_device(self) -> dict[str, DeviceCounts]:
        """Per device: rows, distinct sequence numbers, lowest and highest."""
        ...

    def delays(self) -> list[float]:
        """Seconds from each event's time on the device to its storing."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DeviceCounts:
    rows: int
    distinct_seq: int
    min_seq: int | None
    max_seq: int | None


_BY_DEVICE = ("SELECT device_id, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM events "
              "GROUP BY device_id")


def redact(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(target: str) -> EventStore:
    """A PostgreSQL URL (``postgresql://user@host:port/db``), ``sqlite:PATH`` or a file path."""
    scheme = target.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target) else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(target)
    if scheme == "sqlite":
        return SqliteStore(Path(target.split("://", 1)[1]))
    if scheme:
        raise StoreError(f"--db {redact(target)}: unsupported database {scheme!r}; give a file path for "
                         "SQLite or a postgresql:// URL")
    if target.startswith("sqlite:"):
        target = target[len("sqlite:"):]
    return SqliteStore(Path(target))


# -- SQLite -------------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    message_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq INTEGER,
    type TEXT NOT NULL,
    session_id TEXT,
    turn_id TEXT,
    time REAL,
    received REAL NOT NULL,
    text TEXT,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_device_time ON events (device_id, time);
CREATE INDEX IF NOT EXISTS events_type_time ON events (type, time);
CREATE INDEX IF NOT EXISTS events_session ON events (session_id);
CREATE INDEX IF NOT EXISTS events_turn ON events (turn_id);
"""
_SQLITE_INSERT = ("INSERT INTO events (message_id, device_id, seq, type, session_id, turn_id, time, received, "
                  "text, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING")


_SQLITE_BUSY_S = 30.0


def _sqlite_setup(db: sqlite3.Connection) -> None:
    """WAL, then the schema. Switching a new file to WAL while another process does the same can
    answer "database is locked" at once, without SQLite's busy wait (two ``record`` processes
    started together on one new file): that answer is waited out here, up to the busy timeout."""
    deadline = time.monotonic() + _SQLITE_BUSY_S
    pause = 0.01
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SQLITE_SCHEMA)
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


class SqliteStore:
    """One file, shared safely by several ``record`` processes on one machine (WAL, busy wait)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=_SQLITE_BUSY_S, check_same_thread=False)
            _sqlite_setup(db)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot open the event database {path}: {err}; check that its directory exists "
                             "and is writable (or give a postgresql:// URL to --db)") from None
        self._db = db

    def add(self, rows: Sequence[EventRow]) -> int:
        if not rows:
            return 0
        db = self._db
        before = db.total_changes
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_SQLITE_INSERT, [(r.message_id, r.device_id, r.seq, r.type, r.session_id, r.turn_id,
                                                 r.time, r.received, r.text, r.payload) for r in rows])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot write to the event database {self.path}: {err}") from None
        return db.total_changes - before

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def by_device(self) -> dict[str, DeviceCounts]:
        return {d: DeviceCounts(n, k, lo, hi) for d, n, k, lo, hi in self._db.execute(_BY_DEVICE)}

    def delays(self) -> list[float]:
        return [r[0] for r in self._db.execute("SELECT received - time FROM events WHERE time IS NOT NULL")]

    def close(self) -> None:
        self._db.close()


# -- PostgreSQL -----------------------------------------------------------------------------------

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    seq BIGINT,
    type TEXT NOT NULL,
    session_id TEXT,
    turn_id TEXT,
    time TIMESTAMPTZ,
    received TIMESTAMPTZ NOT NULL,
    text TEXT,
    payload JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_device_time ON events (device_id, time);
CREATE INDEX IF NOT EXISTS events_type_time ON events (type, time);
CREATE INDEX IF NOT EXISTS events_session ON events (session_id);
CREATE INDEX IF NOT EXISTS events_turn ON events (turn_id);
"""
# One statement per batch; rows sorted by id so two consumers never wait on each other in a cycle.
_PG_INSERT = """
INSERT INTO events (message_id, device_id, seq, type, session_id, turn_id, time, received, text, payload)
SELECT m, d, s, t, se, tu, to_timestamp(ti), to_timestamp(r), tx, p::jsonb
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::float8[],
            %s::float8[], %s::text[], %s::text[]) AS u(m, d, s, t, se, tu, ti, r, tx, p)
ORDER BY m
ON CONFLICT (message_id) DO NOTHING
"""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise MissingDependency.for_module("psycopg", "fleet") from None
    return psycopg


class PostgresStore:
    """A PostgreSQL database; several ``record`` consumers on several machines may share it."""

    def __init__(self, url: str) -> None:
        psycopg = _psycopg()
        self.url = url
        self.where = redact(url)
        try:
            self._db = psycopg.connect(url, connect_timeout=10, autocommit=False)
        except psycopg.Error as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StoreError(f"cannot reach the database {self.where}: {first}; is PostgreSQL running there, "
                             "and are the host, port, user, password and database name in --db right?") from None
        try:
            with self._db.transaction():
                # Two consumers starting at once must not both try to create the table.
                self._db.execute("SELECT pg_advisory_xact_lock(4280613)")
                self._db.execute(_PG_SCHEMA)
        except psycopg.Error as err:
            self._db.close()
            raise StoreError(f"cannot create the events table in {self.where}: {str(err).strip()}; check that "
                             "the user may create tables in that database") from None

    def add(self, rows: Sequence[EventRow]) -> int:
        if not rows:
            return 0
        psycopg = _psycopg()
        cols = list(zip(*[(r.message_id, r.device_id, r.seq, r.type, r.session_id, r.turn_id, r.time,
                           r.received, r.text, r.payload) for r in rows]))
        for attempt in range(5):
            try:
                with self._db.transaction():
                    cur = self._db.execute(_PG_INSERT, [list(c) for c in cols])
                    return max(cur.rowcount, 0)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                _LOGGER.info("event database: retrying a batch after a lock conflict (%d)", attempt + 1)
            except psycopg.OperationalError as err:
                raise StoreError(f"lost the database {self.where}: {str(err).strip()}") from None
            except psycopg.Error as err:
                raise StoreError(f"cannot write to the database {self.where}: {str(err).strip()}") from None
        raise StoreError(f"cannot write to the database {self.where}: lock conflicts five times over")

    def count(self) -> int:
        with self._db.transaction():
            row = self._db.execute("SELECT COUNT(*) FROM events").fetchone()
        return int(row[0]) if row else 0

    def by_device(self) -> dict[str, DeviceCounts]:
        with self._db.transaction():
            rows = self._db.execute(_BY_DEVICE).fetchall()
        return {d: DeviceCounts(n, k, lo, hi) for d, n, k, lo, hi in rows}

    def delays(self) -> list[float]:
        with self._db.transaction():
            rows = self._db.execute("SELECT EXTRACT(EPOCH FROM received - time)::float8 FROM events "
                                    "WHERE time IS NOT NULL").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        self._db.close()
