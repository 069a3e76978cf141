"""The installed-model tree: versions, the current/previous switch, install records, pins.

Layout under the models root::

    .lock                          held (flock) by whatever changes the tree
    <id>/state.json                {"current": V, "previous": V | null}
    <id>/pins.json                 hashes recorded with --trust-on-first-use
    <id>/versions/<V>/...          one complete, verified install per version
    <id>/versions/<V>/.installed.json   its record: size, sha256, mtime_ns of every file
    <id>/.staging-*, .trash-*      an install or removal in progress (cleared by the next fetch/gc)

A version directory is only ever created by renaming a finished, fsynced staging directory,
and ``state.json`` is only ever replaced by rename, so a reader sees the old install or the
new one, never a mixture. The version name is a digest of the files' names and checksums:
the same content gets the same name on every device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import ModelError

_LOGGER = logging.getLogger(__name__)

RECORD = ".installed.json"
STATE = "state.json"
PINS = "pins.json"
VERSION_RE = re.compile(r"[0-9a-f]{12}")
_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem can sync a directory
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """temp file, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # the daemon's own user reads it, whatever our umask
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def version_of(files: Mapping[str, FileRecord]) -> str:
    text = "".join(f"{rec.sha256}  {name}\n" for name, rec in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def disk_error(err: OSError, where: Path) -> ModelError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ModelError(f"{where}: the disk is full: free some space (`edge-voice models gc`) and fetch again",
                          code="model.disk_full")
    return ModelError(f"{where}: {err.strerror or err}", code="model.io")


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str
    mtime_ns: int
    trust: str  # manifest | first-use | pinned | archive | prepared

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "mtime_ns": self.mtime_ns, "trust": self.trust}


@dataclass(frozen=True)
class InstallRecord:
    model: str
    kind: str
    version: str
    files: Mapping[str, FileRecord]
    roles: Mapping[str, str]  # role -> file name
    source: str
    installed_at: str
    fingerprint: str = ""  # the manifest entry it was installed for (ModelSpec.fingerprint)

    @classmethod
    def load(cls, version_dir: Path) -> InstallRecord | None:
        """The record of a version directory, or None when it has none or it is unreadable."""
        try:
            raw = read_json(version_dir / RECORD)
            if raw is None:
                return None
            files = {name: FileRecord(int(r["size"]), str(r["sha256"]), int(r["mtime_ns"]), str(r["trust"]))
                     for name, r in raw["files"].items()}
            return cls(model=str(raw["model"]), kind=str(raw["kind"]), version=str(raw["version"]),
                       files=files, roles=dict(raw.get("roles", {})), source=str(raw.get("source", "")),
                       installed_at=str(raw.get("installed_at", "")), fingerprint=str(raw.get("fingerprint", "")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "version": self.version, "source": self.source,
                "installed_at": self.installed_at, "roles": dict(self.roles), "fingerprint": self.fingerprint,
                "files": {n: r.as_json() for n, r in self.files.items()}}

    def write(self, version_dir: Path) -> None:
        write_json_atomic(version_dir / RECORD, self.as_json())


def stat_problems(version_dir: Path, record: InstallRecord) -> list[str]:
    """Files whose size or mtime no longer match the record (cheap: no hashing)."""
    bad = []
    for name, rec in record.files.items():
        try:
            st = (version_dir / name).stat()
        except OSError:
            bad.append(f"{name} (missing)")
            continue
        if st.st_size != rec.size:
            bad.append(f"{name} (size {st.st_size}, expected {rec.size})")
        elif st.st_mtime_ns != rec.mtime_ns:
            bad.append(f"{name} (modified since install)")
    return bad


def hash_problems(version_dir: Path, record: InstallRecord) -> list[str]:
    """Files whose content no longer matches the record (full re-hash)."""
    bad = []
    for name, rec in record.files.items():
        path = version_dir / name
        try:
            size = path.stat().st_size
            if size != rec.size:
                bad.append(f"{name} (size {size}, expected {rec.size})")
            elif sha256_file(path) != rec.sha256:
                bad.append(f"{name} (sha256 mismatch)")
        except OSError:
            bad.append(f"{name} (missing)")
    return bad


class ModelStore:
    """The models root. Reading needs no lock; every change happens under :meth:`lock`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, model_id: str) -> Path:
        return self.root / model_id

    def version_dir(self, model_id: str, version: str) -> Path:
        return self.root / model_id / "versions" / version

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ModelError(f"cannot use the models root {self.root}: {err.strerror or err} "
                             f"(pass --root DIR for a writable one)", code="model.io") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ModelError(f"another `edge-voice models` command is changing {self.root}: "
                                 f"wait for it to finish", code="model.busy") from None
            yield
        finally:
            os.close(fd)  # closing drops the flock; a killed process drops it too

    # --- state -------------------------------------------------------------------------

    def state(self, model_id: str) -> dict[str, str | None]:
        raw = None
        with contextlib.suppress(OSError, ValueError):
            raw = read_json(self.model_dir(model_id) / STATE)
        if not isinstance(raw, dict):
            return {"current": None, "previous": None}
        return {k: (raw.get(k) if isinstance(raw.get(k), str) else None) for k in ("current", "previous")}

    def current(self, model_id: str) -> str | None:
        return self.state(model_id)["current"]

    def set_state(self, model_id: str, current: str, previous: str | None) -> None:
        write_json_atomic(self.model_dir(model_id) / STATE, {"current": current, "previous": previous})

    def switch_to(self, model_id: str, version: str) -> str | None:
        """Make ``version`` current, keeping the old current as previous. Returns it."""
        old = self.state(model_id)
        if old["current"] == version:
            return old["previous"]
        self.set_state(model_id, version, old["current"])
        return old["current"]

    def versions(self, model_id: str) -> list[str]:
        try:
            entries = os.listdir(self.model_dir(model_id) / "versions")
        except OSError:
            return []
        return sorted(e for e in entries if VERSION_RE.fullmatch(e))

    def installed_ids(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.root))
        except OSError:
            return []
        return [e for e in entries if (self.root / e / STATE).is_file()]

    def record(self, model_id: str, version: str) -> InstallRecord | None:
        return InstallRecord.load(self.version_dir(model_id, version))

    # --- pins (trust on first use) -----------------------------------------------------

    def pins(self, model_id: str) -> dict[str, dict[str, Any]]:
        raw = None
        with contextlib.suppress(OSError, ValueError):
            raw = read_json(self.model_dir(model_id) / PINS)
        return raw if isinstance(raw, dict) else {}

    def add_pins(self, model_id: str, new: Mapping[str, FileRecord]) -> None:
        if not new:
            return
        pins = self.pins(model_id)
        for name, rec in new.items():
            pins[name] = {"sha256": rec.sha256, "size": rec.size,
                          "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.model_dir(model_id).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.model_dir(model_id) / PINS, pins)

    # --- installing --------------------------------------------------------------------

    def new_staging(self, model_id: str) -> Path:
        base = self.model_dir(model_id)
        (base / "versions").mkdir(parents=True, exist_ok=True)
        path = base / f".staging-{os.getpid()}-{os.urandom(4).hex()}"
        path.mkdir()
        # Installed as root, read by the service's own user: readable whatever our umask.
        for d in (base, base / "versions", path):
            os.chmod(d, 0o755)
        return path

    def clear_leftovers(self, model_id: str) -> int:
        """Remove staging and trash directories left by an interrupted command (under the lock)."""
        freed = 0
        base = self.model_dir(model_id)
        try:
            entries = os.listdir(base)
        except OSError:
            return 0
        for e in entries:
            if e.startswith((".staging-", ".trash-")):
                freed += tree_size(base / e)
                shutil.rmtree(base / e, ignore_errors=True)
        return freed

    def commit(self, model_id: str, staging: Path, record: InstallRecord, *, make_current: bool = True) -> None:
        """Move a finished staging directory into place as ``record.version`` and (unless
        ``make_current`` is false: a rollout stages a version before it switches) make it current."""
        for name in record.files:
            # Read-only: an installed file is never edited in place, only replaced by a new version.
            os.chmod(staging / name, 0o444)
            fsync_file(staging / name)
        record.write(staging)
        fsync_dir(staging)
        target = self.version_dir(model_id, record.version)
        trash = None
        if target.exists():
            # Same content digest, but the old copy failed its check: swap it out whole.
            trash = self.model_dir(model_id) / f".trash-{os.urandom(4).hex()}"
            os.rename(target, trash)
        os.rename(staging, target)
        fsync_dir(target.parent)
        if make_current:
            self.switch_to(model_id, record.version)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def refresh_stats(self, model_id: str, version: str, record: InstallRecord) -> InstallRecord:
        """After a full re-hash passed: record the files' current mtimes again."""
        vdir = self.version_dir(model_id, version)
        files = {}
        for name, rec in record.files.items():
            st = (vdir / name).stat()
            files[name] = FileRecord(rec.size, rec.sha256, st.st_mtime_ns, rec.trust)
        if files == dict(record.files):
            return record
        fresh = dataclasses.replace(record, files=files)
        fresh.write(vdir)
        return fresh

    def remove_version(self, model_id: str, version: str) -> int:
        vdir = self.version_dir(model_id, version)
        size = tree_size(vdir)
        trash = self.model_dir(model_id) / f".trash-{os.urandom(4).hex()}"
        os.rename(vdir, trash)  # one atomic step: the version vanishes whole
        shutil.rmtree(trash, ignore_errors=True)
        return size


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total
