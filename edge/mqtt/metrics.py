"""Host metrics from /proc and /sys (no psutil): CPU, memory, temperature, load.

Every reader tolerates a missing or odd file (containers, other kernels) by leaving the
value out; metrics must never take the bridge down.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_PROC = Path("/proc")
_THERMAL = Path("/sys/class/thermal")


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` → bytes for MemTotal and MemAvailable."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def parse_status_rss(text: str) -> int | None:
    """``/proc/self/status`` → resident set size in bytes."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def parse_proc_stat_cpu(text: str) -> tuple[int, int] | None:
    """``/proc/stat`` → (busy, total) jiffies over all CPUs."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:] if v.isdigit()]
            if len(values) < 4:
                return None
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            # guest time is already counted in user/nice
            total = sum(values[:8])
            return total - idle, total
    return None


def parse_self_stat_cpu(text: str) -> int | None:
    """``/proc/self/stat`` → user + system jiffies of this process."""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = text.rpartition(")")[2].split()
    if len(rest) < 13:
        return None
    try:
        return int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)
    except ValueError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def read_temperatures(base: Path = _THERMAL) -> dict[str, float]:
    """Thermal zones as ``{type: degrees C}``; empty where none is readable."""
    out: dict[str, float] = {}
    try:
        zones = sorted(base.glob("thermal_zone*"))
    except OSError:
        return out
    for zone in zones:
        raw = _read(zone / "temp")
        if raw is None:
            continue
        try:
            milli = int(raw.strip())
        except ValueError:
            continue
        name = (_read(zone / "type") or zone.name).strip() or zone.name
        if name in out:
            name = f"{name}-{zone.name.removeprefix('thermal_zone')}"
        out[name] = round(milli / 1000.0, 1)
    return out


class HostMetrics:
    """Samples the host; CPU percentages are over the time since the previous sample."""

    def __init__(self, proc: Path = _PROC, thermal: Path = _THERMAL) -> None:
        self._proc = proc
        self._thermal = thermal
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._ncpu = os.cpu_count() or 1
        self._last: tuple[float, int | None, tuple[int, int] | None] | None = None

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        stat = _read(self._proc / "stat")
        system = parse_proc_stat_cpu(stat) if stat else None
        self_stat = _read(self._proc / "self" / "stat")
        proc_jiffies = parse_self_stat_cpu(self_stat) if self_stat else None
        cpu: dict[str, Any] = {"count": self._ncpu}
        if self._last is not None:
            then, last_proc, last_sys = self._last
            elapsed = now - then
            if proc_jiffies is not None and last_proc is not None and elapsed > 0:
                # Percent of one core, like top.
                cpu["process_pct"] = round(100.0 * (proc_jiffies - last_proc) / self._tick / elapsed, 1)
            if system and last_sys and system[1] > last_sys[1]:
                cpu["system_pct"] = round(100.0 * (system[0] - last_sys[0]) / (system[1] - last_sys[1]), 1)
        self._last = (now, proc_jiffies, system)
        out: dict[str, Any] = {"cpu": cpu}
        load = _read(self._proc / "loadavg")
        if load:
            try:
                out["load"] = [float(v) for v in load.split()[:3]]
            except ValueError:
                pass
        memory: dict[str, int] = {}
        meminfo = _read(self._proc / "meminfo")
        if meminfo:
            info = parse_meminfo(meminfo)
            if "MemTotal" in info:
                memory["total_bytes"] = info["MemTotal"]
            if "MemAvailable" in info:
                memory["available_bytes"] = info["MemAvailable"]
        status = _read(self._proc / "self" / "status")
        rss = parse_status_rss(status) if status else None
        if rss is not None:
            memory["process_rss_bytes"] = rss
        out["memory"] = memory
        temps = read_temperatures(self._thermal)
        if temps:
            out["temperature_c"] = temps
        return out
