"""Saved calibration statistics: load, refuse stale ones, and serve them to the merge one module at a time.

``CalibrationStats.open(dir)`` reads the manifest written by ``calibrate``; ``bind(adapters, ...)`` checks
them against the adapters being merged (each adapter's sha256, its base model, the data's sha256 when data
are given) and returns a ``MergeStatistics``: what a data-informed method's per-module function gets as
``ModuleInputs.context``. Tensors are read lazily, one module input at a time, and checked for NaN.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import LoraAdapter
from loramerge.data.calibration import FORMAT, MANIFEST, calibrate
from loramerge.data.examples import fingerprint, read_examples
from loramerge.errors import AdapterLoadError, DataError, NumericalError, RecipeError

log = logging.getLogger("loramerge.data.statistics")
RECALIBRATE = "rerun `loramerge calibrate` for these adapters and data (or point the recipe at matching statistics)"


@dataclass
class CalibrationStats:
    """A statistics directory: the manifest plus one safetensors file per adapter."""

    directory: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | Path) -> CalibrationStats:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise DataError("no calibration statistics here (calibration.json is missing)", path=str(directory),
                            fix="run `loramerge calibrate ... -o DIR` first, or give the recipe `data:` instead")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"calibration.json is not valid JSON: {exc}", path=str(path), fix=RECALIBRATE) from None
        if manifest.get("format") != FORMAT:
            raise DataError(f"unknown statistics format {manifest.get('format')!r} (expected {FORMAT})",
                            path=str(path), fix=RECALIBRATE)
        for record in manifest["adapters"]:
            if not (directory / record["file"]).is_file():
                raise DataError(f"statistics file of '{record['name']}' is missing", path=str(directory / record["file"]),
                                fix=RECALIBRATE)
        return cls(directory, manifest)

    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def has_fisher(self) -> bool:
        return bool(self.manifest.get("fisher"))

    def bind(self, adapters: Sequence[LoraAdapter], *, base_model: str | None = None,
             data: Mapping[str, Sequence[Any]] | None = None, need: str = "gram",
             weights: Sequence[float] | None = None) -> MergeStatistics:
        """Match each adapter to its statistics by sha256; refuse another version, base model or data."""
        where = str(self.directory / MANIFEST)
        by_sha = {r["sha256"]: r for r in self.manifest["adapters"]}
        by_name = {r["name"]: r for r in self.manifest["adapters"]}
        records = {}
        for adapter in adapters:
            record = by_sha.get(adapter.sha256)
            if record is None:
                old = by_name.get(adapter.name)
                what = (f"were computed for another version of adapter '{adapter.name}' (sha256 {old['sha256'][:12]}..., "
                        f"this one {adapter.sha256[:12]}...)") if old else (
                    f"do not cover adapter '{adapter.name}' ({adapter.source.local_path}); they hold "
                    f"{sorted(by_name)}")
                raise DataError(f"stale calibration statistics: they {what}", path=where, fix=RECALIBRATE)
            recorded_base = record.get("base_model")
            if recorded_base and adapter.base_model and recorded_base != adapter.base_model:
                raise DataError(f"stale calibration statistics: computed for adapters of base model '{recorded_base}', "
                                f"'{adapter.name}' is for '{adapter.base_model}'", path=where, fix=RECALIBRATE)
            if data is not None:
                examples = data.get(adapter.name)
                if examples is None or fingerprint(list(examples)) != record["data_sha256"]:
                    raise DataError(f"stale calibration statistics: the data of '{adapter.name}' differ from the data "
                                    "they were computed on", path=where, fix=RECALIBRATE)
            records[adapter.name] = record
        if base_model is not None:
            known = {self.manifest["base_model"].get("reference"), self.manifest["base_model"].get("name_or_path")}
            known |= {r.get("base_model") for r in self.manifest["adapters"]}
            if base_model not in known and str(Path(base_model).expanduser().resolve()) not in {
                    str(Path(k).expanduser().resolve()) for k in known if k}:
                raise DataError(f"stale calibration statistics: computed with base model "
                                f"'{self.manifest['base_model'].get('reference') or self.manifest['base_model'].get('name_or_path')}', "
                                f"the recipe names '{base_model}'", path=where, fix=RECALIBRATE)
        if need == "fisher" and not self.has_fisher:
            raise DataError("these statistics hold no Fisher factors", path=where,
                            fix="rerun `loramerge calibrate --fisher`")
        weights = dict(zip(records, weights)) if weights is not None else dict.fromkeys(records, 1.0)
        return MergeStatistics(self, records, dict(self.manifest["inputs"]), weights)


@dataclass
class MergeStatistics:
    """The per-module view the methods read (``ModuleInputs.context``); a small cache of Grams and solves."""

    stats: CalibrationStats
    records: dict[str, dict]  # adapter name in the merge -> manifest record
    inputs: dict[str, str]  # module -> key of the Gram it shares
    weights: dict[str, float]  # adapter name -> its recipe weight (also where it lacks a module)
    cache: OrderedDict = field(default_factory=OrderedDict)
    notes: list[str] = field(default_factory=list)
    _handles: dict[str, Any] = field(default_factory=dict)
    cache_size: int = 8

    @property
    def names(self) -> list[str]:
        return list(self.records)

    def input_key(self, module: str) -> str:
        key = self.inputs.get(module)
        if key is None:
            raise DataError("the calibration statistics hold nothing for this module", module=module,
                            path=str(self.stats.directory), fix=RECALIBRATE)
        return key

    def _tensor(self, name: str, key: str) -> torch.Tensor:
        """One stored tensor by a positioned read (each file opened once, its header parsed once)."""
        from loramerge.core.safetensors_file import TensorFile, read_header

        path = self.stats.directory / self.records[name]["file"]
        opened = self._handles.get(name)
        if opened is None:
            try:
                opened = self._handles[name] = (TensorFile(path), read_header(path))
            except AdapterLoadError as exc:
                raise DataError(f"corrupt statistics file: {exc.message}", path=str(path), fix=RECALIBRATE) from None
        handle, layout = opened
        if key not in layout:
            raise DataError(f"'{key}' is missing from the statistics of '{name}'", path=str(path), fix=RECALIBRATE)
        try:
            tensor = handle.read(layout[key])
        except ValueError as exc:
            raise DataError(f"could not read '{key}': {exc}", path=str(path), fix=RECALIBRATE) from None
        if not torch.isfinite(tensor.sum(dtype=torch.float64)):  # NaN or Inf anywhere makes the sum non-finite
            raise NumericalError(f"the calibration statistics of '{name}' hold NaN or Inf", path=str(path),
                                 module=key.split(":", 1)[1], fix=RECALIBRATE)
        return tensor

    def memo(self, key: Any, compute) -> Any:
        """A small LRU cache shared by the modules that read the same input (q/k/v, gate/up)."""
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        value = self.cache[key] = compute()
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return value

    def gram(self, name: str, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``G = X^T X / n`` of adapter ``name`` at ``module``'s input (read on each call: callers cache what they
        derive from it, e.g. RegMean's solve per module input)."""
        return self._tensor(name, f"gram:{self.input_key(module)}").to(dtype)

    def fisher(self, name: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The Kronecker factors ``(E[g^2] over outputs, E[x^2] over inputs)``: ``F ~ outer(u, v)``."""
        u = self._tensor(name, f"fisher_out:{module}").double()
        key = self.input_key(module)
        return u, self.memo(("gram-diagonal", name, key), lambda: self.gram(name, module).diagonal().clone())

    def tokens(self, name: str) -> int:
        return int(self.records[name]["tokens"])


def statistics_for(recipe: Any, adapters: Sequence[LoraAdapter], *, need: str, show_progress: bool = False,
                   config: Any = None) -> Any:
    """What a recipe's ``calibration: DIR`` / ``data: {name: file}`` give a data-informed method.

    ``calibration`` alone: load and check. ``data`` alone: compute now (needs ``base_model`` loadable), in a
    temporary directory. Both: reuse DIR when it matches the data, else compute into DIR when it does not exist.
    """
    calibration, data = getattr(recipe, "calibration", None), getattr(recipe, "data", None)
    if calibration is None and data is None:
        raise RecipeError(f"method '{recipe.method}' learns from data, and the recipe gives none",
                          fix="add `calibration: DIR` (from `loramerge calibrate`) or `data: {name: file.jsonl}`")
    examples = read_examples(data, tasks=[a.name for a in adapters]) if data is not None else None
    weights = [e.weight for e in recipe.adapters]
    if need == "model":  # RegMean++: statistics of the partially merged model, computed while merging
        return _regmean_plus(recipe, adapters, examples, weights, config, show_progress)
    if calibration is not None and (data is None or (Path(calibration) / MANIFEST).exists()):
        return CalibrationStats.open(calibration).bind(adapters, base_model=recipe.base_model, data=examples,
                                                       need=need, weights=weights)
    if recipe.base_model is None:
        raise RecipeError("computing calibration statistics from `data:` needs `base_model:` (a local model directory)",
                          fix="add base_model: DIR to the recipe, or run `loramerge calibrate` and give `calibration:`")
    target = calibration or Path(tempfile.mkdtemp(prefix="loramerge-calibration-")) / "stats"
    calibrate(recipe.base_model, list(adapters), examples, target, fisher=need == "fisher",
              show_progress=show_progress)
    return CalibrationStats.open(target).bind(adapters, data=examples, need=need, weights=weights)


def _regmean_plus(recipe: Any, adapters: Sequence[LoraAdapter], examples: Any, weights: list[float], config: Any,
                  show_progress: bool) -> dict:
    from loramerge.data.calibration import load_base_model
    from loramerge.data.regmean_plus import regmean_plus_merge
    from loramerge.merging.methods.data import regmean

    if examples is None or recipe.base_model is None:
        raise RecipeError("regmean_plus runs the partially merged model: it needs `data:` and `base_model:`",
                          fix="add `data: {adapter_name: texts.jsonl}` and `base_model: DIR` (saved statistics "
                              "from `loramerge calibrate` cannot serve: they come from unmerged models)")
    model, tokenizer = load_base_model(recipe.base_model)
    texts = {name: [e.full_text for e in exs] for name, exs in examples.items()}
    return regmean_plus_merge(model, tokenizer, adapters, weights, texts, regmean, config, show_progress=show_progress)


__all__ = ["CalibrationStats", "MergeStatistics", "statistics_for"]
