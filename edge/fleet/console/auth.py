"""Who may use the console: tokens from a file or the environment, sessions, a login limit.

A token file has one user a line: ``TOKEN`` alone (user "operator"), or ``NAME TOKEN`` or
``NAME TOKEN ROLE`` with ROLE ``operator`` (sees and sends commands, the default) or
``viewer`` (sees only); blank lines and ``#`` comments are skipped. ``EDGE_VOICE_CONSOLE_TOKEN``
holds one token (or the same lines) instead. Tokens never appear on a command line, where
``ps`` would show them, nor in logs.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest``, against every user
(no early exit). A login creates a session: a random id in an ``HttpOnly; SameSite=Strict``
cookie, kept server side (by its digest) for ``SESSION_S``. Ten failed logins from one
address within five minutes lock that address out until the oldest failure is five minutes
old.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge.fleet.console import ConsoleError

TOKEN_ENV = "EDGE_VOICE_CONSOLE_TOKEN"
ROLES = ("operator", "viewer")
MIN_TOKEN_CHARS = 16
SESSION_S = 12 * 3600
MAX_SESSIONS = 1000
FAILS_MAX = 10
FAILS_WINDOW_S = 300.0
MAX_ADDRESSES = 10_000
COOKIE = "edge_console"


@dataclass(frozen=True)
class User:
    name: str
    role: str
    digest: bytes

    @property
    def may_command(self) -> bool:
        return self.role == "operator"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str, source: str) -> list[User]:
    users: list[User] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            name, token, role = "operator", parts[0], "operator"
        elif len(parts) in (2, 3):
            name, token = parts[0], parts[1]
            role = parts[2] if len(parts) == 3 else "operator"
        else:
            raise ConsoleError(f"{source}, line {n}: expected TOKEN, NAME TOKEN or NAME TOKEN ROLE",
                               code="console.token")
        if role not in ROLES:
            raise ConsoleError(f"{source}, line {n}: unknown role {role[:20]!r} (roles: {', '.join(ROLES)})",
                               code="console.token")
        if len(token) < MIN_TOKEN_CHARS:
            raise ConsoleError(f"{source}, line {n}: a token needs at least {MIN_TOKEN_CHARS} characters "
                               "(`python3 -c 'import secrets; print(secrets.token_urlsafe(24))'` makes one)",
                               code="console.token")
        if name in names:
            raise ConsoleError(f"{source}, line {n}: the user {name[:40]!r} is named twice", code="console.token")
        digest = _digest(token)
        if digest in digests:
            raise ConsoleError(f"{source}, line {n}: this token is given twice; each user needs their own",
                               code="console.token")
        names.add(name)
        digests.add(digest)
        users.append(User(name[:64], role, digest))
    if not users:
        raise ConsoleError(f"{source}: no token in it", code="console.token")
    return users


def load_users(token_file: str | None, environ: Mapping[str, str] | None = None) -> tuple[list[User], str | None]:
    """The users, and a warning about the file's permissions (or None)."""
    environ = os.environ if environ is None else environ
    if token_file:
        path = Path(token_file)
        try:
            info = path.stat()
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConsoleError(f"{path}: token file not found (--token-file)", code="console.token") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConsoleError(f"{path}: cannot read the token file: {err}", code="console.token") from None
        warning = None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warning = f"{path} can be read by other users; chmod 600 it"
        return parse_tokens(text, str(path)), warning
    value = environ.get(TOKEN_ENV, "")
    if not value.strip():
        raise ConsoleError(f"the console needs a login token: --token-file FILE or ${TOKEN_ENV} "
                           "(never on the command line)", code="console.token")
    return parse_tokens(value, f"${TOKEN_ENV}"), None


class Auth:
    def __init__(self, users: list[User], clock: Callable[[], float] = time.monotonic) -> None:
        if not users:
            raise ConsoleError("no users", code="console.token")
        self._users = list(users)
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[bytes, tuple[User, float]] = {}  # digest of the session id -> (user, expiry)
        self._fails: dict[str, deque[float]] = {}

    def check_token(self, token: str) -> User | None:
        digest = _digest(token)
        found = None
        for user in self._users:  # every one, so the time taken does not say which matched
            if hmac.compare_digest(user.digest, digest):
                found = user
        return found

    def locked_out(self, address: str) -> bool:
        now = self._clock()
        with self._lock:
            fails = self._fails.get(address)
            if not fails:
                return False
            while fails and now - fails[0] > FAILS_WINDOW_S:
                fails.popleft()
            return len(fails) >= FAILS_MAX

    def login(self, token: str, address: str) -> tuple[str, User] | None:
        """A new session id for a right token; None (and a failure counted) for a wrong one."""
        user = self.check_token(token)
        if user is None:
            self.failed(address)
            return None
        now = self._clock()
        with self._lock:
            sid = secrets.token_urlsafe(32)
            if len(self._sessions) >= MAX_SESSIONS:
                self._prune_sessions(now)
            self._sessions[hashlib.sha256(sid.encode()).digest()] = (user, now + SESSION_S)
            return sid, user

    def failed(self, address: str) -> None:
        """Count a wrong token from ``address``."""
        now = self._clock()
        with self._lock:
            if address not in self._fails and len(self._fails) >= MAX_ADDRESSES:
                self._prune_fails(now)
            self._fails.setdefault(address, deque(maxlen=FAILS_MAX)).append(now)

    def _prune_fails(self, now: float) -> None:
        for addr in [a for a, f in self._fails.items() if not f or now - f[-1] > FAILS_WINDOW_S]:
            del self._fails[addr]
        while len(self._fails) >= MAX_ADDRESSES:
            del self._fails[next(iter(self._fails))]

    def _prune_sessions(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._sessions.items() if exp <= now]:
            del self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:  # the oldest go first
            del self._sessions[min(self._sessions, key=lambda k: self._sessions[k][1])]

    def session(self, sid: str) -> User | None:
        if not sid or len(sid) > 128:
            return None
        key = hashlib.sha256(sid.encode("utf-8", "replace")).digest()
        with self._lock:
            entry = self._sessions.get(key)
            if entry is None:
                return None
            user, expiry = entry
            if expiry <= self._clock():
                del self._sessions[key]
                return None
            return user

    def logout(self, sid: str) -> None:
        key = hashlib.sha256(sid.encode("utf-8", "replace")).digest()
        with self._lock:
            self._sessions.pop(key, None)
