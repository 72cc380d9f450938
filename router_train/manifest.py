"""The export manifest (`manifest.json`): what a serving process needs besides the weights."""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "router-train"
VERSION = 1
REQUIRED_FILES = ("manifest.json", "estimator.safetensors", "estimator.json")


def read_manifest(directory: str | Path) -> dict:
    """Load and check an export's manifest; clear errors for missing files, other formats and versions."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    missing = [name for name in REQUIRED_FILES if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {directory} is incomplete: missing {missing}; export it again with "
            "`python -m router_train.train` (a complete export has " + ", ".join(REQUIRED_FILES) + ")"
        )
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / 'manifest.json'} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("manifest_version") != VERSION:
        raise ValueError(
            f"{directory / 'manifest.json'}: unknown manifest format {manifest.get('format')!r} version "
            f"{manifest.get('manifest_version')!r}; this router-train reads {FORMAT!r} version {VERSION}"
        )
    for key in ("models", "budgets", "strategies", "max_depth", "kernel"):
        if key not in manifest:
            raise ValueError(f"{directory / 'manifest.json'} lacks the field {key!r}; export it again")
    return manifest
