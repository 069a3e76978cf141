"""The steps for one host, each "check, then change if needed", in the order ``plan`` gives.

A step returns (status, detail): ``ok``, ``changed``, ``needed`` (a dry run's "would change"),
``skipped``; HostFailure stops this host (the others go on). Most steps are one action of the
device program; wheels, models from ``--models-from`` and packs also use rsync.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioning.config import profile_models, render_config, sanitize_id, set_keys
from provisioning.constants import (
    BASE_PACKAGES,
    BUILT_DIR,
    CA_FILE,
    CONFIG,
    CREDENTIAL,
    DEV_CONFIG,
    DEVICE_ID_RE,
    EXTRAS,
    FLEET_KEY,
    MIRROR_DIR,
    MODELS,
    PACK_STAGING,
    PACKS,
    REPO,
    RESTART_ON,
    SERVICE_GROUP,
    SERVICE_USER,
    SYSUSERS_SRC,
    UNIT,
    UNIT_SRC,
    VENV,
    WHEEL_DIR,
)
from provisioning.errors import HostFailure
from provisioning.kinds import Kind, classify
from provisioning.remote import HostLog, Remote, b64
from provisioning.report import SHOWN, Console, HostReport, StepResult, human, plural
from provisioning.targets import Target
from provisioning.wheels import Artifacts, Stage, sha256


class Provisioner:
    def __init__(self, target: Target, opts: argparse.Namespace, art: Artifacts, console: Console,
                 control_dir: Path, log_path: Path) -> None:
        self.t, self.opts, self.art, self.console = target, opts, art, console
        self.root = target.root or opts.root or "/"
        self.apply = not opts.dry_run
        self.log = HostLog(log_path)
        self.report = HostReport(target, log_path)
        self.remote = Remote(target, opts, control_dir, self.log)
        self.facts: dict[str, Any] = {}
        self.kind: Kind | None = None
        self.changed: list[str] = []
        self.pending = False
        self.since = 0.0

    # Each step returns (status, detail); HostFailure stops this host.
    def record(self, step: str, status: str, detail: str) -> None:
        self.report.steps.append(StepResult(step, status, detail))
        self.log.write(f"== {step}: {SHOWN.get(status, status)}: {detail}")
        self.console.line(self.t.label, step, status, detail)
        if status == "changed" and step in RESTART_ON:
            self.changed.append(step)
        if status == "needed":
            self.pending = True

    def device(self, action: str, timeout: float = 600, **args: Any) -> tuple[str, str]:
        res = self.remote.call(action, dict(args, root=self.root, apply=self.apply), timeout)
        if res["status"] == "failed":
            raise HostFailure(res["detail"])
        if action == "service":
            self.since = float(res.get("since", 0.0))
        return res["status"], res["detail"]

    def run(self) -> HostReport:
        self.log.write(f"== provisioning {self.t.label} (root {self.root}, "
                       f"{'dry run' if self.opts.dry_run else 'applying changes'})")
        step = "connect"
        try:
            for step, fn in self.plan():
                self.record(step, *fn())
        except HostFailure as err:
            self.report.failure, self.report.failed_step = str(err), step
            self.record(step, "failed", str(err))
        except Exception as err:  # a bug here must not take the other hosts down
            self.report.failure, self.report.failed_step = f"internal error: {err!r}", step
            self.record(step, "failed", f"internal error: {err!r} (see the log)")
            self.log.write(traceback.format_exc())
        finally:
            try:
                self.remote.close()
            except (OSError, subprocess.SubprocessError):
                pass
            self.log.close()
        return self.report

    def plan(self) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
        steps: list[tuple[str, Callable[[], tuple[str, str]]]] = [
            ("connect", self.step_connect), ("packages", self.step_packages), ("user", self.step_user),
            ("wheels", self.step_wheels), ("llama", self.step_llama), ("venv", self.step_venv),
            ("unit", self.step_unit), ("config", self.step_config)]
        if self.password_file():
            steps.append(("secret", self.step_secret))
        if self.opts.mqtt_ca_file:
            steps.append(("ca", self.step_ca))
        if self.opts.fleet_key:
            steps.append(("rollout", self.step_fleet_key))
        steps.append(("models", self.step_models))
        if self.t.pack is not None:
            steps.append(("pack", self.step_pack))
        steps += [("enable", self.step_enable), ("start", self.step_start)]
        if self.opts.mqtt_host:
            steps.append(("mqtt", self.step_mqtt))
        steps.append(("check", self.step_check))
        return steps

    def password_file(self) -> Path | None:
        return self.t.mqtt_password_file or self.opts.mqtt_password_file

    # -- connect ---------------------------------------------------------------------------------
    def step_connect(self) -> tuple[str, str]:
        self.remote.connect()
        res = self.remote.call("facts", {"root": self.root})
        self.facts = f = res["facts"]
        self.log.write("facts: " + json.dumps(f, sort_keys=True))
        self.kind = classify(f)
        if f["uid"] != 0:
            self.remote.sudo = True
        if self.root != "/":
            ros = f.get("root_os") or {}
            if ros and (ros.get("ID"), ros.get("VERSION_ID")) != (f["os"].get("ID"), f["os"].get("VERSION_ID")):
                raise HostFailure(f"{self.root} holds {ros.get('PRETTY_NAME', ros.get('ID'))} but the machine runs "
                                  f"{f['os'].get('PRETTY_NAME')}: build an image on a machine of the same kind")
        elif not f["systemd"]:
            raise HostFailure("systemd is not running on the device (no /run/systemd/system): "
                              "edge-voice runs as a systemd service")
        where = f", installing under {self.root}" if self.root != "/" else ""
        return "ok", f"{self.kind.label}, Python {f['python']}{where}"

    # -- packages and user -------------------------------------------------------------------------
    def stage(self) -> Stage:
        assert self.kind is not None
        return self.art.stage(self.kind, self.facts["python"], self.log.write)

    def step_packages(self) -> tuple[str, str]:
        packages = list(BASE_PACKAGES) + ([] if self.stage().llama else ["cmake"])
        return self.device("packages", timeout=4000, packages=packages)

    def step_user(self) -> tuple[str, str]:
        return self.device("user", content=b64(SYSUSERS_SRC.read_bytes()))

    # -- wheels, llama, venv ---------------------------------------------------------------------
    def step_wheels(self) -> tuple[str, str]:
        stage = self.stage().dir
        changes = self.remote.rsync([f"{stage}/"], self.inside(WHEEL_DIR) + "/",
                                    ["-r", "-p", "--checksum", "--delete", "--chmod=D0755,F0644"], not self.apply)
        files = [c for c in changes if c[0][1] == "f" or c[0] == "*deleting"]
        names = sorted(Path(p).name for p in stage.iterdir())
        if not files:
            return "ok", f"{len(names)} files in {WHEEL_DIR} are current"
        size = sum(c[1] for c in files if c[0] != "*deleting")
        verb = "copy" if not self.apply else "copied"
        what = ", ".join(c[2] for c in files[:4]) + (", ..." if len(files) > 4 else "")
        return ("changed" if self.apply else "needed"), f"{'would ' if not self.apply else ''}{verb} " \
            f"{plural(len(files), 'file')} ({human(size)}) to {WHEEL_DIR}: {what}"

    def step_llama(self) -> tuple[str, str]:
        st = self.stage()
        assert self.kind is not None
        if st.llama is not None:
            return "ok", f"llama-cpp-python {st.why}"
        if not self.apply and self.opts.wheel_cache is not None and self.art.builds_here(self.kind):
            return "needed", st.why  # the wheel is built here, once, when the changes are made
        cmake = self.opts.llama_cmake_args or self.kind.cmake_args
        return self.device("llama-build", timeout=8000, built_dir=BUILT_DIR, version=self.art.llama_version,
                           cmake_args=cmake, cuda=self.kind.cuda)

    def step_venv(self) -> tuple[str, str]:
        st = self.stage()
        edge, llama = next(st.dir.glob("edge_voice-*.whl")), st.llama
        return self.device("venv", timeout=4000, venv=VENV, wheel_dir=WHEEL_DIR, built_dir=BUILT_DIR,
                           edge_wheel=edge.name, edge_sha256=sha256(edge), extras=EXTRAS,
                           llama_wheel=llama.name if llama else None, llama_sha256=sha256(llama) if llama else None,
                           llama_version=self.art.llama_version, constraints_sha256=sha256(st.dir / "constraints.txt"),
                           no_index=self.opts.no_index)

    # -- files -----------------------------------------------------------------------------------
    def step_unit(self) -> tuple[str, str]:
        return self.device("file", path=UNIT, content=b64(UNIT_SRC.read_bytes()), mode="0644")

    def device_id(self) -> str | None:
        explicit = self.t.device_id or self.opts.device_id
        if explicit:
            return explicit
        return sanitize_id(self.facts.get("hostname", "").split(".")[0])

    def step_config(self) -> tuple[str, str]:
        assert self.kind is not None
        base_path = self.opts.config or (DEV_CONFIG if self.profile() == "dev" else None)
        base = base_path.read_text(encoding="utf-8") if base_path else ""
        # Only the file's name: the same base from another checkout must not count as a change.
        base_name = str(base_path.relative_to(REPO)) if base_path and base_path.is_relative_to(REPO) \
            else (base_path.name if base_path else "the built-in defaults")
        mqtt: dict[str, Any] = {}
        o = self.opts
        if o.mqtt_host:
            mqtt = {"enabled": True, "host": o.mqtt_host, "port": o.mqtt_port}
            if o.mqtt_prefix:
                mqtt["prefix"] = o.mqtt_prefix
            user = self.t.mqtt_username or o.mqtt_username
            if user:
                mqtt["username"] = user
            if o.mqtt_tls or o.mqtt_ca_file:
                mqtt["tls"] = True
            if o.mqtt_ca_file:
                mqtt["ca_file"] = CA_FILE
        device_id = self.device_id()
        if device_id and not DEVICE_ID_RE.match(device_id):
            raise HostFailure(f"device id {device_id!r} must be 1-64 characters of a-z, 0-9, _ and -")
        pack = self.t.pack.id if self.t.pack is not None else None
        text = render_config(base, base_name, device_id, mqtt, self.stage().gpu, pack)
        if o.fleet_key:
            text = set_keys(text, "rollout", {"public_key": FLEET_KEY})
        status, detail = self.device("file", path=CONFIG, content=b64(text.encode()), mode="0640", group="edge-voice",
                                     validate="config", venv=VENV)
        return status, detail + (f" (device id {device_id})" if device_id else " (device id: the host name)")

    def step_secret(self) -> tuple[str, str]:
        path = self.password_file()
        assert path is not None
        secret = path.read_bytes().rstrip(b"\r\n")
        status, detail = self.device("file", path=CREDENTIAL, content=b64(secret), mode="0600",
                                     dir_mode="0700")
        return status, detail.replace(CREDENTIAL, CREDENTIAL + " (MQTT password)", 1)

    def step_ca(self) -> tuple[str, str]:
        return self.device("file", path=CA_FILE, content=b64(self.opts.mqtt_ca_file.read_bytes()), mode="0644")

    def step_fleet_key(self) -> tuple[str, str]:
        return self.device("file", path=FLEET_KEY, content=b64(self.opts.fleet_key.read_bytes()), mode="0644")

    # -- models ----------------------------------------------------------------------------------
    def profile(self) -> str:
        assert self.kind is not None
        return self.opts.profile or self.kind.profile

    def step_models(self) -> tuple[str, str]:
        """The profile's models, then the whole model tree owned by the service: rollouts make the
        daemon write new versions and state.json there, and rsync or a fetch run as root."""
        return self.owned(MODELS, *self.models_content())

    def models_content(self) -> tuple[str, str]:
        profile = self.profile()
        ids = profile_models(profile)
        src = self.opts.models_from
        if src is not None:
            missing = [i for i in ids if not (src / i / "state.json").is_file()]
            if missing:
                raise HostFailure(f"--models-from {src} lacks {', '.join(missing)} of profile {profile}: run "
                                  f"`edge-voice models fetch --profile {profile} --root {src}` first")
            changes = self.remote.rsync([f"{src}/./{i}" for i in ids], self.inside(MODELS) + "/",
                                        ["-r", "-l", "-p", "-t", "-O", "-R", "--chmod=D0755,F0644",
                                         "--exclude=.staging-*",
                                         "--exclude=.trash-*", "--exclude=.*.tmp", "--exclude=.lock"],
                                        not self.apply, timeout=4 * 3600)
            files = [c for c in changes if c[0][1] == "f"]
            if not changes:
                return "ok", f"the {len(ids)} models of profile {profile} in {MODELS} match {src}"
            size = sum(c[1] for c in files)
            models = sorted({c[2].split("/")[0] for c in changes})
            lead = "would copy" if not self.apply else "copied"
            return ("changed" if self.apply else "needed"), \
                f"{lead} {plural(len(files), 'file')} ({human(size)}) from {src}: {', '.join(models)}"
        mirror, pushed = self.opts.mirror, False
        if mirror and not re.match(r"^[a-z][a-z0-9+.-]*://", mirror):
            changes = self.remote.rsync([f"{Path(mirror).resolve()}/"], self.inside(MIRROR_DIR) + "/",
                                        ["-r", "-l", "-p", "-t", "-O", "--chmod=D0755,F0644"], not self.apply,
                                        timeout=4 * 3600)
            self.log.write(f"mirror copy: {len(changes)} changes")
            mirror, pushed = MIRROR_DIR, True
        return self.device("models-fetch", timeout=4 * 3600, venv=VENV, profile=profile, mirror=mirror,
                           mirror_pushed=pushed)

    def owned(self, path: str, status: str, detail: str) -> tuple[str, str]:
        """A step's result, with the tree at ``path`` made the service user's (what that changed)."""
        own_status, own_detail = self.device("owner", path=path, owner=SERVICE_USER, group=SERVICE_GROUP)
        if own_status == "ok":
            return status, detail
        if status == "ok":
            return own_status, ("would " if own_status == "needed" else "") + own_detail
        return status, f"{detail}; {own_detail}"

    # -- knowledge pack --------------------------------------------------------------------------
    def step_pack(self) -> tuple[str, str]:
        """Push the pack (checked on this machine already) to a staging folder, install it there
        with `edge-voice packs install` (atomic, the previous version kept), and leave the packs
        owned by the service. The config step names it in [knowledge] pack."""
        pack = self.t.pack
        assert pack is not None
        staging = f"{PACK_STAGING}/{pack.id}"
        flags = ["-r", "-p", "--checksum", "--delete", "--chmod=D0755,F0644",
                 *[f"--include=/{n}" for n in pack.files], "--exclude=*"]
        # The staging folder only holds what was pushed: copying it again changes nothing the
        # daemon reads, so the step's result is the install's.
        changes = self.remote.rsync([f"{pack.dir}/"], self.inside(staging) + "/", flags, not self.apply)
        self.log.write(f"pack staging {staging}: {len(changes)} changes")
        status, detail = self.device("pack", timeout=600, venv=VENV, staging=staging, packs=PACKS, pack_id=pack.id,
                                     digest=pack.digest, label=pack.label)
        return self.owned(PACKS, status, detail)

    # -- systemd ---------------------------------------------------------------------------------
    def step_enable(self) -> tuple[str, str]:
        return self.device("enable")

    def step_start(self) -> tuple[str, str]:
        if self.root != "/":
            return "skipped", (f"not started: a service cannot run in an alternate root ({self.root}); "
                               "it starts when that system boots")
        if not self.apply and self.pending:
            pending = sorted({s.step for s in self.report.steps if s.status == "needed"} & set(RESTART_ON))
            if pending:
                return "needed", f"would restart edge-voice after the changes above ({', '.join(pending)}) " \
                                 "and wait until it is active"
        return self.device("service", timeout=self.opts.start_timeout + 120, changed=self.changed,
                           timeout_s=self.opts.start_timeout)

    def step_mqtt(self) -> tuple[str, str]:
        if self.root != "/":
            return "skipped", "the MQTT status cannot be online: the service does not run in an alternate root"
        if not self.apply:
            return "skipped", "dry run: the MQTT status is checked after the service starts"
        return self.device("mqtt", timeout=self.opts.mqtt_timeout + 60, venv=VENV, config=CONFIG,
                           since=self.since, password_file=CREDENTIAL if self.password_file() else "",
                           timeout_s=self.opts.mqtt_timeout)

    def step_check(self) -> tuple[str, str]:
        return self.device("check", venv=VENV, config=CONFIG, pending=self.pending)

    def inside(self, path: str) -> str:
        return path if self.root == "/" else self.root + path
