"""Errors with stable codes.

Every error a user can cause carries a ``code`` that scripts and the fleet can match on
(``model.missing``, ``config.invalid``, ...) and a one-line human message that names the
thing at fault and what to do about it. The CLI prints the message, never a traceback.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class: ``code`` is wire-stable, ``message`` is for people."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(EdgeError):
    code = "config.invalid"


class ModelError(EdgeError):
    code = "model.error"


class AudioError(EdgeError):
    code = "audio.error"


class StageError(EdgeError):
    """A pipeline stage (wake, stt, llm, tts) failed at run time."""

    code = "stage.error"


class MissingDependency(EdgeError):
    code = "dependency.missing"

    @classmethod
    def for_module(cls, module: str, extra: str) -> MissingDependency:
        return cls(
            f"the Python package {module!r} is not installed: "
            f"install it with `pip install 'edge-voice[{extra}]'`"
        )
