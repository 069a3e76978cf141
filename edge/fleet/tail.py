"""``fleet tail``: live events from all or some devices, one line each (or the JSON itself).

Filters: ``--device`` and ``--type`` become topic filters; ``--tag`` needs to know each device's
tags, so the statuses are followed too. ``--share GROUP`` subscribes as a member of an MQTT v5
shared subscription: each event goes to one tail of the group, which is how fleet-side
consumers scale out. QoS 1 may deliver an event twice; recent message ids are remembered and
a second copy is not shown.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from edge.events import EventType
from edge.fleet.client import FleetClient, Message
from edge.fleet.errors import FleetError
from edge.fleet.status import StatusBoard, select

_RECENT = 10_000  # message ids remembered for dropping QoS 1 duplicates
_TYPES = tuple(t.value for t in EventType)


def check_types(types: Sequence[str]) -> None:
    for t in types:
        if t not in _TYPES:
            raise FleetError(f"unknown event type {t!r} (known: {', '.join(_TYPES)})", code="fleet.usage")


def check_group(group: str) -> None:
    if not group or any(c in group for c in "/+#") or len(group) > 64:
        raise FleetError(f"--share {group!r}: a group name is 1-64 characters without / + #", code="fleet.usage")


def describe(event: dict[str, Any]) -> str:
    """The event's gist for a person: the text, the outcome, the error."""
    kind = event.get("type")
    if kind in ("transcript.partial", "transcript.final", "reply.partial", "reply.final"):
        return json.dumps(event.get("text", ""), ensure_ascii=False)
    if kind == "turn.end":
        timings = event.get("timings_ms") or {}
        first = timings.get("end_of_speech_to_first_audio") if isinstance(timings, dict) else None
        text = f"{event.get('outcome')} ({event.get('trigger')})"
        return text + (f", first audio after {first:.0f} ms" if isinstance(first, (int, float)) else "")
    if kind == "error":
        return f"{event.get('code')}: {event.get('message')}"
    if kind == "wake":
        return str(event.get("word") or event.get("name") or "")
    if kind == "state":
        return str(event.get("state", ""))
    skip = {"type", "seq", "message_id", "device_id", "turn_id", "session_id", "time", "audio_time", "timings_ms"}
    rest = {k: v for k, v in event.items() if k not in skip}
    return json.dumps(rest, ensure_ascii=False, separators=(",", ":")) if rest else ""


def format_line(device: str, event: dict[str, Any]) -> str:
    t = event.get("time")
    stamp = (time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"
             if isinstance(t, (int, float)) else "--:--:--.---")
    turn = event.get("turn_id")
    tail = f"  [turn {turn}]" if turn else ""
    return f"{stamp} {device:<16} {str(event.get('type')):<18} {describe(event)}{tail}"


class Tail:
    def __init__(self, client: FleetClient, *, devices: Sequence[str] = (), tags: Sequence[str] = (),
                 types: Sequence[str] = (), share: str | None = None, as_json: bool = False,
                 out: TextIO | None = None, count: int | None = None) -> None:
        check_types(types)
        if share is not None:
            check_group(share)
        self.client = client
        self.devices = list(devices)
        self.tags = set(tags)
        self.types = list(types)
        self.share = share
        self.as_json = as_json
        self.out = out or sys.stdout
        self.count = count
        self.shown = 0
        self.duplicates = 0
        self.done = threading.Event()
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._board = StatusBoard(client)
        self._lock = threading.Lock()

    def filters(self) -> list[str]:
        topics = self.client.topics
        devices = self.devices or ["+"]
        types = self.types or ["#"]
        out = [topics.events(d, t) for d in devices for t in types]
        return [topics.shared(self.share, f) if self.share else f for f in out]

    def start(self) -> None:
        client = self.client
        client.set_handler(self._on_message)
        client.on_fatal(self.done.set)
        if self.tags or self.devices:
            statuses = self._board.load()
            select(statuses, devices=self.devices, tags=sorted(self.tags), where=client.where,
                   prefix=client.cfg.prefix)
        client.subscribe(self.filters())

    def _on_message(self, msg: Message) -> None:
        if self._board.on_message(msg):
            return
        topics = self.client.topics
        device = topics.device_of(msg.topic)
        if device is None or "/event/" not in msg.topic:
            return
        if self.tags:
            status = self._board.devices.get(device)
            if status is None or not self.tags <= set(status.tags):
                return
        try:
            event = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            event = {"type": msg.topic.rsplit("/", 1)[-1], "unreadable": msg.payload[:200].decode("utf-8", "replace")}
        if not isinstance(event, dict):
            return
        with self._lock:
            mid = event.get("message_id")
            if isinstance(mid, str):
                if mid in self._recent:
                    self.duplicates += 1
                    return
                self._recent[mid] = None
                if len(self._recent) > _RECENT:
                    self._recent.popitem(last=False)
            if self.done.is_set():
                return
            if self.as_json:
                event.setdefault("device_id", device)
                line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            else:
                line = format_line(device, event)
            try:
                print(line, file=self.out, flush=True)
            except BrokenPipeError:  # `tail | head`: the reader has gone, so we go too
                self._reader_gone()
                return
            self.shown += 1
            if self.count is not None and self.shown >= self.count:
                self.done.set()

    def _reader_gone(self) -> None:
        import os

        if self.out is sys.stdout:  # nothing more may reach the closed pipe, not even at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        self.done.set()

    def wait(self, duration: float | None = None) -> None:
        """Until ``count`` events were shown, ``duration`` passed, or the broker ended us."""
        self.done.wait(duration)
