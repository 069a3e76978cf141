"""Knowledge packs for the devices: ``--pack DIR`` for every host, ``--pack GROUP=DIR`` for the
hosts under ``[GROUP]`` in the ``--hosts`` file, ``pack=DIR`` on one host's line.

Each pack is checked here, before any host is touched, with this checkout's own pack checker
(the code behind ``edge-voice packs check``): a pack with an error never leaves this machine,
and the error is one line naming the file and the line. The device then installs it with
``edge-voice packs install`` (checked again, switched atomically, the previous version kept for
``packs rollback``). ``digest`` is the version that install gives it, so a run can tell,
without changing anything, whether a device already has it.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.constants import REPO
from provisioning.errors import UsageError
from provisioning.targets import GROUP_RE, Target


@dataclass(frozen=True)
class LocalPack:
    id: str
    label: str  # id@version (content hash), as `edge-voice packs` shows it
    dir: Path
    files: tuple[str, ...]  # the files that are pushed and installed
    digest: str  # the version directory `edge-voice packs install` gives these files on the device
    warnings: int


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name in ("tomli", "tomllib"):
            raise UsageError(f"cannot check knowledge packs with this Python ({sys.version.split()[0]}): it "
                             "needs tomli (`pip install tomli`), or run scripts/provision with Python 3.11 or "
                             "newer") from None
        raise


def _knowledge() -> tuple[Any, Any, Any]:
    """edge.knowledge.pack and .store and edge.models.store from this checkout: the same code
    `edge-voice packs check` and `packs install` run. They need only the standard library; their
    package's __init__ also loads the FAQ matcher, which needs NumPy: where NumPy is missing (a
    plain laptop Python) they are loaded under a bare package instead."""
    repo = str(REPO)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        _import("edge.knowledge")
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] == "edge":
            raise
        bare = types.ModuleType("edge.knowledge")
        bare.__path__ = [str(REPO / "edge" / "knowledge")]
        sys.modules["edge.knowledge"] = bare
    return _import("edge.knowledge.pack"), _import("edge.knowledge.store"), _import("edge.models.store")


def check_local_pack(path: Path, where: str) -> LocalPack:
    """The pack at ``path``, checked; UsageError (one line: the first error's file, line and fix).
    ``where`` names the option that gave it, for the message."""
    if not path.is_dir():
        raise UsageError(f"{where}: no such directory (a knowledge pack is a directory holding pack.toml)")
    kpack, kstore, mstore = _knowledge()
    problems = kpack.check_pack(path)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        more = f"; {len(errors) - 1} more error(s): `edge-voice packs check {path}` lists them" \
            if len(errors) > 1 else ""
        raise UsageError(f"{where}: the knowledge pack is not valid, so it goes to no device: "
                         f"{errors[0]}{more}")
    pack = kpack.load_pack(path)
    names = tuple(n for n in kstore.INSTALLED_FILES if (pack.root / n).is_file())
    # As PackStore.install names the version it installs.
    digest = mstore.version_of({n: mstore.FileRecord(0, mstore.sha256_file(pack.root / n), 0, "pack") for n in names})
    return LocalPack(pack.id, pack.label, Path(pack.root).resolve(), names, digest, len(problems))


def split_pack_options(specs: list[str]) -> tuple[Path | None, dict[str, Path]]:
    """``--pack DIR`` (every host) and ``--pack GROUP=DIR`` (a group of the inventory)."""
    everyone: Path | None = None
    groups: dict[str, Path] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if sep and GROUP_RE.match(name):
            if name in groups:
                raise UsageError(f"--pack {spec}: group {name} is given a pack twice")
            groups[name] = Path(value)
        else:
            if everyone is not None:
                raise UsageError(f"--pack {spec}: a pack for every host is given twice (--pack GROUP=DIR gives one "
                                 "to the hosts under [GROUP] in the --hosts file)")
            everyone = Path(spec)
    return everyone, groups


def assign_packs(targets: list[Target], specs: list[str], hosts: Path | None) -> None:
    """Set each target's pack: its own pack= first, then its group's, then the one for every host.
    Every pack is checked once; a broken one stops the run before any host is touched."""
    everyone, groups = split_pack_options(specs)
    known = {t.group for t in targets if t.group}
    for name, path in groups.items():
        if name not in known:
            where = f"in {hosts}" if hosts else "(groups are the [GROUP] lines of a --hosts file)"
            raise UsageError(f"--pack {name}={path}: no host is under [{name}] {where}")
    checked: dict[Path, LocalPack] = {}
    for t in targets:
        if t.pack_dir is not None:
            path, where = t.pack_dir, f"pack={t.pack_dir} for {t.label}"
        elif t.group in groups:
            path = groups[t.group]
            where = f"--pack {t.group}={path}"
        elif everyone is not None:
            path, where = everyone, f"--pack {everyone}"
        else:
            continue
        key = path.resolve()
        if key not in checked:
            checked[key] = check_local_pack(path, where)
        t.pack = checked[key]
