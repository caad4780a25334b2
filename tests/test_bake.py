"""bake: adapter (or merge result) into base weights. Oracle: PEFT's own forward with the adapter attached."""

from __future__ import annotations

import copy
import errno
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramerge import load_adapter, merge
from loramerge.demo.toy import make_adapter, save_base, tiny_llama
from loramerge.errors import BaseModelError, IncompatibleAdaptersError, LoramergeError, OutputError
from loramerge.io.bake import bake

TOKENS = torch.tensor([[1, 5, 9, 20, 33, 7, 60, 2]])


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def peft_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter)).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path)(TOKENS).logits


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def gpt2_dir(gpt2, tmp_path_factory) -> Path:
    return save_base(gpt2, tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


@pytest.mark.parametrize("targets", [
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ["embed_tokens", "lm_head", "q_proj"],
], ids=["all-linear", "embedding-and-head"])
def test_llama_bake_equals_peft_forward(llama, llama_dir, tmp_path, targets):
    adapter = make_adapter(llama, tmp_path / "ad", seed=7, r=4, lora_alpha=16, target_modules=targets)
    result = bake(adapter, llama_dir, tmp_path / "baked")
    expected = peft_logits(llama_dir, adapter)
    assert (expected - logits(llama_dir)).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(logits(result.output), expected, rtol=1e-4, atol=1e-5)
    names = {p.name for p in result.output.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert result.baked_modules == sorted(load_adapter(adapter).modules)
    assert result.untied == [] and result.dequantized is None


@pytest.mark.parametrize("targets,untied", [
    (["c_attn", "c_proj", "c_fc"], []),
    (["wte"], ["transformer.wte.weight", "lm_head.weight"]),
    (["lm_head", "c_attn"], ["transformer.wte.weight", "lm_head.weight"]),
    (["wte", "lm_head"], ["transformer.wte.weight", "lm_head.weight"]),
], ids=["conv1d", "tied-embedding", "tied-head", "both-tied"])
def test_gpt2_bake_equals_peft_forward(gpt2, gpt2_dir, tmp_path, targets, untied):
    """Conv1D stores W as d_in x d_out (transpose the delta); wte/lm_head are tied (untie them)."""
    adapter = make_adapter(gpt2, tmp_path / "ad", seed=8, r=4, target_modules=targets, fan_in_fan_out=True)
    result = bake(adapter, gpt2_dir, tmp_path / "baked")
    expected = peft_logits(gpt2_dir, adapter)
    assert (expected - logits(gpt2_dir)).abs().max() > 1e-2
    torch.testing.assert_close(logits(result.output), expected, rtol=1e-4, atol=1e-5)
    assert sorted(result.untied) == sorted(untied)
    config = json.loads((result.output / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) is (not untied)
    if untied:
        assert any("untied" in n for n in result.notices)


def test_bake_a_merge_result_in_memory_and_saved(llama, llama_dir, three_adapters, tmp_path):
    result = merge(adapters=three_adapters, method="task_arithmetic", weights=[0.5, 0.3, 0.8],
                   output=tmp_path / "merged")
    from_memory = bake(result, llama_dir, tmp_path / "baked-mem")
    from_disk = bake(tmp_path / "merged", llama_dir, tmp_path / "baked-disk")
    expected = peft_logits(llama_dir, tmp_path / "merged")
    torch.testing.assert_close(logits(from_memory.output), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(from_disk.output), expected, rtol=1e-4, atol=1e-5)
    assert "task_arithmetic merge" in (from_memory.output / "README.md").read_text()


def test_sharded_base_keeps_its_shards_and_index(llama, tmp_path):
    base = tmp_path / "sharded"
    llama.save_pretrained(str(base), max_shard_size="60KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2
    adapter = make_adapter(llama, tmp_path / "ad", seed=9, target_modules=["q_proj", "down_proj"])
    result = bake(adapter, base, tmp_path / "baked")
    assert sorted(p.name for p in result.output.glob("*.safetensors")) == shards
    index = json.loads((result.output / "model.safetensors.index.json").read_text())
    original = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(str(result.output / s)).values())
    torch.testing.assert_close(logits(result.output), peft_logits(base, adapter), rtol=1e-4, atol=1e-5)


def test_dtype_bfloat16_casts_every_float_tensor(llama, llama_dir, tmp_path):
    adapter = make_adapter(llama, tmp_path / "ad", seed=10, target_modules=["v_proj"])
    result = bake(adapter, llama_dir, tmp_path / "baked", dtype="bfloat16")
    baked = load_file(str(result.output / "model.safetensors"))
    base = load_file(str(llama_dir / "model.safetensors"))
    assert {t.dtype for t in baked.values()} == {torch.bfloat16}
    assert json.loads((result.output / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.1.self_attn.v_proj"
    delta = load_adapter(adapter).factors(name).delta()
    expected = (base[name + ".weight"].float() + delta).to(torch.bfloat16)
    assert torch.equal(baked[name + ".weight"], expected)
    assert torch.equal(baked["model.norm.weight"], base["model.norm.weight"].to(torch.bfloat16))


def test_unknown_dtype(llama, llama_dir, tmp_path):
    adapter = make_adapter(llama, tmp_path / "ad", seed=1)
    with pytest.raises(LoramergeError) as info:
        bake(adapter, llama_dir, tmp_path / "baked", dtype="fp8")
    assert "fp8" in str(info.value) and "bfloat16" in info.value.fix


# ------------------------------------------------------------------------------------------------ refusals


def test_adapter_of_another_base_model(llama_dir, tmp_path):
    narrow = tiny_llama(seed=2, hidden=32)
    adapter = make_adapter(narrow, tmp_path / "ad", seed=1, target_modules=["q_proj"])
    with pytest.raises(IncompatibleAdaptersError) as info:
        bake(adapter, llama_dir, tmp_path / "baked")
    assert "model.layers.0.self_attn.q_proj" in str(info.value) and "trained on" in info.value.fix
    assert not (tmp_path / "baked").exists() and no_leftovers(tmp_path)


def test_adapter_module_missing_from_base(gpt2, llama_dir, tmp_path):
    adapter = make_adapter(gpt2, tmp_path / "ad", seed=1, target_modules=["c_attn"], fan_in_fan_out=True,
                           base_name="gpt2")
    with pytest.raises(IncompatibleAdaptersError) as info:
        bake(adapter, llama_dir, tmp_path / "baked")
    assert "transformer.h.0.attn.c_attn" in str(info.value) and "'gpt2'" in info.value.fix
    assert not (tmp_path / "baked").exists()


@pytest.mark.parametrize("damage,mention,fix", [
    (lambda d: (d / "config.json").unlink(), "config.json", "save_pretrained"),
    (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON", "repair"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors", "safetensors"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "pickled", "save_pretrained"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 16), "corrupt", "re-download"),
], ids=["no-config", "bad-config", "no-weights", "pickled-weights", "corrupt-weights"])
def test_broken_base_model(llama, llama_dir, tmp_path, damage, mention, fix):
    import shutil

    base = Path(shutil.copytree(llama_dir, tmp_path / "base"))
    damage(base)
    adapter = make_adapter(llama, tmp_path / "ad", seed=1)
    with pytest.raises(BaseModelError) as info:
        bake(adapter, base, tmp_path / "baked")
    assert mention in str(info.value) and fix in info.value.fix and str(base) in str(info.value)


def test_other_quantization_methods_are_refused(llama, llama_dir, tmp_path):
    import shutil

    base = Path(shutil.copytree(llama_dir, tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError) as info:
        bake(make_adapter(llama, tmp_path / "ad", seed=1), base, tmp_path / "baked")
    assert "gptq" in str(info.value) and "unquantized" in info.value.fix


@pytest.mark.parametrize("where", ["inside-base", "is-base", "inside-adapter"])
def test_output_overlapping_an_input(llama, llama_dir, tmp_path, where):
    import shutil

    base = Path(shutil.copytree(llama_dir, tmp_path / "base"))
    adapter = make_adapter(llama, tmp_path / "ad", seed=1)
    out = {"inside-base": base / "baked", "is-base": base, "inside-adapter": adapter / "baked"}[where]
    before = digest(base), digest(adapter)
    with pytest.raises(OutputError) as info:
        bake(adapter, base, out, force=True)
    assert "overlap" in str(info.value) and "outside" in info.value.fix
    assert (digest(base), digest(adapter)) == before


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
def test_bake_failure_mid_write_leaves_everything_as_it_was(llama, llama_dir, tmp_path, monkeypatch, exc):
    import safetensors.torch

    base = tmp_path / "sharded"
    llama.save_pretrained(str(base), max_shard_size="60KB")
    adapter = make_adapter(llama, tmp_path / "ad", seed=4)
    out = tmp_path / "baked"
    bake(adapter, base, out)
    before = digest(base), digest(adapter), digest(out)
    real, calls = safetensors.torch.save_file, []

    def fails_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_on_third_shard)
    with pytest.raises((OutputError, KeyboardInterrupt)) as info:
        bake(adapter, base, out, force=True)
    if isinstance(exc, OSError):
        assert type(info.value) is OutputError and "disk space" in info.value.fix
    assert (digest(base), digest(adapter), digest(out)) == before
    assert no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ bitsandbytes

requires_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                  reason="bitsandbytes is an optional extra: pip install 'loramerge[bnb]'")

QUANT = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def quantized(base_dir: Path, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=BitsAndBytesConfig(**QUANT[kind]),
                                                device_map="cpu").eval()


@requires_bnb
@pytest.mark.parametrize("kind", list(QUANT))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bake_into_a_bitsandbytes_checkpoint(llama_dir, gpt2_dir, tmp_path, kind, family):
    """Oracle: transformers' own dequantize() of the loaded checkpoint, with PEFT's adapter on top."""
    from peft import PeftModel

    base_dir = llama_dir if family == "llama" else gpt2_dir
    targets = ["q_proj", "down_proj", "embed_tokens"] if family == "llama" else ["c_attn", "c_proj"]
    quant_dir = tmp_path / "quantized"
    qmodel = quantized(base_dir, kind)
    qmodel.save_pretrained(str(quant_dir))
    adapter = make_adapter(qmodel, tmp_path / "qlora", seed=5, target_modules=targets)  # trained on the 4/8-bit base
    result = bake(adapter, quant_dir, tmp_path / "baked")
    assert result.dequantized and "dequantized" in result.notices[0]
    assert "quantization_config" not in json.loads((result.output / "config.json").read_text())
    reference = PeftModel.from_pretrained(quantized_checkpoint_dequantized(quant_dir), str(adapter)).eval()
    with torch.no_grad():
        expected = reference(TOKENS).logits
    torch.testing.assert_close(logits(result.output), expected, rtol=1e-4, atol=1e-5)
    baked_keys = set(load_file(str(result.output / "model.safetensors")))
    assert not [k for k in baked_keys if "absmax" in k or "quant" in k or k.endswith((".SCB", ".weight_format"))]


def quantized_checkpoint_dequantized(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    return model.dequantize().eval()


@requires_bnb
def test_missing_bitsandbytes_gives_an_install_hint(llama_dir, llama, tmp_path, monkeypatch):
    quant_dir = tmp_path / "quantized"
    quantized(llama_dir, "nf4-double").save_pretrained(str(quant_dir))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(BaseModelError) as info:
        bake(make_adapter(llama, tmp_path / "ad", seed=1), quant_dir, tmp_path / "baked")
    assert "bitsandbytes" in str(info.value) and "pip install" in info.value.fix


@requires_bnb
def test_qlora_adapters_merge_like_any_others(llama_dir, tmp_path):
    """Adapters trained on a 4-bit base: merging reads only their factors. Oracle: PEFT with both adapters
    active on the same 4-bit model (their outputs add) equals the merged adapter on it."""
    from peft import PeftModel

    qmodel = quantized(llama_dir, "nf4-double")
    a = make_adapter(qmodel, tmp_path / "a", seed=21, r=4, target_modules=["q_proj", "v_proj"])
    b = make_adapter(qmodel, tmp_path / "b", seed=22, r=8, lora_alpha=4, target_modules=["v_proj", "down_proj"])
    merge(adapters=[a, b], method="task_arithmetic", output=tmp_path / "merged")
    both = PeftModel.from_pretrained(copy.deepcopy(qmodel), str(a), adapter_name="a")
    both.load_adapter(str(b), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    merged = PeftModel.from_pretrained(copy.deepcopy(qmodel), str(tmp_path / "merged")).eval()
    with torch.no_grad():
        expected, got, plain = both.eval()(TOKENS).logits, merged(TOKENS).logits, qmodel(TOKENS).logits
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)



def test_unknown_architecture_falls_back_to_the_adapter_flags(gpt2, gpt2_dir, tmp_path):
    """No model class for config.json: the adapter's fan_in_fan_out decides the Conv1D transpose (W is d_in x d_out)."""
    import shutil

    base = Path(shutil.copytree(gpt2_dir, tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["SomeRemoteCodeModel"]
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(gpt2, tmp_path / "ad", seed=6, target_modules=["c_proj"], fan_in_fan_out=True)
    result = bake(adapter, base, tmp_path / "baked")
    assert any("unknown architecture" in n for n in result.notices)
    before, after = load_file(str(base / "model.safetensors")), load_file(str(result.output / "model.safetensors"))
    for name, factors in ((n, load_adapter(adapter).factors(n)) for n in load_adapter(adapter).modules):
        torch.testing.assert_close(after[name + ".weight"], before[name + ".weight"] + (factors.B @ factors.A).T)
