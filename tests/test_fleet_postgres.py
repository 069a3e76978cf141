"""`edge-voice fleet record` into PostgreSQL (a private server on a loopback port): two consumers
on one shared subscription store every event once, the columns can be searched and counted,
and a database that goes away for a while costs nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mosquitto import Mosquitto
from postgres import Postgres
from procs import stop_process

from edge.fleet.simulate import WorkerProcess, start_workers
from edge.fleet.store import PostgresStore, open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres().start()
    try:
        yield server
    finally:
        server.close()


def _record(broker: Mosquitto, db: str, client_id: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "edge", "fleet", "record", "--db", db, "--share", "pg", "--client-id",
                          client_id, "--host", broker.host, "--port", str(broker.port), "--json",
                          "--log-level", "info"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert p.stderr is not None
    for line in p.stderr:
        if "recording events" in line:
            return p
    raise AssertionError(f"record did not start (exit {p.wait()})")


def _emitted(worker: WorkerProcess) -> dict[str, int]:
    return {d: v["emitted"] for d, v in worker.report()["devices"].items()}


def test_two_consumers_store_every_event_once_in_postgresql(pg: Postgres, tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        worker = start_workers(devices=4, processes=1, host=broker.host, port=broker.port, prefix="edge",
                               state_dir=tmp_path / "devices", log_dir=tmp_path)[0]
        recorders: list[subprocess.Popen] = []
        try:
            worker.wait_for("ready", 60)
            recorders = [_record(broker, pg.url, "pg-a"), _record(broker, pg.url, "pg-b")]
            worker.send("start 1")
            time.sleep(3)
            pg.restart(down_s=2.0)  # the consumers retry; the broker keeps the events meanwhile
            time.sleep(3)
            worker.send("stop")
            time.sleep(7)  # the turns under way end
            emitted = _emitted(worker)
            total = sum(emitted.values())
            store = open_store(pg.url)
            assert isinstance(store, PostgresStore)
            deadline = time.monotonic() + 60
            while store.count() < total and time.monotonic() < deadline:
                time.sleep(0.2)
            counts = store.by_device()
            assert sorted(counts) == sorted(emitted)
            for device, n in emitted.items():
                c = counts[device]
                assert (c.rows, c.distinct_seq, c.min_seq, c.max_seq) == (n, n, 1, n), (device, c)

            db = store._db  # the columns, as an operator would query them
            with db.transaction():
                types = dict(db.execute("SELECT column_name, data_type FROM information_schema.columns "
                                        "WHERE table_name = 'events'").fetchall())
                assert types["time"] == "timestamp with time zone" and types["payload"] == "jsonb"
                finals = db.execute("SELECT COUNT(*) FROM events WHERE type = 'transcript.final' "
                                    "AND text ILIKE '%exit%'").fetchone()
                assert finals is not None and finals[0] >= 1
                turns = db.execute("SELECT device_id, COUNT(DISTINCT turn_id) FROM events WHERE type = 'turn.end' "
                                   "GROUP BY device_id").fetchall()
                assert len(turns) == 4 and all(n >= 1 for _, n in turns)
                recent = db.execute("SELECT COUNT(*) FROM events WHERE time > now() - interval '10 minutes' "
                                    "AND payload->>'device_id' = device_id").fetchone()
                assert recent is not None and recent[0] == total
            store.close()
        finally:
            worker.send("stop")
            worker.quit(30)
            finals = []
            for p in recorders:
                stop_process(p, 20)
                out = p.stdout.read() if p.stdout else ""
                finals.append(out.strip().splitlines()[-1] if out.strip() else "")
    import json

    stats = [json.loads(f) for f in finals]
    assert sum(s["stored"] for s in stats) == total and all(s["stored"] > 0 for s in stats)
    assert sum(s["store_errors"] for s in stats) >= 1  # the restart was felt, and survived


def test_a_wrong_password_or_database_is_one_line(pg: Postgres, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for url, fragment in ((pg.url.replace("edge-test-pw", "nope"), "password authentication failed"),
                          (pg.url.rsplit("/", 1)[0] + "/nosuchdb", 'database "nosuchdb" does not exist')):
        proc = subprocess.run([sys.executable, "-m", "edge", "fleet", "record", "--db", url, "--port", "1"],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edge-voice: error: cannot reach the database postgresql://edge:***@")
        assert fragment in lines[0] and "nope" not in lines[0]
