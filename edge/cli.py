"""The ``edge-voice`` command: run, simulate, check, models, bench, devices.

User mistakes end in one line on stderr (``edge-voice: error: ...``) and a non-zero exit;
a traceback means a bug in edge-voice.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edge import __version__
from edge.errors import EdgeError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _setup_plain_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="FILE",
                   help="TOML config file (EDGE_VOICE_<SECTION>__<KEY> variables override it)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                   help="override logging.level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-voice", description="Offline voice assistant for kiosks.")
    parser.add_argument("--version", action="version", version=f"edge-voice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run the assistant on the microphone and speaker")
    _add_config(p)

    p = sub.add_parser("simulate", help="run the pipeline with a WAV file as the microphone")
    _add_config(p)
    p.add_argument("--input", "-i", required=True, metavar="IN.wav", help="audio to use as the microphone")
    p.add_argument("--output", "-o", metavar="OUT.wav", help="write the spoken replies here")
    p.add_argument("--realtime", action="store_true", help="feed the input at real-time speed throughout")
    p.add_argument("--summary", action="store_true", help="print the transcript and reply on stderr too")
    p.add_argument("--echo", metavar="GAIN_DB[:DELAY_MS]",
                   help="mix the device's own voice back into the microphone, GAIN_DB relative to the visitor's "
                        "voice (0, -10), DELAY_MS after it plays (default 50), through a synthetic room")

    p = sub.add_parser("check", help="validate a config and that its models are installed")
    _add_config(p)
    p.add_argument("--mqtt-online-since", type=float, metavar="EPOCH",
                   help="instead: wait until the daemon's retained MQTT status says online, started at or after "
                        "EPOCH (seconds; 0: any start); exit 0 when it does, 1 with one line when it does not")
    p.add_argument("--timeout", type=float, metavar="S", help="with --mqtt-online-since: wait at most S seconds "
                   "(default 60)")
    p.add_argument("--json", action="store_true", help="with --mqtt-online-since: print the result as JSON")

    p = sub.add_parser("bench", help="measure the pipeline's latency stage by stage against a sequential baseline")
    p.add_argument("--config", "-c", default="config/dev.toml", metavar="FILE",
                   help="config to measure (default: config/dev.toml)")
    p.add_argument("--profile", choices=("dev", "phi3-shaped", "phi3-mini-q4_0-shaped", "llama3.2-1b-shaped",
                                         "qwen2.5-1.5b-shaped", "qwen2.5-0.5b-shaped"), default="dev",
                   help="dev: the config's models; *-shaped: a random-weight LLM of that model's shapes")
    p.add_argument("--cpu-quota", type=float, metavar="F",
                   help="run as a slower CPU: the whole process held to F of this machine's CPU time (0.05-1)")
    p.add_argument("--slow", action="store_true",
                   help="the CPU quota at which plain Phi-3-mini generation runs at a slow machine's 5 tokens/s")
    p.add_argument("--turns", type=int, default=5, metavar="N", help="scripted turns (default 5)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw a waterfall of the median turn")
    p.add_argument("--timeline", metavar="OUT.png",
                   help="draw what computed when in the median turn (decodes, prefill, generation, synthesis)")
    p.add_argument("--no-plain", action="store_true",
                   help="skip measuring plain llama-cpp-python for the generation-speed comparison")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")

    p = sub.add_parser("eval", help="ask a venue's questions through the pipeline and score the answers")
    _add_config(p)
    p.add_argument("--questions", "-q", required=True, metavar="FILE",
                   help="question file (TOML; see the README); a file inside a pack directory brings the pack")
    p.add_argument("--audio", action="store_true",
                   help="speak each question with the voice and hear it with the wake word and STT")
    p.add_argument("--json", action="store_true", help="print the figures and every answer as JSON")

    p = sub.add_parser("devices", help="list audio devices with their rates and channels")
    p.add_argument("--config", "-c", metavar="FILE", help="also show which devices this config selects")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    from edge.knowledge.cli import add_packs_parser
    from edge.models.cli import add_models_parser

    add_models_parser(sub)
    add_packs_parser(sub)
    from edge.fleet.cli import add_fleet_parser

    add_fleet_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except EdgeError as err:
        print(f"edge-voice: error: {err.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _load(args: argparse.Namespace):
    from edge.config import load_config

    cfg = load_config(args.config)
    _setup_plain_logging(args.log_level or cfg.logging.level)
    return cfg


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "models":
        from edge.models.cli import run_models

        return run_models(args)
    if cmd == "packs":
        from edge.knowledge.cli import run_packs

        return run_packs(args)
    if cmd == "fleet":
        from edge.fleet.cli import run_fleet

        return run_fleet(args)
    if cmd == "simulate":
        from edge.simulate import Echo, simulate, summary_lines

        echo = Echo.parse(args.echo) if args.echo is not None else None
        cfg = _load(args)
        result = simulate(cfg, args.input, args.output, realtime=args.realtime, out=sys.stdout, echo=echo)
        if args.summary:
            for line in summary_lines(result.events):
                print(line, file=sys.stderr)
        return 0
    if cmd == "bench":
        import json

        from edge.devtools.bench import format_report, plot_timeline, plot_waterfall, run_bench

        if args.turns < 1:
            raise EdgeError("--turns must be at least 1", code="usage")
        if args.cpu_quota is not None and not 0.05 <= args.cpu_quota <= 1.0:
            raise EdgeError("--cpu-quota must be between 0.05 and 1", code="usage")
        if args.cpu_quota is not None and args.slow:
            raise EdgeError("--cpu-quota and --slow both set the speed: use one", code="usage")
        cfg = _load(args)
        report = run_bench(cfg, args.profile, args.turns, plain=not args.no_plain, cpu_quota=args.cpu_quota,
                           slow=args.slow, timeline=bool(args.timeline))
        if args.plot:
            plot_waterfall(report, args.plot)
        if args.timeline:
            plot_timeline(report, args.timeline)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0
    if cmd == "eval":
        import json

        from edge.evaluate import run_eval

        cfg = _load(args)
        scored = run_eval(cfg, args.questions, audio=args.audio)
        print(json.dumps(scored.as_dict(), indent=2) if args.json else "\n".join(scored.summary_lines()))
        return 0
    if cmd == "devices":
        from edge.audio.devices import run_devices

        return run_devices(args.config, args.json)
    if cmd == "check":
        if args.mqtt_online_since is None and (args.timeout is not None or args.json):
            raise EdgeError("--timeout and --json go with --mqtt-online-since", code="usage")
        cfg = _load(args)
        if args.mqtt_online_since is not None:
            from edge.mqtt.probe import run_probe

            return run_probe(cfg, args.mqtt_online_since, args.timeout, args.json)
        from edge.check import run_check

        return run_check(cfg)
    if cmd == "run":
        from edge.config import load_config
        from edge.daemon import run_daemon
        from edge.logs import setup_logging

        cfg = load_config(args.config)
        # Under systemd: structured entries in the journal; otherwise plain lines on stderr.
        setup_logging(args.log_level or cfg.logging.level, cfg.device_id)
        return run_daemon(cfg)
    raise AssertionError(cmd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
