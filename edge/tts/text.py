"""Text as a voice should read it: markdown, emoji and symbols out; money and abbreviations spelled.

Pure logic: no I/O, no threads.
"""

from __future__ import annotations

import re
import unicodedata

SENTENCE_END = ".!?…"
CLAUSE_BREAK = ",;:—–"
_BULLET_RE = re.compile(r"^\s*(?:[-*+•▪‣◦]\s+|\d{1,3}[.)]\s+|#{1,6}\s+|>\s*)+")
_IMAGE_RE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_LINK_RE = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_URL_RE = re.compile(r"\bhttps?://(?:www\.)?")
_HASH_NUMBER_RE = re.compile(r"#(?=\d)")
_SPACES_RE = re.compile(r"[ \t\f\v\u00a0]+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([,;:.!?])")
# Symbols a voice reads out as noise or not at all; each becomes a space.
_DROP_CHARS = frozenset("*_`~^|\\<>{}[]\"“”„«»")
_KEEP_SYMBOLS = frozenset("°")
_WORD_RE = re.compile(r"[^\W_]", re.UNICODE)


def _drop_symbol(ch: str) -> bool:
    if ch in _KEEP_SYMBOLS:
        return False
    if ch in _DROP_CHARS:
        return True
    cat = unicodedata.category(ch)
    if cat in ("So", "Sk", "Cs", "Co", "Cn", "Cf", "Me"):
        return True  # emoji, pictographs, modifiers, joiners, keycaps, private use
    if cat == "Cc":
        return not ch.isspace()
    cp = ord(ch)
    return (0xFE00 <= cp <= 0xFE0F  # variation selectors
            or 0x2190 <= cp <= 0x21FF or 0x27F0 <= cp <= 0x27FF or 0x2900 <= cp <= 0x297F  # arrows
            or 0xE0000 <= cp <= 0xE007F)  # emoji tag characters


def strip_markdown(text: str) -> str:
    """Text as a voice should read it: no markdown, emoji or symbols it cannot say.

    Lines become sentences (a line without final punctuation gets a period), list bullets
    and heading marks go, links keep their text.
    """
    text = _IMAGE_RE.sub(" ", text)
    text = _LINK_RE.sub(r"\1", text)
    text = _URL_RE.sub("", text)
    text = _HASH_NUMBER_RE.sub("number ", text)
    text = text.replace("&", " and ").replace("```", "\n")
    lines = []
    for raw in text.splitlines():
        line = _BULLET_RE.sub("", raw)
        line = "".join(" " if _drop_symbol(ch) else ch for ch in line)
        line = _SPACES_RE.sub(" ", line).strip()
        if has_words(line):
            lines.append(line)
    out = ""
    for line in lines:
        if out:
            out += " " if out[-1] in SENTENCE_END + CLAUSE_BREAK else ". "
        out += line
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", out)


def has_words(text: str) -> bool:
    return _WORD_RE.search(text) is not None


def count_words(text: str) -> int:
    return sum(1 for tok in text.split() if has_words(tok))



_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
             "£": ("pound", "pounds", "penny", "pence")}
_CURRENCY_RE = re.compile(r"([$€£])\s?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{2}))?(?!\d)"
                          r"(\s+(?:thousand|million|billion|trillion)\b)?")
_EN_ABBREVIATIONS = [
    (re.compile(r"\bDr\.(?=\s+[A-Z])"), "Doctor"),
    (re.compile(r"\bMr\.(?=\s)"), "Mister"),
    (re.compile(r"\bMrs\.(?=\s)"), "Missus"),
    (re.compile(r"\be\.g\.,?", re.I), "for example,"),
    (re.compile(r"\bi\.e\.,?", re.I), "that is,"),
    (re.compile(r"\betc\.", re.I), "et cetera."),
    (re.compile(r"\bvs\.?(?=\s)", re.I), "versus"),
    (re.compile(r"\bapprox\.", re.I), "approximately"),
]


def _say_currency(m: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCY[m.group(1)]
    amount, cents, scale = m.group(2), m.group(3), m.group(4)
    if scale:
        return f"{amount}{scale} {many}"
    words = f"{amount} {one if amount == '1' else many}"
    if cents and int(cents):
        words += f" and {int(cents)} {sub_one if int(cents) == 1 else sub_many}"
    return words


def normalize_for_speech(text: str, language: str = "en") -> str:
    """What the voice should read: markdown and emoji gone; for English, amounts of money
    and a few abbreviations spelled out (espeak-ng reads "$3.50" as "dollar three point five
    zero" and stops a sentence after "Dr."). Other numbers are left to espeak-ng."""
    text = strip_markdown(text)
    if language == "en":
        text = _CURRENCY_RE.sub(_say_currency, text)
        for pattern, words in _EN_ABBREVIATIONS:
            text = pattern.sub(words, text)
    return text
