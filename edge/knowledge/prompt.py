"""Grounding: the LLM's system prompt, built from a knowledge pack.

The prompt is the persona and style, the venue's facts grouped under their topics, and the
rule to answer only from them and to say the fallback line otherwise. When all facts fit
``budget_tokens`` (counted with the model's own tokenizer), the prompt is the same for every
question: its KV state is evaluated once and reused by every turn (and can be saved to disk).
When they do not fit, each question gets the ``top_k`` facts most similar to it (TF-IDF, or
sentence embeddings when an embedder is given): the prompt then changes from question to
question after the persona, so only the persona's KV is reused and the facts are evaluated
every turn. Keep packs within the budget where the latency matters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge.knowledge.matcher import Embedder, TfidfIndex
from edge.knowledge.pack import Fact, KnowledgePack

__all__ = ["DEFAULT_BUDGET_TOKENS", "GroundedPrompt", "Grounding", "render_prompt"]

DEFAULT_BUDGET_TOKENS = 1200
DEFAULT_TOP_K = 8

RULES = ("Answer the visitor's question using only the facts above. If the facts do not contain the answer, "
         "reply with exactly this sentence and nothing else: \"{fallback}\" Never guess, and never add anything "
         "that is not in the facts.")


@dataclass(frozen=True)
class GroundedPrompt:
    text: str
    facts: tuple[Fact, ...]  # the facts it holds, in pack order
    tokens: int
    complete: bool  # every fact of the pack is in it


def render_prompt(pack: KnowledgePack, facts: Sequence[Fact]) -> str:
    """The system prompt with these facts, grouped under their topics in pack order."""
    lines = [pack.persona, pack.style, "", f"Facts about {pack.name}:"]
    topic: str | None = None
    for fact in facts:
        if fact.topic != topic:
            topic = fact.topic
            if topic:
                lines.append(f"{topic}:")
        lines.append(f"- {fact.text}")
    lines += ["", RULES.format(fallback=pack.fallback)]
    return "\n".join(lines)


class Grounding:
    """Builds the system prompt of a pack for a model (``count_tokens`` is the model's).

    ``fixed`` tells whether every question gets the same prompt (all facts fit); then
    :meth:`system_prompt` may be called without a question.
    """

    def __init__(self, pack: KnowledgePack, count_tokens: Callable[[str], int], *,
                 budget_tokens: int = DEFAULT_BUDGET_TOKENS, top_k: int = DEFAULT_TOP_K,
                 embedder: Embedder | None = None) -> None:
        self.pack = pack
        self.count_tokens = count_tokens
        self.budget_tokens = budget_tokens
        self.top_k = top_k
        self.embedder = embedder
        full = render_prompt(pack, pack.facts)
        self.full_tokens = count_tokens(full)
        self.base_tokens = count_tokens(render_prompt(pack, ()))
        self.fixed = self.full_tokens <= self.base_tokens + budget_tokens
        self._full = GroundedPrompt(full, pack.facts, self.full_tokens, True)
        self._index: TfidfIndex | None = None
        self._fact_vectors: np.ndarray | None = None
        if not self.fixed:
            self._index = TfidfIndex([f.full_text for f in pack.facts])
            if embedder is not None:
                self._fact_vectors = np.stack([embedder.embed(f.full_text) for f in pack.facts])
            self._fact_tokens = [count_tokens(f"- {f.text}\n") for f in pack.facts]

    def relevant(self, question: str) -> list[int]:
        """Indices of the facts, most relevant to the question first."""
        assert self._index is not None
        sims = np.asarray(self._index.similarities(question), dtype=np.float32)
        if self._fact_vectors is not None and self.embedder is not None:
            sims = 0.5 * sims + 0.5 * (self._fact_vectors @ self.embedder.embed(question))
        return [int(i) for i in np.argsort(-sims, kind="stable")]

    def system_prompt(self, question: str | None = None) -> GroundedPrompt:
        """The prompt for this question (any question, or none, when ``fixed``)."""
        if self.fixed:
            return self._full
        if question is None:
            raise ValueError("the pack's facts exceed the token budget: the prompt depends on the question")
        chosen: list[int] = []
        used = 0
        for i in self.relevant(question):
            if len(chosen) >= self.top_k:
                break
            if used + self._fact_tokens[i] > self.budget_tokens:
                continue
            chosen.append(i)
            used += self._fact_tokens[i]
        facts = tuple(self.pack.facts[i] for i in sorted(chosen))
        text = render_prompt(self.pack, facts)
        return GroundedPrompt(text, facts, self.count_tokens(text), False)
