"""The topic contract: one namespace per device, plus fleet-wide commands.

``<prefix>/<id>/status`` (retained), ``<prefix>/<id>/event/<type>``, ``<prefix>/<id>/metrics``,
``<prefix>/<id>/cmd/<name>`` and ``<prefix>/all/cmd/<name>``; ``<prefix>/<id>/desired/<name>``
(retained, written by the fleet: a command the device carries out when it reads it, also after
being offline; only ``rollout`` for now); answers for clients without
MQTT v5 response topics go to ``<prefix>/<id>/cmd/<name>/result`` (always the device's own
namespace, so a broker ACL of ``<prefix>/%u/#`` is enough for a device to answer).

The fleet side (``FleetTopics``) asks for answers on ``<prefix>/<id>/answers/<client>``, inside
the device's namespace for the same reason, and keeps its own markers under
``<prefix>/all/fleet/<client>/``, which no device reads or writes; a rollout's plan is kept
retained under ``<prefix>/all/fleet/rollouts/<rollout id>`` so that it can be resumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge.config import DEVICE_ID_RE
from edge.errors import ConfigError

FLEET = "all"
_MAX_TOPIC_BYTES = 65535
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$")


def valid_tag(tag: str) -> bool:
    """A device tag ("site:paris", "booth", "lang:fr"): 1-64 of letters, digits, ``_ . : = -``."""
    return bool(_TAG_RE.match(tag))


def valid_topic_name(topic: str) -> bool:
    """True if ``topic`` can be published to: no wildcards, no NUL, 1..65535 UTF-8 bytes."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return False
    try:
        return len(topic.encode("utf-8")) <= _MAX_TOPIC_BYTES
    except UnicodeEncodeError:  # lone surrogates
        return False


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    def __post_init__(self) -> None:
        p = self.prefix
        if not p or p.startswith("/") or p.endswith("/") or "//" in p or not valid_topic_name(p):
            raise ConfigError(f"mqtt.prefix: {p!r} is not a usable topic prefix: use levels like "
                              "'edge' or 'site1/edge' without wildcards or leading/trailing '/'")
        if not DEVICE_ID_RE.match(self.device_id):
            raise ConfigError(f"mqtt.device_id: {self.device_id!r} must be 1-64 characters of a-z, 0-9, _ and -")
        if self.device_id == FLEET:
            raise ConfigError(f"mqtt.device_id: {FLEET!r} is reserved for fleet-wide commands; choose another id")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    def event(self, event_type: str) -> str:
        return f"{self.base}/event/{event_type}"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def fleet_command(self, name: str) -> str:
        return f"{self.prefix}/{FLEET}/cmd/{name}"

    @property
    def command_filters(self) -> tuple[str, str]:
        """What the device subscribes to; ``+`` keeps ``.../result`` answers out."""
        return f"{self.base}/cmd/+", f"{self.prefix}/{FLEET}/cmd/+"

    def desired(self, name: str) -> str:
        return f"{self.base}/desired/{name}"

    @property
    def desired_filter(self) -> str:
        return f"{self.base}/desired/+"

    def desired_name(self, topic: str) -> str | None:
        """The desired-state name if ``topic`` is this device's ``desired/<name>``, else None."""
        head = f"{self.base}/desired/"
        if topic.startswith(head) and "/" not in topic[len(head):] and topic[len(head):]:
            return topic[len(head):]
        return None

    def command_name(self, topic: str) -> str | None:
        """The command name if ``topic`` is one of ours (device or fleet), else None."""
        for head in (f"{self.base}/cmd/", f"{self.prefix}/{FLEET}/cmd/"):
            if topic.startswith(head):
                name = topic[len(head):]
                return None if "/" in name else name
        return None

    def result(self, name: str) -> str:
        topic = f"{self.base}/cmd/{name}/result"
        # A hostile, very long command name still gets an answer, on a topic that fits.
        return topic if valid_topic_name(topic) else f"{self.base}/cmd/_/result"

    def usable_response_topic(self, topic: str) -> bool:
        """A v5 response topic we may publish an answer to.

        Refused: anything not publishable, anything we subscribe to (the answer would come
        back as a command, forever) and our own status/event/metrics topics (an answer
        there would impersonate the device's data).
        """
        if not valid_topic_name(topic) or len(topic) > 1024:
            return False
        if self.command_name(topic) is not None:
            return False
        for own in (self.status, self.metrics, f"{self.base}/event/", f"{self.base}/desired/"):
            if topic == own or topic.startswith(own if own.endswith("/") else own + "/"):
                return False
        return True


@dataclass(frozen=True)
class FleetTopics:
    """Topic filters and names the fleet side uses; ``Topics`` is the device's half."""

    prefix: str

    def __post_init__(self) -> None:
        Topics(self.prefix, "x")  # the same prefix rules

    def status(self, device_id: str = "+") -> str:
        return f"{self.prefix}/{device_id}/status"

    def events(self, device_id: str = "+", event_type: str = "#") -> str:
        return f"{self.prefix}/{device_id}/event/{event_type}"

    def command(self, device_id: str, name: str) -> str:
        return f"{self.prefix}/{device_id}/cmd/{name}"

    def results(self, name: str) -> str:
        """Where devices without MQTT v5 answer ``name`` (matched by request id)."""
        return f"{self.prefix}/+/cmd/{name}/result"

    def answers(self, device_id: str, client: str) -> str:
        return f"{self.prefix}/{device_id}/answers/{client}"

    def marker(self, client: str) -> str:
        return f"{self.prefix}/{FLEET}/fleet/{client}/sync"

    def desired(self, device_id: str, name: str) -> str:
        """A device's retained desired state (``rollout``): read when it connects and when it changes."""
        return f"{self.prefix}/{device_id}/desired/{name}"

    def rollout_plan(self, rollout_id: str = "+") -> str:
        """A rollout's retained plan and progress, for ``fleet rollout --resume``."""
        return f"{self.prefix}/{FLEET}/fleet/rollouts/{rollout_id}"

    def device_of(self, topic: str) -> str | None:
        """The device id of a topic under the prefix, else None."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        device, _, _rest = topic[len(head):].partition("/")
        return device if device and device != FLEET else None

    @staticmethod
    def shared(group: str, topic_filter: str) -> str:
        """An MQTT v5 shared subscription: each message goes to one member of ``group``."""
        return f"$share/{group}/{topic_filter}"
