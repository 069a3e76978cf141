"""scripts/build-wheels and scripts/arm64-smoke: arguments, wheel packing and tagging, judging,
and whether the device extras resolve to aarch64 wheels for a Raspberry Pi 5 (Bookworm,
CPython 3.11) and a Jetson (JetPack 6, CPython 3.10) with the ranges in setup.cfg.

The smoke test itself (minutes, root, binfmt_misc) is run by `scripts/arm64-smoke`, not here.
"""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BUILD_WHEELS = SCRIPTS / "build-wheels"
SMOKE = SCRIPTS / "arm64-smoke"
sys.path.append(str(SCRIPTS / "arm64"))

import arm64_common as common  # noqa: E402
import arm64_wheel as wheelmod  # noqa: E402
from arm64_binfmt import parse_entry, registration_line  # noqa: E402
from arm64_cpuinfo import cpuinfo  # noqa: E402


def script(path: Path) -> ModuleType:
    """Load one of the extension-less scripts as a module (its main() does not run)."""
    name = path.name.replace("-", "_")
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def call(path: Path, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=env)


# --- command lines -----------------------------------------------------------------------

def test_build_wheels_help_describes_output_and_exit_codes():
    r = call(BUILD_WHEELS, "--help")
    assert r.returncode == 0
    for text in ("--arch", "--print-path", "dist/wheels/aarch64", "armv8.2-a+dotprod", "exit 3"):
        assert text in r.stdout.replace("\n", " ") or text in r.stdout


@pytest.mark.parametrize("args,expected", [
    ((), "--arch"),
    (("--arch", "x86_64"), "invalid choice"),
    (("--arch", "aarch64", "--jobs", "0"), "--jobs"),
    (("--arch", "aarch64", "--arm-arch", "armv8.2-a; rm -rf /"), "--arm-arch"),
    (("--arch", "aarch64", "--print-path", "--force"), "--print-path"),
])
def test_build_wheels_rejects_bad_arguments(args, expected):
    r = call(BUILD_WHEELS, *args)
    assert r.returncode == 2
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_print_path_without_a_wheel_exits_3_naming_the_build_command(tmp_path):
    r = call(BUILD_WHEELS, "--arch", "aarch64", "--print-path", "--out", tmp_path)
    assert r.returncode == 3
    assert r.stdout == ""
    assert str(tmp_path) in r.stderr and "scripts/build-wheels --arch aarch64" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def fake_llama_wheel(out: Path, key: str, version: str = "0.3.36") -> Path:
    """A wheel laid out as build-wheels lays it out, carrying ``key`` in its build record."""
    di = f"llama_cpp_python-{version}.dist-info"
    files = {"llama_cpp/__init__.py": b"", f"{di}/METADATA": b"Metadata-Version: 2.1\nName: llama_cpp_python\n"
             + f"Version: {version}\n".encode(),
             f"{di}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-manylinux_2_34_aarch64\n",
             f"{di}/edge_voice_build.json": json.dumps({"key": key}).encode()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"llama_cpp_python-{version}-py3-none-manylinux_2_34_aarch64.whl"
    wheelmod.write_wheel(path, files, di, executable=set())
    return path


def test_print_path_finds_the_wheel_only_for_the_same_version_and_flags(tmp_path):
    bw = script(BUILD_WHEELS)
    version = common.pinned_version("llama-cpp-python")
    key, _ = bw.build_key(version, "aarch64", bw.DEFAULT_ARM_ARCH)
    other, _ = bw.build_key(version, "aarch64", "armv8.2-a+dotprod+fp16")
    assert key != other
    assert key == bw.build_key(version, "aarch64", bw.DEFAULT_ARM_ARCH)[0]

    built = fake_llama_wheel(tmp_path, key, version)
    r = call(BUILD_WHEELS, "--arch", "aarch64", "--print-path", "--out", tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, str(built))
    # The same wheel was built with other flags: not a match.
    r = call(BUILD_WHEELS, "--arch", "aarch64", "--print-path", "--out", tmp_path,
             "--arm-arch", "armv8.2-a+dotprod+fp16")
    assert r.returncode == 3


def test_smoke_help_and_bad_arguments():
    r = call(SMOKE, "--help")
    assert r.returncode == 0
    for text in ("--jetson", "binfmt_misc", "77", "cortex-a76"):
        assert text in r.stdout
    r = call(SMOKE, "--timeout", "0")
    assert r.returncode == 2 and "--timeout" in r.stderr
    r = call(SMOKE, "--no-such-option")
    assert r.returncode == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="runs as root here")
def test_smoke_needs_root():
    r = call(SMOKE)
    assert r.returncode == 1 and "run as root" in r.stderr


# --- wheel tags and packing ----------------------------------------------------------------

READELF_D = """
Dynamic section at offset 0x10d8e0 contains 31 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [libggml.so]
 0x0000000000000001 (NEEDED)             Shared library: [libstdc++.so.6]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000000e (SONAME)             Library soname: [libllama.so]
 0x000000000000001d (RUNPATH)            Library runpath: [$ORIGIN]
"""
READELF_V = """
Version symbols section '.gnu.version' contains 2 entries:
 Addr: 0x0000000000011e2c  Offset: 0x011e2c  Link: 5 (.dynsym)
  000:   0 (*local*)       7 (GLIBCXX_3.4.29)
Version needs section '.gnu.version_r' contains 2 entries:
 Addr: 0x0000000000012a48  Offset: 0x012a48  Link: 6 (.dynstr)
  000000: Version: 1  File: libstdc++.so.6  Cnt: 2
  0x0010:   Name: CXXABI_1.3.13  Flags: none  Version: 8
  0x0020:   Name: GLIBCXX_3.4.29  Flags: none  Version: 7
  0x0030: Version: 1  File: libc.so.6  Cnt: 2
  0x0040:   Name: GLIBC_2.34  Flags: none  Version: 5
  0x0050:   Name: GLIBC_2.17  Flags: none  Version: 3
"""


def elf_file(tmp_path: Path, machine: int = wheelmod.EM_AARCH64) -> Path:
    path = tmp_path / "lib.so"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + machine.to_bytes(2, "little") + bytes(44))
    return path


def test_readelf_output_is_parsed(tmp_path):
    info = wheelmod.parse_readelf(elf_file(tmp_path), READELF_D, READELF_V)
    assert info.machine == wheelmod.EM_AARCH64
    assert (info.soname, info.runpath) == ("libllama.so", "$ORIGIN")
    assert info.needed == ["libggml.so", "libstdc++.so.6", "libc.so.6"]
    assert info.versions == {"CXXABI": {(1, 3, 13)}, "GLIBCXX": {(3, 4, 29)}, "GLIBC": {(2, 34), (2, 17)}}


def info_with(tmp_path: Path, needed: list[str], **versions: str) -> wheelmod.ElfInfo:
    info = wheelmod.ElfInfo(path=tmp_path / "x.so", machine=wheelmod.EM_AARCH64, needed=needed)
    info.versions = {ns: {wheelmod.parse_version(v)} for ns, v in versions.items()}
    return info


@pytest.mark.parametrize("versions,tag", [
    ({"GLIBC": "2.17"}, "manylinux_2_17_aarch64"),
    ({"GLIBC": "2.34", "GLIBCXX": "3.4.29", "CXXABI": "1.3.13", "GCC": "3.0"}, "manylinux_2_34_aarch64"),
    # gcc 12's libstdc++ symbols need the 2_35 policy even with an older glibc.
    ({"GLIBC": "2.34", "GLIBCXX": "3.4.30"}, "manylinux_2_35_aarch64"),
    ({"GLIBC": "2.28", "GLIBCXX": "3.4.25"}, "manylinux_2_31_aarch64"),
    ({"GLIBC": "2.40"}, "linux_aarch64"),
    ({"GLIBC": "2.17", "OPENSSL": "3.0.0"}, "linux_aarch64"),
])
def test_platform_tag_is_the_oldest_policy_that_admits_every_symbol(tmp_path, versions, tag):
    infos = [info_with(tmp_path, ["libc.so.6", "libstdc++.so.6"], **versions)]
    assert wheelmod.aarch64_platform_tag(infos, bundled=set()) == tag


def test_a_library_outside_the_wheel_and_the_policy_means_no_manylinux_tag(tmp_path):
    libs = [info_with(tmp_path, ["libllama.so", "libgomp.so.1", "libc.so.6"], GLIBC="2.17")]
    assert wheelmod.aarch64_platform_tag(libs, bundled={"libllama.so"}) == "linux_aarch64"
    libs = [info_with(tmp_path, ["libllama.so", "libc.so.6"], GLIBC="2.17")]
    assert wheelmod.aarch64_platform_tag(libs, bundled={"libllama.so"}) == "manylinux_2_17_aarch64"


def test_written_wheel_has_a_valid_record_and_installs_with_pip(tmp_path):
    di = "demo_pkg-1.0.dist-info"
    files = {"demo_pkg/__init__.py": b"ANSWER = 42\n", "demo_pkg/lib/libdemo.so": b"\x7fELF not really",
             f"{di}/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
             f"{di}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    whl = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    wheelmod.write_wheel(whl, files, di, executable={"demo_pkg/lib/libdemo.so"})
    with zipfile.ZipFile(whl) as zf:
        names = zf.namelist()
        assert names[-1] == f"{di}/RECORD"
        record = zf.read(f"{di}/RECORD").decode().splitlines()
        assert zf.getinfo("demo_pkg/lib/libdemo.so").external_attr >> 16 == 0o100755
    assert len(record) == len(files) + 1 and record[-1] == f"{di}/RECORD,,"
    again = tmp_path / "again" / whl.name
    again.parent.mkdir()
    wheelmod.write_wheel(again, files, di, executable={"demo_pkg/lib/libdemo.so"})
    assert again.read_bytes() == whl.read_bytes()  # reproducible

    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "--target", str(target), str(whl)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([sys.executable, "-c", "import demo_pkg; print(demo_pkg.ANSWER)"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert out.stdout.strip() == "42"
    assert os.access(target / "demo_pkg" / "lib" / "libdemo.so", os.X_OK)


# --- the emulated root's helpers -----------------------------------------------------------

def test_cpuinfo_describes_the_emulated_cpu_on_every_core():
    text = cpuinfo("cortex-a76", 3)
    assert text.count("processor\t:") == 3
    assert "CPU part\t: 0xd0b" in text and "asimddp" in text and "Raspberry Pi 5" in text
    assert "sve" not in text.split() and "sme" not in text
    assert "CPU part\t: 0xd0c" in cpuinfo("neoverse-n1", 1)


def test_binfmt_entry_is_parsed_and_the_registration_targets_aarch64():
    entry = parse_entry("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\n"
                        "offset 0\nmagic 7f454c460201010000000000000000000200b700\n")
    assert entry == {"enabled": "yes", "interpreter": "/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
                     "flags": "POF"}
    assert parse_entry("disabled\n")["enabled"] == "no"
    line = registration_line()
    fields = line.split(":")
    assert fields[1] == "qemu-aarch64" and fields[2] == "M"
    assert r"\xb7\x00" in fields[4]  # e_machine 183, aarch64
    assert "F" in fields[-1]  # the kernel opens the interpreter: a chroot needs no copy of it


def test_debian_mirror_is_read_from_apt_sources(tmp_path):
    smoke = script(SMOKE)
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    assert smoke.debian_mirror(apt) == "http://deb.debian.org/debian"  # nothing configured
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment: with a colon\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert smoke.debian_mirror(apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text("# deb http://old.example/debian bookworm main\n"
                                      "deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n")
    assert smoke.debian_mirror(apt) == "http://list.example/debian"


def test_jetson_constraints_replace_only_their_own_pins(tmp_path):
    smoke = script(SMOKE)
    merged = smoke.merged_constraints(True, tmp_path / "c.txt").read_text().splitlines()
    jetson = [ln for ln in smoke.JETSON_CONSTRAINTS.read_text().splitlines() if ln and not ln.startswith("#")]
    assert set(jetson) <= set(merged)
    names = [ln.split("==")[0].lower() for ln in merged]
    assert len(names) == len(set(names))  # one pin per package
    assert "sherpa-onnx==" + common.pinned_version("sherpa-onnx") in merged
    assert smoke.merged_constraints(False, tmp_path / "d.txt") == common.CONSTRAINTS


def results(transcript: str = "What is the capital of France?", score: float = 0.91, reply: str = "Hi there!",
            seconds: float = 1.5, rc: int = 0, repacked: bool = True) -> dict:
    return {"check": {"rc": rc, "output": "check passed"}, "transcript": transcript,
            "wake": [{"word": "hey_jarvis", "score": score, "audio_time": 2.0}], "chat_reply": reply,
            "tts": {"seconds": seconds, "peak": 12000, "sample_rate": 22050},
            "q4_0": {"rc": 0, "repacked": repacked, "log": ["load_tensors: CPU_REPACK model buffer size = 5 MiB"]}}


@pytest.mark.parametrize("emu,heard,problem", [
    (results(), "Hi there.", None),
    (results(transcript="be"), "Hi there.", "transcript"),
    (results(score=0.7), "Hi there.", "wake hit"),
    (results(reply="Hi"), "Hi there.", "chat reply"),
    (results(seconds=3.0), "Hi there.", "reply audio"),
    (results(), "static noise", "sounds like"),
    (results(rc=1), "Hi there.", "check failed"),
    (results(repacked=False), "Hi there.", "did not repack Q4_0"),
])
def test_emulated_results_must_match_the_native_ones(emu, heard, problem):
    smoke = script(SMOKE)
    bad = smoke.judge(results(), emu, heard, "Hi there!")
    if problem is None:
        assert bad == []
    else:
        assert len(bad) == 1 and problem in bad[0]


# --- dependency resolution for the devices -------------------------------------------------

SDIST_ONLY = {"llama-cpp-python", "pyaudio", "systemd-python"}  # built on or for the device


def device_requirements(python: str) -> list[str]:
    """install_requires + the device extra from setup.cfg, markers evaluated for an aarch64
    Linux with CPython ``python`` (pip would evaluate them for the Python running it)."""
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["device"].splitlines()
    env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
           "platform_machine": "aarch64", "platform_system": "Linux", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    out = []
    for line in lines:
        if not line.strip():
            continue
        req = Requirement(line.strip())
        if req.name.lower() in SDIST_ONLY or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        req.marker = None
        out.append(str(req))
    return out


def resolve(python: str, glibc_minor: int, constraints: Path, target: Path) -> dict[str, str]:
    tag = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--ignore-installed",
           "--disable-pip-version-check", "--target", str(target), *common.aarch64_wheel_target(python, glibc_minor),
           "-c", str(constraints), *device_requirements(python)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"no {tag} aarch64 wheels for the device extras:\n{r.stderr[-3000:]}"
    report = json.loads(r.stdout)
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}


def test_jetson_pins_resolve_to_cp310_aarch64_wheels_within_setup_cfg(tmp_path):
    """JetPack 6: Ubuntu 22.04 (glibc 2.35), CPython 3.10. pip fails if a pin is outside a
    setup.cfg range or has no cp310 aarch64 wheel."""
    smoke = script(SMOKE)
    got = resolve("3.10", 35, smoke.merged_constraints(True, tmp_path / "jetson.txt"), tmp_path / "t")
    for line in smoke.JETSON_CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert got[name.lower()] == version
    assert {"onnxruntime", "sherpa-onnx", "piper-phonemize", "numpy", "paho-mqtt", "tomli"} <= set(got)


def test_setup_cfg_ranges_alone_resolve_for_cp310_aarch64(tmp_path):
    empty = tmp_path / "none.txt"
    empty.write_text("")
    got = resolve("3.10", 35, empty, tmp_path / "t")
    assert {"onnxruntime", "sherpa-onnx", "numpy"} <= set(got)


def test_pinned_versions_resolve_for_bookworm_cp311_aarch64(tmp_path):
    got = resolve("3.11", 36, common.CONSTRAINTS, tmp_path / "t")
    assert got["onnxruntime"] == common.pinned_version("onnxruntime")
    assert got["numpy"] == common.pinned_version("numpy")
