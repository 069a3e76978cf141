"""Checking cross-built shared libraries and packing them into a wheel (standard library only).

The platform tag is the oldest manylinux policy whose symbol-version ceilings admit every
versioned symbol the libraries need; the ceilings are those of auditwheel's aarch64 policy
(pypa/auditwheel, src/auditwheel/policy/manylinux-policy.json). Libraries that need anything
outside the policies' whitelist get no manylinux tag at all (``linux_aarch64``).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

Version = tuple[int, ...]

# aarch64: (tag, highest GLIBC, GLIBCXX, CXXABI, GCC symbol version it admits), oldest first.
AARCH64_POLICIES: tuple[tuple[str, Version, Version, Version, Version], ...] = (
    ("manylinux_2_17", (2, 18), (3, 4, 19), (1, 3, 7), (4, 7, 0)),
    ("manylinux_2_24", (2, 24), (3, 4, 22), (1, 3, 10), (4, 7, 0)),
    ("manylinux_2_26", (2, 26), (3, 4, 24), (1, 3, 11), (7, 0, 0)),
    ("manylinux_2_27", (2, 27), (3, 4, 24), (1, 3, 11), (7, 0, 0)),
    ("manylinux_2_28", (2, 28), (3, 4, 24), (1, 3, 11), (7, 0, 0)),
    ("manylinux_2_31", (2, 31), (3, 4, 28), (1, 3, 12), (7, 0, 0)),
    ("manylinux_2_34", (2, 34), (3, 4, 29), (1, 3, 13), (11, 0)),
    ("manylinux_2_35", (2, 35), (3, 4, 30), (1, 3, 13), (11, 0)),
    ("manylinux_2_36", (2, 36), (3, 4, 30), (1, 3, 13), (11, 0)),
    ("manylinux_2_39", (2, 39), (3, 4, 33), (1, 3, 15), (14, 0, 0)),
)
# System libraries a manylinux wheel may link against (the policies' whitelist, less X11/GL/glib).
SYSTEM_LIBS = frozenset({
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libstdc++.so.6",
    "libgcc_s.so.1", "ld-linux-aarch64.so.1", "libatomic.so.1", "libz.so.1", "libresolv.so.2",
})
EM_AARCH64 = 183


def parse_version(text: str) -> Version:
    return tuple(int(p) for p in text.split("."))


@dataclass
class ElfInfo:
    path: Path
    machine: int
    soname: str = ""
    needed: list[str] = field(default_factory=list)
    runpath: str = ""
    # symbol version namespace (GLIBC, GLIBCXX, CXXABI, GCC) -> versions needed
    versions: dict[str, set[Version]] = field(default_factory=dict)


def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{path}: not an ELF file")
    little = head[5] == 1
    return int.from_bytes(head[18:20], "little" if little else "big")


def parse_readelf(path: Path, dynamic: str, version_info: str) -> ElfInfo:
    """An ElfInfo from the text of ``readelf -d`` and ``readelf -V`` (kept apart to be testable)."""
    info = ElfInfo(path=path, machine=elf_machine(path))
    for line in dynamic.splitlines():
        m = re.search(r"\((NEEDED|SONAME|RUNPATH|RPATH)\)\s+.*?\[(.*)\]", line)
        if not m:
            continue
        kind, value = m.groups()
        if kind == "NEEDED":
            info.needed.append(value)
        elif kind == "SONAME":
            info.soname = value
        else:
            info.runpath = value
    needs = version_info.split(".gnu.version_r", 1)
    for m in re.finditer(r"Name:\s+([A-Z]+)_([0-9][0-9.]*)\b", needs[1] if len(needs) > 1 else ""):
        info.versions.setdefault(m.group(1), set()).add(parse_version(m.group(2)))
    return info


def read_elf(path: Path, readelf: str) -> ElfInfo:
    def out(flag: str) -> str:
        return subprocess.run([readelf, flag, "--wide", str(path)], check=True, capture_output=True,
                              text=True).stdout

    return parse_readelf(path, out("-d"), out("-V"))


def needed_ceiling(infos: Iterable[ElfInfo]) -> dict[str, Version]:
    """The highest version each symbol namespace is needed at, over all libraries."""
    top: dict[str, Version] = {}
    for info in infos:
        for ns, vs in info.versions.items():
            top[ns] = max(vs | ({top[ns]} if ns in top else set()))
    return top


def aarch64_platform_tag(infos: list[ElfInfo], bundled: set[str]) -> str:
    """``manylinux_2_X_aarch64`` for the oldest policy that admits ``infos``, else ``linux_aarch64``."""
    for info in infos:
        outside = [n for n in info.needed if n not in SYSTEM_LIBS and n not in bundled]
        if outside:
            return "linux_aarch64"
    top = needed_ceiling(infos)
    known = {"GLIBC", "GLIBCXX", "CXXABI", "GCC"}
    if set(top) - known:
        return "linux_aarch64"
    for tag, glibc, glibcxx, cxxabi, gcc in AARCH64_POLICIES:
        limits = {"GLIBC": glibc, "GLIBCXX": glibcxx, "CXXABI": cxxabi, "GCC": gcc}
        if all(v <= limits[ns] for ns, v in top.items()):
            return f"{tag}_aarch64"
    return "linux_aarch64"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def write_wheel(path: Path, files: Mapping[str, bytes], dist_info: str, executable: set[str]) -> None:
    """Write a wheel holding ``files`` (archive name -> bytes) plus ``<dist_info>/RECORD``.

    Entries are sorted and carry a fixed date, so the same inputs give the same bytes. The
    file appears only when complete (written beside it, then renamed)."""
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name in sorted(files):
        writer.writerow([name, _record_hash(files[name]), len(files[name])])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries = {**files, f"{dist_info}/RECORD": record.getvalue().encode()}
    # RECORD last, as the wheel spec recommends; dist-info after the package files.
    order = sorted(n for n in entries if not n.startswith(dist_info + "/"))
    order += sorted(n for n in entries if n.startswith(dist_info + "/") and not n.endswith("/RECORD"))
    order.append(f"{dist_info}/RECORD")
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in order:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = ((0o755 if name in executable else 0o644) | 0o100000) << 16
            zf.writestr(zi, entries[name])
    os.replace(tmp, path)


def read_member(wheel: Path, name: str) -> bytes | None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(name)
    except (KeyError, zipfile.BadZipFile, OSError):
        return None
