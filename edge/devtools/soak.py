"""``scripts/soak``: the real daemon through a long scripted session, with the broker flapping and
the process killed, while a fleet-side consumer records every event.

It starts a Mosquitto of its own (persistent sessions, on a free loopback port), a
``fleet record`` consumer in this process (SQLite, deduplicating by event id), and
``edge-voice run`` from a copy of the source taken at start (``--code``), with a config
generated from ``--config`` (default: its ``config/dev.toml``): the microphone a FIFO this
process writes (``audio.input_device = "file:..."``), the speaker a WAV file, MQTT to the
broker, a private state directory. Then it plays the plan of :mod:`edge.devtools.soak_script`
turn by turn, in real time from just before each wake word until the daemon's log says the
turn ended, and faster than real time (``--fast``) where nothing is said or answered.
Visitors come and go (a pause longer than the session timeout between them); broker stops
and SIGKILLs come at seeded moments; a killed daemon is started again at once, as systemd's
``Restart=always`` would. Each time the daemon starts, the longest clause a reply can have is
spoken once through the fleet's ``say`` command (warm-up: see ``CEILING_TEXT``).

At the end the broker stays up until the outbox is empty, the daemon is stopped cleanly, and
the database is compared with the sequence numbers the device gave out. The report (JSON with
``--report``, a summary on stdout, a plot with ``--plot``) says: turns answered / expected,
missed wake words, memory, threads and open files over time, events produced / received /
lost / duplicated, the outbox, restarts, first-audio latency over the run. Exit status 1 when
a rule is broken (see :func:`edge.devtools.soak_report.verdict`), 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import Config, load_config
from edge.devtools import soak_report as rep
from edge.devtools.soak_proc import DaemonProcess, Feeder, LogEvent, Sampler, outbox_depth, outbox_meta, proc_stats
from edge.devtools.soak_report import ItemResult
from edge.devtools.soak_script import (
    ESPEAK_VOICES,
    LONG_QUESTIONS,
    QUESTIONS,
    Clip,
    Item,
    Plan,
    Voice,
    check_clips,
    check_quiet,
    espeak_voice,
    make_clips,
    make_plan,
    noise,
    piper_voice,
    silence,
)
from edge.errors import EdgeError

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEVICE = "soak"
LEAD_S = 0.8  # real-time silence before each wake word: the daemon has caught up when it comes
WAKE_WAIT_S = 6.0  # after the clip has been written, how long its wake word may take to show
# Spoken once through the fleet's ``say`` command each time the daemon starts: 24 words of everyday
# length in one clause, as long as the longest clause a reply can have (the responder cuts run-on text
# at 24 words). Synthesis keeps its memory at the high-water mark of the longest clause it has spoken;
# reaching it during warm-up keeps that step out of what is judged as growth (the report shows its size).
CEILING_TEXT = ("Welcome to the harbour museum where visitors can see old ships and maps and learn how people "
                "lived and worked beside the northern sea.")


@dataclass(frozen=True)
class Settings:
    turns: int = 50
    seed: int = 1
    config: Path | None = None  # the daemon's base config; default: config/dev.toml of the code run
    code: Path | None = None  # the source the daemon runs (edge/, config/, models/manifest.toml); default: a
    # copy of this checkout taken at start, so that edits made during the run never reach a restarted daemon
    kills: int | None = None  # default: one per 60 turns, at least one
    broker_restarts: int | None = None  # default: one per 40 turns, at least two
    llm_threads: int = 1  # one llama.cpp thread: the daemon shares the machine with the soak itself
    fast: float = 8.0  # speed-up of the audio where nothing is said or answered
    sample_s: float = 2.0  # how often memory, threads, files and the outbox are sampled
    kill_span: float = 0.5  # kills fall in this first part of the run; the rest is one process
    visitor_turns: int = 4  # mean questions per visitor; 0: one visitor (one session) for the whole run
    session_idle_s: float = 3.0  # llm.session_idle_s when visitors come and go (the pause between them is longer)
    stuck_s: float = 90.0  # the longest a turn may take from its wake word to turn.end
    ready_s: float = 300.0  # the longest a (re)start may take until the daemon is ready
    workdir: Path | None = None
    keep: bool = False
    report: Path | None = None
    plot: Path | None = None
    espeak: bool = True
    ceiling: bool = True  # speak CEILING_TEXT at every start
    limits: rep.Limits = rep.Limits()

    @property
    def n_kills(self) -> int:
        return self.kills if self.kills is not None else max(1, self.turns // 60)

    @property
    def n_broker_restarts(self) -> int:
        return self.broker_restarts if self.broker_restarts is not None else max(2, self.turns // 40)


# -- config -------------------------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_config(base: Path, out: Path, overrides: dict[str, dict[str, Any]]) -> None:
    """``base`` with ``overrides`` merged in, section by section (one level of tables)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10 (JetPack 6)
        import tomli as tomllib

    try:
        data = tomllib.loads(base.read_text(encoding="utf-8"))
    except OSError as err:
        raise EdgeError(f"{base}: cannot read the config: {err.strerror}", code="soak.config") from None
    except tomllib.TOMLDecodeError as err:
        raise EdgeError(f"{base}: not valid TOML: {err}", code="soak.config") from None
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    lines = []
    for section, values in data.items():
        if not isinstance(values, dict):
            raise EdgeError(f"{base}: top-level key {section!r} is not a table", code="soak.config")
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    out.write_text("\n".join(lines), encoding="utf-8")


# -- the run ------------------------------------------------------------------------------------

class Soak:
    def __init__(self, settings: Settings, out: Callable[[str], None] = print) -> None:
        self.s = settings
        self.say = out
        self._own_workdir = settings.workdir is None
        self.work = Path(settings.workdir or tempfile.mkdtemp(prefix="edge-voice-soak-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.results: list[ItemResult] = []
        self.current = -1
        self.kills: list[dict[str, Any]] = []
        self.broker_flaps: list[dict[str, Any]] = []
        self._chaos_threads: list[threading.Thread] = []
        self._broker_lock = threading.Lock()
        self.broker: Any = None
        self.recorder: Any = None
        self._recorder_thread: threading.Thread | None = None
        self.daemon: DaemonProcess | None = None
        self.feeder: Feeder | None = None
        self.sampler: Sampler | None = None
        self.clips: dict[str, Clip] = {}
        self.plan: Plan | None = None
        self.cfg: Config | None = None
        self._speaker_rate = 0
        self.ceilings: dict[int, dict[str, Any]] = {}  # per boot: RSS before and after the ceiling text
        self.cmd_client: Any = None
        self.requester: Any = None

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        from edge.fleet.loadtest import Broker
        from edge.models.registry import ModelRegistry

        s = self.s
        for old in ("state", "cache", "broker", "fleet-events.sqlite3", "fleet-events.sqlite3-wal",
                    "fleet-events.sqlite3-shm", "speaker.wav", "daemon.log", "config.toml"):
            path = self.work / old  # a work directory used before: start from nothing
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.code = s.code if s.code is not None else snapshot(REPO, self.work / "code")
        self.base_config = s.config if s.config is not None else self.code / "config" / "dev.toml"
        if not self.base_config.is_file():
            raise EdgeError(f"{self.base_config}: no such config file", code="soak.config")
        base = load_config(self.base_config)
        models = base.models_dir if base.device.models_dir or base.device.state_dir else ModelRegistry().root
        self.fifo = self.work / "mic.pcm"
        if self.fifo.exists():
            self.fifo.unlink()
        os.mkfifo(self.fifo)
        self.speaker_wav = self.work / "speaker.wav"
        self.state = self.work / "state"
        self.broker = Broker("broker", self.work)
        self.broker.start()
        overrides: dict[str, dict[str, Any]] = {
            "device": {"id": DEVICE, "state_dir": str(self.state), "models_dir": str(models)},
            "audio": {"input_device": f"file:{self.fifo}", "output_device": f"file:{self.speaker_wav}"},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": self.broker.port, "keepalive_s": 5,
                     "metrics_interval_s": 10.0},
        }
        llm: dict[str, Any] = {}
        if s.llm_threads:
            llm["n_threads"] = s.llm_threads
        if s.visitor_turns:
            llm["session_idle_s"] = s.session_idle_s
        if llm:
            overrides["llm"] = llm
        self.config_path = self.work / "config.toml"
        write_config(self.base_config, self.config_path, overrides)
        self.cfg = cfg = load_config(self.config_path)
        self.say(f"soak: work directory {self.work}; broker on 127.0.0.1:{self.broker.port}")

        voices: list[tuple[str, Voice]] = [("piper", piper_voice(cfg))]
        if s.espeak:
            for name, rate in ESPEAK_VOICES:
                v = espeak_voice(name, rate)
                if v is not None:
                    voices.append((f"espeak-{name}", v))
        clips = check_clips(cfg, make_clips(voices, QUESTIONS + LONG_QUESTIONS))
        self.clips = {c.name: c for c in clips}
        unused = [c.name for c in clips if not c.wakes_alone]
        self.say(f"soak: {len(clips)} clips from {len(voices)} voice(s); wake word caught alone in "
                 f"{len(clips) - len(unused)}" + (f" (not used: {', '.join(unused)})" if unused else ""))
        self.plan = make_plan(s.seed, s.turns, clips, kills=s.n_kills, broker_restarts=s.n_broker_restarts,
                              kill_span=s.kill_span, visitor_turns=s.visitor_turns)
        rng = np.random.default_rng(s.seed)
        self.noise_audio = {i.index: noise(rng, i.seconds, i.noise) for i in self.plan.items if i.kind == "noise"}
        self.quiet_fired = check_quiet(cfg, list(self.noise_audio.values()))

        from edge.fleet.config import FleetConfig
        from edge.fleet.record import Recorder

        fleet = FleetConfig(host="127.0.0.1", port=self.broker.port, prefix=cfg.mqtt.prefix,
                            client_id="soak-record", keepalive_s=5)
        self.events_db = self.work / "fleet-events.sqlite3"
        self.recorder = Recorder(fleet, str(self.events_db), session_expiry_s=86400)
        self.recorder.open()
        self._recorder_thread = threading.Thread(target=self.recorder.run, name="soak-record", daemon=True)
        self._recorder_thread.start()
        if s.ceiling:
            from edge.fleet.client import FleetClient
            from edge.fleet.cmd import Requester

            self.cmd_client = FleetClient(dataclasses.replace(fleet, client_id="soak-cmd"), role="cmd").connect()
            self.requester = Requester(self.cmd_client, "say", {"text": CEILING_TEXT}, timeout_s=5.0)

        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID")}
        env["EDGE_VOICE_CACHE_DIR"] = str(self.work / "cache")
        env["PYTHONPATH"] = str(self.code) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.daemon = DaemonProcess([sys.executable, "-m", "edge", "run", "--config", str(self.config_path)],
                                    env, self.code, self.work / "daemon.log")
        self.feeder = Feeder(self.fifo, s.fast)
        self.feeder.start()
        self.daemon.start()
        self.sampler = Sampler(self.daemon, self.state / "mqtt-outbox.sqlite3", s.sample_s, lambda: self.current,
                               self.t0)
        self.sampler.start()

    # -- helpers ---------------------------------------------------------------------------------
    def _died(self, boot: int) -> Callable[[], bool]:
        daemon = self.daemon
        assert daemon is not None
        return lambda: daemon.boot != boot or any(x.boot == boot for x in daemon.exits)

    def wait_ready(self) -> bool:
        """Until the running daemon has said ``ready``, opened the microphone and (the first time in
        each boot) spoken the ceiling text."""
        daemon, feeder = self.daemon, self.feeder
        assert daemon is not None and feeder is not None
        deadline = time.monotonic() + self.s.ready_s
        while time.monotonic() < deadline:
            if daemon.ready() and feeder.connected.is_set() and daemon.pid is not None:
                boot = daemon.boot
                if not self.s.ceiling or boot in self.ceilings or self._speak_ceiling(boot, deadline):
                    return True
                continue
            failed = next((x for x in daemon.exits if not x.killed and x.boot not in daemon.ready_at), None)
            if failed is not None:
                raise EdgeError(f"the daemon exited with status {failed.code} while starting: "
                                f"{daemon.last_line() or 'no output'} (log: {daemon.log_path})", code="soak.start")
            time.sleep(0.1)
        return False

    def _speak_ceiling(self, boot: int, deadline: float) -> bool:
        """CEILING_TEXT through ``say`` (retried while the broker or the device's link is down); True once
        it has been spoken, False if the daemon died meanwhile."""
        daemon = self.daemon
        assert daemon is not None and self.cmd_client is not None and self.requester is not None
        died = self._died(boot)
        pid = daemon.pid
        before = proc_stats(pid) if pid is not None else None
        mark = daemon.log.mark()
        while not died():
            if time.monotonic() > deadline:
                raise EdgeError("the daemon never took the say command that starts each boot", code="soak.start")
            # A command sent while the broker is away expires before it could arrive late.
            if self.cmd_client.connected and self.requester.send([DEVICE])[DEVICE].ok:
                break
            time.sleep(1.0)
        end = daemon.log.wait(lambda e: e.kind == "turn.end" and e.boot == boot, mark, self.s.stuck_s, died)
        if end is None:
            return False
        time.sleep(0.5)
        after = proc_stats(pid) if pid is not None else None
        self.ceilings[boot] = {"boot": boot, "rss_before_mb": round(before[0] / 1024, 1) if before else None,
                               "rss_after_mb": round(after[0] / 1024, 1) if after else None,
                               "outcome": end.outcome}
        return True

    def speaker_bytes(self) -> int:
        try:
            return self.speaker_wav.stat().st_size
        except OSError:
            return 0

    def speaker_rate(self) -> int:
        if not self._speaker_rate:
            try:
                with open(self.speaker_wav, "rb") as f:
                    head = f.read(28)
                self._speaker_rate = int.from_bytes(head[24:28], "little") if len(head) == 28 else 0
            except OSError:
                pass
        return self._speaker_rate or 22050

    # -- chaos -----------------------------------------------------------------------------------
    def _schedule_chaos(self, index: int) -> None:
        assert self.plan is not None
        for c in self.plan.chaos_at(index):
            if c.what == "kill":
                t = threading.Timer(c.delay_s, self._kill, args=(index,))
            else:
                t = threading.Timer(c.delay_s, self._flap_broker, args=(index, c.down_s))
            t.daemon = True
            t.start()
            self._chaos_threads.append(t)

    def _kill(self, index: int) -> None:
        daemon = self.daemon
        assert daemon is not None
        events = [e for e in daemon.log.since(0) if e.boot == daemon.boot]
        last = events[-1].kind if events else "starting"
        boot = daemon.kill()
        if boot is None:
            self.say(f"soak: [{self.now():7.1f} s] item {index}: no daemon to kill")
            return
        self.kills.append({"item": index, "boot": boot, "t": time.monotonic(), "at_s": self.now(),
                           "after": last, "outbox": outbox_depth(self.state / "mqtt-outbox.sqlite3")})
        self.say(f"soak: [{self.now():7.1f} s] item {index}: SIGKILL (boot {boot}, last logged: {last})")

    def _flap_broker(self, index: int, down_s: float) -> None:
        with self._broker_lock:
            t = self.now()
            self.broker.stop()
            self.say(f"soak: [{t:7.1f} s] item {index}: broker stopped for {down_s:g} s")
            time.sleep(down_s)
            self.broker.start()
            self.broker_flaps.append({"item": index, "at_s": t, "down_s": round(self.now() - t, 1)})

    # -- the items -------------------------------------------------------------------------------
    def run_items(self) -> None:
        assert self.plan is not None and self.daemon is not None
        if not self.wait_ready():
            raise EdgeError(f"the daemon was not ready within {self.s.ready_s:g} s; see {self.daemon.log_path}",
                            code="soak.start")
        self.say(f"soak: [{self.now():7.1f} s] daemon ready; {len(self.plan.items)} turns to go")
        self.not_back = False
        last_report = time.monotonic()
        for item in self.plan.items:
            if not self.wait_ready():
                self.not_back = True
                self.say(f"soak: the daemon did not come back within {self.s.ready_s:g} s; stopping the run")
                break
            self.current = item.index
            self._schedule_chaos(item.index)
            res = self.run_item(item)
            self.results.append(res)
            if res.stuck or (res.expected_answers > res.answered and not res.cut) or res.missed_wakes:
                self.say(f"soak: [{self.now():7.1f} s] item {item.index} ({item.kind}): {res.outcomes} {res.note}")
            if time.monotonic() - last_report > 60:
                last_report = time.monotonic()
                done = self.results
                self.say(f"soak: [{self.now():7.1f} s] {len(done)}/{len(self.plan.items)} turns, "
                         f"{sum(r.answered for r in done)}/{sum(r.expected_answers for r in done if not r.cut)} "
                         f"answered, boot {self.daemon.boot}")
        self.current = len(self.plan.items)

    def run_item(self, item: Item) -> ItemResult:
        daemon, feeder = self.daemon, self.feeder
        assert daemon is not None and feeder is not None
        if item.new_visitor:
            # The last visitor has gone: quiet, in real time, until their session has expired.
            last = next((e.t for e in reversed(daemon.log.since(0)) if e.kind == "turn.end"), 0.0)
            wait = self.s.session_idle_s + 0.5 - (time.monotonic() - last)
            if wait > 0:
                feeder.play(silence(wait)).wait(wait + 30)
        res = ItemResult(item.index, item.kind, item.clips, daemon.boot, self.now())
        mark = daemon.log.mark()
        died = self._died(res.boot)
        if item.kind in ("ask", "barge"):
            self._turn(item, res, mark, died)
        else:
            audio = silence(item.seconds) if item.kind == "silence" else self.noise_audio[item.index]
            feeder.play(audio, fast=True).wait(item.seconds + 60)
            time.sleep(0.3)  # what is still in the pipe reaches the wake model
        self._settle(res, mark, died)
        if not died():
            feeder.play(silence(item.gap_s), fast=True).wait(item.gap_s + 30)
        res.end_s = self.now()
        return res

    def _turn(self, item: Item, res: ItemResult, mark: int, died: Callable[[], bool]) -> None:
        daemon, feeder = self.daemon, self.feeder
        assert daemon is not None and feeder is not None
        log = daemon.log
        boot = res.boot
        first = self.clips[item.clips[0]]
        res.expected_answers = 1
        res.expected_wakes = 1
        feeder.play(silence(LEAD_S))
        seg = feeder.play(first.audio)
        seg.wait(first.seconds + LEAD_S + 60)
        wake = log.wait(lambda e: e.boot == boot and e.kind == "wake", mark, WAKE_WAIT_S, died)
        if wake is None:
            if died() or seg.cut:
                res.cut = True
            else:
                res.missed_wakes += 1
                res.note = f"no wake word for {first.name}"
            return
        res.wakes += 1
        if seg.started is not None:
            res.wake_lag_s.append(round(wake.t - (seg.started + first.wake_end_s), 3))
        if item.kind == "ask":
            end = self._turn_end(wake, mark, died, res)
            if end is not None and end.outcome == "done":
                res.answered += 1
            return
        # barge: the second wake word and question while the reply is heard
        bytes0 = self.speaker_bytes()
        rate = self.speaker_rate()
        deadline = time.monotonic() + self.s.stuck_s

        def ended() -> LogEvent | None:
            return next((e for e in log.since(mark) if e.kind == "turn.end" and e.turn == wake.turn), None)

        while time.monotonic() < deadline and not died() and ended() is None:
            if self.speaker_bytes() >= bytes0 + int(0.3 * rate) * 2:
                break
            time.sleep(0.02)
        if died():
            res.cut = True
            return
        if time.monotonic() >= deadline:
            res.stuck = True
            res.note = "the first reply never played"
            return
        second = self.clips[item.clips[1]]
        res.expected_wakes += 1
        mark2 = log.mark()
        seg2 = feeder.play(second.audio)
        seg2.wait(second.seconds + 60)
        wake2 = log.wait(lambda e: e.boot == boot and e.kind == "wake" and e.turn != wake.turn, mark2, WAKE_WAIT_S,
                         died)
        first_end = ended()
        if wake2 is None:
            if died() or seg2.cut:
                res.cut = True
            elif first_end is not None and seg2.started is not None and \
                    first_end.t < seg2.started + second.wake_end_s + 0.3:
                # The reply ended while the wake word was being said: the echo gate silences the
                # microphone just after the device's own sound, by design. Not a miss.
                res.barge = "late"
                res.expected_wakes -= 1
                res.note = "the reply ended during the barge-in's wake word"
            else:
                res.missed_wakes += 1
                res.note = f"no wake word for the barge-in {second.name}"
            self._turn_end(wake, mark, died, res)
            return
        res.wakes += 1
        if seg2.started is not None:
            res.wake_lag_s.append(round(wake2.t - (seg2.started + second.wake_end_s), 3))
        end1 = self._turn_end(wake, mark, died, res)
        res.barge = "interrupted" if end1 is not None and end1.outcome == "barge_in" else "late"
        end2 = self._turn_end(wake2, mark2, died, res)
        if end2 is not None and end2.outcome == "done":
            res.answered += 1

    def _turn_end(self, wake: LogEvent, mark: int, died: Callable[[], bool], res: ItemResult) -> LogEvent | None:
        daemon = self.daemon
        assert daemon is not None
        end = daemon.log.wait(lambda e: e.kind == "turn.end" and e.turn == wake.turn, mark, self.s.stuck_s, died)
        if end is None:
            if died():
                res.cut = True
            else:
                res.stuck = True
                res.note = f"turn {wake.turn} did not end within {self.s.stuck_s:g} s"
            return None
        res.turn_s.append(round(end.t - wake.t, 2))
        return end

    def _settle(self, res: ItemResult, mark: int, died: Callable[[], bool]) -> None:
        """Every turn begun during the item has ended; count what began that nobody asked for."""
        daemon = self.daemon
        assert daemon is not None
        evs = [e for e in daemon.log.since(mark) if e.boot == res.boot]
        wakes = [e for e in evs if e.kind == "wake"]
        res.false_wakes = max(0, len(wakes) - res.wakes)
        for w in wakes:
            if not died() and not res.stuck and not any(e.kind == "turn.end" and e.turn == w.turn for e in evs):
                self._turn_end(w, mark, died, res)
        for e in daemon.log.since(mark):
            if e.boot == res.boot and e.kind == "turn.end" and e.turn:
                res.outcomes.append(e.outcome)
                res.turn_ids.append(e.turn)
        if died() and res.expected_answers > res.answered:
            res.cut = True

    # -- the end ---------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        daemon, feeder = self.daemon, self.feeder
        assert daemon is not None and feeder is not None and self.plan is not None
        for t in self._chaos_threads:
            t.join()
        with self._broker_lock:  # the broker is up from here on
            pass
        outbox = self.state / "mqtt-outbox.sqlite3"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (outbox_depth(outbox) or 0) > 0:
            time.sleep(0.5)
        if self.sampler is not None:
            self.sampler.stop()
        final_exit = daemon.stop(timeout=60)
        feeder.close()
        meta = outbox_meta(outbox) if outbox.exists() else {}
        produced = meta.get("next_seq", 1) - 1
        left = outbox_depth(outbox) or 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self._received_seqs() < produced:
            time.sleep(0.5)
        assert self.recorder is not None
        self.recorder.stop()
        if self.cmd_client is not None:
            self.cmd_client.close()
        if self._recorder_thread is not None:
            self._recorder_thread.join(timeout=30)
        self.broker.stop()
        report = self.report(produced, int(meta.get("dropped", 0)), left, final_exit)
        daemon.close()
        return report

    def _received_seqs(self) -> int:
        try:
            con = sqlite3.connect(f"file:{self.events_db}?mode=ro", uri=True, timeout=2)
            try:
                return int(con.execute("SELECT COUNT(DISTINCT seq) FROM events WHERE device_id = ?",
                                       (DEVICE,)).fetchone()[0])
            finally:
                con.close()
        except sqlite3.Error:
            return 0

    def _rows(self) -> list[tuple[int | None, str, str | None, str]]:
        con = sqlite3.connect(f"file:{self.events_db}?mode=ro", uri=True, timeout=5)
        try:
            return list(con.execute("SELECT seq, type, turn_id, payload FROM events WHERE device_id = ? "
                                    "ORDER BY seq", (DEVICE,)))
        finally:
            con.close()

    def report(self, produced: int, dropped: int, left: int, final_exit: int | None) -> dict[str, Any]:
        daemon, sampler, plan = self.daemon, self.sampler, self.plan
        assert daemon is not None and sampler is not None and plan is not None and self.recorder is not None
        s = self.s
        rows = self._rows()
        d = rep.delivery(produced, (r[0] for r in rows), self.recorder.stats.duplicates, dropped)
        ends = {r[2]: json.loads(r[3]) for r in rows if r[1] == "turn.end" and r[2]}
        logged_ends = [(e.turn, e.t, e.boot) for e in daemon.log.since(0) if e.kind == "turn.end" and e.turn]
        kill_times = [(k["boot"], k["t"]) for k in self.kills]
        by_kill, lost_ends = rep.turn_ends_lost(logged_ends, set(ends), kill_times)

        results = self.results
        # Answered turns, in order, with when they ended (for warm-up) and how soon they sounded.
        answered_ids = [(tid, out) for r in results for tid, out in zip(r.turn_ids, r.outcomes) if out == "done"]
        first_audio = [float(ends[t]["timings_ms"]["end_of_speech_to_first_audio"]) for t, _ in answered_ids
                       if t in ends and "end_of_speech_to_first_audio" in (ends[t].get("timings_ms") or {})]
        ends_by_boot: dict[int, list[float]] = {}
        for e in daemon.log.since(0):
            if e.kind == "turn.end" and e.outcome == "done":
                ends_by_boot.setdefault(e.boot, []).append(round(e.t - self.t0, 2))
        boots = [g for g in (rep.growth(b, sampler.samples, ends_by_boot.get(b, []))
                             for b in range(1, daemon.boot + 1)) if g is not None]
        judged = max(boots, key=lambda g: g.turns_after_warmup, default=None)
        if judged is not None and judged.turns_after_warmup < s.limits.min_turns_judged:
            judged = None
        exits = daemon.exits
        unexpected = [{"boot": x.boot, "code": x.code} for x in exits if not x.killed and x.boot < daemon.boot]
        ready_s = []
        for x in exits:
            if x.killed and x.boot + 1 in daemon.ready_at:
                ready_s.append(round(daemon.ready_at[x.boot + 1] - x.t, 1))
        kinds = {k: plan.count(k) for k in ("ask", "barge", "silence", "noise")}
        sessions = {json.loads(r[3]).get("session_id") for r in rows if r[1] == "turn.end"}
        outbox_samples = [x.outbox for x in sampler.samples if x.outbox is not None]
        report: dict[str, Any] = {
            "seed": s.seed,
            "wall_s": round(time.monotonic() - self.t0, 1),
            "settings": {"turns": s.turns, "kills": s.n_kills, "broker_restarts": s.n_broker_restarts,
                         "kill_span": s.kill_span, "visitor_turns": s.visitor_turns,
                         "session_idle_s": s.session_idle_s if s.visitor_turns else None,
                         "llm_threads": s.llm_threads, "fast": s.fast, "sample_s": s.sample_s, "stuck_s": s.stuck_s,
                         "config": str(self.base_config), "limits": dataclasses.asdict(s.limits)},
            "code": code_state(REPO, self.code, snapshot=s.code is None),
            "turns": {
                "items": len(plan.items), "played": len(results), "kinds": kinds,
                "expected_answers": sum(r.expected_answers for r in results if not r.cut),
                "answered": sum(r.answered for r in results if not r.cut),
                "cut_by_kill": sum(1 for r in results if r.cut),
                "unanswered_items": [r.index for r in results if not r.cut and r.answered < r.expected_answers],
                "outcomes": _count(o for r in results for o in r.outcomes),
                "visitors": 1 + sum(1 for i in plan.items if i.new_visitor), "sessions": len(sessions - {None}),
            },
            "wakes": {
                "expected": sum(r.expected_wakes for r in results if not r.cut),
                "caught": sum(r.wakes for r in results if not r.cut),
                "missed": sum(r.missed_wakes for r in results if not r.cut),
                "missed_items": [r.index for r in results if r.missed_wakes and not r.cut],
                "false": sum(r.false_wakes for r in results),
                "lag_s": rep.percentiles([x for r in results for x in r.wake_lag_s]),
                "clips": {c.name: c.solo_score for c in self.clips.values()},
                "noise_firing_alone": self.quiet_fired,
            },
            "barge_in": {"items": kinds["barge"], "interrupted": sum(1 for r in results if r.barge == "interrupted"),
                         "late": sum(1 for r in results if r.barge == "late")},
            "stuck": [{"item": r.index, "note": r.note} for r in results if r.stuck],
            "turn_s": rep.percentiles([x for r in results for x in r.turn_s]),
            "restarts": {"kills": len(self.kills), "restarts": max(0, daemon.boot - 1),
                         "ready_s": rep.percentiles(ready_s),
                         "killed": [{key: v for key, v in kill.items() if key != "t"} for kill in self.kills],
                         "unexpected_exits": unexpected, "not_back": self.not_back, "final_exit": final_exit},
            "broker": {"restarts": len(self.broker_flaps), "down_s": [f["down_s"] for f in self.broker_flaps],
                       "answered_while_down": sum(r.answered for r in results if any(
                           f["at_s"] < r.end_s and r.start_s < f["at_s"] + f["down_s"] for f in self.broker_flaps)),
                       "flaps": self.broker_flaps},
            "events": {**dataclasses.asdict(d), "outbox_left": left, "turn_ends_logged": len(logged_ends),
                       "turn_ends_lost_to_kill": by_kill, "turn_ends_lost": lost_ends,
                       "recorder": self.recorder.stats.as_json()},
            "outbox": {"max": max(outbox_samples, default=0),
                       "over_time": _thin([(x.t, x.outbox) for x in sampler.samples if x.outbox is not None])},
            "resources": {"boots": [dataclasses.asdict(g) for g in boots],
                          "ceiling_text": [self.ceilings[b] for b in sorted(self.ceilings)],
                          "judged": dataclasses.asdict(judged) if judged is not None else None,
                          "over_time": _thin([(x.t, x.boot, round(x.rss_kb / 1024, 1), x.threads, x.fds,
                                               round(x.anon_kb / 1024, 1), round(x.cpu_s, 1))
                                              for x in sampler.samples])},
            "latency": {"all": rep.percentiles(first_audio), "over_time": rep.latency_over_time(first_audio),
                        "first_audio_ms": first_audio},
            "items": [dataclasses.asdict(r) for r in results],
        }
        report["failures"] = rep.verdict(report, s.limits)
        report["passed"] = not report["failures"]
        return report

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.daemon is not None:
            self.daemon.stop(timeout=30)
        if self.feeder is not None:
            self.feeder.close()
        if self.recorder is not None:
            self.recorder.stop()
        if self.cmd_client is not None:
            self.cmd_client.close()
        if self.broker is not None:
            self.broker.stop()


def snapshot(repo: Path, dest: Path) -> Path:
    """A copy of what the daemon runs: the package, the configs and the model manifest."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(repo / "edge", dest / "edge", ignore=skip)
    shutil.copytree(repo / "config", dest / "config", ignore=skip)
    (dest / "models").mkdir(parents=True)
    shutil.copy2(repo / "models" / "manifest.toml", dest / "models" / "manifest.toml")
    return dest


def code_state(repo: Path, code: Path, *, snapshot: bool) -> dict[str, Any]:
    """Which code the daemon ran: a hash of its Python sources, and the checkout's commit and edits."""
    import hashlib
    import subprocess

    h = hashlib.sha256()
    for path in sorted((code / "edge").rglob("*.py")):
        h.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
    out: dict[str, Any] = {"dir": str(code), "snapshot_of_checkout": snapshot, "sources_sha256": h.hexdigest()[:16]}
    try:
        out["commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "edge", "config"],
                                capture_output=True, text=True, timeout=10).stdout.splitlines()
        out["checkout_changes"] = [line[3:] for line in status]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _count(xs: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _thin(points: Sequence[Any], most: int = 2000) -> list[Any]:
    step = max(1, len(points) // most)
    return list(points[::step])


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    res = report["resources"]["over_time"]
    t = [p[0] / 60 for p in res]
    axes[0].plot(t, [p[2] for p in res], lw=0.8, label="RSS")
    axes[0].plot(t, [p[5] for p in res], lw=0.8, label="anonymous")
    axes[0].set_ylabel("memory (MB)")
    axes[0].legend(loc="upper left")
    axes[1].plot(t, [p[3] for p in res], lw=0.8, label="threads")
    axes[1].plot(t, [p[4] for p in res], lw=0.8, label="open files")
    axes[1].legend(loc="upper left")
    ob = report["outbox"]["over_time"]
    axes[2].plot([p[0] / 60 for p in ob], [p[1] for p in ob], lw=0.8)
    axes[2].set_ylabel("outbox (events)")
    items = report["items"]
    lat = report["latency"]["first_audio_ms"]
    done_t = [it["end_s"] / 60 for it in items for o in it["outcomes"] if o == "done"][: len(lat)]
    axes[3].plot(done_t, lat[: len(done_t)], ".", ms=3)
    axes[3].set_ylabel("first audio (ms)")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        for k in report["restarts"]["killed"]:
            ax.axvline(k["at_s"] / 60, color="red", lw=0.6, alpha=0.6)
        for f in report["broker"]["flaps"]:
            ax.axvspan(f["at_s"] / 60, (f["at_s"] + f["down_s"]) / 60, color="orange", alpha=0.2)
    fig.suptitle(f"soak: {report['turns']['items']} turns, seed {report['seed']} (red: SIGKILL, orange: broker down)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(settings: Settings, out: Callable[[str], None] = print) -> dict[str, Any]:
    soak = Soak(settings, out)
    try:
        soak.prepare()
        soak.run_items()
        report = soak.finish()
    except BaseException:
        soak.close()
        raise
    report["workdir"] = str(soak.work)
    if settings.report is not None:
        settings.report.parent.mkdir(parents=True, exist_ok=True)
        settings.report.write_text(rep.to_json(report), encoding="utf-8")
    if settings.plot is not None:
        plot(report, settings.plot)
    if soak._own_workdir and not settings.keep and report["passed"]:
        shutil.rmtree(soak.work, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=50, help="turns in the run (default 50)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the plan, the noise and the chaos (default 1)")
    ap.add_argument("--report", type=Path, help="write the JSON report here")
    ap.add_argument("--plot", type=Path, help="write a PNG of memory, threads, files, outbox and latency over time")
    ap.add_argument("--config", type=Path, help="the daemon's base config (default: config/dev.toml of the code "
                    "it runs)")
    ap.add_argument("--code", type=Path, help="run the daemon from this source directory (holding edge/, config/ "
                    "and models/manifest.toml); default: a copy of this checkout taken at start, so that edits "
                    "made during the run never reach a restarted daemon")
    ap.add_argument("--kills", type=int, help="SIGKILLs of the daemon (default: one per 60 turns, at least 1)")
    ap.add_argument("--broker-restarts", type=int, help="broker stops and starts (default: one per 40 turns, "
                    "at least 2)")
    ap.add_argument("--kill-span", type=float, default=0.5, help="the kills fall in this first part of the run, "
                    "so that the rest runs in one process whose memory is judged (default 0.5)")
    ap.add_argument("--visitor-turns", type=int, default=4, help="questions per visitor on average; between "
                    "visitors the session expires (llm.session_idle_s = 3 s in the generated config). 0: one "
                    "visitor, one session for the whole run, the config's own session_idle_s (default 4)")
    ap.add_argument("--llm-threads", type=int, default=1, help="llm.n_threads for the daemon (default 1; 0: the "
                    "config's own)")
    ap.add_argument("--fast", type=float, default=8.0, help="speed-up of the audio while nothing is said or "
                    "answered (default 8)")
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory, removed "
                    "after a run that passed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--no-espeak", action="store_true", help="only the Piper voice")
    ap.add_argument("--no-ceiling", action="store_true", help="do not speak the longest clause at each start (then "
                    "the synthesizer's memory rises in steps during the run, whenever a reply has a clause longer "
                    "than any before)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problems = []
    if args.turns < 1:
        problems.append("--turns must be at least 1")
    if args.kills is not None and args.kills < 0 or args.broker_restarts is not None and args.broker_restarts < 0:
        problems.append("--kills and --broker-restarts cannot be negative")
    if not 1.0 <= args.fast <= 50.0:
        problems.append("--fast must be between 1 and 50")
    if not 0.0 < args.kill_span <= 1.0:
        problems.append("--kill-span must be in (0, 1]")
    if args.visitor_turns < 0:
        problems.append("--visitor-turns cannot be negative")
    if args.llm_threads < 0:
        problems.append("--llm-threads cannot be negative")
    if args.config is not None and not args.config.is_file():
        problems.append(f"{args.config}: no such config file")
    if args.code is not None and not (args.code / "edge" / "__init__.py").is_file():
        problems.append(f"{args.code}: not a source directory (no edge/__init__.py)")
    if problems:
        print(f"scripts/soak: error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("scripts/soak: error: mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    settings = Settings(turns=args.turns, seed=args.seed, config=args.config, code=args.code, kills=args.kills,
                        broker_restarts=args.broker_restarts, kill_span=args.kill_span,
                        visitor_turns=args.visitor_turns, llm_threads=args.llm_threads, fast=args.fast,
                        workdir=args.workdir, keep=args.keep, report=args.report, plot=args.plot,
                        espeak=not args.no_espeak, ceiling=not args.no_ceiling)

    def say(line: str) -> None:
        print(line, flush=True)

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # Also when started in the background (SIGINT ignored) or stopped with SIGTERM: the broker and
    # the daemon are stopped on the way out.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        report = run(settings, say)
    except EdgeError as err:
        print(f"scripts/soak: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scripts/soak: interrupted", file=sys.stderr)
        return 130
    for line in rep.summary_lines(report):
        say(line)
    if not report["passed"]:
        say(f"soak: the daemon's log and the fleet's database are in {report['workdir']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
