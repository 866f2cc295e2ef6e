import pytest
import torch

from dse.core import models
from dse.search.adapt import AdaptSettings, Adapter
from dse.core.config import TrialConfig
from dse.core.errors import ConfigError
from dse.core.moe import moe_blocks
from dse.core.build import TrialFailed, build_recognizer, edit_architecture
from conftest import tone


@pytest.fixture
def audio():
    return torch.from_numpy(tone(3.0, seed=5))


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_precision_state_dtype_after_many_chunks(tiny, audio, precision, dtype):
    built = build_recognizer(tiny, TrialConfig(precision=precision, beam_width=2))
    built.recognizer.transcribe(audio)
    assert built.recognizer.chunks_done >= 15
    floats = [t for layer in built.recognizer.state.encoder for t in layer if t.is_floating_point()]
    assert floats and all(t.dtype == dtype for t in floats)
    assert next(built.recognizer.model.parameters()).dtype == dtype


def test_int8_quantises_every_linear_and_shrinks(tiny, audio):
    fp32 = build_recognizer(tiny, TrialConfig())
    int8 = build_recognizer(tiny, TrialConfig(precision="int8"))
    assert not any(type(m) is torch.nn.Linear for m in int8.recognizer.model.modules())
    assert int8.weight_mib < 0.5 * fp32.weight_mib
    int8.recognizer.transcribe(audio)
    assert int8.recognizer.chunks_done >= 15


def test_autocast_mode_keeps_fp32_weights(tiny, audio):
    built = build_recognizer(tiny, TrialConfig(precision="amp-bf16"))
    assert next(built.recognizer.model.parameters()).dtype == torch.float32
    built.recognizer.transcribe(audio)


def test_geometry_rebuild_reuses_weights(tiny, audio):
    edited = edit_architecture(tiny, TrialConfig(right_context_frames=0, segment_frames=8))
    assert edited.arch["right_context_length"] == 0 and edited.arch["segment_length"] == 8
    for (k, a), (_, b) in zip(tiny.model.state_dict().items(), edited.model.state_dict().items()):
        assert torch.equal(a, b), k
    built = build_recognizer(tiny, TrialConfig(right_context_frames=0, segment_frames=8))
    built.recognizer.transcribe(audio)
    assert built.recognizer.chunk_frames == 8
    with pytest.raises(ConfigError, match="multiple of the time-reduction stride 4"):
        edit_architecture(tiny, TrialConfig(segment_frames=10))


def test_moe_transform_shapes_and_int8(tiny, audio):
    cfg = TrialConfig(moe_experts=4, moe_top_k=2, moe_hidden=32, moe_every=1)
    built = build_recognizer(tiny, cfg)
    blocks = moe_blocks(built.recognizer.model)
    assert len(blocks) == tiny.arch["transformer_num_layers"] and blocks[0].num_experts == 4
    built.recognizer.transcribe(audio)
    assert all(int(b.last_counts.sum()) > 0 for b in blocks)
    q = build_recognizer(tiny, TrialConfig(moe_experts=4, moe_top_k=2, moe_hidden=32, precision="int8"))
    q.recognizer.transcribe(audio)
    assert q.weight_mib < built.weight_mib


def test_moe_hidden_wider_than_dense_is_an_error(tiny):
    with pytest.raises(ConfigError, match="exceeds the dense FFN width"):
        edit_architecture(tiny, TrialConfig(moe_experts=2, moe_hidden=4096))


def test_frontend_transform_changes_frame_rate(tiny, audio):
    built = build_recognizer(tiny, TrialConfig(window_samples=640, hop_samples=320))
    built.recognizer.transcribe(audio)
    n_frames = built.recognizer.features.frames_emitted
    assert n_frames == pytest.approx(audio.numel() / 320, abs=30)


def test_compile_failure_is_a_trial_failure(tiny, monkeypatch):
    def broken(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(TrialFailed, match="torch.compile\\(mode=default\\) failed: RuntimeError: inductor exploded"):
        build_recognizer(tiny, TrialConfig(compile="default"))


def test_adaptation_lowers_loss_and_is_cached(tmp_path, manifest):
    teacher = models.random_model("tiny", seed=0)
    teacher = teacher.__class__(**{**teacher.__dict__, "weights": "checkpoint:test"})
    settings = AdaptSettings(dev_size=1, check_every=10, batch_frames=4000, lr=3e-3)
    adapter = Adapter(teacher, manifest, cache_dir=tmp_path / "cache", settings=settings)
    cfg = TrialConfig(moe_experts=2, moe_top_k=1, moe_hidden=32, adapt_steps=20)
    progress = []
    state, info = adapter(edit_architecture(teacher, cfg), cfg, on_progress=lambda s, w: progress.append((s, w)))
    losses = [h["loss"] for h in info["history"]]
    assert losses[-1] < losses[0] and info["distilled"] and not info["cached"]
    assert [s for s, _ in progress] == [10, 20]
    # the same configuration again: from the cache, identical weights, no progress calls
    state2, info2 = adapter(edit_architecture(teacher, cfg), cfg, on_progress=lambda s, w: progress.append(s))
    assert info2["cached"] and len(progress) == 2
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_adaptation_progress_can_stop_it(tmp_path, manifest):
    teacher = models.random_model("tiny", seed=0)
    adapter = Adapter(teacher, manifest, cache_dir=tmp_path / "cache", settings=AdaptSettings(dev_size=1, check_every=5))
    cfg = TrialConfig(moe_experts=2, moe_top_k=1, adapt_steps=50)

    def stop(step, wer):
        raise RuntimeError(f"stop at {step}")
    with pytest.raises(RuntimeError, match="stop at 5"):
        adapter(edit_architecture(teacher, cfg), cfg, on_progress=stop)
    assert not list((tmp_path / "cache").glob("*.pt"))
