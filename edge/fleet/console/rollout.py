"""Rollout progress from devices' ``rollout.*`` events, read generically.

The over-the-air rollouts publish per-device events named ``rollout.<something>``
(``rollout.progress``, ``rollout.done``) and keep the device's latest step in its retained
status (``rollout``). The console reads them generically: these fields when they are there, and
this module is the one place to adapt when the events change:

- ``rollout_id`` (or ``rollout``): which rollout; "rollout" when absent;
- ``state`` (or ``phase``): where the device is (``queued``, ``fetching``, ``verifying``,
  ``waiting``, ``switching``, ``loading``, ``self-test``, ...); the part of the event type after
  ``rollout.`` when absent;
- ``percent``: 0-100 within the device's work, optional;
- ``outcome``: null while the device works, then ``confirmed`` (counted as succeeded),
  ``rolled_back``, ``failed`` or ``refused`` (counted as failed); a state with one of those
  names (or ``done``, ``succeeded``) counts as that outcome too;
- ``kind``, ``id`` and ``version`` (or ``target``): what is being installed;
- ``error.message`` (or ``message``): a line for people; ``wave``: the wave number;
- ``time``: when the device took the step (an older step never replaces a newer one).

Each rollout keeps each device's latest step; its summary counts devices by state and outcome
and averages progress (a device that is done counts as 100 %). It knows the devices that have
reported, not the rollout's plan: the percentage is of those.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

EVENT_PREFIX = "rollout."
MAX_ROLLOUTS = 20
MAX_DEVICES_SHOWN = 20
SUCCEEDED, FAILED, ROLLED_BACK = "succeeded", "failed", "rolled_back"
_OUTCOME_WORDS = {"confirmed": SUCCEEDED, "done": SUCCEEDED, "success": SUCCEEDED, "succeeded": SUCCEEDED,
                  "completed": SUCCEEDED, "failed": FAILED, "failure": FAILED, "error": FAILED, "refused": FAILED,
                  "rolled_back": ROLLED_BACK, "rollback": ROLLED_BACK, "rolled-back": ROLLED_BACK}


def _word(value: Any, limit: int = 64) -> str | None:
    return value[:limit] if isinstance(value, str) and value.strip() else None


def _percent(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(min(100.0, max(0.0, value)))


@dataclass(frozen=True)
class Step:
    """One device's latest word on one rollout."""

    rollout_id: str
    device_id: str
    phase: str
    percent: float | None
    outcome: str | None
    target: str | None
    message: str | None
    wave: int | None
    time: float

    def as_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "phase": self.phase, "percent": self.percent, "outcome": self.outcome,
                "message": self.message, "wave": self.wave, "time": self.time}


def parse_step(device_id: str, kind: str, body: dict[str, Any], now: float) -> Step | None:
    """The step a ``rollout.*`` event reports; None for any other event."""
    if not kind.startswith(EVENT_PREFIX):
        return None
    rid = _word(body.get("rollout_id")) or _word(body.get("rollout")) or "rollout"
    phase = (_word(body.get("state"), 32) or _word(body.get("phase"), 32) or kind[len(EVENT_PREFIX):][:32]
             or "?")
    outcome = _word(body.get("outcome"), 32)
    if outcome is not None:
        outcome = _OUTCOME_WORDS.get(outcome.lower(), outcome)
    else:
        outcome = _OUTCOME_WORDS.get(phase.lower())
    error = body.get("error")
    message = (_word(error.get("message"), 300) if isinstance(error, dict) else None) or _word(body.get("message"),
                                                                                               300)
    target = " ".join(w for w in (_word(body.get("kind"), 16), _word(body.get("id")),
                                  _word(body.get("version")) or _word(body.get("target"))) if w)
    wave = body.get("wave")
    t = body.get("time")
    return Step(rollout_id=rid, device_id=device_id, phase=phase, percent=_percent(body.get("percent")),
                outcome=outcome, target=target or None, message=message,
                wave=wave if isinstance(wave, int) and not isinstance(wave, bool) else None,
                time=float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else now)


@dataclass
class Rollout:
    id: str
    target: str | None = None
    started: float = 0.0
    updated: float = 0.0
    devices: dict[str, Step] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        steps = list(self.devices.values())
        phases: dict[str, int] = {}
        for s in steps:
            if s.outcome is None:
                phases[s.phase] = phases.get(s.phase, 0) + 1
        counts = {o: sum(1 for s in steps if s.outcome == o) for o in (SUCCEEDED, FAILED, ROLLED_BACK)}
        done = sum(1 for s in steps if s.outcome is not None)
        progress = [100.0 if s.outcome is not None else (s.percent or 0.0) for s in steps]
        trouble = [s for s in steps if s.outcome in (FAILED, ROLLED_BACK)]
        trouble.sort(key=lambda s: -s.time)
        return {"id": self.id, "target": self.target, "started": self.started, "updated": self.updated,
                "devices": len(steps), "working": len(steps) - done, "running": done < len(steps),
                "succeeded": counts[SUCCEEDED], "failed": counts[FAILED], "rolled_back": counts[ROLLED_BACK],
                "percent": round(sum(progress) / len(progress), 1) if progress else 0.0, "phases": phases,
                "trouble": [s.as_json() for s in trouble[:MAX_DEVICES_SHOWN]]}


class Rollouts:
    """The rollouts seen, newest kept (at most ``MAX_ROLLOUTS``)."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, Rollout] = OrderedDict()

    def apply(self, step: Step) -> Rollout | None:
        """The rollout ``step`` updated; None when the device had told something newer already."""
        r = self._by_id.get(step.rollout_id)
        if r is not None:
            known = r.devices.get(step.device_id)
            if known is not None and (known.time > step.time or known == step):
                return None
        else:
            r = self._by_id[step.rollout_id] = Rollout(step.rollout_id, started=step.time)
            while len(self._by_id) > MAX_ROLLOUTS:
                self._by_id.popitem(last=False)
        r.devices[step.device_id] = step
        r.updated = max(r.updated, step.time)
        r.started = min(r.started, step.time)
        if step.target:
            r.target = step.target
        return r

    def of_device(self, device_id: str) -> dict[str, Any] | None:
        """The device's step in the most recently updated rollout it is part of."""
        best: Step | None = None
        for r in self._by_id.values():
            s = r.devices.get(device_id)
            if s is not None and (best is None or s.time >= best.time):
                best = s
        return dict(best.as_json(), rollout_id=best.rollout_id) if best is not None else None

    def summaries(self) -> list[dict[str, Any]]:
        return [r.summary() for r in sorted(self._by_id.values(), key=lambda r: -r.updated)]
