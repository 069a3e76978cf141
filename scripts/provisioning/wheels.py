"""Wheels for the devices: a wheel of this checkout (built once per run, byte-identical for an
unchanged checkout), the llama-cpp-python wheel that fits each kind of device (or none: it is
compiled there), ``--wheels`` and the constraints, staged per kind of device for rsync."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from provisioning.constants import CONSTRAINTS, JETSON_CONSTRAINTS, REPO, SOURCE_DATE_EPOCH
from provisioning.errors import HostFailure, UsageError
from provisioning.kinds import Kind, kind_os, kind_os_version, laptop_kind


@dataclass(frozen=True)
class WheelName:
    name: str
    version: str
    python: str
    abi: str
    platform: str

    @classmethod
    def parse(cls, filename: str) -> WheelName | None:
        parts = filename[:-4].split("-") if filename.endswith(".whl") else []
        if len(parts) not in (5, 6):
            return None
        return cls(parts[0].lower(), parts[1], parts[-3], parts[-2], parts[-1])

    def fits(self, arch: str, python: str) -> bool:
        """Installable on a device of ``arch`` whose Python is ``python`` (e.g. '3.11.2')?"""
        major, minor = python.split(".")[:2]
        pys = self.python.split(".")
        py_ok = any(p in ("py3", f"cp{major}{minor}", f"py{major}{minor}") for p in pys)
        plat_ok = any(p == "any" or p.endswith("_" + arch) for p in self.platform.split("."))
        return py_ok and plat_ok


def llama_version() -> str:
    m = re.search(r"^llama-cpp-python==(\S+)", CONSTRAINTS.read_text(), re.M)
    if not m:
        raise UsageError(f"{CONSTRAINTS} pins no llama-cpp-python version")
    return m.group(1)


def is_cuda_wheel(path: Path) -> bool:
    """A CUDA build carries a local version label such as ``0.3.36+cu126``."""
    w = WheelName.parse(path.name)
    return bool(w and "+cu" in w.version)


def pick_llama(kind: Kind, python: str, wheels: Path | None, cache: Path | None,
               version: str) -> tuple[Path | None, str]:
    """The llama-cpp-python wheel to copy to this device, and why; None: compile it there.
    A Jetson prefers a CUDA build and takes a CPU one (scripts/build-wheels makes one for both
    Cortex-A76 and A78AE) rather than compiling for 40 minutes; other devices never get CUDA builds."""
    def candidates(folder: Path, cuda: bool) -> list[Path]:
        out = []
        for p in sorted(folder.glob("llama_cpp_python-*.whl")):
            w = WheelName.parse(p.name)
            if w and w.version.split("+")[0] == version and w.fits(kind.arch, python) and is_cuda_wheel(p) == cuda:
                out.append(p)
        return out

    if wheels is not None:
        found = candidates(wheels, True) if kind.cuda else []
        if found:
            return found[-1], f"from --wheels ({found[-1].name}, CUDA)"
        found = candidates(wheels, False)
        if found:
            note = ": CPU only, the GPU is not used" if kind.cuda else ""
            return found[-1], f"from --wheels ({found[-1].name}{note})"
    if cache is not None and cache.is_dir() and not kind.cuda:
        if laptop_kind() == (kind_os(kind), kind_os_version(kind), kind.arch):
            found = candidates(cache, False)
            if found:
                return found[-1], f"from the wheel cache {cache} (built on a machine of the same kind)"
    return None, f"no llama-cpp-python {version} wheel for {kind.label}: compiled on the device"


def constraints_for(kind: Kind) -> str:
    """scripts/constraints.txt; on a Jetson (Python 3.10) with the pins of
    scripts/arm64/jetson-constraints.txt replacing theirs (the pinned releases ship no cp310 wheels)."""
    base = CONSTRAINTS.read_text(encoding="utf-8")
    if not kind.name.startswith("jetpack") or not JETSON_CONSTRAINTS.is_file():
        return base

    def name(line: str) -> str:
        return re.split(r"[=<>!~;\s]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")

    overrides = [ln for ln in JETSON_CONSTRAINTS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    names = {name(ln) for ln in overrides}
    kept = [ln for ln in base.splitlines() if ln.strip() and not ln.startswith("#") and name(ln) not in names]
    return "\n".join(kept + overrides) + "\n"


def build_edge_wheel(out: Path, log: Callable[[str], None]) -> Path:
    """`pip wheel --no-deps` of a clean copy of this checkout (a stale build/ can leak old files)."""
    src = out / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                  ".mypy_cache", ".pytest_cache", ".hypothesis", ".cache", "node_modules",
                                  "provision-logs")
    shutil.copytree(REPO, src, ignore=skip, symlinks=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
           "-w", str(out / "wheel"), str(src)]
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
        cmd.append("--no-build-isolation")  # both are here: no need to fetch them
    except ImportError:
        pass
    log("$ " + shlex.join(cmd))
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_NO_INPUT="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise HostFailure("cannot build the edge-voice wheel on this machine: "
                          + (lines[-1] if lines else "pip failed"))
    wheels = sorted((out / "wheel").glob("edge_voice-*.whl"))
    if not wheels:
        raise HostFailure("pip wheel produced no edge_voice wheel")
    return wheels[0]


def build_portable_llama(cache: Path, version: str, log: Callable[[str], None]) -> Path | None:
    """A portable (GGML_NATIVE=OFF) llama-cpp-python wheel for devices of this machine's kind,
    built here once into ``cache`` (about 5 minutes on two cores) rather than on every device.
    None when this machine cannot build it (no pip, compiler or cmake): the device compiles."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--disable-pip-version-check",
           "-q", "-w", str(cache), f"llama-cpp-python=={version}"]
    env = dict(os.environ, CMAKE_ARGS=f"-DGGML_NATIVE=OFF {os.environ.get('LLAMA_CMAKE_ARGS', '')}".strip(),
               PIP_NO_INPUT="1")
    log(f"building a portable llama-cpp-python {version} wheel into {cache} (once): $ {shlex.join(cmd)}")
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        log("could not build it here: " + (lines[-1] if lines else f"pip exited {proc.returncode}"))
        return None
    built = sorted(cache.glob(f"llama_cpp_python-{version}-*.whl"))
    return built[-1] if built else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Stage:
    """What one kind of device gets: a folder to rsync, the llama-cpp-python wheel in it (None:
    compiled on the device) and why, and whether llama.cpp can use a GPU there."""
    dir: Path
    llama: Path | None
    why: str
    gpu: bool


class Artifacts:
    """Built once per run, shared by all hosts: the edge-voice wheel, and per device kind a
    folder of wheels to rsync (edge-voice, llama-cpp-python if one fits, --wheels, constraints)."""

    def __init__(self, opts: argparse.Namespace, tmp: Path) -> None:
        self.opts, self.tmp = opts, tmp
        self._lock = threading.Lock()
        self._edge: Path | None = None
        self._stages: dict[tuple[str, str], Stage] = {}
        self.llama_version = llama_version()

    def edge_wheel(self, log: Callable[[str], None]) -> Path:
        with self._lock:
            if self._edge is None:
                self._edge = build_edge_wheel(self.tmp / "edge", log)
            return self._edge

    @staticmethod
    def builds_here(kind: Kind) -> bool:
        """Can this machine build a llama-cpp-python wheel that runs on ``kind``?"""
        return not kind.cuda and laptop_kind() == (kind_os(kind), kind_os_version(kind), kind.arch)

    def stage(self, kind: Kind, python: str, log: Callable[[str], None]) -> Stage:
        edge = self.edge_wheel(log)
        key = (kind.name, ".".join(python.split(".")[:2]))
        with self._lock:
            if key not in self._stages:
                llama, why = pick_llama(kind, python, self.opts.wheels, self.opts.wheel_cache, self.llama_version)
                cache = self.opts.wheel_cache
                if llama is None and cache is not None and self.builds_here(kind):
                    if self.opts.dry_run:
                        why = (f"no llama-cpp-python {self.llama_version} wheel in {cache} yet: would build a "
                               "portable one on this machine once (about 5 minutes)")
                    else:
                        llama = build_portable_llama(cache, self.llama_version, log)
                        if llama is not None:
                            why = f"built on this machine into {cache} ({llama.name}, portable)"
                d = self.tmp / ("stage-" + "-".join(key))
                d.mkdir()
                shutil.copy2(edge, d / edge.name)
                (d / "constraints.txt").write_text(constraints_for(kind), encoding="utf-8")
                if llama is not None:
                    shutil.copy2(llama, d / llama.name)
                if self.opts.wheels is not None:
                    for p in sorted(self.opts.wheels.glob("*.whl")):
                        w = WheelName.parse(p.name)
                        if w and w.name != "llama_cpp_python" and w.name != "edge_voice" and w.fits(kind.arch, python):
                            shutil.copy2(p, d / p.name)
                copied = (d / llama.name) if llama else None
                gpu = kind.cuda and (copied is None or is_cuda_wheel(copied))  # compiled there: with CUDA
                self._stages[key] = Stage(d, copied, why, gpu)
            return self._stages[key]
