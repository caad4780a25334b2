"""Per-token MoE over LoRA experts: core space exactness, FlyLoRA top-k, learned gates on separable tasks."""

from __future__ import annotations

import copy

import pytest
import torch

from loramerge import load_adapter
from loramerge.routers.gated import GateState, attach_gated_lora
from loramerge.routers.moe import (
    CoreSpaceLayer,
    FlyTopKGate,
    GateRouter,
    SoftmaxGate,
    attach_core_space,
    core_space,
    flylora_gates,
    softmax_gates,
    train_gates,
)
from loramerge.routers.request import load_router

from .conftest import TASKS, labelled

IDS = torch.tensor([[5, 9, 14, 22, 31, 40, 7], [8, 3, 17, 60, 45, 12, 9]])


@pytest.fixture(scope="module")
def factors(three_adapters):
    adapters = [load_adapter(p) for p in three_adapters]
    name = "model.layers.0.mlp.down_proj"  # all three adapters (ranks 4, 6, 8) target it
    return name, [a.factors(name) for a in adapters]


def test_core_space_cores_are_exact(factors):
    _, fs = factors
    Q_A, Q_B, cores = core_space(fs)
    assert cores.shape == (3, 18, 18)
    for f, core in zip(fs, cores, strict=True):
        torch.testing.assert_close(Q_B @ core @ Q_A.T, f.delta(), atol=1e-5, rtol=1e-4)


def test_core_space_layer_with_static_weights_equals_the_exact_weighted_sum(factors):
    name, fs = factors
    torch.manual_seed(0)
    base = torch.nn.Linear(fs[0].d_in, fs[0].d_out)
    state = GateState(3, torch.ones(3))
    layer = CoreSpaceLayer(name, base, "linear", fs, [0, 1, 2], state, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 5, fs[0].d_in)
    for weights in (torch.tensor([0.7, -0.2, 1.5]), torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.2, 0.3]])):
        state.set(weights)
        with torch.no_grad():
            out = layer(x)
        rows = weights if weights.dim() == 2 else weights.expand(2, 3)
        ref = torch.stack([base(x[b]) + sum(rows[b, t] * x[b] @ fs[t].delta().T for t in range(3)) for b in range(2)])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_core_space_model_equals_gated_model(llama, three_adapters):
    gated_model, core_model = copy.deepcopy(llama), copy.deepcopy(llama)
    gated = attach_gated_lora(gated_model, three_adapters)
    core = attach_core_space(core_model, three_adapters)
    weights = torch.tensor([[0.5, 1.0, -0.4], [0.0, 0.0, 1.0]])
    with torch.no_grad(), gated.use_weights(weights), core.use_weights(weights):
        torch.testing.assert_close(core_model(IDS).logits, gated_model(IDS).logits, atol=2e-5, rtol=1e-4)


def _dense_fly_mask(z: torch.Tensor, bias: torch.Tensor, ranks, k: int) -> torch.Tensor:
    """Reference: for every token and adapter block, 1 on the top-k units of |z + d| (all units if r <= k)."""
    mask = torch.zeros_like(z)
    flat_z, flat_m = z.reshape(-1, z.shape[-1]), mask.view(-1, z.shape[-1])
    for row in range(flat_z.shape[0]):
        start = 0
        for r in ranks:
            scores = (flat_z[row, start:start + r] + bias[start:start + r]).abs()
            keep = scores.argsort(descending=True)[: min(k, r)]
            flat_m[row, start + keep] = 1.0
            start += r
    return mask


def test_flylora_gate_keeps_top_k_units_per_adapter_and_freezes_its_bias_at_eval(factors):
    name, fs = factors
    gate = FlyTopKGate([f.rank for f in fs], k=5, update_rate=0.01)
    z = torch.randn(2, 4, sum(f.rank for f in fs))
    torch.testing.assert_close(gate.mask(z), _dense_fly_mask(z, gate.bias, gate.ranks, 5))
    gate.train()
    gate(None, z, None)
    moved = gate.bias.clone()
    assert moved.abs().sum() > 0
    torch.testing.assert_close(gate.mask(z), _dense_fly_mask(z, moved, gate.ranks, 5))
    gate.eval()
    first = gate(None, z, None)
    second = gate(None, z, None)
    assert torch.equal(first, second) and torch.equal(gate.bias, moved)  # deterministic at eval


def test_flylora_gate_in_a_layer_equals_the_masked_dense_sum(factors):
    name, fs = factors
    base = torch.nn.Linear(fs[0].d_in, fs[0].d_out)
    state = GateState(3, torch.tensor([1.0, 0.5, 2.0]))
    from loramerge.routers.gated import GatedLoraLayer

    layer = GatedLoraLayer(name, base, "linear", fs, [0, 1, 2], state, torch.float32, torch.device("cpu"))
    layer.gate = FlyTopKGate(layer.ranks, k=3).eval()
    x = torch.randn(3, fs[0].d_in)
    with torch.no_grad():
        out = layer(x)
    A = torch.cat([f.A for f in fs])
    B = torch.cat([f.B for f in fs], dim=1)
    mask = _dense_fly_mask(x @ A.T, torch.zeros(A.shape[0]), layer.ranks, 3)
    weights = torch.cat([torch.full((f.rank,), w) for f, w in zip(fs, [1.0, 0.5, 2.0], strict=True)])
    ref = base(x) + ((x @ A.T) * mask * weights) @ B.T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_softmax_gate_top_k_and_passthrough():
    gate = SoftmaxGate(8, routed=[0, 2], num_adapters=3, top_k=1)
    torch.nn.init.normal_(gate.proj.weight)
    out = gate(torch.randn(4, 5, 8), None, None)
    assert out.shape == (4, 5, 3)
    assert torch.equal(out[..., 1], torch.ones(4, 5))  # adapter 1 is not routed by this gate
    assert ((out[..., [0, 2]] > 0).sum(-1) == 1).all()
    torch.testing.assert_close(out[..., [0, 2]].sum(-1), torch.ones(4, 5))


@pytest.mark.parametrize("space", ["gated", "core"])
def test_learned_gates_route_separable_tasks(task_world, space, tmp_path):
    model = task_world.fresh_model()
    attach = attach_gated_lora if space == "gated" else attach_core_space
    controller = attach(model, task_world.paths, names=TASKS)
    before = {k: v.clone() for k, v in model.state_dict().items() if "gate" not in k}
    train_text, _ = labelled(20, seed=1)
    test_text, test_labels = labelled(20, seed=2)
    gates = softmax_gates(controller, temperature=1.0 if space == "gated" else 0.5)  # core: a 12-d router input
    history = train_gates(controller, task_world.tokenizer, train_text, gates=gates, epochs=3, lr=1e-2)
    assert history[-1] < history[0] - 0.5
    after = {k: v for k, v in model.state_dict().items() if "gate" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # everything but the gates is frozen
    router = GateRouter.from_controller(controller).bind(controller, task_world.tokenizer)
    accuracy = router.accuracy(test_text, test_labels)
    assert accuracy >= 0.9, accuracy  # learned from the LM loss alone: no task labels

    router.save(tmp_path / "moe")
    fresh = task_world.fresh_model()
    fresh_controller = attach(fresh, task_world.paths, names=TASKS)
    loaded = load_router(tmp_path / "moe", model=fresh, tokenizer=task_world.tokenizer, controller=fresh_controller)
    assert isinstance(loaded, GateRouter) and loaded.layer == space
    torch.testing.assert_close(loaded.route_weights(test_text[:6]), router.route_weights(test_text[:6]))
    ids = IDS % 60
    with torch.no_grad():
        with router.applied(controller, []):
            ref = model(ids).logits
        with loaded.applied(fresh_controller, []):
            torch.testing.assert_close(fresh(ids).logits, ref)


def test_route_loss_on_task_labels_and_flylora_artifact(task_world, tmp_path):
    model = task_world.fresh_model()
    controller = attach_gated_lora(model, task_world.paths, names=TASKS)
    from accelerate import Accelerator

    history = train_gates(controller, task_world.tokenizer, labelled(10, seed=1), gates=softmax_gates(controller),
                          epochs=2, lr=2e-2, route_loss_weight=1.0, accelerator=Accelerator(cpu=True))
    assert history[-1] < history[0]
    router = GateRouter.from_controller(controller).bind(controller, task_world.tokenizer)
    assert router.accuracy(*labelled(10, seed=2)) >= 0.9

    controller.set_gates(None)
    fly = flylora_gates(controller, k=2)
    train_gates(controller, task_world.tokenizer, labelled(4, seed=3)[0], gates=fly, epochs=1)  # bias calibration
    assert any(g.bias.abs().sum() > 0 for g in fly.values())
    router = GateRouter.from_controller(controller)
    router.save(tmp_path / "fly")
    loaded = load_router(tmp_path / "fly")
    for name, gate in fly.items():
        assert torch.equal(loaded.gates[name].bias, gate.bias) and loaded.gates[name].k == 2
