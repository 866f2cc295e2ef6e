import pytest
import torch
from torchaudio.models import RNNTBeamSearch

from dse.core import models
from dse.core.features import LogMel, StreamingFeatures
from dse.core.stream import StreamingRecognizer, flush_padding_samples
from conftest import tone


def test_streaming_features_equal_offline():
    logmel = LogMel()
    audio = torch.from_numpy(tone(1.37))
    offline = logmel(audio)
    stream = StreamingFeatures(logmel)
    pieces = [stream.push(audio[i:i + 777]) for i in range(0, audio.numel(), 777)]
    online = torch.cat(pieces)
    assert online.shape == offline.shape
    assert torch.allclose(online, offline, atol=1e-4)


def reference_tokens(loaded, audio, beam_width, temperature=1.0):
    """A plain loop over torchaudio's RNNTBeamSearch.infer on offline features."""
    arch = loaded.arch
    seg, rc = arch["segment_length"], arch["right_context_length"]
    pad = flush_padding_samples(audio.numel(), loaded.features, seg, rc)
    feats = loaded.logmel()(torch.cat([audio, torch.zeros(pad)]))
    decoder = RNNTBeamSearch(loaded.model, loaded.tokenizer.blank, temperature=temperature)
    state, hyps = None, None
    with torch.inference_mode():
        for start in range(0, feats.size(0) - (seg + rc) + 1, seg):
            chunk = feats[start:start + seg + rc]
            hyps, state = decoder.infer(chunk, torch.tensor([seg + rc]), beam_width, state=state, hypothesis=hyps)
    return [t for t in hyps[0][0] if t != loaded.tokenizer.blank]


@pytest.mark.parametrize("beam_width", [1, 3])
@pytest.mark.parametrize("piece_samples", [160, 1000, 3200])
def test_streaming_equals_torchaudio_loop(tiny, beam_width, piece_samples):
    audio = torch.from_numpy(tone(2.3, seed=3))
    rec = StreamingRecognizer.from_loaded(tiny, beam_width=beam_width)
    rec.transcribe(audio, piece_samples=piece_samples)
    expected = reference_tokens(tiny, audio, beam_width)
    assert len(expected) > 0  # random weights emit tokens: the comparison is not vacuous
    assert rec.tokens == expected


def test_temperature_reaches_the_search_and_changes_its_result(tiny):
    audio = torch.from_numpy(tone(2.3, seed=3))
    results = {}
    for temperature in (1.0, 4.0):
        rec = StreamingRecognizer.from_loaded(tiny, beam_width=3, temperature=temperature)
        rec.transcribe(audio)
        assert rec.tokens == reference_tokens(tiny, audio, 3, temperature)
        results[temperature] = rec.tokens
    assert results[1.0] != results[4.0]
    with pytest.raises(ValueError, match="temperature=0 must be positive"):
        StreamingRecognizer.from_loaded(tiny, temperature=0)


def test_chunks_cover_all_audio(tiny):
    rec = StreamingRecognizer.from_loaded(tiny, beam_width=1)
    for secs in (0.05, 0.5, 1.0, 1.61):
        audio = torch.from_numpy(tone(secs))
        rec.transcribe(audio)
        hop, seg = tiny.features.hop_samples, tiny.arch["segment_length"]
        # every frame that starts inside the audio was decoded as a segment frame
        assert rec.chunks_done * seg * hop >= audio.numel()
        assert (rec.chunks_done - 1) * seg * hop < audio.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_streams_many_chunks(dtype):
    loaded = models.random_model("tiny", seed=1)
    loaded.model.to(dtype)
    rec = StreamingRecognizer.from_loaded(loaded, beam_width=2, dtype=dtype)
    rec.transcribe(torch.from_numpy(tone(4.0)))
    assert rec.chunks_done >= 20
    assert all(t.dtype in (dtype, torch.int32) for layer in rec.state.encoder for t in layer)


def test_partial_transcripts_grow(tiny):
    rec = StreamingRecognizer.from_loaded(tiny, beam_width=1)
    audio = torch.from_numpy(tone(2.0))
    events = []
    for i in range(0, audio.numel(), 2560):
        events += rec.accept_audio(audio[i:i + 2560])
    events += rec.finish()
    assert [e.index for e in events] == list(range(len(events)))
    assert events[-1].tokens == rec.tokens
    assert all(e.compute_ns > 0 for e in events)
