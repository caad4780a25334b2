"""The bad-input battery: every way a user can hand loramerge something wrong.

Each case asserts the exact error class, that the message names the file or module at fault, and that it
says what to do (the ``fix`` line). Cases that should *work* (disjoint targets, rank beyond d, ``force``)
assert the result against an independent dense computation. Output failures assert the guarantee:
previous output and inputs byte-identical, no partial or temporary directory left.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loramerge import load_adapter, merge
from loramerge.demo.toy import make_adapter, tiny_llama
from loramerge.errors import (
    AdapterLoadError,
    IncompatibleAdaptersError,
    LoramergeError,
    NumericalError,
    OutputError,
    RecipeError,
    UnsupportedAdapterError,
)
from loramerge.merging.recipe import load_recipe

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


# ------------------------------------------------------------------------------------------------ helpers


def assert_user_error(exc: BaseException, cls: type[LoramergeError], *mentions: str, fix: str = "") -> None:
    """The exact class, a fix line, and every mention (file, module, key) in the rendered message."""
    assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
    text = str(exc)
    assert exc.fix, f"no fix in: {text}"
    assert "  fix: " in text
    assert fix.lower() in exc.fix.lower(), f"fix {exc.fix!r} lacks {fix!r}"
    for mention in mentions:
        assert mention in text, f"{mention!r} not named in: {text}"


def read_all(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """Load an adapter and read every module (errors raised while reading count)."""
    adapter = load_adapter(path, **kwargs)
    return {name: adapter.factors(name).delta() for name in adapter.modules}


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (relative names), to prove nothing changed."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[f"{root.name}/{p.relative_to(root)}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary or backup directories the atomic writer might have left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(changes)
    (path / CONFIG).write_text(json.dumps(cfg))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = (path / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_with_header(path: Path, header: dict | str | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    header, data = header_of(path)
    change(header)
    write_with_header(path, header, data)


@pytest.fixture(scope="module")
def source_adapter(adapter_factory) -> Path:
    return adapter_factory(seed=101, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def clean(source_adapter, tmp_path) -> Path:
    """A private copy of a valid adapter, to damage."""
    return Path(shutil.copytree(source_adapter, tmp_path / "victim"))


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


# ------------------------------------------------------------------------------------------------ incompatible sets


def dense_delta(path: Path, module: str) -> torch.Tensor:
    """Independent oracle: scale * B @ A read straight from the file and the config."""
    cfg = json.loads((path / CONFIG).read_text())
    t = load_file(str(path / WEIGHTS))
    A = t[f"base_model.model.{module}.lora_A.weight"].double()
    B = t[f"base_model.model.{module}.lora_B.weight"].double()
    return cfg["lora_alpha"] / cfg["r"] * B @ A


def merged_delta(result, module: str) -> torch.Tensor:
    f = result.factors()[module]
    return f.B.double() @ f.A.double()


def test_different_base_models(adapter_factory):
    a = adapter_factory(r=4, base_name="org/base-one")
    b = adapter_factory(r=4, base_name="org/base-two")
    with pytest.raises(IncompatibleAdaptersError) as info:
        merge(adapters=[a, b], method="task_arithmetic")
    assert_user_error(info.value, IncompatibleAdaptersError, "org/base-one", "org/base-two", fix="base_model")


def test_different_base_names_accepted_when_the_recipe_says_so(adapter_factory):
    a = adapter_factory(r=4, base_name="org/base-one")
    b = adapter_factory(r=4, base_name="./local/base-one")
    result = merge(adapters=[a, b], method="task_arithmetic", base_model="org/base-one")
    assert result.config["base_model_name_or_path"] == "org/base-one"
    torch.testing.assert_close(merged_delta(result, Q0), dense_delta(a, Q0) + dense_delta(b, Q0))


def test_mismatched_shapes(adapter_factory, tmp_path):
    narrow = tiny_llama(seed=1, hidden=32)
    a = adapter_factory(r=4)
    b = make_adapter(narrow, tmp_path / "narrow", seed=3, r=4)  # same base name, other widths
    with pytest.raises(IncompatibleAdaptersError) as info:
        merge(adapters=[a, b], method="task_arithmetic")
    assert_user_error(info.value, IncompatibleAdaptersError, "shape mismatch", "64x64", "32x32",
                      str(b / WEIGHTS), fix="base model")


@pytest.mark.parametrize("targets_b", [["o_proj", "down_proj"], ["v_proj", "down_proj"]],
                         ids=["disjoint", "overlapping"])
def test_different_target_modules_merge_as_the_union(adapter_factory, targets_b, tmp_path):
    a = adapter_factory(r=4, target_modules=["q_proj", "v_proj"])
    b = adapter_factory(r=6, lora_alpha=12, target_modules=targets_b)
    result = merge(adapters=[a, b], method="task_arithmetic", weights=[0.7, 0.4], output=tmp_path / "out")
    mods_a, mods_b = set(load_adapter(a).modules), set(load_adapter(b).modules)
    assert {m.name for m in result.modules} == mods_a | mods_b
    for module in mods_a | mods_b:
        expected = sum(w * dense_delta(p, module) for p, w, mods in ((a, 0.7, mods_a), (b, 0.4, mods_b))
                       if module in mods)
        torch.testing.assert_close(merged_delta(result, module), expected, rtol=1e-5, atol=1e-6)
    cfg = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj", *targets_b}
    reloaded = load_adapter(tmp_path / "out")
    assert set(reloaded.modules) == mods_a | mods_b


def test_rank_beyond_the_dimension_is_merged_exactly(adapter_factory, llama, tmp_path):
    """r = 80 > d = 64 is a legal (rank-deficient) LoRA: it merges exactly, and PEFT loads the result."""
    from peft import PeftModel

    wide = adapter_factory(r=80, lora_alpha=80, target_modules=["q_proj"])
    small = adapter_factory(r=4, target_modules=["q_proj"])
    for rank in ("exact", 1000):
        result = merge(adapters=[wide, small], method="task_arithmetic", rank=rank)
        torch.testing.assert_close(merged_delta(result, Q0), dense_delta(wide, Q0) + dense_delta(small, Q0),
                                   rtol=1e-4, atol=1e-5)
    result.save(tmp_path / "out")
    model = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "out"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.get_delta_weight("default").double(), merged_delta(result, Q0),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ recipes and weights


def test_average_with_weights_summing_to_zero(source_adapter, adapter_factory):
    other = adapter_factory(r=4)
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, other], method="average", weights=[1.0, -1.0])
    assert_user_error(info.value, RecipeError, "average", "sum to zero", Q0, fix="weights")


def test_normalized_task_arithmetic_with_weights_summing_to_zero(source_adapter, adapter_factory):
    other = adapter_factory(r=4)
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, other], method="task_arithmetic", weights=[0.5, -0.5],
              parameters={"normalize": True})
    assert_user_error(info.value, RecipeError, "task_arithmetic", Q0, fix="weights")


RECIPE_VALUE_CASES = [
    ("empty-adapter-list", {"adapters": []}, "adapters", "examples"),
    ("rank-zero", {"rank": 0}, "rank", "examples"),
    ("rank-negative", {"rank": -3}, "rank", "examples"),
    ("rank-word", {"rank": "everything"}, "rank", "examples"),
    ("dtype-typo", {"dtype": "bf16"}, "bfloat16", "examples"),
    ("weight-nan", {"adapters": [{"path": "PATH", "weight": float("nan")}]}, "finite", "examples"),
    ("weight-inf", {"adapters": [{"path": "PATH", "weight": float("inf")}]}, "finite", "examples"),
    ("parameter-wrong-type", {"parameters": {"lambda": "big"}}, "lambda", "loramerge methods"),
]


@pytest.mark.parametrize("override,mention,fix", [c[1:] for c in RECIPE_VALUE_CASES],
                         ids=[c[0] for c in RECIPE_VALUE_CASES])
def test_bad_recipe_values(source_adapter, tmp_path, override, mention, fix):
    import yaml

    recipe = {"method": "task_arithmetic", "adapters": [{"path": str(source_adapter)}], **override}
    if recipe["adapters"] and recipe["adapters"][0].get("path") == "PATH":
        recipe["adapters"][0]["path"] = str(source_adapter)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), mention, fix=fix)


TYPO_CASES = [
    ("top-level-key", {"methd": "ties"}, "did you mean 'method'?"),
    ("adapter-key", {"adapters": [{"path": "PATH", "weigth": 0.5}]}, "did you mean 'weight'?"),
    ("parameter-key", {"method": "ties", "parameters": {"densty": 0.3}}, "did you mean 'density'?"),
    ("alias-parameter-key", {"parameters": {"lamda": 0.5}}, "did you mean 'lambda'?"),
    ("method-name", {"method": "tie"}, "did you mean 'ties'?"),
    ("method-alias", {"method": "linaer"}, "did you mean 'linear'?"),
]


@pytest.mark.parametrize("override,suggestion", [c[1:] for c in TYPO_CASES], ids=[c[0] for c in TYPO_CASES])
def test_recipe_typos_suggest_the_nearest_name(source_adapter, tmp_path, override, suggestion):
    import yaml

    recipe = {"method": "task_arithmetic", "adapters": [{"path": str(source_adapter)}], **override}
    if "methd" in recipe:
        del recipe["method"]
    for entry in recipe["adapters"]:
        if entry.get("path") == "PATH":
            entry["path"] = str(source_adapter)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), suggestion)


@pytest.mark.parametrize("content,mention,fix", [
    (None, "not found", "check the path"),
    ("method: ties\nadapters: [a, b\n", "not valid YAML", "YAML syntax"),
    ("- method: ties\n", "must be a mapping", "examples"),
], ids=["missing-file", "invalid-yaml", "not-a-mapping"])
def test_bad_recipe_files(tmp_path, content, mention, fix):
    path = tmp_path / "recipe.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), mention, fix=fix)


def test_duplicate_adapter_names(source_adapter, adapter_factory):
    other = adapter_factory(r=4)
    with pytest.raises(RecipeError) as info:
        merge({"method": "task_arithmetic", "adapters": [{"path": str(source_adapter), "name": "code"},
                                                          {"path": str(other), "name": "code"}]})
    assert_user_error(info.value, RecipeError, "'code'", fix="distinct name")


def test_same_adapter_listed_twice(source_adapter):
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, source_adapter], method="task_arithmetic")
    assert_user_error(info.value, RecipeError, str(source_adapter), fix="raise its weight")


def test_weights_count_mismatch(source_adapter, adapter_factory):
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, adapter_factory(r=4)], method="task_arithmetic", weights=[1.0])
    assert_user_error(info.value, RecipeError, "1 weights for 2 adapters", fix="one weight per adapter")


def test_no_method(source_adapter):
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter])
    assert_user_error(info.value, RecipeError, "no merge method", fix="method=")


def test_empty_adapter_list_in_python():
    with pytest.raises(RecipeError) as info:
        merge(adapters=[], method="task_arithmetic")
    assert_user_error(info.value, RecipeError, "adapters", fix="examples")


# ------------------------------------------------------------------------------------------------ output paths


@pytest.fixture
def pair(adapter_factory) -> list[Path]:
    return [adapter_factory(r=4, target_modules=["q_proj"]), adapter_factory(r=4, target_modules=["q_proj"])]


def _merge(pair, output, **kwargs):
    return merge(adapters=pair, method="task_arithmetic", output=output, **kwargs)


def test_output_exists_without_force(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError) as info:
        _merge(pair, out)
    assert_user_error(info.value, OutputError, str(out), fix="--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_exists_with_force_is_replaced(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = _merge(pair, out, force=True)
    assert not (out / "stale.txt").exists()
    torch.testing.assert_close(load_adapter(out).factors(Q0).delta().double(), merged_delta(result, Q0))
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_output_is_a_file(pair, tmp_path, force):
    out = tmp_path / "out"
    out.write_text("not a directory")
    with pytest.raises(OutputError) as info:
        _merge(pair, out, force=force)
    assert_user_error(info.value, OutputError, str(out), fix="directory path")
    assert out.read_text() == "not a directory"


def test_output_parent_unwritable(pair, tmp_path, monkeypatch):
    """Root ignores mode bits, so the permission check is simulated at os.access."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(OutputError) as info:
        _merge(pair, locked / "sub" / "out")
    assert_user_error(info.value, OutputError, str(locked), fix="writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_overlapping_an_input(adapter_factory, tmp_path, where):
    victim = Path(shutil.copytree(adapter_factory(r=4), tmp_path / "inputs" / "a"))
    other = adapter_factory(r=4)
    out = {"inside": victim / "merged", "same": victim, "parent": victim.parent}[where]
    before = tree_digest(victim)
    with pytest.raises(OutputError) as info:
        merge(adapters=[victim, other], method="task_arithmetic", output=out, force=True)
    assert_user_error(info.value, OutputError, str(out.resolve()), str(victim.resolve()), fix="outside")
    assert tree_digest(victim) == before


def _fail_on(monkeypatch, target, attribute: str, exc: BaseException, when: Callable[..., bool] = lambda *a, **k: True):
    real = getattr(target, attribute)

    def failing(*args, **kwargs):
        if when(*args, **kwargs):
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attribute, failing)


WRITE_FAILURES = [
    ("disk-full-in-weights", "save_file", OSError(errno.ENOSPC, "No space left on device")),
    ("disk-full-in-config", "write_text", OSError(errno.ENOSPC, "No space left on device")),
    ("interrupt-in-card", "write_text", KeyboardInterrupt()),
    ("interrupt-in-weights", "save_file", KeyboardInterrupt()),
]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-previous"])
@pytest.mark.parametrize("where,exc", [c[1:] for c in WRITE_FAILURES], ids=[c[0] for c in WRITE_FAILURES])
def test_failure_mid_write_changes_nothing(pair, tmp_path, monkeypatch, where, exc, existing):
    import safetensors.torch

    out = tmp_path / "out"
    if existing:
        _merge(pair, out)
    before = tree_digest(*pair, *([out] if existing else []))
    if where == "save_file":
        _fail_on(monkeypatch, safetensors.torch, "save_file", exc)
    else:
        _fail_on(monkeypatch, Path, "write_text", exc,
                 when=lambda self, *a, **k: self.name == ("README.md" if isinstance(exc, KeyboardInterrupt)
                                                          else CONFIG))
    with pytest.raises((OutputError, KeyboardInterrupt)) as info:
        _merge(pair, out, force=True)
    if isinstance(exc, OSError):
        assert_user_error(info.value, OutputError, str(out), "No space left", fix="disk space")
    else:
        assert type(info.value) is KeyboardInterrupt
    assert tree_digest(*pair, *([out] if existing else [])) == before
    assert out.exists() == existing
    assert not leftovers(tmp_path)


def test_failure_while_swapping_in_restores_the_previous_output(pair, tmp_path, monkeypatch):
    """The rename of the new output fails after the old one was moved aside: the old one comes back."""
    out = tmp_path / "out"
    _merge(pair, out)
    before = tree_digest(out)
    _fail_on(monkeypatch, os, "replace", OSError(errno.EIO, "I/O error"),
             when=lambda src, dst: ".tmp-" in Path(src).name)
    with pytest.raises(OutputError) as info:
        _merge(pair, out, force=True)
    assert_user_error(info.value, OutputError, str(out), "I/O error", fix="nothing was changed")
    assert tree_digest(out) == before
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ fuzz


ALLOWED_ON_MUTATION = (AdapterLoadError, UnsupportedAdapterError, NumericalError)


@pytest.fixture(scope="module")
def pristine(source_adapter) -> tuple[bytes, bytes]:
    return (source_adapter / CONFIG).read_bytes(), (source_adapter / WEIGHTS).read_bytes()


def _fresh_dir(tmp_path_factory, config: bytes, weights: bytes) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / CONFIG).write_bytes(config)
    (d / WEIGHTS).write_bytes(weights)
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=2048))
def test_fuzz_random_bytes_are_a_load_error(pristine, tmp_path_factory, blob):
    d = _fresh_dir(tmp_path_factory, pristine[0], blob)
    with pytest.raises(AdapterLoadError) as info:
        read_all(d)
    assert str(d / WEIGHTS) in str(info.value) and info.value.fix


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_random_prefix_and_header_bytes(pristine, tmp_path_factory, data):
    """Random header-length prefix followed by random (often JSON-looking) header bytes."""
    n = data.draw(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(min_value=0, max_value=600))
    header = data.draw(st.binary(max_size=600) | st.text(alphabet='{}[]":,0123456789-eE.FBI_ dtypeshapdofsn',
                                                          max_size=300).map(str.encode))
    tail = pristine[1][-data.draw(st.integers(0, 256)):]
    d = _fresh_dir(tmp_path_factory, pristine[0], struct.pack("<Q", n) + header + tail)
    with pytest.raises(AdapterLoadError):
        read_all(d)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# Shapes and offsets that look almost right: negative, huge, float (inf, nan), bool or string entries.
NUMBER_LISTS = st.lists(st.integers(-2**40, 2**70) | st.floats() | st.booleans() | st.text(max_size=3), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_headers(pristine, tmp_path_factory, data):
    """Structured mutations of a valid header: every outcome is a clean load or a loramerge error."""
    raw = pristine[1]
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    keys = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(keys))
    mutation = data.draw(st.sampled_from(["field", "drop-field", "rename", "drop-tensor", "entry", "bytes"]))
    if mutation == "field":
        header[key][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON_VALUES
                                                                                                | NUMBER_LISTS)
    elif mutation == "drop-field":
        del header[key][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "rename":
        header[data.draw(st.text(max_size=40))] = header.pop(key)
    elif mutation == "drop-tensor":
        del header[key]
    elif mutation == "entry":
        header[key] = data.draw(JSON_VALUES)
    blob = json.dumps(header).encode()
    if mutation == "bytes":
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), min_size=1,
                                   max_size=8))
        mutable = bytearray(blob)
        for pos, value in flips:
            mutable[pos] = value
        blob = bytes(mutable)
    d = _fresh_dir(tmp_path_factory, pristine[0], struct.pack("<Q", len(blob)) + blob + body)
    try:
        deltas = read_all(d)
    except ALLOWED_ON_MUTATION as exc:
        assert exc.fix and str(d) in str(exc)
        return
    for delta in deltas.values():  # a mutation that kept the file valid must still give finite factors
        assert torch.isfinite(delta).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["shape", "data_offsets"]), value=NUMBER_LISTS, which=st.integers(0, 7))
def test_fuzz_shapes_and_offsets(pristine, tmp_path_factory, field, value, which):
    """Near-miss shapes and offsets (found: float('inf') in a shape used to escape as OverflowError)."""
    raw = pristine[1]
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    keys = sorted(k for k in header if k != "__metadata__")
    header[keys[which % len(keys)]][field] = value
    blob = json.dumps(header).encode()
    d = _fresh_dir(tmp_path_factory, pristine[0], struct.pack("<Q", len(blob)) + blob + body)
    try:
        read_all(d)
    except ALLOWED_ON_MUTATION as exc:
        assert exc.fix and str(d) in str(exc)
