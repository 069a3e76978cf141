"""The soak run's moving parts: the microphone FIFO's writer, the daemon as a restartable
process with its log read line by line, and a sampler of its memory, threads and files.

The FIFO writer is the microphone's clock. Queued segments go out in 20 ms chunks, in real
time or (``fast``) several times faster; between segments it writes silence in real time, as
a live microphone never stops. The pipe is shrunk to one page, so the writer never runs more
than ~0.1 s ahead of what the daemon has read. When the daemon dies the write fails; the
segments queued are marked cut and the writer waits for the next daemon to open the FIFO.

The daemon's log (plain lines on stderr) is what the run follows live, because it does not
depend on the broker: ``ready``, ``wake``, ``barge_in``, ``transcript.final``,
``reply.final``, ``error`` and ``turn.end <outcome>``, each with its turn id.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE

_LOGGER = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), not exported by Python 3.10
CHUNK_S = CHUNK_SAMPLES / SAMPLE_RATE


# -- the microphone -----------------------------------------------------------------------------

@dataclass(eq=False)
class Segment:
    samples: np.ndarray = field(repr=False)
    fast: bool
    done: threading.Event = field(default_factory=threading.Event)
    cut: bool = False  # the daemon went away before all of it was written
    started: float | None = None  # monotonic time its first chunk was written
    ended: float | None = None  # ... its last

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


class Feeder:
    """Writes 16 kHz PCM into ``path`` (a FIFO), reopening it for every new reader."""

    def __init__(self, path: Path, fast_factor: float = 8.0) -> None:
        self.path = path
        self.fast_factor = fast_factor
        self.connected = threading.Event()
        self.connections = 0
        self._queue: collections.deque[Segment] = collections.deque()
        self._current: Segment | None = None  # the segment being written
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-feeder", daemon=True)
        self._silence = bytes(2 * CHUNK_SAMPLES)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._cut_all()

    def play(self, samples: np.ndarray, *, fast: bool = False) -> Segment:
        seg = Segment(np.asarray(samples, dtype=np.int16), fast)
        with self._lock:
            if not self.connected.is_set():
                seg.cut = True
                seg.done.set()
            else:
                self._queue.append(seg)
        return seg

    def _cut_all(self) -> None:
        with self._lock:
            if self._current is not None and not self._current.done.is_set():
                self._current.cut = True
                self._current.done.set()
            self._current = None
            while self._queue:
                seg = self._queue.popleft()
                seg.cut = True
                seg.done.set()

    def _open(self) -> int | None:
        """Wait for a reader; the write end, blocking, with a one-page pipe."""
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:  # ENXIO: nobody has it open for reading yet
                    raise
                self._stop.wait(0.05)
                continue
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, 4096)
            except OSError:
                pass  # the default 64 KiB: the writer may run up to 2 s ahead
            return fd
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            fd = self._open()
            if fd is None:
                return
            with self._lock:
                self.connections += 1
                self.connected.set()
            try:
                self._write_until_gone(fd)
            finally:
                with self._lock:
                    self.connected.clear()
                os.close(fd)
                self._cut_all()

    def _write_until_gone(self, fd: int) -> None:
        due = time.monotonic()
        seg: Segment | None = None
        pos = 0
        while not self._stop.is_set():
            if seg is None:
                with self._lock:
                    seg = self._current = self._queue.popleft() if self._queue else None
                pos = 0
            if seg is not None:
                block = seg.samples[pos: pos + CHUNK_SAMPLES]
                if len(block) < CHUNK_SAMPLES:
                    block = np.pad(block, (0, CHUNK_SAMPLES - len(block)))
                data = block.astype("<i2").tobytes()
                step = CHUNK_S / self.fast_factor if seg.fast else CHUNK_S
            else:
                data, step = self._silence, CHUNK_S
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif due < now - 0.25:
                due = now  # the reader was slow (or away): no burst to catch up
            try:
                os.write(fd, data)
            except OSError:  # BrokenPipeError: the daemon has gone; its successor opens the FIFO anew
                return
            due += step
            if seg is not None:
                now = time.monotonic()
                if pos == 0:
                    seg.started = now
                pos += CHUNK_SAMPLES
                if pos >= len(seg.samples):
                    seg.ended = now
                    seg.done.set()
                    seg = None


# -- the daemon's log ---------------------------------------------------------------------------

# "<time> INFO edge.daemon: turn.end done {...} [turn=ab12 stage=turn]"
_LINE = re.compile(r" (?:INFO|WARNING|ERROR) edge\.daemon: (wake|barge_in|transcript\.final|reply\.final|error|"
                   r"turn\.end|ready)\b ?(.*?)(?: \[(?:turn=(\w+))?[^\]]*\])?$")


@dataclass(frozen=True)
class LogEvent:
    t: float  # monotonic time the line was read
    wall: float
    boot: int
    kind: str  # ready, wake, barge_in, transcript.final, reply.final, error, turn.end
    turn: str | None
    detail: str  # outcome for turn.end, else the logged data

    @property
    def outcome(self) -> str:
        return self.detail.split(" ", 1)[0] if self.kind == "turn.end" else ""


class LogWatch:
    """Every notable line of every boot, in order; waiters are woken per line."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        self._cond = threading.Condition()

    def add(self, ev: LogEvent) -> None:
        with self._cond:
            self.events.append(ev)
            self._cond.notify_all()

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def since(self, mark: int) -> list[LogEvent]:
        with self._cond:
            return self.events[mark:]

    def wait(self, pred: Callable[[LogEvent], bool], mark: int, timeout: float,
             stop: Callable[[], bool] = lambda: False) -> LogEvent | None:
        """The first event after ``mark`` matching ``pred``; None on timeout or when ``stop()``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[mark:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or stop():
                    return None
                self._cond.wait(min(left, 0.25))


@dataclass
class Exit:
    boot: int
    pid: int
    code: int | None
    t: float
    killed: bool  # by the soak's SIGKILL


class DaemonProcess:
    """``edge-voice run`` as a subprocess, restarted like systemd's ``Restart=always`` does."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], cwd: Path, log_path: Path,
                 restart_delay_s: float = 0.1) -> None:
        self.cmd = list(cmd)
        self.env = env
        self.cwd = cwd
        self.log = LogWatch()
        self.log_path = log_path
        self.restart_delay_s = restart_delay_s
        self.boot = 0
        self.proc: subprocess.Popen[str] | None = None
        self.exits: list[Exit] = []
        self.starts: list[float] = []  # monotonic start time per boot
        self.ready_at: dict[int, float] = {}
        self._killed: set[int] = set()
        self._last_line = ""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._logfile: IO[str] = open(log_path, "a", encoding="utf-8")
        self._supervisor = threading.Thread(target=self._supervise, name="soak-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def ready(self) -> bool:
        return self.boot in self.ready_at

    def start(self) -> None:
        self._spawn()
        self._supervisor.start()

    def _spawn(self) -> None:
        with self._lock:
            self.boot += 1
            boot = self.boot
            self._logfile.write(f"---- soak: boot {boot} ----\n")
            self._logfile.flush()
            self.proc = proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                                errors="replace")
            self.starts.append(time.monotonic())
        threading.Thread(target=self._read, args=(proc, boot), name=f"soak-log-{boot}", daemon=True).start()

    def last_line(self) -> str:
        return self._last_line

    def _read(self, proc: subprocess.Popen[str], boot: int) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            self._logfile.write(line + "\n")
            if line.strip():
                self._last_line = line.strip()[-300:]
            m = _LINE.search(line)
            if m is None:
                continue
            kind, detail, turn = m.group(1), m.group(2), m.group(3)
            ev = LogEvent(time.monotonic(), time.time(), boot, kind, turn, detail)
            if kind == "ready":
                self.ready_at[boot] = ev.t
            self.log.add(ev)
        self._logfile.flush()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            proc = self.proc
            assert proc is not None
            code = proc.wait()
            with self._lock:
                self.exits.append(Exit(self.boot, proc.pid, code, time.monotonic(), proc.pid in self._killed))
            self.log.poke()
            if self._stopping.is_set():
                return
            _LOGGER.info("daemon (boot %d) exited with %s; restarting", self.boot, code)
            time.sleep(self.restart_delay_s)
            if self._stopping.is_set():
                return
            self._spawn()

    def kill(self) -> int | None:
        """SIGKILL the running daemon; the supervisor starts the next one. Its boot, or None."""
        with self._lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return None
            self._killed.add(proc.pid)
            proc.send_signal(signal.SIGKILL)
            return self.boot

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a clean stop: the outbox is flushed) and no restart; the exit status."""
        self._stopping.set()
        proc = self.proc
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                code = proc.returncode
        self._supervisor.join(timeout=5)
        time.sleep(0.2)  # the log reader's last lines
        self._logfile.flush()
        return code

    def close(self) -> None:
        self._logfile.close()


# -- what the daemon holds over time ------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the run began
    boot: int
    item: int  # the plan item in progress
    rss_kb: int
    anon_kb: int  # of which anonymous memory (heap, arenas): what a leak grows
    threads: int
    fds: int
    cpu_s: float  # CPU time the process has used so far (user + system)
    outbox: int | None  # events waiting in the outbox (None: unreadable at that moment)


_TICK = os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> tuple[int, int, int, int, float] | None:
    """(VmRSS and RssAnon in kB, threads, open file descriptors, CPU seconds) of ``pid``; None once
    it is gone."""
    try:
        rss = anon = threads = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None
    return rss, anon, threads, fds, cpu


def outbox_depth(path: Path) -> int | None:
    """Rows in the daemon's outbox, read-only (WAL: the daemon's writes are not held up)."""
    if not path.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return None


def outbox_meta(path: Path) -> dict[str, int]:
    """The outbox's ``next_seq`` and ``dropped`` counters (after the daemon has stopped)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return {k: int(v) for k, v in con.execute("SELECT key, value FROM meta")}
    finally:
        con.close()


class Sampler:
    def __init__(self, daemon: DaemonProcess, outbox: Path, every_s: float, item: Callable[[], int],
                 t0: float) -> None:
        self.daemon = daemon
        self.outbox = outbox
        self.every_s = every_s
        self.item = item
        self.samples: list[Sample] = []
        self.t0 = t0  # monotonic time the run began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            pid, boot = self.daemon.pid, self.daemon.boot
            if pid is None or not self.daemon.ready():
                continue
            stats = proc_stats(pid)
            if stats is None:
                continue
            rss, anon, threads, fds, cpu = stats
            self.samples.append(Sample(round(time.monotonic() - self.t0, 2), boot, self.item(), rss, anon, threads,
                                       fds, cpu, outbox_depth(self.outbox)))
