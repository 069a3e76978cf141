"""Where things are: in this checkout, and on the device (inside --root when given)."""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEVICE_PROGRAM = HERE / "device.py"
MANIFEST = REPO / "models" / "manifest.toml"
CONSTRAINTS = REPO / "scripts" / "constraints.txt"
JETSON_CONSTRAINTS = REPO / "scripts" / "arm64" / "jetson-constraints.txt"
UNIT_SRC = REPO / "systemd" / "edge-voice.service"
SYSUSERS_SRC = REPO / "systemd" / "edge-voice.sysusers.conf"
DEV_CONFIG = REPO / "config" / "dev.toml"

# Where things go on the device (inside --root when given).
VENV = "/opt/edge-voice/venv"
CONFIG = "/etc/edge-voice/config.toml"
CREDENTIAL = "/etc/credstore/edge-voice.mqtt-password"
CA_FILE = "/etc/edge-voice/mqtt-ca.crt"
FLEET_KEY = "/etc/edge-voice/fleet.pub"  # the fleet's public key: rollouts signed by its private key
UNIT = "/etc/systemd/system/edge-voice.service"
MODELS = "/var/lib/edge-voice/models"
PACKS = "/var/lib/edge-voice/packs"  # installed knowledge packs: <state dir>/packs
WORK = "/var/cache/edge-voice-provision"  # wheels pushed from here, llama built on the device
WHEEL_DIR, BUILT_DIR, MIRROR_DIR = WORK + "/wheels", WORK + "/built", WORK + "/mirror"
PACK_STAGING = WORK + "/packs"  # <id>/: the pack as pushed, installed from here
# The service's user and group (systemd/edge-voice.sysusers.conf): the daemon writes new model
# and pack versions (rollouts) under MODELS and PACKS, so those trees are theirs.
SERVICE_USER = SERVICE_GROUP = "edge-voice"
EXTRAS = "device,models"
MARK = "@@provision-result@@"
DEVICE_ID_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
# A fixed timestamp makes the wheel of an unchanged checkout byte-identical, so a second run
# sees nothing to copy or reinstall.
SOURCE_DATE_EPOCH = "315532800"
# Steps whose change means the running daemon must be restarted to pick it up.
RESTART_ON = ("user", "venv", "unit", "config", "secret", "ca", "models", "pack")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

BASE_PACKAGES = ("python3-venv", "python3-dev", "build-essential", "pkg-config", "portaudio19-dev",
                 "libportaudio2", "libspeexdsp1", "libasound2-plugins", "alsa-utils", "libsystemd-dev", "rsync",
                 "ca-certificates")
