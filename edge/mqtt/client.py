"""The MQTT bridge: events out through the disk outbox, status and metrics, commands in.

Threads (all daemon threads, all named):
- ``edge-mqtt-connection`` connects with exponential backoff. Each attempt gets a fresh paho
  client whose own network thread runs until that connection ends, so paho never resends
  from its in-memory queue: the outbox is the only source of truth for what is unsent.
- ``edge-mqtt-outbox`` owns the SQLite outbox: stores handed-off events, publishes them in
  order (at most ``WINDOW`` unacknowledged), deletes them on PUBACK, sends metrics.
- ``edge-mqtt-commands`` validates commands and calls the controller, so a slow controller
  never stalls paho's network thread.

``publish_event`` only serialises the event and appends it to a bounded in-memory hand-off
(oldest dropped and counted on overflow); the outbox thread commits it within milliseconds.
It also notes the last turn (``turn.end``) and the last error (``error``) for the retained
status, which the outbox thread republishes when they change.

The retained status carries what the fleet's ``devices`` table shows: state, version, models,
tags, ``knowledge`` (the venue pack, or null), ``last_turn`` and ``last_error``; with rollouts,
``rollout`` (the last or current one's progress) and ``versions`` (the installed version of each
model and pack in use). ``publish_record`` sends events that come from outside the pipeline
(``rollout.progress``, ``rollout.done``) through the same outbox.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.config import MqttConfig
from edge.errors import ConfigError, MissingDependency
from edge.events import Event, EventType, new_id
from edge.mqtt import commands as cmds
from edge.mqtt.discovery import discovery_messages
from edge.mqtt.dispatch import CommandDispatcher
from edge.mqtt.metrics import HostMetrics
from edge.mqtt.outbox import FILENAME as OUTBOX_FILENAME
from edge.mqtt.outbox import Outbox
from edge.mqtt.security import read_password, tls_context
from edge.mqtt.topics import Topics, valid_tag, valid_topic_name
from edge.mqtt.wire import dumps as _dumps

_LOGGER = logging.getLogger(__name__)

WINDOW = 64  # unacknowledged outbox messages on the wire
_NETWORK_CHECK_S = 5.0  # how often a connected bridge checks that paho's network thread lives
HANDOFF_MAX = 10_000  # events waiting for the outbox thread; oldest dropped on overflow
_PARTIALS = frozenset({EventType.TRANSCRIPT_PARTIAL, EventType.REPLY_PARTIAL})
_RESERVED = ("seq", "message_id", "device_id")
_STATE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_RECORD_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31})?$")
STATUS_FIELDS = ("rollout", "versions")  # what set_status_fields may set


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise MissingDependency.for_module("paho-mqtt", "mqtt") from None
    return mqtt


def _no_delay(client: Any) -> None:
    # paho leaves Nagle on, and a packet written in two parts then waits for a delayed ACK:
    # about 40 ms per command answer and per event on a quiet connection.
    sock = client.socket()
    try:
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _join(thread: threading.Thread, timeout: float) -> None:
    # stop() may be called from a controller method, i.e. on the command thread itself.
    if thread is not threading.current_thread():
        thread.join(max(0.0, timeout))


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that logs its own failures: an exception escaping into paho would end
    its network thread (or, with suppress_exceptions, vanish without a trace)."""

    def call(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            _LOGGER.exception("MQTT callback failed")

    return call


@dataclass
class _Session:
    """One connection attempt: its paho client, generation, and how it ended."""

    client: Any
    gen: int
    ended: threading.Event = field(default_factory=threading.Event)
    connected: bool = False  # between CONNACK and the disconnect
    accepted: bool = False  # the broker accepted this connection at some point
    window: int = WINDOW  # outbox messages in flight at once
    socket_error: str = ""


@dataclass
class _Counters:
    connects: int = 0
    connect_failures: int = 0
    published: int = 0
    rejected: int = 0  # PUBACK with an error reason (v5), e.g. refused by the broker's ACL
    partials_skipped: int = 0


class MqttBridge:
    def __init__(self, cfg: MqttConfig, device_id: str, state_dir: Path, controller: cmds.Controller,
                 *, version: str, models: Mapping[str, str], tags: Sequence[str] = (),
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0) -> None:
        self._mqtt = _paho()
        self.cfg = cfg
        self.topics = Topics(cfg.prefix, device_id)
        for tag in tags:
            if not isinstance(tag, str) or not valid_tag(tag):
                raise ConfigError(f"device.tags: {tag!r} is not a usable tag: 1-64 characters of letters, "
                                  "digits and _ . : = - (e.g. 'site:paris', 'lang:fr'), starting with a "
                                  "letter or digit")
        self._tags = sorted(set(tags))
        if cfg.ha_discovery and not valid_topic_name(cfg.ha_prefix):
            raise ConfigError(f"mqtt.ha_prefix: {cfg.ha_prefix!r} is not a usable topic prefix")
        self._password = read_password(cfg)
        if self._password and not cfg.username:
            raise ConfigError("mqtt.password is set without mqtt.username: set both")
        self._tls = tls_context(cfg)
        self._dispatcher = CommandDispatcher(self.topics, controller, self._publish_answer, self.bridge_info)
        self._version = version
        self._models = dict(models)
        self._backoff = (reconnect_min_s, max(reconnect_min_s, reconnect_max_s))
        self._client_id = cfg.client_id or f"edge-voice-{device_id}"
        self._outbox = Outbox(Path(state_dir) / OUTBOX_FILENAME, cfg.outbox_max)
        self._host = HostMetrics()
        self._metrics_source: Callable[[], dict] | None = None
        self._counters = _Counters()
        self._started_wall = time.time()
        self._started = time.monotonic()

        self._handoff: collections.deque[tuple[str, bytes, bool]] = collections.deque()  # (topic, json, partial)
        self._handoff_lock = threading.Lock()
        self._handoff_overflow = 0
        self._wake = threading.Event()
        self._acks: collections.deque[tuple[int, int, bool]] = collections.deque()

        self._status_lock = threading.Lock()
        self._state = "online"
        self._state_fields: dict[str, Any] = {}
        self._status_dirty = False
        self._last_turn: dict[str, Any] | None = None
        self._last_error: dict[str, Any] | None = None
        self._knowledge: dict[str, Any] | None = None
        self._fields: dict[str, Any] = {}  # STATUS_FIELDS set by set_status_fields
        self._online_since: float | None = None
        self._session: _Session | None = None  # set only while connected
        self._current: _Session | None = None  # the attempt in progress, connected or not
        self._conn_error: str | None = None
        self._down_since: float | None = None  # monotonic time the last connection was lost
        self._stopping = threading.Event()
        self._flush_until: float | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []

    # --- public interface ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        s = self._session
        return s is not None and s.connected

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or ended, for status displays; None when fine."""
        return self._conn_error

    @property
    def outbox_depth(self) -> int:
        return self._outbox.depth

    def start(self) -> None:
        if self._threads:
            return
        if self._closed:
            raise RuntimeError("MqttBridge cannot be restarted after stop()")
        _LOGGER.info("MQTT: device %s, broker %s:%s (%s, MQTT %s), %d event(s) waiting in %s",
                     self.topics.device_id, self.cfg.host, self.cfg.port,
                     "TLS" if self._tls else "no TLS", self.cfg.protocol, self._outbox.depth,
                     self._outbox.path)
        for name, target in (("edge-mqtt-outbox", self._run_outbox),
                             ("edge-mqtt-commands", self._dispatcher.run),
                             ("edge-mqtt-connection", self._run_connection)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def publish_event(self, event: Event) -> None:
        try:
            body = event.as_dict()
            for key in _RESERVED:
                body.pop(key, None)
            body["message_id"] = new_id()
            body["device_id"] = self.topics.device_id
            payload = _dumps(body)
        except (TypeError, ValueError) as err:
            _LOGGER.warning("MQTT: cannot serialise %s event: %s", event.type, err)
            return
        kind = event.type
        if kind is EventType.TURN_END or kind is EventType.ERROR:
            self._note(kind, body)
        item = (self.topics.event(kind.value), payload, kind in _PARTIALS)
        with self._handoff_lock:
            if self._closed:
                _LOGGER.debug("MQTT: %s event after stop() not sent", event.type)
                return
            if len(self._handoff) >= HANDOFF_MAX:
                self._handoff.popleft()
                self._handoff_overflow += 1
            self._handoff.append(item)
        self._wake.set()

    def set_state(self, state: str, **fields: Any) -> None:
        """Replace the status state and its extra fields; published retained when connected."""
        if not _STATE_RE.match(state):
            raise ValueError(f"status state {state!r} must be a short lower-case word")
        with self._status_lock:
            self._state = state
            self._state_fields = dict(fields)
            self._status_dirty = True
        self._wake.set()  # published by the outbox thread: the caller may be the audio pipeline

    def set_knowledge(self, pack: Mapping[str, Any] | None) -> None:
        """The venue knowledge pack in use (e.g. its name and version), shown in the status."""
        with self._status_lock:
            self._knowledge = dict(pack) if pack is not None else None
            self._status_dirty = True
        self._wake.set()

    def set_status_fields(self, **fields: Any) -> None:
        """Replace some of the status's STATUS_FIELDS (e.g. ``rollout=...``); published like the state."""
        unknown = sorted(set(fields) - set(STATUS_FIELDS))
        if unknown:
            raise ValueError(f"status field {unknown[0]!r} is not one of {', '.join(STATUS_FIELDS)}")
        with self._status_lock:
            self._fields.update(fields)
            self._status_dirty = True
        self._wake.set()

    def publish_record(self, event_type: str, data: Mapping[str, Any]) -> None:
        """An event that is not the pipeline's (``rollout.done``): the same envelope, topic and outbox."""
        if not _RECORD_RE.match(event_type):
            raise ValueError(f"event type {event_type!r} must be a short lower-case name")
        body: dict[str, Any] = {"type": event_type}
        body.update({k: v for k, v in data.items() if k not in _RESERVED and k != "type"})
        body.setdefault("time", round(time.time(), 3))
        body["message_id"] = new_id()
        body["device_id"] = self.topics.device_id
        try:
            payload = _dumps(body)
        except (TypeError, ValueError) as err:
            _LOGGER.warning("MQTT: cannot serialise %s event: %s", event_type, err)
            return
        with self._handoff_lock:
            if self._closed:
                return
            if len(self._handoff) >= HANDOFF_MAX:
                self._handoff.popleft()
                self._handoff_overflow += 1
            self._handoff.append((self.topics.event(event_type), payload, False))
        self._wake.set()

    def _note(self, kind: EventType, body: Mapping[str, Any]) -> None:
        """Keep the last turn or error for the status; the outbox thread republishes it."""
        if kind is EventType.TURN_END:
            timings = body.get("timings_ms")
            first_audio = timings.get("end_of_speech_to_first_audio") if isinstance(timings, dict) else None
            note: dict[str, Any] = {"time": body.get("time"), "turn_id": body.get("turn_id"),
                                    "outcome": body.get("outcome"), "trigger": body.get("trigger"),
                                    "first_audio_ms": first_audio}
        else:
            message = body.get("message")
            note = {"time": body.get("time"), "turn_id": body.get("turn_id"), "code": body.get("code"),
                    "message": message[:300] if isinstance(message, str) else message}
        with self._status_lock:
            if kind is EventType.TURN_END:
                self._last_turn = note
            else:
                self._last_error = note
            self._status_dirty = True
        # No wake-up of its own: the event just handed off wakes the outbox thread.

    def set_metrics_source(self, fn: Callable[[], dict]) -> None:
        self._metrics_source = fn

    def stop(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        if not self._threads:
            self._closed = True
            self._outbox.close()
            return
        # Most of the time goes to flushing the outbox; keep the rest for "offline" and DISCONNECT.
        self._flush_until = time.monotonic() + 0.7 * timeout
        self._wake.set()
        outbox_thread, command_thread, connection_thread = self._threads
        _join(outbox_thread, deadline - time.monotonic())
        self._stopping.set()
        self._dispatcher.stop()
        _join(command_thread, min(1.0, deadline - time.monotonic()))
        s = self._session
        if s is not None:
            try:
                info = s.client.publish(self.topics.status, self._offline_payload("stopped"), qos=1, retain=True)
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as err:
                _LOGGER.warning("MQTT: could not publish the offline status: %s", err)
            s.client.disconnect()
        current = self._current
        if current is not None:
            current.ended.set()
        _join(connection_thread, max(0.1, deadline - time.monotonic()))
        with self._handoff_lock:
            self._closed = True
        if outbox_thread.is_alive():
            _LOGGER.warning("MQTT: the outbox did not finish within %.1f s", timeout)
        else:
            self._store_handoff(False)  # events emitted while the outbox thread was finishing
            self._outbox.close()
        left = self._outbox.depth
        _LOGGER.info("MQTT: stopped; %d event(s) kept in the outbox for the next start", left)

    # --- payloads --------------------------------------------------------------------------

    def _sticky(self) -> dict[str, Any]:
        """What the status says whatever the state; called with the status lock held."""
        online = self._online_since
        out = {"tags": self._tags, "knowledge": self._knowledge, "last_turn": self._last_turn,
               "last_error": self._last_error, "online_since": round(online, 3) if online else None}
        out.update(self._fields)
        return out

    def _status_payload(self) -> bytes:
        with self._status_lock:
            state, fields = self._state, dict(self._state_fields)
            sticky = self._sticky()
            self._status_dirty = False
        body = dict(fields)
        body.update(sticky)
        body.update(state=state, device_id=self.topics.device_id, version=self._version,
                    models=self._models, started=round(self._started_wall, 3),
                    uptime_s=round(time.monotonic() - self._started, 1), time=round(time.time(), 3))
        return _dumps(body)

    def _offline_payload(self, reason: str) -> bytes:
        """The offline status: published on a clean stop, and the Last Will, whose ``time`` is
        when the connection was made (the broker publishes it later, unchanged)."""
        with self._status_lock:
            body = self._sticky()
        body["online_since"] = None
        body.update(state="offline", reason=reason, device_id=self.topics.device_id, version=self._version,
                    models=self._models, started=round(self._started_wall, 3), time=round(time.time(), 3))
        return _dumps(body)

    def _publish_status(self, client: Any) -> None:
        try:
            client.publish(self.topics.status, self._status_payload(), qos=1, retain=True)
        except (TypeError, ValueError) as err:
            _LOGGER.warning("MQTT: cannot publish status: %s", err)

    def bridge_info(self) -> dict[str, Any]:
        c = self._counters
        return {"connected": self.connected, "last_error": self._conn_error,
                "outbox": {"depth": self._outbox.depth, "max": self._outbox.max_rows,
                           "dropped": self._outbox.dropped + self._handoff_overflow,
                           "partials_skipped": c.partials_skipped},
                "connects": c.connects, "connect_failures": c.connect_failures,
                "published": c.published, "rejected": c.rejected,
                "commands": {"ok": self._dispatcher.ok, "refused": self._dispatcher.refused,
                             "busy": self._dispatcher.busy}}

    def _metrics_payload(self) -> bytes:
        body: dict[str, Any] = {"device_id": self.topics.device_id, "time": round(time.time(), 3),
                                "uptime_s": round(time.monotonic() - self._started, 1)}
        body.update(self._host.sample())
        info = self.bridge_info()
        body["outbox"] = info.pop("outbox")
        body["mqtt"] = info
        source = self._metrics_source
        if source is not None:
            try:
                extra = source()
                for key, value in (extra or {}).items():
                    body.setdefault(key, value)
            except Exception as err:  # a broken source must not stop metrics
                body["source_error"] = str(err)[:200]
        return _dumps(body)

    # --- connection ------------------------------------------------------------------------

    def _new_session(self, gen: int) -> _Session:
        mqtt = self._mqtt
        v5 = self.cfg.protocol == "5"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=False)
        session = _Session(client, gen)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self._password or None)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.will_set(self.topics.status, self._offline_payload("connection lost"), qos=1, retain=True)
        client.max_inflight_messages_set(WINDOW)
        client.on_connect = _guarded(lambda c, u, flags, rc, props: self._on_connect(session, rc, props))
        client.on_disconnect = _guarded(lambda c, u, flags, rc, props: self._on_disconnect(
            session, rc, getattr(flags, "is_disconnect_packet_from_server", False)))
        client.on_publish = _guarded(lambda c, u, mid, rc, props: self._on_publish(session, mid, rc))
        client.on_message = _guarded(lambda c, u, msg: self._on_message(session, msg))
        client.on_subscribe = _guarded(lambda c, u, mid, rcs, props: self._on_subscribe(rcs))
        client.on_log = _guarded(lambda c, u, level, buf: self._on_log(session, level, buf))
        return session

    def _connect(self, session: _Session) -> str | None:
        """Open the socket (and TLS) and send CONNECT; the failure in words, or None."""
        cfg = self.cfg
        try:
            if cfg.protocol == "5":
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0
                session.client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=True, properties=props)
            else:
                session.client.connect(cfg.host, cfg.port, cfg.keepalive_s)
            _no_delay(session.client)
            return None
        except ssl.SSLCertVerificationError as err:
            return (f"TLS: the broker's certificate is not trusted ({err.verify_message}); check "
                    "mqtt.ca_file and that mqtt.host is a name the certificate is issued for")
        except ssl.SSLError as err:
            return f"TLS handshake failed ({err.reason or err}); {self._client_cert_hint()}"
        except ConnectionRefusedError:
            return "connection refused (no broker listening on that port?)"
        except socket.gaierror as err:
            return f"cannot resolve host {cfg.host!r}: {err.strerror}"
        except TimeoutError:
            return "timed out connecting"
        except OSError as err:
            return err.strerror or str(err)
        except ValueError as err:  # paho's own checks (e.g. a bad host string)
            return str(err)

    def _client_cert_hint(self) -> str:
        if self.cfg.cert_file:
            return "check that mqtt.cert_file/key_file are signed by a CA the broker trusts"
        return "check whether the broker requires a client certificate (mqtt.cert_file/key_file)"

    def _fail(self, message: str) -> None:
        self._counters.connect_failures += 1
        full = f"MQTT broker {self.cfg.host}:{self.cfg.port}: {message}"
        if full != self._conn_error:
            _LOGGER.warning("%s; retrying with backoff", full)
        else:
            _LOGGER.debug("%s; retrying", full)
        self._conn_error = full

    def _run_connection(self) -> None:
        failures = 0
        gen = 0
        while not self._stopping.is_set():
            gen += 1
            try:
                session = self._new_session(gen)
                self._current = session
                error = self._connect(session)
                if error is not None:
                    self._fail(error)
                else:
                    session.client.loop_start()
                    self._wait_ended(session)
                    session.client.disconnect()
                    session.client.loop_stop()
                    # paho keeps its wake-up socket pair open until the client is collected;
                    # close it now so a flapping connection cannot pile up descriptors.
                    reset = getattr(session.client, "_reset_sockets", None)
                    if callable(reset):
                        reset()
            except Exception:  # keep the device trying, whatever paho does
                _LOGGER.exception("MQTT connection attempt failed unexpectedly")
                session = None
            if self._stopping.is_set():
                break
            failures = 0 if session is not None and session.accepted else failures + 1
            delay = min(self._backoff[1], self._backoff[0] * 2 ** min(max(0, failures - 1), 20))
            # Jitter keeps a fleet from reconnecting in lock-step after a broker restart.
            self._stopping.wait(delay * random.uniform(0.5, 1.0))

    def _wait_ended(self, session: _Session) -> None:
        """Until the connection ends. paho's network thread can also end without calling
        on_disconnect (when select() fails, e.g. on a descriptor above 1023 in a process with
        many connections); a slow check of that thread keeps the device from waiting forever."""
        network = getattr(session.client, "_thread", None)
        while not session.ended.wait(_NETWORK_CHECK_S):
            if network is not None and not network.is_alive():
                if not self._stopping.is_set():
                    self._fail("paho's network thread ended without a disconnect (a socket it cannot "
                               "select() on?)")
                    _LOGGER.error("MQTT: the network thread of %s ended unexpectedly; reconnecting",
                                  self._client_id)
                session.connected = False
                if self._session is session:
                    self._session = None
                session.ended.set()
                self._wake.set()

    def _on_connect(self, session: _Session, rc: Any, props: Any) -> None:
        if rc.is_failure:
            name = str(rc)
            if rc.value in (0x86, 0x87, 4, 5):  # bad user name or password / not authorized
                self._fail(f"the broker refused the login ({name}); check mqtt.username and the password")
            else:
                self._fail(f"the broker refused the connection ({name})")
            session.ended.set()
            return
        client = session.client
        # paho ignores a v5 broker's Receive Maximum (and cannot change its own limit once
        # connected); stay under it, leaving room for status, discovery and answers.
        receive_max = getattr(props, "ReceiveMaximum", None)
        if receive_max:
            session.window = max(1, min(WINDOW, int(receive_max) - 8))
        if self.cfg.protocol == "5":
            from paho.mqtt.subscribeoptions import SubscribeOptions

            # Retain As Published: a retained command is then recognisable (and refused) live,
            # not only when the broker replays it after a reconnect.
            opts = SubscribeOptions(qos=1, retainAsPublished=True)
            client.subscribe([(f, opts) for f in self._subscriptions])
        else:
            client.subscribe([(f, 1) for f in self._subscriptions])
        with self._status_lock:
            self._online_since = time.time()
        self._publish_status(client)
        if self.cfg.ha_discovery:
            for topic, payload in discovery_messages(self.topics, self.cfg.ha_prefix, self._version):
                client.publish(topic, payload, qos=1, retain=True)
        session.connected = session.accepted = True
        self._counters.connects += 1
        self._conn_error = None
        self._session = session
        down = self._down_since
        _LOGGER.info("MQTT: connected to %s:%s as %s; %d event(s) to send%s", self.cfg.host, self.cfg.port,
                     self._client_id, self._outbox.depth,
                     f" (the broker was unreachable for {time.monotonic() - down:.1f} s)" if down else "")
        self._down_since = None
        self._wake.set()

    def _on_disconnect(self, session: _Session, rc: Any, from_broker: bool) -> None:
        if session.connected:
            session.connected = False
            self._down_since = time.monotonic()
            if self._session is session:
                self._session = None
            if not self._stopping.is_set():
                why = f"the broker said: {rc}" if from_broker else (session.socket_error or "connection lost")
                self._conn_error = f"MQTT broker {self.cfg.host}:{self.cfg.port}: disconnected ({why})"
                _LOGGER.warning("%s; events are kept in the outbox", self._conn_error)
        elif not session.ended.is_set() and not self._stopping.is_set():
            why = session.socket_error or str(rc)
            if self._tls is not None:
                # With TLS 1.3 the broker checks our certificate after the client's handshake
                # is done, so a refused certificate shows up here, as a closed connection.
                self._fail(f"the broker closed the TLS connection before accepting it ({why}); "
                           f"{self._client_cert_hint()}")
            else:
                self._fail(f"the broker closed the connection before accepting it ({why})")
        session.ended.set()
        self._wake.set()

    def _on_log(self, session: _Session, level: int, buf: str) -> None:
        if level == self._mqtt.MQTT_LOG_ERR:
            session.socket_error = buf
            _LOGGER.debug("paho: %s", buf)

    @property
    def _subscriptions(self) -> tuple[str, ...]:
        return (*self.topics.command_filters, self.topics.desired_filter)

    def _on_subscribe(self, reason_codes: list) -> None:
        for f, rc in zip(self._subscriptions, reason_codes):
            if rc.is_failure:
                _LOGGER.warning("MQTT: the broker refused the subscription to %s (%s); commands there "
                                "will not arrive (check the broker ACL)", f, rc)

    def _on_publish(self, session: _Session, mid: int, rc: Any) -> None:
        self._acks.append((session.gen, mid, bool(getattr(rc, "is_failure", False))))
        self._wake.set()

    # --- outbox ----------------------------------------------------------------------------

    def _store_handoff(self, online: bool) -> None:
        with self._handoff_lock:
            items = list(self._handoff)
            self._handoff.clear()
            overflow, self._handoff_overflow = self._handoff_overflow, 0
        if overflow:
            _LOGGER.warning("MQTT: %d event(s) dropped: the outbox could not keep up", overflow)
            self._outbox.count_dropped(overflow)
        if not online:
            # A partial transcript is stale once the final one exists; not worth keeping offline.
            kept = [i for i in items if not i[2]]
            self._counters.partials_skipped += len(items) - len(kept)
            items = kept
        if not items:
            return
        try:
            # Partials too go at QoS 1: brokers deliver QoS 0 past queued QoS 1 messages, which
            # would put a partial transcript after the final one.
            dropped = self._outbox.add([(topic, payload, 1) for topic, payload, _ in items])
        except sqlite3.Error as err:
            _LOGGER.error("MQTT outbox %s: cannot store %d event(s): %s", self._outbox.path, len(items), err)
            self._outbox.count_dropped(len(items))
            return
        if dropped:
            _LOGGER.warning("MQTT outbox full (%d): dropped the %d oldest event(s)", self._outbox.max_rows, dropped)

    def _run_outbox(self) -> None:
        inflight: dict[int, int] = {}  # paho mid -> outbox row id, for the current session only
        gen = 0
        last_sent = 0
        interval = self.cfg.metrics_interval_s
        next_metrics = math.inf
        while True:
            try:
                until = next_metrics if self._flush_until is None else min(next_metrics, self._flush_until)
                self._wake.wait(min(1.0, max(0.0, until - time.monotonic())))
                self._wake.clear()
                session = self._session
                self._store_handoff(session is not None)
                acked: list[int] = []
                while self._acks:
                    ack_gen, mid, failed = self._acks.popleft()
                    row = inflight.pop(mid, None) if ack_gen == gen else None
                    if row is None:
                        continue  # status, answers, metrics; or a previous connection's
                    acked.append(row)
                    if failed:
                        if not self._counters.rejected:
                            _LOGGER.warning("MQTT: the broker refused an event (PUBACK error); check that "
                                            "its ACL lets this device write %s/#", self.topics.base)
                        self._counters.rejected += 1
                if acked:
                    self._outbox.remove(acked)
                    self._counters.published += len(acked)
                current = session.gen if session is not None else 0
                if current != gen:
                    # New connection: everything still in the outbox goes again, oldest first.
                    inflight.clear()
                    gen, last_sent = current, 0
                    next_metrics = time.monotonic() if session is not None else math.inf
                if session is not None:
                    if self._status_dirty:
                        self._publish_status(session.client)
                    last_sent = self._send_pending(session, inflight, last_sent)
                    if time.monotonic() >= next_metrics:
                        session.client.publish(self.topics.metrics, self._metrics_payload(), qos=0)
                        next_metrics = time.monotonic() + interval
                if self._flush_until is not None:
                    with self._handoff_lock:
                        handoff_empty = not self._handoff
                    if handoff_empty and (self._outbox.depth == 0 or self._session is None
                                          or time.monotonic() >= self._flush_until):
                        return
            except Exception:  # keep serving; the outbox rows are safe on disk
                _LOGGER.exception("MQTT outbox loop error")
                time.sleep(1.0)

    def _send_pending(self, session: _Session, inflight: dict[int, int], last_sent: int) -> int:
        room = session.window - len(inflight)
        if room <= 0:
            return last_sent
        bad: list[int] = []
        for row in self._outbox.pending(last_sent, room):
            try:
                info = session.client.publish(row.topic, row.payload, qos=row.qos)
            except ValueError as err:  # cannot ever be sent (e.g. over the broker's size)
                _LOGGER.error("MQTT: dropping outbox message %d for %s: %s", row.id, row.topic, err)
                bad.append(row.id)
                last_sent = row.id
                continue
            if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
                break  # the connection is going away; the next one starts over
            inflight[info.mid] = row.id
            last_sent = row.id
        if bad:
            self._outbox.remove(bad)
            self._outbox.count_dropped(len(bad))
        return last_sent

    # --- commands -----------------------------------------------------------------------

    def _on_message(self, session: _Session, msg: Any) -> None:
        desired = self.topics.desired_name(msg.topic)
        if desired is not None:
            self._dispatcher.submit_desired(desired, bytes(msg.payload))
            return
        props = getattr(msg, "properties", None)
        self._dispatcher.submit(msg.topic, bytes(msg.payload), retained=bool(msg.retain),
                                response_topic=getattr(props, "ResponseTopic", None),
                                correlation=getattr(props, "CorrelationData", None))

    def _publish_answer(self, topic: str, body: bytes, correlation: bytes | None) -> None:
        session = self._session
        if session is None:
            _LOGGER.debug("MQTT: not connected; answer for %s dropped", topic[:200])
            return
        props = None
        if correlation is not None and self.cfg.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        try:
            session.client.publish(topic, body, qos=1, properties=props)
        except ValueError as err:
            _LOGGER.warning("MQTT: cannot answer on %s: %s", topic[:200], err)
