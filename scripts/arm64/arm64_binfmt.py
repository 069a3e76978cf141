"""binfmt_misc for qemu-aarch64: mount it and register the emulator, then put both back as found.

The kernel's registrations are global, so ``restore()`` removes exactly what ``enable()``
added. A run killed before it could restore leaves an owner file in /run naming its pid; the
next run (which holds the same lock, so the old one is gone) takes the registration over and
removes it when done.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from arm64_common import Fail, say

BINFMT = Path("/proc/sys/fs/binfmt_misc")
NAME = "qemu-aarch64"
OWNER = Path("/run/edge-voice-arm64-smoke.binfmt-owner")
DEBIAN_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
# The ELF header of an aarch64 executable, as qemu's own qemu-binfmt-conf.sh registers it;
# used where the distribution ships no binfmt.d file.
_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


class Unavailable(Fail):
    """This machine cannot run foreign binaries through binfmt_misc."""


def registration_line() -> str:
    """The registration: the distribution's binfmt.d line, else qemu-aarch64-static with F."""
    if DEBIAN_CONF.is_file():
        for line in DEBIAN_CONF.read_text().splitlines():
            if line.startswith(f":{NAME}:"):
                return line.strip()
    return f":{NAME}:M::{_MAGIC}:{_MASK}:/usr/bin/qemu-aarch64-static:F"


def parse_entry(text: str) -> dict[str, str]:
    """``/proc/sys/fs/binfmt_misc/<name>`` as a dict: enabled, interpreter, flags."""
    out = {"enabled": "no", "interpreter": "", "flags": ""}
    for line in text.splitlines():
        if line.strip() in ("enabled", "disabled"):
            out["enabled"] = "yes" if line.strip() == "enabled" else "no"
        elif line.startswith("interpreter "):
            out["interpreter"] = line.split(" ", 1)[1].strip()
        elif line.startswith("flags:"):
            out["flags"] = line.split(":", 1)[1].strip()
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Binfmt:
    def __init__(self) -> None:
        self.mounted = False  # we mounted binfmt_misc
        self.registered = False  # we added the qemu-aarch64 entry
        self.enabled_by_us = False  # it was there but disabled, and we enabled it
        self.interpreter = ""
        self.fixed = False  # F flag: the kernel holds the interpreter open, a chroot needs no copy

    def _mount(self) -> str:
        """Mount binfmt_misc unless it is mounted; returns why it could not be ('' when it is)."""
        if (BINFMT / "register").exists():
            return ""
        proc = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return proc.stderr.strip() or str(proc.returncode)
        self.mounted = True
        return ""

    def _adopt_stale(self) -> str:
        """Take over what an interrupted run left registered or enabled; returns what it would
        have done on restore ("-1" remove, "0" disable), or ""."""
        try:
            pid_text, action = OWNER.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return ""
        if action not in ("-1", "0") or (_pid_alive(pid) and pid != os.getpid()):
            return ""
        if action == "-1":
            self.registered = True
        else:
            self.enabled_by_us = True
        return action

    def enable(self) -> None:
        why = self._mount()
        if why:
            raise Unavailable(f"cannot mount binfmt_misc on {BINFMT}: {why}"
                              " (a container without CAP_SYS_ADMIN, or a kernel without binfmt_misc)")
        if self.mounted:
            say(f"mounted binfmt_misc on {BINFMT}")
        entry = BINFMT / NAME
        if entry.exists():
            action = self._adopt_stale()
            if action == "-1":
                say(f"taking over the {NAME} registration left by an interrupted run")
            state = parse_entry(entry.read_text())
            if state["enabled"] != "yes":
                OWNER.write_text(f"{os.getpid()} 0")
                entry.write_text("1")
                self.enabled_by_us = True
                say(f"enabled the existing {NAME} registration")
            elif action:
                OWNER.write_text(f"{os.getpid()} {action}")
        else:
            line = registration_line()
            interp = line.split(":")[-2]
            if not Path(interp).exists():
                raise Fail(f"{interp} not found: apt-get install qemu-user-static")
            OWNER.write_text(f"{os.getpid()} -1")
            try:
                (BINFMT / "register").write_text(line)
            except OSError as err:
                OWNER.unlink(missing_ok=True)
                raise Unavailable(f"cannot register {NAME} with binfmt_misc: {err.strerror or err}") from None
            self.registered = True
            say(f"registered {NAME} with binfmt_misc")
        state = parse_entry(entry.read_text())
        self.interpreter = state["interpreter"]
        self.fixed = "F" in state["flags"]

    def restore(self) -> list[str]:
        """Undo what enable() did; returns what could not be undone (empty when all went back)."""
        problems = []
        entry = BINFMT / NAME
        if self.registered or self.enabled_by_us:
            # Remove what we registered, else disable what we enabled.
            value, done, verb = (("-1", f"removed the {NAME} registration", "remove") if self.registered
                                 else ("0", f"disabled {NAME} again", "disable"))
            if entry.exists():
                try:
                    entry.write_text(value)
                    say(done)
                except OSError as err:
                    problems.append(f"could not {verb} {entry}: {err}")
            OWNER.unlink(missing_ok=True)
        if self.mounted:
            proc = subprocess.run(["umount", str(BINFMT)], capture_output=True, text=True)
            if proc.returncode != 0:
                problems.append(f"could not unmount {BINFMT}: {proc.stderr.strip()}")
            else:
                say(f"unmounted {BINFMT}")
        self.registered = self.enabled_by_us = self.mounted = False
        return problems


def cleanup_stale() -> bool:
    """Undo what a run that died without restoring left behind; True if there was anything."""
    b = Binfmt()
    if b._mount():
        return False
    if (BINFMT / NAME).exists():
        action = b._adopt_stale()
    else:
        action = ""
        OWNER.unlink(missing_ok=True)
    b.restore()
    return bool(action)
