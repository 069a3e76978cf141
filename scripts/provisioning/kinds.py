"""What kind of device a host is, from the facts the device program reports; others are refused."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.errors import HostFailure


@dataclass(frozen=True)
class Kind:
    name: str
    label: str
    profile: str  # the manifest profile used unless --profile says otherwise
    arch: str
    cuda: bool
    cmake_args: str  # for compiling llama-cpp-python on the device itself


SUPPORTED = "Raspberry Pi OS Bookworm arm64, Ubuntu 22.04 arm64 with JetPack 6 (Jetson), Debian 12 x86_64"


def classify(facts: dict[str, Any]) -> Kind:
    """The kind of device from its facts, or HostFailure naming what is supported."""
    osr, arch = facts["os"], facts["arch"]
    os_id, version = osr.get("ID", "?"), osr.get("VERSION_ID", "?")
    pretty = osr.get("PRETTY_NAME") or f"{os_id} {version}"
    py = tuple(int(x) for x in facts["python"].split(".")[:2])
    if py < (3, 10):
        raise HostFailure(f"python3 on the device is {facts['python']}: edge-voice needs 3.10 or newer")
    if os_id in ("debian", "raspbian") and version == "12" and arch == "aarch64":
        pi = facts.get("model", "").startswith("Raspberry Pi")
        return Kind("bookworm-arm64", f"Raspberry Pi OS Bookworm arm64 ({facts['model']})" if pi
                    else "Debian 12 arm64 (not a Raspberry Pi: set up like one)", "pi5", arch, False,
                    "-DGGML_NATIVE=ON")
    if os_id == "ubuntu" and version == "22.04" and arch == "aarch64":
        tegra = facts.get("tegra", "")
        if re.search(r"\bR36\b", tegra):
            return Kind("jetpack6-arm64", f"Jetson, JetPack 6 ({tegra.split(',')[0].strip('# ')})", "jetson", arch,
                        True, "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87")
        raise HostFailure(f"unsupported target: {pretty} {arch} without JetPack 6 (/etc/nv_tegra_release "
                          f"{'says ' + tegra if tegra else 'is missing'}); supported: {SUPPORTED}")
    if os_id == "debian" and version == "12" and arch == "x86_64":
        return Kind("debian12-x86_64", "Debian 12 x86_64", "pi5", arch, False, "-DGGML_NATIVE=ON")
    raise HostFailure(f"unsupported target: {pretty} {arch}; supported: {SUPPORTED}")


def laptop_kind() -> tuple[str, str, str]:
    osr: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            osr[k] = v.strip().strip('"')
    except OSError:
        pass
    return osr.get("ID", "?"), osr.get("VERSION_ID", "?"), platform.machine()


def kind_os(kind: Kind) -> str:
    return "ubuntu" if kind.name.startswith("jetpack") else "debian"


def kind_os_version(kind: Kind) -> str:
    return "22.04" if kind.name.startswith("jetpack") else "12"
