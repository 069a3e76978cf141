"""Installed knowledge packs: versioned like models, switched atomically, the previous one kept.

The tree is the model store's (:class:`edge.models.store.ModelStore`), rooted at
``<state_dir>/packs``: ``<pack id>/versions/<version>/`` holds one installed copy, its version a
digest of the files, and ``state.json`` names the current and the previous version. A pack is
checked before it is installed: a pack with an error never becomes current, and the device
keeps the one it had.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge.knowledge.errors import KnowledgeError, Problem
from edge.knowledge.pack import FACTS_MD, FAQ_TOML, PACK_TOML, KnowledgePack, load_pack
from edge.models.store import FileRecord, InstallRecord, ModelStore, disk_error, sha256_file, stat_problems, version_of

# What a pack directory may hold that is installed with it.
INSTALLED_FILES = (PACK_TOML, FACTS_MD, FAQ_TOML, "questions.toml")


@dataclass(frozen=True)
class InstalledPack:
    pack: KnowledgePack
    version: str  # the install's digest (the version directory)
    previous: str | None

    @property
    def id(self) -> str:
        return self.pack.id


def _error(code: str, where: str, message: str, fix: str) -> KnowledgeError:
    return KnowledgeError(Problem(code, where, None, message, fix))


class PackStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._store = ModelStore(self.root)

    def install(self, source: str | Path, *, make_current: bool = True) -> tuple[InstalledPack, bool]:
        """Check the pack at ``source`` and make it current; (the pack, whether anything changed).
        ``make_current`` false installs the version beside the current one (a rollout switches
        to it between turns, after its self-test) and returns it as it would be once current."""
        pack = load_pack(source)  # raises KnowledgeError: nothing is touched
        src = pack.root
        names = [n for n in INSTALLED_FILES if (src / n).is_file()]
        files = {n: FileRecord(0, sha256_file(src / n), 0, "pack") for n in names}
        version = version_of(files)
        store = self._store
        try:
            with store.lock():
                if store.current(pack.id) == version and self._intact(pack.id, version):
                    return self.resolve(pack.id), False
                if not make_current and version in store.versions(pack.id) and self._intact(pack.id, version):
                    return InstalledPack(load_pack(store.version_dir(pack.id, version)), version,
                                         store.current(pack.id)), False
                store.clear_leftovers(pack.id)
                staging = store.new_staging(pack.id)
                for n in names:
                    shutil.copyfile(src / n, staging / n)
                recorded = {}
                for n in names:
                    st = (staging / n).stat()
                    recorded[n] = FileRecord(st.st_size, files[n].sha256, st.st_mtime_ns, "pack")
                now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                store.commit(pack.id, staging, InstallRecord(
                    model=pack.id, kind="pack", version=version, files=recorded, roles={}, source=str(src),
                    installed_at=now), make_current=make_current)
        except OSError as err:
            raise disk_error(err, self.root) from None
        if not make_current:
            return InstalledPack(load_pack(store.version_dir(pack.id, version)), version, store.current(pack.id)), True
        return self.resolve(pack.id), True

    def _intact(self, pack_id: str, version: str) -> bool:
        record = self._store.record(pack_id, version)
        return record is not None and not stat_problems(self._store.version_dir(pack_id, version), record)

    def resolve(self, pack_id: str) -> InstalledPack:
        """The current version of an installed pack, loaded and checked."""
        state = self._store.state(pack_id)
        version = state["current"]
        if version is None:
            raise _error("knowledge.not_installed", str(self.root), f"no knowledge pack {pack_id!r} is installed",
                         f"install it with `edge-voice packs install DIR` (packs here: "
                         f"{', '.join(self.installed()) or 'none'})")
        vdir = self._store.version_dir(pack_id, version)
        record = self._store.record(pack_id, version)
        bad = stat_problems(vdir, record) if record is not None else ["its install record"]
        if bad:
            raise _error("knowledge.unverified", str(vdir), f"knowledge pack {pack_id!r} changed on disk "
                         f"({', '.join(bad)})", "install it again with `edge-voice packs install DIR`")
        return InstalledPack(load_pack(vdir), version, state["previous"])

    def rollback(self, pack_id: str) -> InstalledPack:
        """Make the previous version current again (and the current one previous)."""
        with self._store.lock():
            state = self._store.state(pack_id)
            previous = state["previous"]
            if previous is None or previous not in self._store.versions(pack_id):
                raise _error("knowledge.no_previous", str(self.root / pack_id),
                             f"knowledge pack {pack_id!r} has no previous version to go back to",
                             "install the version you want with `edge-voice packs install DIR`")
            self._store.switch_to(pack_id, previous)
        return self.resolve(pack_id)

    def installed(self) -> list[str]:
        return self._store.installed_ids()


def resolve_pack(spec: str, packs_dir: Path) -> KnowledgePack:
    """``[knowledge] pack``: an installed pack's id, or a pack directory (a path with a slash)."""
    if "/" in spec or Path(spec).is_dir() and not (packs_dir / spec).is_dir():
        return load_pack(spec)
    return PackStore(packs_dir).resolve(spec).pack
