"""Router artifacts on disk: ``router.json`` (kind, adapter names, config) + ``router.safetensors``.

Every router (per-request or per-token) saves through here, written to a temporary directory and
renamed into place, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge import __version__
from loramerge.errors import AdapterLoadError
from loramerge.io.writer import atomic_directory, check_output_path

FORMAT = "loramerge-router"
FORMAT_VERSION = 1
CONFIG_FILE = "router.json"
TENSORS_FILE = "router.safetensors"


@dataclass
class RouterArtifact:
    """What a router directory holds."""

    kind: str
    adapter_names: list[str]
    config: dict
    tensors: dict[str, torch.Tensor]
    path: Path | None = None


def save_artifact(directory: str | Path, artifact: RouterArtifact, *, force: bool = False) -> Path:
    """Write ``router.json`` and ``router.safetensors`` atomically."""
    from safetensors.torch import save_file

    out = check_output_path(Path(directory), force=force)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "loramerge_version": __version__,
        "kind": artifact.kind, "adapter_names": list(artifact.adapter_names), "config": artifact.config,
        "tensors": sorted(artifact.tensors),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in artifact.tensors.items()}
    with atomic_directory(out, force=force) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt", "kind": artifact.kind})
    return out


def read_artifact(directory: str | Path) -> RouterArtifact:
    """Read a router directory; every failure names the file and the fix."""
    path = Path(directory)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterLoadError(f"not a router artifact: {CONFIG_FILE} is missing", path=str(path),
                               fix="point at a directory written by Router.save or `loramerge route train`")
    try:
        manifest = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{CONFIG_FILE} is not valid JSON: {exc}", path=str(cfg_path),
                               fix="re-create the router artifact") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterLoadError(f"{CONFIG_FILE} is not a loramerge router manifest", path=str(cfg_path),
                               fix="re-create the router artifact")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise AdapterLoadError(f"router format version {manifest['format_version']} is newer than this loramerge",
                               path=str(cfg_path), fix="upgrade loramerge")
    tensors: dict[str, torch.Tensor] = {}
    if manifest.get("tensors"):
        from safetensors.torch import load_file

        st_path = path / TENSORS_FILE
        try:
            tensors = load_file(str(st_path))
        except Exception as exc:
            raise AdapterLoadError(f"could not read the router weights: {exc}", path=str(st_path),
                                   fix="the file is missing or damaged; re-create the router artifact") from exc
        missing = sorted(set(manifest["tensors"]) - set(tensors))
        if missing:
            raise AdapterLoadError(f"router weights lack tensor '{missing[0]}'", path=str(st_path),
                                   fix="re-create the router artifact")
    return RouterArtifact(kind=str(manifest["kind"]), adapter_names=list(manifest["adapter_names"]),
                          config=dict(manifest.get("config") or {}), tensors=tensors, path=path)
