"""What the soak run says to the device: spoken clips, noise, and the seeded plan of turns.

A clip is the wake word, a short pause and a question, spoken once at start-up by the
configured Piper voice (the voice the device itself speaks with) or by an espeak-ng voice.
Before the run each clip is checked on its own through the real wake model
(:func:`check_clips`): a wake word that the model misses even alone says nothing about the
daemon, so only clips that pass are used, and a wake word the soak then misses is a real miss.

The plan is a list of items, one per turn of the run, shuffled from a seed:

- ``ask``: wake word + question; must be answered (``turn.end`` with outcome ``done``);
- ``barge``: wake word + question, and while the reply plays a second wake word + question;
  the first turn ends ``barge_in`` and the second must be answered;
- ``silence`` and ``noise``: no wake word; nothing may start.

Questions come from visitors who ask a few each and leave: a new visitor's first turn comes
after a quiet pause longer than the session's idle timeout, so each visitor gets a fresh
conversation, as at a kiosk whose visitors are minutes apart.

Chaos is planned on the same items: the broker stopped (and started again after a few
seconds) and the daemon killed with SIGKILL, each at a seeded moment within its item. Kills
fall in the first part of the run, so the rest runs in one process whose memory can be
watched over many turns.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, resample
from edge.audio.wav import read_wav
from edge.config import Config
from edge.errors import EdgeError
from edge.signals import CancelScope

# Questions a kiosk hears, each answered in one short sentence by the dev model.
QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky?",
    "What is two plus two?",
    "Which is the largest planet?",
    "How many days are in a week?",
)
# Asked before a barge-in: their replies last long enough to be interrupted.
LONG_QUESTIONS = (
    "Can you tell me about the history of Paris?",
    "Please describe the ocean for me.",
)
ESPEAK_VOICES = (("en-us", 150), ("en-gb", 150))
KINDS = ("ask", "barge", "silence", "noise")
DEFAULT_MIX = {"ask": 0.65, "barge": 0.1, "silence": 0.13, "noise": 0.12}


@dataclass(frozen=True)
class Clip:
    """Wake word, pause, question: 16 kHz int16 samples."""

    name: str
    voice: str
    question: str
    audio: np.ndarray = field(repr=False, compare=False)
    wake_end_s: float  # where the wake word ends in ``audio``
    solo_score: float = 0.0  # the wake model's best score on the clip alone
    wakes_alone: bool = False  # the wake model fires on the clip alone

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SAMPLE_RATE)), dtype=np.int16)


def trim(samples: np.ndarray, level: int = 300) -> np.ndarray:
    """Without the leading and trailing stretch quieter than ``level``."""
    loud = np.nonzero(np.abs(samples.astype(np.int32)) > level)[0]
    return samples[loud[0]: loud[-1] + 1].copy() if len(loud) else samples[:0].copy()


def noise(rng: np.random.Generator, seconds: float, kind: str) -> np.ndarray:
    """White or brown (wind, traffic-like) noise at a speech-like level."""
    n = int(seconds * SAMPLE_RATE)
    x = rng.standard_normal(n)
    if kind == "brown":
        x = np.cumsum(x)
        x -= np.convolve(x, np.ones(801) / 801, mode="same")  # no drift: a rumble, not a ramp
    x *= 0.05 / max(1e-9, float(np.sqrt(np.mean(x ** 2))))  # about -26 dBFS
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


# -- voices -------------------------------------------------------------------------------------

Voice = Callable[[str], np.ndarray]


def piper_voice(cfg: Config) -> Voice:
    """The configured text-to-speech voice, at 16 kHz."""
    from edge.models.registry import ModelRegistry
    from edge.tts import make_synthesizer

    synth = make_synthesizer(cfg.tts, dict(ModelRegistry(cfg.models_dir).resolve(cfg.tts.model).files))

    def say(text: str) -> np.ndarray:
        pieces = list(synth.synthesize(text, CancelScope()))
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
        return resample(audio, synth.sample_rate, SAMPLE_RATE)

    return say


def espeak_voice(name: str, rate: int) -> Voice | None:
    """An espeak-ng voice at 16 kHz; None when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None

    def say(text: str) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "say.wav"
            try:
                subprocess.run([exe, "-v", name, "-s", str(rate), "-w", str(out), text], check=True,
                               capture_output=True, timeout=60)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                raise EdgeError(f"espeak-ng could not speak {text!r} with voice {name}: {err}",
                                code="soak.voice") from None
            samples, _info = read_wav(out)
            return samples

    return say


def make_clips(voices: Sequence[tuple[str, Voice]], questions: Sequence[str]) -> list[Clip]:
    clips = []
    for vname, say in voices:
        wake = trim(say("Hey Jarvis."))
        for q in questions:
            audio = np.concatenate([wake, silence(0.4), trim(say(q)), silence(0.1)])
            slug = "-".join(q.lower().rstrip("?.").split()[:4])
            clips.append(Clip(f"{vname}/{slug}", vname, q, audio, len(wake) / SAMPLE_RATE))
    return clips


def check_clips(cfg: Config, clips: Sequence[Clip]) -> list[Clip]:
    """Each clip on its own through the configured wake model (silence either side)."""
    import dataclasses

    from edge.models.registry import ModelRegistry
    from edge.wake import make_wake_detector

    files = dict(ModelRegistry(cfg.models_dir).resolve(cfg.wake.model).files)
    det = make_wake_detector(cfg.wake, files)
    if det is None:
        raise EdgeError("the soak run needs a wake word: the config's wake.engine is none", code="soak.config")
    out = []
    try:
        for clip in clips:
            det.reset()
            audio = np.concatenate([silence(0.5), clip.audio, silence(1.0)])
            hits = []
            for i in range(0, len(audio) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
                hits += det.process(AudioChunk(audio[i: i + CHUNK_SAMPLES].copy(), i))
            # the hit must come from the wake word, not from the question
            good = [h for h in hits if h.audio_time <= 0.5 + clip.wake_end_s + 0.5]
            best = max((h.score for h in good), default=0.0)
            out.append(dataclasses.replace(clip, solo_score=round(best, 3), wakes_alone=bool(good)))
    finally:
        det.close()
    return out


def check_quiet(cfg: Config, pieces: Sequence[np.ndarray]) -> int:
    """How many of ``pieces`` (noise, silence) fire the wake model on their own."""
    from edge.models.registry import ModelRegistry
    from edge.wake import make_wake_detector

    det = make_wake_detector(cfg.wake, dict(ModelRegistry(cfg.models_dir).resolve(cfg.wake.model).files))
    assert det is not None
    fired = 0
    try:
        for audio in pieces:
            det.reset()
            hits = []
            for i in range(0, len(audio) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
                hits += det.process(AudioChunk(audio[i: i + CHUNK_SAMPLES].copy(), i))
            fired += bool(hits)
    finally:
        det.close()
    return fired


# -- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    index: int
    kind: str  # ask, barge, silence, noise
    clips: tuple[str, ...] = ()  # clip names: one (ask), two (barge: the question, then the interruption)
    seconds: float = 0.0  # silence and noise: how long
    noise: str = ""  # white or brown
    gap_s: float = 1.0  # silence after the item, fed fast
    new_visitor: bool = False  # the turn comes from someone new: the last visitor's session has ended


@dataclass(frozen=True)
class Chaos:
    item: int
    delay_s: float  # after the item starts
    what: str  # kill, broker
    down_s: float = 0.0  # broker: how long it stays stopped


@dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]
    chaos: tuple[Chaos, ...]

    def count(self, kind: str) -> int:
        return sum(1 for i in self.items if i.kind == kind)

    def chaos_at(self, index: int) -> list[Chaos]:
        return [c for c in self.chaos if c.item == index]


def _spread(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    """``n`` distinct item indices in [lo, hi), one in each of n equal slots (seeded)."""
    if n <= 0 or hi <= lo:
        return []
    width = (hi - lo) / n
    out = []
    for k in range(n):
        a = lo + int(k * width)
        b = max(a + 1, lo + int((k + 1) * width))
        out.append(rng.randrange(a, min(b, hi)))
    return sorted(set(out))


def make_plan(seed: int, turns: int, clips: Sequence[Clip], *, mix: dict[str, float] | None = None,
              kills: int, broker_restarts: int, kill_span: float = 0.5,
              broker_down_s: tuple[float, float] = (3.0, 15.0), visitor_turns: int = 4) -> Plan:
    """``turns`` items in a seeded order; the first is always an ``ask`` (it warms the daemon).

    Visitors ask 1 to ``2 * visitor_turns - 1`` questions each (``ask`` and ``barge`` items);
    0: one visitor for the whole run."""
    rng = random.Random(seed)
    mix = dict(mix or DEFAULT_MIX)
    usable = [c for c in clips if c.wakes_alone]
    short = [c.name for c in usable if c.question in QUESTIONS]
    long = [c.name for c in usable if c.question in LONG_QUESTIONS]
    if not short:
        raise EdgeError("no clip's wake word is caught by the wake model on its own: nothing to ask with",
                        code="soak.clips")
    if mix.get("barge", 0) > 0 and not long:
        raise EdgeError("no long-reply clip's wake word is caught on its own: no barge-in possible", code="soak.clips")
    total = sum(mix.values())
    counts = {k: int(round(turns * mix.get(k, 0) / total)) for k in KINDS}
    for k in KINDS:  # every kind with a share appears at least once
        if mix.get(k, 0) > 0 and counts[k] == 0 and turns >= len(KINDS):
            counts[k] = 1
    counts["ask"] = max(1, turns - sum(counts[k] for k in KINDS if k != "ask"))
    kinds = [k for k in KINDS for _ in range(counts[k])]
    kinds.remove("ask")
    rng.shuffle(kinds)
    kinds = ["ask", *kinds][:turns]
    items = []
    left = 0  # questions the current visitor has still to ask
    for i, kind in enumerate(kinds):
        gap = round(rng.uniform(0.5, 2.5), 2)
        new = False
        if kind in ("ask", "barge") and visitor_turns > 0:
            new = left == 0 and i > 0
            if left == 0:
                left = rng.randint(1, 2 * visitor_turns - 1)
            left -= 1
        if kind == "ask":
            items.append(Item(i, kind, (rng.choice(short),), gap_s=gap, new_visitor=new))
        elif kind == "barge":
            items.append(Item(i, kind, (rng.choice(long), rng.choice(short)), gap_s=gap, new_visitor=new))
        elif kind == "silence":
            items.append(Item(i, kind, seconds=round(rng.uniform(4.0, 20.0), 1), gap_s=gap))
        else:
            items.append(Item(i, kind, seconds=round(rng.uniform(1.0, 4.0), 1), noise=rng.choice(("white", "brown")),
                              gap_s=gap))
    chaos = []
    # Kills: after the first few turns, within the first ``kill_span`` of the run.
    for idx in _spread(rng, kills, min(3, turns - 1), max(4, int(turns * kill_span))):
        chaos.append(Chaos(idx, round(rng.uniform(0.0, 8.0), 2), "kill"))
    for idx in _spread(rng, broker_restarts, 1, turns):
        chaos.append(Chaos(idx, round(rng.uniform(0.0, 6.0), 2), "broker",
                           down_s=round(rng.uniform(*broker_down_s), 1)))
    return Plan(tuple(items), tuple(sorted(chaos, key=lambda c: (c.item, c.delay_s))))
