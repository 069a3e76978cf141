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
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from edge.app import Pipeline, Stages
from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from edge.audio.playback import WavSpeaker
from edge.audio.wav import read_wav
from edge.config import Config
from edge.conversation import Conversation
from edge.errors import EdgeError
from edge.events import Event, EventBus

_LOGGER = logging.getLogger(__name__)


class FeedClock:
    """The microphone's timeline: seconds of audio delivered so far."""

    def __init__(self) -> None:
        self._samples = 0

    def advance(self, n: int) -> None:
        self._samples += n

    @property
    def samples(self) -> int:
        """Samples delivered so far: where the next chunk starts on the timeline."""
        return self._samples

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
             max_tail_s: float = 120.0, hear: Callable[[AudioChunk, bool], None] | None = None) -> None:
    """Feed ``samples`` as the microphone, then silence until the conversation is idle.

    ``hear(chunk, wait)`` hands a chunk on (default: straight to ``conv``); with ``wait`` it
    returns once the chunk has been handled, so the file never runs ahead of the pipeline. The
    chunks continue the clock's timeline (a second file fed to the same pipeline comes after the
    first).
    """
    if hear is None:
        def hear(chunk: AudioChunk, wait: bool) -> None:
            conv.process(chunk) if wait else conv.feed(chunk)

    pos = 0
    origin = clock.samples
    n_real = len(samples)
    tail_limit = n_real + int(max_tail_s * SAMPLE_RATE)
    due = time.monotonic()
    paced_last = False
    silence = np.zeros(CHUNK_SAMPLES, dtype=np.int16)
    while True:
        if not conv.alive:
            raise EdgeError(f"the conversation stopped: {conv.failed or 'it was stopped'}", code="internal")
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
        chunk = AudioChunk(block, origin + pos, SAMPLE_RATE, time.monotonic())
        clock.advance(CHUNK_SAMPLES)
        hear(chunk, not paced)  # lock-step while nobody waits: never run ahead of the pipeline
        pos += CHUNK_SAMPLES


@dataclass(frozen=True)
class Echo:
    """The device's own voice in the microphone: ``relative_db`` to the visitor's voice (the input's
    speech level), ``delay_ms`` after it is played, through a synthetic room (0.3 s RT60)."""

    relative_db: float = 0.0
    delay_ms: float = 50.0

    @classmethod
    def parse(cls, text: str) -> Echo:
        """``GAIN_DB[:DELAY_MS]``, e.g. ``0``, ``-10``, ``-10:120``."""
        gain, _, delay = text.partition(":")
        try:
            echo = cls(float(gain), float(delay) if delay else 50.0)
        except ValueError:
            raise EdgeError(f"--echo {text!r}: give GAIN_DB[:DELAY_MS], e.g. 0 or -10:120", code="usage") from None
        if not (-60 <= echo.relative_db <= 20 and 0 <= echo.delay_ms <= 1000):
            raise EdgeError(f"--echo {text!r}: the gain must be within -60..20 dB and the delay 0..1000 ms",
                            code="usage")
        return echo


def simulate(cfg: Config, input_wav: str | Path, output_wav: str | Path | None, *, realtime: bool = False,
             out: TextIO | None = None, stages: Stages | None = None, bus: EventBus | None = None,
             echo: Echo | None = None) -> SimResult:
    """Run the pipeline over a WAV. Raises EdgeError for bad input or missing models.

    ``echo``: mix what the device plays back into the microphone, as a loudspeaker beside it would.
    """
    samples, info = read_wav(input_wav)
    _LOGGER.info("input %s: %.1f s, %d Hz, %d channel(s), %s %d-bit", input_wav, info.duration_s,
                 info.rate, info.channels, info.fmt, info.bits)
    result = SimResult()
    clock = FeedClock()
    pipe = Pipeline(cfg, clock=clock, bus=bus, stages=stages, timeline_clock=True)
    pipe.bus.subscribe(result.events.append)
    if out is not None:
        pipe.bus.subscribe(JsonLinePrinter(out))
    speaker = None
    try:
        pipe.load()
        speaker = WavSpeaker(pipe.output_rate, str(output_wav) if output_wav else None, clock, realtime=True,
                             volume=cfg.audio.volume)
        conv = pipe.open(speaker)
        hear: Callable[[AudioChunk, bool], None] = lambda chunk, wait: pipe.hear(chunk, wait=wait)  # noqa: E731
        if echo is not None:
            hear = _echo_path(echo, pipe, speaker, samples, hear)
        pipe.connect()
        pipe.start()
        feed_wav(conv, clock, samples, realtime=realtime, hear=hear)
    finally:
        pipe.close(bridge_timeout=10.0)  # deliver what the run produced before going offline
    result.reply_audio = speaker.audio() if speaker is not None else None
    result.reply_rate = pipe.output_rate
    result.played = list(speaker.played) if speaker is not None else []
    return result


def _echo_path(echo: Echo, pipe: Pipeline, speaker: WavSpeaker, samples: np.ndarray,
               hear: Callable[[AudioChunk, bool], None]) -> Callable[[AudioChunk, bool], None]:
    """What the speaker plays reaches the microphone: the gain set from the voice's speech level
    (a sentence in it) and the visitor's (the input's)."""
    from edge.audio.aec import EchoPath, active_level_dbfs, echo_gain
    from edge.audio.chunk import resample

    synth = pipe.stages.synth if pipe.stages is not None else None
    if synth is None:
        raise EdgeError("--echo needs a text-to-speech voice (tts.model): the echo is the device's voice",
                        code="usage")
    from edge.signals import CancelScope

    voice = np.concatenate(list(synth.synthesize("This is how loud the device speaks in this room.", CancelScope())))
    device = active_level_dbfs(resample(voice, synth.sample_rate, SAMPLE_RATE))
    visitor = active_level_dbfs(samples)
    if not np.isfinite(visitor):
        visitor = -26.0  # a silent input: a visitor at a usual level
    path = EchoPath(delay_s=echo.delay_ms / 1000, gain=echo_gain(device, visitor, echo.relative_db))
    speaker.on_played(lambda block, rate, at: path.play(block, rate, int(round(at * SAMPLE_RATE))))
    _LOGGER.info("echo: the device's voice at %+.0f dB to the visitor's (%.1f dBFS), %.0f ms late",
                 echo.relative_db, visitor, echo.delay_ms)
    return lambda chunk, wait: hear(path.mix(chunk), wait)


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
            how = "  (FAQ: a ready answer)" if d.get("path") == "faq" else ""
            lines.append(f"[reply]  {d['text']}{how}")
        elif d["type"] == "turn.end" and d.get("timings_ms"):
            t = d["timings_ms"]
            if "end_of_speech_to_first_audio" in t:
                lines.append(f"[timing] end of speech to first audio: {t['end_of_speech_to_first_audio']:.0f} ms")
    return lines


def dump_events(events: list[Event], path: Path) -> None:
    path.write_text("".join(json.dumps(e.as_dict()) + "\n" for e in events), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `edge-voice simulate`")
