"""The self-test a new version must pass before it serves visitors: a canned turn, no microphone,
no speaker, on the fresh stages a rollout loaded.

The voice says ``rollout.selftest_text``; speech-to-text must hear it (word error rate at most
``selftest_max_wer``); the LLM, when it is new, answers the transcript and the voice says the
answer; a new wake model and FAQ embedder must run; a new venue must answer its own FAQ
questions. Silence, a transcript that is not the sentence, an empty answer, any error, or a
total over ``selftest_max_ms`` fail it. Each step's time is kept for the fleet.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, resample
from edge.config import RolloutConfig
from edge.signals import CancelScope

_LOGGER = logging.getLogger(__name__)

SILENCE_DBFS = -50.0  # quieter than this is no voice at all
MIN_SPEECH_S = 0.3
MAX_REPLY_TOKENS = 24
MAX_FAQ_CHECKS = 5
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's length (1.0 when nothing matches)."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


def level_dbfs(samples: np.ndarray) -> float:
    if not len(samples):
        return -math.inf
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    return 20 * math.log10(rms / 32768.0) if rms > 0 else -math.inf


class SelfTestFailed(Exception):
    """One check failed; its message says which and why."""


@dataclass
class SelfTestResult:
    ok: bool = True
    reason: str = ""
    ms: float = 0.0
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason or None, "ms": round(self.ms, 1), "checks": self.checks}


def _speak(synth: Any, text: str) -> np.ndarray:
    pieces = list(synth.synthesize(text, CancelScope()))
    return np.concatenate(pieces).astype(np.int16) if pieces else np.zeros(0, dtype=np.int16)


def run_self_test(candidate: Any, cfg: RolloutConfig, *, system: str | None = None) -> SelfTestResult:
    """Run the checks ``candidate`` has stages for (``synth``, ``recognizer``, ``chat``, ``wake``,
    ``embedder`` attributes, each None when not new; ``venue``: the venue built on them, or None).
    ``system``: the LLM's system prompt for the question when it is not the warmed one."""
    result = SelfTestResult()
    t_start = time.monotonic()

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.monotonic()
        try:
            info = fn()
        except SelfTestFailed as err:
            result.checks[name] = {"ok": False, "ms": round(1000 * (time.monotonic() - t0), 1), "error": str(err)}
            raise
        except Exception as err:
            _LOGGER.exception("self-test step %s failed", name)
            result.checks[name] = {"ok": False, "ms": round(1000 * (time.monotonic() - t0), 1),
                                   "error": f"{type(err).__name__}: {str(err)[:200]}"}
            raise SelfTestFailed(f"{name}: {type(err).__name__}: {str(err)[:200]}") from err
        result.checks[name] = {"ok": True, "ms": round(1000 * (time.monotonic() - t0), 1), **info}

    text = cfg.selftest_text
    state: dict[str, Any] = {"heard": text, "audio": None}
    synth, recognizer, chat = candidate.synth, candidate.recognizer, candidate.chat

    def tts() -> dict[str, Any]:
        audio = _speak(synth, text)
        seconds = len(audio) / synth.sample_rate
        level = level_dbfs(audio)
        if seconds < MIN_SPEECH_S or level < SILENCE_DBFS:
            raise SelfTestFailed(f"tts: the voice produced no speech for {text!r} ({seconds:.2f} s at "
                                 f"{level:.0f} dBFS)")
        state["audio"] = resample(audio, synth.sample_rate, SAMPLE_RATE)
        return {"audio_s": round(seconds, 2), "dbfs": round(level, 1)}

    def stt() -> dict[str, Any]:
        heard, _ = recognizer.transcribe(state["audio"])
        wer = word_error_rate(text, heard)
        if wer > cfg.selftest_max_wer:
            raise SelfTestFailed(f"stt: heard {heard[:120]!r} for {text!r} (word error rate {wer:.2f}, over "
                                 f"{cfg.selftest_max_wer:g})")
        state["heard"] = heard
        return {"text": heard[:200], "wer": round(wer, 3)}

    def llm() -> dict[str, Any]:
        from edge.signals import Flag

        reply = "".join(chat.stream([], state["heard"], cancel=Flag(), max_tokens=MAX_REPLY_TOKENS,
                                    system=system)).strip()
        if not words(reply):
            raise SelfTestFailed(f"llm: no answer to {state['heard'][:120]!r}")
        state["reply"] = reply
        return {"reply": reply[:200], "tokens": getattr(chat.last_stats, "generated_tokens", None)}

    def tts_reply() -> dict[str, Any]:
        audio = _speak(synth, state["reply"])
        level = level_dbfs(audio)
        if not len(audio) or level < SILENCE_DBFS:
            raise SelfTestFailed(f"tts: the voice produced no speech for the answer {state['reply'][:80]!r}")
        return {"audio_s": round(len(audio) / synth.sample_rate, 2)}

    def wake() -> dict[str, Any]:
        detector = candidate.wake
        audio = state["audio"] if state["audio"] is not None else np.zeros(SAMPLE_RATE, dtype=np.int16)
        hits = 0
        for i in range(0, len(audio) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
            hits += len(detector.process(AudioChunk(audio[i:i + CHUNK_SAMPLES], start=i)))
        detector.reset()
        return {"hits": hits}

    def embed() -> dict[str, Any]:
        vector = np.asarray(candidate.embedder.embed(text), dtype=np.float64)
        norm = float(np.linalg.norm(vector))
        if not np.all(np.isfinite(vector)) or norm == 0.0:
            raise SelfTestFailed("faq: the embedding model gives no usable vector")
        return {"dim": int(vector.shape[-1])}

    def venue() -> dict[str, Any]:
        v = candidate.venue
        checked = 0
        if v.matcher is not None:
            for entry in v.pack.faq[:MAX_FAQ_CHECKS]:
                got = v.ready_answer(entry.questions[0])
                if got is None or got.entry_id != entry.id:
                    raise SelfTestFailed(f"venue: the FAQ question {entry.questions[0][:80]!r} does not find its own "
                                         f"entry {entry.id!r} (found {got.entry_id if got else 'nothing'})")
                checked += 1
        return {"pack": v.pack.id, "pack_version": v.pack.version, "faq_checked": checked}

    try:
        if synth is not None and recognizer is not None:
            step("tts", tts)
            step("stt", stt)
        if chat is not None:
            step("llm", llm)
            if synth is not None:
                step("tts_reply", tts_reply)
        if candidate.wake is not None:
            step("wake", wake)
        if candidate.embedder is not None:
            step("faq", embed)
        if candidate.venue is not None:
            step("venue", venue)
        result.ms = 1000 * (time.monotonic() - t_start)
        if result.ms > cfg.selftest_max_ms:
            raise SelfTestFailed(f"took {result.ms:.0f} ms, over this device's rollout.selftest_max_ms "
                                 f"({cfg.selftest_max_ms} ms)")
    except SelfTestFailed as err:
        result.ok = False
        result.reason = str(err)
    result.ms = 1000 * (time.monotonic() - t_start)
    return result
