"""Streaming geometry that needs no torch: the front end's frames and samples, and a stream's
chunks and end-of-stream padding. :mod:`dse.core.features` and :mod:`dse.core.stream` use it
and re-export it; the torch-free runtime (:mod:`dse.deploy.lite`) shares it with them.
"""
from __future__ import annotations

import dataclasses
import math

# torchaudio's RNN-T log compression: a fixed gain before the piecewise-linear log
LOG_GAIN = pow(10, 0.05 * 2 * 20 * math.log10(32767))


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


def chunk_geometry(segment_length: int, right_context_length: int) -> tuple[int, int]:
    """(frames per chunk, frames advanced per chunk)."""
    return segment_length + right_context_length, segment_length


def flush_padding_samples(num_samples: int, features: FeatureConfig, segment_length: int,
                          right_context_length: int) -> int:
    """Zero samples appended at the end of a stream of ``num_samples`` samples.

    Every frame that starts inside the real audio (``ceil(num_samples / hop)`` frames)
    is decoded as a segment frame: that takes ``C = ceil(frames / segment_length)``
    chunks, i.e. ``C * segment_length + right_context_length`` frames in all.
    """
    real_frames = max(1, math.ceil(num_samples / features.hop_samples))
    chunks = math.ceil(real_frames / segment_length)
    total = features.samples_for_frames(chunks * segment_length + right_context_length)
    return max(0, total - num_samples)
