"""Whisper log-mel features as Smart Turn v3 computes them, in NumPy.

The model was trained on the features of Hugging Face's ``WhisperFeatureExtractor(chunk_length=8)``
and pipecat feeds it exactly those (its ``_whisper_features.py``), so the same steps are taken
here, in the same precision, on the same window:

1. the last 8 s of the turn (128000 samples at 16 kHz); a shorter turn is padded with zeros
   *in front*, so the end of the speech always sits at the end of the window;
2. the waveform normalised to zero mean and unit variance (float32, over the whole padded window);
3. a centred power spectrogram (reflect padding, periodic Hann window of 400, hop 160, float64);
4. 80 Slaney-normalised mel bands from 0 to 8 kHz, ``log10`` with a floor of 1e-10, the last
   frame dropped (800 frames remain), clamped to 8 decades below the maximum, then ``(x + 4) / 4``.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
WINDOW_S = 8
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE  # 128000
N_FFT = 400
HOP = 160
N_MELS = 80
FRAMES = WINDOW_SAMPLES // HOP  # 800
_MEL_FLOOR = 1e-10
_VAR_EPS = 1e-7


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - 15.0))
    return freq


def mel_filterbank() -> np.ndarray:
    """(80, 201) triangular filters with Slaney area normalisation (float64)."""
    bins = N_FFT // 2 + 1
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0],
                                   _hz_to_mel(np.array([SAMPLE_RATE / 2.0]))[0], N_MELS + 2))
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, bins)
    slopes = edges[None, :] - fft_freqs[:, None]  # (bins, mels + 2)
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= (2.0 / (edges[2:N_MELS + 2] - edges[:N_MELS]))[None, :]
    return np.ascontiguousarray(filters.T)


_FILTERS = mel_filterbank()
_HANN = np.hanning(N_FFT + 1)[:-1]  # periodic, as torch.hann_window


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of ``audio`` as float32 in [-1, 1), zero-padded in front to exactly 8 s.

    ``audio``: 16 kHz mono, int16 (the pipeline's samples) or float in [-1, 1].
    """
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"expected 1-D audio, got shape {x.shape}")
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    if len(x) >= WINDOW_SAMPLES:
        return x[-WINDOW_SAMPLES:]
    out = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    if len(x):
        out[-len(x):] = x
    return out


def log_mel(window: np.ndarray) -> np.ndarray:
    """(80, 800) float32 features of an 8 s window made by :func:`last_window`."""
    x = np.asarray(window, dtype=np.float32)
    if x.shape != (WINDOW_SAMPLES,):
        raise ValueError(f"expected {WINDOW_SAMPLES} samples, got shape {x.shape}")
    x = (x - x.mean()) / np.sqrt(x.var() + _VAR_EPS)
    padded = np.pad(x.astype(np.float64), (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # (801, 400)
    power = np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2  # (801, 201)
    mel = np.log10(np.maximum(_MEL_FLOOR, _FILTERS @ power.T))[:, :-1]  # (80, 800)
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def features(audio: np.ndarray) -> np.ndarray:
    """Smart Turn's input for the end of ``audio``: (1, 80, 800) float32."""
    return log_mel(last_window(audio))[None]
