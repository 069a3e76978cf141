"""`edge-voice bench` runs on the dev profile and its JSON report is well formed.

Only the shape is checked here: the numbers are for the benchmark, not for timed tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from edge.devtools.bench import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_bench_dev_profile_json_and_plot(tmp_path: Path) -> None:
    plot = tmp_path / "waterfall.png"
    proc = subprocess.run([sys.executable, "-m", "edge", "bench", "--profile", "dev", "--turns", "1", "--json",
                           "--plot", str(plot)], cwd=REPO, capture_output=True, text=True, timeout=600)
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


def test_bench_rejects_bad_arguments() -> None:
    proc = subprocess.run([sys.executable, "-m", "edge", "bench", "--turns", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "edge-voice: error: --turns must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr
