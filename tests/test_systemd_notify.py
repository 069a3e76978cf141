"""sd_notify and the progress watchdog, against a real datagram socket bound as NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from notify_socket import NotifyCollector

from edge.logs import MessageId
from edge.systemd import Notifier, Status, Watchdog, socket_address

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "notify_standin.py"


def _has_systemd_python() -> bool:
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    pytest.param(True, id="systemd-python",
                 marks=pytest.mark.skipif(not _has_systemd_python(), reason="systemd-python not installed")),
    pytest.param(False, id="fallback"),
]


@pytest.fixture(params=["path", "abstract"])
def collector(request, tmp_path, monkeypatch):
    with NotifyCollector(tmp_path, abstract=request.param == "abstract") as c:
        monkeypatch.setenv("NOTIFY_SOCKET", c.address)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield c


def test_outside_systemd_everything_is_a_no_op():
    notifier = Notifier(environ={"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.backend == "none"
    assert notifier.notify("READY=1") is False
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    assert notifier.watchdog_interval() is None
    watchdog = Watchdog(notifier)
    watchdog.start()
    watchdog.progress()
    assert not watchdog.enabled
    assert "systemd-watchdog" not in [t.name for t in threading.enumerate()]
    watchdog.stop()


def test_socket_address_forms():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc/def") == "\0abc/def"
    assert socket_address("vsock:2:1234") is None


@pytest.mark.parametrize("use_systemd_python", BACKENDS)
def test_ready_status_stopping(collector, use_systemd_python):
    notifier = Notifier(use_systemd_python=use_systemd_python)
    assert notifier.backend == ("systemd-python" if use_systemd_python else "socket")

    notifier.status(Status.LOADING_MODELS)
    notifier.ready()
    notifier.status("broker unreachable\n- queueing")  # a newline must not start a new assignment
    notifier.stopping()

    collector.wait_for("STOPPING", "1", timeout=5)
    fields = [m.fields for m in collector.messages]
    assert fields == [
        {"STATUS": "loading models"},
        {"READY": "1", "STATUS": "listening"},
        {"STATUS": "broker unreachable - queueing"},
        {"STOPPING": "1", "STATUS": "stopping"},
    ]
    assert {m.pid for m in collector.messages} == {os.getpid()}


@pytest.mark.parametrize("use_systemd_python", BACKENDS)
def test_watchdog_pings_only_while_progress_is_made(collector, monkeypatch, caplog, use_systemd_python):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    notifier = Notifier(use_systemd_python=use_systemd_python)
    assert notifier.watchdog_interval() == pytest.approx(0.2)
    watchdog = Watchdog(notifier)
    assert watchdog.period == pytest.approx(0.1)

    feeding = threading.Event()
    done = threading.Event()

    def audio_loop() -> None:
        while not done.is_set():
            if feeding.is_set():
                watchdog.progress()
            time.sleep(0.01)

    loop = threading.Thread(target=audio_loop, daemon=True)
    loop.start()
    caplog.set_level(logging.INFO, logger="edge.systemd")
    try:
        feeding.set()
        watchdog.start()
        t0 = time.monotonic()
        time.sleep(0.8)
        assert collector.count("WATCHDOG", "1", since=t0) >= 3

        feeding.clear()
        time.sleep(0.3)  # a ping already earned by the last progress may still be on its way
        t1 = time.monotonic()
        time.sleep(0.8)
        assert collector.count("WATCHDOG", "1", since=t1) == 0, "pinged although the loop was stalled"
        assert watchdog.withheld >= 5

        feeding.set()
        collector.wait_for("WATCHDOG", "1", timeout=2, after=time.monotonic())
    finally:
        done.set()
        watchdog.stop()
        loop.join()

    t2 = time.monotonic()
    time.sleep(0.3)
    assert collector.count("WATCHDOG", "1", since=t2) == 0, "pinged after stop()"
    stalled = [r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == MessageId.WATCHDOG_STALLED]
    resumed = [r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == MessageId.WATCHDOG_RESUMED]
    assert len(stalled) == 1 and len(resumed) == 1, "the stall is logged once, not per tick"


def test_watchdog_interval_honours_watchdog_pid(collector, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert Notifier().watchdog_interval() == 3.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval() == 3.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_interval() is None
    assert not Watchdog(Notifier()).enabled
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert Notifier().watchdog_interval() is None


@pytest.mark.parametrize("use_systemd_python", BACKENDS)
def test_unreachable_socket_never_raises(tmp_path, monkeypatch, caplog, use_systemd_python):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    notifier = Notifier(use_systemd_python=use_systemd_python)
    with caplog.at_level(logging.WARNING, logger="edge.systemd"):
        for _ in range(3):
            notifier.watchdog()
        assert notifier.notify("READY=1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_progress_is_cheap():
    watchdog = Watchdog(Notifier(environ={}))
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        watchdog.progress()
    per_call = (time.perf_counter() - t0) / n
    print(f"\nwatchdog.progress(): {per_call * 1e6:.2f} µs a call")
    # One 20 ms chunk leaves ~20,000 µs: even a hundredfold slowdown would not matter. This bound
    # catches a lock or a system call creeping in, not a busy machine.
    assert per_call < 200e-6, f"progress() took {per_call * 1e6:.2f} µs"


# --- end to end: a process started the way systemd starts the daemon -----------------------

class PcmWriter:
    """Feeds 20 ms chunks of a 440 Hz tone into the FIFO in real time while ``flowing`` is set."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.flowing = threading.Event()
        self._closed = threading.Event()
        t = np.arange(320) / 16000
        self._chunk = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._opened = threading.Event()

    def open(self) -> None:
        self.flowing.set()
        self._thread.start()
        assert self._opened.wait(10), "the reader never opened the audio FIFO"

    def _run(self) -> None:
        with open(self.fifo, "wb", buffering=0) as out:  # blocks until the daemon opens it
            self._opened.set()
            while not self._closed.is_set():
                if self.flowing.is_set():
                    try:
                        out.write(self._chunk)
                    except BrokenPipeError:
                        return
                time.sleep(0.02)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


def _standin_command(audio: Path, fallback: bool) -> list[str]:
    return [sys.executable, str(STANDIN), "--audio", str(audio)] + (["--fallback"] if fallback else [])


def _daemon_command(audio: Path, fallback: bool) -> list[str]:
    """The real daemon on the dev models, its microphone reading the FIFO as raw 16 kHz PCM.

    The FIFO is what stalls the audio loop, so the daemon needs no test hook. ``fallback``
    hides systemd-python from it, so the dependency-free sender is what talks to the socket.
    """
    out = audio.with_name("speaker.wav")
    hide = "sys.modules['systemd'] = None; " if fallback else ""
    prelude = f"import sys; {hide}from edge.cli import main; sys.exit(main())"
    return ["env", f"EDGE_VOICE_AUDIO__INPUT_DEVICE=file:{audio}", f"EDGE_VOICE_AUDIO__OUTPUT_DEVICE=file:{out}",
            sys.executable, "-c", prelude, "run", "--config", str(REPO / "config" / "dev.toml")]


LAUNCHERS = {"standin": _standin_command, "daemon": _daemon_command}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("abstract,fallback", [(False, False), (True, True)], ids=["path-socket", "abstract-fallback"])
def test_daemon_notify_end_to_end(tmp_path, launcher, abstract, fallback):
    if not fallback and not _has_systemd_python():
        pytest.skip("systemd-python not installed")
    audio = tmp_path / "mic.pcm"
    os.mkfifo(audio)
    with NotifyCollector(tmp_path, abstract=abstract) as notify:
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
        env.update(notify.env, WATCHDOG_USEC="1000000", PYTHONPATH=str(REPO))
        # systemd sets WATCHDOG_PID to the main PID; `exec` keeps the shell's PID for the daemon.
        cmd = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"] + LAUNCHERS[launcher](audio, fallback)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        writer = PcmWriter(audio)
        try:
            loading = notify.wait_for("STATUS", "loading models", timeout=30)
            time.sleep(1.0)
            assert not notify.values("READY"), "READY=1 before the audio input was open"

            writer.open()
            ready = notify.wait_for("READY", "1", timeout=30)
            assert loading.time < ready.time and ready.fields.get("STATUS") == "listening"

            first = notify.wait_for("WATCHDOG", "1", timeout=5, after=ready.time)
            notify.wait_for("WATCHDOG", "1", timeout=5, after=first.time)

            writer.flowing.clear()  # the audio loop now blocks in read(), like a hung capture
            time.sleep(1.2)  # > 2 ping periods: a ping earned before the stall has gone out
            quiet_from = time.monotonic()
            time.sleep(2.0)
            assert notify.count("WATCHDOG", "1", since=quiet_from) == 0, "pinged while the audio loop was stalled"

            writer.flowing.set()
            notify.wait_for("WATCHDOG", "1", timeout=5, after=time.monotonic())

            writer.close()  # end of stream: the microphone is gone
            lost = notify.wait_for("STATUS", "mic lost - retrying", timeout=5)
            writer = PcmWriter(audio)
            writer.open()
            notify.wait_for("STATUS", "listening", timeout=5, after=lost.time)

            proc.send_signal(signal.SIGTERM)
            stopping = notify.wait_for("STOPPING", "1", timeout=15)
            assert proc.wait(timeout=15) == 0
            assert notify.count("WATCHDOG", "1", since=stopping.time) == 0
        finally:
            writer.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stderr = proc.stderr.read() if proc.stderr else ""
        # NotifyAccess=main: systemd drops messages from any other process.
        assert {m.pid for m in notify.messages} == {proc.pid}, stderr
        assert stderr.count("withholding the watchdog ping") == 1, stderr
        assert ("notify backend: socket" if fallback else "notify backend: systemd-python") in stderr
