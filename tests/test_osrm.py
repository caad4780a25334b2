"""OSRM: A from the other tasks' input statistics, checked against an independent computation of the features
(hidden states + the layer's input norm, one unpadded sentence at a time) and an independent eigen-decomposition."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from loramerge import merge
from loramerge.demo.toy import WORDS, make_tokenizer
from loramerge.errors import RecipeError
from loramerge.training.osrm import (
    INFO_FILE,
    INIT_FILE,
    OsrmInit,
    compute_osrm_init,
    orthonormality_error,
    osrm_model,
    prepare_osrm_model,
    read_texts,
)

R = 4
TARGETS = ["q_proj", "v_proj"]


def _sentences(seed: int, n: int, vocabulary: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[str]]:
    """Three 'tasks' drawn from overlapping word sets (so their features differ but share directions)."""
    return {
        "math": _sentences(1, 16, WORDS[:30]),
        "code": _sentences(2, 18, WORDS[15:50]),
        "poem": _sentences(3, 18, WORDS[25:]),
    }


@pytest.fixture(scope="module")
def others(tasks) -> dict[str, list[str]]:
    return {"code": tasks["code"], "poem": tasks["poem"]}


@pytest.fixture(scope="module")
def init(llama, tok, others) -> OsrmInit:
    # batch_size 4 with lengths 3..12: the batches are padded, the oracle below is not
    return compute_osrm_init(llama, others, tokenizer=tok, r=R, target_modules=TARGETS, batch_size=4)


def oracle_features(model, tok, texts: list[str]) -> dict[str, list[torch.Tensor]]:
    """Per module name, one (tokens x d_in) tensor per text: the q/v projection inputs, computed from the hidden
    states and the layer's input RMSNorm (not with hooks), one text at a time (no padding)."""
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            for index, layer in enumerate(model.model.layers):
                x = layer.input_layernorm(hidden[index])[0].double()
                for proj in TARGETS:
                    out.setdefault(f"model.layers.{index}.self_attn.{proj}", []).append(x)
    return out


@pytest.fixture(scope="module")
def features(llama, tok, others) -> dict[str, torch.Tensor]:
    texts = [t for group in others.values() for t in group]
    return {name: torch.cat(parts) for name, parts in oracle_features(llama, tok, texts).items()}


def random_subspace_energy(H: torch.Tensor, r: int, draws: int = 32) -> float:
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(draws):
        Q, _ = torch.linalg.qr(torch.randn(H.shape[1], r, generator=gen, dtype=torch.float64))
        total += float((H @ Q).pow(2).sum())
    return total / draws


def test_batches_are_padded(tok, others):
    lengths = {len(tok(t)["input_ids"]) for t in others["code"]}
    assert len(lengths) > 3  # the padding mask in the hooks is exercised


def test_covariance_mode_matches_an_independent_eigendecomposition(init, features):
    assert set(init.directions) == set(features)
    gapped = 0
    for name, H in features.items():
        A = init.directions[name].double()
        assert A.shape == (R, H.shape[1])
        assert orthonormality_error(A) < 1e-5
        S = H.T @ H
        values, vectors = torch.linalg.eigh(S)
        scale = float(values[-1])
        # optimality (holds even inside a degenerate null space): A captures the r smallest eigenvalues' energy
        captured = float(torch.trace(A @ S @ A.T))
        assert abs(captured - float(values[:R].sum())) <= 1e-5 * scale
        # layer 0 sees only token embeddings (fewer words than dimensions): its bottom eigenvalues are an exact
        # null space, any basis of which is optimal. Where the r-th gap is clear, the subspace is unique.
        if values[R] - values[R - 1] > 1e-6 * scale:
            gapped += 1
            bottom = vectors[:, :R]
            assert torch.linalg.norm(A.T @ A - bottom @ bottom.T) < 1e-3
    assert gapped >= 2  # layer 1 has a clear eigengap, so the span check above really ran


def test_other_tasks_have_little_energy_on_A_rows(init, features, llama, tok, tasks):
    for name, H in features.items():
        A = init.directions[name].double()
        osrm = float((H @ A.T).pow(2).sum())
        ratio = osrm / random_subspace_energy(H, R)
        assert ratio < 0.1, (name, ratio)
        assert init.energy_ratio[name] == pytest.approx(ratio, abs=0.02)
    # the target task's own inputs are not what A was chosen to ignore: layer 1 sees clearly more of them
    own = {n: torch.cat(p) for n, p in oracle_features(llama, tok, tasks["math"]).items()}
    name = "model.layers.1.self_attn.q_proj"
    A = init.directions[name].double()
    own_ratio = float((own[name] @ A.T).pow(2).sum()) / random_subspace_energy(own[name], R)
    assert own_ratio > 2 * init.energy_ratio[name]


def test_centered_covariance(llama, tok, others, features):
    init = compute_osrm_init(llama, others, tokenizer=tok, r=R, target_modules=TARGETS, center=True)
    for name, H in features.items():
        C = torch.cov(H.T)
        values = torch.linalg.eigvalsh(C)
        A = init.directions[name].double()
        assert float(torch.trace(A @ C @ A.T)) == pytest.approx(float(values[:R].sum()), abs=1e-5 * float(values[-1]))


def test_mean_nullspace_mode_is_orthogonal_to_every_task_mean(llama, tok, others):
    init = compute_osrm_init(llama, others, tokenizer=tok, r=R, target_modules=TARGETS, mode="mean_nullspace",
                             batch_size=5)
    assert init.mode == "mean_nullspace"
    for task_texts in others.values():
        per_text = oracle_features(llama, tok, task_texts)
        for name, parts in per_text.items():
            mean = torch.stack([p.mean(0) for p in parts]).mean(0)  # token mean per sample, then over samples
            A = init.directions[name].double()
            assert orthonormality_error(A) < 1e-5
            assert float(torch.linalg.norm(A @ mean)) < 1e-5 * float(torch.linalg.norm(mean))
            assert init.eigenvalues[name].shape == (len(others),)  # the singular values of the 2 x d_in mean matrix


def test_returned_model_trains_with_A_frozen(llama, tok, init, tasks):
    model = prepare_osrm_model(copy.deepcopy(llama), init, freeze_A=True)
    layers = {n: m for n, m in model.named_modules() if n.endswith("q_proj") or n.endswith("v_proj")}
    assert len(layers) == 4
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, sorted(cfg.target_modules)) == (R, 2 * R, sorted(TARGETS))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert not p.requires_grad
            module = n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
            assert torch.equal(p.detach(), init.directions[module])
        elif "lora_B" in n:
            assert p.requires_grad and not p.detach().any()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = tok(tasks["math"][:6], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p.detach(), before[n])
        elif "lora_B" in n:
            assert p.detach().abs().sum() > 0


def test_A_trainable_when_not_frozen(llama, init):
    model = prepare_osrm_model(copy.deepcopy(llama), init, lora_alpha=4)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert model.peft_config["default"].lora_alpha == 4


def test_init_save_and_restore(tmp_path, llama, init):
    path = init.save(tmp_path / "osrm")
    assert {p.name for p in path.iterdir()} == {INIT_FILE, INFO_FILE}
    info = json.loads((path / INFO_FILE).read_text())
    assert info["mode"] == "covariance" and info["r"] == R and info["tasks"] == {"code": 18, "poem": 18}
    loaded = OsrmInit.load(path)
    assert set(loaded.directions) == set(init.directions)
    for name, A in init.directions.items():
        assert torch.equal(loaded.directions[name], A)
        assert torch.equal(loaded.eigenvalues[name], init.eigenvalues[name])
    assert loaded.info() == init.info()
    model = prepare_osrm_model(copy.deepcopy(llama), path)  # from the artifact path
    A = model.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight
    assert torch.equal(A.detach(), init.directions["model.layers.1.self_attn.v_proj"])
    with pytest.raises(Exception, match="already holds an OSRM init"):
        init.save(path)
    init.save(path, force=True)


def test_adapters_save_load_and_merge(tmp_path, llama, tok, tasks):
    from peft import PeftModel

    saved = []
    for target in ("math", "code"):
        other = {k: v for k, v in tasks.items() if k != target}
        out = tmp_path / f"osrm-{target}"
        model = osrm_model(copy.deepcopy(llama), other, tokenizer=tok, r=R, target_modules=TARGETS, freeze_A=True,
                           save_init=tmp_path / f"init-{target}")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        batch = tok(tasks[target][:6], return_tensors="pt", padding=True)
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        optimizer.step()
        model.save_pretrained(str(out))
        OsrmInit.load(tmp_path / f"init-{target}").save(out)  # the init recorded beside the adapter
        reloaded = PeftModel.from_pretrained(copy.deepcopy(llama), str(out))
        for (n1, p1), (n2, p2) in zip(model.named_parameters(), reloaded.named_parameters()):
            assert n1 == n2 and torch.equal(p1.detach(), p2.detach())
        ids = tok(tasks[target][0], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)
        saved.append(out)
    result = merge(adapters=[str(p) for p in saved], method="task_arithmetic", weights=[0.7, 0.3])
    tensors = [load_file(str(p / "adapter_model.safetensors")) for p in saved]
    scale = 2 * R / R  # lora_alpha defaults to 2r
    merged = result.factors()
    for name, factors in merged.items():
        key = "base_model.model." + name
        want = sum(w * scale * t[key + ".lora_B.weight"] @ t[key + ".lora_A.weight"] for w, t in zip((0.7, 0.3), tensors))
        assert torch.allclose(factors.B @ factors.A, want, atol=1e-6)
    assert len(merged) == 4


def test_text_sources(tmp_path, tasks):
    texts = tasks["code"][:5]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert read_texts(texts) == texts
    assert read_texts(str(tmp_path / "t.txt")) == texts
    assert read_texts(tmp_path / "t.jsonl", text_field="body") == texts
    assert read_texts(tmp_path / "t.txt", max_samples=2) == texts[:2]
    with pytest.raises(RecipeError, match="no string field 'text'"):
        read_texts(tmp_path / "t.jsonl")
    with pytest.raises(RecipeError, match="not found"):
        read_texts("just one sentence, not a path")
    with pytest.raises(RecipeError, match="cannot read texts"):
        read_texts(42)


def test_datasets_sources(tmp_path, tasks):
    import datasets  # in the dev extra (optional for users, required for the tests)
    texts = tasks["poem"][:6]
    ds = datasets.Dataset.from_dict({"text": texts, "label": list(range(6))})
    assert read_texts(ds) == texts
    assert read_texts(ds, max_samples=3) == texts[:3]
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_texts(tmp_path / "ds") == texts
    with pytest.raises(RecipeError, match="no column 'body'"):
        read_texts(ds, text_field="body")
    with pytest.raises(RecipeError, match="DatasetDict"):
        read_texts(datasets.DatasetDict({"train": ds}))


def test_bad_inputs(llama, tok, others, init):
    with pytest.raises(RecipeError, match="unknown OSRM mode"):
        compute_osrm_init(llama, others, tokenizer=tok, mode="eigh")
    with pytest.raises(RecipeError, match="exceeds the module's input width"):
        compute_osrm_init(llama, others, tokenizer=tok, r=65)
    with pytest.raises(RecipeError, match="no module of the model matches"):
        compute_osrm_init(llama, others, tokenizer=tok, target_modules=["nope_proj"])
    with pytest.raises(RecipeError, match="tokenizer is needed"):
        compute_osrm_init(llama, others)
    wrapped = prepare_osrm_model(copy.deepcopy(llama), init)
    with pytest.raises(RecipeError, match="already has LoRA layers"):
        compute_osrm_init(wrapped.base_model.model, others, tokenizer=tok)
    with pytest.raises(RecipeError, match="do not match the OSRM init"):
        prepare_osrm_model(copy.deepcopy(llama), OsrmInit(directions={}, r=R, mode="covariance", target_modules=TARGETS))


def test_cli_osrm_init(tmp_path, llama_dir, others):
    import typer
    from typer.testing import CliRunner

    from loramerge.cli.training import osrm_app

    app = typer.Typer()
    app.add_typer(osrm_app, name="osrm")
    (tmp_path / "code.txt").write_text("\n".join(others["code"]))
    (tmp_path / "poem.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in others["poem"]))
    out = tmp_path / "init"
    args = ["osrm", "init", str(llama_dir), "--other", f"code={tmp_path / 'code.txt'}", "--other",
            str(tmp_path / "poem.jsonl"), "-r", str(R), "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    init = OsrmInit.load(out)
    assert init.tasks == {"code": 18, "poem": 18} and init.r == R
    assert all(orthonormality_error(A) < 1e-5 for A in init.directions.values())
    missing = CliRunner().invoke(app, ["osrm", "init", str(llama_dir), "--other", "x=nope.txt", "-o", str(tmp_path / "o")])
    assert missing.exit_code == RecipeError.exit_code and "input file not found" in missing.output


def test_gpt2_conv1d_targets(gpt2, tok, others):
    init = compute_osrm_init(gpt2, others, tokenizer=tok, r=R, target_modules=["c_attn"], batch_size=4)
    assert len(init.directions) == 2
    assert all(A.shape == (R, 32) and orthonormality_error(A) < 1e-5 for A in init.directions.values())
    model = prepare_osrm_model(copy.deepcopy(gpt2), init, freeze_A=True, fan_in_fan_out=True)
    A = model.base_model.model.transformer.h[1].attn.c_attn.lora_A["default"].weight
    assert torch.equal(A.detach(), init.directions["transformer.h.1.attn.c_attn"])
