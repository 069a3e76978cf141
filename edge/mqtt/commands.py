"""Command payloads: schemas, validation and dispatch to the daemon's controller.

Every payload is a JSON object (an empty payload counts as ``{}``) of at most
``MAX_PAYLOAD_BYTES``. Besides its own fields a command may carry ``request_id`` (echoed in the
answer; how MQTT 3.1.1 clients match answers) and ``expires_at`` (Unix seconds; a command that
arrives or is dispatched later is refused with ``cmd.expired``). Unknown fields, wrong types
and out-of-range values are refused; nothing a command carries can replace the system prompt.

Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from edge.config import AudioConfig, ConversationConfig, LlmConfig, SttConfig
from edge.errors import EdgeError

MAX_PAYLOAD_BYTES = 8192
MAX_TEXT_CHARS = 1000
MAX_REQUEST_ID_CHARS = 128


class CommandError(EdgeError):
    """A command refused before or while dispatching; ``request_id`` is echoed when known."""

    code = "cmd.invalid"

    def __init__(self, message: str, *, code: str | None = None, request_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id


class Controller(Protocol):
    """What the daemon implements; calls come from the MQTT command worker thread.

    Each returns extra answer fields and raises EdgeError to refuse. Calls must return
    promptly: ``say`` and ``ask`` answer once the work is queued, not when it is spoken.
    """

    def say(self, text: str) -> dict: ...
    def ask(self, text: str) -> dict: ...
    def listen(self) -> dict: ...
    def cancel(self) -> dict: ...
    def mute(self) -> dict: ...
    def unmute(self) -> dict: ...
    def set_volume(self, volume: float) -> dict: ...
    def set_setting(self, key: str, value: Any) -> dict: ...
    def reload_models(self) -> dict: ...
    def status(self) -> dict: ...
    def handset(self, state: str) -> dict: ...


@runtime_checkable
class RolloutController(Protocol):
    """A controller that also takes rollouts (the daemon's; simulated devices do not)."""

    def rollout(self, request: Mapping[str, Any]) -> dict: ...


def _rollout(controller: Controller, args: Mapping[str, Any]) -> dict:
    if not isinstance(controller, RolloutController):
        raise CommandError("this device does not take rollouts", code="cmd.unsupported")
    return controller.rollout(args)


# --- runtime settings --------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One runtime setting a ``set`` command may change; type and range come from the config."""

    key: str
    type: type
    min: float | None
    max: float | None
    doc: str

    def coerce(self, value: Any) -> Any:
        """The value as this setting's type, or CommandError naming the key and the range."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise CommandError(f"set {self.key}: expected true or false")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CommandError(f"set {self.key}: expected a number")
        if self.type is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise CommandError(f"set {self.key}: expected a whole number")
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise CommandError(f"set {self.key}: expected a finite number")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise CommandError(f"set {self.key}: {value!r} is outside {self.min}..{self.max}")
        return value


def _from_config(section: str, cls: type, name: str) -> Setting:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    typ = {"float": float, "int": int, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]
    return Setting(f"{section}.{name}", typ, f.metadata.get("min"), f.metadata.get("max"), f.metadata["doc"])


#: The only keys ``set`` accepts, each applied live by the next turn (the controller
#: enforces the same list). Settings baked into a loaded model (the VAD's silence length, the
#: voice's speed) are config-file changes followed by ``reload-models``.
SETTINGS: dict[str, Setting] = {s.key: s for s in (
    _from_config("llm", LlmConfig, "temperature"),
    _from_config("llm", LlmConfig, "top_p"),
    _from_config("llm", LlmConfig, "max_tokens"),
    _from_config("conversation", ConversationConfig, "follow_up_s"),
    _from_config("stt", SttConfig, "no_speech_timeout_s"),
    _from_config("audio", AudioConfig, "volume"),
)}

#: Keys people will try; refused with a reason rather than "unknown".
FORBIDDEN_SETTINGS: dict[str, str] = {
    "llm.system_prompt": "the system prompt is set in the config file only; commands cannot change it",
}


# --- field validators --------------------------------------------------------------------

def _text(field: str, value: Any, max_chars: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{field}: expected a string")
    if not value.strip():
        raise CommandError(f"{field}: must not be empty")
    if len(value) > max_chars:
        raise CommandError(f"{field}: longer than {max_chars} characters")
    for ch in value:
        # Controls and lone surrogates break logs, TTS text normalisation and UTF-8 output.
        if ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cs"):
            raise CommandError(f"{field}: contains a control or surrogate character U+{ord(ch):04X}")
    return value


def _number(field: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError(f"{field}: expected a number")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise CommandError(f"{field}: expected a number from {lo} to {hi}")
    return value


HANDSET_STATES = ("off-hook", "on-hook")


def _handset_state(field: str, value: Any) -> str:
    if value not in HANDSET_STATES:
        raise CommandError(f"{field}: expected one of {', '.join(HANDSET_STATES)}")
    return value


def _setting_key(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{field}: expected a string")
    if value in FORBIDDEN_SETTINGS:
        raise CommandError(f"set {value}: {FORBIDDEN_SETTINGS[value]}", code="cmd.forbidden")
    if value not in SETTINGS:
        shown = value if len(value) <= 64 else value[:64] + "…"
        raise CommandError(f"set {shown!r}: not a runtime setting (allowed: {', '.join(SETTINGS)})",
                           code="cmd.forbidden")
    return value


ROLLOUT_KINDS = ("model", "pack")
_ROLLOUT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TARGET_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[0-9a-f]{12}$")


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[str, Any], str]:
    def check(field: str, value: Any) -> str:
        if not isinstance(value, str) or not regex.match(value):
            raise CommandError(f"{field}: expected {what}")
        return value

    return check


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(field: str, value: Any) -> str:
        if value not in choices:
            raise CommandError(f"{field}: expected one of {', '.join(choices)}")
        return value

    return check


def _url(field: str, value: Any) -> str:
    """An http(s) URL; whether the device may use it is its own allow-list's business."""
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) or len(value) > 512 \
            or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise CommandError(f"{field}: expected an http(s) URL of at most 512 characters")
    return value


_Validator = Callable[[str, Any], Any]
_ANY: _Validator = lambda field, value: value  # noqa: E731  (checked against the key later)


@dataclass(frozen=True)
class Schema:
    required: Mapping[str, _Validator]
    call: Callable[[Controller, Mapping[str, Any]], dict]


SCHEMAS: dict[str, Schema] = {
    "say": Schema({"text": _text}, lambda c, a: c.say(a["text"])),
    "ask": Schema({"text": _text}, lambda c, a: c.ask(a["text"])),
    "listen": Schema({}, lambda c, a: c.listen()),
    "cancel": Schema({}, lambda c, a: c.cancel()),
    "mute": Schema({}, lambda c, a: c.mute()),
    "unmute": Schema({}, lambda c, a: c.unmute()),
    "volume": Schema({"volume": lambda f, v: _number(f, v, 0.0, 1.0)}, lambda c, a: c.set_volume(a["volume"])),
    "set": Schema({"key": _setting_key, "value": _ANY}, lambda c, a: c.set_setting(a["key"], a["value"])),
    "reload-models": Schema({}, lambda c, a: c.reload_models()),
    "status": Schema({}, lambda c, a: c.status()),
    # A phone booth's hook switch, for booths whose switch reaches the fleet and not a GPIO line.
    "handset": Schema({"state": _handset_state}, lambda c, a: c.handset(a["state"])),
    # Fetch, verify, switch to, self-test and confirm a signed version of a model or knowledge pack
    # (edge.rollout); answered once it is queued, progress comes as rollout.* events. Also read from
    # the retained desired state <prefix>/<id>/desired/rollout, so an offline device catches up.
    # The device requires its expires_at (a rollout is never open-ended); it reaches the handler
    # with the arguments.
    "rollout": Schema({"rollout_id": _pattern(_ROLLOUT_ID, "1-64 letters, digits, _ . -"),
                       "kind": _choice(ROLLOUT_KINDS), "id": _pattern(_TARGET_ID, "a model or pack id"),
                       "version": _pattern(_VERSION, "12 hex digits"), "mirror": _url},
                      _rollout),
}
COMMON_FIELDS = ("request_id", "expires_at")


@dataclass(frozen=True)
class Command:
    name: str
    args: Mapping[str, Any]
    request_id: str | None = None
    expires_at: float | None = None

    def check_expiry(self, now: float | None = None) -> None:
        if self.expires_at is not None and (time.time() if now is None else now) > self.expires_at:
            raise CommandError(f"{self.name}: expired at {self.expires_at:.3f}; not run",
                               code="cmd.expired", request_id=self.request_id)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:64]!r}")
        out[k] = v
    return out


def _shown(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:64] + "…")


def decode(name: str, payload: bytes, *, now: float | None = None, check_expiry: bool = True) -> Command:
    """Validate one command; raises CommandError with a stable code and a one-line message.
    ``check_expiry`` false leaves an expired command to its handler (retained desired state)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit",
                           code="cmd.too_large")
    schema = SCHEMAS.get(name)
    if schema is None:
        raise CommandError(f"unknown command {_shown(name)} (known: {', '.join(SCHEMAS)})", code="cmd.unknown")
    if payload.strip() == b"":
        data: Any = {}
    else:
        try:
            data = json.loads(payload.decode("utf-8"), parse_constant=_no_constants,
                              object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError:
            raise CommandError(f"{name}: payload is not UTF-8", code="cmd.invalid_json") from None
        except RecursionError:
            raise CommandError(f"{name}: payload is nested too deeply", code="cmd.invalid_json") from None
        except ValueError as err:  # JSONDecodeError, NaN/Infinity, duplicate keys, huge integers
            raise CommandError(f"{name}: payload is not valid JSON: {str(err)[:120]}",
                               code="cmd.invalid_json") from None
    if not isinstance(data, dict):
        raise CommandError(f"{name}: payload must be a JSON object")
    request_id = None
    if "request_id" in data:  # optional fields, when present, have their type: null is refused
        try:
            request_id = _text("request_id", data["request_id"], MAX_REQUEST_ID_CHARS)
        except CommandError as err:
            raise CommandError(err.message) from None
    unknown = sorted(set(data) - set(schema.required) - set(COMMON_FIELDS))
    if unknown:
        raise CommandError(f"{name}: unknown field {_shown(unknown[0])} (allowed: "
                           f"{', '.join([*schema.required, *COMMON_FIELDS])})", request_id=request_id)
    expires_at = None
    try:
        if "expires_at" in data:
            expires_at = _number("expires_at", data["expires_at"], 0.0, 1e11)
        args = {}
        for field, check in schema.required.items():
            if field not in data:
                raise CommandError(f"{name}: missing field {field!r}")
            args[field] = check(field, data[field])
        if name == "set":
            args["value"] = SETTINGS[args["key"]].coerce(args["value"])
        if name == "rollout" and expires_at is not None:
            args["expires_at"] = expires_at
    except CommandError as err:
        raise CommandError(err.message, code=err.code, request_id=request_id) from None
    cmd = Command(name, args, request_id, expires_at)
    if check_expiry:
        cmd.check_expiry(now)
    return cmd


def run(cmd: Command, controller: Controller, *, check_expiry: bool = True) -> dict[str, Any]:
    """Call the controller; its EdgeError passes through, anything else is the caller's to log."""
    if check_expiry:
        cmd.check_expiry()
    extra = SCHEMAS[cmd.name].call(controller, cmd.args)
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"controller {cmd.name} returned {type(extra).__name__}, not a dict")
    return extra


def ok_answer(cmd: Command, device_id: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(extra)
    out.update(ok=True, command=cmd.name, device_id=device_id, time=round(time.time(), 3))
    if cmd.request_id is not None:
        out["request_id"] = cmd.request_id
    return out


def error_answer(name: str, device_id: str, err: EdgeError, request_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "error": err.as_dict(), "command": name[:128],
                           "device_id": device_id, "time": round(time.time(), 3)}
    if request_id is not None:
        out["request_id"] = request_id
    return out
