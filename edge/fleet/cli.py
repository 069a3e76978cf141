"""``edge-voice fleet``: devices, tail, cmd, record, console, simulate, rollout (with keygen and sign).

``add_fleet_parser(subparsers)`` adds the command to the edge-voice parser; ``run_fleet(args)``
runs it. Exit status: 0 when everything worked, 1 for a mistake or an unreachable broker or
database (one line on stderr), 3 when ``cmd`` reached some devices but not all of them
answered yes (or a wave stopped the rest).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from edge.errors import EdgeError
from edge.fleet.config import add_connection_args, config_from_args
from edge.fleet.errors import FleetError

EXIT_DEVICES_FAILED = 3


def add_fleet_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("fleet", help="see and command a fleet of devices over MQTT",
                                   description="The operator's side: devices, live events, commands, recording.")
    conn = argparse.ArgumentParser(add_help=False)
    add_connection_args(conn)
    conn.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    sub = parser.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)

    p = sub.add_parser("devices", parents=[conn], help="every device's retained status as a table")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="only this device (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="only devices with this tag (all given)")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("tail", parents=[conn], help="live events, one line each")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="only this device (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="only devices with this tag (all given)")
    p.add_argument("--type", action="append", default=[], metavar="TYPE",
                   help="only this event type, e.g. transcript.final (repeatable)")
    p.add_argument("--share", metavar="GROUP", help="split the stream with the other tails of GROUP "
                   "(MQTT v5 shared subscription)")
    p.add_argument("--json", action="store_true", help="print each event as its JSON")
    p.add_argument("--count", type=int, metavar="N", help="stop after N events")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")

    p = sub.add_parser("cmd", parents=[conn], help="send a command and gather the answers",
                       description="Send a command to devices (MQTT v5 request/response) and wait for each "
                                   "answer. ARGS: key=value (numbers and true/false are typed), key:=JSON, or a "
                                   "single value for a one-field command: `cmd say 'Welcome!' --all`, "
                                   "`cmd volume 0.4 --tag site:paris`, `cmd set key=llm.temperature value=0.2 "
                                   "--device kiosk-7`.")
    p.add_argument("name", metavar="NAME", help="say, ask, listen, cancel, mute, unmute, volume, set, "
                   "reload-models, status, handset")
    p.add_argument("args", nargs="*", metavar="ARGS")
    p.add_argument("--payload", metavar="JSON", help="the command's fields as one JSON object")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="a device (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="devices with this tag (all given)")
    p.add_argument("--all", action="store_true", help="every device with a status")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wait this long for answers (10)")
    p.add_argument("--expiry", type=float, metavar="S",
                   help="a device that gets the command later than this refuses it (default: --timeout)")
    p.add_argument("--wave", type=int, metavar="N", help="send to N devices at a time, a wave after the other")
    p.add_argument("--max-fail-percent", type=float, default=0.0, metavar="P",
                   help="with --wave: stop when more than P%% of a wave fails (default 0)")
    p.add_argument("--skip-offline", action="store_true", help="leave offline devices out instead of failing them")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("record", parents=[conn], help="store every event in a database",
                       description="Store every event in SQLite (a file) or PostgreSQL (a URL), each once.")
    p.add_argument("--db", required=True, metavar="PATH|URL", help="an SQLite file, or postgresql://user@host/db")
    p.add_argument("--share", metavar="GROUP", help="split the stream with the other recorders of GROUP")
    p.add_argument("--session-expiry", type=int, default=86400, metavar="S",
                   help="how long the broker keeps events for this consumer while it is away (86400)")
    p.add_argument("--json", action="store_true", help="print the final counts as JSON")

    from edge.fleet.console.cli import add_console_parser

    add_console_parser(sub, conn)

    p = sub.add_parser("simulate", parents=[conn], help="simulated devices (the real MQTT bridge, no models)")
    p.add_argument("--devices", type=int, required=True, metavar="N")
    p.add_argument("--processes", type=int, default=0, metavar="P",
                   help="worker processes (default: 1 per 125 devices)")
    p.add_argument("--turn-interval", type=float, default=20.0, metavar="S", help="a turn every S s per device (20)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: at Ctrl-C)")
    p.add_argument("--stem", default="sim", help="device ids are STEM-00000, STEM-00001, ... (sim)")
    p.add_argument("--state-dir", metavar="DIR", help="outboxes here (default: a temporary directory)")
    from edge.fleet.rollout import add_rollout_parsers

    add_rollout_parsers(sub, conn)  # rollout, keygen, sign (edge.fleet.rollout)
    parser.set_defaults(handler=run_fleet)
    return parser


def _until_signal(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_fleet(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    command = args.fleet_command
    from edge.fleet.rollout import COMMANDS as ROLLOUT_COMMANDS

    if command in ROLLOUT_COMMANDS:
        from edge.fleet.rollout import run_rollout_command

        return run_rollout_command(args)
    cfg = config_from_args(args)
    if command == "simulate":
        return _simulate(args, cfg)
    if command == "record":
        return _record(args, cfg)
    if command == "console":
        from edge.fleet.console.cli import run_console

        return run_console(args, cfg)
    from edge.fleet.client import FleetClient

    client = FleetClient(cfg, role=command)
    client.connect()
    try:
        if command == "devices":
            return _devices(args, client)
        if command == "tail":
            return _tail(args, client)
        if command == "cmd":
            return _cmd(args, client)
    finally:
        client.close()
    raise AssertionError(command)


def _devices(args: argparse.Namespace, client: Any) -> int:
    from edge.fleet.status import read_statuses, select, summary, table

    statuses = read_statuses(client)
    if args.device or args.tag:
        chosen = select(statuses, devices=args.device, tags=args.tag, where=client.where, prefix=client.cfg.prefix)
        statuses = {d: statuses[d] for d in chosen}
    if args.json:
        print(json.dumps([s.as_json() for _, s in sorted(statuses.items())], indent=2, ensure_ascii=False))
        return 0
    if not statuses:
        print(f"no devices under {client.cfg.prefix}/+/status on {client.where}", file=sys.stderr)
        return 0
    for line in table(statuses.values()):
        print(line)
    print(summary(statuses), file=sys.stderr)
    return 0


def _tail(args: argparse.Namespace, client: Any) -> int:
    from edge.fleet.tail import Tail

    if args.count is not None and args.count < 1:
        raise FleetError("--count must be at least 1", code="fleet.usage")
    tail = Tail(client, devices=args.device, tags=args.tag, types=args.type, share=args.share,
                as_json=args.json, count=args.count)
    tail.start()
    _until_signal(tail.done.set)
    tail.wait(args.duration)
    if client.fatal:
        raise FleetError(client.fatal, code="fleet.session")
    return 0


def _cmd(args: argparse.Namespace, client: Any) -> int:
    from edge.fleet.cmd import build_payload, run_command
    from edge.fleet.status import StatusBoard, select
    from edge.fleet.waves import WaveRule

    payload = build_payload(args.name, args.args, args.payload)
    if args.timeout <= 0 or (args.expiry is not None and args.expiry <= 0):
        raise FleetError("--timeout and --expiry must be positive", code="fleet.usage")
    if args.max_fail_percent and args.wave is None:
        raise FleetError("--max-fail-percent goes with --wave N", code="fleet.usage")
    rule = WaveRule(args.wave, args.max_fail_percent)
    board = StatusBoard(client)
    client.set_handler(board.handle)
    statuses = dict(board.load())
    targets = select(statuses, devices=args.device, tags=args.tag, everyone=args.all, where=client.where,
                     prefix=client.cfg.prefix)

    def progress(outcome: Any, total: int) -> None:
        if total > 1 and not args.json:
            print(f"wave {outcome.index}/{total}: {len(outcome.devices) - len(outcome.failed)} of "
                  f"{len(outcome.devices)} ok", file=sys.stderr)

    report = run_command(client, statuses, targets, args.name, payload, rule=rule, timeout_s=args.timeout,
                         expiry_s=args.expiry, board=board, skip_offline=args.skip_offline, on_wave=progress)
    if args.json:
        print(json.dumps(report.as_json(), indent=2, ensure_ascii=False))
    else:
        for r in sorted(report.results.values(), key=lambda r: r.device_id):
            if not r.ok:
                detail = r.error_text()
                print(f"  {r.device_id:<20} {r.outcome}{': ' + detail if detail else ''}")
        print(report.summary())
    return 0 if report.ok else EXIT_DEVICES_FAILED


def _record(args: argparse.Namespace, cfg: Any) -> int:
    from edge.fleet.record import Recorder

    if args.session_expiry < 0:
        raise FleetError("--session-expiry must be 0 or more seconds", code="fleet.usage")
    recorder = Recorder(cfg, args.db, share=args.share, session_expiry_s=args.session_expiry)
    recorder.open()
    _until_signal(recorder.stop)
    client = recorder.client
    stats = recorder.run()
    print(json.dumps(stats.as_json()) if args.json else stats.line(), flush=True)
    if client is not None and client.fatal:
        raise FleetError(client.fatal, code="fleet.session")
    return 0


def _simulate(args: argparse.Namespace, cfg: Any) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from edge.fleet.simulate import start_workers

    if args.devices < 1 or args.turn_interval <= 0:
        raise FleetError("--devices must be at least 1 and --turn-interval positive", code="fleet.usage")
    if cfg.tls:
        raise FleetError("fleet simulate connects without TLS; point it at a plain listener", code="fleet.usage")
    own_dir = args.state_dir is None
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="edge-fleet-sim-"))
    state.mkdir(parents=True, exist_ok=True)
    processes = args.processes
    stop = threading.Event()
    _until_signal(stop.set)
    workers = start_workers(devices=args.devices, processes=processes, host=cfg.host, port=cfg.port,
                            prefix=cfg.prefix, state_dir=state, log_dir=state, stem=args.stem,
                            username=cfg.username, password_file=cfg.password_file)
    try:
        for w in workers:
            w.wait_for("ready", 120)
        for w in workers:
            w.send(f"start {args.turn_interval}")
        print(f"simulating {args.devices} device(s) in {len(workers)} process(es) against {cfg.host}:{cfg.port}, "
              f"a turn every {args.turn_interval:g} s each; Ctrl-C stops", file=sys.stderr)
        started = time.monotonic()
        stop.wait(args.duration)
        finals = [w.quit() for w in workers]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
    devices = {k: v for f in finals if f for k, v in f["devices"].items()}
    emitted = sum(d["emitted"] for d in devices.values())
    left = sum(d["depth"] for d in devices.values())
    dropped = sum(d["dropped"] for d in devices.values())
    print(f"simulate: {len(devices)} device(s) ran {time.monotonic() - started:.0f} s, emitted {emitted} event(s); "
          f"{left} still in outboxes, {dropped} dropped")
    if len(devices) != args.devices:
        raise EdgeError(f"only {len(devices)} of {args.devices} simulated devices reported back; see the "
                        f"sim-worker-*.log files in {state}", code="fleet.simulate")
    if own_dir:
        shutil.rmtree(state, ignore_errors=True)
    return 0
