"""Logging setup: plain stderr lines, and structured entries in a real systemd-journald.

The journald test starts the distribution's systemd-journald in a private mount namespace
(tmpfs over /run/systemd and the journal directories, so the host is untouched), connects a
child's stderr to it the way systemd connects a service's (stream socket + $JOURNAL_STREAM),
and reads the entries back with journalctl.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.logs import MessageId, journal_stream_matches, log_fields, setup_logging, under_systemd

REPO = Path(__file__).resolve().parents[1]
JOURNALD = Path("/lib/systemd/systemd-journald")


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def test_stderr_lines_carry_turn_and_stage(root_logger):
    out = io.StringIO()
    assert setup_logging("info", "kiosk-7", environ={}, stream=out) == "stderr"
    log = logging.getLogger("edge.test")
    log.info("model loaded: %s", "llm", extra=log_fields(turn_id="t1", stage="llm",
                                                          message_id=MessageId.MODEL_LOADED))
    log.info("no turn yet", extra={"TURN_ID": None})
    log.debug("not shown at info")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(" INFO edge.test: model loaded: llm [turn=t1 stage=llm]")
    assert lines[1].endswith(" INFO edge.test: no turn yet")


def test_setup_twice_replaces_its_handler_and_rejects_bad_level(root_logger):
    out = io.StringIO()
    setup_logging("info", "a", environ={}, stream=out)
    setup_logging("warning", "a", environ={}, stream=out)
    logging.getLogger("edge.test").warning("once")
    logging.getLogger("edge.test").info("filtered")
    assert out.getvalue().count("once") == 1 and "filtered" not in out.getvalue()
    with pytest.raises(ConfigError, match="logging.level: 'loud'"):
        setup_logging("loud", "a", environ={})


def test_journal_stream_detection(tmp_path):
    with open(tmp_path / "stderr", "w") as f:
        st = os.fstat(f.fileno())
        assert journal_stream_matches({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not journal_stream_matches({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not journal_stream_matches({"JOURNAL_STREAM": "garbage"}, f.fileno())
        assert not journal_stream_matches({}, f.fileno())
        assert not under_systemd({}, f.fileno())


_CHILD = r"""
import logging, sys
if sys.argv[1] == "no-systemd-python":
    sys.modules["systemd"] = None  # as if the package were not installed
from edge.logs import MessageId, log_fields, setup_logging
where = setup_logging("info", "kiosk-7")
log = logging.getLogger("edge.test")
log.info("where=%s", where, extra={"TURN_ID": None})
log.info("model loaded: %s", "llm",
         extra=log_fields(turn_id="t1", stage="llm", message_id=MessageId.MODEL_LOADED))
log.warning("mic lost", extra=log_fields(stage="audio", message_id=MessageId.MIC_LOST))
log.debug("hidden at info")
"""

_NAMESPACE = r"""
import ctypes, json, os, signal, socket, subprocess, sys, time
child_code, journald = sys.argv[1], sys.argv[2]
for target in ("/run/systemd", "/run/log", "/var/log/journal"):
    if os.path.isdir(target):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
os.makedirs("/run/systemd/journal", exist_ok=True)
libc = ctypes.CDLL(None, use_errno=True)
jd = subprocess.Popen([journald], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      preexec_fn=lambda: libc.prctl(1, signal.SIGKILL))  # PR_SET_PDEATHSIG
try:
    for _ in range(100):
        if os.path.exists("/run/systemd/journal/stdout"):
            break
        time.sleep(0.05)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    pids = {}
    for mode in ("journal-stream", "no-systemd-python", "invocation-id"):
        child_env = dict(env)
        if mode == "invocation-id":
            # No journal stream (stderr is a pipe), but run by systemd: write to the journal.
            child_env["INVOCATION_ID"] = "0123456789abcdef0123456789abcdef"
            p = subprocess.Popen([sys.executable, "-c", child_code, mode], env=child_env,
                                 stderr=subprocess.PIPE)
            assert p.wait(timeout=60) == 0 and not p.stderr.read(), "logged to stderr, not the journal"
            pids[mode] = p.pid
            continue
        # What systemd does for StandardError=journal: a stream socket with a header, and
        # $JOURNAL_STREAM naming it so the service can recognise it.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("/run/systemd/journal/stdout")
        s.sendall(b"edge-voice\n\n6\n1\n0\n0\n0\n")
        st = os.fstat(s.fileno())
        child_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        p = subprocess.Popen([sys.executable, "-c", child_code, mode], env=child_env, stderr=s.fileno())
        s.close()
        assert p.wait(timeout=60) == 0
        pids[mode] = p.pid
    entries = []
    for _ in range(100):
        out = subprocess.run(["journalctl", "-D", "/run/log/journal", "-o", "json", "--no-pager"],
                             capture_output=True, text=True).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        if sum(1 for e in entries if "mic lost" in e.get("MESSAGE", "")) >= 3:
            break
        time.sleep(0.05)
    print(json.dumps({"pids": pids, "entries": entries}))
finally:
    jd.kill()
    jd.wait()
"""


def _run_with_journald_result() -> dict:
    if not JOURNALD.exists() or not shutil.which("journalctl") or not shutil.which("unshare"):
        pytest.skip("systemd-journald/journalctl/unshare not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a mount namespace here (needs CAP_SYS_ADMIN)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", _NAMESPACE,
                           _CHILD, str(JOURNALD)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _by_message(entries: list[dict], pid: int) -> dict[str, dict]:
    return {e["MESSAGE"]: e for e in entries if e.get("_PID") == str(pid)}


def test_structured_fields_reach_a_real_journald():
    result = _run_with_journald_result()
    entries, pids = result["entries"], result["pids"]

    for mode in ("journal-stream", "invocation-id"):
        got = _by_message(entries, pids[mode])
        assert set(got) == {"where=journal", "model loaded: llm", "mic lost"}, (mode, sorted(got))
        loaded, lost, where = got["model loaded: llm"], got["mic lost"], got["where=journal"]
        assert loaded["_TRANSPORT"] == "journal"
        assert loaded["SYSLOG_IDENTIFIER"] == "edge-voice"
        assert loaded["DEVICE_ID"] == "kiosk-7" and lost["DEVICE_ID"] == "kiosk-7"
        assert loaded["MESSAGE_ID"] == MessageId.MODEL_LOADED.value
        assert (loaded["TURN_ID"], loaded["STAGE"], loaded["PRIORITY"]) == ("t1", "llm", "6")
        assert lost["MESSAGE_ID"] == MessageId.MIC_LOST.value
        assert (lost["STAGE"], lost["PRIORITY"]) == ("audio", "4") and "TURN_ID" not in lost
        assert "TURN_ID" not in where, "a None field must be left out, not written as 'None'"
        assert loaded["LOGGER"] == "edge.test"

    # Without systemd-python: plain lines on the journal stream, priority from the <N> prefix.
    got = _by_message(entries, pids["no-systemd-python"])
    assert got["edge.test: model loaded: llm [turn=t1 stage=llm]"]["PRIORITY"] == "6"
    assert got["edge.test: mic lost [stage=audio]"]["PRIORITY"] == "4"
    assert got["edge.test: where=stderr-journal"]["_TRANSPORT"] == "stdout"
    assert all("DEVICE_ID" not in e for e in got.values())
    assert any("systemd-python is not installed" in m for m in got)
