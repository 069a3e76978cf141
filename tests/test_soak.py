"""The soak and chaos run (scripts/soak): its rules on plain data, the daemon's log lines it follows,
the FIFO microphone it drives, and a short run of the real thing: at least 50 turns through
`edge-voice run`, two broker restarts and a SIGKILL, with the same assertions as the long run."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge.audio.chunk import CHUNK_SAMPLES
from edge.audio.devices import FileMicrophone
from edge.config import load_config
from edge.devtools import soak_report as rep
from edge.devtools.soak import write_config
from edge.devtools.soak_proc import _LINE, Sample
from edge.devtools.soak_script import LONG_QUESTIONS, QUESTIONS, Clip, make_plan
from edge.events import Event, EventType

REPO = Path(__file__).resolve().parents[1]


# --- the FIFO microphone: its writer sets the pace ------------------------------------------------

def _audio(seconds: float) -> np.ndarray:
    n = int(seconds * 16000)
    return (1000 * np.sin(np.arange(n) * 0.05)).astype(np.int16)


def test_a_fifo_microphone_reads_as_fast_as_its_writer_writes(tmp_path, monkeypatch):
    import edge.audio.devices as devices

    slept: list[float] = []
    monkeypatch.setattr(devices.time, "sleep", slept.append)
    path = tmp_path / "mic.pcm"
    os.mkfifo(path)
    audio = _audio(3.0)

    def write() -> None:
        with open(path, "wb") as out:  # blocks until the microphone opens the FIFO
            out.write(audio.astype("<i2").tobytes())

    writer = threading.Thread(target=write)
    writer.start()
    mic = FileMicrophone(path)
    mic.open()
    got = [mic.read(timeout=0.5) for _ in range(len(audio) // CHUNK_SAMPLES)]
    writer.join(5)
    mic.close()
    assert all(c is not None for c in got)
    assert np.array_equal(np.concatenate([c.samples for c in got if c is not None]), audio)
    assert slept == []  # 3 s of audio were read without waiting for the clock


def test_a_regular_file_is_still_read_in_real_time(tmp_path, monkeypatch):
    import edge.audio.devices as devices

    slept: list[float] = []
    monkeypatch.setattr(devices.time, "sleep", slept.append)
    path = tmp_path / "mic.pcm"
    path.write_bytes(_audio(1.0).astype("<i2").tobytes())
    mic = FileMicrophone(path)
    mic.open()
    for _ in range(50):
        mic.read(timeout=0.5)
    mic.close()
    assert len(slept) >= 40 and all(0 < s <= 0.5 for s in slept)


class _Reader:
    """The daemon's end of the FIFO: reads everything until closed."""

    def __init__(self, path: Path) -> None:
        self.data = bytearray()
        self._f = open(path, "rb", buffering=0)  # closed by close()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                block = self._f.read(4096)
            except (OSError, ValueError):
                return
            if not block:
                return
            self.data += block

    def samples(self, nonzero: int, timeout: float) -> np.ndarray:
        """What was read, once at least ``nonzero`` non-zero samples were (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while True:
            got = np.frombuffer(bytes(self.data[: len(self.data) // 2 * 2]), dtype="<i2")
            if np.count_nonzero(got) >= nonzero or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def close(self) -> None:
        self._f.close()


def test_the_feeder_writes_its_segments_and_waits_out_a_dead_reader(tmp_path):
    from edge.devtools.soak_proc import Feeder

    path = tmp_path / "mic.pcm"
    os.mkfifo(path)
    feeder = Feeder(path, fast_factor=50)
    feeder.start()
    try:
        reader = _Reader(path)
        assert feeder.connected.wait(10)
        audio = _audio(2.0) | 1  # never zero: told apart from the silence written between segments
        seg = feeder.play(audio, fast=True)
        assert seg.wait(30) and not seg.cut and seg.started is not None and seg.ended is not None
        got = reader.samples(len(audio), timeout=10)  # the last writes may still be in the pipe
        assert np.array_equal(got[got != 0][: len(audio)], audio)
        reader.close()  # the daemon was killed
        cut = feeder.play(_audio(5.0))
        assert cut.wait(30) and cut.cut
        second = _Reader(path)  # its successor opens the microphone
        assert feeder.connected.wait(10) and feeder.connections == 2
        again = feeder.play(audio, fast=True)
        assert again.wait(30) and not again.cut
        second.close()
    finally:
        feeder.close()


# --- the daemon's log lines, as the daemon writes them --------------------------------------------

def test_the_log_lines_the_run_follows_are_the_daemons_own():
    from edge.daemon import _log_event
    from edge.logs import setup_logging

    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    setup_logging("info", "soak", target="stderr", environ={}, stream=stream)
    try:
        _log_event(Event(EventType.WAKE, {"word": "hey_jarvis", "score": 0.99}, turn_id="t1"))
        _log_event(Event(EventType.BARGE_IN, {"word": "hey_jarvis"}, turn_id="t0"))
        _log_event(Event(EventType.TURN_END, {"outcome": "done", "timings_ms": {"end_of_speech_to_first_audio": 700.0}},
                         turn_id="t1"))
        _log_event(Event(EventType.STATE, {"state": "idle"}))  # not logged
        logging.getLogger("edge.daemon").info("ready")
        logging.getLogger("edge.daemon").info("models ready")  # not the daemon's ready
    finally:
        for h in [h for h in root.handlers if getattr(h, "_edge_voice", False)]:
            root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)
    parsed = [m.groups() for m in map(_LINE.search, stream.getvalue().splitlines()) if m]
    assert [(kind, turn) for kind, _detail, turn in parsed] == [
        ("wake", "t1"), ("barge_in", "t0"), ("turn.end", "t1"), ("ready", None)]
    assert parsed[2][1].split()[0] == "done"


# --- the plan ------------------------------------------------------------------------------------

def _clips() -> list[Clip]:
    return [Clip(f"v/{i}", "v", q, np.zeros(16000, dtype=np.int16), 0.7, 0.99, True)
            for i, q in enumerate(QUESTIONS + LONG_QUESTIONS)]


def test_the_plan_is_seeded_and_has_every_kind_and_its_chaos():
    a = make_plan(7, 60, _clips(), kills=2, broker_restarts=3, kill_span=0.5)
    assert a == make_plan(7, 60, _clips(), kills=2, broker_restarts=3, kill_span=0.5)
    assert a != make_plan(8, 60, _clips(), kills=2, broker_restarts=3, kill_span=0.5)
    assert len(a.items) == 60 and a.items[0].kind == "ask"
    assert all(a.count(k) >= 1 for k in ("ask", "barge", "silence", "noise"))
    long = {c.name for c in _clips() if c.question in LONG_QUESTIONS}
    assert all(i.clips[0] in long and i.clips[1] not in long for i in a.items if i.kind == "barge")
    kills = [c for c in a.chaos if c.what == "kill"]
    brokers = [c for c in a.chaos if c.what == "broker"]
    assert len(kills) == 2 and all(3 <= c.item < 30 for c in kills)
    assert len(brokers) == 3 and all(3.0 <= c.down_s <= 15.0 for c in brokers)


def test_visitors_ask_a_few_questions_each():
    plan = make_plan(2, 200, _clips(), kills=0, broker_restarts=0, visitor_turns=4)
    asked = [i for i in plan.items if i.kind in ("ask", "barge")]
    starts = [k for k, i in enumerate(asked) if i.new_visitor]
    runs = [b - a for a, b in zip([0, *starts], [*starts, len(asked)])]
    assert not asked[0].new_visitor and all(1 <= r <= 7 for r in runs) and 20 <= len(runs) <= 80
    assert not any(i.new_visitor for i in plan.items if i.kind in ("silence", "noise"))
    assert not any(i.new_visitor for i in make_plan(2, 200, _clips(), kills=0, broker_restarts=0,
                                                    visitor_turns=0).items)


def test_clips_the_wake_model_misses_alone_are_not_used():
    clips = [Clip(c.name, c.voice, c.question, c.audio, c.wake_end_s, 0.2, c.name != "v/0") for c in _clips()]
    plan = make_plan(1, 40, clips, kills=0, broker_restarts=0)
    assert all("v/0" not in i.clips for i in plan.items)


# --- the rules -----------------------------------------------------------------------------------

def _samples(rss: list[int], boot: int = 1, fds: int = 30) -> list[Sample]:
    return [Sample(float(i), boot, i, r, r // 2, 20, fds, i * 0.1, 0) for i, r in enumerate(rss)]


def test_memory_growth_is_judged_after_warm_up_within_one_process():
    ends = [float(t) for t in range(10, 200, 5)]  # 38 answered turns
    # a jump during warm-up (the first 15 turns end by t=80), flat after it
    flat = rep.growth(1, _samples([500_000] * 75 + [700_000] * 125), ends)
    assert flat is not None and flat.rss_growth_pct == 0.0 and flat.turns_after_warmup == 23
    leak = rep.growth(1, _samples([700_000 + 500 * i for i in range(200)]), ends)
    assert leak is not None and leak.rss_growth_pct > 5
    assert rep.growth(2, _samples([1] * 200), ends) is None  # no samples of that boot
    assert rep.growth(1, _samples([1] * 200), ends[:15]) is None  # nothing after warm-up


def test_delivery_counts_gaps_duplicates_and_conflicts():
    d = rep.delivery(6, [1, 2, 2, 4, 5, 6, None], duplicates=3, outbox_dropped=0)
    assert (d.produced, d.received, d.lost, d.lost_seqs, d.duplicates, d.seq_conflicts) == (6, 5, 1, (3,), 3, 1)
    assert rep.delivery(3, [1, 2, 3], 0, 0).lost == 0


def test_a_turn_lost_with_a_kill_is_told_apart_from_a_lost_one():
    logged = [("a", 10.0, 1), ("b", 19.5, 1), ("c", 30.0, 2), ("d", 40.0, 2)]
    by_kill, lost = rep.turn_ends_lost(logged, {"a", "d"}, kills=[(1, 20.0)])
    assert by_kill == ["b"] and lost == ["c"]


def _report(**over) -> dict:
    base = {
        "turns": {"answered": 10, "expected_answers": 10, "unanswered_items": []},
        "wakes": {"missed": 0, "missed_items": []},
        "stuck": [],
        "events": {"lost": 0, "lost_seqs": [], "seq_conflicts": 0, "outbox_dropped": 0, "turn_ends_lost": [],
                   "outbox_left": 0},
        "restarts": {"unexpected_exits": [], "not_back": False, "final_exit": 0},
        "resources": {"judged": {"boot": 2, "rss_growth_pct": 1.0, "rss_first_mb": 700, "rss_last_mb": 707,
                                 "threads_first": 20, "threads_last": 20, "fds_first": 30, "fds_last": 31}},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        base[section] = value if not field else {**base[section], field: value}
    return base


@pytest.mark.parametrize("over,words", [
    ({"turns__answered": 9}, "expected answer"),
    ({"wakes__missed": 1, "wakes__missed_items": [4]}, "missed wake"),
    ({"stuck": [{"item": 3, "note": ""}]}, "stuck"),
    ({"events__lost": 2, "events__lost_seqs": [5, 6]}, "lost"),
    ({"events__turn_ends_lost": ["x"]}, "never reached the fleet"),
    ({"restarts__unexpected_exits": [{"boot": 1, "code": 1}]}, "by itself"),
    ({"resources__judged": {"boot": 2, "rss_growth_pct": 6.0, "rss_first_mb": 700, "rss_last_mb": 742,
                            "threads_first": 20, "threads_last": 20, "fds_first": 30, "fds_last": 30}}, "RSS grew"),
    ({"resources__judged": {"boot": 2, "rss_growth_pct": 0.0, "rss_first_mb": 700, "rss_last_mb": 700,
                            "threads_first": 20, "threads_last": 20, "fds_first": 30, "fds_last": 40}}, "open files"),
    ({"resources": {"judged": None}}, "judge its memory"),
])
def test_each_rule_fails_the_run(over, words):
    assert rep.verdict(_report(), rep.Limits()) == []
    fails = rep.verdict(_report(**over), rep.Limits())
    assert len(fails) == 1 and words in fails[0], fails


def test_the_generated_config_is_the_base_with_the_soak_settings(tmp_path):
    out = tmp_path / "config.toml"
    write_config(REPO / "config" / "dev.toml", out, {"llm": {"n_threads": 1}, "mqtt": {"enabled": True, "port": 1234},
                                                     "audio": {"input_device": f"file:{tmp_path / 'mic.pcm'}"}})
    cfg = load_config(out, environ={})
    base = load_config(REPO / "config" / "dev.toml", environ={})
    assert cfg.llm.n_threads == 1 and cfg.llm.model == base.llm.model and cfg.llm.max_tokens == base.llm.max_tokens
    assert cfg.mqtt.enabled and cfg.mqtt.port == 1234 and cfg.wake == base.wake and cfg.stt == base.stt


def _soak(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "edge.devtools.soak", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.mark.parametrize("args,words", [
    (["--turns", "0"], "--turns must be at least 1"),
    (["--config", "no/such.toml"], "no/such.toml: no such config file"),
    (["--fast", "100"], "--fast must be between 1 and 50"),
])
def test_bad_input_is_one_line(args, words):
    proc = _soak(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"scripts/soak: error: {words}"], proc.stderr


# --- the real thing, short ------------------------------------------------------------------------

@pytest.mark.slow
def test_short_soak_of_the_real_daemon_with_broker_restarts_and_a_kill(tmp_path):
    report_path = tmp_path / "soak.json"
    proc = _soak("--turns", "50", "--broker-restarts", "2", "--kills", "1", "--kill-span", "0.3", "--seed", "3",
                 "--report", str(report_path), "--workdir", str(tmp_path / "work"), timeout=2400)
    log = tmp_path / "work" / "daemon.log"
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:] + tail
    r = json.loads(report_path.read_text())
    assert r["passed"] and r["failures"] == []
    t = r["turns"]
    assert t["items"] == t["played"] == 50
    # every turn that was not cut by the kill was answered; a few were asked at all
    assert t["answered"] == t["expected_answers"] >= 30
    assert r["wakes"]["missed"] == 0 and r["wakes"]["caught"] >= t["expected_answers"]
    assert r["barge_in"]["items"] >= 1 and r["stuck"] == []
    assert r["broker"]["restarts"] >= 2 and r["restarts"]["kills"] >= 1 and r["restarts"]["restarts"] >= 1
    assert r["restarts"]["unexpected_exits"] == [] and r["restarts"]["final_exit"] == 0
    ev = r["events"]
    assert ev["produced"] > 10 * t["answered"] and ev["received"] == ev["produced"] and ev["lost"] == 0
    assert ev["turn_ends_lost"] == [] and ev["outbox_left"] == 0 and ev["outbox_dropped"] == 0
    judged = r["resources"]["judged"]
    assert judged is not None and judged["rss_growth_pct"] < 5.0 and judged["turns_after_warmup"] >= 15
    assert r["latency"]["all"]["n"] >= t["answered"]
    assert "PASS" in proc.stdout.splitlines()[-1]
    print(proc.stdout[-4000:])  # the figures, for `pytest -rP`


def test_the_arena_measurement_prints_memory_after_each_call(capsys):
    """`python -m edge.devtools.arena`: what the README's memory steps were measured with."""
    from edge.devtools.arena import anon_mb, main

    assert anon_mb() > 0
    assert main(["--stt", "2", "--tts", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for stage in ("stt", "tts"):
        line = next(x for x in out.splitlines() if x.startswith(f"{stage}: "))
        assert "MB before" in line and "at the end" in line, out
    assert main(["--stt", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--stt" in err
