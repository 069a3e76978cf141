"""Simulated devices for load tests: the real MQTT bridge (status with its Last Will, events with
ids and sequence numbers, v5 commands, the disk outbox), no models.

One worker process runs many devices, each an ``MqttBridge`` with a controller that answers at
once; a single scheduler thread makes kiosk-like turns (wake, transcript, reply, speech start
and end, turn end; now and then an error) at a given interval per device. The worker is driven
by lines on stdin and reports JSON lines on stdout:

    start INTERVAL     turns every INTERVAL seconds per device (jittered ±50 %), from now
    stop               no new turns; the ones under way finish
    report             {"report": {"devices": {id: {"emitted": n, ...}}, ...}}
    quit               stop every bridge (offline status, outbox kept) and exit

``edge-voice fleet simulate`` starts such workers for an operator; ``scripts/fleet-load``
drives them itself.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge import __version__
from edge.config import MqttConfig
from edge.errors import EdgeError
from edge.events import Event, EventType, new_id

_LOGGER = logging.getLogger(__name__)

# One turn: (offset from the wake word in seconds, event type).
TURN = ((0.0, EventType.WAKE), (0.2, EventType.TURN_START), (2.4, EventType.TRANSCRIPT_FINAL),
        (3.0, EventType.REPLY_FINAL), (3.1, EventType.TTS_START), (6.0, EventType.TTS_END),
        (6.0, EventType.TURN_END))
QUESTIONS = ("Where is the exit?", "What time do you close today?", "Is there a pharmacy nearby?",
             "How do I get to platform four?", "Can I pay by card here?")
ERROR_EVERY = 25  # one turn in this many ends in an error
SITES = 10
# paho watches its socket with select(), which cannot take a descriptor above 1023, and a device
# holds about six (its socket, paho's wake-up pair, the outbox file with its WAL and index).
PER_PROCESS = 125
MAX_PER_PROCESS = 150


def processes_for(devices: int) -> int:
    return max(1, -(-devices // PER_PROCESS))


def device_ids(count: int, first: int = 0, stem: str = "sim") -> list[str]:
    return [f"{stem}-{i:05d}" for i in range(first, first + count)]


def tags_for(device_id: str) -> list[str]:
    """Tags like a real fleet's: a site, a booth type, a language (derived from the number)."""
    n = int(device_id.rsplit("-", 1)[-1]) if device_id.rsplit("-", 1)[-1].isdigit() else 0
    return [f"site:s{n % SITES:02d}", "booth:phone" if n % 2 else "booth:kiosk", "lang:fr" if n % 5 == 0 else "lang:en"]


class SimController:
    """Implements edge.mqtt.Controller for a device without models: every call answers at once."""

    def __init__(self) -> None:
        self.muted = False
        self.volume = 1.0
        self.commands = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.commands += 1

    def say(self, text: str) -> dict:
        self._count()
        return {"queued": True}

    def ask(self, text: str) -> dict:
        self._count()
        return {"queued": True, "turn_id": new_id()}

    def listen(self) -> dict:
        self._count()
        if self.muted:
            raise EdgeError("the microphone is muted: send unmute first", code="audio.muted")
        return {"listening": True}

    def cancel(self) -> dict:
        self._count()
        return {"cancelled": False}

    def mute(self) -> dict:
        self._count()
        self.muted = True
        return {"muted": True}

    def unmute(self) -> dict:
        self._count()
        self.muted = False
        return {"muted": False}

    def set_volume(self, volume: float) -> dict:
        self._count()
        self.volume = volume
        return {"volume": volume}

    def set_setting(self, key: str, value: Any) -> dict:
        self._count()
        return {"key": key, "value": value}

    def reload_models(self) -> dict:
        self._count()
        return {"reloaded": []}

    def status(self) -> dict:
        self._count()
        return {"simulated": True, "muted": self.muted, "volume": self.volume, "commands": self.commands}

    def handset(self, state: str) -> dict:
        self._count()
        return {"handset": state, "changed": True}


@dataclass
class _Device:
    id: str
    bridge: Any  # MqttBridge
    controller: SimController
    emitted: int = 0
    turns: int = 0
    session: str = ""


class SimWorker:
    """Many simulated devices in this process."""

    def __init__(self, cfg: MqttConfig, ids: Sequence[str], state_dir: Path, *, reconnect_max_s: float = 30.0,
                 seed: int | None = None) -> None:
        from edge.mqtt.client import MqttBridge

        self._rng = random.Random(seed)
        self.devices: list[_Device] = []
        for device_id in ids:
            ctl = SimController()
            bridge = MqttBridge(cfg, device_id, state_dir / device_id, ctl, version=__version__,
                                models={"llm": "simulated", "stt": "simulated", "tts": "simulated"},
                                tags=tags_for(device_id), reconnect_min_s=1.0, reconnect_max_s=reconnect_max_s)
            self.devices.append(_Device(device_id, bridge, ctl, session=new_id()))
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int, str]] = []  # (when, device index, step, turn id)
        self._interval: float | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._schedule, name="sim-turns", daemon=True)

    def start(self) -> None:
        for d in self.devices:
            d.bridge.start()
        self._thread.start()

    def start_turns(self, interval: float) -> None:
        now = time.monotonic()
        with self._cond:
            self._interval = interval
            for i in range(len(self.devices)):
                heapq.heappush(self._heap, (now + self._rng.uniform(0, interval), i, 0, new_id()))
            self._cond.notify_all()

    def stop_turns(self) -> None:
        with self._cond:
            self._interval = None
            self._heap = [h for h in self._heap if h[2] != 0]  # turns under way finish
            heapq.heapify(self._heap)
            self._cond.notify_all()

    def _schedule(self) -> None:
        while True:
            with self._cond:
                while not self._closing and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._closing:
                    return
                when, i, step, turn = heapq.heappop(self._heap)
                interval = self._interval
                if step + 1 < len(TURN):
                    heapq.heappush(self._heap, (when + TURN[step + 1][0] - TURN[step][0], i, step + 1, turn))
                elif interval is not None:
                    heapq.heappush(self._heap, (when + self._rng.uniform(0.5, 1.5) * interval, i, 0, new_id()))
            self._emit(self.devices[i], step, turn)

    def _emit(self, d: _Device, step: int, turn: str) -> None:
        kind = TURN[step][1]
        failed = d.turns % ERROR_EVERY == ERROR_EVERY - 1
        data: dict[str, Any] = {}
        if kind is EventType.WAKE:
            data = {"word": "hey_jarvis", "score": 0.9}
        elif kind is EventType.TURN_START:
            data = {"trigger": "wake"}
        elif kind is EventType.TRANSCRIPT_FINAL:
            data = {"text": QUESTIONS[d.turns % len(QUESTIONS)]}
        elif kind is EventType.REPLY_FINAL:
            if failed:
                self._send(d, Event(EventType.ERROR, {"code": "stage.error", "message": "simulated LLM failure"},
                                    turn_id=turn, session_id=d.session))
                return
            data = {"text": "Down the corridor, second door on the left."}
        elif kind in (EventType.TTS_START, EventType.TTS_END):
            if failed:
                return
            data = {"interrupted": False} if kind is EventType.TTS_END else {}
        elif kind is EventType.TURN_END:
            d.turns += 1
            data = {"outcome": "error" if failed else "done", "trigger": "wake",
                    "timings_ms": {"end_of_speech_to_first_audio": round(self._rng.uniform(600, 1100), 1)}}
        self._send(d, Event(kind, data, turn_id=turn, session_id=d.session))

    @staticmethod
    def _send(d: _Device, event: Event) -> None:
        d.bridge.publish_event(event)
        d.emitted += 1

    def report(self) -> dict[str, Any]:
        devices = {}
        for d in self.devices:
            info = d.bridge.bridge_info()
            devices[d.id] = {"emitted": d.emitted, "connected": info["connected"], "depth": info["outbox"]["depth"],
                             "dropped": info["outbox"]["dropped"], "connects": info["connects"],
                             "published": info["published"], "commands": d.controller.commands}
        return {"devices": devices, "pid": os.getpid()}

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        stoppers = [threading.Thread(target=d.bridge.stop, args=(timeout,), daemon=True) for d in self.devices]
        for t in stoppers:  # in parallel: each stop waits for its own flush and offline status
            t.start()
        for t in stoppers:
            t.join(timeout + 2.0)


def pin_to_one_cpu(index: int) -> None:
    """Keep this worker's threads on one core (workers take turns over the cores). Hundreds of
    threads of one process woken at once (a fleet-wide command) pass Python's GIL back and
    forth across cores at great cost: on two cores a command to 1,000 devices took 14 s
    unpinned and 0.5 s pinned."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[index % len(cpus)]})
    except (AttributeError, OSError):  # not Linux, or not allowed: run unpinned
        pass


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def worker_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge.fleet.simulate")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", default="edge")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--stem", default="sim")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--keepalive", type=int, default=30)
    ap.add_argument("--reconnect-max", type=float, default=30.0)
    ap.add_argument("--username", default="")
    ap.add_argument("--password-file", default="")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--worker", type=int, default=0, help="this worker's number (which core it keeps to)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.count > MAX_PER_PROCESS:
        print(f"edge-voice: error: {args.count} devices in one process: at most {MAX_PER_PROCESS} (paho's select() "
              "cannot watch descriptors above 1023); use more processes", file=sys.stderr)
        return 2
    raise_fd_limit()
    pin_to_one_cpu(args.worker)
    threading.stack_size(512 * 1024)  # four threads a device: keep their reserved stacks small
    cfg = MqttConfig(enabled=True, host=args.host, port=args.port, prefix=args.prefix, keepalive_s=args.keepalive,
                     username=args.username, password_file=args.password_file, metrics_interval_s=300.0)
    try:
        worker = SimWorker(cfg, device_ids(args.count, args.first, args.stem), Path(args.state_dir),
                           reconnect_max_s=args.reconnect_max, seed=args.seed)
    except EdgeError as err:
        print(f"edge-voice: error: {err.message}", file=sys.stderr)
        return 1
    quit_ = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: quit_.set())
    worker.start()
    _print({"ready": len(worker.devices), "pid": os.getpid()})

    def read() -> None:
        for line in sys.stdin:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "start":
                worker.start_turns(float(parts[1]))
            elif parts[0] == "stop":
                worker.stop_turns()
            elif parts[0] == "report":
                _print({"report": worker.report()})
            elif parts[0] == "quit":
                break
        quit_.set()

    threading.Thread(target=read, name="sim-stdin", daemon=True).start()
    quit_.wait()
    worker.close()
    _print({"report": worker.report(), "closed": True})
    return 0


# -- driving workers from another process -------------------------------------------------------

class WorkerProcess:
    """One worker subprocess and the JSON lines it printed."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.log_path = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge.fleet.simulate", *argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self._cond = threading.Condition()
        self.lines: list[dict[str, Any]] = []
        threading.Thread(target=self._read, name="sim-worker-out", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.lines.append(obj)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, key: str, timeout: float, after: int = 0) -> dict[str, Any]:
        """The first line from index ``after`` on that has ``key``."""
        with self._cond:
            def found() -> dict[str, Any] | None:
                return next((d for d in self.lines[after:] if key in d), None)
            self._cond.wait_for(lambda: found() is not None or self.proc.poll() is not None, timeout)
            line = found()
        if line is None:
            why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                   else f"no {key!r} in {timeout:g} s")
            raise EdgeError(f"simulated devices (pid {self.proc.pid}): {why}; see {self.log_path}",
                            code="fleet.simulate")
        return line

    def report(self, timeout: float = 30.0) -> dict[str, Any]:
        with self._cond:
            n = len(self.lines)
        self.send("report")
        return self.wait_for("report", timeout, n)["report"]

    def quit(self, timeout: float = 60.0) -> dict[str, Any] | None:
        with self._cond:
            n = len(self.lines)
        try:
            self.send("quit")
            final = self.wait_for("closed", timeout, n)["report"]
        except (EdgeError, OSError, ValueError):
            final = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return final


def start_workers(*, devices: int, processes: int, host: str, port: int, prefix: str, state_dir: Path,
                  log_dir: Path, stem: str = "sim", keepalive: int = 30, reconnect_max: float = 30.0,
                  username: str = "", password_file: str = "") -> list[WorkerProcess]:
    """``processes`` 0: one per ``PER_PROCESS`` devices."""
    processes = min(devices, processes or processes_for(devices))
    if -(-devices // processes) > MAX_PER_PROCESS:
        raise EdgeError(f"{devices} simulated devices need at least {-(-devices // MAX_PER_PROCESS)} processes "
                        f"(at most {MAX_PER_PROCESS} each: paho's select() cannot watch descriptors above 1023)",
                        code="fleet.usage")
    per, extra = divmod(devices, processes)
    workers = []
    first = 0
    for p in range(processes):
        count = per + (1 if p < extra else 0)
        argv = ["--host", host, "--port", str(port), "--prefix", prefix, "--first", str(first), "--count", str(count),
                "--stem", stem, "--state-dir", str(state_dir), "--keepalive", str(keepalive),
                "--reconnect-max", str(reconnect_max), "--seed", str(p), "--worker", str(p)]
        if username:
            argv += ["--username", username, "--password-file", password_file]
        workers.append(WorkerProcess(argv, log_dir / f"sim-worker-{p}.log"))
        first += count
    return workers


if __name__ == "__main__":
    sys.exit(worker_main())
