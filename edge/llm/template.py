"""Chat prompts: the GGUF's Jinja chat template, rendered here so the prompt text is known.

Rendering ourselves (instead of ``create_chat_completion``) keeps the prompt's prefix stable
from turn to turn, which is what lets the KV cache of the system prompt and of earlier turns
be reused, and lets a partial question be evaluated before the visitor has finished speaking.

The format is chosen once at load:

* ``chat_template = "phi3"``, or a GGUF without a template: the explicit Phi-3 template below
  (never llama-cpp-python's silent fallback to the Llama-2 format);
* a GGUF template that drops the system message (the one in Microsoft's Phi-3 Q4 GGUF does):
  the explicit Phi-3 template when the template is a Phi-3 one, else the system prompt is
  folded into the first user message;
* otherwise the GGUF's own template.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edge.errors import MissingDependency, ModelError
from edge.llm.base import Message

_LOGGER = logging.getLogger(__name__)

# Phi-3-mini-4k-instruct's current Hugging Face template (it renders the system message).
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Texts of end-of-turn tokens by family; the backend adds the vocabulary's own EOS/EOT/EOG.
STOP_TEXTS: dict[str, tuple[str, ...]] = {
    "phi3": ("<|end|>", "<|endoftext|>"),
    "chatml": ("<|im_end|>", "<|endoftext|>"),
    "other": ("<|eot_id|>", "<|end|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>"),
}

# Control-token look-alikes in what a visitor said must not become control tokens.
_CONTROL_LIKE = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>")
_MARK_A = "\ue000edge-turn-a\ue001"
_MARK_B = "\ue000edge-turn-b\ue001"
_MARK_SYS = "\ue000edge-system\ue001"


def family_of(template: str) -> str:
    if "<|im_start|>" in template:
        return "chatml"
    if "<|end|>" in template and "<|assistant|>" in template:
        return "phi3"
    return "other"


def clean_content(text: str) -> str:
    return _CONTROL_LIKE.sub(" ", text).strip()


def bare_words(text: str) -> str:
    """The words without the final punctuation a recognizer adds to whatever it heard: whether a
    sentence is finished is the model's to say, not the recognizer's full stop."""
    return clean_content(text).rstrip(".?!,;:…- ").rstrip()


@dataclass(frozen=True)
class ChatFormat:
    family: str  # "phi3" | "chatml" | "other"
    template: str
    origin: str  # where the template came from, for logs and `check`
    merge_system: bool = False  # the template drops system messages: fold into the first user turn

    @property
    def stop_texts(self) -> tuple[str, ...]:
        return STOP_TEXTS[self.family]


class PromptBuilder:
    """Renders a chat format to prompt text; compiled once per model."""

    def __init__(self, fmt: ChatFormat, *, bos_token: str, eos_token: str) -> None:
        self.format = fmt
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(fmt.template)

    def render(self, messages: Sequence[Message], *, generation_prompt: bool = True) -> str:
        return self._template.render(messages=list(messages), add_generation_prompt=generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def messages(self, system: str, history: Sequence[Message], user: str) -> list[Message]:
        msgs: list[Message] = [{"role": str(m["role"]), "content": clean_content(str(m["content"]))}
                               for m in history]
        msgs.append({"role": "user", "content": clean_content(user)})
        if system:
            if self.format.merge_system:
                first = next(m for m in msgs if m["role"] == "user")
                first["content"] = f"{system}\n\n{first['content']}"
            else:
                msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def prompt(self, system: str, history: Sequence[Message], user: str) -> str:
        """The whole prompt, ending where the assistant's reply starts."""
        return self.render(self.messages(system, history, user))

    def head(self, system: str, history: Sequence[Message]) -> str:
        """The prompt text before the user's words: fixed once the history is known."""
        a = self.render(self.messages(system, history, _MARK_A))
        if a.count(_MARK_A) == 1:
            return a.split(_MARK_A)[0]
        b = self.render(self.messages(system, history, _MARK_B))
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return a[:n]


def _compile(template: str) -> Any:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # jinja2 comes with llama-cpp-python
        raise MissingDependency.for_module("jinja2", "llm") from None

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    # Hugging Face renders chat templates with these options; templates rely on them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


def _drops_system(template: str, bos: str, eos: str) -> bool:
    probe = PromptBuilder(ChatFormat("other", template, "probe"), bos_token=bos, eos_token=eos)
    msgs = [{"role": "system", "content": _MARK_SYS}, {"role": "user", "content": _MARK_A}]
    try:
        return _MARK_SYS not in probe.render(msgs)
    except Exception:  # a template that raises on a system role drops it, too
        return True


def choose_format(gguf_template: str | None, setting: str, *, bos_token: str, eos_token: str,
                  where: str) -> ChatFormat:
    """Pick the chat format once at load (see the module docstring)."""
    if setting == "phi3":
        return ChatFormat("phi3", PHI3_TEMPLATE, "phi3 (config)")
    if not gguf_template:
        return ChatFormat("phi3", PHI3_TEMPLATE, "phi3 (the GGUF has no chat template)")
    try:
        probe = PromptBuilder(ChatFormat("other", gguf_template, "probe"), bos_token=bos_token,
                              eos_token=eos_token)
        probe.render([{"role": "user", "content": "hi"}])
    except Exception as err:
        raise ModelError(f"{where}: the model's chat template cannot be rendered ({err}); "
                         f"set llm.chat_template = \"phi3\" or use another model",
                         code="model.template") from None
    family = family_of(gguf_template)
    if _drops_system(gguf_template, bos_token, eos_token):
        if family == "phi3":
            return ChatFormat("phi3", PHI3_TEMPLATE, "phi3 (the GGUF's template drops the system prompt)")
        _LOGGER.warning("%s: the chat template drops system messages; the system prompt goes into "
                        "the first user message", where)
        return ChatFormat(family, gguf_template, "gguf (system prompt merged)", merge_system=True)
    return ChatFormat(family, gguf_template, "gguf")
