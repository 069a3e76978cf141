"""Making a signed release manifest from files on a mirror (``edge-voice fleet sign``).

The files are read where the mirror serves them (``<mirror>/<path>/<name>``): nothing is copied.
A model's files keep the roles the model manifest gives files of the same name; a pack's files
are its pack.toml, facts.md, faq.toml (and questions.toml), checked first like ``packs check``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from edge.models.store import sha256_file
from edge.rollout.errors import RolloutError
from edge.rollout.release import (
    ID_RE,
    Release,
    ReleaseFile,
    check_path,
    digest,
    key_id,
    release_paths,
    sign,
)

DEFAULT_EXPIRES_DAYS = 30.0


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def sign_release(mirror: Path, kind: str, target: str, private_key: object, *, path: str | None = None,
                 files: Sequence[str] = (), expires_days: float = DEFAULT_EXPIRES_DAYS, label: str = "",
                 now: float | None = None) -> Release:
    """Sign the files under ``mirror/path`` as a release of ``kind`` ``target``; writes the manifest
    and its signature under ``mirror/releases/`` and returns the release (its version included)."""
    if not ID_RE.fullmatch(target):
        raise RolloutError(f"bad {kind} id {target!r}", code="rollout.invalid")
    if not 0 < expires_days <= 3650:
        raise RolloutError("--expires-days must be from 0 to 3650", code="rollout.invalid")
    roles: dict[str, str] = {}
    pack_version = ""
    if kind == "model":
        from edge.models.manifest import load_manifest

        spec = load_manifest().model(target)
        path = path or spec.dir
        roles = {f.name: f.role for f in spec.files if f.role}
    else:
        path = path or f"packs/{target}"
    directory = Path(mirror) / check_path(path)
    if not directory.is_dir():
        raise RolloutError(f"{directory}: no such directory on the mirror (--path)", code="rollout.invalid")
    if kind == "pack":
        from edge.knowledge.pack import load_pack
        from edge.knowledge.store import INSTALLED_FILES

        pack = load_pack(directory)  # a pack with an error is never signed
        if pack.id != target:
            raise RolloutError(f"{directory}: this is pack {pack.id!r}, not {target!r}", code="rollout.invalid")
        pack_version = pack.version
        names = [n for n in INSTALLED_FILES if (directory / n).is_file()]
        if files:
            raise RolloutError("--file is for models; a pack's release is its pack files", code="rollout.invalid")
    else:
        names = list(files) or sorted(e.name for e in directory.iterdir() if e.is_file() and not e.name.startswith("."))
    if not names:
        raise RolloutError(f"{directory}: no files to sign", code="rollout.invalid")
    entries = []
    for name in names:
        p = directory / name
        if not p.is_file():
            raise RolloutError(f"{p}: no such file", code="rollout.invalid")
        entries.append(ReleaseFile(name, p.stat().st_size, sha256_file(p), roles.get(name)))
    now = time.time() if now is None else now
    release = Release(kind=kind, id=target, version=digest(entries), path=path, files=tuple(entries),
                      issued_at=round(now, 3), expires_at=round(now + expires_days * 86400, 3),
                      key_id=key_id(private_key.public_key()),  # type: ignore[attr-defined]
                      label=label[:200], pack_version=pack_version)
    raw = release.to_bytes()
    manifest_path, signature_path = release_paths(kind, target, release.version)
    _write(Path(mirror) / signature_path, sign(raw, private_key))
    _write(Path(mirror) / manifest_path, raw)  # last: a reader that finds it finds its signature
    return release
