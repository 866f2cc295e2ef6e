"""RNN-T search over ONNX Runtime sessions, in numpy: no torch.

These loops serve both runtimes of a configuration whose predictor and joiner run in ONNX
Runtime (``backend: onnxruntime``): the torch runtime (:class:`dse.core.decoder.FastRNNTSearch`
hands its search to them) and the torch-free one (:mod:`dse.deploy.lite`). The study, the
bundle and the torch-free runtime therefore decode the same encoder frames to the same
tokens by construction. :class:`OrtGreedy` is greedy search without a language model;
:class:`OrtBeamSearch` everything else (beam search, LM fusion), the vectorised search's
algorithm step for step (see its docstring).

Greedy search is torchaudio's ``RNNTBeamSearch`` at beam width 1, as
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
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

__all__ = ["BeamState", "GreedyHypothesis", "OrtBeamSearch", "OrtGreedy", "STEP_MAX_TOKENS", "greedy_applies",
           "log_softmax", "search_for"]

STEP_MAX_TOKENS = 100  # torchaudio's default step_max_tokens


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis: ``(x - max) - log(sum(exp(x - max)))`` (in place on the
    one new array: the same operations, fewer temporaries)."""
    z = (x - x.max(axis=-1, keepdims=True)).astype(np.float32, copy=False)
    total = np.exp(z).sum(axis=-1, keepdims=True)
    z -= np.log(total, out=total)
    return z


def greedy_applies(beam_width: int, lm) -> bool:
    """Whether both runtimes decode with :class:`OrtGreedy` (greedy search without an LM); anything
    else goes to :class:`OrtBeamSearch`."""
    return beam_width == 1 and lm is None


def search_for(predictor, joiner, blank: int, beam_width: int, temperature: float = 1.0, lm=None):
    """The search for a stream of fixed ``beam_width`` and LM rows ``lm`` (see :func:`greedy_applies`)."""
    if greedy_applies(beam_width, lm):
        return OrtGreedy(predictor, joiner, blank, temperature=temperature)
    return OrtBeamSearch(predictor, joiner, blank, temperature=temperature, lm=lm)


class GreedyHypothesis(NamedTuple):
    """The one hypothesis of a greedy stream: ``tokens`` blank-led as torchaudio keeps them,
    ``score`` (a Python float holding a float32 value), the predictor's ``output`` ``(1, 1, E)``
    for its last token and the predictor ``state`` ``(h, c)``, each ``(L, 1, H)``."""
    tokens: List[int]
    score: float
    output: np.ndarray
    state: Tuple[np.ndarray, np.ndarray]


class _Sessions:
    """What both searches hold: the predictor and joiner sessions, the blank (the last token id, the
    joiner's last output, as in the torch search), the temperature (float32), the most tokens a frame
    may add and one hypothesis' predictor state shape ``(L, 1, H)``."""

    def __init__(self, predictor, joiner, blank: int, temperature: float, step_max_tokens: int):
        self.predictor = predictor
        self.joiner = joiner
        self.blank = int(blank)
        self.temperature = np.float32(temperature)
        self.step_max_tokens = int(step_max_tokens)
        layers, _, hidden = predictor.get_inputs()[1].shape
        self.state_shape = (int(layers), 1, int(hidden))


class OrtGreedy(_Sessions):
    """Greedy search with a predictor and a joiner in ONNX Runtime sessions."""

    def __init__(self, predictor, joiner, blank: int, temperature: float = 1.0,
                 step_max_tokens: int = STEP_MAX_TOKENS):
        super().__init__(predictor, joiner, blank, temperature, step_max_tokens)
        self._token = np.zeros((1, 1), np.int64)

    @staticmethod
    def best_tokens(hyp: GreedyHypothesis) -> List[int]:
        """The hypothesis' tokens, blank-led."""
        return list(hyp.tokens)

    @staticmethod
    def beam_size(hyp: GreedyHypothesis) -> int:
        return 1

    @staticmethod
    def hypothesis(hyp: GreedyHypothesis, i: int = 0):
        """The hypothesis as :meth:`OrtBeamSearch.hypothesis` gives a beam's: ``(tokens, output (1, 1, E),
        h (L, 1, H), c (L, 1, H), score)`` (the arrays themselves: the search never writes to them)."""
        return list(hyp.tokens), hyp.output, hyp.state[0], hyp.state[1], hyp.score

    @staticmethod
    def state_from(hypotheses) -> GreedyHypothesis:
        """A stream's hypothesis from the first of ``(tokens, output, h, c, score)`` tuples (a beam, best first)."""
        tokens, output, h, c, score = hypotheses[0]
        return GreedyHypothesis(list(tokens), float(score), output, (h, c))

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

    def advance(self, hyp: Optional[GreedyHypothesis], frames: np.ndarray, beam_width: int = 1) -> GreedyHypothesis:
        """Search the encoder ``frames`` ``(1, T, E)`` float32 from ``hyp`` (``None``: a new stream); the
        hypothesis after them. ``beam_width`` is 1 (:class:`OrtBeamSearch`'s signature)."""
        blank, f32, step_max = self.blank, np.float32, self.step_max_tokens
        tokens, score, output, state = hyp if hyp is not None else self.start()
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


# -- beam search ------------------------------------------------------------------------------------
class TokenKeys:
    """A stream's token sequences interned as integer keys, with each key's cached predictor slot
    (-1 when none) and, with an LM, its row of LM scores (the LM's ``row(tokens)``)."""

    def __init__(self, lm=None):
        self.lm = lm
        self.tokens_of: List[Tuple[int, ...]] = []
        self.key_of: Dict[Tuple[int, ...], int] = {}
        self.child_of: Dict[Tuple[int, int], int] = {}
        self.slot_of: List[int] = []
        self.lm_row_of: List[int] = []

    def intern(self, tokens: Tuple[int, ...]) -> int:
        k = self.key_of.get(tokens)
        if k is None:
            k = self.key_of[tokens] = len(self.tokens_of)
            self.tokens_of.append(tokens)
            self.slot_of.append(-1)
            if self.lm is not None:
                self.lm_row_of.append(self.lm.row(tokens))
        return k

    def child(self, key: int, token: int) -> int:
        """The key of ``key``'s token sequence extended by ``token``."""
        k = self.child_of.get((key, token))
        if k is None:
            k = self.child_of[(key, token)] = self.intern(self.tokens_of[key] + (token,))
        return k

    def expansions(self, a_hypos, indices: List[int], scores: List[float], width: int, threshold: float,
                   cache: bool):
        """The non-blank expansions that beat ``threshold``, from the top candidates of a step (flat
        ``indices`` into the ``(len(a_hypos), width)`` scores, best first): ``[key, slot, score]`` lists
        (slot -1 when not computed) and ``todo``, ``(index in expansions, parent slot, token)`` for the
        predictor call; ``cache``: reuse a key's computed slot."""
        expansions, todo = [], []
        for idx, score in zip(indices, scores):
            if score > threshold:
                i, token = divmod(idx, width)
                h = a_hypos[i]
                key = self.child(h[0], token)
                slot = self.slot_of[key] if cache else -1
                if slot < 0:
                    todo.append((len(expansions), h[1], token))
                expansions.append([key, slot, score])
        return expansions, todo

    def place(self, expansions, todo, first: int) -> None:
        """The ``todo`` expansions' predictor rows were stored from slot ``first`` on: record their slots."""
        for j, x in enumerate(todo):
            e = expansions[x[0]]
            e[1] = self.slot_of[e[0]] = first + j


class _Store(TokenKeys):
    """A :class:`TokenKeys` with the slots holding predictor outputs ``(n, 1, E)`` and states ``(L, n, H)``."""

    def __init__(self, lm, out: np.ndarray, h: np.ndarray, c: np.ndarray, capacity: int = 256):
        super().__init__(lm)
        n = out.shape[0]
        capacity = max(capacity, 2 * n)
        self.out = np.empty((capacity,) + out.shape[1:], np.float32)
        self.h = np.empty((h.shape[0], capacity, h.shape[2]), np.float32)
        self.c = np.empty_like(self.h)
        self.out[:n], self.h[:, :n], self.c[:, :n] = out, h, c
        self.used = n

    def append(self, out: np.ndarray, h: np.ndarray, c: np.ndarray) -> int:
        """Store ``out.shape[0]`` new rows; returns the first slot."""
        n, first = out.shape[0], self.used
        if first + n > self.out.shape[0]:
            capacity = 2 * (first + n)
            grown = np.empty((capacity,) + self.out.shape[1:], np.float32)
            grown[:first] = self.out[:first]
            self.out = grown
            for name in ("h", "c"):
                buf = getattr(self, name)
                new = np.empty((buf.shape[0], capacity, buf.shape[2]), np.float32)
                new[:, :first] = buf[:, :first]
                setattr(self, name, new)
        self.out[first: first + n], self.h[:, first: first + n], self.c[:, first: first + n] = out, h, c
        self.used = first + n
        return first


class BeamState(NamedTuple):
    """What a beam search hands from one chunk to the next: its store and the beam, best first,
    as ``(key, slot, score)``."""
    store: _Store
    beam: List[Tuple[int, int, float]]


class OrtBeamSearch(_Sessions):
    """torchaudio's ``RNNTBeamSearch`` (with LM fusion as :class:`dse.core.lm.FusedBeamSearch`
    adds it) over ONNX Runtime predictor and joiner sessions, in numpy.

    The algorithm and its bookkeeping are :meth:`dse.core.decoder.FastRNNTSearch._search_impl`'s,
    step for step (one joiner call over every hypothesis still emitting in the frame, at most one
    predictor call over the new expansions, blank extensions merged by log-adding, the top
    ``beam_width`` expansions kept while they beat the ``beam_width``-th blank score, the beam
    chosen by score over (tokens + 1) at the end of every frame). The arithmetic is numpy's in
    float32: the log-softmax and the merges' ``logaddexp`` can differ from torch's in the last
    bit, so the search can only take another path where two scores tie to that precision.
    Ties in the rankings go to the lower index.

    ``lm``: ``None``, or the weighted LM rows: an object with ``row(tokens) -> int`` (the row of a
    token sequence's history), ``rows(list of rows) -> (n, blank) float32`` and ``trim()`` (called
    when a stream's store is rebuilt). ``cache_predictor`` and ``max_slots`` as in the torch search.
    """

    def __init__(self, predictor, joiner, blank: int, temperature: float = 1.0,
                 step_max_tokens: int = STEP_MAX_TOKENS, lm=None, cache_predictor: bool = True,
                 max_slots: int = 2048):
        super().__init__(predictor, joiner, blank, temperature, step_max_tokens)
        self.lm = lm
        self.cache_predictor = cache_predictor
        self.max_slots = max_slots

    def _predict(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        return self.predictor.run(None, {"tokens": tokens, "h": h, "c": c})

    def _store(self, out, h, c) -> _Store:
        if self.lm is not None:
            self.lm.trim()
        return _Store(self.lm, out, h, c)

    def start(self) -> BeamState:
        """A new stream: the blank, predicted from the zero state."""
        zeros = np.zeros(self.state_shape, np.float32)
        out, h, c = self._predict(np.array([[self.blank]], np.int64), zeros, zeros)
        store = self._store(out, h, c)
        key = store.intern((self.blank,))
        if self.cache_predictor:
            store.slot_of[key] = 0
        return BeamState(store, [(key, 0, 0.0)])

    def state_from(self, hypotheses) -> BeamState:
        """A beam from ``(tokens, output (1, 1, E), h (L, 1, H), c (L, 1, H), score)`` tuples, best first."""
        store = self._store(np.concatenate([x[1] for x in hypotheses]), np.concatenate([x[2] for x in hypotheses], 1),
                            np.concatenate([x[3] for x in hypotheses], 1))
        beam = [(store.intern(tuple(x[0])), i, float(x[4])) for i, x in enumerate(hypotheses)]
        if self.cache_predictor:
            for key, slot, _ in beam:
                store.slot_of[key] = slot
        return BeamState(store, beam)

    @staticmethod
    def best_tokens(state: BeamState) -> List[int]:
        """The best hypothesis' tokens, blank-led."""
        return list(state.store.tokens_of[state.beam[0][0]])

    @staticmethod
    def beam_size(state: BeamState) -> int:
        return len(state.beam)

    @staticmethod
    def hypothesis(state: BeamState, i: int):
        """The beam's ``i``-th hypothesis as :meth:`hypotheses` gives it (views of the store: a store only
        ever writes past the slots it has handed out, and a grown or rebuilt store is new arrays)."""
        store = state.store
        key, slot, score = state.beam[i]
        return (list(store.tokens_of[key]), store.out[slot: slot + 1], store.h[:, slot: slot + 1],
                store.c[:, slot: slot + 1], score)

    def hypotheses(self, state: BeamState):
        """The beam as ``(tokens, output (1, 1, E), h (L, 1, H), c (L, 1, H), score)``, best first (views)."""
        return [self.hypothesis(state, i) for i in range(len(state.beam))]

    def _log_probs(self, enc_t: np.ndarray, out: np.ndarray, lm_rows) -> np.ndarray:
        (logits,) = self.joiner.run(None, {"source": enc_t, "target": out})
        probs = log_softmax(logits[:, 0, 0] / self.temperature)
        if lm_rows is not None:
            probs[:, :self.blank] += self.lm.rows(lm_rows)
        return probs

    def advance(self, state: Optional[BeamState], frames: np.ndarray, beam_width: int) -> BeamState:
        """Search the encoder ``frames`` ``(1, T, E)`` float32 from ``state`` (``None``: a new stream)."""
        if state is None:
            state = self.start()
        elif not self.cache_predictor or state.store.used > self.max_slots:
            state = self.state_from(self.hypotheses(state))
        store, b_hypos = state
        tokens_of, lm_row_of = store.tokens_of, store.lm_row_of
        cache, lm, f32 = self.cache_predictor, self.lm, np.float32
        for t in range(frames.shape[1]):
            enc_t = frames[:, t: t + 1]
            a_hypos = b_hypos
            b_hypos = []
            b_of_key = {}
            symbols_current_t = 0
            while a_hypos:
                # -- one joiner call over every a hypothesis
                probs = self._log_probs(enc_t, store.out[[h[1] for h in a_hypos]],
                                        [lm_row_of[h[0]] for h in a_hypos] if lm is not None else None)
                total = np.array([h[2] for h in a_hypos], f32)[:, None] + probs
                blank_scores, nonblank = total[:, -1], total[:, :-1]
                # -- blank extensions, merged by key
                for i, (h, score) in enumerate(zip(a_hypos, blank_scores.tolist())):
                    key = h[0]
                    old = b_of_key.get(key)
                    if old is not None:
                        b_hypos.remove(old)
                        score = float(np.logaddexp(f32(old[2]), blank_scores[i]))
                    new = (key, h[1], score)
                    b_hypos.append(new)
                    b_of_key[key] = new
                b_hypos.sort(key=_score)  # stable, ascending; the scores are float32 values held as floats
                if symbols_current_t == self.step_max_tokens:
                    break
                # -- the top non-blank expansions beating the beam_width-th blank score
                width = nonblank.shape[1]
                flat = nonblank.reshape(-1)
                best = _top(flat, beam_width)
                threshold = b_hypos[-beam_width][2] if len(b_hypos) >= beam_width else -math.inf
                expansions, todo = store.expansions(a_hypos, best.tolist(), flat[best].tolist(), width, threshold,
                                                    cache)
                if not expansions:
                    break
                # -- one predictor call over the expansions not yet computed
                if todo:
                    base = [x[1] for x in todo]
                    out, h, c = self._predict(np.array([[x[2]] for x in todo], np.int64),
                                              store.h[:, base], store.c[:, base])
                    store.place(expansions, todo, store.append(out, h, c))
                a_hypos = [tuple(e) for e in expansions]
                symbols_current_t += 1
            # -- the beam: best by score over (tokens + 1); _top's rule (largest first, ties to the lower
            # index), in Python: a beam's few candidates sort faster as a list than through numpy
            norm = np.array([h[2] / (len(tokens_of[h[0]]) + 1) for h in b_hypos], f32).tolist()
            b_hypos = [b_hypos[i] for i in sorted(range(len(norm)), key=lambda i: -norm[i])[:beam_width]]
        return BeamState(store, b_hypos)


# up to this many candidates one stable sort is cheaper than partitioning first (k = 4, float32, hot:
# 4.0 against 7.4 us at 112, 7.4 against 7.8 at 256, 12.2 against 8.7 at 512; a one-off timing)
_SORT_ALL = 256


def _score(hyp) -> float:
    return hyp[2]


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, largest first, ties to the lower index. Over many
    candidates (a beam step of the base model scores 4 x 4,096) the ones at or above the ``k``-th
    largest are found first (a partition, linear) and only they are sorted; over a few (the
    embedded default's 4 x 28) one stable sort of all does it in fewer numpy calls."""
    n = values.shape[0]
    if k < n and n > _SORT_ALL:
        kth = np.partition(values, n - k)[n - k]
        idx = np.flatnonzero(values >= kth)
        return idx[np.argsort(-values[idx], kind="stable")][:k]
    return np.argsort(-values, kind="stable")[:k]
