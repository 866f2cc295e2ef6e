"""The ONNX Runtime predictor step and joiner against torch's (the tiny architecture)."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dse.core import models  # noqa: E402
from dse.core import onnx_decoder as od  # noqa: E402
from dse.core.onnx_encoder import BackendError  # noqa: E402

FP32_TOL = 1e-5    # measured: 6e-7 on the predictor's output, 2e-7 on the joiner's logits
INT8_TOL = 0.1     # measured: 0.026 (predictor), 0.008 (joiner logits)


@pytest.fixture(scope="module")
def model():
    return models.random_model("tiny", seed=4).model.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("onnx-cache")
    return {p: od.decoder_onnx(model, p, cache, key="tiny-decoder") for p in ("fp32", "int8")}, cache


def inputs(model, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layers, hidden = len(model.predictor.lstm_layers), model.predictor.lstm_layers[0].hidden_dim
    tokens = torch.randint(0, model.joiner.linear.out_features, (batch, 1), generator=g)
    state = [[torch.randn(batch, hidden, generator=g), torch.randn(batch, hidden, generator=g)] for _ in range(layers)]
    dim = model.joiner.linear.in_features
    return tokens, state, torch.randn(batch, 1, dim, generator=g), torch.randn(batch, 1, dim, generator=g)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("precision,tol", [("fp32", FP32_TOL), ("int8", INT8_TOL)])
def test_predictor_and_joiner_match_torch(model, exported, batch, precision, tol):
    paths, _ = exported[0][precision]
    ort = od.use_onnx_decoder(model, paths["predictor"], paths["joiner"])
    tokens, state, source, target = inputs(model, batch)
    ones = torch.ones(batch, dtype=torch.int64)
    with torch.inference_mode():
        for given in (state, None):  # a carried state, and the zero state of a new stream
            want, _, want_state = model.predict(tokens, ones, given)
            got, _, got_state = ort.predict(tokens, ones, given)
            assert got.shape == want.shape and (got - want).abs().max().item() < tol
            for a, b in zip(want_state, got_state):
                assert all((x - y).abs().max().item() < tol for x, y in zip(a, b))
        want = model.join(source, ones, target, ones)[0]
        got = ort.join(source, ones, target, ones)[0]
    assert got.shape == want.shape and (got - want).abs().max().item() < tol
    if precision == "int8":
        assert (got - want).abs().max().item() > 1e-4  # it really is quantised


def test_export_cache_hit(model, exported):
    (paths, info), cache = exported[0]["int8"], exported[1]
    again, info2 = od.decoder_onnx(model, "int8", cache, key="tiny-decoder")
    assert not info["hit"] and info2["hit"] and again == paths and info2["export_s"] == 0
    assert info["bytes"] < exported[0]["fp32"][1]["bytes"] / 2


def test_the_predictor_takes_one_token_per_hypothesis(model, exported):
    paths = exported[0]["fp32"][0]
    predictor = od.OrtPredictor(paths["predictor"])
    with pytest.raises(BackendError, match=r"one token per hypothesis"):
        predictor(torch.zeros(1, 3, dtype=torch.int64), torch.tensor([3]), None)
    with pytest.raises(BackendError, match="is not a predictor exported by dse"):
        od.OrtPredictor(paths["joiner"])


def test_a_small_decoder_runs_on_one_thread(model, exported, tmp_path):
    from dse.core.ort_session import DECODER_ONE_THREAD_BYTES, decoder_threads

    paths = exported[0]["fp32"][0]
    assert decoder_threads(paths["predictor"], paths["joiner"], 2) == 1  # the tiny model's decoder
    big = tmp_path / "big.onnx"
    with open(big, "wb") as fh:
        fh.truncate(DECODER_ONE_THREAD_BYTES)
    assert decoder_threads(big, paths["joiner"], 2) == 2
    ort_model = od.use_onnx_decoder(model, paths["predictor"], paths["joiner"], threads=2)
    assert ort_model.predictor.threads == ort_model.joiner.threads == 1
    with pytest.raises(BackendError, match="does not exist"):
        od.use_onnx_decoder(model, tmp_path / "missing.onnx", paths["joiner"], threads=2)


# -- greedy search over these sessions: the numpy loop the torch-free runtime shares -------------
def searches(model, exported, precision, temperature):
    from dse.core.decoder import FastRNNTSearch

    paths, _ = exported[0][precision]
    ort = od.use_onnx_decoder(model, paths["predictor"], paths["joiner"])
    blank = model.joiner.linear.out_features - 1
    numpy_loop = FastRNNTSearch(ort, blank, temperature=temperature)
    torch_loop = FastRNNTSearch(ort, blank, temperature=temperature, numpy_search=False)  # the same sessions
    assert torch_loop._ort_greedy is None
    return numpy_loop, torch_loop


def frames(model, n: int = 48, seed: int = 1, scale: float = 3.0):
    """Encoder frames; at this scale the random joiner emits about 3 tokens per frame."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, model.joiner.linear.in_features, generator=g) * scale


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_numpy_greedy_equals_the_torch_greedy_on_the_same_sessions(model, exported, precision, temperature):
    numpy_loop, torch_loop = searches(model, exported, precision, temperature)
    assert numpy_loop._ort_greedy is not None
    a = b = None
    multi = 0
    for chunk in frames(model).split(4, dim=1):
        before = len(a[0][0]) if a else 1
        a, b = numpy_loop._search(chunk, a, 1), torch_loop._search(chunk, b, 1)
        assert a[0][0] == b[0][0]                       # the same tokens, chunk after chunk
        assert a[0][3] == pytest.approx(b[0][3], rel=1e-5, abs=1e-4)  # scores to float32 rounding
        multi += len(a[0][0]) - before > chunk.shape[1]  # a chunk with several tokens in one frame
        for x, y in ((a[0][1], b[0][1]), *zip(sum(a[0][2], []), sum(b[0][2], []))):
            assert x.shape == y.shape and torch.equal(x, y)  # predictor output and state: the same sessions
    assert len(a[0][0]) > 10 and multi  # it emitted, and more than one token per frame somewhere


def test_numpy_greedy_takes_a_hypothesis_from_the_torch_search_and_back(model, exported):
    numpy_loop, torch_loop = searches(model, exported, "fp32", 1.0)
    chunks = frames(model, seed=2).split(4, dim=1)
    want = None
    for chunk in chunks:
        want = torch_loop._search(chunk, want, 1)
    got = None
    for i, chunk in enumerate(chunks):  # the two searches take turns on one stream
        got = (numpy_loop if i % 2 else torch_loop)._search(chunk, got, 1)
    assert got[0][0] == want[0][0] and got[0][3] == pytest.approx(want[0][3], rel=1e-5)


# -- beam search (and greedy search with an LM) over these sessions, in numpy --------------------
@pytest.fixture(scope="module")
def blank_heavy(tmp_path_factory):
    """A tiny model whose joiner favours the blank, as a trained one does: beams then revisit token
    sequences (predictor cache hits) and merge equal ones (log-add); its decoder exported at fp32."""
    model = models.random_model("tiny", seed=5).model.eval()
    with torch.no_grad():
        model.joiner.linear.bias[model.joiner.linear.out_features - 1] += 2.0
    paths, _ = od.decoder_onnx(model, "fp32", tmp_path_factory.mktemp("onnx-cache"), key="tiny-blank-heavy")
    return model, od.use_onnx_decoder(model, paths["predictor"], paths["joiner"])


@pytest.fixture(scope="module")
def small_lm():
    from dse.core.lm import CharNgramLM

    texts = ["the cat sat on the mat", "the cat ate the rat", "a dog sat on the log", "she said it was the last one"]
    return CharNgramLM.train(texts, models.CharTokenizer().symbols, order=4)


@pytest.mark.parametrize("beam_width,lm_weight,scale", [(4, 0.0, 1.0), (4, 0.3, 1.0), (3, 0.0, 3.0), (1, 0.3, 3.0),
                                                        (4, 0.3, 3.0)])
def test_numpy_beam_search_equals_the_torch_search_on_the_same_sessions(blank_heavy, small_lm, beam_width,
                                                                          lm_weight, scale):
    from dse.core.decoder import FastRNNTSearch

    model, ort = blank_heavy
    blank = model.joiner.linear.out_features - 1
    kw = dict(temperature=2.0, lm=small_lm if lm_weight else None, lm_weight=lm_weight,
              symbols=models.CharTokenizer().symbols)
    numpy_loop = FastRNNTSearch(ort, blank, **kw)
    torch_loop = FastRNNTSearch(ort, blank, numpy_search=False, **kw)
    assert numpy_loop._ort_beam is not None and torch_loop._ort_beam is None
    a = b = None
    for chunk in frames(model, n=64, seed=3, scale=scale).split(4, dim=1):
        a, b = numpy_loop._search(chunk, a, beam_width), torch_loop._search(chunk, b, beam_width)
        assert [h[0] for h in a] == [h[0] for h in b]  # the same beam, in the same order
        assert [h[3] for h in a] == pytest.approx([h[3] for h in b], rel=1e-5, abs=1e-4)
        for x, y in zip(a, b):  # predictor output and state: the same sessions on the same tokens
            assert torch.equal(x[1], y[1]) and all(torch.equal(p, q) for la, lb in zip(x[2], y[2])
                                                   for p, q in zip(la, lb))
    assert len(a) == beam_width and len(a[0][0]) > 5


def test_numpy_beam_search_takes_a_beam_from_the_torch_search_and_back(blank_heavy):
    from dse.core.decoder import FastRNNTSearch

    model, ort = blank_heavy
    blank = model.joiner.linear.out_features - 1
    numpy_loop, torch_loop = FastRNNTSearch(ort, blank), FastRNNTSearch(ort, blank, numpy_search=False)
    chunks = frames(model, n=48, seed=4, scale=1.0).split(4, dim=1)
    want = got = None
    for i, chunk in enumerate(chunks):
        want = torch_loop._search(chunk, want, 4)
        got = (numpy_loop if i % 2 else torch_loop)._search(chunk, got, 4)  # the two take turns on one stream
    assert [h[0] for h in got] == [h[0] for h in want]
    assert [h[3] for h in got] == pytest.approx([h[3] for h in want], rel=1e-5)


def test_top_k_breaks_ties_to_the_lower_index_on_both_paths():
    import numpy as np

    from dse.core.ort_search import _SORT_ALL, _top

    rng = np.random.default_rng(0)
    for n in (3, 7, 112, _SORT_ALL, _SORT_ALL + 1, 4 * 4096):
        for _ in range(40):
            values = rng.integers(0, 5, n).astype(np.float32)  # many ties
            for k in (1, 2, 4):
                reference = sorted(range(n), key=lambda i: (-values[i], i))[:k]
                assert _top(values, k).tolist() == reference, (n, k)


def test_log_softmax_is_the_plain_formula_bit_for_bit():
    import numpy as np

    from dse.core.ort_search import log_softmax

    x = np.random.default_rng(1).standard_normal((5, 4097)).astype(np.float32) * 7
    z = x - x.max(axis=-1, keepdims=True)
    assert np.array_equal(log_softmax(x), z - np.log(np.exp(z).sum(axis=-1, keepdims=True)))
    assert log_softmax(x).dtype == np.float32


def test_lazy_hypotheses_build_each_tuple_once_when_read():
    import numpy as np

    from dse.core.decoder import LazyHypotheses

    calls = []

    class Search:  # an ONNX Runtime search's two methods LazyHypotheses reads
        @staticmethod
        def beam_size(state):
            return 3

        @staticmethod
        def hypothesis(state, i):
            calls.append(i)
            return [i], np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 2), np.float32), -float(i)

    beam = LazyHypotheses(Search, "state")
    assert len(beam) == 3 and calls == [] and beam.owner is Search and beam.state == "state"
    assert beam[0][0] == [0] and beam[-1][3] == -2.0 and beam[0] is beam[0]
    assert calls == [0, 2]
    assert [h[0] for h in beam] == [[0], [1], [2]] and calls == [0, 2, 1]
    assert [h[0] for h in beam[1:]] == [[1], [2]]
    with pytest.raises(IndexError):
        beam[3]


def test_a_greedy_beam_goes_on_as_a_wider_beam_and_back(model, exported):
    """The numpy greedy loop's output handed to the beam search of the same decoder (and back) is
    converted like a beam from elsewhere: the same result as handing it over as a plain list."""
    numpy_loop, _ = searches(model, exported, "fp32", 1.0)
    chunks = frames(model, seed=3).split(4, dim=1)
    for widths in ((1, 1, 4, 4, 1), (4, 1, 1, 4)):
        carried = plain = None
        for chunk, width in zip(chunks, widths):
            carried = numpy_loop._search(chunk, carried, width)
            plain = list(numpy_loop._search(chunk, list(plain) if plain is not None else None, width))
            assert len(carried) == len(plain) and carried[0][0] == plain[0][0] and carried[0][3] == plain[0][3]
