"""Staged fan-out: devices in waves, with an abort rule; what ``cmd --wave`` and rollouts share.

A wave is handed to a function that does the work on those devices and says which of them
failed. If more than ``max_fail_percent`` of a wave failed, the later waves are not started
(the rule ``scripts/provision --serial N --max-fail-percent P`` uses, and AWS IoT Jobs' abort
threshold). Without a wave size every device is one wave and nothing is held back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from edge.fleet.errors import FleetError

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class WaveRule:
    size: int | None = None  # devices per wave; None: all at once
    max_fail_percent: float = 0.0  # stop when a wave fails more than this (0: any failure stops)

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise FleetError("--wave must be at least 1", code="fleet.usage")
        if not 0.0 <= self.max_fail_percent <= 100.0:
            raise FleetError("--max-fail-percent must be from 0 to 100", code="fleet.usage")

    def plan(self, targets: Sequence[str]) -> list[list[str]]:
        items = list(targets)
        if not items:
            return []
        size = self.size or len(items)
        return [items[i:i + size] for i in range(0, len(items), size)]

    def too_many(self, failed: int, total: int) -> bool:
        return total > 0 and failed * 100.0 > self.max_fail_percent * total


@dataclass(frozen=True)
class WaveOutcome:
    index: int  # from 1
    devices: tuple[str, ...]
    failed: tuple[str, ...]

    @property
    def fail_percent(self) -> float:
        return 100.0 * len(self.failed) / len(self.devices) if self.devices else 0.0


@dataclass
class WavesReport:
    waves: list[WaveOutcome] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the later waves were held back

    @property
    def failed(self) -> list[str]:
        return [d for w in self.waves for d in w.failed]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_started


# run(wave number, devices) -> the devices of that wave that failed
RunWave = Callable[[int, list[str]], Iterable[str]]


def run_waves(targets: Sequence[str], rule: WaveRule, run: RunWave,
              on_wave: Callable[[WaveOutcome, int], None] | None = None) -> WavesReport:
    """Run ``run`` on each wave in turn; stop after a wave that breaks the rule."""
    waves = rule.plan(targets)
    report = WavesReport()
    for n, wave in enumerate(waves, 1):
        failed = set(run(n, list(wave)))
        outcome = WaveOutcome(n, tuple(wave), tuple(d for d in wave if d in failed))
        report.waves.append(outcome)
        if on_wave is not None:
            on_wave(outcome, len(waves))
        if n < len(waves) and rule.size is not None and rule.too_many(len(outcome.failed), len(wave)):
            report.not_started = [d for w in waves[n:] for d in w]
            report.stopped = (f"wave {n} of {len(waves)}: {len(outcome.failed)} of {len(wave)} device(s) failed "
                              f"({outcome.fail_percent:.0f}%, more than --max-fail-percent "
                              f"{rule.max_fail_percent:g}); {len(report.not_started)} device(s) not started")
            _LOGGER.info("stopped after %s", report.stopped)
            break
    return report
