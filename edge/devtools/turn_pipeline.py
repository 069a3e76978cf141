"""The pause set through the whole pipeline: cut-offs and first audio, with and without the
end-of-turn views.

    python -m edge.devtools.turn_pipeline [--config config/dev.toml] [--voices piper] [--questions 12]
                                          [--set DIR] [--json OUT]

Each clip of :mod:`edge.devtools.turn_set` is spoken after "Hey Jarvis." in the config's own voice
and run through ``simulate`` in real time (the views race the endpoint as they would live), once
with ``[turn]`` as configured and once with the fixed silence alone (``turn.enabled = false``). A
turn is cut off when its final transcript came before the true end of the question; first audio is
``end_of_speech_to_first_audio`` measured from the true end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.audio.chunk import SAMPLE_RATE, resample
from edge.audio.wav import read_wav, write_wav
from edge.config import Config, load_config
from edge.devtools.turn_set import Clip, default_dir, generate
from edge.errors import EdgeError

LEAD_S = 0.5
GAP_S = 0.4  # after the wake word
TAIL_S = 2.5  # silence after the clip: the longest end-of-turn wait, and some


def run_clip(cfg: Config, stages: Any, wake: np.ndarray, clip: Clip, folder: Path, work: Path) -> dict[str, Any]:
    from edge.simulate import simulate

    audio, _ = read_wav(folder / clip.file)
    lead, gap = np.zeros(int(LEAD_S * SAMPLE_RATE), np.int16), np.zeros(int(GAP_S * SAMPLE_RATE), np.int16)
    offset = (len(lead) + len(wake) + len(gap)) / SAMPLE_RATE
    wav = work / "clip.wav"
    write_wav(wav, np.concatenate([lead, wake, gap, audio, np.zeros(int(TAIL_S * SAMPLE_RATE), np.int16)]),
              SAMPLE_RATE)
    ev = [e.as_dict() for e in simulate(cfg, wav, None, realtime=True, stages=stages).events]
    finals = [e for e in ev if e["type"] == "transcript.final"]
    ends = [e for e in ev if e["type"] == "turn.end" and e.get("outcome") == "done"]
    speech_end = offset + clip.speech_end_s
    row: dict[str, Any] = {"id": clip.id, "paused": clip.paused, "turns": len(finals)}
    if finals:
        f = finals[0]
        # The final transcript came before the end of the question: the turn was cut.
        row["cut"] = f["audio_time"] < speech_end - 0.05
        row["heard"] = f["text"]
        row["end_of_turn"] = f.get("end_of_turn")
    if ends:
        timings = ends[0]["timings_ms"]
        row["first_audio_ms"] = timings.get("end_of_speech_to_first_audio")
        row["endpoint_delay_ms"] = timings.get("endpoint_delay")
    return row


def evaluate(cfg: Config, clips: Sequence[Clip], folder: Path, log: Any = sys.stderr) -> list[dict[str, Any]]:
    from edge.app import load_stages
    from edge.cpu import CpuPolicy
    from edge.signals import CancelScope

    stages = load_stages(cfg, CpuPolicy(share=cfg.llm.share_cores))
    try:
        synth = stages.synth
        if synth is None:
            raise EdgeError("turn_pipeline needs a voice (tts.model) to say the wake word", code="usage")
        wake = resample(np.concatenate(list(synth.synthesize("Hey Jarvis.", CancelScope()))), synth.sample_rate,
                        SAMPLE_RATE)
        rows = []
        with tempfile.TemporaryDirectory(prefix="edge-turn-") as tmp:
            for i, clip in enumerate(clips):
                row = run_clip(cfg, stages, wake, clip, folder, Path(tmp))
                rows.append(row)
                print(f"  [{i + 1}/{len(clips)}] {clip.id}: {row.get('heard')!r} cut={row.get('cut')} "
                      f"first audio {row.get('first_audio_ms')} ms", file=log, flush=True)
        return rows
    finally:
        stages.close()


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def p50(vals: list[float]) -> float | None:
        return round(float(np.percentile(vals, 50)), 1) if vals else None

    fa = [r["first_audio_ms"] for r in rows if r.get("first_audio_ms") is not None and not r.get("cut")]
    return {"clips": len(rows), "cut_offs": sum(bool(r.get("cut")) for r in rows),
            "cut_offs_paused": sum(bool(r.get("cut")) for r in rows if r["paused"]),
            "paused": sum(r["paused"] for r in rows),
            "first_audio_p50_ms": p50(fa), "first_audio_p90_ms": round(float(np.percentile(fa, 90)), 1) if fa else None,
            "first_audio_p50_plain_ms": p50([r["first_audio_ms"] for r in rows
                                             if not r["paused"] and r.get("first_audio_ms") is not None
                                             and not r.get("cut")])}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--config", default="config/dev.toml")
    ap.add_argument("--set", type=Path, default=None, help="the pause set (default: <cache>/turn-set)")
    ap.add_argument("--voices", default="piper")
    ap.add_argument("--questions", type=int, default=24, help="the first N questions of the set")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        folder = args.set or default_dir()
        voices = [v for v in args.voices.split(",") if v]
        clips = generate(folder, voices, say=lambda m: print(m, file=sys.stderr))
        keep = {f"q{i + 1:02d}" for i in range(args.questions)}
        clips = [c for c in clips if c.question in keep and c.voice in voices]
        cfg = load_config(args.config)
        results: dict[str, dict[str, Any]] = {}
        for label, turn in (("views", cfg.turn), ("fixed silence", dataclasses.replace(cfg.turn, enabled=False))):
            print(f"{label}:", file=sys.stderr)
            rows = evaluate(dataclasses.replace(cfg, turn=turn), clips, folder)
            results[label] = {"summary": summary(rows), "rows": rows}
    except EdgeError as err:
        print(f"turn_pipeline: error: {err}", file=sys.stderr)
        return 1
    for label, r in results.items():
        s = r["summary"]
        print(f"{label:14} cut-offs {s['cut_offs']}/{s['clips']} ({s['cut_offs_paused']}/{s['paused']} paused); "
              f"first audio p50 {s['first_audio_p50_ms']} ms, p90 {s['first_audio_p90_ms']} ms "
              f"(questions without a pause: p50 {s['first_audio_p50_plain_ms']} ms)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
