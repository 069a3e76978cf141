"""Connection options of the fleet commands: the device's MQTT options under their own names.

Precedence: command-line options, then ``EDGE_VOICE_FLEET__<KEY>`` variables, then the
``[fleet]`` table of the file named by ``--config`` (or ``$EDGE_VOICE_FLEET_CONFIG``), then
the defaults. Every key has an option of the same name (``ca_file`` is ``--ca-file``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.config import MqttConfig, build_section, opt
from edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

CONFIG_ENV = "EDGE_VOICE_FLEET_CONFIG"
ENV_PREFIX = "EDGE_VOICE_FLEET__"


@dataclass(frozen=True)
class FleetConfig:
    host: str = opt("localhost", "Broker host name.")
    port: int = opt(1883, "Broker port.", min=1, max=65535)
    prefix: str = opt("edge", "Topic prefix: the devices' mqtt.prefix.")
    client_id: str = opt("", "MQTT client id; default edge-voice-fleet-<host name>-<random>. A record "
                         "consumer keeps its broker session under this id: give each one its own.")
    username: str = opt("", "User name.")
    password: str = opt("", "Password (prefer password_file or EDGE_VOICE_FLEET__PASSWORD).", secret=True)
    password_file: str = opt("", "File holding the password.")
    tls: bool = opt(False, "Use TLS.")
    ca_file: str = opt("", "CA certificate for the broker.")
    cert_file: str = opt("", "Client certificate (mutual TLS).")
    key_file: str = opt("", "Client key (mutual TLS).")
    keepalive_s: int = opt(30, "Keep-alive interval.", min=5, max=3600)
    connect_timeout_s: float = opt(10.0, "How long to wait for the broker to accept the connection.",
                                   min=0.5, max=600.0)

    def mqtt(self) -> MqttConfig:
        """The same settings as the device's MQTT section (for the shared TLS and password code)."""
        return MqttConfig(enabled=True, host=self.host, port=self.port, prefix=self.prefix,
                          username=self.username, password=self.password, password_file=self.password_file,
                          tls=self.tls, ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
                          keepalive_s=self.keepalive_s, protocol="5")

    def client_id_for(self, role: str) -> str:
        if self.client_id:
            return self.client_id
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"
        return f"edge-voice-{role}-{host}-{uuid.uuid4().hex[:6]}"


def option_name(key: str) -> str:
    """How a key is named in error messages: its command-line option."""
    return "--tls" if key == "tls_on" else "--" + key.replace("_", "-")


_KEYS = tuple(f.name for f in dataclasses.fields(FleetConfig))


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("connection (also [fleet] in --config, or EDGE_VOICE_FLEET__<KEY>)")
    g.add_argument("--config", "-c", metavar="FILE",
                   help=f"a TOML file with a [fleet] table (default: ${CONFIG_ENV})")
    g.add_argument("--host", help="broker host (default localhost)")
    g.add_argument("--port", type=int, help="broker port (default 1883)")
    g.add_argument("--prefix", help="topic prefix of the devices (default edge)")
    g.add_argument("--client-id", metavar="ID", help="MQTT client id (default: generated)")
    g.add_argument("--username", help="broker user name")
    g.add_argument("--password-file", metavar="FILE", help="file holding the broker password")
    g.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    g.add_argument("--ca-file", metavar="FILE", help="CA certificate for the broker")
    g.add_argument("--cert-file", metavar="FILE", help="client certificate (mutual TLS)")
    g.add_argument("--key-file", metavar="FILE", help="client key (mutual TLS)")


def _env_values(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw  # a bare word is a string
        origins[f"fleet.{key}"] = name
    return values, origins


def load_fleet_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> FleetConfig:
    """The file's ``[fleet]`` table, then the environment, then ``overrides`` (options given)."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = environ[CONFIG_ENV]
    table: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: fleet config file not found (--config or ${CONFIG_ENV})",
                              code="config.missing") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: cannot read the fleet config: {err}", code="config.unreadable") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML: {err}") from None
        unknown = sorted(set(data) - {"fleet"})
        if unknown:
            raise ConfigError(f"{p}: {unknown[0]}: unknown section (a fleet config has one table, [fleet])")
        table = dict(data.get("fleet", {})) if isinstance(data.get("fleet", {}), dict) else {"": None}
        if "" in table:
            raise ConfigError(f"{p}: fleet: expected a table")
    env, origins = _env_values(environ)
    table.update(env)
    cfg: FleetConfig = build_section(FleetConfig, table, "fleet", source, origins)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        checked = build_section(FleetConfig, given, "fleet", "command line")
        cfg = dataclasses.replace(cfg, **{k: getattr(checked, k) for k in given})
    return cfg


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    overrides = {key: getattr(args, key) for key in _KEYS if getattr(args, key, None) is not None}
    return load_fleet_config(getattr(args, "config", None), overrides)
