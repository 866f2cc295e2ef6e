import json

import numpy as np
import pytest
import soundfile
import torch

from dse.core.audio import read_audio
from dse.core.datasets import iter_checked, load_eval_set, read_librispeech, read_manifest
from dse.core.errors import AudioError, DatasetError
from conftest import tone


def test_downmix_and_resample(tmp_path):
    stereo = np.stack([tone(1.0, rate=8000), np.zeros(8000, dtype=np.float32)], axis=1)
    soundfile.write(tmp_path / "s.wav", stereo, 8000)
    x = read_audio(tmp_path / "s.wav")
    assert x.shape == (16000,) and x.dtype == torch.float32
    assert abs(float(x.abs().max()) - 0.15) < 0.03  # mean of a 0.3 tone and silence


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"), ("empty", "empty"), ("corrupt", "unreadable or corrupt"),
    ("zero_frames", "no samples"), ("directory", "is a directory")])
def test_bad_audio_names_file_and_problem(tmp_path, case, match):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "corrupt":
        path.write_bytes(b"RIFF\x00\x00garbage" * 10)
    elif case == "zero_frames":
        soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif case == "directory":
        path.mkdir()
    with pytest.raises(AudioError, match=match) as err:
        read_audio(path)
    assert str(path) in str(err.value)


def test_manifest_relative_paths_and_errors(tmp_path, manifest):
    utts = read_manifest(manifest)
    assert utts[0].path == manifest.parent / "audio" / "u0.wav"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.wav", "text": "x"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        read_manifest(bad)
    bad.write_text('{"path": "a.wav"}\n')
    with pytest.raises(DatasetError, match="needs the keys 'path' and 'text'"):
        read_manifest(bad)


def test_batch_reports_each_bad_utterance(tmp_path, manifest):
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    rows.append({"path": "audio/missing.wav", "text": "gone"})
    rows.append({"path": "audio/u0.wav", "text": ""})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = list(iter_checked(read_manifest(manifest), read_audio))
    problems = [p for _, _, p in results if p]
    assert len(results) == 5 and len(problems) == 2
    assert "missing.wav: audio file not found" in problems[0]
    assert "zero-length transcript" in problems[1]


def test_librispeech_reader(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    soundfile.write(chapter / "1089-134686-0000.flac", tone(0.5), 16000)
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW\n")
    utts = load_eval_set(tmp_path / "LibriSpeech" / "test-clean")
    assert len(utts) == 1 and utts[0].text == "he hoped there would be stew"
    assert utts[0].path.name == "1089-134686-0000.flac"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no \\*.trans.txt"):
        read_librispeech(tmp_path / "empty")
