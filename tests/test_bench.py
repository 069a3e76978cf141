"""`edge-voice bench` runs on the dev profile and its JSON report is well formed.

Only the shape is checked here: the numbers are for the benchmark, not for timed tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from edge.devtools.bench import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_bench_dev_profile_json_and_plot(tmp_path: Path) -> None:
    plot, timeline = tmp_path / "waterfall.png", tmp_path / "timeline.png"
    # As a slightly slower CPU (a cgroup quota: CI runs as root), with the timeline recorded.
    proc = subprocess.run([sys.executable, "-m", "edge", "bench", "--profile", "dev", "--turns", "1", "--json",
                           "--plot", str(plot), "--cpu-quota", "0.9", "--timeline", str(timeline)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["profile"] == "dev" and report["turns"] == 1
    for key in STAGES:
        v = report["stages_ms"][key]
        assert v["n"] == 1 and math.isfinite(v["p50"]) and math.isfinite(v["p90"]), key
    # Ordered milestones of one turn. A reply started at the pause may have its first token
    # before the endpoint, but nothing is heard before the question is final.
    s = {k: v["p50"] for k, v in report["stages_ms"].items()}
    assert s["endpoint_delay"] <= s["stt_final"] <= s["end_of_speech_to_first_audio"]
    assert s["llm_first_token"] <= s["first_clause"] <= s["tts_first_audio"] <= s["end_of_speech_to_first_audio"] + 1
    base = report["baseline_ms"]["end_of_speech_to_first_audio"]["p50"]
    assert base > 0 and report["baseline_ratio"] == round(base / s["end_of_speech_to_first_audio"], 2)
    assert report["llm"]["generation_tokens_per_s_plain"] > 0
    assert report["llm"]["prefill_tokens_per_s"] > 0
    assert 0 < report["wake_vad_cpu_percent"] < 100
    assert report["peak_rss_mb"] > 100
    assert 0 < report["stt_rtf"] < 5 and 0 < report["tts_rtf"] < 5
    assert report["median_turn"]["transcript"] and report["median_turn"]["reply"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["machine"]["cpu_quota"] == 0.9
    # The timeline: decodes before the end of the question, the reply's prompt and generation,
    # a synthesis before the first audio; milestones in order.
    turn = report["median_turn"]
    kinds = {sp["kind"] for sp in turn["spans"]}
    assert {"stt", "llm-prompt", "llm-gen", "tts"} <= kinds, kinds
    assert all(sp["start_ms"] <= sp["end_ms"] for sp in turn["spans"])
    assert min(sp["start_ms"] for sp in turn["spans"] if sp["kind"] == "stt") < 0
    first_tts = min(sp["start_ms"] for sp in turn["spans"] if sp["kind"] == "tts")
    assert first_tts <= s["end_of_speech_to_first_audio"] + 1
    marks = [mk["type"] for mk in turn["marks"]]
    assert marks[0] == "speech.start" and "transcript.final" in marks and marks[-1] == "tts.start", marks
    assert timeline.stat().st_size > 10_000 and timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_arguments() -> None:
    for args, line in ((["--turns", "0"], "--turns must be at least 1"),
                       (["--cpu-quota", "2"], "--cpu-quota must be between 0.05 and 1"),
                       (["--cpu-quota", "0.5", "--slow"], "--cpu-quota and --slow both set the speed")):
        proc = subprocess.run([sys.executable, "-m", "edge", "bench", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and f"edge-voice: error: {line}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_cpu_quota_moves_the_process_into_a_limited_group_and_back() -> None:
    from edge.devtools.cpulimit import PERIOD_US, limit_cpu

    def group() -> str:
        # cgroup v1: the line whose controllers include cpu; else v2's one line.
        rows = [ln.split(":", 2) for ln in Path("/proc/self/cgroup").read_text().splitlines()]
        v1 = [r[2] for r in rows if "cpu" in r[1].split(",")]
        return v1[0] if v1 else next(r[2] for r in rows if r[0] == "0")

    before = group()
    limit = limit_cpu(0.5)
    try:
        assert limit.group.name in group()
        quota = limit.group / "cpu.cfs_quota_us"
        if quota.exists():
            assert int(quota.read_text()) == int(0.5 * (os.cpu_count() or 1) * PERIOD_US)
        else:
            assert (limit.group / "cpu.max").read_text().split() == [
                str(int(0.5 * (os.cpu_count() or 1) * PERIOD_US)), str(PERIOD_US)]
    finally:
        limit.release()
    assert group() == before and not limit.group.exists()
