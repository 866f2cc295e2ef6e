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

import collections
import gzip
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torchaudio.models import RNNTBeamSearch

from dse.core.errors import DSEError, ModelLoadError

FORMAT = "dse-char-ngram"
VERSION = 1
START = "\x02"  # history padding before the first character
END = "\n"      # end of sentence


class CharNgramLM:
    """``P(char | previous order-1 chars)`` over ``symbols`` plus the end mark.

    ``tables[k - 1]`` maps a history of ``k - 1`` characters to ``{char: count}``.
    """

    def __init__(self, order: int, symbols: Sequence[str], tables: list[dict[str, dict[str, int]]],
                 discount: float = 0.75, info: Optional[dict] = None):
        if order < 1:
            raise DSEError(f"order={order} must be at least 1")
        if not 0.0 < discount < 1.0:
            raise DSEError(f"discount={discount} must be in (0, 1)")
        if len(tables) != order:
            raise DSEError(f"{len(tables)} count tables for an order-{order} model; expected {order}")
        self.order = order
        self.symbols = list(symbols)
        self.vocab = self.symbols + [END]
        self._index = {c: i for i, c in enumerate(self.vocab)}
        self.discount = discount
        self.tables = tables
        self.info = dict(info or {})
        # Per history: (total count, number of distinct followers).
        self._totals = [{h: (sum(f.values()), len(f)) for h, f in table.items()} for table in tables]
        self._cache: dict[str, torch.Tensor] = {}

    # -- building -----------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], symbols: Sequence[str], order: int = 6,
              discount: float = 0.75) -> "CharNgramLM":
        """Count ``texts`` (normalised sentences; characters outside ``symbols`` are dropped)."""
        allowed = set(symbols)
        top: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        digest = hashlib.sha256()
        n_texts = 0
        for text in texts:
            n_texts += 1
            digest.update(text.encode() + b"\n")
            s = START * (order - 1) + "".join(c for c in text if c in allowed) + END
            for i in range(order - 1, len(s)):
                top[s[i - order + 1:i]][s[i]] += 1
        tables: list[dict[str, dict[str, int]]] = [dict() for _ in range(order)]
        tables[order - 1] = {h: dict(f) for h, f in top.items()}
        # Continuation counts: order k counts the distinct one-longer histories seen before (h, c).
        for k in range(order - 1, 0, -1):
            cont: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for h, followers in tables[k].items():
                for c in followers:
                    cont[h[1:]][c] += 1
            tables[k - 1] = {h: dict(f) for h, f in cont.items()}
        if not tables[0]:
            raise DSEError("no text to train the language model on")
        return cls(order, symbols, tables, discount,
                   info={"texts": n_texts, "sha256_of_texts": digest.hexdigest()})

    # -- queries ------------------------------------------------------------------------
    def columns(self, symbols: Sequence[str]) -> torch.Tensor:
        """Positions of ``symbols`` in :meth:`distribution`'s output; every symbol must be covered."""
        missing = [s for s in symbols if s not in self._index]
        if missing:
            raise DSEError(f"the language model does not cover the symbols {missing!r}")
        return torch.tensor([self._index[s] for s in symbols])

    def distribution(self, history: str) -> torch.Tensor:
        """Log-probabilities ``(len(symbols) + 1,)`` of each symbol, then the end mark, after ``history``."""
        h = (START * (self.order - 1) + history)[-(self.order - 1):] if self.order > 1 else ""
        cached = self._cache.get(h)
        if cached is None:
            cached = torch.tensor([math.log(p) for p in self._probabilities(h)])
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[h] = cached
        return cached

    def _probabilities(self, history: str) -> list[float]:
        probs = [1.0 / len(self.vocab)] * len(self.vocab)
        for k in range(1, self.order + 1):
            h = history[len(history) - (k - 1):] if k > 1 else ""
            followers = self.tables[k - 1].get(h)
            if not followers:
                continue
            total, distinct = self._totals[k - 1][h]
            backoff = self.discount * distinct / total
            new = [backoff * p for p in probs]
            for c, n in followers.items():
                i = self._index.get(c)
                if i is not None:
                    new[i] += max(n - self.discount, 0.0) / total
            probs = new
        return probs

    def log_prob(self, text: str) -> float:
        """Natural-log probability of a whole sentence, end mark included."""
        total, history = 0.0, ""
        for c in text + END:
            i = self._index.get(c)
            if i is None:
                continue
            total += float(self.distribution(history)[i])
            history += c if c != END else ""
        return total

    def bits_per_char(self, texts: Sequence[str]) -> float:
        """Cross-entropy in bits per character (end marks counted) over ``texts``."""
        chars = sum(len([c for c in t if c in self._index]) + 1 for t in texts)
        return -sum(self.log_prob(t) for t in texts) / chars / math.log(2)

    # -- files --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": VERSION, "order": self.order, "discount": self.discount,
                  "symbols": self.symbols, **self.info}
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as fh:
            fh.write(json.dumps(header) + "\n")
            for k, table in enumerate(self.tables, start=1):
                for h in sorted(table):
                    for c in sorted(table[h]):
                        fh.write(f"{k}\t{_escape(h)}\t{_escape(c)}\t{table[h][c]}\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharNgramLM":
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"language model {path} does not exist")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                header = json.loads(fh.readline())
                if header.get("format") != FORMAT:
                    raise ModelLoadError(f"{path} is not a character n-gram model (format {header.get('format')!r})")
                if header.get("version") != VERSION:
                    raise ModelLoadError(f"{path}: version {header.get('version')!r}, this code reads {VERSION}")
                order = int(header["order"])
                tables: list[dict[str, dict[str, int]]] = [dict() for _ in range(order)]
                for line in fh:
                    k, h, c, n = line.rstrip("\n").split("\t")
                    tables[int(k) - 1].setdefault(_unescape(h), {})[_unescape(c)] = int(n)
        except (OSError, EOFError, ValueError, KeyError, IndexError) as exc:
            raise ModelLoadError(f"{path}: unreadable language model ({exc})") from exc
        info = {k: v for k, v in header.items() if k not in ("format", "version", "order", "discount", "symbols")}
        return cls(order, header["symbols"], tables, float(header["discount"]), info)


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


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
