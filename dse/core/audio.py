"""Reading audio: any soundfile format, any channel count, any rate -> mono 16 kHz float32."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchaudio

from dse.core.errors import AudioError, not_empty

TARGET_RATE_HZ = 16000


def read_audio(path: str | os.PathLike, target_rate_hz: int = TARGET_RATE_HZ) -> torch.Tensor:
    """Read ``path`` as mono float32 at ``target_rate_hz``; returns ``(samples,)`` in [-1, 1].

    Multi-channel audio is down-mixed by averaging the channels. Raises
    :class:`AudioError` naming the file for a missing, unreadable, corrupt or empty file.
    """
    import soundfile

    path = Path(not_empty(path, "an audio path", "a file", AudioError))
    if not path.exists():
        raise AudioError(f"{path}: audio file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, expected an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty (0 bytes)")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"{path}: unreadable or corrupt audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio has no samples (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if rate != target_rate_hz:
        mono = torchaudio.functional.resample(mono, int(rate), target_rate_hz)
    return mono.contiguous()


def write_audio(path: str | os.PathLike, waveform: torch.Tensor | np.ndarray,
                rate_hz: int = TARGET_RATE_HZ, subtype: str | None = None) -> None:
    """Write mono ``waveform`` ``(samples,)``; the format follows the suffix (.wav, .flac, .ogg)."""
    import soundfile

    data = waveform.detach().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.clip(data, -1.0, 1.0).astype(np.float32), rate_hz, subtype=subtype)
