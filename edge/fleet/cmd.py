"""``fleet cmd``: one command to many devices over MQTT v5 request/response.

Each device gets the command on its own topic with a response topic inside its namespace
(``<prefix>/<id>/answers/<client>``, what a per-device ACL lets it write), correlation data,
a ``request_id`` and an expiry (``expires_at`` in the payload, Message Expiry on the wire): a
device that gets it late refuses it instead of acting on it. Devices on MQTT 3.1.1 answer on
``<prefix>/<id>/cmd/<name>/result``; the request id matches those. The command is checked
here against the same schemas the device uses, so a typo fails before anything is sent.

Every target ends as ``answered``, ``refused`` (the device said no, with its error), ``no answer``
(nothing within the timeout), ``offline`` (its status said so; not sent) or ``not started``
(a wave before it failed too much).
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge.fleet.client import FleetClient, Message
from edge.fleet.errors import FleetError
from edge.fleet.status import DeviceStatus, StatusBoard
from edge.fleet.waves import WaveOutcome, WaveRule, WavesReport, run_waves
from edge.mqtt import commands as cmds
from edge.mqtt.wire import dumps

ANSWERED, REFUSED, NO_ANSWER, OFFLINE, NOT_STARTED = "answered", "refused", "no answer", "offline", "not started"


def _value(raw: str) -> Any:
    """``0.5`` → 0.5, ``true`` → True, anything else stays a string."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, (int, float, bool)) else raw


def build_payload(name: str, args: Sequence[str], payload_json: str | None = None) -> dict[str, Any]:
    """The command's JSON object from ``key=value`` (numbers and true/false typed),
    ``key:=JSON`` (any JSON), a single bare value for a one-field command, or ``--payload``.
    Checked with the device's own schemas; a mistake is a FleetError naming it."""
    schema = cmds.SCHEMAS.get(name)
    if schema is None:
        raise FleetError(f"unknown command {name!r} (known: {', '.join(cmds.SCHEMAS)})", code="cmd.unknown")
    body: dict[str, Any] = {}
    if payload_json is not None:
        try:
            parsed = json.loads(payload_json)
        except ValueError as err:
            raise FleetError(f"--payload is not valid JSON: {err}", code="cmd.invalid_json") from None
        if not isinstance(parsed, dict):
            raise FleetError("--payload must be a JSON object", code="cmd.invalid")
        body.update(parsed)
    fields = list(schema.required)
    for arg in args:
        head, eq, raw = arg.partition("=")
        if eq and head.endswith(":"):
            key = head[:-1]
            try:
                body[key] = json.loads(raw)
            except ValueError as err:
                raise FleetError(f"{name} {key}:=...: not valid JSON ({err})", code="cmd.invalid_json") from None
        elif eq:
            body[head] = _value(raw)
        elif len(fields) == 1 and fields[0] not in body:
            body[fields[0]] = _value(arg)
        else:
            wanted = " ".join(f"{f}=..." for f in fields) or "no arguments"
            raise FleetError(f"{name}: unexpected argument {arg!r} (it takes {wanted})", code="cmd.invalid")
    for key in cmds.COMMON_FIELDS:
        if key in body:
            raise FleetError(f"{name}: {key} is set by fleet cmd itself (see --timeout and --expiry)",
                             code="cmd.invalid")
    try:
        cmds.decode(name, dumps(body))
    except cmds.CommandError as err:
        raise FleetError(err.message, code=err.code) from None
    return body


@dataclass
class DeviceResult:
    device_id: str
    outcome: str
    answer: dict[str, Any] | None = None
    round_trip_ms: float | None = None
    wave: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == ANSWERED

    def error_text(self) -> str:
        if self.outcome == REFUSED and self.answer is not None:
            err = self.answer.get("error") or {}
            return f"{err.get('code', '?')}: {err.get('message', '')}"
        return ""

    def as_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "outcome": self.outcome, "round_trip_ms": self.round_trip_ms,
                "wave": self.wave, "answer": self.answer}


@dataclass
class CommandReport:
    name: str
    results: dict[str, DeviceResult] = field(default_factory=dict)
    waves: WavesReport | None = None
    unexpected: int = 0  # answers for requests we did not send (or sent twice)

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results.values() if r.outcome == outcome)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())

    def round_trips(self) -> list[float]:
        return sorted(r.round_trip_ms for r in self.results.values()
                      if r.round_trip_ms is not None and r.outcome in (ANSWERED, REFUSED))

    def percentile(self, p: float) -> float | None:
        rts = self.round_trips()
        if not rts:
            return None
        return rts[min(len(rts) - 1, max(0, math.ceil(p / 100 * len(rts)) - 1))]

    def summary(self) -> str:
        parts = [f"{self.count(ANSWERED)} answered", f"{self.count(REFUSED)} refused",
                 f"{self.count(NO_ANSWER)} no answer"]
        for extra in (OFFLINE, NOT_STARTED):
            if self.count(extra):
                parts.append(f"{self.count(extra)} {extra}")
        text = f"{self.name}: {', '.join(parts)} (of {len(self.results)} device(s))"
        rts = self.round_trips()
        if rts:
            p50, p99 = self.percentile(50), self.percentile(99)
            text += f"; round trip p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {rts[-1]:.0f} ms"
        if self.waves is not None and self.waves.stopped:
            text += f"; stopped after {self.waves.stopped}"
        return text

    def as_json(self) -> dict[str, Any]:
        rts = self.round_trips()
        return {"command": self.name, "ok": self.ok,
                "counts": {k: self.count(k) for k in (ANSWERED, REFUSED, NO_ANSWER, OFFLINE, NOT_STARTED)},
                "round_trip_ms": {"p50": self.percentile(50), "p99": self.percentile(99),
                                  "max": rts[-1] if rts else None},
                "stopped": self.waves.stopped if self.waves else None,
                "devices": [r.as_json() for r in sorted(self.results.values(), key=lambda r: r.device_id)]}


class Requester:
    """Sends one command to devices and gathers their answers (by correlation data, or by
    request id for MQTT 3.1.1 devices)."""

    def __init__(self, client: FleetClient, name: str, payload: Mapping[str, Any], board: StatusBoard | None = None,
                 *, timeout_s: float = 10.0, expiry_s: float | None = None) -> None:
        self.client = client
        self.name = name
        self.payload = dict(payload)
        self.timeout_s = timeout_s
        self.expiry_s = expiry_s if expiry_s is not None else timeout_s
        self._board = board
        self._run = uuid.uuid4().hex[:8]
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[str, float]] = {}  # request id -> (device, sent at)
        self._done: dict[str, DeviceResult] = {}
        self.unexpected = 0
        client.set_handler(self._on_message)
        client.subscribe([client.topics.answers("+", client.safe_id), client.topics.results(name)])

    def _on_message(self, msg: Message) -> None:
        now = time.monotonic()
        if self._board is not None and self._board.on_message(msg):
            return
        try:
            answer = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(answer, dict):
            return
        rid = msg.correlation.decode("utf-8", "replace") if msg.correlation else answer.get("request_id")
        with self._cond:
            sent = self._pending.pop(rid, None) if isinstance(rid, str) else None
            if sent is None:
                # Another client's answer on the shared result topic, or a second copy (QoS 1).
                if isinstance(rid, str) and rid.startswith(self._run + "-"):
                    self.unexpected += 1
                return
            device, t0 = sent
            outcome = ANSWERED if answer.get("ok") is True else REFUSED
            self._done[device] = DeviceResult(device, outcome, answer, round((now - t0) * 1000, 2))
            self._cond.notify_all()

    def send(self, devices: Sequence[str]) -> dict[str, DeviceResult]:
        """Send to every device in ``devices`` and wait for all answers or the timeout."""
        topics = self.client.topics
        rids = []
        expires_at = time.time() + self.expiry_s
        for device in devices:
            rid = f"{self._run}-{device}"
            body = dict(self.payload, request_id=rid, expires_at=round(expires_at, 3))
            with self._cond:
                self._pending[rid] = (device, time.monotonic())
            self.client.publish(topics.command(device, self.name), dumps(body), qos=1,
                                response_topic=topics.answers(device, self.client.safe_id),
                                correlation=rid.encode(), expiry_s=math.ceil(self.expiry_s))
            rids.append((rid, device))
        deadline = time.monotonic() + self.timeout_s
        wanted = set(devices)
        with self._cond:
            self._cond.wait_for(lambda: wanted <= set(self._done), max(0.0, deadline - time.monotonic()))
            out = {}
            for rid, device in rids:
                result = self._done.pop(device, None)
                if result is None:
                    self._pending.pop(rid, None)
                    result = DeviceResult(device, NO_ANSWER)
                out[device] = result
        return out


def run_command(client: FleetClient, statuses: Mapping[str, DeviceStatus], targets: Sequence[str], name: str,
                payload: Mapping[str, Any], *, rule: WaveRule | None = None, timeout_s: float = 10.0,
                expiry_s: float | None = None, board: StatusBoard | None = None, skip_offline: bool = False,
                on_wave: Callable[[WaveOutcome, int], None] | None = None) -> CommandReport:
    """Send ``name`` to ``targets`` (in waves when ``rule.size``); offline devices are not sent to
    and count as failed unless ``skip_offline``."""
    rule = rule or WaveRule()
    report = CommandReport(name)
    online = [d for d in targets if d not in statuses or statuses[d].online]
    for d in targets:
        if d not in online:
            report.results[d] = DeviceResult(d, OFFLINE)
    requester = Requester(client, name, payload, board, timeout_s=timeout_s, expiry_s=expiry_s)

    def wave(n: int, devices: list[str]) -> list[str]:
        results = requester.send(devices)
        for r in results.values():
            r.wave = n
        report.results.update(results)
        return [d for d, r in results.items() if not r.ok]

    report.waves = run_waves(online, rule, wave, on_wave)
    for d in report.waves.not_started:
        report.results[d] = DeviceResult(d, NOT_STARTED)
    if skip_offline:
        for d in [d for d, r in report.results.items() if r.outcome == OFFLINE]:
            del report.results[d]
    report.unexpected = requester.unexpected
    return report


def p_stats(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max / mean of a list of numbers (nearest rank)."""
    if not values:
        return {}
    v = sorted(values)

    def rank(p: float) -> float:
        return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]

    return {"p50": rank(50), "p99": rank(99), "max": v[-1], "mean": statistics.fmean(v)}
