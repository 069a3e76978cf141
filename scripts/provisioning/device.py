"""The device side of scripts/provision: one action per run, sent over ssh stdin.

``scripts/provision`` (provisioning.remote) runs ``ssh HOST [sudo -n] /usr/bin/python3 -`` and
writes this file to its stdin with the ``REQUEST`` line filled in: the action, its arguments and
``apply``. Secrets therefore travel on stdin, never in a command line that `ps` shows.

Every action checks first and changes only what differs ("check, then change if needed"); with
``apply`` false it changes nothing and says what it would do. It prints its progress on stderr
(the host's log) and its result as the last stdout line: ``@@provision-result@@ {json}`` with
``status`` ok | changed | needed | skipped | failed and a one-line ``detail``.

Only the standard library of the device's own Python (3.10 on JetPack 6, 3.11 on Bookworm).
What needs edge-voice's own code (the state of the models, installing a knowledge pack, waiting
for the daemon's MQTT status) runs the installed edge-voice's commands (``python -m edge ...``
from the venv, which works in an alternate root too) and reads their JSON or their output.
``root`` is the alternate root ("/" normally): every path below is taken inside it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

MARK = "@@provision-result@@"
SERVICE = "edge-voice"
# scripts/provision replaces the value on this line with the request before sending the file.
REQUEST: dict[str, Any] = {}  # @request@


class Fail(Exception):
    """The action failed; the message is the one line the operator sees."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def inside(root: str, path: str) -> str:
    return path if root in ("", "/") else root.rstrip("/") + path


def done(status: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"status": status, "detail": detail, **extra}


def sh(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
       check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run a command; its output goes to the log. On failure, Fail with its last stderr line."""
    log("$ " + " ".join(cmd))
    full_env = dict(os.environ, **env) if env else None
    try:
        proc = subprocess.run(cmd, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except FileNotFoundError:
        raise Fail(f"{cmd[0]} is not installed on the device") from None
    except subprocess.TimeoutExpired:
        raise Fail(f"`{' '.join(cmd[:3])} ...` did not finish within {timeout:.0f} s") from None
    if not quiet:
        for stream in (proc.stdout, proc.stderr):
            if stream.strip():
                log(stream.rstrip())
    if check and proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise Fail(f"`{' '.join(cmd[:4])}` failed (exit {proc.returncode}): "
                   + (lines[-1].strip() if lines else "no output"))
    return proc


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def os_release(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (read_text(path) or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip().strip('"').strip("'")
    return out


# --- facts -------------------------------------------------------------------------------

def act_facts(req: dict[str, Any]) -> dict[str, Any]:
    root = req.get("root") or "/"
    root_os = os_release(inside(root, "/etc/os-release")) if root != "/" else {}
    model = (read_text("/proc/device-tree/model") or "").replace("\x00", "").strip()
    tegra = (read_text("/etc/nv_tegra_release") or "").splitlines()
    hostname = (read_text(inside(root, "/etc/hostname")) or "").strip() if root != "/" else socket.gethostname()
    return done("ok", "facts", facts={
        "os": os_release("/etc/os-release"), "root_os": root_os, "arch": platform.machine(),
        "python": platform.python_version(), "python_path": sys.executable, "uid": os.getuid(),
        "model": model, "tegra": tegra[0] if tegra else "", "hostname": hostname,
        "systemd": os.path.isdir("/run/systemd/system"),
        "venv_module": importlib.util.find_spec("ensurepip") is not None,
        "rsync": shutil.which("rsync") is not None, "root_exists": os.path.isdir(root),
        "nvcc": os.path.exists("/usr/local/cuda/bin/nvcc"),
    })


# --- apt packages ------------------------------------------------------------------------

def dpkg_installed(names: list[str]) -> set[str]:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *names],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return {ln.split()[0] for ln in proc.stdout.splitlines() if ln.endswith(" installed")}


def act_packages(req: dict[str, Any]) -> dict[str, Any]:
    root, names = req["root"], list(req["packages"])
    missing = [n for n in names if n not in dpkg_installed(names)]
    if not missing:
        return done("ok", f"{len(names)} apt packages installed")
    if root != "/":
        # apt cannot install into an alternate root; say so instead of pretending.
        return done("skipped", f"not installed on this machine: {' '.join(missing)} (apt cannot install into "
                               f"--root {root}: the image needs them)")
    if not req["apply"]:
        return done("needed", f"would apt-get install {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    sh(["apt-get", "update", "-q"], env=env, timeout=900)
    sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, timeout=3600)
    still = [n for n in names if n not in dpkg_installed(names)]
    if still:
        raise Fail(f"apt-get did not install {' '.join(still)}")
    return done("changed", f"installed {' '.join(missing)}")


# --- files -------------------------------------------------------------------------------

def id_of(root: str, table: str, name: str) -> int | None:
    """uid/gid of ``name`` in the root's own passwd/group file (not the machine's NSS)."""
    if name == "root":
        return 0
    for line in (read_text(inside(root, f"/etc/{table}")) or "").splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == name:
            return int(fields[2])
    return None


def ensure_dir(root: str, path: str, mode: int, apply: bool) -> list[str]:
    full = inside(root, path)
    if not os.path.isdir(full):
        if apply:
            os.makedirs(full, mode=0o755, exist_ok=True)
            os.chmod(full, mode)
        return [f"create {path}/ ({mode:04o})"]
    cur = os.stat(full).st_mode & 0o7777
    if cur != mode:
        if apply:
            os.chmod(full, mode)
        return [f"{path}/ mode {cur:04o} -> {mode:04o}"]
    return []


def validate_config(venv: str, path: str) -> None:
    """Load the config with the edge-voice that will read it: a bad file is never installed."""
    code = "import sys\nfrom edge.config import load_config\nload_config(sys.argv[1])\n"
    proc = subprocess.run([venv + "/bin/python", "-c", code, path], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise Fail("the config is not valid for edge-voice: " + (lines[-1] if lines else f"exit {proc.returncode}"))


def ensure_file(req: dict[str, Any]) -> list[str]:
    """Make one file exactly: content, mode, owner, group. Written to a temp file, checked,
    fsynced and renamed over the old one, so a reader never sees half a file."""
    root, path, apply = req["root"], req["path"], req["apply"]
    content = base64.b64decode(req["content"])
    mode, owner, group = int(req["mode"], 8), req.get("owner", "root"), req.get("group", "root")
    changes = ensure_dir(root, os.path.dirname(path), int(req.get("dir_mode", "0755"), 8), apply)
    full = inside(root, path)
    uid, gid = id_of(root, "passwd", owner), id_of(root, "group", group)
    try:
        st = os.lstat(full)
        with open(full, "rb") as f:
            same = f.read() == content
    except FileNotFoundError:
        st, same = None, False
    if st is None:
        changes.append(f"create {path}")
    else:
        if not same:
            changes.append(f"update {path}")
        if (st.st_mode & 0o7777) != mode:
            changes.append(f"{path} mode {st.st_mode & 0o7777:04o} -> {mode:04o}")
        if uid is None or gid is None or (st.st_uid, st.st_gid) != (uid, gid):
            changes.append(f"{path} owner -> {owner}:{group}")
    if not changes or not apply:
        return changes
    if uid is None or gid is None:
        raise Fail(f"{owner}:{group} does not exist in {inside(root, '/etc/passwd')}; the user step creates it")
    directory = os.path.dirname(full)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(full)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            os.fchown(f.fileno(), uid, gid)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if req.get("validate") == "config":
            validate_config(inside(root, req["venv"]), tmp)
        os.replace(tmp, full)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return changes


def act_file(req: dict[str, Any]) -> dict[str, Any]:
    changes = ensure_file(req)
    if not changes:
        return done("ok", f"{req['path']} is as wanted ({req['mode']} {req.get('owner', 'root')}:"
                          f"{req.get('group', 'root')})")
    return done("changed" if req["apply"] else "needed", ("" if req["apply"] else "would ") + "; ".join(changes))


def act_absent(req: dict[str, Any]) -> dict[str, Any]:
    full = inside(req["root"], req["path"])
    if not os.path.lexists(full):
        return done("ok", f"no {req['path']}")
    if req["apply"]:
        os.unlink(full)
        return done("changed", f"removed {req['path']}")
    return done("needed", f"would remove {req['path']}")


# --- service user --------------------------------------------------------------------------

def user_state(root: str, user: str, group: str) -> list[str]:
    missing = []
    if id_of(root, "passwd", user) is None:
        missing.append(f"user {user}")
    members: list[str] = []
    for line in (read_text(inside(root, "/etc/group")) or "").splitlines():
        fields = line.split(":")
        if len(fields) == 4 and fields[0] == group:
            members = fields[3].split(",")
    if user not in members:
        missing.append(f"{user} in group {group}")
    return missing


def act_user(req: dict[str, Any]) -> dict[str, Any]:
    root, apply = req["root"], req["apply"]
    changes = ensure_file(dict(req, path="/usr/lib/sysusers.d/edge-voice.conf", mode="0644"))
    missing = user_state(root, SERVICE, "audio")
    if missing:
        changes.append("create " + ", ".join(missing) + " (systemd-sysusers)")
    if not changes:
        return done("ok", f"system user {SERVICE} exists, in group audio")
    if not apply:
        return done("needed", "would " + "; ".join(changes))
    if missing:
        ensure_dir(root, "/etc", 0o755, True)  # an empty alternate root: sysusers writes its passwd there
        # A config file name (not a path) is looked up in the root's own sysusers.d directories.
        sh(["systemd-sysusers", *(["--root", root] if root != "/" else []), "edge-voice.conf"], timeout=120)
        left = user_state(root, SERVICE, "audio")
        if left:
            raise Fail(f"systemd-sysusers did not create {', '.join(left)}")
    return done("changed", "; ".join(changes))


# --- llama-cpp-python built on the device ---------------------------------------------------

def act_llama_build(req: dict[str, Any]) -> dict[str, Any]:
    built, version = inside(req["root"], req["built_dir"]), req["version"]
    have = sorted(n for n in os.listdir(built) if n.startswith(f"llama_cpp_python-{version}-")) \
        if os.path.isdir(built) else []
    if have:
        return done("ok", f"built earlier on this device: {have[-1]}")
    cmake_args = req["cmake_args"]
    if not req["apply"]:
        return done("needed", f"would compile llama-cpp-python {version} here (CMAKE_ARGS={cmake_args}; "
                              "10-40 minutes)")
    if req.get("cuda") and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        raise Fail("the CUDA compiler /usr/local/cuda/bin/nvcc is missing: install JetPack's CUDA toolkit "
                   "(apt-get install nvidia-jetpack) or pass --wheels with a CUDA build of llama-cpp-python")
    os.makedirs(built, exist_ok=True)
    python = "/usr/bin/python3"
    work = tempfile.mkdtemp(prefix="edge-voice-llama-")
    try:
        sh([python, "-m", "venv", work + "/venv"], timeout=300)
        env = {"CMAKE_ARGS": cmake_args, "PATH": "/usr/local/cuda/bin:" + os.environ.get("PATH", "/usr/bin:/bin")}
        if req.get("cuda"):
            env["CUDACXX"] = "/usr/local/cuda/bin/nvcc"
        log(f"compiling llama-cpp-python {version} with CMAKE_ARGS={cmake_args}")
        sh([work + "/venv/bin/python", "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
            "-w", built, f"llama-cpp-python=={version}"], env=env, timeout=float(req.get("timeout_s", 7200)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    have = sorted(n for n in os.listdir(built) if n.startswith(f"llama_cpp_python-{version}-"))
    if not have:
        raise Fail(f"pip wheel produced no llama-cpp-python {version} wheel in {built}")
    return done("changed", f"compiled {have[-1]}")


# --- the virtual environment ----------------------------------------------------------------

RECORD = "edge-voice-provision.json"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def relocate(venv_full: str, venv: str) -> int:
    """Scripts and activate files name the venv where pip put it (ROOT/opt/...); in the image it
    lives at /opt/...: rewrite the prefix so the root boots with working entry points."""
    if venv_full == venv:
        return 0
    old, new, n = venv_full.encode(), venv.encode(), 0
    candidates = [os.path.join(venv_full, "bin", name) for name in os.listdir(os.path.join(venv_full, "bin"))]
    for path in candidates + [os.path.join(venv_full, "pyvenv.cfg")]:
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if old in data and b"\0" not in data[:4096]:
            st = os.stat(path)
            tmp = path + ".relocate.tmp"
            with open(tmp, "wb") as f:
                f.write(data.replace(old, new))
            os.chmod(tmp, st.st_mode & 0o7777)
            os.replace(tmp, path)
            n += 1
    return n


def act_venv(req: dict[str, Any]) -> dict[str, Any]:
    root, apply, venv = req["root"], req["apply"], req["venv"]
    full = inside(root, venv)
    wheels, built = inside(root, req["wheel_dir"]), inside(root, req["built_dir"])
    python = "/usr/bin/python3"
    edge_whl = os.path.join(wheels, req["edge_wheel"])
    llama = req.get("llama_wheel")
    llama_path = os.path.join(wheels, llama) if llama else None
    if llama_path is None and os.path.isdir(built):
        names = sorted(n for n in os.listdir(built) if n.startswith(f"llama_cpp_python-{req['llama_version']}-"))
        llama_path = os.path.join(built, names[-1]) if names else None
    want = {
        "python": platform.python_version(),
        "edge_wheel": req["edge_wheel"], "extras": req["extras"], "edge_sha256": req["edge_sha256"],
        "llama_wheel": os.path.basename(llama_path) if llama_path else None,
        "llama_sha256": req["llama_sha256"] if llama else (
            sha256_file(llama_path) if llama_path and os.path.exists(llama_path) else None),
        "constraints_sha256": req["constraints_sha256"],
    }
    have: dict[str, Any] = {}
    try:
        with open(os.path.join(full, RECORD), encoding="utf-8") as f:
            have = json.load(f)
    except (OSError, ValueError):
        pass
    healthy = os.path.exists(os.path.join(full, "bin", "python"))
    if healthy and have == want:
        return done("ok", f"{venv}: edge-voice from {req['edge_wheel']} with [{req['extras']}], "
                          f"llama-cpp-python from {want['llama_wheel']}")
    fresh = not healthy or have.get("python") != want["python"]
    what = ("create the venv" if not os.path.isdir(full) else "recreate the venv (Python changed)") if fresh \
        else "update " + ", ".join(k for k in want if have.get(k) != want[k])
    if not apply:
        return done("needed", f"would {what} in {venv} and install edge-voice[{req['extras']}] "
                              f"({req['edge_wheel']})")
    if fresh and os.path.isdir(full):
        shutil.rmtree(full)
    if fresh:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        sh([python, "-m", "venv", full], timeout=600)
    pip = [full + "/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--prefer-binary", "--find-links", wheels, "-c", os.path.join(wheels, "constraints.txt")]
    if os.path.isdir(built):
        pip += ["--find-links", built]
    if req.get("no_index"):
        pip.append("--no-index")
    env = {"PIP_ROOT_USER_ACTION": "ignore"}
    if llama_path:
        sh(pip + ["--no-deps", "--force-reinstall", llama_path], env=env, timeout=1800)
    sh(pip + [f"{edge_whl}[{req['extras']}]"], env=env, timeout=3600)
    # Same version number, new build (a changed checkout): pip would call it satisfied.
    sh(pip + ["--no-deps", "--force-reinstall", edge_whl], env=env, timeout=600)
    moved = relocate(full, venv)
    if moved:
        log(f"rewrote {moved} scripts from {full} to {venv} (the venv's place in the image)")
    tmp = os.path.join(full, RECORD + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(want, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(full, RECORD))
    return done("changed", f"{'created' if fresh else 'updated'} {venv}: edge-voice[{req['extras']}] from "
                           f"{req['edge_wheel']}, llama-cpp-python from {want['llama_wheel']}")


# --- models fetched on the device -----------------------------------------------------------

def venv_env(root: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
           "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    if root != "/":
        env["EDGE_VOICE_STATE_DIR"] = inside(root, "/var/lib/edge-voice")
        env["EDGE_VOICE_CACHE_DIR"] = inside(root, "/var/cache/edge-voice")
        env["EDGE_VOICE_DEVICE__MODELS_DIR"] = inside(root, "/var/lib/edge-voice/models")
    return env


def act_models_fetch(req: dict[str, Any]) -> dict[str, Any]:
    root, venv = req["root"], inside(req["root"], req["venv"])
    models = inside(root, "/var/lib/edge-voice/models")
    python = venv + "/bin/python"
    if not os.path.exists(python):
        if req["apply"]:
            raise Fail(f"{req['venv']} is missing: the venv step must run first")
        return done("needed", f"would run `edge-voice models fetch --profile {req['profile']}` "
                              "(edge-voice is not installed yet, so the models cannot be checked)")
    listed = sh([python, "-m", "edge", "models", "list", "--profile", req["profile"], "--root", models, "--json"],
                env=venv_env(root), timeout=600, quiet=True)
    try:
        models_state = json.loads(listed.stdout)
    except ValueError:
        raise Fail("`edge-voice models list --json` printed no JSON: "
                   + (listed.stdout.strip()[-200:] or "nothing")) from None
    state = {k: v["state"] for k, v in models_state.items() if not v.get("optional")}
    log("models: " + ", ".join(f"{k} {v}" for k, v in sorted(state.items())))
    todo = {k: v for k, v in state.items() if v != "ok"}
    if not todo:
        return done("ok", f"{len(state)} models of profile {req['profile']} installed and current")
    names = ", ".join(f"{k} ({v})" for k, v in todo.items())
    if not req["apply"]:
        return done("needed", f"would fetch {names}" + (f" (mirror {req['mirror']})" if req.get("mirror") else ""))
    cmd = [python, "-m", "edge", "models", "fetch", "--profile", req["profile"], "--root", models]
    if req.get("mirror"):
        cmd += ["--mirror", inside(root, req["mirror"]) if req.get("mirror_pushed") else req["mirror"]]
    sh(cmd, env=venv_env(root), timeout=float(req.get("timeout_s", 7200)))
    return done("changed", f"fetched {names}")


# --- owner of the trees the daemon writes -----------------------------------------------------

def act_owner(req: dict[str, Any]) -> dict[str, Any]:
    """Make every file, folder and link under ``path`` owned by ``owner:group`` (the service's):
    rollouts make the daemon write new versions there, while rsync and fetches run as root.
    systemd's StateDirectory= fixes owners only when the top folder's is wrong, so files added
    by a later run would stay root's. Only the owner changes: modes and times are kept."""
    root, path, apply = req["root"], req["path"], req["apply"]
    owner, group = req["owner"], req["group"]
    full = inside(root, path)
    if not os.path.lexists(full):
        return done("ok", f"no {path} yet")
    uid, gid = id_of(root, "passwd", owner), id_of(root, "group", group)
    wrong: list[str] = []
    for dirpath, dirnames, filenames in os.walk(full):
        for p in ([dirpath] if dirpath == full else []) + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(p)
            if uid is None or gid is None or (st.st_uid, st.st_gid) != (uid, gid):
                wrong.append(p)
    if not wrong:
        return done("ok", f"{path} is owned by {owner}:{group}")
    what = f"{len(wrong)} path{'s' if len(wrong) != 1 else ''} under {path} owned by {owner}:{group}"
    if not apply:
        return done("needed", "make " + what)
    if uid is None or gid is None:
        raise Fail(f"{owner}:{group} does not exist in {inside(root, '/etc/passwd')}; the user step creates it")
    for p in wrong:
        os.lchown(p, uid, gid)
    more = f" and {len(wrong) - 20} more" if len(wrong) > 20 else ""
    log(f"chown {owner}:{group}: " + ", ".join(wrong[:20]) + more)
    return done("changed", "made " + what)


# --- knowledge packs --------------------------------------------------------------------------

def act_pack(req: dict[str, Any]) -> dict[str, Any]:
    """Install the pack pushed to ``staging`` with `edge-voice packs install` (checked again,
    switched atomically, the previous version kept for `packs rollback`), unless the device's
    current version of that pack is ``digest`` already."""
    root, venv = req["root"], inside(req["root"], req["venv"])
    python, packs, label = venv + "/bin/python", inside(root, req["packs"]), req["label"]
    if not os.path.exists(python):
        if req["apply"]:
            raise Fail(f"{req['venv']} is missing: the venv step must run first")
        return done("needed", f"would install knowledge pack {label} in {req['packs']} "
                              "(edge-voice is not installed yet, so the installed packs cannot be checked)")
    listed = sh([python, "-m", "edge", "packs", "list", "--root", packs], env=venv_env(root), timeout=300)
    current = None
    for line in listed.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == req["pack_id"]:
            current = words[1]  # the installed version, or BROKEN (changed on disk)
    if current == req["digest"]:
        return done("ok", f"knowledge pack {label} is current in {req['packs']} (version {current})")
    now = "not installed" if current is None else ("changed on disk" if current == "BROKEN" else f"now {current}")
    if not req["apply"]:
        return done("needed", f"would install knowledge pack {label} as version {req['digest']} ({now}) in "
                              f"{req['packs']}, keeping the previous one")
    proc = sh([python, "-m", "edge", "packs", "install", inside(root, req["staging"]), "--root", packs],
              env=venv_env(root), timeout=300)
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    return done("changed", (lines[-1] if lines else f"installed knowledge pack {label}").replace(packs, req["packs"]))


# --- systemd --------------------------------------------------------------------------------

def act_enable(req: dict[str, Any]) -> dict[str, Any]:
    root = req["root"]
    ctl = ["systemctl", *(["--root", root] if root != "/" else [])]
    state = sh(ctl + ["is-enabled", SERVICE], check=False, quiet=True).stdout.strip() or "not installed"
    if state == "enabled":
        return done("ok", f"{SERVICE}.service is enabled" + (f" in {root}" if root != "/" else ""))
    if not req["apply"]:
        return done("needed", f"would enable {SERVICE}.service (now: {state})")
    if root == "/":
        sh(["systemctl", "daemon-reload"], timeout=120)
    sh(ctl + ["enable", SERVICE], timeout=120)
    return done("changed", f"enabled {SERVICE}.service (was: {state})")


def unit_props() -> dict[str, str]:
    out = sh(["systemctl", "show", SERVICE, "-p", "ActiveState,SubState,Result,NRestarts,NeedDaemonReload"],
             check=False, quiet=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_tail(n: int = 15) -> str:
    out = sh(["journalctl", "-u", SERVICE, "-n", str(n), "--no-pager", "-o", "cat"], check=False).stdout
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no journal lines)"


def act_service(req: dict[str, Any]) -> dict[str, Any]:
    """Start (or restart after a change) and wait until systemd says active: Type=notify, so
    that is after the daemon sent READY=1, with the models loaded and the microphone open."""
    props = unit_props()
    active = props.get("ActiveState") == "active"
    reasons = list(req.get("changed", []))
    if props.get("NeedDaemonReload") == "yes":
        reasons.append("unit file changed")
    if active and not reasons:
        # since=0: the status the running daemon published when it started is the one to see.
        return done("ok", f"{SERVICE} is active ({props.get('SubState')}), nothing to restart", since=0.0)
    verb = "restart" if active else "start"
    why = f" ({', '.join(reasons)} changed)" if reasons and active else ""
    if not req["apply"]:
        return done("needed", f"would {verb} {SERVICE}{why} and wait until it is active")
    sh(["systemctl", "daemon-reload"], timeout=120)
    since = time.time()
    before = int(props.get("NRestarts", "0") or 0)
    sh(["systemctl", "reset-failed", SERVICE], check=False, quiet=True)
    timeout = float(req.get("timeout_s", 300))
    # A blocking start returns once the job is done: for Type=notify that is READY=1 (active),
    # a failed start, or TimeoutStartSec.
    try:
        proc = sh(["systemctl", verb, SERVICE], check=False, timeout=timeout)
    except Fail:
        raise Fail(f"{SERVICE} was not active after {timeout:.0f} s: {journal_tail()} "
                   f"(see `journalctl -u {SERVICE}`)") from None
    if proc.returncode == 0:
        time.sleep(3.0)  # a daemon that dies right after READY=1 shows here, not at the next boot
    p = unit_props()
    state, restarts = p.get("ActiveState"), int(p.get("NRestarts", "0") or 0)
    if proc.returncode != 0 or state != "active" or restarts > before:
        raise Fail(f"{SERVICE} did not start ({state}, result {p.get('Result')}): {journal_tail()} "
                   f"(see `journalctl -u {SERVICE}`)")
    return done("changed", f"{verb}ed {SERVICE}{why}: active ({p.get('SubState')})", since=since)


def act_mqtt(req: dict[str, Any]) -> dict[str, Any]:
    """Wait until the daemon's retained MQTT status says online, published by the process the
    service step started: `edge-voice check --mqtt-online-since` (edge/mqtt/probe.py)."""
    root, venv = req["root"], inside(req["root"], req["venv"])
    env = venv_env(root)
    if req.get("password_file"):
        env["EDGE_VOICE_MQTT__PASSWORD_FILE"] = inside(root, req["password_file"])
    timeout = float(req.get("timeout_s", 60))
    proc = sh([venv + "/bin/python", "-m", "edge", "check", "--config", inside(root, req["config"]),
               "--mqtt-online-since", repr(float(req["since"])), "--timeout", f"{timeout:g}", "--json"],
              env=env, timeout=timeout + 30, check=False)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        raise Fail("`edge-voice check --mqtt-online-since` failed: "
                   + (lines[-1] if lines else f"exit {proc.returncode}, no output")) from None
    if not res.get("online"):
        raise Fail(res["line"])
    return done("ok", f"{res['topic']}: online")


def act_check(req: dict[str, Any]) -> dict[str, Any]:
    root, venv = req["root"], inside(req["root"], req["venv"])
    if not os.path.exists(venv + "/bin/python"):
        if req["apply"]:
            raise Fail(f"{req['venv']} is missing")
        return done("skipped", "edge-voice is not installed yet: `edge-voice check` runs after the install")
    config = inside(root, req["config"])
    if not os.path.exists(config):
        return done("skipped", f"no {req['config']} yet: `edge-voice check` runs after the install")
    proc = sh([venv + "/bin/python", "-m", "edge", "check", "--config", config], env=venv_env(root),
              check=False, timeout=600)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0:
        problems = [ln.strip() for ln in lines if ln.startswith("MISSING") or "error" in ln]
        if req["apply"] or not req.get("pending"):
            raise Fail("edge-voice check failed: " + "; ".join(problems or lines[-1:]))
        return done("skipped", "edge-voice check fails until the pending changes are made: "
                               + "; ".join(problems or lines[-1:]))
    return done("ok", f"edge-voice check passed ({sum(ln.startswith('ok') for ln in lines)} items ok)")


ACTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "facts": act_facts, "packages": act_packages, "file": act_file, "absent": act_absent, "user": act_user,
    "llama-build": act_llama_build, "venv": act_venv, "models-fetch": act_models_fetch, "owner": act_owner,
    "pack": act_pack, "enable": act_enable, "service": act_service, "mqtt": act_mqtt, "check": act_check,
}


def main(req: dict[str, Any]) -> int:
    req = dict(req)
    req.setdefault("root", "/")
    req.setdefault("apply", False)
    try:
        result = ACTIONS[req["action"]](req)
    except Fail as err:
        result = done("failed", str(err))
    except OSError as err:
        result = done("failed", f"{getattr(err, 'filename', '') or ''}: {err.strerror or err}".lstrip(": "))
    sys.stdout.flush()
    print(f"\n{MARK} {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    if not REQUEST:
        print("this program is sent to a device by scripts/provision; it is not run by hand", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(REQUEST))
