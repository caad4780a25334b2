"""The one data reader: every accepted form gives the same typed records; bad files name file and line."""

from __future__ import annotations

import json

import pytest

from loramerge.data.examples import (
    ChoiceExample,
    TextExample,
    fingerprint,
    parse_data_specs,
    read_examples,
    read_records,
    read_texts,
    texts_and_tasks,
)
from loramerge.errors import DataError, RecipeError

ROWS = [{"task": "math", "text": "one plus one"}, {"task": "poem", "text": "roses are red"},
        {"task": "math", "text": "two times three"}]


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_all_forms_give_the_same_records(tmp_path):
    jsonl = write(tmp_path / "d.jsonl", ROWS)
    texts = [r["text"] for r in ROWS]
    tasks = [r["task"] for r in ROWS]
    (tmp_path / "math.txt").write_text("one plus one\n\ntwo times three\n")
    write(tmp_path / "poem.jsonl", [{"text": "roses are red"}])
    expected = {"math": ["one plus one", "two times three"], "poem": ["roses are red"]}
    forms = [jsonl, str(jsonl), ROWS, (texts, tasks), expected,
             {"math": tmp_path / "math.txt", "poem": tmp_path / "poem.jsonl"},
             parse_data_specs([f"math={tmp_path / 'math.txt'}", f"poem={tmp_path / 'poem.jsonl'}"])]
    datasets = pytest.importorskip("datasets")
    forms.append(datasets.Dataset.from_list(ROWS))
    features = datasets.Features({"text": datasets.Value("string"), "task": datasets.ClassLabel(names=["math", "poem"])})
    forms.append(datasets.Dataset.from_dict({"text": texts, "task": [0, 1, 0]}, features=features))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    forms.append(tmp_path / "saved")
    for form in forms:
        assert read_texts(form) == expected, form
    assert texts_and_tasks(jsonl) == (texts, tasks)  # source order kept for the routers
    grouped = read_examples(jsonl)
    assert all(isinstance(r, TextExample) for rs in grouped.values() for r in rs)
    assert grouped["math"][1].origin == f"{jsonl}:3"
    assert fingerprint(grouped) == fingerprint(read_examples(expected))  # contents, not the file form
    assert fingerprint(grouped) != fingerprint(read_examples({"math": ["one plus one"], "poem": ["roses are red"]}))


def test_multiple_choice_and_pairs(tmp_path):
    path = write(tmp_path / "v.jsonl", [
        {"task": "qa", "prompt": "2+2=", "options": ["3", "4"], "label": 1},
        {"task": "qa", "prompt": "1+1=", "options": ["2", "5"], "label": "2"},  # an option names the label
        {"task": "gen", "input": "Q: hi\nA:", "output": " hello"},
    ])
    grouped = read_examples(path, tasks=["qa", "gen"])
    a, b = grouped["qa"]
    assert isinstance(a, ChoiceExample) and a.label == 1 and a.answer == "4" and b.label == 0
    assert a.full_text == "2+2="  # calibration never sees the answer
    (pair,) = grouped["gen"]
    assert pair.as_lm() == ("Q: hi\nA:", " hello") and pair.full_text == "Q: hi\nA: hello"
    assert read_records(path, limit=1)[1].task == "gen"


@pytest.mark.parametrize(("lines", "match"), [
    ([], "empty"),
    (["", "  "], "empty"),
    (['{"task": "a", "text": "x"}', "{not json"], "line 2 is not JSON"),
    (['{"text": "x"}'], "line 1: no 'task' field"),
    (['{"task": "a"}'], "line 1: no 'text'"),
    (['{"task": "a", "text": ""}'], "non-empty"),
    (['{"task": "a", "prompt": "p", "options": ["x", "y"]}'], "missing \\['label'\\]"),
    (['{"task": "a", "prompt": "p", "options": ["x", "y"], "label": 2}'], "line 1: label 2 is out of range for 2"),
    (['{"task": "a", "prompt": "p", "options": ["x", "y"], "label": true}'], "out of range"),
    (['{"task": "a", "prompt": "p", "options": ["x"], "label": 0}'], "at least two"),
    (['{"task": "a", "text": "x"}', '{"task": "a", "prompt": "p", "options": ["x", "y"], "label": 0}'],
     "task 'a' mixes text examples .*:1.* and choice examples .*:2"),
    (["[1, 2]"], "expected a JSON object"),
])
def test_bad_files_name_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=match) as info:
        read_examples(path)
    assert str(path) in str(info.value) and "fix:" in str(info.value)
    assert isinstance(info.value, RecipeError)  # the routers' callers catch RecipeError


def test_task_mismatches(tmp_path):
    with pytest.raises(DataError, match="no examples for \\['poem'\\]"):
        read_examples({"math": ["x"]}, tasks=["math", "poem"])
    with pytest.raises(DataError, match="not among"):
        read_examples({"math": ["x"], "art": ["y"]}, tasks=["math"])
    path = write(tmp_path / "m.jsonl", [{"task": "poem", "text": "x"}])
    with pytest.raises(DataError, match="task 'poem' in a file given for 'math'"):
        read_examples({"math": path})
    (tmp_path / "t.txt").write_text("x\n")
    with pytest.raises(DataError, match="t=.*t.txt"):
        read_examples(tmp_path / "t.txt")
    with pytest.raises(DataError, match="not found"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="mix of name=file"):
        parse_data_specs(["a=x.jsonl", str(path)])
