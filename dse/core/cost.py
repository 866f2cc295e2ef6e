"""Analytic cost model: FLOPs per chunk by component, and weight bytes by precision.

Conventions: a multiply-add is 2 FLOPs; ``D`` is the Emformer width
(``time_reduction_input_dim * time_reduction_stride``), ``F`` the dense FFN width,
``q`` the tokens an Emformer layer processes per chunk (segment plus right context,
after time reduction), ``L`` the left-context tokens attended to. Decoder costs
(predictor and joiner) are per decoding step, because the number of steps depends on
the beam and on what is said; a chunk takes at least ``beam * segment_tokens`` joiner
steps. Biases, norms and activations are ignored (they are below 1 % here).
"""
from __future__ import annotations

import math

from dse.core.config import TrialConfig
from dse.core.moe import moe_layer_indices

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "amp-bf16": 4, "amp-fp16": 4}


def ffn_flops_per_token(dim: int, hidden: int) -> int:
    """Dense FFN: two matmuls, ``2 * (dim * hidden + hidden * dim)``."""
    return 2 * (dim * hidden + hidden * dim)


def moe_flops_per_token(dim: int, hidden: int, top_k: int, num_experts: int, router: bool = True) -> int:
    """``top_k`` experts of width ``hidden``, plus the router's gate when ``router``."""
    return top_k * ffn_flops_per_token(dim, hidden) + (2 * dim * num_experts if router else 0)


def ffn_weight_bytes(dim: int, hidden: int, precision: str = "fp32", num_experts: int = 1) -> int:
    bytes_per = 1 if precision == "int8" else BYTES[precision]
    return bytes_per * 2 * dim * hidden * num_experts


def flops_per_chunk(arch: dict, config: TrialConfig, num_symbols: int) -> dict:
    """FLOPs of one chunk by component; ``total`` adds ``beam * segment_tokens`` decoder steps."""
    cfg = config.resolved(arch)
    stride = arch["time_reduction_stride"]
    d = arch["time_reduction_input_dim"] * stride
    f = arch["transformer_ffn_dim"]
    enc = arch["encoding_dim"]
    seg_frames, rc_frames = cfg.segment_frames, cfg.right_context_frames
    n_in = seg_frames + rc_frames
    q = (seg_frames + rc_frames) // stride
    n_seg = seg_frames // stride
    left = arch["transformer_left_context_length"]
    n_fft = cfg.window_samples
    out = {}
    # front end: one real FFT (~2.5 N log2 N) and the mel projection per new frame
    out["frontend"] = seg_frames * int(2.5 * n_fft * math.log2(n_fft) + 2 * (n_fft // 2 + 1) * arch["input_dim"])
    out["input_linear"] = 2 * arch["input_dim"] * arch["time_reduction_input_dim"] * n_in
    moe_layers = set(moe_layer_indices(arch["transformer_num_layers"], cfg.moe_every)) if cfg.is_moe else set()
    layers = []
    for i in range(arch["transformer_num_layers"]):
        attn = 8 * d * d * q + 4 * q * (q + left) * d
        is_moe = i in moe_layers
        if is_moe:
            ffn = q * moe_flops_per_token(d, cfg.moe_hidden or f, cfg.moe_top_k, cfg.moe_experts)
        else:
            ffn = q * ffn_flops_per_token(d, f)
        layers.append({"attention": attn, "ffn": ffn, "moe": is_moe})
    out["emformer_layers"] = layers
    out["output_linear"] = 2 * d * enc * n_seg
    h = arch["symbol_embedding_dim"]
    out["predictor_per_step"] = arch["num_lstm_layers"] * 2 * 4 * h * (2 * h) + 2 * h * enc
    out["joiner_per_step"] = 2 * enc * num_symbols
    steps = cfg.beam_width * n_seg
    out["total"] = (out["frontend"] + out["input_linear"] + sum(l["attention"] + l["ffn"] for l in layers)
                    + out["output_linear"] + steps * (out["predictor_per_step"] + out["joiner_per_step"]))
    return out


def weight_bytes(num_params: int, linear_weight_params: int, precision: str) -> int:
    """Bytes of the weights: int8 stores Linear weights in 1 byte and the rest in fp32."""
    if precision == "int8":
        return linear_weight_params + 4 * (num_params - linear_weight_params)
    return BYTES[precision] * num_params
