"""Resolve a model id to its installed, verified files. Never downloads.

Resolving is cheap: the install record holds each file's size and mtime as they were
right after the files were hashed, and resolve only compares those. ``edge-voice models
verify`` does the full re-hash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge import paths
from edge.errors import ModelError
from edge.models.manifest import Manifest, load_manifest
from edge.models.store import ModelStore, stat_problems

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstalledModel:
    id: str
    kind: str
    dir: Path
    version: str
    files: Mapping[str, Path]  # file name -> path
    roles: Mapping[str, str]  # role (e.g. "model", "tokens") -> file name

    def path(self, name: str) -> Path:
        """A file by its name, or by its role in the manifest (``path("model")``)."""
        if name in self.files:
            return self.files[name]
        if name in self.roles:
            return self.files[self.roles[name]]
        raise ModelError(f"model {self.id!r} (version {self.version}) has no file or role {name!r}; "
                         f"it has {', '.join(sorted(self.files))}", code="model.file")


def fetch_command(model_id: str, root: Path) -> str:
    return f"edge-voice models fetch --model {model_id} --root {root}"


class ModelRegistry:
    def __init__(self, root: Path | None = None, manifest: Manifest | None = None) -> None:
        self.root = Path(root) if root is not None else paths.models_dir()
        self._manifest = manifest
        self._store = ModelStore(self.root)

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = load_manifest()
        return self._manifest

    def resolve(self, model_id: str) -> InstalledModel:
        """The current installed version of ``model_id``.

        Raises ModelError ``model.unknown`` (not in the manifest), ``model.missing`` (not
        installed) or ``model.unverified`` (installed files changed since they were checked).
        """
        spec = self.manifest.model(model_id)
        version = self._store.current(model_id)
        record = self._store.record(model_id, version) if version else None
        if version is None or record is None or record.model != model_id or record.version != version:
            raise ModelError(f"model {model_id!r} is not installed in {self.root}: "
                             f"run `{fetch_command(model_id, self.root)}`", code="model.missing")
        vdir = self._store.version_dir(model_id, version)
        bad = stat_problems(vdir, record)
        if bad:
            raise ModelError(f"model {model_id!r} in {self.root} is not verified: {', '.join(bad)}: "
                             f"run `{fetch_command(model_id, self.root)}`", code="model.unverified")
        _LOGGER.debug("resolved %s to version %s in %s", model_id, version, vdir)
        return InstalledModel(id=model_id, kind=spec.kind, dir=vdir, version=version,
                              files={name: vdir / name for name in record.files},
                              roles=dict(record.roles))
