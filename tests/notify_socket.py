"""Test helpers: a real sd_notify socket that records what a daemon tells systemd.

``NotifyCollector`` binds an AF_UNIX datagram socket (a file in a temp directory, or an
abstract name) the way PID 1 does, receives every message on a thread with the sender's
credentials (SO_PASSCRED, as systemd uses to enforce ``NotifyAccess=main``), and lets a test
wait for a field or count pings in a time window.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Notification:
    time: float  # time.monotonic() when received
    pid: int  # the sender's process id, from SCM_CREDENTIALS
    fields: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""


class NotifyCollector:
    """A bound notify socket. Use as a context manager; ``env`` goes into the daemon's environment."""

    def __init__(self, directory: Path | None = None, *, abstract: bool = False) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"edge-voice-test/{uuid.uuid4().hex}"
            self._sock.bind("\0" + name)
            self.address = "@" + name
        else:
            assert directory is not None, "a path socket needs a directory"
            path = directory / "notify.sock"
            self._sock.bind(str(path))
            self.address = str(path)
        self._messages: list[Notification] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._recv_loop, name="notify-collector", daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def _recv_loop(self) -> None:
        creds_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._closed.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if not ready:
                continue
            try:
                data, ancdata, _, _ = self._sock.recvmsg(65536, creds_size)
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            fields = {}
            for line in data.decode("utf-8", "replace").split("\n"):
                key, sep, value = line.partition("=")
                if sep:
                    fields[key] = value
            with self._cond:
                self._messages.append(Notification(time.monotonic(), pid, fields, data))
                self._cond.notify_all()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def __enter__(self) -> NotifyCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def messages(self) -> list[Notification]:
        with self._cond:
            return list(self._messages)

    def values(self, key: str) -> list[str]:
        return [m.fields[key] for m in self.messages if key in m.fields]

    def wait_for(self, key: str, value: str | None = None, *, timeout: float,
                 after: float = float("-inf")) -> Notification:
        """The first message received after ``after`` carrying ``key`` (with ``value``, if given)."""

        def match() -> Notification | None:
            for m in self._messages:
                if m.time > after and key in m.fields and (value is None or m.fields[key] == value):
                    return m
            return None

        deadline = time.monotonic() + timeout
        with self._cond:
            while (found := match()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m.fields for m in self._messages]
                    raise AssertionError(f"no {key}={value if value is not None else '*'} within {timeout} s; "
                                         f"received: {seen}")
                self._cond.wait(left)
            return found

    def count(self, key: str, value: str, *, since: float, until: float | None = None) -> int:
        until = float("inf") if until is None else until
        return sum(1 for m in self.messages
                   if since < m.time <= until and m.fields.get(key) == value)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
