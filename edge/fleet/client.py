"""One MQTT v5 connection for the fleet commands (paho), with one-line errors.

The first connection is made in the foreground, so a wrong host, a refused login or a bad
certificate ends the command with a message naming the option to fix. After that paho
reconnects by itself (``tail`` and ``record`` outlive a broker restart) and the client
subscribes again. ``sync()`` waits until everything the broker had queued for us before it
(the retained statuses, say) has arrived: a marker published to ourselves comes back last.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge.errors import MissingDependency
from edge.fleet.config import FleetConfig, option_name
from edge.fleet.errors import BrokerError
from edge.mqtt.security import read_password, tls_context
from edge.mqtt.topics import FleetTopics

_LOGGER = logging.getLogger(__name__)

_LOGIN_REFUSED = (0x86, 0x87, 4, 5)  # bad user name or password / not authorized (v5, v3)
_SESSION_TAKEN_OVER = 0x8E


def paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise MissingDependency.for_module("paho-mqtt", "mqtt") from None
    return mqtt


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    gen: int  # which connection it came on: acknowledgements of an earlier one are not sent
    correlation: bytes | None = None


Handler = Callable[[Message], None]


class FleetClient:
    """``persistent``: the broker keeps the session (subscriptions, queued QoS 1 messages) for
    ``session_expiry_s`` while we are away; ``manual_ack``: messages are acknowledged by
    ``ack()`` (after they are stored), not on arrival."""

    def __init__(self, cfg: FleetConfig, *, role: str = "fleet", handler: Handler | None = None,
                 persistent: bool = False, session_expiry_s: int = 0, manual_ack: bool = False,
                 receive_maximum: int | None = None) -> None:
        self.cfg = cfg
        self.topics = FleetTopics(cfg.prefix)
        self.client_id = cfg.client_id_for(role)
        self._handler = handler
        self._persistent = persistent
        self._session_expiry = session_expiry_s if persistent else 0
        self._receive_maximum = receive_maximum
        self._manual_ack = manual_ack
        mcfg = cfg.mqtt()
        self._password = read_password(mcfg, option_name)
        self._tls = tls_context(mcfg, option_name)
        mqtt = paho()
        self._mqtt = mqtt
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        if cfg.username:
            self._client.username_pw_set(cfg.username, self._password or None)
        elif self._password:
            raise BrokerError("a broker password is set without --username: give both")
        if self._tls is not None:
            self._client.tls_set_context(self._tls)
        # Back before the devices (they wait at least 0.5 s): a broker that restarts has forgotten
        # shared subscriptions (Mosquitto 2.0), and an event with no subscriber yet is dropped.
        self._client.reconnect_delay_set(0.1, 5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_log = self._on_log
        self._cond = threading.Condition()
        self._first = threading.Event()
        self._first_error: str | None = None
        self._socket_error = ""
        self._subscriptions: list[str] = []
        self._subacks: dict[int, list[Any]] = {}
        self._markers: set[str] = set()
        self._marker_topic = self.topics.marker(self._topic_safe(self.client_id))
        self.gen = 0
        self.connected = False
        self.fatal: str | None = None  # set when the broker ends us for good (session taken over)
        self._fatal_hooks: list[Callable[[], None]] = []
        self.reconnects = 0
        self._closed = False

    @staticmethod
    def _topic_safe(client_id: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in client_id)[:64] or "fleet"

    @property
    def safe_id(self) -> str:
        """The client id as one topic level (for answer and marker topics)."""
        return self._topic_safe(self.client_id)

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    # -- connecting -----------------------------------------------------------------------
    def connect(self) -> FleetClient:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        if self._receive_maximum:
            props.ReceiveMaximum = self._receive_maximum
        cfg = self.cfg
        try:
            self._client.connect(cfg.host, cfg.port, cfg.keepalive_s,
                                 clean_start=not self._persistent, properties=props)
        except ssl.SSLCertVerificationError as err:
            raise BrokerError(f"TLS: the certificate of the MQTT broker at {self.where} is not trusted "
                              f"({err.verify_message}); check --ca-file and that --host is a name the "
                              "certificate is issued for") from None
        except ssl.SSLError as err:
            raise BrokerError(f"TLS handshake with the MQTT broker at {self.where} failed "
                              f"({err.reason or err}); {self._cert_hint()}") from None
        except ConnectionRefusedError:
            raise BrokerError(f"cannot reach the MQTT broker at {self.where}: connection refused; is the "
                              "broker running, and are --host and --port right?") from None
        except socket.gaierror as err:
            raise BrokerError(f"cannot resolve the broker host {cfg.host!r} ({err.strerror}); check --host") from None
        except TimeoutError:
            raise BrokerError(f"timed out connecting to the MQTT broker at {self.where}; check --host, "
                              "--port and the firewall") from None
        except OSError as err:
            raise BrokerError(f"cannot reach the MQTT broker at {self.where}: {err.strerror or err}; "
                              "check --host and --port") from None
        except ValueError as err:
            raise BrokerError(f"cannot connect to the MQTT broker at {self.where}: {err}") from None
        sock = self._client.socket()
        if sock is not None:  # small packets go at once, not after a delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client.loop_start()
        if not self._first.wait(cfg.connect_timeout_s):
            self.close()
            raise BrokerError(f"the MQTT broker at {self.where} did not answer the connection within "
                              f"{cfg.connect_timeout_s:g} s; check that --port is an MQTT port "
                              f"(TLS: {'on' if self._tls else 'off'}, --tls)")
        if self._first_error is not None:
            self.close()
            raise BrokerError(self._first_error)
        self.subscribe([self._marker_topic])
        return self

    def _cert_hint(self) -> str:
        if self.cfg.cert_file:
            return "check that --cert-file/--key-file are signed by a CA the broker trusts"
        return "check whether the broker requires a client certificate (--cert-file/--key-file)"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            if self._first_error is not None:
                return  # refused the first time: connect() is closing this client
            if rc.value in _LOGIN_REFUSED:
                why = (f"the MQTT broker at {self.where} refused the login ({rc}); check --username and "
                       "--password-file")
            else:
                why = f"the MQTT broker at {self.where} refused the connection ({rc})"
            if not self._first.is_set():
                self._first_error = why
                self._first.set()
            else:
                _LOGGER.warning("%s; retrying", why)
            return
        with self._cond:
            self.gen += 1
            self.connected = True
            subs = list(self._subscriptions)
        if self._first.is_set():
            self.reconnects += 1
            _LOGGER.info("MQTT: reconnected to %s (session %s)", self.where,
                         "resumed" if getattr(flags, "session_present", False) else "new")
        if subs:  # a clean session has none left; a kept one has them already (harmless)
            client.subscribe([(f, 1) for f in subs])
        self._first.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.connected = False
            self._cond.notify_all()
        if self._first_error is not None:
            return  # the first connection was refused: connect() says so, once, and closes
        if not self._first.is_set():
            if self._tls is not None:
                self._first_error = (f"the MQTT broker at {self.where} closed the TLS connection before "
                                     f"accepting it ({self._socket_error or rc}); {self._cert_hint()}")
            else:
                self._first_error = (f"the MQTT broker at {self.where} closed the connection before "
                                     f"accepting it ({self._socket_error or rc})")
            self._first.set()
            return
        if getattr(rc, "value", None) == _SESSION_TAKEN_OVER:
            self.fatal = (f"another client connected to {self.where} with the client id {self.client_id!r} "
                          "and took over this one's session; give each consumer its own --client-id")
            self._client.disconnect()  # no reconnect fight
            for hook in list(self._fatal_hooks):
                hook()
        elif not self._closed:
            _LOGGER.warning("MQTT: lost the broker at %s (%s); reconnecting", self.where, rc)

    def _on_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        if level == self._mqtt.MQTT_LOG_ERR:
            self._socket_error = buf

    # -- subscriptions --------------------------------------------------------------------
    def subscribe(self, filters: list[str], timeout: float = 10.0) -> None:
        """Subscribe at QoS 1 and wait for the broker's answer; a refusal is an error."""
        with self._cond:
            for f in filters:
                if f not in self._subscriptions:
                    self._subscriptions.append(f)
        rc, mid = self._client.subscribe([(f, 1) for f in filters])
        if rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"lost the MQTT broker at {self.where} while subscribing; try again")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise BrokerError(f"the MQTT broker at {self.where} did not confirm the subscription to "
                                  f"{filters[0]} within {timeout:g} s")
            codes = self._subacks.pop(mid)
        for f, code in zip(filters, codes):
            if code.is_failure:
                user = f"user {self.cfg.username!r}" if self.cfg.username else "anonymous clients"
                raise BrokerError(f"the MQTT broker at {self.where} refused the subscription to {f} ({code}); "
                                  f"check its ACL for {user}")

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: list, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = codes
            self._cond.notify_all()

    def sync(self, timeout: float = 10.0) -> bool:
        """True once a marker sent now has come back: what the broker queued before is in."""
        token = uuid.uuid4().hex
        self._client.publish(self._marker_topic, token.encode(), qos=1)
        with self._cond:
            ok = self._cond.wait_for(lambda: token in self._markers, timeout)
            self._markers.discard(token)
        return bool(ok)

    # -- messages -------------------------------------------------------------------------
    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == self._marker_topic:
            with self._cond:
                self._markers.add(bytes(msg.payload).decode("ascii", "replace"))
                self._cond.notify_all()
            if self._manual_ack and msg.qos:
                self._client.ack(msg.mid, msg.qos)
            return
        props = getattr(msg, "properties", None)
        m = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid, self.gen,
                    getattr(props, "CorrelationData", None) if props is not None else None)
        handler = self._handler
        if handler is None:
            return
        try:
            handler(m)
        except Exception:  # an exception escaping into paho would end its network thread
            _LOGGER.exception("fleet message handler failed on %s", msg.topic[:200])

    def on_fatal(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (on paho's thread) when the broker ends this client for good."""
        self._fatal_hooks.append(hook)

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message (manual_ack); one from an earlier connection is left for
        the broker to send again."""
        if message.qos and message.gen == self.gen and self.connected:
            self._client.ack(message.mid, message.qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation: bytes | None = None,
                expiry_s: int | None = None) -> Any:
        props = None
        if response_topic or correlation is not None or expiry_s:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry_s:
                props.MessageExpiryInterval = max(1, int(expiry_s))
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def close(self) -> None:
        self._closed = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
