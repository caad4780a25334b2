"""loramerge tune: the search beats or ties the default, its score is PEFT's, it resumes, bad input is refused."""

from __future__ import annotations

import copy
import json
import random

import optuna
import pytest
import torch
from typer.testing import CliRunner

from loramerge.cli.app import app
from loramerge.data.examples import read_examples
from loramerge.data.scoring import ValidationTask, patched
from loramerge.data.tune import SearchSpace, Tuner, canonical
from loramerge.data.tune_report import write_outputs
from loramerge.demo.toy import make_tokenizer

WORDS = {"a": "one two three four five six".split(), "b": "cat dog bird fish red green".split()}


def _rows(n: int = 10, seed: int = 0) -> list[dict]:
    rows = []
    for i, (task, words) in enumerate(WORDS.items()):
        rng = random.Random(f"{task}-{seed}")
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(4))
            options = [" " + rng.choice(words), " " + rng.choice(WORDS["b" if task == "a" else "a"])]
            rows.append({"task": task, "prompt": prompt, "options": options, "label": i % 2})
    return rows


@pytest.fixture(scope="module")
def world(llama, adapter_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    paths = [adapter_factory(seed=40 + i, r=4, b_std=0.2, target_modules=["q_proj", "v_proj", "up_proj"])
             for i in range(2)]
    val = root / "val.jsonl"
    val.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    return {"root": root, "paths": paths, "val": val, "model": copy.deepcopy(llama), "tokenizer": make_tokenizer()}


def _tuner(world, cache, **kwargs) -> Tuner:
    data = read_examples(world["val"], tasks=["a", "b"])
    space = kwargs.pop("space", SearchSpace(methods=("task_arithmetic", "ties")))
    return Tuner(world["model"], world["tokenizer"], world["paths"], ["a", "b"], data, cache_dir=cache, space=space,
                 slice_size=6, top_k=2, show_progress=False, **kwargs)


def test_search_beats_default_and_its_score_is_pefts(world, tmp_path):
    from peft import PeftModel

    tuner = _tuner(world, tmp_path / "cache")
    result = tuner.run(trials=6)
    assert len(result.trials) == 6 and result.trials[0].config["method"] == "task_arithmetic"
    rescored = [t for t in result.trials if t.full_score is not None]
    assert result.best.full_score == max(t.full_score for t in [*rescored, result.baseline])
    assert result.best.full_score >= result.baseline.full_score
    outputs = write_outputs(tuner, result, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"adapter", "cache", "report.json", "report.md",
                                                               "search.png"} - {"cache"}
    report = json.loads(outputs["report"].read_text())
    assert len(report["trials"]) == 6 and report["best"]["full_score"] == result.best.full_score
    # the score the tuner reports for the best merge is what PEFT's forward with the written adapter gets
    peft_model = PeftModel.from_pretrained(copy.deepcopy(world["model"]), str(outputs["adapter"])).eval()
    own = result.own_scores["full"]
    with torch.no_grad():
        scores = {e.task.name: e.score(peft_model) / own[e.task.name] for e in tuner.full}
    assert sum(scores.values()) / 2 == pytest.approx(result.best.full_score, abs=1e-6)


def test_patched_equals_peft(world):
    from peft import PeftModel

    from loramerge.core.adapter import load_adapter

    adapter = load_adapter(world["paths"][0])
    ids = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    model = world["model"]
    with torch.no_grad():
        plain = model(ids).logits
        with patched(model, {m: adapter.factors(m) for m in adapter.modules}):
            got = model(ids).logits
        assert torch.equal(model(ids).logits, plain)  # restored
        want = PeftModel.from_pretrained(copy.deepcopy(model), str(world["paths"][0])).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_interrupted_search_resumes(world, tmp_path):
    cache = tmp_path / "cache"
    first = _tuner(world, cache, space=SearchSpace(methods=("task_arithmetic", "ties", "dare_ties")))

    def stop_after_three(trial):
        if trial.number == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(trials=6, on_trial=stop_after_three)
    seen = {c for part, c in first.computed if part == "slice"}
    assert len(seen) == 3
    storage = f"sqlite:///{cache / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    earlier = [t for t in optuna.load_study(study_name=name, storage=storage).trials
               if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(earlier) == 2  # the trial that was interrupted did not complete

    second = _tuner(world, cache, space=SearchSpace(methods=("task_arithmetic", "ties", "dare_ties")))
    result = second.run(trials=6)
    assert len(result.trials) == 6
    assert [t.config for t in result.trials[:2]] == [t.user_attrs["config"] for t in earlier]
    recomputed = {c for part, c in second.computed if part == "slice"} & {canonical(t.user_attrs["config"])
                                                                           for t in earlier}
    assert not recomputed, "trials of the interrupted run were scored again"
    # the own adapters' scores were cached too: a third session computes nothing on the slice it already knows
    third = _tuner(world, cache, space=SearchSpace(methods=("task_arithmetic", "ties", "dare_ties")))
    again = third.run(trials=6)
    assert third.computed == [] and [t.score for t in again.trials] == [t.score for t in result.trials]


def test_cmaes_and_text_tasks(world, tmp_path):
    rows = [{"task": t, "text": " ".join(random.Random(i).choices(w, k=6))} for t, w in WORDS.items() for i in range(8)]
    data = read_examples(rows, tasks=["a", "b"])
    tuner = Tuner(world["model"], world["tokenizer"], world["paths"], ["a", "b"], data, cache_dir=tmp_path,
                  space=SearchSpace(methods=("task_arithmetic",)), slice_size=4, top_k=1, show_progress=False)
    result = tuner.run(trials=3, sampler="cmaes")
    assert all(0 < t.score < 2 for t in result.trials)
    assert ValidationTask.from_examples("a", data["a"]).kind == "text"


runner = CliRunner()


def _cli(world, out, *extra, data=None):
    args = ["tune", f"a={world['paths'][0]}", f"b={world['paths'][1]}", "--data", str(data or world["val"]),
            "-o", str(out), "--methods", "task_arithmetic,ties", "--slice", "4", "--top-k", "1"]
    return runner.invoke(app, [*args, *extra])


@pytest.mark.parametrize("case", ["label", "empty", "tasks", "budget", "negative", "method"])
def test_bad_input_writes_nothing(world, tmp_path, llama_dir, case):
    data = tmp_path / "val.jsonl"
    rows = _rows(3)
    extra = ["--trials", "2", "--base", str(llama_dir)]
    if case == "label":
        rows[1]["label"] = 5
    if case == "tasks":
        rows = [r for r in rows if r["task"] == "a"]
    data.write_text("" if case == "empty" else "\n".join(json.dumps(r) for r in rows) + "\n")
    if case == "budget":
        extra = ["--trials", "0", "--base", str(llama_dir)]
    if case == "negative":
        extra = ["--minutes", "-1", "--base", str(llama_dir)]
    if case == "method":
        extra += ["--methods", "no_such_method"]
    out = tmp_path / "out"
    result = _cli(world, out, *extra, data=data)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    expected = {"label": "label", "empty": "empty", "tasks": "does not match the adapters", "budget": "budget is zero",
                "negative": "negative budget", "method": "unknown merge method"}[case]
    assert expected in text, text
    assert not out.exists()


def test_cli_end_to_end_and_refuses_a_finished_tune(world, tmp_path, llama_dir):
    out = tmp_path / "out"
    result = _cli(world, out, "--trials", "3", "--base", str(llama_dir))
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "search.png").is_file()
    again = _cli(world, out, "--trials", "3", "--base", str(llama_dir))
    assert again.exit_code == 6 and "finished tune" in " ".join(again.output.split())
    forced = _cli(world, out, "--trials", "4", "--base", str(llama_dir), "--force")
    assert forced.exit_code == 0, forced.output
    assert len(json.loads((out / "report.json").read_text())["trials"]) == 4


def test_calibration_methods_and_lines_post_step(world, tmp_path):
    space = SearchSpace(methods=("task_arithmetic", "regmean", "fisher", "lines"), post=True)
    tuner = _tuner(world, tmp_path / "cache", space=space)
    for config in ({"method": "regmean", "parameters": {"alpha": 0.5}}, {"method": "fisher", "parameters": {}},
                   {"method": "lines", "parameters": {"alpha": 0.3, "beta": 0.6}},
                   {"method": "task_arithmetic", "parameters": {"lambda": 0.5}, "post": {"lines": {"alpha": 0.2, "beta": 0.5}}}):
        score, per_task, _, cached = tuner.evaluate({**config, "weights": [1.0, 1.0]})
        assert 0 < score < 2 and not cached and set(per_task) == {"a", "b"}
    assert sorted(p.name for p in (tmp_path / "cache").glob("calibration-*")) == ["calibration-fisher", "calibration-gram"]
    # LiNeS as a post-step changes the merge; the same config is cached
    plain = tuner.evaluate({"method": "task_arithmetic", "parameters": {"lambda": 0.5}, "weights": [1.0, 1.0]})
    post = tuner.evaluate({"method": "task_arithmetic", "parameters": {"lambda": 0.5}, "weights": [1.0, 1.0],
                           "post": {"lines": {"alpha": 0.2, "beta": 0.5}}})
    assert post[3] and not plain[3] and post[0] != plain[0]
    result = tuner.run(trials=5)
    assert len(result.trials) == 5
