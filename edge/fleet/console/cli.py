"""``edge-voice fleet console``: its options and its run (``edge.fleet.cli`` adds and calls them)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
import threading
from typing import Any

from edge.fleet.console import ConsoleError

_LOGGER = logging.getLogger(__name__)


def add_console_parser(sub: Any, conn: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = sub.add_parser("console", parents=[conn], help="a web page for the fleet: devices, live turns, actions",
                       description="Serve a web page for one fleet (one broker, one prefix): every device's state, "
                                   "the live conversation feed, per-device turns and latency, rollout progress, "
                                   "and the usual actions. Log in with a token from --token-file or "
                                   "$EDGE_VOICE_CONSOLE_TOKEN.")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where to serve the page (127.0.0.1:8080; port 0 picks a free one)")
    p.add_argument("--token-file", metavar="FILE",
                   help="login tokens, one user a line: TOKEN, or NAME TOKEN [operator|viewer] "
                        "(default: $EDGE_VOICE_CONSOLE_TOKEN)")
    p.add_argument("--https-cert", metavar="FILE", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--https-key", metavar="FILE", help="the certificate's private key")
    p.add_argument("--secure-cookie", action="store_true",
                   help="mark the session cookie Secure (behind a TLS-terminating proxy)")
    p.add_argument("--command-timeout", type=float, default=8.0, metavar="S",
                   help="how long a command from the page waits for the devices' answers (8)")
    return p


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_console(args: argparse.Namespace, cfg: Any) -> int:
    from edge.fleet.console.app import Console
    from edge.fleet.console.auth import Auth, load_users
    from edge.fleet.console.server import https_context, listen_address

    host, port = listen_address(args.listen)
    if not 0.5 <= args.command_timeout <= 120:
        raise ConsoleError("--command-timeout must be from 0.5 to 120 seconds", code="console.usage")
    if bool(args.https_cert) != bool(args.https_key):
        raise ConsoleError("--https-cert and --https-key go together", code="console.usage")
    tls = https_context(args.https_cert, args.https_key) if args.https_cert else None
    users, warning = load_users(args.token_file)
    if warning:
        _LOGGER.warning("console: %s", warning)
    console = Console(cfg, Auth(users), command_timeout_s=args.command_timeout, secure_cookie=args.secure_cookie)
    console.connect()
    stop = threading.Event()
    try:
        try:
            bound_host, bound_port = console.serve(host, port, tls)
        except OSError as err:
            raise ConsoleError(f"cannot listen on {args.listen}: {err.strerror or err}; choose another --listen",
                               code="console.listen") from None
        if tls is None and not _loopback(host):
            _LOGGER.warning("console: serving plain HTTP on %s: tokens and cookies cross the network in clear; "
                            "use --https-cert/--https-key or a TLS proxy", host)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "https" if tls else "http"
        with console.model.lock:
            count = len(console.model.devices)
        print(f"console: {scheme}://{shown}:{bound_port}/ for the fleet {cfg.prefix} on {console.client.where} "
              f"({count} device(s) known); Ctrl-C stops", file=sys.stderr, flush=True)

        def handler(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        console.client.on_fatal(stop.set)
        stop.wait()
    finally:
        console.close()
    if console.client.fatal:
        raise ConsoleError(console.client.fatal, code="fleet.session")
    return 0
