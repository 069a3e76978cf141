"""Knowledge packs: what one venue's kiosks know, in files its staff can edit.

A pack is a directory::

    pack.toml   id, version, name, language, the fallback line, [persona] description and style
    facts.md    the venue's facts: one per bullet (or short paragraph), under topic headings
    faq.toml    [[faq]] entries: an id, several phrasings of a question, one answer

:func:`check_pack` lists every problem (file, line, what is wrong, how to fix it);
:func:`load_pack` returns a frozen :class:`KnowledgePack`, or raises :class:`KnowledgeError`
on the first error. A pack's ``content_hash`` is the sha256 of its three files, so a fleet can
tell which devices run which pack. Other files in the directory (``questions.toml`` for
``edge-voice eval``, a README) are not part of the pack and do not change its hash.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.knowledge.errors import KnowledgeError, Problem
from edge.knowledge.text import normalize

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

_LOGGER = logging.getLogger(__name__)

__all__ = ["Fact", "FaqEntry", "KnowledgePack", "PACK_FILES", "check_pack", "load_pack", "parse_facts"]

PACK_TOML, FACTS_MD, FAQ_TOML = "pack.toml", "facts.md", "faq.toml"
PACK_FILES = (PACK_TOML, FACTS_MD, FAQ_TOML)

ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")

# Limits: what a kiosk can say in one breath, and what fits a small model's prompt.
MAX_FILE_BYTES = {PACK_TOML: 16 * 1024, FACTS_MD: 64 * 1024, FAQ_TOML: 128 * 1024}
MAX_FACTS = 400
MAX_FACT_CHARS = 600
MAX_FAQ_ENTRIES = 200
MAX_PHRASINGS = 30
MAX_QUESTION_CHARS = 200
MAX_ANSWER_CHARS = 400
MAX_FALLBACK_CHARS = 300
MAX_PERSONA_CHARS = 1000

DEFAULT_STYLE = "Answer in one or two short spoken sentences. No lists, no markdown."


@dataclass(frozen=True)
class Fact:
    """One fact: its text (Markdown markup removed), the heading it sits under, its line."""

    text: str
    topic: str = ""
    line: int = 0

    @property
    def full_text(self) -> str:
        """The fact with its topic, as retrieval and the prompt see it."""
        return f"{self.topic}: {self.text}" if self.topic else self.text


@dataclass(frozen=True)
class FaqEntry:
    id: str
    questions: tuple[str, ...]
    answer: str
    line: int = 0


@dataclass(frozen=True)
class KnowledgePack:
    id: str
    version: str
    name: str
    language: str
    fallback: str
    persona: str
    style: str
    facts: tuple[Fact, ...]
    faq: tuple[FaqEntry, ...]
    content_hash: str  # sha256 hex of pack.toml, facts.md and faq.toml
    root: Path = field(compare=False)

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    @property
    def label(self) -> str:
        """``id@version (hash)``, for logs and status."""
        return f"{self.id}@{self.version} ({self.short_hash})"

    def faq_entry(self, entry_id: str) -> FaqEntry | None:
        return next((e for e in self.faq if e.id == entry_id), None)


# -- locating lines in TOML ------------------------------------------------------------------------


class TomlLines:
    """Finds the line of a table, a key or a string value in a TOML text, for messages.

    tomllib gives line numbers for syntax errors only; a value's line is found in the text
    around its table (the n-th ``[[faq]]`` header, then the key or the string inside it).
    """

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def _find(self, pattern: re.Pattern[str], start: int = 0, end: int | None = None) -> int | None:
        for i in range(start, len(self.lines) if end is None else min(end, len(self.lines))):
            if pattern.search(self.lines[i]):
                return i + 1
        return None

    def table(self, name: str, index: int = 0) -> int | None:
        """Line of the ``index``-th ``[[name]]`` (or ``[name]``) header."""
        pattern = re.compile(rf"^\s*\[\[?\s*{re.escape(name)}\s*\]\]?\s*(#.*)?$")
        hits = [i + 1 for i, line in enumerate(self.lines) if pattern.search(line)]
        return hits[index] if index < len(hits) else None

    def span(self, name: str, index: int) -> tuple[int, int]:
        """0-based [start, end) line range of the ``index``-th ``[[name]]`` table."""
        start = self.table(name, index)
        if start is None:
            return 0, len(self.lines)
        nxt = self._find(re.compile(r"^\s*\["), start)
        return start - 1, (nxt - 1) if nxt else len(self.lines)

    def key(self, key: str, span: tuple[int, int] = (0, 0)) -> int | None:
        start, end = span if span != (0, 0) else (0, len(self.lines))
        return self._find(re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*="), start, end)

    def string(self, value: str, span: tuple[int, int] = (0, 0)) -> int | None:
        start, end = span if span != (0, 0) else (0, len(self.lines))
        probe = value.strip()[:40]
        if not probe:
            return None
        for i in range(start, min(end, len(self.lines))):
            if probe in self.lines[i]:
                return i + 1
        return None


# -- facts.md --------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s{0,3}(?:[-*+]|\d{1,3}[.)])\s+(.*)$")
_COMMENT_START, _COMMENT_END = "<!--", "-->"
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_EMPHASIS = re.compile(r"(\*\*|__|\*|`)")


def _plain(text: str) -> str:
    text = _LINK.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    return " ".join(text.split())


def parse_facts(text: str) -> list[Fact]:
    """Facts of a Markdown text: each bullet is one fact (its indented or wrapped lines
    included), each other paragraph is one fact; the latest ``##`` (or deeper) heading is its
    topic, a ``#`` heading is the document's title and starts a topic-less part. HTML comments
    are notes for editors and are skipped."""
    facts: list[Fact] = []
    topic = ""
    current: list[str] = []
    current_line = 0
    in_comment = False

    def flush() -> None:
        nonlocal current
        if current:
            body = _plain(" ".join(current))
            if body:
                facts.append(Fact(body, topic, current_line))
        current = []

    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if in_comment or line.lstrip().startswith(_COMMENT_START):
            in_comment = _COMMENT_END not in line
            flush()
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            topic = "" if len(heading.group(1)) == 1 else _plain(heading.group(2))
            continue
        if not line.strip():
            flush()
            continue
        bullet = _BULLET.match(line)
        if bullet:
            flush()
            current, current_line = [bullet.group(1)], n
        elif current:
            current.append(line.strip())
        else:
            current, current_line = [line.strip()], n
    flush()
    return facts


# -- checking --------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[Problem] = []

    def add(self, code: str, name: str, line: int | None, message: str, fix: str,
            severity: str = "error") -> None:
        self.problems.append(Problem(code, str(self.root / name), line, message, fix, severity))

    def read(self, name: str, required: bool) -> str | None:
        path = self.root / name
        if not path.is_file():
            if required:
                self.add("knowledge.missing", name, None, "file not found",
                         f"create {name} (see the README, \"Knowledge packs\")")
            return None
        try:
            raw = path.read_bytes()
        except OSError as err:
            self.add("knowledge.unreadable", name, None, f"cannot read: {err.strerror}",
                     "check the file's permissions")
            return None
        limit = MAX_FILE_BYTES[name]
        if len(raw) > limit:
            self.add("knowledge.too_large", name, None, f"{len(raw)} bytes, more than {limit}",
                     "shorten it: a kiosk's prompt has room for a few hundred short facts")
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            self.add("knowledge.unreadable", name, line, "not UTF-8 text", "save the file as UTF-8")
            return None

    def toml(self, name: str, text: str) -> dict[str, Any] | None:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            msg = str(err)
            m = re.search(r"at line (\d+)", msg)
            detail = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
            self.add("knowledge.syntax", name, int(m.group(1)) if m else None, f"not valid TOML: {detail}",
                     "fix the syntax (strings in double quotes, one key = value per line)")
            return None

    def unknown_keys(self, name: str, table: Mapping[str, Any], known: tuple[str, ...], where: str,
                     lines: TomlLines, span: tuple[int, int] = (0, 0)) -> None:
        for key in table:
            if key not in known:
                self.add("knowledge.unknown_key", name, lines.key(key, span),
                         f"{where}{key}: unknown key", f"use one of: {', '.join(known)}")

    def string(self, name: str, table: Mapping[str, Any], key: str, where: str, lines: TomlLines, *,
               required: bool, max_chars: int, span: tuple[int, int] = (0, 0),
               pattern: re.Pattern[str] | None = None, pattern_doc: str = "") -> str:
        value = table.get(key)
        line = lines.key(key, span)
        if value is None:
            if required:
                self.add("knowledge.missing_key", name, lines.table(where.rstrip("."), 0) if where else None,
                         f"{where}{key}: missing", f"add {key} = \"...\"")
            return ""
        if not isinstance(value, str):
            self.add("knowledge.bad_value", name, line, f"{where}{key}: expected a string, got "
                     f"{type(value).__name__}", f"write {key} = \"...\"")
            return ""
        value = " ".join(value.split())
        if required and not value:
            self.add("knowledge.bad_value", name, line, f"{where}{key}: empty", f"give {key} a value")
        elif len(value) > max_chars:
            self.add("knowledge.too_large", name, line, f"{where}{key}: {len(value)} characters, more than "
                     f"{max_chars}", "shorten it")
        elif pattern is not None and value and not pattern.match(value):
            self.add("knowledge.bad_value", name, line, f"{where}{key}: {value!r} is not valid",
                     f"use {pattern_doc}")
        return value


_PACK_KEYS = ("id", "version", "name", "language", "fallback", "persona")
_PERSONA_KEYS = ("description", "style")
_FAQ_KEYS = ("id", "questions", "answer")


def _check_pack_toml(c: _Checker, text: str) -> dict[str, str]:
    data = c.toml(PACK_TOML, text)
    if data is None:
        return {}
    lines = TomlLines(text)
    c.unknown_keys(PACK_TOML, data, _PACK_KEYS, "", lines)
    out = {
        "id": c.string(PACK_TOML, data, "id", "", lines, required=True, max_chars=64, pattern=ID_RE,
                       pattern_doc="1-64 characters of a-z, 0-9, _ and -, starting with a letter or digit"),
        "version": c.string(PACK_TOML, data, "version", "", lines, required=True, max_chars=64,
                            pattern=VERSION_RE, pattern_doc="letters, digits, '.', '_', '+' and '-' "
                            "(e.g. \"2025.06.1\")"),
        "name": c.string(PACK_TOML, data, "name", "", lines, required=True, max_chars=120),
        "language": c.string(PACK_TOML, data, "language", "", lines, required=False, max_chars=16,
                             pattern=LANGUAGE_RE, pattern_doc="a language code such as \"en\" or \"en-GB\"")
        or "en",
        "fallback": c.string(PACK_TOML, data, "fallback", "", lines, required=True,
                             max_chars=MAX_FALLBACK_CHARS),
    }
    persona = data.get("persona", {})
    if not isinstance(persona, dict):
        c.add("knowledge.bad_value", PACK_TOML, lines.key("persona"), "persona: expected a table",
              "write [persona] with description = \"...\" and style = \"...\"")
        persona = {}
    span = lines.span("persona", 0) if lines.table("persona") else (0, 0)
    c.unknown_keys(PACK_TOML, persona, _PERSONA_KEYS, "persona.", lines, span)
    out["persona"] = c.string(PACK_TOML, persona, "description", "persona.", lines, required=False,
                              max_chars=MAX_PERSONA_CHARS, span=span)
    out["style"] = c.string(PACK_TOML, persona, "style", "persona.", lines, required=False,
                            max_chars=MAX_PERSONA_CHARS, span=span)
    return out


def _check_facts(c: _Checker, text: str) -> list[Fact]:
    facts = parse_facts(text)
    if len(facts) > MAX_FACTS:
        c.add("knowledge.too_large", FACTS_MD, facts[MAX_FACTS].line, f"{len(facts)} facts, more than {MAX_FACTS}",
              "keep the facts a visitor may ask about; move the rest out")
    seen: dict[str, int] = {}
    for fact in facts:
        if len(fact.text) > MAX_FACT_CHARS:
            c.add("knowledge.too_large", FACTS_MD, fact.line, f"a fact of {len(fact.text)} characters, more "
                  f"than {MAX_FACT_CHARS}", "split it into several bullets, one fact each")
        key = normalize(fact.text)
        if key in seen:
            c.add("knowledge.duplicate", FACTS_MD, fact.line, f"the same fact as line {seen[key]}",
                  "delete one of them", severity="warning")
        else:
            seen[key] = fact.line
    return facts


def _check_faq(c: _Checker, text: str) -> list[FaqEntry]:
    data = c.toml(FAQ_TOML, text)
    if data is None:
        return []
    lines = TomlLines(text)
    c.unknown_keys(FAQ_TOML, data, ("faq",), "", lines)
    raw = data.get("faq", [])
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        c.add("knowledge.bad_value", FAQ_TOML, lines.key("faq") or lines.table("faq"),
              "faq: expected [[faq]] tables", "write each entry as [[faq]] with id, questions and answer")
        return []
    if len(raw) > MAX_FAQ_ENTRIES:
        c.add("knowledge.too_large", FAQ_TOML, lines.table("faq", MAX_FAQ_ENTRIES),
              f"{len(raw)} FAQ entries, more than {MAX_FAQ_ENTRIES}", "keep the most frequent questions")
    entries: list[FaqEntry] = []
    ids: dict[str, int] = {}
    phrasings: dict[str, tuple[str, int]] = {}  # normalised phrasing -> (entry id, line)
    for index, table in enumerate(raw):
        span = lines.span("faq", index)
        header = lines.table("faq", index)
        raw_id = table.get("id")
        where = f"faq {raw_id!r}: " if isinstance(raw_id, str) and ID_RE.match(raw_id) else f"faq #{index + 1}: "
        c.unknown_keys(FAQ_TOML, table, _FAQ_KEYS, where, lines, span)
        entry_id = c.string(FAQ_TOML, table, "id", where, lines, required=False, max_chars=64, span=span,
                            pattern=ID_RE, pattern_doc="1-64 characters of a-z, 0-9, _ and -")
        if "id" not in table:
            c.add("knowledge.missing_key", FAQ_TOML, header, f"{where}id: missing",
                  "add id = \"...\" (a short name such as \"opening-hours\")")
        elif entry_id:
            if entry_id in ids:
                c.add("knowledge.duplicate", FAQ_TOML, lines.key("id", span), f"{where}the same id as the entry "
                      f"at line {ids[entry_id]}", "give each entry its own id")
            else:
                ids[entry_id] = header or 0
        answer = c.string(FAQ_TOML, table, "answer", where, lines, required=False, max_chars=MAX_ANSWER_CHARS,
                          span=span)
        if "answer" not in table:
            c.add("knowledge.missing_key", FAQ_TOML, header, f"{where}answer: missing",
                  "add answer = \"...\", the sentence the kiosk speaks")
        elif isinstance(table["answer"], str) and not answer:
            c.add("knowledge.bad_value", FAQ_TOML, lines.key("answer", span), f"{where}answer: empty",
                  "write the answer the kiosk speaks, or delete the entry")
        questions = _check_phrasings(c, table, where, lines, span, header, entry_id, phrasings)
        if entry_id and answer and questions:
            entries.append(FaqEntry(entry_id, tuple(questions), answer, header or 0))
    return entries


def _check_phrasings(c: _Checker, table: Mapping[str, Any], where: str, lines: TomlLines,
                     span: tuple[int, int], header: int | None, entry_id: str,
                     phrasings: dict[str, tuple[str, int]]) -> list[str]:
    qs = table.get("questions")
    line = lines.key("questions", span)
    if qs is None:
        c.add("knowledge.missing_key", FAQ_TOML, header, f"{where}questions: missing",
              "add questions = [\"...\", \"...\"], a few ways a visitor asks it")
        return []
    if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
        c.add("knowledge.bad_value", FAQ_TOML, line, f"{where}questions: expected a list of strings",
              "write questions = [\"...\", \"...\"]")
        return []
    if not qs:
        c.add("knowledge.bad_value", FAQ_TOML, line, f"{where}questions: empty",
              "give at least one phrasing (two or three different ones work best)")
    if len(qs) > MAX_PHRASINGS:
        c.add("knowledge.too_large", FAQ_TOML, line, f"{where}{len(qs)} phrasings, more than {MAX_PHRASINGS}",
              "keep the most different ones")
    out: list[str] = []
    for q in qs:
        q = " ".join(q.split())
        qline = lines.string(q, span) or line
        key = normalize(q)
        if not key:
            c.add("knowledge.bad_value", FAQ_TOML, qline, f"{where}an empty question", "delete it or write one")
            continue
        if len(q) > MAX_QUESTION_CHARS:
            c.add("knowledge.too_large", FAQ_TOML, qline, f"{where}a question of {len(q)} characters, more than "
                  f"{MAX_QUESTION_CHARS}", "shorten it to what a visitor says")
            continue
        other = phrasings.get(key)
        if other is not None and other[0] != entry_id:
            c.add("knowledge.duplicate", FAQ_TOML, qline, f"{where}question {q!r} is also a question of "
                  f"{other[0]!r} (line {other[1]})", "keep it in one entry only: a question has one answer")
        elif other is not None:
            c.add("knowledge.duplicate", FAQ_TOML, qline, f"{where}question {q!r} is listed twice",
                  "delete one of them", severity="warning")
            continue
        else:
            phrasings[key] = (entry_id, qline or 0)
        out.append(q)
    return out


def content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for name in PACK_FILES:
        path = root / name
        data = path.read_bytes() if path.is_file() else b""
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _inspect(path: str | Path) -> tuple[list[Problem], KnowledgePack | None]:
    root = Path(path)
    c = _Checker(root)
    if not root.is_dir():
        if root.is_file() and root.name == PACK_TOML:
            root = root.parent
            c = _Checker(root)
        else:
            c.problems.append(Problem("knowledge.missing", str(root), None, "knowledge pack directory not found",
                                      "give the directory that holds pack.toml, facts.md and faq.toml"))
            return c.problems, None
    pack_text = c.read(PACK_TOML, required=True)
    meta = _check_pack_toml(c, pack_text) if pack_text is not None else {}
    facts_text = c.read(FACTS_MD, required=False)
    facts = _check_facts(c, facts_text) if facts_text is not None else []
    faq_text = c.read(FAQ_TOML, required=False)
    faq = _check_faq(c, faq_text) if faq_text is not None else []
    if pack_text is not None and facts_text is None and faq_text is None:
        c.add("knowledge.empty", PACK_TOML, None, "the pack has neither facts.md nor faq.toml",
              "add facts.md (one fact per bullet) and/or faq.toml")
    elif not facts and not faq and not any(p.severity == "error" for p in c.problems):
        c.add("knowledge.empty", FACTS_MD if facts_text is not None else FAQ_TOML, None,
              "the pack has no facts and no FAQ entries", "add facts (one per bullet) or [[faq]] entries")
    if any(p.severity == "error" for p in c.problems):
        return c.problems, None
    pack = KnowledgePack(
        id=meta["id"], version=meta["version"], name=meta["name"], language=meta["language"],
        fallback=meta["fallback"], persona=meta["persona"] or f"You are the information kiosk of {meta['name']}.",
        style=meta["style"] or DEFAULT_STYLE, facts=tuple(facts), faq=tuple(faq),
        content_hash=content_hash(root), root=root)
    return c.problems, pack


def check_pack(path: str | Path) -> list[Problem]:
    """Every problem of the pack at ``path`` (errors and warnings), in file order; empty when
    it is fine. Never raises for a bad pack."""
    return _inspect(path)[0]


def load_pack(path: str | Path) -> KnowledgePack:
    """Load and validate the pack at ``path``; raises KnowledgeError naming the first error
    (file:line, what is wrong, the fix). Warnings are logged."""
    problems, pack = _inspect(path)
    errors = [p for p in problems if p.severity == "error"]
    if errors or pack is None:
        raise KnowledgeError(errors[0], more=len(errors) - 1)
    for p in problems:
        _LOGGER.warning("%s", p)
    _LOGGER.info("knowledge pack %s: %d facts, %d FAQ entries", pack.label, len(pack.facts), len(pack.faq))
    return pack


def iter_errors(problems: list[Problem]) -> Iterator[Problem]:
    return (p for p in problems if p.severity == "error")
