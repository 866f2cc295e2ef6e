"""Log-mel front end, offline and streaming, with identical frames either way.

Follows torchaudio's RNN-T pipeline (16 kHz, 400-sample window, 160-sample hop,
80 mel bins, piecewise-linear log, global mean/inverse-std normalisation) with one
deliberate difference: frames are not centred (``center=False``), so frame ``i``
covers samples ``[i * hop, i * hop + window)`` and a stream can emit every frame
as soon as its last sample has arrived. Offline extraction and the streaming
extractor therefore produce the same frames, bit for bit up to float rounding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torchaudio

_DECIBEL = 2 * 20 * math.log10(32767)
_GAIN = pow(10, 0.05 * _DECIBEL)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Front-end geometry. Durations are in samples at ``sample_rate`` Hz."""

    sample_rate: int = 16000
    window_samples: int = 400
    hop_samples: int = 160
    n_mels: int = 80

    @property
    def n_fft(self) -> int:
        return self.window_samples

    @property
    def frame_rate_hz(self) -> float:
        return self.sample_rate / self.hop_samples

    def num_frames(self, num_samples: int) -> int:
        """Number of complete frames in ``num_samples`` samples."""
        if num_samples < self.window_samples:
            return 0
        return (num_samples - self.window_samples) // self.hop_samples + 1

    def samples_for_frames(self, num_frames: int) -> int:
        """Samples that must have arrived before frame ``num_frames - 1`` is complete."""
        if num_frames <= 0:
            return 0
        return (num_frames - 1) * self.hop_samples + self.window_samples

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def piecewise_linear_log(x: torch.Tensor) -> torch.Tensor:
    """torchaudio's RNN-T log compression: linear below e, log above (after a fixed gain)."""
    x = x * _GAIN
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
