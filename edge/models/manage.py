"""Verify, activate, roll back and clean up installed versions."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ModelError
from edge.models.manifest import ModelSpec
from edge.models.store import VERSION_RE, InstallRecord, ModelStore, hash_problems, stat_problems, tree_size


def matches_manifest(spec: ModelSpec, record: InstallRecord, pins: Mapping[str, Mapping[str, object]]) -> bool:
    """Is this install what the manifest (and the first-use pins) asks for?"""
    if record.fingerprint != spec.fingerprint or set(record.files) != {f.name for f in spec.installed}:
        return False
    for f in spec.installed:
        expected = f.sha256 or pins.get(f.name, {}).get("sha256")
        if expected and record.files[f.name].sha256 != expected:
            return False
    return True


@dataclass(frozen=True)
class VerifyResult:
    model: str
    version: str | None
    problems: tuple[str, ...]  # empty: every file re-hashed and matched its record
    dir: Path | None = None


def verify(store: ModelStore, model_ids: list[str]) -> list[VerifyResult]:
    """Re-hash every file of each model's current version against its install record."""
    out = []
    with store.lock():
        for model_id in model_ids:
            version = store.current(model_id)
            record = store.record(model_id, version) if version else None
            if version is None:
                out.append(VerifyResult(model_id, None, ("not installed",)))
                continue
            vdir = store.version_dir(model_id, version)
            if record is None:
                out.append(VerifyResult(model_id, version, ("its install record is missing or unreadable",), vdir))
                continue
            bad = hash_problems(vdir, record)
            if not bad:
                # Content is right: a copy or touch may have changed the mtimes resolve compares.
                store.refresh_stats(model_id, version, record)
            out.append(VerifyResult(model_id, version, tuple(bad), vdir))
    return out


def _checked_version(store: ModelStore, model_id: str, version: str) -> None:
    record = store.record(model_id, version)
    if record is None:
        raise ModelError(f"model {model_id!r} has no complete version {version} in {store.root}", code="model.missing")
    bad = hash_problems(store.version_dir(model_id, version), record)
    if bad:
        raise ModelError(f"model {model_id!r} version {version} failed verification: {', '.join(bad)}",
                         code="model.unverified")
    store.refresh_stats(model_id, version, record)


def activate(store: ModelStore, model_id: str, version: str) -> str | None:
    """Make an installed version current (after re-hashing it). Returns the one it replaced."""
    if not VERSION_RE.fullmatch(version):
        raise ModelError(f"bad version {version!r} (12 hex digits, as `edge-voice models list` shows)",
                         code="model.version")
    with store.lock():
        if version not in store.versions(model_id):
            have = ", ".join(store.versions(model_id)) or "none"
            raise ModelError(f"model {model_id!r} has no installed version {version} in {store.root} "
                             f"(installed: {have})", code="model.missing")
        _checked_version(store, model_id, version)
        return store.switch_to(model_id, version)


def rollback(store: ModelStore, model_id: str) -> tuple[str, str]:
    """Swap current and previous. Returns (new current, new previous)."""
    with store.lock():
        state = store.state(model_id)
        current, previous = state["current"], state["previous"]
        if current is None:
            raise ModelError(f"model {model_id!r} is not installed in {store.root}", code="model.missing")
        if previous is None or previous not in store.versions(model_id):
            raise ModelError(f"model {model_id!r} has no previous version to roll back to in {store.root}",
                             code="model.no_previous")
        _checked_version(store, model_id, previous)
        store.set_state(model_id, previous, current)
        return previous, current


def gc(store: ModelStore, model_ids: list[str], cache: Path) -> list[tuple[str, list[str], int]]:
    """Remove versions that are neither current nor previous, interrupted installs and the
    model's download cache. Returns (model, removed versions, bytes freed) per model."""
    out = []
    with store.lock():
        for model_id in model_ids:
            state = store.state(model_id)
            keep = {state["current"], state["previous"]}
            freed = store.clear_leftovers(model_id)
            removed = []
            for version in store.versions(model_id):
                if version not in keep:
                    freed += store.remove_version(model_id, version)
                    removed.append(version)
            model_cache = cache / model_id
            if model_cache.is_dir():
                freed += tree_size(model_cache)
                shutil.rmtree(model_cache, ignore_errors=True)
            out.append((model_id, removed, freed))
    return out


@dataclass(frozen=True)
class Status:
    current: str | None
    previous: str | None
    versions: tuple[str, ...]
    matches: bool  # the current version is the manifest's
    intact: bool  # sizes and mtimes as recorded (the cheap check resolve does)


def status(store: ModelStore, spec: ModelSpec) -> Status:
    state = store.state(spec.id)
    current = state["current"]
    record = store.record(spec.id, current) if current else None
    matches = bool(record and matches_manifest(spec, record, store.pins(spec.id)))
    intact = bool(record and current and not stat_problems(store.version_dir(spec.id, current), record))
    return Status(current, state["previous"], tuple(store.versions(spec.id)), matches, intact)
