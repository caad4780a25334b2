"""Several server processes share one composition cache directory: two spawned processes race on the same
compositions (each leasing, reading and re-reading every directory it gets, with an LRU small enough that
they evict while the other one reads), then a third composer uses what they wrote without rebuilding it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer

MIXES = ["mix:code=0.5,math=0.5", "mix:chat=1,code=0.25", "mix:chat=0.7,math=0.3", "mix:code=1,wide=0.5",
         "mix:chat=0.1,math=0.9"]
KEEPER = "mix:code=0.125,math=0.125"

WORKER = r"""
import hashlib, json, random, sys, time
from pathlib import Path
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer

root, cache, go, seed = sys.argv[1:5]
mixes = json.loads(sys.argv[5])
order = mixes[:-1]
random.Random(int(seed)).shuffle(order)
composer = Composer(AdapterCatalog(roots=[root]), cache_dir=cache, cache_size=2, device="cpu")
Path(go + f".ready-{seed}").touch()
while not Path(go).exists():
    time.sleep(0.005)
records = []
for model in [*order, *order, mixes[-1]]:
    with composer.leased(composer.resolve(composer.parse(model))) as built:
        path = built.adapter.path
        first = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        files = sorted(p.name for p in path.iterdir())
        time.sleep(0.01)  # still leased: nobody may remove or rewrite it meanwhile
        again = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        records.append({"model": model, "path": str(path), "digest": first, "stable": first == again,
                        "files": files, "config": json.loads((path / "adapter_config.json").read_text())["r"]})
stats = {k: v for k, v in vars(composer.stats).items() if k != "build_seconds"}
composer.close()
print(json.dumps({"records": records, "stats": stats}))
"""


def test_two_processes_share_one_cache_directory(adapter_root, tmp_path):
    cache, go = tmp_path / "shared-cache", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(adapter_root), str(cache), str(go), str(seed),
                               json.dumps([*MIXES, KEEPER])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for seed in (1, 2)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"go.ready-{s}").exists() for s in (1, 2)):  # both imported: start together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    by_model: dict[str, set] = {}
    for result in results:
        for rec in result["records"]:
            assert rec["stable"] and rec["files"] == ["adapter_config.json", "adapter_model.safetensors",
                                                      "loramerge.json"]
            by_model.setdefault(rec["model"], set()).add((rec["path"], rec["digest"]))
    assert set(by_model) == {*MIXES, KEEPER}
    for model, seen in by_model.items():  # one content-addressed directory per composition, identical bytes
        assert len({path for path, _ in seen}) == 1 and len({d for _, d in seen}) == 1, model
    builds = sum(r["stats"]["misses"] for r in results)
    assert builds >= len(MIXES) + 1 and sum(r["stats"]["requests"] for r in results) == 2 * (2 * len(MIXES) + 1)
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".") and p.name != ".locks"]
    assert leftovers == []  # no private build or trash directory survives

    # a third composer (another replica, or a restart) uses what they wrote: no rebuild
    composer = Composer(AdapterCatalog(roots=[adapter_root]), cache_dir=cache, device="cpu")
    built = composer.build(composer.resolve(composer.parse(KEEPER)))
    assert built.cache_hit and composer.stats.shared_hits == 1 and composer.stats.misses == 0
    assert {(str(built.adapter.path), d) for _, d in by_model[KEEPER]} == by_model[KEEPER]
    composer.close()
    assert built.adapter.path.is_dir()  # a caller's cache directory outlives the process
