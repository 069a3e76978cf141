"""What the device's retained status tells the fleet: tags, last turn, last error, the knowledge
slot and when it came online; kept up to date cheaply; and a bridge whose network thread dies
without a disconnect reconnects by itself. Real Mosquitto, the real bridge."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mosquitto import Mosquitto, Probe
from mqtt_daemon import RecordingController

from edge.config import MqttConfig
from edge.events import Event, EventType
from edge.mqtt import MqttBridge

DEV = "kiosk-3"
TAGS = ["site:paris", "lang:fr", "booth:phone"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


def _bridge(tmp_path: Path, broker: Mosquitto, **kw: Any) -> MqttBridge:
    cfg = MqttConfig(enabled=True, host=broker.host, port=broker.port, keepalive_s=5)
    b = MqttBridge(cfg, DEV, tmp_path / "state", RecordingController(), version="9.9", models={"llm": "m1"},
                   tags=TAGS, reconnect_min_s=0.1, reconnect_max_s=0.5, **kw)
    b.start()
    return b


def _wait(pred: Any, timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _status(p: Probe, pred: Any, what: str) -> dict:
    topic = f"edge/{DEV}/status"
    return p.wait_for(lambda ms: next((m.json() for m in reversed(ms) if m.topic == topic and pred(m.json())), None),
                      10, what)


def test_status_carries_tags_last_turn_last_error_and_a_knowledge_slot(tmp_path: Path, broker: Mosquitto) -> None:
    p = Probe(broker).connect()
    p.subscribe(f"edge/{DEV}/status")
    t0 = time.time()
    bridge = _bridge(tmp_path, broker)
    try:
        first = _status(p, lambda s: s["state"] == "online", "online")
        assert first["tags"] == sorted(TAGS) and first["knowledge"] is None
        assert first["last_turn"] is None and first["last_error"] is None
        assert t0 - 1 <= first["online_since"] <= time.time() and first["version"] == "9.9"

        bridge.publish_event(Event(EventType.TURN_END, {"outcome": "done", "trigger": "wake",
                                                        "timings_ms": {"end_of_speech_to_first_audio": 812.5}},
                                   turn_id="t1", session_id="s1", time=1_700_000_000.5))
        turn = _status(p, lambda s: s["last_turn"], "the last turn")["last_turn"]
        assert turn == {"time": 1_700_000_000.5, "turn_id": "t1", "outcome": "done", "trigger": "wake",
                        "first_audio_ms": 812.5}

        bridge.publish_event(Event(EventType.ERROR, {"code": "stage.error", "message": "x" * 1000}, turn_id="t2"))
        error = _status(p, lambda s: s["last_error"], "the last error")
        assert error["last_error"]["code"] == "stage.error" and len(error["last_error"]["message"]) == 300
        assert error["last_turn"]["turn_id"] == "t1"  # kept

        bridge.set_state("listening", detail="listening")
        listening = _status(p, lambda s: s["state"] == "listening", "listening")
        assert listening["tags"] == sorted(TAGS) and listening["last_error"]["code"] == "stage.error"
        assert listening["online_since"] == first["online_since"]

        bridge.set_knowledge({"name": "louvre", "version": "2024-06"})
        knowledge = _status(p, lambda s: s["knowledge"], "knowledge")["knowledge"]
        assert knowledge == {"name": "louvre", "version": "2024-06"}

        late = Probe(broker).connect()  # retained: what `fleet devices` reads
        late.subscribe(f"edge/{DEV}/status")
        kept = late.wait_for(lambda ms: ms and ms[0].json(), 10, "the retained status")
        assert kept["knowledge"]["name"] == "louvre" and kept["last_turn"]["outcome"] == "done"
        late.close()
    finally:
        bridge.stop(2.0)
    stopped = _status(p, lambda s: s["state"] == "offline", "offline")
    assert stopped["reason"] == "stopped" and stopped["tags"] == sorted(TAGS)
    assert stopped["online_since"] is None and stopped["last_turn"]["turn_id"] == "t1"
    p.close()


def test_the_last_will_carries_the_tags(tmp_path: Path, broker: Mosquitto) -> None:
    p = Probe(broker).connect()
    p.subscribe(f"edge/{DEV}/status")
    bridge = _bridge(tmp_path, broker)
    try:
        _status(p, lambda s: s["state"] == "online", "online")
        session = bridge._session
        assert session is not None
        session.client.socket().close()  # the connection dies without a DISCONNECT: the broker sends the will
        will = _status(p, lambda s: s["state"] == "offline", "the Last Will")
        assert will["reason"] == "connection lost" and will["tags"] == sorted(TAGS)
        _status(p, lambda s: s["state"] == "online", "back online")
    finally:
        bridge.stop(2.0)
        p.close()


def test_a_network_thread_that_ends_without_a_disconnect_is_noticed(tmp_path: Path, broker: Mosquitto,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import paho.mqtt.client as paho_client

    real_select = paho_client.select.select
    target: list[Any] = []
    failed = threading.Event()

    class Select:
        @staticmethod
        def select(r: list, w: list, x: list, timeout: float | None = None) -> Any:
            if target and target[0] in r and not failed.is_set():
                failed.set()
                raise ValueError("filedescriptor out of range in select()")  # what a descriptor > 1023 does
            return real_select(r, w, x, timeout)

    monkeypatch.setattr(paho_client, "select", Select)
    bridge = _bridge(tmp_path, broker)
    try:
        _wait(lambda: bridge.connected, what="connected")
        session = bridge._session
        assert session is not None
        target.append(session.client.socket())
        session.client.publish(f"edge/{DEV}/nudge", b"x")  # wakes paho's select()
        assert failed.wait(5), "the injected select() failure did not happen"
        # paho's thread is gone without on_disconnect; the bridge must still reconnect.
        _wait(lambda: bridge.bridge_info()["connects"] >= 2, 20, "a second connection")
        assert "network thread ended" in (bridge.bridge_info()["last_error"] or "") or bridge.connected
        bridge.publish_event(Event(EventType.WAKE, {"word": "hey"}))
        _wait(lambda: bridge.bridge_info()["published"] >= 1, 10, "an event after the reconnect")
    finally:
        bridge.stop(2.0)


def test_noting_turns_and_errors_keeps_publish_event_cheap(tmp_path: Path, broker: Mosquitto) -> None:
    p = Probe(broker).connect()
    p.subscribe(f"edge/{DEV}/event/#")
    bridge = _bridge(tmp_path, broker)
    events = [Event(EventType.TURN_END, {"outcome": "done", "trigger": "wake", "text": "where is the exit",
                                         "timings_ms": {"end_of_speech_to_first_audio": 700.0}}, turn_id="t"),
              Event(EventType.ERROR, {"code": "stage.error", "message": "boom"}, turn_id="t"),
              Event(EventType.TRANSCRIPT_FINAL, {"text": "what are the opening hours"}, turn_id="t")]
    costs: dict[str, list[int]] = {e.type.value: [] for e in events}
    try:
        _wait(lambda: bridge.connected, what="connected")
        for i in range(1500):
            e = events[i % 3]
            t0 = time.perf_counter_ns()
            bridge.publish_event(e)
            costs[e.type.value].append(time.perf_counter_ns() - t0)
            if i % 100 == 99:
                time.sleep(0.005)
        p.wait_for(lambda ms: len(ms) >= 1500, 60, "1500 events")
    finally:
        bridge.stop(2.0)
        p.close()
    means = {k: statistics.fmean(v) / 1000 for k, v in costs.items()}
    print("\npublish_event mean: " + ", ".join(f"{k} {v:.1f} us" for k, v in means.items()))
    assert means["turn.end"] < 5000, means  # tens of microseconds; the bound catches blocking, not load
