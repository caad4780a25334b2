"""The gated concatenated LoRA against PEFT's own forward, the merge driver and a dense reference."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loramerge import load_adapter, merge
from loramerge.demo.toy import make_adapter
from loramerge.errors import IncompatibleAdaptersError, LoramergeError
from loramerge.routers.gated import GatedLoraLayer, GateModule, GateState, attach_gated_lora

IDS = torch.tensor([[5, 9, 14, 22, 31, 40, 7], [8, 3, 17, 60, 45, 12, 9], [33, 34, 35, 36, 37, 38, 39]])


def peft_logits(base, adapter_dir, ids=IDS):
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture()
def gated(llama, three_adapters):
    model = copy.deepcopy(llama)
    return model, attach_gated_lora(model, three_adapters)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_hot_gate_equals_peft_forward(llama, three_adapters, gated, which):
    model, controller = gated
    weights = torch.zeros(3)
    weights[which] = 1.0
    with torch.no_grad(), controller.use_weights(weights):
        out = model(IDS).logits
    ref = peft_logits(llama, three_adapters[which])
    with torch.no_grad():
        base = llama(IDS).logits
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_uniform_gate_equals_task_arithmetic_merge(llama, three_adapters, gated, tmp_path):
    model, controller = gated
    merged = merge(adapters=three_adapters, method="task_arithmetic", weights=[0.4, 0.4, 0.4])
    merged.save(tmp_path / "ta")
    with torch.no_grad(), controller.use_weights([0.4, 0.4, 0.4]):
        out = model(IDS).logits
    torch.testing.assert_close(out, peft_logits(llama, tmp_path / "ta"), atol=2e-5, rtol=1e-4)


def test_named_weights_and_defaults(gated, three_adapters):
    model, controller = gated
    names = controller.adapter_names
    with torch.no_grad():
        by_name = None
        with controller.use_weights({names[1]: 0.7}):
            by_name = model(IDS).logits
        with controller.use_weights([0.0, 0.7, 0.0]):
            by_vector = model(IDS).logits
        default = model(IDS).logits  # defaults: every adapter at weight 1
        with controller.use_weights([1.0, 1.0, 1.0]):
            ones = model(IDS).logits
    torch.testing.assert_close(by_name, by_vector)
    torch.testing.assert_close(default, ones)


def test_mixed_gates_in_one_batch_equal_per_sample_runs(gated):
    model, controller = gated
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, -0.3], [0.0, 0.0, 2.0]])
    with torch.no_grad():
        with controller.use_weights(rows):
            batched = model(IDS).logits
        singles = []
        for i in range(3):
            with controller.use_weights(rows[i]):
                singles.append(model(IDS[i : i + 1]).logits)
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-5, rtol=1e-4)
    assert (batched[0] - batched[2]).abs().max() > 1e-3


def test_per_token_weights_equal_dense_reference(three_adapters):
    """One layer, weights (batch, seq, N): y = W0 x + sum_t c[b,s,t] dW_t x[b,s], dense."""
    adapters = [load_adapter(p) for p in three_adapters]
    name = "model.layers.0.self_attn.q_proj"
    present = [i for i, a in enumerate(adapters) if name in a.modules]
    factors = [adapters[i].factors(name) for i in present]
    torch.manual_seed(0)
    base = torch.nn.Linear(factors[0].d_in, factors[0].d_out)
    state = GateState(3, torch.ones(3))
    layer = GatedLoraLayer(name, base, "linear", factors, present, state, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 5, factors[0].d_in)
    weights = torch.randn(2, 5, 3)
    state.set(weights)
    with torch.no_grad():
        out = layer(x)
        ref = base(x)
        for j, i in enumerate(present):
            ref = ref + weights[..., i : i + 1] * (x @ factors[j].delta().T)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class _ConstantRankGate(GateModule):
    level = "rank"

    def __init__(self, gate):
        super().__init__()
        self.register_buffer("value", gate)

    def forward(self, x, z, layer):
        return self.value


def test_rank_level_gate_module_multiplies_the_weights(three_adapters):
    adapters = [load_adapter(p) for p in three_adapters]
    name = "model.layers.1.mlp.down_proj"
    factors = [a.factors(name) for a in adapters]
    base = torch.nn.Linear(factors[0].d_in, factors[0].d_out)
    state = GateState(3, torch.tensor([0.5, 1.0, 2.0]))
    layer = GatedLoraLayer(name, base, "linear", factors, [0, 1, 2], state, torch.float32, torch.device("cpu"))
    unit_gate = (torch.arange(layer.total_rank) % 2).float()  # keep every other rank unit
    layer.gate = _ConstantRankGate(unit_gate)
    x = torch.randn(3, 4, factors[0].d_in)
    with torch.no_grad():
        out = layer(x)
    expand = torch.cat([torch.full((f.rank,), w) for f, w in zip(factors, [0.5, 1.0, 2.0], strict=True)])
    A = torch.cat([f.A for f in factors])
    B = torch.cat([f.B for f in factors], dim=1)
    ref = base(x) + x @ (B @ torch.diag(expand * unit_gate) @ A).T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_detach_restores_the_base_model(llama, gated):
    model, controller = gated
    with torch.no_grad():
        routed = model(IDS).logits
        controller.detach()
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(model(IDS).logits, llama(IDS).logits)
        controller.attach()
        torch.testing.assert_close(model(IDS).logits, routed)
        with controller.detached():
            torch.testing.assert_close(model(IDS).logits, llama(IDS).logits)
        torch.testing.assert_close(model(IDS).logits, routed)


def test_gpt2_conv1d_one_hot_equals_peft(gpt2, tmp_path):
    adapter = make_adapter(gpt2, tmp_path / "g", seed=3, r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                           base_name="tiny-gpt2")
    other = make_adapter(gpt2, tmp_path / "h", seed=4, r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                         base_name="tiny-gpt2")
    model = copy.deepcopy(gpt2)
    controller = attach_gated_lora(model, [adapter, other])
    ids = IDS % 90
    with torch.no_grad(), controller.use_weights([1.0, 0.0]):
        out = model(ids).logits
    torch.testing.assert_close(out, peft_logits(gpt2, adapter, ids), atol=2e-5, rtol=1e-4)


def test_embedding_lora_one_hot_equals_peft(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(llama, tmp_path / "e", seed=5, r=4, target_modules=["embed_tokens", "q_proj"])
    weights_file = adapter / "adapter_model.safetensors"  # PEFT also saved the full embedding; keep the LoRA only
    tensors = {k: v for k, v in load_file(str(weights_file)).items() if "base_layer" not in k}
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    model = copy.deepcopy(llama)
    controller = attach_gated_lora(model, [adapter])
    with torch.no_grad(), controller.use_weights([1.0]):
        out = model(IDS).logits
    torch.testing.assert_close(out, peft_logits(llama, adapter), atol=2e-5, rtol=1e-4)


def test_bad_weights_and_bad_model_fail_clearly(gated, gpt2, three_adapters):
    model, controller = gated
    with pytest.raises(LoramergeError, match="do not fit 3 adapters"):
        controller.set_weights([1.0, 0.0])
    with pytest.raises(LoramergeError, match="unknown adapter"):
        controller.set_weights({"nope": 1.0})
    with controller.use_weights(torch.ones(2, 3)), pytest.raises(LoramergeError, match="batch size 2"):
        model(IDS)
    with pytest.raises(IncompatibleAdaptersError, match="has no module"):
        attach_gated_lora(copy.deepcopy(gpt2), three_adapters)
    with pytest.raises(LoramergeError, match="already has gated layers"):
        attach_gated_lora(model, three_adapters)


def test_adapters_are_opened_as_one_checked_adapter_set(llama, three_adapters):
    """Duplicate names, the same directory twice and mixed base models are refused before any layer is attached."""
    from loramerge.core.adapter_set import AdapterSet
    from loramerge.errors import RecipeError

    model = copy.deepcopy(llama)
    with pytest.raises(RecipeError, match="used twice"):
        attach_gated_lora(model, three_adapters[:2], names=["a", "a"])
    with pytest.raises(RecipeError, match="listed twice"):
        attach_gated_lora(model, [three_adapters[0], three_adapters[0]])
    assert not any(type(m).__name__ == "GatedLoraLayer" for m in model.modules())
    aset = AdapterSet.open(three_adapters, names=["x", "y", "z"])
    controller = attach_gated_lora(model, aset)
    assert controller.adapter_names == ["x", "y", "z"] and list(controller.layers) == list(aset.module_names)


class _TableRowGate(GateModule):
    """A static per-layer gate: one row of a shared (layers x adapters) coefficient table (AdaMerging's lambda)."""

    level = "adapter"

    def __init__(self, table, row):
        super().__init__()
        self.table, self.row = table, row

    def forward(self, x, z, layer):
        return self.table[self.row]  # (N,): the same coefficients for every token of every sample


def test_layerwise_task_coefficients_as_gates_equal_dense_reference_and_train_only_the_table(llama, three_adapters):
    """What AdaMerging trains: gates of shape (layers x tasks) on the gated LoRA, LoRA factors and model frozen.

    Oracle: every targeted Linear replaced by W0 + sum_t c[layer, t] B_t A_t (dense, from the adapter files)."""
    import re

    model = copy.deepcopy(llama)
    controller = attach_gated_lora(model, three_adapters)
    layer_of = {m: int(re.search(r"layers\.(\d+)\.", m).group(1)) for m in controller.layers}
    table = torch.nn.Parameter(torch.rand(max(layer_of.values()) + 1, 3, generator=torch.Generator().manual_seed(0)))
    for p in model.parameters():  # the model frozen first: the installed gates (and the table) become submodules
        p.requires_grad_(False)
    controller.set_gates({m: _TableRowGate(table, layer_of[m]) for m in controller.layers})
    out = model(IDS).logits
    assert controller.gate_parameters() == [table]  # shared by every gate, listed once
    out.float().pow(2).mean().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert all(not b.requires_grad for layer in controller.layers.values() for b in (layer.lora_A, layer.lora_B))

    reference = copy.deepcopy(llama)
    adapters = [load_adapter(p) for p in three_adapters]
    with torch.no_grad():
        for m, layer in layer_of.items():
            linear = reference.get_submodule(m)
            for t, adapter in enumerate(adapters):
                if m in adapter.modules:
                    linear.weight += table[layer, t] * adapter.factors(m).delta()
        ref = reference(IDS).logits
    torch.testing.assert_close(out.detach(), ref, atol=2e-5, rtol=1e-4)
