"""The real daemon (`edge-voice run`) and `simulate` against a real Mosquitto.

The daemon's microphone is a WAV file played in real time (``file:`` device) with the dev
models, its speaker a WAV file. The fleet side is `mosquitto_sub`/`mosquitto_pub`-like
clients (and the real `mosquitto_pub` for the `say` command).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

from mosquitto import Mosquitto, Probe
from procs import stop_process
from voice import conversation, wer

from edge.audio.wav import write_wav

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "config" / "dev.toml"
QUESTION = "What is the capital of France?"
DEVICE = "kiosk-7"


def write_config(path: Path, broker: Mosquitto, *, keepalive: int = 5) -> Path:
    path.write_text(DEV.read_text() + f"""
[device]
id = "{DEVICE}"

[mqtt]
enabled = true
host = "{broker.host}"
port = {broker.port}
protocol = "3.1.1"
keepalive_s = {keepalive}
metrics_interval_s = 2.0
""")
    return path


def start_daemon(tmp: Path, cfg: Path, mic: Path) -> subprocess.Popen:
    env = dict(os.environ, EDGE_VOICE_STATE_DIR=str(tmp / "state"),
               EDGE_VOICE_AUDIO__INPUT_DEVICE=f"file:{mic}",
               EDGE_VOICE_AUDIO__OUTPUT_DEVICE=f"file:{tmp / 'speaker.wav'}",
               EDGE_VOICE_DEVICE__MODELS_DIR=str(_models_root()))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "daemon.log", "wb"))


def _models_root() -> Path:
    from edge.models.registry import ModelRegistry

    return ModelRegistry().root


def stop_daemon(proc: subprocess.Popen, tmp: Path) -> str:
    stop_process(proc, 30)
    return (tmp / "daemon.log").read_text(errors="replace")


def events(probe: Probe, kind: str | None = None) -> list[dict]:
    prefix = f"edge/{DEVICE}/event/"
    out = [m.json() for m in probe.messages if m.topic.startswith(prefix)]
    return [e for e in out if kind is None or e["type"] == kind]


def status(probe: Probe) -> dict | None:
    msgs = probe.on_topic(f"edge/{DEVICE}/status")
    return msgs[-1].json() if msgs else None


def test_daemon_publishes_status_and_events_and_obeys_say(tmp_path: Path) -> None:
    mic = tmp_path / "mic.wav"
    write_wav(mic, conversation(1.0, "Hey Jarvis.", 0.4, QUESTION, 1.0), 16000)
    with Mosquitto(tmp_path / "broker") as broker:
        probe = Probe(broker, protocol="3.1.1").connect()
        probe.subscribe("edge/#")
        proc = start_daemon(tmp_path, write_config(tmp_path / "config.toml", broker), mic)
        try:
            probe.wait_for(lambda ms: (status(probe) or {}).get("state") == "online", 60, "status online")
            probe.wait_for(lambda ms: events(probe, "turn.end"), 60, "the spoken turn to end")
            final = events(probe, "transcript.final")
            assert len(final) == 1 and wer(QUESTION, final[0]["text"]) <= 0.2
            assert events(probe, "reply.final")[0]["text"].strip()
            for e in events(probe):
                assert e["device_id"] == DEVICE and e["message_id"] and e["seq"] >= 1
                assert e["turn_id"] or e["type"] == "state"  # the return to idle belongs to no turn
            seqs = [e["seq"] for e in events(probe)]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            # A late subscriber still gets the retained status.
            late = Probe(broker, protocol="3.1.1").connect()
            late.subscribe(f"edge/{DEVICE}/status")
            late.wait_for(lambda ms: ms and ms[-1].json()["state"] == "online", 10, "retained status")
            late.close()
            # The fleet says something through the real mosquitto_pub.
            probe.subscribe(f"edge/{DEVICE}/cmd/say/result")
            subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv311",
                            "-q", "1", "-t", f"edge/{DEVICE}/cmd/say",
                            "-m", json.dumps({"text": "hello", "request_id": "r-1"})], check=True, timeout=10)
            answer = probe.wait_for(lambda ms: next((m.json() for m in ms if m.topic.endswith("/say/result")), None),
                                    10, "the say answer")
            assert answer["ok"] is True and answer["request_id"] == "r-1"
            probe.wait_for(lambda ms: any(e["type"] == "tts.end" and e.get("turn_id") == answer["turn_id"]
                                          for e in events(probe)), 30, "the device to say hello")
            probe.wait_for(lambda ms: ms and probe.on_topic(f"edge/{DEVICE}/metrics"), 10, "metrics")
        finally:
            log = stop_daemon(proc, tmp_path)
        assert proc.returncode == 0, log
        probe.wait_for(lambda ms: (status(probe) or {}).get("state") == "offline", 10, "status offline")
        probe.close()
    # What the device said is in its speaker file.
    with wave.open(str(tmp_path / "speaker.wav")) as w:
        assert w.getnframes() / w.getframerate() > 1.0


def test_kill_9_makes_the_broker_publish_offline(tmp_path: Path) -> None:
    mic = tmp_path / "mic.wav"
    write_wav(mic, conversation(0.5), 16000)
    with Mosquitto(tmp_path / "broker") as broker:
        probe = Probe(broker, protocol="3.1.1").connect()
        probe.subscribe(f"edge/{DEVICE}/status")
        proc = start_daemon(tmp_path, write_config(tmp_path / "config.toml", broker, keepalive=5), mic)
        try:
            probe.wait_for(lambda ms: (status(probe) or {}).get("state") == "online", 60, "status online")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # The Last Will fires after 1.5 keep-alive periods without the client.
            probe.wait_for(lambda ms: (status(probe) or {}).get("state") == "offline", 20, "Last Will offline")
        finally:
            stop_daemon(proc, tmp_path)
            probe.close()


def test_broker_outage_during_a_run_loses_no_event(tmp_path: Path) -> None:
    mic = tmp_path / "mic.wav"
    # The question comes while the broker is down.
    write_wav(mic, conversation(5.0, "Hey Jarvis.", 0.4, QUESTION, 1.0), 16000)
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        # A persistent session: the broker keeps what arrives for the fleet while it reconnects.
        probe = Probe(broker, protocol="3.1.1", client_id="fleet", persistent=True).connect()
        probe.subscribe(f"edge/{DEVICE}/event/#")
        probe.subscribe(f"edge/{DEVICE}/status")
        proc = start_daemon(tmp_path, write_config(tmp_path / "config.toml", broker), mic)
        try:
            probe.wait_for(lambda ms: (status(probe) or {}).get("state") == "online", 60, "status online")
            broker.stop()
            time.sleep(12.0)  # wake word, question, reply: all produced with the broker away
            assert not events(probe)
            broker.restart()  # the probe's and the daemon's clients reconnect by themselves
            probe.wait_for(lambda ms: events(probe, "turn.end"), 60, "the turn's events after the outage")
        finally:
            log = stop_daemon(proc, tmp_path)
            probe.close()
    got = events(probe)
    by_id = {e["message_id"]: e for e in got}
    kinds = [e["type"] for e in sorted(by_id.values(), key=lambda e: e["seq"])]
    for kind in ("wake", "transcript.final", "reply.final", "tts.start", "tts.end", "turn.end"):
        assert kinds.count(kind) == 1, (kind, kinds, log[-2000:])
    seqs = sorted(e["seq"] for e in by_id.values())
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # no gap: nothing lost


def test_simulate_publishes_to_the_broker(tmp_path: Path) -> None:
    wav = tmp_path / "q.wav"
    write_wav(wav, conversation(0.6, "Hey Jarvis.", 0.4, QUESTION, 1.5), 16000)
    with Mosquitto(tmp_path / "broker") as broker:
        probe = Probe(broker, protocol="3.1.1").connect()
        probe.subscribe("edge/#")
        env = dict(os.environ, EDGE_VOICE_STATE_DIR=str(tmp_path / "state"),
                   EDGE_VOICE_DEVICE__MODELS_DIR=str(_models_root()))
        proc = subprocess.run([sys.executable, "-m", "edge", "simulate", "--config",
                               str(write_config(tmp_path / "config.toml", broker)), "--input", str(wav)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        probe.wait_for(lambda ms: events(probe, "turn.end"), 10, "events")
        printed = [json.loads(line) for line in proc.stdout.splitlines()]
        published = events(probe)
        # The same objects as simulate prints, plus the MQTT envelope.
        assert [e["type"] for e in published] == [e["type"] for e in printed]
        assert published[-1]["turn_id"] == printed[-1]["turn_id"]
        assert any(m.json().get("state") == "online" for m in probe.on_topic(f"edge/{DEVICE}/status"))
        probe.close()
