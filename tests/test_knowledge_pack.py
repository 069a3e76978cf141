"""Knowledge packs: the sample pack, the Markdown facts, and one clear problem per bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge.knowledge.errors import KnowledgeError
from edge.knowledge.pack import check_pack, load_pack, parse_facts

SAMPLE = Path(__file__).resolve().parents[1] / "config" / "packs" / "harbour-museum"


@pytest.fixture
def pack_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pack"
    shutil.copytree(SAMPLE, d)
    return d


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _line_of(path: Path, needle: str, nth: int = 0) -> int:
    hits = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line]
    return hits[nth]


def test_sample_pack_loads_with_no_problems() -> None:
    pack = load_pack(SAMPLE)
    assert (pack.id, pack.version, pack.language) == ("harbour-museum", "2025.06.1", "en")
    assert len(pack.facts) == 45 and len(pack.faq) == 22
    assert pack.fallback.startswith("Sorry, I don't know that.")
    assert len(pack.content_hash) == 64 and pack.label == f"harbour-museum@2025.06.1 ({pack.content_hash[:12]})"
    assert check_pack(SAMPLE) == []
    first = pack.facts[0]
    assert first.topic == "Opening hours" and first.text.startswith("The museum is open Tuesday to Sunday")
    assert first.line == _line_of(SAMPLE / "facts.md", "The museum is open Tuesday to Sunday")
    hours = pack.faq_entry("opening-hours")
    assert hours is not None and "What are your opening hours?" in hours.questions
    lines = (SAMPLE / "faq.toml").read_text(encoding="utf-8").splitlines()
    assert hours.line == lines.index("[[faq]]") + 1


def test_hash_covers_the_pack_files_only(pack_dir: Path) -> None:
    before = load_pack(pack_dir).content_hash
    (pack_dir / "questions.toml").write_text("# edited\n", encoding="utf-8")
    (pack_dir / "README.md").write_text("notes\n", encoding="utf-8")
    assert load_pack(pack_dir).content_hash == before
    _edit(pack_dir / "facts.md", "12 pounds", "13 pounds")
    assert load_pack(pack_dir).content_hash != before


def test_facts_markdown() -> None:
    facts = parse_facts(
        "# Title of the document\n\nIntro paragraph is a fact.\n\n## Tickets\n\n"
        "- Adults pay **12** pounds,\n  wrapped onto a second line.\n* Children [pay](http://x) 5 pounds.\n"
        "1. Numbered items count too.\n<!-- an editor's note\n- not a fact -->\n\nA short paragraph.\n"
        "### Deeper\nText under a deeper heading.\n")
    assert [(f.topic, f.text, f.line) for f in facts] == [
        ("", "Intro paragraph is a fact.", 3),
        ("Tickets", "Adults pay 12 pounds, wrapped onto a second line.", 7),
        ("Tickets", "Children pay 5 pounds.", 9),
        ("Tickets", "Numbered items count too.", 10),
        ("Tickets", "A short paragraph.", 14),
        ("Deeper", "Text under a deeper heading.", 16),
    ]
    assert facts[1].full_text == "Tickets: Adults pay 12 pounds, wrapped onto a second line."


def _only_error(pack_dir: Path) -> object:
    errors = [p for p in check_pack(pack_dir) if p.severity == "error"]
    assert len(errors) == 1, [str(p) for p in errors]
    with pytest.raises(KnowledgeError) as info:
        load_pack(pack_dir)
    assert info.value.problem == errors[0]
    assert "\n" not in str(info.value)
    return errors[0]


def test_toml_syntax_error_names_the_line(pack_dir: Path) -> None:
    faq = pack_dir / "faq.toml"
    _edit(faq, 'id = "toilets"', 'id = "toilets')
    p = _only_error(pack_dir)
    assert p.code == "knowledge.syntax"  # type: ignore[attr-defined]
    assert p.line == _line_of(faq, 'id = "toilets')  # type: ignore[attr-defined]
    assert str(p).startswith(f"{faq}:{p.line}: not valid TOML")  # type: ignore[attr-defined]


def test_duplicate_phrasing_across_entries(pack_dir: Path) -> None:
    faq = pack_dir / "faq.toml"
    _edit(faq, '"Where is the bathroom?",', '"Where is the bathroom?",\n  "when are you OPEN",')
    p = _only_error(pack_dir)
    assert p.code == "knowledge.duplicate"  # type: ignore[attr-defined]
    assert p.line == _line_of(faq, '"when are you OPEN"')  # type: ignore[attr-defined]
    assert "'opening-hours'" in str(p) and "one entry only" in str(p)


def test_empty_answer(pack_dir: Path) -> None:
    faq = pack_dir / "faq.toml"
    _edit(faq, 'answer = "Only assistance dogs', 'answer = "  "\nold = "Only assistance dogs')
    problems = [p for p in check_pack(pack_dir) if p.severity == "error"]
    assert [p.code for p in problems] == ["knowledge.unknown_key", "knowledge.bad_value"]
    empty = problems[1]
    assert empty.line == _line_of(faq, 'answer = "  "') and "answer: empty" in empty.message
    assert "faq 'dogs'" in empty.message


def test_missing_fallback_and_unknown_key(pack_dir: Path) -> None:
    pack_toml = pack_dir / "pack.toml"
    _edit(pack_toml, 'fallback = "', 'fallbak = "')
    problems = check_pack(pack_dir)
    codes = {p.code: p for p in problems}
    assert set(codes) == {"knowledge.unknown_key", "knowledge.missing_key"}
    assert codes["knowledge.unknown_key"].line == _line_of(pack_toml, "fallbak =")
    assert "use one of: id, version" in str(codes["knowledge.unknown_key"])
    assert codes["knowledge.missing_key"].message == "fallback: missing"
    with pytest.raises(KnowledgeError, match=r"and 1 more problem: run `edge-voice check`"):
        load_pack(pack_dir)


def test_unknown_key_in_an_entry_and_a_persona(pack_dir: Path) -> None:
    _edit(pack_dir / "faq.toml", 'id = "wifi"', 'id = "wifi"\nanwser = "typo"')
    _edit(pack_dir / "pack.toml", "style =", "tone = \"x\"\nstyle =")
    problems = check_pack(pack_dir)
    assert [(p.code, Path(p.path).name, p.line) for p in problems] == [
        ("knowledge.unknown_key", "pack.toml", _line_of(pack_dir / "pack.toml", "tone =")),
        ("knowledge.unknown_key", "faq.toml", _line_of(pack_dir / "faq.toml", "anwser =")),
    ]
    assert problems[1].message == "faq 'wifi': anwser: unknown key"


def test_bad_values(pack_dir: Path) -> None:
    _edit(pack_dir / "pack.toml", 'id = "harbour-museum"', 'id = "Harbour Museum"')
    _edit(pack_dir / "faq.toml", 'id = "shop"', 'id = "toilets"')
    _edit(pack_dir / "faq.toml", 'questions = [\n  "Is there Wi-Fi?",', 'questions = "Is there Wi-Fi?"\nx = [')
    got = [(p.code, p.message) for p in check_pack(pack_dir) if p.severity == "error"]
    assert ("knowledge.bad_value", "id: 'Harbour Museum' is not valid") in got
    assert any(c == "knowledge.duplicate" and "the same id as the entry" in m for c, m in got)
    assert ("knowledge.bad_value", "faq 'wifi': questions: expected a list of strings") in got


def test_size_limits(pack_dir: Path) -> None:
    facts = pack_dir / "facts.md"
    _edit(facts, "- Last entry to the museum is at 4:15 pm.", "- Last entry " + "very " * 130 + "late.")
    p = _only_error(pack_dir)
    assert p.code == "knowledge.too_large" and p.line == _line_of(facts, "- Last entry very")  # type: ignore[attr-defined]
    assert "split it" in str(p)
    facts.write_text("- a fact\n" * 9000, encoding="utf-8")
    p = _only_error(pack_dir)
    assert p.code == "knowledge.too_large" and p.line is None and "bytes, more than 65536" in str(p)  # type: ignore[attr-defined]


def test_missing_and_empty_packs(tmp_path: Path, pack_dir: Path) -> None:
    missing = check_pack(tmp_path / "nope")
    assert [p.code for p in missing] == ["knowledge.missing"]
    (pack_dir / "faq.toml").unlink()
    (pack_dir / "facts.md").unlink()
    assert [p.code for p in check_pack(pack_dir)] == ["knowledge.empty"]
    (pack_dir / "facts.md").write_text("<!-- nothing yet -->\n", encoding="utf-8")
    assert [p.code for p in check_pack(pack_dir)] == ["knowledge.empty"]
    (pack_dir / "pack.toml").unlink()
    assert [(p.code, Path(p.path).name) for p in check_pack(pack_dir)][0] == ("knowledge.missing", "pack.toml")


def test_not_utf8_and_warnings(pack_dir: Path) -> None:
    facts = pack_dir / "facts.md"
    facts.write_bytes(b"- one\n- caf\xe9\n")
    p = _only_error(pack_dir)
    assert (p.code, p.line) == ("knowledge.unreadable", 2)  # type: ignore[attr-defined]
    facts.write_text("- The same fact.\n- the same fact\n", encoding="utf-8")
    warnings = check_pack(pack_dir)
    assert [(w.code, w.severity, w.line) for w in warnings] == [("knowledge.duplicate", "warning", 2)]
    load_pack(pack_dir)  # warnings do not stop loading


def test_check_warns_about_overlapping_faq_entries(pack_dir: Path) -> None:
    from edge.knowledge import check

    assert check(pack_dir) == []
    # An entry whose only question is another entry's, reworded: the matcher takes it for the other.
    with (pack_dir / "faq.toml").open("a", encoding="utf-8") as f:
        f.write('\n[[faq]]\nid = "loos"\nquestions = ["Where are the toilets, please?"]\nanswer = "Upstairs."\n')
    problems = check(pack_dir)
    assert [(p.code, p.severity) for p in problems] == [("knowledge.ambiguous", "warning")] * 2
    text = [str(p) for p in problems]
    assert any("faq 'toilets': question 'Where are the toilets?' is taken for 'loos'" in t for t in text)
    assert any("faq 'loos': question 'Where are the toilets, please?' is taken for 'toilets'" in t for t in text)
