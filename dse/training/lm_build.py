"""Build and score character n-gram language models: ``python -m dse.lm build|score``.

The model and its fusion into the beam search live in :mod:`dse.core.lm`; this module
gathers the texts (the fortune sentences that hold no shipped eval or adapt sentence,
or any manifest or text file) and writes the ``.lm.gz`` file.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from dse.core.errors import DSEError, cli_error
from dse.core.lm import CharNgramLM
from dse.training.corpus import load_sentences, normalise_text, shipped_texts


def default_texts() -> list[str]:
    """Every fortune sentence, of any length, that holds no shipped eval or adapt sentence.

    More than the acoustic training sentences (which keep 4 to 14 words of common
    vocabulary, for the voices' sake): the language model reads text only, so longer and
    shorter sentences count too. A sentence that contains an eval or adapt sentence as a
    run of words is left out, not only an exact copy.
    """
    held_eval, held_adapt = shipped_texts()
    # A held sentence can only occur where its first word does: index them by it.
    by_first: dict[str, list[str]] = collections.defaultdict(list)
    for h in held_eval | held_adapt:
        by_first[h.split()[0]].append(f" {h} ")

    def holds_held(sentence: str) -> bool:
        padded = f" {sentence} "
        return any(h in padded for w in set(sentence.split()) for h in by_first.get(w, ()))

    return [s for s in load_sentences(min_words=1, max_words=10**6, min_word_count=1) if not holds_held(s)]


def read_texts(path: str | os.PathLike) -> list[str]:
    """Sentences from a JSONL manifest (its ``text`` fields) or a plain text file (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise DSEError(f"text source {p} not found")
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    texts.append(normalise_text(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DSEError(f"{p}:{n}: not a manifest line with a 'text' field ({exc})") from exc
        return texts
    return [normalise_text(line) for line in p.read_text(errors="replace").splitlines() if line.strip()]


def main(argv=None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m dse.lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="count texts into a character n-gram model file")
    b.add_argument("--out", required=True, help="output file, e.g. model.lm.gz (beside model.pt to travel with it)")
    b.add_argument("--order", type=int, default=8, help="n-gram order in characters (default 8)")
    b.add_argument("--discount", type=float, default=0.85, help="Kneser-Ney discount in (0, 1) (default 0.85)")
    b.add_argument("--texts", action="append", default=[],
                   help="JSONL manifest or text file (one sentence per line); repeatable. Default: every fortune "
                        "sentence that holds no sentence of the shipped eval and adapt splits")
    sc = sub.add_parser("score", help="bits per character of a model on texts")
    sc.add_argument("lm", help="model file")
    sc.add_argument("texts", nargs="+", help="JSONL manifests or text files")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            from dse.core.models import CharTokenizer

            texts = [t for src in args.texts for t in read_texts(src)] if args.texts else default_texts()
            t0 = time.perf_counter()
            lm = CharNgramLM.train(texts, CharTokenizer().symbols, order=args.order, discount=args.discount)
            lm.save(args.out)
            size_kib = Path(args.out).stat().st_size / 1024
            print(f"{args.out}: order {args.order}, {len(texts)} sentences, "
                  f"{sum(len(f) for t in lm.tables for f in t.values())} n-grams, {size_kib:.0f} KiB, "
                  f"{time.perf_counter() - t0:.1f} s")
        else:
            lm = CharNgramLM.load(args.lm)
            texts = [t for src in args.texts for t in read_texts(src)]
            print(f"{args.lm}: {lm.bits_per_char(texts):.3f} bits per character over {len(texts)} sentences")
    except DSEError as exc:
        return cli_error(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
