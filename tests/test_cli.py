"""The command line as a user meets it: bad input gives one line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from voice import conversation, wer

from edge.audio.wav import read_wav, write_wav
from edge.config import example_toml

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "config" / "dev.toml"


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    import os

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=full_env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-voice: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "q.wav"
    write_wav(path, conversation(0.6, "Hey Jarvis.", 0.4, "What is the capital of France?", 1.5), 16000)
    return path


@pytest.mark.parametrize("sox_args", [
    ["-c", "2", "-r", "44100", "-e", "floating-point", "-b", "32"],
    ["-c", "1", "-r", "8000", "-e", "unsigned-integer", "-b", "8"],
    ["-c", "2", "-r", "48000", "-e", "signed-integer", "-b", "24"],
])
def test_other_wav_formats_are_converted(question_wav: Path, tmp_path: Path, sox_args: list[str]) -> None:
    out = tmp_path / "converted.wav"
    subprocess.run(["sox", str(question_wav), *sox_args, str(out)], check=True)
    samples, info = read_wav(out)
    original, _ = read_wav(question_wav)
    assert info.rate == int(sox_args[3]) and info.channels == int(sox_args[1])
    assert abs(len(samples) - len(original)) <= 16
    # Same signal after the round trip (8 kHz loses the top band, so compare loosely).
    n = min(len(samples), len(original))
    corr = np.corrcoef(samples[:n].astype(float), original[:n].astype(float))[0, 1]
    assert corr > (0.6 if info.rate == 8000 else 0.95), corr


def test_simulate_on_stereo_float_44k(question_wav: Path, tmp_path: Path) -> None:
    wav = tmp_path / "stereo.wav"
    subprocess.run(["sox", str(question_wav), "-c", "2", "-r", "44100", "-e", "floating-point", "-b", "32",
                    str(wav)], check=True)
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(wav))
    assert proc.returncode == 0, proc.stderr
    finals = [json.loads(line) for line in proc.stdout.splitlines() if '"transcript.final"' in line]
    assert finals and wer("What is the capital of France?", finals[0]["text"]) <= 0.1


def test_missing_input(tmp_path: Path) -> None:
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(tmp_path / "nope.wav"))
    assert_one_line_error(proc, "nope.wav", "not found")


def test_not_a_wav(tmp_path: Path) -> None:
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(bad))
    assert_one_line_error(proc, "notes.wav", "not a WAV")


def test_truncated_wav(question_wav: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.wav"
    data = question_wav.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(cut))
    assert_one_line_error(proc, "cut.wav", "truncated")


def test_missing_models_name_the_fetch_command(question_wav: Path, tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    env = {"EDGE_VOICE_DEVICE__MODELS_DIR": str(empty)}
    proc = run_cli("simulate", "--config", str(DEV), "--input", str(question_wav), env=env)
    assert_one_line_error(proc, "edge-voice models fetch", "--model whisper-tiny-en", str(empty))
    check = run_cli("check", "--config", str(DEV), env=env)
    assert check.returncode == 1
    assert "MISSING" in check.stdout and "edge-voice models fetch" in check.stdout


def test_check_passes_on_the_dev_config() -> None:
    proc = run_cli("check", "--config", str(DEV))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check passed" in proc.stdout
    for model in ("openwakeword", "whisper-tiny-en", "silero-vad", "smollm2-135m-instruct", "piper-en-us-joe-medium"):
        assert model in proc.stdout


@pytest.mark.parametrize("text, needles", [
    ("[llm]\nn_ctxx = 5\n", ["llm.n_ctxx", "unknown key"]),
    ("[llm]\nn_ctx = 'big'\n", ["llm.n_ctx", "expected an integer"]),
    ("[stt]\nengine = 'magic'\n", ["stt.engine", "not one of"]),
    ("[speakers]\n", ["speakers", "unknown section"]),
    ("[llm\n", ["not valid TOML"]),
    ("[device]\nid = 'Kiosk 1'\n", ["device.id", "a-z"]),
])
def test_bad_config_is_one_line(tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    proc = run_cli("check", "--config", str(cfg))
    assert_one_line_error(proc, str(cfg), *needles)


def test_bad_environment_override_names_the_variable() -> None:
    proc = run_cli("check", "--config", str(DEV), env={"EDGE_VOICE_LLM__N_CTX": "lots"})
    assert_one_line_error(proc, "EDGE_VOICE_LLM__N_CTX", "expected an integer")


def test_missing_config_file(tmp_path: Path) -> None:
    proc = run_cli("check", "--config", str(tmp_path / "none.toml"))
    assert_one_line_error(proc, "none.toml", "not found")


def test_example_config_is_complete_and_current() -> None:
    assert (REPO / "config" / "example.toml").read_text() == example_toml(), \
        "config/example.toml is stale: regenerate it with `python -m edge.config > config/example.toml`"


def test_sox_is_installed() -> None:
    assert shutil.which("sox"), "scripts/setup installs sox"
