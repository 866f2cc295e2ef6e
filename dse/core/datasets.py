"""Eval sets: JSONL manifests and LibriSpeech-style directories.

Manifest format, one JSON object per line::

    {"path": "eval/0001.ogg", "duration": 2.84, "text": "the cat sat", "slice": "espeak"}

``path`` may be relative: it resolves against the manifest's own folder.
``duration`` is in seconds. ``slice`` (optional) names a subset reported separately.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from dse.core.errors import DatasetError


@dataclasses.dataclass(frozen=True)
class Utterance:
    id: str
    path: Path
    text: str
    duration_s: Optional[float] = None
    slice: str = "all"


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """Parse a JSONL manifest; errors name the file, the line and the problem."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: manifest not found")
    base = path.parent
    utterances = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "path" not in row or "text" not in row:
                raise DatasetError(f"{path}:{lineno}: each line needs the keys 'path' and 'text', got {row!r:.80}")
            audio = Path(row["path"])
            if not audio.is_absolute():
                audio = base / audio
            utterances.append(Utterance(
                id=str(row.get("id", Path(row["path"]).stem)), path=audio, text=str(row["text"]),
                duration_s=row.get("duration"), slice=str(row.get("slice", "all"))))
    if not utterances:
        raise DatasetError(f"{path}: manifest has no utterances")
    return utterances


def write_manifest(path: str | os.PathLike, utterances: list[Utterance]) -> None:
    """Write ``utterances`` as JSONL, with paths relative to the manifest's folder where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for u in utterances:
            try:
                rel = os.path.relpath(u.path, path.parent)
            except ValueError:
                rel = str(u.path)
            row = {"id": u.id, "path": rel, "duration": u.duration_s, "text": u.text, "slice": u.slice}
            f.write(json.dumps(row) + "\n")


def read_librispeech(root: str | os.PathLike) -> list[Utterance]:
    """Read a LibriSpeech-layout directory: ``<root>/<speaker>/<chapter>/<s>-<c>.trans.txt`` + ``.flac``.

    ``root`` may be ``LibriSpeech/test-clean`` or any folder above the transcripts.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    utterances = []
    for trans in sorted(root.rglob("*.trans.txt")):
        with open(trans, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().split(" ", 1)
                utt_id, text = parts[0], (parts[1] if len(parts) > 1 else "")
                audio = trans.parent / f"{utt_id}.flac"
                utterances.append(Utterance(id=utt_id, path=audio, text=text.lower(), slice=root.name))
    if not utterances:
        raise DatasetError(f"{root}: no *.trans.txt transcripts found below this directory")
    return utterances


def load_eval_set(source: str | os.PathLike) -> list[Utterance]:
    """A manifest file (``.jsonl``/``.json``) or a LibriSpeech-style directory."""
    source = Path(source)
    if source.is_dir():
        manifest = source / "manifest.jsonl"
        return read_manifest(manifest) if manifest.exists() else read_librispeech(source)
    if source.suffix in (".jsonl", ".json"):
        return read_manifest(source)
    if not source.exists():
        raise DatasetError(f"{source}: eval set not found (expected a .jsonl manifest or a LibriSpeech directory)")
    raise DatasetError(f"{source}: expected a .jsonl manifest or a LibriSpeech directory")


def iter_checked(utterances: list[Utterance], read) -> Iterator[tuple[Utterance, object, Optional[str]]]:
    """Yield ``(utterance, audio_or_None, problem_or_None)`` for each utterance.

    ``read`` loads an utterance's audio and raises a :class:`~dse.core.errors.DSEError` on a bad
    file. A bad utterance is yielded with its problem instead of its audio, so a batch
    evaluation reports it and goes on with the rest.
    """
    from dse.core.errors import DSEError

    for utt in utterances:
        if not utt.text.strip():
            yield utt, None, f"{utt.path}: zero-length transcript"
            continue
        try:
            yield utt, read(utt.path), None
        except DSEError as exc:
            yield utt, None, str(exc)
