"""TLS with a test CA (made with the openssl CLI), mutual TLS, passwords and a per-device ACL,
against a real Mosquitto."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mosquitto import Cert, Mosquitto, Probe, make_ca, make_cert
from mqtt_daemon import RecordingController

from edge.config import MqttConfig
from edge.errors import ConfigError
from edge.events import Event, EventType
from edge.mqtt import MqttBridge


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = make_ca(d, "fleet-ca"), make_ca(d, "rogue-ca")
    return {"ca": ca, "server": make_cert(d, "broker", ca, server=True),
            "client": make_cert(d, "dev1", ca, server=False),
            "rogue_ca": rogue_ca, "rogue_client": make_cert(d, "dev1-rogue", rogue_ca, server=False)}


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[Callable[..., MqttBridge]]:
    made: list[MqttBridge] = []

    def make(broker: Mosquitto, device_id: str = "dev1", **cfg) -> MqttBridge:
        mqtt = MqttConfig(enabled=True, host=broker.host, port=broker.port, keepalive_s=5, **cfg)
        b = MqttBridge(mqtt, device_id, tmp_path / f"state-{device_id}-{len(made)}", RecordingController(),
                       version="test", models={}, reconnect_min_s=0.2, reconnect_max_s=1.0)
        made.append(b)
        b.start()
        return b

    yield make
    for b in made:
        b.stop(2.0)


def wait_until(pred: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {pred}")


def test_mutual_tls_accepts_the_right_client_certificate_only(tmp_path: Path, pki: dict[str, Cert], bridges,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge.mqtt")
    ca, client = pki["ca"], pki["client"]
    with Mosquitto(tmp_path / "broker", tls=(ca, pki["server"]), require_certificate=True) as broker:
        fleet = Probe(broker, tls=(ca, client)).connect()
        try:
            fleet.subscribe("edge/dev1/#")
            good = bridges(broker, tls=True, ca_file=str(ca.cert), cert_file=str(client.cert),
                           key_file=str(client.key))
            wait_until(lambda: good.connected)
            good.publish_event(Event(EventType.WAKE, {"name": "hey_jarvis"}))
            got = fleet.wait_for(lambda ms: next((m for m in ms if m.topic == "edge/dev1/event/wake"), None), 10)
            assert got.json()["name"] == "hey_jarvis" and good.last_error is None
            good.stop(2.0)
        finally:
            fleet.close()

        wrong = bridges(broker, "dev2", tls=True, ca_file=str(ca.cert), cert_file=str(pki["rogue_client"].cert),
                        key_file=str(pki["rogue_client"].key))
        error = wait_until(lambda: wrong.last_error)
        assert not wrong.connected
        assert f"MQTT broker 127.0.0.1:{broker.port}" in error
        assert "mqtt.cert_file/key_file are signed by a CA the broker trusts" in error
        assert error in caplog.text

        untrusted = bridges(broker, "dev3", tls=True, ca_file=str(pki["rogue_ca"].cert),
                            cert_file=str(client.cert), key_file=str(client.key))
        error = wait_until(lambda: untrusted.last_error)
        assert "the broker's certificate is not trusted" in error and "mqtt.ca_file" in error

        no_cert = bridges(broker, "dev4", tls=True, ca_file=str(ca.cert))
        error = wait_until(lambda: no_cert.last_error)
        assert "client certificate" in error and not no_cert.connected


def test_tls_settings_that_cannot_work_are_config_errors(tmp_path: Path, pki: dict[str, Cert]) -> None:
    def make(**cfg: object) -> None:
        MqttBridge(MqttConfig(enabled=True, **cfg), "dev1", tmp_path, RecordingController(), version="t", models={})

    with pytest.raises(ConfigError, match="mqtt.ca_file: cannot use .*missing.pem"):
        make(tls=True, ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="mqtt.tls is false"):
        make(ca_file=str(pki["ca"].cert))
    with pytest.raises(ConfigError, match="cannot load"):
        make(tls=True, cert_file=str(pki["client"].cert), key_file=str(pki["rogue_client"].key))
    with pytest.raises(ConfigError, match="mqtt.password_file: cannot read"):
        make(username="u", password_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="reserved for fleet-wide"):
        MqttBridge(MqttConfig(enabled=True), "all", tmp_path, RecordingController(), version="t", models={})


ACL = """\
# Each device reads and writes its own namespace, and reads fleet-wide commands.
pattern readwrite edge/%u/#
pattern read edge/all/cmd/#

user fleet
topic readwrite #
"""


def test_the_acl_keeps_a_device_out_of_other_devices_topics(tmp_path: Path, bridges,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-dev1-pw"
    pw_file = tmp_path / "dev1.pw"
    pw_file.write_text(secret + "\n")
    users = {"dev1": secret, "dev2": "dev2-pw", "fleet": "fleet-pw"}
    with Mosquitto(tmp_path / "broker", allow_anonymous=False, passwords=users, acl=ACL) as broker:
        fleet = Probe(broker, username="fleet", password="fleet-pw").connect()
        rogue = Probe(broker, username="dev2", password="dev2-pw").connect()
        try:
            fleet.subscribe("edge/#")
            dev1 = bridges(broker, username="dev1", password_file=str(pw_file))
            wait_until(lambda: dev1.connected)
            fleet.wait_for(lambda ms: any(m.topic == "edge/dev1/status" for m in ms), 10, "dev1 status")

            # Mosquitto grants these subscriptions and checks read access on each delivery:
            # dev2 must receive nothing of dev1's through them.
            rogue.subscribe("edge/dev1/#")
            rogue.subscribe("edge/#")
            dev1.publish_event(Event(EventType.TRANSCRIPT_FINAL, {"text": "my PIN is 1234"}))
            fleet.wait_for(lambda ms: any(m.topic == "edge/dev1/event/transcript.final" for m in ms), 10)

            # dev2 cannot command dev1, the fleet, or overwrite dev1's status.
            rogue.publish("edge/dev1/cmd/say", {"text": "from dev2"})
            rogue.publish("edge/all/cmd/say", {"text": "from dev2 to all"})
            rogue.publish("edge/dev1/status", {"state": "offline"}, retain=True)
            rogue.publish("edge/dev2/event/wake", {"n": 1})  # its own namespace works

            # The fleet can; with a response topic inside dev1's namespace, which dev1 may write.
            answer = fleet.request("edge/all/cmd/status", {}, response_topic="edge/dev1/answers/fleet")
            assert answer["ok"] is True and answer["calls"] == []
            fleet.wait_for(lambda ms: any(m.topic == "edge/dev2/event/wake" for m in ms), 10)
            assert not any(m.topic.startswith("edge/dev1/") for m in rogue.messages)
            assert not [m for m in fleet.messages if m.topic in ("edge/dev1/cmd/say", "edge/all/cmd/say")]
            later = Probe(broker, username="fleet", password="fleet-pw").connect()
            try:
                later.subscribe("edge/dev1/status")
                status = later.wait_for(lambda ms: ms and ms[0], 10).json()
                assert status["state"] == "online" and status["device_id"] == "dev1"
            finally:
                later.close()

            bad = bridges(broker, "dev3", username="dev3", password="wrong")
            error = wait_until(lambda: bad.last_error)
            assert "refused the login" in error and "mqtt.username" in error
        finally:
            fleet.close()
            rogue.close()
    assert secret not in caplog.text and "wrong" not in caplog.text.replace("wrong)", "")
