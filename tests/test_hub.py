"""Hub round trip with no network: HfApi and snapshot_download are replaced by recorders, and the exact calls
and arguments are asserted. Also the ``bake``/``push`` CLI verbs and their exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from loramerge import load_adapter, merge
from loramerge.cli.export import app
from loramerge.core.adapter import CONFIG_NAME, SAFETENSORS_NAME
from loramerge.errors import AdapterLoadError, HubError, OutputError
from loramerge.io.hub import IGNORE_PATTERNS, MODEL_PATTERNS, is_hub_id, push


class FakeApi:
    """Records every call; ``fail`` makes the named method raise like an HTTP 401 would."""

    calls: list[tuple[str, dict]] = []
    fail: str | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("__init__", {"token": token}))

    def _record(self, name, kwargs, result):
        FakeApi.calls.append((name, kwargs))
        if FakeApi.fail == name:
            raise RuntimeError("401 Client Error: Unauthorized")
        return result

    def create_repo(self, **kwargs):
        return self._record("create_repo", kwargs, huggingface_hub.RepoUrl(f"https://huggingface.co/{kwargs['repo_id']}"))

    def create_branch(self, **kwargs):
        return self._record("create_branch", kwargs, None)

    def upload_folder(self, **kwargs):
        return self._record("upload_folder", kwargs, type("Commit", (), {"commit_url": "https://hf.co/c/1"})())

    def upload_file(self, **kwargs):
        return self._record("upload_file", kwargs, type("Commit", (), {"commit_url": "https://hf.co/c/2"})())


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


@pytest.fixture(scope="module")
def merged(three_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "merged"
    merge(adapters=three_adapters, method="task_arithmetic", output=out)
    return out


def names(calls):
    return [name for name, _ in calls]


def test_push_a_merged_adapter(fake_api, merged):
    result = push(merged, "alice/merged-lora", private=True, token="hf_secret")
    assert fake_api.calls == [
        ("__init__", {"token": "hf_secret"}),
        ("create_repo", {"repo_id": "alice/merged-lora", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "alice/merged-lora", "folder_path": str(merged), "repo_type": "model",
                           "revision": None, "commit_message": "Upload adapter with loramerge",
                           "ignore_patterns": IGNORE_PATTERNS}),
    ]
    assert result.repo_url == "https://huggingface.co/alice/merged-lora"
    assert result.commit_url == "https://hf.co/c/1"
    assert (merged / "README.md").is_file()  # the card travels in the folder upload


def test_push_to_a_branch_with_a_message(fake_api, merged):
    push(merged, "alice/merged-lora", revision="v2", commit_message="ties, density 0.2")
    assert names(fake_api.calls) == ["__init__", "create_repo", "create_branch", "upload_folder"]
    assert fake_api.calls[2][1] == {"repo_id": "alice/merged-lora", "branch": "v2", "repo_type": "model",
                                    "exist_ok": True}
    upload = fake_api.calls[3][1]
    assert upload["revision"] == "v2" and upload["commit_message"] == "ties, density 0.2"


def test_push_without_a_card_adds_one(fake_api, adapter_factory, tmp_path):
    folder = Path(shutil.copytree(adapter_factory(r=4, base_name="meta-llama/Llama-3.2-1B"), tmp_path / "ad"))
    (folder / "README.md").unlink()
    push(folder, "bob/plain")
    assert names(fake_api.calls) == ["__init__", "create_repo", "upload_folder", "upload_file"]
    card_call = fake_api.calls[3][1]
    assert card_call["path_in_repo"] == "README.md" and card_call["repo_id"] == "bob/plain"
    card = card_call["path_or_fileobj"].decode()
    assert "library_name: peft" in card and "base_model: meta-llama/Llama-3.2-1B" in card
    assert not (folder / "README.md").exists()  # the user's folder is not modified


def test_push_a_baked_model(fake_api, llama, llama_dir, tmp_path):
    from loramerge.demo.toy import make_adapter
    from loramerge.io.bake import bake

    baked = bake(make_adapter(llama, tmp_path / "ad", seed=1), llama_dir, tmp_path / "baked").output
    push(baked, "carol/baked-model")
    assert fake_api.calls[2][1]["commit_message"] == "Upload model with loramerge"


def test_ignore_patterns_skip_temporary_directories_only():
    from huggingface_hub.utils import filter_repo_objects

    files = ["adapter_model.safetensors", "adapter_config.json", "README.md", "loramerge.json",
             ".out.tmp-abc/adapter_model.safetensors", ".DS_Store", "sub/.hidden"]
    kept = list(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS))
    assert kept == ["adapter_model.safetensors", "adapter_config.json", "README.md", "loramerge.json"]


@pytest.mark.parametrize("folder,repo,mention,fix", [
    ("missing", "alice/x", "does not exist", "loramerge merge"),
    ("merged", "not a repo id", "not a hub repository id", "user/name"),
    ("merged", "alice/x/y", "not a hub repository id", "user/name"),
    ("empty", "alice/x", "nothing to push", "loramerge bake"),
], ids=["no-folder", "spaces-in-id", "three-part-id", "empty-folder"])
def test_push_refusals_make_no_hub_call(fake_api, merged, tmp_path, folder, repo, mention, fix):
    (tmp_path / "empty").mkdir()
    path = {"missing": tmp_path / "missing", "merged": merged, "empty": tmp_path / "empty"}[folder]
    with pytest.raises(HubError) as info:
        push(path, repo)
    assert mention in str(info.value) and fix in info.value.fix
    assert fake_api.calls == []


def test_push_of_a_broken_adapter_is_refused_before_upload(fake_api, adapter_factory, tmp_path):
    folder = Path(shutil.copytree(adapter_factory(r=4), tmp_path / "ad"))
    (folder / SAFETENSORS_NAME).write_bytes(b"garbage")
    with pytest.raises(AdapterLoadError):
        push(folder, "alice/broken")
    assert fake_api.calls == []


@pytest.mark.parametrize("failing", ["create_repo", "upload_folder"])
def test_hub_failures_become_hub_errors(fake_api, merged, failing):
    fake_api.fail = failing
    with pytest.raises(HubError) as info:
        push(merged, "alice/merged-lora")
    assert failing in str(info.value) and "401" in str(info.value) and "HF_TOKEN" in info.value.fix
    assert info.value.exit_code == 9


# ------------------------------------------------------------------------------------------------ downloads


@pytest.fixture
def fake_download(monkeypatch):
    calls: list[dict] = []
    served: dict[str, Path] = {}

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(served[kwargs["repo_id"]])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, served


def test_hub_ids_are_accepted_as_adapters(fake_download, three_adapters):
    calls, served = fake_download
    served["alice/code-lora"] = three_adapters[0]
    adapter = load_adapter("alice/code-lora", revision="abc123")
    assert calls == [{"repo_id": "alice/code-lora", "revision": "abc123",
                      "allow_patterns": [CONFIG_NAME, SAFETENSORS_NAME, "README.md"]}]
    assert adapter.source.reference == "alice/code-lora" and adapter.source.revision == "abc123"
    assert set(adapter.modules) == set(load_adapter(three_adapters[0]).modules)


def test_a_merge_mixing_hub_ids_and_paths_records_them(fake_download, three_adapters, tmp_path):
    calls, served = fake_download
    served["alice/code-lora"] = three_adapters[0]
    recipe = {"method": "task_arithmetic", "adapters": [
        {"path": "alice/code-lora", "revision": "main", "weight": 0.6},
        {"path": str(three_adapters[1]), "weight": 0.4}]}
    merge(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "loramerge.json").read_text())
    assert manifest["inputs"][0]["source"] == "alice/code-lora" and manifest["inputs"][0]["revision"] == "main"
    assert "alice/code-lora" in (tmp_path / "out" / "README.md").read_text()
    assert len(calls) == 1


def test_bake_downloads_a_hub_base(fake_download, llama, llama_dir, tmp_path):
    from loramerge.demo.toy import make_adapter
    from loramerge.io.bake import bake

    calls, served = fake_download
    served["meta-llama/tiny"] = llama_dir
    result = bake(make_adapter(llama, tmp_path / "ad", seed=2), "meta-llama/tiny", tmp_path / "baked", revision="r1")
    assert calls == [{"repo_id": "meta-llama/tiny", "revision": "r1", "token": None, "allow_patterns": MODEL_PATTERNS}]
    assert "base_model: meta-llama/tiny" in (result.output / "README.md").read_text()


def test_is_hub_id(tmp_path):
    assert is_hub_id("user/name") and is_hub_id("org/model-1.5B")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("a/b/c") and not is_hub_id("name")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_push(fake_api, merged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    result = CliRunner().invoke(app, ["push", str(merged), "dave/x", "--private", "-m", "hello"])
    assert result.exit_code == 0, result.output
    assert "https://huggingface.co/dave/x" in result.output
    assert fake_api.calls[0] == ("__init__", {"token": "hf_env"})
    assert fake_api.calls[1][1]["private"] is True and fake_api.calls[2][1]["commit_message"] == "hello"


def test_cli_push_error_exit_code(fake_api, tmp_path):
    result = CliRunner().invoke(app, ["push", str(tmp_path / "nope"), "dave/x"])
    assert result.exit_code == HubError.exit_code == 9
    assert "HubError" in result.output and "fix:" in result.output


def test_cli_bake_and_its_exit_codes(llama, llama_dir, tmp_path):
    from loramerge.demo.toy import make_adapter

    adapter = make_adapter(llama, tmp_path / "ad", seed=3)
    runner = CliRunner()
    ok = runner.invoke(app, ["bake", str(adapter), str(llama_dir), "-o", str(tmp_path / "baked"), "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.output and (tmp_path / "baked" / "model.safetensors").is_file()
    again = runner.invoke(app, ["bake", str(adapter), str(llama_dir), "-o", str(tmp_path / "baked")])
    assert again.exit_code == OutputError.exit_code == 6 and "--force" in again.output
    missing = runner.invoke(app, ["bake", str(tmp_path / "none"), str(llama_dir), "-o", str(tmp_path / "b2")])
    assert missing.exit_code == AdapterLoadError.exit_code == 3
