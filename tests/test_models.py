import dataclasses
import json

import pytest
import torch

from dse.core import models
from dse.core.errors import ModelLoadError


def test_base_is_torchaudio_emformer_rnnt_base():
    base = models.random_model("base")
    assert base.num_params() == 76_738_049
    mib = sum(p.numel() * p.element_size() for p in base.model.parameters()) / 2**20
    assert round(mib, 1) == 292.7
    from torchaudio.models import emformer_rnnt_base
    reference = emformer_rnnt_base(num_symbols=4097)
    assert [tuple(p.shape) for p in reference.parameters()] == [tuple(p.shape) for p in base.model.parameters()]


def test_unknown_architecture_names_known_ones():
    with pytest.raises(ModelLoadError, match="unknown architecture 'huge'.*base"):
        models.architecture("huge")


def test_torchaudio_bundle_names_missing_file(tmp_path):
    (tmp_path / "emformer_rnnt_base_librispeech.pt").write_bytes(b"")
    (tmp_path / "global_stats_rnnt_librispeech.json").write_text(json.dumps({"mean": [0] * 80, "invstddev": [1] * 80}))
    with pytest.raises(ModelLoadError, match="missing spm_bpe_4096_librispeech.model"):
        models.load_torchaudio_bundle(tmp_path)


def test_torchaudio_bundle_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        models.load_torchaudio_bundle(tmp_path / "nowhere")


def test_checkpoint_round_trip_fp16(tmp_path, tiny):
    path = tmp_path / "m.pt"
    models.save_checkpoint(path, tiny, half=True)
    back = models.load_checkpoint(path)
    assert back.arch == tiny.arch and back.tokenizer.symbols == tiny.tokenizer.symbols
    for (k, a), (_, b) in zip(tiny.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-3), k


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        models.load_checkpoint(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(ModelLoadError, match="not a dse checkpoint"):
        models.load_checkpoint(bad)


def test_char_tokenizer_round_trip():
    tok = models.CharTokenizer()
    ids = tok.encode("it's a test")
    assert tok.decode(ids) == "it's a test"
    assert tok.blank == len(tok.symbols) and tok.blank not in ids


def test_widen_ffn_keeps_the_function_and_trains_the_new_units(tiny):
    wide = models.widen_ffn(tiny, 3 * tiny.arch["transformer_ffn_dim"], seed=1)
    assert wide.arch["transformer_ffn_dim"] == 3 * tiny.arch["transformer_ffn_dim"]
    assert wide.num_params() > tiny.num_params()
    torch.manual_seed(0)
    x, lengths = torch.randn(2, 48 + 4, 80), torch.tensor([48, 40])
    with torch.no_grad():
        before, _ = tiny.model.transcribe(x, lengths)
        after, _ = wide.model.transcribe(x, lengths)
    assert torch.allclose(before, after, atol=1e-5)
    # The fresh units are live: their input weights are not zero, and a gradient reaches
    # their zero output weights, so training can move them.
    key = "transcriber.transformer.emformer_layers.0.pos_ff"
    layer = dict(wide.model.named_modules())[key]
    old = tiny.arch["transformer_ffn_dim"]
    assert layer[1].weight[old:].abs().sum() > 0 and torch.all(layer[4].weight[:, old:] == 0)
    wide.model.train()
    out, _ = wide.model.transcribe(x, lengths)
    out.pow(2).sum().backward()
    assert layer[4].weight.grad[:, old:].abs().sum() > 0
    with pytest.raises(ModelLoadError, match="cannot widen"):
        models.widen_ffn(tiny, old // 2)


def test_small_wide_is_small_with_a_wider_ffn():
    small, wide = models.architecture("small"), models.architecture("small-wide")
    assert wide.pop("transformer_ffn_dim") > small.pop("transformer_ffn_dim")
    assert wide == small


def test_average_weights_is_the_elementwise_mean_and_refuses_strangers(tiny):
    other = models.random_model("tiny", seed=1)
    soup = models.average_weights([tiny, other])
    a, b, s = tiny.model.state_dict(), other.model.state_dict(), soup.model.state_dict()
    assert not torch.equal(a["joiner.linear.weight"], b["joiner.linear.weight"])
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(s[k], (a[k] + b[k]) / 2), k
    assert soup.weights == "average:random,random"
    shifted = dataclasses.replace(other, mean=other.mean + 1)
    with pytest.raises(ModelLoadError, match="cannot average"):
        models.average_weights([tiny, shifted])
    with pytest.raises(ModelLoadError, match="cannot average"):
        models.average_weights([tiny, models.widen_ffn(other, 256)])
