"""``scripts/fleet-load``: a fleet of simulated devices against a real Mosquitto, measured.

For each topology (one broker; or a site broker bridged to a central one, devices on the site,
the fleet on the central) it starts the broker(s), ``record`` consumers on a shared
subscription and N simulated devices (the real bridge code) in a few processes, then measures:

1. the time for all N to come online (seen in their retained statuses);
2. a fleet-wide command answered by every device, round trip p50/p99 (three rounds);
3. kiosk-like turns from every device while the broker (the central one when bridged) is
   restarted in the middle; afterwards every event must be in the database exactly once:
   per device, sequence numbers 1..emitted without a gap (0 lost), duplicates counted;
4. CPU time and peak memory of the broker(s), the device processes and the consumers.

Everything runs on loopback ports and stops by itself; exit status 1 if an event was lost or
a device did not come online or answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from edge.errors import EdgeError
from edge.fleet.client import FleetClient, Message
from edge.fleet.cmd import p_stats, run_command
from edge.fleet.config import FleetConfig
from edge.fleet.simulate import WorkerProcess, processes_for, raise_fd_limit, start_workers
from edge.fleet.status import StatusBoard
from edge.fleet.store import open_store

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
_TICK = os.sysconf("SC_CLK_TCK")
PREFIX = "edge"
SHARE = "record"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- processes and their resources --------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def memory(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


@dataclass
class Tracked:
    """CPU and memory of one role (the broker, the devices, ...) over several processes."""

    name: str
    pids: list[int] = field(default_factory=list)
    cpu_done: float = 0.0  # CPU of processes that have ended
    peaks: dict[int, int] = field(default_factory=dict)  # peak RSS by process
    _last: dict[int, float] = field(default_factory=dict)

    sequential: bool = False  # one process at a time (a restarted broker): the peak is the largest

    @property
    def peak_rss(self) -> int:
        """The processes' peak RSS added up (an upper bound of the role's peak)."""
        return max(self.peaks.values(), default=0) if self.sequential else sum(self.peaks.values())

    def add(self, pid: int, *, from_now: bool = False) -> None:
        """Track ``pid``; ``from_now``: count only the CPU it uses from now on."""
        self.pids.append(pid)
        if from_now:
            self.cpu_done -= cpu_seconds(pid) or 0.0

    def sample(self) -> float:
        """CPU seconds so far, every process of the role together; updates the peak memory."""
        total = self.cpu_done
        for pid in self.pids:
            c = cpu_seconds(pid)
            if c is not None:
                self._last[pid] = c
            total += self._last.get(pid, 0.0)
            self.peaks[pid] = max(self.peaks.get(pid, 0), memory(pid).get("VmHWM", 0))
        return total

    def retire(self, pid: int) -> None:
        """``pid`` is about to end: keep its CPU time."""
        self.sample()
        self.cpu_done += self._last.pop(pid, 0.0)
        self.pids.remove(pid)


class Broker:
    """One Mosquitto with a config of its own, stopped and restarted by PID."""

    def __init__(self, name: str, workdir: Path, extra: Sequence[str] = ()) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.track = Tracked(f"broker {name}", sequential=True)

    def _config(self) -> Path:
        lines = [f"listener {self.port} {HOST}", "allow_anonymous true", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice", "connection_messages false",
                 "set_tcp_nodelay true",
                 # A consumer away (or the broker restarting) must not lose its queued events.
                 "max_queued_messages 1000000", "max_inflight_messages 1000",
                 "persistence true", f"persistence_location {self.dir}/", "autosave_interval 300"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines + self.extra) + "\n")
        return conf

    def start(self, timeout: float = 20.0) -> None:
        if not Path(MOSQUITTO).exists():
            raise EdgeError("mosquitto is not installed: apt-get install mosquitto", code="fleet.load")
        conf = self._config()
        with open(self.dir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        self.track.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a listening socket is the only sign it is ready
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise EdgeError(f"mosquitto ({self.name}) did not start; see {self.dir / 'mosquitto.log'}",
                        code="fleet.load")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.track.sample()  # its last figures, while /proc still has them
        proc.send_signal(signal.SIGTERM)  # saves its persistence file on the way out
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.track.retire(proc.pid)

    def restart(self) -> float:
        """Stop and start again on the same port; returns how long it was not listening."""
        t0 = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - t0


class RecorderProcess:
    """``edge-voice fleet record`` as a subprocess; ``ready`` once it has subscribed."""

    def __init__(self, index: int, port: int, db: str, log: Path, *, shared: bool) -> None:
        self.ready = threading.Event()
        self.final: dict[str, Any] | None = None
        self._log = open(log, "a", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "fleet", "record", "--db", db, *(["--share", SHARE] if shared else []),
             "--client-id", f"load-record-{index}", "--host", HOST, "--port", str(port), "--prefix", PREFIX,
             "--json", "--log-level", "info"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self._readers = [threading.Thread(target=self._errors, daemon=True),
                         threading.Thread(target=self._output, daemon=True)]
        for t in self._readers:
            t.start()

    def _errors(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()
            if "recording events" in line:
                self.ready.set()
        self.ready.set()  # it ended: nobody waits forever

    def _output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.final = json.loads(line)
            except ValueError:
                pass

    def stop(self) -> dict[str, Any] | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(10)
        self._log.close()
        return self.final


# -- one run -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    devices: int
    processes: int
    duration: float
    turn_interval: float
    recorders: int
    db: str | None
    rounds: int
    workdir: Path
    out: TextIO


def bridge_config(central_port: int) -> list[str]:
    """The site broker's half of a Mosquitto bridge: device traffic out, commands in."""
    return [
        "connection central",
        f"address {HOST}:{central_port}",
        "bridge_protocol_version mqttv50",  # keeps response topics and correlation data
        "cleansession false",  # the site keeps what the central misses while it is away
        "remote_clientid site-bridge",
        "restart_timeout 1 5",
        "keepalive_interval 10",
        f"topic {PREFIX}/+/status out 1",
        f"topic {PREFIX}/+/event/# out 1",
        f"topic {PREFIX}/+/metrics out 0",
        f"topic {PREFIX}/+/answers/# out 1",
        f"topic {PREFIX}/+/cmd/+/result out 1",
        f"topic {PREFIX}/+/cmd/+ in 1",
    ]


class LoadRun:
    """One topology, phase by phase; ``result`` collects the figures."""

    def __init__(self, opts: Options, topology: str) -> None:
        self.opts = opts
        self.topology = topology
        self.work = opts.workdir / topology
        self.work.mkdir(parents=True, exist_ok=True)
        self.central = Broker("central" if topology == "bridged" else "broker", self.work)
        self.site = self.central
        self.brokers = [self.central]
        if topology == "bridged":
            self.site = Broker("site", self.work, bridge_config(self.central.port))
            self.brokers.append(self.site)
        self.db = opts.db or str(self.work / "events.sqlite3")
        self.result: dict[str, Any] = {"topology": topology, "devices": opts.devices, "processes": opts.processes,
                                       "db": "sqlite" if opts.db is None else self.db.split(":", 1)[0]}
        self.recorders: list[RecorderProcess] = []
        self.workers: list[WorkerProcess] = []
        self.client: FleetClient | None = None
        self.board: StatusBoard | None = None
        self.tracks = [b.track for b in self.brokers] + [Tracked("devices"), Tracked("record"), Tracked("fleet client")]
        self.devices_track, self.record_track, fleet_track = self.tracks[-3:]
        fleet_track.add(os.getpid(), from_now=True)
        self._cond = threading.Condition()
        self._online_at: dict[str, float] = {}
        self._back_at: dict[str, float] = {}
        self._restarted_wall = float("inf")

    def say(self, text: str) -> None:
        print(text, file=self.opts.out, flush=True)

    def cpu(self) -> dict[str, float]:
        return {t.name: t.sample() for t in self.tracks}

    def run(self) -> dict[str, Any]:
        try:
            self.start()
            online_cpu = self.online()
            t_cmd = time.monotonic()
            self.commands()
            commands_cpu, commands_s = self.cpu(), time.monotonic() - t_cmd
            events_cpu, events_s = self.events()
            self.resources(online_cpu, commands_cpu, commands_s, events_cpu, events_s)
            r = self.result
            self.result["ok"] = bool(r["online"]["all"] and r["command"]["answered_min"] == self.opts.devices
                                     and r["events"]["lost"] == 0 and r["events"]["devices_with_gaps"] == 0)
        finally:
            self.close()
        return self.result

    def start(self) -> None:
        """The brokers, the record consumers and our own fleet client, following the statuses."""
        for b in self.brokers:
            b.start()
        where = (f"site broker :{self.site.port} bridged to central :{self.central.port}"
                 if self.site is not self.central else f"broker :{self.central.port}")
        self.say(f"== {self.topology}: {self.opts.devices} devices in {self.opts.processes} process(es), {where}")
        shared = self.opts.recorders > 1
        self.recorders = [RecorderProcess(i, self.central.port, self.db, self.work / f"record-{i}.log", shared=shared)
                          for i in range(self.opts.recorders)]
        for r in self.recorders:
            if not r.ready.wait(60) or r.proc.poll() is not None:
                raise EdgeError(f"fleet record did not start; see {self.work}/record-*.log", code="fleet.load")
            self.record_track.add(r.proc.pid)
        cfg = FleetConfig(host=HOST, port=self.central.port, prefix=PREFIX, client_id=f"load-fleet-{self.topology}")
        self.client = FleetClient(cfg, role="fleet").connect()
        self.board = StatusBoard(self.client)
        self.client.set_handler(self._on_message)
        self.board.load()

    def _on_message(self, msg: Message) -> None:
        assert self.board is not None and self.client is not None
        if not self.board.on_message(msg):
            return
        status = self.board.devices.get(self.client.topics.device_of(msg.topic) or "")
        if status is None or not status.online:
            return
        now = time.monotonic()
        with self._cond:
            self._online_at.setdefault(status.device_id, now)
            since = status.body.get("online_since")
            if isinstance(since, (int, float)) and since >= self._restarted_wall:
                self._back_at.setdefault(status.device_id, now)
            self._cond.notify_all()

    def online(self) -> dict[str, float]:
        """1. Start the devices; the time until every one has said it is online."""
        n = self.opts.devices
        t0 = time.monotonic()
        self.workers = start_workers(devices=n, processes=self.opts.processes, host=HOST, port=self.site.port,
                                     prefix=PREFIX, state_dir=self.work / "devices", log_dir=self.work)
        for w in self.workers:
            self.devices_track.add(w.pid)
        for w in self.workers:
            w.wait_for("ready", 300)
        ready_s = time.monotonic() - t0
        with self._cond:
            everyone = self._cond.wait_for(lambda: len(self._online_at) >= n, 300)
            times = sorted(self._online_at.values())
        first = times[0] - t0 if times else None
        last = times[-1] - t0 if times and everyone else None
        self.result["online"] = {"all": bool(everyone), "seen": len(times), "processes_ready_s": round(ready_s, 2),
                                 "first_s": round(first, 2) if first is not None else None,
                                 "all_s": round(last, 2) if last is not None else None}
        self.say(f"online: {len(times)}/{n} devices {self.result['online']['all_s']} s after starting their "
                 f"processes (first online after {first or 0:.2f} s; the processes had built their devices after "
                 f"{ready_s:.1f} s)")
        if not everyone:
            raise EdgeError(f"only {len(times)} of {n} devices came online within 300 s", code="fleet.load")
        return self.cpu()

    def commands(self) -> None:
        """2. A fleet-wide command, answered by every device, a few rounds."""
        assert self.client is not None and self.board is not None
        reports = []
        for n in range(self.opts.rounds):
            statuses = dict(self.board.devices)
            report = run_command(self.client, statuses, sorted(statuses), "status", {}, timeout_s=30.0,
                                 board=self.board)
            self.client.set_handler(self._on_message)
            reports.append(report)
            self.say(f"command round {n + 1}: {report.summary()}")
        rts = [rt for r in reports for rt in r.round_trips()]
        self.result["command"] = {
            "rounds": len(reports), "answered_min": min((r.count("answered") for r in reports), default=0),
            "round_trip_ms": {k: round(v, 1) for k, v in p_stats(rts).items()}}

    def events(self) -> tuple[dict[str, float], float]:
        """3. Turns from every device, the (central) broker restarted halfway; then the count."""
        opts = self.opts
        for w in self.workers:
            w.send(f"start {opts.turn_interval}")
        t_events = time.monotonic()
        time.sleep(opts.duration / 2)  # the load runs; nothing to wait for but time
        self._restarted_wall = time.time()
        down_s = self.central.restart()
        restart_at = time.monotonic()
        self.say(f"restarted the {self.central.name} broker at {restart_at - t_events:.0f} s: not listening for "
                 f"{down_s:.2f} s")
        time.sleep(max(0.0, opts.duration - (time.monotonic() - t_events)))
        for w in self.workers:
            w.send("stop")
        events_s = time.monotonic() - t_events
        self.result["restart"] = {"broker": self.central.name, "down_s": round(down_s, 2),
                                  "at_s": round(restart_at - t_events, 1), "reconnected": self._reconnected(restart_at)}
        time.sleep(7.0)  # turns under way end (a turn lasts 6 s)
        t_drain = time.monotonic()
        emitted = {d: v["emitted"] for w in self.workers for d, v in w.report()["devices"].items()}
        total = sum(emitted.values())
        store = open_store(self.db)
        try:
            deadline = time.monotonic() + 180
            stored = store.count()
            while stored < total and time.monotonic() < deadline:  # other processes: nothing to wait on but polls
                time.sleep(0.5)
                stored = store.count()
            drain_s = time.monotonic() - t_drain
            cpu = self.cpu()
            loaded_s = time.monotonic() - t_events
            counts = store.by_device()
            delays = sorted(store.delays())
        finally:
            store.close()
        lost = gaps = extra = 0
        for device, sent in emitted.items():
            c = counts.get(device)
            rows = c.rows if c else 0
            lost += max(0, sent - rows)
            extra += max(0, rows - sent)
            if sent and (c is None or c.min_seq != 1 or c.max_seq != sent or c.distinct_seq != sent):
                gaps += 1
        dropped = sum(v["dropped"] for w in self.workers for v in w.report()["devices"].values())
        finals = [f for f in (r.stop() for r in self.recorders) if f]
        stored_by = [f.get("stored", 0) for f in finals]
        ev = self.result["events"] = {
            "seconds": round(events_s, 1), "turn_interval_s": opts.turn_interval, "sent": total,
            "rate_per_s": round(total / events_s, 1) if events_s else None, "stored": stored,
            "received_by_consumers": sum(f.get("received", 0) for f in finals), "stored_by_consumer": stored_by,
            "duplicates_removed": sum(f.get("duplicates", 0) for f in finals), "lost": lost,
            "devices_with_gaps": gaps, "extra": extra, "outbox_dropped": dropped, "drain_s": round(drain_s, 1),
            "delay_ms": {k: round(v * 1000, 1) for k, v in p_stats(delays).items()}}
        self.say(f"events: {total} sent in {events_s:.0f} s ({ev['rate_per_s']}/s), {stored} stored, {lost} lost, "
                 f"{ev['duplicates_removed']} duplicate(s) removed, {gaps} device(s) with a gap; consumers stored "
                 f"{'+'.join(map(str, stored_by))}; all in {drain_s:.1f} s after the last turn ended; device → "
                 f"database p50 {ev['delay_ms'].get('p50')} ms, p99 {ev['delay_ms'].get('p99')} ms")
        return cpu, loaded_s

    def _reconnected(self, restart_at: float) -> dict[str, Any] | None:
        """With one broker, every device reconnects after the restart: when was the last back?"""
        if self.site is not self.central:
            return None  # the site broker stayed up: the devices never left
        n = self.opts.devices
        with self._cond:
            self._cond.wait_for(lambda: len(self._back_at) >= n, 60)
            back = sorted(self._back_at.values())
        out = {"devices": len(back), "all_s": round(back[-1] - restart_at, 2) if len(back) >= n else None}
        self.say(f"after the restart: {len(back)}/{n} devices back online"
                 + (f", the last {out['all_s']} s after the broker listened again" if out["all_s"] else ""))
        return out

    def resources(self, online: dict[str, float], commands: dict[str, float], commands_s: float,
                  events: dict[str, float], events_s: float) -> None:
        """4. CPU per phase and peak memory, per role."""
        res = {}
        for t in self.tracks:
            res[t.name] = {"processes": 1 if t.sequential else len(t.peaks) or 1,
                           "cpu_s_online": round(online[t.name], 1),
                           "cpu_pct_commands": round(100 * (commands[t.name] - online[t.name]) / max(1e-6, commands_s),
                                                     1),
                           "cpu_pct_events": round(100 * (events[t.name] - commands[t.name]) / max(1e-6, events_s), 1),
                           "peak_rss_mb": round(t.peak_rss / 2**20, 1)}
        self.result["resources"] = res
        for name, r in res.items():
            self.say(f"  {name:<15} CPU {r['cpu_s_online']:>6.1f} s bringing all online, "
                     f"{r['cpu_pct_commands']:>5.1f}% of a core during commands, {r['cpu_pct_events']:>5.1f}% during "
                     f"events; peak RSS {r['peak_rss_mb']:.0f} MB over {r['processes']} process(es)")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for w in self.workers:
            w.quit(60)
        for r in self.recorders:
            if r.proc.poll() is None:
                r.stop()
        for b in reversed(self.brokers):
            b.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/fleet-load",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--devices", type=int, default=1000, metavar="N")
    ap.add_argument("--processes", type=int, default=0, metavar="P",
                    help="device processes (default: 1 per 125 devices)")
    ap.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of events (60)")
    ap.add_argument("--turn-interval", type=float, default=20.0, metavar="S",
                    help="a turn (7 events) every S s per device (20)")
    ap.add_argument("--recorders", type=int, default=2, metavar="R",
                    help="record consumers, in one shared group when more than one (2)")
    ap.add_argument("--db", metavar="PATH|URL", help="where the consumers store (default: an SQLite file)")
    ap.add_argument("--topology", choices=("single", "bridged", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=3, help="fleet-wide command rounds (3)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep its logs and databases")
    args = ap.parse_args(argv)
    if args.devices < 1 or args.recorders < 1 or args.duration < 4 or args.turn_interval <= 0:
        print("scripts/fleet-load: error: --devices and --recorders at least 1, --duration at least 4 s",
              file=sys.stderr)
        return 2
    raise_fd_limit()  # a thousand connections need more descriptors than the default 1024
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edge-fleet-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    processes = min(args.devices, args.processes or processes_for(args.devices))
    topologies = ("single", "bridged") if args.topology == "both" else (args.topology,)
    results = []
    ok = True
    try:
        for i, topology in enumerate(topologies):
            db = args.db
            if db is not None and len(topologies) > 1 and not db.startswith(("postgres://", "postgresql://")):
                db = f"{db}.{topology}"
            opts = Options(args.devices, processes, args.duration, args.turn_interval, args.recorders, db,
                           args.rounds, workdir, sys.stdout)
            if db is not None and db.startswith(("postgres://", "postgresql://")) and i > 0:
                _clear(db)
            try:
                r = LoadRun(opts, topology).run()
            except EdgeError as err:
                print(f"scripts/fleet-load: {topology}: {err.message}", file=sys.stderr)
                r = {"topology": topology, "ok": False, "error": err.message}
            results.append(r)
            ok = ok and bool(r.get("ok"))
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("fleet-load: " + ("PASS" if ok else "FAIL") + " (" + ", ".join(
        f"{r['topology']}: {'ok' if r.get('ok') else 'failed'}" for r in results) + ")")
    return 0 if ok else 1


def _clear(url: str) -> None:
    """Empty the events table between two runs on one PostgreSQL database."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS events")


if __name__ == "__main__":
    sys.exit(main())
