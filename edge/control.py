"""What fleet commands (MQTT) can do to a running pipeline: the ``Controller`` the bridge calls.

The host is the daemon or a simulation: anything with ``conv`` (the Conversation),
``speaker``, ``cfg`` (replaceable), ``status(text, state)``, ``metrics()``,
``reload_models()`` and ``started``. Calls arrive on the bridge's command thread.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from edge import __version__
from edge.errors import EdgeError


class Controller:
    def __init__(self, host: Any) -> None:
        self.host = host

    def _conv(self):
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
        self.host.status("muted", "muted")
        return {"muted": True}

    def unmute(self) -> dict:
        self._conv().unmute()
        refresh = getattr(self.host, "refresh_status", None)
        if refresh is not None:
            refresh()  # a lost device still outranks "listening"
        else:
            self.host.status("listening", "online")
        return {"muted": False}

    def handset(self, state: str) -> dict:
        """The handset went off-hook (greet, then listen turn after turn) or on-hook (forget)."""
        handset = getattr(self.host, "handset", None)
        if handset is None:
            raise EdgeError("this device has no handset", code="handset.mode")
        return handset(state)

    def set_volume(self, volume: float) -> dict:
        return self.set_setting("audio.volume", volume)

    def set_setting(self, key: str, value: Any) -> dict:
        """Apply one allow-listed runtime setting (the bridge has checked key, type and range)."""
        from edge.mqtt.commands import SETTINGS

        if key not in SETTINGS:
            raise EdgeError(f"setting {key!r} cannot be changed at run time", code="cmd.forbidden")
        section, _, name = key.partition(".")
        conv = self._conv()
        cfg = conv.cfg
        sub = getattr(cfg, section, None)
        new_sub = dataclasses.replace(sub, **{name: value})
        new_cfg = dataclasses.replace(cfg, **{section: new_sub})
        conv.cfg = new_cfg
        self.host.cfg = new_cfg
        if section == "audio" and name == "volume" and self.host.speaker is not None:
            self.host.speaker.volume = value
        stage = {"llm": conv.chat, "tts": conv.synth, "stt": conv.recognizer}.get(section)
        if stage is not None and hasattr(stage, "cfg"):
            stage.cfg = new_sub
        return {key: value}

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
