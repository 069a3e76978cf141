"""The console's HTTP side: the standard library's threading server, every request checked.

Routes: ``GET /login`` and ``POST /login`` (a token in, a session cookie out), ``POST /logout``,
``GET /`` (the page), ``GET /static/NAME`` (its CSS and JavaScript, the only routes open
without a login: they hold no data), ``GET /api/stream`` (server-sent events: a snapshot, then
updates), ``GET /api/devices``, ``GET /api/device/ID`` (details), ``GET /api/whoami`` and
``POST /api/cmd`` (a command; operators only). ``/api/*`` takes the session cookie or an
``Authorization: Bearer TOKEN`` header. A POST with the cookie must come from the console's own
origin (``Origin`` checked) and commands must be ``application/json`` (a form on another site
cannot send that). Every response carries a Content-Security-Policy that allows only the
console's own scripts and styles, so text from devices can never run as code even if a bug put
it into the page as HTML (the page only ever sets it as text).

Bounded: ``MAX_CONNECTIONS`` connections at once (more are closed at once), request bodies of
``MAX_BODY`` bytes, ``stream.MAX_PAGES`` pages following the stream. HTTPS: ``--https-cert``
and ``--https-key`` wrap the listening socket (the handshake runs on the connection's own
thread), or a reverse proxy terminates TLS (see the README).
"""

from __future__ import annotations

import html
import http.cookies
import json
import logging
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from edge.errors import EdgeError
from edge.fleet.console.auth import COOKIE, SESSION_S, User
from edge.fleet.console.stream import HEARTBEAT_S, RETRY_MS, encode

if TYPE_CHECKING:
    from edge.fleet.console.app import Console

_LOGGER = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
MAX_BODY = 16 * 1024
IDLE_S = 30.0  # a kept-alive connection that sends nothing for this long is closed
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


def load_static() -> dict[str, bytes]:
    """The page's files, read once from the package."""
    out: dict[str, bytes] = {}
    root = resources.files("edge.fleet.console") / "static"
    for entry in root.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            out[entry.name] = entry.read_bytes()
    return out


class ConsoleHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], console: Console, tls: ssl.SSLContext | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.console = console
        self.tls = tls
        self.static = load_static()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(address, Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (OSError, ssl.SSLError)):  # a client that went away, a failed TLS handshake
            _LOGGER.debug("console: a connection from %s failed: %s", client_address, err)
        else:
            _LOGGER.exception("console: a request from %s failed", client_address)


class Handler(BaseHTTPRequestHandler):
    server: ConsoleHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "edge-voice-console"
    sys_version = ""
    timeout = IDLE_S

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        _LOGGER.debug("%s %s", self.address_string(), format % args)

    @property
    def console(self) -> Console:
        return self.server.console

    # -- responses -------------------------------------------------------------------------
    def _headers(self, status: int, ctype: str, length: int | None, extra: dict[str, str] | None = None,
                 cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", cache)
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
        if self.server.tls is not None:
            self.send_header("Strict-Transport-Security", "max-age=31536000")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None,
              cache: str = "no-store") -> None:
        self._headers(status, ctype, len(body), extra, cache)
        self.wfile.write(body)

    def _json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode(), "application/json; charset=utf-8", extra)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"ok": False, "error": {"code": code, "message": message}})

    def _redirect(self, where: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Location": where}
        headers.update(extra or {})
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", headers)

    def _login_page(self, status: int, message: str = "") -> None:
        page = self.server.static["login.html"].decode()
        page = page.replace("{{message}}", html.escape(message)).replace("{{fleet}}", html.escape(
            f"{self.console.info['prefix']} on {self.console.info['broker']}"))
        self._send(status, page.encode(), _TYPES[".html"])

    # -- who is asking ---------------------------------------------------------------------
    @property
    def _address(self) -> str:
        return str(self.client_address[0])

    def _session_id(self) -> str:
        raw = self.headers.get("Cookie")
        if not raw:
            return ""
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        try:
            jar.load(raw)
        except http.cookies.CookieError:
            return ""
        morsel = jar.get(COOKIE)
        return morsel.value if morsel is not None else ""

    def _user(self) -> tuple[User | None, str]:
        """The user, and how they proved it: "bearer", "cookie" or ""."""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            user = self.console.auth.check_token(auth[7:].strip())
            if user is None:
                self.console.auth.failed(self._address)  # counts as a failed login
            return user, "bearer" if user else ""
        sid = self._session_id()
        user = self.console.auth.session(sid) if sid else None
        return user, "cookie" if user else ""

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        host = self.headers.get("Host")
        if not origin or not host or origin == "null":
            return False
        return urlsplit(origin).netloc.lower() == host.lower()

    def _body(self) -> bytes | None:
        """The request body (empty without a Content-Length), or None (answered with 411/413)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "http.length", "send a Content-Length, not chunks")
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, "http.length", "a bad Content-Length")
            return None
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "http.too_large", f"at most {MAX_BODY} bytes")
            return None
        return self.rfile.read(length)

    # -- routes ----------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        try:
            if path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if path == "/login":
                user, _ = self._user()
                return self._redirect("/") if user else self._login_page(HTTPStatus.OK)
            if path == "/favicon.ico":
                return self._static("favicon.svg")
            user, how = self._user()
            if path == "/":
                if user is None:
                    return self._redirect("/login")
                return self._send(HTTPStatus.OK, self.server.static["index.html"], _TYPES[".html"])
            if not path.startswith("/api/"):
                return self._error(HTTPStatus.NOT_FOUND, "http.not_found", "no such page")
            if user is None:
                return self._unauthorized()
            if path == "/api/stream":
                return self._stream(user, how)
            if path == "/api/whoami":
                return self._json(HTTPStatus.OK, {"user": user.name, "role": user.role, **self.console.info})
            if path == "/api/devices":
                with self.console.model.lock:
                    rows = self.console.model.snapshot()["devices"]
                return self._json(HTTPStatus.OK, rows)
            if path.startswith("/api/device/"):
                details = self.console.model.details(unquote(path[len("/api/device/"):]))
                if details is None:
                    return self._error(HTTPStatus.NOT_FOUND, "console.unknown_device", "no such device")
                return self._json(HTTPStatus.OK, details)
            return self._error(HTTPStatus.NOT_FOUND, "http.not_found", "no such API")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        try:
            raw = self._body()  # read first, whatever the answer: the connection stays in step
            if raw is None:
                return None
            if path == "/login":
                return self._login(raw)
            if path == "/logout":
                sid = self._session_id()
                if sid and self._same_origin():
                    self.console.auth.logout(sid)
                return self._redirect("/login", {"Set-Cookie": self._cookie("", 0)})
            if path != "/api/cmd":
                return self._error(HTTPStatus.NOT_FOUND, "http.not_found", "no such API")
            user, how = self._user()
            if user is None:
                return self._unauthorized()
            if how == "cookie" and not self._same_origin():
                return self._error(HTTPStatus.FORBIDDEN, "http.origin", "a command must come from the console's page")
            if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
                return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "http.type", "send application/json")
            if not user.may_command:
                return self._error(HTTPStatus.FORBIDDEN, "console.viewer",
                                   f"{user.name} may watch the fleet but not send commands")
            return self._command(user, raw)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True

    def _unauthorized(self) -> None:
        if self.console.auth.locked_out(self._address):
            return self._error(HTTPStatus.TOO_MANY_REQUESTS, "console.locked", "too many failed logins; wait")
        return self._json(HTTPStatus.UNAUTHORIZED, {"ok": False, "error": {
            "code": "console.login", "message": "log in at /login, or send Authorization: Bearer TOKEN"}},
            {"WWW-Authenticate": 'Bearer realm="edge-voice console"'})

    def _static(self, name: str) -> None:
        body = self.server.static.get(name)
        if body is None or name in ("index.html", "login.html") or "/" in name:
            return self._error(HTTPStatus.NOT_FOUND, "http.not_found", "no such file")
        suffix = name[name.rfind("."):]
        return self._send(HTTPStatus.OK, body, _TYPES.get(suffix, "application/octet-stream"), cache="no-cache")

    def _cookie(self, value: str, max_age: int) -> str:
        secure = "; Secure" if self.server.tls is not None or self.console.secure_cookie else ""
        return f"{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"

    def _login(self, raw: bytes) -> None:
        if self.headers.get("Origin") is not None and not self._same_origin():
            return self._login_page(HTTPStatus.FORBIDDEN, "Log in from the console's own page.")
        if self.console.auth.locked_out(self._address):
            _LOGGER.warning("console: login from %s refused: too many failures", self._address)
            return self._login_page(HTTPStatus.TOO_MANY_REQUESTS,
                                    "Too many failed logins from this address. Wait a few minutes.")
        try:
            form = parse_qs(raw.decode("utf-8", "replace"), max_num_fields=4)
        except ValueError:
            form = {}
        token = (form.get("token") or [""])[0].strip()
        result = self.console.auth.login(token, self._address) if token else None
        if result is None:
            _LOGGER.warning("console: failed login from %s", self._address)
            return self._login_page(HTTPStatus.UNAUTHORIZED, "That token is not valid.")
        sid, user = result
        _LOGGER.info("console: %s (%s) logged in from %s", user.name, user.role, self._address)
        return self._redirect("/", {"Set-Cookie": self._cookie(sid, SESSION_S)})

    def _command(self, user: User, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return self._error(HTTPStatus.BAD_REQUEST, "console.request", "the body is not JSON")
        try:
            report = self.console.command(user, body)
        except EdgeError as err:
            return self._json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": err.as_dict()})
        return self._json(HTTPStatus.OK, report)

    def _stream(self, user: User, how: str) -> None:
        console = self.console
        sid = self._session_id() if how == "cookie" else ""
        with console.model.lock:
            page = console.hub.add(user.name)
            snapshot = console.snapshot() if page is not None else None
        if page is None or snapshot is None:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "console.busy", "too many pages open")
        who = {"name": user.name, "role": user.role}
        snapshot["user"] = who
        self.close_connection = True
        try:
            self._headers(HTTPStatus.OK, "text/event-stream; charset=utf-8", None,
                          {"Connection": "close", "X-Accel-Buffering": "no"})
            self.wfile.write(f"retry: {RETRY_MS}\n\n".encode() + encode("snapshot", snapshot))
            while not page.closed:
                items, resync = page.take(HEARTBEAT_S)
                if page.closed:
                    break
                if sid and console.auth.session(sid) is None:
                    self.wfile.write(encode("logout", {}))
                    break
                if resync:
                    with console.model.lock:
                        snapshot = console.snapshot()
                        page.reset()
                    snapshot.update(resyncs=page.resyncs, user=who)
                    items = [encode("snapshot", snapshot)]
                self.wfile.write(b"".join(items) if items else b": ping\n\n")
        except (OSError, ssl.SSLError):
            pass  # the page went away
        finally:
            console.hub.remove(page)


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EdgeError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080",
                        code="console.usage")
    return host, int(port)


def https_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as err:
        raise EdgeError(f"{err.filename}: not found (--https-cert/--https-key)", code="console.tls") from None
    except (ssl.SSLError, OSError) as err:
        raise EdgeError(f"cannot use {cert} with {key} for HTTPS: {err}", code="console.tls") from None
    return ctx
