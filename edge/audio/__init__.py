"""Audio core: the canonical chunk, conversion, WAV files, queues and pre-roll.

Nothing here imports a sound library; PyAudio lives in :mod:`edge.audio.pyaudio_io`.
"""

from edge.audio.chunk import (
    CHUNK_SAMPLES,
    SAMPLE_RATE,
    AudioChunk,
    Rechunker,
    Resampler,
    to_mono_int16,
)

__all__ = [
    "CHUNK_SAMPLES",
    "SAMPLE_RATE",
    "AudioChunk",
    "Rechunker",
    "Resampler",
    "to_mono_int16",
]
