"""Reading the JSON manifest that every loramerge artifact directory (basis, twin bundle) carries."""

from __future__ import annotations

import json
from pathlib import Path

from loramerge.errors import AdapterLoadError


def read_manifest(path: Path, manifest_name: str, fmt: str, version: int, *, what: str, verb: str) -> dict:
    """Load and check ``path/manifest_name``: present, valid JSON, of format ``fmt``, not newer than ``version``.

    ``what`` names the artifact in messages ("basis directory"); ``verb`` is the command that writes it.
    """
    manifest_path = path / manifest_name
    fix = f"point at a directory written by `loramerge {verb}`, or rebuild it"
    if not manifest_path.is_file():
        raise AdapterLoadError(f"not a {what}: {manifest_name} is missing", path=str(path), fix=fix)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{manifest_name} is not valid JSON: {exc}", path=str(manifest_path), fix=fix) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise AdapterLoadError(f"{manifest_name} is not a {fmt} manifest", path=str(manifest_path), fix=fix)
    if manifest.get("format_version", 0) > version:
        raise AdapterLoadError(f"{what} format version {manifest['format_version']} is newer than this loramerge "
                               f"reads ({version})", path=str(manifest_path), fix="upgrade loramerge")
    return manifest
