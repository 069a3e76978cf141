"""The rollout journal: what a power cut must not forget, in ``<state_dir>/rollout.json``.

Before a device switches to a new version it writes down the rollout and the store's state as it
was (``{"current", "previous"}``), fsynced; once the version is confirmed, or switched back, the
entry becomes the last outcome. A daemon that starts and finds an entry still switched (a power
cut, a crash while loading the new version, a kill) puts the store back as it was before it loads
anything: the device boots on the version it had, which was verified when it was installed.

The journal also remembers the outcome of recent rollouts by id, so a rollout that arrives again
(the fleet's retained desired state at every reconnect, a command sent twice) is not run twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.models.store import ModelStore, read_json, write_json_atomic
from edge.rollout.errors import RolloutError
from edge.rollout.release import ID_RE, KINDS, ROLLOUT_ID_RE, VERSION_RE, check_mirror_url

_LOGGER = logging.getLogger(__name__)

FILENAME = "rollout.json"
KEEP_OUTCOMES = 64
SWITCHED = "switched"


@dataclass(frozen=True)
class Request:
    """One rollout as a device receives it (the ``rollout`` command, or its retained desired state)."""

    rollout_id: str
    kind: str  # model | pack
    id: str
    version: str
    mirror: str
    expires_at: float

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Request:
        def text(key: str) -> str:
            value = args.get(key)
            if not isinstance(value, str):
                raise RolloutError(f"rollout: {key} must be a string", code="rollout.invalid")
            return value

        rollout_id, kind, target, version = text("rollout_id"), text("kind"), text("id"), text("version")
        if not ROLLOUT_ID_RE.fullmatch(rollout_id):
            raise RolloutError("rollout: rollout_id must be 1-64 letters, digits, _ . -", code="rollout.invalid")
        if kind not in KINDS:
            raise RolloutError(f"rollout: kind must be one of {', '.join(KINDS)}", code="rollout.invalid")
        if not ID_RE.fullmatch(target):
            raise RolloutError(f"rollout: bad {kind} id {target[:64]!r}", code="rollout.invalid")
        if not VERSION_RE.fullmatch(version):
            raise RolloutError(f"rollout: bad version {version[:64]!r} (12 hex digits, as `edge-voice fleet sign` "
                               "prints it)", code="rollout.invalid")
        expires = args.get("expires_at")
        if isinstance(expires, bool) or not isinstance(expires, (int, float)):
            raise RolloutError("rollout: expires_at is required (Unix seconds)", code="rollout.invalid")
        return cls(rollout_id, kind, target, version, check_mirror_url(args.get("mirror")), float(expires))

    def as_json(self) -> dict[str, Any]:
        return {"rollout_id": self.rollout_id, "kind": self.kind, "id": self.id, "version": self.version,
                "mirror": self.mirror, "expires_at": self.expires_at}

    @property
    def label(self) -> str:
        return f"{self.kind} {self.id} version {self.version}"


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILENAME
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        raw = None
        with contextlib.suppress(OSError, ValueError):
            raw = read_json(self.path)
        return raw if isinstance(raw, dict) else {}

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, data)

    def active(self) -> dict[str, Any] | None:
        entry = self._read().get("active")
        return entry if isinstance(entry, dict) else None

    def last(self) -> dict[str, Any] | None:
        entry = self._read().get("last")
        return entry if isinstance(entry, dict) else None

    def outcome(self, rollout_id: str) -> str | None:
        outcomes = self._read().get("outcomes")
        value = outcomes.get(rollout_id) if isinstance(outcomes, dict) else None
        return value if isinstance(value, str) else None

    def switching(self, request: Request, before: Mapping[str, str | None]) -> None:
        """Written, and on disk, before the store is switched to ``request.version``."""
        with self._lock:
            data = self._read()
            data["active"] = {**request.as_json(), "phase": SWITCHED, "before": dict(before),
                              "switched_at": round(time.time(), 3)}
            self._write(data)

    def finish(self, rollout_id: str, outcome: str, status: Mapping[str, Any], *, reported: bool = True) -> None:
        """The rollout is over (confirmed, rolled back, failed or refused): it is no longer active."""
        with self._lock:
            data = self._read()
            active = data.get("active")
            if isinstance(active, dict) and active.get("rollout_id") == rollout_id:
                data["active"] = None
            raw = data.get("outcomes")
            outcomes: dict[str, Any] = raw if isinstance(raw, dict) else {}
            outcomes.pop(rollout_id, None)
            outcomes[rollout_id] = outcome
            data["outcomes"] = dict(list(outcomes.items())[-KEEP_OUTCOMES:])
            data["last"] = dict(status)
            data["unreported"] = not reported
            self._write(data)

    def take_unreported(self) -> dict[str, Any] | None:
        """The last outcome if nobody has been told of it yet (a rollback at start-up)."""
        with self._lock:
            data = self._read()
            if not data.get("unreported") or not isinstance(data.get("last"), dict):
                return None
            data["unreported"] = False
            self._write(data)
            return dict(data["last"])


def recover(state_dir: Path, models_root: Path, packs_root: Path) -> dict[str, Any] | None:
    """At start-up, before any model is loaded: a switch that was never confirmed is undone.

    Returns the rollout's final status when it undid one (also kept in the journal, to be
    reported once the fleet link is up), else None."""
    journal = Journal(state_dir)
    active = journal.active()
    if active is None or active.get("phase") != SWITCHED:
        return None
    kind, target, version = active.get("kind"), active.get("id"), active.get("version")
    raw_before = active.get("before")
    before: dict[str, Any] = raw_before if isinstance(raw_before, dict) else {}
    store = ModelStore(packs_root if kind == "pack" else models_root)
    current, previous = before.get("current"), before.get("previous")
    if isinstance(target, str) and isinstance(current, str):
        # No lock: nothing else runs this early, and a leftover lock file of a killed process does
        # not hold a lock. state.json is replaced by rename, so this is one atomic step.
        if store.current(target) == version:
            store.set_state(target, current, previous if isinstance(previous, str) else None)
    message = (f"the device restarted before {kind} {target} version {version} was confirmed; back on version "
               f"{current}")
    status: dict[str, Any] = {**{k: active.get(k) for k in ("rollout_id", "kind", "id", "version")},
                              "from": current, "state": "rolled_back", "outcome": "rolled_back",
                              "error": {"code": "rollout.interrupted", "message": message},
                              "time": round(time.time(), 3)}
    journal.finish(str(active.get("rollout_id")), "rolled_back", status, reported=False)
    _LOGGER.warning("rollout %s: %s", active.get("rollout_id"), message)
    return status
