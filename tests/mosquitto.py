"""Test helpers: a real Mosquitto broker on a free loopback port, certificates made with the
openssl CLI, and a recording MQTT client (``Probe``).

The broker runs in the foreground under its own config, pid file, password file and ACL,
and is stopped by its PID. Nothing here is shared between tests: each gets its own broker.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from procs import stop_process

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"


def require_mosquitto() -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str) -> Cert:
    """A self-signed CA (EC P-256, valid two days)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Cert(crt, key)


def make_cert(directory: Path, name: str, ca: Cert, *, server: bool) -> Cert:
    """A leaf certificate signed by ``ca``: for 127.0.0.1 (server) or a client named ``name``."""
    key, csr, crt = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n" if server
                   else "extendedKeyUsage=clientAuth\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial",
             str(uuid.uuid4().int >> 64), "-out", crt, "-days", "2", "-extfile", ext)
    return Cert(crt, key)


@dataclass
class Mosquitto:
    """One broker. ``passwords`` enables a password file; ``acl`` is the ACL file's text;
    ``tls`` (CA, server cert) turns the listener into TLS, requiring client certificates
    when ``require_certificate``. ``persistence`` keeps sessions across restart()."""

    workdir: Path
    port: int = 0
    allow_anonymous: bool = True
    passwords: dict[str, str] | None = None
    acl: str | None = None
    tls: tuple[Cert, Cert] | None = None
    require_certificate: bool = False
    persistence: bool = False
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen | None = field(default=None, init=False)
    _fixed_port: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        require_mosquitto()
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = bool(self.port)
        if not self.port:
            self.port = free_port()

    @property
    def host(self) -> str:
        return HOST

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        lines = [f"listener {self.port} {HOST}", f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
                 f"pid_file {self.workdir / 'mosquitto.pid'}", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true",
                 # Without it the broker's small packets wait ~40 ms for delayed ACKs (Nagle).
                 "set_tcp_nodelay true",
                 # The default (1000) silently drops QoS 1 messages for a slow test subscriber.
                 "max_queued_messages 100000"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', which cannot read our files
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        if self.passwords is not None:
            pw = self.workdir / "passwd"
            pw.unlink(missing_ok=True)
            for i, (user, password) in enumerate(self.passwords.items()):
                subprocess.run([MOSQUITTO_PASSWD, "-b", *(["-c"] if i == 0 else []), str(pw), user, password],
                               check=True, capture_output=True, timeout=30)
            lines.append(f"password_file {pw}")
        if self.acl is not None:
            acl = self.workdir / "acl"
            acl.write_text(self.acl)
            lines.append(f"acl_file {acl}")
        if self.tls is not None:
            ca, server = self.tls
            lines += [f"cafile {ca.cert}", f"certfile {server.cert}", f"keyfile {server.key}",
                      f"require_certificate {'true' if self.require_certificate else 'false'}"]
        lines += list(self.extra)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> Mosquitto:
        for _attempt in range(5):
            conf = self._write_config()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection((HOST, self.port), timeout=0.5):
                        return self
                except OSError:
                    time.sleep(0.05)
            else:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s:\n{self.log()}")
            if "Address already in use" in self.log() and not self._fixed_port:
                self.port = free_port()  # another process took the port between pick and bind
                continue
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
        raise RuntimeError(f"mosquitto could not bind a port:\n{self.log()}")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout)

    def restart(self) -> None:
        self.stop()
        self._fixed_port = True
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    correlation: bytes | None = None

    def json(self) -> Any:
        return json.loads(self.payload)


class Probe:
    """A paho client in the test process that records every message it receives."""

    def __init__(self, broker: Mosquitto, *, protocol: str = "5", client_id: str | None = None,
                 username: str | None = None, password: str | None = None, tls: tuple[Cert, Cert | None] | None = None,
                 persistent: bool = False) -> None:
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.broker = broker
        self.v5 = protocol == "5"
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else not persistent)
        self.persistent = persistent
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            ca, cert = tls
            self.client.tls_set(ca_certs=str(ca.cert), certfile=str(cert.cert) if cert else None,
                                keyfile=str(cert.key) if cert else None)
        self.messages: list[Message] = []
        self.subscribed: set[str] = set()
        self.subacks: dict[int, list[Any]] = {}
        self._cond = threading.Condition()
        self.connected = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda c, u, f, rc, p: self.connected.clear()
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(0.1, 0.5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, corr))
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: list, props: Any) -> None:
        with self._cond:
            self.subacks[mid] = rcs
            self._cond.notify_all()

    def connect(self, timeout: float = 10.0) -> Probe:
        if self.v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if self.persistent else 0
            self.client.connect(self.broker.host, self.broker.port, 30, clean_start=not self.persistent,
                                properties=props)
        else:
            self.client.connect(self.broker.host, self.broker.port, 30)
        sock = self.client.socket()
        if sock is not None:  # answers in microseconds, not after a 40 ms delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"probe {self.client_id} did not connect")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[Any]:
        _rc, mid = self.client.subscribe(topic, qos)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self.subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topic}")
            self.subscribed.add(topic)
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes | str | dict, qos: int = 1, *, retain: bool = False,
                response_topic: str | None = None, correlation: bytes | None = None, timeout: float = 5.0) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if self.v5 and (response_topic or correlation is not None):
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos:
            info.wait_for_publish(timeout)

    def wait_for(self, pred: Callable[[list[Message]], Any], timeout: float = 10.0, what: str = "") -> Any:
        with self._cond:
            result = self._cond.wait_for(lambda: pred(self.messages), timeout)
        if not result:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}; got "
                                 f"{[(m.topic, m.payload[:120]) for m in self.messages[-10:]]}")
        return result

    def on_topic(self, topic: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def request(self, topic: str, payload: bytes | str | dict, *, timeout: float = 10.0,
                response_topic: str | None = None) -> dict:
        """Send a v5 command with a fresh correlation id; return the matching answer."""
        corr = uuid.uuid4().bytes
        rt = response_topic or f"fleet/answers/{self.client_id}"
        if rt not in self.subscribed:
            self.subscribe(rt)
        self.publish(topic, payload, response_topic=rt, correlation=corr)
        msg = self.wait_for(lambda ms: next((m for m in ms if m.correlation == corr and m.topic == rt), None),
                            timeout, f"answer to {topic}")
        return msg.json()

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
