"""FastRNNTSearch against torchaudio's RNNTBeamSearch and dse's FusedBeamSearch.

Greedy search must be token-equal (in fact bit-equal) to torchaudio; with
``cache_predictor=False`` beam search, LM fusion included, is bit-equal too (tokens,
scores, predictor outputs and states); with the default predictor cache a beam can only
differ where two scores tie to float32 precision (see dse/core/decoder.py).
"""
from types import SimpleNamespace

import pytest
import torch
from torchaudio.models import RNNTBeamSearch

from conftest import tone
from dse.core import models
from dse.core.decoder import FastRNNTSearch
from dse.core.errors import DSEError
from dse.core.lm import CharNgramLM, FusedBeamSearch, load_cached
from dse.core.stream import StreamingRecognizer

SYMBOLS = models.CharTokenizer().symbols
TEXTS = ["the cat sat on the mat", "the cat ate the rat", "a dog sat on the log", "the mat is flat",
         "she said it was the last one", "we'll see what they do"]


@pytest.fixture(scope="module")
def small_lm():
    return CharNgramLM.train(TEXTS, SYMBOLS, order=4)


@pytest.fixture
def one_thread():
    """Both decoders run the same way either way; one thread keeps the busy CI machine quick."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed, blank_bias=0.0):
    """The tiny random model; a blank bias makes it emit rarely, as a trained model does, so that
    beams revisit token sequences (predictor cache hits) and merge equal ones (log-add)."""
    loaded = models.random_model("tiny", seed=seed)
    with torch.no_grad():
        loaded.model.joiner.linear.bias[loaded.tokenizer.blank] += blank_bias
    return loaded


def chunks(loaded, n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    frames = loaded.arch["segment_length"] + loaded.arch["right_context_length"]
    return [scale * torch.randn(1, frames, loaded.arch["input_dim"], generator=g) for _ in range(n)]


def stream(decoder, loaded, xs, beam_width):
    """Hypotheses after every chunk of a loop over ``decoder.infer``, state and beam carried."""
    length = torch.tensor([xs[0].size(1)])
    state = hyps = None
    out = []
    with torch.inference_mode():
        for x in xs:
            hyps, state = decoder.infer(x, length, beam_width, state=state, hypothesis=hyps)
            out.append(hyps)
    return out


def assert_bit_equal(expected, got):
    assert [h[0] for h in got] == [h[0] for h in expected]
    assert [h[3] for h in got] == [h[3] for h in expected]
    for e, g in zip(expected, got):
        assert e[1].shape == g[1].shape and torch.equal(e[1], g[1])
        assert [[s.shape for s in layer] for layer in e[2]] == [[s.shape for s in layer] for layer in g[2]]
        assert all(torch.equal(a, b) for la, lb in zip(e[2], g[2]) for a, b in zip(la, lb))


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_is_bit_equal_to_torchaudio_over_many_chunks(one_thread, cache, seed):
    loaded = models.random_model("tiny", seed=seed)
    blank = loaded.tokenizer.blank
    xs = chunks(loaded, 45, seed=seed)
    expected = stream(RNNTBeamSearch(loaded.model, blank), loaded, xs, 1)
    got = stream(FastRNNTSearch(loaded.model, blank, cache_predictor=cache), loaded, xs, 1)
    assert len(expected[-1][0][0]) > 40  # the search emitted plenty of tokens
    for e, g in zip(expected, got):
        assert_bit_equal(e, g)


# blank bias 3: 70 merges, 19 % of torchaudio's predictor rows are cache hits (counted by hand)
@pytest.mark.parametrize("beam_width,temperature,blank_bias", [(2, 1.0, 0.0), (4, 2.0, 3.0), (6, 1.5, 2.0)])
def test_beam_without_cache_is_bit_equal_and_with_cache_token_equal(one_thread, beam_width, temperature,
                                                                    blank_bias):
    loaded = tiny_model(1, blank_bias)
    blank = loaded.tokenizer.blank
    xs = chunks(loaded, 40, seed=7, scale=0.5)
    expected = stream(RNNTBeamSearch(loaded.model, blank, temperature=temperature), loaded, xs, beam_width)
    exact = stream(FastRNNTSearch(loaded.model, blank, temperature=temperature, cache_predictor=False),
                   loaded, xs, beam_width)
    cached = stream(FastRNNTSearch(loaded.model, blank, temperature=temperature), loaded, xs, beam_width)
    for e, x, c in zip(expected, exact, cached):
        assert_bit_equal(e, x)
        assert [h[0] for h in c] == [h[0] for h in e]
        # reused predictor rows may differ from torchaudio's recomputation in the last bit
        assert [h[3] for h in c] == pytest.approx([h[3] for h in e], rel=1e-5)


@pytest.mark.parametrize("beam_width", [1, 3])
def test_lm_fusion_equals_fused_beam_search(one_thread, small_lm, beam_width):
    loaded = tiny_model(2, blank_bias=2.0)
    xs = chunks(loaded, 40, seed=3, scale=0.5)
    fused = FusedBeamSearch(loaded.model, loaded.tokenizer, small_lm, 0.5, temperature=1.5)
    expected = stream(fused, loaded, xs, beam_width)
    exact = stream(FastRNNTSearch.from_tokenizer(loaded.model, loaded.tokenizer, temperature=1.5, lm=small_lm,
                                                 lm_weight=0.5, cache_predictor=False), loaded, xs, beam_width)
    cached = stream(FastRNNTSearch.from_tokenizer(loaded.model, loaded.tokenizer, temperature=1.5, lm=small_lm,
                                                  lm_weight=0.5), loaded, xs, beam_width)
    plain = stream(RNNTBeamSearch(loaded.model, loaded.tokenizer.blank, temperature=1.5), loaded, xs, beam_width)
    assert [h[0] for h in expected[-1]] != [h[0] for h in plain[-1]]  # the LM changes this search
    for e, x, c in zip(expected, exact, cached):
        assert_bit_equal(e, x)
        assert [h[0] for h in c] == [h[0] for h in e]


def test_hypotheses_travel_between_torchaudio_and_fast_search(one_thread):
    """The beams are torchaudio tuples: either decoder can continue the other's stream."""
    loaded = models.random_model("tiny", seed=0)
    blank = loaded.tokenizer.blank
    xs = chunks(loaded, 12, seed=5, scale=0.5)
    length = torch.tensor([xs[0].size(1)])
    ref = RNNTBeamSearch(loaded.model, blank)
    fast = FastRNNTSearch(loaded.model, blank, cache_predictor=False)
    expected = stream(ref, loaded, xs, 3)
    state = hyps = None
    with torch.inference_mode():
        for i, x in enumerate(xs):
            hyps, state = (fast if i % 3 else ref).infer(x, length, 3, state=state, hypothesis=hyps)
            assert_bit_equal(expected[i], hyps)


def test_small_predictor_cache_is_rebuilt_from_the_beam(one_thread):
    loaded = models.random_model("tiny", seed=0)
    blank = loaded.tokenizer.blank
    xs = chunks(loaded, 30, seed=9, scale=0.5)
    expected = stream(RNNTBeamSearch(loaded.model, blank), loaded, xs, 1)
    fast = FastRNNTSearch(loaded.model, blank, max_slots=8)
    got = stream(fast, loaded, xs, 1)
    for e, g in zip(expected, got):
        assert_bit_equal(e, g)
    assert fast._store.used < 8 + 4 * 4 * 100  # rebuilt, not grown without bound


def test_offline_forward_equals_torchaudio(one_thread):
    loaded = models.random_model("tiny", seed=0)
    feats = torch.randn(120, 80, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = RNNTBeamSearch(loaded.model, loaded.tokenizer.blank).forward(feats, torch.tensor(120), 3)
        got = FastRNNTSearch(loaded.model, loaded.tokenizer.blank, cache_predictor=False)(feats, torch.tensor(120), 3)
    assert_bit_equal(expected, got)


def naive_probabilities(lm, history: str) -> list:
    """The LM's distribution after ``history`` computed order by order from scratch, nothing
    memoised: interpolated absolute discounting as the LM defines it."""
    from dse.core.ngram import START

    h = (START * (lm.order - 1) + history)[-(lm.order - 1):] if lm.order > 1 else ""
    probs = [1.0 / len(lm.vocab)] * len(lm.vocab)
    for k in range(1, lm.order + 1):
        suffix = h[len(h) - (k - 1):] if k > 1 else ""
        followers = lm.tables[k - 1].get(suffix)
        if not followers:
            continue
        total = sum(followers.values())
        backoff = lm.discount * len(followers) / total
        probs = [backoff * p for p in probs]
        for c, n in followers.items():
            if c in lm.vocab:
                probs[lm.vocab.index(c)] += max(n - lm.discount, 0.0) / total
    return probs


@pytest.mark.parametrize("order", [1, 2, 4, 6])
def test_the_memoised_lm_is_bit_equal_to_its_definition(order):
    import math

    import numpy as np

    lm = CharNgramLM.train(TEXTS, SYMBOLS, order=order)
    histories = ["", "t", "the c", "zzq", "the cat sat on the mat and", "we'll s", "xx the", "the c"]
    for history in histories + histories[::-1]:  # each again, now from the memo
        want = np.array([math.log(p) for p in naive_probabilities(lm, history)], np.float32)
        assert np.array_equal(lm.log_probs(history), want)
        assert torch.equal(lm.distribution(history), torch.from_numpy(want))
    lm._cache.clear()  # the suffix memo alone serves them too
    assert all(np.array_equal(lm.log_probs(h), np.array([math.log(p) for p in naive_probabilities(lm, h)], np.float32))
               for h in histories)


@pytest.mark.parametrize("weight", [0.15, 0.3, 1.0])
def test_lm_rows_are_bit_equal_to_the_fused_search_scores(small_lm, weight):
    """The rows LMRows computes in numpy against lm_log_probs, FusedBeamSearch's torch arithmetic."""
    from dse.core.decoder import LMRows, lm_log_probs

    blank = len(SYMBOLS)
    rows = LMRows(small_lm, SYMBOLS, blank, weight)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        tokens = [blank] + torch.randint(0, blank, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
        got = rows.gather([rows.row(tokens)])[0]
        want = lm_log_probs(small_lm, rows.history(tokens), small_lm.columns(SYMBOLS), weight)
        assert torch.equal(got, want)
        assert (rows.rows([rows.row(tokens)])[0] == want.numpy()).all()


def test_lm_fusion_is_validated(small_lm):
    loaded = models.random_model("tiny", seed=0)
    with pytest.raises(ValueError, match="blank to be the last token"):
        FastRNNTSearch(loaded.model, 0, lm=small_lm, lm_weight=0.3, symbols=SYMBOLS)
    numbered = SimpleNamespace(blank=loaded.tokenizer.blank, kind="numbered")  # no characters
    with pytest.raises(DSEError, match="character tokenizer"):
        FastRNNTSearch.from_tokenizer(loaded.model, numbered, lm=small_lm, lm_weight=0.3)
    # weight 0 (or no LM) is plain search: no LM table at all
    assert FastRNNTSearch(loaded.model, loaded.tokenizer.blank, lm=small_lm, lm_weight=0.0)._lm is None


def test_recognizer_streams_with_fast_search_like_torchaudio(one_thread, tiny):
    audio = torch.from_numpy(tone(2.3, seed=3))
    for beam_width in (1, 3):
        ref = StreamingRecognizer.from_loaded(tiny, beam_width=beam_width, search="torchaudio")
        fast = StreamingRecognizer.from_loaded(tiny, beam_width=beam_width)
        fast.decoder = FastRNNTSearch(tiny.model, tiny.tokenizer.blank)
        assert fast.transcribe(audio, piece_samples=1000) == ref.transcribe(audio, piece_samples=1000)
        assert len(ref.tokens) > 0 and fast.tokens == ref.tokens


# -- the shipped default model on its eval split ------------------------------------------------
# Run once by hand over all 240 eval utterances (default FastRNNTSearch, i.e. predictor cache on,
# one thread, recognizers interleaved): transcripts identical for greedy 240/240, beam 4 +
# temperature 2 240/240, beam 4 + temperature 2 + LM 0.15 240/240; the final beams (all four
# token sequences, in order) were identical too in all 3 x 240 runs, so no float32 score tie
# flipped anything. With cache_predictor=False (bit-identical by construction), beam 4 +
# temperature 2 + LM 0.15: 240/240 as well.

@pytest.fixture(scope="module")
def default_eval():
    if not models.default_available():
        pytest.skip("no shipped default model")
    from dse.core.measure import load_eval_audio

    loaded = models.load_model(None, None, 0)
    return loaded, load_cached(loaded.lm_path), load_eval_audio(models.DEFAULT_EVAL, limit=40)


@pytest.mark.parametrize("config", [dict(beam_width=1), dict(beam_width=4, temperature=2.0, lm_weight=0.15)],
                         ids=["greedy", "beam4-T2-lm0.15"])
def test_default_model_transcripts_are_identical(one_thread, default_eval, config):
    loaded, lm, audio = default_eval
    config = dict(config)
    lm_weight = config.pop("lm_weight", 0.0)
    kwargs = dict(config, lm=lm, lm_weight=lm_weight) if lm_weight else config
    ref = StreamingRecognizer.from_loaded(loaded, search="torchaudio", **kwargs)
    fast = StreamingRecognizer.from_loaded(loaded, **kwargs)  # the vectorised search is the default
    assert isinstance(fast.decoder, FastRNNTSearch)
    assert type(ref.decoder).__name__ == ("FusedBeamSearch" if lm_weight else "RNNTBeamSearch")
    expected = [ref.transcribe(w) for w in audio.waveforms]
    got = [fast.transcribe(w) for w in audio.waveforms]
    assert len(got) == 40 and sum(map(bool, expected)) > 30
    assert got == expected
