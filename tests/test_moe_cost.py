import pytest
import torch

from dse.core import cost
from dse.core import models
from dse.core.config import TrialConfig
from dse.core.moe import MoERouter, apply_moe, moe_blocks, upcycle


def test_router_top_k_weights_sum_to_one():
    router = MoERouter(16, num_experts=8, top_k=2)
    probs, weights, experts = router(torch.randn(10, 16))
    assert weights.shape == (10, 2) and experts.shape == (10, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(10))
    # the selected experts are the two most probable ones
    assert torch.equal(experts.sort(-1).values, probs.topk(2).indices.sort(-1).values)


def test_upcycled_full_width_without_noise_equals_dense(tiny):
    ff = tiny.model.transcriber.transformer.emformer_layers[0].pos_ff.eval()
    moe = upcycle(ff, num_experts=4, top_k=2, hidden=0, noise=0.0).eval()
    x = torch.randn(5, 2, 64)
    assert torch.allclose(moe(x), ff(x), atol=1e-5)


def test_upcycled_narrow_experts_equal_pruned_dense(tiny):
    ff = tiny.model.transcriber.transformer.emformer_layers[0].pos_ff.eval()
    moe = upcycle(ff, num_experts=3, top_k=1, hidden=32, noise=0.0).eval()
    # the pruned dense FFN: keep the 32 most important neurons
    imp = ff[1].weight.norm(dim=1) * ff[4].weight.norm(dim=0)
    keep = imp.argsort(descending=True)[:32].sort().values
    x = torch.randn(4, 1, 64)
    h = ff[2](torch.nn.functional.linear(ff[0](x), ff[1].weight[keep], ff[1].bias[keep]))
    pruned = torch.nn.functional.linear(h, ff[4].weight[:, keep], ff[4].bias)
    assert torch.allclose(moe(x), pruned, atol=1e-5)


def test_apply_moe_every_second_layer_and_balance_loss(tiny):
    layers = apply_moe(tiny.model, num_experts=4, top_k=2, hidden=32, every=2)
    assert layers == [1]
    block = moe_blocks(tiny.model)[0]
    block.train()
    block(torch.randn(6, 1, 64))
    assert block.aux_loss.item() > 0 and int(block.last_counts.sum()) == 12


def test_seed_ffn_numbers():
    assert cost.ffn_flops_per_token(512, 2048) == 4_194_304
    moe = cost.moe_flops_per_token(512, 768, top_k=2, num_experts=8, router=False)
    assert moe == 3_145_728 and moe / 4_194_304 == pytest.approx(0.75)
    assert cost.ffn_weight_bytes(512, 2048) == 8 * 2**20
    assert cost.ffn_weight_bytes(512, 768, num_experts=8) == 24 * 2**20


def test_whole_base_model_weight_bytes():
    base = models.random_model("base")
    n = base.num_params()
    assert cost.weight_bytes(n, 0, "fp32") / 2**20 == pytest.approx(292.73, abs=0.01)
    assert cost.weight_bytes(n, 0, "bf16") == 2 * n


def test_flops_per_chunk_moe_cheaper_in_ffn():
    arch = models.architecture("base")
    dense = cost.flops_per_chunk(arch, TrialConfig(beam_width=1), 4097)
    moe = cost.flops_per_chunk(arch, TrialConfig(beam_width=1, moe_experts=8, moe_top_k=2, moe_hidden=768), 4097)
    q = (16 + 4) // 4
    assert dense["emformer_layers"][0]["ffn"] == q * 4_194_304
    assert moe["emformer_layers"][0]["ffn"] == q * (3_145_728 + 2 * 512 * 8)
    assert moe["total"] < dense["total"]
