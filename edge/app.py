"""The daemon (``edge-voice run``): the composition root.

Start-up: load models → open the speaker → warm the LLM → open the microphone → READY=1.
The audio loop reads the microphone on its own thread, feeds the conversation and tells the
watchdog it made progress. Shutdown on SIGTERM, in order: STOPPING=1 → stop the mic → cancel
the turn → stop the speaker → flush the outbox, publish offline, disconnect → free models.
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
from edge.errors import AudioError
from edge.events import Event, EventBus, EventType
from edge.logs import MessageId, log_fields
from edge.stages import Stages, load_stages
from edge.systemd import Status

_LOGGER = logging.getLogger(__name__)

# If the microphone delivers nothing for this long it is treated as lost and reopened.
MIC_SILENT_S = 5.0


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
        self.mic_state = "closed"
        self._audio_thread: threading.Thread | None = None
        self._reload: Stages | None = None
        self._status_text = ""

    # -- status ----------------------------------------------------------------------
    def status(self, text: str, state: str | None = None) -> None:
        text = str(text)
        if text != self._status_text:
            self._status_text = text
            self.notifier.status(text)
            _LOGGER.info("status: %s", text)
        if state is not None and self.bridge is not None:
            self.bridge.set_state(state, detail=text)

    def metrics(self) -> dict[str, Any]:
        return {
            "audio_queue_drops": getattr(self.mic, "dropped", 0),
            "mic": self.mic_state,
            "conversation": self.conv.state.value if self.conv else "loading",
            "turns": self.conv.turns_done if self.conv else 0,
            "models_loaded": self.stages is not None,
        }

    # -- lifecycle -------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        try:
            self._start()
            self.notifier.ready()  # READY=1 with STATUS=listening
            self._status_text = Status.LISTENING.value
            if self.bridge is not None:
                self.bridge.set_state("online")
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
                        if self.mic_state == "open":
                            self.status(Status.LISTENING)
                    else:
                        _LOGGER.warning("MQTT broker unreachable; events are kept on disk",
                                        extra=log_fields(message_id=MessageId.BROKER_LOST))
                        if self.mic_state == "open":
                            self.status(Status.BROKER_UNREACHABLE)
            return 0
        finally:
            self._shutdown()

    def _start(self) -> None:
        cfg = self.cfg
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
        self.speaker = open_speaker(cfg.audio, rate)
        self.conv = Conversation(cfg, bus=self.bus, clock=self.clock, speaker=self.speaker,
                                 wake=self.stages.wake, recognizer=self.stages.recognizer,
                                 chat=self.stages.chat, synth=self.stages.synth)
        if self.stages.chat is not None:
            self.status("warming the language model")
            self.stages.chat.warm(cfg.llm.system_prompt)
        self.status("opening the microphone")
        self.mic = open_microphone(cfg.audio)
        self._open_mic_until_ready()
        self.conv.start()
        self.watchdog.start()
        self._audio_thread = threading.Thread(target=self._audio_loop, name="audio", daemon=True)
        self._audio_thread.start()

    def _open_mic_until_ready(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                self.mic.open()
                self.mic_state = "open"
                return
            except AudioError as err:
                self.mic_state = "lost"
                self.status(Status.MIC_LOST, "mic_lost")
                _LOGGER.warning("microphone unavailable (%s); retrying in %.1f s", err.message, backoff,
                                extra=log_fields(stage="audio", message_id=MessageId.MIC_LOST))
                self.watchdog.progress()  # still alive: retrying is progress, not a hang
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, self.cfg.audio.reopen_backoff_max_s)
        raise AudioError("stopped before the microphone opened", code="audio.cancelled")

    def _audio_loop(self) -> None:
        assert self.conv is not None
        last_audio = time.monotonic()
        while not self.stop_event.is_set():
            try:
                chunk = self.mic.read(timeout=0.5)
            except AudioError as err:
                _LOGGER.warning("microphone failed: %s", err)
                chunk, last_audio = None, 0.0
            self.watchdog.progress()
            if self._reload is not None:
                self._swap_stages()
            if chunk is None:
                if time.monotonic() - last_audio > MIC_SILENT_S:
                    self._recover_mic()
                    last_audio = time.monotonic()
                continue
            last_audio = time.monotonic()
            self.clock.t = chunk.end_s
            self.conv.feed(chunk)

    def _recover_mic(self) -> None:
        self.conv.cancel(reason="mic_lost")
        try:
            self.mic.close()
        except Exception:
            _LOGGER.exception("closing the microphone failed")
        self.mic_state = "lost"
        self.status(Status.MIC_LOST, "mic_lost")
        _LOGGER.warning("microphone lost", extra=log_fields(stage="audio", message_id=MessageId.MIC_LOST))
        try:
            self._open_mic_until_ready()
        except AudioError:
            return
        _LOGGER.info("microphone back", extra=log_fields(stage="audio", message_id=MessageId.MIC_RESTORED))
        self.status(Status.LISTENING, "online")

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
        self.notifier.stopping()
        self._status_text = Status.STOPPING.value
        _LOGGER.info("stopping", extra=log_fields(message_id=MessageId.STOPPING))
        self.stop_event.set()
        if self._audio_thread is not None:
            self._audio_thread.join(timeout=3)
        if self.mic is not None:
            self.mic.close()
        if self.conv is not None:
            self.conv.stop()
        self.watchdog.stop()
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
