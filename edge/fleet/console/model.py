"""What the console knows about the fleet, built from the broker's messages.

Per device: its retained status (``DeviceStatus``), what it is doing now (``idle``,
``listening``, ``thinking``, ``speaking``: from its ``state`` events; a device that sends none,
like the load-test's simulated ones, gets it from its other events), what it is hearing and
saying in the current turn, its recent turns with their timings, its first-audio latency over
the last hours and its rollout step. For the fleet: a feed of recent turns (one card per turn,
filled in as wake, transcript, reply and turn end arrive) and notes (errors outside a turn,
barge-ins, commands sent from the console).

Every change becomes one update handed to ``publish(kind, data)`` while ``lock`` is held, so a
page that takes a ``snapshot()`` under the same lock and then follows the updates misses
nothing. Everything is bounded; text from devices is kept as text (the page never parses it as
HTML) and cut to a length.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge.fleet.console.rollout import EVENT_PREFIX, Rollouts, parse_step
from edge.fleet.status import DeviceStatus, parse_status

MAX_DEVICES = 50_000
MAX_CARDS = 20_000  # turn cards kept, oldest dropped
FEED = 120  # turn cards and notes in a snapshot
TURNS_PER_DEVICE = 20
LATENCY_POINTS = 720  # per device: a turn every 30 s for 6 hours
EVENTS_PER_DEVICE = 40
RECENT_IDS = 20_000  # event ids remembered to drop QoS 1 duplicates
TEXT_MAX = 1000
ACTIVITIES = ("idle", "listening", "thinking", "speaking")
# A device that sends no ``state`` events: what it is doing, from its other events.
_DERIVED = {"wake": "listening", "turn.start": "listening", "speech.start": "listening",
            "transcript.final": "thinking", "reply.final": "speaking", "tts.start": "speaking",
            "turn.end": "idle", "session.end": "idle"}
_NOTES = ("error", "barge_in", "ready")

Publish = Callable[[str, dict[str, Any]], None]


def text(value: Any, limit: int = TEXT_MAX) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= limit else value[:limit] + "…"


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
        return None
    return float(value)


def _small(value: Any, limit: int = 2000) -> Any:
    """A JSON value from a device, kept if small (versions, models, knowledge, tags)."""
    try:
        encoded = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return None
    return value if len(encoded) <= limit else encoded[:limit] + "…"


@dataclass
class TurnCard:
    device_id: str
    turn_id: str
    started: float
    trigger: str | None = None
    wake_word: str | None = None
    question: str | None = None
    heard_partial: str | None = None
    reply: str | None = None
    outcome: str | None = None
    first_audio_ms: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    barge_in: bool = False
    ended: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"key": "t:" + self.turn_id, "kind": "turn", "device_id": self.device_id, "turn_id": self.turn_id,
                "time": self.started, "trigger": self.trigger, "wake_word": self.wake_word,
                "question": self.question, "heard_partial": self.heard_partial if self.question is None else None,
                "reply": self.reply, "outcome": self.outcome, "first_audio_ms": self.first_audio_ms,
                "timings_ms": self.timings_ms, "error": self.error, "barge_in": self.barge_in, "ended": self.ended}


@dataclass
class DeviceLive:
    device_id: str
    status: DeviceStatus | None = None
    activity: str | None = None
    activity_since: float | None = None
    reports_state: bool = False  # it sends ``state`` events: no guessing from the others
    hearing: str | None = None
    saying: str | None = None
    turn_id: str | None = None
    last_event: float | None = None
    offline_seen: float | None = None  # when the console saw it go offline (unknown for a retained one)
    turns: deque[str] = field(default_factory=lambda: deque(maxlen=TURNS_PER_DEVICE))
    latency: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=LATENCY_POINTS))
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_PER_DEVICE))


def _status_json(s: DeviceStatus) -> dict[str, Any]:
    body = s.body
    last_turn = body.get("last_turn") if isinstance(body.get("last_turn"), dict) else None
    last_error = body.get("last_error") if isinstance(body.get("last_error"), dict) else None
    return {"online": s.online, "state": s.state, "reason": text(body.get("reason"), 120),
            "detail": text(body.get("detail"), 200), "since": s.since, "lost": s.lost,
            "connected_before": number(body.get("time")) if s.lost else None,
            "version": text(body.get("version"), 64), "models": _small(body.get("models")),
            "knowledge": _small(body.get("knowledge")), "tags": [t[:64] for t in s.tags[:32]],
            "last_turn": _small(last_turn), "last_error": _small(last_error)}


class FleetModel:
    def __init__(self, publish: Publish | None = None, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.RLock()
        self._publish = publish or (lambda kind, data: None)
        self._clock = clock
        self.devices: dict[str, DeviceLive] = {}
        self._cards: OrderedDict[str, TurnCard] = OrderedDict()
        self._notes: deque[dict[str, Any]] = deque(maxlen=FEED)
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.rollouts = Rollouts()
        self.counters = {"events": 0, "statuses": 0, "duplicates": 0, "unreadable": 0, "ignored": 0}

    def set_publish(self, publish: Publish) -> None:
        self._publish = publish

    # -- input ---------------------------------------------------------------------------
    def _device(self, device_id: str) -> DeviceLive | None:
        d = self.devices.get(device_id)
        if d is None:
            if len(self.devices) >= MAX_DEVICES:
                self.counters["ignored"] += 1
                return None
            d = self.devices[device_id] = DeviceLive(device_id)
        return d

    def on_status(self, device_id: str, payload: bytes) -> None:
        now = self._clock()
        with self.lock:
            self.counters["statuses"] += 1
            status = parse_status(device_id, payload)
            if status is None:  # the retained status was cleared: the device is gone from the fleet
                if self.devices.pop(device_id, None) is not None:
                    self._publish("removed", {"device_id": device_id})
                return
            d = self._device(device_id)
            if d is None:
                return
            progress = status.body.get("rollout")  # a rollout's latest step, kept in the status
            if isinstance(progress, dict) and progress.get("rollout_id"):
                summary = self._rollout_step(device_id, EVENT_PREFIX + "status", progress, now)
                if summary is not None:
                    self._publish("rollout", summary)
            was_online = d.status.online if d.status is not None else None
            d.status = status
            if not status.online:
                d.activity = None
                d.hearing = d.saying = None
                if was_online:
                    d.offline_seen = now
            else:
                d.offline_seen = None
                if d.activity is None:
                    d.activity, d.activity_since = "idle", now
            self._publish("device", self.device_json(d))

    def on_event(self, device_id: str, kind: str, payload: bytes) -> None:
        now = self._clock()
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            body = None
        with self.lock:
            if not isinstance(body, dict):
                self.counters["unreadable"] += 1
                return
            mid = body.get("message_id")
            if isinstance(mid, str):
                if mid in self._recent:
                    self.counters["duplicates"] += 1
                    return
                self._recent[mid] = None
                if len(self._recent) > RECENT_IDS:
                    self._recent.popitem(last=False)
            d = self._device(device_id)
            if d is None:
                return
            self.counters["events"] += 1
            kind = text(body.get("type"), 64) or kind
            t = number(body.get("time")) or now
            d.last_event = now
            d.events.append({"type": kind, "time": t, "turn_id": text(body.get("turn_id"), 64),
                             "text": text(body.get("text"), 200) or text(body.get("message"), 200)})
            updates: list[tuple[str, dict[str, Any]]] = []
            changed = self._activity(d, kind, body, now)
            card = self._turn(d, kind, body, t)
            if kind.startswith(EVENT_PREFIX):
                summary = self._rollout_step(device_id, kind, body, now)
                if summary is not None:
                    updates.append(("rollout", summary))
                    changed = True
            if changed:
                updates.append(("device", self.device_json(d)))
            if card is not None:
                updates.append(("turn", card.as_json()))
            elif kind in _NOTES and kind != "ready":
                note = {"key": f"n:{mid or now}", "kind": kind, "device_id": device_id, "time": t,
                        "text": self._note_text(kind, body)}
                self._notes.append(note)
                updates.append(("note", dict(note)))
            if updates:
                # The last update of the event says when it happened on the device and when it reached
                # the console: the page stamps when it has shown it (latency measurements).
                updates[-1][1].update(t=t, r=now)
            for update_kind, data in updates:
                self._publish(update_kind, data)

    def _rollout_step(self, device_id: str, kind: str, body: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The summary of the rollout this step updated, or None."""
        step = parse_step(device_id, kind, body, now)
        rollout = self.rollouts.apply(step) if step is not None else None
        return rollout.summary() if rollout is not None else None

    @staticmethod
    def _note_text(kind: str, body: dict[str, Any]) -> str:
        if kind == "error":
            return f"{text(body.get('code'), 64) or 'error'}: {text(body.get('message'), 300) or ''}"
        if kind == "barge_in":
            return "barge-in (" + (text(body.get("word"), 64) or text(body.get("trigger"), 64) or "?") + ")"
        return kind

    def _activity(self, d: DeviceLive, kind: str, body: dict[str, Any], now: float) -> bool:
        """Update what the device is doing and hearing/saying; True if its row changed."""
        before = (d.activity, d.hearing, d.saying, d.turn_id)
        turn_id = text(body.get("turn_id"), 64)
        if kind == "state":
            state = text(body.get("state"), 32)
            if state is not None:
                d.reports_state = True
                if state != d.activity:
                    d.activity, d.activity_since = state, now
        elif not d.reports_state and kind in _DERIVED and _DERIVED[kind] != d.activity:
            d.activity, d.activity_since = _DERIVED[kind], now
        if kind in ("wake", "turn.start") and turn_id != d.turn_id:
            d.turn_id, d.hearing, d.saying = turn_id, None, None
        elif kind in ("transcript.partial", "transcript.final"):
            d.hearing = text(body.get("text"), 300)
            d.turn_id = turn_id or d.turn_id
        elif kind in ("reply.partial", "reply.final"):
            d.saying = text(body.get("text"), 300)
            d.turn_id = turn_id or d.turn_id
        if d.status is not None and not d.status.online:
            d.activity = None  # late deliveries from an offline device's outbox: it stays offline
        return (d.activity, d.hearing, d.saying, d.turn_id) != before

    def _turn(self, d: DeviceLive, kind: str, body: dict[str, Any], t: float) -> TurnCard | None:
        """The turn card this event fills in (created by the turn's first event), or None."""
        turn_id = text(body.get("turn_id"), 64)
        if turn_id is None or kind in ("state", "speech.start", "speech.end", "reply.partial", "tts.end",
                                       "session.end") or kind.startswith(EVENT_PREFIX):
            return None
        card = self._cards.get(turn_id)
        if card is None:
            if kind == "transcript.partial" and d.turn_id != turn_id:
                return None
            card = TurnCard(d.device_id, turn_id, t)
            self._cards[turn_id] = card
            d.turns.append(turn_id)
            while len(self._cards) > MAX_CARDS:
                self._cards.popitem(last=False)
        elif card.device_id != d.device_id:
            return None  # a turn id is per device; another device reusing it is not mixed in
        if kind == "wake":
            card.wake_word = text(body.get("word"), 64)
            card.trigger = card.trigger or "wake"
        elif kind == "turn.start":
            card.trigger = text(body.get("trigger"), 32) or card.trigger
        elif kind == "transcript.partial":
            card.heard_partial = text(body.get("text"), 300)
        elif kind == "transcript.final":
            card.question = text(body.get("text"))
        elif kind == "reply.final":
            card.reply = text(body.get("text"))
        elif kind == "tts.start":
            self._timings(card, body.get("timings_ms"))
        elif kind == "barge_in":
            card.barge_in = True
        elif kind == "error":
            card.error = {"code": text(body.get("code"), 64), "message": text(body.get("message"), 300)}
        elif kind == "turn.end":
            card.outcome = text(body.get("outcome"), 32)
            card.trigger = text(body.get("trigger"), 32) or card.trigger
            card.question = card.question or text(body.get("text"))
            card.reply = card.reply or text(body.get("reply"))
            card.ended = t
            self._timings(card, body.get("timings_ms"))
            if card.first_audio_ms is not None:
                d.latency.append((t, card.first_audio_ms))
        else:
            return None
        return card

    @staticmethod
    def _timings(card: TurnCard, timings: Any) -> None:
        if not isinstance(timings, dict):
            return
        for key, value in list(timings.items())[:40]:
            v = number(value)
            if isinstance(key, str) and v is not None:
                card.timings_ms[key[:64]] = round(v, 1)
        first = card.timings_ms.get("end_of_speech_to_first_audio")
        if first is not None:
            card.first_audio_ms = first

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """An update that is not the model's own (the console's clock and counters)."""
        with self.lock:
            self._publish(kind, data)

    def note(self, kind: str, device_id: str | None, message: str, **extra: Any) -> None:
        """A line in the feed from the console itself (a command sent, its outcome)."""
        now = self._clock()
        with self.lock:
            note = {"key": f"n:{kind}:{now}", "kind": kind, "device_id": device_id, "time": now,
                    "text": message[:TEXT_MAX], **extra}
            self._notes.append(note)
            self._publish("note", note)

    # -- output --------------------------------------------------------------------------
    def device_json(self, d: DeviceLive) -> dict[str, Any]:
        out: dict[str, Any] = {"device_id": d.device_id, "activity": d.activity, "activity_since": d.activity_since,
                               "hearing": d.hearing, "saying": d.saying, "turn_id": d.turn_id,
                               "last_event": d.last_event, "offline_seen": d.offline_seen,
                               "rollout": self.rollouts.of_device(d.device_id)}
        if d.status is not None:
            out.update(_status_json(d.status))
        else:  # events before any status (or a status not yet retained)
            out.update(online=None, state="unknown")
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything a page needs to start; call with ``lock`` held, then follow the updates."""
        cards = [c.as_json() for c in list(self._cards.values())[-FEED:]]
        return {"now": self._clock(), "devices": [self.device_json(d) for _, d in sorted(self.devices.items())],
                "feed": cards + list(self._notes), "rollouts": self.rollouts.summaries(),
                "counters": dict(self.counters)}

    def details(self, device_id: str) -> dict[str, Any] | None:
        """One device: its row, recent turns (newest first), latency points, recent events."""
        with self.lock:
            d = self.devices.get(device_id)
            if d is None:
                return None
            turns = [self._cards[t].as_json() for t in reversed(d.turns) if t in self._cards]
            return {"now": self._clock(), "device": self.device_json(d), "turns": turns,
                    "latency": [[round(t, 3), v] for t, v in d.latency], "events": list(d.events)[::-1],
                    "status": dict(d.status.body) if d.status is not None else None}

    def statuses(self) -> dict[str, DeviceStatus]:
        with self.lock:
            return {k: d.status for k, d in self.devices.items() if d.status is not None}
