"""``fleet record``: every event into a database, each stored once.

The consumer keeps a broker session (``--client-id``, kept ``--session-expiry`` seconds), so
events that arrive while it is away or while the broker restarts wait for it. It acknowledges
a message only after the transaction that stored it has committed: a consumer killed between
the two gets the message again, and the unique event id turns the second copy into a counted
duplicate. Several consumers on one ``--share`` group split the stream (MQTT v5 shared
subscription); one that dies leaves its unacknowledged share for the broker to send again.
Mosquitto forgets shared subscriptions when it restarts (plain ones it keeps): events arriving
before the group has subscribed again are dropped; a single consumer without a group loses none.

Messages reach the writer through a bounded queue; the broker never has more than
``RECEIVE_MAXIMUM`` unacknowledged messages out to us, so the queue never fills.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from edge.fleet.client import FleetClient, Message
from edge.fleet.config import FleetConfig
from edge.fleet.errors import StoreError
from edge.fleet.store import EventRow, EventStore, open_store, parse_event
from edge.fleet.tail import check_group

_LOGGER = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 1000  # unacknowledged messages the broker may have out to one consumer
BATCH = 500  # rows per transaction at most


@dataclass
class RecordStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    unreadable: int = 0
    batches: int = 0
    store_errors: int = 0
    reconnects: int = 0

    def line(self) -> str:
        return (f"record: {self.stored} event(s) stored, {self.duplicates} duplicate(s) skipped, "
                f"{self.unreadable} unreadable, {self.received} received in {self.batches} batch(es)"
                + (f", {self.store_errors} database error(s)" if self.store_errors else ""))

    def as_json(self) -> dict[str, int]:
        return asdict(self)


def default_client_id(share: str | None) -> str:
    """Stable across restarts (the broker keeps the session under it), one per host and group."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:32] or "host"
    return f"edge-voice-record-{host}" + (f"-{share}" if share else "")


class Recorder:
    def __init__(self, cfg: FleetConfig, db: str, *, share: str | None = None, session_expiry_s: int = 86400,
                 store_factory: Callable[[str], EventStore] = open_store) -> None:
        if share is not None:
            check_group(share)
        self.cfg = cfg
        self.db = db
        self.share = share
        self.session_expiry_s = session_expiry_s
        self.stats = RecordStats()
        self._factory = store_factory
        self._queue: queue.Queue[Message | None] = queue.Queue(RECEIVE_MAXIMUM * 2)
        self._stop = threading.Event()
        self.store: EventStore | None = None
        self.client: FleetClient | None = None
        self.ready = threading.Event()  # connected and subscribed

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the writer sees _stop after its current batch

    def _on_message(self, msg: Message) -> None:
        self._queue.put(msg)  # bounded by the receive maximum: does not wait in practice

    def open(self) -> None:
        """The database first (a wrong --db fails before anything else), then the broker."""
        self.store = self._factory(self.db)
        cfg = self.cfg if self.cfg.client_id else dataclasses.replace(self.cfg, client_id=default_client_id(self.share))
        client = FleetClient(cfg, role="record", handler=self._on_message, persistent=True,
                             session_expiry_s=self.session_expiry_s, manual_ack=True,
                             receive_maximum=RECEIVE_MAXIMUM)
        client.on_fatal(self.stop)
        client.connect()
        events = client.topics.events()
        client.subscribe([client.topics.shared(self.share, events) if self.share else events])
        self.client = client
        self.ready.set()
        _LOGGER.info("recording events from %s (%s) into %s as %s", client.where,
                     f"shared group {self.share}" if self.share else "all", self.store.where, client.client_id)

    def run(self) -> RecordStats:
        """Store until stop(); returns the counts. Raises StoreError if the database is lost
        and cannot be reopened."""
        if self.client is None:
            self.open()
        try:
            while not self._stop.is_set():
                first = self._queue.get()
                if first is None:
                    break
                # What arrived while the last batch was being committed goes in this one: no
                # waiting when quiet, large transactions under load.
                batch = [first]
                while len(batch) < BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._stop.set()
                        break
                    batch.append(item)
                self._write(batch)
        finally:
            self.close()
        return self.stats

    def _write(self, batch: list[Message]) -> None:
        assert self.client is not None
        topics = self.client.topics
        now = time.time()
        rows: list[EventRow] = []
        for msg in batch:
            device = topics.device_of(msg.topic)
            row = None
            if device is not None and "/event/" in msg.topic:
                row = parse_event(device, msg.topic.rsplit("/", 1)[-1], msg.payload, now)
            if row is None:
                self.stats.unreadable += 1
                if self.stats.unreadable <= 10:
                    _LOGGER.warning("not an event with a message id, skipped: %s", msg.topic[:200])
            else:
                rows.append(row)
        new = self._store_rows(rows)
        self.stats.received += len(batch)
        self.stats.stored += new
        self.stats.duplicates += len(rows) - new
        self.stats.batches += 1
        for msg in batch:  # only now: a crash before this line means the broker sends them again
            self.client.ack(msg)

    def _store_rows(self, rows: list[EventRow]) -> int:
        backoff = 0.5
        while True:
            if self.store is None:
                try:
                    self.store = self._factory(self.db)
                except StoreError as err:
                    _LOGGER.warning("%s", err)
            if self.store is not None:
                try:
                    return self.store.add(rows)
                except StoreError as err:
                    self.stats.store_errors += 1
                    _LOGGER.warning("%s; retrying in %.1f s (the broker keeps the events meanwhile)", err, backoff)
                    broken, self.store = self.store, None
                    try:
                        broken.close()
                    except Exception:  # already broken; nothing to release
                        pass
            if self._stop.wait(backoff):
                raise StoreError(f"stopped with {len(rows)} event(s) not stored; the broker sends them again "
                                 "to the next consumer of this session")
            backoff = min(backoff * 2, 30.0)

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            self.stats.reconnects = client.reconnects
            client.close()
        store, self.store = self.store, None
        if store is not None:
            store.close()
