"""Content digests of files, and whether an output path can be written (torch-free: the
bundle runtime without torch uses it too)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dse.core.errors import DSEError


def check_creatable(path: Path, flag: str) -> None:
    """Refuse an output ``path`` (given as ``flag``) that cannot be created: one under a file, or
    in a folder this user may not write. An existing ``path`` is the caller's to judge."""
    path = Path(path).absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if ancestor == path:
        return
    if not ancestor.is_dir():
        raise DSEError(f"{flag} {path}: {ancestor} is not a folder; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DSEError(f"{flag} {path}: this user may not write in {ancestor}; choose another path")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
