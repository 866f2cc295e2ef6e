"""Greedy RNN-T search over ONNX Runtime sessions, in numpy: no torch.

One loop serves both runtimes of a configuration whose predictor and joiner run in ONNX
Runtime (``backend: onnxruntime``) with greedy search and no language model: the torch
runtime (:class:`dse.core.decoder.FastRNNTSearch` hands such a search to
:class:`OrtGreedy`) and the torch-free one (:mod:`dse.deploy.lite`). The study, the bundle
and the torch-free runtime therefore decode the same encoder frames to the same tokens by
construction.

The algorithm is torchaudio's ``RNNTBeamSearch`` at beam width 1, as
:meth:`dse.core.decoder.FastRNNTSearch._greedy_impl` runs it: at each frame the
blank-extended hypotheses collect, a non-blank expansion is kept while its score beats the
best of them (at most ``step_max_tokens`` per frame), and the frame ends on the best by
score over (tokens + 1), ties to the earliest in ascending order of score. Scores are
float32 sums of the log-softmax of the joiner's output over the temperature. The
log-softmax is numpy's, so scores can differ from the torch search's in the last bit;
tokens differ only where two candidates tie to that precision.

What this saves over the torch search on the same sessions is bookkeeping: per joiner
call a handful of numpy operations instead of torch tensors, sorts and ``topk`` calls, and
the predictor state stays in the arrays ONNX Runtime returned. The sessions are dse's
``predictor.onnx`` (``tokens (B, 1), h (L, B, H), c (L, B, H) -> output (B, 1, E), next_h,
next_c``) and ``joiner.onnx`` (``source (B, T, E), target (B, U, E) -> logits (B, T, U, V)``).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Tuple

import numpy as np

__all__ = ["GreedyHypothesis", "OrtGreedy", "STEP_MAX_TOKENS", "log_softmax"]

STEP_MAX_TOKENS = 100  # torchaudio's default step_max_tokens


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (max-shifted)."""
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


class GreedyHypothesis(NamedTuple):
    """The one hypothesis of a greedy stream: ``tokens`` blank-led as torchaudio keeps them,
    ``score`` (a Python float holding a float32 value), the predictor's ``output`` ``(1, 1, E)``
    for its last token and the predictor ``state`` ``(h, c)``, each ``(L, 1, H)``."""
    tokens: List[int]
    score: float
    output: np.ndarray
    state: Tuple[np.ndarray, np.ndarray]


class OrtGreedy:
    """Greedy search with a predictor and a joiner in ONNX Runtime sessions.

    ``blank`` must be the last token id (the joiner's last output), as in the torch search.
    """

    def __init__(self, predictor, joiner, blank: int, temperature: float = 1.0,
                 step_max_tokens: int = STEP_MAX_TOKENS):
        self.predictor = predictor
        self.joiner = joiner
        self.blank = int(blank)
        self.temperature = np.float32(temperature)
        self.step_max_tokens = int(step_max_tokens)
        layers, _, hidden = predictor.get_inputs()[1].shape
        self.state_shape = (int(layers), 1, int(hidden))
        self._token = np.zeros((1, 1), np.int64)

    def predict(self, token: int, state: Tuple[np.ndarray, np.ndarray]):
        """The predictor's output ``(1, 1, E)`` and next state after ``token``."""
        self._token[0, 0] = token
        out, h, c = self.predictor.run(None, {"tokens": self._token, "h": state[0], "c": state[1]})
        return out, (h, c)

    def start(self) -> GreedyHypothesis:
        """A new stream's hypothesis: the blank, predicted from the zero state."""
        zeros = np.zeros(self.state_shape, np.float32)
        out, state = self.predict(self.blank, (zeros, zeros))
        return GreedyHypothesis([self.blank], 0.0, out, state)

    def log_probs(self, enc_t: np.ndarray, output: np.ndarray) -> np.ndarray:
        """``(V,)`` log-probabilities of the next token at one encoder frame ``(1, 1, E)``."""
        (logits,) = self.joiner.run(None, {"source": enc_t, "target": output})
        return log_softmax(logits[0, 0, 0] / self.temperature)

    def advance(self, hyp: GreedyHypothesis, frames: np.ndarray) -> GreedyHypothesis:
        """Search the encoder ``frames`` ``(1, T, E)`` float32 from ``hyp``; the hypothesis after them."""
        blank, f32, step_max = self.blank, np.float32, self.step_max_tokens
        tokens, score, output, state = hyp
        for t in range(frames.shape[1]):
            enc_t = frames[:, t: t + 1]
            frame = []  # (tokens, score, output, state) of each blank extension, in order
            best_blank = -math.inf
            while True:
                total = f32(score) + self.log_probs(enc_t, output)  # float32, as torchaudio's tensor sum
                blank_score = float(total[blank])
                frame.append((tokens, blank_score, output, state))
                best_blank = max(best_blank, blank_score)
                if len(frame) > step_max:
                    break
                token = int(np.argmax(total[:blank]))
                if not float(total[token]) > best_blank:
                    break
                tokens, score = tokens + [token], float(total[token])
                output, state = self.predict(token, state)
            if len(frame) == 1:
                tokens, score, output, state = frame[0]
                continue
            # the frame's best by score / (tokens + 1); ties to the earliest of the sorted scores
            order = sorted(range(len(frame)), key=lambda i: frame[i][1])
            norm = [f32(frame[i][1] / (len(frame[i][0]) + 1)) for i in order]
            tokens, score, output, state = frame[order[int(np.argmax(norm))]]
        return GreedyHypothesis(tokens, score, output, state)
