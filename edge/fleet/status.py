"""The fleet as the broker knows it: every device's retained status, and selection by id or tag.

A device's status is retained under ``<prefix>/<id>/status``: ``online`` (or ``listening``,
``muted``, ``mic_lost`` ...) while connected, ``offline`` with a ``reason`` after a clean stop
(``stopped``) or when the broker published the Last Will (``connection lost``). The id is taken
from the topic, which the broker's ACL keeps to the device itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge.fleet.client import FleetClient, Message
from edge.fleet.errors import BrokerError, SelectionError


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    body: Mapping[str, Any]  # the status as the device published it ({} when unreadable)
    readable: bool = True

    @property
    def state(self) -> str:
        state = self.body.get("state")
        return state if isinstance(state, str) else "unreadable"

    @property
    def online(self) -> bool:
        return self.readable and self.state != "offline"

    @property
    def tags(self) -> list[str]:
        tags = self.body.get("tags")
        return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []

    @property
    def lost(self) -> bool:
        """Offline through the Last Will: the time it went away is not known, only that it was
        after the connection (the will's ``time``) was made."""
        return self.state == "offline" and self.body.get("reason") == "connection lost"

    @property
    def since(self) -> float | None:
        """Online: when this connection was made; offline after a stop: when it stopped."""
        key = "online_since" if self.online else "time"
        value = self.body.get(key)
        if self.lost or not isinstance(value, (int, float)):
            return None
        return float(value)

    def as_json(self) -> dict[str, Any]:
        out = {"device_id": self.device_id, "state": self.state, "online": self.online, "since": self.since,
               "version": self.body.get("version"), "models": self.body.get("models"),
               "knowledge": self.body.get("knowledge"), "tags": self.tags,
               "last_turn": self.body.get("last_turn"), "last_error": self.body.get("last_error")}
        if self.state == "offline":
            out["reason"] = self.body.get("reason")
            if self.lost:
                out["connected_before"] = self.body.get("time")
        out["status"] = dict(self.body)
        return out


def parse_status(device_id: str, payload: bytes) -> DeviceStatus | None:
    """None for an empty retained payload (a cleared status)."""
    if not payload:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return DeviceStatus(device_id, {}, readable=False)
    if not isinstance(body, dict):
        return DeviceStatus(device_id, {}, readable=False)
    return DeviceStatus(device_id, body)


class StatusBoard:
    """Keeps the latest status per device from a subscription to ``<prefix>/+/status``."""

    def __init__(self, client: FleetClient) -> None:
        self._client = client
        self.devices: dict[str, DeviceStatus] = {}

    def on_message(self, msg: Message) -> bool:
        """True if the message was a status (and was taken)."""
        topics = self._client.topics
        device = topics.device_of(msg.topic)
        if device is None or msg.topic != topics.status(device):
            return False
        status = parse_status(device, msg.payload)
        if status is None:
            self.devices.pop(device, None)
        else:
            self.devices[device] = status
        return True

    def handle(self, msg: Message) -> None:
        """A message handler for a client that only follows statuses."""
        self.on_message(msg)

    def load(self, timeout: float = 15.0) -> dict[str, DeviceStatus]:
        """Subscribe and wait until the retained statuses are all in."""
        self._client.subscribe([self._client.topics.status()])
        if not self._client.sync(timeout):
            raise BrokerError(f"the MQTT broker at {self._client.where} did not deliver the device "
                              f"statuses within {timeout:g} s; try again")
        return self.devices


def read_statuses(client: FleetClient, timeout: float = 15.0) -> dict[str, DeviceStatus]:
    """Every device's retained status, on a client whose handler is set to ``board.on_message``."""
    board = StatusBoard(client)
    client.set_handler(board.handle)
    return dict(board.load(timeout))


def select(statuses: Mapping[str, DeviceStatus], *, devices: Sequence[str] = (), tags: Sequence[str] = (),
           everyone: bool = False, where: str = "", prefix: str = "edge") -> list[str]:
    """The device ids chosen by ``--device`` (each must be known), ``--tag`` (all of them must
    match) or ``--all``; an unknown device or tag is an error that says how to find the right one."""
    if not devices and not tags and not everyone:
        raise SelectionError("name the devices: --device ID, --tag TAG or --all")
    known = sorted(statuses)
    if everyone and not known:
        raise SelectionError(f"no device has a status on the MQTT broker at {where} under "
                             f"{prefix}/+/status; check --prefix and that the devices are connected to this broker")
    chosen = set(known) if everyone else set()
    for d in devices:
        if d not in statuses:
            hint = f" (known: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''})" if known else ""
            raise SelectionError(f"unknown device {d!r}: no status under {prefix}/{d}/status on the MQTT broker "
                                 f"at {where}{hint}; `edge-voice fleet devices` lists them")
        chosen.add(d)
    if tags:
        in_use = sorted({t for s in statuses.values() for t in s.tags})
        for t in tags:
            if t not in in_use:
                shown = ", ".join(in_use[:20]) + (", ..." if len(in_use) > 20 else "") if in_use else "none"
                raise SelectionError(f"no device carries the tag {t!r} (tags in use: {shown}); tags come from "
                                     "each device's [device] tags")
        tagged = {d for d, s in statuses.items() if set(tags) <= set(s.tags)}
        if not tagged:
            raise SelectionError(f"no device carries all of the tags {', '.join(tags)}; "
                                 "`edge-voice fleet devices` shows each device's tags")
        chosen = tagged if not devices and not everyone else chosen | tagged
    return sorted(chosen)


# -- the table --------------------------------------------------------------------------------

def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(value: Any, now: float) -> str:
    return age(now - value) if isinstance(value, (int, float)) else "?"


def _state(s: DeviceStatus) -> str:
    if s.state == "offline":
        reason = s.body.get("reason")
        return f"offline ({reason})" if reason else "offline"
    return s.state


def _since(s: DeviceStatus, now: float) -> str:
    if s.lost:
        connected = s.body.get("time")
        return f"<={age(now - connected)}" if isinstance(connected, (int, float)) else "?"
    return age(now - s.since) if s.since is not None else "?"


def _last_turn(s: DeviceStatus, now: float) -> str:
    t = s.body.get("last_turn")
    if not isinstance(t, dict):
        return "-"
    text = f"{_when(t.get('time'), now)} ago {t.get('outcome') or '?'}"
    first = t.get("first_audio_ms")
    if isinstance(first, (int, float)):
        text += f" {first:.0f}ms"
    return text


def _last_error(s: DeviceStatus, now: float) -> str:
    e = s.body.get("last_error")
    if not isinstance(e, dict):
        return "-"
    message = str(e.get("message") or "")
    return f"{_when(e.get('time'), now)} ago {e.get('code') or '?'}: {message[:60]}"


def _models(s: DeviceStatus) -> str:
    models = s.body.get("models")
    if not isinstance(models, dict) or not models:
        return "-"
    return " ".join(f"{role}={model}" for role, model in models.items())


def _knowledge(s: DeviceStatus) -> str:
    k = s.body.get("knowledge")
    if not k:
        return "-"
    if isinstance(k, dict):
        name, version = k.get("name") or k.get("id"), k.get("version")
        if name:
            return f"{name}@{version}" if version else str(name)
    return json.dumps(k, separators=(",", ":"))[:40]


COLUMNS = ("DEVICE", "STATE", "SINCE", "VERSION", "TAGS", "LAST TURN", "LAST ERROR", "KNOWLEDGE", "MODELS")


def table(statuses: Iterable[DeviceStatus], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    rows = [COLUMNS]
    for s in sorted(statuses, key=lambda s: s.device_id):
        rows.append((s.device_id, _state(s), _since(s, now), str(s.body.get("version") or "?"),
                     ",".join(s.tags) or "-", _last_turn(s, now), _last_error(s, now), _knowledge(s), _models(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def summary(statuses: Mapping[str, DeviceStatus]) -> str:
    online = sum(1 for s in statuses.values() if s.online)
    return f"{len(statuses)} device(s): {online} online, {len(statuses) - online} offline"
