"""The systemd unit: it verifies, its exposure score, its contract, and the stack running under it.

PID 1 here is not systemd, so the unit cannot be started. Instead:
- ``systemd-analyze verify --root=<image>`` checks the committed file, byte for byte, inside a
  throw-away root that looks like an installed device (the distribution's unit files, and an
  executable at the ExecStart path);
- ``systemd-analyze security --offline=yes`` scores it;
- tests/unit_sandbox.py applies the unit's restrictions with the same kernel mechanisms
  systemd uses (namespaces, read-only bind mounts, a devices cgroup, seccomp filters,
  dropped credentials) and runs onnxruntime, sherpa-onnx and llama.cpp on dev models under them.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest

from edge.config import load_config

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-voice.service"
SYSUSERS = REPO / "systemd" / "edge-voice.sysusers.conf"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.0  # the issue allows 3.0; the unit is at 1.5, keep it under 2

HARDENING = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
    "ProtectHostname", "ProtectProc", "PrivateMounts", "UMask", "RestrictAddressFamilies",
    "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    "MemoryDenyWriteExecute", "RemoveIPC", "CapabilityBoundingSet", "SystemCallArchitectures",
    "SystemCallFilter", "SystemCallErrorNumber", "DevicePolicy", "MemoryHigh", "MemoryMax",
    "MemorySwapMax", "OOMScoreAdjust", "WatchdogSec", "LoadCredential",
)

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _sections(text: str) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            current = out.setdefault(s.strip("[]"), {})
        elif s and not s.startswith("#") and "=" in s:
            k, v = s.split("=", 1)
            current.setdefault(k, []).append(v)
    return out


def _device_root(tmp_path: Path, unit_text: str) -> Path:
    """A root that looks like an installed device: system units, the venv's entry point, our unit."""
    if not SYSTEM_UNITS.is_dir():
        pytest.skip("no system unit directory to build a root from")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    exec_start = _sections(unit_text)["Service"]["ExecStart"][0].split()[0]
    binary = root / exec_start.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/edge-voice.service").write_text(unit_text)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "edge-voice.service"],
                          capture_output=True, text=True, timeout=60)


@needs_analyze
def test_unit_verifies_without_warnings(tmp_path):
    result = _verify(_device_root(tmp_path, UNIT.read_text()))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path):
    """The check above can fail: a misspelt setting and a missing binary are both reported."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHomes=yes")
    root = _device_root(tmp_path, broken)
    assert "Unknown key 'ProtectHomes'" in _verify(root).stderr
    (root / "opt/edge-voice/venv/bin/edge-voice").unlink()
    assert "is not executable" in _verify(root).stderr


@needs_analyze
def test_exposure_score():
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for edge-voice\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"\nsystemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, result.stdout


def test_every_hardening_line_says_why():
    """Each setting sits under a comment (settings that are one decision may share it)."""
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    seen = set()
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0]
        if key not in HARDENING:
            continue
        seen.add(key)
        j = i - 1
        while j >= 0 and lines[j] and not lines[j].startswith("#"):
            j -= 1  # another setting of the same block
        assert j >= 0 and lines[j].startswith("#"), f"line {i + 1} ({line}) has no comment saying why"
    assert seen == set(HARDENING), f"missing from the unit: {set(HARDENING) - seen}"


def test_unit_contract_with_the_daemon():
    sections = _sections(UNIT.read_text())
    unit, svc = sections["Unit"], sections["Service"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["ExecStart"] == ["/opt/edge-voice/venv/bin/edge-voice run --config /etc/edge-voice/config.toml"]
    assert svc["Restart"] == ["on-failure"]
    assert "StartLimitIntervalSec" in unit and "StartLimitBurst" in unit
    assert svc["WatchdogSec"] and svc["TimeoutStopSec"]
    assert svc["User"] == ["edge-voice"] and "audio" in svc["SupplementaryGroups"][0].split()
    for key in ("StateDirectory", "CacheDirectory", "ConfigurationDirectory"):
        assert svc[key] == ["edge-voice"], key
    assert svc["DevicePolicy"] == ["closed"] and svc["DeviceAllow"] == ["char-alsa rw"]
    # The credential reaches the daemon's config through the documented override.
    cred_id = svc["LoadCredential"][0].split(":")[0]
    env = dict(e.split("=", 1) for e in svc["Environment"])
    path = env["EDGE_VOICE_MQTT__PASSWORD_FILE"].replace("%d", "/run/credentials/edge-voice.service")
    assert path == f"/run/credentials/edge-voice.service/{cred_id}"
    cfg = load_config(None, environ={"EDGE_VOICE_MQTT__PASSWORD_FILE": path})
    assert cfg.mqtt.password_file == path


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_creates_the_user_in_audio(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "etc/group").write_text("root:x:0:\naudio:x:29:\n")
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True,
                   capture_output=True, timeout=60)
    passwd = (tmp_path / "etc/passwd").read_text()
    group = (tmp_path / "etc/group").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("edge-voice:"))
    assert int(user[2]) < 1000 and user[6].endswith("nologin")
    assert re.search(r"^audio:x:29:.*\bedge-voice\b", group, re.M)


# --- the inference stack under the unit's restrictions -------------------------------------

def _sandbox_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to build namespaces"
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze resolves the syscall groups"
    if not (ctypes.util.find_library("seccomp") or Path("/usr/lib/x86_64-linux-gnu/libseccomp.so.2").exists()
            or Path("/usr/lib/aarch64-linux-gnu/libseccomp.so.2").exists()):
        return "libseccomp not installed"
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        return "cannot create a mount namespace (needs CAP_SYS_ADMIN)"
    return None


@pytest.fixture
def devices_cgroup():
    """A cgroup-v1 devices cgroup for DevicePolicy=closed; None where there is no v1 controller."""
    base = Path("/sys/fs/cgroup/devices")
    if not base.is_dir():
        yield None
        return
    path = base / f"edge-voice-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        path.rmdir()  # the sandboxed process has exited: the cgroup is empty


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def test_inference_runs_under_the_unit_sandbox(tmp_path, devices_cgroup, smollm2_path, whisper_paths, wake_dir):
    why_not = _sandbox_available()
    if why_not:
        pytest.skip(why_not)
    from speech import say, silence

    audio = np.concatenate([silence(0.5), say("turn on the kitchen lights please"), silence(0.5)])
    speech = tmp_path / "speech.wav"
    with wave.open(str(speech), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(audio.astype("<i2").tobytes())

    # The installed models may live under /var/lib/edge-voice itself, which the sandbox covers
    # with its StateDirectory tmpfs: link them somewhere that stays visible first.
    staged = tmp_path / "models"
    for name, src in (("openwakeword", wake_dir), ("whisper-tiny.en", whisper_paths["encoder"].parent)):
        shutil.copytree(src, staged / name, copy_function=_link_or_copy)
    _link_or_copy(str(smollm2_path), str(staged / "llm.gguf"))
    models = "/var/lib/edge-voice/models"
    cmd = [sys.executable, str(REPO / "tests/unit_sandbox.py"), str(UNIT),
           "--bind-ro", f"{staged / 'openwakeword'}:{models}/openwakeword",
           "--bind-ro", f"{staged / 'whisper-tiny.en'}:{models}/whisper-tiny.en",
           "--bind-ro", f"{staged / 'llm.gguf'}:{models}/llm.gguf",
           "--bind-ro", f"{speech}:/var/lib/edge-voice/speech.wav",
           "--env", f"PYTHONPATH={REPO}"]
    if devices_cgroup is not None:
        cmd += ["--devices-cgroup", str(devices_cgroup)]
    cmd += ["--", sys.executable, str(REPO / "tests/sandbox_probe.py"), models, "/var/lib/edge-voice/speech.wav"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sandbox = json.loads(next(line[8:] for line in proc.stderr.splitlines() if line.startswith("SANDBOX ")))
    result = json.loads(proc.stdout)
    print("\nsandbox:", json.dumps(sandbox), "\nprobe:", json.dumps({k: result[k] for k in ("seconds", "maxrss_mb")}))

    assert sandbox["read_only_failures"] == []
    assert len(sandbox["seccomp"]) == 5, sandbox["seccomp"]
    failed = [name for name, ok in result["checks"].items() if not ok]
    if devices_cgroup is None:
        failed = [f for f in failed if not f.startswith("DevicePolicy")]
    assert failed == [], f"restrictions not in force inside the sandbox: {failed}"
    assert result["errors"] == {}, "\n".join(result["errors"].values())
    work = result["work"]
    assert work["tcp"] == "ping"
    assert 0.0 <= work["wake"] <= 1.0
    assert "kitchen lights" in work["stt"].lower()
    assert work["llm"].strip(), "llama.cpp generated nothing"
