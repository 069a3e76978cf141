"""Text normalisation for matching and answer scoring."""

from __future__ import annotations

from edge.knowledge.text import normalize, numbers_to_digits, stem, terms


def test_normalize() -> None:
    assert normalize("What's the Wi-Fi password?") == "what is the wifi password"
    assert normalize("Where's the CAFÉ? It's 4.15 p.m.!") == "where is the cafe it is 4:15 pm"
    assert normalize("We open at 10am, don't we") == "we open at 10 am do not we"
    assert normalize("The Children's Harbour") == "the children harbour"
    assert normalize("  \u2019  ") == ""


def test_terms_drop_fillers_and_stopwords_and_join_compounds() -> None:
    assert terms("um where are the toilets please") == ["where", "toilet"]
    assert terms("is the museum wheel chair friendly", keep={"wheelchair"}) == ["museum", "wheelchair", "friendly"]
    assert terms("is the museum wheel chair friendly") == ["museum", "wheel", "chair", "friendly"]
    assert terms("tickets parking photographs") == ["ticket", "park", "photograph"]


def test_stem() -> None:
    assert [stem(w) for w in ("tickets", "parking", "stopped", "boxes", "tables", "ladies", "bus", "is")] == [
        "ticket", "park", "stop", "box", "table", "lady", "bus", "is"]


def test_numbers_to_digits() -> None:
    assert numbers_to_digits("Twelve pounds, twenty five minutes") == "12 pounds 25 minutes"
    assert numbers_to_digits("one hundred and thirty") == "100 and 30"
    assert numbers_to_digits("from ten until 5") == "from 10 until 5"
