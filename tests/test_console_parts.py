"""The fleet console's parts without a browser: the model built from statuses and events, the
rollout reading, tokens and sessions, the page stream's bounds, the command check, and the HTTP
side (login, cookies, headers, refusals) on a real socket; the CLI's one-line errors."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.fleet.config import FleetConfig
from edge.fleet.console import ConsoleError
from edge.fleet.console.auth import COOKIE, FAILS_MAX, SESSION_S, Auth, load_users, parse_tokens
from edge.fleet.console.commands import ACTIONS, check_request
from edge.fleet.console.model import FleetModel
from edge.fleet.console.rollout import parse_step
from edge.fleet.console.stream import Hub, encode
from edge.fleet.errors import FleetError, SelectionError
from edge.fleet.status import parse_status

REPO = Path(__file__).resolve().parents[1]
TOKEN = "right-token-0123456789abcdef"
VIEWER = "viewer-token-0123456789abcdef"


def _status(state: str = "online", **extra: Any) -> bytes:
    body = {"state": state, "version": "0.1.0", "tags": ["site:paris"], "online_since": 1000.0, "time": 1000.0,
            "models": {"llm": "smollm2"}}
    body.update(extra)
    return json.dumps(body).encode()


def _event(kind: str, turn: str | None = "t1", mid: str | None = None, **data: Any) -> bytes:
    body = {"type": kind, "turn_id": turn, "time": 1001.0, "message_id": mid or f"{kind}-{turn}", **data}
    return json.dumps(body).encode()


class Recorder:
    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.updates.append((kind, data))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, d in self.updates if k == kind]


# -- the model -----------------------------------------------------------------------------------

def test_a_turn_fills_one_card_and_the_device_row_follows_it() -> None:
    rec = Recorder()
    m = FleetModel(rec, clock=lambda: 1002.0)
    m.on_status("booth-1", _status())
    assert rec.of("device")[-1]["online"] is True and rec.of("device")[-1]["activity"] == "idle"
    m.on_event("booth-1", "wake", _event("wake", word="hey_jarvis"))
    assert rec.of("device")[-1]["activity"] == "listening"  # no state events: taken from the others
    m.on_event("booth-1", "transcript.partial", _event("transcript.partial", mid="p1", text="What is"))
    assert rec.of("device")[-1]["hearing"] == "What is"
    m.on_event("booth-1", "transcript.final", _event("transcript.final", text="What is <b>this</b>?"))
    m.on_event("booth-1", "reply.final", _event("reply.final", text="A <script>test</script>."))
    timings = {"end_of_speech_to_first_audio": 812.4, "llm_first_token": 300}
    m.on_event("booth-1", "turn.end", _event("turn.end", outcome="done", trigger="wake", timings_ms=timings))
    cards = rec.of("turn")
    assert {c["key"] for c in cards} == {"t:t1"}
    last = cards[-1]
    # Text stays text: the page sets it with textContent; nothing is escaped or interpreted here.
    assert last["question"] == "What is <b>this</b>?" and last["reply"] == "A <script>test</script>."
    assert last["outcome"] == "done" and last["first_audio_ms"] == 812.4 and last["wake_word"] == "hey_jarvis"
    assert last["timings_ms"]["llm_first_token"] == 300.0 and last["t"] == 1001.0 and last["r"] == 1002.0
    assert rec.of("device")[-1]["activity"] == "idle"
    details = m.details("booth-1")
    assert details is not None and details["latency"] == [[1001.0, 812.4]] and details["turns"][0]["turn_id"] == "t1"
    assert [e["type"] for e in details["events"]][:2] == ["turn.end", "reply.final"]


def test_state_events_win_over_guessing_and_duplicates_are_dropped() -> None:
    rec = Recorder()
    m = FleetModel(rec)
    m.on_status("booth-1", _status())
    m.on_event("booth-1", "state", _event("state", turn=None, mid="s1", state="thinking"))
    m.on_event("booth-1", "wake", _event("wake"))  # a device that reports its state is not guessed for
    assert m.devices["booth-1"].activity == "thinking"
    n = len(rec.updates)
    m.on_event("booth-1", "state", _event("state", turn=None, mid="s1", state="speaking"))  # same id: a copy
    assert len(rec.updates) == n and m.counters["duplicates"] == 1
    m.on_event("booth-1", "error", _event("error", turn=None, mid="e1", code="audio.lost", message="mic gone"))
    assert rec.of("note")[-1]["text"] == "audio.lost: mic gone"
    m.on_event("booth-1", "state", b"not json")
    assert m.counters["unreadable"] == 1


def test_going_offline_is_stamped_when_seen_and_a_cleared_status_removes_the_device() -> None:
    now = [1000.0]
    rec = Recorder()
    m = FleetModel(rec, clock=lambda: now[0])
    m.on_status("old", _status("offline", reason="connection lost"))  # retained: when is unknown
    assert rec.of("device")[-1]["offline_seen"] is None and rec.of("device")[-1]["lost"] is True
    m.on_status("booth-1", _status())
    m.on_event("booth-1", "wake", _event("wake"))
    now[0] = 1500.0
    m.on_status("booth-1", _status("offline", reason="connection lost"))
    row = rec.of("device")[-1]
    assert row["online"] is False and row["offline_seen"] == 1500.0 and row["activity"] is None
    m.on_status("booth-1", b"")
    assert rec.updates[-1] == ("removed", {"device_id": "booth-1"}) and "booth-1" not in m.devices
    with m.lock:
        snap = m.snapshot()
    assert [d["device_id"] for d in snap["devices"]] == ["old"]


def test_rollout_events_are_read_generically() -> None:
    # The shape the device's rollouts send (edge.rollout.manager): state, percent, outcome, error.
    step = parse_step("booth-1", "rollout.progress", {"rollout_id": "r7", "kind": "model", "id": "whisper-tiny-en",
                                                       "version": "0123456789ab", "state": "fetching",
                                                       "percent": 140, "outcome": None}, 5.0)
    assert step is not None and step.percent == 100.0 and step.outcome is None and step.phase == "fetching"
    assert step.target == "model whisper-tiny-en 0123456789ab"
    refused = parse_step("booth-2", "rollout.done", {"rollout_id": "r7", "state": "refused", "outcome": "refused",
                                                      "error": {"code": "rollout.mirror", "message": "not allowed"}},
                         6.0)
    assert refused is not None and refused.outcome == "failed" and refused.message == "not allowed"
    bare = parse_step("booth-3", "rollout.failed", {}, 7.0)  # nothing but the event's name
    assert bare is not None and bare.rollout_id == "rollout" and bare.phase == "failed" and bare.outcome == "failed"
    assert parse_step("booth-1", "turn.end", {}, 1.0) is None
    rec = Recorder()
    m = FleetModel(rec)
    for dev in ("a", "b"):
        m.on_status(dev, _status())
    # A device's retained status carries its latest step: a console started late still sees it.
    m.on_status("c", _status(rollout={"rollout_id": "r7", "state": "self-test", "outcome": None, "time": 1000.0}))
    m.on_event("a", "rollout.progress", _event("rollout.progress", turn=None, mid="1", rollout_id="r7",
                                               state="fetching", percent=50))
    m.on_event("b", "rollout.done", _event("rollout.done", turn=None, mid="2", rollout_id="r7", state="confirmed",
                                           outcome="confirmed"))
    m.on_event("c", "rollout.done", _event("rollout.done", turn=None, mid="3", rollout_id="r7", state="rolled_back",
                                           outcome="rolled_back", error={"message": "self-test failed"}))
    summary = rec.of("rollout")[-1]
    assert summary["devices"] == 3 and summary["succeeded"] == 1 and summary["rolled_back"] == 1
    assert summary["running"] is True and summary["phases"] == {"fetching": 1} and summary["percent"] == 83.3
    assert summary["trouble"][0]["device_id"] == "c" and summary["trouble"][0]["message"] == "self-test failed"
    assert rec.of("device")[-1]["rollout"]["rollout_id"] == "r7"
    n = len(rec.of("rollout"))
    m.on_status("c", _status(rollout={"rollout_id": "r7", "state": "self-test", "outcome": None, "time": 1000.0}))
    assert len(rec.of("rollout")) == n  # an older step does not undo a newer one


# -- tokens and sessions ----------------------------------------------------------------------------

def test_token_files_name_users_and_roles_and_refuse_weak_or_repeated_tokens(tmp_path: Path) -> None:
    users = parse_tokens(f"# operators\nana {TOKEN}\nbob {VIEWER} viewer\n", "f")
    assert [(u.name, u.role) for u in users] == [("ana", "operator"), ("bob", "viewer")]
    assert parse_tokens(TOKEN, "env")[0].name == "operator"
    for text, words in (("ana short", "at least 16"), (f"ana {TOKEN} admin", "unknown role"),
                        (f"ana {TOKEN}\nbob {TOKEN}", "given twice"), ("", "no token"),
                        (f"a {TOKEN} viewer extra", "expected TOKEN")):
        with pytest.raises(ConsoleError, match=words):
            parse_tokens(text, "f")
    f = tmp_path / "tokens"
    f.write_text(f"ana {TOKEN}\n")
    f.chmod(0o644)
    users, warning = load_users(str(f), {})
    assert users[0].name == "ana" and warning is not None and "chmod 600" in warning
    with pytest.raises(ConsoleError, match="needs a login token"):
        load_users(None, {})
    with pytest.raises(ConsoleError, match="not found"):
        load_users(str(tmp_path / "missing"), {})


def test_sessions_expire_and_wrong_tokens_lock_an_address_out() -> None:
    now = [0.0]
    auth = Auth(parse_tokens(f"ana {TOKEN}", "f"), clock=lambda: now[0])
    assert auth.check_token(TOKEN) is not None and auth.check_token(TOKEN + "x") is None
    result = auth.login(TOKEN, "10.0.0.1")
    assert result is not None
    sid, user = result
    assert auth.session(sid) == user and auth.session(sid + "x") is None
    now[0] = SESSION_S + 1
    assert auth.session(sid) is None
    for _ in range(FAILS_MAX):
        assert auth.login("wrong-token-wrong-token", "10.0.0.2") is None
    assert auth.locked_out("10.0.0.2") and not auth.locked_out("10.0.0.1")
    now[0] += 301
    assert not auth.locked_out("10.0.0.2")


# -- the stream ----------------------------------------------------------------------------------

def test_a_slow_page_is_resynced_not_left_behind() -> None:
    hub = Hub(max_pages=2, queue_max=3)
    fast, slow = hub.add("a"), hub.add("b")
    assert fast is not None and slow is not None and hub.add("c") is None
    for i in range(3):
        hub.publish("device", {"i": i})
    items, resync = fast.take(0.1)
    assert len(items) == 3 and not resync
    hub.publish("device", {"i": 3})  # the slow page already holds 3: it is dropped and will resync
    items, resync = slow.take(0.1)
    assert items == [] and resync and slow.dropped == 4
    slow.reset()
    assert slow.resyncs == 1 and not slow.resync
    items, resync = fast.take(0.05)
    assert items == [encode("device", {"i": 3})]
    assert fast.take(0.05) == ([], False)  # nothing: the caller sends a heartbeat
    assert hub.stats()["dropped"] == 4
    assert encode("x", {"t": "a\nb"}).count(b"\n") == 3  # one data line, whatever the text holds


# -- commands --------------------------------------------------------------------------------------

def test_the_page_may_send_only_the_usual_actions_checked_by_the_device_schemas() -> None:
    statuses = {"booth-1": parse_status("booth-1", _status())}
    assert set(ACTIONS) == {"say", "mute", "unmute", "volume", "listen", "cancel", "reload-models"}
    name, payload, targets = check_request({"command": "volume", "args": {"volume": 0.4}, "devices": ["booth-1"]},
                                           statuses)  # type: ignore[arg-type]
    assert (name, payload, targets) == ("volume", {"volume": 0.4}, ["booth-1"])
    cases = [({"command": "set", "args": {"key": "llm.temperature", "value": 1}, "devices": ["booth-1"]},
              ConsoleError, "not one the console sends"),
             ({"command": "volume", "args": {"volume": 3}, "devices": ["booth-1"]}, FleetError, "0.0 to 1.0"),
             ({"command": "say", "args": {"text": "hi", "request_id": "x"}, "devices": ["booth-1"]}, FleetError,
              "request_id"),
             ({"command": "say", "args": {"text": "hi"}, "devices": ["booth-9"]}, SelectionError, "unknown device"),
             ({"command": "say", "args": {"text": "hi"}, "devices": []}, ConsoleError, "list of 1"),
             ({"command": "say", "args": {"text": "hi"}, "devices": ["booth-1"], "all": True}, ConsoleError,
              "unknown field")]
    for body, err, words in cases:
        with pytest.raises(err, match=words):
            check_request(body, statuses)  # type: ignore[arg-type]


# -- the HTTP side on a real socket (no broker: the model is fed directly) ---------------------------

@pytest.fixture()
def served() -> Iterator[tuple[Any, int]]:
    from edge.fleet.console.app import Console

    users = parse_tokens(f"ana {TOKEN}\nbob {VIEWER} viewer", "tokens")
    console = Console(FleetConfig(host="127.0.0.1", port=1), Auth(users))
    _, port = console.serve("127.0.0.1", 0)
    console.model.on_status("booth-1", _status())
    try:
        yield console, port
    finally:
        console.close()


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    return conn.getresponse()


def test_everything_but_the_login_page_and_static_files_needs_a_login(served: tuple[Any, int]) -> None:
    _, port = served
    r = _request(port, "GET", "/")
    assert r.status == 303 and r.getheader("Location") == "/login"
    r = _request(port, "GET", "/login")
    page = r.read().decode()
    assert r.status == 200 and 'name="token"' in page and "edge on 127.0.0.1:1" in page
    csp = r.getheader("Content-Security-Policy") or ""
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert r.getheader("X-Content-Type-Options") == "nosniff"
    r = _request(port, "GET", "/static/console.js")
    assert r.status == 200 and b"textContent" in r.read() and "javascript" in (r.getheader("Content-Type") or "")
    for path in ("/api/devices", "/api/stream", "/api/device/booth-1", "/api/whoami"):
        assert _request(port, "GET", path).status == 401
        assert _request(port, "GET", path, headers={"Authorization": "Bearer wrong-token-000000000"}).status == 401
    r = _request(port, "GET", "/api/devices", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200 and json.loads(r.read())[0]["device_id"] == "booth-1"
    assert _request(port, "GET", "/static/../auth.py").status == 404
    assert _request(port, "GET", "/static/index.html").status == 404  # the page only after a login


def test_a_login_sets_a_strict_http_only_cookie_and_a_wrong_token_gets_none(served: tuple[Any, int]) -> None:
    console, port = served
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = _request(port, "POST", "/login", b"token=not-the-right-token", form)
    assert r.status == 401 and r.getheader("Set-Cookie") is None and "That token is not valid." in r.read().decode()
    r = _request(port, "POST", "/login", f"token={TOKEN}".encode(), {**form, "Origin": "http://evil.example"})
    assert r.status == 403 and r.getheader("Set-Cookie") is None
    r = _request(port, "POST", "/login", f"token={TOKEN}".encode(), form)
    cookie = r.getheader("Set-Cookie") or ""
    assert r.status == 303 and cookie.startswith(f"{COOKIE}=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag in cookie
    sid = cookie.split(";")[0]
    r = _request(port, "GET", "/api/whoami", headers={"Cookie": sid})
    assert r.status == 200 and json.loads(r.read())["user"] == "ana"
    # The cookie alone does not send commands from another site's page, nor from a form.
    body = json.dumps({"command": "mute", "devices": ["booth-1"]}).encode()
    r = _request(port, "POST", "/api/cmd", body, {"Cookie": sid, "Content-Type": "application/json",
                                                  "Origin": "http://evil.example"})
    assert r.status == 403 and json.loads(r.read())["error"]["code"] == "http.origin"
    r = _request(port, "POST", "/api/cmd", body, {"Cookie": sid, "Content-Type": "text/plain",
                                                  "Origin": f"http://127.0.0.1:{port}"})
    assert r.status == 415
    r = _request(port, "POST", "/api/cmd", json.dumps({"command": "set", "devices": ["booth-1"]}).encode(),
                 {"Cookie": sid, "Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"})
    assert r.status == 400 and json.loads(r.read())["error"]["code"] == "console.forbidden"
    r = _request(port, "POST", "/api/cmd", body, {"Authorization": f"Bearer {VIEWER}",
                                                  "Content-Type": "application/json"})
    assert r.status == 403 and json.loads(r.read())["error"]["code"] == "console.viewer"
    r = _request(port, "POST", "/api/cmd", b"x" * 20000, {"Authorization": f"Bearer {TOKEN}",
                                                         "Content-Type": "application/json"})
    assert r.status == 413
    r = _request(port, "POST", "/logout", b"", {"Cookie": sid, "Origin": f"http://127.0.0.1:{port}",
                                                "Content-Length": "0"})
    assert r.status == 303 and "Max-Age=0" in (r.getheader("Set-Cookie") or "")
    assert _request(port, "GET", "/api/whoami", headers={"Cookie": sid}).status == 401
    for _ in range(FAILS_MAX):
        _request(port, "POST", "/login", b"token=still-not-the-right-token", form).read()
    r = _request(port, "POST", "/login", f"token={TOKEN}".encode(), form)
    assert r.status == 429 and r.getheader("Set-Cookie") is None  # locked out, even with the right token


def test_the_stream_sends_a_snapshot_then_updates(served: tuple[Any, int]) -> None:
    console, port = served
    r = _request(port, "GET", "/api/stream", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200 and r.getheader("Content-Type", "").startswith("text/event-stream")
    assert r.readline() == b"retry: 2000\n" and r.readline() == b"\n"
    assert r.readline() == b"event: snapshot\n"
    snap = json.loads(r.readline()[len(b"data: "):])
    assert [d["device_id"] for d in snap["devices"]] == ["booth-1"] and snap["user"] == {"name": "ana",
                                                                                           "role": "operator"}
    assert snap["fleet"]["actions"] == list(ACTIONS)
    r.readline()
    done = threading.Event()

    def feed() -> None:
        console.model.on_event("booth-1", "transcript.final", _event("transcript.final", text="Where is gate 4?"))
        done.set()

    threading.Thread(target=feed).start()
    done.wait(5)
    got = []
    for _ in range(2):
        kind = r.readline().decode().strip()
        got.append((kind, json.loads(r.readline()[len(b"data: "):])))
        assert r.readline() == b"\n"
    assert [k for k, _ in got] == ["event: device", "event: turn"]
    assert got[0][1]["hearing"] == "Where is gate 4?" and got[1][1]["question"] == "Where is gate 4?"
    assert "t" not in got[0][1] and got[1][1]["t"] == 1001.0  # the event's last update carries its times
    assert console.hub.stats()["pages"] == 1
    r.close()


def test_https_marks_the_cookie_secure(tmp_path: Path) -> None:
    import ssl

    from mosquitto import make_ca, make_cert

    from edge.fleet.console.app import Console
    from edge.fleet.console.server import https_context

    ca = make_ca(tmp_path, "ca")
    cert = make_cert(tmp_path, "console", ca, server=True)
    console = Console(FleetConfig(host="127.0.0.1", port=1), Auth(parse_tokens(TOKEN, "env")))
    _, port = console.serve("127.0.0.1", 0, https_context(str(cert.cert), str(cert.key)))
    try:
        ctx = ssl.create_default_context(cafile=str(ca.cert))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
        conn.request("POST", "/login", body=f"token={TOKEN}",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        assert r.status == 303 and "; Secure" in (r.getheader("Set-Cookie") or "")
        assert (r.getheader("Strict-Transport-Security") or "").startswith("max-age=")
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/login")
            plain.getresponse()
    finally:
        console.close()


# -- the command line ------------------------------------------------------------------------------

def _console(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO))
    full.pop("EDGE_VOICE_CONSOLE_TOKEN", None)
    full.pop("EDGE_VOICE_FLEET_CONFIG", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "edge", "fleet", "console", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=full)


def _one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-voice: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_console_options_end_in_one_line(tmp_path: Path) -> None:
    from mosquitto import free_port

    _one_line(_console("--port", "1"), "needs a login token", "--token-file")
    token = {"EDGE_VOICE_CONSOLE_TOKEN": TOKEN}
    _one_line(_console("--listen", "nowhere", env=token), "--listen", "HOST:PORT")
    _one_line(_console("--https-cert", str(tmp_path / "c.pem"), env=token), "--https-key")
    _one_line(_console("--token-file", str(tmp_path / "none")), "token file not found")
    _one_line(_console("--host", "127.0.0.1", "--port", str(free_port()), "--listen", "127.0.0.1:0", env=token),
              "cannot reach the MQTT broker", "connection refused")
