"""Test-only helpers: a tiny GPT-2 (Conv1D), PEFT's forward as an oracle, leftover temporary directories."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_gpt2(seed: int = 0, *, hidden: int = 32, layers: int = 2, vocab: int = 96):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def assert_peft_forward(base, adapter_dir: Path, deltas: dict[str, torch.Tensor]) -> None:
    """PEFT's forward with the adapter equals the base model with ``W += delta`` (and differs from the base)."""
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in deltas.items():
            ref.get_submodule(name).weight += delta.to(torch.float32)
        ids = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(0))
        got, want, plain = model(ids).logits, ref(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - plain).abs().max() > 1e-3  # the delta is visible: the check can fail


def hidden_leftovers(parent: Path) -> list[str]:
    """Names of hidden entries (temporary directories) left in ``parent``."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))
