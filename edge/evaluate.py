"""``edge-voice eval``: how well the kiosk answers its venue's questions, through the real pipeline.

Each question of the question file goes through the same pipeline ``run`` builds (the venue's FAQ
matcher and ready answers, the grounded LLM, the voice). As text, each is asked like the MQTT
``ask`` command; with ``--audio`` the whole file is spoken by the pipeline's own voice ("Hey
Jarvis", then the question), heard by the wake word and speech-to-text, so recognition errors
count too. Every question starts a fresh session. The answers are scored against the question
file's expectations (:mod:`edge.knowledge.eval`). Playback is not paced (the reply is not waited
out in real time); the first-audio latency is measured as the pipeline produced it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge.app import Pipeline
from edge.audio.chunk import SAMPLE_RATE, resample
from edge.audio.playback import WavSpeaker
from edge.config import Config
from edge.errors import EdgeError
from edge.events import Event, EventType
from edge.knowledge.eval import Answer, EvalReport, Question, QuestionResult, evaluate, load_questions
from edge.knowledge.pack import PACK_TOML
from edge.signals import CancelScope
from edge.simulate import FeedClock, feed_wav

_LOGGER = logging.getLogger(__name__)

TURN_TIMEOUT_S = 180.0
WAKE_PHRASE = "Hey Jarvis."


class _Turns:
    """The events of each finished turn, in order, as the bus delivers them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: dict[str, list[Event]] = {}
        self.finished: list[str] = []

    def __call__(self, event: Event) -> None:
        if event.turn_id is None:
            return
        with self._cond:
            self._events.setdefault(event.turn_id, []).append(event)
            if event.type == EventType.TURN_END:
                self.finished.append(event.turn_id)
                self._cond.notify_all()

    def wait(self, turn_id: str, timeout: float) -> list[Event]:
        with self._cond:
            if not self._cond.wait_for(lambda: turn_id in self.finished, timeout):
                raise EdgeError(f"eval: no answer within {timeout:.0f} s", code="eval.timeout")
            return list(self._events[turn_id])

    def events(self, turn_id: str) -> list[Event]:
        with self._cond:
            return list(self._events.get(turn_id, []))


def _answer_of(events: list[Event]) -> Answer:
    reply = next((e for e in events if e.type == EventType.REPLY_FINAL), None)
    end = next((e for e in events if e.type == EventType.TURN_END), None)
    text = str(reply.data.get("text", "")) if reply else ""
    path = str(reply.data.get("path", "llm")) if reply else "none"
    first = end.data.get("timings_ms", {}).get("end_of_speech_to_first_audio") if end else None
    return Answer(text, path, first, reply.data.get("faq_id") if reply else None)


def _with_pack(cfg: Config, questions_file: Path) -> Config:
    """A config without a pack takes the one the question file sits in (a pack's own questions)."""
    if cfg.knowledge.pack:
        return cfg
    if (questions_file.parent / PACK_TOML).is_file():
        return dataclasses.replace(cfg, knowledge=dataclasses.replace(cfg.knowledge, pack=str(questions_file.parent)))
    raise EdgeError(f"{cfg.source}: [knowledge] pack is not set and {questions_file} is not inside a pack: set "
                    "[knowledge] pack to the venue's pack", code="eval.no_pack")


def run_eval(cfg: Config, questions_file: str | Path, *, audio: bool = False,
             log: TextIO = sys.stderr) -> EvalReport:
    questions_file = Path(questions_file)
    questions = load_questions(questions_file)
    cfg = _with_pack(cfg, questions_file)
    clock = FeedClock()
    turns = _Turns()
    pipe = Pipeline(cfg, clock=clock)
    pipe.bus.subscribe(turns)
    try:
        stages = pipe.load()
        speaker = WavSpeaker(pipe.output_rate, None, clock, realtime=False)
        conv = pipe.open(speaker)
        pipe.start()
        assert pipe.venue is not None
        fallback = pipe.venue.pack.fallback
        done = 0

        def progress(r: QuestionResult) -> None:
            nonlocal done
            done += 1
            a = r.answer
            print(f"eval: {done}/{len(questions)} {'ok ' if r.correct else 'BAD'} [{a.path}] {r.question.text!r} "
                  f"-> {a.text[:70]!r}", file=log)

        if not audio:
            def ask(text: str) -> Answer:
                conv.end_session()
                return _answer_of(turns.wait(conv.ask(text), TURN_TIMEOUT_S))

            return evaluate(questions, ask, fallback, on_result=progress)
        if stages.synth is None:
            raise EdgeError("eval --audio needs a text-to-speech voice (tts.model) to speak the questions",
                            code="eval.tts")
        heard = _spoken_turns(pipe, questions, clock, turns, stages.synth, log)
        return evaluate(questions, lambda text: heard.pop(0), fallback, on_result=progress)
    finally:
        pipe.close()


def _spoken_turns(pipe: Pipeline, questions: list[Question], clock: FeedClock, turns: _Turns, synth: Any,
                  log: TextIO) -> list[Answer]:
    """Speak every question into the pipeline, one after another; the answer each turn got."""
    conv = pipe.conv
    assert conv is not None

    def speak(text: str) -> np.ndarray:
        pieces = list(synth.synthesize(text, CancelScope()))
        return resample(np.concatenate(pieces), synth.sample_rate, SAMPLE_RATE)

    def silence(s: float) -> np.ndarray:
        return np.zeros(int(SAMPLE_RATE * s), dtype=np.int16)

    wake = speak(WAKE_PHRASE)
    answers: list[Answer] = []
    for i, q in enumerate(questions):
        conv.end_session()
        before = len(turns.finished)
        samples = np.concatenate([silence(0.5), wake, silence(0.4), speak(q.text), silence(1.5)])
        t0 = time.monotonic()
        feed_wav(conv, clock, samples, realtime=False, hear=lambda chunk, wait: pipe.hear(chunk, wait=wait))
        ended = turns.finished[before:]
        events = [e for tid in ended for e in turns.events(tid)]
        heard = next((str(e.data.get("text", "")) for e in events if e.type == EventType.TRANSCRIPT_FINAL), "")
        answer = _answer_of(events) if ended else Answer("", "none")
        answers.append(answer)
        _LOGGER.info("question %d/%d heard as %r in %.1f s", i + 1, len(questions), heard, time.monotonic() - t0)
    return answers
