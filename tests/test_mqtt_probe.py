"""``edge-voice check --mqtt-online-since``: wait until the daemon's own retained status says online.

Against a real Mosquitto (tests/mosquitto.py) with a password file, and the real MQTT bridge
publishing the status (tests/mqtt_daemon.py), as provisioning uses it after a restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mosquitto import Mosquitto, Probe, free_port
from mqtt_daemon import DaemonProcess, write_config

from edge.config import load_config
from edge.mqtt.probe import OnlineResult, wait_online

DEVICE = "booth-12"
TOPIC = f"edge/{DEVICE}/status"
PASSWORDS = {DEVICE: "booth-pw", "fleet": "fleet-pw"}


@pytest.fixture
def broker(tmp_path: Path):
    with Mosquitto(tmp_path / "broker", allow_anonymous=False, passwords=PASSWORDS) as b:
        yield b


def _config(tmp_path: Path, port: int, password: str = PASSWORDS[DEVICE]) -> Path:
    secret = tmp_path / "mqtt-password"
    secret.write_text(password + "\n")
    return write_config(tmp_path / "edge.toml", device_id=DEVICE, state_dir=tmp_path / "state", port=port,
                        username=DEVICE, password_file=str(secret))


def _cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", "check", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_it_waits_for_the_daemon_that_starts_and_not_for_the_one_before(broker: Mosquitto, tmp_path: Path) -> None:
    config = _config(tmp_path, broker.port)
    cfg = load_config(config, environ={})
    since = time.time()
    found: list[OnlineResult] = []
    waiter = threading.Thread(target=lambda: found.append(wait_online(cfg, since, 30)))
    waiter.start()
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.start()
        waiter.join(40)
        assert found, "wait_online did not return"
        res = found[0]
        assert res.online and res.state == "online" and res.error is None, res
        assert res.started is not None and res.started >= since - 1
        assert res.line(30).startswith(f"{TOPIC}: online (started ")
    finally:
        daemon.stop()
    # The clean stop left a retained "offline": a later start is waited for, and not seen.
    t0 = time.monotonic()
    res = wait_online(cfg, time.time(), 1.0)
    assert not res.online and res.state == "offline" and res.error is None
    assert 0.9 <= time.monotonic() - t0 < 10
    assert res.line(1.0) == f"{TOPIC} did not say online within 1 s (last state: offline)"


def test_a_status_left_by_an_earlier_start_does_not_count(broker: Mosquitto, tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, broker.port), environ={})
    fleet = Probe(broker, username="fleet", password=PASSWORDS["fleet"]).connect()
    try:
        earlier = time.time() - 120
        fleet.publish(TOPIC, {"state": "online", "device_id": DEVICE, "started": earlier}, retain=True)
        res = wait_online(cfg, time.time(), 1.0)
        assert not res.online and res.state == "online" and res.started == pytest.approx(earlier)
        assert "did not say online within 1 s (last state: online, but started " in res.line(1.0)
        assert "a status left by an earlier start" in res.line(1.0)
        # since 0 (the service was already running, nothing restarted): any online status.
        assert wait_online(cfg, 0, 5.0).online
    finally:
        fleet.close()


def test_a_refused_login_and_no_broker_are_one_line(broker: Mosquitto, tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, broker.port, password="wrong"), environ={})
    t0 = time.monotonic()
    res = wait_online(cfg, 0, 20.0)
    assert time.monotonic() - t0 < 10  # refused at once, not after the timeout
    assert not res.online and res.error is not None and "refused the login" in res.error
    assert res.line(20.0) == f"{TOPIC}: {res.error}" and "\n" not in res.line(20.0)

    nobody = load_config(_config(tmp_path, free_port()), environ={})
    res = wait_online(nobody, 0, 1.5)
    assert not res.online and res.error is not None
    assert "cannot ask the broker: connection to 127.0.0.1:" in res.error and "refused" in res.error


def test_the_check_command(broker: Mosquitto, tmp_path: Path) -> None:
    config = _config(tmp_path, broker.port)
    since = time.time()
    proc = _cli(config, "--mqtt-online-since", str(since), "--timeout", "1")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"edge-voice: {TOPIC} did not say online within 1 s (last state: nothing received)\n"
    proc = _cli(config, "--mqtt-online-since", str(since), "--timeout", "1", "--json")
    assert proc.returncode == 1, proc.stderr
    body = json.loads(proc.stdout)
    assert (body["online"], body["state"], body["topic"]) == (False, None, TOPIC)

    fleet = Probe(broker, username="fleet", password=PASSWORDS["fleet"]).connect()
    try:
        fleet.publish(TOPIC, {"state": "online", "device_id": DEVICE, "started": since + 1}, retain=True)
    finally:
        fleet.close()
    proc = _cli(config, "--mqtt-online-since", str(since), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    body = json.loads(proc.stdout)
    assert body["online"] is True and body["started"] == pytest.approx(since + 1) and body["error"] is None
    proc = _cli(config, "--mqtt-online-since", str(since))
    assert proc.returncode == 0 and proc.stdout.startswith(f"{TOPIC}: online (started ")

    proc = _cli(config, "--json")
    assert proc.returncode == 1
    assert proc.stderr == "edge-voice: error: --timeout and --json go with --mqtt-online-since\n"
    off = write_config(tmp_path / "off.toml", device_id=DEVICE, state_dir=tmp_path / "state", port=broker.port,
                       enabled=False)
    proc = _cli(off, "--mqtt-online-since", "0")
    assert proc.returncode == 1 and "mqtt.enabled is false" in proc.stderr and proc.stderr.count("\n") == 1
