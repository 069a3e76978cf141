"""The fleet side's pure parts: connection config, command arguments, waves, device selection,
the devices table, event rows and the SQLite store."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_daemon import RecordingController

from edge.config import DeviceConfig, MqttConfig, load_config
from edge.errors import ConfigError
from edge.fleet.cmd import build_payload
from edge.fleet.config import load_fleet_config
from edge.fleet.errors import FleetError, SelectionError, StoreError
from edge.fleet.status import DeviceStatus, parse_status, select, table
from edge.fleet.store import SqliteStore, open_store, parse_event, redact
from edge.fleet.waves import WaveRule, run_waves
from edge.mqtt import MqttBridge
from edge.mqtt.topics import FleetTopics, valid_tag


def test_fleet_config_file_then_environment_then_options(tmp_path: Path) -> None:
    f = tmp_path / "fleet.toml"
    f.write_text('[fleet]\nhost = "broker.site"\nport = 8883\ntls = true\nprefix = "site1/edge"\n')
    cfg = load_fleet_config(f, environ={})
    assert (cfg.host, cfg.port, cfg.tls, cfg.prefix) == ("broker.site", 8883, True, "site1/edge")
    cfg = load_fleet_config(f, environ={"EDGE_VOICE_FLEET__PORT": "1884", "EDGE_VOICE_MQTT__PORT": "9"})
    assert cfg.port == 1884 and cfg.host == "broker.site"
    cfg = load_fleet_config(f, {"port": 1885, "host": None}, environ={"EDGE_VOICE_FLEET__PORT": "1884"})
    assert cfg.port == 1885 and cfg.host == "broker.site"
    assert load_fleet_config(None, environ={"EDGE_VOICE_FLEET_CONFIG": str(f)}).host == "broker.site"
    assert load_fleet_config(None, environ={}).host == "localhost"
    mqtt = cfg.mqtt()
    assert isinstance(mqtt, MqttConfig) and mqtt.protocol == "5" and mqtt.tls

    f.write_text('[fleet]\nhots = "x"\n')
    with pytest.raises(ConfigError, match=r"fleet\.toml: fleet\.hots: unknown key"):
        load_fleet_config(f, environ={})
    f.write_text('[mqtt]\nhost = "x"\n')
    with pytest.raises(ConfigError, match="mqtt: unknown section"):
        load_fleet_config(f, environ={})
    with pytest.raises(ConfigError, match="EDGE_VOICE_FLEET__PORT: fleet.port"):
        load_fleet_config(None, environ={"EDGE_VOICE_FLEET__PORT": "0"})
    with pytest.raises(ConfigError, match="command line: fleet.port: 70000 is above the maximum"):
        load_fleet_config(None, {"port": 70000}, environ={})
    with pytest.raises(ConfigError, match="fleet config file not found"):
        load_fleet_config(tmp_path / "missing.toml", environ={})


def test_device_tags_come_from_the_config_and_are_checked(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[device]\ntags = ["site:paris", "lang:fr", "booth"]\n')
    assert load_config(cfg_file, environ={}).device.tags == ["site:paris", "lang:fr", "booth"]
    assert DeviceConfig().tags == []
    assert all(valid_tag(t) for t in ("site:paris", "lang=fr", "B-12.3", "x" * 64))
    assert not any(valid_tag(t) for t in ("", "has space", "a,b", "x" * 65, "-lead", "a/b", "a+b", "a#"))
    with pytest.raises(ConfigError, match=r"device.tags: 'bad tag' is not a usable tag"):
        MqttBridge(MqttConfig(enabled=True), "dev1", tmp_path, RecordingController(), version="t", models={},
                   tags=["ok", "bad tag"])


def test_command_arguments_are_typed_and_checked_with_the_device_schemas() -> None:
    assert build_payload("say", ["Welcome to the station"]) == {"text": "Welcome to the station"}
    assert build_payload("say", ["text=42 ways"]) == {"text": "42 ways"}
    assert build_payload("volume", ["0.4"]) == {"volume": 0.4}
    assert build_payload("set", ["key=llm.temperature", "value=0.2"]) == {"key": "llm.temperature", "value": 0.2}
    assert build_payload("set", ["key=llm.max_tokens", "value:=64"]) == {"key": "llm.max_tokens", "value": 64}
    assert build_payload("say", [], '{"text": "from json"}') == {"text": "from json"}
    assert build_payload("status", []) == {}
    with pytest.raises(FleetError, match="unknown command 'shout'") as err:
        build_payload("shout", [])
    assert err.value.code == "cmd.unknown"
    with pytest.raises(FleetError, match="missing field 'text'"):
        build_payload("say", [])
    with pytest.raises(FleetError, match="expected a string"):
        build_payload("say", ["42"])
    with pytest.raises(FleetError, match="commands cannot change it") as err:
        build_payload("set", ["key=llm.system_prompt", "value=be rude"])
    assert err.value.code == "cmd.forbidden"
    with pytest.raises(FleetError, match="unexpected argument 'extra'"):
        build_payload("set", ["key=llm.top_p", "value=0.5", "extra"])
    with pytest.raises(FleetError, match="from 0.0 to 1.0"):
        build_payload("volume", ["3"])
    with pytest.raises(FleetError, match="set by fleet cmd itself"):
        build_payload("say", ["hi", "expires_at=1"])
    with pytest.raises(FleetError, match="not valid JSON"):
        build_payload("say", [], "{nope")


def test_waves_stop_after_a_wave_that_fails_too_much() -> None:
    devices = [f"d{i}" for i in range(10)]
    bad = {"d1", "d2", "d7"}
    calls: list[list[str]] = []

    def run(n: int, wave: list[str]) -> list[str]:
        calls.append(wave)
        return [d for d in wave if d in bad]

    report = run_waves(devices, WaveRule(3, 40.0), run)  # wave 1: 2 of 3 failed, 67% > 40%
    assert calls == [["d0", "d1", "d2"]]
    assert report.not_started == devices[3:] and report.failed == ["d1", "d2"] and not report.ok
    assert "wave 1 of 4: 2 of 3 device(s) failed (67%" in (report.stopped or "")

    calls.clear()
    report = run_waves(devices, WaveRule(5, 40.0), run)  # 40% is not more than 40%
    assert calls == [devices[:5], devices[5:]] and report.stopped is None and report.failed == ["d1", "d2", "d7"]

    calls.clear()
    report = run_waves(devices, WaveRule(), run)  # one wave, nothing held back
    assert calls == [devices] and report.stopped is None

    calls.clear()
    report = run_waves(["d7", "d8"], WaveRule(1), run)  # the last wave's failure stops nothing more
    assert len(calls) == 1 and report.not_started == ["d8"]
    with pytest.raises(FleetError, match="--wave must be at least 1"):
        WaveRule(0)
    with pytest.raises(FleetError, match="--max-fail-percent"):
        WaveRule(2, 101)


def _status(device: str, **body: object) -> DeviceStatus:
    return DeviceStatus(device, {"state": "online", "device_id": device, **body})


def test_select_by_device_tag_or_all_and_say_what_is_unknown() -> None:
    statuses = {"a": _status("a", tags=["site:paris", "lang:fr"]), "b": _status("b", tags=["site:paris", "lang:en"]),
                "c": _status("c", tags=["site:rome"])}
    assert select(statuses, everyone=True) == ["a", "b", "c"]
    assert select(statuses, devices=["c", "a"]) == ["a", "c"]
    assert select(statuses, tags=["site:paris"]) == ["a", "b"]
    assert select(statuses, tags=["site:paris", "lang:en"]) == ["b"]
    assert select(statuses, devices=["c"], tags=["lang:fr"]) == ["a", "c"]
    with pytest.raises(SelectionError, match=r"unknown device 'z': no status under edge/z/status .*known: a, b, c"):
        select(statuses, devices=["z"], where="h:1")
    with pytest.raises(SelectionError, match=r"no device carries the tag 'site:oslo' \(tags in use: lang:en, lang:fr"):
        select(statuses, tags=["site:oslo"])
    with pytest.raises(SelectionError, match="no device carries all of the tags site:rome, lang:fr"):
        select(statuses, tags=["site:rome", "lang:fr"])
    with pytest.raises(SelectionError, match="name the devices"):
        select(statuses)
    with pytest.raises(SelectionError, match="no device has a status on the MQTT broker at h:1"):
        select({}, everyone=True, where="h:1")


def test_the_devices_table_shows_state_since_tags_last_turn_and_error() -> None:
    now = 1_000_000.0
    rows = [
        _status("kiosk-1", version="1.2", models={"llm": "phi3"}, tags=["site:paris"], online_since=now - 300,
                last_turn={"time": now - 60, "outcome": "done", "first_audio_ms": 912.4},
                last_error={"time": now - 7200, "code": "stage.error", "message": "llm timed out"},
                knowledge={"name": "louvre", "version": "3"}),
        DeviceStatus("kiosk-2", {"state": "offline", "reason": "stopped", "time": now - 90, "tags": []}),
        DeviceStatus("kiosk-3", {"state": "offline", "reason": "connection lost", "time": now - 4000}),
    ]
    lines = table(rows, now)
    assert lines[0].split() == ["DEVICE", "STATE", "SINCE", "VERSION", "TAGS", "LAST", "TURN", "LAST", "ERROR",
                                "KNOWLEDGE", "MODELS"]
    assert lines[1].split() == ["kiosk-1", "online", "5m", "1.2", "site:paris", "1m", "ago", "done", "912ms", "2.0h",
                                "ago", "stage.error:", "llm", "timed", "out", "louvre@3", "llm=phi3"]
    assert "offline (stopped)" in lines[2] and " 2m " in lines[2]
    assert "offline (connection lost)" in lines[3] and "<=1.1h" in lines[3]
    assert rows[2].since is None and rows[1].since == now - 90 and rows[0].since == now - 300
    assert parse_status("x", b"") is None
    assert parse_status("x", b"not json") == DeviceStatus("x", {}, readable=False)


def test_topics_of_the_fleet_side() -> None:
    t = FleetTopics("site1/edge")
    assert t.status() == "site1/edge/+/status" and t.events("k1", "turn.end") == "site1/edge/k1/event/turn.end"
    assert t.answers("k1", "ops") == "site1/edge/k1/answers/ops" and t.results("say") == "site1/edge/+/cmd/say/result"
    assert t.device_of("site1/edge/k1/event/wake") == "k1" and t.device_of("site1/edge/all/cmd/say") is None
    assert t.device_of("other/k1/status") is None
    assert t.shared("rec", t.events()) == "$share/rec/site1/edge/+/event/#"
    with pytest.raises(ConfigError, match="not a usable topic prefix"):
        FleetTopics("bad/#")


def _event(mid: str, seq: int, **extra: object) -> bytes:
    body = {"seq": seq, "type": "transcript.final", "text": "Where is the exit?", "turn_id": "t1",
            "session_id": "s1", "time": 1_700_000_000.25, "message_id": mid, "device_id": "k1", **extra}
    return json.dumps(body).encode()


def test_event_rows_and_the_sqlite_store_keep_each_event_once(tmp_path: Path) -> None:
    row = parse_event("k1", "transcript.final", _event("m1", 1), 1_700_000_001.0)
    assert row is not None
    assert (row.message_id, row.device_id, row.seq, row.type, row.session_id, row.turn_id, row.time, row.text) == \
        ("m1", "k1", 1, "transcript.final", "s1", "t1", 1_700_000_000.25, "Where is the exit?")
    assert json.loads(row.payload)["message_id"] == "m1"
    assert parse_event("k1", "wake", b"not json", 0.0) is None
    assert parse_event("k1", "wake", b'{"type": "wake"}', 0.0) is None  # no id: cannot be deduplicated
    assert parse_event("k1", "wake", b"[1, 2]", 0.0) is None
    odd = parse_event("k1", "reply.final", _event("m9", True, text="nul\x00byte", time="soon"), 5.0)
    assert odd is not None and odd.seq is None and odd.time is None and odd.text == "nul\ufffdbyte"

    db = tmp_path / "events.sqlite3"
    store = open_store(str(db))
    assert isinstance(store, SqliteStore)
    rows = [parse_event("k1", "transcript.final", _event(f"m{i}", i), time.time()) for i in range(1, 6)]
    assert store.add([r for r in rows if r]) == 5
    assert store.add([r for r in rows[3:] if r]) == 0  # a second copy is not stored
    second = open_store(f"sqlite:{db}")  # another consumer on the same file
    assert second.add([r for r in rows[:2] if r]) == 0 and second.count() == 5
    counts = store.by_device()["k1"]
    assert (counts.rows, counts.distinct_seq, counts.min_seq, counts.max_seq) == (5, 5, 1, 5)
    assert len(store.delays()) == 5
    store.close()
    second.close()
    with sqlite3.connect(db) as con:
        cols = [r[1] for r in con.execute("PRAGMA table_info(events)")]
        assert cols == ["message_id", "device_id", "seq", "type", "session_id", "turn_id", "time", "received",
                        "text", "payload"]
        assert con.execute("SELECT COUNT(*) FROM events WHERE text LIKE '%exit%'").fetchone()[0] == 5


def _open_together(path: str, barrier: Any, answers: Any) -> None:
    barrier.wait()
    try:
        SqliteStore(Path(path)).close()
        answers.put("ok")
    except StoreError as err:
        answers.put(str(err))


def test_recorders_started_together_on_a_new_file_all_open_it(tmp_path: Path) -> None:
    # Two `fleet record --db same.sqlite3` started at once: switching a new file to WAL answered
    # "database is locked" at once to one of them (about 1 pair in 10) before the store waited it out.
    ctx = multiprocessing.get_context("fork")
    answers = ctx.Queue()
    for i in range(15):
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_together, args=(str(tmp_path / f"e{i}.sqlite3"), barrier, answers))
                 for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
    got = [answers.get(timeout=5) for _ in range(60)]
    assert [a for a in got if a != "ok"] == []


def test_store_targets_and_their_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot open the event database .*missing/dir/e.db.*directory exists"):
        open_store(str(tmp_path / "missing" / "dir" / "e.db"))
    with pytest.raises(StoreError, match=r"--db mysql://u:\*\*\*@h/db: unsupported database 'mysql'"):
        open_store("mysql://u:secret@h/db")
    assert redact("postgresql://edge:pw@127.0.0.1:5432/fleet") == "postgresql://edge:***@127.0.0.1:5432/fleet"
    assert redact("postgresql://edge@db/fleet") == "postgresql://edge@db/fleet"
    assert isinstance(open_store(f"sqlite://{tmp_path / 'x.db'}"), SqliteStore)


def test_a_refused_first_login_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """The broker refuses the login and closes the socket; the client's network thread may see the
    close, and try again, before connect() has closed it: nothing more is logged than the refusal
    connect() raises (a CLI's error stays one line)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from edge.fleet.client import FleetClient
    from edge.fleet.config import FleetConfig

    client = FleetClient(FleetConfig(host="127.0.0.1", port=1))
    refused = ReasonCode(PacketTypes.CONNACK, identifier=0x87)
    client._on_connect(None, None, None, refused, None)
    assert client._first.is_set() and "refused the login (Not authorized)" in (client._first_error or "")
    first = client._first_error
    with caplog.at_level("INFO", logger="edge.fleet"):
        client._on_disconnect(None, None, None, ReasonCode(PacketTypes.DISCONNECT, identifier=0x82), None)
        client._on_connect(None, None, None, refused, None)  # the reconnect, 0.1 s later
    assert caplog.records == [] and client._first_error == first
