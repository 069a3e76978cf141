"""Text → phonemes for Piper voices, outside sherpa-onnx.

sherpa-onnx 2.x ships without espeak-ng (GPL): given a Piper voice and plain text it returns
empty audio and no error. Its maintainers' way is to phonemize with ``piper-phonemize``
(which bundles espeak-ng and its data) and pass one list of codepoints per sentence in
``GenerationConfig.phoneme_codepoints``. This module is that adapter.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from edge.errors import MissingDependency, ModelError, StageError

_LOGGER = logging.getLogger(__name__)

# espeak-ng keeps one global state per process (voice, buffers): one call at a time, across
# every Phonemizer in the process.
_ESPEAK_LOCK = threading.Lock()


def _load() -> Any:
    try:
        import piper_phonemize
    except ImportError:
        raise MissingDependency.for_module("piper_phonemize", "tts") from None
    return piper_phonemize


class Phonemizer:
    """espeak-ng phonemes, as codepoints, one list per sentence espeak finds in the text."""

    def __init__(self, voice: str = "en-us") -> None:
        self._pp = _load()
        self.voice = voice
        try:
            self._phonemize("test")
        except RuntimeError as err:
            raise ModelError(f"espeak-ng has no voice {voice!r} ({err}): check the voice's "
                             "language in its model metadata", code="model.invalid") from None

    def _phonemize(self, text: str) -> list[list[str]]:
        with _ESPEAK_LOCK:
            return self._pp.phonemize_espeak(text, self.voice)

    def phonemize(self, text: str) -> list[list[int]]:
        """Codepoint lists, one per sentence; sentences without phonemes are left out."""
        if not text.strip():
            return []
        try:
            sentences = self._phonemize(text)
        except RuntimeError as err:
            raise StageError(f"phonemizing failed: {err}", code="tts.phonemize") from err
        out = []
        for sentence in sentences:
            # piper-phonemize yields one codepoint per item; join-and-split makes that certain.
            codepoints = [ord(c) for c in "".join(sentence)]
            if codepoints:
                out.append(codepoints)
        return out
