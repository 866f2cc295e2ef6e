"""Log-mel front end, offline and streaming, with identical frames either way.

Follows torchaudio's RNN-T pipeline (16 kHz, 400-sample window, 160-sample hop,
80 mel bins, piecewise-linear log, global mean/inverse-std normalisation) with one
deliberate difference: frames are not centred (``center=False``), so frame ``i``
covers samples ``[i * hop, i * hop + window)`` and a stream can emit every frame
as soon as its last sample has arrived. Offline extraction and the streaming
extractor therefore produce the same frames, bit for bit up to float rounding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torchaudio

from dse.core.geometry import LOG_GAIN, FeatureConfig


def piecewise_linear_log(x: torch.Tensor) -> torch.Tensor:
    """torchaudio's RNN-T log compression: linear below e, log above (after a fixed gain)."""
    x = x * LOG_GAIN
    return torch.where(x > math.e, torch.log(x.clamp_min(math.e)), x / math.e)


class LogMel(torch.nn.Module):
    """Waveform ``(samples,)`` -> normalised features ``(frames, n_mels)``.

    ``mean`` and ``invstd`` are the global normalisation statistics, each ``(n_mels,)``.
    """

    def __init__(self, config: FeatureConfig = FeatureConfig(),
                 mean: Optional[torch.Tensor] = None, invstd: Optional[torch.Tensor] = None):
        super().__init__()
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, win_length=config.window_samples,
            hop_length=config.hop_samples, n_mels=config.n_mels, center=False, power=2.0)
        self.register_buffer("mean", torch.zeros(config.n_mels) if mean is None else mean.float().clone())
        self.register_buffer("invstd", torch.ones(config.n_mels) if invstd is None else invstd.float().clone())

    def raw(self, waveform: torch.Tensor) -> torch.Tensor:
        """Un-normalised log-mel ``(frames, n_mels)`` of ``waveform`` ``(samples,)``."""
        if waveform.numel() < self.config.window_samples:
            return waveform.new_zeros((0, self.config.n_mels))
        return piecewise_linear_log(self.mel(waveform).transpose(0, 1))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return (self.raw(waveform) - self.mean) * self.invstd


class StreamingFeatures:
    """Turns audio arriving in pieces of any size into the same frames as :class:`LogMel`.

    ``push(samples)`` returns the frames ``(n, n_mels)`` completed by the new samples.
    """

    def __init__(self, logmel: LogMel):
        self.logmel = logmel
        self.config = logmel.config
        self._buffer = torch.zeros(0)
        self.frames_emitted = 0
        self.samples_seen = 0

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        samples = samples.reshape(-1).float()
        self.samples_seen += samples.numel()
        self._buffer = torch.cat([self._buffer, samples]) if self._buffer.numel() else samples
        n = self.config.num_frames(self._buffer.numel())
        if n == 0:
            return torch.zeros((0, self.config.n_mels))
        used = self.config.samples_for_frames(n)
        frames = self.logmel(self._buffer[:used])
        # Keep the samples the next frame needs: it starts n * hop into the buffer.
        self._buffer = self._buffer[n * self.config.hop_samples:]
        self.frames_emitted += n
        return frames
