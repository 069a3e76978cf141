"""`edge-voice fleet console` in a real browser: headless Chromium (Debian's chromium, driven by
Selenium through chromium-driver) against a real Mosquitto with a password file and the ACL the
README gives the console, simulated devices from the load-test tool, and a real `edge-voice run`
daemon (file microphone, dev models) answering a spoken question.

The page must refuse a wrong token, show every device live, show a killed device as offline
within seconds, show the spoken question and the reply, and send commands whose answers it
shows (to a simulated device and to the daemon). Screenshots go to the test's directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import Browser
from mosquitto import Mosquitto, Probe
from procs import stop_process
from voice import conversation, wer

from edge.audio.wav import write_wav
from edge.fleet.simulate import WorkerProcess, start_workers

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "config" / "dev.toml"
SIMS = 12
SIM_IDS = [f"sim-{i:05d}" for i in range(SIMS)]
GONE = "gone-00000"
DEVICE = "booth-12"
QUESTION = "What is the capital of France?"
TOKEN = "ops-token-7c1f9e2b4d6a8c0e"
VIEWER_TOKEN = "viewer-token-5b3d1f7a9c2e4b6d"
WRONG = "not-the-token-0000000000"
# What the console's broker user may do (the README's ACL); the devices here are anonymous.
ACL = """# anonymous clients: this test's devices
topic readwrite edge/#

user console
topic read edge/+/status
topic read edge/+/event/#
topic read edge/+/answers/#
topic read edge/+/cmd/+/result
topic readwrite edge/all/fleet/#
topic write edge/+/cmd/say
topic write edge/+/cmd/mute
topic write edge/+/cmd/unmute
topic write edge/+/cmd/volume
topic write edge/+/cmd/listen
topic write edge/+/cmd/cancel
topic write edge/+/cmd/reload-models
"""
# Which activities each tile showed, recorded in the page as they change.
RECORD_ACTIVITY = """
window.seenActivity = {};
const note = () => { for (const t of document.querySelectorAll('.tile')) {
  (window.seenActivity[t.dataset.device] = window.seenActivity[t.dataset.device] || {})[t.dataset.activity] = 1; } };
new MutationObserver(note).observe(document.querySelector('#grid'),
  {subtree: true, childList: true, attributes: true, attributeFilter: ['data-activity']});
note();
"""


def _models_root() -> Path:
    from edge.models.registry import ModelRegistry

    return ModelRegistry().root


@dataclass
class Fleet:
    tmp: Path
    broker: Mosquitto
    url: str
    console: subprocess.Popen
    sims: WorkerProcess
    gone: WorkerProcess
    daemon: subprocess.Popen
    browser: Browser
    logged_in: bool = False

    def shot(self, name: str) -> Path:
        return self.browser.screenshot(self.tmp / "screenshots" / f"{name}.png")

    def log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _start_console(broker: Mosquitto, tmp: Path) -> tuple[subprocess.Popen, str]:
    tokens = tmp / "tokens"
    tokens.write_text(f"# who may use the console\nana {TOKEN}\nvic {VIEWER_TOKEN} viewer\n")
    tokens.chmod(0o600)
    password = tmp / "console.password"
    password.write_text("console-password\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("EDGE_VOICE_CONSOLE_TOKEN", None)
    env.pop("EDGE_VOICE_FLEET_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "edge", "fleet", "console", "--listen", "127.0.0.1:0",
                             "--token-file", str(tokens), "--host", broker.host, "--port", str(broker.port),
                             "--username", "console", "--password-file", str(password), "--log-level", "info"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    stderr = proc.stderr

    def drain() -> None:
        with open(tmp / "console.log", "a", encoding="utf-8") as log:
            log.write(first)
            for line in stderr:
                log.write(line)
                log.flush()

    threading.Thread(target=drain, name="console-stderr", daemon=True).start()
    if not first.startswith("console: http://"):
        stop_process(proc, 10)
        raise AssertionError(f"the console did not start: {first}{(tmp / 'console.log').read_text()}")
    return proc, first.split()[1]


def _start_daemon(broker: Mosquitto, tmp: Path) -> subprocess.Popen:
    mic = tmp / "mic.wav"
    write_wav(mic, conversation(4.0, "Hey Jarvis.", 0.4, QUESTION, 3.0), 16000)
    cfg = tmp / "config.toml"
    cfg.write_text(DEV.read_text() + f"""
[device]
id = "{DEVICE}"
tags = ["site:gare-du-nord", "booth:phone"]

[mqtt]
enabled = true
host = "{broker.host}"
port = {broker.port}
keepalive_s = 5
""")
    env = dict(os.environ, EDGE_VOICE_STATE_DIR=str(tmp / "state"), EDGE_VOICE_AUDIO__INPUT_DEVICE=f"file:{mic}",
               EDGE_VOICE_AUDIO__OUTPUT_DEVICE=f"file:{tmp / 'speaker.wav'}",
               EDGE_VOICE_DEVICE__MODELS_DIR=str(_models_root()), PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    with open(tmp / "daemon.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("console")
    started: list[Any] = []
    with Mosquitto(tmp / "broker", passwords={"console": "console-password"}, acl=ACL) as broker:
        try:
            console, url = _start_console(broker, tmp)
            started.append(lambda: stop_process(console, 20))
            # The console follows the broker before any device speaks: the daemon's question comes live.
            daemon = _start_daemon(broker, tmp)
            started.append(lambda: stop_process(daemon, 30))
            sims = start_workers(devices=SIMS, processes=1, host=broker.host, port=broker.port, prefix="edge",
                                 state_dir=tmp / "sims", log_dir=tmp, keepalive=5)[0]
            started.append(lambda: sims.quit(30))
            (tmp / "gone").mkdir()
            gone = start_workers(devices=1, processes=1, host=broker.host, port=broker.port, prefix="edge",
                                 state_dir=tmp / "gone", log_dir=tmp / "gone", stem="gone", keepalive=5)[0]
            started.append(lambda: stop_process(gone.proc, 10))
            for w in (sims, gone):
                w.wait_for("ready", 60)
            sims.send("start 6")
            browser = Browser(tmp / "browser")
            started.append(browser.close)
            yield Fleet(tmp, broker, url, console, sims, gone, daemon, browser)
        finally:
            for stop in reversed(started):
                stop()


def _http(url: str, *, token: str | None = None, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, data=data, headers=h), timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _login(f: Fleet) -> None:
    if f.logged_in:
        return
    b = f.browser
    b.get(f.url + "login")
    b.type("#token", TOKEN)
    b.click("form button[type=submit]")
    b.wait_for("document.querySelector('#grid') && window.edgeConsole && window.edgeConsole.devices > 0", 20)
    b.js(RECORD_ACTIVITY)
    f.logged_in = True


def _tile(device: str) -> str:
    return f"document.querySelector('.tile[data-device=\"{device}\"]')"


def _close_details(b: Browser) -> None:
    if not b.js("return document.querySelector('#details').hidden"):
        b.click("#d-close")
        b.wait_for("document.querySelector('#details').hidden", 5)


def test_the_page_refuses_a_wrong_token(fleet: Fleet) -> None:
    f, b = fleet, fleet.browser
    status, headers, _ = _http(f.url)
    assert status == 303 and headers["Location"] == "/login"
    for path in ("api/devices", "api/stream", f"api/device/{SIM_IDS[0]}"):
        assert _http(f.url + path)[0] == 401
        assert _http(f.url + path, token=WRONG)[0] == 401
    b.get(f.url)
    b.wait_for("document.querySelector('input[name=token]')", 10)
    assert b.driver.current_url == f.url + "login"
    b.type("#token", WRONG)
    b.click("form button[type=submit]")
    b.wait_for("document.querySelector('#login-message') && "
               "document.querySelector('#login-message').textContent.includes('not valid')", 10)
    f.shot("01-wrong-token")
    assert b.cookies() == []
    assert not b.js("return Boolean(document.querySelector('#grid'))")
    b.get(f.url)  # still the login page: nothing was let through
    b.wait_for("document.querySelector('input[name=token]')", 10)
    assert b.driver.current_url == f.url + "login"


def test_the_grid_shows_every_device_live(fleet: Fleet) -> None:
    f, b = fleet, fleet.browser
    _login(f)
    [cookie] = b.cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    every = [*SIM_IDS, GONE]
    b.wait_for(" && ".join(f"{_tile(d)} && {_tile(d)}.dataset.online === 'yes'" for d in every), 30)
    tile = b.text(f'.tile[data-device="{SIM_IDS[3]}"]')
    assert "online" in tile and "booth:phone" in tile and "site:s03" in tile
    assert any(word in tile for word in ("idle", "listening", "thinking", "speaking")), tile
    # The simulated devices take turns: their transcripts and replies reach the feed.
    b.wait_for("[...document.querySelectorAll('#feed li.turn')].some(li => "
               "li.textContent.includes('Down the corridor'))", 30)
    summary = b.text("#summary")
    assert "online" in summary and "offline" in summary
    f.shot("02-grid")


def test_a_device_going_offline_shows_within_seconds(fleet: Fleet) -> None:
    f, b = fleet, fleet.browser
    _login(f)
    b.wait_for(f"{_tile(GONE)} && {_tile(GONE)}.dataset.online === 'yes'", 30)
    t0 = time.monotonic()
    f.gone.proc.kill()  # no clean stop: the broker publishes the device's Last Will
    f.gone.proc.wait(10)
    took = b.wait_for(f"{_tile(GONE)}.dataset.online === 'no' && "
                      f"{_tile(GONE)}.querySelector('.conn').textContent.includes('offline')", 10)
    shown = time.monotonic() - t0
    print(f"\n{GONE} killed: shown offline on the page after {shown:.2f} s (waited {took:.2f} s in the page)")
    text = b.text(f'.tile[data-device="{GONE}"]')
    assert "offline (connection lost)" in text, text
    # Offline says so by a word and a symbol too, and shows no activity.
    assert b.js(f"return getComputedStyle({_tile(GONE)}.querySelector('.act')).display") == "none"
    assert "○" in text
    f.shot("03-offline")


def test_a_command_from_the_page_reaches_the_device_and_its_answer_shows(fleet: Fleet) -> None:
    f, b = fleet, fleet.browser
    _login(f)
    target = SIM_IDS[5]
    before = f.sims.report()["devices"][target]["commands"]
    b.click(f'.tile[data-device="{target}"]')
    b.wait_for("!document.querySelector('#details').hidden", 5)
    b.type("#a-say-text", "The train to Lyon leaves from platform 4.")
    b.click('#a-say button[type=submit]')
    b.wait_for("document.querySelector('#d-answer').dataset.outcome === 'answered' && "
               "document.querySelector('#d-answer').dataset.command === 'say'", 15)
    answer = json.loads(b.text("#d-answer-json"))
    assert answer["ok"] is True and answer["device_id"] == target and answer["command"] == "say"
    assert f"say → {target}: answered" in b.text("#d-answer-line")
    b.click('#d-actions button[data-command="mute"]')
    b.wait_for("document.querySelector('#d-answer').dataset.command === 'mute' && "
               "document.querySelector('#d-answer-json').textContent.includes('\"muted\": true')", 15)
    after = f.sims.report()["devices"][target]["commands"]
    assert after == before + 2, (before, after)  # the device itself counted both
    # The command also shows in every page's feed.
    b.wait_for("[...document.querySelectorAll('#feed li.note.command')].some(li => li.textContent.includes('mute'))",
               10)
    f.shot("04-command")
    _close_details(b)
    # What a page may not do, whoever asks: commands outside the list, and commands from a viewer.
    body = json.dumps({"command": "set", "args": {"key": "llm.temperature", "value": 1}, "devices": [target]})
    status, _, raw = _http(f.url + "api/cmd", token=TOKEN, data=body.encode(),
                           headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(raw)["error"]["code"] == "console.forbidden"
    body = json.dumps({"command": "mute", "devices": [target]})
    status, _, raw = _http(f.url + "api/cmd", token=VIEWER_TOKEN, data=body.encode(),
                           headers={"Content-Type": "application/json"})
    assert status == 403 and json.loads(raw)["error"]["code"] == "console.viewer"
    assert f.sims.report()["devices"][target]["commands"] == after


def test_a_spoken_question_and_its_reply_appear_on_the_page(fleet: Fleet) -> None:
    f, b = fleet, fleet.browser
    _login(f)
    try:
        b.wait_for(f"{_tile(DEVICE)} && {_tile(DEVICE)}.dataset.online === 'yes'", 120)
    except AssertionError:
        raise AssertionError(f"the daemon never showed online; its log:\n{f.log('daemon.log')}") from None
    b.click(f'.tile[data-device="{DEVICE}"]')
    b.wait_for("!document.querySelector('#details').hidden", 5)
    card = f"[...document.querySelectorAll('#feed li.turn[data-device=\"{DEVICE}\"]')]"
    try:
        b.wait_for(f"{card}.some(li => li.classList.contains('outcome-done') && li.querySelector('.q') && "
                   "li.querySelector('.a'))", 120)
    except AssertionError:
        raise AssertionError(f"no answered turn on the page; the daemon's log:\n{f.log('daemon.log')}") from None
    heard = b.js(f"return {card}.find(li => li.classList.contains('outcome-done')).querySelector('.q').textContent")
    reply = b.js(f"return {card}.find(li => li.classList.contains('outcome-done')).querySelector('.a').textContent")
    latency = b.js(f"return {card}.find(li => li.classList.contains('outcome-done')).querySelector('.lat')"
                   ".textContent")
    print(f"\non the page: heard {heard!r}, replied {reply!r}, {latency}")
    assert wer(QUESTION, heard) <= 0.3, heard
    assert reply.strip() and "first audio" in latency and "ms" in latency
    b.wait_for(f"[...document.querySelectorAll('#d-turns tr')].some(tr => tr.textContent.includes({heard!r}))", 10)
    seen = b.js(f"return Object.keys(window.seenActivity[{DEVICE!r}] || {{}})")
    print(f"{DEVICE}'s tile showed: {sorted(seen)}")
    assert {"listening", "speaking"} <= set(seen), seen  # from the daemon's own state events
    f.shot("05-question-and-reply")
    # A command to the real daemon: mute shows in its status (the tile says so), unmute undoes it.
    b.click('#d-actions button[data-command="mute"]')
    b.wait_for("document.querySelector('#d-answer').dataset.command === 'mute' && "
               "document.querySelector('#d-answer').dataset.outcome === 'answered' && "
               "document.querySelector('#d-answer-json').textContent !== ''", 15)  # (the JSON is filled last)
    assert json.loads(b.text("#d-answer-json"))["muted"] is True
    b.wait_for(f"{_tile(DEVICE)}.querySelector('.conn').textContent.includes('muted')", 10)
    f.shot("06-daemon-muted")
    b.click('#d-actions button[data-command="unmute"]')
    b.wait_for("document.querySelector('#d-answer').dataset.command === 'unmute' && "
               "document.querySelector('#d-answer').dataset.outcome === 'answered'", 15)
    b.wait_for(f"{_tile(DEVICE)}.querySelector('.conn').textContent.includes('online')", 10)
    _close_details(b)


def test_rollout_progress_shows_while_one_runs(fleet: Fleet) -> None:
    f, b = fleet, fleet.browser
    _login(f)
    assert b.js("return document.querySelector('#rollouts').hidden") is True
    probe = Probe(f.broker).connect()
    try:
        now = time.time()
        common = {"rollout_id": "r-test-1", "kind": "model", "id": "whisper-tiny-en", "version": "0123456789ab"}
        probe.publish(f"edge/{SIM_IDS[2]}/event/rollout.progress",
                      {**common, "type": "rollout.progress", "state": "fetching", "percent": 40, "outcome": None,
                       "time": now, "message_id": "rt-1"})
        probe.publish(f"edge/{SIM_IDS[4]}/event/rollout.done",
                      {**common, "type": "rollout.done", "state": "rolled_back", "outcome": "rolled_back",
                       "error": {"code": "rollout.self_test", "message": "self-test failed"}, "time": now,
                       "message_id": "rt-2"})
    finally:
        probe.close()
    b.wait_for("!document.querySelector('#rollouts').hidden && "
               "document.querySelector('#rollouts').textContent.includes('1 rolled back')", 10)
    text = b.text("#rollouts")
    assert "r-test-1" in text and "running" in text and "whisper-tiny-en" in text and "70 %" in text, text
    assert f"{SIM_IDS[4]} rolled_back (self-test failed)" in text, text
    assert "rollout r-test-1: fetching 40 %" in b.text(f'.tile[data-device="{SIM_IDS[2]}"]')
    f.shot("06-rollout")


def test_the_consoles_broker_user_may_send_only_the_listed_commands(fleet: Fleet) -> None:
    # Defence in depth: even the console's own broker login cannot send what the page may not.
    import paho.mqtt.client as mqtt

    codes: dict[int, Any] = {}
    cond = threading.Condition()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with cond:
            codes[mid] = reason
            cond.notify_all()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="acl-check", protocol=mqtt.MQTTv5)
    client.username_pw_set("console", "console-password")
    client.on_publish = on_publish
    client.connect(fleet.broker.host, fleet.broker.port)
    client.loop_start()
    try:
        sent = {name: client.publish(f"edge/acl-probe/cmd/{name}", b"{}", qos=1).mid
                for name in ("set", "ask", "status", "rollout", "handset", "say", "mute", "reload-models")}
        with cond:
            assert cond.wait_for(lambda: set(sent.values()) <= set(codes), 10), codes
        refused = sorted(name for name, mid in sent.items() if codes[mid].is_failure)
    finally:
        client.disconnect()
        client.loop_stop()
    assert refused == ["ask", "handset", "rollout", "set", "status"]


def test_the_page_fits_a_phone(fleet: Fleet) -> None:
    f, b = fleet, fleet.browser
    _login(f)
    b.emulate_phone(390, 844)
    try:
        # Content wider than the screen would widen a phone's layout viewport past 390 px.
        widths = b.js("return [window.innerWidth, document.documentElement.scrollWidth]")
        assert widths == [390, 390], f"the page is {widths} px wide on a 390 px screen"
        columns = b.js("return getComputedStyle(document.querySelector('.layout'))"
                       ".gridTemplateColumns.split(' ').length")
        assert columns == 1
        b.click(f'.tile[data-device="{SIM_IDS[1]}"]')
        b.wait_for("!document.querySelector('#details').hidden", 5)
        panel = b.js("return document.querySelector('#details .panel').getBoundingClientRect().width")
        assert panel == 390
        f.shot("07-phone-details")
        _close_details(b)
        f.shot("07-phone")
    finally:
        b.emulate_laptop()
