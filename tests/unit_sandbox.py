"""Run a command under the restrictions a systemd unit file asks for, without systemd as PID 1.

Usage (as root, with CAP_SYS_ADMIN): ``python unit_sandbox.py UNIT [--devices-cgroup DIR] -- CMD...``

It reads the unit's ``[Service]`` section and applies, in a private mount and IPC namespace,
the kernel mechanisms systemd 252 uses for each setting it understands, then execs CMD:

- ``ProtectSystem=strict``: every mount read-only (bind remount) except /dev and /proc;
  ``StateDirectory=``/``CacheDirectory=`` become fresh writable tmpfs at /var/lib/NAME and
  /var/cache/NAME (the rest of /var/lib and /var/cache is hidden: stricter than systemd).
  ``--bind-ro SRC:DST`` puts files (models) into them read-only, as an installed device has.
- ``ProtectHome=yes``: empty tmpfs over /home, /root and /run/user. When the interpreter
  lives under one of those (pyenv under /root on a build box), its prefix is bound back
  read-only, as ``BindReadOnlyPaths=`` would; the tmpfs is mode 0755 so it can be reached.
- ``PrivateTmp=yes``: fresh tmpfs on /tmp and /var/tmp. ``PrivateIPC=yes``: new IPC namespace.
- ``ProtectKernelTunables=yes``: /proc/sys and /sys read-only. ``ProtectControlGroups=yes``:
  /sys/fs/cgroup read-only (both already by the read-only pass).
- ``ProtectProc=invisible``, ``ProcSubset=pid``: a fresh procfs with ``hidepid=invisible``/``subset=pid``.
- ``DevicePolicy=closed`` + ``DeviceAllow=``: a cgroup-v1 devices cgroup that the caller
  created (``--devices-cgroup``) with systemd's pseudo-device list plus the unit's entries.
- ``User=`` (mapped to nobody, the unit's user does not exist here), ``SupplementaryGroups=``,
  ``CapabilityBoundingSet=`` (empty: all dropped), ``NoNewPrivileges=``, ``UMask=``.
- seccomp, each its own filter as systemd loads them, the allow-list last:
  ``RestrictAddressFamilies=``, ``MemoryDenyWriteExecute=``, ``RestrictNamespaces=``,
  ``LockPersonality=``, ``SystemCallFilter=`` (groups resolved by ``systemd-analyze
  syscall-filter``, ``@default`` added, ``~`` lines removed, ``SystemCallErrorNumber=`` as
  the action), ``SystemCallArchitectures=native`` (libseccomp kills foreign-ABI calls).

Not applied (listed in the report's ``not_emulated``): memory limits, ``OOMScoreAdjust``,
credentials, and ``ProtectClock``/``ProtectHostname``/``ProtectKernelModules``/
``ProtectKernelLogs``/``RestrictRealtime``/``RestrictSUIDSGID``/``RemoveIPC``/``PrivateMounts``
as such; most of what they forbid is already refused here by the empty capability set,
``~@privileged @resources`` and the devices cgroup (/dev/kmsg).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
NS_FLAGS = {"cgroup": 0x02000000, "ipc": 0x08000000, "mnt": 0x00020000, "net": 0x40000000,
            "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000}
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
AF = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
AF_MAX = 46

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 1, 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000

# systemd's DevicePolicy=closed always allows these (cgroup-v1 notation).
PSEUDO_DEVICES = ["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                  "c 5:0 rwm", "c 5:2 rwm", "c 136:* rw"]
DEVICE_CLASSES = {"char-alsa": 116, "char-pts": 136}
NOT_EMULATED = ("MemoryHigh", "MemoryMax", "MemorySwapMax", "OOMScoreAdjust", "LoadCredential",
                "ProtectClock", "ProtectHostname", "ProtectKernelModules", "ProtectKernelLogs",
                "RestrictRealtime", "RestrictSUIDSGID", "RemoveIPC", "PrivateMounts")


def SCMP_ACT_ERRNO(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def parse_service(unit: Path) -> dict[str, list[str]]:
    """``[Service]`` assignments in order; repeated keys accumulate, an empty one resets."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if value == "":
            out[key] = []
        else:
            out.setdefault(key, []).append(value)
    return out


def last(settings: dict[str, list[str]], key: str, default: str = "") -> str:
    values = settings.get(key) or [default]
    return values[-1]


def yes(settings: dict[str, list[str]], key: str) -> bool:
    return last(settings, key).lower() in ("yes", "true", "1", "on", "strict", "invisible")


# --- mounts --------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.personality.argtypes = [ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp))
    return points


def _preserved_flags(path: str) -> int:
    f = os.statvfs(path).f_flag
    flags = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                   (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            flags |= ms
    return flags


def make_read_only(path: str) -> None:
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _preserved_flags(path))


def bind(source: str, target: str, *, read_only: bool) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        make_read_only(target)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def apply_mounts(settings: dict[str, list[str]], binds: list[tuple[str, str]], report: dict) -> None:
    if _libc.unshare(CLONE_NEWNS | (CLONE_NEWIPC if yes(settings, "PrivateIPC") else 0)) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # What the command runs from (the Python installation, this checkout and its venv) is bound
    # back where PrivateTmp or ProtectHome hides it: a service is installed outside both, a
    # test checkout may live in /tmp or /root.
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY)
            for p in {os.path.realpath(sys.base_prefix), os.path.realpath(Path(__file__).parents[1])}}

    if last(settings, "ProtectSystem") == "strict":
        failed = []
        for mp in _mount_points():
            if _under(mp, ("/proc", "/dev")):
                continue
            try:
                make_read_only(mp)
            except OSError as err:
                failed.append(f"{mp}: {err}")
        report["read_only_failures"] = failed
    else:
        report["not_emulated"].append(f"ProtectSystem={last(settings, 'ProtectSystem')}")

    proc_opts = [o for o in (("hidepid=invisible" if last(settings, "ProtectProc") == "invisible" else ""),
                             ("subset=pid" if last(settings, "ProcSubset") == "pid" else "")) if o]
    if proc_opts:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(proc_opts))
    if yes(settings, "ProtectKernelTunables") and os.path.isdir("/proc/sys"):  # gone with subset=pid
        bind("/proc/sys", "/proc/sys", read_only=True)

    state = last(settings, "StateDirectory")
    cache = last(settings, "CacheDirectory")
    uid, gid = 65534, 65534
    for base, name in (("/var/lib", state), ("/var/cache", cache)):
        if name:
            mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
            os.makedirs(f"{base}/{name}", mode=0o700)
            os.chown(f"{base}/{name}", uid, gid)
    for source, target in binds:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            Path(target).touch()
        bind(source, target, read_only=True)

    if yes(settings, "PrivateTmp"):
        for tmp in ("/tmp", "/var/tmp"):
            mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
            _bind_back(tmp, keep, report)
    if yes(settings, "ProtectHome") or last(settings, "ProtectHome") == "tmpfs":
        for home in ("/home", "/root", "/run/user"):
            if not os.path.isdir(home):
                continue
            mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
            _bind_back(home, keep, report)
            make_read_only(home)
    for fd in keep.values():
        os.close(fd)


def _bind_back(hidden: str, keep: dict[str, int], report: dict) -> None:
    """Bind the kept directories under ``hidden`` (a fresh tmpfs) back, read-only."""
    for path, fd in keep.items():
        if _under(path, (hidden,)):
            os.makedirs(path, exist_ok=True)
            bind(f"/proc/self/fd/{fd}", path, read_only=True)
            report["bound_back"] = sorted({*report.get("bound_back", []), path})


# --- credentials ---------------------------------------------------------------------------

def drop_privileges(settings: dict[str, list[str]], last_cap: int, report: dict) -> None:
    import grp

    groups = []
    for name in " ".join(settings.get("SupplementaryGroups", [])).split():
        groups.append(grp.getgrnam(name).gr_gid)
    if settings.get("CapabilityBoundingSet") == []:
        for cap in range(last_cap + 1):
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups(groups)
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    if yes(settings, "NoNewPrivileges"):
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    umask = last(settings, "UMask")
    if umask:
        os.umask(int(umask, 8))
    report["user"] = {"uid": os.getuid(), "groups": os.getgroups()}


# --- seccomp -------------------------------------------------------------------------------

class Seccomp:
    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                    ctypes.c_uint, ctypes.POINTER(ArgCmp)]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    def nr(self, name: str) -> int:
        return self.lib.seccomp_syscall_resolve_name(name.encode())

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> int:
        """One filter: ``rules`` are (action, syscall, [(arg, op, a, b), ...]). Returns rules added."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        added = 0
        try:
            for action, name, cmps in rules:
                nr = self.nr(name)
                if nr < 0:
                    continue  # not a syscall on this architecture
                arr = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
                if rc < 0:
                    raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")
                added += 1
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)
        return added


def expand_group(name: str, cache: dict[str, set[str]] | None = None) -> set[str]:
    """Syscall names in ``@group`` (nested groups resolved), as systemd-analyze lists them."""
    cache = {} if cache is None else cache
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                             text=True, check=True).stdout
        members: set[str] = set()
        cache[name] = members
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                members |= expand_group(item, cache)
    return cache[name]


def allowed_syscalls(settings: dict[str, list[str]]) -> set[str] | None:
    lines = settings.get("SystemCallFilter") or []
    if not lines or lines[0].startswith("~"):
        return None  # deny-list mode is not used by this unit
    cache: dict[str, set[str]] = {}
    allowed = expand_group("@default", cache)
    for line in lines:
        remove = line.startswith("~")
        for item in line.lstrip("~").split():
            names = expand_group(item.split(":")[0], cache)
            allowed = allowed - names if remove else allowed | names
    return allowed


def apply_seccomp(settings: dict[str, list[str]], allowed: set[str] | None, report: dict) -> None:
    sc = Seccomp()
    applied = []
    families = " ".join(settings.get("RestrictAddressFamilies", [])).split()
    if families and not families[0].startswith("~"):
        allow = {AF[f] for f in families}
        top = max(allow)
        rules = [(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket", [(0, SCMP_CMP_GT, top, 0)])]
        rules += [(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket", [(0, SCMP_CMP_EQ, af, 0)])
                  for af in range(top) if af not in allow]
        sc.load(SCMP_ACT_ALLOW, rules)
        applied.append("RestrictAddressFamilies")
    if yes(settings, "MemoryDenyWriteExecute"):
        wx = PROT_WRITE | PROT_EXEC
        sc.load(SCMP_ACT_ALLOW, [
            (SCMP_ACT_ERRNO(errno.EPERM), "mmap", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (SCMP_ACT_ERRNO(errno.EPERM), "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (SCMP_ACT_ERRNO(errno.EPERM), "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (SCMP_ACT_ERRNO(errno.EPERM), "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ])
        applied.append("MemoryDenyWriteExecute")
    if yes(settings, "RestrictNamespaces"):
        rules = [(SCMP_ACT_ERRNO(errno.ENOSYS), "clone3", []),  # flags live in a struct: glibc falls back to clone
                 (SCMP_ACT_ERRNO(errno.EPERM), "setns", [(1, SCMP_CMP_EQ, 0, 0)])]
        for flag in NS_FLAGS.values():
            for call, arg in (("unshare", 0), ("clone", 0), ("setns", 1)):
                rules.append((SCMP_ACT_ERRNO(errno.EPERM), call, [(arg, SCMP_CMP_MASKED_EQ, flag, flag)]))
        sc.load(SCMP_ACT_ALLOW, rules)
        applied.append("RestrictNamespaces")
    if yes(settings, "LockPersonality"):
        current = _libc.personality(0xFFFFFFFF)
        sc.load(SCMP_ACT_ALLOW, [(SCMP_ACT_ERRNO(errno.EPERM), "personality", [(0, SCMP_CMP_NE, current, 0)])])
        applied.append("LockPersonality")
    if allowed is not None:
        err = last(settings, "SystemCallErrorNumber", "")
        default = SCMP_ACT_ERRNO(getattr(errno, err)) if err else 0x80000000  # KILL_PROCESS, systemd's default
        # The implicit ones systemd always allows so that exec and exit work.
        allowed |= {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
        n = sc.load(default, [(SCMP_ACT_ALLOW, name, []) for name in sorted(allowed)])
        applied.append(f"SystemCallFilter ({n} syscalls allowed)")
    report["seccomp"] = applied


def join_devices_cgroup(path: str, settings: dict[str, list[str]], report: dict) -> None:
    if last(settings, "DevicePolicy") != "closed":
        return
    cg = Path(path)
    (cg / "devices.deny").write_text("a")
    allow = list(PSEUDO_DEVICES)
    for entry in settings.get("DeviceAllow", []):
        name, _, mode = entry.partition(" ")
        allow.append(f"c {DEVICE_CLASSES[name]}:* {mode or 'rwm'}")
    for line in allow:
        (cg / "devices.allow").write_text(line)
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    report["devices"] = allow


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    opts, cmd = argv[:sep], argv[sep + 1:]
    unit = Path(opts[0])
    devices_cgroup = None
    binds: list[tuple[str, str]] = []
    env: dict[str, str] = {}
    i = 1
    while i < len(opts):
        if opts[i] == "--devices-cgroup":
            devices_cgroup = opts[i + 1]
        elif opts[i] == "--bind-ro":
            src, dst = opts[i + 1].split(":", 1)
            binds.append((src, dst))
        elif opts[i] == "--env":
            k, v = opts[i + 1].split("=", 1)
            env[k] = v
        i += 2
    settings = parse_service(unit)
    report: dict = {"not_emulated": [key for key in NOT_EMULATED if key in settings]}
    if devices_cgroup:
        join_devices_cgroup(devices_cgroup, settings, report)
    else:
        report["not_emulated"].append("DevicePolicy/DeviceAllow (no devices cgroup)")
    allowed = allowed_syscalls(settings)  # systemd-analyze runs before the sandbox would stop it
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())  # /proc may be subset=pid later
    apply_mounts(settings, binds, report)
    drop_privileges(settings, last_cap, report)
    apply_seccomp(settings, allowed, report)
    sys.stderr.write("SANDBOX " + json.dumps(report) + "\n")
    sys.stderr.flush()
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("HOME", "/")
    env.setdefault("LANG", "C.UTF-8")
    state, cache = last(settings, "StateDirectory"), last(settings, "CacheDirectory")
    if state:
        env.setdefault("STATE_DIRECTORY", f"/var/lib/{state}")
    if cache:
        env.setdefault("CACHE_DIRECTORY", f"/var/cache/{cache}")
    os.execve(cmd[0], cmd, env)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
