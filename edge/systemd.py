"""systemd integration: readiness, status lines and a watchdog tied to real progress.

``Notifier`` speaks the sd_notify protocol: through systemd-python's
``systemd.daemon.notify`` when it is installed, otherwise by writing the datagram to
``$NOTIFY_SOCKET`` itself (a path, or an abstract socket written ``@name``). Outside systemd
(no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon never needs to know how it was
started.

``Watchdog`` sends ``WATCHDOG=1`` only while the audio loop keeps calling ``progress()``: a
ping from a timer alone would keep a hung pipeline alive forever. When pings stop, systemd
kills the service after ``WatchdogSec=`` and ``Restart=on-failure`` starts it again.

Protocol: sd_notify(3). systemd ignores messages from any process but the main one
(``NotifyAccess=main``); both classes send from the daemon's own process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from enum import Enum

from edge.logs import MessageId, log_fields

_LOGGER = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 2.0  # PID 1 drains the socket at once; this only bounds a wedged manager


class Status(str, Enum):
    """``STATUS=`` texts (shown by ``systemctl status``) for the daemon's phases."""

    LOADING_MODELS = "loading models"
    LISTENING = "listening"
    MIC_LOST = "mic lost - retrying"
    SPEAKER_LOST = "speaker lost - retrying"
    BROKER_UNREACHABLE = "broker unreachable - queueing"
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value


def socket_address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address; ``@name`` is Linux's abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd ≥ 256's vsock: addresses, which a device never hands us


def send_datagram(value: str, payload: bytes) -> None:
    """The dependency-free sd_notify: one datagram to ``$NOTIFY_SOCKET``. Raises OSError."""
    address = socket_address(value)
    if address is None:
        raise OSError(f"unsupported NOTIFY_SOCKET address {value!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(_SEND_TIMEOUT_S)
        sock.sendto(payload, address)


def _systemd_python_sender() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon  # type: ignore[attr-defined]
    except ImportError:
        return None
    return lambda message: bool(daemon.notify(message))


class Notifier:
    """sd_notify for the daemon: ``ready()``, ``status()``, ``stopping()``, ``watchdog()``.

    ``use_systemd_python``: None picks systemd-python when it is installed (and the socket
    is the process's own ``$NOTIFY_SOCKET``, the only one libsystemd reads); False forces
    the built-in sender. Notifications never raise: a lost status line must not stop the
    daemon, and a lost ``WATCHDOG=1`` shows up as a restart, which is the point.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *,
                 use_systemd_python: bool | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()
        self._failed = False
        self._send: Callable[[str], bool] | None = None
        self.backend = "none"
        if self._socket is None:
            return
        own_socket = os.environ.get("NOTIFY_SOCKET") == self._socket
        if use_systemd_python is not False and own_socket:
            self._send = _systemd_python_sender()
            if self._send is not None:
                self.backend = "systemd-python"
        if self._send is None:
            self._send = self._send_fallback
            self.backend = "socket"

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def _send_fallback(self, message: str) -> bool:
        assert self._socket is not None
        send_datagram(self._socket, message.encode("utf-8"))
        return True

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one message; True if it was handed to the socket."""
        if self._send is None:
            return False
        message = "\n".join(assignments)
        try:
            with self._lock:
                sent = self._send(message)
        except OSError as err:
            # Said once, not per watchdog ping: a broken socket would otherwise flood the log.
            if not self._failed:
                _LOGGER.warning("cannot notify systemd at %s: %s", self._socket, err)
            self._failed = True
            return False
        self._failed = False
        return sent

    def ready(self) -> None:
        """Models loaded and audio input open: systemd may now order dependants after us."""
        self.notify("READY=1", f"STATUS={Status.LISTENING}")

    def status(self, text: str) -> None:
        # One line: a newline would start a new KEY=value assignment.
        self.notify("STATUS=" + " ".join(str(text).split()))

    def stopping(self) -> None:
        self.notify("STOPPING=1", f"STATUS={Status.STOPPING}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more start-up (or stop) time, e.g. while a large model is read from an SD card."""
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """``WatchdogSec=`` in seconds, or None when no watchdog is expected from this process."""
        if self._socket is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None  # meant for another process (we were exec'd by a wrapper)
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            _LOGGER.warning("ignoring WATCHDOG_USEC=%r: not an integer", self._watchdog_usec)
            return None
        return usec / 1_000_000 if usec > 0 else None


class Watchdog:
    """Pings ``WATCHDOG=1`` every half interval, only if ``progress()`` was called since the last ping.

    ``progress()`` is an integer increment so the audio loop can call it for every chunk.
    The ping thread is the only reader; a lost increment under a race still leaves the
    counter changed, which is all it looks at.
    """

    def __init__(self, notifier: Notifier, *, period: float | None = None) -> None:
        self._notifier = notifier
        interval = notifier.watchdog_interval()
        self.period = period if period is not None else (interval / 2 if interval else None)
        self._count = 0
        self._seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.withheld = 0

    @property
    def enabled(self) -> bool:
        return self.period is not None

    def progress(self) -> None:
        self._count += 1

    def start(self) -> None:
        if self.period is None or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._seen = self._count
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()
        _LOGGER.debug("watchdog: pinging every %.1f s while the audio loop makes progress", self.period)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _run(self) -> None:
        assert self.period is not None
        stalled_since: float | None = None
        last_progress = time.monotonic()
        while not self._stop.wait(self.period):
            count = self._count
            now = time.monotonic()
            if count != self._seen:
                self._seen = count
                last_progress = now
                self._notifier.watchdog()
                self.pings += 1
                if stalled_since is not None:
                    _LOGGER.info("audio loop is making progress again after %.1f s", now - stalled_since,
                                 extra=log_fields(stage="audio", message_id=MessageId.WATCHDOG_RESUMED))
                    stalled_since = None
            else:
                self.withheld += 1
                if stalled_since is None:
                    stalled_since = last_progress
                    _LOGGER.warning("audio loop made no progress for %.1f s: withholding the watchdog ping",
                                    now - last_progress,
                                    extra=log_fields(stage="audio", message_id=MessageId.WATCHDOG_STALLED))
