"""The command line of scripts/provision: every option and target is checked, and every knowledge
pack too, before any host is touched (a mistake is one line, exit 2); then the fleet runs."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

from provisioning.config import profile_models
from provisioning.constants import CA_FILE, CREDENTIAL, DEVICE_ID_RE, EXIT_USAGE, FLEET_KEY
from provisioning.errors import UsageError
from provisioning.fleet import run_fleet
from provisioning.packs import assign_packs
from provisioning.report import Console, summarize
from provisioning.targets import Target, check_root, load_inventory, parse_target

DESCRIPTION = ("Provision edge-voice kiosks over plain OpenSSH: one command from a laptop to a running service, "
               "safe to repeat across a fleet.")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[Target]]:
    p = argparse.ArgumentParser(prog="scripts/provision", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 every host done, 1 a host failed or was not attempted, 2 usage.")
    p.add_argument("targets", nargs="*", metavar="user@host[:port]", help="devices to provision")
    p.add_argument("--hosts", type=Path, metavar="FILE", help="inventory: one target per line, with optional "
                   "id=DEVICE_ID root=DIR mqtt_username=U mqtt_password_file=FILE pack=DIR; a [GROUP] line puts "
                   "the targets below it in GROUP")
    p.add_argument("-p", "--port", type=int, default=22, help="ssh port for targets without one (default 22)")
    p.add_argument("-i", "--identity", type=Path, metavar="KEY", help="ssh private key (only this key is offered)")
    p.add_argument("--known-hosts", type=Path, metavar="FILE",
                   default=Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
                   / "edge-voice" / "known_hosts",
                   help="the fleet's own known_hosts: a new device's key is recorded, a changed one aborts that "
                        "host (default: ~/.config/edge-voice/known_hosts)")
    p.add_argument("--ssh-config", metavar="FILE", help="ssh config file (default: ssh's own; 'none' for none)")
    p.add_argument("--connect-timeout", type=int, default=10, metavar="S")
    p.add_argument("--dry-run", "-n", action="store_true", help="only check: print what would change, change nothing")
    p.add_argument("--root", metavar="DIR", help="install under DIR on the target (image building, tests)")
    p.add_argument("--profile", help="model profile from models/manifest.toml (default: pi5, or jetson on a Jetson)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="base config for every device (default: config/dev.toml for --profile dev, else the "
                        "built-in defaults); provision sets [device] id and [mqtt] in it")
    p.add_argument("--device-id", help="[device] id, for a single target (inventory: id=; default: the host name)")
    m = p.add_argument_group("MQTT")
    m.add_argument("--mqtt-host", help="the broker: enables [mqtt] and waits for the device's status to say online")
    m.add_argument("--mqtt-port", type=int, default=1883)
    m.add_argument("--mqtt-prefix", help="topic prefix (config default: edge)")
    m.add_argument("--mqtt-username")
    m.add_argument("--mqtt-password-file", type=Path, metavar="FILE",
                   help=f"a file holding the password; installed as {CREDENTIAL} (0600)")
    m.add_argument("--mqtt-tls", action="store_true")
    m.add_argument("--mqtt-ca-file", type=Path, metavar="FILE", help=f"CA certificate, installed as {CA_FILE}")
    m.add_argument("--mqtt-timeout", type=int, default=60, metavar="S")
    w = p.add_argument_group("software and models")
    w.add_argument("--wheels", type=Path, metavar="DIR",
                   help="wheels to use on the devices (scripts/build-wheels output): llama-cpp-python for the "
                        "device's architecture (+cuNNN builds for Jetson) and any dependencies")
    w.add_argument("--wheel-cache", type=Path, metavar="DIR",
                   default=Path(os.environ.get("EDGE_VOICE_WHEEL_CACHE") or Path.home() / ".cache/edge-voice/wheels"),
                   help="portable llama-cpp-python wheels for devices of this machine's kind: built here into "
                        "this folder the first time one is needed (default ~/.cache/edge-voice/wheels)")
    w.add_argument("--no-index", action="store_true", help="devices without internet: pip uses only --wheels")
    w.add_argument("--llama-cmake-args", help="CMAKE_ARGS when llama-cpp-python is compiled on the device")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--models-from", type=Path, metavar="DIR",
                     help="push the profile's installed models from this model root with rsync")
    src.add_argument("--mirror", metavar="DIR|URL",
                     help="fetch on the device from this mirror (a folder here is copied there first)")
    w.add_argument("--pack", action="append", default=[], metavar="[GROUP=]DIR",
                   help="a venue knowledge pack (a directory with pack.toml), checked here first, installed with "
                        "`edge-voice packs install` and named in [knowledge] pack: DIR for every host, GROUP=DIR "
                        "for the hosts under [GROUP] in the --hosts file (repeatable); pack=DIR on a host's line "
                        "in the --hosts file wins")
    f = p.add_argument_group("fleet")
    f.add_argument("--parallel", type=int, default=5, metavar="N", help="hosts at a time (default 5)")
    f.add_argument("--serial", type=int, default=0, metavar="N", help="roll out in waves of N hosts")
    f.add_argument("--max-fail-percent", type=int, default=0, metavar="P",
                   help="stop before the next wave when more than P%% of a wave failed (default 0)")
    f.add_argument("--fleet-key", type=Path, metavar="FILE",
                   help=f"the fleet's public key (`edge-voice fleet keygen`), installed as {FLEET_KEY} and set as "
                        "[rollout] public_key: the device then takes rollouts signed by the fleet (their mirrors "
                        "go in [rollout] mirrors of the --config base)")
    f.add_argument("--start-timeout", type=int, default=300, metavar="S",
                   help="wait this long for the service to become active")
    f.add_argument("--log-dir", type=Path, metavar="DIR", help="one log per host (default: "
                   "~/.local/state/edge-voice/provision/<time>)")
    opts = p.parse_args(argv)

    targets = [parse_target(s, opts.port) for s in opts.targets]
    if opts.hosts:
        targets += load_inventory(opts.hosts, opts.port)
    if not targets:
        raise UsageError("no targets: name user@host[:port] or --hosts FILE")
    seen: set[str] = set()
    for t in targets:
        if t.label in seen:
            raise UsageError(f"{t.label} is named twice")
        seen.add(t.label)
        if t.root:
            t.root = check_root(t.root, f"root= for {t.label}")
        if t.device_id and not DEVICE_ID_RE.match(t.device_id):
            raise UsageError(f"id= for {t.label}: {t.device_id!r} must be 1-64 characters of a-z, 0-9, _ and -")
    if opts.device_id:
        if len(targets) > 1:
            raise UsageError("--device-id names one device: for several, put id=... in the --hosts file")
        if not DEVICE_ID_RE.match(opts.device_id) or opts.device_id == "all":
            raise UsageError(f"--device-id {opts.device_id!r}: 1-64 characters of a-z, 0-9, _ and - (not 'all')")
    if opts.root:
        opts.root = check_root(opts.root, "--root")
    for name in ("identity", "config", "mqtt_password_file", "mqtt_ca_file", "fleet_key"):
        path = getattr(opts, name)
        if path is not None:
            if not path.is_file():
                raise UsageError(f"--{name.replace('_', '-')} {path}: no such file")
            setattr(opts, name, path.resolve())
    for t in targets:
        if t.mqtt_password_file and not t.mqtt_password_file.is_file():
            raise UsageError(f"mqtt_password_file= for {t.label}: {t.mqtt_password_file}: no such file")
    for name in ("wheels", "models_from"):
        path = getattr(opts, name)
        if path is not None:
            if not path.is_dir():
                raise UsageError(f"--{name.replace('_', '-')} {path}: no such directory")
            setattr(opts, name, path.resolve())
    if opts.mirror and not re.match(r"^[a-z][a-z0-9+.-]*://", opts.mirror) and not Path(opts.mirror).is_dir():
        raise UsageError(f"--mirror {opts.mirror}: no such directory (or give a URL)")
    if opts.no_index and not opts.wheels:
        raise UsageError("--no-index needs --wheels DIR with every wheel the devices need")
    if opts.profile:
        profile_models(opts.profile)  # an unknown profile is a usage error before any host is touched
    # Every pack is checked here: a broken one never leaves this machine.
    assign_packs(targets, opts.pack, opts.hosts)
    if opts.parallel < 1 or opts.serial < 0 or not 0 <= opts.max_fail_percent <= 100:
        raise UsageError("--parallel must be >= 1, --serial >= 0 and --max-fail-percent 0..100")
    if opts.ssh_config == "none":
        opts.ssh_config = "/dev/null"
    for tool in ("ssh", "rsync"):
        if shutil.which(tool) is None:
            raise UsageError(f"{tool} is not installed on this machine (apt-get install openssh-client rsync)")
    opts.known_hosts = opts.known_hosts.expanduser().resolve()
    opts.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    if opts.log_dir is None:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        opts.log_dir = base / "edge-voice" / "provision" / time.strftime("%Y%m%d-%H%M%S")
    opts.log_dir = opts.log_dir.resolve()
    return opts, targets


def main(argv: list[str] | None = None) -> int:
    try:
        opts, targets = parse_args(argv)
    except UsageError as err:
        print(f"provision: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    console = Console(max(len(t.label) for t in targets))
    roots = {t.root or opts.root or "/" for t in targets}
    console.say(f"provision: {len(targets)} host{'s' if len(targets) != 1 else ''}"
                + (f", under {', '.join(sorted(roots))}" if roots != {"/"} else "")
                + ("; DRY RUN: checking only, nothing is changed" if opts.dry_run else "")
                + f"; logs in {opts.log_dir}")
    try:
        reports = run_fleet(targets, opts, console)
    except KeyboardInterrupt:
        print("provision: interrupted: hosts may be part-way; run again to finish (every step is repeatable)",
              file=sys.stderr)
        return 130
    return summarize(reports, opts, console)
