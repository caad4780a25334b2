"""Composition: parsing and bounds, path escapes, the exact concatenation against a dense oracle,
truncation against the dense SVD, canonical keys, the bounded LRU with leases, routing and the bundle seam."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramerge.core.adapter import LoraFactors
from loramerge.serving.bounds import Bounds
from loramerge.serving.cache import ComposedAdapter, CompositionCache
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.errors import CompositionError, UnknownAdapterError
from loramerge.serving.grammar import Composition, parse_model_field

# ----------------------------------------------------------------------------- dense oracle, from the files


def dense_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """module -> scale * B @ A, read straight from the PEFT files (PEFT's rules: alpha/r, rank/alpha patterns)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        B = tensors[key.replace("lora_A", "lora_B")]
        r = A.shape[0]
        alpha = cfg["lora_alpha"]
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        out[module] = (alpha / r) * (B.double() @ A.double())
    return out


def mix_oracle(dirs_and_weights: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, w in dirs_and_weights:
        for module, delta in dense_deltas(path).items():
            total[module] = total.get(module, 0) + w * delta
    return total


@pytest.fixture()
def composer(adapter_root, tmp_path):
    c = Composer(AdapterCatalog(roots=[adapter_root]), cache_dir=tmp_path / "cache", cache_size=8, device="cpu")
    yield c
    c.close()


# ----------------------------------------------------------------------------- parsing and bounds


def test_parse_forms():
    assert parse_model_field("code").kind == "adapter"
    assert parse_model_field("base").kind == "base"
    assert parse_model_field("auto").kind == "auto"
    mix = parse_model_field("mix:code=0.7, math=0.3")
    assert mix.kind == "mix" and mix.terms == (("code", 0.7), ("math", 0.3)) and mix.method == "task_arithmetic"
    assert parse_model_field("mix:code=1,math=1;method=average").method == "average"
    assert parse_model_field("mix:code=1;method=linear").method == "task_arithmetic"  # alias
    structured = parse_model_field({"adapters": {"code": 0.5, "math": -0.25}, "method": "average"})
    assert structured.terms == (("code", 0.5), ("math", -0.25)) and structured.method == "average"
    bundle = parse_model_field("basis:my-basis/code")
    assert bundle.kind == "bundle" and bundle.bundle == ("basis", "my-basis", "code")


@pytest.mark.parametrize("model, needle", [
    ("", "names no model"),
    ("../etc/passwd", "characters"),
    ("a/b", "characters"),
    ("mix:../code=1", "characters"),
    ("mix:code=1,code=2", "twice"),
    ("mix:code", "no '=WEIGHT'"),
    ("mix:code=abc", "not a number"),
    ("mix:code=nan", "finite"),
    ("mix:code=inf", "finite"),
    ("mix:code=1e9", "finite"),
    ("mix:" + ",".join(f"a{i}=0.1" for i in range(9)), "limit is 8"),
    ("mix:", "empty mix"),
    ("mix:code=1;method=ties", "not an exact factored method"),
    ("mix:code=1;method=nope", "unknown merge method"),
    ("mix:code=1;rank=4", "unknown mix option"),
    ("basis:../x/task", "characters"),
    ("basis:dir", "names no task"),
    ("http://evil/x", "unknown model prefix"),
    ("x" * 65, "longer than 64"),
    ("m" * 5000, "longer than 1024"),
])
def test_parse_rejects(model, needle):
    with pytest.raises(CompositionError) as info:
        parse_model_field(model)
    assert needle in str(info.value)
    assert info.value.http_status == 400


@pytest.mark.parametrize("data, needle", [
    ({"adapters": {}}, "non-empty"),
    ({"adapters": {"code": "x"}}, "must be a number"),
    ({"adapters": {"code": True}}, "must be a number"),
    ({"adapters": {"code": 1}, "extra": 1}, "unknown composition field"),
    ({"adapters": {f"a{i}": 1 for i in range(20)}}, "limit is 8"),
    ({"adapters": {"code": 1}, "parameters": {"lambda": [1, 2]}}, "number, bool or short string"),
])
def test_parse_rejects_structured(data, needle):
    with pytest.raises(CompositionError, match=needle):
        parse_model_field(data)


def test_bounds_are_configurable():
    bounds = Bounds(max_adapters_per_mix=2, max_abs_weight=1.0)
    with pytest.raises(CompositionError, match="limit is 2"):
        parse_model_field("mix:a=0.1,b=0.1,c=0.1", bounds=bounds)
    with pytest.raises(CompositionError, match=r"\|w\| <= 1.0"):
        parse_model_field("mix:a=1.5", bounds=bounds)
    with pytest.raises(CompositionError, match="tokens"):
        bounds.check_prompt_tokens(5000)


# ----------------------------------------------------------------------------- path escapes


def test_names_cannot_escape_roots(adapter_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    link_root = tmp_path / "root"
    link_root.mkdir()
    (link_root / "evil").symlink_to(outside)  # a link inside the root that points out of it
    catalog = AdapterCatalog(roots=[link_root, adapter_root])
    with pytest.raises(CompositionError, match="outside the adapter root"):
        catalog.path_for("evil")
    for name in ("..", "../outside", "/etc", "code/../../x", ".hidden"):
        with pytest.raises(CompositionError):
            catalog.path_for(name)
    assert catalog.path_for("code") == (adapter_root / "code").resolve()
    with pytest.raises(UnknownAdapterError) as info:
        catalog.path_for("nope")
    assert info.value.http_status == 404
    assert "evil" not in catalog.names() and {"code", "math", "chat", "wide"} <= set(catalog.names())


def test_explicit_adapters_must_be_adapter_dirs(tmp_path, adapter_root):
    with pytest.raises(CompositionError, match="not a PEFT adapter directory"):
        AdapterCatalog({"x": tmp_path})
    with pytest.raises(CompositionError, match="characters"):
        AdapterCatalog({"bad/name": adapter_root / "code"})
    assert AdapterCatalog({"mine": adapter_root / "code"}).path_for("mine") == (adapter_root / "code").resolve()


# ----------------------------------------------------------------------------- exact composition


def composed_deltas(adapter: ComposedAdapter) -> dict[str, torch.Tensor]:
    return dense_deltas(adapter.path)


def test_mix_is_the_exact_weighted_sum(composer, adapter_root):
    built = composer.build(composer.resolve(composer.parse("mix:code=0.7,math=-0.3,chat=1.25")))
    assert not built.cache_hit and not built.adapter.truncated
    assert built.adapter.rank == 16  # q_proj: code (8) + math (8); v_proj: code (8) + chat (4)
    want = mix_oracle([(adapter_root / "code", 0.7), (adapter_root / "math", -0.3), (adapter_root / "chat", 1.25)])
    got = composed_deltas(built.adapter)
    assert set(got) == set(want)
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-6)
    assert built.adapter.max_rel_error == 0.0


def test_average_normalises_by_the_weights(composer, adapter_root):
    built = composer.build(composer.resolve(composer.parse({"adapters": {"code": 3, "chat": 1}, "method": "average"})))
    code, chat = dense_deltas(adapter_root / "code"), dense_deltas(adapter_root / "chat")
    got = composed_deltas(built.adapter)
    assert set(got) == set(code) | set(chat)
    for module, delta in got.items():
        # 'average' normalises by all the weights; an adapter without the module contributes a zero delta
        # there (model-soup semantics, issue 14 item 3: the same as `loramerge merge`)
        weights = {n: w for n, w, d in (("code", 3.0, code), ("chat", 1.0, chat)) if module in d}
        expected = sum((w / 4.0) * {"code": code, "chat": chat}[n][module] for n, w in weights.items())
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_truncation_above_max_rank_is_the_best_low_rank_fit(adapter_root, tmp_path):
    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=8, cache_dir=tmp_path / "c", device="cpu")
    built = composer.build(composer.resolve(composer.parse("mix:code=0.6,wide=0.4")))
    adapter = built.adapter
    assert adapter.truncated and adapter.rank == 8 and adapter.source_rank == 24
    want = mix_oracle([(adapter_root / "code", 0.6), (adapter_root / "wide", 0.4)])
    got = composed_deltas(adapter)
    worst = 0.0
    for module, delta in want.items():
        U, S, Vh = torch.linalg.svd(delta)
        best = (U[:, :8] * S[:8]) @ Vh[:8]
        torch.testing.assert_close(got[module], best, rtol=1e-4, atol=1e-5)
        worst = max(worst, math.sqrt(float((S[8:] ** 2).sum() / (S ** 2).sum())))
    assert adapter.max_rel_error == pytest.approx(worst, rel=1e-4)
    assert built.describe()["truncated"] is True
    cfg = json.loads((adapter.path / "adapter_config.json").read_text())
    assert max([cfg["r"], *cfg["rank_pattern"].values()]) <= 8
    composer.close()


def test_named_adapter_is_served_from_its_own_directory(composer, adapter_root):
    built = composer.build(composer.resolve(composer.parse("code")))
    assert built.adapter.path == (adapter_root / "code").resolve() and not built.adapter.owned
    composer.close()
    assert (adapter_root / "code" / "adapter_config.json").is_file()  # never deleted


def test_named_adapter_above_max_rank_is_truncated(adapter_root, tmp_path):
    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=8, cache_dir=tmp_path / "c", device="cpu")
    built = composer.build(composer.resolve(composer.parse("wide")))
    assert built.adapter.truncated and built.adapter.rank == 8 and built.adapter.owned
    composer.close()


def test_max_rank_must_be_one_vllm_accepts(adapter_root):
    with pytest.raises(CompositionError, match="one vLLM accepts"):
        Composer(AdapterCatalog(roots=[adapter_root]), max_rank=12)


# ----------------------------------------------------------------------------- keys, ids and the cache


def test_canonical_key(composer, adapter_root):
    def built(model):
        return composer.build(composer.resolve(composer.parse(model)))

    a = built("mix:code=0.7,math=0.3")
    b = built("mix:math=0.3,code=0.70001")  # same after sorting and quantising to 1e-4
    c = built("mix:code=0.3,math=0.7")
    assert b.cache_hit and b.adapter.key == a.adapter.key and b.adapter.lora_int_id == a.adapter.lora_int_id
    assert c.adapter.key != a.adapter.key and c.adapter.lora_int_id != a.adapter.lora_int_id
    assert c.adapter.lora_name != a.adapter.lora_name and c.adapter.path != a.adapter.path
    assert built("mix:code=0.7,math=0.3;method=average").adapter.key != a.adapter.key
    assert built("mix:code=0.7,math=0").composition.kind == "mix"  # zero terms dropped ...
    assert built("mix:code=0.7,math=0").composition.terms == (("code", 0.7),)
    assert built("mix:code=1,math=0").composition.kind == "adapter"  # ... down to the adapter itself
    assert built("mix:code=0,math=0").adapter is None  # nothing left: the base model


def test_key_follows_the_adapter_content(adapter_root, tmp_path, serving_base):
    import shutil

    from loramerge.demo.toy import make_adapter

    root = tmp_path / "root"
    shutil.copytree(adapter_root / "code", root / "code")
    composer = Composer(AdapterCatalog(roots=[root]), cache_dir=tmp_path / "c", device="cpu")
    first = composer.build(composer.resolve(composer.parse("mix:code=0.5")))
    make_adapter(serving_base[0], tmp_path / "other", seed=99, r=8, target_modules=["q_proj"])
    shutil.rmtree(root / "code")
    shutil.copytree(tmp_path / "other", root / "code")
    os.utime(root / "code" / "adapter_model.safetensors", ns=(1, 1))
    second = composer.build(composer.resolve(composer.parse("mix:code=0.5")))
    assert second.adapter.key != first.adapter.key and not second.cache_hit
    composer.close()


def _fake(key: str, path: Path) -> ComposedAdapter:
    path.mkdir(parents=True, exist_ok=True)
    return ComposedAdapter(key=key, composition=Composition(kind="base"), lora_name=key, lora_int_id=1, path=path,
                           rank=1, source_rank=1, truncated=False, max_rel_error=0.0)


def test_cache_is_a_bounded_lru_that_spares_leased_entries(tmp_path):
    cache = CompositionCache(capacity=2)
    a, b, c, d = (_fake(k, tmp_path / k) for k in "abcd")
    cache.put(a)
    cache.put(b, lease=True)
    assert cache.get("a") is a  # a is now the most recent
    cache.put(c)  # order b, a, c: b is the least recent but leased, so a goes
    assert "b" in cache and "c" in cache and "a" not in cache and not a.path.exists()
    cache.put(d)  # b still leased: c goes
    assert "b" in cache and "d" in cache and not c.path.exists() and len(cache) == 2
    cache.release("b")
    assert cache.leases("b") == 0 and "b" in cache
    e = _fake("e", tmp_path / "e")
    cache.put(e)
    assert "b" not in cache and not b.path.exists() and len(cache) == 2 and cache.evictions == 3


def test_cache_never_evicts_with_no_capacity(tmp_path):
    cache = CompositionCache(capacity=None)
    for k in "abcdef":
        cache.put(_fake(k, tmp_path / k))
    assert len(cache) == 6 and all((tmp_path / k).exists() for k in "abcdef")


def test_composer_rebuilds_an_evicted_composition_with_the_same_id(adapter_root, tmp_path):
    composer = Composer(AdapterCatalog(roots=[adapter_root]), cache_dir=tmp_path / "c", cache_size=1, device="cpu")
    first = composer.build(composer.resolve(composer.parse("mix:code=0.5,math=0.5")))
    with composer.leased(composer.resolve(composer.parse("mix:code=0.25,math=0.5"))) as other:
        assert other.adapter.path.is_dir() and not first.adapter.path.exists()
    again = composer.build(composer.resolve(composer.parse("mix:code=0.5,math=0.5")))
    assert not again.cache_hit and again.adapter.lora_int_id == first.adapter.lora_int_id
    assert again.adapter.path.is_dir() and composer.stats.misses == 3 and composer.cache.evictions == 2
    composer.close()


# ----------------------------------------------------------------------------- auto and bundles


class FixedRouter:
    def __init__(self, table):
        self.table = table
        self.calls = 0

    def route(self, prompts):
        self.calls += 1
        return [dict(self.table[p]) for p in prompts]


def test_auto_routes_each_prompt(adapter_root, tmp_path):
    router = FixedRouter({"p1": {"code": 0.712, "math": 0.288}, "p2": {"chat": 1.0}, "p3": {"code": 0.004}})
    composer = Composer(AdapterCatalog(roots=[adapter_root]), cache_dir=tmp_path / "c", router=router, device="cpu")
    specs = [composer.parse("auto")] * 3 + [composer.parse("math")]
    comps = composer.resolve_many(specs, ["p1", "p2", "p3", "ignored"])
    assert router.calls == 1
    assert comps[0].terms == (("code", 0.71), ("math", 0.29)) and comps[0].routed  # route_quantum 0.01
    assert comps[1].kind == "adapter" and comps[1].terms == (("chat", 1.0),)
    assert comps[2].kind == "base" and comps[2].routed  # every weight rounded away
    assert comps[3].kind == "adapter" and not comps[3].routed
    bad = Composer(AdapterCatalog(roots=[adapter_root]), router=FixedRouter({"x": {"../etc": 1.0}}), device="cpu")
    with pytest.raises(CompositionError):
        bad.resolve(bad.parse("auto"), "x")
    unknown = Composer(AdapterCatalog(roots=[adapter_root]), router=FixedRouter({"x": {"ghost": 1.0}}), device="cpu")
    with pytest.raises(UnknownAdapterError):
        unknown.resolve(unknown.parse("auto"), "x")
    none = Composer(AdapterCatalog(roots=[adapter_root]), device="cpu")
    with pytest.raises(CompositionError, match="needs a router"):
        none.resolve(none.parse("auto"), "x")
    for c in (composer, bad, unknown, none):
        c.close()


def test_bundle_seam(adapter_root, tmp_path):
    bundle_root = tmp_path / "bundles"
    (bundle_root / "my-basis").mkdir(parents=True)
    (bundle_root / "my-basis" / "manifest.json").write_text("{}")
    torch.manual_seed(0)
    A, B = torch.randn(2, 128), torch.randn(128, 2)
    calls = []

    def extract(path, task):
        calls.append((path, task))
        if task != "code":
            raise KeyError(task)
        return {"model.layers.0.self_attn.q_proj": LoraFactors(A=A, B=B)}

    composer = Composer(AdapterCatalog(roots=[bundle_root]), cache_dir=tmp_path / "c", device="cpu",
                        bundle_extractors={"basis": extract})
    built = composer.build(composer.resolve(composer.parse("basis:my-basis/code")))
    assert calls == [((bundle_root / "my-basis").resolve(), "code")]
    got = dense_deltas(built.adapter.path)["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(got, (B @ A).double(), rtol=1e-5, atol=1e-5)
    assert built.describe()["label"] == "basis:my-basis/code"
    with pytest.raises(UnknownAdapterError, match="no task"):
        composer.build(composer.resolve(composer.parse("basis:my-basis/math")))
    with pytest.raises(UnknownAdapterError, match="unknown bundle"):
        composer.build(composer.resolve(composer.parse("basis:ghost/code")))
    with pytest.raises(CompositionError, match="cannot read twin bundles"):
        composer.build(composer.resolve(composer.parse("twin:my-basis/code")))
    composer.close()


# ----------------------------------------------------------------------------- the zero adapter


def test_zero_adapter_runs_the_base_model_exactly(composer, serving_base):
    import copy

    from peft import PeftModel

    model, _ = serving_base
    zero = composer.zero_adapter()
    tensors = load_file(str(zero.path / "adapter_model.safetensors"))
    assert len(tensors) == 2 and all(float(t.abs().max()) == 0.0 for k, t in tensors.items() if "lora_B" in k)
    ids = torch.tensor([[5, 9, 17, 33, 60]])
    with torch.no_grad():
        want = model(ids).logits
        peft = PeftModel.from_pretrained(copy.deepcopy(model), str(zero.path)).eval()
        got = peft(ids).logits
    assert torch.equal(got, want)
    assert composer.zero_adapter() is zero
