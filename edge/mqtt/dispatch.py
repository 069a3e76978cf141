"""The command worker: commands are validated and run on one thread of their own, so a slow
controller never stalls paho's network thread; each gets exactly one answer.

Answers go to the MQTT v5 response topic with the correlation data when the command has one,
else to ``<prefix>/<id>/cmd/<name>/result``. The queue is bounded (``COMMAND_QUEUE``); a
command arriving when it is full is answered ``cmd.busy`` at once.

Desired state (``<prefix>/<id>/desired/<name>``, retained by the fleet) goes through the same
validation and the same worker but gets no answer: whoever wrote it is not waiting, and the
handler reports what it did (a rollout's ``rollout.*`` events). Its expiry is the handler's to
check, so that a desired state read after it expired is reported once rather than dropped.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass

from edge.errors import EdgeError
from edge.mqtt import commands as cmds
from edge.mqtt.topics import Topics
from edge.mqtt.wire import dumps

_LOGGER = logging.getLogger(__name__)

COMMAND_QUEUE = 32
DESIRED = ("rollout",)  # the commands that may also come as retained desired state

# publish(topic, body, correlation data or None)
Publish = Callable[[str, bytes, "bytes | None"], None]


@dataclass
class _Command:
    name: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    desired: bool = False


class CommandDispatcher:
    def __init__(self, topics: Topics, controller: cmds.Controller, publish: Publish,
                 status_extra: Callable[[], dict]) -> None:
        self._topics = topics
        self._controller = controller
        self._publish = publish
        self._status_extra = status_extra
        self._queue: queue.Queue[_Command | None] = queue.Queue(COMMAND_QUEUE)
        self.ok = 0
        self.refused = 0
        self.busy = 0

    def submit(self, topic: str, payload: bytes, *, retained: bool, response_topic: str | None,
               correlation: bytes | None) -> None:
        """Called from paho's thread for each message on a command topic; never blocks."""
        name = self._topics.command_name(topic)
        if name is None:
            return
        cmd = _Command(name, payload, response_topic, correlation)
        if retained:
            # A retained command would run again at every reconnect of every device.
            self._refuse(cmd, cmds.CommandError("retained commands are not run: publish commands "
                                                "without the retain flag", code="cmd.retained"))
            return
        try:
            self._queue.put_nowait(cmd)
        except queue.Full:
            self.busy += 1
            self._refuse(cmd, cmds.CommandError("too many commands waiting; try again", code="cmd.busy"))

    def submit_desired(self, name: str, payload: bytes) -> None:
        """A desired state (retained or live) from paho's thread; never blocks. An empty payload
        (the fleet cleared it) means nothing to do."""
        if name not in DESIRED or not payload.strip():
            return
        try:
            self._queue.put_nowait(_Command(name, payload, None, None, desired=True))
        except queue.Full:
            self.busy += 1
            _LOGGER.warning("MQTT: desired %s dropped: too many commands waiting (it is read again at the next "
                            "connection)", name)

    def run(self) -> None:
        """The worker thread's loop; returns after stop()."""
        while True:
            cmd = self._queue.get()
            if cmd is None:
                return
            try:
                self._handle(cmd)
            except Exception:  # the worker must survive anything a command does
                _LOGGER.exception("MQTT command worker error")

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the worker is a daemon thread; it ends with the process

    def _refuse(self, cmd: _Command, err: EdgeError, request_id: str | None = None) -> None:
        self.refused += 1
        _LOGGER.debug("MQTT command %r refused: %s", cmd.name[:64], err.code)
        self._answer(cmd, dumps(cmds.error_answer(cmd.name, self._topics.device_id, err, request_id)))

    def _handle_desired(self, cmd: _Command) -> None:
        try:
            command = cmds.decode(cmd.name, cmd.payload, check_expiry=False)
            extra = cmds.run(command, self._controller, check_expiry=False)
        except EdgeError as err:
            self.refused += 1
            _LOGGER.info("MQTT desired %s not carried out: %s: %s", cmd.name, err.code, err.message)
            return
        self.ok += 1
        _LOGGER.info("MQTT desired %s: %s", cmd.name, extra)

    def _handle(self, cmd: _Command) -> None:
        if cmd.desired:
            self._handle_desired(cmd)
            return
        if cmd.response_topic is not None and not self._topics.usable_response_topic(cmd.response_topic):
            cmd.response_topic = None  # answered on .../result instead
            self._refuse(cmd, cmds.CommandError("response topic refused: it must be a plain topic outside "
                                                "this device's command, status, event and metrics topics"))
            return
        request_id = None
        try:
            command = cmds.decode(cmd.name, cmd.payload)
            request_id = command.request_id
            extra = cmds.run(command, self._controller)
            if command.name == "status":
                extra = {**extra, "mqtt": self._status_extra()}
            body = dumps(cmds.ok_answer(command, self._topics.device_id, extra))
        except EdgeError as err:  # refused by validation, or by the controller
            self._refuse(cmd, err, getattr(err, "request_id", None) or request_id)
            return
        except Exception as err:
            _LOGGER.exception("MQTT command %s failed", cmd.name[:64])
            failed = EdgeError(f"{cmd.name[:64]}: internal error ({type(err).__name__})", code="cmd.failed")
            self._refuse(cmd, failed, request_id)
            return
        self.ok += 1
        _LOGGER.info("MQTT command %s%s: ok", cmd.name, f" ({request_id})" if request_id else "")
        self._answer(cmd, body)

    def _answer(self, cmd: _Command, body: bytes) -> None:
        self._publish(cmd.response_topic or self._topics.result(cmd.name), body, cmd.correlation)
