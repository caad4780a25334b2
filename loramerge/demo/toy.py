"""Demo assets: a tiny Llama, a word-level tokenizer and random PEFT adapters, built in-process (no hub).

The demo, the examples and the benchmarks build their models here; helpers only the tests use live in
tests/helpers.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

WORDS = (
    "the a one two three four five six seven eight nine ten cat dog bird fish red green blue small big "
    "code math poem story add sum list sort loop print run fast slow good bad yes no and or not is are "
    "hello world python function return value number answer question write read sing play go stop"
).split()


def make_tokenizer(path: Path | None = None):
    """A word-level tokenizer over a fixed vocabulary (special tokens first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def tiny_llama(
    seed: int = 0, *, hidden: int = 64, layers: int = 2, vocab: int = 128, intermediate: int | None = None,
    init_range: float = 0.02,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=init_range,
    )
    return LlamaForCausalLM(config).eval()


def save_base(model, path: Path, *, with_tokenizer: bool = True) -> Path:
    path = Path(path)
    model.save_pretrained(str(path))
    if with_tokenizer:
        make_tokenizer(path)
    return path


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    base_model,
    out_dir: Path,
    *,
    seed: int,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    b_std: float = 0.05,
    base_name: str | None = None,
    dtype: torch.dtype | None = None,
    **config_kwargs: Any,
) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (so merges are not trivially zero)."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base_model)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0, **config_kwargs)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
            elif "lora_A" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    if dtype is not None:
        peft_model = peft_model.to(dtype)
    peft_model.peft_config["default"].base_model_name_or_path = base_name or "tiny-llama"
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)
