"""A vectorised re-implementation of torchaudio's RNN-T beam search, with optional LM fusion.

:class:`FastRNNTSearch` is a drop-in replacement for ``torchaudio.models.RNNTBeamSearch``
(and for :class:`dse.core.lm.FusedBeamSearch` when given a language model): the same
``infer(input, length, beam_width, state, hypothesis) -> (hypotheses, state)`` and the
same hypothesis tuples ``(tokens, predictor_out, predictor_state, score)``, best first.

It runs *the same algorithm* as torchaudio's ``_search``, step for step:

* the ``b`` set (hypotheses that ended the frame with a blank) and the ``a`` set
  (hypotheses still emitting in this frame); hypotheses with equal token sequences are
  merged by log-adding the blank-extended score into the existing one;
* the top ``beam_width`` non-blank expansions over all ``a`` hypotheses, kept only while
  they beat the ``beam_width``-th best ``b`` score; at most ``step_max_tokens`` per frame;
* at the end of every frame the ``beam_width`` best by ``score / (len(tokens) + 1)``.

What differs is bookkeeping. Per search step (one iteration of torchaudio's inner loop)
there is one joiner call over all ``a`` hypotheses and at most one predictor call over
the new expansions. Predictor outputs and LSTM states live in rows ("slots") of a few
buffers, gathered with one ``index_select`` per tensor (torchaudio stacks, concatenates
and slices per hypothesis); token sequences are interned as integer keys (torchaudio
compares ``str(tokens)``); the LM scores of all hypotheses of a step come from a table
with one weighted row per LM history in one ``index_select``; the LM rows themselves come from
the n-gram model, which memoises its lower orders (:meth:`dse.core.ngram.CharNgramLM.log_probs`).

``cache_predictor`` (default on): the predictor output and state of a token sequence are
computed once per stream and reused whenever the search expands to that sequence again
(torchaudio recomputes them; about half of its predictor rows are such repeats, and a
quarter of its predictor calls consist only of repeats, on the shipped model). MKL's
matrix products are batch-*variant* (a row's result can change in the last bit with the
batch it is computed in), so a reused row can differ from torchaudio's recomputation by
an ulp: scores then differ around 1e-7 and the search can only take another path where
two scores tie to that precision. Greedy search (beam 1) is unaffected: every predictor
batch has one row, so the reused rows are bit-identical. With ``cache_predictor=False``
every operation that decides the search is torchaudio's, on tensors of the same shapes,
values and order (same joiner and predictor batches, same dtypes for the score sums,
the same 0-dim ``logaddexp`` for merges, sorts and top-k over the same lists), so the
hypotheses, scores and predictor tensors included, are bit-identical to torchaudio's.

When the predictor and joiner run in ONNX Runtime (``backend: onnxruntime``), the same
algorithm runs in numpy on their sessions (:mod:`dse.core.ort_search`; ``numpy_search``).
"""
from __future__ import annotations

import collections.abc
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from dse.core.ngram import LMRows
from dse.core.ort_search import OrtBeamSearch, OrtGreedy, TokenKeys, greedy_applies

Hypothesis = Tuple[List[int], torch.Tensor, List[List[torch.Tensor]], float]

__all__ = ["FastRNNTSearch", "LMRows", "lm_log_probs"]


def lm_log_probs(lm, history: str, columns: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``weight * log P_lm(c | history)`` for the symbols at ``columns`` of ``lm.distribution``.

    ``columns`` is ``lm.columns(symbols)``: entry ``t`` is the LM's index of token ``t``.
    The arithmetic is :class:`dse.core.lm.FusedBeamSearch`'s (weight times the selected
    log-probabilities, in float32), so the result is bit-identical to its scores.
    """
    return weight * lm.distribution(history).index_select(0, columns)


class _Store(TokenKeys):
    """One stream's interned token sequences and the slots holding predictor outputs and states."""

    def __init__(self, lm: Optional[LMRows], pred: torch.Tensor, states: List[List[torch.Tensor]],
                 capacity: int = 256):
        super().__init__(lm)
        n = pred.shape[0]
        self.capacity = max(capacity, 2 * n)
        self.pred = pred.new_empty((self.capacity,) + tuple(pred.shape[1:]))
        self.pred[:n] = pred
        self.states = []
        for layer in states:
            bufs = []
            for s in layer:
                buf = s.new_empty((self.capacity,) + tuple(s.shape[1:]))
                buf[:n] = s
                bufs.append(buf)
            self.states.append(bufs)
        self.used = n
        self.device = pred.device

    def append(self, pred: torch.Tensor, states: List[List[torch.Tensor]]) -> int:
        """Store ``pred.shape[0]`` new rows; returns the first slot."""
        n, first = pred.shape[0], self.used
        if first + n > self.capacity:
            self.capacity = 2 * (first + n)
            self.pred = _grow(self.pred, first, self.capacity)
            self.states = [[_grow(buf, first, self.capacity) for buf in layer] for layer in self.states]
        self.pred[first: first + n] = pred
        for layer, new_layer in zip(self.states, states):
            for buf, s in zip(layer, new_layer):
                buf[first: first + n] = s
        self.used = first + n
        return first

    def gather_states(self, slots: torch.Tensor) -> List[List[torch.Tensor]]:
        return [[buf.index_select(0, slots) for buf in layer] for layer in self.states]


def _grow(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    new = buf.new_empty((capacity,) + tuple(buf.shape[1:]))
    new[:used] = buf[:used]
    return new


class LazyHypotheses(collections.abc.Sequence):
    """The beam an ONNX Runtime search (``owner``, :mod:`dse.core.ort_search`) left in ``state``, in
    torchaudio's layout (``Hypothesis`` tuples, best first), each tuple built when read. Handed back to
    the same search, ``state`` goes on as it is; a stream builds only what it reads (the best
    hypothesis' tokens)."""

    __slots__ = ("owner", "state", "_n", "_built")

    def __init__(self, owner, state):
        self.owner, self.state = owner, state
        self._n = owner.beam_size(state)
        self._built = {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"hypothesis {i} of a beam of {self._n}")
        hyp = self._built.get(i)
        if hyp is None:
            hyp = self._built[i] = _as_hypothesis(*self.owner.hypothesis(self.state, i))
        return hyp

    def best_tokens(self) -> List[int]:
        """The best hypothesis' tokens, blank-led, without building the hypothesis."""
        return self.owner.best_tokens(self.state)

    def __repr__(self) -> str:
        return f"LazyHypotheses({list(self)!r})"


def _as_hypothesis(tokens: List[int], output, h, c, score: float) -> Hypothesis:
    """A torchaudio ``Hypothesis`` from an ONNX Runtime search's arrays: ``output`` ``(1, 1, E)``, ``h`` and
    ``c`` ``(L, 1, H)`` (the tensors share their memory)."""
    h, c = torch.from_numpy(h), torch.from_numpy(c)
    return tokens, torch.from_numpy(output[0]), [[h[j], c[j]] for j in range(h.shape[0])], score


def _from_hypothesis(hyp: Hypothesis) -> tuple:
    """:func:`_as_hypothesis` the other way: ``(tokens, output (1, 1, E), h (L, 1, H), c (L, 1, H), score)``
    float32 arrays from a torchaudio ``Hypothesis``."""
    tokens, pred, state, score = hyp
    h, c = (torch.stack([layer[j] for layer in state]).detach().float().contiguous().numpy() for j in (0, 1))
    return list(tokens), pred.detach().float().reshape(1, 1, -1).numpy(), h, c, float(score)


def _stack_hypotheses(hyps: Sequence[Hypothesis]) -> Tuple[torch.Tensor, List[List[torch.Tensor]]]:
    """Predictor outputs ``(n, 1, D)`` and batched states of torchaudio hypotheses (its ``_batch_state``)."""
    pred = torch.stack([h[1] for h in hyps], dim=0)
    state0 = hyps[0][2]
    states = [[torch.cat([h[2][i][j] for h in hyps]) for j in range(len(state0[i]))] for i in range(len(state0))]
    return pred, states


class FastRNNTSearch(torch.nn.Module):
    """Vectorised RNN-T beam search: torchaudio's ``RNNTBeamSearch`` algorithm, faster.

    ``lm``/``lm_weight``: a :class:`dse.core.lm.CharNgramLM` fused as in
    :class:`dse.core.lm.FusedBeamSearch` (each non-blank token gains ``lm_weight *
    log P_lm(c | history)``; no fusion when ``lm`` is ``None`` or the weight is 0).
    ``symbols``: the character of every non-blank token id (the tokenizer's ``symbols``);
    only used with an LM, defaults to ``lm.symbols``. The blank must then be the last
    token id, as in ``FusedBeamSearch``. ``beam_width`` 1 is torchaudio's greedy search.
    ``cache_predictor``: reuse a token sequence's predictor output within a stream (see
    the module docstring; ``False`` is bit-identical to torchaudio also for beams > 1).
    ``max_slots``: predictor rows kept per stream before the cache is rebuilt from the beam.
    ``numpy_search``: when the predictor and joiner run in ONNX Runtime (``session`` attributes),
    search in numpy on those sessions (:mod:`dse.core.ort_search`): greedy search without an LM
    in :class:`~dse.core.ort_search.OrtGreedy`'s loop (the torch-free runtime's), everything else
    in :class:`~dse.core.ort_search.OrtBeamSearch`; ``False`` keeps this module's torch loops.
    """

    def __init__(self, model, blank: int, temperature: float = 1.0, step_max_tokens: int = 100,
                 lm=None, lm_weight: float = 0.0, symbols: Optional[Sequence[str]] = None,
                 cache_predictor: bool = True, max_slots: int = 2048, numpy_search: bool = True):
        super().__init__()
        self.model = model
        self.blank = blank
        self.temperature = temperature
        self.step_max_tokens = step_max_tokens
        self.lm = lm
        self.lm_weight = float(lm_weight) if lm is not None else 0.0
        self.cache_predictor = cache_predictor
        self.max_slots = max_slots
        self._lm: Optional[LMRows] = None
        if lm is not None and self.lm_weight != 0.0:
            symbols = list(lm.symbols if symbols is None else symbols)
            if len(symbols) != blank:
                raise ValueError(f"LM fusion needs the blank to be the last token: {len(symbols)} symbols, "
                                 f"blank={blank}")
            self._lm = LMRows(lm, symbols, blank, self.lm_weight)
        self._ones_cache: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._store: Optional[_Store] = None
        # search over an ONNX Runtime predictor and joiner: the numpy loops of dse.core.ort_search
        self._ort_greedy = self._ort_beam = None
        predictor, joiner = getattr(model, "predictor", None), getattr(model, "joiner", None)
        if numpy_search and hasattr(predictor, "session") and hasattr(joiner, "session"):
            if greedy_applies(1, self._lm):
                self._ort_greedy = OrtGreedy(predictor.session, joiner.session, blank, temperature=temperature,
                                             step_max_tokens=step_max_tokens)
            self._ort_beam = OrtBeamSearch(predictor.session, joiner.session, blank, temperature=temperature,
                                           step_max_tokens=step_max_tokens, lm=self._lm,
                                           cache_predictor=cache_predictor, max_slots=max_slots)

    @classmethod
    def from_tokenizer(cls, model, tokenizer, temperature: float = 1.0, lm=None, lm_weight: float = 0.0,
                       **kwargs) -> "FastRNNTSearch":
        """The decoder ``StreamingRecognizer`` wants: fused when ``lm`` is given and ``lm_weight`` is not 0."""
        symbols = getattr(tokenizer, "symbols", None)
        if lm is not None and lm_weight and symbols is None:
            from dse.core.errors import DSEError

            raise DSEError("LM fusion needs a character tokenizer; this model's tokenizer is "
                           f"{getattr(tokenizer, 'kind', type(tokenizer).__name__)!r}")
        return cls(model, tokenizer.blank, temperature=temperature, lm=lm, lm_weight=lm_weight,
                   symbols=symbols, **kwargs)

    # -- the torchaudio interface ----------------------------------------------------------
    @staticmethod
    def _check(input: torch.Tensor, length: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if input.dim() != 2 and not (input.dim() == 3 and input.shape[0] == 1):
            raise ValueError("input must be of shape (T, D) or (1, T, D)")
        if input.dim() == 2:
            input = input.unsqueeze(0)
        if length.shape != () and length.shape != (1,):
            raise ValueError("length must be of shape () or (1,)")
        if length.dim() == 0:
            length = length.unsqueeze(0)
        return input, length

    def forward(self, input: torch.Tensor, length: torch.Tensor, beam_width: int) -> List[Hypothesis]:
        """Offline search over a whole sequence (``RNNTBeamSearch.forward``)."""
        input, length = self._check(input, length)
        enc_out, _ = self.model.transcribe(input, length)
        return self._search(enc_out, None, beam_width)

    def infer(self, input: torch.Tensor, length: torch.Tensor, beam_width: int,
              state: Optional[List[List[torch.Tensor]]] = None,
              hypothesis: Optional[List[Hypothesis]] = None) -> Tuple[List[Hypothesis], List[List[torch.Tensor]]]:
        """One streaming chunk (``RNNTBeamSearch.infer``): the best ``beam_width`` hypotheses and the encoder state."""
        input, length = self._check(input, length)
        enc_out, _, state = self.model.transcribe_streaming(input, length, state)
        return self._search(enc_out, hypothesis, beam_width), state

    # -- the search ----------------------------------------------------------------------------
    def _ones(self, n: int, device: torch.device) -> torch.Tensor:
        t = self._ones_cache.get((n, device))
        if t is None:
            with torch.inference_mode():
                t = self._ones_cache[(n, device)] = torch.tensor([1] * n, device=device)
        return t

    def _new_store(self, pred, states) -> _Store:
        if self._lm is not None:
            self._lm.trim()
        return _Store(self._lm, pred, states)

    def _seed(self, hypothesis: Optional[List[Hypothesis]], device: torch.device):
        """The store for this search and the hypotheses it starts from, as ``(key, slot, score)``."""
        if hypothesis is None:
            self._store = None
            pred, _, states = self.model.predict(torch.tensor([[self.blank]], device=device), self._ones(1, device),
                                                 None)
            store = self._new_store(pred, states)
            seeds = [(store.intern((self.blank,)), 0, 0.0)]
        else:
            store = self._store if self.cache_predictor else None
            if store is not None and (store.used > self.max_slots or store.device != device):
                store = None
            found: List[Optional[int]] = []
            if store is not None:
                for h in hypothesis:
                    key = store.key_of.get(tuple(h[0]))
                    found.append(None if key is None or store.slot_of[key] < 0 else key)
            missing = [h for h, key in zip(hypothesis, found) if key is None] if store is not None else hypothesis
            if store is None:
                store = self._new_store(*_stack_hypotheses(hypothesis))
                seeds = [(store.intern(tuple(h[0])), i, h[3]) for i, h in enumerate(hypothesis)]
            else:
                first = store.append(*_stack_hypotheses(missing)) if missing else store.used
                seeds = []
                for h, key in zip(hypothesis, found):
                    if key is None:
                        key = store.intern(tuple(h[0]))
                        slot = first
                        first += 1
                    else:
                        slot = store.slot_of[key]
                    seeds.append((key, slot, h[3]))
        if self.cache_predictor:
            for key, slot, _ in seeds:
                store.slot_of[key] = slot
            self._store = store
        return store, seeds

    def _search(self, enc_out: torch.Tensor, hypothesis: Optional[List[Hypothesis]],
                beam_width: int) -> List[Hypothesis]:
        with torch.inference_mode():
            greedy = beam_width == 1 and (hypothesis is None or len(hypothesis) == 1)
            if greedy and self._ort_greedy is not None:
                return self._search_ort(self._ort_greedy, enc_out, hypothesis, beam_width)
            if self._ort_beam is not None:
                return self._search_ort(self._ort_beam, enc_out, hypothesis, beam_width)
            if greedy:
                return self._greedy_impl(enc_out, hypothesis)
            return self._search_impl(enc_out, hypothesis, beam_width)

    def _log_probs(self, enc_t: torch.Tensor, pred: torch.Tensor, lm_rows: Optional[List[int]]) -> torch.Tensor:
        """``(n, V)`` scores of the next token for ``n`` hypotheses (predictor outputs ``pred``) at one
        frame: torchaudio's ``_gen_next_token_probs`` (log-softmax of the joiner's output over the
        temperature), plus the weighted LM rows as ``FusedBeamSearch`` adds them, on the CPU."""
        device = enc_t.device
        joined, _, _ = self.model.join(enc_t, self._ones(1, device), pred, self._ones(pred.shape[0], device))
        probs = torch.nn.functional.log_softmax(joined / self.temperature, dim=3)[:, 0, 0]
        if lm_rows is not None:
            probs = probs.float()
            probs[:, :self.blank] += self._lm.gather(lm_rows).to(probs.device)
        return probs.cpu()

    def _greedy_impl(self, enc_out: torch.Tensor, hypothesis: Optional[List[Hypothesis]]) -> List[Hypothesis]:
        """:meth:`_search_impl` at beam width 1, with its bookkeeping cut to what one hypothesis needs.

        The operations that decide the search are the same, on tensors of the same shapes and
        values (the joiner and predictor calls, the float32 score sums, ``topk`` over the
        non-blank scores, the end-of-frame sort and ``topk`` of length-normalised scores), so the
        result is bit-identical; what goes is the list machinery. At beam 1 the ``a`` set is one
        hypothesis, each expansion is a longer token sequence than every ``b`` hypothesis of the
        frame (so nothing merges), and the threshold, the best ``b`` score, is a running maximum.
        Predictor rows and states are read as slices of the store instead of gathered.
        """
        model = self.model
        device = enc_out.device
        step_max_tokens = self.step_max_tokens
        cache = self.cache_predictor
        lm = self._lm
        one = self._ones(1, device)

        store, seeds = self._seed(hypothesis, device)
        tokens_of, slot_of, lm_row_of = store.tokens_of, store.slot_of, store.lm_row_of
        best = seeds[0]
        for t in range(enc_out.shape[1]):
            enc_t = enc_out[:, t: t + 1]
            key, slot, score = best
            b_hypos = []
            threshold = -float("inf")
            symbols_current_t = 0
            while True:
                probs = self._log_probs(enc_t, store.pred[slot: slot + 1], [lm_row_of[key]] if lm is not None else None)
                hypo_score = torch.tensor([score])
                if hypo_score.dtype == probs.dtype:
                    total = hypo_score.unsqueeze(1) + probs
                    blank_score, nonblank = float(total[0, -1]), total[:, :-1]
                else:  # as in _search_impl: bf16, fp16 or fp64 models
                    blank_score = float(torch.tensor([score], dtype=probs.dtype) + probs[0, -1])
                    nonblank = hypo_score.unsqueeze(1) + probs[:, :-1]
                b_hypos.append((key, slot, blank_score))
                threshold = max(threshold, blank_score)
                if symbols_current_t == step_max_tokens:
                    break
                top_score, top_idx = nonblank.reshape(-1).topk(1)
                top_score = float(top_score)
                if not top_score > threshold:
                    break
                token, parent = int(top_idx), slot
                key = store.child(key, token)
                slot = slot_of[key] if cache else -1
                if slot < 0:
                    out, _, out_state = model.predict(torch.tensor([[token]], device=device), one,
                                                      [[buf[parent: parent + 1] for buf in layer]
                                                       for layer in store.states])
                    slot = slot_of[key] = store.append(out, out_state)
                score = top_score
                symbols_current_t += 1
            # the frame's best by length-normalised score, over the b set in _search_impl's order
            order = torch.tensor([h[2] for h in b_hypos]).sort()[1].tolist()
            b_hypos = [b_hypos[i] for i in order]
            norm = torch.tensor([h[2] / (len(tokens_of[h[0]]) + 1) for h in b_hypos])
            best = b_hypos[int(norm.topk(1)[1])]
        key, slot, score = best
        return [(list(tokens_of[key]), store.pred[slot: slot + 1][0].clone(),
                 [[buf[slot: slot + 1].clone() for buf in layer] for layer in store.states], score)]

    @staticmethod
    def _search_ort(search, enc_out: torch.Tensor, hypothesis: Optional[List[Hypothesis]],
                    beam_width: int) -> LazyHypotheses:
        """The search when the predictor and joiner run in ONNX Runtime: ``search`` is
        :class:`dse.core.ort_search.OrtGreedy` (greedy without an LM, the torch-free runtime's loop too)
        or :class:`~dse.core.ort_search.OrtBeamSearch`. The beam it returned is carried in its own
        arrays; one from elsewhere (torchaudio's layout, or another search's) is converted."""
        if hypothesis is None:
            state = None  # advance starts a stream
        elif isinstance(hypothesis, LazyHypotheses) and hypothesis.owner is search:
            state = hypothesis.state
        else:
            state = search.state_from([_from_hypothesis(h) for h in hypothesis])
        state = search.advance(state, enc_out.detach().float().contiguous().numpy(), beam_width)
        return LazyHypotheses(search, state)

    def _search_impl(self, enc_out: torch.Tensor, hypothesis: Optional[List[Hypothesis]],
                     beam_width: int) -> List[Hypothesis]:
        model = self.model
        device = enc_out.device
        step_max_tokens = self.step_max_tokens
        cache = self.cache_predictor
        lm = self._lm
        minus_inf = -float("inf")

        store, b_hypos = self._seed(hypothesis, device)
        tokens_of, lm_row_of = store.tokens_of, store.lm_row_of

        for t in range(enc_out.shape[1]):
            enc_t = enc_out[:, t: t + 1]
            a_hypos = b_hypos
            b_hypos = []
            b_of_key: Dict[int, tuple] = {}
            symbols_current_t = 0

            while a_hypos:
                # -- one joiner call over every a hypothesis (torchaudio's _gen_next_token_probs)
                slots = torch.tensor([h[1] for h in a_hypos], device=device)
                probs = self._log_probs(enc_t, store.pred.index_select(0, slots),
                                        [lm_row_of[h[0]] for h in a_hypos] if lm is not None else None)

                # -- blank extensions, merged by key (torchaudio's _gen_b_hypos)
                scores = [h[2] for h in a_hypos]
                hypo_scores = torch.tensor(scores)
                if hypo_scores.dtype == probs.dtype:
                    total = hypo_scores.unsqueeze(1) + probs
                    blank_scores, nonblank = total[:, -1], total[:, :-1]
                else:
                    # torchaudio's ``float + 0-dim tensor`` casts the float to the tensor's dtype
                    # (bf16, fp16 or fp64 models), its ``tensor(scores) + probs`` promotes.
                    blank_scores = torch.tensor(scores, dtype=probs.dtype) + probs[:, -1]
                    nonblank = hypo_scores.unsqueeze(1) + probs[:, :-1]
                blank_list = blank_scores.tolist()
                for i, h in enumerate(a_hypos):
                    key = h[0]
                    old = b_of_key.get(key)
                    if old is None:
                        score = blank_list[i]
                    else:
                        b_hypos.remove(old)
                        score = float(torch.tensor(old[2]).logaddexp(blank_scores[i]))
                    new = (key, h[1], score)
                    b_hypos.append(new)
                    b_of_key[key] = new
                order = torch.tensor([h[2] for h in b_hypos]).sort()[1].tolist()
                b_hypos = [b_hypos[i] for i in order]

                if symbols_current_t == step_max_tokens:
                    break

                # -- top non-blank expansions beating the beam_width-th blank score (_gen_a_hypos)
                width = nonblank.shape[1]
                best_scores, best_idx = nonblank.reshape(-1).topk(beam_width)
                threshold = b_hypos[-beam_width][2] if len(b_hypos) >= beam_width else minus_inf
                expansions, todo = store.expansions(a_hypos, best_idx.tolist(), best_scores.tolist(), width,
                                                    threshold, cache)
                if not expansions:
                    break

                # -- one predictor call over the expansions not yet computed (_gen_new_hypos)
                if todo:
                    base = torch.tensor([x[1] for x in todo], device=device)
                    out, _, out_state = model.predict(torch.tensor([[x[2]] for x in todo], device=device),
                                                      self._ones(len(todo), device), store.gather_states(base))
                    store.place(expansions, todo, store.append(out, out_state))
                a_hypos = [tuple(e) for e in expansions]
                symbols_current_t += 1

            # -- the beam: best by length-normalised score (_default_hypo_sort_key)
            norm = torch.tensor([h[2] / (len(tokens_of[h[0]]) + 1) for h in b_hypos])
            b_hypos = [b_hypos[i] for i in norm.topk(beam_width)[1].tolist()]

        # torchaudio tuples; their tensors are views of compact copies, not of the store.
        sel = torch.tensor([h[1] for h in b_hypos], device=device)
        pred_out = store.pred.index_select(0, sel)
        states = store.gather_states(sel)
        return [(list(tokens_of[h[0]]), pred_out[i], [[s[i: i + 1] for s in layer] for layer in states], h[2])
                for i, h in enumerate(b_hypos)]
