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
