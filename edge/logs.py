"""Logging: structured journal entries under systemd, plain lines on stderr elsewhere.

Under systemd each record goes to journald with fields a fleet can query
(``journalctl DEVICE_ID=kiosk-7 STAGE=llm``, ``journalctl MESSAGE_ID=<id>``): ``DEVICE_ID`` on
every entry, ``TURN_ID`` and ``STAGE`` where the code knows them, and a stable 128-bit
``MESSAGE_ID`` for each notable event. Attach fields through ``extra``::

    _LOGGER.info("model loaded: %s", name,
                 extra=log_fields(stage="llm", message_id=MessageId.MODEL_LOADED))

Outside systemd the same records are plain lines on stderr, with the turn and stage appended.
Nothing here is meant to be called per audio chunk.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from enum import Enum
from typing import IO, Any

from edge.errors import ConfigError

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "edge-voice"
LEVELS = ("debug", "info", "warning", "error")
FIELDS = ("TURN_ID", "STAGE", "MESSAGE_ID")


class MessageId(str, Enum):
    """Stable journal MESSAGE_IDs (``systemd-id128 new``); never reuse or change one."""

    STARTING = "8aefa8f6545743f0addce0913b731d87"
    MODEL_LOADED = "9f3912ca294c459ab56dce47cb8d35a8"
    READY = "ebe9223b86d44629be81f58371a54e70"
    MIC_LOST = "e498d6191de04e7dabb299dda9a4f1c9"
    MIC_RESTORED = "8883152eddf2436aabe05baf41cba2d7"
    SPEAKER_LOST = "637fa69afaf747a6946ed5f662acc47a"
    SPEAKER_RESTORED = "53e14a795ccb4820a97f7c39707ac948"
    BROKER_LOST = "7a2aa8ea1a6a41baa5fb3dbf9333cf97"
    BROKER_RESTORED = "027fc5b8da5e4feaadaef6cbc3546911"
    WATCHDOG_STALLED = "5f6c113d8e4148bdbb250ac214cd779a"
    WATCHDOG_RESUMED = "97c1253989b94db0a4579e3b720a4c4f"
    STOPPING = "bbd49dee920a43c2bff93c6001d11552"
    STOPPED = "5d00184ea5214835ad740c2dcd9ee803"
    STAGE_FAILED = "90c5012da02a4292b3d589021bbeb2ce"

    def __str__(self) -> str:  # the journal wants the bare 32 hex digits
        return self.value


def log_fields(*, turn_id: str | None = None, stage: str | None = None,
               message_id: MessageId | None = None) -> dict[str, Any]:
    """The ``extra=`` mapping for a record; fields that are None are left out."""
    out: dict[str, Any] = {}
    if turn_id is not None:
        out["TURN_ID"] = turn_id
    if stage is not None:
        out["STAGE"] = str(stage)
    if message_id is not None:
        out["MESSAGE_ID"] = message_id
    return out


def journal_stream_matches(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``fd`` is the stream systemd connected to the journal (``$JOURNAL_STREAM``).

    Comparing device and inode, not just the variable's presence, keeps a child whose stderr
    was redirected (``edge-voice run 2>file`` inside a unit) writing to where it was sent.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


def under_systemd(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Run by systemd with a journal to write to."""
    environ = os.environ if environ is None else environ
    if journal_stream_matches(environ, fd):
        return True
    return bool(environ.get("INVOCATION_ID")) and os.path.exists(JOURNAL_SOCKET)


class _DropEmptyFields(logging.Filter):
    """``extra={"TURN_ID": None}`` should mean "no turn", not the text "None" in the journal."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in FIELDS:
            if name in record.__dict__ and record.__dict__[name] is None:
                del record.__dict__[name]
        return True


class _PlainFormatter(logging.Formatter):
    """``time LEVEL logger: message [turn=… stage=…]``; optionally with a journald priority prefix."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                 logging.CRITICAL: 2}

    def __init__(self, *, syslog_prefix: bool) -> None:
        # journald stamps each line itself; a second timestamp would only be noise there.
        fmt = "%(name)s: %(message)s" if syslog_prefix else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self._syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{key}={record.__dict__[name]}" for name, key in (("TURN_ID", "turn"), ("STAGE", "stage"))
                if record.__dict__.get(name) is not None]
        if tags:
            first, nl, rest = text.partition("\n")
            text = f"{first} [{' '.join(tags)}]{nl}{rest}"
        if self._syslog_prefix:
            # journald reads "<N>" at the start of each stdout/stderr line as the priority
            # (SyslogLevelPrefix=yes); tracebacks keep it on every line.
            prio = self._PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            text = "\n".join(f"<{prio}>{line}" for line in text.split("\n"))
        return text


def _journal_handler(device_id: str) -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, DEVICE_ID=device_id)


def setup_logging(level: str, device_id: str, *, target: str = "auto",
                  environ: Mapping[str, str] | None = None, stream: IO[str] | None = None) -> str:
    """Configure the root logger once for the process; returns where records go.

    ``target``: ``auto`` (journal under systemd, else stderr), ``journal`` or ``stderr``.
    Returns ``journal`` (structured entries), ``stderr-journal`` (stderr is the journal
    stream but systemd-python is missing: plain lines with priority prefixes) or ``stderr``.
    Calling it again replaces the handler it installed before.
    """
    if level.lower() not in LEVELS:
        raise ConfigError(f"logging.level: {level!r} is not one of {', '.join(LEVELS)}")
    if target not in ("auto", "journal", "stderr"):
        raise ValueError(f"unknown log target {target!r}")
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream

    handler: logging.Handler | None = None
    where = "stderr"
    if target == "journal" or (target == "auto" and under_systemd(environ)):
        handler = _journal_handler(device_id)
        where = "journal"
        if handler is None:
            where = "stderr-journal" if journal_stream_matches(environ) else "stderr"
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_PlainFormatter(syslog_prefix=where == "stderr-journal"))
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_DropEmptyFields())
    handler._edge_voice = True  # type: ignore[attr-defined]  # lets a second call find and replace it

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_edge_voice", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    if where == "stderr-journal":
        logging.getLogger(__name__).info(
            "systemd-python is not installed: journal entries carry no DEVICE_ID/TURN_ID/STAGE fields "
            "(install it with `pip install 'edge-voice[systemd]'`)")
    return where
