"""Run this process as a slower CPU: a CFS quota on a cgroup of its own (cgroup v1 or v2, as root).

``limit_cpu(fraction)`` moves the whole process, and every process it starts afterwards, into a
new cgroup allowed ``fraction`` of the machine's cores per 10 ms period; ``release()`` moves it
back and removes the group. A 2-core machine at 0.3 then computes like 0.6 of one of its cores:
llama.cpp's generation, Whisper's decodes and the voice all slow down together, as they would on a
Pi-class CPU (the quota throttles, it does not change the cache or the instruction set, so ratios
between stages are only roughly those of a real Pi: the benchmark reports the speed it got).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError

# A short period: a throttled llama.cpp thread stalls its partners, which wait busily at every
# layer, for up to the rest of the period; a slow CPU never stalls that long.
PERIOD_US = 10_000
_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


class CpuLimitError(EdgeError):
    code = "bench.cpu_limit"


@dataclass
class CpuLimit:
    fraction: float  # of the machine's cores
    group: Path
    procs_home: Path  # where the process was (to move it back)

    @property
    def cores(self) -> float:
        return self.fraction * (os.cpu_count() or 1)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            (self.procs_home / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):
            self.group.rmdir()


def limit_cpu(fraction: float) -> CpuLimit:
    """Allow this process ``fraction`` (0 < f <= 1) of the machine's cores from now on."""
    if not 0.0 < fraction <= 1.0:
        raise CpuLimitError(f"--cpu-quota {fraction}: give a fraction of the machine's cores, above 0 and at most 1")
    quota = max(1000, int(fraction * (os.cpu_count() or 1) * PERIOD_US))
    name = f"edge-voice-bench-{os.getpid()}"
    try:
        if (_V1 / "cpu.cfs_quota_us").exists():
            group = _V1 / name
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
            home = _V1
        elif (_V2 / "cgroup.controllers").exists():
            home = _V2 / Path(_own_v2_group()).relative_to("/")
            group = home.parent / name if home != _V2 else _V2 / name
            group.mkdir(exist_ok=True)
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            raise CpuLimitError("no cgroup cpu controller here (cgroup v1 cpu or v2 cpu.max): cannot run as a "
                                "slower CPU; run without --cpu-quota/--slow")
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except PermissionError:
        raise CpuLimitError("--cpu-quota/--slow need root (they make a cgroup with a CPU quota)") from None
    except OSError as err:
        raise CpuLimitError(f"cannot make a cgroup with a CPU quota: {err.strerror or err}") from None
    return CpuLimit(fraction, group, home)


def _own_v2_group() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return "/"
