"""Broker credentials and TLS from the MQTT config; problems are ConfigErrors naming the key.

The fleet side uses the same code with its own names for the keys (``name``: ``"ca_file"`` →
``"--ca-file (fleet.ca_file)"``).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from edge.config import MqttConfig
from edge.errors import ConfigError

# A config key's name as the user sees it; "tls_on" names the way to turn TLS on.
Names = Callable[[str], str]


def _mqtt_key(key: str) -> str:
    return "mqtt.tls = true" if key == "tls_on" else f"mqtt.{key}"


def read_password(cfg: MqttConfig, name: Names = _mqtt_key) -> str:
    """The broker password from ``password_file``, else ``password`` (which the environment
    may set as EDGE_VOICE_MQTT__PASSWORD). Never logged."""
    if cfg.password_file:
        try:
            return Path(cfg.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            why = getattr(err, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"{name('password_file')}: cannot read {cfg.password_file}: {why}") from None
    return cfg.password


def tls_context(cfg: MqttConfig, name: Names = _mqtt_key) -> ssl.SSLContext | None:
    """A verifying client context (system CAs, or ``ca_file``), with a client certificate for
    mutual TLS; None without TLS."""
    if not cfg.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(cfg, key):
                raise ConfigError(f"{name(key)} is set but {name('tls')} is false: set {name('tls_on')} "
                                  "(or remove the file) so the connection is not silently unencrypted")
        return None
    if cfg.key_file and not cfg.cert_file:
        raise ConfigError(f"{name('key_file')} is set without {name('cert_file')}: mutual TLS needs both")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file or None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"{name('ca_file')}: cannot use {cfg.ca_file}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"{name('cert_file')}/{name('key_file')}: cannot load {cfg.cert_file}"
                              f"{' and ' + cfg.key_file if cfg.key_file else ''}: "
                              f"{getattr(err, 'strerror', None) or err} (is the key the certificate's, "
                              "PEM, and not password-protected?)") from None
    return ctx
