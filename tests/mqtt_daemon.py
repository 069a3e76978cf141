"""A small daemon for the MQTT tests: the real bridge, an event generator and a controller that
records the commands it gets. Run as a subprocess so tests can ``kill -9`` it.

    python tests/mqtt_daemon.py --config edge.toml

It reads lines on stdin: ``emit N INTERVAL [partials]`` produces N turns' worth of events
(numbered ``n`` from 0, continuing across emits), ``state NAME`` sets the status, ``depth``
prints the outbox depth, ``stop`` stops cleanly (so does SIGTERM). It writes JSON lines on
stdout (``started``, ``emitted``, ``depth``, ``stopped``) and logs to stderr.

``DaemonProcess`` and ``write_config`` are the helpers tests use to drive it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import edge
from edge.config import load_config
from edge.errors import EdgeError
from edge.events import Event, EventBus, EventType, new_id
from edge.mqtt import SETTINGS, MqttBridge

# One turn's events, in pipeline order; partials only when asked for.
TURN = (EventType.WAKE, EventType.TRANSCRIPT_FINAL, EventType.REPLY_FINAL, EventType.TTS_START,
        EventType.TTS_END, EventType.TURN_END)


class RecordingController:
    """Implements edge.mqtt.Controller and remembers every call, for ``status`` to report."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.muted = False
        self.volume = 1.0
        self.settings: dict[str, Any] = {}
        self.emit: Callable[[Event], None] = lambda e: None
        self._lock = threading.Lock()

    def _record(self, *call: Any) -> None:
        with self._lock:
            self.calls.append(list(call))

    def say(self, text: str) -> dict:
        self._record("say", text)
        return {"queued": True}

    def ask(self, text: str) -> dict:
        self._record("ask", text)
        turn = new_id()
        self.emit(Event(EventType.TRANSCRIPT_FINAL, {"text": text, "source": "command"}, turn_id=turn))
        self.emit(Event(EventType.REPLY_FINAL, {"text": f"You asked: {text}"}, turn_id=turn))
        return {"queued": True, "turn_id": turn}

    def listen(self) -> dict:
        if self.muted:
            raise EdgeError("the microphone is muted: send unmute first", code="audio.muted")
        self._record("listen")
        return {"listening": True}

    def cancel(self) -> dict:
        self._record("cancel")
        return {"cancelled": False}

    def mute(self) -> dict:
        self._record("mute")
        self.muted = True
        return {"muted": True}

    def unmute(self) -> dict:
        self._record("unmute")
        self.muted = False
        return {"muted": False}

    def set_volume(self, volume: float) -> dict:
        self._record("volume", volume)
        self.volume = volume
        return {"volume": volume}

    def set_setting(self, key: str, value: Any) -> dict:
        if key not in SETTINGS:  # the controller enforces the allow-list too
            raise EdgeError(f"{key}: not a runtime setting", code="cmd.forbidden")
        self._record("set", key, value)
        self.settings[key] = value
        return {"key": key, "value": value}

    def reload_models(self) -> dict:
        self._record("reload-models")
        return {"reloaded": ["llm"]}

    def handset(self, state: str) -> dict:
        self._record("handset", state)
        return {"handset": state, "changed": True}

    def status(self) -> dict:
        with self._lock:
            calls = [list(c) for c in self.calls]
        return {"calls": calls, "muted": self.muted, "volume": self.volume, "settings": dict(self.settings)}


def _print(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--reconnect-max", type=float, default=2.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if os.environ.get("MQTT_DAEMON_DEBUG") else logging.INFO,
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        ctl = RecordingController()
        bridge = MqttBridge(cfg.mqtt, cfg.device_id, cfg.state_dir, ctl, version=edge.__version__,
                            models={"llm": "smollm2-135m", "stt": "whisper-tiny.en"},
                            reconnect_min_s=0.2, reconnect_max_s=args.reconnect_max)
    except EdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bus = EventBus()
    bus.subscribe(bridge.publish_event)
    ctl.emit = bus.emit
    bridge.set_metrics_source(lambda: {"audio": {"queue_drops": 0}, "models": {"llm": "loaded"}})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counter = iter(range(10**9))
    emit_lock = threading.Lock()

    def generate(n: int, interval: float, partials: bool) -> None:
        with emit_lock:
            session = new_id()
            for _ in range(n):
                i = next(counter)
                etype = TURN[i % len(TURN)]
                if partials and etype == EventType.TRANSCRIPT_FINAL:
                    bus.emit(Event(EventType.TRANSCRIPT_PARTIAL, {"text": f"partial {i}"}, session_id=session))
                bus.emit(Event(etype, {"n": i, "text": f"text {i}"}, turn_id=f"t{i // len(TURN)}",
                               session_id=session, audio_time=i * 0.02))
                if interval:
                    time.sleep(interval)
            _print({"emitted": i + 1})

    def read_stdin() -> None:
        for line in sys.stdin:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "emit":
                threading.Thread(target=generate, args=(int(parts[1]), float(parts[2]), "partials" in parts[3:]),
                                 daemon=True).start()
            elif parts[0] == "state":
                bridge.set_state(parts[1], note=" ".join(parts[2:]) or None)
            elif parts[0] == "depth":
                _print({"depth": bridge.outbox_depth, "connected": bridge.connected})
            elif parts[0] == "stop":
                break
        stop.set()

    bridge.start()
    threading.Thread(target=read_stdin, daemon=True).start()
    _print({"started": os.getpid()})
    stop.wait()
    bridge.stop(5.0)
    _print({"stopped": True, "depth": bridge.outbox_depth})
    return 0


# --- helpers for tests -------------------------------------------------------------------

def write_config(path: Path, *, device_id: str, state_dir: Path, port: int, **mqtt: Any) -> Path:
    """A TOML config for the daemon: MQTT on loopback with short keep-alive and metrics."""
    values: dict[str, Any] = {"enabled": True, "host": "127.0.0.1", "port": port, "keepalive_s": 5,
                              "metrics_interval_s": 1.0}
    values.update(mqtt)
    lines = ["[device]", f"id = {json.dumps(device_id)}", f"state_dir = {json.dumps(str(state_dir))}", "", "[mqtt]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """Runs this file as a subprocess and collects its stdout JSON lines."""

    def __init__(self, config: Path, log: Path, *extra_args: str) -> None:
        self.config = config
        self.log_path = log
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.lines: list[dict] = []
        self._cond = threading.Condition()

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "--config", str(self.config), *self.extra_args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.wait_line(lambda d: "started" in d, timeout, "daemon start")
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                with self._cond:
                    self.lines.append(obj)
                    self._cond.notify_all()

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_line(self, pred: Callable[[dict], bool], timeout: float = 10.0, what: str = "") -> dict:
        with self._cond:
            found = self._cond.wait_for(lambda: next((d for d in self.lines if pred(d)), None), timeout)
        if not found:
            code = self.proc.poll() if self.proc else None
            raise AssertionError(f"daemon: timed out waiting for {what} (exit code {code}); log:\n{self.log()[-3000:]}")
        return found

    def depth(self, timeout: float = 5.0) -> int:
        with self._cond:
            self.lines = [d for d in self.lines if "depth" not in d]
        self.send("depth")
        return self.wait_line(lambda d: "depth" in d, timeout, "depth")["depth"]

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._close_pipes()

    def stop(self, timeout: float = 15.0) -> int | None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self._close_pipes()
            return proc.returncode if proc else None
        os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise AssertionError(f"daemon did not stop on SIGTERM within {timeout} s") from None
        finally:
            self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass  # the daemon is gone; nothing to flush

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


if __name__ == "__main__":
    sys.exit(main())
