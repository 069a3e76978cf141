"""Signed release manifests: what a version of a model or pack is, vouched for by the fleet's key.

A release manifest is a JSON object::

    {"schema": 1, "kind": "model", "id": "whisper-tiny-en", "version": "3f2a9c0d1e4b",
     "path": "whisper-tiny.en/v2",              # where the files are, under the mirror
     "files": [{"name": "tiny.en-encoder.int8.onnx", "size": 12911391, "sha256": "...",
                "role": "encoder"}, ...],
     "issued_at": 1767000000, "expires_at": 1769592000,
     "key_id": "9c1e...", "label": "free text", "pack_version": "2026.1"}

``version`` is the digest the model store names versions by (:func:`edge.models.store.version_of`
of the files' names and checksums), so the same files are the same version on every device and a
manifest cannot give its files another version's name. The mirror serves it as
``<mirror>/releases/<kind>/<id>/<version>.json`` with a detached Ed25519 signature of those exact
bytes, base64, beside it (``<version>.json.sig``); the files are ``<mirror>/<path>/<name>``.
Whoever controls the broker or the mirror can make a device fetch, but not load, anything the
fleet's key did not sign: the device checks the signature before it reads the manifest, and every
file against the signed size and sha256 before it installs it. ``expires_at`` bounds how long an
old signed release can be replayed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.errors import MissingDependency, ModelError
from edge.models.manifest import check_file_name
from edge.models.store import FileRecord, version_of
from edge.rollout.errors import RolloutError

SCHEMA = 1
KINDS = ("model", "pack")
MAX_RELEASE_BYTES = 256 * 1024
MAX_SIGNATURE_BYTES = 1024
MAX_FILES = 256
MAX_URL_CHARS = 512
CLOCK_SKEW_S = 300.0  # a device's clock may be this far behind the signer's

ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[0-9a-f]{12}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
ROLLOUT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PATH_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_ROLE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _bad(message: str) -> RolloutError:
    return RolloutError(message, code="rollout.release")


@dataclass(frozen=True)
class ReleaseFile:
    name: str
    size: int
    sha256: str
    role: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.role:
            out["role"] = self.role
        return out


def digest(files: Sequence[ReleaseFile]) -> str:
    """The version name of these files in the model (or pack) store."""
    return version_of({f.name: FileRecord(f.size, f.sha256, 0, "release") for f in files})


@dataclass(frozen=True)
class Release:
    kind: str
    id: str
    version: str
    path: str
    files: tuple[ReleaseFile, ...]
    issued_at: float
    expires_at: float
    key_id: str = ""
    label: str = ""
    pack_version: str = ""

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def roles(self) -> dict[str, str]:
        return {f.role: f.name for f in self.files if f.role}

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA, "kind": self.kind, "id": self.id, "version": self.version,
                               "path": self.path, "files": [f.as_json() for f in self.files],
                               "issued_at": self.issued_at, "expires_at": self.expires_at}
        for key in ("key_id", "label", "pack_version"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def to_bytes(self) -> bytes:
        return (json.dumps(self.as_json(), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    def check_for(self, kind: str, target: str, version: str, now: float | None = None) -> None:
        """That this (signed) manifest is the one a rollout asked for, and still valid."""
        now = time.time() if now is None else now
        if (self.kind, self.id, self.version) != (kind, target, version):
            raise RolloutError(f"the signed manifest is for {self.kind} {self.id} version {self.version}, not "
                               f"{kind} {target} version {version}", code="rollout.mismatch")
        if self.expires_at <= now:
            raise RolloutError(f"the signed manifest of {kind} {target} version {version} expired at "
                               f"{_utc(self.expires_at)}: sign it again with `edge-voice fleet sign`",
                               code="rollout.release_expired")
        if self.issued_at > now + CLOCK_SKEW_S:
            raise RolloutError(f"the signed manifest of {kind} {target} version {version} is issued in the future "
                               f"({_utc(self.issued_at)}): check this device's clock", code="rollout.release_clock")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def release_paths(kind: str, target: str, version: str) -> tuple[str, str]:
    """The manifest's and its signature's paths under the mirror."""
    base = f"releases/{kind}/{target}/{version}.json"
    return base, base + ".sig"


def check_path(path: str) -> str:
    """A relative directory under the mirror: plain names joined by '/', no '..', no leading '/'."""
    parts = path.split("/")
    if not path or len(path) > 256 or not all(_PATH_PART.fullmatch(p) for p in parts) or ".." in parts:
        raise _bad(f"path {path[:80]!r} is not a plain relative directory (names of letters, digits, . _ + -)")
    return path


def _field(data: Mapping[str, Any], key: str, typ: type | tuple[type, ...], required: bool = True) -> Any:
    if key not in data:
        if required:
            raise _bad(f"missing {key!r}")
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, typ):
        raise _bad(f"{key!r} has the wrong type")
    return value


def _time(data: Mapping[str, Any], key: str) -> float:
    value = float(_field(data, key, (int, float)))
    if not math.isfinite(value) or not 0 < value < 1e11:
        raise _bad(f"{key!r} is not a time")
    return value


def _parse_file(raw: Any, i: int) -> ReleaseFile:
    if not isinstance(raw, dict):
        raise _bad(f"file #{i + 1} is not an object")
    unknown = sorted(set(raw) - {"name", "size", "sha256", "role"})
    if unknown:
        raise _bad(f"file #{i + 1}: unknown key {unknown[0]!r}")
    try:
        name = check_file_name(_field(raw, "name", str), f"file #{i + 1}")
    except ModelError as err:  # the manifest's own file-name rule
        raise _bad(str(err)) from None
    size = _field(raw, "size", int)
    sha = _field(raw, "sha256", str)
    role = _field(raw, "role", str, required=False)
    if size < 0:
        raise _bad(f"{name}: negative size")
    if not SHA256_RE.fullmatch(sha):
        raise _bad(f"{name}: sha256 is not 64 lower-case hex digits")
    if role is not None and not _ROLE_RE.fullmatch(role):
        raise _bad(f"{name}: bad role {role[:32]!r}")
    return ReleaseFile(name, size, sha, role)


def parse_release(raw: bytes) -> Release:
    """The manifest in ``raw`` (already signature-checked), validated; RolloutError if malformed."""
    if len(raw) > MAX_RELEASE_BYTES:
        raise _bad(f"the manifest is over {MAX_RELEASE_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("the manifest is not valid JSON") from None
    if not isinstance(data, dict):
        raise _bad("the manifest is not a JSON object")
    if data.get("schema") != SCHEMA:
        raise _bad(f"schema {data.get('schema')!r} is not supported (expected {SCHEMA})")
    unknown = sorted(set(data) - {"schema", "kind", "id", "version", "path", "files", "issued_at", "expires_at",
                                  "key_id", "label", "pack_version"})
    if unknown:
        raise _bad(f"unknown key {unknown[0]!r}")
    kind = _field(data, "kind", str)
    if kind not in KINDS:
        raise _bad(f"kind {kind[:20]!r} is not one of {', '.join(KINDS)}")
    target = _field(data, "id", str)
    version = _field(data, "version", str)
    if not ID_RE.fullmatch(target):
        raise _bad(f"bad id {target[:80]!r}")
    if not VERSION_RE.fullmatch(version):
        raise _bad(f"bad version {version[:80]!r} (12 hex digits)")
    raw_files = _field(data, "files", list)
    if not raw_files or len(raw_files) > MAX_FILES:
        raise _bad(f"a release lists 1 to {MAX_FILES} files")
    files = tuple(_parse_file(f, i) for i, f in enumerate(raw_files))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise _bad("a file is listed twice")
    roles = [f.role for f in files if f.role]
    if len(set(roles)) != len(roles):
        raise _bad("a role is given to two files")
    if digest(files) != version:
        raise _bad(f"version {version} is not the digest of its files ({digest(files)})")
    release = Release(kind=kind, id=target, version=version, path=check_path(_field(data, "path", str)),
                      files=files, issued_at=_time(data, "issued_at"), expires_at=_time(data, "expires_at"),
                      key_id=_field(data, "key_id", str, required=False) or "",
                      label=(_field(data, "label", str, required=False) or "")[:200],
                      pack_version=(_field(data, "pack_version", str, required=False) or "")[:64])
    if release.expires_at <= release.issued_at:
        raise _bad("expires_at is not after issued_at")
    return release


# --- keys and signatures ---------------------------------------------------------------------

def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependency.for_module("cryptography", "device") from None
    return ed25519


def _serialization() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization


def generate_keypair() -> tuple[bytes, bytes]:
    """A new fleet key pair: (private key PEM, public key PEM)."""
    ed25519 = _crypto()
    ser = _serialization()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def write_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (the private key readable by its owner only); returns the key id."""
    for p in (private_path, public_path):
        if p.exists():
            raise RolloutError(f"{p} exists: a fleet key is never overwritten; choose another name",
                               code="rollout.key")
    private, public = generate_keypair()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_bytes(public)
    return key_id(load_public_key(public_path))


def _read_key(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise RolloutError(f"{path}: no {what} there", code="rollout.key") from None
    except OSError as err:
        raise RolloutError(f"{path}: cannot read the {what}: {err.strerror or err}", code="rollout.key") from None


def load_private_key(path: Path) -> Any:
    ed25519 = _crypto()
    ser = _serialization()
    try:
        key = ser.load_pem_private_key(_read_key(path, "fleet private key"), password=None)
    except (ValueError, TypeError) as err:
        raise RolloutError(f"{path}: not an unencrypted PEM private key ({err})", code="rollout.key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise RolloutError(f"{path}: not an Ed25519 key (make one with `edge-voice fleet keygen`)", code="rollout.key")
    return key


def load_public_key(path: Path) -> Any:
    ed25519 = _crypto()
    ser = _serialization()
    try:
        key = ser.load_pem_public_key(_read_key(path, "fleet public key"))
    except (ValueError, TypeError) as err:
        raise RolloutError(f"{path}: not a PEM public key ({err})", code="rollout.key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise RolloutError(f"{path}: not an Ed25519 public key", code="rollout.key")
    return key


def key_id(public_key: Any) -> str:
    """A short name for a public key (sha256 of its raw bytes), shown when keys do not match."""
    ser = _serialization()
    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(raw: bytes, private_key: Any) -> bytes:
    """The detached signature file's content: base64 of the Ed25519 signature, one line."""
    return base64.b64encode(private_key.sign(raw)) + b"\n"


def verify(raw: bytes, signature: bytes, public_key: Any, what: str = "the release manifest") -> None:
    """RolloutError ``rollout.signature`` unless ``signature`` is the fleet key's signature of ``raw``."""
    from cryptography.exceptions import InvalidSignature

    try:
        sig = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RolloutError(f"{what}: the signature is not base64", code="rollout.signature") from None
    if len(sig) != 64:
        raise RolloutError(f"{what}: the signature is not an Ed25519 signature ({len(sig)} bytes)",
                           code="rollout.signature")
    try:
        public_key.verify(sig, raw)
    except InvalidSignature:
        raise RolloutError(f"{what}: bad signature: not signed by the fleet key {key_id(public_key)}, or changed "
                           "since it was signed", code="rollout.signature") from None


# --- mirrors ---------------------------------------------------------------------------------

def check_mirror_url(url: Any, field: str = "mirror") -> str:
    """An http(s) URL with a host and nothing that could hide where it points."""
    if not isinstance(url, str) or not url:
        raise RolloutError(f"{field}: expected a URL", code="rollout.mirror")
    if len(url) > MAX_URL_CHARS:
        raise RolloutError(f"{field}: longer than {MAX_URL_CHARS} characters", code="rollout.mirror")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise RolloutError(f"{field}: contains spaces or control characters", code="rollout.mirror")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise RolloutError(f"{field}: {url[:80]!r} is not a URL", code="rollout.mirror") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RolloutError(f"{field}: {url[:80]!r} is not an http(s) URL with a host", code="rollout.mirror")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise RolloutError(f"{field}: {url[:80]!r} must not carry credentials, a query or a fragment",
                           code="rollout.mirror")
    return url


def _key(url: str) -> tuple[str, str, int, str]:
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    path = p.path if p.path.endswith("/") else p.path + "/"
    return p.scheme, (p.hostname or "").lower(), port, path


def mirror_allowed(url: str, allowed: Sequence[str]) -> bool:
    """Is ``url`` one of the ``allowed`` mirrors, or below one of them (same scheme, host, port)?"""
    scheme, host, port, path = _key(url)
    if "/../" in path or "/./" in path or "//" in path:
        return False
    for entry in allowed:
        a_scheme, a_host, a_port, a_path = _key(entry)
        if (scheme, host, port) == (a_scheme, a_host, a_port) and path.startswith(a_path):
            return True
    return False


def join_url(base: str, relative: str) -> str:
    from urllib.parse import quote

    return base.rstrip("/") + "/" + quote(relative)
