"""Is the daemon online? Wait until a device's own retained MQTT status says so.

``edge-voice check --config FILE --mqtt-online-since EPOCH`` runs :func:`wait_online`:
provisioning asks it of the device's installed edge-voice after (re)starting the service. It
connects with the config's broker, credentials and TLS settings, under a client id the broker
assigns (so the running daemon, which holds its own id, is never disconnected), subscribes to
``<prefix>/<id>/status`` and waits until a status says ``online`` with ``started`` at or after
``since``: the daemon that was just started, not a retained message left by the one before it.
A few seconds of slack allow for the clock moving between the start and the daemon's first
reading of it. ``since`` 0 takes any online status.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from edge.config import Config
from edge.errors import ConfigError, MissingDependency
from edge.mqtt.security import read_password, tls_context
from edge.mqtt.topics import Topics

SLACK_S = 5.0  # a status whose `started` is this much before `since` still counts
DEFAULT_TIMEOUT_S = 60.0
_RETRY_S = 1.0  # between connection attempts while the broker cannot be reached


@dataclass(frozen=True)
class OnlineResult:
    """What the wait found: ``online``, else the last state seen or why it could not ask."""

    topic: str
    online: bool
    state: str | None = None  # the last status's state; None: no status was received
    started: float | None = None  # the last status's `started` (the daemon's start, epoch seconds)
    since: float = 0.0
    waited_s: float = 0.0
    error: str | None = None  # the broker could not be asked: why

    def line(self, timeout: float) -> str:
        """One line for people: what was seen, or what went wrong."""
        if self.online:
            return f"{self.topic}: online (started {_when(self.started)})"
        if self.error:
            return f"{self.topic}: {self.error}"
        if self.state == "online" and self.started is not None:
            last = f"online, but started {_when(self.started)}, before {_when(self.since)}: a status left by an " \
                   "earlier start"
        else:
            last = self.state or "nothing received"
        return f"{self.topic} did not say online within {timeout:g} s (last state: {last})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _when(epoch: float | None) -> str:
    if not epoch:
        return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise MissingDependency.for_module("paho-mqtt", "mqtt") from None
    return mqtt


class _Watch:
    """The paho callbacks' shared state."""

    def __init__(self, topic: str, since: float) -> None:
        self.topic, self.since = topic, since
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.online = False
        self.state: str | None = None
        self.started: float | None = None
        self.refused: str | None = None

    def on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            with self.lock:
                if rc.value in (0x86, 0x87, 4, 5):  # bad user name or password / not authorized
                    self.refused = f"the broker refused the login ({rc}): check mqtt.username and the password"
                else:
                    self.refused = f"the broker refused the connection ({rc})"
            self.done.set()
            return
        client.subscribe(self.topic, qos=1)

    def on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: list, props: Any) -> None:
        if rcs and all(getattr(rc, "is_failure", False) for rc in rcs):
            with self.lock:
                self.refused = f"the broker refused the subscription to {self.topic} ({rcs[0]}): check its ACL"
            self.done.set()

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        state = body.get("state")
        try:
            started = float(body.get("started") or 0.0) or None
        except (TypeError, ValueError):
            started = None
        with self.lock:
            self.state = state if isinstance(state, str) else None
            self.started = started
            if self.state == "online" and (self.since <= 0 or (started or 0.0) >= self.since - SLACK_S):
                self.online = True
        if self.online:
            self.done.set()


def _connect(client: Any, cfg: Config) -> str | None:
    """Open the connection and send CONNECT; the failure in words, or None."""
    m = cfg.mqtt
    try:
        if m.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
            client.connect(m.host, m.port, m.keepalive_s, clean_start=True, properties=props)
        else:
            client.connect(m.host, m.port, m.keepalive_s)
        return None
    except ssl.SSLCertVerificationError as err:
        return f"TLS: the broker's certificate is not trusted ({err.verify_message}): check mqtt.ca_file"
    except ssl.SSLError as err:
        return f"TLS handshake failed ({err.reason or err})"
    except ConnectionRefusedError:
        return f"connection to {m.host}:{m.port} refused (no broker listening on that port?)"
    except OSError as err:
        return f"cannot reach {m.host}:{m.port}: {err.strerror or err}"
    except ValueError as err:  # paho's own checks (e.g. a bad host string)
        return str(err)


def wait_online(cfg: Config, since: float, timeout: float = DEFAULT_TIMEOUT_S) -> OnlineResult:
    """Wait up to ``timeout`` seconds until ``cfg``'s device status says online, started at or
    after ``since`` (epoch seconds; 0: any online status). Never raises for a broker problem:
    the result says what went wrong. ConfigError for a config that cannot connect at all."""
    m = cfg.mqtt
    topic = Topics(m.prefix, cfg.device_id).status
    if not m.enabled:
        raise ConfigError(f"mqtt.enabled is false in {cfg.source}: the daemon publishes no status to wait for")
    mqtt = _paho()
    password = read_password(m)
    tls = tls_context(m)
    t0 = time.monotonic()
    deadline = t0 + max(0.0, timeout)
    watch = _Watch(topic, since)

    def result(error: str | None = None) -> OnlineResult:
        with watch.lock:
            return OnlineResult(topic, watch.online, watch.state, watch.started, since,
                                round(time.monotonic() - t0, 3), None if watch.online else error or watch.refused)

    last_error: str | None = None
    while True:
        v5 = m.protocol == "5"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="",
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=False)
        if m.username:
            client.username_pw_set(m.username, password or None)
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = watch.on_connect
        client.on_subscribe = watch.on_subscribe
        client.on_message = watch.on_message
        last_error = _connect(client, cfg)
        if last_error is None:
            break
        if time.monotonic() + _RETRY_S >= deadline:
            return result(f"cannot ask the broker: {last_error}")
        time.sleep(_RETRY_S)
    client.loop_start()
    try:
        watch.done.wait(max(0.0, deadline - time.monotonic()))
    finally:
        try:
            client.disconnect()
        finally:
            client.loop_stop()
    return result()


def run_probe(cfg: Config, since: float, timeout: float | None, as_json: bool, out: TextIO = sys.stdout) -> int:
    """``edge-voice check --mqtt-online-since``: 0 when online, 1 with one line (or the JSON
    object, with ``as_json``) otherwise."""
    wait = DEFAULT_TIMEOUT_S if timeout is None else timeout
    res = wait_online(cfg, since, wait)
    if as_json:
        print(json.dumps(dict(res.as_dict(), line=res.line(wait)), sort_keys=True), file=out)
    elif res.online:
        print(res.line(wait), file=out)
    else:
        print(f"edge-voice: {res.line(wait)}", file=sys.stderr)
    return 0 if res.online else 1
