"""AdaMerging on the gated LoRA: init = task arithmetic, training lowers the entropy, the export is exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loramerge.data.scoring import ValidationTask
from loramerge.errors import LoramergeError
from loramerge.merging.engine import merge
from loramerge.merging.methods.adamerging import coefficient_group
from loramerge.routers.adamerging import export_static, gate_with, learn_coefficients

from .conftest import TASKS, task_texts


def _prompts(n: int = 12, seed: int = 5) -> list[ValidationTask]:
    return [ValidationTask(t, "text", tuple(task_texts(t, n, seed=seed, length=(3, 5)))) for t in TASKS]


def _choices(n: int = 10) -> list[ValidationTask]:
    """Which task word comes next: the options are one word of each task, the label the prompt's task."""
    out = []
    for t in TASKS:
        prompts = task_texts(t, n, seed=9, length=(3, 5))
        options = (" two", " cat", " python")
        out.append(ValidationTask(t, "choice", tuple(prompts), (options,) * n, (TASKS.index(t),) * n))
    return out


def test_coefficient_groups():
    assert coefficient_group("model.layers.3.self_attn.q_proj", "layer") == "3"
    assert coefficient_group("lm_head", "layer") == "lm_head"
    assert coefficient_group("model.layers.3.self_attn.q_proj", "task") == "all"
    assert coefficient_group("model.layers.3.mlp.up_proj", "module") == "model.layers.3.mlp.up_proj"


def test_init_equals_task_arithmetic(task_world):
    result = learn_coefficients(task_world.fresh_model(), task_world.tokenizer, task_world.paths, _prompts(4),
                                names=TASKS, steps=0, init=0.3)
    assert {v for row in result.coefficients.values() for v in row.values()} == {0.3}
    ada = export_static(task_world.paths, TASKS, result)
    ta = merge(adapters=[str(p) for p in task_world.paths], method="task_arithmetic", parameters={"lambda": 0.3},
               rank="exact")
    got, want = ada.factors(), ta.factors()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name].A, want[name].A) and torch.equal(got[name].B, want[name].B), name


def _entropy(model, tokenizer, tasks) -> float:
    with torch.no_grad():
        return float(sum(t.encode(tokenizer).entropy(model, position="last") for t in tasks))


def test_training_lowers_entropy_and_export_is_exact(task_world, tmp_path):
    from peft import PeftModel

    tasks = _prompts()
    model = task_world.fresh_model()
    tok = task_world.tokenizer
    result = learn_coefficients(model, tok, task_world.paths, tasks, names=TASKS, position="last", steps=30,
                                lr=0.05, heldout=0.0, init=0.3, bounds=(0.0, 1.0), seed=0)
    values = [v for row in result.coefficients.values() for v in row.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and max(abs(v - 0.3) for v in values) > 1e-3
    assert set(result.coefficients) == {"0", "1", "lm_head"}

    init = learn_coefficients(task_world.fresh_model(), tok, task_world.paths, tasks, names=TASKS, steps=0, init=0.3)
    before_ctl = gate_with(model, task_world.paths, init, names=TASKS)
    before = _entropy(model, tok, tasks)
    before_ctl.detach()
    controller = gate_with(model, task_world.paths, result, names=TASKS)
    after = _entropy(model, tok, tasks)
    ids = torch.randint(4, 90, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated = model(ids).logits
    controller.detach()
    assert after < before - 1e-3, (before, after)

    out = tmp_path / "ada"
    export_static(task_world.paths, TASKS, result, out)
    manifest = json.loads((out / "loramerge.json").read_text())
    assert manifest["recipe"]["parameters"]["coefficients"] == result.coefficients
    peft_model = PeftModel.from_pretrained(copy.deepcopy(task_world.base), str(out)).eval()
    with torch.no_grad():
        loaded = peft_model(ids).logits
        plain = task_world.base(ids).logits
    torch.testing.assert_close(loaded, gated, rtol=1e-4, atol=1e-4)
    assert (gated - plain).abs().max() > 1e-3


def test_supervised_objective_and_early_stop(task_world):
    tasks = _choices()
    tok = task_world.tokenizer
    result = learn_coefficients(task_world.fresh_model(), tok, task_world.paths, tasks, names=TASKS,
                                objective="loss", granularity="task", steps=20, lr=0.05, heldout=0.3,
                                eval_every=2, patience=3, init=0.5)
    assert set(result.coefficients) == {"all"}
    assert result.best_heldout <= result.initial_heldout
    assert any("heldout" in h for h in result.history)


def test_bad_init(task_world):
    with pytest.raises(LoramergeError, match="outside the bounds"):
        learn_coefficients(task_world.fresh_model(), task_world.tokenizer, task_world.paths, _prompts(2),
                           init=2.0, bounds=(0.0, 1.0))


def test_tune_trains_adamerging_once(task_world, tmp_path):
    from loramerge.data.examples import read_examples
    from loramerge.data.tune import SearchSpace, Tuner
    from loramerge.routers.adamerging import tune_preparer

    rows = [{"task": t, "text": s} for t in TASKS for s in task_texts(t, 8, seed=3)]
    data = read_examples(rows, tasks=TASKS)
    calls = []
    inner = tune_preparer(steps=3, lr=0.05)

    def counted(ctx):
        calls.append(1)
        return inner(ctx)

    counted.key = inner.key
    make = lambda: Tuner(task_world.fresh_model(), task_world.tokenizer, task_world.paths, TASKS, data,  # noqa: E731
                         cache_dir=tmp_path, space=SearchSpace(methods=("task_arithmetic", "adamerging")),
                         slice_size=4, top_k=1, preparers={"adamerging": counted}, show_progress=False)
    tuner = make()
    score, _, _, _ = tuner.evaluate({"method": "adamerging", "parameters": {}, "weights": [1.0] * 3})
    assert 0 < score < 2 and len(calls) == 1
    (prepared,) = tmp_path.glob("prepared-adamerging-*.json")
    assert json.loads(prepared.read_text())["parameters"]["granularity"] == "layer"
    again = make().evaluate({"method": "adamerging", "parameters": {}, "weights": [1.0] * 3})
    assert again[0] == score and again[3] and len(calls) == 1  # cached: neither trained nor scored again
