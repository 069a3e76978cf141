"""What fleet commands (MQTT) can do to a running pipeline: the ``Controller`` the bridge calls.

Calls arrive on the bridge's command thread. Each reaches the object that owns what it
changes: the conversation (turns, mute, runtime settings, through its inbox), the speaker
(volume), the LLM (sampling), the kiosk (the handset); the host reports status, reloads and
hands rollouts to its rollout manager.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from edge import __version__
from edge.config import Config
from edge.conversation import Conversation
from edge.errors import EdgeError


class StatusSink(Protocol):
    def status(self, text: str, state: str | None = None) -> None:
        """Say how the device is (systemd ``STATUS=``, the MQTT state)."""
        ...

    def refresh_status(self) -> None:
        """Say the most urgent thing again (a lost device outranks "listening")."""
        ...


class Host(Protocol):
    """What the controller needs of the pipeline it commands (:class:`edge.app.Pipeline`)."""

    cfg: Config
    conv: Conversation | None
    status_sink: StatusSink
    started: float

    def metrics(self) -> dict[str, Any]: ...
    def reload_models(self) -> None: ...
    def apply_setting(self, key: str, value: Any) -> None: ...
    def handset(self, state: str) -> dict[str, Any]: ...
    def rollout(self, request: Mapping[str, Any]) -> dict[str, Any]: ...


class Controller:
    def __init__(self, host: Host) -> None:
        self.host = host

    def _conv(self) -> Conversation:
        conv = self.host.conv
        if conv is None:
            raise EdgeError("the device is still starting", code="busy")
        return conv

    def say(self, text: str) -> dict:
        return {"turn_id": self._conv().say(text)}

    def ask(self, text: str) -> dict:
        return {"turn_id": self._conv().ask(text)}

    def listen(self) -> dict:
        self._conv().push_to_talk()
        return {}

    def cancel(self) -> dict:
        return {"cancelled": self._conv().cancel()}

    def mute(self) -> dict:
        self._conv().mute()
        self.host.status_sink.status("muted", "muted")
        return {"muted": True}

    def unmute(self) -> dict:
        self._conv().unmute()
        self.host.status_sink.refresh_status()  # a lost device still outranks "listening"
        return {"muted": False}

    def handset(self, state: str) -> dict:
        """The handset went off-hook (greet, then listen turn after turn) or on-hook (forget)."""
        return self.host.handset(state)

    def set_volume(self, volume: float) -> dict:
        return self.set_setting("audio.volume", volume)

    def set_setting(self, key: str, value: Any) -> dict:
        """Apply one allow-listed runtime setting (the bridge has checked key, type and range)."""
        from edge.mqtt.commands import SETTINGS

        if key not in SETTINGS:
            raise EdgeError(f"setting {key!r} cannot be changed at run time", code="cmd.forbidden")
        self.host.apply_setting(key, value)
        return {key: value}

    def rollout(self, request: Mapping[str, Any]) -> dict:
        """Queue a rollout of a signed model or pack version (edge.rollout); refused with its reason."""
        return self.host.rollout(request)

    def reload_models(self) -> dict:
        self.host.reload_models()
        return {"models": self.host.cfg.model_ids()}

    def status(self) -> dict:
        conv = self.host.conv
        return {
            "state": conv.state.value if conv else "starting",
            "muted": bool(conv and conv.muted),
            "uptime_s": round(time.monotonic() - self.host.started, 1),
            "version": __version__,
            "models": self.host.cfg.model_ids(),
            "metrics": self.host.metrics(),
        }
