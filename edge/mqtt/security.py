"""Broker credentials and TLS from the MQTT config; problems are ConfigErrors naming the key."""

from __future__ import annotations

import ssl
from pathlib import Path

from edge.config import MqttConfig
from edge.errors import ConfigError


def read_password(cfg: MqttConfig) -> str:
    """The broker password from ``password_file``, else ``password`` (which the environment
    may set as EDGE_VOICE_MQTT__PASSWORD). Never logged."""
    if cfg.password_file:
        try:
            return Path(cfg.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            why = getattr(err, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"mqtt.password_file: cannot read {cfg.password_file}: {why}") from None
    return cfg.password


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """A verifying client context (system CAs, or ``ca_file``), with a client certificate for
    mutual TLS; None without TLS."""
    if not cfg.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(cfg, key):
                raise ConfigError(f"mqtt.{key} is set but mqtt.tls is false: set mqtt.tls = true "
                                  "(or remove the file) so the connection is not silently unencrypted")
        return None
    if cfg.key_file and not cfg.cert_file:
        raise ConfigError("mqtt.key_file is set without mqtt.cert_file: mutual TLS needs both")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file or None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"mqtt.ca_file: cannot use {cfg.ca_file}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"mqtt.cert_file/key_file: cannot load {cfg.cert_file}"
                              f"{' and ' + cfg.key_file if cfg.key_file else ''}: "
                              f"{getattr(err, 'strerror', None) or err} (is the key the certificate's, "
                              "PEM, and not password-protected?)") from None
    return ctx
