"""Topics, host metrics and Home Assistant discovery (pure logic and real /proc files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.mqtt.discovery import discovery_messages
from edge.mqtt.metrics import (
    HostMetrics,
    parse_meminfo,
    parse_proc_stat_cpu,
    parse_self_stat_cpu,
    parse_status_rss,
    read_temperatures,
)
from edge.mqtt.topics import Topics


def test_topic_contract() -> None:
    t = Topics("edge", "kiosk-7")
    assert t.status == "edge/kiosk-7/status"
    assert t.metrics == "edge/kiosk-7/metrics"
    assert t.event("transcript.final") == "edge/kiosk-7/event/transcript.final"
    assert t.command_filters == ("edge/kiosk-7/cmd/+", "edge/all/cmd/+")
    assert t.command_name("edge/kiosk-7/cmd/say") == "say"
    assert t.command_name("edge/all/cmd/status") == "status"
    assert t.command_name("edge/kiosk-7/cmd/say/result") is None
    assert t.command_name("edge/kiosk-8/cmd/say") is None
    assert t.result("say") == "edge/kiosk-7/cmd/say/result"
    assert t.result("x" * 70000) == "edge/kiosk-7/cmd/_/result"
    assert Topics("site1/edge", "a").status == "site1/edge/a/status"


@pytest.mark.parametrize("prefix, device", [("", "a"), ("/edge", "a"), ("edge/", "a"), ("ed+ge", "a"),
                                            ("edge", "all"), ("edge", "Kiosk"), ("edge", "a/b"), ("edge", "")])
def test_bad_prefixes_and_ids_are_config_errors(prefix: str, device: str) -> None:
    with pytest.raises(ConfigError):
        Topics(prefix, device)


def test_response_topics_that_would_loop_or_impersonate_are_refused() -> None:
    t = Topics("edge", "d1")
    assert t.usable_response_topic("fleet/replies/42")
    assert t.usable_response_topic("edge/d1/cmd/say/result")
    assert t.usable_response_topic("edge/d1/replies/abc")
    for bad in ("edge/d1/cmd/say", "edge/all/cmd/status", "edge/d1/status", "edge/d1/metrics",
                "edge/d1/event/wake", "fleet/#", "fleet/+/x", "", "a\x00b", "x" * 2000):
        assert not t.usable_response_topic(bad), bad


def test_proc_parsers() -> None:
    assert parse_meminfo("MemTotal:       8000 kB\nMemFree: 1 kB\nMemAvailable:   2000 kB\n") == {
        "MemTotal": 8000 * 1024, "MemAvailable": 2000 * 1024}
    assert parse_status_rss("Name:\tpython\nVmRSS:\t  5120 kB\n") == 5120 * 1024
    assert parse_status_rss("Name:\tkthread\n") is None
    busy, total = parse_proc_stat_cpu("cpu  10 0 5 80 5 0 0 0 0 0\ncpu0 1 1 1 1\n")
    assert (busy, total) == (15, 100)
    # A command name with spaces and parentheses must not shift the fields.
    stat = "123 (a (b) c) S 1 1 1 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 1000 10"
    assert parse_self_stat_cpu(stat) == 300
    assert parse_self_stat_cpu("garbage") is None


def test_host_metrics_from_this_machine() -> None:
    host = HostMetrics()
    first = host.sample()
    sum(i * i for i in range(200_000))  # some CPU time between the samples
    second = host.sample()
    assert "process_pct" not in first["cpu"]
    assert second["cpu"]["process_pct"] >= 0
    assert second["memory"]["total_bytes"] > second["memory"]["available_bytes"] > 0
    assert second["memory"]["process_rss_bytes"] > 1_000_000
    assert len(second["load"]) == 3


def test_temperatures_from_thermal_zones(tmp_path: Path) -> None:
    for i, (kind, milli) in enumerate([("cpu-thermal", "47250\n"), ("gpu-thermal", "39000\n"),
                                       ("cpu-thermal", "48000\n"), ("broken", "n/a\n")]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli)
    assert read_temperatures(tmp_path) == {"cpu-thermal": 47.2, "gpu-thermal": 39.0, "cpu-thermal-2": 48.0}
    assert read_temperatures(tmp_path / "missing") == {}


def test_discovery_configs_point_at_the_device_topics() -> None:
    t = Topics("edge", "booth-3")
    msgs = dict(discovery_messages(t, "homeassistant", "1.2.3"))
    assert set(msgs) == {
        "homeassistant/sensor/booth-3/status/config", "homeassistant/sensor/booth-3/last_transcript/config",
        "homeassistant/sensor/booth-3/last_reply/config", "homeassistant/text/booth-3/say/config"}
    cfgs = {k: json.loads(v) for k, v in msgs.items()}
    assert cfgs["homeassistant/sensor/booth-3/status/config"]["state_topic"] == t.status
    assert cfgs["homeassistant/sensor/booth-3/last_transcript/config"]["state_topic"] == t.event("transcript.final")
    assert cfgs["homeassistant/sensor/booth-3/last_reply/config"]["state_topic"] == t.event("reply.final")
    say = cfgs["homeassistant/text/booth-3/say/config"]
    assert say["command_topic"] == t.command("say")
    assert len({c["unique_id"] for c in cfgs.values()}) == 4
    assert all(c["device"]["identifiers"] == ["edge_voice_booth-3"] for c in cfgs.values())
    assert all(c["device"]["sw_version"] == "1.2.3" for c in cfgs.values())


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_metrics_reader_survives_a_missing_proc(tmp_path: Path) -> None:
    sample = HostMetrics(proc=tmp_path, thermal=tmp_path).sample()
    assert sample == {"cpu": {"count": os.cpu_count() or 1}, "memory": {}}
