"""More than a thousand malformed or hostile commands through a real broker into the real daemon
(`edge-voice run` with file devices and the dev models): each gets an error answer with its
correlation data, none changes anything, and the daemon keeps serving. Every generated case is
invalid by construction, from the documented contract (not from the validator under test). The
fuzzer is seeded: a failure repeats with the same cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from mosquitto import Mosquitto, Probe
from procs import stop_process

from edge.audio.wav import write_wav
from edge.mqtt import SETTINGS

REPO = Path(__file__).resolve().parents[1]
DEV = "dev1"
# The documented contract: each command's fields, plus the two every command may carry.
FIELDS = {"say": {"text"}, "ask": {"text"}, "listen": set(), "cancel": set(), "mute": set(), "unmute": set(),
          "volume": {"volume"}, "set": {"key", "value"}, "reload-models": set(), "status": set(),
          "handset": {"state"}}
COMMON = {"request_id", "expires_at"}
VALID = {"say": {"text": "hello"}, "ask": {"text": "why?"}, "volume": {"volume": 0.5},
         "set": {"key": "llm.temperature", "value": 0.5}, "handset": {"state": "off-hook"}}
NAMES = sorted(FIELDS)

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
non_strings = json_values.filter(lambda v: not isinstance(v, str))
non_numbers = json_values.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float)))


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def _dumps(v: Any) -> bytes:
    return json.dumps(v).encode()


def _with(name: str, **fields: Any) -> tuple[str, bytes]:
    return name, _dumps({**VALID.get(name, {}), **fields})


# A topic level a client can publish to, that is not a command. Brokers disconnect a client
# whose topic holds control characters or Unicode non-characters, so those are left out.
bad_names = st.text(st.characters(blacklist_characters="/+#", blacklist_categories=("Cs", "Cc"))
                    .filter(lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE)),
                    max_size=60).filter(lambda s: s not in FIELDS)

cases = st.one_of(
    st.tuples(bad_names, st.binary(max_size=40)),
    st.tuples(st.sampled_from(NAMES), st.binary(max_size=200).map(lambda b: b + b"\xff")),  # never UTF-8
    st.tuples(st.sampled_from(NAMES), st.text(min_size=1, max_size=200).map(lambda t: "{" + t)
              .filter(_not_json).map(str.encode)),
    st.tuples(st.sampled_from(NAMES), json_values.filter(lambda v: not isinstance(v, dict)).map(_dumps)),
    st.builds(lambda name, key, value: _with(name, **{key: value}), st.sampled_from(NAMES),
              st.text(max_size=30).filter(lambda k: k not in FIELDS["set"] | FIELDS["say"] | FIELDS["volume"]
                                          | COMMON), json_values),
    st.builds(lambda name, value: _with(name, text=value), st.sampled_from(["say", "ask"]), non_strings),
    st.builds(lambda name, n: _with(name, text="x" * n), st.sampled_from(["say", "ask"]),
              st.integers(1001, 20000)),
    st.builds(lambda n: ("say", b"[" * n + b"]" * n), st.integers(1000, 6000)),
    st.builds(lambda v: _with("volume", volume=v), non_numbers | st.floats(1.0001, 1e300)
              | st.floats(-1e300, -0.0001)),
    st.builds(lambda k: _with("set", key=k), st.text(max_size=40).filter(lambda k: k not in SETTINGS)),
    st.builds(lambda v: _with("set", value=v), non_numbers),
    st.builds(lambda name, v: _with(name, request_id=v), st.sampled_from(NAMES), non_strings),
    st.builds(lambda name, t: _with(name, expires_at=t), st.sampled_from(NAMES),
              st.floats(0, time.time() - 60) | non_numbers.filter(lambda v: v is not None)),
    st.builds(lambda name, text: _with(name, text=text), st.sampled_from(["say", "ask"]),
              st.sampled_from(["", "   ", "\n\t", "a\x00b", "\x1b[31mred", "\x7f"])),
    st.builds(lambda v: _with("set", key="llm.system_prompt", value=v), json_values),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Probe, Path]]:
    """The real daemon on the dev models, its microphone a silent file, its speaker a file."""
    from edge.models.registry import ModelRegistry

    tmp = tmp_path_factory.mktemp("hostile")
    mic = tmp / "mic.wav"
    write_wav(mic, __import__("numpy").zeros(16000, dtype="int16"), 16000)  # then endless silence
    with Mosquitto(tmp / "broker") as broker:
        cfg = tmp / "edge.toml"
        cfg.write_text((REPO / "config" / "dev.toml").read_text() + f"""
[device]
id = "{DEV}"

[mqtt]
enabled = true
host = "127.0.0.1"
port = {broker.port}
keepalive_s = 5
""")
        env = dict(os.environ, EDGE_VOICE_STATE_DIR=str(tmp / "state"), EDGE_VOICE_AUDIO__INPUT_DEVICE=f"file:{mic}",
                   EDGE_VOICE_AUDIO__OUTPUT_DEVICE=f"file:{tmp / 'speaker.wav'}",
                   EDGE_VOICE_DEVICE__MODELS_DIR=str(ModelRegistry().root), PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        log = tmp / "daemon.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=out)
        probe = Probe(broker).connect()
        probe.subscribe("fleet/answers")
        try:
            probe.subscribe(f"edge/{DEV}/status")
            probe.wait_for(lambda ms: any(m.topic.endswith("/status") and m.json().get("state") == "online"
                                          for m in ms), 90, "daemon online")
            yield daemon, probe, log
        finally:
            probe.close()
            stop_process(daemon, 30)


def test_hostile_commands_each_get_an_error_and_the_daemon_keeps_serving(
        served: tuple[subprocess.Popen, Probe, Path]) -> None:
    daemon, probe, log = served
    count = 0
    codes: dict[str, int] = {}
    before = probe.request(f"edge/{DEV}/cmd/status", {})

    @seed(20261202)
    @settings(max_examples=1100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=cases, fleet=st.booleans())
    def check(case: tuple[str, bytes], fleet: bool) -> None:
        nonlocal count
        name, payload = case
        corr = uuid.uuid4().bytes
        topic = f"edge/{'all' if fleet else DEV}/cmd/{name}"
        probe.publish(topic, payload, response_topic="fleet/answers", correlation=corr)
        msg = probe.wait_for(lambda ms: next((m for m in ms if m.correlation == corr), None), 10,
                             f"an answer to {topic} {payload[:80]!r}")
        answer = msg.json()
        assert answer["ok"] is False, answer
        assert answer["error"]["code"].startswith("cmd."), answer
        assert answer["error"]["message"] and "\n" not in answer["error"]["message"]
        assert answer["device_id"] == DEV
        codes[answer["error"]["code"]] = codes.get(answer["error"]["code"], 0) + 1
        count += 1
        with probe._cond:
            probe.messages.clear()  # keep the probe's list short

    check()
    huge = b'{"text": "' + b"A" * 2_000_000 + b'"}'
    assert probe.request(f"edge/{DEV}/cmd/say", huge)["error"]["code"] == "cmd.too_large"
    print(f"\n{count} hostile commands refused: {dict(sorted(codes.items()))}")
    assert count >= 1000
    assert daemon.poll() is None
    # Nothing hostile reached the conversation: no turn was started, nothing was muted.
    after = probe.request(f"edge/{DEV}/cmd/status", {})
    assert after["metrics"]["turns"] == before["metrics"]["turns"] == 0 and after["muted"] is False
    assert after["state"] == "idle"
    assert after["mqtt"]["commands"]["refused"] == before["mqtt"]["commands"]["refused"] + count + 1
    # ...and it still does what a valid command asks.
    probe.subscribe(f"edge/{DEV}/event/#")
    assert probe.request(f"edge/{DEV}/cmd/say", {"text": "Still here."})["ok"] is True
    probe.wait_for(lambda ms: any(m.topic == f"edge/{DEV}/event/turn.end" and m.json().get("outcome") == "done"
                                  for m in ms), 60, "the announcement spoken")
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
