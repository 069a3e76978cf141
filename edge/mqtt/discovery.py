"""Home Assistant MQTT discovery: the device's status, last transcript and last reply as
sensors, and a text entity whose value the device speaks (it publishes ``say`` commands).

The configs are retained under ``<ha_prefix>/<component>/<node>/<object>/config`` so Home
Assistant finds the device whenever it starts.
"""

from __future__ import annotations

import json
from typing import Any

from edge.mqtt.topics import Topics

#: Field of transcript.final / reply.final event data that holds the text.
TEXT_FIELD = "text"
_HA_STATE_MAX = 255  # Home Assistant rejects longer sensor states


def discovery_messages(topics: Topics, ha_prefix: str, version: str) -> list[tuple[str, bytes]]:
    """``(topic, payload)`` pairs to publish retained."""
    node = topics.device_id
    uid = f"edge_voice_{node}"
    device = {"identifiers": [uid], "name": f"edge-voice {node}", "manufacturer": "edge-voice",
              "model": "edge-voice", "sw_version": version}
    origin = {"name": "edge-voice", "sw_version": version}
    availability = [{"topic": topics.status,
                     "value_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}"}]
    text_value = f"{{{{ (value_json.{TEXT_FIELD} | default(''))[:{_HA_STATE_MAX}] }}}}"
    configs: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "status", {
            "name": "Status", "state_topic": topics.status, "value_template": "{{ value_json.state }}",
            "json_attributes_topic": topics.status, "icon": "mdi:account-voice",
        }),
        ("sensor", "last_transcript", {
            "name": "Last transcript", "state_topic": topics.event("transcript.final"),
            "value_template": text_value, "availability": availability, "icon": "mdi:text-recognition",
        }),
        ("sensor", "last_reply", {
            "name": "Last reply", "state_topic": topics.event("reply.final"),
            "value_template": text_value, "availability": availability, "icon": "mdi:message-reply-text",
        }),
        ("text", "say", {
            "name": "Say", "command_topic": topics.command("say"),
            "command_template": '{"text": {{ value | tojson }}}', "max": _HA_STATE_MAX, "mode": "text",
            "availability": availability, "icon": "mdi:bullhorn",
        }),
    ]
    out = []
    for component, object_id, cfg in configs:
        cfg.update(unique_id=f"{uid}_{object_id}", device=device, origin=origin)
        out.append((f"{ha_prefix}/{component}/{node}/{object_id}/config",
                    json.dumps(cfg, separators=(",", ":")).encode("utf-8")))
    return out
