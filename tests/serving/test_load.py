"""A bounded loopback load test of the server (reference transformers + PEFT backend, 127.0.0.1 only):
1,000 requests at 32 concurrent over mixed compositions, with hostile requests interleaved.
0 unexpected statuses, every 10th output checked against PEFT generate, memory flat, server still up."""

from __future__ import annotations

import asyncio
import gc
import time

import httpx
import psutil
import pytest

from loramerge.serving.background import BackgroundServer
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.peft_engine import PeftEngine
from loramerge.serving.server import create_app

TOTAL = 1000
CONCURRENCY = 32
MAX_TOKENS = 3
MODELS = ["base", "code", "math", "chat", "mix:code=0.7,math=0.3", "mix:code=0.5,chat=0.5",
          "mix:math=1,chat=-0.5;method=average", "mix:code=0.2,math=0.2,chat=0.6", "auto"]
HOSTILE = [
    ({"model": "../../../etc/passwd", "prompt": "x"}, 400),
    ({"model": "mix:" + ",".join(f"a{i}=1" for i in range(100)), "prompt": "x"}, 400),
    ({"model": "no-such-adapter", "prompt": "x"}, 404),
    ({"model": "code", "prompt": "one " * 10000}, 400),
    ({"model": "mix:code=nan", "prompt": "x"}, 400),
]


class FirstWordRouter:
    def route(self, prompts):
        return [{"code": 1.0} if p.startswith("write") else {"math": 0.6, "chat": 0.4} for p in prompts]


@pytest.fixture(scope="module")
def server(serving_base, adapter_root, tmp_path_factory):
    composer = Composer(AdapterCatalog(roots=[adapter_root]), cache_dir=tmp_path_factory.mktemp("c"), cache_size=4,
                        router=FirstWordRouter(), device="cpu")  # a small cache: evictions happen under load
    engine = PeftEngine(composer, serving_base[1])
    with BackgroundServer(create_app(engine), startup_timeout=60) as url:
        yield url, engine
    engine.close()


def plan(prompts: list[str]) -> list[tuple[dict, int]]:
    """The request sequence: mixed compositions round-robin, one hostile request in every 25."""
    out = []
    for i in range(TOTAL):
        if i % 25 == 24:
            out.append(HOSTILE[(i // 25) % len(HOSTILE)])
            continue
        body = {"model": MODELS[i % len(MODELS)], "prompt": prompts[(i // len(MODELS)) % len(prompts)],
                "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        out.append((body, 200))
    return out


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def test_load(server, oracle, prompts):
    url, engine = server
    requests = plan(prompts)
    results: list[tuple[int, dict]] = [None] * TOTAL  # type: ignore[list-item]
    rss: dict[int, float] = {}

    async def worker(client: httpx.AsyncClient, queue: asyncio.Queue) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body, _ = requests[i]
            r = await client.post("/v1/completions", json=body)
            results[i] = (r.status_code, r.json())
            if i in (200, TOTAL - 1):
                gc.collect()
                rss[i] = rss_mb()

    async def run() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(TOTAL):
            queue.put_nowait(i)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            started = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(worker(client, queue) for _ in range(CONCURRENCY))), 600)
            return time.perf_counter() - started

    seconds = asyncio.run(run())
    unexpected = [(i, s, b) for i, ((s, b), (_, want)) in enumerate(zip(results, requests, strict=True)) if s != want]
    assert not unexpected, unexpected[:3]
    hostile = sum(1 for _, want in requests if want != 200)
    assert hostile == TOTAL // 25 and all("error" in b for (s, b) in results if s != 200)

    checked = 0
    for i in range(0, TOTAL, 10):
        status, body = results[i]
        if status != 200:
            continue
        label = body["composition"]["label"]
        built = engine.composer.build(engine.composer.resolve(engine.composer.parse(label)))
        path = built.adapter.path if built.adapter else None
        choice = body["choices"][0]
        assert choice["token_ids"] == oracle.greedy(path, choice["prompt_token_ids"], MAX_TOKENS), (i, label)
        checked += 1
    assert checked >= 90

    growth = rss[TOTAL - 1] - rss[200]
    print(f"\nload: {TOTAL} requests, {CONCURRENCY} concurrent, {seconds:.1f} s ({TOTAL / seconds:.0f} req/s), "
          f"RSS {rss[200]:.0f} -> {rss[TOTAL - 1]:.0f} MB, cache evictions {engine.composer.cache.evictions}")
    assert growth < 64, f"memory grew by {growth:.0f} MB"
    assert engine.composer.cache.evictions > 0 and len(engine.composer.cache) <= 4
    assert all(engine.composer.cache.leases(k) == 0 for k in list(engine.composer.cache._entries))
    with httpx.Client(base_url=url) as client:
        assert client.get("/health").json()["status"] == "ok"
        metrics = client.get("/metrics").text
    assert f'loramerge_requests_total{{endpoint="/v1/completions",status="200"}} {float(TOTAL - hostile)}' in metrics
