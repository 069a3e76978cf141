"""The FAQ fast path's matcher: does this question ask an FAQ entry, and which one?

A false FAQ answer to a question it does not cover is worse than a miss (a miss goes to the
LLM, which answers from the facts), so the matcher favours precision. The method and its
settings were chosen by measurement on ``tests/data/faq_paraphrases.toml`` (the comparison is
in the README's "Knowledge packs"; ``python -m edge.devtools.faq_eval`` repeats it):

1. **Similarity**: for each entry, ``w * embedding + (1 - w) * lexical``, where *embedding* is
   the best cosine of the question's all-MiniLM-L6-v2 embedding with the entry's phrasings and
   *lexical* the best TF-IDF cosine over stemmed content words with its phrasings and answer.
   The best entry must reach ``threshold`` and lead the runner-up by ``margin``.
2. **Fact gate**: a near miss ("where can I park my *bicycle*?" against "where can I park my
   car?") is usually answered by a fact that the entry's answer does not contain ("bicycle
   racks are beside the café terrace"). When such a fact is more similar to the question than
   the entry's answer is, by more than ``fact_gate``, the question is left to the LLM. The facts
   an answer contains are those whose similarity with it is at least ``COVER``.

Without the embedding model the same rules run on TF-IDF alone, with their own settings.
A question is scored in 2-6 ms on one core (one embedding, a few small matrix products).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge.knowledge.pack import Fact, FaqEntry, KnowledgePack
from edge.knowledge.text import terms, words

__all__ = ["EntryScore", "FaqMatch", "FaqMatcher", "MatcherSettings", "TfidfIndex", "EMBEDDING_SETTINGS",
           "LEXICAL_SETTINGS"]


@dataclass(frozen=True)
class MatcherSettings:
    embedding_weight: float  # w above; 0 without an embedder
    threshold: float
    margin: float
    fact_gate: float  # reject when (best uncovered fact - answer) similarity exceeds this
    cover: float  # an answer contains a fact when their similarity is at least this


# Chosen on tests/data/faq_paraphrases.toml: the best recall with precision >= 0.97, in a region
# where the neighbouring settings do about as well (see the README's table).
EMBEDDING_SETTINGS = MatcherSettings(embedding_weight=0.6, threshold=0.50, margin=0.15, fact_gate=0.05, cover=0.6)
LEXICAL_SETTINGS = MatcherSettings(embedding_weight=0.0, threshold=0.60, margin=0.05, fact_gate=0.15, cover=0.5)


class Embedder(Protocol):
    dim: int

    def embed(self, text: str) -> np.ndarray: ...


class TfidfIndex:
    """TF-IDF cosine similarity of a text with each of a list of documents.

    Terms are :func:`~edge.knowledge.text.terms` (stemmed content words). A question's terms
    that no document has count with the highest IDF, so an unknown word ("bicycle" in "where
    can I park my bicycle") lowers the similarity instead of being ignored.
    """

    def __init__(self, documents: Sequence[str]) -> None:
        vocab: set[str] = set()
        for d in documents:
            vocab.update(terms(d))
        self.vocab = frozenset(vocab)  # compounds are joined against it, in documents and queries
        docs = [Counter(terms(d, keep=self.vocab)) for d in documents]
        n = len(docs)
        df: Counter[str] = Counter()
        for doc in docs:
            df.update(doc.keys())
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        self.unknown_idf = math.log(1 + n) + 1.0
        self.vectors = [self.vector(doc) for doc in docs]

    def vector(self, counts: Counter[str]) -> dict[str, float]:
        vec = {t: (1.0 + math.log(c)) * self.idf.get(t, self.unknown_idf) for t, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm else {}

    def query(self, text: str) -> dict[str, float]:
        return self.vector(Counter(terms(text, keep=self.vocab)))

    def similarities(self, text: str) -> list[float]:
        q = self.query(text)
        return [sum(w * d.get(t, 0.0) for t, w in q.items()) for d in self.vectors]

    def pairwise(self, i: int, j: int) -> float:
        a, b = self.vectors[i], self.vectors[j]
        return sum(w * b.get(t, 0.0) for t, w in a.items())


@dataclass(frozen=True)
class EntryScore:
    """How a question relates to one FAQ entry."""

    entry_id: str
    lexical: float  # best TF-IDF cosine with the entry's phrasings and answer
    embedding: float  # best embedding cosine with its phrasings (0 without an embedder)
    fact_advantage: float  # best uncovered fact's similarity minus the answer's

    def combined(self, weight: float) -> float:
        return weight * self.embedding + (1.0 - weight) * self.lexical


@dataclass(frozen=True)
class FaqMatch:
    entry: FaqEntry
    score: float  # the combined score
    margin: float  # its lead over the runner-up entry
    elapsed_ms: float


def decide(scores: Sequence[EntryScore], s: MatcherSettings) -> tuple[str, float, float] | None:
    """(entry id, score, margin) of the entry the settings accept, or None."""
    if not scores:
        return None
    ranked = sorted(scores, key=lambda e: -e.combined(s.embedding_weight))
    best = ranked[0]
    score = best.combined(s.embedding_weight)
    lead = score - (ranked[1].combined(s.embedding_weight) if len(ranked) > 1 else 0.0)
    if score < s.threshold or lead < s.margin or best.fact_advantage > s.fact_gate:
        return None
    return best.entry_id, score, lead


class FaqMatcher:
    """``match(question)`` -> the FAQ entry it asks, or None. Built once per pack (the
    phrasings, answers and facts are embedded here: about 0.5 s for the sample pack)."""

    def __init__(self, pack: KnowledgePack, embedder: Embedder | None = None, *,
                 settings: MatcherSettings | None = None) -> None:
        self.entries = {e.id: e for e in pack.faq}
        self.embedder = embedder
        self.settings = settings or (EMBEDDING_SETTINGS if embedder is not None else LEXICAL_SETTINGS)
        faq = list(pack.faq)
        # Lexical similarity: phrasings and answers of every entry.
        docs, self._lex_owner = [], []
        for e in faq:
            for q in e.questions:
                docs.append(q)
                self._lex_owner.append(e.id)
            docs.append(e.answer)
            self._lex_owner.append(e.id)
        self._lex = TfidfIndex(docs)
        self._answer_row = {e.id: i for i, e in enumerate(faq)}
        self._facts: tuple[Fact, ...] = pack.facts
        if embedder is not None:
            self._phr_owner = [e.id for e in faq for _ in e.questions]
            self._phr = self._embed([q for e in faq for q in e.questions], embedder.dim)
            self._ans = self._embed([e.answer for e in faq], embedder.dim)
            self._fact = self._embed([f.full_text for f in pack.facts], embedder.dim)
            cover = self._ans @ self._fact.T if len(self._fact) else np.zeros((len(faq), 0))
        else:
            # The fact gate on TF-IDF: answers and facts in one index.
            self._gate = TfidfIndex([e.answer for e in faq] + [f.full_text for f in pack.facts])
            n = len(faq)
            cover = np.array([[self._gate.pairwise(i, n + j) for j in range(len(pack.facts))] for i in range(n)],
                             dtype=np.float32).reshape(n, len(pack.facts))
        # uncovered[i] masks the facts that entry i's answer does not contain.
        self._uncovered = cover < self.settings.cover

    def _embed(self, texts: list[str], dim: int) -> np.ndarray:
        assert self.embedder is not None
        return np.stack([self.embedder.embed(t) for t in texts]) if texts else np.zeros((0, dim), np.float32)

    @property
    def method(self) -> str:
        return "embedding+lexical" if self.embedder is not None else "lexical"

    def scores(self, question: str) -> list[EntryScore]:
        """How the question relates to every entry (unsorted)."""
        if not words(question) or not self.entries:
            return []
        lex: dict[str, float] = {}
        for owner, sim in zip(self._lex_owner, self._lex.similarities(question)):
            lex[owner] = max(lex.get(owner, 0.0), sim)
        emb: dict[str, float] = {}
        if self.embedder is not None:
            qv = self.embedder.embed(question)
            for owner, sim in zip(self._phr_owner, (self._phr @ qv).tolist()):
                emb[owner] = max(emb.get(owner, -1.0), sim)
            answer_sims = self._ans @ qv
            fact_sims = self._fact @ qv
        else:
            gate = np.asarray(self._gate.similarities(question), dtype=np.float32)
            answer_sims, fact_sims = gate[: len(self.entries)], gate[len(self.entries):]
        out = []
        for eid in self.entries:
            row = self._answer_row[eid]
            uncovered = fact_sims[self._uncovered[row]]
            best_fact = float(uncovered.max()) if uncovered.size else 0.0
            out.append(EntryScore(eid, lex.get(eid, 0.0), emb.get(eid, 0.0), best_fact - float(answer_sims[row])))
        return out

    def match(self, question: str) -> FaqMatch | None:
        t0 = time.perf_counter()
        found = decide(self.scores(question), self.settings)
        if found is None:
            return None
        eid, score, lead = found
        return FaqMatch(self.entries[eid], score, lead, (time.perf_counter() - t0) * 1000)

    def conflicts(self) -> list[tuple[str, str, str]]:
        """(entry, phrasing, other entry) for each phrasing that another entry scores as high
        as its own, or nearly (within the margin): two entries whose questions overlap, so the
        matcher answers with the wrong one or with neither. For ``check``'s warnings."""
        w = self.settings.embedding_weight
        out = []
        for e in self.entries.values():
            for q in e.questions:
                scores = {s.entry_id: s.combined(w) for s in self.scores(q)}
                own = scores.pop(e.id, 0.0)
                if not scores:
                    continue
                other = max(scores, key=lambda k: scores[k])
                if scores[other] >= self.settings.threshold and own - scores[other] < self.settings.margin:
                    out.append((e.id, q, other))
        return out
