"""The character n-gram language model (no torch), and the weighted rows its fusion adds.

:class:`CharNgramLM` (its file format and smoothing: :mod:`dse.core.lm`, which also fuses it
into torch's beam search) loads, trains and scores without torch; only :meth:`~CharNgramLM.columns`
and :meth:`~CharNgramLM.distribution` return torch tensors, importing torch when called.
:class:`LMRows` keeps the weighted log-probability rows the vectorised searches add, in numpy,
so the torch-free runtime (:mod:`dse.deploy.lite`) fuses the same LM with the same numbers.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

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
        self._cache: dict = {}  # history -> log-probabilities (float32)
        self._memo: Dict[str, List[float]] = {}  # history suffix -> probabilities after its orders

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
    def column_indices(self, symbols: Sequence[str]) -> list[int]:
        """Positions of ``symbols`` in :meth:`distribution`'s output; every symbol must be covered."""
        missing = [s for s in symbols if s not in self._index]
        if missing:
            raise DSEError(f"the language model does not cover the symbols {missing!r}")
        return [self._index[s] for s in symbols]

    def columns(self, symbols: Sequence[str]):
        """:meth:`column_indices` as a torch tensor."""
        import torch

        return torch.tensor(self.column_indices(symbols))

    def log_probs(self, history: str) -> np.ndarray:
        """Log-probabilities ``(len(symbols) + 1,)`` float32 of each symbol, then the end mark, after
        ``history`` (``math.log`` of the doubles, rounded to float32 once)."""
        h = (START * (self.order - 1) + history)[-(self.order - 1):] if self.order > 1 else ""
        cached = self._cache.get(h)
        if cached is None:
            cached = np.array([math.log(p) for p in self._after(h)], np.float32)
            cached.flags.writeable = False
            if len(self._cache) > self.CACHE_ENTRIES:
                self._cache.clear()
            self._cache[h] = cached
        return cached

    def distribution(self, history: str):
        """:meth:`log_probs` as a float32 torch tensor."""
        import torch

        return torch.tensor(self.log_probs(history))

    CACHE_ENTRIES = 200_000  # full histories whose float32 log-probabilities are kept, then all dropped
    # history suffixes whose probabilities are kept, then all dropped: about 1.06 KB each (sys.getsizeof of
    # key, list and floats; the shipped LM, 12,580 entries; one-off)
    MEMO_ENTRIES = 100_000

    def _after(self, h: str) -> List[float]:
        """Probabilities (doubles) of each symbol and the end mark after the padded history ``h``
        (its last ``order - 1`` characters): interpolated absolute discounting, order by order.

        Order 0 is the uniform distribution; order ``k`` scales order ``k - 1``'s by the backoff
        weight of the history's last ``k - 1`` characters (``discount * distinct followers /
        total``) and adds each follower's ``(count - discount) / total``; a history never seen
        at that order leaves the distribution as it is. The distribution after order ``k``
        depends only on that suffix, so it is memoised per suffix: a new history costs the
        orders of its suffixes not seen yet, usually one. The suffixes not yet memoised are
        computed from the longest one that is, shortest first."""
        memo = self._memo
        probs = memo.get(h)
        if probs is not None:
            return probs
        chain = [h]  # h and its suffixes down to the first one memoised (or "" and the uniform start)
        while True:
            s = chain[-1]
            if not s:
                probs = [1.0 / len(self.vocab)] * len(self.vocab)
                break
            probs = memo.get(s[1:])
            if probs is not None:
                break
            chain.append(s[1:])
        if len(memo) + len(chain) > self.MEMO_ENTRIES:
            memo.clear()
        tables, totals, index, d = self.tables, self._totals, self._index, self.discount
        for s in reversed(chain):
            followers = tables[len(s)].get(s)
            if followers:
                total, distinct = totals[len(s)][s]
                backoff = d * distinct / total
                probs = [backoff * p for p in probs]
                for c, n in followers.items():
                    i = index.get(c)
                    if i is not None and n > d:  # max(n - d, 0) adds nothing otherwise
                        probs[i] += (n - d) / total
            if len(s) < len(h) or not h:  # a full history's row is log_probs' cache
                memo[s] = probs
        return probs

    def log_prob(self, text: str) -> float:
        """Natural-log probability of a whole sentence, end mark included."""
        total, history = 0.0, ""
        for c in text + END:
            i = self._index.get(c)
            if i is None:
                continue
            total += float(self.log_probs(history)[i])
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
        try:
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as fh:
                fh.write(json.dumps(header) + "\n")
                for k, table in enumerate(self.tables, start=1):
                    for h in sorted(table):
                        for c in sorted(table[h]):
                            fh.write(f"{k}\t{_escape(h)}\t{_escape(c)}\t{table[h][c]}\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written file left beside the target
            raise
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


class LMRows:
    """Weighted LM log-prob vectors over the non-blank tokens, one table row per LM history.

    :meth:`row` maps a token sequence to the row of its history (computed once per
    history, kept until the table outgrows ``max_rows``; :meth:`trim` between searches);
    :meth:`rows` returns ``(len(rows), blank)`` float32 in one indexing (:meth:`gather` as a torch
    tensor). A row is ``weight * log P_lm(symbol | history)`` in float32, bit-equal to
    ``FusedBeamSearch``'s scores (``tests/test_decoder.py``). The history of
    a token sequence is ``FusedBeamSearch``'s: the characters of its last ``order - 1``
    tokens, blanks dropped.
    """

    def __init__(self, lm, symbols: Sequence[str], blank: int, weight: float, max_rows: int = 100_000):
        self.lm = lm
        self.symbols = list(symbols)
        self.blank = blank
        self.weight = float(weight)
        self._columns = np.array(lm.column_indices(self.symbols))
        self.context = max(0, lm.order - 1)
        self.max_rows = max_rows
        self._reset()

    def _reset(self) -> None:
        self._row_of: Dict[str, int] = {}
        self._table = np.empty((64, len(self.symbols)), np.float32)
        self._n = 0

    def trim(self) -> None:
        if self._n > self.max_rows:
            self._reset()

    def history(self, tokens: Sequence[int]) -> str:
        if not self.context:
            return ""
        tail = tokens[max(0, len(tokens) - self.context):]
        return "".join([self.symbols[t] for t in tail if t != self.blank])

    def row(self, tokens: Sequence[int]) -> int:
        h = self.history(tokens)
        r = self._row_of.get(h)
        return r if r is not None else self._add(h)

    def _add(self, h: str) -> int:
        r = self._n
        if r == self._table.shape[0]:
            self._table = np.concatenate([self._table, np.empty_like(self._table)])
        # dse.core.decoder.lm_log_probs (FusedBeamSearch's torch arithmetic) in numpy: the same float32
        # products (numpy, as torch, multiplies a float32 array by a Python float in float32)
        self._table[r] = self.weight * self.lm.log_probs(h)[self._columns]
        self._n += 1
        self._row_of[h] = r
        return r

    def rows(self, rows: List[int]) -> np.ndarray:
        """``(len(rows), blank)`` float32: the rows ``rows``."""
        return self._table[rows]

    def gather(self, rows: List[int]):
        """:meth:`rows` as a torch tensor."""
        import torch

        return torch.from_numpy(self._table[rows])
