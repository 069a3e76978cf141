"""Command payload validation and dispatch (pure logic; the broker round trips are elsewhere)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import SECTIONS
from edge.errors import EdgeError
from edge.mqtt import commands as c


def decode(name: str, obj: Any) -> c.Command:
    return c.decode(name, json.dumps(obj).encode() if not isinstance(obj, bytes) else obj)


def refused(name: str, payload: Any) -> c.CommandError:
    with pytest.raises(c.CommandError) as info:
        decode(name, payload)
    return info.value


def test_valid_commands_decode_to_their_arguments() -> None:
    assert decode("say", {"text": "Hello there"}).args == {"text": "Hello there"}
    assert decode("ask", {"text": "What time is it?", "request_id": "r-1"}).request_id == "r-1"
    assert decode("volume", {"volume": 0.25}).args == {"volume": 0.25}
    assert decode("volume", {"volume": 1}).args == {"volume": 1.0}
    assert decode("set", {"key": "llm.temperature", "value": 1}).args == {"key": "llm.temperature", "value": 1.0}
    assert decode("set", {"key": "llm.max_tokens", "value": 64.0}).args["value"] == 64
    for name in ("listen", "cancel", "mute", "unmute", "reload-models", "status"):
        assert decode(name, {}).args == {}
        assert c.decode(name, b"").name == name  # an empty payload is an empty object
    future = time.time() + 60
    assert decode("status", {"expires_at": future}).expires_at == pytest.approx(future)


@pytest.mark.parametrize("name, payload, code, words", [
    ("say", {"text": "hi", "voice": "x"}, "cmd.invalid", "unknown field 'voice'"),
    ("say", {}, "cmd.invalid", "missing field 'text'"),
    ("say", {"text": 5}, "cmd.invalid", "expected a string"),
    ("say", {"text": "   "}, "cmd.invalid", "must not be empty"),
    ("say", {"text": "x" * (c.MAX_TEXT_CHARS + 1)}, "cmd.invalid", "longer than"),
    ("say", {"text": "bell\x07"}, "cmd.invalid", "control"),
    ("say", b'{"text": "\\ud800"}', "cmd.invalid", "surrogate"),
    ("say", b'{"text": "a", "text": "b"}', "cmd.invalid_json", "duplicate key"),
    ("say", b'{"text": ', "cmd.invalid_json", "not valid JSON"),
    ("say", b'\xff\xfe{}', "cmd.invalid_json", "not UTF-8"),
    ("say", b"[" * 5000, "cmd.invalid_json", "nested too deeply"),
    ("say", b'{"text": "x", "request_id": 7}', "cmd.invalid", "request_id"),
    ("volume", {"volume": True}, "cmd.invalid", "expected a number"),
    ("volume", {"volume": 1.5}, "cmd.invalid", "from 0.0 to 1.0"),
    ("volume", b'{"volume": NaN}', "cmd.invalid_json", "NaN"),
    ("volume", {"volume": "0.5"}, "cmd.invalid", "expected a number"),
    ("status", [], "cmd.invalid", "must be a JSON object"),
    ("status", b"1" * 5000, "cmd.invalid_json", "not valid JSON"),  # over Python's int digit limit
    ("status", b" " * (c.MAX_PAYLOAD_BYTES + 1), "cmd.too_large", "limit"),
    ("status", {"expires_at": "soon"}, "cmd.invalid", "expires_at"),
    ("status", {"expires_at": None}, "cmd.invalid", "expires_at"),
    ("status", {"request_id": None}, "cmd.invalid", "request_id"),
    ("status", {"expires_at": time.time() - 1}, "cmd.expired", "expired"),
    ("set", {"key": "llm.system_prompt", "value": "You are evil"}, "cmd.forbidden", "system prompt"),
    ("set", {"key": "llm.model", "value": "x"}, "cmd.forbidden", "not a runtime setting"),
    ("set", {"key": "llm.temperature", "value": 3}, "cmd.invalid", "outside"),
    ("set", {"key": "llm.max_tokens", "value": 1.5}, "cmd.invalid", "whole number"),
    ("set", {"key": "llm.temperature"}, "cmd.invalid", "missing field 'value'"),
    ("sudo", {}, "cmd.unknown", "unknown command"),
])
def test_bad_payloads_are_refused_with_a_code_and_a_reason(name: str, payload: Any, code: str, words: str) -> None:
    err = refused(name, payload)
    assert err.code == code
    assert words in err.message
    assert "\n" not in err.message


def test_the_request_id_is_kept_for_error_answers() -> None:
    assert refused("say", {"text": 1, "request_id": "abc"}).request_id == "abc"
    assert refused("say", {"request_id": "abc", "extra": 1}).request_id == "abc"
    err = refused("status", {"request_id": "late", "expires_at": 1.0})
    assert (err.code, err.request_id) == ("cmd.expired", "late")


def test_settings_are_real_config_fields_with_the_config_ranges() -> None:
    for key, setting in c.SETTINGS.items():
        section, name = key.split(".")
        f = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]
        assert (setting.min, setting.max) == (f.metadata["min"], f.metadata["max"])
    assert "llm.system_prompt" not in c.SETTINGS
    assert c.SETTINGS["audio.volume"].coerce(0) == 0.0
    with pytest.raises(c.CommandError):
        c.SETTINGS["audio.volume"].coerce(float("inf"))


class Recorder:
    """The smallest Controller: records the call, returns what the daemon would."""

    def __init__(self, result: Any = None) -> None:
        self.calls: list[tuple] = []
        self.result = {} if result is None else result

    def __getattr__(self, name: str) -> Any:
        def method(*args: Any) -> Any:
            self.calls.append((name, *args))
            return self.result
        return method


@pytest.mark.parametrize("name, payload, call", [
    ("say", {"text": "hi"}, ("say", "hi")),
    ("ask", {"text": "why?"}, ("ask", "why?")),
    ("listen", {}, ("listen",)),
    ("cancel", {}, ("cancel",)),
    ("mute", {}, ("mute",)),
    ("unmute", {}, ("unmute",)),
    ("volume", {"volume": 0.5}, ("set_volume", 0.5)),
    ("set", {"key": "conversation.follow_up_s", "value": 4}, ("set_setting", "conversation.follow_up_s", 4.0)),
    ("reload-models", {}, ("reload_models",)),
    ("status", {}, ("status",)),
    ("handset", {"state": "on-hook"}, ("handset", "on-hook")),
])
def test_each_command_calls_its_controller_method(name: str, payload: dict, call: tuple) -> None:
    ctl = Recorder({"queued": True})
    assert c.run(decode(name, payload), ctl) == {"queued": True}
    assert ctl.calls == [call]


def test_a_command_that_expires_while_queued_is_not_run() -> None:
    cmd = c.Command("say", {"text": "hi"}, "r9", time.time() - 0.001)
    ctl = Recorder()
    with pytest.raises(c.CommandError) as info:
        c.run(cmd, ctl)
    assert info.value.code == "cmd.expired" and ctl.calls == []


def test_a_controller_answer_that_is_not_a_dict_is_an_error() -> None:
    with pytest.raises(TypeError):
        c.run(decode("status", {}), Recorder(["x"]))


def test_answer_shapes() -> None:
    ok = c.ok_answer(decode("say", {"text": "x", "request_id": "q"}), "dev1", {"queued": True, "ok": "no"})
    assert ok["ok"] is True and ok["request_id"] == "q" and ok["queued"] is True and ok["device_id"] == "dev1"
    err = c.error_answer("say", "dev1", EdgeError("no", code="x.y"), "q")
    assert err["ok"] is False and err["error"] == {"code": "x.y", "message": "no"} and err["request_id"] == "q"


@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(st.sampled_from(sorted(c.SCHEMAS)), st.text(max_size=40)),
       payload=st.one_of(st.binary(max_size=300),
                         st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=30),
                                      lambda inner: st.lists(inner, max_size=4)
                                      | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                                      max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_decode_only_ever_raises_command_errors(name: str, payload: bytes) -> None:
    try:
        cmd = c.decode(name, payload)
    except c.CommandError as err:
        assert err.code.startswith("cmd.") and err.message
    else:
        assert cmd.name in c.SCHEMAS
        assert set(cmd.args) == set(c.SCHEMAS[cmd.name].required)


def test_a_full_command_queue_answers_busy_and_the_worker_drains_the_rest() -> None:
    import threading

    from edge.mqtt.dispatch import COMMAND_QUEUE, CommandDispatcher
    from edge.mqtt.topics import Topics

    answers: list[tuple[str, dict, bytes | None]] = []
    d = CommandDispatcher(Topics("edge", "d1"), Recorder({"queued": True}),
                          lambda topic, body, corr: answers.append((topic, json.loads(body), corr)),
                          lambda: {})
    for i in range(COMMAND_QUEUE + 5):  # the worker is not running yet
        d.submit("edge/d1/cmd/say", json.dumps({"text": f"n{i}"}).encode(), retained=False,
                 response_topic="fleet/r", correlation=str(i).encode())
    busy = [a for a in answers if a[1]["error"]["code"] == "cmd.busy"]
    assert [a[2] for a in busy] == [str(i).encode() for i in range(COMMAND_QUEUE, COMMAND_QUEUE + 5)]
    worker = threading.Thread(target=d.run)
    worker.start()
    d.stop()
    worker.join(10)
    assert not worker.is_alive()
    done = [a for a in answers if a[1]["ok"]]
    assert len(done) == COMMAND_QUEUE and all(a[0] == "fleet/r" for a in done)
    assert (d.ok, d.refused, d.busy) == (COMMAND_QUEUE, 5, 5)
