"""``edge-voice simulate``: the whole pipeline with a WAV file as the microphone.

Timing follows what a listener would hear. The WAV is fed from a "microphone" thread; while
no turn is in progress it is fed as fast as the pipeline consumes it (lock-step, so the
microphone never runs ahead of processing), and while a turn is being answered it is fed
in real time, because then the wall clock is what the visitor experiences. ``--realtime``
feeds everything in real time. Replies are "played" in real time into the output WAV, on
the same timeline, so barge-in can be measured in audio time.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from edge.audio.playback import WavSpeaker
from edge.audio.wav import read_wav
from edge.config import Config
from edge.conversation import Conversation
from edge.events import Event, EventBus

_LOGGER = logging.getLogger(__name__)


class FeedClock:
    """The microphone's timeline: seconds of audio delivered so far."""

    def __init__(self) -> None:
        self._samples = 0

    def advance(self, n: int) -> None:
        self._samples += n

    def now(self) -> float:
        return self._samples / SAMPLE_RATE


class JsonLinePrinter:
    """Prints each event as one JSON object per line (thread-safe)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = event.to_json()
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


@dataclass
class SimResult:
    events: list[Event] = field(default_factory=list)
    reply_audio: np.ndarray | None = None
    reply_rate: int = 0
    # (speaker utterance generation, audio time, samples) of every block the speaker played
    played: list[tuple[int, float, int]] = field(default_factory=list)


def feed_wav(conv: Conversation, clock: FeedClock, samples: np.ndarray, *, realtime: bool,
             max_tail_s: float = 120.0, on_chunk: Callable[[AudioChunk], None] | None = None) -> None:
    """Feed ``samples`` as the microphone, then silence until the conversation is idle."""
    q: queue.Queue[AudioChunk | None] = queue.Queue(maxsize=200)
    failure: list[BaseException] = []

    def consume() -> None:
        while True:
            chunk = q.get()
            try:
                if chunk is None:
                    return
                conv.feed(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)
            except BaseException as err:  # surfaced to the feeding thread
                failure.append(err)
                return
            finally:
                q.task_done()

    worker = threading.Thread(target=consume, name="audio", daemon=True)
    worker.start()
    pos = 0
    n_real = len(samples)
    tail_limit = n_real + int(max_tail_s * SAMPLE_RATE)
    due = time.monotonic()
    paced_last = False
    silence = np.zeros(CHUNK_SAMPLES, dtype=np.int16)
    while not failure:
        if pos >= n_real and (conv.idle() or pos >= tail_limit):
            break
        block = samples[pos : pos + CHUNK_SAMPLES] if pos < n_real else silence
        if len(block) < CHUNK_SAMPLES:
            block = np.concatenate([block, silence[: CHUNK_SAMPLES - len(block)]])
        paced = realtime or conv.answering()
        if paced:
            if not paced_last:
                due = time.monotonic()
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            due += CHUNK_SAMPLES / SAMPLE_RATE
        paced_last = paced
        chunk = AudioChunk(block, pos, SAMPLE_RATE, time.monotonic())
        clock.advance(CHUNK_SAMPLES)
        q.put(chunk)
        if not paced:
            q.join()  # lock-step: never run ahead of the pipeline
        pos += CHUNK_SAMPLES
    q.put(None)
    worker.join()
    if failure:
        raise failure[0]


def simulate(cfg: Config, input_wav: str | Path, output_wav: str | Path | None, *, realtime: bool = False,
             out: TextIO | None = None, stages: Any = None, bus: EventBus | None = None) -> SimResult:
    """Run the pipeline over a WAV. Raises EdgeError for bad input or missing models."""
    from edge.stages import load_stages

    samples, info = read_wav(input_wav)
    _LOGGER.info("input %s: %.1f s, %d Hz, %d channel(s), %s %d-bit", input_wav, info.duration_s,
                 info.rate, info.channels, info.fmt, info.bits)
    own_stages = stages is None
    if stages is None:
        stages = load_stages(cfg)
    result = SimResult()
    bus = bus or EventBus()
    bus.subscribe(result.events.append)
    if out is not None:
        bus.subscribe(JsonLinePrinter(out))
    clock = FeedClock()
    rate = stages.synth.sample_rate if stages.synth is not None else SAMPLE_RATE
    speaker = WavSpeaker(rate, str(output_wav) if output_wav else None, clock, realtime=True,
                         volume=cfg.audio.volume)
    conv = Conversation(cfg, bus=bus, clock=clock, speaker=speaker, wake=stages.wake,
                        recognizer=stages.recognizer, chat=stages.chat, synth=stages.synth)
    if stages.wake is not None:
        stages.wake.reset()
    if stages.chat is not None:
        stages.chat.warm(cfg.llm.system_prompt)
    host = _SimHost(cfg, conv, speaker)
    bridge = None
    if cfg.mqtt.enabled:
        from edge import __version__
        from edge.control import Controller
        from edge.mqtt.client import MqttBridge

        bridge = MqttBridge(cfg.mqtt, cfg.device_id, cfg.state_dir, Controller(host), version=__version__,
                            models=cfg.model_ids())
        bridge.set_metrics_source(host.metrics)
        bridge.start()
        bus.subscribe(bridge.publish_event)
    conv.start()
    try:
        feed_wav(conv, clock, samples, realtime=realtime)
    finally:
        conv.stop()
        speaker.close()
        if bridge is not None:
            bridge.stop(timeout=10.0)  # deliver what the run produced before going offline
        if own_stages:
            stages.close()
    result.reply_audio = speaker.audio()
    result.reply_rate = rate
    result.played = list(speaker.played)
    return result


class _SimHost:
    """What the MQTT controller may touch in a simulation (no model reloads)."""

    def __init__(self, cfg: Config, conv: Conversation, speaker: Any) -> None:
        self.cfg, self.conv, self.speaker = cfg, conv, speaker
        self.started = time.monotonic()

    def status(self, text: str, state: str | None = None) -> None:
        _LOGGER.info("status: %s", text)

    def metrics(self) -> dict[str, Any]:
        return {"conversation": self.conv.state.value, "turns": self.conv.turns_done}

    def reload_models(self) -> None:
        from edge.errors import EdgeError

        raise EdgeError("reload-models is not available in simulate", code="cmd.unsupported")


def summary_lines(events: list[Event]) -> list[str]:
    """Human lines for the demo: what was heard and what was answered."""
    lines = []
    for ev in events:
        d = ev.as_dict()
        if d["type"] == "wake":
            lines.append(f"[wake]   {d.get('word')} at {d.get('audio_time', 0):.2f} s")
        elif d["type"] == "transcript.final":
            lines.append(f"[heard]  {d['text']}")
        elif d["type"] == "reply.final":
            lines.append(f"[reply]  {d['text']}")
        elif d["type"] == "turn.end" and d.get("timings_ms"):
            t = d["timings_ms"]
            if "end_of_speech_to_first_audio" in t:
                lines.append(f"[timing] end of speech to first audio: {t['end_of_speech_to_first_audio']:.0f} ms")
    return lines


def dump_events(events: list[Event], path: Path) -> None:
    path.write_text("".join(json.dumps(e.as_dict()) + "\n" for e in events), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `edge-voice simulate`")
