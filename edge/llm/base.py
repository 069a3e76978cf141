"""The LLM stage's one protocol and its types: ``ChatModel``, ``Message``, ``ReplyStats``.

A chat model streams a reply, token by token, from one worker thread. The prompt is rendered
from the model's own chat template (see :mod:`edge.llm.template`), and the KV cache is managed
by the backend, not by llama-cpp-python's chat API:

* ``warm(system_prompt)`` evaluates the system prompt once; every turn reuses it (and any
  earlier turns that are still a prefix of the new prompt);
* ``prefill(history, partial)`` evaluates the part of the next prompt that is already certain
  while the visitor is still speaking;
* ``stream(...)`` evaluates only what is new, then yields text pieces, stopping on the
  template's end tokens, on ``cancel``, at ``deadline`` or after ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from edge.signals import Flag

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

__all__ = ["ChatModel", "Message", "ReplyStats"]


class ChatModel(Protocol):
    #: What the last ``stream`` call did.
    last_stats: ReplyStats

    def warm(self, system_prompt: str) -> None:
        """Evaluate the system prompt once; its KV is reused by every turn."""

    def prefill(self, history: list[Message], user_text: str, cancel: Flag | None = None, *,
                system: str | None = None) -> None:
        """Evaluate the next prompt as far as it is known, stopping early once ``cancel`` is set."""

    def stream(self, history: list[Message], user_text: str, *, cancel: Flag,
               max_tokens: int | None = None, deadline: float | None = None,
               system: str | None = None) -> Iterator[str]:
        """Yield the reply as whole-character text pieces.

        ``max_tokens`` None means the config's; ``deadline`` (``time.monotonic()`` time) None
        means now + the config's ``reply_timeout_s``; ``system`` None means the warmed system
        prompt (a venue whose facts exceed the budget gives each question its own).
        """

    def end_of_turn_probability(self, history: list[Message], user_text: str, *, cancel: Flag | None = None,
                                system: str | None = None) -> float | None:
        """P(the visitor's turn ends after ``user_text``): the probability of the chat template's
        end-of-turn token right after the words (their final punctuation dropped), from the
        logits of their last token. Reuses what the prefill evaluated; None when it cannot tell
        (no end-of-turn token, cancelled)."""

    def count_tokens(self, text: str) -> int: ...

    def forget(self) -> None:
        """Drop the whole KV cache: the next call evaluates its prompt from scratch."""

    def set_sampling(self, *, temperature: float | None = None, top_p: float | None = None) -> None:
        """New sampling settings for the next reply (a fleet ``set`` command)."""

    def close(self) -> None: ...


@dataclass
class ReplyStats:
    """What the last ``stream`` call did, for metrics and logs."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was already there (system prompt, prefill)
    evaluated_tokens: int = 0  # prompt tokens evaluated by this call
    generated_tokens: int = 0
    dropped_messages: int = 0  # oldest history messages left out to fit the context
    prompt_s: float = 0.0  # evaluating the new prompt tokens
    first_piece_s: float | None = None  # from the call to the first text piece
    total_s: float = 0.0
    # Time spent computing tokens after the first (sampling and evaluation), without the time the
    # consumer took between tokens: the model's own speed, comparable with plain llama.cpp.
    generate_s: float = 0.0
    stop: str = ""  # end | max_tokens | cancel | deadline | superseded

    @property
    def tokens_per_s(self) -> float:
        """Generation speed after the first token, as the consumer saw it (waits included)."""
        gen_s = self.total_s - self.prompt_s
        return (self.generated_tokens - 1) / gen_s if self.generated_tokens > 1 and gen_s > 0 else 0.0

    @property
    def compute_tokens_per_s(self) -> float:
        """Generation speed after the first token, counting only the model's own work."""
        n = self.generated_tokens - 1
        return n / self.generate_s if n > 0 and self.generate_s > 0 else 0.0
