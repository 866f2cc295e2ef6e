import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile

from dse.core import models


def tone(seconds: float, rate: int = 16000, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """A test signal: a tone with a little noise, in [-1, 1]."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * math.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture
def tiny():
    return models.random_model("tiny", seed=0)


def write_tones(root: Path) -> Path:
    """Three tone utterances under ``root/audio`` and their JSONL manifest (relative paths) in ``root``."""
    audio_dir = root / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, secs in enumerate([1.3, 0.9, 2.1]):
        soundfile.write(audio_dir / f"u{i}.wav", tone(secs, freq=200 + 50 * i, seed=i), 16000)
        rows.append({"path": f"audio/u{i}.wav", "duration": secs, "text": f"hello world {i}"})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def manifest(tmp_path) -> Path:
    """A three-utterance JSONL manifest with relative paths."""
    return write_tones(tmp_path)
