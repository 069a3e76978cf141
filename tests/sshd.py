"""For tests: a real OpenSSH server (Debian's ``openssh-server``) on a free loopback port.

Each server gets its own directory with a generated host key, its own ``sshd_config``,
an ``authorized_keys`` file and a pid file; it runs in the foreground (``sshd -D -e``) and is
stopped by its PID, together with the per-connection processes it forked. Client key pairs are made
with :func:`make_key`. Nothing is shared between servers except ``/run/sshd`` (the privilege
separation directory sshd insists on).

    server = SshServer(tmp_path / "sshd").start()
    try:
        subprocess.run(["ssh", *server.client_args(), server.login, "true"], check=True)
    finally:
        server.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
HOST = "127.0.0.1"


def require_sshd() -> None:
    if not Path(SSHD).exists() or not Path(SSH_KEYGEN).exists():
        pytest.skip("OpenSSH is not installed (apt-get install openssh-server openssh-client)")
    if os.geteuid() != 0:
        pytest.skip("the OpenSSH server test needs root (sshd changes to the logged-in user)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_key(path: Path, comment: str = "edge-voice-test") -> Path:
    """A new ed25519 key pair without a passphrase: ``path`` and ``path.pub``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (from /proc), children before their own children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


@dataclass
class SshServer:
    """One sshd. ``host_key``: reuse a host key (default: generate one in ``workdir``);
    ``authorized``: public keys allowed to log in (default: a client key made in ``workdir``)."""

    workdir: Path
    port: int = 0
    host_key: Path | None = None
    authorized: list[Path] | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        require_sshd()
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.host_key is None:
            self.host_key = make_key(self.workdir / "ssh_host_ed25519_key", "test-host")
        self.client_key = self.workdir / "client_ed25519"
        if self.authorized is None:
            make_key(self.client_key, "test-client")
            self.authorized = [self.client_key.with_name(self.client_key.name + ".pub")]
        self._fixed_port = bool(self.port)

    @property
    def host(self) -> str:
        return HOST

    @property
    def login(self) -> str:
        return f"root@{HOST}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sshd.log"

    def host_public_key(self) -> str:
        assert self.host_key is not None
        return self.host_key.with_name(self.host_key.name + ".pub").read_text().split(" ")[1]

    def _write_config(self) -> Path:
        keys = self.workdir / "authorized_keys"
        keys.write_text("".join(Path(p).read_text() for p in self.authorized or []))
        conf = self.workdir / "sshd_config"
        conf.write_text("\n".join([
            f"Port {self.port}",
            f"ListenAddress {HOST}",
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {keys}",
            # The keys live in a pytest temp directory, not in a home directory with sshd's modes.
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            # No PAM: the container has no PAM login machinery, and key checks are sshd's own.
            "UsePAM no",
            "PrintMotd no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            # Several provisioning connections arrive at once (a control master, rsync, steps).
            "MaxStartups 50",
            "MaxSessions 50",
            "LogLevel VERBOSE",
            "",
        ]))
        return conf

    def start(self, timeout: float = 10.0) -> SshServer:
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        last = ""
        for _attempt in range(5):
            if not self._fixed_port:
                self.port = free_port()
            conf = self._write_config()
            check = subprocess.run([SSHD, "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30)
            if check.returncode != 0:
                raise RuntimeError(f"sshd rejected its test config: {check.stderr.strip()}")
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                        if s.recv(4).startswith(b"SSH-"):
                            return self
                except OSError:
                    time.sleep(0.05)
            last = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            if self._fixed_port:
                time.sleep(0.5)  # the same port: give the old listener's socket time to go
        raise RuntimeError(f"sshd did not start on {HOST}:{self.port}: {last}")

    def client_args(self, known_hosts: Path | None = None) -> list[str]:
        """Options for a plain ``ssh`` to this server with the test client key."""
        kh = str(known_hosts) if known_hosts else "/dev/null"
        return ["-F", "/dev/null", "-p", str(self.port), "-i", str(self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=accept-new"]

    def kill(self) -> None:
        """The device dies: SIGKILL the listener and every connection under it, at once."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        _signal(pids, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM the listener and its connections (by PID), SIGKILL what is left after 5 s."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        _signal(pids, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _signal([self.proc.pid, *descendants(self.proc.pid)], signal.SIGKILL)
        self.proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        self.proc = None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False
