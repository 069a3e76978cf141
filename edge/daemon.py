"""The daemon (``edge-voice run``): the pipeline on a live microphone and speaker, under systemd.

Start-up: undo an unconfirmed rollout → load models → the MQTT bridge → open the speaker → warm
the LLM → open the microphone → GPIO lines → READY=1. The audio loop reads the microphone on its
own thread and hands each chunk to the pipeline (echo gate, then the conversation's inbox); the
watchdog is told only when audio really arrived. Shutdown on SIGTERM, in order: STOPPING=1 → stop
the mic → cancel the turn → stop the speaker → flush the outbox, publish offline, disconnect →
free models.

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
import os
import signal
import threading
import time
from typing import Any

from edge import __version__
from edge.app import Pipeline
from edge.audio.base import Microphone
from edge.audio.devices import open_microphone, open_speaker
from edge.config import Config
from edge.conversation import Conversation, Outcome
from edge.errors import AudioError
from edge.events import Event, EventType
from edge.kiosk import check_gpio_config
from edge.logs import MessageId, log_fields
from edge.systemd import Notifier, Status, Watchdog

_LOGGER = logging.getLogger(__name__)

# A capture stream that stops delivering can wedge PortAudio: closing it then never returns (seen
# with PulseAudio's ALSA plugin on a suspended source). Past this the device cannot be recovered
# in this process; the daemon exits non-zero and systemd starts it afresh.
MIC_CLOSE_TIMEOUT_S = 5.0


class MicClock:
    """The audio timeline of the live microphone: the end of the last chunk read."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.notifier = Notifier()
        self.watchdog = Watchdog(self.notifier)
        self.stop_event = threading.Event()
        self.clock = MicClock()
        self.pipeline = Pipeline(cfg, clock=self.clock, status=self)
        self.mic: Microphone | None = None
        # closed → open; lost while failing; waiting once reopened until audio flows again
        self.mic_state = "closed"
        self.speaker_state = "closed"
        self.mic_recoveries = 0
        self.exit_code = 0
        self._mic_wedged = False
        self._audio_thread: threading.Thread | None = None
        self._status_text = ""
        self._mqtt_state: str | None = None
        self._status_lock = threading.RLock()

    @property
    def conv(self) -> Conversation | None:
        return self.pipeline.conv

    # -- status ----------------------------------------------------------------------
    def status(self, text: str, state: str | None = None) -> None:
        with self._status_lock:
            text = str(text)
            if text != self._status_text:
                self._status_text = text
                self.notifier.status(text)
                _LOGGER.info("status: %s", text)
            bridge = self.pipeline.bridge
            if state is not None and bridge is not None and state != self._mqtt_state:
                self._mqtt_state = state
                bridge.set_state(state, detail=text)

    def refresh_status(self) -> None:
        """Say the most urgent thing: a lost device, then muted, then the broker, else listening."""
        bridge = self.pipeline.bridge
        if self.mic_state in ("lost", "waiting"):
            self.status(Status.MIC_LOST, "mic_lost")
        elif self.speaker_state == "lost":
            self.status(Status.SPEAKER_LOST, "speaker_lost")
        elif self.conv is not None and self.conv.muted:
            self.status("muted", "muted")
        elif bridge is not None and not bridge.connected:
            self.status(Status.BROKER_UNREACHABLE)  # nobody to tell over MQTT
        else:
            self.status(Status.LISTENING, "online")

    def metrics(self) -> dict[str, Any]:
        return {
            "audio_queue_drops": self.mic.dropped if self.mic is not None else 0,
            "mic": self.mic_state,
            "mic_recoveries": self.mic_recoveries,
            "speaker": self.speaker_state,
        }

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
                conv = self.conv
                if conv is not None and not conv.alive:
                    _LOGGER.error("the conversation ended unexpectedly")
                    return 1
                bridge = self.pipeline.bridge
                if bridge is not None and bridge.connected != broker_up:
                    broker_up = bridge.connected
                    if broker_up:
                        _LOGGER.info("MQTT broker reachable", extra=log_fields(message_id=MessageId.BROKER_RESTORED))
                    else:
                        _LOGGER.warning("MQTT broker unreachable; events are kept on disk",
                                        extra=log_fields(message_id=MessageId.BROKER_LOST))
                    self.refresh_status()
            return self.exit_code
        finally:
            self._shutdown()

    def _start(self) -> None:
        cfg = self.cfg
        check_gpio_config(cfg.conversation, cfg.source)  # a wiring mistake fails before models load
        _LOGGER.info("edge-voice %s starting as %s; notify backend: %s", __version__, cfg.device_id,
                     self.notifier.backend, extra=log_fields(message_id=MessageId.STARTING))
        self.status(Status.LOADING_MODELS)
        from edge.rollout.journal import recover

        # A rollout that switched but was never confirmed (power cut, crash, kill) is undone before
        # anything loads: the device starts on the version it had.
        recover(cfg.state_dir, cfg.models_dir, cfg.packs_dir)
        pipe = self.pipeline
        pipe.load()
        _LOGGER.info("models ready", extra=log_fields(stage="models", message_id=MessageId.MODEL_LOADED))
        pipe.connect(self.metrics)
        pipe.bus.subscribe(_log_event)
        speaker = open_speaker(cfg.audio, pipe.output_rate, on_state=self._speaker_changed)
        self.speaker_state = speaker.state
        pipe.open(speaker)
        self.status("opening the microphone")
        self.mic = open_microphone(cfg.audio)
        self._open_mic_until_ready()
        self.mic_state = "open"
        pipe.start()
        assert pipe.kiosk is not None
        pipe.kiosk.start()
        self.watchdog.start()
        self._audio_thread = threading.Thread(target=self._audio_loop, name="audio", daemon=True)
        self._audio_thread.start()

    def _open_mic_until_ready(self) -> None:
        assert self.mic is not None
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
        try:
            self._read_audio()
        except AudioError as err:
            if err.code != "audio.stuck":
                raise
            self.exit_code = 1

    def _read_audio(self) -> None:
        mic = self.mic
        assert mic is not None
        stall_s = self.cfg.audio.input_stall_s
        last_audio = time.monotonic()
        while not self.stop_event.is_set():
            try:
                chunk = mic.read(timeout=0.5)
            except AudioError as err:
                _LOGGER.warning("microphone failed: %s", err)
                self._recover_mic()
                last_audio = time.monotonic()
                continue
            if chunk is None:
                if time.monotonic() - last_audio > stall_s:
                    _LOGGER.warning("microphone delivered nothing for %.1f s", stall_s)
                    self._recover_mic()
                    last_audio = time.monotonic()
                continue
            self.watchdog.progress()
            last_audio = time.monotonic()
            if self.mic_state != "open":
                self.mic_state = "open"
                _LOGGER.info("microphone back", extra=log_fields(stage="audio", message_id=MessageId.MIC_RESTORED))
                self.refresh_status()
            self.clock.t = chunk.end_s
            self.pipeline.hear(chunk)

    def _close_mic(self) -> bool:
        """Close the microphone within MIC_CLOSE_TIMEOUT_S; False if it hangs (left behind)."""
        mic = self.mic
        if mic is None or self._mic_wedged:
            return not self._mic_wedged

        def close() -> None:
            try:
                mic.close()
            except Exception:
                _LOGGER.exception("closing the microphone failed")

        closer = threading.Thread(target=close, name="mic-close", daemon=True)
        closer.start()
        closer.join(MIC_CLOSE_TIMEOUT_S)
        self._mic_wedged = closer.is_alive()
        return not self._mic_wedged

    def _recover_mic(self) -> None:
        """Close, say so, reopen with back-off; the status changes back when audio flows."""
        assert self.mic is not None and self.conv is not None
        self.conv.cancel(Outcome.MIC_LOST)
        if not self._close_mic():
            _LOGGER.error("the microphone did not close within %.0f s: the audio system is stuck; exiting for "
                          "systemd to restart edge-voice", MIC_CLOSE_TIMEOUT_S,
                          extra=log_fields(stage="audio", message_id=MessageId.MIC_LOST))
            self.stop_event.set()
            raise AudioError("the microphone is stuck", code="audio.stuck")
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
        conv = self.conv
        if state == "lost" and conv is not None and conv.answering():
            conv.cancel(Outcome.SPEAKER_LOST)  # nobody can hear the rest of this reply
        _LOGGER.log(logging.WARNING if state == "lost" else logging.INFO, "speaker %s: %s", state, detail,
                    extra=log_fields(stage="audio", message_id=MessageId.SPEAKER_LOST if state == "lost"
                                     else MessageId.SPEAKER_RESTORED))
        if conv is not None:  # before start-up is done, run() sets the status
            self.refresh_status()

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
        self._close_mic()
        self.pipeline.close()
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
    daemon = Daemon(cfg)
    code = daemon.run()
    if daemon._mic_wedged:
        # A thread is stuck inside the audio system; the interpreter's own shutdown could hang or
        # crash on it. Leave now, with the exit status systemd restarts on.
        logging.shutdown()
        os._exit(code)
    return code
