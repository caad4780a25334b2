"""What ``loramerge tune`` writes: the best merged adapter, a report (JSON + table) and a PNG of the search.

Every file is written to a temporary name and renamed into place, the adapter by the engine's writer,
so an interrupted write leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from loramerge.data.tune import Trial, Tuner, TuneResult


def _label(config: dict) -> str:
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}=..."
                       for k, v in config.get("parameters", {}).items())
    weights = config.get("weights")
    text = config["method"] + (f" ({params})" if params else "")
    if weights and any(abs(w - 1.0) > 1e-9 for w in weights):
        text += " w=[" + ", ".join(f"{w:.2f}" for w in weights) + "]"
    return text


def _trial_dict(t: Trial) -> dict:
    row = asdict(t)
    params = row["config"].get("parameters", {})
    if "coefficients" in params:  # learned tables are long: the adapter's loramerge.json has them
        row["config"] = {**row["config"], "parameters": {**params, "coefficients": "(learned; see the adapter)"}}
    return row


def report_dict(result: TuneResult) -> dict:
    return {
        "settings": result.settings, "own_scores": result.own_scores,
        "best": _trial_dict(result.best), "baseline": _trial_dict(result.baseline),
        "evaluated_this_run": result.evaluated,
        "trials": [_trial_dict(t) for t in result.trials],
    }


def report_markdown(result: TuneResult) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [
        "# loramerge tune", "",
        "Score: mean over tasks of (merged validation score / the task's own adapter's score); "
        f"trials on a slice of {result.settings['slice_size']} examples per task, the best "
        f"{result.settings['top_k']} and the default re-scored on the whole validation set.", "",
        f"- best: **{_label(result.best.config)}**, full score {fmt(result.best.full_score)} "
        f"(default task arithmetic: {fmt(result.baseline.full_score)})",
        f"- trials: {len(result.trials)}; {result.evaluated} evaluations (slice or full) computed in this run, "
        "the others read from the cache", "",
        "| trial | configuration | slice score | full score | seconds | cached |",
        "|---:|---|---:|---:|---:|:---:|",
    ]
    full = {t.number: t.full_score for t in (result.best, result.baseline)}
    for t in result.trials:
        score = t.full_score if t.full_score is not None else full.get(t.number)
        lines.append(f"| {t.number} | {_label(t.config)} | {t.score:.3f} | {fmt(score)} | {t.seconds:.2f} | "
                     f"{'yes' if t.cached else ''} |")
    return "\n".join(lines) + "\n"


def plot_search(result: TuneResult, path: Path) -> Path | None:
    """Score per trial, coloured by method, with the best-so-far line and the re-scored points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    methods = sorted({t.config["method"] for t in result.trials})
    for method in methods:
        pts = [t for t in result.trials if t.config["method"] == method]
        ax.scatter([t.number for t in pts], [t.score for t in pts], label=method, s=22)
    best, xs, ys = float("-inf"), [], []
    for t in sorted(result.trials, key=lambda t: t.number):
        best = max(best, t.score)
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", linewidth=1, label="best so far (slice)")
    rescored = [t for t in result.trials if t.full_score is not None]
    ax.scatter([t.number for t in rescored], [t.full_score for t in rescored], marker="*", s=120,
               facecolors="none", edgecolors="red", label="re-scored on the full set")
    if result.baseline.full_score is not None:
        ax.axhline(result.baseline.full_score, color="grey", linestyle="--", linewidth=1,
                   label="default task arithmetic (full)")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean normalized validation score")
    ax.set_title("loramerge tune")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(tuner: Tuner, result: TuneResult, output: Path, *, force: bool = False) -> dict[str, Path]:
    """The best configuration merged and saved as ``output/adapter``, plus the report and the plot."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    merged = tuner.merge(tuner._resolved(result.best.config))
    adapter = merged.save(output / "adapter", force=force)
    result.merged = merged
    report = report_dict(result)
    _write_text(output / "report.json", json.dumps(report, indent=2) + "\n")
    _write_text(output / "report.md", report_markdown(result))
    outputs = {"adapter": adapter, "report": output / "report.json", "table": output / "report.md"}
    plot = plot_search(result, output / "search.png")
    if plot is not None:
        outputs["plot"] = plot
    result.outputs = outputs
    return outputs
