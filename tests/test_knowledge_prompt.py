"""Grounding: the system prompt built from a pack, whole or per question."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.knowledge.pack import load_pack
from edge.knowledge.prompt import Grounding, render_prompt

SAMPLE = Path(__file__).resolve().parents[1] / "config" / "packs" / "harbour-museum"


def words(text: str) -> int:
    return len(text.split())


def test_all_facts_when_they_fit() -> None:
    pack = load_pack(SAMPLE)
    g = Grounding(pack, words, budget_tokens=5000)
    assert g.fixed
    p = g.system_prompt()
    assert p.complete and p.facts == pack.facts and p.tokens == words(p.text)
    assert p is g.system_prompt("Where can I park my bicycle?")  # the same prompt for every question: one KV state
    assert p.text.startswith(pack.persona + "\n" + pack.style)
    assert f'"{pack.fallback}"' in p.text and "only the facts above" in p.text
    assert "Opening hours:\n- The museum is open Tuesday to Sunday" in p.text
    assert p.text.count("\n- ") == len(pack.facts)


def test_relevant_facts_when_over_budget() -> None:
    pack = load_pack(SAMPLE)
    g = Grounding(pack, words, budget_tokens=200, top_k=5)
    assert not g.fixed and g.full_tokens > g.base_tokens + 200
    with pytest.raises(ValueError):
        g.system_prompt()
    p = g.system_prompt("Where can I park my bicycle?")
    assert not p.complete and 1 <= len(p.facts) <= 5
    assert any("Bicycle racks" in f.text for f in p.facts)
    assert sum(words(f"- {f.text}") for f in p.facts) <= 200
    assert [f.line for f in p.facts] == sorted(f.line for f in p.facts)  # pack order
    other = g.system_prompt("How much is an annual pass?")
    assert any("annual pass" in f.text for f in other.facts) and other.text != p.text
    # The persona and style come first either way: that much of the prompt's KV is shared.
    assert p.text.startswith(pack.persona + "\n" + pack.style + "\n")


def test_render_without_facts() -> None:
    pack = load_pack(SAMPLE)
    text = render_prompt(pack, ())
    assert "- " not in text.split("Facts about")[1].split("\n\n")[0] and pack.fallback in text
