"""The export manifest (`manifest.json`): what a serving process needs besides the weights, the SHA-256
of every other file of the export and its own SHA-256 (`manifest_sha256`, of its other fields), all
checked at load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "router-train"
VERSION = 2
"""Version 2 added `files` (the checksums); version 1 exports must be exported again."""
ESTIMATOR_FILES = ("estimator.safetensors", "estimator.json")
REQUIRED_FILES = ("manifest.json", *ESTIMATOR_FILES)
REQUIRED_FIELDS = ("models", "budgets", "strategies", "max_depth", "kernel", "files")
SEAL = "manifest_sha256"
"""The manifest's own checksum: a changed byte in manifest.json (a budget, a λ) would silently change
decisions. Manifests written before it was added have none and are read unchecked."""


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksums(directory: str | Path) -> dict[str, str]:
    """SHA-256 of every file in an export directory but manifest.json, by file name."""
    return {p.name: sha256(p) for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != "manifest.json"}


def fields_digest(manifest: dict) -> str:
    """Hex SHA-256 of the manifest's fields but the seal, as canonical JSON (sorted keys, no spaces):
    independent of the file's layout, so it survives a re-indent but not a changed value or key."""
    fields = {key: value for key, value in manifest.items() if key != SEAL}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """`manifest` with its own checksum (`SEAL`), to write as manifest.json."""
    return {**manifest, SEAL: fields_digest(manifest)}


def read_manifest(directory: str | Path) -> dict:
    """Load and check an export's manifest and the checksums of the files it lists; clear errors naming
    the file for missing or changed files, other formats and versions."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    missing = [name for name in REQUIRED_FILES if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {directory} is incomplete: missing {missing}; export it again with "
            "`python -m router_train.train` (a complete export has " + ", ".join(REQUIRED_FILES) + ")"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}; export the checkpoint again") from None
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{path} must hold a JSON object, got a {type(manifest).__name__}; export the checkpoint again"
        )
    if SEAL in manifest and manifest[SEAL] != fields_digest(manifest):
        raise ValueError(
            f"{path} does not match its own SHA-256 ({SEAL}): it was corrupted or edited after export; "
            "restore it or export the checkpoint again"
        )
    if manifest.get("format") != FORMAT or manifest.get("manifest_version") != VERSION:
        raise ValueError(
            f"{path}: unknown manifest format {manifest.get('format')!r} version "
            f"{manifest.get('manifest_version')!r}; this router-train reads {FORMAT!r} version {VERSION}: "
            "export the checkpoint again"
        )
    for key in REQUIRED_FIELDS:
        if key not in manifest:
            raise ValueError(f"{path} lacks the field {key!r}; export it again")
    verify_files(directory, manifest["files"])
    return manifest


def verify_files(directory: Path, files) -> None:
    """Check each listed file of an export against its SHA-256 (a flipped byte silently changes decisions)."""
    where = directory / "manifest.json"
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError(f"{where}: the field 'files' must map file names to SHA-256 hex digests; export it again")
    unlisted = [name for name in ESTIMATOR_FILES if name not in files]
    if unlisted:
        raise ValueError(f"{where}: the field 'files' lacks the checksum of {unlisted}; export it again")
    for name, digest in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{where}: the field 'files' names {name!r}, which is not a file of the export")
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: {where} lists it; copy the whole export or export it again")
        if sha256(file) != digest:
            raise ValueError(
                f"{file} does not match its SHA-256 in {where}: it was corrupted or edited after export; "
                "restore it or export the checkpoint again"
            )
