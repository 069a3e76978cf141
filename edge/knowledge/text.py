"""Text normalisation shared by the FAQ matcher, fact retrieval and answer scoring.

Questions arrive from a speech recognizer: lower or mixed case, with or without punctuation,
with fillers ("um"), split or joined compounds ("wheel chair", "wifi") and accents or not
("café"). Everything that compares texts goes through :func:`normalize` first, so that none
of that matters; :func:`terms` then keeps the words that carry meaning, lightly stemmed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

__all__ = ["FILLERS", "STOPWORDS", "normalize", "numbers_to_digits", "stem", "terms", "words"]

# Words a recognizer writes for hesitations; they never carry meaning.
FILLERS = frozenset({"um", "umm", "uh", "uhh", "er", "erm", "hmm", "hm", "ah", "eh", "mm"})

# Function words. Question words (what, when, where, how) are kept out of this list on purpose:
# "where is the café" and "when does the café close" ask different things.
STOPWORDS = frozenset("""
a an the and or but if then so of to in on at by for from with without into onto over under
about as is are was were be been being am do does did doing done have has had having
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
this that these those there here can could would should will shall may might must
please just really very any some anything something also too not no yes ok okay hi hello hey
get got go going let lets like want wanted need tell know excuse sorry thanks thank one
""".split()) | FILLERS

_CONTRACTIONS = (
    (re.compile(r"\b(\w+)n't\b"), r"\1 not"),
    (re.compile(r"\b(\w+)'re\b"), r"\1 are"),
    (re.compile(r"\b(\w+)'ve\b"), r"\1 have"),
    (re.compile(r"\b(\w+)'ll\b"), r"\1 will"),
    (re.compile(r"\b(\w+)'d\b"), r"\1 would"),
    (re.compile(r"\bi'm\b"), "i am"),
    (re.compile(r"\b(what|where|when|who|how|that|there|it|here|he|she)'s\b"), r"\1 is"),
    (re.compile(r"\blet's\b"), "let us"),
    (re.compile(r"'s\b"), ""),  # possessive: "children's" -> "children"
)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_AMPM = re.compile(r"\b([ap])\.\s?m\b\.?")
_DIGIT_UNIT = re.compile(r"(\d)(am|pm)\b")
_KEEP = re.compile(r"[^a-z0-9'_ ]+")
_INNER_PUNCT = re.compile(r"(?<=\d)[:.](?=\d)")
_SPACES = re.compile(r"\s+")

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}


def normalize(text: str) -> str:
    """Lower case, no accents, no punctuation (but "4:15" and "9.50" stay one token),
    contractions expanded, "a.m." as "am", single spaces."""
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = _AMPM.sub(r"\1m", text)
    text = _DIGIT_UNIT.sub(r"\1 \2", text)
    text = _INNER_PUNCT.sub("_", text)  # "4:15", "4.15" -> "4:15" at the end, not "4 15"
    text = text.replace("-", "")  # "wi-fi" -> "wifi", "under-fives" -> "underfives"
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)
    text = _KEEP.sub(" ", text).replace("'", "")
    return _SPACES.sub(" ", text).strip().replace("_", ":")


def words(text: str) -> list[str]:
    return normalize(text).split()


def numbers_to_digits(text: str) -> str:
    """Normalised text with number words as digits ("twelve pounds" -> "12 pounds",
    "twenty five" -> "25"), for comparing answers with expectations."""
    out: list[str] = []
    pending: int | None = None
    for w in normalize(text).split():
        n = _NUMBER_WORDS.get(w)
        if n is None:
            if pending is not None:
                out.append(str(pending))
                pending = None
            out.append(w)
        elif pending is not None and pending >= 20 and pending % 10 == 0 and n < 10:
            pending += n
        elif pending is not None and n == 100:
            pending *= 100
        else:
            if pending is not None:
                out.append(str(pending))
            pending = n
    if pending is not None:
        out.append(str(pending))
    return " ".join(out)


_SUFFIXES = (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""))


def stem(word: str) -> str:
    """A light suffix stripper: plurals and -ing/-ed forms meet their stem ("tickets" and
    "ticket", "parking" and "park"); short words are left alone."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, repl in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)] + repl
            if suffix in ("ing", "ed") and len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]  # "stopped" -> "stop"
            if suffix == "es" and not base.endswith(("s", "x", "z", "ch", "sh")):
                base = word[:-1]  # "tables" -> "table", but "boxes" -> "box"
            return base
    return word


def terms(text: str, *, keep: Iterable[str] = ()) -> list[str]:
    """The content words of a text, stemmed, in order: no stopwords, no fillers.

    ``keep`` are stemmed terms of a vocabulary: two adjacent words whose concatenation is one
    of them are joined ("wheel chair" -> "wheelchair", "bath room" -> "bathroom"), which is how
    a recognizer often splits a compound.
    """
    ws = [w for w in words(text) if w not in FILLERS]
    vocab = set(keep)
    out: list[str] = []
    i = 0
    while i < len(ws):
        if vocab and i + 1 < len(ws):
            joined = stem(ws[i] + ws[i + 1])
            if joined in vocab:
                out.append(joined)
                i += 2
                continue
        if ws[i] not in STOPWORDS:
            out.append(stem(ws[i]))
        i += 1
    return out
