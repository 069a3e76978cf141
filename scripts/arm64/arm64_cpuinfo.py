"""An arm64 /proc/cpuinfo for the emulated root.

qemu-user (7.2) passes the host's x86 /proc/cpuinfo through, and onnxruntime's CPU probe
crashes on it; the smoke test bind-mounts one of these over it instead. Each describes the
CPU model qemu emulates (QEMU_CPU), so no kernel is chosen for a feature the emulator lacks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cpu:
    implementer: int
    variant: int
    part: int
    revision: int
    bogomips: str
    features: str
    trailer: str = ""


CPUS = {
    # Raspberry Pi 5 (BCM2712), as its kernel reports it.
    "cortex-a76": Cpu(0x41, 0x4, 0xD0B, 1, "108.00",
                      "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
                      "dcpop asimddp",
                      "Revision\t: d04170\nSerial\t\t: 0000000000000000\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"),
    # qemu has no Cortex-A78AE (Jetson Orin); Neoverse-N1 is the nearest model it has.
    "neoverse-n1": Cpu(0x41, 0x3, 0xD0C, 1, "62.50",
                       "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
                       "dcpop asimddp ssbs"),
}


def cpuinfo(model: str, count: int) -> str:
    """The text of /proc/cpuinfo for ``count`` cores of ``model`` (a key of CPUS)."""
    cpu = CPUS[model]
    blocks = []
    for n in range(max(count, 1)):
        blocks.append(
            f"processor\t: {n}\n"
            f"BogoMIPS\t: {cpu.bogomips}\n"
            f"Features\t: {cpu.features}\n"
            f"CPU implementer\t: 0x{cpu.implementer:02x}\n"
            f"CPU architecture: 8\n"
            f"CPU variant\t: 0x{cpu.variant:x}\n"
            f"CPU part\t: 0x{cpu.part:03x}\n"
            f"CPU revision\t: {cpu.revision}\n")
    text = "\n".join(blocks) + "\n"
    return text + cpu.trailer
