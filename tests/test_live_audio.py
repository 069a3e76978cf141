"""Live audio: PyAudio for real through a private PulseAudio with null sinks, and kiosk behaviour.

The daemon (`edge-voice run`, a subprocess on the dev models) captures from ``kiosk_mic``
and plays to ``kiosk_speaker`` (see ``tests/pulse.py``); the test speaks into the capture side
with paplay, records the playback side with parec, pulls devices out by closing the sound
server's sockets, and watches the daemon through a real sd_notify socket and a real Mosquitto.
The handset test runs the daemon in-process (the hook command is a method on it) with a FIFO
microphone the test writes in real time.

GPIO lines cannot be exercised here (no GPIO chip, no gpio-sim module in this kernel): the
line handling is tested through a stand-in for the gpiod module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mosquitto import Mosquitto, Probe
from notify_socket import NotifyCollector
from procs import stop_process
from pulse import RATE as PULSE_RATE
from pulse import PulseServer
from voice import Ears, conversation, wer, words

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from edge.audio.echo import EchoGate
from edge.audio.wav import write_wav
from edge.config import Config, ConversationConfig, load_config
from edge.errors import AudioError, ConfigError, EdgeError, MissingDependency
from edge.events import Event, EventBus, EventType
from edge.kiosk import GpioLine, Kiosk, check_gpio_config, chime

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "config" / "dev.toml"
DEVICE = "booth-1"
QUESTION = "What is the capital of France?"
FOLLOW_UP = "How many legs does a spider have?"


def _models_root() -> Path:
    from edge.models.registry import ModelRegistry

    return ModelRegistry().root


# --- pure pieces ---------------------------------------------------------------------------

class _Listing:
    """PortAudio's device list as find_device reads it."""

    def __init__(self, *devices: tuple[str, int, int]) -> None:
        self.devices = devices

    def get_device_count(self) -> int:
        return len(self.devices)

    def get_device_info_by_index(self, i: int) -> dict[str, Any]:
        name, ins, outs = self.devices[i]
        return {"name": name, "maxInputChannels": ins, "maxOutputChannels": outs}


def test_find_device_by_index_exact_name_or_unique_part() -> None:
    from edge.audio.pyaudio_io import find_device

    pa = _Listing(("HDA Intel PCH: ALC3246 Analog (hw:0,0)", 2, 2), ("USB PnP Sound Device: Audio (hw:1,0)", 1, 0),
                  ("pulse", 32, 32), ("pulse_echo_cancel", 1, 0), ("default", 32, 32))
    assert find_device(pa, "", True) is None
    assert find_device(pa, "1", True) == 1
    assert find_device(pa, "usb pnp", True) == 1
    assert find_device(pa, "PULSE", True) == 2  # exact beats the longer name that contains it
    assert find_device(pa, "echo", True) == 3
    with pytest.raises(AudioError, match="'hw' is ambiguous .*hw:0,0.*hw:1,0") as err:
        find_device(pa, "hw", True)
    assert err.value.code == "audio.ambiguous_device"
    with pytest.raises(AudioError, match="output device 1 does not exist") as err:
        find_device(pa, "1", False)  # a capture-only device
    assert err.value.code == "audio.no_device"
    with pytest.raises(AudioError, match="no audio output device matches 'usb'"):
        find_device(pa, "usb", False)


def _chunk(wall: float, value: int = 1000) -> AudioChunk:
    return AudioChunk(np.full(CHUNK_SAMPLES, value, dtype=np.int16), 0, SAMPLE_RATE, wall)


def test_echo_gate_silences_only_while_listening_and_the_device_is_audible() -> None:
    gate = EchoGate(echo_cancel=False, guard_ms=300)
    now = time.monotonic()
    audible_until = now + 1.0
    for state in ("idle", "listening"):
        assert not gate.admit(_chunk(now + 1.2), state, audible_until).samples.any(), "in the guard: silenced"
        assert gate.admit(_chunk(now + 1.35), state, audible_until).samples.all(), "after the guard: passes"
    for state in ("thinking", "speaking"):  # the wake word must still be heard, to interrupt
        assert gate.admit(_chunk(now + 0.5), state, audible_until).samples.all()
    assert gate.silenced == 2
    gate.hold(2.0)  # a chime queued, not yet reported by the speaker
    assert not gate.admit(_chunk(time.monotonic() + 1.5), "listening", 0.0).samples.any()
    cancelled = EchoGate(echo_cancel=True, guard_ms=300)
    assert cancelled.admit(_chunk(now), "listening", audible_until).samples.all()


def _dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64)))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def test_chimes_rise_for_wake_fall_for_end_and_start_and_end_softly() -> None:
    for rate in (16000, 22050, 48000):
        wake, end = chime("wake", rate), chime("end", rate)
        assert len(wake) == len(end) and 0.1 < len(wake) / rate < 0.2
        half = len(wake) // 2
        assert _dominant_hz(wake[:half], rate) < _dominant_hz(wake[half:], rate)
        assert _dominant_hz(end[:half], rate) > _dominant_hz(end[half:], rate)
        for tone in (wake, end):
            assert abs(int(tone[0])) < 200 and abs(int(tone[-1])) < 200, "a click at an edge"
            assert 0.2 * 32767 < np.abs(tone).max() <= 0.26 * 32767


def _conversation_cfg(**conv: Any) -> Config:
    return Config(conversation=ConversationConfig(**conv))


class _RecordingSpeaker:
    rate = 22050
    latency = 0.05

    def __init__(self) -> None:
        self.written: list[np.ndarray] = []

    def begin(self, on_start=None, *, hold=False) -> int:
        return 0

    def write(self, samples: np.ndarray, gen: int | None = None) -> bool:
        self.written.append(samples)
        return True

    def flush(self) -> None:
        pass


def _kiosk(**conv: Any) -> tuple[Kiosk, Any, _RecordingSpeaker, EchoGate]:
    from edge.conversation import Conversation

    cfg = _conversation_cfg(**conv)
    speaker = _RecordingSpeaker()
    c = Conversation(cfg, bus=EventBus(), clock=types.SimpleNamespace(now=lambda: 0.0), speaker=speaker,
                     wake=None, recognizer=None, chat=None, synth=None)
    gate = EchoGate(False, 300)
    return Kiosk(cfg, c, speaker, gate), c, speaker, gate


def test_chimes_mark_listening_start_and_the_return_to_waiting() -> None:
    kiosk, _, speaker, gate = _kiosk(chime_wake=True, chime_end=True)

    def end(outcome: str, trigger: str = "wake") -> Event:
        return Event(EventType.TURN_END, {"outcome": outcome, "trigger": trigger})

    kiosk.on_event(Event(EventType.TURN_START, {"trigger": "wake"}))
    assert len(speaker.written) == 1 and gate.hold_until > time.monotonic()
    assert np.array_equal(speaker.written[0], chime("wake", speaker.rate))
    kiosk.on_event(Event(EventType.TURN_START, {"trigger": "follow-up"}))  # already in a conversation
    kiosk.on_event(Event(EventType.TURN_START, {"trigger": "say"}))
    assert len(speaker.written) == 1
    for outcome, trigger, chimes in (("done", "wake", True), ("no_speech", "follow-up", True),
                                     ("done", "say", False), ("barge_in", "wake", False),
                                     ("mic_lost", "wake", False), ("on_hook", "handset", False)):
        before = len(speaker.written)
        kiosk.on_event(end(outcome, trigger))
        assert (len(speaker.written) == before + 1) == chimes, (outcome, trigger)
    assert np.array_equal(speaker.written[-1], chime("end", speaker.rate))
    # With a follow-up window the device keeps listening after a reply: no end chime yet.
    assert not kiosk.ends_listening({"outcome": "done", "trigger": "wake"}, follow_up_s=5.0)
    assert kiosk.ends_listening({"outcome": "no_speech", "trigger": "follow-up"}, follow_up_s=5.0)
    quiet, _, quiet_speaker, _ = _kiosk()
    quiet.on_event(Event(EventType.TURN_START, {"trigger": "wake"}))
    quiet.on_event(end("done"))
    assert quiet_speaker.written == []


def test_handset_hook_outside_handset_mode_is_refused() -> None:
    kiosk, *_ = _kiosk(mode="wake")
    with pytest.raises(EdgeError, match="conversation.mode is 'wake', not 'handset'") as err:
        kiosk.hook(True)
    assert err.value.code == "handset.mode"


def test_gpio_config_mistakes_are_named() -> None:
    check_gpio_config(ConversationConfig())
    check_gpio_config(ConversationConfig(mode="handset", hook_chip="gpiochip0", hook_line="17",
                                         button_chip="/dev/gpiochip0", button_line="GPIO27"))
    with pytest.raises(ConfigError, match="conversation.button_chip is set but conversation.button_line is not"):
        check_gpio_config(ConversationConfig(button_chip="gpiochip0"))
    with pytest.raises(ConfigError, match="conversation.hook_line is set but conversation.hook_chip is not"):
        check_gpio_config(ConversationConfig(mode="handset", hook_line="4"))
    with pytest.raises(ConfigError, match="hook_chip is set but conversation.mode is 'wake'"):
        check_gpio_config(ConversationConfig(hook_chip="gpiochip0", hook_line="4"))


def test_gpio_without_the_gpiod_package_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiod", None)  # as when it is not installed
    line = GpioLine("gpiochip0", "17", active_low=True, bias="pull-up", debounce_ms=20, on_change=print)
    with pytest.raises(MissingDependency, match=r"'gpiod' .*`pip install 'gpiod>=2'`"):
        line.open()


def _gpiod_standin(events: list[list[bool]], initial: bool) -> tuple[types.ModuleType, dict[str, Any]]:
    """The slice of the gpiod v2 API GpioLine uses; records the request and serves edge events."""
    seen: dict[str, Any] = {"released": False}
    def enum(name: str, *members: str) -> type:
        return type(name, (), {m: f"{name}.{m}" for m in members})

    line_mod = types.ModuleType("gpiod.line")
    line_mod.Bias = enum("Bias", "AS_IS", "PULL_UP", "PULL_DOWN", "DISABLED")
    line_mod.Direction = enum("Direction", "INPUT")
    line_mod.Edge = enum("Edge", "BOTH")
    line_mod.Value = enum("Value", "ACTIVE", "INACTIVE")

    class EdgeEvent:
        class Type:
            RISING_EDGE, FALLING_EDGE = "rising", "falling"

        def __init__(self, rising: bool) -> None:
            self.event_type = self.Type.RISING_EDGE if rising else self.Type.FALLING_EDGE

    class Request:
        def __init__(self) -> None:
            self.batches = [list(b) for b in events]

        def get_value(self, offset: Any) -> str:
            return line_mod.Value.ACTIVE if initial else line_mod.Value.INACTIVE

        def wait_edge_events(self, timeout: Any) -> bool:
            if self.batches:
                return True
            time.sleep(0.01)
            return False

        def read_edge_events(self) -> list[EdgeEvent]:
            return [EdgeEvent(r) for r in self.batches.pop(0)]

        def release(self) -> None:
            seen["released"] = True

    def request_lines(path: str, *, consumer: str, config: dict) -> Request:
        seen.update(path=path, consumer=consumer, config=config)
        return Request()

    mod = types.ModuleType("gpiod")
    mod.request_lines = request_lines
    mod.LineSettings = lambda **kw: kw
    mod.line = line_mod
    return mod, seen


def test_gpio_line_settings_initial_value_and_debounced_changes(monkeypatch) -> None:
    # Two presses with a bounce (a repeated rising edge) in between, then a release.
    mod, seen = _gpiod_standin([[True, True], [False], [True], [False, False]], initial=False)
    monkeypatch.setitem(sys.modules, "gpiod", mod)
    monkeypatch.setitem(sys.modules, "gpiod.line", mod.line)
    changes: list[bool] = []
    line = GpioLine("gpiochip4", "17", active_low=True, bias="pull-up", debounce_ms=30, on_change=changes.append)
    assert line.open() is False
    deadline = time.monotonic() + 5
    while len(changes) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    line.close()
    assert changes == [True, False, True, False]
    assert seen["path"] == "/dev/gpiochip4" and seen["consumer"] == "edge-voice" and seen["released"]
    (offset, settings), = seen["config"].items()
    assert offset == 17
    assert settings["active_low"] is True and settings["bias"] == "Bias.PULL_UP"
    assert settings["edge_detection"] == "Edge.BOTH" and settings["direction"] == "Direction.INPUT"
    assert settings["debounce_period"].total_seconds() == pytest.approx(0.03)
    named = GpioLine("/dev/gpiochip0", "GPIO27", active_low=False, bias="as-is", debounce_ms=0, on_change=print)
    assert named.line == "GPIO27" and named.chip == "/dev/gpiochip0"


# --- the live rig ------------------------------------------------------------------------

class LiveDaemon:
    """`edge-voice run` on the dev models with PulseAudio devices, MQTT and a notify socket."""

    def __init__(self, tmp: Path, pulse: PulseServer, broker: Mosquitto, notify: NotifyCollector,
                 env: dict[str, str] | None = None, **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        cfg = {"device": {"id": DEVICE},
               "audio": {"input_device": "kiosk_mic", "output_device": "kiosk_speaker", "reopen_backoff_max_s": 1.0},
               "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "protocol": "3.1.1",
                        "keepalive_s": 5, "metrics_interval_s": 1.0}}
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        text = DEV.read_text()
        for name, values in cfg.items():
            text += f"\n[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        self.config = tmp / "live.toml"
        self.config.write_text(text)
        self.log_path = tmp / "daemon.log"
        environ = pulse.client_env
        environ.update(notify.env, EDGE_VOICE_STATE_DIR=str(tmp / "state"),
                       EDGE_VOICE_DEVICE__MODELS_DIR=str(_models_root()), PYTHONPATH=str(REPO), **(env or {}))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(self.config)],
                                         cwd=REPO, env=environ, stdout=subprocess.DEVNULL, stderr=log)

    def stop(self) -> int | None:
        stop_process(self.proc, 30)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Rig:
    def __init__(self, tmp: Path, pulse: PulseServer, broker: Mosquitto, probe: Probe,
                 notify: NotifyCollector) -> None:
        self.tmp, self.pulse, self.broker, self.probe, self.notify = tmp, pulse, broker, probe, notify
        self.daemon: LiveDaemon | None = None

    def start(self, env: dict[str, str] | None = None, **sections: dict[str, Any]) -> LiveDaemon:
        self.daemon = LiveDaemon(self.tmp, self.pulse, self.broker, self.notify, env, **sections)
        self.notify.wait_for("READY", "1", timeout=90)
        return self.daemon

    def events(self, kind: str | None = None, **match: Any) -> list[dict]:
        prefix = f"edge/{DEVICE}/event/"
        out = [m.json() for m in self.probe.messages if m.topic.startswith(prefix)]
        return [e for e in out if (kind is None or e["type"] == kind)
                and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, kind: str, timeout: float, n: int = 1, **match: Any) -> dict:
        self.probe.wait_for(lambda ms: len(self.events(kind, **match)) >= n, timeout,
                            f"{n} {kind} {match or ''}\n{self._tail()}")
        return self.events(kind, **match)[n - 1]

    def mqtt_state(self) -> str | None:
        msgs = self.probe.on_topic(f"edge/{DEVICE}/status")
        return msgs[-1].json().get("state") if msgs else None

    def wait_state(self, state: str, timeout: float) -> None:
        self.probe.wait_for(lambda ms: self.mqtt_state() == state, timeout, f"MQTT status {state}\n{self._tail()}")

    def say_into_mic(self, name: str, *parts: Any) -> subprocess.Popen:
        wav = self.tmp / f"{name}.wav"
        write_wav(wav, conversation(*parts), SAMPLE_RATE)
        return self.pulse.play(wav)

    def _tail(self) -> str:
        return self.daemon.log()[-3000:] if self.daemon else ""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with PulseServer(tmp_path / "pulse") as pulse, Mosquitto(tmp_path / "broker") as broker, \
            NotifyCollector(tmp_path) as notify:
        probe = Probe(broker, protocol="3.1.1").connect()
        probe.subscribe(f"edge/{DEVICE}/#")
        r = Rig(tmp_path, pulse, broker, probe, notify)
        try:
            yield r
        finally:
            code = r.daemon.stop() if r.daemon else 0
            probe.close()
            if r.daemon is not None:
                log = r.daemon.log()
                assert code == 0, log[-3000:]
                assert "Traceback" not in log, log[-3000:]
                assert "ALSA lib" not in log and "jack server" not in log, "ALSA/JACK chatter reached the log"


def _heard(ears: Ears, audio: np.ndarray) -> str:
    loud = np.flatnonzero(np.abs(audio) > 500)
    if not len(loud):
        return ""
    return ears.hear(audio[max(0, loud[0] - 4000): loud[-1] + 4000], PULSE_RATE)


@pytest.mark.slow
def test_run_answers_from_the_capture_device_and_survives_losing_it(rig: Rig) -> None:
    speaker_out = rig.pulse.record(rig.tmp / "speaker.raw")
    daemon = rig.start()
    rig.wait_state("online", 20)
    rig.say_into_mic("q1", 0.5, "Hey Jarvis.", 0.4, QUESTION, 1.0)
    rig.wait_event("turn.end", 45, outcome="done")
    heard = rig.events("transcript.final")
    assert len(heard) == 1 and wer(QUESTION, heard[0]["text"]) <= 0.2, heard
    reply = rig.events("reply.final")[0]["text"]
    time.sleep(1.0)  # the last blocks on their way out through PulseAudio and parec
    said = _heard(Ears(), speaker_out.audio())
    assert wer(reply, said) <= 0.5, (reply, said)

    # The microphone goes away: its stream dies and it cannot be reopened.
    lost_at = time.monotonic()
    rig.pulse.cut("mic")
    lost = rig.notify.wait_for("STATUS", "mic lost - retrying", timeout=10, after=lost_at)
    rig.wait_state("mic_lost", 10)
    time.sleep(2.0)  # a few failed reopen attempts, with back-off
    assert daemon.proc.poll() is None
    rig.pulse.restore("mic")
    rig.notify.wait_for("STATUS", "listening", timeout=20, after=lost.time)
    rig.wait_state("online", 10)
    # The same process answers again.
    rig.say_into_mic("q2", 0.5, "Hey Jarvis.", 0.4, QUESTION, 1.0)
    rig.wait_event("turn.end", 45, n=2, outcome="done")
    assert wer(QUESTION, rig.events("transcript.final")[1]["text"]) <= 0.2
    log = daemon.log()
    assert "microphone unavailable" in log and "PortAudio re-initialised" in log, log[-3000:]
    rig.probe.wait_for(lambda ms: any(m.json().get("mic_recoveries", 0) >= 1 and m.json().get("mic") == "open"
                                      for m in rig.probe.on_topic(f"edge/{DEVICE}/metrics")), 5, "metrics")
    speaker_out.stop()


@pytest.mark.slow
def test_a_silent_capture_stops_the_watchdog_pings_and_the_daemon_restarts_when_it_is_stuck(rig: Rig) -> None:
    # The PyAudio microphone's stream stays open but delivers nothing (PortAudio's read times out
    # every 0.5 s): no chunk is progress, so no ping. After audio.input_stall_s it is closed to be
    # reopened; on this PulseAudio the close itself never returns (the capture is wedged), so the
    # daemon exits non-zero for systemd to restart it, well before the watchdog would.
    daemon = rig.start(env={"WATCHDOG_USEC": "1000000"}, audio={"input_stall_s": 3.0})  # a ping every 0.5 s
    ready = rig.notify.wait_for("READY", "1", timeout=5)
    pinging = rig.notify.wait_for("WATCHDOG", "1", timeout=5, after=ready.time)
    rig.notify.wait_for("WATCHDOG", "1", timeout=5, after=pinging.time)
    rig.pulse.silence_mic(True)
    silent_at = time.monotonic()
    time.sleep(1.2)  # > 2 ping periods: a ping earned before the silence has gone out
    quiet_from = time.monotonic()
    code = daemon.proc.wait(timeout=30)
    rig.daemon = None  # ended by itself: nothing for the fixture to stop
    gone = time.monotonic()
    log = daemon.log()
    assert code == 1, log[-3000:]
    assert rig.notify.count("WATCHDOG", "1", since=quiet_from, until=gone) == 0, "pinged while nothing was heard"
    assert "microphone delivered nothing for 3.0 s" in log and "the microphone did not close" in log, log[-3000:]
    assert gone - silent_at < 3.0 + 5.0 + 10.0, "it took longer than input_stall_s and the close timeout"
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_a_lost_speaker_is_noticed_while_idle_and_comes_back(rig: Rig) -> None:
    speaker_out = rig.pulse.record(rig.tmp / "speaker.raw")
    daemon = rig.start()
    rig.wait_state("online", 20)
    cut_at = time.monotonic()
    rig.pulse.cut("speaker")
    lost = rig.notify.wait_for("STATUS", "speaker lost - retrying", timeout=10, after=cut_at)
    assert lost.time - cut_at < 4.0, "an idle speaker's loss is found by the silent probe within seconds"
    rig.wait_state("speaker_lost", 10)
    time.sleep(1.5)
    rig.pulse.restore("speaker")
    rig.notify.wait_for("STATUS", "listening", timeout=15, after=lost.time)
    rig.wait_state("online", 10)
    started = len(speaker_out.audio())
    # A whole sentence: one misheard word of a short one (Whisper once heard "The speaker" as
    # "Let's speak her") would fail the check without anything being wrong with the speaker.
    sentence = "The speaker works again, you can hear me now."
    rig.probe.publish(f"edge/{DEVICE}/cmd/say", {"text": sentence})
    rig.wait_event("tts.end", 30)
    time.sleep(0.5)
    said = _heard(Ears(), speaker_out.stop()[started:])
    assert wer(sentence, said) <= 0.5, said
    assert daemon.proc.poll() is None


def _matches(audio: np.ndarray, template: np.ndarray, threshold: float = 0.8) -> list[float]:
    """Seconds at which ``template`` occurs in ``audio`` (normalised cross-correlation)."""
    a = audio.astype(np.float64)
    t = template.astype(np.float64)
    t = (t - t.mean()) / (np.linalg.norm(t - t.mean()) or 1.0)
    n = len(t)
    corr = np.correlate(a, t, mode="valid")
    energy = np.sqrt(np.convolve(a * a, np.ones(n), mode="valid")) + 1e-9
    score = corr / energy
    hits: list[float] = []
    for i in np.flatnonzero(score > threshold):
        if not hits or i / PULSE_RATE - hits[-1] > 0.5:
            hits.append(i / PULSE_RATE)
    return hits


@pytest.mark.slow
def test_follow_up_window_hears_the_visitor_and_not_its_own_voice_or_chimes(rig: Rig) -> None:
    # The microphone hears the loudspeaker late, as through a slow (Bluetooth) speaker in a room.
    rig.pulse.echo(True, delay_ms=250)
    speaker_out = rig.pulse.record(rig.tmp / "speaker.raw")
    rig.start(conversation={"follow_up_s": 5.0, "chime_wake": True, "chime_end": True},
              audio={"echo_guard_ms": 500})  # longer than that speaker's delay
    rig.wait_state("online", 20)
    # Push-to-talk (the kiosk button's MQTT twin). The visitor speaks once the chime is over: the
    # microphone is silenced for the chime, the speaker's latency and the echo guard (0.7 s here).
    rig.probe.publish(f"edge/{DEVICE}/cmd/listen", {})
    rig.wait_event("turn.start", 10, trigger="push-to-talk")
    rig.say_into_mic("q1", 0.9, QUESTION, 1.0)
    first = rig.wait_event("turn.end", 45, outcome="done")
    # The follow-up window is open: no wake word, no button.
    rig.wait_event("turn.start", 10, trigger="follow-up")
    rig.say_into_mic("q2", 0.3, FOLLOW_UP, 0.8)
    second = rig.wait_event("turn.end", 45, n=1, outcome="done", trigger="follow-up")
    assert wer(FOLLOW_UP, second["text"]) <= 0.25, second
    # After the second reply the window opens again, hears nothing (its own reply is gated out) and closes.
    rig.wait_event("turn.end", 20, outcome="no_speech", trigger="follow-up")
    time.sleep(0.6)
    finals = [e["text"] for e in rig.events("transcript.final")]
    assert len(finals) == 2, f"the device answered itself: {finals}"
    assert wer(QUESTION, finals[0]) <= 0.2 and first["reply"]
    audio = speaker_out.stop()
    wake_at = _matches(audio, chime("wake", PULSE_RATE))
    end_at = _matches(audio, chime("end", PULSE_RATE))
    assert len(wake_at) == 1, (wake_at, end_at)  # the follow-up needed no trigger, and got no chime
    assert len(end_at) == 1 and end_at[0] > wake_at[0] + 3.0, (wake_at, end_at)
    rig.probe.wait_for(lambda ms: any(m.json().get("echo_gated_chunks", 0) > 0
                                      for m in rig.probe.on_topic(f"edge/{DEVICE}/metrics")), 5, "gated chunks")


def test_devices_lists_the_configured_devices_with_rates_and_channels(tmp_path: Path) -> None:
    cfg = tmp_path / "kiosk.toml"
    cfg.write_text('[audio]\ninput_device = "kiosk_mic"\noutput_device = "kiosk_speaker"\n')
    with PulseServer(tmp_path / "pulse") as pulse:
        env = pulse.client_env
        def run(*a: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "edge", "devices", *a], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=60)
        out = run("--config", str(cfg))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["#", "name", "api"]
        rows = {line.split()[1]: line for line in lines[1:] if line[:1].isdigit()}
        assert {"kiosk_mic", "kiosk_speaker", "pulse", "default"} <= set(rows)
        assert "16 22.05" in rows["kiosk_mic"] and rows["kiosk_mic"].rstrip().endswith("-"), rows["kiosk_mic"]
        assert f"{cfg}: input  'kiosk_mic' -> #" in out.stdout
        assert "captured at 16000 Hz" in out.stdout and "kiosk_speaker (8 16 22.05" in out.stdout
        assert "ALSA lib" not in out.stderr + out.stdout and "jack" not in out.stderr.lower(), out.stderr
        report = json.loads(run("--json", "--config", str(cfg)).stdout)
        mic = next(d for d in report["devices"] if d["name"] == "kiosk_mic")
        assert mic["max_input_channels"] >= 1 and 16000 in mic["input_rates"] and mic["output_rates"] == []
        assert report["selected"][0]["capture_rate"] == 16000 and report["selected"][1]["name"] == "kiosk_speaker"
        cfg.write_text('[audio]\ninput_device = "kiosk"\n')
        bad = run("--config", str(cfg))
        assert bad.returncode == 1 and "'kiosk' is ambiguous ('kiosk_mic', 'kiosk_speaker')" in bad.stdout


# --- handset mode, in-process -------------------------------------------------------------

class FifoMic:
    """Writes 16 kHz PCM into a FIFO in real time: silence, or whatever ``say`` queued."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._queue: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.idle = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def say(self, audio: np.ndarray) -> None:
        with self._lock:
            self.idle.clear()
            self._queue.append(audio)

    def _run(self) -> None:
        with open(self.path, "wb", buffering=0) as out:  # blocks until the daemon opens it
            pending = np.zeros(0, dtype=np.int16)
            due = time.monotonic()
            while not self._stop.is_set():
                if not len(pending):
                    with self._lock:
                        pending = self._queue.pop(0) if self._queue else np.zeros(0, dtype=np.int16)
                        if not len(pending):
                            self.idle.set()
                block = pending[:CHUNK_SAMPLES] if len(pending) else np.zeros(CHUNK_SAMPLES, dtype=np.int16)
                pending = pending[CHUNK_SAMPLES:]
                try:
                    out.write(np.pad(block, (0, CHUNK_SAMPLES - len(block))).astype("<i2").tobytes())
                except BrokenPipeError:
                    return
                due += CHUNK_SAMPLES / SAMPLE_RATE
                time.sleep(max(0.0, due - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class EventLog:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, etype: EventType, **match: Any) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.type == etype and all(e.data.get(k) == v for k, v in match.items())]

    def wait(self, etype: EventType, timeout: float, n: int = 1, **match: Any) -> Event:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.of(etype, **match)) >= n, timeout)
        assert ok, f"no {n} {etype.value} {match} in {timeout} s: {[(e.type.value, e.data) for e in self.events][-12:]}"
        return self.of(etype, **match)[n - 1]


@pytest.mark.slow
def test_handset_off_hook_greets_and_listens_on_hook_forgets(tmp_path: Path, monkeypatch) -> None:
    from edge.audio.wav import read_wav
    from edge.daemon import Daemon

    models = _models_root()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("EDGE_VOICE_DEVICE__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EDGE_VOICE_DEVICE__MODELS_DIR", str(models))
    monkeypatch.setenv("EDGE_VOICE_AUDIO__INPUT_DEVICE", f"file:{tmp_path / 'mic.pcm'}")
    monkeypatch.setenv("EDGE_VOICE_AUDIO__OUTPUT_DEVICE", f"file:{tmp_path / 'handset.wav'}")
    monkeypatch.setenv("EDGE_VOICE_CONVERSATION__MODE", "handset")
    monkeypatch.setenv("EDGE_VOICE_CONVERSATION__GREETING", "Hello, how can I help?")
    cfg = load_config(DEV)
    mic = FifoMic(tmp_path / "mic.pcm")
    daemon = Daemon(cfg)
    log = EventLog()
    daemon.pipeline.bus.subscribe(log)
    runner = threading.Thread(target=lambda: daemon.run(handle_signals=False), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.mic_state != "open" or daemon.pipeline.kiosk is None:
            assert runner.is_alive() and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        # On the hook the wake word does nothing: this is a telephone.
        mic.say(conversation(0.3, "Hey Jarvis.", 0.4, QUESTION, 0.8))
        assert mic.idle.wait(15) and not log.of(EventType.WAKE) and not log.of(EventType.TURN_START)
        assert daemon.pipeline.handset("on-hook") == {"handset": "on-hook", "changed": False}

        assert daemon.pipeline.handset("off-hook") == {"handset": "off-hook", "changed": True}
        greeting = log.wait(EventType.TURN_END, 30, trigger="say", outcome="done")
        assert greeting.data["reply"] == "Hello, how can I help?"
        log.wait(EventType.TURN_START, 10, trigger="handset")
        _wait_state(daemon, "listening")
        assert daemon.pipeline.handset("off-hook")["changed"] is False  # a bounce changes nothing
        mic.say(conversation(0.3, QUESTION, 1.0))  # no wake word
        answered = log.wait(EventType.TURN_END, 45, trigger="handset", outcome="done")
        assert wer(QUESTION, answered.data["text"]) <= 0.2 and answered.data["reply"]
        log.wait(EventType.TURN_START, 10, n=2, trigger="handset")  # listening again, turn after turn
        _wait_state(daemon, "listening")
        assert len(daemon.conv.sessions.history()) == 2

        assert daemon.pipeline.handset("on-hook")["changed"] is True
        ended = log.wait(EventType.SESSION_END, 5, reason="on_hook")
        log.wait(EventType.TURN_END, 5, outcome="on_hook")
        _wait_state(daemon, "idle")
        assert daemon.conv.sessions.history() == []
        assert ended.data["ended"] == answered.session_id, "on-hook ends the session that was talking"
        turns = len(log.of(EventType.TURN_START))
        mic.say(conversation(0.3, QUESTION, 0.8))
        assert mic.idle.wait(15)
        time.sleep(0.5)
        assert len(log.of(EventType.TURN_START)) == turns, "listening after on-hook"
    finally:
        daemon.request_stop()
        runner.join(timeout=30)
        mic.close()
    assert not runner.is_alive()
    audio, _ = read_wav(tmp_path / "handset.wav")  # 16 kHz
    said = Ears().hear(audio, SAMPLE_RATE)
    assert "hello how can i help" in " ".join(words(said)), said


def _wait_state(daemon: Any, state: str, timeout: float = 5.0) -> None:
    """The conversation's state; turn.start comes just before listening begins."""
    deadline = time.monotonic() + timeout
    while daemon.conv.state.value != state:
        assert time.monotonic() < deadline, f"conversation {daemon.conv.state.value}, not {state}"
        time.sleep(0.01)
