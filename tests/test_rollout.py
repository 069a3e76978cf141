"""Rollouts on the device: signed release manifests, the mirror allow-list, the rollout command's
schema, and the rollout manager's state machine against a real model store and a real HTTP
mirror on loopback, with a fake pipeline at the small seam the manager uses (load a candidate,
put it into service, say whether a turn is in progress)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.config import Config, RolloutConfig, load_config
from edge.errors import ModelError
from edge.models.store import FileRecord, InstallRecord, ModelStore, sha256_file, version_of
from edge.mqtt import commands as cmds
from edge.rollout.errors import RolloutError
from edge.rollout.journal import Journal, recover
from edge.rollout.manager import RolloutManager
from edge.rollout.release import (
    digest,
    load_private_key,
    load_public_key,
    mirror_allowed,
    parse_release,
    release_paths,
    verify,
    write_keypair,
)
from edge.rollout.selftest import word_error_rate
from edge.rollout.sign import sign_release

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "config" / "packs" / "harbour-museum"
MODEL = "whisper-tiny-en"  # a model of the manifest the config below uses (speech-to-text)
FILES = ("tiny.en-encoder.int8.onnx", "tiny.en-decoder.int8.onnx", "tiny.en-tokens.txt")
TEXT = "Where can I buy a ticket for the museum?"


# --- what the other rollout tests share too ---------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class Mirror:
    """A directory served over HTTP on loopback (``http.server``, a thread per request)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_Quiet, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Mirror:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclasses.dataclass
class Keys:
    private: Path
    public: Path

    @property
    def signer(self) -> Any:
        return load_private_key(self.private)


def make_keys(directory: Path, name: str = "fleet") -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    write_keypair(directory / f"{name}.key", directory / f"{name}.pub")
    return Keys(directory / f"{name}.key", directory / f"{name}.pub")


def write_files(directory: Path, contents: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (directory / name).write_bytes(data)


def install_version(store: ModelStore, model_id: str, contents: dict[str, bytes], kind: str = "stt-offline") -> str:
    """A version of ``model_id`` made current, as `edge-voice models fetch` would leave it."""
    with store.lock():
        staging = store.new_staging(model_id)
        write_files(staging, contents)
        files = {n: FileRecord(len(d), sha256_file(staging / n), (staging / n).stat().st_mtime_ns, "manifest")
                 for n, d in contents.items()}
        record = InstallRecord(model=model_id, kind=kind, version=version_of(files), files=files, roles={},
                               source="test", installed_at="now")
        store.commit(model_id, staging, record)
    return record.version


def device_config(tmp: Path, *, public_key: Path | None, mirrors: list[str], **rollout: Any) -> Config:
    cfg = load_config(REPO / "config" / "dev.toml", environ={})
    return dataclasses.replace(
        cfg, device=dataclasses.replace(cfg.device, state_dir=str(tmp / "state"), models_dir=str(tmp / "models")),
        rollout=dataclasses.replace(cfg.rollout, public_key=str(public_key) if public_key else "",
                                    mirrors=mirrors, **rollout))


class FakeSynth:
    sample_rate = 16000

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent

    def synthesize(self, text: str, cancel: Any) -> Iterator[np.ndarray]:
        t = np.arange(int(0.08 * len(text) * self.sample_rate)) / self.sample_rate
        wave = 0.0 if self.silent else 8000 * np.sin(2 * np.pi * 220 * t)
        yield (wave * np.ones_like(t)).astype(np.int16)

    def close(self) -> None:
        pass


class FakeRecognizer:
    sample_rate = 16000

    def __init__(self, hears: str) -> None:
        self.hears = hears

    def transcribe(self, samples: np.ndarray) -> tuple[str, float]:
        return self.hears, 0.01

    def close(self) -> None:
        pass


@dataclasses.dataclass
class FakeCandidate:
    synth: Any
    recognizer: Any
    chat: Any = None
    wake: Any = None
    embedder: Any = None
    venue: Any = None
    closed: bool = False

    def close(self) -> None:
        self.closed = True


class FakeHost:
    """The pipeline's side of the seam: records what the manager asks of it."""

    def __init__(self, hears: str = TEXT) -> None:
        self.hears = hears
        self.busy = False
        self.load_error: Exception | None = None
        self.block: threading.Event | None = None
        self.loaded: list[tuple[str, ...]] = []
        self.candidates: list[FakeCandidate] = []
        self.adopted: list[Any] = []
        self.seen_current: list[str | None] = []
        self.store: ModelStore | None = None

    def in_turn(self) -> bool:
        return self.busy

    def load_candidate(self, roles: tuple[str, ...]) -> FakeCandidate:
        self.loaded.append(roles)
        if self.store is not None:
            self.seen_current.append(self.store.current(MODEL))  # what a real load would read
        if self.block is not None:
            self.block.wait(30)
        if self.load_error is not None:
            raise self.load_error
        cand = FakeCandidate(FakeSynth(), FakeRecognizer(self.hears))
        self.candidates.append(cand)
        return cand

    def adopt(self, candidate: Any) -> None:
        self.adopted.append(candidate)


class Reports:
    """The reporter: every event and status the manager hands over, and a wait for the end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.statuses: list[tuple[dict[str, Any] | None, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def rollout_event(self, event_type: str, body: dict[str, Any]) -> None:
        with self.cond:
            self.events.append((event_type, json.loads(json.dumps(body))))
            self.cond.notify_all()

    def rollout_status(self, status: dict[str, Any] | None, versions: dict[str, Any]) -> None:
        with self.cond:
            self.statuses.append((status, versions))
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        with self.cond:
            found = self.cond.wait_for(pred, timeout)
        assert found, f"timed out waiting for {what}; events: {[(t, b.get('state')) for t, b in self.events]}"
        return found

    def done(self, rollout_id: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda: next((b for t, b in self.events if t == "rollout.done"
                                           and b["rollout_id"] == rollout_id), None), timeout, f"{rollout_id} done")

    def states(self, rollout_id: str) -> list[str]:
        out: list[str] = []
        for _, body in self.events:
            if body["rollout_id"] == rollout_id and (not out or out[-1] != body["state"]):
                out.append(body["state"])
        return out


@dataclasses.dataclass
class Device:
    """One device's rollout side: its config, model store, the manager, the fake pipeline."""

    cfg: Config
    store: ModelStore
    host: FakeHost
    reports: Reports
    manager: RolloutManager
    old: str

    def request(self, rollout_id: str, version: str, mirror: str, *, kind: str = "model", target: str = MODEL,
                expires_in: float = 600) -> dict[str, Any]:
        return self.manager.request({"rollout_id": rollout_id, "kind": kind, "id": target, "version": version,
                                     "mirror": mirror, "expires_at": time.time() + expires_in})


OLD = {FILES[0]: b"encoder v1" * 100, FILES[1]: b"decoder" * 30000, FILES[2]: b"tokens\n" * 10}
NEW = {FILES[0]: b"encoder v2" * 100, FILES[1]: b"decoder" * 30000, FILES[2]: b"tokens\n" * 10}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    with Mirror(tmp_path / "mirror") as m:
        yield m


def publish(mirror: Mirror, keys: Keys, contents: dict[str, bytes], path: str = "whisper-tiny.en/v2",
            **kw: Any) -> str:
    write_files(mirror.root / path, contents)
    return sign_release(mirror.root, "model", MODEL, keys.signer, path=path, **kw).version


def make_device(tmp: Path, keys: Keys | None, mirrors: list[str], host: FakeHost | None = None,
                **rollout: Any) -> Device:
    cfg = device_config(tmp, public_key=keys.public if keys else None, mirrors=mirrors, **rollout)
    store = ModelStore(cfg.models_dir)
    old = install_version(store, MODEL, OLD)
    host = host or FakeHost()
    host.store = store
    reports = Reports()
    manager = RolloutManager(cfg, host, reports, cache_dir=tmp / "cache")
    return Device(cfg, store, host, reports, manager, old)


@pytest.fixture
def device(tmp_path: Path, keys: Keys, mirror: Mirror) -> Iterator[Device]:
    d = make_device(tmp_path, keys, [mirror.url])
    d.manager.start()
    yield d
    d.manager.stop()


# --- release manifests and signatures ----------------------------------------------------------

def test_a_signed_release_verifies_and_any_change_to_it_does_not(tmp_path: Path, keys: Keys) -> None:
    write_files(tmp_path / "m" / "whisper-tiny.en", NEW)
    release = sign_release(tmp_path / "m", "model", MODEL, keys.signer)
    manifest, signature = (tmp_path / "m" / p for p in release_paths("model", MODEL, release.version))
    raw, sig = manifest.read_bytes(), signature.read_bytes()
    verify(raw, sig, load_public_key(keys.public))
    parsed = parse_release(raw)
    assert parsed.version == release.version == digest(parsed.files)
    assert {f.name: f.role for f in parsed.files} == {FILES[0]: "encoder", FILES[1]: "decoder", FILES[2]: "tokens"}
    assert parsed.path == "whisper-tiny.en"  # the manifest's mirror layout, <mirror>/<dir>/<file>
    parsed.check_for("model", MODEL, release.version)

    tampered = raw.replace(parsed.files[0].sha256.encode(), b"0" * 64)
    with pytest.raises(RolloutError) as err:
        verify(tampered, sig, load_public_key(keys.public))
    assert err.value.code == "rollout.signature" and "bad signature" in err.value.message
    other = make_keys(tmp_path / "other")
    with pytest.raises(RolloutError) as err:
        verify(raw, sig, load_public_key(other.public))
    assert err.value.code == "rollout.signature"
    with pytest.raises(RolloutError) as err:
        verify(raw, b"not base64!", load_public_key(keys.public))
    assert err.value.code == "rollout.signature"
    # Even correctly signed, a manifest whose version is not the digest of its files is refused.
    data = json.loads(raw)
    data["version"] = "0123456789ab"
    with pytest.raises(RolloutError) as err:
        parse_release(json.dumps(data).encode())
    assert err.value.code == "rollout.release" and "not the digest" in err.value.message
    with pytest.raises(RolloutError) as err:
        parsed.check_for("model", MODEL, "0123456789ab")
    assert err.value.code == "rollout.mismatch"
    with pytest.raises(RolloutError) as err:
        parsed.check_for("model", MODEL, release.version, now=parsed.expires_at + 1)
    assert err.value.code == "rollout.release_expired"


def test_a_manifest_that_names_a_path_outside_the_mirror_is_refused(tmp_path: Path, keys: Keys) -> None:
    write_files(tmp_path / "m" / "x", NEW)
    release = sign_release(tmp_path / "m", "model", MODEL, keys.signer, path="x")
    for bad_path in ("../etc", "/etc", "a/../../b", "a//b"):
        data = release.as_json()
        data["path"] = bad_path
        with pytest.raises(RolloutError, match="plain relative directory"):
            parse_release(json.dumps(data).encode())
    data = release.as_json()
    data["files"][0]["name"] = "../../evil"
    with pytest.raises(RolloutError, match="bad file name"):
        parse_release(json.dumps(data).encode())


def test_the_mirror_allow_list() -> None:
    allowed = ["https://mirror.example.org/edge/", "http://127.0.0.1:8080"]
    assert mirror_allowed("https://mirror.example.org/edge/", allowed)
    assert mirror_allowed("https://mirror.example.org/edge/2026/", allowed)
    assert mirror_allowed("https://MIRROR.example.org:443/edge", allowed)
    assert mirror_allowed("http://127.0.0.1:8080/anything/", allowed)
    assert not mirror_allowed("https://mirror.example.org/edgy/", allowed)
    assert not mirror_allowed("http://mirror.example.org/edge/", allowed)  # another scheme
    assert not mirror_allowed("https://mirror.example.org:8443/edge/", allowed)
    assert not mirror_allowed("https://mirror.example.org.evil.net/edge/", allowed)
    assert not mirror_allowed("https://mirror.example.org/edge/../other/", allowed)
    assert not mirror_allowed("http://127.0.0.1:8081/", allowed)


def test_the_rollout_command_is_validated_like_every_other() -> None:
    good = {"rollout_id": "r1", "kind": "model", "id": MODEL, "version": "0123456789ab",
            "mirror": "https://mirror.example.org/edge/", "expires_at": time.time() + 60}
    cmd = cmds.decode("rollout", json.dumps(good).encode())
    assert cmd.args["version"] == "0123456789ab" and cmd.expires_at == good["expires_at"]
    for change, message in (({"version": "v2"}, "12 hex digits"),
                            ({"mirror": "ftp://x/"}, r"http\(s\) URL"), ({"kind": "firmware"}, "one of model, pack"),
                            ({"id": "../x"}, "model or pack id"), ({"extra": 1}, "unknown field")):
        body = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(cmds.CommandError, match=message):
            cmds.decode("rollout", json.dumps(body).encode())
    with pytest.raises(cmds.CommandError) as err:
        cmds.decode("rollout", json.dumps({**good, "expires_at": time.time() - 1}).encode())
    assert err.value.code == "cmd.expired"

    # Without an expiry it passes the schema (fleet cmd adds one) but the device refuses it.
    no_expiry = cmds.decode("rollout", json.dumps({k: v for k, v in good.items() if k != "expires_at"}).encode())
    with pytest.raises(RolloutError, match="expires_at is required"):
        from edge.rollout.journal import Request

        Request.from_args(no_expiry.args)

    class NoRollouts:  # a controller without rollouts (the fleet's simulated devices)
        pass

    with pytest.raises(cmds.CommandError) as err:
        cmds.run(cmd, NoRollouts())  # type: ignore[arg-type]
    assert err.value.code == "cmd.unsupported"


def test_word_error_rate() -> None:
    assert word_error_rate(TEXT, "where can i buy a ticket for the museum") == 0.0
    assert word_error_rate(TEXT, "Where can I buy a ticket?") == pytest.approx(3 / 9)
    assert word_error_rate(TEXT, "") == 1.0


# --- the device's state machine ----------------------------------------------------------------

def test_a_version_is_fetched_verified_switched_self_tested_and_confirmed(device: Device, mirror: Mirror,
                                                                           keys: Keys) -> None:
    version = publish(mirror, keys, NEW)
    answer = device.request("r-ok", version, mirror.url)
    assert answer == {"rollout_id": "r-ok", "state": "queued", "accepted": True}
    done = device.reports.done("r-ok")
    print("timings", done["timings_ms"], "downloaded", done["downloaded"], "reused", done["reused"])
    assert done["outcome"] == "confirmed" and done["error"] is None, done
    assert device.reports.states("r-ok") == ["queued", "fetching", "verifying", "waiting", "switching", "loading",
                                             "self-test", "confirming", "confirmed"]
    assert device.store.state(MODEL) == {"current": version, "previous": device.old}
    assert device.host.seen_current == [version]  # the candidate was loaded from the new version
    assert device.host.loaded == [("stt",)] and device.host.adopted == device.host.candidates
    assert done["selftest"]["ok"] and done["selftest"]["checks"]["stt"]["wer"] == 0.0
    # The decoder and tokens were in the old version: linked and re-hashed, not downloaded again.
    assert done["reused"] == len(NEW[FILES[1]]) + len(NEW[FILES[2]]) and done["downloaded"] == len(NEW[FILES[0]])
    status, versions = device.reports.statuses[-1]
    assert status is not None and status["state"] == "confirmed" and versions["models"][MODEL] == version
    assert Journal(device.cfg.state_dir).active() is None
    # The same rollout again (the retained desired state at a reconnect) is not run again.
    assert device.request("r-ok", version, mirror.url)["done"] is True
    assert len(device.host.loaded) == 1


def test_a_version_that_fails_its_self_test_is_switched_back_and_never_serves(tmp_path: Path, mirror: Mirror,
                                                                             keys: Keys) -> None:
    d = make_device(tmp_path, keys, [mirror.url], FakeHost(hears="the quick brown fox"))
    d.manager.start()
    try:
        version = publish(mirror, keys, NEW)
        d.request("r-bad", version, mirror.url)
        done = d.reports.done("r-bad")
    finally:
        d.manager.stop()
    assert done["outcome"] == "rolled_back" and done["error"]["code"] == "rollout.selftest", done
    assert "word error rate" in done["error"]["message"]
    assert d.store.state(MODEL) == {"current": d.old, "previous": None}  # exactly as before
    assert d.host.adopted == [] and d.host.candidates[0].closed
    assert d.host.seen_current == [version]
    assert d.reports.states("r-bad")[-3:] == ["loading", "self-test", "rolled_back"]
    assert "rollback_ms" in done["timings_ms"]
    assert version in d.store.versions(MODEL)  # kept for inspection until gc; not current, not previous


def test_a_version_that_does_not_load_is_switched_back(tmp_path: Path, mirror: Mirror, keys: Keys) -> None:
    host = FakeHost()
    host.load_error = ModelError("tiny.en-encoder.int8.onnx: not an ONNX model", code="model.invalid")
    d = make_device(tmp_path, keys, [mirror.url], host)
    d.manager.start()
    try:
        d.request("r-noload", publish(mirror, keys, NEW), mirror.url)
        done = d.reports.done("r-noload")
    finally:
        d.manager.stop()
    assert done["outcome"] == "rolled_back" and done["error"]["code"] == "rollout.load"
    assert "not an ONNX model" in done["error"]["message"]
    assert d.store.current(MODEL) == d.old


def test_a_device_that_does_not_confirm_within_the_deadline_switches_back(tmp_path: Path, mirror: Mirror,
                                                                          keys: Keys) -> None:
    host = FakeHost()
    host.block = threading.Event()  # loading hangs
    d = make_device(tmp_path, keys, [mirror.url], host, confirm_deadline_s=1.0)
    d.manager.start()
    try:
        d.request("r-slow", publish(mirror, keys, NEW), mirror.url)
        done = d.reports.done("r-slow")
        assert done["outcome"] == "rolled_back" and done["error"]["code"] == "rollout.deadline", done
        assert d.store.current(MODEL) == d.old
        host.block.set()  # the load finishes late: its stages are freed, never used
        deadline = time.monotonic() + 10
        while not (host.candidates and host.candidates[0].closed) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert host.candidates and host.candidates[0].closed and host.adopted == []
    finally:
        d.manager.stop()


def test_a_slow_self_test_fails_on_a_device_with_a_tight_budget(tmp_path: Path, mirror: Mirror, keys: Keys) -> None:
    d = make_device(tmp_path, keys, [mirror.url], selftest_max_ms=0)
    d.manager.start()
    try:
        d.request("r-budget", publish(mirror, keys, NEW), mirror.url)
        done = d.reports.done("r-budget")
    finally:
        d.manager.stop()
    assert done["outcome"] == "rolled_back" and "selftest_max_ms" in done["error"]["message"]


@pytest.mark.parametrize("fault", ["wrong-file", "missing-file", "unreachable", "bad-signature", "no-signature",
                                   "unknown-version"])
def test_a_bad_mirror_or_manifest_fails_before_anything_switches(tmp_path: Path, mirror: Mirror, keys: Keys,
                                                                 fault: str) -> None:
    d = make_device(tmp_path, keys, [mirror.url, "http://127.0.0.1:9/"])
    d.manager.start()
    url = mirror.url
    try:
        version = publish(mirror, keys, NEW)
        manifest, signature = (mirror.root / p for p in release_paths("model", MODEL, version))
        if fault == "wrong-file":  # the mirror serves other bytes than the fleet signed
            (mirror.root / "whisper-tiny.en/v2" / FILES[0]).write_bytes(b"encoder v3" * 100)
        elif fault == "missing-file":
            (mirror.root / "whisper-tiny.en/v2" / FILES[0]).unlink()
        elif fault == "unreachable":
            url = "http://127.0.0.1:9/"
        elif fault == "bad-signature":  # someone with the mirror, without the key, edits the manifest
            manifest.write_bytes(manifest.read_bytes().replace(b'"label"', b'"label"') + b" ")
        elif fault == "no-signature":
            signature.unlink()
        elif fault == "unknown-version":
            version = "0123456789ab"
        d.request(f"r-{fault}", version, url)
        done = d.reports.done(f"r-{fault}")
    finally:
        d.manager.stop()
    expected = {"wrong-file": "model.checksum", "missing-file": "model.not_found",
                "unreachable": "rollout.mirror_unreachable", "bad-signature": "rollout.signature",
                "no-signature": "rollout.signature", "unknown-version": "rollout.unknown_version"}[fault]
    print(fault, done["error"])
    assert done["outcome"] == "failed" and done["error"]["code"] == expected, done
    assert d.store.state(MODEL) == {"current": d.old, "previous": None}
    assert d.host.loaded == [] and "switching" not in d.reports.states(f"r-{fault}")


def test_requests_a_device_refuses(tmp_path: Path, mirror: Mirror, keys: Keys) -> None:
    d = make_device(tmp_path, keys, [mirror.url])
    d.manager.start()
    try:
        version = publish(mirror, keys, NEW)
        cases = {
            "rollout.mirror_not_allowed": lambda: d.request("r1", version, "http://127.0.0.1:1/"),
            "rollout.expired": lambda: d.request("r2", version, mirror.url, expires_in=-1),
            "rollout.unknown_model": lambda: d.request("r3", version, mirror.url, target="no-such-model"),
            "rollout.not_used": lambda: d.request("r4", version, mirror.url, target="piper-en-us-lessac-medium"),
            "rollout.not_used ": lambda: d.request("r5", version, mirror.url, kind="pack", target="harbour-museum"),
            "rollout.invalid": lambda: d.request("r6", "v2", mirror.url),
        }
        for code, call in cases.items():
            with pytest.raises(RolloutError) as err:
                call()
            assert err.value.code == code.strip(), (code, err.value.message)
            print(code.strip(), "-", err.value.message)
        # A refusal is reported once and remembered: the same rollout is not looked at again.
        refused = [b for t, b in d.reports.events if t == "rollout.done" and b["rollout_id"] == "r1"]
        assert len(refused) == 1 and refused[0]["outcome"] == "refused"
        with pytest.raises(RolloutError) as err:
            d.request("r1", version, "http://127.0.0.1:1/")
        assert err.value.code == "rollout.mirror_not_allowed"
        assert len([b for t, b in d.reports.events if t == "rollout.done" and b["rollout_id"] == "r1"]) == 1
    finally:
        d.manager.stop()
    no_key = make_device(tmp_path / "nokey", None, [mirror.url])
    with pytest.raises(RolloutError) as err:
        no_key.request("r7", version, mirror.url)
    assert err.value.code == "rollout.disabled" and "public_key" in err.value.message
    assert d.host.loaded == [] and d.store.current(MODEL) == d.old


def test_the_download_waits_while_a_turn_is_in_progress_and_keeps_to_the_bandwidth(
        tmp_path: Path, mirror: Mirror, keys: Keys) -> None:
    host = FakeHost()
    host.busy = True  # a visitor is speaking when the rollout arrives
    d = make_device(tmp_path, keys, [mirror.url], host, bandwidth_kbps=16_000)  # 2 MB/s
    big = {**NEW, FILES[0]: np.random.default_rng(1).bytes(3_000_000)}
    d.manager.start()
    try:
        d.request("r-quiet", publish(mirror, keys, big), mirror.url)
        deadline = time.monotonic() + 20
        while not list((tmp_path / "cache").rglob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)  # nothing announces the first block: look for its file
        time.sleep(0.5)
        # One block was read, then the download waited for the turn to end.
        [part] = list((tmp_path / "cache").rglob("*.part"))
        assert part.stat().st_size == 1 << 16
        assert "switching" not in d.reports.states("r-quiet")
        t0 = time.monotonic()
        host.busy = False
        d.manager.on_event(_state_event())  # the turn ended
        done = d.reports.done("r-quiet")
        took = time.monotonic() - t0
    finally:
        d.manager.stop()
    assert done["outcome"] == "confirmed", done
    print(f"3 MB at 16 Mbit/s took {took:.2f} s after the turn (unthrottled on loopback: a few ms); "
          f"paused {done['timings_ms'].get('paused_ms')} ms")
    assert done["timings_ms"]["paused_ms"] >= 400


def _state_event() -> Any:
    from edge.events import Event, EventType

    return Event(EventType.STATE, {"state": "idle"})


def test_a_power_cut_after_the_switch_boots_on_the_previous_version(tmp_path: Path, mirror: Mirror,
                                                                    keys: Keys) -> None:
    host = FakeHost()
    host.block = threading.Event()
    d = make_device(tmp_path, keys, [mirror.url], host)
    d.manager.start()
    version = publish(mirror, keys, NEW)
    d.request("r-cut", version, mirror.url)
    d.reports.wait_for(lambda: "loading" in d.reports.states("r-cut"), 30, "loading")
    # The power goes: nothing of this process survives but its files.
    assert d.store.current(MODEL) == version
    assert Journal(d.cfg.state_dir).active()["phase"] == "switched"
    state_dir, models = d.cfg.state_dir, d.cfg.models_dir
    snapshot = tmp_path / "after-the-cut"
    shutil.copytree(state_dir, snapshot / "state")
    shutil.copytree(models, snapshot / "models", symlinks=True)
    host.block.set()
    d.manager.stop()
    # The next boot, before anything loads:
    status = recover(snapshot / "state", snapshot / "models", snapshot / "packs")
    assert status is not None and status["outcome"] == "rolled_back"
    assert status["error"]["code"] == "rollout.interrupted"
    store = ModelStore(snapshot / "models")
    assert store.state(MODEL) == {"current": d.old, "previous": None}
    assert recover(snapshot / "state", snapshot / "models", snapshot / "packs") is None  # once
    # ... and the fleet hears of it when the rollout manager starts.
    cfg = dataclasses.replace(d.cfg, device=dataclasses.replace(d.cfg.device, state_dir=str(snapshot / "state"),
                                                                models_dir=str(snapshot / "models")))
    reports = Reports()
    manager = RolloutManager(cfg, FakeHost(), reports, cache_dir=tmp_path / "cache2")
    manager.start()
    manager.stop()
    [(kind, body)] = reports.events
    assert kind == "rollout.done" and body["rollout_id"] == "r-cut" and body["outcome"] == "rolled_back"


def test_a_knowledge_pack_is_rolled_out_and_a_pack_with_a_typo_never_becomes_current(
        tmp_path: Path, mirror: Mirror, keys: Keys) -> None:
    from edge.knowledge.store import PackStore

    cfg = device_config(tmp_path, public_key=keys.public, mirrors=[mirror.url])
    cfg = dataclasses.replace(cfg, knowledge=dataclasses.replace(cfg.knowledge, pack="harbour-museum"))
    packs = PackStore(cfg.packs_dir)
    installed, _ = packs.install(PACK)
    src = mirror.root / "packs" / "harbour-museum"
    shutil.copytree(PACK, src)
    facts = (src / "facts.md").read_text()
    (src / "facts.md").write_text(facts + "\n- The café now opens at 8 a.m.\n")
    (src / "pack.toml").write_text((src / "pack.toml").read_text().replace('version = "2025.06.1"',
                                                                           'version = "2025.07.1"'))
    release = sign_release(mirror.root, "pack", "harbour-museum", keys.signer)
    assert release.pack_version == "2025.07.1" and {f.name for f in release.files} >= {"pack.toml", "facts.md"}
    host, reports = FakeHost(), Reports()
    manager = RolloutManager(cfg, host, reports, cache_dir=tmp_path / "cache")
    manager.start()
    try:
        manager.request({"rollout_id": "p1", "kind": "pack", "id": "harbour-museum", "version": release.version,
                         "mirror": mirror.url, "expires_at": time.time() + 60})
        done = reports.done("p1")
        assert done["outcome"] == "confirmed", done
        assert host.loaded == [()]  # no model changes: the speech stages only, and the venue
        current = packs.resolve("harbour-museum")
        assert current.version == release.version and current.previous == installed.version
        assert current.pack.version == "2025.07.1"
        assert reports.statuses[-1][1]["packs"] == {"harbour-museum": release.version}

        # A typo the signer did not catch (`fleet sign` checks a pack; this manifest is signed by hand).
        (src / "faq.toml").write_text((src / "faq.toml").read_text() + "\n[[faq]\nid = broken\n")
        from edge.rollout.release import Release, ReleaseFile, sign

        files = tuple(ReleaseFile(f.name, (src / f.name).stat().st_size, sha256_file(src / f.name), None)
                      for f in release.files)
        typo = Release(kind="pack", id="harbour-museum", version=digest(files), path=release.path, files=files,
                       issued_at=time.time(), expires_at=time.time() + 600)
        manifest, signature = (mirror.root / p for p in release_paths("pack", "harbour-museum", typo.version))
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_bytes(typo.to_bytes())
        signature.write_bytes(sign(typo.to_bytes(), keys.signer))
        manager.request({"rollout_id": "p2", "kind": "pack", "id": "harbour-museum", "version": typo.version,
                         "mirror": mirror.url, "expires_at": time.time() + 60})
        done = reports.done("p2")
    finally:
        manager.stop()
    print("pack with a typo:", done["error"])
    assert done["outcome"] == "failed" and done["error"]["code"].startswith("knowledge."), done
    assert packs.resolve("harbour-museum").version == release.version  # the good one stays
    assert host.loaded == [()]


def test_the_rollout_settings_are_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[rollout]\npublic_key = "/etc/edge-voice/fleet.pub"\nmirrors = ["https://m.example/edge/"]\n'
                    "bandwidth_kbps = 800\n")
    cfg = load_config(path, environ={})
    assert cfg.rollout == RolloutConfig(public_key="/etc/edge-voice/fleet.pub", mirrors=["https://m.example/edge/"],
                                        bandwidth_kbps=800)
    from edge.errors import ConfigError

    for bad in ("ftp://m.example/", "https://user:pw@m.example/", "m.example/edge"):
        path.write_text(f'[rollout]\nmirrors = ["{bad}"]\n')
        with pytest.raises(ConfigError, match=r"rollout.mirrors\[0\]: .* is not an http\(s\) URL"):
            load_config(path, environ={})


def test_the_rollout_manager_is_there_before_the_bridge_connects(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that comes back during a rollout finds its retained desired state the moment it
    connects; a manager made after the connection lost that race on a busy machine, and the
    desired state was not read again until the next reconnection."""
    from edge.app import Pipeline
    from edge.mqtt.client import MqttBridge

    cfg = device_config(tmp_path, public_key=None, mirrors=[])
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, enabled=True, host="127.0.0.1", port=9))
    pipe = Pipeline(cfg, clock=type("Clock", (), {"now": lambda self: 0.0})())
    at_start: list[Any] = []
    monkeypatch.setattr(MqttBridge, "start", lambda self: at_start.append(pipe.rollouts))
    pipe.connect()
    try:
        assert len(at_start) == 1 and isinstance(at_start[0], RolloutManager)
        assert pipe.rollouts is at_start[0] and pipe.bridge is not None
    finally:
        pipe.close(bridge_timeout=1)


def test_a_pack_rollout_puts_the_new_venue_into_service_and_the_status_says_so(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's half of the seam, with the dev models: a candidate (fresh voice and ear, the
    venue rebuilt from the switched pack) passes the self-test and replaces what serves."""
    from edge.app import Pipeline
    from edge.audio.devices import FileSpeaker
    from edge.knowledge.store import PackStore
    from edge.rollout.selftest import run_self_test

    monkeypatch.setenv("EDGE_VOICE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = device_config(tmp_path, public_key=None, mirrors=[])
    cfg = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, models_dir=""),
                              knowledge=dataclasses.replace(cfg.knowledge, pack="harbour-museum"))
    from edge.models.registry import ModelRegistry

    cfg = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, models_dir=str(ModelRegistry().root)))
    packs = PackStore(cfg.packs_dir)
    small = tmp_path / "small"  # the sample pack, cut down to what the check needs: a few facts and FAQs
    small.mkdir()
    (small / "pack.toml").write_text((PACK / "pack.toml").read_text())
    facts = (PACK / "facts.md").read_text().split("## Tickets")[0]
    (small / "facts.md").write_text(facts)
    entries = (PACK / "faq.toml").read_text().split("\n[[faq]]\n")[1:3]
    (small / "faq.toml").write_text("".join(f"[[faq]]\n{e}\n" for e in entries))
    first, _ = packs.install(small)
    (small / "pack.toml").write_text((small / "pack.toml").read_text().replace('version = "2025.06.1"',
                                                                               'version = "2025.07.1"'))
    staged, _ = packs.install(small, make_current=False)
    assert packs.resolve("harbour-museum").version == first.version

    class Bridge:
        knowledge: list[dict[str, Any]] = []

        def set_knowledge(self, k: dict[str, Any]) -> None:
            self.knowledge.append(dict(k))

        def stop(self, timeout: float = 0) -> None:
            pass

    pipe = Pipeline(cfg, clock=type("Clock", (), {"now": lambda self: 0.0})())
    pipe.bridge = Bridge()  # type: ignore[assignment]
    pipe.load()
    conv = pipe.open(FileSpeaker(tmp_path / "out.wav", pipe.output_rate))
    pipe.start()
    try:
        serving = pipe.stages
        assert serving is not None and conv.venue is not None and conv.venue.pack.version == "2025.06.1"
        ModelStore(cfg.packs_dir).switch_to("harbour-museum", staged.version)  # what the manager does
        t0 = time.monotonic()
        cand = pipe.load_candidate(())
        loaded = time.monotonic() - t0
        result = run_self_test(cand, cfg.rollout)
        print(f"candidate loaded in {loaded:.2f} s; self-test {result.ms:.0f} ms: {result.checks}")
        assert result.ok, result.reason
        assert cand.chat is None and cand.synth is not None and cand.venue.pack.version == "2025.07.1"
        assert result.checks["venue"]["faq_checked"] > 0
        assert not pipe.in_turn()
        pipe.adopt(cand)
        assert conv.venue is cand.venue and pipe.venue is cand.venue
        assert pipe.stages is not serving and pipe.stages.chat is serving.chat  # the LLM stays, warmed anew
        assert pipe.stages.synth is cand.synth and pipe.stages.recognizer is cand.recognizer
        assert Bridge.knowledge[-1] == {"id": "harbour-museum", "version": "2025.07.1",
                                        "hash": cand.venue.pack.content_hash}
        assert Bridge.knowledge[0]["version"] == "2025.06.1"
    finally:
        pipe.close()
