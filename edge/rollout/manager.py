"""The device's side of a rollout, on a thread of its own.

States, as the fleet sees them (``state`` in the ``rollout`` field of the retained status and in
``rollout.progress`` / ``rollout.done`` events)::

    queued → fetching (percent) → verifying → waiting (for a pause between turns) → switching
           → loading → self-test → confirming (between turns) → confirmed
                     ↘ rolled_back   (load failed, self-test failed, deadline passed, or the device
                                      restarted before confirming)
    anything before the switch may end in failed; a request the device will not run ends in refused.

Nothing before ``switching`` touches what the device runs: the version is installed beside the
current one. The switch is written to the journal first, then ``state.json`` is replaced; the
new version is loaded as fresh stages and self-tested while the old ones keep serving visitors,
so a failing version never answers anyone and switching back needs no reload. A version that
passes replaces the serving stages between turns and is confirmed; the version it replaced
stays installed as the previous one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from edge import paths
from edge.config import Config
from edge.errors import ConfigError, EdgeError
from edge.events import Event, EventType
from edge.models.store import ModelStore
from edge.rollout.errors import RolloutError, RolloutStopped
from edge.rollout.journal import Journal, Request
from edge.rollout.release import check_mirror_url, mirror_allowed
from edge.rollout.selftest import run_self_test
from edge.signals import Flag, wait_any

_LOGGER = logging.getLogger(__name__)

QUEUE_MAX = 4
REFUSALS_KEPT = 32
IDLE_RECHECK_S = 1.0  # the turn's end is signalled by events; this only bounds a missed one
FETCH_NICE = 10  # downloads and hashing yield the CPU to the audio pipeline
TERMINAL = ("confirmed", "rolled_back", "failed", "refused")
_WAKE_UPS = (EventType.STATE, EventType.TURN_START, EventType.TURN_END, EventType.WAKE)


class RolloutHost(Protocol):
    """What a rollout needs of the pipeline (:class:`edge.app.Pipeline`)."""

    def in_turn(self) -> bool:
        """A visitor's turn is in progress (or the device is still starting): do not disturb."""
        ...

    def load_candidate(self, roles: tuple[str, ...]) -> Any:
        """Fresh stages for ``roles`` (plus the voice and speech-to-text the self-test uses) from the
        store's current versions, and the venue built on them when a pack is configured. The
        result has ``synth``, ``recognizer``, ``chat``, ``wake``, ``embedder`` (None: not new),
        ``venue`` and ``close()``; it serves nobody yet."""
        ...

    def adopt(self, candidate: Any) -> None:
        """Put the candidate into service between turns; free what it replaces."""
        ...


class Reporter(Protocol):
    """Where progress goes (the MQTT bridge: events through its outbox, the retained status)."""

    def rollout_event(self, event_type: str, body: dict[str, Any]) -> None: ...

    def rollout_status(self, status: dict[str, Any] | None, versions: dict[str, Any]) -> None: ...


def _ms(t0: float) -> float:
    return round(1000 * (time.monotonic() - t0), 1)


def _lower_priority() -> None:
    """This thread only (Linux threads have their own nice value): downloads and hashing wait for
    the audio pipeline. Threads this one starts inherit it, so nothing that loads models runs here."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FETCH_NICE)


class RolloutManager:
    def __init__(self, cfg: Config, host: RolloutHost, reporter: Reporter, *, cache_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.settings = cfg.rollout
        for i, url in enumerate(self.settings.mirrors):
            try:
                check_mirror_url(url, f"rollout.mirrors[{i}]")
            except RolloutError as err:
                raise ConfigError(f"{cfg.source}: {err.message}") from None
        self.host = host
        self.reporter = reporter
        self.journal = Journal(cfg.state_dir)
        self.models = ModelStore(cfg.models_dir)
        self.packs = ModelStore(cfg.packs_dir)
        self.cache = (cache_dir or paths.cache_dir()) / "rollout"
        self._queue: queue.Queue[Request | None] = queue.Queue(QUEUE_MAX)
        self._lock = threading.Lock()
        self._waiting: dict[str, Request] = {}  # queued, by rollout id
        self._active: Request | None = None
        self._refusals: dict[str, RolloutError] = {}  # recent refusals, to answer a repeat with the reason
        self._status: dict[str, Any] | None = self.journal.last()
        self._stop = Flag()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        # Orders a rollout's reports (its status and its events race to the fleet), across restarts too.
        self._step = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        unreported = self.journal.take_unreported()
        if unreported is not None:  # the rollback done at start-up, before the fleet link was up
            self._status = unreported
            self.reporter.rollout_event("rollout.done", dict(unreported))
        self._publish()
        self._thread = threading.Thread(target=self._run, name="edge-rollout", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._idle:
            self._idle.notify_all()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def on_event(self, event: Event) -> None:
        """An event bus subscriber: a turn began or ended, a waiting rollout looks again."""
        if event.type in _WAKE_UPS:
            with self._idle:
                self._idle.notify_all()

    def status(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._status) if self._status else None

    # -- requests (the MQTT command thread) -------------------------------------------------------
    def request(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Accept a rollout (queued; the answer says so) or refuse it with a RolloutError."""
        req = Request.from_args(args)
        with self._lock:
            running = self._active is not None and self._active.rollout_id == req.rollout_id
            if running or req.rollout_id in self._waiting:
                state = (self._status or {}).get("state") if running else "queued"
                return {"rollout_id": req.rollout_id, "state": state, "accepted": True}
        outcome = self.journal.outcome(req.rollout_id)
        if outcome == "refused":
            earlier = self._refusals.get(req.rollout_id)
            if earlier is not None:  # the same rollout by the other way (command and desired state)
                raise RolloutError(earlier.message, code=earlier.code)
            raise RolloutError(f"rollout {req.rollout_id} was refused before (see its rollout.done event)",
                               code="rollout.refused")
        if outcome is not None:
            return {"rollout_id": req.rollout_id, "state": outcome, "accepted": True, "done": True}
        try:
            self._check(req)
        except RolloutError as err:
            with self._lock:
                self._refusals[req.rollout_id] = err
                while len(self._refusals) > REFUSALS_KEPT:
                    self._refusals.pop(next(iter(self._refusals)))
            self._finish(req, "refused", {"from": None}, error=err)
            raise
        with self._lock:
            if self._queue.full():
                raise RolloutError("too many rollouts waiting on this device; try again later", code="rollout.busy")
            self._waiting[req.rollout_id] = req
        self._progress(req, "queued", {"from": self._current(req)})
        self._queue.put_nowait(req)  # only this method puts, one caller at a time (the command thread)
        return {"rollout_id": req.rollout_id, "state": "queued", "accepted": True}

    def _check(self, req: Request) -> None:
        s = self.settings
        if req.expires_at <= time.time():
            raise RolloutError(f"rollout {req.rollout_id} expired at {req.expires_at:.0f}; not run",
                               code="rollout.expired")
        if not s.public_key or not s.mirrors:
            missing = "rollout.public_key" if not s.public_key else "rollout.mirrors"
            raise RolloutError(f"rollouts are disabled on this device: {missing} is not set in its config "
                               "(provision the fleet key with scripts/provision --fleet-key)", code="rollout.disabled")
        self._public_key()
        if not mirror_allowed(req.mirror, s.mirrors):
            raise RolloutError(f"mirror {req.mirror} is not on this device's allow-list (rollout.mirrors: "
                               f"{', '.join(s.mirrors)})", code="rollout.mirror_not_allowed")
        if req.kind == "model":
            self._model_kind(req.id)
            if not self._roles(req.id):
                used = ", ".join(sorted(set(self.cfg.model_ids().values())))
                raise RolloutError(f"this device does not use model {req.id!r} (it uses {used})",
                                   code="rollout.not_used")
        elif self.cfg.knowledge.pack != req.id:
            raise RolloutError(f"this device does not use knowledge pack {req.id!r} ([knowledge] pack is "
                               f"{self.cfg.knowledge.pack or 'not set'!r})", code="rollout.not_used")

    def _public_key(self) -> Any:
        from edge.rollout.release import load_public_key

        return load_public_key(Path(self.settings.public_key))

    def _model_kind(self, model_id: str) -> str:
        from edge.models.manifest import load_manifest

        try:
            return load_manifest().model(model_id).kind
        except EdgeError as err:
            raise RolloutError(err.message, code="rollout.unknown_model") from None

    def _roles(self, model_id: str) -> tuple[str, ...]:
        return tuple(role for role, mid in self.cfg.model_ids().items() if mid == model_id)

    # -- reporting ---------------------------------------------------------------------------
    def _store(self, req: Request) -> ModelStore:
        return self.packs if req.kind == "pack" else self.models

    def _current(self, req: Request) -> str | None:
        return self._store(req).current(req.id)

    def versions(self) -> dict[str, Any]:
        """The current version of every model (and the pack) this device uses."""
        models = {mid: self.models.current(mid) for mid in sorted(set(self.cfg.model_ids().values()))}
        pack = self.cfg.knowledge.pack
        packs = {pack: self.packs.current(pack)} if pack and "/" not in pack else {}
        return {"models": models, "packs": packs}

    def _publish(self) -> None:
        try:
            self.reporter.rollout_status(self.status(), self.versions())
        except Exception:  # reporting must never stop a rollout
            _LOGGER.exception("cannot report the rollout status")

    def _progress(self, req: Request, state: str, fields: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            base = self._status if self._status and self._status.get("rollout_id") == req.rollout_id else {}
            self._step = max(self._step + 1, time.time_ns() // 1000)
            status = {**base, **req.as_json(), **(fields or {}), "state": state, "time": round(time.time(), 3),
                      "step": self._step}
            status.pop("mirror", None)
            status.pop("expires_at", None)
            status.setdefault("outcome", None)
            shown = self._shown(req)
            if shown:
                self._status = status
        if state != "fetching" or status.get("percent") in (0, 100):
            _LOGGER.info("rollout %s (%s): %s", req.rollout_id, req.label, state)
        if shown:
            self._publish()
        self.reporter.rollout_event("rollout.progress", dict(status))

    def _shown(self, req: Request) -> bool:
        """The status shows the rollout in progress; others waiting or refused meanwhile are events only."""
        return self._active is None or self._active.rollout_id == req.rollout_id

    def _finish(self, req: Request, outcome: str, fields: Mapping[str, Any], error: EdgeError | None = None) -> None:
        extra: dict[str, Any] = dict(fields)
        extra["outcome"] = outcome
        extra["error"] = error.as_dict() if error is not None else None
        with self._lock:
            base = self._status if self._status and self._status.get("rollout_id") == req.rollout_id else {}
            self._step = max(self._step + 1, time.time_ns() // 1000)
            status = {**base, **req.as_json(), **extra, "state": outcome, "time": round(time.time(), 3),
                      "step": self._step}
            status.pop("mirror", None)
            status.pop("expires_at", None)
            shown = self._shown(req)
            if shown:
                self._status = status
        self.journal.finish(req.rollout_id, outcome, status)
        log = _LOGGER.info if outcome == "confirmed" else _LOGGER.warning
        log("rollout %s (%s): %s%s", req.rollout_id, req.label, outcome, f": {error.message}" if error else "")
        if shown:
            self._publish()
        self.reporter.rollout_event("rollout.done", dict(status))

    # -- the rollout thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            req = self._queue.get()
            if req is None or self._stop.is_set():
                return
            with self._lock:
                self._waiting.pop(req.rollout_id, None)
                self._active = req
            try:
                self._execute(req)
            except RolloutStopped:
                _LOGGER.info("rollout %s: stopped with the daemon before switching", req.rollout_id)
            except Exception:
                _LOGGER.exception("rollout %s failed unexpectedly", req.rollout_id)
                with contextlib.suppress(Exception):
                    self._finish(req, "failed", {}, EdgeError("internal error (see the device log)",
                                                              code="rollout.internal"))
            finally:
                with self._lock:
                    self._active = None

    def _wait_idle(self) -> None:
        with self._idle:
            while not self._stop.is_set() and self.host.in_turn():
                self._idle.wait(IDLE_RECHECK_S)

    def _execute(self, req: Request) -> None:
        timings: dict[str, float] = {}
        t_all = time.monotonic()
        store = self._store(req)
        before = store.state(req.id)
        current = before["current"]
        info: dict[str, Any] = {"from": current, "timings_ms": timings}
        if req.expires_at <= time.time():
            self._finish(req, "refused", info, RolloutError(f"rollout {req.rollout_id} expired while queued",
                                                            code="rollout.expired"))
            return
        try:
            self._progress(req, "fetching", {**info, "percent": 0})
            t0 = time.monotonic()
            self._fetch(req, info, timings)
            timings["fetch_ms"] = _ms(t0)
            if req.version == current:
                timings["total_ms"] = _ms(t_all)
                self._finish(req, "confirmed", {**info, "detail": "already the current version"})
                return
            self._progress(req, "verifying", info)
            t0 = time.monotonic()
            with store.lock():
                from edge.rollout.fetch import rehash

                problems = rehash(store, req.id, req.version)
            timings["verify_ms"] = _ms(t0)
            if problems:
                raise RolloutError(f"{req.label} failed verification after install: {', '.join(problems)}",
                                   code="rollout.verify")
        except RolloutStopped:
            raise
        except EdgeError as err:
            timings["total_ms"] = _ms(t_all)
            self._finish(req, "failed", info, err)
            return
        self._switch_and_test(req, before, info, timings, t_all)

    def _fetch(self, req: Request, info: dict[str, Any], timings: dict[str, float]) -> None:
        """The signed manifest, then the files, on a thread of lower priority (joined here)."""
        box: dict[str, Any] = {}

        def work() -> None:
            _lower_priority()
            try:
                self._download(req, info, timings)
            except BaseException as err:  # handed to the rollout thread
                box["error"] = err

        t = threading.Thread(target=work, name="edge-rollout-fetch", daemon=True)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]

    def _download(self, req: Request, info: dict[str, Any], timings: dict[str, float]) -> None:
        from edge.rollout.fetch import Gate, fetch_release, rehash, seed_from_installed, stage_model, stage_pack

        t0 = time.monotonic()
        release = fetch_release(req, self._public_key())
        timings["manifest_ms"] = _ms(t0)
        info["size"] = release.total_size
        store = self._store(req)
        if req.kind == "model":
            kind = self._model_kind(req.id)
            if req.version in store.versions(req.id):
                with store.lock():
                    intact = not rehash(store, req.id, req.version)
                if intact:
                    info["downloaded"], info["reused"] = 0, release.total_size
                    return
            cache = self.cache / "models"
            reused = seed_from_installed(store, release, cache)
        else:
            cache, reused = self.cache / "packs", 0

        def report(done: int, total: int) -> None:
            self._progress(req, "fetching", {**info, "percent": min(100, done * 100 // max(1, release.total_size))})

        gate = Gate(release.total_size, kbps=self.settings.bandwidth_kbps, busy=self.host.in_turn,
                    wait_idle=self._wait_idle, stopped=self._stop, report=report, done=reused)
        if req.kind == "model":
            stage_model(store, release, kind, req.mirror, cache, gate)
        else:
            stage_pack(self.cfg.packs_dir, release, req.mirror, cache, gate)
        info["downloaded"], info["reused"] = gate.downloaded, reused
        if gate.paused_s:
            timings["paused_ms"] = round(1000 * gate.paused_s, 1)
        self._progress(req, "fetching", {**info, "percent": 100})

    # -- switch, load, self-test, confirm -------------------------------------------------------
    def _switch_and_test(self, req: Request, before: dict[str, str | None], info: dict[str, Any],
                         timings: dict[str, float], t_all: float) -> None:
        store = self._store(req)
        t0 = time.monotonic()
        self._progress(req, "waiting", info)
        self._wait_idle()
        if self._stop.is_set():
            raise RolloutStopped("the daemon is stopping")
        timings["wait_ms"] = _ms(t0)
        t0 = time.monotonic()
        self._progress(req, "switching", info)
        try:
            with store.lock():
                if store.state(req.id) != before:
                    raise RolloutError(f"{req.kind} {req.id} changed on this device during the rollout; not switched",
                                       code="rollout.changed")
                self.journal.switching(req, before)  # on disk before state.json changes
                store.switch_to(req.id, req.version)
        except (EdgeError, OSError) as err:
            if isinstance(err, OSError):
                from edge.models.store import disk_error

                err = disk_error(err, store.root)
            self._switch_back(req, before, info, timings, t_all, err, outcome="failed")
            return
        switched_at = time.monotonic()
        timings["switch_ms"] = _ms(t0)

        box: dict[str, Any] = {}
        done = Flag()
        box_lock = threading.Lock()

        def work() -> None:
            cand = None
            try:
                t1 = time.monotonic()
                self._progress(req, "loading", info)
                cand = self.host.load_candidate(self._roles(req.id) if req.kind == "model" else ())
                timings["load_ms"] = _ms(t1)
                t1 = time.monotonic()
                self._progress(req, "self-test", info)
                venue = getattr(cand, "venue", None)
                system = venue.system_prompt(self.settings.selftest_text) if venue is not None else None
                box["result"] = run_self_test(cand, self.settings, system=system)
                timings["selftest_ms"] = _ms(t1)
            except BaseException as err:  # reported by the rollout thread
                box["error"] = err
            with box_lock:
                box["candidate"] = cand
                abandoned = box.get("abandoned", False)
            done.set()
            if abandoned and cand is not None:
                cand.close()

        threading.Thread(target=work, name="edge-rollout-load", daemon=True).start()
        deadline = switched_at + self.settings.confirm_deadline_s
        wait_any(done, self._stop, timeout=max(0.0, deadline - time.monotonic()))
        with box_lock:
            finished = done.is_set()
            if not finished:
                box["abandoned"] = True
        if not finished and self._stop.is_set():
            # Still switched in the journal: the next start puts the previous version back.
            raise RolloutStopped("the daemon stopped before the new version was confirmed")
        if not finished:
            self._switch_back(req, before, info, timings, t_all, RolloutError(
                f"{req.label} was not loaded and self-tested within rollout.confirm_deadline_s "
                f"({self.settings.confirm_deadline_s:g} s)", code="rollout.deadline"))
            return
        cand = box.get("candidate")
        result = box.get("result")
        if result is not None:
            info["selftest"] = result.as_json()
        error = box.get("error")
        if error is not None or result is None or not result.ok:
            if cand is not None:
                cand.close()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit
            if isinstance(error, EdgeError):
                why: EdgeError = RolloutError(f"{req.label} did not load: {error.message}", code="rollout.load")
            elif error is not None:
                why = RolloutError(f"{req.label} did not load: {type(error).__name__}: {str(error)[:200]}",
                                   code="rollout.load")
            else:
                why = RolloutError(f"{req.label} failed its self-test: {result.reason if result else '?'}",
                                   code="rollout.selftest")
            self._switch_back(req, before, info, timings, t_all, why)
            return
        t0 = time.monotonic()
        self._progress(req, "confirming", info)
        self._wait_idle()
        if self._stop.is_set():
            if cand is not None:
                cand.close()
            raise RolloutStopped("the daemon stopped before the new version was confirmed")
        try:
            self.host.adopt(cand)
        except Exception as err:
            # Not closed: a conversation that did not answer in time may still take these stages.
            self._switch_back(req, before, info, timings, t_all, RolloutError(
                f"{req.label} could not be put into service: {err}", code="rollout.adopt"))
            return
        timings["adopt_ms"] = _ms(t0)
        timings["total_ms"] = _ms(t_all)
        self._prune(req)
        self._finish(req, "confirmed", info)

    def _switch_back(self, req: Request, before: dict[str, str | None], info: dict[str, Any],
                     timings: dict[str, float], t_all: float, why: EdgeError, outcome: str = "rolled_back") -> None:
        t0 = time.monotonic()
        store = self._store(req)
        current, previous = before["current"], before["previous"]
        if current is not None:
            try:
                with store.lock():
                    store.set_state(req.id, current, previous)
            except EdgeError:  # the store is busy: state.json is replaced by one rename all the same
                store.set_state(req.id, current, previous)
        timings["rollback_ms"] = _ms(t0)
        timings["total_ms"] = _ms(t_all)
        self._finish(req, outcome, info, why)

    def _prune(self, req: Request) -> None:
        """Versions neither current nor previous go (a Pi's disk holds two of each, not ten)."""
        store = self._store(req)
        try:
            with store.lock():
                state = store.state(req.id)
                for version in store.versions(req.id):
                    if version not in (state["current"], state["previous"]):
                        store.remove_version(req.id, version)
        except (EdgeError, OSError) as err:
            _LOGGER.warning("rollout %s: could not remove old versions: %s", req.rollout_id, err)
