"""The one reader of texts and validation examples (``route train``, ``calibrate`` and ``tune`` all use it).

Accepted sources (``read_records`` keeps their order, ``read_examples`` groups them by task):

- a JSONL file: one object per line with a ``task`` and either ``text`` (a ``TextExample``), ``input`` +
  ``output`` (a ``TextExample`` whose ``prompt`` is not scored), or ``prompt`` + ``options`` + ``label``
  (a ``ChoiceExample``; ``label`` an index into ``options`` or one of the options);
- a ``.txt`` file: one text per line (needs a task: ``name=file.txt`` or ``task=``);
- a saved ``datasets`` directory or a ``datasets.Dataset`` with the same columns (a ``ClassLabel`` task
  column gives its names);
- a file per adapter: ``{name: source}`` or ``["name=file", ...]`` (a line's own ``task``, if any, must match);
- in memory: ``{task: [texts]}``, ``(texts, tasks)``, a list of dicts, or a list of texts with ``task=``.

Every problem raises ``DataError`` naming the file and line (empty file, bad JSON, missing fields,
labels out of range, text and multiple-choice lines mixed within one task).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loramerge.core.names import parse_pairs
from loramerge.errors import DataError, RecipeError

Kind = Literal["text", "choice"]
FORMAT_HELP = ('write one JSON object per line: {"task": "...", "text": "..."} or '
               '{"task": "...", "prompt": "...", "options": ["...", "..."], "label": 0}')


@dataclass(frozen=True)
class TextExample:
    """A text scored by LM loss (``prompt``, if any, conditions it and is not scored)."""

    task: str
    text: str
    prompt: str = ""
    origin: str = field(default="", compare=False)  # "file:line", for messages

    kind: Kind = field(default="text", init=False, compare=False)

    @property
    def full_text(self) -> str:
        """The whole text a model reads (what calibration runs on)."""
        return self.prompt + self.text

    def as_lm(self) -> str | tuple[str, str]:
        """``text`` or ``(prompt, text)``: the form ``routers.request.lm_batch`` takes."""
        return (self.prompt, self.text) if self.prompt else self.text


@dataclass(frozen=True)
class ChoiceExample:
    """A multiple-choice example scored by option log-likelihood; ``label`` indexes ``options``."""

    task: str
    prompt: str
    options: tuple[str, ...]
    label: int
    origin: str = field(default="", compare=False)

    kind: Kind = field(default="choice", init=False, compare=False)

    @property
    def full_text(self) -> str:
        """The unlabeled input (the prompt): what calibration runs on, never the answer."""
        return self.prompt

    @property
    def answer(self) -> str:
        return self.options[self.label]


Example = TextExample | ChoiceExample
Examples = dict[str, list[Example]]


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def read_records(source: Any, *, task: str | None = None, text_field: str = "text", task_field: str = "task",
                 limit: int | None = None) -> list[Example]:
    """All examples of ``source`` in their original order, validated (see the module docstring).

    ``task`` names the task of lines without one (and of every line of a .txt file or a list of texts);
    ``limit`` keeps the first ``limit`` examples of each task.
    """
    reader = _Reader(text_field, task_field)
    records = reader.read(source, task)
    if not records:
        raise DataError("the data holds no examples", path=_path_of(source),
                        fix="give at least one example per task; " + FORMAT_HELP)
    _check_kinds(records)
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for r in records:
            counts[r.task] = counts.get(r.task, 0) + 1
            if counts[r.task] <= limit:
                kept.append(r)
        records = kept
    return records


def read_examples(source: Any, *, task: str | None = None, tasks: Sequence[str] | None = None,
                  text_field: str = "text", task_field: str = "task", limit: int | None = None) -> Examples:
    """Examples grouped by task (tasks in order of first appearance).

    ``tasks``: the task names the caller needs (e.g. the adapter names); a missing one, or a task in the
    data that is not one of them, is an error naming both lists.
    """
    grouped: Examples = {}
    for r in read_records(source, task=task, text_field=text_field, task_field=task_field, limit=limit):
        grouped.setdefault(r.task, []).append(r)
    if tasks is not None:
        missing = [t for t in tasks if t not in grouped]
        extra = [t for t in grouped if t not in set(tasks)]
        if missing or extra:
            what = (f"no examples for {missing}" if missing else "") + ("; " if missing and extra else "") + (
                f"tasks {extra} are not among {list(tasks)}" if extra else "")
            raise DataError(f"the data does not match the adapters: {what}", path=_path_of(source),
                            fix=f"give examples whose task is one of {list(tasks)} (or one file per adapter: "
                                f"name=file)")
    return grouped


def read_texts(source: Any, **kwargs: Any) -> dict[str, list[str]]:
    """Unlabeled texts per task (a choice example contributes its prompt, never its answer)."""
    return {t: [r.full_text for r in rs] for t, rs in read_examples(source, **kwargs).items()}


def texts_and_tasks(source: Any, **kwargs: Any) -> tuple[list[str], list[str]]:
    """``(texts, tasks)`` in the source's order: the form the request routers train on."""
    records = read_records(source, **kwargs)
    return [r.full_text for r in records], [r.task for r in records]


def kind_of(examples: Sequence[Example]) -> Kind:
    """The one kind of a task's examples (``read_records`` has checked that they do not mix)."""
    return examples[0].kind


def parse_data_specs(specs: Sequence[str] | str | Path) -> Any:
    """CLI form: one path, or ``name=file`` items (a file per adapter), or several plain paths."""
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    specs = [str(s) for s in specs]
    named = ["=" in s and not Path(s).exists() for s in specs]
    if any(named):
        if not all(named):
            raise DataError(f"mix of name=file and plain files: {specs}",
                            fix="give one file with a 'task' field per line, or name=file for every adapter")
        try:
            return parse_pairs(specs, option="--data", value="FILE", check=False)
        except RecipeError as exc:
            raise DataError(f"bad or repeated data item: {exc.message}", fix="write name=path, one per adapter") from None
    return specs[0] if len(specs) == 1 else [Path(s) for s in specs]


def fingerprint(examples: Examples | Sequence[Example]) -> str:
    """sha256 of the examples' contents (not of the files): the same data in another form hashes the same."""
    records = [r for rs in examples.values() for r in rs] if isinstance(examples, Mapping) else list(examples)
    digest = hashlib.sha256()
    for r in records:
        row = [r.task, r.kind, r.prompt, r.text] if isinstance(r, TextExample) else [
            r.task, r.kind, r.prompt, list(r.options), r.label]
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _path_of(source: Any) -> str | None:
    return str(source) if isinstance(source, (str, Path)) else None


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "features")


@dataclass
class _Reader:
    text_field: str
    task_field: str

    def read(self, source: Any, task: str | None) -> list[Example]:
        if isinstance(source, (str, Path)):
            return self.path(Path(source), task)
        if _is_dataset(source):
            return self.dataset(source, task, origin=None)
        if isinstance(source, Mapping):
            out: list[Example] = []
            for name, part in source.items():
                if isinstance(part, Sequence) and not isinstance(part, str) and all(isinstance(t, str) for t in part):
                    out += [self.row({self.text_field: t}, str(name), f"{name} item {i}") for i, t in enumerate(part)]
                else:
                    out += self.read(part, str(name))
            return out
        if isinstance(source, tuple) and len(source) == 2 and not isinstance(source[0], (Mapping, str)):
            texts, tasks = list(source[0]), list(source[1])
            if len(texts) != len(tasks):
                raise DataError(f"{len(texts)} texts but {len(tasks)} task labels", fix="give one task per text")
            return [self.row({self.text_field: t, self.task_field: y}, task, f"item {i}")
                    for i, (t, y) in enumerate(zip(texts, tasks))]
        if isinstance(source, Iterable) and not isinstance(source, (bytes, str)):
            items = list(source)
            if items and all(isinstance(x, (str, Path)) and Path(x).exists() for x in items) and all(
                    Path(x).suffix in (".jsonl", ".txt", ".json") for x in items):
                return [r for x in items for r in self.path(Path(x), task)]
            if all(isinstance(x, (TextExample, ChoiceExample)) for x in items):
                wrong = next((x for x in items if task is not None and x.task != task), None)
                if wrong is not None:
                    raise DataError(f"an example of task '{wrong.task}' is listed under '{task}'",
                                    fix="group examples under their own task")
                return items
            if all(isinstance(x, str) for x in items):
                return [self.row({self.text_field: t}, task, f"item {i}") for i, t in enumerate(items)]
            if all(isinstance(x, Mapping) for x in items):
                return [self.row(x, task, f"item {i}") for i, x in enumerate(items)]
        raise DataError(f"cannot read examples from a {type(source).__name__}",
                        fix="pass a .jsonl/.txt path, {name: file}, {task: [texts]}, (texts, tasks), a list of "
                            "dicts, or a datasets.Dataset")

    def path(self, path: Path, task: str | None) -> list[Example]:
        if not path.exists():
            raise DataError("data file not found", path=str(path), fix="check the path (" + FORMAT_HELP + ")")
        if path.is_dir():
            try:
                import datasets
            except ImportError as exc:
                raise DataError("reading a saved dataset directory needs the 'datasets' package", path=str(path),
                                fix="pip install 'loramerge[data]'") from exc
            data = datasets.load_from_disk(str(path))
            return self.dataset(data, task, origin=str(path))
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text: {exc}", path=str(path), fix="save the file as UTF-8") from None
        if not any(line.strip() for line in lines):
            raise DataError("the data file is empty", path=str(path), fix=FORMAT_HELP)
        if path.suffix == ".txt":
            if task is None:
                raise DataError("a .txt file holds texts of one task, and none was named", path=str(path),
                                fix=f"name it: {path.stem}={path} (a file per adapter)")
            return [TextExample(task, line, origin=f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"line {n} is not JSON ({exc.msg})", path=str(path), fix=FORMAT_HELP) from None
            out.append(self.row(row, task, f"line {n}", str(path)))
        return out

    def dataset(self, data: Any, task: str | None, origin: str | None) -> list[Example]:
        columns = data.column_names
        if isinstance(columns, Mapping):
            raise DataError(f"got a DatasetDict with splits {sorted(columns)}", path=origin,
                            fix="pass one split, e.g. ds['train']")
        rows = data.to_list() if hasattr(data, "to_list") else list(data)
        names = getattr(data.features.get(self.task_field), "names", None) if self.task_field in columns else None
        if names is not None:
            rows = [{**r, self.task_field: names[r[self.task_field]]} for r in rows]
        return [self.row(r, task, f"row {i}", origin) for i, r in enumerate(rows)]

    def row(self, row: Any, task: str | None, origin: str, path: str | None = None) -> Example:
        """One validated example; ``origin`` is "line N" (with ``path``) or "item N" / "row N"."""

        def fail(message: str, fix: str = FORMAT_HELP) -> DataError:
            return DataError(f"{origin}: {message}", path=path, fix=fix)

        origin_full = f"{path}:{origin.removeprefix('line ')}" if path else origin
        if not isinstance(row, Mapping):
            raise fail(f"expected a JSON object, got {type(row).__name__}")
        own = row.get(self.task_field)
        if own is not None and task is not None and str(own) != task:
            raise fail(f"task '{own}' in a file given for '{task}'",
                       fix=f"drop the '{self.task_field}' field or give the file for '{own}'")
        name = str(own) if own is not None else task
        if name is None or not name.strip():
            raise fail(f"no '{self.task_field}' field",
                       fix=f"add \"{self.task_field}\": \"...\" to every line, or give a file per adapter (name=file)")
        if "options" in row or ("prompt" in row and "label" in row):
            return self._choice(row, name, origin_full, fail)
        if self.text_field in row:
            text = row[self.text_field]
            if not isinstance(text, str) or not text.strip():
                raise fail(f"'{self.text_field}' must be a non-empty string")
            return TextExample(name, text, origin=origin_full)
        if "output" in row:
            prompt, output = row.get("input", ""), row["output"]
            if not isinstance(prompt, str) or not isinstance(output, str) or not output.strip():
                raise fail("'input' and 'output' must be strings, 'output' non-empty")
            return TextExample(name, output, prompt=prompt, origin=origin_full)
        raise fail(f"no '{self.text_field}' (or 'prompt' + 'options' + 'label') field; keys: {sorted(row)}")

    @staticmethod
    def _choice(row: Mapping, name: str, origin: str, fail) -> ChoiceExample:
        missing = [k for k in ("prompt", "options", "label") if k not in row]
        if missing:
            raise fail(f"a multiple-choice line needs 'prompt', 'options' and 'label'; missing {missing}")
        prompt, options, label = row["prompt"], row["options"], row["label"]
        if not isinstance(prompt, str):
            raise fail("'prompt' must be a string")
        if not isinstance(options, (list, tuple)) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise fail("'options' must be a list of at least two strings")
        if isinstance(label, str) and label in options:
            label = list(options).index(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(options):
            raise fail(f"label {label!r} is out of range for {len(options)} options",
                       fix=f"give 'label' as an index 0..{len(options) - 1} into 'options' (or one of the options)")
        return ChoiceExample(name, prompt, tuple(options), label, origin=origin)


def _check_kinds(records: Sequence[Example]) -> None:
    first: dict[str, Example] = {}
    for r in records:
        seen = first.setdefault(r.task, r)
        if seen.kind != r.kind:
            raise DataError(f"task '{r.task}' mixes {seen.kind} examples ({seen.origin}) and {r.kind} examples "
                            f"({r.origin})", path=r.origin.rpartition(":")[0] or None,
                            fix="give a task either texts or multiple-choice examples, not both")


__all__ = [
    "ChoiceExample", "Example", "Examples", "FORMAT_HELP", "TextExample", "fingerprint", "kind_of", "parse_data_specs",
    "read_examples", "read_records", "read_texts", "texts_and_tasks",
]
