"""Problems in a knowledge pack or a question file, and the error that carries one.

A :class:`Problem` names the file, the line (when there is one) and what to do; ``check``
lists them all, loading raises :class:`KnowledgeError` on the first error. Codes are stable:

=============================  ================================================================
``knowledge.missing``          the pack directory or one of its required files does not exist
``knowledge.unreadable``       a file cannot be read or is not UTF-8
``knowledge.syntax``           a TOML file is not valid TOML (with the parser's line)
``knowledge.unknown_key``      a key the format does not have (a typo)
``knowledge.bad_value``        a value of the wrong type, empty, or out of its range
``knowledge.missing_key``      a required key is absent (``id``, ``fallback``, an FAQ ``answer``)
``knowledge.duplicate``        two FAQ entries share an id or a phrasing, or a fact is repeated
``knowledge.too_large``        a file, a fact or an answer is over its size limit
``knowledge.empty``            the pack has neither facts nor FAQ entries
``knowledge.ambiguous``        (warning) phrasings of two FAQ entries are too alike to tell apart
``knowledge.questions``        a question file for ``eval`` is not valid
=============================  ================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.errors import EdgeError

__all__ = ["KnowledgeError", "Problem"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pack: where, what, and how to fix it."""

    code: str
    path: str  # the file as the user named it (pack directory + file name)
    line: int | None  # 1-based; None when the problem has no line (a missing file)
    message: str
    fix: str
    severity: str = "error"  # "error" stops loading; "warning" is reported only

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path

    def __str__(self) -> str:
        return f"{self.where}: {self.message}; {self.fix}"

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "path": self.path, "line": self.line, "message": self.message,
                "fix": self.fix, "severity": self.severity}


class KnowledgeError(EdgeError):
    """A pack or a question file cannot be used; ``problem`` is the first error found."""

    code = "knowledge.invalid"

    def __init__(self, problem: Problem, *, more: int = 0) -> None:
        text = str(problem)
        if more:
            text += f" (and {more} more problem{'s' if more > 1 else ''}: run `edge-voice check`)"
        super().__init__(text, code=problem.code)
        self.problem = problem
