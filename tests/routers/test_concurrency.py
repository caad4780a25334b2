"""One gated model, many callers: concurrent routed generations (threads, asyncio) each get their own gates.

Each concurrent result must equal the same call made alone; the calls are chosen so that their results
differ from each other, so a caller that ran with another's weights or gates fails the comparison.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from loramerge.routers import ArrowRouter, CentroidRouter, PooledHiddenEmbedder, attach_gated_lora, generate_routed

from .conftest import TASKS, labelled

PROMPTS = ["one two three", "cat dog bird", "code python function", "sum add seven"]
ROUNDS = 4


@pytest.fixture(scope="module")
def world(task_world):
    model = task_world.fresh_model()
    controller = attach_gated_lora(model, task_world.paths, names=TASKS)
    arrow = ArrowRouter.from_adapters(task_world.paths, names=TASKS, top_k=1)
    arrow_request = ArrowRouter.from_adapters(task_world.paths, names=TASKS, top_k=1, mode="request")
    arrow_request.bind(controller, task_world.tokenizer)
    embedder = PooledHiddenEmbedder(model, task_world.tokenizer, layer=1, controller=controller)  # base model
    centroid = CentroidRouter.fit(labelled(8, seed=3), embedder)
    return controller, task_world.tokenizer, arrow, arrow_request, centroid


def _calls(controller, tokenizer, arrow, arrow_request, centroid):
    """name -> a call returning a tensor: per-request weights, per-token gates, a router on base-model
    embeddings, the detached base model, Arrow's per-request routing."""
    def generate(**kwargs):
        return lambda: generate_routed(controller, tokenizer, PROMPTS, max_new_tokens=8, **kwargs).sequences

    calls = {f"only-{task}": generate(weights={task: 1.0}) for task in TASKS}
    calls["mix"] = generate(weights=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    calls["arrow-token"] = generate(router=arrow)
    calls["centroid"] = generate(router=centroid)  # embeds (detached, right padding), then generates (left padding)

    def base_model():
        with controller.detached():
            return generate_routed(controller, tokenizer, PROMPTS, max_new_tokens=8).sequences

    calls["detached"] = base_model
    calls["arrow-route"] = lambda: arrow_request.route_weights(PROMPTS)
    return calls


def _alone(calls):
    return {name: call() for name, call in calls.items()}


def test_calls_differ_so_a_mixup_would_show(world):
    alone = _alone(_calls(*world))
    generated = {k: v for k, v in alone.items() if k != "arrow-route"}
    names = list(generated)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(generated[a], generated[b]), (a, b)


def test_concurrent_threads_each_equal_their_single_threaded_result(world):
    calls = _calls(*world)
    alone = _alone(calls)
    barrier = threading.Barrier(len(calls))
    results: dict[str, list[torch.Tensor]] = {name: [] for name in calls}
    errors: list[BaseException] = []

    def worker(name):
        try:
            for _ in range(ROUNDS):
                barrier.wait(timeout=60)
                results[name].append(calls[name]())
        except BaseException as exc:  # noqa: BLE001 - reported below with the thread's name
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    controller = world[0]
    for name, outs in results.items():
        assert len(outs) == ROUNDS, name
        for out in outs:
            if out.dtype.is_floating_point:
                torch.testing.assert_close(out, alone[name], msg=name)
            else:
                assert torch.equal(out, alone[name]), name
    assert torch.equal(controller.state.weights, controller.state.default)  # nothing leaked out of the calls
    assert controller.gates() == {}


def test_asyncio_tasks_each_get_their_own_gates(world):
    calls = _calls(*world)
    alone = _alone(calls)

    async def main():
        names = [name for name in calls for _ in range(2)]
        outs = await asyncio.gather(*(asyncio.to_thread(calls[name]) for name in names))
        return list(zip(names, outs, strict=True))

    for name, out in asyncio.run(main()):
        if out.dtype.is_floating_point:
            torch.testing.assert_close(out, alone[name], msg=name)
        else:
            assert torch.equal(out, alone[name]), name


def test_scoped_weights_do_not_leak_to_another_thread(world):
    controller = world[0]
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def holder():
        with controller.use_weights({TASKS[0]: 0.25}):
            seen["holder"] = controller.state.weights.clone()
            inside.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert inside.wait(timeout=30)
    seen["other"] = controller.state.weights.clone()
    release.set()
    thread.join(timeout=30)
    assert torch.equal(seen["holder"], torch.tensor([0.25, 0.0, 0.0]))
    assert torch.equal(seen["other"], controller.state.default)  # the other thread still runs the defaults
