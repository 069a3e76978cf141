"""Getting a rollout's version onto the device: the signed manifest, then its files.

The manifest and its signature are small and read whole (size-capped). The files go through the
model fetcher (:class:`edge.models.fetch.Fetcher`: resumable downloads into the cache, size and
sha256 checked against the signed manifest, assembled in a staging directory, renamed into
place) with ``activate=False``: the version is installed beside the current one and nothing
switches. A file the device already has in another installed version (same sha256) is re-hashed
and linked instead of downloaded. Every block of a download passes through a :class:`Gate`,
which keeps to the bandwidth limit, waits while a visitor's turn is in progress and stops when
the daemon does.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge import __version__
from edge.models.fetch import Fetcher
from edge.models.manifest import FileSpec, ModelSpec, SourceSpec
from edge.models.store import ModelStore
from edge.rollout.errors import RolloutError, RolloutStopped
from edge.rollout.journal import Request
from edge.rollout.release import (
    MAX_RELEASE_BYTES,
    MAX_SIGNATURE_BYTES,
    Release,
    join_url,
    parse_release,
    release_paths,
    verify,
)
from edge.signals import Flag

_LOGGER = logging.getLogger(__name__)

TIMEOUT_S = 20.0
REPORT_EVERY_S = 2.0
REPORT_EVERY_PERCENT = 10


def _get(url: str, limit: int, what: str) -> bytes:
    """A small file, whole; RolloutError naming the URL when it cannot be had."""
    req = urllib.request.Request(url, headers={"User-Agent": f"edge-voice/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            body = resp.read(limit + 1)
    except urllib.error.HTTPError as err:
        code = "rollout.not_found" if err.code in (404, 410) else "rollout.mirror"
        raise RolloutError(f"{what} {url}: HTTP {err.code} {err.reason}", code=code) from None
    except urllib.error.URLError as err:
        reason = getattr(err.reason, "strerror", None) or err.reason
        raise RolloutError(f"the mirror is unreachable: {url}: {reason}", code="rollout.mirror_unreachable") from None
    except (TimeoutError, ConnectionError, ssl.SSLError, http.client.HTTPException) as err:
        raise RolloutError(f"the mirror is unreachable: {url}: {type(err).__name__}",
                           code="rollout.mirror_unreachable") from None
    if len(body) > limit:
        raise RolloutError(f"{what} {url} is larger than {limit} bytes", code="rollout.release")
    return body


def fetch_release(request: Request, public_key: Any) -> Release:
    """The signed manifest of the requested version, its signature checked before it is parsed."""
    manifest_path, signature_path = release_paths(request.kind, request.id, request.version)
    manifest_url = join_url(request.mirror, manifest_path)
    try:
        raw = _get(manifest_url, MAX_RELEASE_BYTES, "release manifest")
    except RolloutError as err:
        if err.code == "rollout.not_found":
            raise RolloutError(f"the mirror has no release of {request.label} ({manifest_url} not found): unknown "
                               "version, or not signed yet (`edge-voice fleet sign`)",
                               code="rollout.unknown_version") from None
        raise
    try:
        signature = _get(join_url(request.mirror, signature_path), MAX_SIGNATURE_BYTES, "signature")
    except RolloutError as err:
        if err.code == "rollout.not_found":
            raise RolloutError(f"{manifest_url} has no signature beside it (.sig): not loaded",
                               code="rollout.signature") from None
        raise
    verify(raw, signature, public_key, what=manifest_url)
    release = parse_release(raw)
    release.check_for(request.kind, request.id, request.version)
    return release


class Gate:
    """What each downloaded block passes through (the Fetcher's progress hook)."""

    def __init__(self, total: int, *, kbps: int, busy: Callable[[], bool], wait_idle: Callable[[], None],
                 stopped: Flag, report: Callable[[int, int], None], done: int = 0) -> None:
        self.total = max(1, total)
        self.bytes_per_s = kbps * 1000 / 8 if kbps else 0.0
        self.busy = busy
        self.wait_idle = wait_idle
        self.stopped = stopped
        self.report = report
        self.done = done
        self.downloaded = 0
        self.paused_s = 0.0
        self._t0 = time.monotonic()
        self._last_report = (0.0, -REPORT_EVERY_PERCENT)

    def progress(self, label: str, total: int | None, initial: int = 0) -> _Progress:
        return _Progress(self)

    @property
    def percent(self) -> int:
        return min(100, self.done * 100 // self.total)

    def advance(self, n: int) -> None:
        if self.stopped.is_set():
            raise RolloutStopped("the daemon is stopping")
        if self.busy():
            t0 = time.monotonic()
            self.wait_idle()
            self.paused_s += time.monotonic() - t0
            if self.stopped.is_set():
                raise RolloutStopped("the daemon is stopping")
        self.done += n
        self.downloaded += n
        if self.bytes_per_s:
            ahead = self.downloaded / self.bytes_per_s - (time.monotonic() - self._t0 - self.paused_s)
            if ahead > 0 and self.stopped.wait(ahead):
                raise RolloutStopped("the daemon is stopping")
        now = time.monotonic()
        last_t, last_p = self._last_report
        if self.percent >= last_p + REPORT_EVERY_PERCENT or now - last_t >= REPORT_EVERY_S:
            self._last_report = (now, self.percent)
            self.report(self.done, self.total)


class _Progress:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def update(self, n: int) -> None:
        self.gate.advance(n)

    def close(self) -> None:
        pass


def release_spec(release: Release, kind: str) -> ModelSpec:
    """The release as a model entry the fetcher understands: these files, from the mirror only."""
    files = tuple(FileSpec(name=f.name, size=f.size, sha256=f.sha256, role=f.role) for f in release.files)
    return ModelSpec(id=release.id, kind=kind, licence="release", files=files, sources=(SourceSpec(type="mirror"),),
                     dir=release.path, description=release.label)


def seed_from_installed(store: ModelStore, release: Release, cache: Path) -> int:
    """Link files the device already has (same size and sha256, in any installed version) into the
    fetcher's cache, where it re-hashes them instead of downloading; the bytes so saved."""
    have: dict[str, Path] = {}
    for version in store.versions(release.id):
        record = store.record(release.id, version)
        if record is None:
            continue
        for name, rec in record.files.items():
            have.setdefault(f"{rec.sha256}:{rec.size}", store.version_dir(release.id, version) / name)
    saved = 0
    model_cache = cache / release.id
    for f in release.files:
        src = have.get(f"{f.sha256}:{f.size}")
        if src is None:
            continue
        dest = model_cache / f"sha256-{f.sha256}"
        try:
            model_cache.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                os.link(src, dest)
            saved += f.size
        except OSError:
            continue  # another filesystem: downloading is the simpler way
    return saved


def stage_model(store: ModelStore, release: Release, kind: str, mirror: str, cache: Path, gate: Gate) -> str:
    """Install the release's files as a version of the model, not current; returns the version."""
    fetcher = Fetcher(store, cache, mirror=mirror, say=lambda line: _LOGGER.info("rollout: %s", line),
                      progress=gate.progress, activate=False)
    [result] = fetcher.fetch([release_spec(release, kind)])
    if result.version != release.version:  # the digest of the signed files: cannot differ
        raise RolloutError(f"{release.id}: installed as version {result.version}, not {release.version}",
                           code="rollout.version")
    return result.version


def stage_pack(packs_root: Path, release: Release, mirror: str, cache: Path, gate: Gate) -> str:
    """Fetch the pack's files (checked against the signed manifest) and install them as a version of
    the pack, not current, after the pack's own check; returns the version."""
    from edge.knowledge.store import PackStore

    scratch = cache / "pack-staging"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        store = ModelStore(scratch)
        version = stage_model(store, release, "pack", mirror, cache, gate)
        installed, _ = PackStore(packs_root).install(store.version_dir(release.id, version), make_current=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if installed.version != release.version:
        raise RolloutError(f"pack {release.id}: installed as version {installed.version}, not {release.version}: "
                           "a pack's release lists exactly its pack.toml, facts.md, faq.toml (and questions.toml)",
                           code="rollout.version")
    return installed.version


def rehash(store: ModelStore, target: str, version: str) -> list[str]:
    """Every file of an installed version against its record (what the device will load)."""
    from edge.models.store import hash_problems

    record = store.record(target, version)
    if record is None:
        return ["its install record is missing"]
    problems = hash_problems(store.version_dir(target, version), record)
    if not problems:
        with contextlib.suppress(OSError):
            store.refresh_stats(target, version, record)
    return problems

