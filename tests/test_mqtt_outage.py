"""The broker goes away for 30 s while the daemon produces 200 events; after it comes back,
all 200 arrive, once each by message id, in order.

The fleet subscriber keeps a persistent session (and the broker persists it across the
restart), as a fleet server would: otherwise whichever of daemon and subscriber reconnects
first decides whether the replayed events have anyone to go to.
"""

from __future__ import annotations

import time
from pathlib import Path

from mosquitto import Mosquitto, Probe
from mqtt_daemon import DaemonProcess, write_config

DEV = "dev1"
OUTAGE_S = 30.0
EVENTS = 200


def test_200_events_survive_a_30_s_broker_outage(tmp_path: Path) -> None:
    t_start = time.monotonic()
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    fleet = Probe(broker, client_id="fleet-server", persistent=True)
    daemon = DaemonProcess(write_config(tmp_path / "edge.toml", device_id=DEV, state_dir=tmp_path / "state",
                                        port=broker.port), tmp_path / "daemon.log")
    try:
        fleet.connect()
        fleet.subscribe(f"edge/{DEV}/event/#", qos=1)
        fleet.subscribe(f"edge/{DEV}/status", qos=1)
        daemon.start()
        fleet.wait_for(lambda ms: any(m.topic.endswith("/status") and m.json()["state"] == "online" for m in ms),
                       20, "daemon online")

        broker.stop()
        down_at = time.monotonic()
        daemon.send(f"emit {EVENTS} {OUTAGE_S * 0.95 / EVENTS:.4f}")  # spread over the outage
        daemon.wait_line(lambda d: d.get("emitted") == EVENTS, OUTAGE_S + 30, "events emitted")
        assert daemon.depth() == EVENTS  # all on disk, none sent
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        broker.start()
        up_at = time.monotonic()

        def unique(ms: list) -> list[dict]:
            seen: dict[str, dict] = {}
            for m in ms:
                if "/event/" in m.topic:
                    body = m.json()
                    seen.setdefault(body["message_id"], body)
            return list(seen.values())

        fleet.wait_for(lambda ms: len(unique(ms)) >= EVENTS, 60, f"{EVENTS} events after the outage")
        recovered_s = time.monotonic() - up_at
        with fleet._cond:
            delivered = [m for m in fleet.messages if "/event/" in m.topic]
        bodies = unique(delivered)
        assert [b["n"] for b in bodies] == list(range(EVENTS))
        assert [b["seq"] for b in bodies] == list(range(1, EVENTS + 1))
        deadline = time.monotonic() + 10
        while daemon.depth() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.depth() == 0
        print(f"\noutage {up_at - down_at:.1f} s; {EVENTS} events delivered {recovered_s:.2f} s after the broker "
              f"returned ({len(delivered) - EVENTS} duplicates); test took {time.monotonic() - t_start:.1f} s")
    finally:
        fleet.close()
        daemon.stop()
        broker.stop()
