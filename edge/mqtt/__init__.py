"""MQTT: events, status and metrics to the fleet; commands from it; a disk outbox between.

``import edge.mqtt`` does not import paho; the bridge imports it when it is created.
"""

from __future__ import annotations

from edge.mqtt.client import MqttBridge
from edge.mqtt.commands import COMMON_FIELDS, SCHEMAS, SETTINGS, CommandError, Controller, Setting
from edge.mqtt.topics import Topics

__all__ = ["MqttBridge", "Controller", "CommandError", "SETTINGS", "Setting", "SCHEMAS", "COMMON_FIELDS",
           "Topics"]
