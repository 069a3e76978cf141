"""The SQLite outbox on real files: order, sequence numbers, bounds, reopening, damage."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.mqtt.outbox import FILENAME, Outbox, OutboxError


def items(start: int, n: int, qos: int = 1) -> list[tuple[str, bytes, int]]:
    return [(f"edge/d/event/e{i}", json.dumps({"type": "wake", "n": i}).encode(), qos) for i in range(start, start + n)]


def seqs_and_ns(rows: list) -> list[tuple[int, int]]:
    return [(json.loads(r.payload)["seq"], json.loads(r.payload)["n"]) for r in rows]


def test_rows_come_back_in_order_with_sequence_numbers(tmp_path: Path) -> None:
    box = Outbox(tmp_path / FILENAME, 100)
    box.add(items(0, 3))
    box.add(items(3, 2))
    rows = box.pending(0, 10)
    assert seqs_and_ns(rows) == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    assert [r.topic for r in rows] == [f"edge/d/event/e{i}" for i in range(5)]
    assert box.pending(rows[1].id, 2) == rows[2:4]
    assert box.remove([rows[0].id, rows[2].id, 999999]) == 2
    assert box.depth == 3
    assert [r.id for r in box.pending(0, 10)] == [rows[1].id, rows[3].id, rows[4].id]
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_rows_sequence_and_drop_count(tmp_path: Path) -> None:
    box = Outbox(tmp_path / FILENAME, 4)
    assert box.add(items(0, 6)) == 2  # two oldest dropped
    assert (box.depth, box.dropped) == (4, 2)
    box.count_dropped(3)
    box.remove([box.pending(0, 1)[0].id])
    box.close()
    again = Outbox(tmp_path / FILENAME, 4)
    assert (again.depth, again.dropped, again.next_seq) == (3, 5, 7)
    assert [n for _, n in seqs_and_ns(again.pending(0, 10))] == [3, 4, 5]
    again.add(items(6, 1))
    assert seqs_and_ns(again.pending(0, 10))[-1] == (7, 6)  # numbers are never reused


def test_rows_committed_before_kill_9_survive(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    script = textwrap.dedent(f"""
        import json, os, signal
        from edge.mqtt.outbox import Outbox
        box = Outbox({str(path)!r}, 1000)
        for i in range(50):
            box.add([("edge/d/event/wake", json.dumps({{"n": i}}).encode(), 1)])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -9
    box = Outbox(path, 1000)
    assert [n for _, n in seqs_and_ns(box.pending(0, 100))] == list(range(50))


def test_a_damaged_outbox_is_moved_aside_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILENAME
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(path, 10)
    assert box.depth == 0
    box.add(items(0, 1))
    assert box.depth == 1
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "unreadable" in caplog.text and str(aside[0]) in caplog.text


def test_an_unusable_state_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(OutboxError) as info:
        Outbox(blocker / FILENAME, 10)
    assert str(blocker) in info.value.message and "EDGE_VOICE_STATE_DIR" in info.value.message


def test_other_processes_can_read_the_outbox_while_it_is_open(tmp_path: Path) -> None:
    box = Outbox(tmp_path / FILENAME, 10)
    box.add(items(0, 2))
    with sqlite3.connect(tmp_path / FILENAME) as other:
        assert other.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 2
