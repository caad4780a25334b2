"""Bad-input battery: damaged, unsupported and pickled adapters (see tests/bad_inputs/helpers.py)."""

from __future__ import annotations

import copy
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramerge import load_adapter, merge
from loramerge.errors import (
    AdapterLoadError,
    LoramergeError,
    NumericalError,
    UnsupportedAdapterError,
)

from .helpers import (
    CONFIG,
    KEY_A,
    KEY_B,
    Q0,
    WEIGHTS,
    assert_user_error,
    edit_config,
    edit_header,
    edit_tensors,
    header_of,
    leftovers,
    read_all,
    write_with_header,
)

# ------------------------------------------------------------------------------------------------ loading


def _set_dora_key(t):
    t[f"base_model.model.{Q0}.lora_magnitude_vector"] = torch.ones(64)


def _set_bias_key(t):
    t[f"base_model.model.{Q0}.lora_B.bias"] = torch.zeros(64)


def _set_unknown_key(t):
    t["base_model.model.model.norm.weight"] = torch.ones(64)


def _set_base_copy_without_lora(t):
    t["base_model.model.lm_head.base_layer.weight"] = torch.zeros(128, 64)


def _drop_b(t):
    del t[KEY_B]


def _rank_mismatch(t):
    t[KEY_B] = torch.zeros(64, 3)


def _conv2d_factors(t):
    t[KEY_A] = t[KEY_A].reshape(4, 64, 1, 1)


def _nan(t):
    t[KEY_B][3, 1] = float("nan")


def _inf(t):
    t[KEY_A][0, 0] = float("inf")


def _rank_zero_module(t):
    t[KEY_A] = torch.zeros(0, 64)
    t[KEY_B] = torch.zeros(64, 0)


def _unlink(name):
    return lambda d: (d / name).unlink()


def _write(name, content):
    return lambda d: (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def _cfg(**changes):
    return lambda d: edit_config(d, **changes)


def _tensors(change):
    return lambda d: edit_tensors(d, change)


def _header(change):
    return lambda d: edit_header(d, change)


def _truncate(n_bytes):
    def cut(d):
        raw = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(raw[:-n_bytes])
    return cut


def _first(h):
    return next(k for k in h if k != "__metadata__")


def _set_entry(field, value):
    def change(h):
        h[_first(h)][field] = value
    return change


def _drop_entry_field(h):
    del h[_first(h)]["dtype"]


def _nested_header(d):
    _, data = header_of(d)
    write_with_header(d, "[" * 100_000 + "]" * 100_000, data)


def _huge_header_length(d):
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + raw[8:])


def _garbage_header(d):
    header, data = header_of(d)
    write_with_header(d, b"\x00\xff" * (len(json.dumps(header)) // 2), data)


def _scale_rank(d):
    edit_config(d, rank_pattern={"q_proj": 0})
    edit_tensors(d, _rank_zero_module)


# (id, damage, error class, fix text, mentions: names relative to the adapter dir or literal strings)
LOAD_CASES = [
    ("missing-config", _unlink(CONFIG), AdapterLoadError, "save_pretrained", [CONFIG]),
    ("malformed-json", _write(CONFIG, '{"r": 4, "lora_alpha": '), AdapterLoadError, "repair", [CONFIG]),
    ("config-is-a-list", _write(CONFIG, "[4, 8]"), AdapterLoadError, "repair", [CONFIG]),
    ("config-not-utf8", _write(CONFIG, b"\xff\xfe\x00{"), AdapterLoadError, "repair", [CONFIG]),
    ("r-zero", _cfg(r=0), AdapterLoadError, "adapter_config.json", [CONFIG, "'r'"]),
    ("r-negative", _cfg(r=-4), AdapterLoadError, "adapter_config.json", [CONFIG, "'r'"]),
    ("r-string", _cfg(r="4"), AdapterLoadError, "adapter_config.json", [CONFIG, "'r'"]),
    ("alpha-nan", _cfg(lora_alpha=float("nan")), AdapterLoadError, "adapter_config.json", [CONFIG, "lora_alpha"]),
    ("alpha-string", _cfg(lora_alpha="eight"), AdapterLoadError, "adapter_config.json", [CONFIG, "lora_alpha"]),
    ("config-rank-differs", _cfg(r=8), AdapterLoadError, "rank_pattern", [WEIGHTS, Q0]),
    ("rank-zero-module", _scale_rank, AdapterLoadError, "remove the module", [WEIGHTS, Q0]),
    ("dora-flag", _cfg(use_dora=True), UnsupportedAdapterError, "use_dora=False", [CONFIG, "use_dora"]),
    ("lora-bias-flag", _cfg(lora_bias=True), UnsupportedAdapterError, "lora_bias=False", [CONFIG, "lora_bias"]),
    ("modules-to-save-flag", _cfg(modules_to_save=["lm_head"]), UnsupportedAdapterError, "modules_to_save",
     [CONFIG, "modules_to_save"]),
    ("layer-replication", _cfg(layer_replication=[[0, 2]]), UnsupportedAdapterError, "merge_and_unload",
     [CONFIG, "layer_replication"]),
    ("target-parameters", _cfg(target_parameters=["experts.gate_up_proj"]), UnsupportedAdapterError,
     "target_modules", [CONFIG, "target_parameters"]),
    ("qalora", _cfg(use_qalora=True), UnsupportedAdapterError, "plain LoRA", [CONFIG, "use_qalora"]),
    ("bias-all", _cfg(bias="all"), UnsupportedAdapterError, "bias='none'", [CONFIG, "bias"]),
    ("peft-type-prompt", _cfg(peft_type="PROMPT_TUNING"), UnsupportedAdapterError, "convert", [CONFIG, "PROMPT_TUNING"]),
    ("no-weights", _unlink(WEIGHTS), AdapterLoadError, "save_pretrained", ["victim"]),
    ("empty-weights", _write(WEIGHTS, b""), AdapterLoadError, "re-download", [WEIGHTS, "8-byte"]),
    ("short-weights", _write(WEIGHTS, b"\x10\x00\x00"), AdapterLoadError, "re-download", [WEIGHTS]),
    ("truncated-data", _truncate(100), AdapterLoadError, "re-download", [WEIGHTS, "truncated"]),
    ("truncated-header", _truncate(10_000), AdapterLoadError, "re-download", [WEIGHTS]),
    ("header-length-huge", _huge_header_length, AdapterLoadError, "re-download", [WEIGHTS, "header length"]),
    ("header-garbage", _garbage_header, AdapterLoadError, "re-download", [WEIGHTS]),
    ("header-list", lambda d: write_with_header(d, "[1, 2, 3]", header_of(d)[1]), AdapterLoadError,
     "re-download", [WEIGHTS, "JSON object"]),
    ("header-deeply-nested", _nested_header, AdapterLoadError, "re-download", [WEIGHTS]),
    ("entry-without-dtype", _header(_drop_entry_field), AdapterLoadError, "re-download", [WEIGHTS, "bad entry"]),
    ("entry-fp8-dtype", _header(_set_entry("dtype", "F8_E4M3")), AdapterLoadError, "re-download",
     [WEIGHTS, "F8_E4M3"]),
    ("entry-shape-too-big", _header(_set_entry("shape", [64, 9999])), AdapterLoadError, "re-download",
     [WEIGHTS, "does not match"]),
    ("entry-negative-shape", _header(_set_entry("shape", [-4, -64])), AdapterLoadError, "re-download", [WEIGHTS]),
    ("entry-offsets-past-end", _header(_set_entry("data_offsets", [0, 10**9])), AdapterLoadError, "re-download",
     [WEIGHTS, "past the end"]),
    ("entry-offsets-not-a-pair", _header(_set_entry("data_offsets", 7)), AdapterLoadError, "re-download",
     [WEIGHTS]),
    ("missing-lora-B", _tensors(_drop_b), AdapterLoadError, "re-save", [WEIGHTS, Q0, "lora_B"]),
    ("A-B-rank-mismatch", _tensors(_rank_mismatch), AdapterLoadError, "damaged", [WEIGHTS, Q0]),
    ("conv2d-factors", _tensors(_conv2d_factors), UnsupportedAdapterError, "Linear", [WEIGHTS, Q0]),
    ("dora-magnitude-in-weights", _tensors(_set_dora_key), UnsupportedAdapterError, "plain LoRA",
     [WEIGHTS, "DoRA magnitude"]),
    ("lora-bias-in-weights", _tensors(_set_bias_key), UnsupportedAdapterError, "plain LoRA", [WEIGHTS, "lora_bias"]),
    ("unknown-tensor", _tensors(_set_unknown_key), UnsupportedAdapterError, "plain LoRA",
     [WEIGHTS, "model.norm.weight"]),
    ("base-copy-without-lora", _tensors(_set_base_copy_without_lora), UnsupportedAdapterError, "modules_to_save",
     [WEIGHTS, "lm_head"]),
    ("nan-weights", _tensors(_nan), NumericalError, "clean checkpoint", [WEIGHTS, Q0]),
    ("inf-weights", _tensors(_inf), NumericalError, "clean checkpoint", [WEIGHTS, Q0]),
]


@pytest.mark.parametrize("damage,cls,fix,mentions", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_damaged_adapter(clean, damage, cls, fix, mentions):
    damage(clean)
    with pytest.raises(LoramergeError) as info:
        read_all(clean)
    assert_user_error(info.value, cls, *mentions, fix=fix)


def test_damaged_adapter_fails_the_merge_too(clean, source_adapter, tmp_path):
    """The same errors surface through merge(), and nothing is written."""
    edit_tensors(clean, _nan)
    with pytest.raises(NumericalError) as info:
        merge(adapters=[source_adapter, clean], method="task_arithmetic", output=tmp_path / "out")
    assert_user_error(info.value, NumericalError, Q0, fix="clean checkpoint")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_adapter_path_is_a_file(clean):
    with pytest.raises(AdapterLoadError) as info:
        load_adapter(clean / CONFIG)
    assert_user_error(info.value, AdapterLoadError, str(clean / CONFIG), fix="directory")


def test_adapter_path_missing(tmp_path):
    with pytest.raises(AdapterLoadError) as info:
        load_adapter(tmp_path / "no" / "such" / "adapter")
    assert_user_error(info.value, AdapterLoadError, "adapter", fix="check the path")


def test_hub_download_failure_is_explained(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(AdapterLoadError) as info:
        load_adapter("someone/missing-lora")
    assert_user_error(info.value, AdapterLoadError, "someone/missing-lora", "network is unreachable", fix="HF_TOKEN")


# ------------------------------------------------------------------------------------------------ PEFT-made refusals


def _peft_non_lora(kind: str, model, out: Path) -> Path:
    from peft import IA3Config, LoHaConfig, LoKrConfig, get_peft_model

    configs = {
        "LOHA": LoHaConfig(r=4, target_modules=["q_proj"]),
        "LOKR": LoKrConfig(r=4, target_modules=["q_proj"]),
        "IA3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    get_peft_model(copy.deepcopy(model), configs[kind]).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["LOHA", "LOKR", "IA3"])
def test_non_lora_peft_types_are_refused(llama, tmp_path, kind):
    path = _peft_non_lora(kind, llama, tmp_path / kind.lower())
    with pytest.raises(UnsupportedAdapterError) as info:
        load_adapter(path)
    assert_user_error(info.value, UnsupportedAdapterError, str(path / CONFIG), kind, fix="convert")


@pytest.mark.parametrize("kwargs,field", [
    ({"use_dora": True}, "use_dora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_peft_made_unsupported_lora_variants(adapter_factory, kwargs, field):
    path = adapter_factory(r=4, target_modules=["q_proj"], **kwargs)
    with pytest.raises(UnsupportedAdapterError) as info:
        load_adapter(path)
    assert_user_error(info.value, UnsupportedAdapterError, str(path / CONFIG), field, fix="retrain")


def test_embedding_lora_with_peft_saved_base_layers_loads(adapter_factory):
    """PEFT saves full copies of targeted embedding layers; they are ignored, the LoRA deltas are kept."""
    path = adapter_factory(r=4, target_modules=["embed_tokens", "lm_head", "q_proj"])
    keys = load_file(str(path / WEIGHTS))
    assert any(k.endswith(".base_layer.weight") for k in keys)
    adapter = load_adapter(path)
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
    scale = 8 / 4
    A = keys["base_model.model.model.embed_tokens.lora_embedding_A"]
    B = keys["base_model.model.model.embed_tokens.lora_embedding_B"]
    torch.testing.assert_close(adapter.factors("model.embed_tokens").delta(), scale * B @ A)


# ------------------------------------------------------------------------------------------------ pickle


def _to_pickle(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path / WEIGHTS))
    torch.save(tensors, path / "adapter_model.bin")
    (path / WEIGHTS).unlink()
    return tensors


def test_pickle_is_refused_by_default(clean):
    _to_pickle(clean)
    with pytest.raises(AdapterLoadError) as info:
        load_adapter(clean)
    assert_user_error(info.value, AdapterLoadError, "adapter_model.bin", "arbitrary code", fix="--allow-pickle")


def test_pickle_is_refused_in_a_merge_recipe(clean, source_adapter, tmp_path):
    _to_pickle(clean)
    with pytest.raises(AdapterLoadError) as info:
        merge(adapters=[source_adapter, clean], method="task_arithmetic")
    assert_user_error(info.value, AdapterLoadError, "adapter_model.bin", fix="allow_pickle=True")


def test_pickle_allowed_loads_the_same_factors(clean, source_adapter):
    _to_pickle(clean)
    expected = read_all(source_adapter)
    got = read_all(clean, allow_pickle=True)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


class _Exploit:
    """A pickle payload that runs code when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_allowed_still_never_runs_code(clean, tmp_path):
    marker = tmp_path / "pwned"
    (clean / WEIGHTS).unlink()
    with open(clean / "adapter_model.bin", "wb") as fh:
        pickle.dump({KEY_A: _Exploit(str(marker))}, fh)
    with pytest.raises(AdapterLoadError) as info:
        load_adapter(clean, allow_pickle=True)
    assert_user_error(info.value, AdapterLoadError, "adapter_model.bin", fix="safetensors")
    assert not marker.exists(), "unpickling ran code"
