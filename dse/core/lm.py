"""A character n-gram language model and its shallow fusion into RNN-T beam search.

The model is interpolated Kneser-Ney over characters: the highest order uses raw
counts, lower orders continuation counts, the lowest is interpolated with a
uniform distribution, so every character has a non-zero probability after any
history. Sentences start with ``order - 1`` start marks and end with an end mark.

Fusion (shallow fusion): while the beam search expands a hypothesis ``y`` by a
non-blank token ``c``, its score gains ``lm_weight * log P_lm(c | y)``; the blank's
score is unchanged. ``lm_weight = 0`` is plain beam search.

File format (``.lm.gz``): gzip of UTF-8 text. The first line is a JSON header
``{"format": "dse-char-ngram", "version": 1, "order": n, "discount": d,
"symbols": [...], "texts": m, "sha256_of_texts": ...}``; each later line is
``k<TAB>history<TAB>char<TAB>count`` for an n-gram of order ``k`` (history has
``k - 1`` characters; raw counts for ``k = order``, continuation counts below).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torchaudio.models import RNNTBeamSearch

from dse.core.errors import DSEError, ModelLoadError
from dse.core.ngram import CharNgramLM


class FusedBeamSearch(RNNTBeamSearch):
    """torchaudio's RNN-T beam search with a character LM's scores added to non-blank tokens.

    ``tokenizer`` must be a character tokenizer whose symbols the LM covers. Token
    scores ``(hypotheses, symbols + 1)``: ``log P_rnnt(c) + lm_weight * log P_lm(c | text
    so far)`` for ``c`` not blank, ``log P_rnnt(blank)`` for the blank.
    """

    def __init__(self, model, tokenizer, lm: CharNgramLM, lm_weight: float, **kwargs):
        super().__init__(model, tokenizer.blank, **kwargs)
        symbols = getattr(tokenizer, "symbols", None)
        if symbols is None:
            raise DSEError("LM fusion needs a character tokenizer; this model's tokenizer is "
                           f"{getattr(tokenizer, 'kind', type(tokenizer).__name__)!r}")
        self.lm = lm
        self.lm_weight = float(lm_weight)
        self._symbols = list(symbols)
        # Column t of the joint output <- LM entry for symbol t (the blank keeps 0).
        self._lm_columns = lm.columns(symbols)
        self._context = max(0, lm.order - 1)
        self._scores: dict[str, torch.Tensor] = {}  # LM history -> weighted scores (symbols,)

    def _lm_scores(self, tokens: list[int]) -> torch.Tensor:
        # Only the last order-1 tokens can matter (the first token of a hypothesis is the
        # blank it starts from), so a long stream costs no more per expansion than a short one.
        tail = tokens[max(0, len(tokens) - self._context):] if self._context else []
        history = "".join(self._symbols[t] for t in tail if t != self.blank)
        scores = self._scores.get(history)
        if scores is None:
            if len(self._scores) > 200_000:
                self._scores.clear()
            scores = self._scores[history] = self.lm_weight * self.lm.distribution(history).index_select(
                0, self._lm_columns)
        return scores

    def _gen_next_token_probs(self, enc_out, hypos, device):
        probs = super()._gen_next_token_probs(enc_out, hypos, device).float()
        probs[:, : self.blank] += torch.stack([self._lm_scores(h[0]) for h in hypos]).to(probs.device)
        return probs


_LOADED: dict[tuple[str, int, int], CharNgramLM] = {}


def load_cached(path: str | os.PathLike) -> CharNgramLM:
    """:meth:`CharNgramLM.load`, once per file version (path, size, mtime) per process."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise ModelLoadError(f"language model {p} does not exist") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = CharNgramLM.load(p)
    return _LOADED[key]
