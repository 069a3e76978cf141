"""The eval core: question files, answer scoring and the summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.knowledge.errors import KnowledgeError
from edge.knowledge.eval import Answer, evaluate, is_fallback, load_questions, mentions, score_answer
from edge.knowledge.pack import load_pack

SAMPLE = Path(__file__).resolve().parents[1] / "config" / "packs" / "harbour-museum"
FALLBACK = "Sorry, I don't know that. Please ask at the information desk by the main entrance."


def test_sample_question_file() -> None:
    qs = load_questions(SAMPLE / "questions.toml")
    answerable = [q for q in qs if not q.expect.fallback]
    assert len(answerable) >= 40 and len(qs) - len(answerable) >= 15
    faq_ids = {e.id for e in load_pack(SAMPLE).faq}
    assert {q.expect.faq for q in qs if q.expect.faq} <= faq_ids
    assert all(q.line > 0 for q in qs) and qs[0].id == "q1"
    assert qs[0].expect.mentions_any == ("10",)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ('[[question]]\ntext = "a\n', 2, "not valid TOML"),
    ('[[question]]\ntext = "Hi?"\nexpect = { fallback = true }\n[[question]]\ntxt = "x"\n', 5, "txt: unknown key"),
    ('[[question]]\ntext = "Hi?"\n', 1, "expect: missing"),
    ('[[question]]\ntext = "Hi?"\nexpect = { fallback = true, mentions_any = ["a"] }\n', 3, "both fallback"),
    ('[[question]]\ntext = "Hi?"\nexpect = { mention_any = ["a"] }\n', 3, "expect.mention_any: unknown key"),
    ('[[question]]\ntext = "Hi?"\nexpect = { fallback = "yes" }\n', 3, "expected true or false"),
    ('[[question]]\ntext = "Hi?"\nexpect = { mentions_any = [""] }\n', 3, "non-empty strings"),
    ('[[question]]\ntext = "Where is it?"\nexpect = {}\n[[question]]\ntext = "where IS it"\nexpect = {}\n', 4,
     "repeats the question at line 1"),
    ('question = 3\n', 1, "no [[question]] tables"),
])
def test_bad_question_files(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = tmp_path / "q.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KnowledgeError) as info:
        load_questions(path)
    err = info.value
    assert err.code == "knowledge.questions" and fragment in str(err), str(err)
    if fragment != "no [[question]] tables":
        assert str(err).startswith(f"{path}:{line}: "), str(err)
    assert "\n" not in str(err)


def test_missing_question_file(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="question file not found"):
        load_questions(tmp_path / "none.toml")


def test_mentions_and_fallback() -> None:
    assert mentions("It costs twelve pounds.", "12") and mentions("It costs 12 pounds", "twelve pounds")
    assert mentions("Last entry is at 4.15 pm", "4:15") and mentions("The GALLEY café", "galley cafe")
    assert not mentions("It costs 120 pounds", "12") and not mentions("anything", "")
    assert is_fallback(FALLBACK, FALLBACK)
    assert is_fallback("I'm sorry, I don't know. Please ask at the information desk.", FALLBACK)
    assert is_fallback("Sorry, I do not know that. Please ask at the information desk.", FALLBACK)
    assert not is_fallback("We open at 10 am; ask at the desk for tours.", FALLBACK)
    assert not is_fallback("Lost property is kept at the ticket desk by the main entrance. Please ask there.", FALLBACK)
    assert not is_fallback("There are lockers by the main entrance. Large bags can be left at the ticket desk.",
                           FALLBACK)


def _q(text: str = "When do you open?", **expect: object):  # type: ignore[no-untyped-def]
    from edge.knowledge.eval import Expectation, Question

    return Question(text, Expectation(**expect))  # type: ignore[arg-type]


def test_score_answer() -> None:
    q = _q(mentions_any=("10", "ten"), must_not_mention=("Monday",))
    assert score_answer(q, "We open at ten.", FALLBACK) == (True, False, "")
    assert score_answer(q, "We open at 11.", FALLBACK)[2] == "mentions none of ['10', 'ten']"
    assert score_answer(q, "At 10, but not on Monday.", FALLBACK)[2] == "mentions 'Monday'"
    assert score_answer(q, FALLBACK, FALLBACK) == (False, True, "the fallback line")
    assert score_answer(_q(), "  ", FALLBACK)[2] == "empty answer"
    assert score_answer(_q(), "Whenever you like.", FALLBACK)[0]
    unanswerable = _q(fallback=True)
    assert score_answer(unanswerable, FALLBACK, FALLBACK) == (True, True, "")
    assert score_answer(unanswerable, "Paris.", FALLBACK) == (False, False, "not the fallback line")


def test_evaluate_summary() -> None:
    qs = [_q("a?", mentions_any=("yes",), faq="x"), _q("b?", mentions_any=("yes",)), _q("c?", mentions_any=("no",)),
          _q("d?", fallback=True), _q("e?", fallback=True)]
    answers = {
        "a?": Answer("yes", "faq", 12.0, "x"),
        "b?": Answer("yes indeed", "llm", 400.0),
        "c?": Answer(FALLBACK, "llm", 300.0),  # a fallback to an answerable question
        "d?": Answer(FALLBACK, "llm", 200.0),
        "e?": Answer("Paris", "llm", 100.0),
    }
    seen = []
    r = evaluate(qs, answers.__getitem__, FALLBACK, on_result=seen.append)
    assert len(seen) == 5 and r.answerable == 3 and r.answerable_correct == 2
    assert r.accuracy == pytest.approx(2 / 3)
    assert (r.fallback_answers, r.fallback_right, r.unanswerable) == (2, 1, 2)
    assert r.fallback_precision == 0.5 and r.fallback_recall == 0.5
    assert (r.faq_path, r.faq_expected, r.faq_expected_hits) == (1, 1, 1)
    assert r.latency["faq"].p50_ms == 12.0 and r.latency["llm"].count == 4 and r.latency["llm"].p50_ms == 250.0
    d = r.as_dict()
    assert d["accuracy"] == 0.667 and d["questions"][2]["why"] == "the fallback line"
    lines = r.summary_lines()
    assert lines[0] == "accuracy on answerable questions: 66.7% (2/3)"
    assert lines[1].startswith("fallback on unanswerable questions: precision 50.0% (1/2), recall 50.0% (1/2)")
