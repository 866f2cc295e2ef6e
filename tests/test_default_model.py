"""The shipped default: loads, and transcribes eval utterances correctly."""
import pytest

from dse.core import models
from dse.core.audio import read_audio
from dse.core.datasets import read_manifest
from dse.core.stream import StreamingRecognizer

pytestmark = pytest.mark.skipif(not models.default_available(), reason="no shipped default checkpoint")


def test_default_is_compact_and_small_wide_architecture():
    assert models.DEFAULT_CHECKPOINT.stat().st_size <= 25 * 2**20
    loaded = models.load_checkpoint(models.DEFAULT_CHECKPOINT)
    assert loaded.name == "small-wide" and loaded.trained
    assert loaded.arch == models.architecture("small-wide")


def test_default_transcribes_an_eval_utterance():
    loaded = models.load_checkpoint(models.DEFAULT_CHECKPOINT)
    rec = StreamingRecognizer.from_loaded(loaded, beam_width=4)
    utts = [u for u in read_manifest(models.DEFAULT_EVAL) if u.slice != "heldout"]
    # at least one of the first thirty seen-voice eval utterances comes out exactly right
    exact = [u.text for u in utts[:30] if rec.transcribe(read_audio(u.path)) == u.text]
    assert exact, "no eval utterance transcribed exactly"


def test_shipped_splits_are_large_enough():
    eval_utts = read_manifest(models.DEFAULT_EVAL)
    assert len(eval_utts) >= 200 and sum(u.duration_s for u in eval_utts) >= 600
    assert {"heldout"} <= {u.slice for u in eval_utts}
    adapt = {u.text for u in read_manifest(models.DEFAULT_ADAPT)}
    assert not adapt & {u.text for u in eval_utts}


def test_measure_cli_uses_default_on_any_manifest(manifest):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dse.measure", "--eval-set", str(manifest), "--json", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["model"] == "small-wide" and record["weights"].startswith("checkpoint:")
    assert record["wer"] is not None and record["utterances"] == 3
