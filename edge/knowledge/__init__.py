"""Venue knowledge packs: facts, FAQ fast path, grounded prompts, and their evaluation.

* :func:`load_pack` / :func:`check_pack` (:mod:`edge.knowledge.pack`): read and validate a pack;
  :func:`check` adds the FAQ matcher's view (entries whose questions overlap) as warnings.
* :class:`FaqMatcher` (:mod:`edge.knowledge.matcher`): ``match(question)`` -> entry or None,
  with :class:`MiniLM` (:mod:`edge.knowledge.embed`, model ``minilm-l6-v2``) or lexical only.
* :class:`Grounding` (:mod:`edge.knowledge.prompt`): the LLM's system prompt from the pack.
* :mod:`edge.knowledge.eval`: question files, answer scoring and the eval summary.

Only NumPy is needed; the embedding model is optional (the matcher then runs on TF-IDF).
"""

from __future__ import annotations

from pathlib import Path

from edge.knowledge.errors import KnowledgeError, Problem
from edge.knowledge.matcher import Embedder, FaqMatch, FaqMatcher
from edge.knowledge.pack import Fact, FaqEntry, KnowledgePack, check_pack, load_pack
from edge.knowledge.prompt import GroundedPrompt, Grounding

__all__ = ["Embedder", "Fact", "FaqEntry", "FaqMatch", "FaqMatcher", "GroundedPrompt", "Grounding", "KnowledgeError",
           "KnowledgePack", "Problem", "check", "check_pack", "load_pack"]


def check(path: str | Path, embedder: Embedder | None = None) -> list[Problem]:
    """Every problem of the pack at ``path`` (as :func:`check_pack`), plus a warning for each
    FAQ phrasing that the matcher would answer with another entry (``knowledge.ambiguous``).
    For ``edge-voice check``: print each with ``str(problem)``; errors fail the check."""
    problems = check_pack(path)
    if any(p.severity == "error" for p in problems):
        return problems
    pack = load_pack(path)
    matcher = FaqMatcher(pack, embedder)
    for entry_id, question, other in matcher.conflicts():
        entry = pack.faq_entry(entry_id)
        problems.append(Problem(
            "knowledge.ambiguous", str(Path(path) / "faq.toml"), entry.line if entry else None,
            f"faq {entry_id!r}: question {question!r} is taken for {other!r}",
            "reword it, or move it to the entry whose answer fits", severity="warning"))
    return problems
