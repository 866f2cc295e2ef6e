"""The Emformer's streaming step with static shapes: one graph for every chunk of a stream.

torchaudio's ``Emformer.infer`` reads ``past_length`` with ``.item()`` and slices by it, so
the shapes inside a chunk depend on a value: an ONNX export carries that arithmetic as
thousands of small nodes, and ``torch.compile`` breaks its graph there. :class:`StaticInfer`
computes the same with fixed shapes (a mask instead of a slice), each layer's left context a
tensor of its own (nothing stacked or unstacked in the graph); it is what the ONNX
backend exports (:mod:`dse.core.onnx_encoder`) and what ``compile`` compiles
(:class:`StaticTranscriberStep`, torchaudio's state layout in and out).
"""
from __future__ import annotations

from typing import List, Optional

import torch


class StaticInfer(torch.nn.Module):
    """The same computation as ``transcriber.infer`` at batch 1, written with static shapes.

    torchaudio's ``infer`` slices the left context to ``min(left_context, past_length)``
    rows in every layer, a shape that depends on a value: the exported graph then carries
    that arithmetic (Shape, Gather, Min, Slice, Concat: about 2,000 nodes for the base
    model, more time than its matrix products at int8, in a one-off profile). Here every layer attends to all
    ``Lc`` left-context rows, and the rows not yet filled get the layer's ``negative_inf``
    before the softmax, one mask computed per chunk from ``past_length``: masked rows get
    probability exactly 0, so the result is torchaudio's up to the order of floating-point
    sums (``tests/test_onnx_encoder.py`` compares them over 48 chunks from a zero state).
    The query and key/value projections are one matrix product, the query's scaling folded into
    its weights; rows stay in time order, so the next left context is one slice per layer. State rows that are not yet
    valid (the first ``Lc - past_length``) may hold other values than torchaudio's; neither
    graph ever reads them. Float models only (the stacked projection reads ``.weight``). Models with memory (``max_memory_size > 0``) or no left context
    are not supported (:meth:`supports`); the ONNX export then goes through torchaudio's own
    ``infer`` (:class:`dse.core.onnx_encoder._FlatInfer`).
    """

    def __init__(self, transcriber):
        super().__init__()
        emformer = transcriber.transformer
        self.input_linear = transcriber.input_linear
        self.output_linear = transcriber.output_linear
        self.layer_norm = transcriber.layer_norm
        self.stride = transcriber.time_reduction.stride
        self.layers = emformer.emformer_layers
        self.right = emformer.right_context_length
        self.segment = emformer.segment_length
        self.left = emformer.left_context_length
        first = self.layers[0].attention
        self.heads, self.dim = first.num_heads, first.input_dim
        self.neg_inf = float(first.negative_inf)
        # [query; key; value] weights of each layer, stacked once (the exporter bakes them in), the
        # query's scaled by head_dim ** -0.5 as torchaudio scales the query (exact when that is a power of 2,
        # head_dim a power of 4: 64 for the base model; otherwise within rounding)
        scaling = (self.dim // self.heads) ** -0.5
        self.qkv_weight = torch.nn.ParameterList([torch.nn.Parameter(torch.cat(
            [l.attention.emb_to_query.weight * scaling, l.attention.emb_to_key_value.weight]).detach(),
            requires_grad=False) for l in self.layers])
        self.qkv_bias = torch.nn.ParameterList([torch.nn.Parameter(torch.cat(
            [l.attention.emb_to_query.bias * scaling, l.attention.emb_to_key_value.bias]).detach(), requires_grad=False)
            for l in self.layers])

    @staticmethod
    def supports(transcriber) -> bool:
        """No memory, a left context, float32 ``Linear`` projections (not quantised)."""
        emformer = transcriber.transformer
        query = emformer.emformer_layers[0].attention.emb_to_query
        return (emformer.max_memory_size == 0 and emformer.left_context_length > 0
                and isinstance(getattr(query, "weight", None), torch.Tensor) and query.weight.dtype == torch.float32)

    def forward(self, input, lengths, past_length, *state):
        """``state``: each layer's left-context keys ``(Lc, D)``, then each layer's values; returns
        ``(output (1, S, E), output_lengths, next past_length, *next keys, *next values)``."""
        D, H, Rc, S, Lc = self.dim, self.heads, self.right, self.segment, self.left
        keys_in, vals_in = state[:len(self.layers)], state[len(self.layers):]
        # rows in time order, [utterance; right context] (torchaudio puts the right context first;
        # every row attends to every key, so only the order of the outputs and new keys depends on it)
        x = self.input_linear(input[0]).reshape(S + Rc, D)     # time reduction: stride frames per row
        # rows of the left context not yet filled: the first Lc - min(Lc, past_length)
        filled = torch.arange(Lc, device=input.device) + past_length[0, 0, 0] >= Lc
        bias = torch.cat([torch.where(filled, 0.0, self.neg_inf), input.new_zeros(S + Rc)])
        new_keys, new_vals = [], []
        for i, layer in enumerate(self.layers):
            qkv = torch.nn.functional.linear(layer.layer_norm_input(x), self.qkv_weight[i], self.qkv_bias[i])
            q, k, v = qkv.split(D, dim=1)
            keys = torch.cat([keys_in[i], k])                  # (Lc + S + Rc, D)
            vals = torch.cat([vals_in[i], v])
            qh = q.reshape(S + Rc, H, D // H).transpose(0, 1)
            kh = keys.reshape(Lc + S + Rc, H, D // H).permute(1, 2, 0)
            vh = vals.reshape(Lc + S + Rc, H, D // H).transpose(0, 1)
            probs = torch.softmax(torch.matmul(qh, kh) + bias, dim=-1)
            out = torch.matmul(probs, vh).transpose(0, 1).reshape(S + Rc, D)
            x = layer.attention.out_proj(out) + x
            x = layer.pos_ff(x) + x
            x = layer.layer_norm_output(x)
            # the next left context: the last Lc rows of [left context; this segment], one slice
            new_keys.append(keys[S: S + Lc])
            new_vals.append(vals[S: S + Lc])
        out = self.layer_norm(self.output_linear(x[:S])).unsqueeze(0)   # (1, S, E)
        out_lengths = torch.clamp(torch.div(lengths, self.stride, rounding_mode="trunc") - Rc, min=0)
        return (out, out_lengths, past_length + S, *new_keys, *new_vals)


class StaticTranscriberStep(torch.nn.Module):
    """``transcriber.infer(input, lengths, states)`` through :class:`StaticInfer`, with
    torchaudio's per-layer state ``[memory, lc_key, lc_val, past_length]`` in and out, so it can
    stand in for the transcriber's ``infer`` (``None`` starts a stream from the zero state).
    Full chunks only (``lengths`` equal to the chunk's frames), as a streaming recognizer sends."""

    def __init__(self, transcriber):
        super().__init__()
        self.step = StaticInfer(transcriber)
        emformer = transcriber.transformer
        self.layers = len(emformer.emformer_layers)
        self.left, self.dim = emformer.left_context_length, self.step.dim

    def forward(self, input: torch.Tensor, lengths: torch.Tensor,
                states: Optional[List[List[torch.Tensor]]] = None):
        L, Lc, D = self.layers, self.left, self.dim
        if states is None:
            zeros = input.new_zeros(Lc, D)
            keys = vals = [zeros] * L
            past = torch.zeros(L, 1, 1, dtype=torch.int32, device=input.device)
        else:
            keys = [s[1].reshape(Lc, D) for s in states]
            vals = [s[2].reshape(Lc, D) for s in states]
            past = torch.stack([s[3] for s in states])
        out, out_lengths, past, *state = self.step(input, lengths, past, *keys, *vals)
        empty = input.new_zeros(0, 1, D)
        return out, out_lengths, [[empty, state[i].unsqueeze(1), state[L + i].unsqueeze(1), past[i]] for i in range(L)]
