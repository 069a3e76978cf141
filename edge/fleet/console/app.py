"""The console process: MQTT in, the model, the page stream and the HTTP server, started and
stopped in order.

Start: connect (the first connection in the foreground, so a wrong broker option is one line),
subscribe to ``<prefix>/+/status`` and ``<prefix>/+/event/#``, wait until the retained
statuses are in, connect the command connection, then listen for pages. A ticker sends the
pages the server's clock and counters every ``TICK_S``. Stop: the HTTP server, the pages'
streams, then the MQTT connections.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

from edge.fleet.client import FleetClient, Message
from edge.fleet.config import FleetConfig
from edge.fleet.console.auth import Auth, User
from edge.fleet.console.commands import ACTIONS, Commander
from edge.fleet.console.model import FleetModel
from edge.fleet.console.server import ConsoleHTTPServer
from edge.fleet.console.stream import Hub
from edge.fleet.errors import BrokerError

_LOGGER = logging.getLogger(__name__)

MAX_PAYLOAD = 64 * 1024  # a status or event larger than this is not a device's (ignored, counted)
TICK_S = 5.0


class Console:
    def __init__(self, cfg: FleetConfig, auth: Auth, *, command_timeout_s: float = 8.0,
                 secure_cookie: bool = False) -> None:
        self.cfg = cfg
        self.auth = auth
        self.secure_cookie = secure_cookie
        self.hub = Hub()
        self.model = FleetModel(self.hub.publish)
        self.client = FleetClient(cfg, role="console")
        self.commander = Commander(cfg, self.model.statuses, timeout_s=command_timeout_s)
        self.info: dict[str, Any] = {"prefix": cfg.prefix, "broker": f"{cfg.host}:{cfg.port}",
                                     "actions": list(ACTIONS)}
        self.oversized = 0
        self.http: ConsoleHTTPServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()
        self._last_tick = (time.monotonic(), 0)

    # -- MQTT ------------------------------------------------------------------------------
    def connect(self) -> None:
        topics = self.client.topics
        self.client.set_handler(self._on_message)
        self.client.connect()
        try:
            self.client.subscribe([topics.status(), topics.events()])
            if not self.client.sync(15.0):
                raise BrokerError(f"the MQTT broker at {self.client.where} did not deliver the device statuses "
                                  "within 15 s; try again")
            self.commander.connect()
        except BaseException:
            self.client.close()
            raise

    def _on_message(self, msg: Message) -> None:
        topics = self.client.topics
        device = topics.device_of(msg.topic)
        if device is None:
            return
        if len(msg.payload) > MAX_PAYLOAD:
            self.oversized += 1
            return
        rest = msg.topic[len(topics.prefix) + len(device) + 2:]
        if rest == "status":
            self.model.on_status(device, msg.payload)
        elif rest.startswith("event/"):
            self.model.on_event(device, rest[len("event/"):], msg.payload)

    # -- pages -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The model's snapshot and who we are; call with the model's lock held."""
        snap = self.model.snapshot()
        snap["fleet"] = self.info
        return snap

    def command(self, user: User, body: Any) -> dict[str, Any]:
        report = self.commander.run(body)
        devices = [d["device_id"] for d in report["devices"]]
        _LOGGER.info("console: %s sent %s to %s: %s", user.name, report["command"],
                     ", ".join(devices[:5]) + (", ..." if len(devices) > 5 else ""), report["summary"])
        first = report["devices"][0] if len(report["devices"]) == 1 else None
        if first is not None:
            rt = first["round_trip_ms"]
            line = f"{user.name} sent {report['command']}: {first['outcome']}" + (f" in {rt:.0f} ms" if rt else "")
        else:
            line = f"{user.name} sent {report['summary']}"
        self.model.note("command", first["device_id"] if first else None, line, command=report["command"],
                        ok=report["ok"])
        report["user"] = user.name
        return report

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            with self.model.lock:
                events = self.model.counters["events"]
                last_t, last_n = self._last_tick
                self._last_tick = (now, events)
                rate = round((events - last_n) / max(0.001, now - last_t), 1)
                self.model.publish("tick", {"now": time.time(), "events_per_s": rate,
                                            "counters": dict(self.model.counters), "pages": self.hub.stats(),
                                            "connected": self.client.connected})

    # -- running ---------------------------------------------------------------------------
    def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Listen and serve on threads of their own; the address actually bound."""
        self.http = ConsoleHTTPServer((host, port), self, tls)
        for name, target in (("console-http", self.http.serve_forever), ("console-tick", self._tick)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        bound = self.http.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        self._stop.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.hub.close_all()
        for t in self._threads:
            t.join(5.0)
        self.commander.close()
        self.client.close()
