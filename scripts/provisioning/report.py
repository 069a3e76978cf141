"""What the operator sees: one line per step of each host, and the summary with the exit status."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field
from pathlib import Path

from provisioning.constants import EXIT_FAILED, EXIT_OK
from provisioning.targets import Target

SHOWN = {"ok": "ok", "changed": "changed", "needed": "would change", "skipped": "skipped", "failed": "FAILED"}


class Console:
    def __init__(self, width: int) -> None:
        self.width = width
        self._lock = threading.Lock()

    def line(self, label: str, step: str, status: str, detail: str) -> None:
        if status == "needed" and detail.startswith("would "):
            detail = detail[len("would "):]  # the status column already says so
        with self._lock:
            print(f"{label:<{self.width}}  {step:<8} {SHOWN.get(status, status):<12} {detail}", flush=True)

    def say(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)


@dataclass
class StepResult:
    step: str
    status: str
    detail: str


@dataclass
class HostReport:
    target: Target
    log_path: Path
    steps: list[StepResult] = field(default_factory=list)
    failure: str | None = None
    failed_step: str | None = None
    attempted: bool = True

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.steps)


def summarize(reports: list[HostReport], opts: argparse.Namespace, console: Console) -> int:
    ok = [r for r in reports if r.failure is None]
    failed = [r for r in reports if r.failure is not None and r.attempted]
    skipped = [r for r in reports if not r.attempted]
    key = "needed" if opts.dry_run else "changed"
    changes = sum(r.count(key) for r in reports)
    word = "would change" if opts.dry_run else "changed"
    head = (f"summary: {len(reports)} host{'s' if len(reports) != 1 else ''}: {len(ok)} ok, {len(failed)} failed"
            + (f", {len(skipped)} not attempted" if skipped else "") + f"; {changes} steps {word}"
            + (" (dry run: nothing was changed)" if opts.dry_run else ""))
    console.say(head)
    w = max(len(r.target.label) for r in reports)
    for r in reports:
        if r.failure is None:
            console.say(f"  {r.target.label:<{w}}  ok      {r.count(key)} {word}, {r.count('ok')} ok, "
                        f"{r.count('skipped')} skipped  (log: {r.log_path})")
        elif r.attempted:
            console.say(f"  {r.target.label:<{w}}  FAILED  at {r.failed_step}: {r.failure}  (log: {r.log_path})")
        else:
            console.say(f"  {r.target.label:<{w}}  SKIPPED {r.failure}")
    return EXIT_OK if not failed and not skipped else EXIT_FAILED


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
