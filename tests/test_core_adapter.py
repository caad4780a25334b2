"""Loading PEFT adapters: scale folding and layouts checked against PEFT's own get_delta_weight."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from loramerge.core.adapter import load_adapter, module_scale
from loramerge.errors import AdapterLoadError, UnsupportedAdapterError


def peft_deltas(base, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's own delta per module, in the base weight's layout."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}) or (
            hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A
        ):
            out[name] = module.get_delta_weight("default").detach()
    return out


def assert_matches_peft(base, path, layout="linear"):
    adapter = load_adapter(path)
    reference = peft_deltas(base, path)
    assert set(adapter.modules) == set(reference)
    for name, expected in reference.items():
        ours = adapter.factors(name).delta()
        if layout != "linear":
            ours = ours.T  # Conv1D (fan_in_fan_out) and Embedding keep the transposed layout
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    return adapter


def test_plain_lora_scale_is_folded(llama, adapter_factory):
    path = adapter_factory(r=4, lora_alpha=12)
    adapter = assert_matches_peft(llama, path)
    assert {m.scale for m in adapter.modules.values()} == {3.0}


def test_rslora_scale(llama, adapter_factory):
    path = adapter_factory(r=4, lora_alpha=6, use_rslora=True)
    adapter = assert_matches_peft(llama, path)
    assert {m.scale for m in adapter.modules.values()} == {3.0}


def test_rank_and_alpha_patterns(llama, adapter_factory):
    path = adapter_factory(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           rank_pattern={"model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
                           alpha_pattern={"v_proj": 3})
    adapter = assert_matches_peft(llama, path)
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    assert ranks["model.layers.0.self_attn.v_proj"] == 6
    assert adapter.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(0.5)


def test_gpt2_conv1d_fan_in_fan_out(gpt2, adapter_factory):
    path = adapter_factory(base=gpt2, r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    adapter = assert_matches_peft(gpt2, path, layout="conv1d")
    assert adapter.config["fan_in_fan_out"] is True


def test_embedding_lora(llama, adapter_factory):
    path = adapter_factory(r=4, target_modules=["embed_tokens", "q_proj"])
    adapter = load_adapter(path)
    reference = peft_deltas(llama, path)
    emb = "model.embed_tokens"
    assert adapter.modules[emb].kind == "embedding"
    torch.testing.assert_close(adapter.factors(emb).delta().T, reference[emb], rtol=1e-5, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(adapter.factors(q).delta(), reference[q], rtol=1e-5, atol=1e-6)


def test_loading_is_lazy_and_records_provenance(adapter_factory):
    path = adapter_factory(r=4)
    adapter = load_adapter(path)
    info = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert (info.rank, info.d_in, info.d_out) == (4, 64, 64)
    assert len(adapter.sha256) == 64
    assert adapter.source.local_path == path.resolve()
    assert adapter.base_model == "tiny-llama"


def test_bf16_adapter_reports_its_dtype(adapter_factory):
    adapter = load_adapter(adapter_factory(r=4, dtype=torch.bfloat16))
    assert adapter.dtype == torch.bfloat16
    assert adapter.factors("model.layers.0.self_attn.q_proj").A.dtype == torch.float32


def test_hub_id_goes_through_snapshot_download(adapter_factory, monkeypatch):
    path = adapter_factory(r=4)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    adapter = load_adapter("someone/some-lora", revision="v1")
    assert calls == [("someone/some-lora", "v1", ("adapter_config.json", "adapter_model.safetensors", "README.md"))]
    assert adapter.source.reference == "someone/some-lora" and adapter.source.revision == "v1"
    assert adapter.name == path.name


def test_hub_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(AdapterLoadError, match="could not download") as info:
        load_adapter("someone/missing-lora")
    assert "local path" in info.value.fix


def test_dora_is_refused_with_the_reason(adapter_factory):
    path = adapter_factory(r=4)
    cfg = json.loads((path / "adapter_config.json").read_text())
    dora = path.parent / (path.name + "-dora")
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UnsupportedAdapterError, match="use_dora") as info:
        load_adapter(dora)
    assert "adapter_config.json" in str(info.value)


def test_module_scale_follows_peft_pattern_rules():
    cfg = {"r": 8, "lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}
    assert module_scale(cfg, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert module_scale(cfg, "model.layers.0.self_attn.v_proj", 8) == 0.5
