"""Commands from the page: only the usual actions, checked with the device's own schemas, sent
with ``fleet cmd``'s request/response on a connection of their own.

``edge.fleet.cmd``'s ``Requester`` takes over its client's message handler while it waits for
answers, so commands get their own MQTT connection and go one at a time (a page's command
waits at most ``timeout_s`` for the one before it). An offline device is not sent to (its
status says so) and its result says ``offline``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from edge.fleet.config import FleetConfig
from edge.fleet.console import ConsoleError
from edge.fleet.status import DeviceStatus, select

#: What the page may send. ``set``, ``ask``, ``status`` and ``handset`` stay with ``fleet cmd``.
ACTIONS = ("say", "mute", "unmute", "volume", "listen", "cancel", "reload-models")
MAX_TARGETS = 1000


def check_request(body: Any, statuses: Mapping[str, DeviceStatus]) -> tuple[str, dict[str, Any], list[str]]:
    """``{"command": NAME, "args": {...}, "devices": [ID, ...]}`` as (name, payload, targets);
    ConsoleError (or the fleet's own FleetError) naming the mistake."""
    from edge.fleet.cmd import build_payload

    if not isinstance(body, dict):
        raise ConsoleError("expected a JSON object with command, args and devices", code="console.request")
    unknown = sorted(set(body) - {"command", "args", "devices"})
    if unknown:
        raise ConsoleError(f"unknown field {unknown[0][:40]!r} (fields: command, args, devices)",
                           code="console.request")
    name = body.get("command")
    if not isinstance(name, str) or name not in ACTIONS:
        shown = repr(name[:40]) if isinstance(name, str) else "missing"
        raise ConsoleError(f"command {shown} is not one the console sends (allowed: {', '.join(ACTIONS)})",
                           code="console.forbidden")
    args = body.get("args", {})
    if not isinstance(args, dict):
        raise ConsoleError("args must be a JSON object", code="console.request")
    devices = body.get("devices")
    if (not isinstance(devices, list) or not devices or len(devices) > MAX_TARGETS
            or not all(isinstance(d, str) and len(d) <= 64 for d in devices)):
        raise ConsoleError(f"devices must be a list of 1 to {MAX_TARGETS} device ids", code="console.request")
    payload = build_payload(name, (), json.dumps(args))
    targets = select(statuses, devices=devices)
    return name, payload, targets


class Commander:
    def __init__(self, cfg: FleetConfig, statuses: Callable[[], dict[str, DeviceStatus]], *,
                 timeout_s: float = 8.0) -> None:
        from edge.fleet.client import FleetClient

        if cfg.client_id:  # the console's main connection has that id; this one must differ
            cfg = dataclasses.replace(cfg, client_id=f"{cfg.client_id[:100]}-cmd")
        self.client = FleetClient(cfg, role="console-cmd")
        self._statuses = statuses
        self.timeout_s = timeout_s
        self._one_at_a_time = threading.Lock()

    def connect(self) -> None:
        self.client.connect()

    def run(self, body: Any) -> dict[str, Any]:
        """Check and send one command; the report (``fleet cmd --json``'s) with a summary line."""
        from edge.fleet.cmd import run_command

        statuses = self._statuses()
        name, payload, targets = check_request(body, statuses)
        if not self._one_at_a_time.acquire(timeout=self.timeout_s + 2.0):
            raise ConsoleError("another command is still waiting for its answers; try again",
                               code="console.busy")
        try:
            report = run_command(self.client, statuses, targets, name, payload, timeout_s=self.timeout_s,
                                 expiry_s=self.timeout_s)
        finally:
            self._one_at_a_time.release()
        out = report.as_json()
        out["summary"] = report.summary()
        out["args"] = payload
        return out

    def close(self) -> None:
        self.client.close()
