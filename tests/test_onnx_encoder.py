"""The ONNX Runtime encoder backend against torch's streaming ``transcriber.infer``.

One tiny Emformer RNN-T (2 layers, chunks of 8 feature frames = 1 segment + 1 right-context
frame after time reduction, left context 8) is exported once per module; every test reuses it.
"""
import os

import pytest
import torch
from torchaudio.models import RNNTBeamSearch, emformer_rnnt_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dse.core import onnx_encoder as oe  # noqa: E402
from dse.core.errors import DSEError  # noqa: E402
from dse.core.moe import apply_moe  # noqa: E402

CHUNK = 8          # feature frames per chunk: (segment 4 + right context 4)
N_CHUNKS = 48      # > 40 consecutive chunks; the left context (8) fills during the first 8
BLANK = 29
FP32_TOL = 1e-4    # measured: max |ORT - torch| 1.4e-6 on outputs, 1.7e-6 on carried state
INT8_TOL = 0.15    # measured: max |int8 - fp32 torch| 0.054 on layer-normed outputs (std 1)


def tiny_model(seed: int = 0, memory: int = 0):
    torch.manual_seed(seed)
    return emformer_rnnt_model(
        input_dim=80, encoding_dim=64, num_symbols=30, segment_length=4, right_context_length=4,
        time_reduction_input_dim=32, time_reduction_stride=4, transformer_num_heads=2, transformer_ffn_dim=64,
        transformer_num_layers=2, transformer_dropout=0.0, transformer_activation="gelu",
        transformer_left_context_length=8, transformer_max_memory_size=memory,
        transformer_weight_init_scale_strategy="depthwise", transformer_tanh_on_mem=True,
        symbol_embedding_dim=32, num_lstm_layers=1, lstm_layer_norm=True, lstm_layer_norm_epsilon=1e-3,
        lstm_dropout=0.0).eval()


def chunks(n: int = N_CHUNKS, seed: int = 1) -> torch.Tensor:
    """``(n, 1, CHUNK, 80)`` random log-mel-like features."""
    return torch.randn(n, 1, CHUNK, 80, generator=torch.Generator().manual_seed(seed))


def snapshot(state):
    """A copy of a state: torchaudio's ``infer`` reassigns the slots of the lists it is given."""
    return [list(layer) for layer in state]


def stream(infer, xs, state=None):
    """Outputs and states of ``infer`` over ``xs``, state carried from chunk to chunk."""
    outs, states, length = [], [], torch.tensor([CHUNK])
    with torch.inference_mode():
        for x in xs:
            out, out_len, state = infer(x, length, state)
            assert out_len.tolist() == [1]
            outs.append(out)
            states.append(snapshot(state))
    return outs, states


def state_diff(a, b) -> float:
    """Max difference over float slots; the int past length must be equal.

    Of the left-context keys and values only the rows either graph reads are compared: the
    last ``min(Lc, past_length)``. The rows before them are not yet filled; torchaudio and
    the static-shape export leave different values there and neither ever reads them."""
    worst = 0.0
    for la, lb in zip(a, b, strict=True):
        assert torch.equal(la[3], lb[3]) and la[3].dtype == lb[3].dtype == torch.int32
        for slot, (ta, tb) in enumerate(zip(la[:3], lb[:3])):
            assert ta.shape == tb.shape
            if slot in (1, 2):
                valid = min(ta.shape[0], int(la[3].reshape(-1)[0]))
                ta, tb = ta[ta.shape[0] - valid:], tb[tb.shape[0] - valid:]
            if ta.numel():
                worst = max(worst, (ta - tb).abs().max().item())
    return worst


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny ops: a second OpenMP thread only spins, which on a busy machine costs ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def exported(model, cache_dir):
    """fp32 and int8 encoders of ``model`` under key ``tiny-a`` (int8 reuses the fp32 export)."""
    fp32, fp32_info = oe.encoder_onnx(model, CHUNK, "fp32", cache_dir, key="tiny-a")
    int8, int8_info = oe.encoder_onnx(model, CHUNK, "int8", cache_dir, key="tiny-a")
    return {"fp32": (fp32, fp32_info), "int8": (int8, int8_info)}


@pytest.fixture(scope="module")
def torch_run(model):
    return stream(model.transcriber.infer, chunks())


def test_export_info(exported):
    path, info = exported["fp32"]
    assert not info["hit"] and info["export_s"] > 0 and info["bytes"] == path.stat().st_size
    state = ["past_length", "lc_key_0", "lc_key_1", "lc_val_0", "lc_val_1"]  # a tensor per layer
    assert info["inputs"] == ["input", "lengths"] + state
    assert info["outputs"] == ["output", "output_lengths"] + [f"next_{n}" for n in state]
    assert info["opset"] >= 18 and info["chunk_frames"] == CHUNK and info["layers"] == 2
    assert info["graph"] == "static"  # no memory, a left context: the static-shape graph
    path8, info8 = exported["int8"]
    assert not info8["hit"] and info8["fp32_hit"] and info8["export_s"] == 0
    assert info8["bytes"] < info["bytes"]
    # Every weight MatMul becomes MatMulInteger fed by DynamicQuantizeLinear; attention's
    # activation x activation products stay float.
    assert info8["quantized_ops"]["MatMulInteger"] > 0 and info8["quantized_ops"]["DynamicQuantizeLinear"] > 0
    assert info8["float_matmuls_left"] > 0


def test_zero_state_matches_ort_initial_state(model, exported):
    ort = oe.OrtTranscriber(exported["fp32"][0], threads=1)
    assert state_diff(oe.zero_state(model.transcriber), ort.initial_state()) == 0.0


def test_fp32_matches_torch_over_48_chunks(model, exported, torch_run):
    ort = oe.OrtTranscriber(exported["fp32"][0], threads=1)
    want, want_states = torch_run
    got, got_states = stream(ort.infer, chunks())
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape == (1, 1, 64) and b.dtype == torch.float32
        assert (a - b).abs().max().item() < FP32_TOL, f"chunk {i}"
        assert state_diff(want_states[i], got_states[i]) < FP32_TOL, f"state after chunk {i}"
    # The state layouts are interchangeable: torch continues a stream ORT started, and back.
    xs = chunks()
    with torch.inference_mode():
        out, _, state = model.transcriber.infer(xs[10], torch.tensor([CHUNK]), snapshot(got_states[9]))
        assert (out - want[10]).abs().max().item() < FP32_TOL
        out, _, _ = ort.infer(xs[11], torch.tensor([CHUNK]), snapshot(want_states[10]))
        assert (out - want[11]).abs().max().item() < FP32_TOL


def test_the_carried_state_is_converted_only_when_read_and_replaced(exported):
    ort = oe.OrtTranscriber(exported["fp32"][0], threads=1)
    xs, length = chunks(12), torch.tensor([CHUNK])
    with torch.inference_mode():
        state = None
        for x in xs[:10]:
            _, _, state = ort.infer(x, length, state)
        assert isinstance(state, oe.OrtStates) and state.unchanged()
        unread, _, _ = ort.infer(xs[10], length, state)          # the session's own arrays, never read
        read = snapshot(state)                                     # read: torchaudio's layout, views
        assert len(read) == 2 and [len(layer) for layer in read] == [4, 4]
        assert read[0][1].shape == (8, 1, ort.dim) and read[0][3].dtype == torch.int32
        assert state.unchanged()
        converted, _, _ = ort.infer(xs[10], length, read)         # a plain list: converted slot by slot
        assert torch.equal(unread, converted)
        state[1][2] = state[1][2] + 1.0                            # a reader replaces a slot
        assert not state.unchanged()
        changed, _, _ = ort.infer(xs[10], length, state)          # so the next chunk sees it
        assert not torch.equal(unread, changed)


def test_a_model_with_memory_exports_through_torchaudio_infer(tmp_path):
    """Memory slots are not in the static-shape graph: such a model is exported through
    torchaudio's own ``infer``, and still matches torch over the first chunks and after."""
    mem_model = tiny_model(seed=3, memory=2)
    info = oe.export_encoder(mem_model, CHUNK, tmp_path / "mem.onnx")
    assert info["graph"] == "torchaudio" and "memory_0" in info["inputs"] and "memory_1" in info["inputs"]
    want, want_states = stream(mem_model.transcriber.infer, chunks(12))
    got, got_states = stream(oe.OrtTranscriber(tmp_path / "mem.onnx", threads=1).infer, chunks(12))
    for i, (a, b) in enumerate(zip(want, got)):
        assert (a - b).abs().max().item() < FP32_TOL, f"chunk {i}"
        assert state_diff(want_states[i], got_states[i]) < FP32_TOL, f"state after chunk {i}"


def test_int8_close_without_drift(exported, torch_run):
    ort = oe.OrtTranscriber(exported["int8"][0], threads=1)
    want, _ = torch_run
    got, _ = stream(ort.infer, chunks())
    errors = [(a - b).abs().max().item() for a, b in zip(want, got)]
    assert max(errors) < INT8_TOL, errors
    assert max(errors) > 1e-4  # it really is quantised
    early, late = sum(errors[:8]) / 8, sum(errors[32:40]) / 8
    assert late < 2 * early, (early, late)  # chunk 40 is no worse than the first chunks


def test_greedy_beam_search_same_tokens(model, exported):
    ort_model = oe.use_onnx_encoder(model, exported["fp32"][0], threads=1)
    assert isinstance(ort_model.transcriber, oe.OrtTranscriber)
    assert not isinstance(model.transcriber, oe.OrtTranscriber)  # the original is untouched
    assert ort_model.predictor is model.predictor and ort_model.joiner is model.joiner

    def decode(m):
        search, state, hyp, length = RNNTBeamSearch(m, BLANK), None, None, torch.tensor([CHUNK])
        with torch.inference_mode():
            for x in chunks(40, seed=2):
                hyps, state = search.infer(x, length, 1, state=state, hypothesis=hyp)
                hyp = hyps
        return hyps[0]

    want, got = decode(model), decode(ort_model)
    assert len(want[0]) > 1  # random weights still emit some non-blank tokens
    assert got[0] == want[0]
    assert abs(got[3] - want[3]) < 1e-3


def test_cache_hit_and_miss(model, exported, cache_dir, monkeypatch):
    path, _ = exported["fp32"]
    path8, _ = exported["int8"]
    mtimes = (path.stat().st_mtime_ns, path8.stat().st_mtime_ns)
    calls = []
    real_export = oe.export_encoder
    monkeypatch.setattr(oe, "export_encoder", lambda *a, **k: calls.append(a) or real_export(*a, **k))

    again, info = oe.encoder_onnx(model, CHUNK, "fp32", cache_dir, key="tiny-a")
    again8, info8 = oe.encoder_onnx(model, CHUNK, "int8", cache_dir, key="tiny-a")
    assert (again, again8) == (path, path8) and info["hit"] and info8["hit"]
    assert info["export_s"] == 0 and info["original_export_s"] > 0 and info8["quantize_s"] == 0
    assert (path.stat().st_mtime_ns, path8.stat().st_mtime_ns) == mtimes and not calls

    other, info_b = oe.encoder_onnx(model, CHUNK, "fp32", cache_dir, key="tiny-b")
    assert other != path and not info_b["hit"] and info_b["export_s"] > 0 and len(calls) == 1
    assert not [p for p in cache_dir.iterdir() if ".tmp" in p.name]  # temp files renamed or removed


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DSE_ONNX_CACHE", str(tmp_path / "c"))
    assert oe.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DSE_ONNX_CACHE")
    assert oe.default_cache_dir() == oe.Path.home() / ".cache" / "dse" / "onnx"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_corrupt_file_is_a_backend_error(exported, tmp_path, damage):
    good = exported["fp32"][0].read_bytes()
    bad = tmp_path / "encoder.onnx"
    content = {"truncated": good[: len(good) // 2], "garbage": os.urandom(4096), "empty": b""}.get(damage)
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(oe.BackendError, match="encoder.onnx") as err:
        oe.OrtTranscriber(bad, threads=1)
    assert isinstance(err.value, DSEError)


def test_bad_arguments(model, tmp_path):
    with pytest.raises(oe.BackendError, match="exactly 8 feature frames"):
        oe.export_encoder(model, 20, tmp_path / "x.onnx")
    with pytest.raises(oe.BackendError, match="precision"):
        oe.encoder_onnx(model, CHUNK, "bf16", tmp_path, key="k")
    with pytest.raises(oe.BackendError, match="key"):
        oe.encoder_onnx(model, CHUNK, "fp32", tmp_path, key="")


def test_wrong_input_shape(exported):
    ort = oe.OrtTranscriber(exported["fp32"][0], threads=1)
    with pytest.raises(oe.BackendError, match=r"\(1, 8, 80\)"):
        ort.infer(torch.zeros(1, 20, 80), torch.tensor([20]), None)


def test_moe_export_fails_with_the_reason(tmp_path):
    """The MoE block routes with a Python loop over the experts that received tokens
    (``torch.nonzero(counts).tolist()``): data-dependent control flow that torch.export
    cannot trace, so the trial gets a BackendError saying why and where."""
    moe_model = tiny_model()
    apply_moe(moe_model, 4, 1, 32, 1)
    moe_model.eval()
    with pytest.raises(oe.BackendError, match=r"data-dependent.*moe\.py:\d+") as err:
        oe.export_encoder(moe_model, CHUNK, tmp_path / "moe.onnx")
    assert "\n" not in str(err.value) and len(str(err.value)) < 500
    assert not (tmp_path / "moe.onnx").exists()


@pytest.mark.parametrize("policy, spins", [(None, True), ("ACTIVE", True), ("PASSIVE", False), ("passive", False)])
def test_ort_spins_exactly_when_openmp_does(monkeypatch, policy, spins):
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    assert oe.default_spinning() is spins


def test_an_encoder_with_the_state_stacked_over_layers_is_refused():
    from types import SimpleNamespace

    from dse.core.ort_session import BackendError, encoder_layout

    def session(inputs, outputs):
        return SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n, shape=s) for n, s in inputs],
                               get_outputs=lambda: [SimpleNamespace(name=n) for n in outputs])

    old = session([("input", [1, 8, 80]), ("lengths", [1]), ("lc_key", [2, 8, 1, 16]), ("lc_val", [2, 8, 1, 16]),
                   ("past_length", [2, 1, 1])], ["output", "output_lengths", "next_lc_key"])
    with pytest.raises(BackendError, match="stacked over layers.*ONNX format 4; export it again"):
        encoder_layout(old, "old.onnx")
    with pytest.raises(BackendError, match="not an encoder exported by dse"):
        encoder_layout(session([("input", [1, 8, 80])], ["output"]), "other.onnx")
