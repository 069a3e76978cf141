"""The fleet: hosts in parallel (``--parallel``), in waves (``--serial``) that stop the rollout when
more than ``--max-fail-percent`` of a wave failed. Artifacts are built once and shared."""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import shutil
import tempfile
from pathlib import Path

from provisioning.report import Console, HostReport
from provisioning.steps import Provisioner
from provisioning.targets import Target
from provisioning.wheels import Artifacts


def run_fleet(targets: list[Target], opts: argparse.Namespace, console: Console) -> list[HostReport]:
    tmp = Path(tempfile.mkdtemp(prefix="edge-voice-provision-"))
    control = Path(tempfile.mkdtemp(prefix="evp-", dir="/tmp"))  # short: a socket path has ~100 bytes
    art = Artifacts(opts, tmp)
    reports: list[HostReport] = []
    waves = [targets[i:i + opts.serial] for i in range(0, len(targets), opts.serial)] if opts.serial else [targets]
    stopped: str | None = None
    try:
        for n, wave in enumerate(waves, 1):
            if stopped:
                for t in wave:
                    reports.append(HostReport(t, log_name(opts, t), failure=stopped, attempted=False))
                continue
            if len(waves) > 1:
                console.say(f"-- wave {n} of {len(waves)}: {', '.join(t.label for t in wave)}")

            def one(t: Target) -> HostReport:
                return Provisioner(t, opts, art, console, control, log_name(opts, t)).run()

            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(opts.parallel, len(wave)))) as pool:
                wave_reports = list(pool.map(one, wave))
            reports += wave_reports
            failed = sum(r.failure is not None for r in wave_reports)
            if failed and failed * 100 > opts.max_fail_percent * len(wave) and n < len(waves):
                stopped = (f"not attempted: the rollout stopped after wave {n} ({failed} of {len(wave)} failed, "
                           f"more than --max-fail-percent {opts.max_fail_percent})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)
    return reports


def log_name(opts: argparse.Namespace, t: Target) -> Path:
    return opts.log_dir / (re.sub(r"[^A-Za-z0-9@._-]", "_", t.label) + ".log")
