"""`edge-voice fleet rollout` against a real Mosquitto and an HTTP mirror, with light devices: the
real MQTT bridge and rollout manager of each device, a real model store, and a fake pipeline
(no models: the daemons' own test is tests/test_rollout_daemons.py). Waves and the abort rule,
--dry-run, an offline device that catches up, --resume after the operator's CLI is killed, and
the one-line errors of bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mosquitto import Mosquitto, Probe
from mqtt_daemon import RecordingController
from test_rollout import (
    MODEL,
    NEW,
    FakeHost,
    Keys,
    Mirror,
    device_config,
    install_version,
    make_keys,
    publish,
)

from edge import __version__
from edge.models.store import ModelStore
from edge.mqtt.client import MqttBridge
from edge.rollout.manager import RolloutManager

REPO = Path(__file__).resolve().parents[1]
OLD = {k: v.replace(b"v2", b"v1") for k, v in NEW.items()}


class Controller(RecordingController):
    def __init__(self) -> None:
        super().__init__()
        self.manager: RolloutManager | None = None

    def rollout(self, request: Any) -> dict:
        assert self.manager is not None
        return self.manager.request(request)


class BridgeReport:
    def __init__(self, bridge: MqttBridge) -> None:
        self.bridge = bridge

    def rollout_event(self, event_type: str, body: dict[str, Any]) -> None:
        self.bridge.publish_record(event_type, body)

    def rollout_status(self, status: dict[str, Any] | None, versions: dict[str, Any]) -> None:
        self.bridge.set_status_fields(rollout=status, versions=versions)


class LightDevice:
    """A device's MQTT bridge and rollout manager in this process; its pipeline is a fake."""

    def __init__(self, tmp: Path, device_id: str, broker: Mosquitto, keys: Keys, mirrors: list[str],
                 tags: list[str], host: FakeHost | None = None, models: dict[str, str] | None = None) -> None:
        self.id = device_id
        self.dir = tmp / device_id
        cfg = device_config(self.dir, public_key=keys.public, mirrors=mirrors)
        self.cfg = dataclasses.replace(
            cfg, device=dataclasses.replace(cfg.device, id=device_id, tags=tags),
            mqtt=dataclasses.replace(cfg.mqtt, enabled=True, host=broker.host, port=broker.port, keepalive_s=5))
        self.store = ModelStore(self.cfg.models_dir)
        if not self.store.current(MODEL):
            self.old = install_version(self.store, MODEL, OLD)
        self.host = host or FakeHost()
        self.models = models or self.cfg.model_ids()
        self.bridge: MqttBridge | None = None
        self.manager: RolloutManager | None = None

    def start(self) -> LightDevice:
        ctl = Controller()
        self.bridge = MqttBridge(self.cfg.mqtt, self.id, self.cfg.state_dir, ctl, version=__version__,
                                 models=self.models, tags=self.cfg.device.tags, reconnect_min_s=0.2,
                                 reconnect_max_s=1.0)
        self.manager = ctl.manager = RolloutManager(self.cfg, self.host, BridgeReport(self.bridge),
                                                    cache_dir=self.dir / "cache")
        self.bridge.start()
        self.manager.start()
        return self

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.stop()
        if self.bridge is not None:
            self.bridge.stop(3.0)
        self.manager = self.bridge = None


def fleet(broker: Mosquitto, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", "fleet", *args, "--host", broker.host, "--port",
                           str(broker.port)], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@dataclasses.dataclass
class Fleet:
    broker: Mosquitto
    mirror: Mirror
    keys: Keys
    tmp: Path
    devices: dict[str, LightDevice] = dataclasses.field(default_factory=dict)

    def add(self, device_id: str, tags: list[str], **kw: Any) -> LightDevice:
        d = LightDevice(self.tmp, device_id, self.broker, self.keys, [self.mirror.url], tags, **kw)
        self.devices[device_id] = d
        return d


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Fleet]:
    keys = make_keys(tmp_path / "keys")
    with Mosquitto(tmp_path / "broker") as broker, Mirror(tmp_path / "mirror") as mirror:
        f = Fleet(broker, mirror, keys, tmp_path)
        try:
            yield f
        finally:
            for d in f.devices.values():
                d.stop()


def wait_online(broker: Mosquitto, ids: list[str], offline: list[str] = ()) -> None:  # type: ignore[assignment]
    probe = Probe(broker).connect()
    try:
        probe.subscribe("edge/+/status")

        def ready(ms: list) -> bool:
            last = {m.topic.split("/")[1]: m.json() for m in ms if m.payload}
            return all(d in last and last[d]["state"] != "offline" for d in ids) and \
                all(d in last and last[d]["state"] == "offline" for d in offline)

        probe.wait_for(ready, 30, f"{ids} online, {list(offline)} offline")
    finally:
        probe.close()


def test_waves_stop_on_the_abort_rule_and_dry_run_lists_the_plan(world: Fleet) -> None:
    version = publish(world.mirror, world.keys, NEW)
    tags = ["site:test"]
    world.add("booth-a", tags).start()
    world.add("booth-b", tags).start()
    world.add("booth-c", tags, host=FakeHost(hears="a quick brown fox")).start()  # fails its self-test
    world.add("booth-d", tags).start()
    world.add("booth-e", tags, models={"stt": "zipformer-en-2023-06-26"}).start()  # does not use the model
    wait_online(world.broker, list(world.devices))
    args = ["rollout", "--model", MODEL, "--version", version, "--mirror", world.mirror.url, "--tag", "site:test",
            "--wave", "3", "--max-fail-percent", "20", "--timeout", "60"]

    dry = fleet(world.broker, *args, "--dry-run")
    print(dry.stdout, dry.stderr)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert "in 2 wave(s) of 3" in lines[0]
    assert [ln.split()[1:3] for ln in lines[1:5]] == [["1", "booth-a"], ["1", "booth-b"], ["1", "booth-c"],
                                                      ["2", "booth-d"]]
    assert f"{world.devices['booth-a'].old} -> {version}" in lines[1]
    assert "skip" in lines[5] and "booth-e" in lines[5] and "does not use model" in lines[5]
    assert ModelStore(world.devices["booth-a"].cfg.models_dir).current(MODEL) == world.devices["booth-a"].old

    t0 = time.monotonic()
    run = fleet(world.broker, *args, "--json")
    print(f"rollout took {time.monotonic() - t0:.1f} s\n{run.stderr}")
    assert run.returncode == 3, run.stdout + run.stderr
    report = json.loads(run.stdout)
    states = {d["device_id"]: d["state"] for d in report["devices"]}
    assert states == {"booth-a": "confirmed", "booth-b": "confirmed", "booth-c": "rolled_back",
                      "booth-d": "not started"}, report
    assert report["state"] == "stopped" and "20" in report["stopped"] and report["skipped"] == {
        "booth-e": "does not use model whisper-tiny-en"}
    c = next(d for d in report["devices"] if d["device_id"] == "booth-c")
    assert c["error"]["code"] == "rollout.selftest" and c["selftest"]["ok"] is False
    for name in ("booth-a", "booth-b"):
        assert world.devices[name].store.current(MODEL) == version
    for name in ("booth-c", "booth-d"):
        assert world.devices[name].store.current(MODEL) == world.devices[name].old
    assert "wave 1/2" in run.stderr and "stopped by the abort rule" in run.stderr
    assert "fetching" in run.stderr and "booth-c" in run.stderr
    # booth-d never got anything: no desired state left for it either.
    devices = json.loads(fleet(world.broker, "devices", "--json").stdout)
    shown = {d["device_id"]: (d["status"].get("rollout") or {}).get("state") for d in devices}
    assert shown == {"booth-a": "confirmed", "booth-b": "confirmed", "booth-c": "rolled_back", "booth-d": None,
                     "booth-e": None}
    assert world.devices["booth-d"].host.loaded == []


def test_an_offline_device_catches_up_and_resume_picks_a_rollout_up_again(world: Fleet) -> None:
    version = publish(world.mirror, world.keys, NEW)
    tags = ["site:late"]
    a = world.add("late-a", tags)
    a.host.block = __import__("threading").Event()  # late-a's load waits until we let it
    a.start()
    b = world.add("late-b", tags).start()
    c = world.add("late-c", tags).start()
    wait_online(world.broker, ["late-a", "late-b", "late-c"])
    c.stop()  # late-c goes offline before the rollout
    wait_online(world.broker, ["late-a", "late-b"], offline=["late-c"])

    cmd = [sys.executable, "-m", "edge", "fleet", "rollout", "--model", MODEL, "--version", version, "--mirror",
           world.mirror.url, "--tag", "site:late", "--wave", "1", "--timeout", "60", "--host", world.broker.host,
           "--port", str(world.broker.port)]
    cli = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        # Wave 1 (late-a) is loading; the operator's laptop goes away.
        deadline = time.monotonic() + 60
        while not a.host.loaded and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.host.loaded, "late-a never began loading"
    finally:
        os.kill(cli.pid, signal.SIGKILL)
        out, err = cli.communicate()
    print(err)
    a.host.block.set()  # the device carries on without the CLI
    resumed = fleet(world.broker, "rollout", "--resume", "--json", "--timeout", "5")
    print(resumed.stderr)
    assert resumed.returncode == 3, resumed.stdout + resumed.stderr  # late-c is still offline
    report = json.loads(resumed.stdout)
    states = {d["device_id"]: d["state"] for d in report["devices"]}
    assert states == {"late-a": "confirmed", "late-b": "confirmed", "late-c": "queued"}, report
    assert "resuming rollout" in resumed.stderr and "offline: queued" in resumed.stderr
    rollout_id = report["rollout_id"]
    assert b.store.current(MODEL) == version

    # late-c comes back: it reads its retained desired state and rolls the version out by itself.
    c.start()
    deadline = time.monotonic() + 60
    while c.store.current(MODEL) != version and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.store.current(MODEL) == version
    time.sleep(1.0)  # its status reaches the broker
    shown = fleet(world.broker, "rollout", "--resume", rollout_id, "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    report = json.loads(shown.stdout)
    assert report["state"] == "done" and {d["state"] for d in report["devices"]} == {"confirmed"}
    late = next(d for d in report["devices"] if d["device_id"] == "late-c")
    print("late-c timings", late["timings_ms"])


def test_bad_input_is_one_line(world: Fleet) -> None:
    version = publish(world.mirror, world.keys, NEW)
    world.add("booth-x", ["site:x"]).start()
    wait_online(world.broker, ["booth-x"])
    base = ["rollout", "--model", MODEL, "--version", version, "--mirror", world.mirror.url, "--tag", "site:x"]
    other = make_keys(world.tmp / "other-keys")
    cases = {
        "unknown model": (["rollout", "--model", "no-such", "--version", version, "--mirror", world.mirror.url,
                           "--all"], "unknown model id 'no-such'"),
        "unknown version": ([*base[:4], "0123456789ab", *base[5:]], "unknown version"),
        "bad signature": ([*base, "--public-key", str(other.public)], "bad signature"),
        "unreachable mirror": ([*base[:5], "--mirror", "http://127.0.0.1:9/", *base[7:]], "unreachable"),
        "tag matching nothing": ([*base[:7], "--tag", "site:nowhere"], "no device carries the tag 'site:nowhere'"),
        "no version": (["rollout", "--model", MODEL, "--all"], "--version V and --mirror URL"),
    }
    for what, (args, expected) in cases.items():
        proc = fleet(world.broker, *args)
        lines = proc.stderr.strip().splitlines()
        print(what, "->", proc.stderr.strip())
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("edge-voice: error: "), \
            (what, proc.stderr)
        assert expected in lines[0], (what, lines[0])
    # A mirror the device's allow-list does not name: the device refuses; nothing changes.
    alias = world.mirror.url.replace("127.0.0.1", "localhost")
    proc = fleet(world.broker, *base[:5], "--mirror", alias, *base[7:], "--json", "--no-preflight")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    [dev] = json.loads(proc.stdout)["devices"]
    assert dev["state"] == "refused" and dev["error"]["code"] == "rollout.mirror_not_allowed", dev
    assert world.devices["booth-x"].store.current(MODEL) == world.devices["booth-x"].old


def test_keygen_and_sign_from_the_command_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def edge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge", "fleet", *args], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=60)

    made = edge("keygen", "--out", str(tmp_path / "fleet"))
    assert made.returncode == 0, made.stderr
    assert oct((tmp_path / "fleet.key").stat().st_mode & 0o777) == "0o600"
    again = edge("keygen", "--out", str(tmp_path / "fleet"))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    mirror = tmp_path / "mirror"
    (mirror / "whisper-tiny.en").mkdir(parents=True)
    for name, data in NEW.items():
        (mirror / "whisper-tiny.en" / name).write_bytes(data)
    signed = edge("sign", "--key", str(tmp_path / "fleet.key"), "--mirror", str(mirror), "--model", MODEL)
    assert signed.returncode == 0, signed.stderr
    version = signed.stdout.strip().splitlines()[-1]
    assert (mirror / "releases" / "model" / MODEL / f"{version}.json.sig").is_file()
    wrong = edge("sign", "--key", str(tmp_path / "fleet.pub"), "--mirror", str(mirror), "--model", MODEL)
    assert wrong.returncode == 1 and wrong.stderr.startswith("edge-voice: error: ") and "private key" in wrong.stderr
    broken = tmp_path / "mirror" / "packs" / "harbour-museum"
    broken.mkdir(parents=True)
    (broken / "pack.toml").write_text('id = "harbour-museum"\nversion = 1\n')
    bad_pack = edge("sign", "--key", str(tmp_path / "fleet.key"), "--mirror", str(mirror), "--pack", "harbour-museum")
    print(bad_pack.stderr)
    assert bad_pack.returncode == 1 and len(bad_pack.stderr.strip().splitlines()) == 1
