"""A bundle's files, manifest and configuration, read and checked without torch.

The torch runtime (:mod:`dse.deploy.runtime`, which re-exports these names) and the torch-free
one (:mod:`dse.deploy.lite`) both read bundles through this module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dse.core.config import CONFIG_VERSION, TrialConfig
from dse.core.errors import ConfigError, DSEError
from dse.core.files import file_sha256
from dse.core.knobs import KNOBS

BUNDLE_FORMAT = "dse-bundle"
BUNDLE_VERSION = 1

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
FEATURES_FILE = "features.json"
VOCABULARY_FILE = "vocabulary.json"
METRICS_FILE = "metrics.json"
README_FILE = "README.md"
MANIFEST_FILE = "MANIFEST.sha256"
LM_FILE = "lm.lm.gz"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, FEATURES_FILE, VOCABULARY_FILE, METRICS_FILE)

class BundleError(DSEError):
    """A bundle directory is missing, incomplete, altered, or from a newer dse."""


# -- manifest -------------------------------------------------------------------------------
sha256_file = file_sha256


def write_manifest(directory: str | os.PathLike) -> None:
    """Write ``MANIFEST.sha256`` (``sha256sum -c`` format) over every other file in ``directory``."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    lines = [f"{sha256_file(directory / n)}  {n}\n" for n in names]
    (directory / MANIFEST_FILE).write_text("".join(lines))


def read_manifest(directory: str | os.PathLike) -> dict[str, str]:
    """``{name: sha256}`` as ``MANIFEST.sha256`` lists them (its format checked, no file hashed)."""
    manifest = Path(directory) / MANIFEST_FILE
    if not manifest.is_file():
        raise BundleError(f"{manifest}: manifest missing; the bundle is incomplete, export it again")
    listed: dict[str, str] = {}
    for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name or name in ("", ".", ".."):
            raise BundleError(f"{manifest}:{lineno}: expected '<sha256>  <file name>', got {line!r:.100}")
        listed[name] = digest
    return listed


def verify_manifest(directory: str | os.PathLike) -> dict[str, str]:
    """Check every file listed in the manifest; returns ``{name: sha256}``.

    Raises :class:`BundleError` naming the first missing or altered file, or a
    required file the manifest does not list.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    listed = read_manifest(directory)
    for name in REQUIRED_FILES:
        if name not in listed:
            raise BundleError(f"{manifest}: does not list {name}; the bundle is incomplete, export it again")
    for name in listed:
        check_listed(directory, listed, name)
    return listed


def check_listed(directory: Path, listed: dict[str, str], name: str) -> Path:
    """The bundle file ``name``, after checking that the manifest (``listed``, as :func:`read_manifest`
    returns it) lists it and that its SHA-256 matches; raises :class:`BundleError` saying which failed."""
    path = Path(directory) / name
    digest = listed.get(name)
    if digest is None:
        raise BundleError(f"{Path(directory) / MANIFEST_FILE}: does not list {name}; the bundle is incomplete, "
                          "export it again")
    if not path.is_file():
        raise BundleError(f"{path}: file listed in {MANIFEST_FILE} is missing; restore it or export again")
    actual = sha256_file(path)
    if actual != digest:
        raise BundleError(f"{path}: sha256 {actual[:16]}... does not match {MANIFEST_FILE} "
                          f"({digest[:16]}...); the file was altered or corrupted, export again")
    return path


def read_config(directory: str | os.PathLike) -> dict:
    """The bundle's ``config.json`` after checking its format version and the manifest."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: not a bundle directory (make one with python -m dse.export)")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise BundleError(f"{path}: missing; {directory} is not a complete dse bundle")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); the file was altered, export again") from exc
    check_format(config, path)
    verify_manifest(directory)
    return config


def check_format(config, path: Path) -> None:
    """Refuse a parsed ``config.json`` (at ``path``) that is not a dse bundle's, or of a newer format."""
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a dse bundle config (expected format={BUNDLE_FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: format_version={version!r} is not an integer")
    if version > BUNDLE_VERSION:
        raise BundleError(f"{path.parent}: bundle format version {version} is newer than this dse reads "
                          f"(up to {BUNDLE_VERSION}); upgrade dse")


def read_json(directory: str | os.PathLike, name: str) -> dict:
    """A JSON file of a bundle whose manifest has been checked (see :func:`read_config`)."""
    path = Path(directory) / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from exc


def trial_config(directory: Path, config: dict) -> TrialConfig:
    """The bundle's trial configuration, resolved (geometry as the bundle's architecture holds it).

    A configuration from a newer dse (a higher config version, or a knob this dse does not
    know) is refused: it may hold a setting this version would silently ignore."""
    raw = config.get("trial_config")
    if not isinstance(raw, dict):
        raise BundleError(f"{directory / CONFIG_FILE}: trial_config is missing or not an object; export again")
    version = raw.get("version", CONFIG_VERSION)
    if isinstance(version, int) and version > CONFIG_VERSION:
        raise BundleError(f"{directory}: made by a newer dse (config version {version}); upgrade dse "
                          f"(this one reads config versions up to {CONFIG_VERSION})")
    unknown = sorted(set(raw) - set(KNOBS) - {"version"})
    if unknown:
        raise BundleError(f"{directory}: made by a newer dse (config version {version}, unknown knob(s) "
                          f"{', '.join(unknown)}); upgrade dse, or export the bundle again if config.json was edited")
    try:
        trial = TrialConfig.from_dict(raw)
    except ConfigError as exc:
        raise BundleError(f"{directory}: made by a newer dse or altered ({exc}); upgrade dse or export again") from None
    arch = config["architecture"]
    return trial.replace(right_context_frames=arch["right_context_length"], segment_frames=arch["segment_length"])
