"""Resumable downloads over HTTP(S) with the standard library, and copies from a mirror folder.

A download writes to ``<dest>.part`` and resumes it with a Range request, both after a
dropped connection (retried here) and in a later run after the process was killed.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from edge import __version__
from edge.errors import ModelError
from edge.models.store import disk_error

_LOGGER = logging.getLogger(__name__)

_BLOCK = 1 << 16
ATTEMPTS = 4
TIMEOUT_S = 30.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Progress(Protocol):
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def human(n: int | None) -> str:
    if n is None:
        return "unknown size"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


class LineProgress:
    """Plain lines at every 25% (logs, pipes, journald): a bar would be noise there.
    Files under a few MB take no time worth reporting and get no lines."""

    QUIET_BELOW = 4_000_000

    def __init__(self, label: str, total: int | None, initial: int, stream: IO[str]) -> None:
        self.label, self.done, self.stream = label, initial, stream
        self.total = total if total is not None and total >= self.QUIET_BELOW else None
        self._next = 25
        if initial and self.total:
            print(f"{label}: resuming at {human(initial)} of {human(self.total)}", file=stream, flush=True)
            while self._next <= initial * 100 // self.total:
                self._next += 25

    def update(self, n: int) -> None:
        self.done += n
        if self.total and self.done * 100 // self.total >= self._next and self.done < self.total:
            print(f"{self.label}: {self.done * 100 // self.total}% ({human(self.done)} of {human(self.total)})",
                  file=self.stream, flush=True)
            while self._next <= self.done * 100 // self.total:
                self._next += 25

    def close(self) -> None:
        pass


def make_progress(label: str, total: int | None, initial: int = 0) -> Progress:
    """A tqdm bar on a terminal; otherwise plain lines on stdout (stderr is kept for the error line)."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # the "models" extra is optional; lines work everywhere
            pass
        else:
            return tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True,
                        unit_divisor=1000, file=sys.stderr, leave=False)
    return LineProgress(label, total, initial, sys.stdout)


ProgressFactory = Callable[[str, "int | None", int], Progress]


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)  # never print credentials embedded in a URL


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def download(url: str, part: Path, size: int | None, label: str, progress: ProgressFactory = make_progress,
             attempts: int = ATTEMPTS, timeout: float = TIMEOUT_S) -> int:
    """Download ``url`` into ``part`` (resuming what it holds). Returns the bytes transferred.

    ``size``, when known, is enforced: the server may not send more, and a shorter body
    is resumed. Raises ModelError (``model.download``) with one line naming the URL.
    """
    shown = _redact(url)
    transferred = 0
    last_error = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        have = _part_size(part)
        if size is not None and have > size:
            part.unlink()
            have = 0
        if size is not None and have == size and have > 0:
            return transferred
        req = urllib.request.Request(url, headers={"User-Agent": f"edge-voice/{__version__}"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                start = have
                if resp.status == 206:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise ModelError(f"{shown}: the server answered the wrong byte range", code="model.download")
                    total = int(m.group(3)) if m.group(3) != "*" else None
                else:
                    start = 0  # the server ignored Range: start over
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                if size is not None and total is not None and total != size:
                    raise ModelError(f"{shown}: the server has {total} bytes, the manifest says {size}: "
                                     f"wrong or changed file", code="model.size")
                expected = total if total is not None else size
                bar = progress(label, expected, start)
                try:
                    with open(part, "r+b" if start else "wb") as out:
                        out.seek(start)
                        out.truncate()
                        got = start
                        while block := resp.read(_BLOCK):
                            got += len(block)
                            if size is not None and got > size:
                                raise ModelError(f"{shown}: the server sent more than the {size} bytes "
                                                 f"in the manifest", code="model.size")
                            out.write(block)
                            transferred += len(block)
                            bar.update(len(block))
                        out.flush()
                        os.fsync(out.fileno())
                finally:
                    bar.close()
                if expected is not None and got < expected:
                    last_error = f"connection closed after {got} of {expected} bytes"
                    _LOGGER.info("%s: %s; resuming", shown, last_error)
                    continue
                return transferred
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:
                # Nothing left to send from that offset: either complete or a stale part.
                if size is None or have == size:
                    return transferred
                part.unlink()
                last_error = "HTTP 416 for the partial download"
                continue
            if err.code in (408, 429) or err.code >= 500:
                last_error = f"HTTP {err.code} {err.reason}"
                continue
            code = "model.not_found" if err.code in (404, 410) else "model.download"
            raise ModelError(f"{shown}: HTTP {err.code} {err.reason}", code=code) from None
        except (http.client.IncompleteRead, ConnectionError, TimeoutError, ssl.SSLError) as err:
            last_error = f"connection lost ({type(err).__name__})"
            _LOGGER.info("%s: %s at %d bytes; resuming", shown, last_error, _part_size(part))
        except urllib.error.URLError as err:
            reason = err.reason
            last_error = f"unreachable ({getattr(reason, 'strerror', None) or reason})"
        except http.client.HTTPException as err:
            last_error = f"bad HTTP response ({type(err).__name__})"
        except OSError as err:
            raise disk_error(err, part) from None
    raise ModelError(f"{shown}: {last_error} (tried {attempts} times)", code="model.download")


def copy_file(src: Path, part: Path, size: int | None, label: str,
              progress: ProgressFactory = make_progress) -> int:
    """Copy a file from a mirror folder into ``part``. Returns the bytes copied."""
    try:
        src_size = src.stat().st_size
    except FileNotFoundError:
        raise ModelError(f"{src}: not found", code="model.not_found") from None
    except OSError as err:
        raise ModelError(f"{src}: {err.strerror or err}", code="model.download") from None
    if size is not None and src_size != size:
        raise ModelError(f"{src}: {src_size} bytes, the manifest says {size}: wrong or changed file",
                         code="model.size")
    bar = progress(label, src_size, 0)
    try:
        with open(src, "rb") as f, open(part, "wb") as out:
            while block := f.read(_BLOCK * 16):
                out.write(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_error(err, part) from None
        raise ModelError(f"{err.filename or src}: {err.strerror or err}", code="model.io") from None
    finally:
        bar.close()
    return src_size


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link when on the same filesystem (no second copy of a 2 GB model), else copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
