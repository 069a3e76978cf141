"""ClauseSplitter and strip_markdown: pure logic, streamed the way an LLM streams."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.tts.clauses import ClauseSplitter
from edge.tts.text import count_words, strip_markdown


def tokens(text: str) -> list[str]:
    """Pieces like an LLM's: a word with its leading space, punctuation often separate."""
    return re.findall(r"\s*[\w']+|\s*[^\w\s]|\s+", text)


def split(text: str, pieces: list[str] | None = None, **kw) -> list[str]:
    s = ClauseSplitter(**kw)
    out: list[str] = []
    for piece in tokens(text) if pieces is None else pieces:
        out += s.push(piece)
    return out + s.flush()


def per_char(text: str, **kw) -> list[str]:
    return split(text, list(text), **kw)


# --- when clauses come out -----------------------------------------------------------------

def test_first_clause_waits_for_enough_words():
    # "Hello," has one word: held; the sentence end comes with 6 words.
    assert split("Hello, how can I help you today? The weather is nice.") == [
        "Hello, how can I help you today?", "The weather is nice."]


def test_first_clause_released_at_a_comma_once_long_enough():
    assert split("Paris is the capital of France, and it is lovely.") == [
        "Paris is the capital of France,", "and it is lovely."]


def test_first_clause_is_released_while_streaming_not_at_the_end():
    s = ClauseSplitter(first_min_words=4)
    got = []
    for piece in tokens("Well, the museum opens at nine, and it closes at six"):
        got.append(s.push(piece))
    released = [c for step in got for c in step]
    assert released == ["Well, the museum opens at nine,"]
    # It came out at the comma, before the rest of the reply existed.
    index = next(i for i, step in enumerate(got) if step)
    assert "".join(tokens("Well, the museum opens at nine,")) == "".join(
        tokens("Well, the museum opens at nine, and it closes at six")[: index + 1])
    assert s.flush() == ["and it closes at six"]


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_first_min_words_is_honoured(n):
    clauses = split("One two, three four, five six, seven eight. Nine.", first_min_words=n)
    assert count_words(clauses[0]) >= n
    assert count_words(clauses[0]) < n + 2  # and released at the first break that has them


def test_short_sentence_joins_the_next_only_for_the_first_clause():
    assert split("Sure. Paris is the capital of France. Yes. It is.") == [
        "Sure. Paris is the capital of France.", "Yes.", "It is."]


def test_later_clauses_wait_for_sentence_ends():
    text = "I can help with that, of course. The shop opens at nine, closes at six, and is busy."
    assert split(text) == ["I can help with that,", "of course.",
                           "The shop opens at nine, closes at six, and is busy."]


def test_long_sentence_breaks_at_a_clause_break():
    words = " ".join(f"w{i}" for i in range(22))
    text = f"First one is short. {words}, and then the tail of it. End."
    out = split(text, first_min_words=2, long_words=20)
    assert out == ["First one is short.", f"{words},", "and then the tail of it.", "End."]


def test_run_on_text_is_cut_at_a_word_boundary():
    words = [f"word{i}" for i in range(50)]
    out = split(" ".join(words), long_words=10, max_words=15)
    assert all(count_words(c) <= 16 for c in out)
    assert " ".join(out).split() == words


def test_question_and_exclamation_end_sentences_right_away():
    s = ClauseSplitter(first_min_words=1)
    assert s.push("Is that all?") == ["Is that all?"]
    assert s.push(" Yes!") == ["Yes!"]
    assert s.push(" Great") == []
    assert s.flush() == ["Great"]


def test_period_after_a_word_releases_without_waiting_for_more_text():
    s = ClauseSplitter(first_min_words=2)
    assert s.push("The shop is open.") == ["The shop is open."]


# --- periods that do not end sentences ------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Please ask Dr. Smith about the results today.",
    "Mr. and Mrs. Jones will arrive at noon today.",
    "Bring a snack, e.g. an apple or a pear to eat.",
    "That is about 3.5 times more than last year.",
    "The U.S. economy grew again this quarter.",
    "The meeting starts at 10:30 in room four.",
    "It costs $1,000 in total for the whole trip.",
    "We sell fruit, vegetables, bread etc. at the market.",
    "Version 2.0.1 fixed the bug in the parser.",
    "J. R. R. Tolkien wrote the book long ago.",
    "Call us at No. 5 on the main street today.",
])
def test_abbreviations_and_numbers_do_not_split(text):
    assert split(text, first_min_words=30) == [text]
    assert per_char(text, first_min_words=30) == [text]


@pytest.mark.parametrize("text,expected", [
    ("I live in the U.S. It is big here.", ["I live in the U.S.", "It is big here."]),
    ("We sell fruit etc. Come and see us.", ["We sell fruit etc.", "Come and see us."]),
    ("The total was 42. That is a lot.", ["The total was 42.", "That is a lot."]),
    ("Wait... I think so. Fine.", ["Wait... I think so.", "Fine."]),
    ("Really?! Yes, I think it is. Okay.", ["Really?! Yes, I think it is.", "Okay."]),
])
def test_sentence_ends_after_abbreviations_and_numbers(text, expected):
    assert split(text, first_min_words=3) == expected
    assert per_char(text, first_min_words=3) == expected


def test_decimal_split_across_pieces_waits():
    s = ClauseSplitter(first_min_words=1)
    assert s.push("It is 3.") == []  # may become 3.5
    assert s.push("5 times more. Ok") == ["It is 3.5 times more."]
    assert s.flush() == ["Ok"]


def test_abbreviation_at_the_end_of_the_buffer_waits_for_the_next_word():
    s = ClauseSplitter(first_min_words=1)
    assert s.push("Made in the U.S.") == []
    assert s.push(" It") == ["Made in the U.S."]
    assert s.flush() == ["It"]


def test_thousands_and_times_split_across_pieces():
    assert split("It costs 1,000 dollars, plus tax.", ["It costs 1,", "000 dollars", ", plus tax."],
                 first_min_words=3) == ["It costs 1,000 dollars,", "plus tax."]
    assert split("See you at 10:30 then, ok.", ["See you at 10:", "30 then", ", ok."],
                 first_min_words=3) == ["See you at 10:30 then,", "ok."]


def test_dashes():
    assert split("This is the plan — we go first, then rest. Bye.") == [
        "This is the plan —", "we go first, then rest.", "Bye."]
    assert split("This is a well-known place to eat. Yes.") == ["This is a well-known place to eat.", "Yes."]
    assert split("It is the best one - really the best. Yes.") == [
        "It is the best one -", "really the best.", "Yes."]


# --- markdown, lists, newlines, emoji ---------------------------------------------------------

def test_markdown_is_stripped():
    text = "**Note:** this is *really* `important`, okay? Visit [our site](https://x.example) now."
    assert split(text) == ["Note: this is really important,", "okay?", "Visit our site now."]
    assert per_char(text) == ["Note: this is really important,", "okay?", "Visit our site now."]


def test_urls_are_not_cut_while_streaming():
    text = "You can find the full list at https://example.com/list.html today. Thanks."
    expected = ["You can find the full list at example.com/list.html today.", "Thanks."]
    assert split(text) == expected
    assert per_char(text) == expected


def test_list_bullets_and_newlines():
    text = "Here are your options:\n- Apples\n- Pears\n\n1. First thing.\n2. Second thing\n"
    assert split(text) == ["Here are your options:", "Apples", "Pears", "First thing.", "Second thing"]
    # Short items after a short first line: the first clause gathers lines until it has words.
    assert split("Options:\n- Red\n- Green\n- Blue\n- Pink\n") == ["Options: Red. Green. Blue", "Pink"]


def test_numbered_list_numbers_are_not_sentence_ends():
    out = split("Steps to follow now:\n1. Open the door\n2. Walk in\n", first_min_words=2)
    assert out == ["Steps to follow now:", "Open the door", "Walk in"]


def test_heading_and_quote_lines():
    assert split("# Opening hours\n> We open at nine every day.\n") == [
        "Opening hours. We open at nine every day."]


def test_emoji_and_symbols_are_dropped():
    assert split("Great question 😀👍🏽! The answer is yes ✅. Done ➡️ now.") == [
        "Great question! The answer is yes.", "Done now."]


def test_nothing_to_say_gives_no_clauses():
    assert split("") == []
    assert split("   \n\n ") == []
    assert split("** 😀 — ...") == []
    s = ClauseSplitter()
    assert s.push("...") == []
    assert s.flush() == []


def test_flush_resets_for_the_next_reply():
    s = ClauseSplitter(first_min_words=3)
    s.push("Short one, and")
    assert s.flush() == ["Short one, and"]
    # The next reply is a first clause again.
    assert s.push("Hi, there,") == []
    assert s.push(" my friend, ok") == ["Hi, there, my friend,"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClauseSplitter(first_min_words=0)
    with pytest.raises(ValueError):
        ClauseSplitter(long_words=30, max_words=10)


def test_strip_markdown_details():
    assert strip_markdown("Item #1 & co") == "Item number 1 and co"
    assert strip_markdown("See https://www.example.com/a for more") == "See example.com/a for more"
    assert strip_markdown("![logo](a.png) Welcome") == "Welcome"
    assert strip_markdown("line one\nline two.\nline three") == "line one. line two. line three"
    assert strip_markdown("It is 20°C ~ nice") == "It is 20°C nice"
    assert strip_markdown("snake_case and `code`") == "snake case and code"
    assert strip_markdown('He said "hello" to me') == "He said hello to me"


# --- properties ---------------------------------------------------------------------------------

_WORDS = st.sampled_from(["the", "Dr.", "U.S.", "e.g.", "3.5", "10:30", "1,000", "etc.", "No.", "A.", "word",
                          "Paris", "it's", "well-known", "**bold**", "`x`", "😀"])
_SEPS = st.sampled_from([" ", " ", " ", ", ", ". ", "? ", "! ", "; ", ": ", " — ", "\n", "\n- ", "\n1. ", "...", " - "])


@st.composite
def _replies(draw):
    parts = draw(st.lists(st.tuples(_WORDS, _SEPS), min_size=0, max_size=40))
    return "".join(w + s for w, s in parts)


def _alpha_words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


@settings(max_examples=300, deadline=None)
@given(_replies(), st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20),
       st.integers(min_value=1, max_value=8))
def test_no_word_is_lost_or_reordered_however_the_text_is_cut(text, cuts, first_min):
    pieces, i, k = [], 0, 0
    while i < len(text):
        n = cuts[k % len(cuts)]
        pieces.append(text[i:i + n])
        i, k = i + n, k + 1
    clauses = split(text, pieces, first_min_words=first_min, long_words=12, max_words=24)
    assert _alpha_words(" ".join(clauses)) == _alpha_words(strip_markdown(text))
    assert all(c.strip() and c == c.strip() for c in clauses)
    assert all(count_words(c) > 0 for c in clauses)
    if len(clauses) > 1:
        assert count_words(clauses[0]) >= first_min


def test_first_clause_is_cut_when_no_break_comes() -> None:
    s = ClauseSplitter(first_min_words=4, first_max_words=6)
    out = []
    for word in "xn urf tpj ctdqe ihefnfewg rfv bbk zjhrgs dl je".split():
        out += s.push(word + " ")
    # Six words, cut at a word boundary; the rest waits for a sentence end as usual.
    assert out[0] == "xn urf tpj ctdqe ihefnfewg rfv"
    assert len(out) == 1
    assert s.flush() == ["bbk zjhrgs dl je"]


def test_first_clause_with_a_break_is_unaffected_by_the_cap() -> None:
    s = ClauseSplitter(first_min_words=4, first_max_words=6)
    out = []
    for piece in ["The capital", " of France is", " Paris, a city", " of lights."]:
        out += s.push(piece)
    assert out[0] == "The capital of France is Paris,"
