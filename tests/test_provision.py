"""scripts/provision against a real OpenSSH server on loopback, installing into a temporary root.

The "device" is this machine reached through sshd (tests/sshd.py); ``--root`` keeps the install
inside a temporary directory: the venv from a wheel of this checkout (llama-cpp-python from
scripts/setup's wheel cache, the rest from pip's cache), the config and its secret, the unit
enabled with ``systemctl --root``, the service user from systemd-sysusers, and the dev models
pushed with rsync from the installed model root. The MQTT status wait runs the device program
against a real Mosquitto broker (tests/mosquitto.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from sshd import HOST, SshServer, free_port, make_key

REPO = Path(__file__).resolve().parents[1]
PROVISION = REPO / "scripts" / "provision"
sys.path.insert(0, str(REPO / "scripts"))  # the package scripts/provision starts

from provisioning.config import profile_models, render_config, set_keys  # noqa: E402
from provisioning.constants import (  # noqa: E402
    CONFIG,
    CONSTRAINTS,
    CREDENTIAL,
    DEV_CONFIG,
    JETSON_CONSTRAINTS,
    VENV,
)
from provisioning.errors import HostFailure, UsageError  # noqa: E402
from provisioning.kinds import classify  # noqa: E402
from provisioning.packs import assign_packs  # noqa: E402
from provisioning.remote import device_program, result_of  # noqa: E402
from provisioning.targets import load_inventory, parse_target  # noqa: E402
from provisioning.wheels import WheelName, constraints_for, llama_version, pick_llama  # noqa: E402

DEVICE_ID = "booth-7"
PASSWORD = "kiosk-secret-7f3a"


def _need_tools() -> None:
    for tool in ("rsync", "systemctl", "systemd-sysusers"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


# --- fixtures: a server, the inputs, one provisioned root ---------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    _need_tools()
    s = SshServer(tmp_path_factory.mktemp("sshd")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def models_root() -> Path:
    from edge import paths

    root = paths.models_dir()
    missing = [m for m in profile_models("dev") if not (root / m / "state.json").is_file()]
    if missing:
        pytest.fail(f"dev models missing in {root}: {missing}: run `edge-voice models fetch --profile dev`")
    return root


@pytest.fixture(scope="module")
def wheel_cache() -> Path:
    """The folder of the llama-cpp-python wheel scripts/setup built and installed for this machine:
    the test "devices" are this machine, so it runs there, and nothing is compiled again."""
    cache = Path(os.environ.get("EDGE_VOICE_WHEEL_CACHE") or Path.home() / ".cache/edge-voice/wheels")
    stamp = REPO / ".venv" / ".llama-cpp-python-wheel"
    installed = stamp.read_text().strip() if stamp.is_file() else ""
    for wheel in sorted(cache.rglob(f"llama_cpp_python-{llama_version()}-*.whl")):
        if hashlib.sha256(wheel.read_bytes()).hexdigest() == installed:
            return wheel.parent
    pytest.fail(f"the llama-cpp-python wheel installed in .venv is not in {cache}: run scripts/setup")


def run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROVISION), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Setup:
    """The common command line for one server, known_hosts file and log folder."""

    def __init__(self, server: SshServer, work: Path, models_root: Path, wheel_cache: Path) -> None:
        self.server, self.work = server, work
        self.known_hosts = work / "known_hosts"
        self.password = work / "mqtt-password"
        self.password.write_text(PASSWORD + "\n")
        self.logs = work / "logs"
        self.common: list[str | Path] = [
            "--ssh-config", "none", "-i", server.client_key, "--known-hosts", self.known_hosts,
            "--log-dir", self.logs, "--profile", "dev", "--models-from", models_root, "--wheel-cache", wheel_cache]
        # The broker is started only by the test that needs it (the install does not talk to it).
        self.mqtt_port = free_port()
        self.common += ["--mqtt-host", HOST, "--mqtt-port", str(self.mqtt_port), "--mqtt-username", DEVICE_ID,
                        "--mqtt-password-file", self.password]

    def provision(self, root: Path, *extra: str | Path, key: Path | None = None) -> subprocess.CompletedProcess:
        args = list(self.common)
        if key is not None:
            args[args.index("-i") + 1] = key
        return run(*args, "--root", root, "-p", str(self.server.port), "--device-id", DEVICE_ID, *extra,
                   self.server.login)


@pytest.fixture(scope="module")
def setup(server: SshServer, models_root: Path, wheel_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(server, tmp_path_factory.mktemp("provision"), models_root, wheel_cache)


@pytest.fixture(scope="module")
def installed(setup: Setup) -> tuple[Path, subprocess.CompletedProcess]:
    root = setup.work / "root"
    t0 = time.monotonic()
    proc = setup.provision(root)
    print(f"first run: {time.monotonic() - t0:.1f} s\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, proc


def steps(stdout: str) -> dict[str, tuple[str, str]]:
    """{step: (status, detail)} from the per-step lines of one host."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^\S+:\d+\s+(\w+)\s+(ok|changed|would change|skipped|FAILED)\s+(.*)$", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, owner, size, mtime and (for links) target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                             st.st_size if not p.is_dir() else 0, st.st_mtime_ns,
                                             os.readlink(p) if p.is_symlink() else None)
    return out


def group_id(root: Path, name: str, table: str = "group") -> int:
    for line in (root / "etc" / table).read_text().splitlines():
        f = line.split(":")
        if f[0] == name:
            return int(f[2])
    raise AssertionError(f"no {'user' if table == 'passwd' else 'group'} {name} in {root}/etc/{table}")


def service_ids(root: Path) -> tuple[int, int]:
    """uid and gid of edge-voice in the root's own passwd and group files."""
    return group_id(root, "edge-voice", "passwd"), group_id(root, "edge-voice")


def not_owned_by(tree: Path, ids: tuple[int, int]) -> list[str]:
    """The paths under ``tree`` (itself included) whose owner and group are not ``ids``."""
    out = []
    for p in [tree, *tree.rglob("*")]:
        st = p.lstat()
        if (st.st_uid, st.st_gid) != ids:
            out.append(f"{p.relative_to(tree)} {st.st_uid}:{st.st_gid}")
    return out


# --- the install ---------------------------------------------------------------------------------

def test_first_run_installs_venv_package_config_unit_user_and_models(installed, models_root: Path) -> None:
    root, proc = installed
    s = steps(proc.stdout)
    for step in ("user", "wheels", "venv", "unit", "config", "secret", "models", "enable"):
        assert s[step][0] == "changed", (step, proc.stdout)
    assert s["connect"][0] == "ok" and "Debian 12 x86_64" in s["connect"][1]
    assert s["start"][0] == "skipped" and "alternate root" in s["start"][1]
    assert s["check"] == ("ok", s["check"][1]) and "check passed" in s["check"][1]
    assert "summary: 1 host: 1 ok, 0 failed" in proc.stdout

    # The venv: the device's Python, this checkout's package, the native backends importable.
    venv = root / "opt/edge-voice/venv"
    assert (venv / "bin/python").resolve().parent == Path("/usr/bin").resolve()
    probe = subprocess.run([venv / "bin/python", "-c",
                            "import edge, edge.cli, llama_cpp, sherpa_onnx, onnxruntime, paho.mqtt; "
                            "print(edge.__version__, edge.cli.__file__)"],
                           capture_output=True, text=True, timeout=120, check=True)
    from edge import __version__

    version, cli_file = probe.stdout.split()
    assert version == __version__
    assert Path(cli_file).read_bytes() == (REPO / "edge/cli.py").read_bytes()
    assert (venv / "share/edge-voice/manifest.toml").read_bytes() == (REPO / "models/manifest.toml").read_bytes()
    # Entry points name the venv where the image will have it, not where it was built.
    assert (venv / "bin/edge-voice").read_text().splitlines()[0] == "#!/opt/edge-voice/venv/bin/python"

    # The service user, from the unit's own sysusers.d file.
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^edge-voice:x:\d+:\d+:[^:]*:[^:]*:/usr/sbin/nologin$", passwd, re.M), passwd
    assert re.search(r"^audio:x:\d+:(.*,)?edge-voice(,.*)?$", (root / "etc/group").read_text(), re.M)

    # The config: the device id and broker set, no secret in it, readable by the service's group only.
    cfg_path = root / "etc/edge-voice/config.toml"
    st = cfg_path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, group_id(root, "edge-voice"))
    cfg = tomllib.loads(cfg_path.read_text())
    assert cfg["device"]["id"] == DEVICE_ID
    assert cfg["mqtt"]["enabled"] is True and cfg["mqtt"]["username"] == DEVICE_ID
    assert cfg["llm"]["model"] == "smollm2-135m-instruct"  # the rest is config/dev.toml's
    assert PASSWORD not in cfg_path.read_text()
    from edge.config import load_config

    assert load_config(cfg_path).device_id == DEVICE_ID

    # The secret: a systemd credential, root-only.
    cred = root / "etc/credstore/edge-voice.mqtt-password"
    st = cred.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    assert cred.read_text() == PASSWORD
    assert stat.S_IMODE((root / "etc/credstore").stat().st_mode) == 0o700

    # The unit, enabled for multi-user.target inside the root.
    unit = root / "etc/systemd/system/edge-voice.service"
    assert unit.read_bytes() == (REPO / "systemd/edge-voice.service").read_bytes()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    wants = root / "etc/systemd/system/multi-user.target.wants/edge-voice.service"
    assert os.readlink(wants) == "/etc/systemd/system/edge-voice.service"

    # The models resolve through edge-voice's own registry (sizes and mtimes as recorded).
    from edge.models.registry import ModelRegistry

    registry = ModelRegistry(root / "var/lib/edge-voice/models")
    for model_id in profile_models("dev"):
        model = registry.resolve(model_id)
        assert model.version == json.loads((models_root / model_id / "state.json").read_text())["current"]
    # The model tree is the service user's: in a rollout the daemon writes new versions there.
    ids = service_ids(root)
    assert ids[0] != 0 and not_owned_by(root / "var/lib/edge-voice/models", ids) == []
    assert "owned by edge-voice:edge-voice" in s["models"][1]

    # A log for the host, without the password.
    logs = list((root.parent / "logs").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "device.py" in text and "edge-voice check" in text and PASSWORD not in text


def test_second_run_changes_nothing(installed, setup: Setup) -> None:
    root, _ = installed
    before = snapshot(root)
    proc = setup.provision(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert {status for status, _ in s.values()} <= {"ok", "skipped"}, proc.stdout
    assert "0 steps changed" in proc.stdout
    assert snapshot(root) == before


def test_dry_run_on_a_fresh_root_lists_the_plan_and_creates_nothing(setup: Setup, wheel_cache: Path) -> None:
    root = setup.work / "fresh"
    # The cached wheel handed over as a --wheels folder (as scripts/build-wheels output would be).
    proc = setup.provision(root, "--dry-run", "--wheels", wheel_cache, "--wheel-cache", setup.work / "no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert s["llama"][0] == "ok" and "from --wheels (llama_cpp_python-" in s["llama"][1]
    for step in ("user", "wheels", "venv", "unit", "config", "secret", "models", "enable"):
        assert s[step][0] == "would change", (step, proc.stdout)
    assert "systemd-sysusers" in s["user"][1] and "/opt/edge-voice/venv" in s["venv"][1]
    assert "dry run: nothing was changed" in proc.stdout
    assert not root.exists()
    # Without a wheel anywhere, a device of this machine's kind gets a portable wheel built here,
    # once, rather than compiling on every device; a dry run only says so.
    empty = setup.work / "empty-cache"
    proc = setup.provision(root, "--dry-run", "--wheel-cache", empty)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert s["llama"][0] == "would change" and "would build a portable one on this machine" in s["llama"][1]
    assert not root.exists() and not empty.exists()


def test_dry_run_reports_drift_without_repairing_it_and_a_run_repairs_it(installed, setup: Setup) -> None:
    root, _ = installed
    cfg = root / "etc/edge-voice/config.toml"
    cfg.chmod(0o644)
    (root / "etc/credstore/edge-voice.mqtt-password").write_text("stale")
    victim = next((root / "var/lib/edge-voice/models/silero-vad/versions").glob("*/silero_vad.onnx"))
    victim.unlink()
    # A model file someone made root's: the daemon could not replace it in a rollout.
    models = root / "var/lib/edge-voice/models"
    stray = next((models / "whisper-tiny-en/versions").glob("*/tiny.en-tokens.txt"))
    os.lchown(stray, 0, 0)
    before = snapshot(root)

    proc = setup.provision(root, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert s["config"][0] == "would change" and "0644 -> 0640" in s["config"][1]
    assert s["secret"][0] == "would change"
    assert s["models"][0] == "would change" and "silero-vad" in s["models"][1]
    assert "1 path under /var/lib/edge-voice/models owned by edge-voice:edge-voice" in s["models"][1]
    assert s["venv"][0] == "ok" and s["unit"][0] == "ok"
    assert s["check"][0] == "skipped"  # fails until the missing model is back: said, not failed
    assert snapshot(root) == before

    proc = setup.provision(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert [k for k, v in s.items() if v[0] == "changed"] == ["config", "secret", "models"]
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640 and victim.is_file()
    # The file copied again (by rsync, as root) and the stray one are the service user's.
    assert not_owned_by(models, service_ids(root)) == []
    assert "made 2 paths under /var/lib/edge-voice/models owned by edge-voice:edge-voice" in s["models"][1]
    assert "0 steps changed" in setup.provision(root).stdout


def on_device(setup: Setup, req: dict) -> dict:
    """Run one action of the device program over ssh, as scripts/provision does."""
    server = setup.server
    proc = subprocess.run(["ssh", *server.client_args(setup.known_hosts), server.login, "/usr/bin/python3", "-"],
                          input=device_program(req), capture_output=True, timeout=120)
    res = result_of(proc.stdout.decode())
    assert res is not None, proc.stderr.decode()
    return res


def test_models_state_is_checked_with_the_installed_edge_voice(installed, setup: Setup) -> None:
    """Without --models-from the device fetches; its check reads the store through the venv."""
    root, _ = installed
    req = {"action": "models-fetch", "root": str(root), "apply": False, "venv": VENV, "profile": "dev",
           "mirror": None, "mirror_pushed": False}
    assert on_device(setup, req) == {"status": "ok", "detail": "7 models of profile dev installed and current"}
    target = next((root / "var/lib/edge-voice/models/whisper-tiny-en/versions").glob("*/tiny.en-tokens.txt"))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        res = on_device(setup, req)
    finally:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert res == {"status": "needed", "detail": "would fetch whisper-tiny-en (changed on disk)"}


def test_mqtt_status_wait_on_the_device(installed, setup: Setup, tmp_path: Path) -> None:
    """The device program's MQTT step, run over ssh with the installed venv, config and credential:
    it waits for the retained status the daemon publishes and fails clearly without it."""
    mosquitto = pytest.importorskip("mosquitto")  # tests/mosquitto.py: a real broker on loopback
    root, _ = installed
    broker = mosquitto.Mosquitto(tmp_path / "broker", port=setup.mqtt_port, allow_anonymous=False,
                                 passwords={DEVICE_ID: PASSWORD, "fleet": "fleet-pw"}).start()

    def wait(timeout: int) -> dict:
        return on_device(setup, {"action": "mqtt", "root": str(root), "apply": True, "venv": VENV,
                                 "config": CONFIG, "since": time.time(), "password_file": CREDENTIAL,
                                 "timeout_s": timeout})

    fleet = None
    try:
        res = wait(2)
        assert res["status"] == "failed" and "did not say online" in res["detail"], res
        fleet = mosquitto.Probe(broker, username="fleet", password="fleet-pw").connect()
        # What the daemon publishes (retained) once it is listening; a stale one would be older.
        fleet.publish(f"edge/{DEVICE_ID}/status", {"state": "online", "device_id": DEVICE_ID,
                                                   "started": time.time() + 1}, retain=True)
        res = wait(20)
        assert res == {"status": "ok", "detail": f"edge/{DEVICE_ID}/status: online"}
    finally:
        if fleet is not None:
            fleet.close()
        broker.stop()


# --- safety --------------------------------------------------------------------------------------

def test_a_changed_host_key_aborts_the_host(setup: Setup, tmp_path: Path) -> None:
    first = SshServer(tmp_path / "a").start()
    port = first.port
    try:
        kh = tmp_path / "known_hosts"
        common = ["--ssh-config", "none", "-i", first.client_key, "--known-hosts", kh, "--log-dir", tmp_path / "logs",
                  "--profile", "dev", "--dry-run", "--root", tmp_path / "root", "-p", str(port), first.login]
        proc = run(*common)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert first.host_public_key() in kh.read_text()
    finally:
        first.stop()
    recorded = kh.read_text()
    # The "reinstalled" device: same address and port, same authorized key, a new host key.
    second = SshServer(tmp_path / "b", port=port, authorized=[first.client_key.with_name("client_ed25519.pub")])
    second.start()
    try:
        proc = run(*common)
    finally:
        second.stop()
    assert proc.returncode == 1
    s = steps(proc.stdout)
    assert list(s) == ["connect"] and s["connect"][0] == "FAILED"
    assert "host key" in s["connect"][1] and "CHANGED" in s["connect"][1]
    assert f"ssh-keygen -f {kh} -R '[127.0.0.1]:{port}'" in s["connect"][1]
    assert kh.read_text() == recorded  # the new key was not accepted
    assert not (tmp_path / "root").exists()


def test_a_wrong_key_fails_with_a_clear_message(setup: Setup, tmp_path: Path) -> None:
    stranger = make_key(tmp_path / "stranger_key")
    proc = setup.provision(tmp_path / "root", "--dry-run", key=stranger)
    assert proc.returncode == 1
    s = steps(proc.stdout)
    assert list(s) == ["connect"] and s["connect"][0] == "FAILED"
    assert f"authentication failed: {setup.server.login}:{setup.server.port} refused the key {stranger}" \
        in s["connect"][1]
    assert "FAILED  at connect: authentication failed" in proc.stdout


# --- fleets --------------------------------------------------------------------------------------

def test_one_host_dies_midway_and_the_other_completes(installed, setup: Setup, tmp_path: Path) -> None:
    root_a, _ = installed
    doomed = SshServer(tmp_path / "doomed", authorized=[setup.server.client_key.with_name("client_ed25519.pub")])
    doomed.start()
    a = f"{setup.server.login}:{setup.server.port}"
    b = f"{doomed.login}:{doomed.port}"
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# two booths\n{a} id={DEVICE_ID} root={root_a}\n{b} id=booth-8 root={tmp_path / 'root-b'}\n")
    proc = subprocess.Popen([sys.executable, str(PROVISION), *map(str, setup.common), "--hosts", str(hosts),
                             "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(b + " ") and " wheels " in line:
                doomed.kill()  # B dies with its wheels copied and its venv not yet made
        proc.wait(timeout=300)
    finally:
        doomed.stop()
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 1, out + proc.stderr.read()  # type: ignore[union-attr]
    summary = out[out.index("summary:"):]
    assert "summary: 2 hosts: 1 ok, 1 failed" in summary
    line_a = next(ln for ln in summary.splitlines() if ln.strip().startswith(a + " "))
    line_b = next(ln for ln in summary.splitlines() if ln.strip().startswith(b + " "))
    assert " ok " in line_a and "0 changed" in line_a
    assert "FAILED  at venv:" in line_b, summary
    assert re.search(r"lost the connection|cannot connect to .*connection refused", line_b), line_b
    assert (root_a / "etc/edge-voice/config.toml").is_file()
    assert (tmp_path / "root-b/var/cache/edge-voice-provision/wheels").is_dir()  # B did get part-way


def test_waves_stop_the_rollout_when_too_many_fail(setup: Setup, tmp_path: Path) -> None:
    dead = f"root@127.0.0.1:{free_port()}"  # nothing listens there
    alive = f"{setup.server.login}:{setup.server.port}"
    proc = run(*setup.common, "--dry-run", "--root", tmp_path / "root", "--serial", "1",
               "--max-fail-percent", "0", dead, alive)
    assert proc.returncode == 1
    assert "-- wave 1 of 2" in proc.stdout and "-- wave 2" not in proc.stdout
    assert "summary: 2 hosts: 0 ok, 1 failed, 1 not attempted" in proc.stdout
    assert re.search(rf"{re.escape(dead)}\s+FAILED  at connect: cannot connect .* connection refused", proc.stdout)
    assert re.search(rf"{re.escape(alive)}\s+SKIPPED not attempted: the rollout stopped after wave 1 "
                     r"\(1 of 1 failed, more than --max-fail-percent 0\)", proc.stdout)


# --- knowledge packs -----------------------------------------------------------------------------

def _pack_state(root: Path) -> dict:
    return json.loads((root / "var/lib/edge-voice/packs/harbour-museum/state.json").read_text())


def test_a_pack_for_a_group_is_installed_updated_and_kept_when_a_broken_one_comes(
        installed, setup: Setup, tmp_path: Path) -> None:
    """--pack GROUP=DIR for the hosts under [GROUP]: installed with `edge-voice packs install`,
    named in the config, owned by the service, repeated without changes, updated with the
    previous version kept; a broken pack never leaves the laptop and the device keeps its own."""
    root, _ = installed
    pack = tmp_path / "harbour"
    shutil.copytree(REPO / "config/packs/harbour-museum", pack)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"[harbour]\n{setup.server.login}:{setup.server.port} id={DEVICE_ID} root={root}\n")

    def group_run(*extra: str) -> subprocess.CompletedProcess:
        return run(*setup.common, "--hosts", hosts, "--pack", f"harbour={pack}", *extra)

    before = snapshot(root)
    proc = group_run("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert s["pack"][0] == "would change" and "install knowledge pack harbour-museum@2025.06.1" in s["pack"][1]
    assert "(not installed)" in s["pack"][1] and s["config"][0] == "would change"
    assert snapshot(root) == before

    proc = group_run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert [k for k, v in s.items() if v[0] == "changed"] == ["config", "pack"], proc.stdout
    assert "installed harbour-museum@2025.06.1" in s["pack"][1] and "/var/lib/edge-voice/packs" in s["pack"][1]
    assert s["check"][0] == "ok" and "check passed" in s["check"][1]
    cfg = tomllib.loads((root / "etc/edge-voice/config.toml").read_text())
    assert cfg["knowledge"]["pack"] == "harbour-museum" and cfg["device"]["id"] == DEVICE_ID
    first = _pack_state(root)
    assert first["previous"] is None
    assert (root / f"var/lib/edge-voice/packs/harbour-museum/versions/{first['current']}/facts.md").read_bytes() \
        == (pack / "facts.md").read_bytes()
    assert not_owned_by(root / "var/lib/edge-voice/packs", service_ids(root)) == []
    staging = root / "var/cache/edge-voice-provision/packs/harbour-museum"
    assert sorted(p.name for p in staging.iterdir()) == ["facts.md", "faq.toml", "pack.toml", "questions.toml"]

    before = snapshot(root)
    proc = group_run()
    assert proc.returncode == 0 and "0 steps changed" in proc.stdout, proc.stdout + proc.stderr
    assert steps(proc.stdout)["pack"][0] == "ok"
    assert snapshot(root) == before

    # A new version of the pack: installed, the previous kept for `packs rollback`.
    with open(pack / "facts.md", "a", encoding="utf-8") as f:
        f.write("\n- On Fridays the museum café serves harbour fish soup.\n")
    proc = group_run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = steps(proc.stdout)
    assert [k for k, v in s.items() if v[0] == "changed"] == ["pack"], proc.stdout
    assert f"previous version {first['current']}" in s["pack"][1]
    second = _pack_state(root)
    assert second["previous"] == first["current"] and second["current"] != first["current"]

    # A broken pack: one line naming the file and the line, and the device is not touched.
    with open(pack / "faq.toml", "a", encoding="utf-8") as f:
        f.write("\n[[faq]\nid = \"broken\"\n")
    before = snapshot(root)
    proc = setup.provision(root, "--pack", pack)  # --pack DIR: every host of the run
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and steps(proc.stdout) == {}, proc.stdout + proc.stderr
    assert re.search(rf"^provision: error: --pack {re.escape(str(pack))}: the knowledge pack is not valid, so it goes "
                     rf"to no device: {re.escape(str(pack))}/faq\.toml:\d+: not valid TOML", proc.stderr), proc.stderr
    assert snapshot(root) == before and _pack_state(root) == second
    listed = subprocess.run([root / "opt/edge-voice/venv/bin/python", "-m", "edge", "packs", "list", "--root",
                             root / "var/lib/edge-voice/packs"], capture_output=True, text=True, timeout=120,
                            check=True)
    assert re.search(rf"^harbour-museum\s+{second['current']}\s", listed.stdout, re.M), listed.stdout


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    for args, needle in (([], "no targets"), (["root@host", "--root", "relative"], "must be an absolute path"),
                         (["a@h1", "b@h2", "--device-id", "x"], "--device-id names one device"),
                         (["not a target"], "is not a target"), (["root@h", "--profile", "nope"], "profile 'nope'")):
        proc = run(*args, "--log-dir", tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr, (args, proc.stderr)


# --- pure logic ----------------------------------------------------------------------------------

def test_set_keys_edits_one_section_and_keeps_the_rest() -> None:
    base = ('# top\n[device]\n# the id\nid = "old"\n\n[wake]\nwords = [\n  { name = "x" },\n]\n\n'
            '[mqtt]\nport = 1\n')
    out = set_keys(base, "device", {"id": "booth-1"})
    out = set_keys(out, "mqtt", {"enabled": True, "host": 'b"q', "port": 8883})
    out = set_keys(out, "llm", {"n_gpu_layers": -1})
    data = tomllib.loads(out)
    assert data == {"device": {"id": "booth-1"}, "wake": {"words": [{"name": "x"}]},
                    "mqtt": {"port": 8883, "enabled": True, "host": 'b"q'}, "llm": {"n_gpu_layers": -1}}
    assert "# the id" in out and out.startswith("# top\n")
    assert set_keys(out, "llm", {"n_gpu_layers": 5}, keep_existing=True) == out


def test_targets_and_inventory(tmp_path: Path) -> None:
    t = parse_target("pi@booth-3.local:2222", 22)
    assert (t.user, t.host, t.port, t.label) == ("pi", "booth-3.local", 2222, "pi@booth-3.local:2222")
    t6 = parse_target("root@[fe80::1]", 22)
    assert (t6.host, t6.ssh_dest, t6.rsync_dest, t6.label) == ("fe80::1", "root@fe80::1", "root@[fe80::1]",
                                                               "root@[fe80::1]:22")
    inv = tmp_path / "hosts"
    (tmp_path / "pw").write_text("x")
    inv.write_text("root@a id=a-1  # first\n\nroot@b:2200 root=/srv/img mqtt_username=b mqtt_password_file=pw\n")
    a, b = load_inventory(inv, 22)
    assert (a.device_id, a.port, b.port, b.root, b.mqtt_username, b.mqtt_password_file) == \
        ("a-1", 22, 2200, "/srv/img", "b", tmp_path / "pw")
    inv.write_text("root@a colour=blue\n")
    with pytest.raises(UsageError, match=r"hosts:1: 'colour=blue'"):
        load_inventory(inv, 22)


def _facts(os_id: str, version: str, arch: str, **kw: str) -> dict:
    return {"os": {"ID": os_id, "VERSION_ID": version, "PRETTY_NAME": f"{os_id} {version}"}, "arch": arch,
            "python": kw.get("python", "3.11.2"), "model": kw.get("model", ""), "tegra": kw.get("tegra", "")}


def test_classify_accepts_the_three_targets_and_refuses_others() -> None:
    pi = classify(_facts("debian", "12", "aarch64", model="Raspberry Pi 5 Model B Rev 1.0"))
    assert (pi.name, pi.profile, pi.cuda) == ("bookworm-arm64", "pi5", False) and "Raspberry Pi OS" in pi.label
    jet = classify(_facts("ubuntu", "22.04", "aarch64", python="3.10.12",
                               tegra="# R36 (release), REVISION: 3.0, GCID: 36923193"))
    assert (jet.profile, jet.cuda) == ("jetson", True) and "GGML_CUDA=on" in jet.cmake_args
    assert classify(_facts("debian", "12", "x86_64")).name == "debian12-x86_64"
    for facts, needle in ((_facts("ubuntu", "24.04", "x86_64"), "ubuntu 24.04 x86_64"),
                          (_facts("debian", "11", "aarch64"), "debian 11 aarch64"),
                          (_facts("ubuntu", "22.04", "aarch64", tegra="# R35 (release)"), "without JetPack 6"),
                          (_facts("debian", "12", "armv7l"), "debian 12 armv7l")):
        with pytest.raises(HostFailure, match="unsupported target") as err:
            classify(facts)
        assert needle in str(err.value) and "supported: Raspberry Pi OS Bookworm arm64" in str(err.value)


def test_llama_wheel_choice_by_architecture_and_cuda(tmp_path: Path) -> None:
    v = llama_version()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in (f"llama_cpp_python-{v}-py3-none-linux_aarch64.whl",
                 f"llama_cpp_python-{v}+cu126-py3-none-linux_aarch64.whl",
                 "llama_cpp_python-0.0.1-py3-none-linux_aarch64.whl",
                 f"llama_cpp_python-{v}-py3-none-linux_x86_64.whl"):
        (wheels / name).write_bytes(b"")  # the choice is made by file name alone
    pi = classify(_facts("debian", "12", "aarch64", model="Raspberry Pi 5"))
    jet = classify(_facts("ubuntu", "22.04", "aarch64", tegra="# R36 (release)"))
    pick, why = pick_llama(pi, "3.11.2", wheels, None, v)
    assert pick is not None and pick.name == f"llama_cpp_python-{v}-py3-none-linux_aarch64.whl" and "--wheels" in why
    pick, _ = pick_llama(jet, "3.10.12", wheels, None, v)
    assert pick is not None and "+cu126" in pick.name
    (wheels / f"llama_cpp_python-{v}+cu126-py3-none-linux_aarch64.whl").unlink()
    pick, why = pick_llama(jet, "3.10.12", wheels, wheels, v)
    assert pick is not None and "+cu" not in pick.name and "CPU only, the GPU is not used" in why
    pick, why = pick_llama(jet, "3.10.12", None, wheels, v)
    assert pick is None and "compiled on the device" in why  # the laptop's cache is for its own kind
    assert WheelName.parse("sherpa_onnx-2.0.1-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl") \
        .fits("aarch64", "3.11.2")
    assert not WheelName.parse("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl").fits("aarch64", "3.11.2")
    assert not WheelName.parse("numpy-2.4.6-cp312-cp312-manylinux_2_27_aarch64.whl").fits("aarch64", "3.11.2")


def test_jetson_constraints_replace_the_pins_without_cp310_wheels() -> None:
    jet = classify(_facts("ubuntu", "22.04", "aarch64", python="3.10.12", tegra="# R36 (release)"))
    pi = classify(_facts("debian", "12", "aarch64", model="Raspberry Pi 5"))
    assert constraints_for(pi) == CONSTRAINTS.read_text()
    if not JETSON_CONSTRAINTS.is_file():
        pytest.skip("no scripts/arm64/jetson-constraints.txt in this checkout")
    merged = constraints_for(jet)
    for line in JETSON_CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name = line.split("==")[0]
            pins = [ln for ln in merged.splitlines() if ln.split("==")[0].lower() == name.lower()]
            assert pins == [line], (name, pins)
    assert f"llama-cpp-python=={llama_version()}" in merged.splitlines()


def _pack_copy(src: Path, dest: Path, pack_id: str | None = None) -> Path:
    shutil.copytree(src, dest)
    if pack_id:
        toml = dest / "pack.toml"
        toml.write_text(re.sub(r'^id = ".*"$', f'id = "{pack_id}"', toml.read_text(), count=1, flags=re.M))
    return dest


def test_packs_per_host_per_group_and_for_every_host(tmp_path: Path) -> None:
    from edge.knowledge.store import PackStore

    sample = REPO / "config/packs/harbour-museum"
    harbour = _pack_copy(sample, tmp_path / "packs/harbour")
    castle = _pack_copy(sample, tmp_path / "packs/castle", "castle-gate")
    inv = tmp_path / "hosts"
    inv.write_text("root@a\n[harbour]\nroot@b id=b\nroot@c pack=packs/castle  # its own\n\n[castle.east]\nroot@d\n")
    ts = load_inventory(inv, 22)
    assert [(t.host, t.group, t.pack_dir) for t in ts] == [("a", None, None), ("b", "harbour", None),
                                                            ("c", "harbour", castle), ("d", "castle.east", None)]
    assign_packs(ts, [f"harbour={harbour}"], inv)
    assert [t.pack.id if t.pack else None for t in ts] == [None, "harbour-museum", "castle-gate", None]
    ts = load_inventory(inv, 22)
    assign_packs(ts, [str(castle), f"harbour={harbour}"], inv)
    assert [t.pack.id if t.pack else None for t in ts] == ["castle-gate", "harbour-museum", "castle-gate",
                                                           "castle-gate"]
    # The digest the laptop computes is the version `edge-voice packs install` gives the pack.
    installed, changed = PackStore(tmp_path / "store").install(harbour)
    assert changed and installed.version == ts[1].pack.digest
    assert ts[1].pack.files == ("pack.toml", "facts.md", "faq.toml", "questions.toml")

    for specs, needle in (([f"nope={harbour}"], f"--pack nope={harbour}: no host is under [nope] in {inv}"),
                          ([str(harbour), str(castle)], "a pack for every host is given twice"),
                          ([f"harbour={harbour}", f"harbour={castle}"], "group harbour is given a pack twice"),
                          ([str(tmp_path / "none")], "no such directory")):
        with pytest.raises(UsageError) as err:
            assign_packs(load_inventory(inv, 22), specs, inv)
        assert needle in str(err.value), (specs, str(err.value))
    inv.write_text("[harbour] root@a\n")
    with pytest.raises(UsageError, match=r"hosts:1: a \[GROUP\] line holds nothing else"):
        load_inventory(inv, 22)
    text = render_config(DEV_CONFIG.read_text(), "config/dev.toml", "b", {}, False, "castle-gate")
    assert tomllib.loads(text)["knowledge"] == {"pack": "castle-gate"}


def test_a_broken_pack_is_refused_by_a_laptop_python_without_numpy(tmp_path: Path) -> None:
    """The laptop side needs the standard library only, --pack included: run it with the
    system's Python, without the venv (and its NumPy)."""
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-I", "-c", "import sys, importlib.util as u; "
                            "print(sys.version_info >= (3, 11), u.find_spec('numpy') is not None)"],
                           capture_output=True, text=True, timeout=60) if Path(python).exists() else None
    if probe is None or probe.stdout.split() != ["True", "False"]:
        pytest.skip(f"needs {python} 3.11 or newer without NumPy")
    broken = _pack_copy(REPO / "config/packs/harbour-museum", tmp_path / "broken")
    (broken / "pack.toml").write_text((broken / "pack.toml").read_text().replace('language = "en"', 'language = 7'))
    dead = f"root@127.0.0.1:{free_port()}"
    proc = subprocess.run([python, "-I", PROVISION, "--pack", broken, "--dry-run", "--log-dir", tmp_path / "logs",
                           "--known-hosts", tmp_path / "kh", dead], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert f"--pack {broken}: the knowledge pack is not valid, so it goes to no device: {broken}/pack.toml:" \
        in proc.stderr and "language" in proc.stderr
    good = _pack_copy(REPO / "config/packs/harbour-museum", tmp_path / "good")
    proc = subprocess.run([python, "-I", PROVISION, "--pack", good, "--dry-run", "--log-dir", tmp_path / "logs",
                           "--known-hosts", tmp_path / "kh", dead], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == "", proc.stdout + proc.stderr  # checked, then no host there
    assert re.search(r"connect\s+FAILED\s+cannot connect .* connection refused", proc.stdout), proc.stdout


def test_models_list_json_is_what_the_device_reads(models_root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edge", "models", "list", "--profile", "dev", "--root", models_root,
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert {k for k, v in listed.items() if not v["optional"]} == set(profile_models("dev"))
    for model_id in profile_models("dev"):
        entry = listed[model_id]
        assert entry["state"] == "ok" and entry["current"] in entry["versions"], (model_id, entry)
    assert all(v["optional"] for k, v in listed.items() if k not in profile_models("dev"))
