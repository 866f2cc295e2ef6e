"""Mixture-of-experts feed-forward blocks for Emformer layers, upcycled from the dense FFN.

Router (as in the seed): linear gate, softmax in float32, top-k, weights renormalised
to sum to 1. Each expert has the dense FFN's shape with its own hidden dim; a token's
output is the router-weighted sum of its k experts' outputs.

Upcycling: rank the dense FFN's hidden neurons by importance
``|W1[j, :]| * |W2[:, j]|`` (the L2 norms of neuron ``j``'s input and output weights)
and give every expert the ``hidden`` most important neurons, plus a little noise to
break the symmetry so experts can specialise during adaptation. Why: when all
experts are the same function f and the routing weights sum to one, the MoE computes
exactly f whatever the router does, so with ``hidden`` equal to the dense width and
no noise the upcycled block *is* the dense FFN, and with a smaller ``hidden`` it is
the dense FFN pruned to its most important neurons: the best starting point a
budgeted fine-tune can get, where slicing the FFN into disjoint experts would start
every token with only k/E of the dense function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class MoERouter(torch.nn.Module):
    """Tokens ``(N, D)`` -> probabilities ``(N, E)``, weights ``(N, k)`` summing to 1, expert ids ``(N, k)``."""

    def __init__(self, dim_in: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = torch.nn.Linear(dim_in, num_experts)
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, hidden_states: torch.Tensor):
        router_probs = F.softmax(self.gate(hidden_states), dim=-1, dtype=torch.float)
        router_weights, selected_experts = torch.topk(router_probs, self.top_k, dim=-1)
        router_weights = router_weights / router_weights.sum(dim=-1, keepdim=True)
        return router_probs, router_weights, selected_experts


class MoEFeedForward(torch.nn.Module):
    """Drop-in for an Emformer layer's ``pos_ff``: input/output ``(T, B, D)``.

    ``aux_loss`` holds the last forward's load-balancing loss (Switch Transformer's
    ``E * sum_e f_e * P_e``: fraction of routed tokens times mean router probability).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, activation: str = "gelu"):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.router = MoERouter(dim, num_experts, top_k)
        act = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU}[activation]
        # Experts are plain Linear layers so dynamic quantisation reaches them too.
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, hidden), act(), torch.nn.Linear(hidden, dim))
            for _ in range(num_experts))
        self.aux_loss = torch.zeros(())
        self.last_counts = torch.zeros(num_experts)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = self.norm(x).reshape(-1, shape[-1])
        probs, weights, experts = self.router(tokens)
        out = torch.zeros_like(tokens)
        flat_experts = experts.reshape(-1)
        flat_weights = weights.reshape(-1).to(tokens.dtype)
        token_index = torch.arange(tokens.size(0), device=tokens.device).repeat_interleave(self.router.top_k)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        for e in torch.nonzero(counts).flatten().tolist():
            mask = flat_experts == e
            idx = token_index[mask]
            y = self.experts[e](tokens[idx])
            out.index_add_(0, idx, y * flat_weights[mask].unsqueeze(1))
        if self.training:
            frac = counts.float() / max(1, flat_experts.numel())
            self.aux_loss = self.num_experts * (frac * probs.mean(0)).sum()
        self.last_counts = counts.detach()
        return out.reshape(shape)


def upcycle(dense_ff: torch.nn.Sequential, num_experts: int, top_k: int, hidden: int,
            noise: float = 0.01, generator: torch.Generator | None = None) -> MoEFeedForward:
    """An MoE block initialised from an Emformer ``pos_ff`` (LayerNorm, Linear, act, Dropout, Linear, Dropout)."""
    norm, lin1, act, lin2 = dense_ff[0], dense_ff[1], dense_ff[2], dense_ff[4]
    dim, dense_hidden = lin1.in_features, lin1.out_features
    hidden = hidden or dense_hidden
    if hidden > dense_hidden:
        raise ValueError(f"expert hidden dim {hidden} exceeds the dense FFN's {dense_hidden}")
    activation = {torch.nn.GELU: "gelu", torch.nn.ReLU: "relu", torch.nn.SiLU: "silu"}[type(act)]
    moe = MoEFeedForward(dim, hidden, num_experts, top_k, activation)
    with torch.no_grad():
        importance = lin1.weight.norm(dim=1) * lin2.weight.norm(dim=0)
        keep = torch.argsort(importance, descending=True)[:hidden].sort().values
        w1, b1, w2 = lin1.weight[keep], lin1.bias[keep], lin2.weight[:, keep]
        moe.norm.load_state_dict(norm.state_dict())
        def jitter(t):
            return t + noise * t.std() * torch.randn(t.shape, generator=generator) if noise else t

        for expert in moe.experts:
            expert[0].weight.copy_(jitter(w1))
            expert[0].bias.copy_(b1)
            expert[2].weight.copy_(jitter(w2))
            expert[2].bias.copy_(lin2.bias)
        moe.router.gate.weight.normal_(0.0, 0.01, generator=generator)
        moe.router.gate.bias.zero_()
    return moe


def moe_layer_indices(num_layers: int, every: int) -> list[int]:
    """The Emformer layers an MoE edit converts: every ``every``-th (the last of each group).
    The one place this rule lives (the build, the cost model and bundles use it)."""
    return [i for i in range(num_layers) if (i + 1) % every == 0]


def apply_moe(model, num_experts: int, top_k: int, hidden: int, every: int = 1, noise: float = 0.01,
              seed: int = 0) -> list[int]:
    """Replace the FFN of every ``every``-th Emformer layer (the last of each group) in place.

    Returns the indices of the layers converted.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = model.transcriber.transformer.emformer_layers
    converted = moe_layer_indices(len(layers), every)
    for i in converted:
        layers[i].pos_ff = upcycle(layers[i].pos_ff, num_experts, top_k, hidden, noise, gen)
    return converted


def moe_blocks(model) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]
