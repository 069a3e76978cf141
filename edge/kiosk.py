"""Kiosk and phone-booth glue around a running conversation: buttons, the handset, chimes, echo.

- A push-to-talk button and a handset hook switch are GPIO lines read through libgpiod
  (the ``gpiod`` package, v2 API, imported only when a line is configured). The hook can
  also come from a command (:meth:`Kiosk.hook`).
- Chimes are short generated tones played through the speaker: rising when listening starts
  after the wake word or push-to-talk, falling when the device goes back to waiting for it.
- The echo gate (:class:`edge.audio.echo.EchoGate`) is told of each chime before it plays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import numpy as np

from edge.audio.base import Speaker
from edge.audio.echo import EchoGate
from edge.config import Config, ConversationConfig
from edge.conversation import Conversation, Outcome, Trigger
from edge.errors import ConfigError, EdgeError, MissingDependency
from edge.events import Event, EventType

_LOGGER = logging.getLogger(__name__)

CHIME_NOTE_S = 0.07
CHIME_LEVEL = 0.25  # of full scale, before audio.volume
# Turns that end with the device waiting for the wake word again, as far as a visitor can tell.
_QUIET_ENDINGS = (Outcome.NO_SPEECH.value,)


def chime(kind: str, rate: int) -> np.ndarray:
    """Two short notes, rising for ``wake`` and falling for ``end``, with soft edges (no clicks)."""
    notes = (880.0, 1318.5) if kind == "wake" else (1318.5, 880.0)
    n = int(rate * CHIME_NOTE_S)
    t = np.arange(n) / rate
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * rate))
    tone = np.concatenate([np.sin(2 * np.pi * f * t) * fade for f in notes])
    return (tone * CHIME_LEVEL * 32767).astype(np.int16)


# -- GPIO ------------------------------------------------------------------------------------
def _gpiod() -> Any:
    try:
        import gpiod
    except ImportError:
        raise MissingDependency("a GPIO line is configured but the Python package 'gpiod' (libgpiod v2 "
                                "bindings) is not installed: install it with `pip install 'gpiod>=2'`") from None
    if not hasattr(gpiod, "request_lines"):
        raise MissingDependency("the installed 'gpiod' package is the libgpiod v1 binding; edge-voice needs "
                                "v2: `pip install 'gpiod>=2'`")
    return gpiod


class GpioLine:
    """One input line: ``on_change(active)`` for each (debounced) change of its logical value.

    Active means pressed (button) or off the hook (handset), after ``active_low``. Repeated
    edges with the same value (bounce the kernel let through) are reported once.
    """

    def __init__(self, chip: str, line: str, *, active_low: bool, bias: str, debounce_ms: int,
                 on_change: Callable[[bool], None], consumer: str = "edge-voice") -> None:
        self.chip = chip if chip.startswith("/") else f"/dev/{chip}"
        self.line: int | str = int(line) if line.strip().isdigit() else line.strip()
        self.active_low = active_low
        self.bias = bias
        self.debounce_ms = debounce_ms
        self.on_change = on_change
        self.consumer = consumer
        self.value: bool | None = None
        self._request: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def settings(self, gpiod: Any) -> Any:
        from gpiod.line import Bias, Direction, Edge

        bias = {"as-is": Bias.AS_IS, "pull-up": Bias.PULL_UP, "pull-down": Bias.PULL_DOWN,
                "disabled": Bias.DISABLED}[self.bias]
        return gpiod.LineSettings(direction=Direction.INPUT, edge_detection=Edge.BOTH, bias=bias,
                                  active_low=self.active_low,
                                  debounce_period=timedelta(milliseconds=self.debounce_ms))

    def open(self) -> bool:
        """Request the line and start watching it; returns its value now."""
        gpiod = _gpiod()
        from gpiod.line import Value

        try:
            self._request = gpiod.request_lines(self.chip, consumer=self.consumer,
                                                config={self.line: self.settings(gpiod)})
        except (OSError, ValueError) as err:
            raise EdgeError(f"GPIO {self.chip} line {self.line}: cannot request it: {err}",
                            code="gpio.unavailable") from None
        self.value = self._request.get_value(self.line) == Value.ACTIVE
        self._thread = threading.Thread(target=self._run, name=f"gpio-{self.line}", daemon=True)
        self._thread.start()
        return self.value

    def _run(self) -> None:
        req = self._request
        while not self._stop.is_set():
            try:
                if not req.wait_edge_events(timedelta(seconds=0.5)):
                    continue
                events = req.read_edge_events()
            except OSError as err:
                _LOGGER.error("GPIO %s line %s: %s; no longer watching it", self.chip, self.line, err)
                return
            for event in events:
                self.edge(event.event_type == event.Type.RISING_EDGE)

    def edge(self, active: bool) -> None:
        """One edge (rising = became active); a repeat of the current value is bounce."""
        if active == self.value:
            return
        self.value = active
        try:
            self.on_change(active)
        except Exception:
            _LOGGER.exception("GPIO %s line %s: handler failed", self.chip, self.line)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._request is not None:
            self._request.release()
            self._request = None


def check_gpio_config(conv: ConversationConfig, source: str = "config") -> None:
    """A chip without a line (or the other way round), or a hook outside handset mode, is a mistake."""
    for name in ("button", "hook"):
        chip, line = getattr(conv, f"{name}_chip"), getattr(conv, f"{name}_line")
        if bool(chip) != bool(line):
            have, missing = (f"{name}_chip", f"{name}_line") if chip else (f"{name}_line", f"{name}_chip")
            raise ConfigError(f"{source}: conversation.{have} is set but conversation.{missing} is not")
    if conv.hook_chip and conv.mode != "handset":
        raise ConfigError(f"{source}: conversation.hook_chip is set but conversation.mode is {conv.mode!r}, "
                          "not 'handset'")


# -- the glue ---------------------------------------------------------------------------------
class Kiosk:
    """Buttons, the handset hook and chimes for one conversation.

    ``conv`` is the :class:`~edge.conversation.Conversation`, ``speaker`` the one it speaks
    through, ``gate`` the daemon's echo gate. Subscribe :meth:`on_event` to the bus.
    ``cfg`` has passed :func:`check_gpio_config` (the daemon checks it before loading models).
    """

    def __init__(self, cfg: Config, conv: Conversation, speaker: Speaker, gate: EchoGate) -> None:
        self.cfg = cfg
        self.conv = conv
        self.speaker = speaker
        self.gate = gate
        self.off_hook = False
        self._lock = threading.Lock()
        self._lines: list[GpioLine] = []

    def start(self) -> None:
        """Open the configured GPIO lines; a handset already off the hook starts its session."""
        c = self.cfg.conversation
        if c.button_chip:
            button = GpioLine(c.button_chip, c.button_line, active_low=c.button_active_low, bias=c.gpio_bias,
                              debounce_ms=c.gpio_debounce_ms, on_change=self._button)
            button.open()
            self._lines.append(button)
            _LOGGER.info("push-to-talk button on %s line %s", button.chip, button.line)
        if c.hook_chip:
            hook = GpioLine(c.hook_chip, c.hook_line, active_low=c.hook_active_low, bias=c.gpio_bias,
                            debounce_ms=c.gpio_debounce_ms, on_change=self._hook_line)
            lifted = hook.open()
            self._lines.append(hook)
            _LOGGER.info("handset hook on %s line %s: %s", hook.chip, hook.line,
                         "off the hook" if lifted else "on the hook")
            if lifted:
                self.hook(True)

    def close(self) -> None:
        for line in self._lines:
            line.close()
        self._lines.clear()

    # -- inputs ------------------------------------------------------------------------
    def _button(self, pressed: bool) -> None:
        if pressed:
            self.conv.push_to_talk()

    def _hook_line(self, lifted: bool) -> None:
        self.hook(lifted)

    def hook(self, off_hook: bool) -> dict[str, Any]:
        """The handset was lifted (greeting, then listening turn after turn) or put down
        (stop, forget the conversation). Repeating the current state changes nothing."""
        mode = self.cfg.conversation.mode
        if mode != "handset":
            raise EdgeError(f"handset: conversation.mode is {mode!r}, not 'handset'", code="handset.mode")
        with self._lock:
            changed = off_hook != self.off_hook
            self.off_hook = off_hook
        state = "off-hook" if off_hook else "on-hook"
        if changed:
            _LOGGER.info("handset %s", state)
            if off_hook:
                self.conv.off_hook(self.conv.cfg.conversation.greeting)
            else:
                self.conv.on_hook()
        return {"handset": state, "changed": changed}

    # -- chimes ------------------------------------------------------------------------
    def on_event(self, event: Event) -> None:
        conv_cfg = self.conv.cfg.conversation
        if event.type == EventType.TURN_START:
            if conv_cfg.chime_wake and event.data.get("trigger") in (Trigger.WAKE, Trigger.PUSH_TO_TALK):
                self.play_chime("wake")
        elif event.type == EventType.TURN_END:
            if conv_cfg.chime_end and self.ends_listening(event.data, conv_cfg.follow_up_s):
                self.play_chime("end")

    def ends_listening(self, data: Mapping[str, Any], follow_up_s: float) -> bool:
        """Does this turn end leave the device waiting for the wake word (or button)?"""
        if self.off_hook or self.conv.continuous:
            return False  # a lifted handset keeps listening
        outcome = data.get("outcome")
        if outcome in _QUIET_ENDINGS:
            return True
        return outcome == Outcome.DONE and data.get("trigger") != Trigger.SAY and follow_up_s <= 0

    def play_chime(self, kind: str) -> None:
        tone = chime(kind, self.speaker.rate)
        self.gate.hold(len(tone) / self.speaker.rate + self.speaker.latency)
        self.speaker.begin()
        self.speaker.write(tone)
