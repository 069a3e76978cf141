"""Targets: ``user@host[:port]`` on the command line, or one per line of a ``--hosts`` inventory.

An inventory line is ``user@host[:port]`` with optional ``KEY=VALUE`` words (``id``, ``root``,
``mqtt_username``, ``mqtt_password_file``, ``pack``); ``#`` starts a comment. A ``[GROUP]`` line
puts the targets below it, up to the next one, in that group (``--pack GROUP=DIR`` gives the
group a knowledge pack). Files named in it are relative to the inventory.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from provisioning.errors import UsageError

if TYPE_CHECKING:
    from provisioning.packs import LocalPack


@dataclass
class Target:
    host: str
    port: int
    user: str | None = None
    device_id: str | None = None
    root: str | None = None
    mqtt_username: str | None = None
    mqtt_password_file: Path | None = None
    group: str | None = None  # the inventory's [GROUP] above this target
    pack_dir: Path | None = None  # pack= in the inventory
    pack: LocalPack | None = None  # the knowledge pack this target gets (checked), if any

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{self.port}"

    @property
    def ssh_dest(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def rsync_dest(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host


_TARGET_RE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
                        r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?$")
GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_GROUP_LINE_RE = re.compile(r"^\[(?P<group>[A-Za-z0-9_.-]{1,64})\]$")  # no ':', so never an IPv6 address


def parse_target(spec: str, default_port: int) -> Target:
    m = _TARGET_RE.match(spec)
    if not m:
        raise UsageError(f"{spec!r} is not a target: write user@host, user@host:port or user@[ipv6]:port")
    port = int(m["port"]) if m["port"] else default_port
    if not 0 < port < 65536:
        raise UsageError(f"{spec!r}: port {port} is out of range")
    return Target(host=m["host"].strip("[]"), port=port, user=m["user"])


INVENTORY_KEYS = ("id", "root", "mqtt_username", "mqtt_password_file", "pack")


def load_inventory(path: Path, default_port: int) -> list[Target]:
    """``user@host[:port] [id=ID] [root=DIR] [mqtt_username=U] [mqtt_password_file=FILE] [pack=DIR]``
    per line, ``[GROUP]`` lines; ``#`` starts a comment; relative files are relative to the inventory."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"--hosts {path}: cannot read it: {err.strerror or err}") from None
    out = []
    group: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        header = _GROUP_LINE_RE.match(words[0])
        if header:
            if len(words) > 1:
                raise UsageError(f"{path}:{n}: a [GROUP] line holds nothing else")
            group = header["group"]
            continue
        try:
            t = parse_target(words[0], default_port)
        except UsageError as err:
            raise UsageError(f"{path}:{n}: {err}") from None
        t.group = group
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or key not in INVENTORY_KEYS:
                raise UsageError(f"{path}:{n}: {word!r}: expected KEY=VALUE with KEY one of "
                                 f"{', '.join(INVENTORY_KEYS)}")
            if key == "id":
                t.device_id = value
            elif key == "root":
                t.root = value
            elif key == "mqtt_username":
                t.mqtt_username = value
            elif key == "pack":
                t.pack_dir = (path.parent / value).resolve()
            else:
                t.mqtt_password_file = (path.parent / value).resolve()
        out.append(t)
    return out


def check_root(root: str, where: str) -> str:
    if not root.startswith("/") or not re.fullmatch(r"/[A-Za-z0-9._/+-]*", root) or "/../" in root + "/":
        raise UsageError(f"{where}: {root!r} must be an absolute path of letters, digits and ._+-/")
    return root.rstrip("/") or "/"
