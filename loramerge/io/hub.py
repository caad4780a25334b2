"""Hugging Face Hub round trip: push an adapter (or a baked model) with its model card; fetch base models.

Adapters given as hub ids are already accepted everywhere a path is (``load_adapter`` downloads them
with ``snapshot_download``); this module adds the upload side and the base-model download ``bake`` needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from loramerge.core.adapter import CONFIG_NAME, load_adapter
from loramerge.errors import BaseModelError, HubError, LoramergeError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Files a base model needs for baking: config, weights, tokenizer, generation config, chat template.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "README.md"]

# Never uploaded: hidden files (temp dirs of an interrupted write, .cache) and editor/OS litter.
IGNORE_PATTERNS = [".*", "**/.*", "*.tmp", "__pycache__/*", "**/__pycache__/*"]


@dataclass(frozen=True)
class PushResult:
    """Where an upload went."""

    repo_id: str
    repo_url: str
    commit_url: str | None
    revision: str | None


def is_hub_id(reference: str | Path) -> bool:
    """``user/name`` that is not an existing local path."""
    ref = str(reference)
    return not Path(ref).expanduser().exists() and bool(REPO_ID.match(ref))


def resolve_model(reference: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """A base model directory: a local path, or a hub id downloaded (config, safetensors, tokenizer only)."""
    ref = str(reference)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BaseModelError("a base model must be a directory (config.json + *.safetensors)", path=str(path),
                                 fix="pass the model's directory, not a file inside it")
        return path.resolve()
    if not REPO_ID.match(ref):
        raise BaseModelError("base model not found: not a local directory and not a hub id (user/name)", path=ref,
                             fix="check the path, or give a hub repository id such as 'meta-llama/Llama-3.2-1B'")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=ref, revision=revision, token=token, allow_patterns=MODEL_PATTERNS)
    except Exception as exc:
        raise BaseModelError(
            f"could not download base model '{ref}' from the hub: {exc}", path=ref,
            fix="check the repository id, your network and HF_TOKEN (gated models need access), "
            "or download it and pass the local path",
        ) from exc
    return Path(local)


def _artifact_kind(folder: Path) -> str:
    """'adapter' (validated by loading it) or 'model' (config.json + safetensors); anything else is refused."""
    if (folder / CONFIG_NAME).is_file():
        load_adapter(folder)  # raises a clear AdapterLoadError / UnsupportedAdapterError if it is broken
        return "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "model"
    raise HubError(
        "nothing to push: the folder holds neither a PEFT adapter (adapter_config.json) "
        "nor a model (config.json + *.safetensors)", path=str(folder),
        fix="push the output directory of `loramerge merge` or `loramerge bake`",
    )


def default_card(folder: Path, kind: str) -> str:
    """A minimal model card for a folder that has none (merged adapters and baked models carry their own)."""
    config_name = CONFIG_NAME if kind == "adapter" else "config.json"
    try:
        config = json.loads((folder / config_name).read_text())
    except (OSError, ValueError):
        config = {}
    base = config.get("base_model_name_or_path") if kind == "adapter" else config.get("_name_or_path")
    front = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"), "tags:", "- loramerge"]
    if base and REPO_ID.match(str(base)):
        front.append(f"base_model: {base}")
    front.append("---")
    what = "LoRA adapter" if kind == "adapter" else "model"
    return "\n".join([*front, "", f"# {folder.name}", "", f"A {what} uploaded with loramerge.", ""])


def _api(token: str | None):
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with peft
        raise HubError("huggingface_hub is needed to push", fix="pip install huggingface_hub") from exc
    return HfApi(token=token)


def _hub_call(what: str, repo_id: str, call):
    try:
        return call()
    except LoramergeError:
        raise
    except Exception as exc:
        raise HubError(
            f"{what} failed for '{repo_id}': {type(exc).__name__}: {exc}", path=repo_id,
            fix="log in with `huggingface-cli login` or set HF_TOKEN (a token with write access), "
            "and check that the repository id is yours or your organisation's",
        ) from exc


def push(
    adapter_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload a merged adapter (or a baked model) to the Hub with its model card.

    Creates the repository if needed (``exist_ok``), the branch ``revision`` if given, then uploads the
    folder in one commit; a folder without README.md gets a minimal card in a second commit.
    """
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise HubError("the folder to push does not exist or is not a directory", path=str(folder),
                       fix="pass the output directory of `loramerge merge` or `loramerge bake`")
    if not REPO_ID.match(repo_id):
        raise HubError(f"'{repo_id}' is not a hub repository id", path=repo_id,
                       fix="use the form user/name or org/name (letters, digits, '-', '_', '.')")
    kind = _artifact_kind(folder)
    api = _api(token)
    repo_url = _hub_call("create_repo", repo_id,
                         lambda: api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True))
    if revision and revision != "main":
        _hub_call("create_branch", repo_id,
                  lambda: api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True))
    message = commit_message or f"Upload {kind} with loramerge"
    commit = _hub_call("upload_folder", repo_id, lambda: api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
        commit_message=message, ignore_patterns=IGNORE_PATTERNS,
    ))
    if not (folder / "README.md").is_file():
        card = default_card(folder, kind).encode()
        commit = _hub_call("upload_file", repo_id, lambda: api.upload_file(
            path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id, repo_type="model",
            revision=revision, commit_message="Add model card",
        ))
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=getattr(commit, "commit_url", None),
                      revision=revision)


__all__ = ["PushResult", "default_card", "is_hub_id", "push", "resolve_model"]
