"""`edge-voice fleet devices|tail|cmd|record` against simulated devices (the real bridge in a
worker process) on a real Mosquitto; bad input ends in one line naming the thing and the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mosquitto import Mosquitto, Probe, free_port, make_ca, make_cert
from mqtt_daemon import DaemonProcess, write_config
from procs import stop_process

from edge.fleet.client import FleetClient
from edge.fleet.config import FleetConfig
from edge.fleet.simulate import WorkerProcess, start_workers, tags_for
from edge.fleet.store import open_store
from edge.fleet.tail import Tail

REPO = Path(__file__).resolve().parents[1]
N = 6
IDS = [f"sim-{i:05d}" for i in range(N)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, WorkerProcess]]:
    tmp = tmp_path_factory.mktemp("fleet")
    with Mosquitto(tmp / "broker") as broker:
        worker = start_workers(devices=N, processes=1, host=broker.host, port=broker.port, prefix="edge",
                               state_dir=tmp / "devices", log_dir=tmp, keepalive=5)[0]
        try:
            worker.wait_for("ready", 60)
            probe = Probe(broker).connect()
            probe.subscribe("edge/+/status")
            probe.wait_for(lambda ms: len({m.topic for m in ms if m.json().get("state") == "online"}) >= N, 30,
                           "every simulated device online")
            probe.close()
            yield broker, worker
        finally:
            worker.quit(30)


def fleet_cli(broker: Mosquitto | int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    port = broker if isinstance(broker, int) else broker.port
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("EDGE_VOICE_FLEET_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "edge", "fleet", *args, "--host", "127.0.0.1", "--port", str(port)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-voice: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_devices_shows_every_simulated_device_with_its_tags(fleet: tuple[Mosquitto, WorkerProcess]) -> None:
    broker, _ = fleet
    proc = fleet_cli(broker, "devices", "--json")
    assert proc.returncode == 0, proc.stderr
    devices = json.loads(proc.stdout)
    assert [d["device_id"] for d in devices] == IDS
    for d in devices:
        assert d["state"] == "online" and d["online"] is True and d["tags"] == sorted(tags_for(d["device_id"]))
        assert d["version"] and d["models"] == {"llm": "simulated", "stt": "simulated", "tts": "simulated"}
        assert d["knowledge"] is None and d["since"] > 0
    table = fleet_cli(broker, "devices")
    assert table.returncode == 0 and table.stdout.splitlines()[0].startswith("DEVICE")
    assert len(table.stdout.splitlines()) == N + 1 and f"{N} device(s): {N} online, 0 offline" in table.stderr
    french = json.loads(fleet_cli(broker, "devices", "--json", "--tag", "lang:fr").stdout)
    assert [d["device_id"] for d in french] == ["sim-00000", "sim-00005"]


def test_tail_filters_by_type_and_tag_and_shared_tails_split_the_stream(
        fleet: tuple[Mosquitto, WorkerProcess]) -> None:
    broker, worker = fleet
    cfg = FleetConfig(host=broker.host, port=broker.port)
    outs = [open(os.devnull, "w") for _ in range(3)]
    tails = [Tail(FleetClient(cfg).connect(), share="ops", as_json=True, out=outs[0]),
             Tail(FleetClient(cfg).connect(), share="ops", as_json=True, out=outs[1]),
             Tail(FleetClient(cfg).connect(), as_json=True, out=outs[2])]
    seen: list[list[str]] = [[], [], []]
    lock = threading.Lock()
    for i, tail in enumerate(tails):
        tail.start()
        on_message = tail.client._handler

        def record(msg, i=i, on_message=on_message) -> None:  # type: ignore[no-untyped-def]
            if "/event/" in msg.topic:
                with lock:
                    seen[i].append(json.loads(msg.payload)["message_id"])
            on_message(msg)

        tail.client.set_handler(record)
    try:
        worker.send("start 1")
        proc = fleet_cli(broker, "tail", "--json", "--count", "5", "--type", "turn.end", "--type", "wake")
        assert proc.returncode == 0, proc.stderr
        got = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(got) == 5 and {e["type"] for e in got} <= {"turn.end", "wake"}
        phones = fleet_cli(broker, "tail", "--json", "--count", "6", "--tag", "booth:phone")
        assert {json.loads(line)["device_id"] for line in phones.stdout.splitlines()} <= {"sim-00001", "sim-00003",
                                                                                         "sim-00005"}
        human = fleet_cli(broker, "tail", "--count", "3", "--device", "sim-00002", "--share", "cli")
        assert human.returncode == 0 and len(human.stdout.splitlines()) == 3
        assert all(" sim-00002 " in line for line in human.stdout.splitlines())
    finally:
        worker.send("stop")
    time.sleep(8)  # the turns under way end (6 s) and their events arrive
    emitted = sum(d["emitted"] for d in worker.report()["devices"].values())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if len(set(seen[2])) >= 1 and set(seen[0]) | set(seen[1]) == set(seen[2]):
                break
        time.sleep(0.1)
    for tail in tails:
        tail.client.close()
    for out in outs:
        out.close()
    a, b, everything = set(seen[0]), set(seen[1]), set(seen[2])
    assert a and b and not a & b, "a shared subscription gave an event to both tails of the group"
    assert a | b == everything and 0 < len(everything) <= emitted


def test_cmd_gathers_answers_refusals_and_silence(fleet: tuple[Mosquitto, WorkerProcess]) -> None:
    broker, _ = fleet
    ok = fleet_cli(broker, "cmd", "say", "Welcome to the station", "--all")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().startswith(f"say: {N} answered, 0 refused, 0 no answer (of {N} device(s)); round trip")

    spy = Probe(broker).connect()
    spy.subscribe("edge/sim-00002/cmd/#")
    assert fleet_cli(broker, "cmd", "volume", "0.3", "--device", "sim-00002", "--expiry", "30").returncode == 0
    sent = spy.wait_for(lambda ms: ms and ms[-1], 10, "the command as sent")
    body = sent.json()
    assert body["volume"] == 0.3 and body["request_id"] and abs(body["expires_at"] - time.time() - 30) < 10
    assert sent.correlation == body["request_id"].encode()
    spy.close()

    assert fleet_cli(broker, "cmd", "mute", "--device", "sim-00001").returncode == 0
    try:
        mixed = fleet_cli(broker, "cmd", "listen", "--tag", "booth:phone")
        assert mixed.returncode == 3, mixed.stdout + mixed.stderr
        assert "sim-00001            refused: audio.muted: the microphone is muted" in mixed.stdout
        assert "listen: 2 answered, 1 refused, 0 no answer (of 3 device(s))" in mixed.stdout

        waves = fleet_cli(broker, "cmd", "listen", "--all", "--wave", "2", "--json")
        assert waves.returncode == 3
        report = json.loads(waves.stdout)
        assert report["counts"] == {"answered": 1, "refused": 1, "no answer": 0, "offline": 0, "not started": 4}
        assert report["stopped"].startswith("wave 1 of 3: 1 of 2 device(s) failed (50%")
        waves = fleet_cli(broker, "cmd", "listen", "--all", "--wave", "2", "--max-fail-percent", "50", "--json")
        assert json.loads(waves.stdout)["counts"]["answered"] == N - 1
    finally:
        assert fleet_cli(broker, "cmd", "unmute", "--device", "sim-00001").returncode == 0

    ghost = Probe(broker).connect()  # a retained status with nobody behind it, and one offline
    ghost.publish("edge/ghost-1/status", {"state": "online", "tags": ["site:nowhere"]}, retain=True)
    ghost.publish("edge/gone-1/status", {"state": "offline", "reason": "stopped", "time": time.time()}, retain=True)
    try:
        silent = fleet_cli(broker, "cmd", "status", "--tag", "site:nowhere", "--timeout", "1")
        assert silent.returncode == 3 and "ghost-1              no answer" in silent.stdout
        assert "status: 0 answered, 0 refused, 1 no answer (of 1 device(s))" in silent.stdout
        offline = fleet_cli(broker, "cmd", "status", "--device", "gone-1", "--device", "sim-00003")
        assert offline.returncode == 3 and "gone-1               offline" in offline.stdout
        skipped = fleet_cli(broker, "cmd", "status", "--device", "gone-1", "--device", "sim-00003", "--skip-offline")
        assert skipped.returncode == 0 and "1 answered" in skipped.stdout
    finally:
        ghost.publish("edge/ghost-1/status", b"", retain=True)
        ghost.publish("edge/gone-1/status", b"", retain=True)
        ghost.close()


def test_cmd_reaches_an_mqtt_311_device_through_its_result_topic(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        cfg = write_config(tmp_path / "d.toml", device_id="old-1", state_dir=tmp_path / "state", port=broker.port,
                           protocol="3.1.1")
        d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            probe = Probe(broker).connect()
            probe.subscribe("edge/old-1/status")
            probe.wait_for(lambda ms: ms and ms[-1].json()["state"] == "online", 20, "online")
            probe.close()
            proc = fleet_cli(broker, "cmd", "say", "hello", "--device", "old-1", "--json")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            answer = json.loads(proc.stdout)["devices"][0]["answer"]
            assert answer["ok"] is True and answer["command"] == "say" and answer["device_id"] == "old-1"
        finally:
            d.stop()


def test_bad_input_is_one_line_naming_the_thing_and_the_fix(fleet: tuple[Mosquitto, WorkerProcess],
                                                            tmp_path: Path) -> None:
    broker, _ = fleet
    one_line_error(fleet_cli(broker, "cmd", "say", "hi", "--device", "kiosk-99"), "unknown device 'kiosk-99'",
                   "edge-voice fleet devices")
    one_line_error(fleet_cli(broker, "cmd", "say", "hi", "--tag", "site:mars"), "no device carries the tag 'site:mars'",
                   "lang:fr")
    one_line_error(fleet_cli(broker, "tail", "--tag", "site:mars"), "no device carries the tag 'site:mars'")
    one_line_error(fleet_cli(broker, "cmd", "shout", "--all"), "unknown command 'shout'", "known: say")
    one_line_error(fleet_cli(broker, "cmd", "say", "hi"), "--device ID, --tag TAG or --all")
    one_line_error(fleet_cli(broker, "tail", "--type", "turn.ended"), "unknown event type 'turn.ended'")
    one_line_error(fleet_cli(free_port(), "devices"), "cannot reach the MQTT broker at 127.0.0.1:",
                   "connection refused", "--host and --port")
    one_line_error(fleet_cli(broker, "devices", "--username", "ops", "--password-file", str(tmp_path / "none")),
                   "--password-file: cannot read")
    one_line_error(fleet_cli(broker, "record", "--db", str(tmp_path / "no" / "such" / "dir" / "e.db")),
                   "cannot open the event database", "directory exists")
    pg_port = free_port()
    line = one_line_error(fleet_cli(broker, "record", "--db", f"postgresql://edge:s3cret@127.0.0.1:{pg_port}/fleet"),
                          f"cannot reach the database postgresql://edge:***@127.0.0.1:{pg_port}/fleet",
                          "is PostgreSQL running there")
    assert "s3cret" not in line

    with Mosquitto(tmp_path / "locked", allow_anonymous=False, passwords={"ops": "right-pw"}) as locked:
        (tmp_path / "wrong").write_text("wrong-pw\n")
        (tmp_path / "right").write_text("right-pw\n")
        one_line_error(fleet_cli(locked, "devices", "--username", "ops", "--password-file", str(tmp_path / "wrong")),
                       f"the MQTT broker at 127.0.0.1:{locked.port} refused the login",
                       "--username and --password-file")
        one_line_error(fleet_cli(locked, "devices"), "refused the login")
        fine = fleet_cli(locked, "devices", "--username", "ops", "--password-file", str(tmp_path / "right"))
        assert fine.returncode == 0 and "no devices under edge/+/status" in fine.stderr


def test_record_keeps_every_event_once_across_a_killed_consumer(fleet: tuple[Mosquitto, WorkerProcess],
                                                               tmp_path: Path) -> None:
    broker, worker = fleet
    db = tmp_path / "events.sqlite3"
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def record(client_id: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edge", "fleet", "record", "--db", str(db), "--share", "rec",
                                 "--client-id", client_id, "--port", str(broker.port), "--host", "127.0.0.1",
                                 "--json", "--log-level", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=env)

    def wait_ready(p: subprocess.Popen) -> None:
        assert p.stderr is not None
        for line in p.stderr:
            if "recording events" in line:
                return
        raise AssertionError(f"record did not start (exit {p.wait()})")

    before = {d: v["emitted"] for d, v in worker.report()["devices"].items()}
    a, b = record("rec-a"), record("rec-b")
    try:
        wait_ready(a)
        wait_ready(b)
        worker.send("start 1")
        time.sleep(3)
        os.kill(a.pid, signal.SIGKILL)  # dies with events received and not yet acknowledged, perhaps
        a.wait()
        time.sleep(3)  # its share of the stream waits in its session on the broker
        a = record("rec-a")
        wait_ready(a)
        time.sleep(2)
    finally:
        worker.send("stop")
    time.sleep(7)  # the turns under way end
    emitted = {d: v["emitted"] - before[d] for d, v in worker.report()["devices"].items()}
    total = sum(emitted.values())
    store = open_store(str(db))
    deadline = time.monotonic() + 30
    while store.count() < total and time.monotonic() < deadline:
        time.sleep(0.2)
    counts = store.by_device()
    store.close()
    finals = []
    for p in (a, b):
        stop_process(p, 20)
        out = p.stdout.read() if p.stdout else ""
        finals.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(c.rows for c in counts.values()) == total > 0
    for device, n in emitted.items():  # every event of this test, once, in sequence
        c = counts[device]
        assert c.rows == c.distinct_seq == n and c.max_seq - c.min_seq + 1 == n, (device, c, n)
    assert all(f["stored"] > 0 for f in finals)


def test_mutual_tls_with_the_devices_options(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca, rogue = make_ca(pki, "fleet-ca"), make_ca(pki, "rogue-ca")
    server, ops = make_cert(pki, "broker", ca, server=True), make_cert(pki, "ops", ca, server=False)
    with Mosquitto(tmp_path / "broker", tls=(ca, server), require_certificate=True) as broker:
        tls = ["--tls", "--ca-file", str(ca.cert)]
        ok = fleet_cli(broker, "devices", *tls, "--cert-file", str(ops.cert), "--key-file", str(ops.key))
        assert ok.returncode == 0 and "no devices under edge/+/status" in ok.stderr, ok.stderr
        one_line_error(fleet_cli(broker, "devices", *tls), "--cert-file/--key-file")
        one_line_error(fleet_cli(broker, "devices", "--tls", "--ca-file", str(rogue.cert)), "is not trusted",
                       "--ca-file")
        one_line_error(fleet_cli(broker, "devices", "--ca-file", str(ca.cert)), "--ca-file is set but --tls is false")
        one_line_error(fleet_cli(broker, "devices"), "closed the connection before accepting it")


def test_a_recorder_away_during_a_broker_restart_loses_nothing(tmp_path: Path) -> None:
    """Its session and plain subscription survive the restart (Mosquitto keeps both on disk):
    what the devices send meanwhile waits for it."""
    db = tmp_path / "events.sqlite3"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        def record() -> subprocess.Popen:
            p = subprocess.Popen([sys.executable, "-m", "edge", "fleet", "record", "--db", str(db), "--client-id",
                                  "rec-solo", "--port", str(broker.port), "--host", "127.0.0.1", "--json",
                                  "--log-level", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=REPO, env=env)
            assert p.stderr is not None
            for line in p.stderr:
                if "recording events" in line:
                    return p
            raise AssertionError(f"record did not start (exit {p.wait()})")

        stop_process(record(), 20)
        broker.restart()
        worker = start_workers(devices=3, processes=1, host=broker.host, port=broker.port, prefix="edge",
                               state_dir=tmp_path / "devices", log_dir=tmp_path)[0]
        try:
            worker.wait_for("ready", 60)
            worker.send("start 1")
            time.sleep(4)
            worker.send("stop")
            time.sleep(7)  # the turns under way end; every event has gone to the broker by now
            emitted = {d: v["emitted"] for d, v in worker.report()["devices"].items()}
            assert all(v["depth"] == 0 for v in worker.report()["devices"].values())
            again = record()  # only now does a consumer come back
            store = open_store(str(db))
            deadline = time.monotonic() + 30
            while store.count() < sum(emitted.values()) and time.monotonic() < deadline:
                time.sleep(0.2)
            counts = store.by_device()
            store.close()
            stop_process(again, 20)
        finally:
            worker.quit(30)
    assert sum(emitted.values()) > 0
    for device, n in emitted.items():
        c = counts[device]
        assert (c.rows, c.distinct_seq, c.min_seq, c.max_seq) == (n, n, 1, n), (device, c)
