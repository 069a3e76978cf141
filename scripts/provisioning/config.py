"""The device's config file and the manifest's model profiles.

The config is the base config (``--config``, ``config/dev.toml`` for ``--profile dev``, or the
defaults) with the keys provisioning owns set in place: ``[device] id``, ``[mqtt]``, ``[llm]
n_gpu_layers`` on a GPU, ``[rollout] public_key`` and ``[knowledge] pack``. Comments and every
other key stay as they are.
"""

from __future__ import annotations

import json
import re
from typing import Any

from provisioning.constants import CREDENTIAL, MANIFEST, REPO
from provisioning.errors import UsageError


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


_HEADER_RE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")


def set_keys(text: str, section: str, values: dict[str, Any], keep_existing: bool = False) -> str:
    """Set ``key = value`` lines in ``[section]`` of a TOML text, keeping everything else
    (comments included) as it is. Keys are replaced where they are, or added at the end of the
    section; the section is added at the end when missing."""
    if not values:
        return text
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if (m := _HEADER_RE.match(ln)) and m.group(1) == section), None)
    if start is None:
        lines = lines + ([""] if lines and lines[-1].strip() else []) + [f"[{section}]"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if _HEADER_RE.match(lines[i])), len(lines))
    todo = dict(values)
    for i in range(start + 1, end):
        m = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", lines[i])
        if m and m.group(1) in todo:
            value = todo.pop(m.group(1))
            if not keep_existing:
                lines[i] = f"{m.group(1)} = {toml_value(value)}"
    last = end
    while last > start + 1 and not lines[last - 1].strip():
        last -= 1
    lines[last:last] = [f"{k} = {toml_value(v)}" for k, v in todo.items()]
    return "\n".join(lines) + "\n"


def render_config(base: str, base_name: str, device_id: str | None, mqtt: dict[str, Any], gpu: bool,
                  pack: str | None = None) -> str:
    text = base
    if device_id:
        text = set_keys(text, "device", {"id": device_id})
    if mqtt:
        text = set_keys(text, "mqtt", mqtt)
    if gpu:
        text = set_keys(text, "llm", {"n_gpu_layers": -1}, keep_existing=True)  # everything on the GPU
    if pack:
        text = set_keys(text, "knowledge", {"pack": pack})  # an installed pack's id (the pack step)
    header = (f"# /etc/edge-voice/config.toml, written by scripts/provision from {base_name}: the next run\n"
              "# replaces edits made here. The MQTT password is not here: it is a systemd credential\n"
              f"# ({CREDENTIAL}).\n")
    return header + text


def sanitize_id(name: str) -> str | None:
    s = re.sub(r"[^a-z0-9_-]", "-", name.lower())[:64].strip("-")
    return s or None


def profile_models(profile: str) -> list[str]:
    """The models of a manifest profile (tomllib where the laptop's Python has it)."""
    text = MANIFEST.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the [profiles.X] models list by hand
        m = re.search(rf"^\[profiles\.{re.escape(profile)}\]\s*$(.*?)^(?=\[)", text + "\n[", re.M | re.S)
        found = m and re.search(r"^models\s*=\s*\[(.*?)\]", m.group(1), re.M | re.S)
        if not found:
            raise UsageError(f"profile {profile!r} is not in {MANIFEST.relative_to(REPO)}") from None
        return re.findall(r'"([^"]+)"', found.group(1))
    profiles = tomllib.loads(text).get("profiles", {})
    if profile not in profiles:
        raise UsageError(f"profile {profile!r} is not in {MANIFEST.relative_to(REPO)} "
                         f"(known: {', '.join(sorted(profiles))})")
    return list(profiles[profile]["models"])
