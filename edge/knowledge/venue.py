"""A venue's knowledge as the conversation uses it: FAQ answers ready to play, and the LLM's prompt.

:class:`Venue` answers two questions: does this question ask an FAQ entry (then the entry's
answer is spoken from audio synthesized ahead of time, without the LLM), and what system prompt
does the LLM get for it. FAQ answers are synthesized once per voice and answer text and kept on
disk (:class:`AnswerAudio`): a restart, or another pack with the same answer, reads them back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.knowledge.matcher import Embedder, FaqMatcher
from edge.knowledge.pack import KnowledgePack
from edge.knowledge.prompt import DEFAULT_BUDGET_TOKENS, Grounding, render_prompt

_LOGGER = logging.getLogger(__name__)

# Renders a text to int16 mono audio at the voice's rate (the pipeline's synthesizer).
Speak = Callable[[str], np.ndarray]


# Below this, no fact, FAQ phrasing or answer of the pack is about the question (the best cosine of
# all-MiniLM-L6-v2 embeddings): the fallback line is said without asking the LLM, which small models
# do not say reliably. On the sample venue's 68 questions the lowest answerable one scores 0.40 and
# 3 of the 18 it cannot answer score below 0.35 (the weather, a drone, the capital of France).
OFF_TOPIC_BELOW = 0.36
FALLBACK_ID = "fallback"


@dataclass(frozen=True)
class FaqAnswer:
    """A ready answer: an FAQ entry's, or the fallback line for a question the pack is not about."""

    entry_id: str  # the FAQ entry, or FALLBACK_ID
    text: str
    audio: np.ndarray | None = field(default=None, compare=False)  # int16 at the voice's rate; None: synthesize

    @property
    def path(self) -> str:
        return "fallback" if self.entry_id == FALLBACK_ID else "faq"


class AnswerAudio:
    """Answers synthesized once and kept as ``<dir>/<sha256(voice, text)>.npy``."""

    def __init__(self, directory: Path, voice: str, speak: Speak) -> None:
        self.dir = directory
        self.voice = voice
        self.speak = speak

    def path(self, text: str) -> Path:
        key = hashlib.sha256(f"{self.voice}\0{text}".encode()).hexdigest()[:32]
        return self.dir / f"{key}.npy"

    def get(self, text: str) -> np.ndarray:
        path = self.path(text)
        try:
            audio = np.load(path, allow_pickle=False)
            if audio.dtype == np.int16 and audio.ndim == 1 and len(audio):
                return audio
        except (OSError, ValueError):
            pass
        audio = np.asarray(self.speak(text), dtype=np.int16)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            np.save(tmp, audio, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            _LOGGER.warning("cannot keep the answer audio in %s: %s", self.dir, err)
        return audio


class Venue:
    def __init__(self, pack: KnowledgePack, *, matcher: FaqMatcher | None, grounding: Grounding | None,
                 answers: dict[str, np.ndarray] | None = None, embedder: Embedder | None = None) -> None:
        self.pack = pack
        self.matcher = matcher
        self.grounding = grounding
        self._answers = answers or {}
        self._embedder = embedder
        self._topics: np.ndarray | None = None  # embeddings of everything the pack says
        if embedder is not None:
            texts = [f.full_text for f in pack.facts] + [q for e in pack.faq for q in e.questions]
            texts += [e.answer for e in pack.faq]
            self._topics = np.stack([embedder.embed(t) for t in texts]) if texts else None

    @property
    def status(self) -> dict[str, str]:
        """What the fleet is told: which pack, which version, which content."""
        return {"id": self.pack.id, "version": self.pack.version, "hash": self.pack.content_hash}

    def ready_answer(self, question: str) -> FaqAnswer | None:
        """The FAQ entry this question asks, or the fallback line when nothing in the pack is about
        it, with its audio; None: the LLM answers from the facts."""
        if self.matcher is not None:
            match = self.matcher.match(question)
            if match is not None:
                entry = match.entry
                return FaqAnswer(entry.id, entry.answer, self._answers.get(entry.id))
        if self.off_topic(question):
            return FaqAnswer(FALLBACK_ID, self.pack.fallback, self._answers.get(FALLBACK_ID))
        return None

    def off_topic(self, question: str) -> bool:
        if self._topics is None or self._embedder is None or not question.strip():
            return False
        return float(np.max(self._topics @ self._embedder.embed(question))) < OFF_TOPIC_BELOW

    @property
    def fixed_prompt(self) -> str | None:
        """The one system prompt for every question, when the facts fit the budget; else None."""
        if self.grounding is None or not self.grounding.fixed:
            return None
        return self.grounding.system_prompt().text

    def base_prompt(self) -> str:
        """What the LLM is warmed with: the fixed prompt, or the persona and rules alone."""
        if self.grounding is None:
            return ""
        fixed = self.fixed_prompt
        return fixed if fixed is not None else render_prompt(self.pack, ())

    def system_prompt(self, question: str) -> str | None:
        """The prompt for this question; None when it is the fixed one the LLM was warmed with."""
        if self.grounding is None or self.grounding.fixed:
            return None
        return self.grounding.system_prompt(question).text


def build_venue(pack: KnowledgePack, *, faq: bool, embedder: Embedder | None,
                count_tokens: Callable[[str], int] | None, budget_tokens: int = DEFAULT_BUDGET_TOKENS,
                answer_audio: AnswerAudio | None = None) -> Venue:
    """The FAQ matcher (when ``faq``), the grounding for the LLM (when it can count tokens), and
    every FAQ answer's audio (when there is a voice)."""
    t0 = time.monotonic()
    matcher = FaqMatcher(pack, embedder) if faq and pack.faq else None
    grounding = Grounding(pack, count_tokens, budget_tokens=budget_tokens, embedder=embedder) \
        if count_tokens is not None else None
    answers: dict[str, np.ndarray] = {}
    if answer_audio is not None:
        answers[FALLBACK_ID] = answer_audio.get(pack.fallback)
        if matcher is not None:
            for entry in pack.faq:
                answers[entry.id] = answer_audio.get(entry.answer)
    _LOGGER.info("venue %s ready in %.2f s: %d facts%s, %d FAQ answers%s", pack.label, time.monotonic() - t0,
                 len(pack.facts), "" if grounding is None else (
                     f" ({grounding.full_tokens} prompt tokens, {'all' if grounding.fixed else 'retrieved'})"),
                 len(pack.faq) if matcher is not None else 0, " with audio" if answers else "")
    return Venue(pack, matcher=matcher, grounding=grounding, answers=answers, embedder=embedder)
