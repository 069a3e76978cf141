"""Cut streamed LLM text into clauses worth speaking.

Speech should start as soon as the model has said something sayable, but a voice fed
word by word sounds choppy. So the first clause is released at the first clause break once
it has a few words; later clauses at sentence ends, or at a clause break once a sentence
runs long. A period is a sentence end only where a reader would hear one: not in "3.5",
"Dr. Smith", "e.g. this", "the U.S. economy" or a list's "1.".

Pure logic: no I/O, no threads. ``ClauseSplitter`` is used by one producer at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

from edge.tts.text import CLAUSE_BREAK, SENTENCE_END, count_words, has_words, strip_markdown

# Characters that may close a sentence after its punctuation: quotes, brackets, emphasis.
_CLOSERS = "\"'”’»)]}*_`"
_OPENERS = "\"'“‘«([{*_`"

# Before these a period never ends a sentence (titles and Latin abbreviations).
_NEVER_END = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "rev", "gen", "capt", "lt", "sgt", "col",
    "gov", "sen", "rep", "hon", "e.g", "i.e", "vs", "cf", "approx", "fig", "nr",
})
# These end a sentence only when the next word starts with a capital letter.
_END_IF_CAPITAL = frozenset({
    "etc", "jr", "sr", "inc", "ltd", "co", "corp", "no", "a.m", "p.m", "u.s", "u.k", "u.s.a",
})

def _token_before(buf: str, i: int) -> tuple[str, bool]:
    """The word that ends at ``i`` (openers stripped) and whether it starts its line."""
    start = i
    while start > 0 and not buf[start - 1].isspace():
        start -= 1
    line_start = buf[:start].rsplit("\n", 1)[-1].strip() == ""
    return buf[start:i].lstrip(_OPENERS), line_start


def _next_visible(buf: str, k: int) -> str | None:
    """The first character after ``k`` that is neither space nor an opener; None if not yet seen."""
    for ch in buf[k:]:
        if not ch.isspace() and ch not in _OPENERS:
            return ch
    return None


# What a candidate break is: a sentence end, a clause break, a line end; or "wait" when the
# text seen so far cannot tell (a period at the very end of the buffer after "3" or "U.S").
_SENTENCE, _CLAUSE, _LINE, _WAIT = "sentence", "clause", "line", "wait"


def _breaks(buf: str, final: bool) -> Iterator[tuple[int, str]]:
    n = len(buf)
    i = 0
    while i < n:
        ch = buf[i]
        if ch == "\n":
            yield i + 1, _LINE
            i += 1
            continue
        if ch not in SENTENCE_END and ch not in CLAUSE_BREAK and ch != "-":
            i += 1
            continue
        j = i + 1
        if ch in SENTENCE_END:
            while j < n and buf[j] in SENTENCE_END:
                j += 1
        k = j
        while k < n and buf[k] in _CLOSERS:
            k += 1
        at_end = k == n
        glued = not at_end and not buf[k].isspace()  # "3.5", "U.S", "1,000", "10:30", "well-known"
        kind = _classify(buf, i, j, k, at_end, glued, final)
        if kind == _WAIT:
            yield k, _WAIT
            return
        if kind is not None:
            yield k, kind
        i = k if k > i else i + 1


def _classify(buf: str, i: int, j: int, k: int, at_end: bool, glued: bool, final: bool) -> str | None:
    ch = buf[i]
    prev = buf[i - 1] if i else ""
    if ch == "—":
        return _CLAUSE
    if ch in "-–":
        # A dash between spaces is a pause; at a line's start it is a bullet; else a hyphen.
        tok, line_start = _token_before(buf, i)
        if prev != " " or line_start:
            return None
        if at_end:
            return None if final else _WAIT
        return _CLAUSE if buf[k].isspace() else None
    if glued:
        return None
    if ch in CLAUSE_BREAK:
        if ch == ":" and _token_before(buf, i)[0].lower() in ("http", "https"):
            return None  # "https:" streamed before its "//"
        if at_end and prev.isdigit() and ch in ",:" and not final:
            return _WAIT  # "1," may become "1,000", "10:" may become "10:30"
        return _CLAUSE
    if ch != "." or j - i > 1:
        return _SENTENCE  # "!", "?", "…", "...", "?!"
    tok, line_start = _token_before(buf, i)
    low = tok.lower()
    if tok.isdigit() and line_start:
        return None  # a numbered list item
    if low in _NEVER_END or (len(tok) == 1 and tok.isalpha()):
        return None
    if "/" in tok or "@" in tok or low.startswith("www"):
        # Inside a URL, a path or an address: a period is a sentence end only before a space.
        if at_end:
            return _SENTENCE if final else _WAIT
        return _SENTENCE
    if low in _END_IF_CAPITAL or "." in tok:
        nxt = _next_visible(buf, k)
        if nxt is None:
            return _SENTENCE if final else _WAIT
        return _SENTENCE if nxt.isupper() else None
    if tok[-1:].isdigit() and at_end and not final:
        return _WAIT  # "3." may become "3.5"
    return _SENTENCE


class ClauseSplitter:
    """Feed text pieces as the model streams them; get back clauses to synthesize.

    ``push`` returns the clauses completed by the piece (often none), ``flush`` the rest at
    the end of the reply; clauses come out cleaned by ``strip_markdown``, never empty. After
    ``flush`` the splitter starts afresh for the next reply.
    """

    def __init__(self, first_min_words: int = 4, long_words: int = 20, max_words: int = 40,
                 first_max_words: int | None = None) -> None:
        if first_min_words < 1 or long_words < 1 or max_words < long_words:
            raise ValueError("need first_min_words >= 1 and 1 <= long_words <= max_words")
        if first_max_words is not None and first_max_words < first_min_words:
            raise ValueError("need first_max_words >= first_min_words")
        self.first_min_words = first_min_words
        # A first clause with no break in sight is cut here: on a slow CPU, waiting for a
        # comma can cost seconds of silence.
        self.first_max_words = first_max_words
        self.long_words = long_words
        self.max_words = max_words
        self._buf = ""
        self._first_done = False

    def push(self, piece: str) -> list[str]:
        self._buf += piece
        return self._drain(final=False)

    def flush(self) -> list[str]:
        out = self._drain(final=True)
        self._emit(self._buf, out)
        self._buf = ""
        self._first_done = False
        return out

    def _emit(self, raw: str, out: list[str]) -> None:
        clause = strip_markdown(raw)
        if has_words(clause):
            out.append(clause)
            self._first_done = True

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            end = self._find_end(final)
            if end is None:
                return out
            raw, self._buf = self._buf[:end], self._buf[end:].lstrip()
            self._emit(raw, out)

    def _find_end(self, final: bool) -> int | None:
        buf = self._buf
        for end, kind in _breaks(buf, final):
            if kind == _WAIT:
                break
            words = count_words(strip_markdown(buf[:end]))
            if words == 0:
                continue
            if not self._first_done:
                if words >= self.first_min_words:
                    return end
            elif kind != _CLAUSE or words >= self.long_words:
                return end
        # Run-on text with no usable break: cut before the last (maybe unfinished) word.
        limit = self.max_words if self._first_done or self.first_max_words is None else self.first_max_words
        if count_words(strip_markdown(buf)) > limit:
            cut = max(buf.rstrip().rfind(" "), buf.rstrip().rfind("\n"))
            if cut > 0:
                return cut
        return None
