"""The LLM stage: the factory that loads a :class:`~edge.llm.base.ChatModel` from a GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edge.cpu import CpuPolicy
from edge.llm.base import ChatModel, Message, ReplyStats

if TYPE_CHECKING:
    from edge.config import LlmConfig

__all__ = ["ChatModel", "Message", "ReplyStats", "make_chat_model"]


def make_chat_model(cfg: LlmConfig, gguf_path: Path, *, cpu: CpuPolicy | None = None,
                    adapter: Path | None = None, state_dir: Path | None = None) -> ChatModel:
    """Load ``gguf_path`` with llama-cpp-python (``edge-voice[llm]``); raises ModelError naming the
    file, MissingDependency without llama_cpp. ``cpu`` is the pipeline's CPU policy; ``adapter`` a
    LoRA adapter GGUF checked against the model; ``state_dir`` keeps evaluated system prompts."""
    from edge.llm.llama import LlamaChatModel

    return LlamaChatModel(cfg, Path(gguf_path), cpu or CpuPolicy(share=cfg.share_cores), adapter=adapter,
                          state_dir=state_dir)
