import json
import subprocess
import sys

import pytest
import torch

from dse.core import measure
from dse.core.config import TrialConfig
from dse.core.stream import StreamingRecognizer
from dse.core.build import build_recognizer


def test_wer_cer_known_pair():
    # one substitution in 4 words; 2 character edits in 19 characters
    s = measure.score(["the cat sat down"], ["the bat sat down"])
    assert s["wer"] == pytest.approx(0.25)
    assert s["cer"] == pytest.approx(1 / 16)


def test_ttft_counts_arrival_and_compute():
    # chunk k ready at 0.2 s + 0.16 s * k; compute 0.05 s; the first token after chunk 2
    ready = [0.2, 0.36, 0.52]
    assert measure.ttft_s([0.05, 0.05, 0.05], ready, [False, False, True]) == pytest.approx(0.57)
    # slow compute queues: chunk 1 starts when chunk 0 ends (0.5 s), not when it is ready
    assert measure.ttft_s([0.3, 0.3], [0.2, 0.36], [False, True]) == pytest.approx(0.8)
    assert measure.ttft_s([0.1], [0.2], [False]) is None


class FakeClock:
    """Each call advances 7 ms: every chunk's compute then measures exactly 7 ms."""

    def __init__(self):
        self.now = 0

    def __call__(self):
        self.now += 7_000_000
        return self.now


def test_rtf_and_chunk_latency_on_fake_clock(tiny):
    rec = StreamingRecognizer.from_loaded(tiny, beam_width=1, clock=FakeClock())
    audio = torch.zeros(16000)  # 1 s
    timing = measure.stream_utterance(rec, audio)
    assert all(c == pytest.approx(0.007) for c in timing.chunk_compute_s)
    assert timing.rtf == pytest.approx(0.007 * len(timing.chunk_compute_s) / 1.0)
    # 1 s at 16 frames per chunk of 10 ms: 7 chunks cover 100 frames
    assert len(timing.chunk_compute_s) == 7


def test_percentile():
    assert measure.percentile([1, 2, 3, 4, 5], 50) == 3
    assert measure.percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert measure.percentile([], 50) is None


def test_random_weights_report_wer_not_measured(tiny, manifest):
    audio = measure.load_eval_audio(manifest)
    built = build_recognizer(tiny, TrialConfig(beam_width=1))
    result = measure.measure(built.recognizer, audio, accuracy=tiny.trained)
    assert result["wer"] is None and result["cer"] is None
    assert result["utterances"] == 3 and result["rtf_p95"] > 0


def test_trained_model_scores_same_pass(tiny, manifest):
    audio = measure.load_eval_audio(manifest)
    rec = build_recognizer(tiny, TrialConfig(beam_width=1)).recognizer
    result = measure.measure(rec, audio, accuracy=True)
    hyps = [t["hyp"] for t in result["transcripts"]]
    assert result["wer"] == pytest.approx(measure.score(audio.texts, hyps)["wer"])


def test_bad_file_skipped_not_fatal(manifest):
    (manifest.parent / "audio" / "u1.wav").write_bytes(b"not audio at all")
    audio = measure.load_eval_audio(manifest)
    assert len(audio.waveforms) == 2
    assert len(audio.skipped) == 1 and "u1.wav" in audio.skipped[0] and "corrupt" in audio.skipped[0]


def test_interleaved_speedup_of_identical_configs_is_near_one(tiny, manifest):
    audio = measure.load_eval_audio(manifest)
    a = build_recognizer(tiny, TrialConfig(beam_width=1)).recognizer
    b = build_recognizer(tiny, TrialConfig(beam_width=1)).recognizer
    r = measure.interleaved_speedup(a, b, audio)
    assert r["samples"] == 3
    assert 0.2 < r["speedup"] < 5


def test_cli_json(manifest):
    out = subprocess.run([sys.executable, "-m", "dse.measure", "--model", "tiny", "--weights", "random",
                          "--beam-width", "2", "--threads", "1", "--eval-set", str(manifest), "--json",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["wer"] is None and rec["params"] == 114_333
    for key in ("rtf_p50", "rtf_p95", "ttft_s", "chunk_latency_p95_ms", "machine", "peak_rss_mib"):
        assert key in rec
    assert rec["machine"]["threads"] == 1


def test_cli_table_says_not_measured(manifest):
    out = subprocess.run([sys.executable, "-m", "dse.measure", "--model", "tiny", "--eval-set", str(manifest),
                          "--no-progress", "--beam-width", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "WER" in out.stdout and "not measured" in out.stdout


def test_cli_bad_eval_set_is_clear(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dse.measure", "--model", "tiny", "--eval-set",
                          str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "manifest not found" in out.stderr and "Traceback" not in out.stderr


def test_word_errors_sum_to_the_pooled_wer():
    refs = ["the cat sat down", "a dog", "hello there world"]
    hyps = ["the bat sat down", "a big dog", ""]
    errors = measure.word_errors(refs, hyps)
    assert errors == [(1, 4), (1, 2), (3, 3)]
    assert sum(e for e, _ in errors) / sum(w for _, w in errors) == pytest.approx(measure.score(refs, hyps)["wer"])


def test_wer_interval_brackets_the_wer_and_shrinks_with_more_utterances():
    few = [(1, 5), (0, 5), (3, 5), (0, 5)] * 5
    lo, hi = measure.wer_interval(few)
    assert lo < 4 / 20 < hi
    lo4, hi4 = measure.wer_interval(few * 16)
    assert lo < lo4 < 0.2 < hi4 < hi


def test_paired_difference_separates_a_real_gap_from_noise():
    words = [6] * 60
    base = [(i % 3, w) for i, w in enumerate(words)]
    # one more error in every utterance: 1/6 absolute, never zero in any resample
    worse = [(e + 1, w) for e, w in base]
    d, lo, hi = measure.paired_wer_difference(worse, base)
    assert d == pytest.approx(1 / 6) and lo == pytest.approx(1 / 6) and hi == pytest.approx(1 / 6)
    # errors moved between utterances, same total: no difference, and 0 inside the interval
    shuffled = [(base[(i + 1) % 60][0], w) for i, w in enumerate(words)]
    d, lo, hi = measure.paired_wer_difference(shuffled, base)
    assert d == 0 and lo < 0 < hi
    with pytest.raises(ValueError, match="same utterances"):
        measure.paired_wer_difference(base[:-1], base)


def test_measure_reports_wer_interval_and_per_utterance_errors(tiny, manifest):
    audio = measure.load_eval_audio(manifest)
    result = measure.measure(build_recognizer(tiny, TrialConfig(beam_width=1)).recognizer, audio, accuracy=True)
    lo, hi = result["wer_ci95"]
    assert lo <= result["wer"] <= hi
    t = result["transcripts"]
    assert sum(x["errors"] for x in t) / sum(x["words"] for x in t) == pytest.approx(result["wer"])
