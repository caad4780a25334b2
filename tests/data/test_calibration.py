"""Calibration statistics and the data-informed methods against dense references written from the papers."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors import safe_open

from loramerge.core.adapter import load_adapter
from loramerge.data.calibration import calibrate
from loramerge.data.statistics import CalibrationStats
from loramerge.demo.toy import WORDS, make_tokenizer
from loramerge.merging.engine import merge
from loramerge.merging.methods.data import scaled_gram
from loramerge.merging.methods.lines import LinesConfig, lines_factor


def texts(seed: int, n: int = 6) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(llama, llama_dir, three_adapters, tmp_path_factory):
    names = ["a", "b", "c"]
    data = {n: texts(i) for i, n in enumerate(names)}
    adapters = dict(zip(names, three_adapters))
    out = tmp_path_factory.mktemp("calib") / "stats"
    calibrate(llama_dir, adapters, data, out, batch_size=4, fisher=True, show_progress=False)
    return names, data, adapters, out


def reference_inputs(llama, adapter_dir, module: str, batch: list[str], *, apply: bool = True) -> torch.Tensor:
    """The rows X seen by ``module`` with the adapter applied through PEFT, one text at a time (no padding)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(llama), str(adapter_dir)).eval() if apply else llama
    target = model.get_submodule(("base_model.model." if apply else "") + module)
    rows: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    tok = make_tokenizer()
    with torch.no_grad():
        for text in batch:
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    handle.remove()
    return torch.cat(rows).double()


def test_grams_equal_the_adapted_models_inputs(setup, llama):
    names, data, adapters, out = setup
    manifest = json.loads((out / "calibration.json").read_text())
    assert manifest["source"] == "adapter" and manifest["truncated"] == 0 and manifest["fisher"]
    inputs = manifest["inputs"]
    # q/k/v share the attention input, gate/up the MLP input: one Gram each, stored once
    layer = "model.layers.1"
    assert inputs[f"{layer}.self_attn.v_proj"] == inputs[f"{layer}.self_attn.q_proj"]
    assert inputs[f"{layer}.self_attn.o_proj"] == f"{layer}.self_attn.o_proj"
    with safe_open(str(out / manifest["adapters"][0]["file"]), "pt") as fh:
        assert sum(k.startswith("gram:") for k in fh.keys()) == len(set(inputs.values()))
    stats = CalibrationStats.open(out).bind([load_adapter(p, name=n) for n, p in adapters.items()])
    for name in names:
        for module in (f"{layer}.self_attn.o_proj", f"{layer}.mlp.down_proj"):
            X = reference_inputs(llama, adapters[name], module, data[name])
            torch.testing.assert_close(stats.gram(name, module), X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
            assert stats.tokens(name) == X.shape[0]
    # the adapter changes the statistics (the deep layer's inputs), and --source base is the plain model's
    X_base = reference_inputs(llama, None, f"{layer}.mlp.down_proj", data["c"], apply=False)
    assert not torch.allclose(stats.gram("c", f"{layer}.mlp.down_proj"), X_base.T @ X_base / X_base.shape[0],
                              rtol=1e-3, atol=1e-5)


def dense_delta(adapter_dir, module: str) -> torch.Tensor | None:
    adapter = load_adapter(adapter_dir)
    return adapter.factors(module).delta().double() if module in adapter.modules else None


def test_regmean_factored_equals_the_dense_formula(setup, llama):
    names, data, adapters, out = setup
    alpha = 0.7
    result = merge(adapters=[{"path": str(p), "name": n} for n, p in adapters.items()], method="regmean",
                   parameters={"alpha": alpha}, calibration=str(out), rank="exact")
    stats = CalibrationStats.open(out).bind([load_adapter(p, name=n) for n, p in adapters.items()])
    merged = result.factors()
    for module, factors in merged.items():
        assert factors.rank == sum(load_adapter(p).modules[module].rank for p in adapters.values()
                                   if module in load_adapter(p).modules)
        W0 = llama.get_submodule(module).weight.double()
        num = torch.zeros_like(W0)
        den = torch.zeros(W0.shape[1], W0.shape[1], dtype=torch.float64)
        for name in names:  # the paper: W* = (sum_t W_t G_t)(sum_t G_t)^-1 on full weights, W_t = W0 + dW_t
            G = scaled_gram(stats.gram(name, module), alpha)
            delta = dense_delta(adapters[name], module)
            num += (W0 + (delta if delta is not None else 0)) @ G
            den += G
        want = num @ torch.linalg.inv(den) - W0
        torch.testing.assert_close(factors.delta().double(), want, rtol=1e-4, atol=1e-6)
    assert any(dense_delta(adapters["a"], m) is None for m in merged)  # an adapter without the module still counts


def test_fisher_equals_the_dense_weighted_average(setup):
    names, data, adapters, out = setup
    result = merge(adapters=[{"path": str(p), "name": n, "weight": w} for (n, p), w in zip(adapters.items(), (1, 2, 1))],
                   method="fisher", parameters={"floor": 0.0}, calibration=str(out), rank="exact")
    stats = CalibrationStats.open(out).bind([load_adapter(p, name=n) for n, p in adapters.items()], need="fisher")
    weights = dict(zip(names, (1.0, 2.0, 1.0)))
    for module, factors in result.factors().items():
        num = den = 0
        for name in names:
            u, v = stats.fisher(name, module)
            assert (u > 0).all() and (v > 0).all()
            F = torch.outer(u, v)  # Kronecker-factored diagonal Fisher
            delta = dense_delta(adapters[name], module)
            num = num + weights[name] * F * (delta if delta is not None else 0)
            den = den + weights[name] * F
        want = num / den  # rank "exact" stores the dense result losslessly
        torch.testing.assert_close(factors.delta().double(), want, rtol=1e-4, atol=1e-7)
        if module.endswith("layers.1.self_attn.q_proj"):  # normalize: each adapter's Fisher over its mean
            normed = merge(adapters=[{"path": str(p), "name": n} for n, p in adapters.items()], method="fisher",
                           parameters={"floor": 0.0, "normalize": True}, calibration=str(out), rank="exact").factors()
            num = den = 0
            for name in names:
                u, v = stats.fisher(name, module)
                F = torch.outer(u / u.mean(), v / v.mean())
                delta = dense_delta(adapters[name], module)
                num, den = num + F * (delta if delta is not None else 0), den + F
            torch.testing.assert_close(normed[module].delta().double(), num / den, rtol=1e-4, atol=1e-7)
        assert torch.linalg.matrix_rank(want) > max(load_adapter(p).modules[module].rank for p in adapters.values()
                                                    if module in load_adapter(p).modules)  # it densified

def test_lines_layer_factors_and_post_step_compose(three_adapters):
    cfg = LinesConfig(alpha=0.2, beta=0.6)
    assert lines_factor(cfg, "model.layers.0.self_attn.q_proj", 4) == pytest.approx(0.2)
    assert lines_factor(cfg, "model.layers.3.mlp.down_proj", 4) == pytest.approx(0.8)
    assert lines_factor(cfg, "model.layers.1.mlp.down_proj", 4) == pytest.approx(0.4)
    assert lines_factor(cfg, "model.embed_tokens", 4) == pytest.approx(0.2)
    assert lines_factor(cfg, "lm_head", 4) == pytest.approx(0.8)
    adapters = [str(p) for p in three_adapters]
    for method, params in (("ties", {"density": 0.5}), ("task_arithmetic", {}), ("tsv", {})):
        plain = merge(adapters=adapters, method=method, parameters=params, rank="exact").factors()
        scaled = merge(adapters=adapters, method=method, parameters=params, rank="exact",
                       post={"lines": {"alpha": 0.2, "beta": 0.6}}).factors()
        for module, f in plain.items():  # tiny Llama: 2 layers
            factor = 0.2 + 0.6 * int(module.split(".")[2])
            # ties at rank max goes through the (warm-started, randomized) rank policy on the scaled delta:
            # equal up to that approximation, not bit for bit
            torch.testing.assert_close(scaled[module].delta(), factor * f.delta(), rtol=1e-3, atol=1e-3)
    ta = merge(adapters=adapters, method="task_arithmetic", rank="exact").factors()
    ln = merge(adapters=adapters, method="lines", parameters={"alpha": 0.5, "beta": 0.5}, rank="exact").factors()
    for module, f in ta.items():
        torch.testing.assert_close(ln[module].delta(), (0.5 + 0.5 * int(module.split(".")[2])) * f.delta())


def test_regmean_plus_equals_a_dense_layer_by_layer_reference(setup, llama, llama_dir):
    """RegMean++: block l's Grams come from the model whose blocks < l are already merged (the task's own adapter
    in block l); reference: full weights, full forwards one text at a time, the dense RegMean formula per block."""
    names, data, adapters, _ = setup
    alpha = 0.8
    merged = merge(adapters=[{"path": str(p), "name": n} for n, p in adapters.items()], method="regmean_plus",
                   parameters={"alpha": alpha}, data=data, base_model=str(llama_dir), rank="exact").factors()
    tok = make_tokenizer()
    deltas = {n: {m: dense_delta(p, m) for m in load_adapter(p).modules} for n, p in adapters.items()}
    model = copy.deepcopy(llama)
    W0 = {m: llama.get_submodule(m).weight.detach().double() for m in merged}
    plain = merge(adapters=[{"path": str(p), "name": n} for n, p in adapters.items()], method="regmean",
                  parameters={"alpha": alpha}, data=data, base_model=str(llama_dir), rank="exact").factors()
    for block in range(2):
        modules = [m for m in merged if m.startswith(f"model.layers.{block}.")]
        grams: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            task_model = copy.deepcopy(model)
            rows: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
            handles = []
            with torch.no_grad():
                for m in modules:
                    if deltas[name].get(m) is not None:
                        task_model.get_submodule(m).weight += deltas[name][m].float()
                    handles.append(task_model.get_submodule(m).register_forward_pre_hook(
                        lambda mod, args, m=m, rows=rows: rows[m].append(args[0].reshape(-1, args[0].shape[-1]).double())))
                for text in data[name]:
                    task_model(input_ids=torch.tensor([tok(text)["input_ids"]]))
            for h in handles:
                h.remove()
            grams[name] = {m: torch.cat(r).T @ torch.cat(r) / torch.cat(r).shape[0] for m, r in rows.items()}
        for m in modules:
            num = sum((W0[m] + (deltas[n].get(m) if deltas[n].get(m) is not None else 0)) @ scaled_gram(grams[n][m], alpha)
                      for n in names)
            den = sum(scaled_gram(grams[n][m], alpha) for n in names)
            want = num @ torch.linalg.inv(den) - W0[m]
            torch.testing.assert_close(merged[m].delta().double(), want, rtol=1e-4, atol=1e-6)
            with torch.no_grad():
                model.get_submodule(m).weight += want.float()  # the merged block feeds the next one
            if block == 0:  # the first block sees the same inputs as RegMean's
                torch.testing.assert_close(merged[m].delta(), plain[m].delta(), rtol=1e-4, atol=1e-6)
    deep = [m for m in merged if m.startswith("model.layers.1.")]
    assert any(not torch.allclose(merged[m].delta(), plain[m].delta(), atol=1e-6) for m in deep)
