"""The vocabularies that need no torch: characters and the numbered stand-in of a random model.

:mod:`dse.core.models` adds torchaudio's sentencepiece vocabulary and re-exports these; the
torch-free runtime (:mod:`dse.deploy.lite`) decodes with them, so both runtimes turn the same
tokens into the same text.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["CharTokenizer", "NumberedTokenizer", "from_dict"]


class CharTokenizer:
    """Characters ``symbols[i]`` -> id ``i``; the blank is the last id, ``len(symbols)``."""

    kind = "chars"

    def __init__(self, symbols: Sequence[str] = tuple(" 'abcdefghijklmnopqrstuvwxyz")):
        self.symbols = list(symbols)
        self._index = {s: i for i, s in enumerate(self.symbols)}
        self.blank = len(self.symbols)

    @property
    def num_symbols(self) -> int:
        return len(self.symbols) + 1

    def encode(self, text: str) -> list[int]:
        return [self._index[c] for c in text if c in self._index]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join("".join(self.symbols[i] for i in ids if i < self.blank).split())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "symbols": self.symbols}


class NumberedTokenizer:
    """Stand-in vocabulary of ``n - 1`` anonymous symbols for randomly initialised models."""

    kind = "numbered"

    def __init__(self, num_symbols: int):
        self.blank = num_symbols - 1

    @property
    def num_symbols(self) -> int:
        return self.blank + 1

    def encode(self, text: str) -> list[int]:
        return []

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"<{i}>" for i in ids if i < self.blank)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_symbols": self.num_symbols}


KINDS = ("chars", "numbered")  # what from_dict builds


def from_dict(data: dict) -> Optional[object]:
    """The tokenizer of a ``to_dict()`` form of these kinds, ``None`` for another kind."""
    kind = data.get("kind")
    if kind == "chars":
        return CharTokenizer(data["symbols"])
    if kind == "numbered":
        return NumberedTokenizer(data["num_symbols"])
    return None
