"""Routing speed on CPU: tokens/s of a routed batch against a single-LoRA batch, and routing latency per request.

Model: a Llama-shaped decoder built from a config (random weights, no hub): hidden 512, 4 layers,
intermediate 1376, 4 heads (2 KV heads), vocab 4096. Experts: 8 LoRA adapters of rank 8 (alpha 16) on
all 7 projections, random non-zero A and B, written with PEFT.

Throughput, for one batch of ``--batch`` prompts of ``--prompt-len`` tokens:

- prefill: one forward pass over the batch (tokens/s = batch x prompt_len / time);
- decode: ``generate`` of ``--new-tokens`` tokens per prompt with the KV cache (tokens/s = new tokens / time).

Cases: the base model; PEFT with one LoRA (the baseline: "a single-LoRA batch"); the gated layer with
one adapter; the gated concatenated LoRA over 8 experts with per-request gates (each prompt a different
one-hot adapter, or a different dense mixture), with per-token Arrow gates (top-3); and PEFT's own
mixed-adapter batch (``adapter_names=``, one adapter per prompt, 8 loaded). Each case is timed
``--repeats`` times, interleaved, and the median is reported.

Routing latency: the router alone on one precomputed embedding per request (p50 / p95 over
``--requests`` requests), for centroid, nearest-neighbour and classifier routers trained on 8 tasks;
and, for context, the embedding forward per request (base-model pooled hidden state, MiniLM).

Usage (repository root)::

    .venv/bin/python benchmarks/routing.py                    # about 2 minutes on a 2-core CPU
    .venv/bin/python benchmarks/routing.py --threads 2 --out /tmp/routing.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "routing.md"


def build_world(args, root: Path):
    from loramerge.demo.toy import LLAMA_TARGETS, make_adapter, tiny_llama

    model = tiny_llama(seed=0, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                       intermediate=args.intermediate)
    paths = [make_adapter(model, root / f"expert-{i}", seed=100 + i, r=args.rank, lora_alpha=2 * args.rank,
                          target_modules=LLAMA_TARGETS) for i in range(args.experts)]
    return model, paths


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def throughput_cases(args, model, paths):
    """name -> (prefill fn, decode fn) on one shared batch of prompts."""
    from peft import PeftModel

    from loramerge.routers import ArrowRouter, attach_gated_lora

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (args.batch, args.prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    n = len(paths)
    one_hot = torch.eye(n)[torch.arange(args.batch) % n]
    dense = torch.softmax(torch.randn(args.batch, n, generator=gen), dim=-1)

    def runners(m, context: Callable = None, **forward_kwargs):
        def ctx():
            return context() if context is not None else torch.no_grad()

        def prefill():
            with torch.no_grad(), ctx():
                m(input_ids=ids, attention_mask=mask, **forward_kwargs)

        def decode():
            with torch.no_grad(), ctx():
                m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **forward_kwargs)
        return prefill, decode

    cases = {}
    base = copy.deepcopy(model)
    cases["base model (no LoRA)"] = runners(base)
    peft_one = PeftModel.from_pretrained(copy.deepcopy(model), str(paths[0])).eval()
    cases["PEFT, 1 LoRA (baseline)"] = runners(peft_one)
    gated_one_model = copy.deepcopy(model)
    attach_gated_lora(gated_one_model, paths[:1])
    cases["gated, 1 LoRA"] = runners(gated_one_model)
    routed_model = copy.deepcopy(model)
    controller = attach_gated_lora(routed_model, paths)
    cases[f"gated, {n} experts, per-request one-hot (mixed batch)"] = runners(
        routed_model, lambda: controller.use_weights(one_hot))
    cases[f"gated, {n} experts, per-request dense mixtures"] = runners(
        routed_model, lambda: controller.use_weights(dense))
    arrow = ArrowRouter.from_adapters(paths, top_k=3)
    cases[f"gated, {n} experts, per-token Arrow top-3"] = runners(routed_model, lambda: arrow.applied(controller, []))
    peft_many = PeftModel.from_pretrained(copy.deepcopy(model), str(paths[0]), adapter_name="e0").eval()
    for i, p in enumerate(paths[1:], start=1):
        peft_many.load_adapter(str(p), adapter_name=f"e{i}")
    names = [f"e{i % n}" for i in range(args.batch)]
    cases[f"PEFT mixed batch, {n} loaded, one per prompt"] = runners(peft_many, adapter_names=names)
    return cases


def measure_throughput(args, cases) -> list[dict]:
    for prefill, decode in cases.values():  # warm-up
        prefill()
        decode()
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in cases}
    for _ in range(args.repeats):
        for name, (prefill, decode) in cases.items():
            times[name]["prefill"].append(timed(prefill))
            times[name]["decode"].append(timed(decode))
    rows = []
    for name, t in times.items():
        prefill_s, decode_s = statistics.median(t["prefill"]), statistics.median(t["decode"])
        rows.append({"case": name, "prefill_tps": args.batch * args.prompt_len / prefill_s,
                     "decode_tps": args.batch * args.new_tokens / decode_s})
    baseline = next(r for r in rows if "baseline" in r["case"])
    for r in rows:
        r["prefill_ratio"] = r["prefill_tps"] / baseline["prefill_tps"]
        r["decode_ratio"] = r["decode_tps"] / baseline["decode_tps"]
    return rows


def measure_latency(args, model) -> list[dict]:
    from loramerge.demo.toy import make_tokenizer
    from loramerge.routers import CentroidRouter, ClassifierRouter, NearestNeighbourRouter, PooledHiddenEmbedder

    tokenizer = make_tokenizer()
    words = tokenizer.get_vocab()
    vocab = [w for w in words if not w.startswith("<")]
    gen = torch.Generator().manual_seed(1)
    tasks = [f"task{i}" for i in range(args.experts)]
    texts, labels = [], []
    for i, task in enumerate(tasks):  # each task draws from its own slice of the vocabulary
        pool = vocab[i * 6:(i + 1) * 6] or vocab
        for _ in range(args.train_per_task):
            idx = torch.randint(0, len(pool), (12,), generator=gen)
            texts.append(" ".join(pool[j] for j in idx.tolist()))
            labels.append(task)
    embedders: dict[str, object] = {f"base pooled (d={args.hidden})": PooledHiddenEmbedder(model, tokenizer)}
    try:
        from loramerge.routers import MiniLMEmbedder

        embedders["MiniLM-L6 (d=384)"] = MiniLMEmbedder()
    except Exception as exc:  # optional encoder
        print(f"MiniLM skipped: {exc}", file=sys.stderr)
    rows = []
    for emb_name, embedder in embedders.items():
        train = embedder.embed(texts)
        queries = [texts[i % len(texts)] for i in range(args.requests)]
        embed_times = [timed(lambda q=q, e=embedder: e.embed([q])) for q in queries[: max(20, args.requests // 10)]]
        query_vecs = embedder.embed(queries)
        routers = {
            "centroid": CentroidRouter.fit((texts, labels), embeddings=train),
            "knn (k=8)": NearestNeighbourRouter.fit((texts, labels), embeddings=train),
            "classifier (Twin-Merging MLP)": ClassifierRouter.fit((texts, labels), embeddings=train),
        }
        for name, router in routers.items():
            for i in range(10):
                router.route_embeddings(query_vecs[i:i + 1])
            lat = sorted(timed(lambda q=query_vecs[i:i + 1], r=router: r.route_embeddings(q))
                         for i in range(args.requests))
            rows.append({"router": name, "embedding": emb_name, "p50_ms": 1e3 * lat[len(lat) // 2],
                         "p95_ms": 1e3 * lat[int(len(lat) * 0.95)],
                         "embed_p50_ms": 1e3 * statistics.median(embed_times)})
    return rows


def markdown(args, throughput: list[dict], latency: list[dict]) -> str:
    lines = [
        "# Routing benchmark (CPU)",
        "",
        f"Run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s), load average "
        f"{args.load_before:.1f} at the start (other processes share the machine: read ratios, not absolute "
        "numbers). Command: "
        f"`python benchmarks/routing.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Model: Llama-shaped, random weights: hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{args.intermediate}, vocab {args.vocab}. Experts: {args.experts} LoRAs, rank {args.rank}, all 7 projections "
        f"(gated total rank {args.experts * args.rank} per module). Batch {args.batch} prompts x {args.prompt_len} "
        f"tokens; decode {args.new_tokens} new tokens each (greedy, KV cache). Median of {args.repeats} runs.",
        "",
        "## Throughput (tokens/s; ratio to the PEFT single-LoRA batch)",
        "",
        "| case | prefill tok/s | ratio | decode tok/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in throughput:
        lines.append(f"| {r['case']} | {r['prefill_tps']:.0f} | {r['prefill_ratio']:.2f} | {r['decode_tps']:.0f} | "
                     f"{r['decode_ratio']:.2f} |")
    lines += [
        "",
        "Target: >= 0.7x the single-LoRA batch for per-request gates at 8 experts.",
        "",
        "## Routing latency per request (router only, one precomputed embedding; the model forward excluded)",
        "",
        "| router | embedding | p50 ms | p95 ms | embedding forward p50 ms (for context) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in latency:
        lines.append(f"| {r['router']} | {r['embedding']} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
                     f"{r['embed_p50_ms']:.1f} |")
    lines += ["", "Target: < 5 ms p50 for the centroid and classifier routers.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--train-per-task", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model, paths = build_world(args, Path(tmp))
        cases = throughput_cases(args, model, paths)
        throughput = measure_throughput(args, cases)
        latency = measure_latency(args, model)
    text = markdown(args, throughput, latency)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
