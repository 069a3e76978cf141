"""Models: the manifest, the registry the daemon resolves ids with, and `edge-voice models`.

The daemon only ever calls :class:`ModelRegistry`, which never downloads; fetching lives in
:mod:`edge.models.fetch` and the ``edge-voice models`` command (:mod:`edge.models.cli`).
"""

from __future__ import annotations

from edge.errors import ModelError
from edge.models.manifest import Manifest, ModelSpec, load_manifest
from edge.models.registry import InstalledModel, ModelRegistry

__all__ = ["InstalledModel", "Manifest", "ModelError", "ModelRegistry", "ModelSpec", "load_manifest"]
