"""The daemon (``edge-voice run``): the composition root.

Start-up: load models → open the speaker → warm the LLM → open the microphone → GPIO lines →
READY=1. The audio loop reads the microphone on its own thread, passes it through the echo
gate, feeds the conversation and tells the watchdog it made progress. Shutdown on SIGTERM, in
order: STOPPING=1 → stop the mic → cancel the turn → stop the speaker → flush the outbox,
publish offline, disconnect → free models.

Devices come and go without a restart. A microphone whose stream dies, or that delivers
nothing for ``audio.input_stall_s``, is closed and reopened with back-off (PortAudio
re-initialised each time, so a USB device plugged back in is found); the status says
``mic lost - retrying`` until audio flows again. The speaker recovers by itself the same way
and reports through ``on_state``: ``speaker lost - retrying``. The status (systemd ``STATUS=``
and the MQTT status) is always the most urgent of: mic lost, speaker lost, muted, broker
unreachable, listening.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from edge import __version__
from edge.audio.devices import open_microphone, open_speaker
from edge.config import Config
from edge.control import Controller
from edge.conversation import Conversation
from edge.errors import AudioError, EdgeError
from edge.events import Event, EventBus, EventType
from edge.kiosk import EchoGate, Kiosk, check_gpio_config
from edge.logs import MessageId, log_fields
from edge.stages import Stages, load_stages
from edge.systemd import Status

_LOGGER = logging.getLogger(__name__)

# A conversation that fails on this many chunks in a row (2 s of audio) is broken beyond a
# cancelled turn: the audio loop ends, the daemon exits non-zero and systemd restarts it.
FEED_FAILURES_MAX = 100


class MicClock:
    """The audio timeline of the live microphone: the end of the last chunk read."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class Daemon:
    def __init__(self, cfg: Config) -> None:
        from edge.systemd import Notifier, Watchdog

        self.cfg = cfg
        self.notifier = Notifier()
        self.watchdog = Watchdog(self.notifier)
        self.stop_event = threading.Event()
        self.bus = EventBus()
        self.clock = MicClock()
        self.stages: Stages | None = None
        self.conv: Conversation | None = None
        self.speaker: Any = None
        self.mic: Any = None
        self.bridge: Any = None
        self.started = time.monotonic()
        self.kiosk: Kiosk | None = None
        self.gate = EchoGate(cfg.audio.echo_cancel, cfg.audio.echo_guard_ms)
        # closed → open; lost while failing; waiting once reopened until audio flows again
        self.mic_state = "closed"
        self.speaker_state = "closed"
        self.mic_recoveries = 0
        self._audio_thread: threading.Thread | None = None
        self._reload: Stages | None = None
        self._status_text = ""
        self._mqtt_state: str | None = None
        self._status_lock = threading.RLock()

    # -- status ----------------------------------------------------------------------
    def status(self, text: str, state: str | None = None) -> None:
        with self._status_lock:
            text = str(text)
            if text != self._status_text:
                self._status_text = text
                self.notifier.status(text)
                _LOGGER.info("status: %s", text)
            if state is not None and self.bridge is not None and state != self._mqtt_state:
                self._mqtt_state = state
                self.bridge.set_state(state, detail=text)

    def refresh_status(self) -> None:
        """Say the most urgent thing: a lost device, then muted, then the broker, else listening."""
        if self.mic_state in ("lost", "waiting"):
            self.status(Status.MIC_LOST, "mic_lost")
        elif self.speaker_state == "lost":
            self.status(Status.SPEAKER_LOST, "speaker_lost")
        elif self.conv is not None and self.conv.muted:
            self.status("muted", "muted")
        elif self.bridge is not None and not self.bridge.connected:
            self.status(Status.BROKER_UNREACHABLE)  # nobody to tell over MQTT
        else:
            self.status(Status.LISTENING, "online")

    def metrics(self) -> dict[str, Any]:
        return {
            "audio_queue_drops": getattr(self.mic, "dropped", 0),
            "mic": self.mic_state,
            "mic_recoveries": self.mic_recoveries,
            "speaker": self.speaker_state,
            "speaker_dropped_blocks": getattr(self.speaker, "dropped_blocks", 0),
            "echo_gated_chunks": self.gate.silenced,
            "conversation": self.conv.state.value if self.conv else "loading",
            "turns": self.conv.turns_done if self.conv else 0,
            "models_loaded": self.stages is not None,
        }

    def handset(self, state: str) -> dict[str, Any]:
        """``off-hook`` or ``on-hook``, from a command (the hook switch's GPIO line calls the same)."""
        if self.kiosk is None:
            raise EdgeError("the device is still starting", code="busy")
        return self.kiosk.hook(state == "off-hook")

    def request_stop(self) -> None:
        self.stop_event.set()

    # -- lifecycle -------------------------------------------------------------------
    def run(self, *, handle_signals: bool = True) -> int:
        if handle_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        try:
            self._start()
            self.notifier.ready()  # READY=1 with STATUS=listening
            self._status_text = Status.LISTENING.value
            self.refresh_status()
            _LOGGER.info("ready", extra=log_fields(message_id=MessageId.READY))
            broker_up = True
            while not self.stop_event.wait(0.5):
                if self._audio_thread is not None and not self._audio_thread.is_alive():
                    _LOGGER.error("audio loop ended unexpectedly")
                    return 1
                if self.bridge is not None and self.bridge.connected != broker_up:
                    broker_up = self.bridge.connected
                    if broker_up:
                        _LOGGER.info("MQTT broker reachable", extra=log_fields(message_id=MessageId.BROKER_RESTORED))
                    else:
                        _LOGGER.warning("MQTT broker unreachable; events are kept on disk",
                                        extra=log_fields(message_id=MessageId.BROKER_LOST))
                    self.refresh_status()
            return 0
        finally:
            self._shutdown()

    def _start(self) -> None:
        cfg = self.cfg
        check_gpio_config(cfg.conversation, cfg.source)  # a wiring mistake fails before models load
        _LOGGER.info("edge-voice %s starting as %s; notify backend: %s", __version__, cfg.device_id,
                     self.notifier.backend, extra=log_fields(message_id=MessageId.STARTING))
        self.status(Status.LOADING_MODELS)
        self.stages = load_stages(cfg)
        _LOGGER.info("models loaded: %s", self.stages.load_ms,
                     extra=log_fields(stage="models", message_id=MessageId.MODEL_LOADED))
        if cfg.mqtt.enabled:
            from edge.mqtt.client import MqttBridge

            self.bridge = MqttBridge(cfg.mqtt, cfg.device_id, cfg.state_dir, Controller(self),
                                     version=__version__, models=cfg.model_ids())
            self.bridge.set_metrics_source(self.metrics)
            self.bridge.start()
            self.bus.subscribe(self.bridge.publish_event)
        self.bus.subscribe(_log_event)
        rate = self.stages.synth.sample_rate if self.stages.synth is not None else 16000
        self.speaker = open_speaker(cfg.audio, rate, on_state=self._speaker_changed)
        self.speaker_state = getattr(self.speaker, "state", "open")
        self.conv = Conversation(cfg, bus=self.bus, clock=self.clock, speaker=self.speaker,
                                 wake=self.stages.wake, recognizer=self.stages.recognizer,
                                 chat=self.stages.chat, synth=self.stages.synth)
        self.kiosk = Kiosk(cfg, self.conv, self.speaker, self.gate)
        self.bus.subscribe(self.kiosk.on_event)
        if self.stages.chat is not None:
            self.status("warming the language model")
            self.stages.chat.warm(cfg.llm.system_prompt)
        self.status("opening the microphone")
        self.mic = open_microphone(cfg.audio)
        self._open_mic_until_ready()
        self.mic_state = "open"
        self.conv.start()
        self.kiosk.start()
        self.watchdog.start()
        self._audio_thread = threading.Thread(target=self._audio_loop, name="audio", daemon=True)
        self._audio_thread.start()

    def _open_mic_until_ready(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                self.mic.open()
                return
            except AudioError as err:
                self.mic_state = "lost"
                self.refresh_status()
                _LOGGER.warning("microphone unavailable (%s); retrying in %.1f s", err.message, backoff,
                                extra=log_fields(stage="audio", message_id=MessageId.MIC_LOST))
                self.watchdog.progress()  # still alive: retrying is progress, not a hang
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, self.cfg.audio.reopen_backoff_max_s)
        raise AudioError("stopped before the microphone opened", code="audio.cancelled")

    def _audio_loop(self) -> None:
        conv = self.conv
        assert conv is not None
        stall_s = self.cfg.audio.input_stall_s
        last_audio = time.monotonic()
        failures = 0
        while not self.stop_event.is_set():
            try:
                chunk = self.mic.read(timeout=0.5)
            except AudioError as err:
                _LOGGER.warning("microphone failed: %s", err)
                self._recover_mic()
                last_audio = time.monotonic()
                continue
            self.watchdog.progress()
            if self._reload is not None:
                self._swap_stages()
            if chunk is None:
                if time.monotonic() - last_audio > stall_s:
                    _LOGGER.warning("microphone delivered nothing for %.1f s", stall_s)
                    self._recover_mic()
                    last_audio = time.monotonic()
                continue
            last_audio = time.monotonic()
            if self.mic_state != "open":
                self.mic_state = "open"
                _LOGGER.info("microphone back", extra=log_fields(stage="audio", message_id=MessageId.MIC_RESTORED))
                self.refresh_status()
            self.clock.t = chunk.end_s
            try:
                conv.feed(self.gate.admit(chunk, conv.state.value, getattr(self.speaker, "audible_until", 0.0)))
                failures = 0
            except Exception:
                failures += 1
                if failures == 1:
                    _LOGGER.exception("the conversation failed on an audio chunk; cancelling the turn")
                    try:
                        conv.cancel(reason="error")
                    except Exception:
                        _LOGGER.exception("cancelling the turn failed too")
                if failures >= FEED_FAILURES_MAX:
                    raise

    def _recover_mic(self) -> None:
        """Close, say so, reopen with back-off; the status changes back when audio flows."""
        assert self.conv is not None
        self.conv.cancel(reason="mic_lost")
        try:
            self.mic.close()
        except Exception:
            _LOGGER.exception("closing the microphone failed")
        self.mic_state = "lost"
        self.mic_recoveries += 1
        self.refresh_status()
        _LOGGER.warning("microphone lost", extra=log_fields(stage="audio", message_id=MessageId.MIC_LOST))
        self.watchdog.progress()
        try:
            self._open_mic_until_ready()
        except AudioError:
            return
        self.mic_state = "waiting"
        _LOGGER.info("microphone reopened; waiting for audio")

    def _speaker_changed(self, state: str, detail: str) -> None:
        self.speaker_state = state
        if state == "lost" and self.conv is not None and self.conv.answering():
            self.conv.cancel(reason="speaker_lost")  # nobody can hear the rest of this reply
        _LOGGER.log(logging.WARNING if state == "lost" else logging.INFO, "speaker %s: %s", state, detail,
                    extra=log_fields(stage="audio", message_id=MessageId.SPEAKER_LOST if state == "lost"
                                     else MessageId.SPEAKER_RESTORED))
        if self.conv is not None:  # before start-up is done, run() sets the status
            self.refresh_status()

    # -- reload ----------------------------------------------------------------------
    def reload_models(self) -> None:
        """Load fresh stages in the caller's thread; the audio loop swaps them in."""
        new = load_stages(self.cfg)
        if new.chat is not None:
            new.chat.warm(self.cfg.llm.system_prompt)
        self._reload = new

    def _swap_stages(self) -> None:
        new, self._reload = self._reload, None
        assert new is not None and self.conv is not None
        self.conv.cancel(reason="reload")
        old = self.stages
        self.conv.wake, self.conv.recognizer = new.wake, new.recognizer
        self.conv.chat, self.conv.synth = new.chat, new.synth
        self.stages = new
        if old is not None:
            old.close()
        _LOGGER.info("models reloaded")

    def _shutdown(self) -> None:
        # systemd stops watching at STOPPING=1 and TimeoutStopSec= bounds the rest; the watchdog
        # goes first, so that the audio loop's last chunk cannot earn a ping after it.
        self.watchdog.stop()
        self.notifier.stopping()
        self._status_text = Status.STOPPING.value
        _LOGGER.info("stopping", extra=log_fields(message_id=MessageId.STOPPING))
        self.stop_event.set()
        if self._audio_thread is not None:
            self._audio_thread.join(timeout=3)
        if self.mic is not None:
            self.mic.close()
        if self.kiosk is not None:
            self.kiosk.close()
        if self.conv is not None:
            self.conv.stop()
        if self.speaker is not None:
            self.speaker.close()
        if self.bridge is not None:
            self.bridge.stop(timeout=5.0)
        if self.stages is not None:
            self.stages.close()
        _LOGGER.info("stopped", extra=log_fields(message_id=MessageId.STOPPED))


def _log_event(event: Event) -> None:
    if event.type in (EventType.TRANSCRIPT_FINAL, EventType.REPLY_FINAL, EventType.WAKE,
                      EventType.ERROR, EventType.BARGE_IN):
        _LOGGER.info("%s %s", event.type.value, {k: v for k, v in event.data.items() if k != "timings_ms"},
                     extra=log_fields(turn_id=event.turn_id, stage=event.type.value))
    elif event.type == EventType.TURN_END:
        _LOGGER.info("turn.end %s %s", event.data.get("outcome"), event.data.get("timings_ms"),
                     extra=log_fields(turn_id=event.turn_id, stage="turn"))


def run_daemon(cfg: Config) -> int:
    return Daemon(cfg).run()
