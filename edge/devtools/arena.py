"""How the speech models' memory grows with what they are given: anonymous RSS after each call.

    python -m edge.devtools.arena [--config config/dev.toml] [--stt 60] [--tts 30] [--seed 1]

The recognizer transcribes ``--stt`` utterances of the device's own voice, each of a random
length up to ``stt.max_utterance_s``; then the synthesizer speaks ``--tts`` clauses of random
length up to the 24 words a reply's clause can have. After each call the process's anonymous
RSS is printed, and at the end where it stopped growing and what the first call of the longest
length left it at. This is what the soak's RSS rule meets: onnxruntime keeps the buffers of its
sessions in an arena that grows to fit and is not given back (``malloc_trim`` returns nothing
from it), and how far it grows depends on the order of the lengths it has met, not only on the
longest one. sherpa-onnx creates these sessions and does not expose their arena options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, resample
from edge.devtools.soak_proc import proc_stats

__all__ = ["anon_mb", "main"]

CLAUSE_WORDS = 24  # the longest clause a reply can have (the responder cuts run-on text there)
WORDS = ("the harbour museum is open every day from nine until five and a ticket costs twelve euros "
         "for adults while children under twelve visit free and the cafe on the first floor serves lunch").split()


def anon_mb() -> float:
    """This process's anonymous resident memory, in MB (0.0 where /proc is not there)."""
    stats = proc_stats(os.getpid())  # the soak's reader of /proc/PID/status
    return stats[1] / 1024 if stats is not None else 0.0


def _series(name: str, lengths: Sequence[float], call: Callable[[float], object], unit: str) -> list[float]:
    before = anon_mb()
    seen: list[float] = []
    line: list[str] = []
    for i, n in enumerate(lengths, 1):
        call(n)
        seen.append(anon_mb())
        line.append(f"{n:.0f}{unit}:{seen[-1]:.0f}")
        if i % 10 == 0 or i == len(lengths):
            print(f"  {name} " + " ".join(line), flush=True)
            line = []
    last_step = max((i for i in range(1, len(seen)) if seen[i] - seen[i - 1] > 1.0), default=0)
    longest = max(range(len(lengths)), key=lambda i: (lengths[i], -i))
    print(f"{name}: {before:.0f} MB before, {seen[longest]:.0f} MB after the first of the longest "
          f"({lengths[longest]:.0f}{unit}, call {longest + 1}), {seen[-1]:.0f} MB at the end; "
          f"last growth over 1 MB at call {last_step + 1} of {len(seen)}")
    return seen


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--config", type=Path, default=Path("config/dev.toml"))
    ap.add_argument("--stt", type=int, default=60, help="utterances to transcribe")
    ap.add_argument("--tts", type=int, default=30, help="clauses to speak")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.stt < 0 or args.tts < 0:
        print("edge.devtools.arena: --stt and --tts are counts: give 0 or more", file=sys.stderr)
        return 2

    from edge.config import load_config
    from edge.errors import EdgeError
    from edge.models.registry import ModelRegistry
    from edge.signals import CancelScope
    from edge.stt import make_recognizer
    from edge.tts import make_synthesizer

    try:
        cfg = load_config(args.config)
        reg = ModelRegistry()
        synth = make_synthesizer(cfg.tts, dict(reg.resolve(cfg.tts.model).files))
        rec = make_recognizer(cfg.stt, reg.resolve(cfg.stt.model).files,
                              reg.resolve(cfg.stt.vad_model).files if cfg.stt.vad_model else None) if args.stt else None
    except EdgeError as e:
        print(f"edge.devtools.arena: {e}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)

    def speak(words: int) -> np.ndarray:
        text = " ".join((WORDS * 4)[:words]) + "."
        audio = np.concatenate(list(synth.synthesize(text, CancelScope())))
        return np.asarray(audio)

    print(f"start: {anon_mb():.0f} MB anonymous (models loaded)")
    if rec is not None:
        voice = resample(speak(CLAUSE_WORDS), synth.sample_rate, SAMPLE_RATE)
        top = cfg.stt.max_utterance_s
        lengths = [float(x) for x in rng.uniform(1.0, top, args.stt)]
        _series("stt", lengths, lambda s: rec.transcribe(np.resize(voice, int(SAMPLE_RATE * s))), "s")
    if args.tts:
        counts = [float(x) for x in rng.integers(2, CLAUSE_WORDS + 1, args.tts)]
        _series("tts", counts, lambda n: speak(int(n)), "w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
