"""LoRI: frozen random A regenerable from its recorded seed, exact-count masks (global vs per module) checked
against a sort-based oracle, B kept exactly sparse through training (plain loop and Trainer), save/load/merge."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from loramerge import merge
from loramerge.demo.toy import WORDS, make_tokenizer
from loramerge.errors import LoramergeError, RecipeError
from loramerge.training.lori import (
    LORI_FILE,
    MASK_FILE,
    LoriMaskCallback,
    LoriMasks,
    LoriSpec,
    SparseBMasker,
    b_sparsity_of,
    extract_masks,
    load_lori_spec,
    lori_model,
    random_a,
    save_lori_adapter,
    verify_lori_adapter,
)

TARGETS = ("q_proj", "v_proj", "down_proj")
SPEC = LoriSpec(seed=7, r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(8)]
    encoded = tok(texts, return_tensors="pt", padding=True)
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return dict(encoded)


def lora_params(model, kind: str) -> dict[str, torch.nn.Parameter]:
    return {n.removeprefix("base_model.model.").removesuffix(f".lora_{kind}.default.weight"): p
            for n, p in model.named_parameters() if f"lora_{kind}." in n}


def train(model, batch, steps: int, *, lr: float = 1e-2, weight_decay: float = 0.0, masker=None, hook=True):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    if masker is not None:
        masker.attach(optimizer if hook else None)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if masker is not None:
            assert masker.nonzero_outside_mask() == 0
    return model


@pytest.fixture(scope="module")
def dense_run(llama, batch):
    """LoRI-D: frozen A, dense B trained a few steps."""
    return train(lori_model(copy.deepcopy(llama), SPEC), batch, 3)


@pytest.fixture(scope="module")
def masks(dense_run) -> LoriMasks:
    return extract_masks(dense_run, sparsity=0.9, scope="global")


def test_A_frozen_random_and_regenerable(llama):
    torch.manual_seed(123)
    first = lori_model(copy.deepcopy(llama), SPEC)
    torch.manual_seed(999)  # the global RNG does not matter
    second = lori_model(copy.deepcopy(llama), SPEC)
    other = lori_model(copy.deepcopy(llama), LoriSpec(seed=8, r=4, lora_alpha=8, target_modules=TARGETS))
    A1, A2, A3 = lora_params(first, "A"), lora_params(second, "A"), lora_params(other, "A")
    assert len(A1) == 6
    for name, p in A1.items():
        assert not p.requires_grad
        assert torch.equal(p.detach(), A2[name].detach())
        assert torch.equal(p.detach(), random_a(SPEC, name, tuple(p.shape)))
        assert not torch.allclose(p.detach(), A3[name].detach())
        assert p.abs().max() <= 1 / math.sqrt(p.shape[1])  # kaiming-uniform bound (PEFT's default A distribution)
    assert not torch.equal(A1["model.layers.0.self_attn.q_proj"], A1["model.layers.1.self_attn.q_proj"])
    for p in lora_params(first, "B").values():
        assert p.requires_grad and not p.detach().any()


def test_A_recipe_is_the_documented_one():
    """The recipe recorded in lori.json (loramerge.training.lori.a.v1), restated independently: old adapters must stay
    regenerable, so this must not change silently."""
    module, shape = "model.layers.0.self_attn.q_proj", (4, 64)
    digest = hashlib.sha256(f"{SPEC.seed}:{module}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    want = (torch.rand(shape, generator=gen) * 2 - 1) / 8.0
    assert torch.equal(random_a(SPEC, module, shape), want)
    gaussian = random_a(LoriSpec(seed=7, a_init="gaussian"), module, (256, 64))
    assert float(gaussian.std()) == pytest.approx(1 / 8.0, rel=0.05)
    assert SPEC.to_dict()["a_recipe"] == "loramerge.training.lori.a.v1"
    assert LoriSpec.from_dict(SPEC.to_dict()) == SPEC


def _oracle_global(magnitudes: dict[str, torch.Tensor], keep: int) -> float:
    values = torch.cat([m.reshape(-1) for m in magnitudes.values()])
    return float(values.sort(descending=True).values[keep - 1])  # the smallest kept magnitude


def test_global_and_module_masks(llama):
    model = lori_model(copy.deepcopy(llama), SPEC)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # modules with very different B magnitudes: global and per-module masks must differ
        for i, p in enumerate(lora_params(model, "B").values()):
            p.copy_(torch.randn(p.shape, generator=gen) * 3.0 ** i)
    scale = SPEC.lora_alpha / SPEC.r
    magnitudes = {n: (p.detach() * scale).abs() for n, p in lora_params(model, "B").items()}
    total = sum(m.numel() for m in magnitudes.values())

    glob = extract_masks(model, sparsity=0.9, scope="global")
    keep = round(0.1 * total)
    assert glob.kept() == keep and glob.total() == total
    threshold = _oracle_global(magnitudes, keep)
    for name, mask in glob.masks.items():
        assert torch.equal(mask, magnitudes[name] >= threshold)  # one threshold across modules (no ties here)

    per = extract_masks(model, sparsity=0.9, scope="module")
    for name, mask in per.masks.items():
        mag = magnitudes[name]
        assert int(mask.sum()) == round(0.1 * mag.numel())
        assert float(mag[mask].min()) >= float(mag[~mask].max())
    glob_counts = [int(m.sum()) for m in glob.masks.values()]
    per_counts = [int(m.sum()) for m in per.masks.values()]
    assert len(set(glob_counts)) > 2 and glob_counts[-1] > glob_counts[0]  # global favours the big modules
    assert per_counts == [round(0.1 * m.numel()) for m in magnitudes.values()]
    assert glob_counts != per_counts

    half = extract_masks(model, sparsity=0.5, scope="module")
    assert half.kept() == sum(round(0.5 * m.numel()) for m in magnitudes.values())


def test_B_stays_exactly_sparse_in_a_plain_loop(llama, batch, masks, dense_run):
    assert masks.kept() == round(0.1 * masks.total())
    model = lori_model(copy.deepcopy(llama), SPEC)  # LoRI-S: fresh B, same A (regenerated from the seed)
    for name, p in lora_params(model, "A").items():
        assert torch.equal(p, lora_params(dense_run, "A")[name])
    masker = SparseBMasker(model, masks)
    train(model, batch, 5, weight_decay=0.1, masker=masker)  # asserts no masked entry revives after each step
    for name, p in lora_params(model, "B").items():
        mask = masks.masks[name]
        assert not p.detach()[~mask].any()
        assert p.detach()[mask].ne(0).all()  # every kept entry trained
    assert masker.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_gradient_hook_alone_keeps_B_sparse_and_dense_training_does_not(llama, batch, masks):
    model = train(lori_model(copy.deepcopy(llama), SPEC), batch, 3)
    assert all(p.detach().ne(0).float().mean() > 0.9 for p in lora_params(model, "B").values())  # dense: no sparsity
    sparse = lori_model(copy.deepcopy(llama), SPEC)
    masker = SparseBMasker(sparse, masks)
    train(sparse, batch, 3, masker=masker, hook=False)  # gradient masking only, no post-step re-apply
    assert masker.nonzero_outside_mask() == 0


def test_trainer_callback_keeps_B_sparse(tmp_path, llama, batch, masks):
    from transformers import Trainer, TrainingArguments

    model = lori_model(copy.deepcopy(llama), SPEC)
    masker = SparseBMasker(model, masks)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[LoriMaskCallback(masker)]).train()
    assert masker.nonzero_outside_mask() == 0
    assert masker.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert any(p.detach().any() for p in lora_params(model, "B").values())


def test_save_load_verify_and_merge(tmp_path, llama, batch, masks):
    from peft import PeftModel

    saved, models = [], []
    for seed in (1, 2):  # independent A's
        spec = LoriSpec(seed=seed, r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
        model = lori_model(copy.deepcopy(llama), spec)
        train(model, batch, 2, masker=SparseBMasker(model, masks))
        out = save_lori_adapter(model, tmp_path / f"lori-{seed}", spec, masks)
        saved.append(out)
        models.append(model)
        record = json.loads((out / LORI_FILE).read_text())
        assert record["spec"]["seed"] == seed and record["masks"]["scope"] == "global"
        assert record["b_sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert load_lori_spec(out) == spec
        assert set(verify_lori_adapter(out).values()) == {0.0}  # bit-exact regeneration
        reloaded_masks = LoriMasks.load(out)
        assert all(torch.equal(reloaded_masks.masks[n], m) for n, m in masks.masks.items())
        sparsity = b_sparsity_of(out)
        assert sum(sparsity[n] * m.numel() for n, m in masks.masks.items()) == masks.total() - masks.kept()
        reloaded = PeftModel.from_pretrained(copy.deepcopy(llama), str(out))
        with torch.no_grad():
            assert torch.allclose(model(input_ids=batch["input_ids"]).logits,
                                  reloaded(input_ids=batch["input_ids"]).logits, atol=1e-6)

    result = merge(adapters=[str(p) for p in saved], method="task_arithmetic", weights=[0.3, 0.3])
    tensors = [load_file(str(p / "adapter_model.safetensors")) for p in saved]
    for name, factors in result.factors().items():
        key = "base_model.model." + name
        want = sum(0.3 * 2.0 * t[key + ".lora_B.weight"] @ t[key + ".lora_A.weight"] for t in tensors)
        assert torch.allclose(factors.B @ factors.A, want, atol=1e-6)

    tampered = json.loads((saved[0] / LORI_FILE).read_text())
    tampered["spec"]["seed"] = 99
    (saved[0] / LORI_FILE).write_text(json.dumps(tampered))
    with pytest.raises(LoramergeError, match="differs from the A regenerated"):
        verify_lori_adapter(saved[0])


def test_mask_errors(llama, masks):
    with pytest.raises(RecipeError, match="sparsity must be in"):
        extract_masks(llama, sparsity=1.0)
    with pytest.raises(RecipeError, match="scope"):
        extract_masks(lori_model(copy.deepcopy(llama), SPEC), scope="layer")
    other = lori_model(copy.deepcopy(llama), LoriSpec(seed=1, r=4, target_modules=TARGETS + ("o_proj",)))
    with pytest.raises(RecipeError, match="no mask for 2 LoRA module"):
        SparseBMasker(other, masks)
    wide = lori_model(copy.deepcopy(llama), LoriSpec(seed=1, r=8, target_modules=TARGETS))
    with pytest.raises(RecipeError, match="does not match B"):
        SparseBMasker(wide, masks)
    with pytest.raises(RecipeError, match="unknown LoRI A init"):
        LoriSpec(a_init="orthogonal")
    assert MASK_FILE.endswith(".safetensors")


def test_cli_masks_and_verify(tmp_path, llama, dense_run, masks):
    import typer
    from typer.testing import CliRunner

    from loramerge.cli.training import lori_app

    app = typer.Typer()
    app.add_typer(lori_app, name="lori")
    dense = save_lori_adapter(dense_run, tmp_path / "dense", SPEC)
    out = tmp_path / "masks.safetensors"
    result = CliRunner().invoke(app, ["lori", "masks", str(dense), "-o", str(out)])
    assert result.exit_code == 0, result.output
    from_file = LoriMasks.load(out)
    assert from_file.scope == "global" and from_file.sparsity == 0.9
    assert all(torch.equal(from_file.masks[n], m) for n, m in masks.masks.items())  # same as from the live model
    again = CliRunner().invoke(app, ["lori", "masks", str(dense), "-o", str(out)])
    assert again.exit_code != 0 and "exists" in again.output
    verified = CliRunner().invoke(app, ["lori", "verify", str(dense)])
    assert verified.exit_code == 0 and "identical" in verified.output
    (dense / LORI_FILE).write_text("{}")
    assert CliRunner().invoke(app, ["lori", "verify", str(dense)]).exit_code != 0
