"""``edge-voice eval`` through the real pipeline on the dev models and the sample venue's pack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "config" / "dev.toml"
PACK = REPO / "config" / "packs" / "harbour-museum"

QUESTIONS = """
[[question]]
text = "How much is a ticket?"
expect = { mentions_any = ["12"], faq = "ticket-prices" }

[[question]]
text = "Where can I park my bicycle?"
expect = { mentions_any = ["bicycle", "bike", "racks"] }

[[question]]
text = "Who won the football last night?"
expect = { fallback = true }
"""


def _pack_with(tmp_path: Path, questions: str) -> Path:
    pack = tmp_path / "pack"
    pack.mkdir()
    for name in ("pack.toml", "facts.md", "faq.toml"):
        shutil.copy(PACK / name, pack / name)
    (pack / "questions.toml").write_text(questions, encoding="utf-8")
    return pack / "questions.toml"


def _eval(questions: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EDGE_VOICE_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "edge", "eval", "--config", str(DEV), "--questions", str(questions),
                           "--log-level", "warning", *extra], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)


def test_eval_scores_a_venues_questions_by_path(tmp_path: Path, venue_cache: Path) -> None:
    proc = _eval(_pack_with(tmp_path, QUESTIONS), venue_cache, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["answerable"] == 2 and report["unanswerable"] == 1
    for key in ("accuracy", "fallback_precision", "fallback_recall", "faq_path"):
        assert key in report
    first = report["questions"][0]
    assert first["path"] == "faq" and first["faq_id"] == "ticket-prices" and first["correct"] is True
    assert report["faq_expected_hits"] == 1 and report["faq_path"] >= 1
    # The bicycle is in the facts: the LLM answers; football is nothing the pack is about: the fallback
    # line is said at once.
    assert [q["path"] for q in report["questions"][1:]] == ["llm", "fallback"]
    assert report["questions"][2]["fallback"] is True and report["questions"][2]["correct"] is True
    assert {"faq", "llm", "fallback"} <= set(report["latency_ms"])
    assert all(q["answer"] for q in report["questions"])
    assert "eval: 3/3" in proc.stderr


def test_eval_hears_spoken_questions(tmp_path: Path, venue_cache: Path) -> None:
    spoken = QUESTIONS.split("[[question]]\ntext = \"Who won")[0]  # the FAQ and the LLM question
    proc = _eval(_pack_with(tmp_path, spoken), venue_cache, "--audio", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    paths = [q["path"] for q in report["questions"]]
    assert paths[0] == "faq" and report["questions"][0]["faq_id"] == "ticket-prices", (report["questions"], proc.stderr)
    assert paths[1] == "llm" and report["questions"][1]["first_audio_ms"] > 0, (report["questions"], proc.stderr)


def test_a_bad_question_file_is_one_line_naming_the_file_and_line(tmp_path: Path, venue_cache: Path) -> None:
    questions = _pack_with(tmp_path, '[[question]]\ntext = "Fine?"\nexpect = { mention_any = ["x"] }\n')
    proc = _eval(questions, venue_cache)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edge-voice: error: {questions}:3:"), proc.stderr
