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

from dse.core.errors import DSEError, cli_error, not_empty
from dse.core.files import check_creatable
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
    p = Path(not_empty(path, "a text source", "a JSONL manifest or a text file"))
    if p.is_dir():
        raise DSEError(f"text source {p} is a directory; give a JSONL manifest or a text file")
    if not p.is_file():
        raise DSEError(f"text source {p} not found")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DSEError(f"text source {p} is not UTF-8 text (byte {exc.start}); give a JSONL manifest or a text "
                       "file") from None
    except OSError as exc:
        raise DSEError(f"text source {p}: {exc.strerror}") from None
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(normalise_text(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DSEError(f"{p}:{n}: not a manifest line with a 'text' field ({exc})") from exc
        return texts
    return [normalise_text(line) for line in content.splitlines() if line.strip()]


def check_out(out: str, force: bool) -> None:
    """Refuse an ``--out`` the build cannot or must not write: an empty path, a folder, a file
    under a file, or an existing file unless ``force`` (and then only a language model)."""
    path = Path(not_empty(out, "--out", "the language model file to write, e.g. my.lm.gz"))
    if path.is_dir():
        raise DSEError(f"--out {path} is a directory; give a file, e.g. {path / 'model.lm.gz'}")
    check_creatable(path, "--out")
    if path.exists():
        if not force:
            raise DSEError(f"--out {path} exists; pass --force to replace it, or choose another path")
        if not _is_lm_file(path):
            raise DSEError(f"--out {path} is not a dse language model; --force replaces only one: choose "
                           "another path")


def _is_lm_file(path: Path) -> bool:
    """Whether ``path`` starts as a language model file does (its header; any version)."""
    import gzip

    from dse.core.ngram import FORMAT

    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return json.loads(fh.readline()).get("format") == FORMAT
    except (OSError, EOFError, ValueError, AttributeError):
        return False


def main(argv=None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m dse.lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="count texts into a character n-gram model file")
    b.add_argument("--out", required=True, help="output file, e.g. model.lm.gz (beside model.pt to travel with it)")
    b.add_argument("--force", action="store_true", help="replace an existing --out language model (never another "
                                                         "kind of file)")
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

            if args.order < 1:
                raise DSEError(f"--order {args.order}: give 1 or more characters")
            check_out(args.out, args.force)
            texts = [t for src in args.texts for t in read_texts(src)] if args.texts else default_texts()
            if not texts:
                raise DSEError(f"no sentences in {', '.join(args.texts)}; nothing to count")
            t0 = time.perf_counter()
            lm = CharNgramLM.train(texts, CharTokenizer().symbols, order=args.order, discount=args.discount)
            try:
                lm.save(args.out)
            except OSError as exc:  # a folder this user may not write, a full disk
                raise DSEError(f"--out {args.out}: {exc.strerror or exc}") from None
            size_kib = Path(args.out).stat().st_size / 1024
            print(f"{args.out}: order {args.order}, {len(texts)} sentences, "
                  f"{sum(len(f) for t in lm.tables for f in t.values())} n-grams, {size_kib:.0f} KiB, "
                  f"{time.perf_counter() - t0:.1f} s")
        else:
            lm = CharNgramLM.load(args.lm)
            texts = [t for src in args.texts for t in read_texts(src)]
            if not texts:
                raise DSEError(f"no sentences in {', '.join(args.texts)}; nothing to score")
            print(f"{args.lm}: {lm.bits_per_char(texts):.3f} bits per character over {len(texts)} sentences")
    except DSEError as exc:
        return cli_error(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
