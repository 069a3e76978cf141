"""The fleet commands against the real daemon: `edge-voice run` with file devices and the dev
models, tags from its config, a spoken turn; `fleet devices`, `tail`, `cmd` and `record` see it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mosquitto import Mosquitto, Probe
from procs import stop_process
from voice import conversation, wer

from edge.audio.wav import write_wav
from edge.fleet.store import open_store

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "config" / "dev.toml"
DEVICE = "booth-12"
TAGS = ["site:gare-du-nord", "booth:phone", "lang:en"]
QUESTION = "What is the capital of France?"


def _models_root() -> Path:
    from edge.models.registry import ModelRegistry

    return ModelRegistry().root


def _fleet(broker: Mosquitto, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "edge", "fleet", *args, "--host", broker.host, "--port",
                           str(broker.port)], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def _device(broker: Mosquitto) -> dict:
    proc = _fleet(broker, "devices", "--json", "--device", DEVICE)
    assert proc.returncode == 0, proc.stderr
    [device] = json.loads(proc.stdout)
    return device


def test_fleet_commands_against_the_real_daemon(tmp_path: Path) -> None:
    mic = tmp_path / "mic.wav"
    # Silence first: the fleet's tail is listening before the visitor speaks.
    write_wav(mic, conversation(8.0, "Hey Jarvis.", 0.4, QUESTION, 3.0), 16000)
    with Mosquitto(tmp_path / "broker") as broker:
        cfg = tmp_path / "config.toml"
        cfg.write_text(DEV.read_text() + f"""
[device]
id = "{DEVICE}"
tags = {json.dumps(TAGS)}

[mqtt]
enabled = true
host = "{broker.host}"
port = {broker.port}
keepalive_s = 5
""")
        env = dict(os.environ, EDGE_VOICE_STATE_DIR=str(tmp_path / "state"),
                   EDGE_VOICE_AUDIO__INPUT_DEVICE=f"file:{mic}",
                   EDGE_VOICE_AUDIO__OUTPUT_DEVICE=f"file:{tmp_path / 'speaker.wav'}",
                   EDGE_VOICE_DEVICE__MODELS_DIR=str(_models_root()), PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        db = tmp_path / "events.sqlite3"
        recorder = subprocess.Popen([sys.executable, "-m", "edge", "fleet", "record", "--db", str(db), "--host",
                                     broker.host, "--port", str(broker.port), "--json", "--log-level", "info"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        daemon = tail = None
        probe = Probe(broker).connect()
        try:
            assert recorder.stderr is not None
            for line in recorder.stderr:
                if "recording events" in line:
                    break
            probe.subscribe(f"edge/{DEVICE}/#")
            with open(tmp_path / "daemon.log", "wb") as log:
                daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=REPO,
                                          env=env, stdout=subprocess.DEVNULL, stderr=log)
            probe.wait_for(lambda ms: any(m.topic.endswith("/status") and m.json()["state"] != "offline"
                                          for m in ms), 120, "the daemon online")
            tail = subprocess.Popen([sys.executable, "-m", "edge", "fleet", "tail", "--json", "--count", "1",
                                     "--tag", "booth:phone", "--type", "transcript.final", "--host", broker.host,
                                     "--port", str(broker.port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=REPO, env=env)

            device = _device(broker)
            assert device["online"] and device["tags"] == sorted(TAGS)
            assert device["models"]["llm"] == "smollm2-135m-instruct" and device["version"]
            assert device["knowledge"] is None

            out, err = tail.communicate(timeout=120)
            assert tail.returncode == 0, err
            heard = json.loads(out.strip().splitlines()[0])
            assert heard["device_id"] == DEVICE and wer(QUESTION, heard["text"]) <= 0.3, heard

            probe.wait_for(lambda ms: any(m.topic.endswith("/event/turn.end") for m in ms), 120, "the turn's end")
            last = probe.wait_for(lambda ms: next((m.json()["last_turn"] for m in reversed(ms)
                                                   if m.topic.endswith("/status") and m.json().get("last_turn")),
                                                  None), 20, "the last turn in the status")
            assert last["outcome"] == "done" and last["first_audio_ms"] > 0
            shown = _device(broker)["last_turn"]
            assert shown["turn_id"] == last["turn_id"]
            table = _fleet(broker, "devices")
            assert DEVICE in table.stdout and "done" in table.stdout and "site:gare-du-nord" in table.stdout

            status = _fleet(broker, "cmd", "status", "--device", DEVICE, "--json")
            assert status.returncode == 0, status.stdout + status.stderr
            answer = json.loads(status.stdout)["devices"][0]["answer"]
            assert answer["ok"] is True and answer["device_id"] == DEVICE and answer["mqtt"]["connected"] is True
            said = _fleet(broker, "cmd", "say", "Hello from the fleet", "--tag", "lang:en")
            assert said.returncode == 0 and "say: 1 answered" in said.stdout, said.stdout + said.stderr
            probe.wait_for(lambda ms: any(m.topic.endswith("/event/tts.end") and m.json().get("turn_id") and
                                          m.json()["turn_id"] != last["turn_id"] for m in ms), 60, "the fleet's words")
            stop_process(daemon, 30)
            assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text(errors="replace")[-3000:]
            offline = _device(broker)
            assert offline["state"] == "offline" and offline["reason"] == "stopped"
            assert offline["tags"] == sorted(TAGS)
            time.sleep(1)  # the last events reach the recorder
        finally:
            if tail is not None and tail.poll() is None:
                tail.kill()
            if daemon is not None:
                stop_process(daemon, 30)
            probe.close()
            stop_process(recorder, 20)
    final = json.loads((recorder.stdout.read() if recorder.stdout else "").strip().splitlines()[-1])
    assert final["stored"] > 0 and final["unreadable"] == 0
    store = open_store(str(db))
    assert store.count() == final["stored"]
    store.close()
    import sqlite3

    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT device_id, session_id, turn_id, text FROM events "
                           "WHERE type = 'transcript.final'").fetchall()
    assert len(rows) == 1 and rows[0][0] == DEVICE and rows[0][1] and rows[0][2] == last["turn_id"]
    assert wer(QUESTION, rows[0][3]) <= 0.3
