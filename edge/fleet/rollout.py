"""``edge-voice fleet rollout`` (and ``keygen``, ``sign``): a signed version of a model or knowledge
pack to many devices, in waves, stopped by an abort rule.

For each wave, every device gets the rollout as retained desired state
(``<prefix>/<id>/desired/rollout``: an offline device reads it when it reconnects, until the
rollout's expiry) and, when online, as a ``rollout`` command, whose answer brings a refusal (a
mirror not on its allow-list, no fleet key) at once. The device then reports ``rollout.progress``
and ``rollout.done`` events and keeps its progress in its retained status. A wave is over when
each of its devices has confirmed, rolled back, failed or refused, or after ``--timeout``
(an online device that has not finished by then counts as failed; an offline one keeps its
desired state and is not counted). A wave with more than ``--max-fail-percent`` failures stops
the rollout (:mod:`edge.fleet.waves`): later waves are not started, and devices of started
waves that have not begun (offline) have their desired state withdrawn.

The plan (waves, rule, what each wave did) is kept retained under
``<prefix>/all/fleet/rollouts/<rollout id>`` and each device's progress in its own status, so
``--resume`` continues a rollout whose operator went away, and shows one that is over.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from edge.fleet.errors import FleetError

_LOGGER = logging.getLogger(__name__)

EXIT_DEVICES_FAILED = 3
TERMINAL = ("confirmed", "rolled_back", "failed", "refused")
FAILED = ("rolled_back", "failed", "refused", "timed out")
COMMANDS = ("rollout", "keygen", "sign")
DEFAULT_WAVE_TIMEOUT_S = 900.0
DEFAULT_EXPIRY_S = 86400.0


# --- the command line ---------------------------------------------------------------------

def add_rollout_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        conn: argparse.ArgumentParser) -> None:
    p = sub.add_parser("rollout", parents=[conn], help="roll a signed model or pack version out in waves",
                       description="Roll a signed version of a model or knowledge pack out to devices in waves: "
                                   "each device fetches it from the mirror, checks the fleet's signature, switches "
                                   "between turns, self-tests and confirms or switches back by itself.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", metavar="ID", help="a model id of the manifest")
    what.add_argument("--pack", metavar="ID", help="a knowledge pack id")
    p.add_argument("--version", metavar="V", help="the version `fleet sign` printed (12 hex digits)")
    p.add_argument("--mirror", metavar="URL", help="the mirror the devices fetch from (on their allow-list)")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="a device (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="devices with this tag (all given)")
    p.add_argument("--all", action="store_true", help="every device with a status")
    p.add_argument("--wave", type=int, metavar="N", help="N devices at a time (default: all in one wave)")
    p.add_argument("--max-fail-percent", type=float, default=0.0, metavar="P",
                   help="stop when more than P%% of a wave fails (default 0: any failure stops)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help=f"how long a wave waits for its devices, offline ones included (default "
                        f"{DEFAULT_WAVE_TIMEOUT_S:g}; with --resume, the rollout's own)")
    p.add_argument("--expiry", type=float, default=DEFAULT_EXPIRY_S, metavar="S",
                   help=f"an offline device picks the rollout up when it reconnects within S s "
                        f"(default {DEFAULT_EXPIRY_S:g})")
    p.add_argument("--public-key", metavar="FILE", help="check the release's signature before sending anything")
    p.add_argument("--no-preflight", action="store_true",
                   help="do not fetch the release manifest from here first (a mirror only devices can reach)")
    p.add_argument("--dry-run", action="store_true", help="list which devices would get what, and stop")
    p.add_argument("--resume", nargs="?", const="", metavar="ROLLOUT_ID",
                   help="continue (or show) a rollout started earlier; without an id, the one still running")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("keygen", help="make the fleet's Ed25519 key pair for signing releases")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="writes PATH.key (private, mode 0600) and PATH.pub (for the devices)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")

    p = sub.add_parser("sign", help="sign a version's files on a mirror, making its release manifest")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="ID")
    what.add_argument("--pack", metavar="ID")
    p.add_argument("--key", required=True, metavar="FILE", help="the fleet's private key (fleet keygen)")
    p.add_argument("--mirror", required=True, metavar="DIR", help="the mirror's directory")
    p.add_argument("--path", metavar="REL", help="the files' directory under the mirror (default: the model's "
                   "manifest dir, or packs/<id>)")
    p.add_argument("--file", action="append", default=[], metavar="NAME",
                   help="sign only these files of a model's directory (repeatable; default: all)")
    p.add_argument("--expires-days", type=float, default=30.0, metavar="D",
                   help="devices refuse the release after D days (default 30)")
    p.add_argument("--label", default="", help="a note kept in the manifest")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")


def run_rollout_command(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from edge.rollout.errors import RolloutError

    try:
        if args.fleet_command == "keygen":
            return _keygen(args, out)
        if args.fleet_command == "sign":
            return _sign(args, out)
        return _rollout(args, out, err)
    except RolloutError as e:
        raise FleetError(e.message, code=e.code) from None


def _keygen(args: argparse.Namespace, out: TextIO) -> int:
    from edge.rollout.release import write_keypair

    base = Path(args.out)
    private, public = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    kid = write_keypair(private, public)
    print(f"fleet key {kid}: private {private} (keep it off the devices), public {public} "
          f"(scripts/provision --fleet-key {public})", file=out)
    return 0


def _sign(args: argparse.Namespace, out: TextIO) -> int:
    from edge.rollout.release import load_private_key
    from edge.rollout.sign import sign_release

    kind, target = ("model", args.model) if args.model else ("pack", args.pack)
    release = sign_release(Path(args.mirror), kind, target, load_private_key(Path(args.key)), path=args.path,
                           files=args.file, expires_days=args.expires_days, label=args.label)
    print(f"signed {kind} {target} version {release.version}: {len(release.files)} file(s), "
          f"{release.total_size} bytes under {release.path}/, valid until "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(release.expires_at))}", file=out)
    print(release.version, file=out)
    return 0


# --- following the devices ----------------------------------------------------------------

@dataclass
class DeviceProgress:
    device_id: str
    # pending | queued | fetching | ... | one of TERMINAL | timed out | not started | cancelled
    state: str = "pending"
    wave: int | None = None
    online: bool = False
    percent: int | None = None
    body: dict[str, Any] = field(default_factory=dict)  # the device's last rollout report
    updated: float = 0.0  # the step of the device's last report taken

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def describe(self) -> str:
        if self.state == "fetching" and self.percent is not None:
            return f"fetching {self.percent}%"
        if self.state == "pending" and not self.online:
            return "offline"
        if self.state == "queued" and not self.online:
            return "offline: queued, gets it when it reconnects"
        text = self.state.replace("_", " ")
        if not self.online and not self.terminal and self.state not in ("not started", "cancelled"):
            text += " (offline)"
        error = self.body.get("error")
        if isinstance(error, dict) and self.state in FAILED:
            message = str(error.get("message") or "")
            text += f": {error.get('code')}: {message if len(message) <= 300 else message[:299] + '…'}"
        if self.state == "confirmed" and self.body.get("detail"):
            text += f" ({self.body['detail']})"
        timings = self.body.get("timings_ms")
        if self.terminal and isinstance(timings, dict) and timings.get("total_ms") is not None:
            text += f" [{timings['total_ms'] / 1000:.1f} s]"
        return text

    def as_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "state": self.state, "wave": self.wave, "online": self.online,
                "error": self.body.get("error"), "timings_ms": self.body.get("timings_ms"),
                "selftest": self.body.get("selftest"), "from": self.body.get("from"),
                "downloaded": self.body.get("downloaded"), "reused": self.body.get("reused")}


class Tracker:
    """Every message the rollout follows: statuses, rollout events, command answers, plans."""

    def __init__(self, client: Any, rollout_id: str = "") -> None:
        from edge.fleet.status import DeviceStatus

        self.client = client
        self.topics = client.topics
        self.rollout_id = rollout_id
        self.cond = threading.Condition()
        self.devices: dict[str, DeviceProgress] = {}
        self.statuses: dict[str, DeviceStatus] = {}
        self.plans: dict[str, dict[str, Any]] = {}
        self.changes: list[DeviceProgress] = []

    def filters(self) -> list[str]:
        t = self.topics
        return [t.status(), t.events("+", "rollout.progress"), t.events("+", "rollout.done"),
                t.answers("+", self.client.safe_id), t.rollout_plan()]

    def follow(self, devices: Sequence[str]) -> None:
        with self.cond:
            for d in devices:
                if d not in self.devices:
                    progress = DeviceProgress(d)
                    status = self.statuses.get(d)
                    progress.online = bool(status and status.online)
                    self.devices[d] = progress
                    rollout = status.body.get("rollout") if status is not None else None
                    if isinstance(rollout, dict):
                        self._update(progress, rollout, announce=False)

    def handle(self, msg: Any) -> None:
        from edge.fleet.status import parse_status

        t = self.topics
        if msg.topic.startswith(t.rollout_plan("")):
            rid = msg.topic[len(t.rollout_plan("")):]
            with self.cond:
                if not msg.payload:
                    self.plans.pop(rid, None)
                else:
                    try:
                        plan = json.loads(msg.payload)
                    except ValueError:
                        return
                    if isinstance(plan, dict):
                        self.plans[rid] = plan
            return
        device = t.device_of(msg.topic)
        if device is None:
            return
        if msg.topic == t.status(device):
            status = parse_status(device, msg.payload)
            with self.cond:
                if status is None:
                    self.statuses.pop(device, None)
                    return
                self.statuses[device] = status
                progress = self.devices.get(device)
                if progress is not None:
                    was = progress.online
                    progress.online = status.online
                    rollout = status.body.get("rollout")
                    if isinstance(rollout, dict):
                        self._update(progress, rollout)
                    elif was and not progress.online:
                        self._announce(progress)  # gone in the middle: its Last Will, or a clean stop
            return
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(body, dict):
            return
        with self.cond:
            progress = self.devices.get(device)
            if progress is None:
                return
            if msg.topic == t.answers(device, self.client.safe_id):
                if body.get("ok") is False and not progress.terminal:
                    progress.body = {"error": body.get("error")}
                    progress.state = "refused"
                    self._announce(progress)
            else:
                self._update(progress, body)

    def _update(self, progress: DeviceProgress, body: Mapping[str, Any], announce: bool = True) -> None:
        if body.get("rollout_id") != self.rollout_id or not isinstance(body.get("state"), str):
            return
        # The device numbers its reports (``step``): its status and its events race to us.
        raw = body.get("step")
        step = float(raw) if isinstance(raw, (int, float)) else 0.0
        if progress.terminal or step <= progress.updated and body.get("state") not in TERMINAL:
            return
        progress.updated = step
        changed = body["state"] != progress.state or (body["state"] == "fetching"
                                                      and body.get("percent") != progress.percent)
        progress.state = body["state"]
        progress.percent = body.get("percent") if isinstance(body.get("percent"), int) else None
        progress.body = dict(body)
        if changed and announce:
            self._announce(progress)

    def _announce(self, progress: DeviceProgress) -> None:
        self.changes.append(DeviceProgress(progress.device_id, progress.state, progress.wave, progress.online,
                                           progress.percent, dict(progress.body), progress.updated))
        self.cond.notify_all()

    def set_state(self, device: str, state: str) -> None:
        with self.cond:
            progress = self.devices[device]
            if progress.state != state and not progress.terminal:
                progress.state = state
                self._announce(progress)

    def wait(self, devices: Sequence[str], deadline: float, show: Callable[[DeviceProgress], None]) -> None:
        """Until every device in ``devices`` is terminal or the deadline passes, showing each change."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.changes) or all(self.devices[d].terminal for d in devices),
                                   max(0.0, deadline - time.monotonic()))
                changes, self.changes = self.changes, []
                over = all(self.devices[d].terminal for d in devices) or time.monotonic() >= deadline
            for change in changes:
                show(change)
            if over and not changes:
                return


# --- the plan ------------------------------------------------------------------------------

@dataclass
class Plan:
    rollout_id: str
    request: dict[str, Any]  # kind, id, version, mirror, expires_at
    waves: list[list[str]]
    wave_size: int | None
    max_fail_percent: float
    timeout_s: float
    skipped: dict[str, str] = field(default_factory=dict)  # device -> why it does not take part
    state: str = "running"  # running | done | stopped
    current_wave: int = 0
    waves_done: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def devices(self) -> list[str]:
        return [d for w in self.waves for d in w]

    def label(self) -> str:
        r = self.request
        return f"{r['kind']} {r['id']} version {r['version']}"

    def as_json(self) -> dict[str, Any]:
        return {"rollout_id": self.rollout_id, "request": self.request, "waves": self.waves,
                "wave_size": self.wave_size, "max_fail_percent": self.max_fail_percent, "timeout_s": self.timeout_s,
                "skipped": self.skipped, "state": self.state, "current_wave": self.current_wave,
                "waves_done": self.waves_done, "stopped": self.stopped, "created": self.created,
                "updated": round(time.time(), 3)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        try:
            return cls(rollout_id=str(data["rollout_id"]), request=dict(data["request"]),
                       waves=[[str(d) for d in w] for w in data["waves"]], wave_size=data.get("wave_size"),
                       max_fail_percent=float(data.get("max_fail_percent", 0.0)),
                       timeout_s=float(data.get("timeout_s", DEFAULT_WAVE_TIMEOUT_S)),
                       skipped=dict(data.get("skipped") or {}), state=str(data.get("state", "running")),
                       current_wave=int(data.get("current_wave", 0)), waves_done=list(data.get("waves_done") or []),
                       stopped=data.get("stopped"), created=float(data.get("created", 0.0)))
        except (KeyError, TypeError, ValueError) as err:
            raise FleetError(f"the retained plan of rollout {data.get('rollout_id')!r} is unreadable ({err})",
                             code="fleet.rollout") from None


def _publish_plan(client: Any, plan: Plan) -> None:
    from edge.mqtt.wire import dumps

    ttl = max(60.0, float(plan.request["expires_at"]) - time.time()) + 7 * 86400
    client.publish(client.topics.rollout_plan(plan.rollout_id), dumps(plan.as_json()), qos=1, retain=True,
                   expiry_s=math.ceil(ttl))


# --- running it ------------------------------------------------------------------------------

def _preflight(kind: str, target: str, version: str, mirror: str, public_key: str | None) -> Any:
    """The release manifest as the devices will get it: known version, signature present (and
    checked, with --public-key), not expired."""
    from edge.rollout.errors import RolloutError
    from edge.rollout.fetch import _get
    from edge.rollout.release import (
        MAX_RELEASE_BYTES,
        MAX_SIGNATURE_BYTES,
        join_url,
        load_public_key,
        parse_release,
        release_paths,
        verify,
    )

    manifest_path, signature_path = release_paths(kind, target, version)
    url = join_url(mirror, manifest_path)
    try:
        raw = _get(url, MAX_RELEASE_BYTES, "release manifest")
    except RolloutError as err:
        if err.code == "rollout.not_found":
            raise FleetError(f"unknown version: the mirror has no release of {kind} {target} version {version} "
                             f"({url}); `edge-voice fleet sign` makes it", code="rollout.unknown_version") from None
        raise
    try:
        signature = _get(join_url(mirror, signature_path), MAX_SIGNATURE_BYTES, "signature")
    except RolloutError as err:
        if err.code == "rollout.not_found":
            raise FleetError(f"{url} has no signature beside it ({signature_path}): devices would refuse it",
                             code="rollout.signature") from None
        raise
    if public_key:
        verify(raw, signature, load_public_key(Path(public_key)), what=url)
    release = parse_release(raw)
    release.check_for(kind, target, version)
    return release


def _uses(status: Any, kind: str, target: str) -> str | None:
    """Why a device does not take part (it does not use that model or pack), or None."""
    if kind == "model":
        models = status.body.get("models")
        if not isinstance(models, dict) or target not in models.values():
            return f"does not use model {target}"
        return None
    knowledge = status.body.get("knowledge")
    if not isinstance(knowledge, dict) or knowledge.get("id") != target:
        return f"does not use pack {target}"
    return None


def _current_version(status: Any, kind: str, target: str) -> str:
    versions = status.body.get("versions") if status is not None else None
    group = versions.get("models" if kind == "model" else "packs") if isinstance(versions, dict) else None
    value = group.get(target) if isinstance(group, dict) else None
    return value if isinstance(value, str) else "?"


class Runner:
    def __init__(self, client: Any, tracker: Tracker, plan: Plan, out: TextIO, err: TextIO, as_json: bool) -> None:
        self.client = client
        self.tracker = tracker
        self.plan = plan
        self.out, self.err, self.as_json = out, err, as_json

    def say(self, text: str) -> None:
        self.err.write(text + "\n")  # one write per line: nothing can come between a line and its end
        self.err.flush()

    def show(self, progress: DeviceProgress) -> None:
        self.say(f"  {progress.device_id:<20} {progress.describe()}")

    def _payload(self, device: str) -> bytes:
        from edge.mqtt.wire import dumps

        return dumps({**self.plan.request, "rollout_id": self.plan.rollout_id,
                      "request_id": f"{self.plan.rollout_id}:{device}"})

    def wave(self, index: int, devices: list[str]) -> list[str]:
        plan, tracker, client, topics = self.plan, self.tracker, self.client, self.client.topics
        plan.current_wave = index
        _publish_plan(client, plan)
        ttl = math.ceil(max(1.0, float(plan.request["expires_at"]) - time.time()))
        self.say(f"wave {index}/{len(plan.waves)}: {' '.join(devices)}")
        for d in devices:
            tracker.devices[d].wave = index
            payload = self._payload(d)
            client.publish(topics.desired(d, "rollout"), payload, qos=1, retain=True, expiry_s=ttl)
            if tracker.devices[d].online and not tracker.devices[d].terminal:
                client.publish(topics.command(d, "rollout"), payload, qos=1,
                               response_topic=topics.answers(d, client.safe_id),
                               correlation=f"{plan.rollout_id}:{d}".encode(), expiry_s=ttl)
            tracker.set_state(d, "queued")
        tracker.wait(devices, time.monotonic() + plan.timeout_s, self.show)
        failed = []
        for d in devices:
            p = tracker.devices[d]
            if not p.terminal:
                if p.online:
                    tracker.set_state(d, "timed out")
                    self.show(p)
                    failed.append(d)
                # an offline device keeps its desired state: not a failure
            elif p.state in FAILED:
                failed.append(d)
        plan.waves_done.append({"index": index, "devices": devices, "failed": failed,
                                "states": {d: tracker.devices[d].state for d in devices}})
        _publish_plan(client, plan)
        return failed

    def run(self, first_wave: int) -> None:
        from edge.fleet.waves import WaveRule, run_waves

        plan = self.plan
        rule = WaveRule(plan.wave_size, plan.max_fail_percent)
        remaining = [d for w in plan.waves[first_wave - 1:] for d in w]

        def wave(n: int, devices: list[str]) -> list[str]:
            return self.wave(first_wave + n - 1, devices)

        def after(outcome: Any, total: int) -> None:
            n = first_wave + outcome.index - 1
            states = [self.tracker.devices[d].state for d in outcome.devices]
            counts = ", ".join(f"{states.count(s)} {s.replace('_', ' ')}" for s in dict.fromkeys(states))
            self.say(f"wave {n}/{len(plan.waves)}: {counts} ({outcome.fail_percent:.0f}% failed)")

        report = run_waves(remaining, rule, wave, after)
        if report.stopped:
            plan.state, plan.stopped = "stopped", f"wave {first_wave + len(report.waves) - 1}: " + \
                report.stopped.split(": ", 1)[-1]
            self.say(f"stopped by the abort rule: {plan.stopped}")
            for d in report.not_started:
                self.tracker.set_state(d, "not started")
            self.cancel_waiting()
        else:
            plan.state = "done"
        _publish_plan(self.client, plan)

    def cancel_waiting(self) -> None:
        """A stopped rollout: devices that have not begun it lose their desired state."""
        for d in self.plan.devices:
            p = self.tracker.devices[d]
            if p.wave is not None and p.state in ("queued", "pending"):
                self.client.publish(self.client.topics.desired(d, "rollout"), b"", qos=1, retain=True)
                self.tracker.set_state(d, "cancelled")
                self.show(p)

    def report(self) -> int:
        plan = self.plan
        devices = [self.tracker.devices[d] for d in plan.devices]
        counts: dict[str, int] = {}
        for p in devices:
            key = "offline (queued)" if p.state in ("queued", "pending") and not p.online else p.state
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())
        if self.as_json:
            print(json.dumps({"rollout_id": plan.rollout_id, "request": plan.request, "state": plan.state,
                              "stopped": plan.stopped, "counts": counts, "skipped": plan.skipped,
                              "devices": [p.as_json() for p in devices]}, indent=2), file=self.out)
        else:
            for p in devices:
                print(f"{p.device_id:<20} wave {p.wave or '-'}  {p.describe()}", file=self.out)
            print(f"rollout {plan.rollout_id} ({plan.label()}): {plan.state}; {summary}"
                  + (f"; {plan.stopped}" if plan.stopped else ""), file=self.out)
        return 0 if devices and all(p.state == "confirmed" for p in devices) else EXIT_DEVICES_FAILED


def _connect(args: argparse.Namespace) -> tuple[Any, Tracker]:
    from edge.fleet.client import FleetClient
    from edge.fleet.config import config_from_args

    client = FleetClient(config_from_args(args), role="rollout")
    client.connect()
    tracker = Tracker(client)
    client.set_handler(tracker.handle)
    try:
        client.subscribe(tracker.filters())
        if not client.sync(15.0):
            raise FleetError(f"the MQTT broker at {client.where} did not deliver the retained statuses within 15 s; "
                             "try again", code="fleet.broker")
    except BaseException:
        client.close()
        raise
    return client, tracker


def _rollout(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.resume is not None:
        return _resume(args, out, err)
    from edge.fleet.waves import WaveRule
    from edge.rollout.release import VERSION_RE, check_mirror_url

    if not (args.model or args.pack) or not args.version or not args.mirror:
        raise FleetError("name what to roll out: --model ID or --pack ID, --version V and --mirror URL "
                         "(or --resume)", code="fleet.usage")
    kind, target = ("model", args.model) if args.model else ("pack", args.pack)
    if kind == "model":
        from edge.models.manifest import load_manifest

        load_manifest().model(target)  # unknown model: one line naming the known ones
    if not VERSION_RE.fullmatch(args.version):
        raise FleetError(f"--version {args.version!r}: expected the 12 hex digits `fleet sign` printed",
                         code="fleet.usage")
    check_mirror_url(args.mirror, "--mirror")
    if args.timeout is None:
        args.timeout = DEFAULT_WAVE_TIMEOUT_S
    if args.timeout <= 0 or args.expiry <= 0:
        raise FleetError("--timeout and --expiry must be positive", code="fleet.usage")
    if args.max_fail_percent and args.wave is None:
        raise FleetError("--max-fail-percent goes with --wave N", code="fleet.usage")
    rule = WaveRule(args.wave, args.max_fail_percent)
    if not args.no_preflight:
        _preflight(kind, target, args.version, args.mirror, args.public_key)
    client, tracker = _connect(args)
    try:
        from edge.fleet.status import select

        statuses = dict(tracker.statuses)
        chosen = select(statuses, devices=args.device, tags=args.tag, everyone=args.all, where=client.where,
                        prefix=client.cfg.prefix)
        skipped = {d: why for d in chosen if (why := _uses(statuses[d], kind, target)) is not None}
        targets = [d for d in chosen if d not in skipped]
        if not targets:
            raise FleetError(f"none of the {len(chosen)} selected device(s) uses {kind} {target} "
                             f"({'; '.join(f'{d}: {w}' for d, w in list(skipped.items())[:5])})",
                             code="fleet.selection")
        rollout_id = f"r{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:4]}"
        request = {"kind": kind, "id": target, "version": args.version, "mirror": args.mirror,
                   "expires_at": round(time.time() + args.expiry, 3)}
        plan = Plan(rollout_id, request, rule.plan(targets), args.wave, args.max_fail_percent, args.timeout, skipped)
        if args.dry_run:
            return _dry_run(plan, tracker, out)
        tracker.rollout_id = rollout_id
        tracker.follow(plan.devices)
        runner = Runner(client, tracker, plan, out, err, args.json)
        runner.say(f"rollout {rollout_id}: {plan.label()} from {args.mirror} to {len(targets)} device(s) in "
                   f"{len(plan.waves)} wave(s)" + (f", stopping when more than {args.max_fail_percent:g}% of a wave "
                                                   "fails" if args.wave else "")
                   + (f"; skipped: {', '.join(f'{d} ({w})' for d, w in skipped.items())}" if skipped else ""))
        runner.run(1)
        return runner.report()
    finally:
        client.close()


def _dry_run(plan: Plan, tracker: Tracker, out: TextIO) -> int:
    r = plan.request
    print(f"would roll {plan.label()} out from {r['mirror']} in {len(plan.waves)} wave(s)"
          + (f" of {plan.wave_size}" if plan.wave_size else "")
          + (f", stopping when more than {plan.max_fail_percent:g}% of a wave fails" if plan.wave_size else ""),
          file=out)
    for i, wave in enumerate(plan.waves, 1):
        for d in wave:
            status = tracker.statuses.get(d)
            state = "online" if status is not None and status.online else "offline: would get it when it reconnects"
            print(f"  wave {i}  {d:<20} {_current_version(status, r['kind'], r['id'])} -> {r['version']}  ({state})",
                  file=out)
    for d, why in plan.skipped.items():
        print(f"  skip    {d:<20} {why}", file=out)
    return 0


def _resume(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client, tracker = _connect(args)
    try:
        with tracker.cond:
            plans = {rid: p for rid, p in tracker.plans.items() if isinstance(p, dict)}
        if args.resume:
            if args.resume not in plans:
                raise FleetError(f"no rollout {args.resume!r} on the MQTT broker at {client.where} (known: "
                                 f"{', '.join(sorted(plans)) or 'none'})", code="fleet.rollout")
            data = plans[args.resume]
        else:
            running = sorted(rid for rid, p in plans.items() if p.get("state") == "running")
            if len(running) != 1:
                raise FleetError(f"{len(running)} rollouts are running ({', '.join(running) or 'none'}); name one: "
                                 f"--resume ROLLOUT_ID (known: {', '.join(sorted(plans)) or 'none'})",
                                 code="fleet.rollout")
            data = plans[running[0]]
        plan = Plan.from_json(data)
        if args.timeout is not None:
            if args.timeout <= 0:
                raise FleetError("--timeout must be positive", code="fleet.usage")
            plan.timeout_s = args.timeout
        tracker.rollout_id = plan.rollout_id
        tracker.follow(plan.devices)
        for w, devices in enumerate(plan.waves, 1):
            for d in devices:
                tracker.devices[d].wave = w if w <= plan.current_wave else None
        runner = Runner(client, tracker, plan, out, err, args.json)
        done = {int(w.get("index", 0)) for w in plan.waves_done}
        if plan.state == "running":
            first = next((i for i in range(1, len(plan.waves) + 1) if i not in done), None)
            if first is None:
                plan.state = "done"
                _publish_plan(client, plan)
            else:
                runner.say(f"resuming rollout {plan.rollout_id} ({plan.label()}) at wave {first}/{len(plan.waves)}")
                runner.run(first)
        for d in plan.devices:
            p = tracker.devices[d]
            if plan.state == "stopped" and p.wave is None and not p.terminal:
                p.state = "not started"
        return runner.report()
    finally:
        client.close()
