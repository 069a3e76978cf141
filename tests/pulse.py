"""Test helper: a private PulseAudio server with null sinks, so PyAudio runs for real with no sound card.

The server listens on three sockets: ``ctl`` for the test's own tools (pactl, paplay, parec),
``mic`` and ``speaker`` for the daemon. Its ALSA configuration (``<home>/.asoundrc``, read by
a process whose ``HOME`` is ``home``) adds two PortAudio-visible devices, ``kiosk_mic`` (the
monitor of the ``micfeed`` null sink, through the ``mic`` socket) and ``kiosk_speaker`` (the
``speaker`` null sink, through the ``speaker`` socket). So:

- ``play(wav)`` feeds the "microphone" in real time (paplay into ``micfeed``);
- ``record(path)`` captures what the daemon plays (parec from ``speaker.monitor``);
- ``cut("mic")`` unloads the ``mic`` socket's protocol module: the daemon's capture stream dies
  and reopening fails, as when a USB microphone is pulled out; ``restore("mic")`` plugs it back.
  The same for ``"speaker"``;
- ``echo(True)`` loops the speaker back into the microphone, like a loudspeaker in a room.

The server runs in the foreground under its own config and runtime directory and is stopped
by its PID. Root is fine (it warns, and works).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from procs import stop_process

RATE = 16000  # both null sinks; PulseAudio converts whatever the clients use
SOCKETS = ("ctl", "mic", "speaker")


def require_pulseaudio() -> None:
    missing = [t for t in ("pulseaudio", "pactl", "paplay", "parec") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install pulseaudio pulseaudio-utils)")


class Recording:
    """parec of the speaker's monitor into a raw file, 16 kHz mono s16le."""

    def __init__(self, proc: subprocess.Popen, path: Path) -> None:
        self.proc = proc
        self.path = path

    def audio(self) -> np.ndarray:
        return np.fromfile(self.path, dtype="<i2").copy() if self.path.exists() else np.zeros(0, np.int16)

    def stop(self) -> np.ndarray:
        stop_process(self.proc)
        return self.audio()


class PulseServer:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.home = directory / "home"
        self.runtime = directory / "run"
        self.proc: subprocess.Popen | None = None
        self._modules: dict[str, str] = {}
        self._children: list[subprocess.Popen] = []
        self._loopback: str | None = None
        self._lock = threading.Lock()

    def socket(self, name: str) -> Path:
        return self.dir / f"{name}.sock"

    @property
    def ctl_env(self) -> dict[str, str]:
        """For pactl, paplay and parec."""
        return dict(os.environ, HOME=str(self.home), XDG_RUNTIME_DIR=str(self.runtime),
                    PULSE_SERVER=f"unix:{self.socket('ctl')}")

    @property
    def client_env(self) -> dict[str, str]:
        """For a process using PyAudio: its ALSA config names kiosk_mic and kiosk_speaker."""
        env = self.ctl_env
        env["JACK_NO_START_SERVER"] = "1"
        return env

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> PulseServer:
        require_pulseaudio()
        for d in (self.home, self.runtime):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        lines = [f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket(s)}"
                 for s in SOCKETS]
        lines += [f"load-module module-null-sink sink_name={name} rate={RATE} channels=1 "
                  f"sink_properties=device.description={name}" for name in ("speaker", "micfeed")]
        lines += ["set-default-sink speaker", "set-default-source micfeed.monitor"]
        config = self.dir / "pulse.pa"
        config.write_text("\n".join(lines) + "\n")
        (self.home / ".asoundrc").write_text(
            "pcm.kiosk_mic {\n    type pulse\n    device micfeed.monitor\n"
            f"    server \"unix:{self.socket('mic')}\"\n}}\n"
            "pcm.kiosk_speaker {\n    type pulse\n    device speaker\n"
            f"    server \"unix:{self.socket('speaker')}\"\n}}\n")
        log = open(self.dir / "pulse.log", "wb")
        self.proc = subprocess.Popen(
            ["pulseaudio", "-n", "-F", str(config), "--daemonize=no", "--exit-idle-time=-1",
             "--disallow-exit", "--use-pid-file=no", "--realtime=no", "--high-priority=no",
             "--log-target=stderr"],
            env=self.ctl_env, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited with {self.proc.returncode}:\n{self.log()[-2000:]}")
            if all(self.socket(s).exists() for s in SOCKETS) and self._pactl("info", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pulseaudio did not come up in {timeout} s:\n{self.log()[-2000:]}")
            time.sleep(0.05)
        for line in self._pactl("list", "short", "modules").stdout.splitlines():
            parts = line.split("\t")
            for s in SOCKETS:
                if len(parts) > 2 and f"socket={self.socket(s)}" in parts[2]:
                    self._modules[s] = parts[0]
        return self

    def stop(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.kill()
                child.wait()
        self._children.clear()
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> PulseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return (self.dir / "pulse.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- tools -------------------------------------------------------------------------
    def _pactl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["pactl", *args], env=self.ctl_env, capture_output=True, text=True,
                              timeout=10, check=check)

    def play(self, wav: Path) -> subprocess.Popen:
        """Feed a WAV into the microphone in real time; returns the paplay process."""
        proc = subprocess.Popen(["paplay", "-d", "micfeed", str(wav)], env=self.ctl_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._children.append(proc)
        return proc

    def record(self, path: Path) -> Recording:
        proc = subprocess.Popen(["parec", "-d", "speaker.monitor", "--format=s16le", f"--rate={RATE}",
                                 "--channels=1", "--raw", "--latency-msec=100", str(path)],
                                env=self.ctl_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._children.append(proc)
        return Recording(proc, path)

    def cut(self, name: str) -> None:
        """The daemon's ``name`` device goes away: its socket closes, with every stream on it."""
        with self._lock:
            self._pactl("unload-module", self._modules.pop(name))

    def restore(self, name: str) -> None:
        with self._lock:
            out = self._pactl("load-module", "module-native-protocol-unix", "auth-anonymous=1",
                              f"socket={self.socket(name)}")
            self._modules[name] = out.stdout.strip()

    def silence_mic(self, on: bool) -> None:
        """The microphone's stream stays open but delivers nothing (the sink it listens to is
        suspended): a capture that has gone quiet without failing."""
        with self._lock:
            self._pactl("suspend-sink", "micfeed", "1" if on else "0")

    def echo(self, on: bool, delay_ms: int = 60) -> None:
        """Route the speaker into the microphone (a loudspeaker the microphone hears), ``delay_ms`` late."""
        with self._lock:
            if on and self._loopback is None:
                self._loopback = self._pactl("load-module", "module-loopback", "source=speaker.monitor",
                                             "sink=micfeed", f"latency_msec={delay_ms}").stdout.strip()
            elif not on and self._loopback is not None:
                self._pactl("unload-module", self._loopback)
                self._loopback = None

    def clients(self) -> list[str]:
        """Names of the clients connected to the server (to see a daemon's streams come and go)."""
        return [line.split("\t")[2] for line in self._pactl("list", "short", "clients").stdout.splitlines()
                if line.count("\t") >= 2]
