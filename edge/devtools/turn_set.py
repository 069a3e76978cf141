"""The pause test set for end-of-turn decisions: spoken questions with and without a pause inside.

    python -m edge.devtools.turn_set [--out DIR] [--voices piper,espeak] [--force]

Each of the 24 questions is spoken whole, once as asked without a pause and once with a pause
of 0.6-1.5 s inside the sentence: at a clause boundary, after "um", or before the last words.
A pause is made where a person would make it: the sentence is synthesized in one piece with a
comma at the pause point (so the voice keeps the rising, unfinished tone of a sentence that goes
on), the comma's short silence is found in the audio and stretched to the pause length.
Two voices: the dev Piper voice (joe, with its noise scales at 0 so that the audio is the same
on every run) and espeak-ng (en-us). Output: ``<out>/<id>.wav`` (16 kHz mono int16) and
``<out>/manifest.json`` with where the speech starts, where the pause lies and where the
question truly ends. Nothing is written into the repository; the default folder is
``<cache>/turn-set`` (``EDGE_VOICE_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, resample
from edge.errors import EdgeError

__all__ = ["QUESTIONS", "Clip", "Question", "generate", "load_set", "pause_lengths"]

LEAD_S = 0.5  # silence before the speech in each file
TAIL_S = 0.5  # silence after it (the evaluation appends its own)
LOUD = 300  # |sample| above this is speech (about -40 dBFS), as tests/speech.py's trim()
FRAME = 160  # 10 ms frames when looking for the comma's silence
QUIET_DB = 35.0  # a frame this far below the loudest frame is silent


@dataclass(frozen=True)
class Question:
    id: str
    kind: str  # clause | um | last-words
    paused: str  # as spoken with the pause: "|" marks the pause, right after a comma
    plain: str  # as spoken without a pause

    @property
    def paused_text(self) -> str:
        return self.paused.replace(" |", "").replace("|", "")

    @property
    def before_pause(self) -> str:
        return self.paused.split("|")[0].strip()


QUESTIONS: tuple[Question, ...] = (
    Question("q01", "clause", "If I buy a ticket now, | can I still get in after lunch?",
             "If I buy a ticket now, can I still get in after lunch?"),
    Question("q02", "clause", "When the museum closes, | where can I wait for the bus?",
             "When the museum closes, where can I wait for the bus?"),
    Question("q03", "clause", "Before we go upstairs, | is there a cloakroom for our coats?",
             "Before we go upstairs, is there a cloakroom for our coats?"),
    Question("q04", "clause", "My daughter uses a wheelchair, | is there a lift to the second floor?",
             "My daughter uses a wheelchair, is there a lift to the second floor?"),
    Question("q05", "clause", "I lost my phone somewhere, | who should I ask about lost property?",
             "I lost my phone somewhere, who should I ask about lost property?"),
    Question("q06", "clause", "Since it is raining today, | are the outdoor exhibits still open?",
             "Since it is raining today, are the outdoor exhibits still open?"),
    Question("q07", "clause", "If we want to eat something, | where is the nearest cafe?",
             "If we want to eat something, where is the nearest cafe?"),
    Question("q08", "clause", "After the guided tour ends, | can we go back to the gift shop?",
             "After the guided tour ends, can we go back to the gift shop?"),
    Question("q09", "um", "Can you tell me, um, | where the nearest train station is?",
             "Can you tell me where the nearest train station is?"),
    Question("q10", "um", "What time does the, um, | last guided tour start?",
             "What time does the last guided tour start?"),
    Question("q11", "um", "Is there a, um, | discount for students?",
             "Is there a discount for students?"),
    Question("q12", "um", "Where can I find the, um, | toilets on this floor?",
             "Where can I find the toilets on this floor?"),
    Question("q13", "um", "How much does it cost to, um, | park here all day?",
             "How much does it cost to park here all day?"),
    Question("q14", "um", "Do you know if the, um, | restaurant takes cards?",
             "Do you know if the restaurant takes cards?"),
    Question("q15", "um", "Which bus goes to the, um, | old harbour?",
             "Which bus goes to the old harbour?"),
    Question("q16", "um", "Could you tell me how to get to the, um, | main exhibition hall?",
             "Could you tell me how to get to the main exhibition hall?"),
    Question("q17", "last-words", "Where is the nearest, | train station?",
             "Where is the nearest train station?"),
    Question("q18", "last-words", "How long does it take to walk to the, | city centre?",
             "How long does it take to walk to the city centre?"),
    Question("q19", "last-words", "What time does the museum open on, | Sunday mornings?",
             "What time does the museum open on Sunday mornings?"),
    Question("q20", "last-words", "Is it possible to buy tickets for, | tomorrow?",
             "Is it possible to buy tickets for tomorrow?"),
    Question("q21", "last-words", "How far is it from here to the, | castle?",
             "How far is it from here to the castle?"),
    Question("q22", "last-words", "Can I bring my dog into the, | garden?",
             "Can I bring my dog into the garden?"),
    Question("q23", "last-words", "Do you sell maps of the, | old town?",
             "Do you sell maps of the old town?"),
    Question("q24", "last-words", "Where do I catch the shuttle to the, | airport?",
             "Where do I catch the shuttle to the airport?"),
)


def pause_lengths(n: int) -> list[float]:
    """``n`` pause lengths spread evenly over 0.6-1.5 s, in an order that mixes the kinds."""
    steps = [round(0.6 + 0.9 * i / max(n - 1, 1), 3) for i in range(n)]
    return [steps[(i * 7) % n] for i in range(n)] if n % 7 else steps


@dataclass(frozen=True)
class Clip:
    id: str
    question: str  # Question.id
    kind: str
    voice: str
    paused: bool
    text: str  # the words as spoken (without "um" for the plain take)
    before_pause: str  # the words before the pause ("" without one)
    pause_s: float  # silence inside the sentence (0 without a pause)
    pause_start_s: float  # where that silence begins and ends in the file (0, 0 without one)
    pause_end_s: float
    speech_start_s: float
    speech_end_s: float  # the true end of the question
    duration_s: float
    file: str


# -- voices -----------------------------------------------------------------------------------

Voice = Callable[[str], np.ndarray]


def piper_voice() -> Voice:
    """The dev Piper voice (joe) with its noise scales at 0: the same audio on every run."""
    import sherpa_onnx

    from edge.models.registry import ModelRegistry
    from edge.signals import CancelScope
    from edge.tts.phonemize import Phonemizer
    from edge.tts.sherpa import SherpaSynthesizer

    files = ModelRegistry().resolve("piper-en-us-joe-medium").files
    model_cfg = sherpa_onnx.OfflineTtsModelConfig(num_threads=1, provider="cpu")
    model_cfg.vits = sherpa_onnx.OfflineTtsVitsModelConfig(
        model=str(files["model.onnx"]), tokens=str(files["tokens.txt"]), noise_scale=0.0, noise_scale_w=0.0,
        length_scale=1.0)
    tts = sherpa_onnx.OfflineTts(sherpa_onnx.OfflineTtsConfig(model=model_cfg, max_num_sentences=1))
    synth = SherpaSynthesizer(tts, Phonemizer("en-us"), language="en")

    def speak(text: str) -> np.ndarray:
        audio = np.concatenate(list(synth.synthesize(text, CancelScope())))
        return resample(audio, synth.sample_rate, SAMPLE_RATE)

    return speak


def espeak_voice(voice: str = "en-us", rate: int = 150) -> Voice:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EdgeError("espeak-ng is not installed: apt-get install espeak-ng", code="dependency.missing")

    def speak(text: str) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "say.wav"
            subprocess.run([exe, "-v", voice, "-s", str(rate), "-w", str(path), text], check=True,
                           capture_output=True, timeout=60)
            with wave.open(str(path), "rb") as w:
                rate_in = w.getframerate()
                x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
        return resample(x, rate_in, SAMPLE_RATE)

    return speak


VOICES: dict[str, Callable[[], Voice]] = {"piper": piper_voice, "espeak": espeak_voice}


# -- audio surgery ----------------------------------------------------------------------------

def speech_span(x: np.ndarray) -> tuple[int, int]:
    """First and one-past-last sample louder than LOUD."""
    loud = np.nonzero(np.abs(x.astype(np.int32)) > LOUD)[0]
    if not len(loud):
        raise EdgeError("synthesis produced no audible speech", code="internal")
    return int(loud[0]), int(loud[-1]) + 1


def quiet_runs(x: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) sample spans of silence inside the speech, longest first."""
    a, b = speech_span(x)
    body = x[a:b].astype(np.float64)
    n = len(body) // FRAME
    rms = np.sqrt(np.mean(body[: n * FRAME].reshape(n, FRAME) ** 2, axis=1)) + 1e-9
    db = 20 * np.log10(rms)
    quiet = db < db.max() - QUIET_DB
    runs: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if quiet[i]:
            j = i
            while j < n and quiet[j]:
                j += 1
            if i > 0 and j < n:  # inside the speech, not at its edges
                runs.append((a + i * FRAME, a + j * FRAME))
            i = j
        else:
            i += 1
    return sorted(runs, key=lambda r: r[0] - r[1])


def _log_mel(x: np.ndarray) -> np.ndarray:
    """(frames, 80) log-mel frames of 10 ms, for aligning two takes."""
    from edge.turn.features import mel_filterbank

    f = x.astype(np.float64) / 32768.0
    n = max((len(f) - 400) // FRAME + 1, 1)
    f = np.pad(f, (0, max(0, 400 - len(f))))
    frames = np.lib.stride_tricks.sliding_window_view(f, 400)[::FRAME][:n] * np.hanning(400)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    mel = np.log10(np.maximum(power @ mel_filterbank().T, 1e-10))
    return mel - mel.mean(axis=1, keepdims=True)


def part_end(part: np.ndarray, whole: np.ndarray) -> int:
    """Where the words of ``part`` (spoken alone) end inside ``whole``: subsequence dynamic time
    warping of their log-mel frames, both starting at their first loud sample, open at the end."""
    a0, a1 = speech_span(part)
    b0, b1 = speech_span(whole)
    p, w = _log_mel(part[a0:a1]), _log_mel(whole[b0:b1])
    cost = np.sqrt(((p[:, None, :] - w[None, :, :]) ** 2).sum(axis=2))  # (len p, len w)
    inf = np.inf
    d = np.full(w.shape[0], inf)
    d[0] = cost[0, 0]
    for i in range(1, p.shape[0]):
        prev = d
        shifted1 = np.concatenate([[inf], prev[:-1]])
        shifted2 = np.concatenate([[inf, inf], prev[:-2]])
        d = cost[i] + np.minimum(np.minimum(prev, shifted1), shifted2)
    return b0 + (int(np.argmin(d)) + 1) * FRAME


def insert_pause(x: np.ndarray, text: str, pause_s: float, first_part: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Stretch the silence of the comma that the "|" in ``text`` follows to ``pause_s``.

    ``first_part`` is the words before the "|" spoken alone: the comma's silence is the quiet
    run inside ``x`` that starts nearest to where those words end in ``x`` (:func:`part_end`).
    Returns the new audio and the pause's (start, end) samples.
    """
    if not text.split("|")[0].rstrip().endswith(","):
        raise EdgeError(f"{text!r}: the pause must follow a comma", code="internal")
    expect = part_end(first_part, x)
    runs = quiet_runs(x)
    if not runs:
        raise EdgeError(f"{text!r}: no silence for the comma in the synthesized audio", code="internal")
    # Piper's comma silences are short (10-80 ms): any quiet run will do; the nearest wins.
    start, end = min(runs, key=lambda r: (abs(r[0] - expect) // (2 * FRAME), r[0] - r[1]))
    total = int(round(pause_s * SAMPLE_RATE))
    extra = max(total - (end - start), 0)
    mid = (start + end) // 2
    out = np.concatenate([x[:mid], np.zeros(extra, dtype=np.int16), x[mid:]])
    # The pause as heard: from the last loud sample before the gap to the first after it.
    loud = np.abs(out.astype(np.int32)) > LOUD
    before = np.nonzero(loud[:mid])[0]
    after = np.nonzero(loud[mid + extra:])[0]
    return out, int(before[-1]) + 1, mid + extra + int(after[0])


def _write_wav(path: Path, x: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.asarray(x, dtype="<i2").tobytes())


def read_clip(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


def make_clip(q: Question, voice_name: str, speak: Voice, paused: bool, pause_s: float, out: Path) -> Clip:
    text = q.paused_text if paused else q.plain
    x = speak(text)
    a, b = speech_span(x)
    x = x[a:b]
    p0 = p1 = 0
    if paused:
        x, p0, p1 = insert_pause(x, q.paused, pause_s, speak(q.before_pause))
    lead, tail = int(LEAD_S * SAMPLE_RATE), int(TAIL_S * SAMPLE_RATE)
    x = np.concatenate([np.zeros(lead, np.int16), x, np.zeros(tail, np.int16)])
    clip_id = f"{q.id}-{voice_name}-{'paused' if paused else 'plain'}"
    _write_wav(out / f"{clip_id}.wav", x)
    s = SAMPLE_RATE
    return Clip(clip_id, q.id, q.kind, voice_name, paused, text, q.before_pause if paused else "",
                round((p1 - p0) / s, 3) if paused else 0.0, round((lead + p0) / s, 3) if paused else 0.0,
                round((lead + p1) / s, 3) if paused else 0.0, round(lead / s, 3),
                round((len(x) - tail) / s, 3), round(len(x) / s, 3), f"{clip_id}.wav")


def default_dir() -> Path:
    from edge.paths import cache_dir

    return cache_dir() / "turn-set"


def generate(out: Path, voices: Sequence[str] = ("piper", "espeak"),
             questions: Sequence[Question] = QUESTIONS, *, force: bool = False,
             say: Callable[[str], None] = print) -> list[Clip]:
    """Write the set into ``out`` (skipped when its manifest already lists these clips)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.json"
    want = [f"{q.id}-{v}-{k}" for v in voices for q in questions for k in ("paused", "plain")]
    if manifest.exists() and not force:
        have = load_set(out)
        if sorted(c.id for c in have) == sorted(want) and all((out / c.file).exists() for c in have):
            say(f"turn set: {len(have)} clips already in {out}")
            return have
    pauses = pause_lengths(len(questions))
    clips: list[Clip] = []
    for v in voices:
        if v not in VOICES:
            raise EdgeError(f"unknown voice {v!r}: use {', '.join(VOICES)}", code="config.invalid")
        speak = VOICES[v]()
        for q, pause in zip(questions, pauses):
            for paused in (True, False):
                clips.append(make_clip(q, v, speak, paused, pause, out))
        say(f"turn set: {v}: {2 * len(questions)} clips")
    manifest.write_text(json.dumps([asdict(c) for c in clips], indent=1) + "\n", encoding="utf-8")
    say(f"turn set: {len(clips)} clips in {out}")
    return clips


def load_set(folder: Path) -> list[Clip]:
    data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return [Clip(**d) for d in data]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder (default: <cache>/turn-set)")
    ap.add_argument("--voices", default="piper,espeak")
    ap.add_argument("--force", action="store_true", help="write the set again even if it is there")
    args = ap.parse_args(argv)
    try:
        clips = generate(args.out or default_dir(), [v for v in args.voices.split(",") if v], force=args.force)
    except EdgeError as err:
        print(f"turn_set: error: {err}", file=sys.stderr)
        return 1
    for c in clips:
        if c.paused:
            print(f"{c.id:28s} pause {c.pause_s:4.2f} s at {c.pause_start_s:5.2f}-{c.pause_end_s:5.2f}, "
                  f"ends {c.speech_end_s:5.2f} s: {c.before_pause!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
