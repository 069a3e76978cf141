"""The work ``scripts/arm64-smoke`` runs inside the emulated arm64 root (and natively, as a reference).

Loads the real stages of the config through their factories and runs each once on real input:
``edge-voice check``, a transcription of a speech WAV, the wake word on a WAV, a chat turn on a
GGUF and a synthesized reply. Writes what it got as JSON (``--out``) and the reply audio as a WAV
(``--reply-wav``); judging the results is the caller's job (it compares them with a native run).

Only the standard library and edge-voice with its stage extras are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def chunks(samples: np.ndarray) -> list[Any]:
    from edge.audio.chunk import CHUNK_SAMPLES, AudioChunk

    return [AudioChunk(samples[i:i + CHUNK_SAMPLES].copy(), i) for i in range(0, len(samples), CHUNK_SAMPLES)]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("edge-voice", "numpy", "onnxruntime", "sherpa-onnx", "piper-phonemize", "llama-cpp-python"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def run_check(config: Path) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("edge-voice")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edge"]
    proc = subprocess.run([*cmd, "check", "--config", str(config)], capture_output=True, text=True, timeout=600)
    return {"rc": proc.returncode, "output": (proc.stdout + proc.stderr).strip()}


def transcribe(cfg: Any, files: dict[str, Any], audio: np.ndarray) -> str:
    from edge.stt import UpdateKind, make_recognizer

    rec = make_recognizer(cfg.stt, files["stt"], files["vad"])
    try:
        rec.start([])
        finals = [u.text for c in chunks(audio) for u in rec.accept(c) if u.kind == UpdateKind.FINAL]
        last = rec.finish()
        if last is not None and last.kind == UpdateKind.FINAL:
            finals.append(last.text)
    finally:
        rec.close()
    return " ".join(t for t in finals if t)


def wake(cfg: Any, files: dict[str, Any], audio: np.ndarray) -> list[dict[str, Any]]:
    from edge.wake import make_wake_detector

    det = make_wake_detector(cfg.wake, files["wake"])
    if det is None:
        raise SystemExit("the config has no wake word engine")
    try:
        return [{"word": h.word, "score": round(float(h.score), 4), "audio_time": round(h.audio_time, 3)}
                for c in chunks(audio) for h in det.process(c)]
    finally:
        det.close()


def chat(cfg: Any, gguf: Path, text: str) -> str:
    from edge.llm import make_chat_model
    from edge.signals import CancelScope

    model = make_chat_model(cfg.llm, gguf)
    try:
        model.warm(cfg.llm.system_prompt)
        return "".join(model.stream([], text, cancel=CancelScope()))
    finally:
        model.close()


def probe_repack(gguf: Path) -> None:
    """(In a child process of its own.) Load a Q4_0 GGUF with llama.cpp's log on stderr and run a
    token: the parent reads whether the weights were repacked for this CPU."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_threads=1, verbose=True)
    llm.eval(llm.tokenize(b"Hello", add_bos=True))
    llm.close()


def q4_0_repacked(gguf: Path) -> dict[str, Any]:
    """Whether llama.cpp repacks Q4_0 weights on this CPU (the dot-product kernels a Pi 5 needs):
    its load log names a CPU_REPACK buffer when it does."""
    proc = subprocess.run([sys.executable, __file__, "--probe-repack", str(gguf)], capture_output=True, text=True,
                          timeout=600)
    lines = [ln.strip() for ln in proc.stderr.splitlines() if "REPACK" in ln]
    return {"rc": proc.returncode, "repacked": proc.returncode == 0 and bool(lines), "log": lines[:3],
            "tail": proc.stderr.strip().splitlines()[-3:] if proc.returncode else []}


def synthesize(cfg: Any, files: dict[str, Any], text: str) -> tuple[np.ndarray, int]:
    from edge.signals import CancelScope
    from edge.tts import make_synthesizer

    synth = make_synthesizer(cfg.tts, files["tts"])
    try:
        pieces = list(synth.synthesize(text, CancelScope()))
        rate = synth.sample_rate
    finally:
        synth.close()
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)), rate


def timed(results: dict[str, Any], name: str, fn: Any, *args: Any) -> Any:
    t0 = time.monotonic()
    value = fn(*args)
    seconds = time.monotonic() - t0
    results.setdefault("seconds", {})[name] = round(seconds, 2)
    print(f"  {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="the dev config (required but for --probe-repack)")
    p.add_argument("--transcribe", type=Path, metavar="WAV",
                   help="only print the transcript of this WAV (with a half second of silence around it)")
    p.add_argument("--speech", type=Path, help="16 kHz WAV of a question")
    p.add_argument("--wake", type=Path, help="16 kHz WAV with the wake word")
    p.add_argument("--gguf", type=Path, help="chat model for the turn")
    p.add_argument("--out", type=Path, help="results as JSON")
    p.add_argument("--reply-wav", type=Path, help="where to write the synthesized reply")
    p.add_argument("--q4-gguf", type=Path, help="a tiny Q4_0 GGUF: report whether llama.cpp repacks it here")
    p.add_argument("--probe-repack", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_repack:
        probe_repack(args.probe_repack)
        return 0
    if args.config is None:
        p.error("--config is required")

    from edge.audio.wav import read_wav, write_wav
    from edge.config import load_config
    from edge.models.registry import ModelRegistry

    cfg = load_config(args.config)
    registry = ModelRegistry(cfg.models_dir)
    if args.transcribe:
        files = {role: dict(registry.resolve(cfg.model_ids()[role]).files) for role in ("stt", "vad")}
        pad = np.zeros(8000, dtype=np.int16)
        print(transcribe(cfg, files, np.concatenate([pad, read_wav(args.transcribe)[0], pad, pad])))
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("speech", "wake", "gguf", "out", "reply_wav")
               if getattr(args, n) is None]
    if missing:
        p.error("missing " + ", ".join(missing))
    results: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                               "versions": versions(), "qemu_cpu": os.environ.get("QEMU_CPU", "")}
    results["check"] = timed(results, "check", run_check, args.config)
    if results["check"]["rc"] != 0:
        args.out.write_text(json.dumps(results, indent=2))
        print(results["check"]["output"], file=sys.stderr)
        return 1
    files = {role: dict(registry.resolve(mid).files) for role, mid in cfg.model_ids().items()}

    results["transcript"] = timed(results, "stt", transcribe, cfg, files, read_wav(args.speech)[0])
    results["wake"] = timed(results, "wake", wake, cfg, files, read_wav(args.wake)[0])
    results["chat_reply"] = timed(results, "llm", chat, cfg, args.gguf, results["transcript"] or "Hello")
    if args.q4_gguf:
        results["q4_0"] = timed(results, "q4_0", q4_0_repacked, args.q4_gguf)
    audio, rate = timed(results, "tts", synthesize, cfg, files, results["chat_reply"])
    write_wav(args.reply_wav, audio, rate)
    peak = int(np.abs(audio.astype(np.int32)).max()) if len(audio) else 0
    results["tts"] = {"sample_rate": rate, "seconds": round(len(audio) / rate, 3), "peak": peak,
                      "wav": str(args.reply_wav)}
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
