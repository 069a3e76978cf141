"""For the tests: a private PostgreSQL (Debian's ``postgresql`` package) on a free loopback port.

``initdb`` makes a cluster in a fresh directory with one password-protected superuser; the
server runs in the foreground under its own data directory and socket directory and is stopped
by its PID (SIGINT: a fast shutdown that ends open sessions). PostgreSQL refuses to run as
root, so as root both run as the ``postgres`` system user (else ``nobody``), in a directory
outside pytest's private temporary tree that this user may enter.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mosquitto import HOST, free_port

USER = "edge"
PASSWORD = "edge-test-pw"
DATABASE = "fleet"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"PostgreSQL's {name} is not installed (apt-get install postgresql; scripts/setup does it)")
    return path


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("no unprivileged user (postgres or nobody) to run PostgreSQL as")


class Postgres:
    def __init__(self) -> None:
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="edge-test-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.proc: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._user = _run_as()

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@{HOST}:{self.port}/{DATABASE}"

    def _popen_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60.0) -> Postgres:
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        subprocess.run([_bin("initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "-A", "scram-sha-256",
                        "--auth-local=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True,
                       timeout=120, cwd=self.dir, **self._popen_user())
        pwfile.unlink()
        self._serve(timeout)
        import psycopg

        with psycopg.connect(f"postgresql://{USER}:{PASSWORD}@{HOST}:{self.port}/postgres", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {DATABASE}")
        return self

    def restart(self, down_s: float = 0.0, timeout: float = 60.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port with the same data."""
        self.stop()
        time.sleep(down_s)
        self._serve(timeout, keep_port=True)

    def _serve(self, timeout: float, keep_port: bool = False) -> None:
        for _attempt in range(5):
            if not keep_port:
                self.port = free_port()
            self._ready.clear()
            self.proc = subprocess.Popen(
                [_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-c", f"listen_addresses={HOST}",
                 "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off", "-c", "max_connections=50"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=self.dir,
                **self._popen_user())
            threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()
            self._ready.wait(timeout)
            if self.proc.poll() is None and self._ready.is_set():
                break
            self.stop()
            if "could not bind" not in self.log() or keep_port:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log()[-3000:]}")
        else:
            raise RuntimeError(f"PostgreSQL could not bind a port:\n{self.log()[-3000:]}")

    def _read_log(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        with open(self.log_path, "ab") as log:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                if b"ready to accept connections" in line:
                    self._ready.set()
        self._ready.set()  # it ended: nobody waits for the timeout

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown: open sessions are ended
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
