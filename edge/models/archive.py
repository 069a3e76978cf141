"""Unpack named members of a release archive (tar.*, .tgz, .zip), refusing unsafe archives.

Only the members the manifest names are written, each to a name we choose, so nothing in
the archive can choose where a file lands. An archive that holds an absolute path, a ``..``
component, a link leading out of the archive or a device node is still rejected as a
whole: it is broken or hostile, and its other members are not to be trusted either.
"""

from __future__ import annotations

import errno
import hashlib
import posixpath
import re
import stat
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from edge.errors import ModelError
from edge.models.store import disk_error

_BLOCK = 1 << 20
_DRIVE = re.compile(r"[A-Za-z]:")


def _unsafe(name: str, archive: str) -> ModelError:
    return ModelError(f"{archive}: unsafe archive member {name!r}: refusing to unpack it",
                      code="model.archive")


def normalize(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def check_name(name: str, archive: str) -> str:
    norm = normalize(name)
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or "\\" in name:
        raise _unsafe(name, archive)
    if ".." in norm.split("/"):
        raise _unsafe(name, archive)
    return norm


def check_link(name: str, target: str, archive: str, relative_to_member: bool) -> None:
    """A link must point at something inside the archive."""
    if target.startswith("/") or _DRIVE.match(target):
        raise _unsafe(f"{name} -> {target}", archive)
    base = posixpath.dirname(name) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        raise _unsafe(f"{name} -> {target}", archive)


def _copy(src: IO[bytes], dest: Path, limit: int | None, member: str, archive: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(dest, "wb") as out:
        while block := src.read(_BLOCK):
            n += len(block)
            if limit is not None and n > limit:
                raise ModelError(f"{archive}: member {member!r} is larger than the {limit} bytes "
                                 f"in the manifest", code="model.size")
            h.update(block)
            out.write(block)
    return n, h.hexdigest()


def extract_members(archive: Path, wanted: Mapping[str, Path], limits: Mapping[str, int | None] | None = None,
                    shown: str | None = None) -> dict[str, tuple[int, str]]:
    """Write each wanted member (archive name -> destination file). Returns name -> (size, sha256).

    ``shown`` names the archive in messages (default: its file name). Raises ModelError
    ``model.archive`` for an unreadable or unsafe archive or a missing member.
    """
    limits = limits or {}
    shown = shown or archive.name
    try:
        if zipfile.is_zipfile(archive):
            done = _extract_zip(archive, wanted, limits, shown)
        else:
            done = _extract_tar(archive, wanted, limits, shown)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        if isinstance(err, OSError) and (err.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or (err.filename is not None and str(archive) != err.filename)):
            raise disk_error(err, next(iter(wanted.values())).parent) from None  # the destination's fault
        raise ModelError(f"{shown}: not a readable archive ({err})", code="model.archive") from None
    missing = sorted(set(wanted) - set(done))
    if missing:
        raise ModelError(f"{shown}: has no member {missing[0]!r}", code="model.archive")
    return done


def _extract_tar(archive: Path, wanted: Mapping[str, Path], limits: Mapping[str, int | None],
                 shown: str) -> dict[str, tuple[int, str]]:
    done: dict[str, tuple[int, str]] = {}
    # Streaming mode: one pass over a compressed archive, however many members we want.
    with tarfile.open(archive, "r|*") as tf:
        for m in tf:
            name = check_name(m.name, shown)
            if m.issym():
                check_link(name, m.linkname, shown, relative_to_member=True)
            elif m.islnk():
                check_name(m.linkname, shown)
            elif not (m.isfile() or m.isdir()):
                raise _unsafe(m.name, shown)  # devices and fifos have no place in a model
            if name not in wanted:
                continue
            if not m.isfile():
                raise ModelError(f"{shown}: member {name!r} is not a regular file", code="model.archive")
            src = tf.extractfile(m)
            assert src is not None  # a regular file always has content
            done[name] = _copy(src, wanted[name], limits.get(name), name, shown)
    return done


def _extract_zip(archive: Path, wanted: Mapping[str, Path], limits: Mapping[str, int | None],
                 shown: str) -> dict[str, tuple[int, str]]:
    done: dict[str, tuple[int, str]] = {}
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        links = {}
        for info in infos:
            name = check_name(info.filename, shown)
            if stat.S_ISLNK(info.external_attr >> 16):
                links[name] = info
                check_link(name, zf.read(info).decode("utf-8", "replace"), shown, relative_to_member=True)
        for info in infos:
            name = normalize(info.filename)
            if name not in wanted or info.is_dir():
                continue
            if name in links:
                raise ModelError(f"{shown}: member {name!r} is a link, not a file", code="model.archive")
            with zf.open(info) as src:
                done[name] = _copy(src, wanted[name], limits.get(name), name, shown)
    return done
