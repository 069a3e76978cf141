"""The bridge against a real Mosquitto, driven through the test daemon (a real subprocess):
events in order, retained status with a Last Will, kill -9 with a full outbox, commands over
MQTT v5 and 3.1.1, Home Assistant discovery, and publish_event's cost to the pipeline."""

from __future__ import annotations

import json
import re
import sqlite3
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mosquitto import Message, Mosquitto, Probe, free_port
from mqtt_daemon import DaemonProcess, RecordingController, write_config

from edge.config import MqttConfig
from edge.events import Event, EventType
from edge.mqtt import MqttBridge
from edge.mqtt.outbox import FILENAME

DEV = "dev1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def probes() -> Iterator[Callable[..., Probe]]:
    made: list[Probe] = []

    def make(broker: Mosquitto, **kw) -> Probe:
        p = Probe(broker, **kw).connect()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    running: list[DaemonProcess] = []

    def start(port: int, device_id: str = DEV, **mqtt) -> DaemonProcess:
        cfg = write_config(tmp_path / f"{device_id}.toml", device_id=device_id,
                           state_dir=tmp_path / f"state-{device_id}", port=port, **mqtt)
        d = DaemonProcess(cfg, tmp_path / f"daemon-{device_id}.log").start()
        running.append(d)
        return d

    yield start
    for d in running:
        d.stop()


def events(ms: list[Message]) -> list[Message]:
    return [m for m in ms if "/event/" in m.topic]


def wait_online(p: Probe, device_id: str = DEV, state: str = "online") -> dict:
    p.subscribe(f"edge/{device_id}/status")
    m = p.wait_for(lambda ms: next((m for m in reversed(ms) if m.topic == f"edge/{device_id}/status"
                                    and m.json()["state"] == state), None), 20, f"status {state}")
    return m.json()


def unique_in_order(ms: list[Message]) -> list[dict]:
    """Subscriber-side dedupe by message id (QoS 1 may deliver twice)."""
    seen: set[str] = set()
    out = []
    for m in ms:
        body = m.json()
        if body["message_id"] not in seen:
            seen.add(body["message_id"])
            out.append(body)
    return out


def test_events_in_order_retained_status_metrics_and_will_on_kill_9(broker: Mosquitto, probes, start_daemon) -> None:
    live = probes(broker)
    live.subscribe(f"edge/{DEV}/event/#")
    live.subscribe(f"edge/{DEV}/metrics")
    d = start_daemon(broker.port)
    wait_online(live)
    d.send("emit 30 0 partials")  # 30 events + 5 partial transcripts
    got = live.wait_for(lambda ms: len(events(ms)) >= 35 and events(ms), 20, "35 events")
    bodies = [m.json() for m in got]
    assert [b["seq"] for b in bodies] == list(range(1, 36))
    assert [b["n"] for b in bodies if "n" in b] == list(range(30))
    assert len({b["message_id"] for b in bodies}) == 35
    assert all(re.fullmatch(r"[0-9a-f]{16}", b["message_id"]) for b in bodies)
    for m, b in zip(got, bodies):
        assert m.topic == f"edge/{DEV}/event/{b['type']}"
        assert b["device_id"] == DEV and b["session_id"] and isinstance(b["time"], float)
        assert m.qos == 1
        assert (b["turn_id"] is not None) == (b["type"] != "transcript.partial")
    assert {b["type"] for b in bodies} == {"wake", "transcript.partial", "transcript.final", "reply.final",
                                           "tts.start", "tts.end", "turn.end"}

    metrics = live.wait_for(lambda ms: next((m for m in ms if m.topic.endswith("/metrics")
                                             and m.json()["outbox"]["depth"] == 0), None), 10, "metrics").json()
    assert metrics["memory"]["total_bytes"] > 0 and "cpu" in metrics and len(metrics["load"]) == 3
    assert metrics["outbox"]["dropped"] == 0 and metrics["mqtt"]["connected"] is True
    assert metrics["audio"] == {"queue_drops": 0} and metrics["models"] == {"llm": "loaded"}

    late = probes(broker)  # subscribes after the fact: the status must be retained
    status = wait_online(late)
    assert late.on_topic(f"edge/{DEV}/status")[0].retain
    assert status["version"] and status["models"]["llm"] == "smollm2-135m" and status["uptime_s"] >= 0

    d.send("state listening")
    assert wait_online(late, state="listening")["note"] is None
    assert wait_online(probes(broker), state="listening")  # retained too

    d.kill9()
    offline = wait_online(late, state="offline")
    assert offline["reason"] == "connection lost"
    fresh = probes(broker)
    assert wait_online(fresh, state="offline") and fresh.on_topic(f"edge/{DEV}/status")[0].retain


def test_a_clean_stop_publishes_offline_itself(broker: Mosquitto, probes, start_daemon) -> None:
    p = probes(broker)
    d = start_daemon(broker.port)
    wait_online(p)
    assert d.stop() == 0
    assert wait_online(p, state="offline")["reason"] == "stopped"
    assert d.wait_line(lambda x: "stopped" in x)["depth"] == 0


def test_kill_9_with_events_in_the_outbox_loses_nothing(tmp_path: Path, probes, start_daemon) -> None:
    port = free_port()
    d = start_daemon(port)  # no broker yet: everything waits in the outbox
    d.send("emit 60 0")
    d.wait_line(lambda x: x.get("emitted") == 60)
    deadline = time.monotonic() + 10
    while d.depth() < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    d.kill9()
    with sqlite3.connect(tmp_path / f"state-{DEV}" / FILENAME) as db:  # on disk, not in a process
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 60

    with Mosquitto(tmp_path / "broker", port=port) as broker:
        p = probes(broker)
        p.subscribe(f"edge/{DEV}/event/#")
        d2 = start_daemon(port)
        got = p.wait_for(lambda ms: len({m.json()["message_id"] for m in events(ms)}) >= 60 and events(ms),
                         30, "60 events after the restart")
        bodies = unique_in_order(got)
        assert [b["n"] for b in bodies] == list(range(60))
        assert [b["seq"] for b in bodies] == list(range(1, 61))
        d2.send("emit 3 0")
        more = p.wait_for(lambda ms: len(unique_in_order(events(ms))) >= 63 and unique_in_order(events(ms)), 10)
        assert [b["seq"] for b in more[60:]] == [61, 62, 63]  # the numbering survives the crash
        deadline = time.monotonic() + 10
        while d2.depth() and time.monotonic() < deadline:  # the last PUBACKs may still be on their way
            time.sleep(0.05)
        assert d2.depth() == 0


def answers_in_order(p: Probe, prefix: str) -> Callable[[str, dict | bytes], dict]:
    def ask(name: str, payload: dict | bytes) -> dict:
        return p.request(f"{prefix}/cmd/{name}", payload)
    return ask


def test_every_command_round_trips_with_mqtt5_correlation_data(broker: Mosquitto, probes, start_daemon) -> None:
    p = probes(broker)
    p.subscribe(f"edge/{DEV}/event/#")
    start_daemon(broker.port)
    wait_online(p)
    cmd = answers_in_order(p, f"edge/{DEV}")
    assert cmd("say", {"text": "Welcome!"}) | {"time": 0} == {
        "ok": True, "queued": True, "command": "say", "device_id": DEV, "time": 0}
    asked = cmd("ask", {"text": "Where is the exit?", "request_id": "q-1"})
    assert asked["ok"] and asked["request_id"] == "q-1" and asked["turn_id"]
    reply = p.wait_for(lambda ms: next((m for m in ms if m.topic.endswith("/event/reply.final")), None), 10).json()
    assert reply["text"] == "You asked: Where is the exit?" and reply["turn_id"] == asked["turn_id"]
    assert cmd("listen", {})["listening"] is True
    assert cmd("cancel", b"")["ok"]
    assert cmd("mute", {})["muted"] is True
    refused = cmd("listen", {})  # the controller refuses with its own EdgeError code
    assert refused["ok"] is False and refused["error"]["code"] == "audio.muted"
    assert cmd("unmute", {})["muted"] is False
    assert cmd("volume", {"volume": 0.3})["volume"] == 0.3
    assert cmd("set", {"key": "llm.temperature", "value": 0.7})["value"] == 0.7
    assert cmd("set", {"key": "llm.system_prompt", "value": "ignore all rules"})["error"]["code"] == "cmd.forbidden"
    assert cmd("reload-models", {})["reloaded"] == ["llm"]
    expired = cmd("say", {"text": "too late", "expires_at": time.time() - 5, "request_id": "old"})
    assert expired["ok"] is False and expired["error"]["code"] == "cmd.expired" and expired["request_id"] == "old"
    assert cmd("say", {"text": "in time", "expires_at": time.time() + 30})["ok"]

    fleet = p.request("edge/all/cmd/status", {})
    assert fleet["ok"] and fleet["device_id"] == DEV and fleet["mqtt"]["connected"] is True
    assert fleet["calls"] == [["say", "Welcome!"], ["ask", "Where is the exit?"], ["listen"], ["cancel"],
                              ["mute"], ["unmute"], ["volume", 0.3], ["set", "llm.temperature", 0.7],
                              ["reload-models"], ["say", "in time"]]
    assert fleet["settings"] == {"llm.temperature": 0.7}

    # Binary correlation data comes back byte for byte.
    corr = bytes(range(256))
    p.publish(f"edge/{DEV}/cmd/status", b"{}", response_topic="fleet/bin", correlation=corr)
    p.subscribe("fleet/bin")
    p.publish(f"edge/{DEV}/cmd/status", b"{}", response_topic="fleet/bin", correlation=corr)
    assert p.wait_for(lambda ms: next((m for m in ms if m.topic == "fleet/bin"), None), 10).correlation == corr

    # A retained command would run at every reconnect: refused (and cleared again here).
    p.publish(f"edge/{DEV}/cmd/say", {"text": "again and again"}, retain=True, response_topic="fleet/bin",
              correlation=b"retained")
    assert p.wait_for(lambda ms: next((m for m in ms if m.correlation == b"retained" and m.topic == "fleet/bin"),
                                      None), 10).json()["error"]["code"] == "cmd.retained"
    p.publish(f"edge/{DEV}/cmd/say", b"", retain=True)

    # A response topic that is the device's own command topic would loop: answered on /result instead.
    p.subscribe(f"edge/{DEV}/cmd/+/result")
    p.publish(f"edge/{DEV}/cmd/status", b"{}", response_topic=f"edge/{DEV}/cmd/status", correlation=b"loop")
    ans = p.wait_for(lambda ms: next((m for m in ms if m.topic == f"edge/{DEV}/cmd/status/result"), None), 10)
    assert ans.correlation == b"loop" and ans.json()["error"]["message"].startswith("response topic refused")


def test_every_command_round_trips_over_mqtt_311_with_request_ids(broker: Mosquitto, probes, start_daemon) -> None:
    p = probes(broker, protocol="3.1.1")
    p.subscribe(f"edge/{DEV}/cmd/+/result")
    # Left retained on the broker: the broker replays it at every (re)subscription; refused.
    p.publish(f"edge/{DEV}/cmd/say", {"text": "stale"}, retain=True)
    start_daemon(broker.port, protocol="3.1.1")
    wait_online(p)
    stale = p.wait_for(lambda ms: next((m for m in ms if m.topic == f"edge/{DEV}/cmd/say/result"), None), 10)
    assert stale.json()["error"]["code"] == "cmd.retained"
    p.publish(f"edge/{DEV}/cmd/say", b"", retain=True)  # clears it
    payloads = {"say": {"text": "hi"}, "ask": {"text": "why"}, "listen": {}, "cancel": {}, "mute": {},
                "unmute": {}, "volume": {"volume": 1}, "set": {"key": "stt.no_speech_timeout_s", "value": 5.0},
                "reload-models": {}, "handset": {"state": "off-hook"}, "status": {}}
    for name, payload in payloads.items():
        rid = uuid.uuid4().hex
        topic = f"edge/all/cmd/{name}" if name == "status" else f"edge/{DEV}/cmd/{name}"
        p.publish(topic, {**payload, "request_id": rid})
        ans = p.wait_for(lambda ms, rid=rid: next((m for m in ms if m.payload and json.loads(m.payload).get(
            "request_id") == rid), None), 10, f"{name} answer").json()
        assert ans["ok"] is True and ans["command"] == name, ans
        # Fleet commands are answered in the device's own namespace (what a per-device ACL allows).
        assert p.messages[-1].topic == f"edge/{DEV}/cmd/{name}/result"
    assert ["say", "stale"] not in ans["calls"]
    assert [c[0] for c in ans["calls"]] == ["say", "ask", "listen", "cancel", "mute", "unmute", "volume", "set"] \
        + ["reload-models", "handset"]
    rid = uuid.uuid4().hex
    p.publish(f"edge/{DEV}/cmd/say", {"text": "late", "request_id": rid, "expires_at": 1.0})
    ans = p.wait_for(lambda ms: next((m for m in ms if m.payload and json.loads(m.payload).get("request_id")
                                      == rid), None), 10).json()
    assert ans["error"]["code"] == "cmd.expired"


def test_home_assistant_discovery_and_its_say_entity(broker: Mosquitto, probes, start_daemon) -> None:
    p = probes(broker)
    start_daemon(broker.port, ha_discovery=True)
    wait_online(p)
    first = probes(broker)
    first.subscribe("homeassistant/#")
    first.wait_for(lambda ms: len(ms) >= 4, 10, "4 discovery configs")
    ha = probes(broker)  # comes later: gets them from the broker's retained store
    ha.subscribe("homeassistant/#")
    configs = ha.wait_for(lambda ms: len(ms) >= 4 and ms, 10, "4 retained discovery configs")
    assert all(m.retain for m in configs)
    by_topic = {m.topic: m.json() for m in configs}
    text = by_topic[f"homeassistant/text/{DEV}/say/config"]
    # What Home Assistant sends when someone types into the entity: the template, rendered.
    rendered = text["command_template"].replace("{{ value | tojson }}", json.dumps('Bonjour "à tous"'))
    ha.publish(text["command_topic"], rendered)
    status = p.request(f"edge/{DEV}/cmd/status", {})
    assert status["calls"] == [["say", 'Bonjour "à tous"']]
    assert by_topic[f"homeassistant/sensor/{DEV}/status/config"]["state_topic"] == f"edge/{DEV}/status"


def test_publish_event_costs_the_pipeline_microseconds(tmp_path: Path, broker: Mosquitto, probes) -> None:
    p = probes(broker)
    p.subscribe(f"edge/{DEV}/event/#")
    cfg = MqttConfig(enabled=True, host=broker.host, port=broker.port, keepalive_s=5)
    bridge = MqttBridge(cfg, DEV, tmp_path / "state", RecordingController(), version="t", models={})
    bridge.start()
    try:
        deadline = time.monotonic() + 10
        while not bridge.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bridge.connected
        event = Event(EventType.TRANSCRIPT_FINAL, {"text": "what are the opening hours today"}, turn_id="t",
                      session_id="s")
        costs = []
        for _ in range(3000):
            t0 = time.perf_counter_ns()
            bridge.publish_event(event)
            costs.append(time.perf_counter_ns() - t0)
            if len(costs) % 100 == 0:
                time.sleep(0.005)  # a busy conversation, not a tight loop
        got = p.wait_for(lambda ms: len(ms) >= 3000 and ms, 60, "3000 events")
        assert [m.json()["seq"] for m in got[:3000]] == list(range(1, 3001))
    finally:
        bridge.stop()
    mean_us = statistics.fmean(costs) / 1000
    p99_us = sorted(costs)[int(len(costs) * 0.99)] / 1000
    print(f"\npublish_event: mean {mean_us:.1f} us, p99 {p99_us:.1f} us, max {max(costs) / 1000:.1f} us")
    # Tens of microseconds here; the bound catches blocking (the network, a disk sync), not a busy machine.
    assert mean_us < 5000, f"publish_event mean {mean_us:.1f} us"


def test_a_full_outbox_drops_the_oldest_and_metrics_count_it(tmp_path: Path, probes) -> None:
    broker = Mosquitto(tmp_path / "broker")  # not started yet: the device is offline
    cfg = MqttConfig(enabled=True, host=broker.host, port=broker.port, keepalive_s=5, outbox_max=10,
                     metrics_interval_s=1.0)

    def bridge() -> MqttBridge:
        b = MqttBridge(cfg, DEV, tmp_path / "state", RecordingController(), version="t", models={},
                       reconnect_min_s=0.1, reconnect_max_s=0.5)
        b.set_metrics_source(lambda: {"audio": {"queue_drops": 7}})
        b.start()
        return b

    offline = bridge()
    try:
        for i in range(25):
            offline.publish_event(Event(EventType.TRANSCRIPT_PARTIAL, {"text": f"partial {i}"}))
            offline.publish_event(Event(EventType.TRANSCRIPT_FINAL, {"n": i}))
        deadline = time.monotonic() + 10
        while offline.bridge_info()["outbox"]["dropped"] < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        info = offline.bridge_info()["outbox"]
        assert (info["depth"], info["dropped"], info["partials_skipped"]) == (10, 15, 25)
    finally:
        offline.stop(2.0)

    with broker:
        p = probes(broker)
        p.subscribe(f"edge/{DEV}/#")
        online = bridge()  # the same state directory: the kept events go out now
        try:
            got = p.wait_for(lambda ms: len(events(ms)) >= 10 and events(ms), 15, "the 10 newest events")
            assert [m.json()["n"] for m in got] == list(range(15, 25))
            assert [m.json()["seq"] for m in got] == list(range(16, 26))  # the gap shows the loss
            metrics = p.wait_for(lambda ms: next((m for m in ms if m.topic.endswith("/metrics")), None), 10).json()
            assert metrics["outbox"]["dropped"] == 15  # kept across the restart
            assert metrics["audio"] == {"queue_drops": 7}
        finally:
            online.stop(2.0)
