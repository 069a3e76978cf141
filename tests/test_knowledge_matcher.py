"""The FAQ matcher, measured on tests/data/faq_paraphrases.toml at its chosen settings.

The figures are the README's ("Knowledge packs"): a change that lowers precision or recall
below them fails here. The embedding matcher needs the dev model minilm-l6-v2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import installed

from edge.devtools.faq_eval import load_cases, measure, outcome
from edge.knowledge.embed import MiniLM
from edge.knowledge.matcher import EMBEDDING_SETTINGS, LEXICAL_SETTINGS, FaqMatcher
from edge.knowledge.pack import load_pack

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "config" / "packs" / "harbour-museum"
CASES = REPO / "tests" / "data" / "faq_paraphrases.toml"


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    model = installed("minilm-l6-v2")
    return MiniLM(model.path("model"), model.path("vocab"))


def test_test_set_is_large_enough() -> None:
    cases = load_cases(CASES)
    positives = [c for c in cases if c.faq]
    negatives = [c for c in cases if c.faq is None]
    assert len(positives) >= 60 and len(negatives) >= 30
    assert sum(c.kind == "asr" for c in positives) >= 30
    assert sum(c.kind == "near-miss" for c in negatives) >= 20
    ids = {e.id for e in load_pack(SAMPLE).faq}
    assert {c.faq for c in positives} == ids  # every entry is tested
    phrasings = {q.lower() for e in load_pack(SAMPLE).faq for q in e.questions}
    assert not [c.text for c in cases if c.text.lower() in phrasings]  # no test case is a phrasing


def test_lexical_matcher_figures() -> None:
    cases = load_cases(CASES)
    matcher = FaqMatcher(load_pack(SAMPLE))
    assert matcher.settings == LEXICAL_SETTINGS and matcher.method == "lexical"
    scored, _ = measure(matcher.scores, cases)
    o = outcome(cases, scored, matcher.settings)
    assert o.precision >= 0.97 and o.recall >= 0.45, o


def test_embedding_matcher_figures(minilm: MiniLM) -> None:
    cases = load_cases(CASES)
    matcher = FaqMatcher(load_pack(SAMPLE), minilm)
    assert matcher.settings == EMBEDDING_SETTINGS
    scored, _ = measure(matcher.scores, cases)
    o = outcome(cases, scored, matcher.settings)
    assert o.precision >= 0.98 and o.recall >= 0.66, o
    assert o.false_on_negatives <= 1
    # The same decisions through match().
    hits = sum(1 for c in cases if (m := matcher.match(c.text)) is not None and m.entry.id == c.faq)
    assert hits == o.true_pos


def test_match_api(minilm: MiniLM) -> None:
    pack = load_pack(SAMPLE)
    matcher = FaqMatcher(pack, minilm)
    m = matcher.match("um where are the toilets")
    assert m is not None and m.entry.id == "toilets" and m.entry.answer.startswith("There are toilets")
    assert m.score >= EMBEDDING_SETTINGS.threshold and m.margin >= EMBEDDING_SETTINGS.margin and m.elapsed_ms > 0
    for question in ("Where can I park my bicycle?", "What is the capital of France?", "", "um", "?"):
        assert matcher.match(question) is None, question
    assert matcher.conflicts() == []  # every phrasing finds its own entry
    assert FaqMatcher(pack).conflicts() == []


def test_wordpiece_matches_the_reference_tokenizer(minilm: MiniLM) -> None:
    # Token ids from Hugging Face `tokenizers` with the model's tokenizer.json.
    tok = minilm.tokenizer
    assert tok.encode("Where's the café? It's 4:15 p.m.!") == [
        101, 2073, 1005, 1055, 1996, 7668, 1029, 2009, 1005, 1055, 1018, 1024, 2321, 1052, 1012, 1049, 1012, 999, 102]
    assert tok.encode("um is there why fi") == [101, 8529, 2003, 2045, 2339, 10882, 102]
    assert tok.encode("Wi-Fi password: Harbour-Guest") == [101, 15536, 1011, 10882, 20786, 1024, 7440, 1011, 4113, 102]
    assert len(tok.encode("word " * 500, max_len=16)) == 16


def test_embedding_matches_the_reference_model(minilm: MiniLM) -> None:
    # Reference: transformers' BertModel with mean pooling and L2 normalisation.
    a = minilm.embed("What are your opening hours?")
    b = minilm.embed("When are you open?")
    c = minilm.embed("Where can I park my bicycle?")
    assert a.shape == (384,) and abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert np.allclose(a[:4], [0.05117784, -0.03864281, 0.00338368, 0.03686541], atol=2e-6)
    assert abs(float(a @ b) - 0.7272627) < 1e-5 and abs(float(a @ c) - 0.0936846) < 1e-5
