"""``edge-voice eval``'s core: question files, answer scoring and the summary.

A question file is TOML, one ``[[question]]`` table per question::

    [[question]]
    text = "What time does the museum open?"
    expect = { mentions_any = ["10 am", "10"], must_not_mention = ["Monday"] }

    [[question]]
    text = "Who is the museum's director?"
    expect = { fallback = true }

``expect`` keys: ``mentions_any`` (the answer must contain at least one of these; omitted or
empty: anything that is not the fallback), ``must_not_mention`` (none of these), ``fallback``
(true: the question is not answerable from the pack and the answer must be the pack's fallback
line; default false), ``faq`` (optional: the FAQ entry id that should answer it, counted in
the FAQ-path hits). Texts are compared after normalisation: case, accents, punctuation and
number words do not matter ("twelve" matches "12", "4.15" matches "4:15").

:func:`evaluate` asks every question through an ``answer(question) -> Answer`` callable and
returns an :class:`EvalReport`: accuracy on answerable questions, fallback precision and
recall, FAQ-path hits, and first-audio latency per path.
"""

from __future__ import annotations

import difflib
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.knowledge.errors import KnowledgeError, Problem
from edge.knowledge.pack import ID_RE, TomlLines
from edge.knowledge.text import numbers_to_digits, terms

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

__all__ = ["Answer", "EvalReport", "Expectation", "Question", "QuestionResult", "evaluate", "is_fallback",
           "load_questions", "mentions", "score_answer"]

_QUESTION_KEYS = ("text", "expect", "id")
_EXPECT_KEYS = ("mentions_any", "must_not_mention", "fallback", "faq")
MAX_QUESTIONS = 5000


@dataclass(frozen=True)
class Expectation:
    mentions_any: tuple[str, ...] = ()
    must_not_mention: tuple[str, ...] = ()
    fallback: bool = False
    faq: str | None = None


@dataclass(frozen=True)
class Question:
    text: str
    expect: Expectation
    line: int = 0
    id: str = ""


@dataclass(frozen=True)
class Answer:
    """What the system under test did with one question."""

    text: str
    path: str  # "faq" (the fast path), "llm", or another name
    first_audio_ms: float | None = None  # from the final question to the first audio (or text)
    faq_id: str | None = None  # the FAQ entry that answered, on the FAQ path


def _problem(path: Path, line: int | None, message: str, fix: str) -> KnowledgeError:
    return KnowledgeError(Problem("knowledge.questions", str(path), line, message, fix))


def _strings(value: Any, key: str, path: Path, line: int | None) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _problem(path, line, f"expect.{key}: expected a list of non-empty strings",
                       f"write {key} = [\"...\", \"...\"]")
    return tuple(v.strip() for v in value)


def load_questions(path: str | Path) -> list[Question]:
    """Read a question file; raises KnowledgeError (code ``knowledge.questions``) naming the
    file, the line and the fix on the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _problem(path, None, "question file not found", "give the path of a questions.toml") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _problem(path, None, f"cannot read: {err}", "save it as UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        import re

        m = re.search(r"at line (\d+)", str(err))
        raise _problem(path, int(m.group(1)) if m else None, f"not valid TOML: {err}",
                       "fix the syntax (strings in double quotes, one key = value per line)") from None
    lines = TomlLines(text)
    for key in data:
        if key != "question":
            raise _problem(path, lines.key(key) or lines.table(key), f"{key}: unknown key",
                           "write each question as a [[question]] table")
    raw = data.get("question")
    if not isinstance(raw, list) or not raw or not all(isinstance(q, dict) for q in raw):
        raise _problem(path, None, "no [[question]] tables", "add [[question]] tables with text and expect")
    if len(raw) > MAX_QUESTIONS:
        raise _problem(path, None, f"{len(raw)} questions, more than {MAX_QUESTIONS}", "split the file")
    out: list[Question] = []
    seen: dict[str, int] = {}
    for index, q in enumerate(raw):
        span = lines.span("question", index)
        line = lines.table("question", index)
        for key in q:
            if key not in _QUESTION_KEYS:
                raise _problem(path, lines.key(key, span) or line, f"question #{index + 1}: {key}: unknown key",
                               f"use one of: {', '.join(_QUESTION_KEYS)}")
        qtext = q.get("text")
        if not isinstance(qtext, str) or not qtext.strip():
            raise _problem(path, lines.key("text", span) or line, f"question #{index + 1}: text: missing or empty",
                           "add text = \"the question\"")
        qtext = " ".join(qtext.split())
        norm = " ".join(terms(qtext)) or qtext.lower()
        if norm in seen:
            raise _problem(path, line, f"question #{index + 1}: {qtext!r} repeats the question at line "
                           f"{seen[norm]}", "delete one of them")
        seen[norm] = line or 0
        expect = q.get("expect")
        eline = lines.key("expect", span) or line
        if not isinstance(expect, dict):
            raise _problem(path, eline, f"question #{index + 1}: expect: missing or not a table",
                           "add expect = { mentions_any = [\"...\"] } or expect = { fallback = true }")
        for key in expect:
            if key not in _EXPECT_KEYS:
                raise _problem(path, eline, f"question #{index + 1}: expect.{key}: unknown key",
                               f"use one of: {', '.join(_EXPECT_KEYS)}")
        fallback = expect.get("fallback", False)
        if not isinstance(fallback, bool):
            raise _problem(path, eline, f"question #{index + 1}: expect.fallback: expected true or false",
                           "write fallback = true or fallback = false")
        mentions_any = _strings(expect.get("mentions_any", []), "mentions_any", path, eline)
        must_not = _strings(expect.get("must_not_mention", []), "must_not_mention", path, eline)
        if fallback and mentions_any:
            raise _problem(path, eline, f"question #{index + 1}: expect has both fallback = true and mentions_any",
                           "an unanswerable question's answer is the fallback line: drop mentions_any")
        faq = expect.get("faq")
        if faq is not None and (not isinstance(faq, str) or not ID_RE.match(faq)):
            raise _problem(path, eline, f"question #{index + 1}: expect.faq: expected an FAQ entry id",
                           "write faq = \"entry-id\" as in faq.toml")
        qid = q.get("id", "")
        if not isinstance(qid, str):
            raise _problem(path, lines.key("id", span) or line, f"question #{index + 1}: id: expected a string",
                           "write id = \"...\"")
        out.append(Question(qtext, Expectation(mentions_any, must_not, fallback, faq), line or 0,
                            qid or f"q{index + 1}"))
    return out


# -- scoring (pure functions) -------------------------------------------------------------------------


def _comparable(text: str) -> str:
    return f" {numbers_to_digits(text)} "


def mentions(answer: str, phrase: str) -> bool:
    """Whether the answer contains the phrase as whole words, after normalisation."""
    needle = numbers_to_digits(phrase)
    return bool(needle) and f" {needle} " in _comparable(answer)


def is_fallback(answer: str, fallback_line: str, *, min_ratio: float = 0.7) -> bool:
    """Whether the answer is the fallback line: it contains it, or it reads almost the same
    (a model may rephrase it a little: "I'm sorry, I don't know. Please ask at the information
    desk."). Sharing a few words ("ask at the ticket desk by the main entrance") is not enough."""
    if mentions(answer, fallback_line):
        return True
    a, f = numbers_to_digits(answer), numbers_to_digits(fallback_line)
    return bool(a and f) and difflib.SequenceMatcher(None, a, f, autojunk=False).ratio() >= min_ratio


@dataclass(frozen=True)
class QuestionResult:
    question: Question
    answer: Answer
    correct: bool
    fallback: bool  # the answer is the fallback line
    reason: str  # why it is wrong ("" when correct)


def score_answer(question: Question, answer: str, fallback_line: str) -> tuple[bool, bool, str]:
    """(correct, is the fallback, why not) for one answer."""
    fb = is_fallback(answer, fallback_line)
    bad = next((p for p in question.expect.must_not_mention if mentions(answer, p)), None)
    if bad is not None:
        return False, fb, f"mentions {bad!r}"
    if question.expect.fallback:
        return (True, fb, "") if fb else (False, fb, "not the fallback line")
    if fb:
        return False, fb, "the fallback line"
    if not answer.strip():
        return False, fb, "empty answer"
    if question.expect.mentions_any and not any(mentions(answer, p) for p in question.expect.mentions_any):
        return False, fb, f"mentions none of {list(question.expect.mentions_any)}"
    return True, fb, ""


# -- the summary --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathLatency:
    count: int
    p50_ms: float | None
    p90_ms: float | None
    mean_ms: float | None


def _latency(values: Sequence[float]) -> PathLatency:
    if not values:
        return PathLatency(0, None, None, None)
    s = sorted(values)
    return PathLatency(len(s), round(statistics.median(s), 1), round(s[min(len(s) - 1, int(0.9 * len(s)))], 1),
                       round(statistics.fmean(s), 1))


@dataclass(frozen=True)
class EvalReport:
    results: tuple[QuestionResult, ...]
    answerable: int
    answerable_correct: int
    unanswerable: int
    fallback_answers: int  # answers that were the fallback line, to any question
    fallback_right: int  # ... to an unanswerable question
    faq_path: int  # answers given on the FAQ path
    faq_expected: int  # questions with expect.faq
    faq_expected_hits: int  # ... answered on the FAQ path by that entry
    latency: dict[str, PathLatency] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.answerable_correct / self.answerable if self.answerable else 0.0

    @property
    def fallback_precision(self) -> float:
        return self.fallback_right / self.fallback_answers if self.fallback_answers else 1.0

    @property
    def fallback_recall(self) -> float:
        return self.fallback_right / self.unanswerable if self.unanswerable else 1.0

    @property
    def unanswerable_correct(self) -> int:
        return sum(r.correct for r in self.results if r.question.expect.fallback)

    def as_dict(self) -> dict[str, Any]:
        return {
            "answerable": self.answerable, "accuracy": round(self.accuracy, 3),
            "unanswerable": self.unanswerable, "fallback_precision": round(self.fallback_precision, 3),
            "fallback_recall": round(self.fallback_recall, 3),
            "faq_path": self.faq_path, "faq_expected": self.faq_expected, "faq_expected_hits": self.faq_expected_hits,
            "latency_ms": {p: lat.__dict__ for p, lat in self.latency.items()},
            "questions": [{"id": r.question.id, "line": r.question.line, "question": r.question.text,
                           "answer": r.answer.text, "path": r.answer.path, "faq_id": r.answer.faq_id,
                           "first_audio_ms": r.answer.first_audio_ms, "correct": r.correct,
                           "fallback": r.fallback, "why": r.reason} for r in self.results],
        }

    def summary_lines(self) -> list[str]:
        lines = [
            f"accuracy on answerable questions: {self.accuracy:.1%} ({self.answerable_correct}/{self.answerable})",
            f"fallback on unanswerable questions: precision {self.fallback_precision:.1%} "
            f"({self.fallback_right}/{self.fallback_answers}), recall {self.fallback_recall:.1%} "
            f"({self.fallback_right}/{self.unanswerable})",
            f"FAQ path: {self.faq_path} answers" + (f"; {self.faq_expected_hits}/{self.faq_expected} expected FAQ "
                                                    f"questions answered by their entry" if self.faq_expected else ""),
        ]
        for path, lat in sorted(self.latency.items()):
            if lat.count:
                lines.append(f"first audio, {path} path: p50 {lat.p50_ms} ms, p90 {lat.p90_ms} ms "
                             f"({lat.count} answers)")
        return lines


def evaluate(questions: Sequence[Question], answer: Callable[[str], Answer], fallback_line: str,
             on_result: Callable[[QuestionResult], None] | None = None) -> EvalReport:
    """Ask every question (in order) and score the answers."""
    results: list[QuestionResult] = []
    for q in questions:
        a = answer(q.text)
        correct, fb, why = score_answer(q, a.text, fallback_line)
        r = QuestionResult(q, a, correct, fb, why)
        results.append(r)
        if on_result is not None:
            on_result(r)
    by_path: dict[str, list[float]] = {}
    for r in results:
        if r.answer.first_audio_ms is not None:
            by_path.setdefault(r.answer.path, []).append(r.answer.first_audio_ms)
    answerable = [r for r in results if not r.question.expect.fallback]
    faq_expected = [r for r in results if r.question.expect.faq]
    return EvalReport(
        results=tuple(results),
        answerable=len(answerable), answerable_correct=sum(r.correct for r in answerable),
        unanswerable=len(results) - len(answerable),
        fallback_answers=sum(r.fallback for r in results),
        fallback_right=sum(r.fallback and r.question.expect.fallback for r in results),
        faq_path=sum(r.answer.path == "faq" for r in results),
        faq_expected=len(faq_expected),
        faq_expected_hits=sum(r.answer.path == "faq" and r.answer.faq_id == r.question.expect.faq
                              for r in faq_expected),
        latency={p: _latency(v) for p, v in by_path.items()},
    )
