"""ssh and rsync to one device, through one control connection, and the host's log.

The device program (``device.py`` here) is piped into ``ssh HOST [sudo -n] /usr/bin/python3 -``
with its ``REQUEST`` line filled in, so arguments and secrets travel on stdin, never in a command
line that ``ps`` shows; its result is its last ``@@provision-result@@ {json}`` line.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from provisioning.constants import DEVICE_PROGRAM, MARK
from provisioning.errors import HostFailure
from provisioning.targets import Target


def explain_ssh(stderr: str, target: Target, opts: argparse.Namespace) -> str:
    """One line for what went wrong with ssh (exit 255), from its stderr."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("@")]
    text = "\n".join(lines)
    kh = opts.known_hosts
    host_spec = f"[{target.host}]:{target.port}" if target.port != 22 else target.host
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "Host key verification failed" in text:
        return (f"the host key of {target.label} has CHANGED since it was recorded in {kh}: aborted this host "
                "(a reinstalled device, or someone in the middle); if the device was reinstalled, remove the "
                f"old key with `ssh-keygen -f {kh} -R '{host_spec}'` and run again")
    if "Permission denied" in text:
        key = f"the key {opts.identity}" if opts.identity else "your ssh keys"
        home = f"~{target.user}" if target.user else "~"
        return (f"authentication failed: {target.label} refused {key} (key-only login, no passwords): add the "
                f"public key to {home}/.ssh/authorized_keys on the device")
    for needle, what in (("Connection refused", "connection refused: is sshd running there, on this port?"),
                         ("timed out", f"no answer within {opts.connect_timeout} s"),
                         ("Could not resolve hostname", "unknown host name"),
                         ("No route to host", "no route to host")):
        if needle in text:
            return f"cannot connect to {target.label}: {what}"
    if any(n in text for n in ("closed by remote host", "Connection reset", "Broken pipe", "mux_client",
                               "Connection closed", "timeout, server")):
        last = lines[-1] if lines else "connection closed"
        return f"lost the connection to {target.label} ({last})"
    return f"ssh to {target.label} failed: {lines[-1] if lines else 'exit 255, no message'}"


def device_program(req: dict[str, Any]) -> bytes:
    """device.py with its REQUEST line filled in, to pipe into python3 -."""
    text = DEVICE_PROGRAM.read_text(encoding="utf-8")
    if "{}  # @request@" not in text:
        raise HostFailure(f"{DEVICE_PROGRAM} has lost its REQUEST line: restore it from version control")
    return text.replace("{}  # @request@", f"json.loads({json.dumps(json.dumps(req))})", 1).encode()


def result_of(stdout: str) -> dict[str, Any] | None:
    """The device program's result: its last ``@@provision-result@@`` line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return None


class Remote:
    """ssh and rsync to one target, through one control master connection."""

    def __init__(self, target: Target, opts: argparse.Namespace, control_dir: Path, log: HostLog) -> None:
        self.target, self.opts, self.log = target, opts, log
        self.control_path = str(control_dir / hashlib.sha256(target.label.encode()).hexdigest()[:16])
        self.sudo = False

    def ssh_args(self) -> list[str]:
        o = self.opts
        args = ["ssh"]
        if o.ssh_config:
            args += ["-F", o.ssh_config]
        opts = {"BatchMode": "yes", "StrictHostKeyChecking": "accept-new", "UserKnownHostsFile": str(o.known_hosts),
                "GlobalKnownHostsFile": "/dev/null", "PasswordAuthentication": "no",
                "KbdInteractiveAuthentication": "no", "PubkeyAuthentication": "yes", "UpdateHostKeys": "no",
                "ConnectTimeout": str(o.connect_timeout), "ServerAliveInterval": "15", "ServerAliveCountMax": "3",
                "ControlPath": self.control_path}
        for k, v in opts.items():
            args += ["-o", f"{k}={v}"]
        if o.identity:
            args += ["-i", str(o.identity), "-o", "IdentitiesOnly=yes"]
        return args + ["-p", str(self.target.port)]

    def connect(self) -> None:
        """Open the control master: host key and authentication are checked here, once."""
        errfile = Path(self.control_path + ".err")
        cmd = self.ssh_args() + ["-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-N", "-f",
                                 self.target.ssh_dest]
        self.log.write("$ " + shlex.join(cmd))
        # The master outlives this call; its stderr goes to a file, so that no pipe is held open.
        try:
            with open(errfile, "wb") as err:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                      timeout=self.opts.connect_timeout * 3 + 10)
        except subprocess.TimeoutExpired:
            raise HostFailure(f"cannot connect to {self.target.label}: no answer within "
                              f"{self.opts.connect_timeout * 3 + 10} s") from None
        text = errfile.read_text(errors="replace")
        if text.strip():
            self.log.write(text.rstrip())
        if proc.returncode != 0:
            raise HostFailure(explain_ssh(text, self.target, self.opts))

    def close(self) -> None:
        subprocess.run(self.ssh_args() + ["-O", "exit", self.target.ssh_dest], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 600) -> tuple[int, str, str]:
        """A command on the device; stderr lines go to the log as they come."""
        cmd = self.ssh_args() + ["-o", "ControlMaster=no", self.target.ssh_dest, "--", shlex.join(argv)]
        self.log.write("$ ssh " + self.target.label + " " + shlex.join(argv))
        return self.log.stream(cmd, stdin, timeout, self.target, self.opts)

    def call(self, action: str, args: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        req = dict(args, action=action)
        program = device_program(req)
        shown = {k: ("<not logged>" if k == "content" else v) for k, v in req.items()}
        self.log.write("device.py " + json.dumps(shown, sort_keys=True))
        argv = (["sudo", "-n"] if self.sudo else []) + ["/usr/bin/python3", "-"]
        rc, out, err = self.run(argv, program, timeout)
        res = result_of(out)
        if res is not None:
            return res
        last = [ln for ln in err.splitlines() if ln.strip()]
        reason = last[-1].strip() if last else f"exit {rc}, no result"
        if "a password is required" in reason or "a terminal is required" in reason:
            raise HostFailure(f"{self.target.user} on {self.target.label} is not root and sudo asks for a password: "
                              "log in as root or allow this user passwordless sudo")
        if rc == 127 or ("/usr/bin/python3" in reason and "No such file" in reason):
            raise HostFailure(f"{self.target.label} has no /usr/bin/python3: install it (apt-get install python3)")
        raise HostFailure(f"the device program failed in {action}: {reason}")

    def rsync(self, sources: list[str], dest: str, flags: list[str], dry_run: bool,
              timeout: float = 3600) -> list[tuple[str, int, str]]:
        """rsync to ``dest`` on the device; returns the itemized changes (what, size, name)."""
        ssh = shlex.join(self.ssh_args() + ["-o", "ControlMaster=no"])
        cmd = ["rsync", *flags, "--mkpath", "--out-format=%i %l %n", "-e", ssh]
        if self.sudo:
            cmd.append("--rsync-path=sudo -n rsync")
        if dry_run:
            cmd.append("--dry-run")
        cmd += [*sources, f"{self.target.rsync_dest}:{dest}"]
        self.log.write("$ " + shlex.join(cmd[:1] + cmd[2:]))
        rc, out, err = self.log.stream(cmd, None, timeout, self.target, self.opts, stdout_to_log=True)
        if rc != 0:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            if rc == 255 or any("connection unexpectedly closed" in ln for ln in lines):
                raise HostFailure(explain_ssh(err, self.target, self.opts))
            raise HostFailure(f"rsync to {dest} failed (exit {rc}): {lines[-1] if lines else ''}")
        changes = []
        for line in out.splitlines():
            m = re.match(r"^([<>ch.*][fdLDS][^ ]{9}|\*deleting)\s+(\d+)?\s*(.*)$", line)
            # A transfer, a creation, a deletion, or a changed attribute (the letters after the type).
            if m and (m.group(1)[0] in "<>ch*" or any(c not in ". " for c in m.group(1)[2:])):
                changes.append((m.group(1), int(m.group(2) or 0), m.group(3)))
        return changes


class HostLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f: IO[str] = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            stamp = time.strftime("%H:%M:%S")
            for line in text.splitlines() or [""]:
                self._f.write(f"{stamp} {line}\n")
            self._f.flush()

    def stream(self, cmd: list[str], stdin: bytes | None, timeout: float, target: Target,
               opts: argparse.Namespace, stdout_to_log: bool = False) -> tuple[int, str, str]:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out: list[str] = []
        err: list[str] = []

        def pump(stream: IO[bytes], sink: list[str], logged: bool) -> None:
            for raw in stream:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                sink.append(line)
                if logged:
                    self.write("  | " + line)

        threads = [threading.Thread(target=pump, args=(proc.stdout, out, stdout_to_log), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, err, True), daemon=True)]
        for t in threads:
            t.start()
        if stdin is not None and proc.stdin is not None:
            try:
                proc.stdin.write(stdin)
                proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise HostFailure(f"{target.label}: no result within {timeout:.0f} s (see the log)") from None
        for t in threads:
            t.join(10)
        if rc == 255 and cmd[0] == "ssh":
            raise HostFailure(explain_ssh("\n".join(err), target, opts))
        return rc, "\n".join(out), "\n".join(err)

    def close(self) -> None:
        self._f.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
