"""Helpers shared by scripts/build-wheels and scripts/arm64-smoke (standard library only).

The modules here are prefixed arm64_ so that, on sys.path, none hides a package of the same name."""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "scripts" / "constraints.txt"

# Exit codes of both scripts (stable: .ci/run and provisioning read them).
EXIT_OK = 0
EXIT_FAIL = 1  # the build or the smoke test failed
EXIT_USAGE = 2  # bad arguments
EXIT_NO_WHEEL = 3  # build-wheels --print-path: no wheel built for this version and these flags
EXIT_SKIP = 77  # arm64-smoke: this machine cannot run foreign binaries (binfmt_misc unavailable)


class Fail(Exception):
    """A problem reported as one line on stderr, ending the script with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


_T0 = time.monotonic()


def say(message: str) -> None:
    """Progress on stderr, with seconds since the script started (stdout is for results)."""
    print(f"==> [{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def cache_home() -> Path:
    """Where built things are kept between runs: $EDGE_VOICE_BUILD_CACHE, else ~/.cache/edge-voice."""
    env = os.environ.get("EDGE_VOICE_BUILD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-voice"


def pinned_version(package: str, constraints: Path = CONSTRAINTS) -> str:
    """The ``==`` pin of ``package`` in scripts/constraints.txt."""
    want = re.sub(r"[-_.]+", "-", package).lower()
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)", line)
        if m and re.sub(r"[-_.]+", "-", m.group(1)).lower() == want:
            return m.group(2)
    raise Fail(f"{constraints}: no '{package}==VERSION' pin")


def _die_with_parent() -> None:
    """In the child before exec: be killed when this script dies, even by SIGKILL (prctl
    PR_SET_PDEATHSIG), so no emulated process outlives a run."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def run(cmd: Sequence[str | os.PathLike[str]], *, quiet: bool = True, timeout: float | None = None,
        env: dict[str, str] | None = None, cwd: Path | None = None, what: str = "") -> str:
    """Run ``cmd`` and return its stdout.

    ``quiet``: stderr is merged into what is captured and shown only if the command fails;
    otherwise stderr streams to ours as it comes. A failure raises Fail naming the command."""
    args = [str(a) for a in cmd]
    try:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if quiet else None,
                              stdin=subprocess.DEVNULL, text=True, errors="replace", timeout=timeout, env=env,
                              cwd=cwd, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    except FileNotFoundError:
        raise Fail(f"{args[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise Fail(f"{what or args[0]}: no result after {timeout:.0f} s: {shlex.join(args)}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-30:])
        if tail:
            print(tail, file=sys.stderr)
        raise Fail(f"{what or args[0]} failed (exit {proc.returncode}): {shlex.join(args)}")
    return proc.stdout


def missing_apt(packages: Sequence[str]) -> list[str]:
    out = []
    for p in packages:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        if "install ok installed" not in proc.stdout:
            out.append(p)
    return out


def ensure_apt(packages: Sequence[str], install: bool = True) -> None:
    """Install the Debian packages that are missing (as root, or through sudo)."""
    if shutil.which("dpkg-query") is None:
        raise Fail("this script needs a Debian or Ubuntu host (dpkg-query not found)")
    missing = missing_apt(packages)
    if not missing:
        return
    if not install:
        raise Fail(f"missing Debian packages: {' '.join(missing)} (apt-get install {' '.join(missing)})")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    say(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*sudo, "apt-get", "update", "-q"], quiet=True, env=env, what="apt-get update")
    run([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], quiet=True, env=env,
        what="apt-get install")


def aarch64_platforms(glibc_minor: int) -> list[str]:
    """pip ``--platform`` values for an aarch64 system with glibc 2.<glibc_minor>.

    pip before 24 does not widen a ``manylinux_2_X`` platform to older ones, so every
    compatible tag is listed (newest first, then the manylinux2014 alias)."""
    return [f"manylinux_2_{m}_aarch64" for m in range(glibc_minor, 16, -1)] + ["manylinux2014_aarch64"]


def aarch64_wheel_target(python: str, glibc_minor: int) -> list[str]:
    """pip options that choose binary wheels for CPython ``python`` on aarch64 with glibc
    2.<glibc_minor> instead of for this host."""
    plat = [a for p in aarch64_platforms(glibc_minor) for a in ("--platform", p)]
    return ["--only-binary", ":all:", *plat, "--python-version", python, "--implementation", "cp",
            "--abi", "cp" + python.replace(".", "")]


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed); waits, saying so, if it is taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another {what} to finish (lock {path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
