"""Stream configs, sources and built-in data: no Ray needed."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import demo_stream
from pipelines.preprocess import render_row, render_split
from pipelines.sources import FileSplit, SourceError, carve, open_split, sample_indices
from pipelines.streams import MissingTaskWarning, StreamConfigError, builtin_streams, load_stream, with_options

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "pipelines" / "data"


def write_stream(tmp_path: Path, stream: dict) -> Path:
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(stream))
    return path


def folder(tmp_path: Path, name: str = "data", rows: int = 3) -> Path:
    data = tmp_path / name
    data.mkdir()
    for split in ("train", "test"):
        lines = [json.dumps({"text": f"{split} {i}", "label": "yes" if i % 2 else "no"}) for i in range(rows)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def classification(name: str = "t", **extra) -> dict:
    return {"name": name, "type": "classification", "source": {"path": "data"}, "labels": ["no", "yes"], **extra}


# ---------------------------------------------------------------- built-ins


def test_builtin_streams_load_with_expected_orders():
    assert {"demo", "cl-text", "order1", "order2", "order3", "paper", "order4", "order5", "order6",
            "order4-first3", "order5-first3", "order6-first3"} <= set(builtin_streams())
    orders = {name: [t.name for t in load_stream(name).tasks] for name in ("cl-text", "order1", "order2", "order3")}
    assert orders["cl-text"] == ["agnews", "amazon", "sst2", "mnli", "qqp"]
    assert orders["order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert orders["order2"] == ["dbpedia", "yahoo", "agnews", "amazon"]
    assert orders["order3"] == ["yahoo", "amazon", "agnews", "dbpedia"]
    paper = load_stream("paper")
    assert [(t.name, t.type, t.source.hub, t.source.config) for t in paper.tasks] == [
        ("gsm8k", "generation", "openai/gsm8k", "main"),
        ("cnn_dailymail", "generation", "abisee/cnn_dailymail", "3.0.0"),
        ("wmt16-de-en", "generation", "wmt/wmt16", "de-en"),
        ("logiqa", "multiple_choice", "extraordinarylab/logiqa", None),
    ]
    yahoo = load_stream("order3").task("yahoo")
    assert yahoo.labels is not None and len(yahoo.labels) == 10 and yahoo.labels[0] == "Society & Culture"
    assert [p.name for p in load_stream("order1").probe] == ["knowledge-probe"]


def test_cl_text_uses_packaged_data_with_labels():
    stream = load_stream("cl-text")
    for task in stream.tasks:
        assert Path(task.source.path).parent == PACKAGE_DATA / "cl-text"  # not ../shared
        assert task.labels == json.loads((Path(task.source.path) / "labels.json").read_text())
        for split, expected in (("train", 1000), ("test", 300)):
            reader = open_split(task.source, split, seed=0)
            records = reader.records(None, seed="0")
            rows, skipped = render_split(task, split, records, reader.location)
            assert len(records) == expected
            assert {r["target"] for r in rows} <= set(task.labels)
            # MultiNLI rows without a gold label ("-") are the only bad rows, skipped by the preset.
            bad = 7 if (task.name, split) == ("mnli", "test") else 0
            assert len(skipped) == bad and len(rows) == expected - bad
            assert all("'-' is not in the label set" in s.reason for s in skipped)
    probe = stream.probe[0]
    assert probe.template == "Question: {question}\nAnswer:"
    reader = open_split(probe.source, "test", seed=0)
    rows, _ = render_split(probe, "test", reader.records(None, seed="0"), reader.location)
    assert len(rows) == 80 and all(len(r["choices"]) == 4 for r in rows)
    assert rows[0]["head"] == "Question: " and rows[0]["tail"] == "\nAnswer:"
    assert (PACKAGE_DATA / "README.md").read_text().count("O-LoRA (Wang et al., 2023") == 2  # attribution kept


# The long-sequence orders published with the benchmark (O-LoRA); yahoo has no data here.
ORDERS = {
    "order4": "mnli cb wic copa qqp boolqa rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo",
    "order5": "multirc boolqa wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo",
    "order6": "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolqa wic",
}
BENCHMARK_ROWS = {"cb": (250, 56), "copa": (400, 100), "rte": (1000, 277)}  # others: 1000 train / 500 test


def test_benchmark_orders_are_one_name_away_and_skip_yahoo_with_a_warning():
    definitions: dict[str, tuple] = {}
    for order, names in ORDERS.items():
        published = names.split()
        with pytest.warns(MissingTaskWarning, match=r"task 'yahoo' skipped: no data at .*cl-benchmark/yahoo"):
            stream = load_stream(order)
        assert [t.name for t in stream.tasks] == [n for n in published if n != "yahoo"]
        first3 = load_stream(f"{order}-first3")
        assert [t.name for t in first3.tasks] == published[:3]
        for s in (stream, first3):
            assert [(p.name, Path(p.source.path)) for p in s.probe] == [
                ("knowledge-probe", PACKAGE_DATA / "knowledge-probe" / "probe.jsonl")]
            for task in s.tasks:  # one definition of each task across all six presets
                assert Path(task.source.path) == PACKAGE_DATA / "cl-benchmark" / task.name
                definition = task.model_dump(exclude={"seed"})
                assert definitions.setdefault(task.name, definition) == definition, task.name
    assert len(definitions) == 14


def test_benchmark_tasks_render_every_row():
    stream = load_stream("order4-first3")
    tasks = {t.name: t for t in stream.tasks}
    with pytest.warns(MissingTaskWarning):
        tasks.update({t.name: t for t in load_stream("order5").tasks})
    assert len(tasks) == 14
    for task in tasks.values():
        assert task.labels == json.loads((Path(task.source.path) / "labels.json").read_text())
        for split, expected in zip(("train", "test"), BENCHMARK_ROWS.get(task.name, (1000, 500))):
            reader = open_split(task.source, split, seed=0)
            rows, skipped = render_split(task, split, reader.records(None, seed="0"), reader.location)
            bad = 8 if (task.name, split) == ("mnli", "test") else 0  # MultiNLI's "-": no gold label
            assert (len(rows), len(skipped)) == (expected - bad, bad), (task.name, split)
            assert {r["target"] for r in rows} <= set(task.labels)
    assert tasks["multirc"].truncation_side == "left"  # its question follows a long paragraph


def test_missing_data_is_an_error_unless_the_task_may_be_skipped(tmp_path):
    folder(tmp_path)
    gone = {"name": "gone", "type": "classification", "source": "nowhere", "labels": ["no", "yes"]}
    path = write_stream(tmp_path, {"name": "s", "tasks": [classification(), gone]})
    with pytest.raises(StreamConfigError, match=r"tasks\[1\]\.source\.path: not found: .*nowhere"):
        load_stream(str(path))
    path = write_stream(tmp_path, {"name": "s", "tasks": [classification(), {**gone, "if_missing": "skip"}]})
    with pytest.warns(MissingTaskWarning, match=rf"{path}: task 'gone' skipped: no data at {tmp_path / 'nowhere'}"):
        assert [t.name for t in load_stream(str(path)).tasks] == ["t"]
    path = write_stream(tmp_path, {"name": "s", "tasks": [{**gone, "if_missing": "skip"}]})
    with pytest.warns(MissingTaskWarning), pytest.raises(StreamConfigError, match="every task was skipped"):
        load_stream(str(path))
    hub = {"name": "h", "type": "classification", "source": "hub:x/y", "labels": ["a", "b"], "if_missing": "skip"}
    with pytest.raises(StreamConfigError, match=r"tasks\[0\]\.if_missing: skip applies to local source\.path data only"):
        load_stream({"name": "s", "tasks": [hub]})


# ---------------------------------------------------------------- validation rows and run options


def test_validation_rows_are_for_training_tasks_only(tmp_path):
    folder(tmp_path)
    probe = classification("p", source={"path": "data/test.jsonl"})
    stream = load_stream({"name": "s", "defaults": {"validation_rows": 0.25},  # defaults skip probes
                          "tasks": [classification()], "probe": [probe]}, base_dir=tmp_path)
    assert (stream.tasks[0].validation_rows, stream.probe[0].validation_rows) == (0.25, None)
    assert stream.tasks[0].splits("task") == ("train", "validation", "test")
    assert stream.probe[0].splits("probe") == ("test",)
    path = write_stream(tmp_path, {"name": "s", "tasks": [
        classification("a", validation_rows=0), classification("b", validation_rows=1.5),
        classification("c", validation_rows=10)], "probe": [{**probe, "validation_rows": 2}]})
    message = str(pytest.raises(StreamConfigError, load_stream, str(path)).value)
    assert "tasks[0].validation_rows: expected a row count (>= 1) or a fraction" in message
    assert "tasks[1].validation_rows: expected a row count" in message and "tasks[2]" not in message
    assert "probe[0].validation_rows: only for training tasks" in message


def test_carve_is_seeded_disjoint_and_leaves_train_rows_unchanged_without_it():
    validation, remaining = carve(100, 10, "s")
    assert len(validation) == 10 and validation == sorted(validation) and remaining == sorted(remaining)
    assert sorted(validation + remaining) == list(range(100))
    assert carve(100, 10, "s") == (validation, remaining) and carve(100, 10, "t")[0] != validation
    assert len(carve(100, 0.25, "s")[0]) == 25 and len(carve(3, 0.01, "s")[0]) == 1  # at least one row
    assert carve(7, None, "s") == ([], list(range(7)))
    with pytest.raises(SourceError, match="validation_rows: 5 would take 5 of the 5 train rows"):
        carve(5, 5, "s")


def test_with_options_applies_a_runs_choices(tmp_path):
    folder(tmp_path)
    stream = load_stream({"name": "s", "tasks": [classification()],
                          "probe": [classification("p", source={"path": "data/test.jsonl"})]}, base_dir=tmp_path)
    assert {t.prompt_format for t in [*stream.tasks, *stream.probe]} == {"auto"}
    changed = with_options(stream, prompt_format="raw", validation_rows=100)
    assert [(t.prompt_format, t.validation_rows) for t in [*changed.tasks, *changed.probe]] == [("raw", 100), ("raw", None)]
    assert with_options(stream) == stream
    with pytest.raises(StreamConfigError, match="prompt_format: Input should be 'auto', 'chat' or 'raw'"):
        with_options(stream, prompt_format="jinja")


def test_demo_generation_is_seeded_and_short():
    stream = load_stream("demo")
    assert [t.name for t in stream.tasks] == ["jobs", "creatures", "sentiment"]
    assert [(p.name, p.source.builtin) for p in stream.probe] == [("facts-probe", "demo/facts")]
    for task in [*stream.tasks, *stream.probe]:
        name = task.source.builtin.split("/")[1]
        for split in ("train", "test"):
            rows = demo_stream.generate(name, split, seed=0)
            assert rows == demo_stream.generate(name, split, seed=0)
            assert rows != demo_stream.generate(name, split, seed=1)
            for row in rows:
                rendered = render_row(task, row)
                prompt = rendered["head"] + rendered["body"] + rendered["tail"]
                assert len((prompt + " " + rendered["target"]).encode()) + 1 <= 64  # + EOS
    train = demo_stream.generate("sentiment", "train", 0)
    test = demo_stream.generate("sentiment", "test", 0)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    with pytest.raises(KeyError, match="no demo task 'nope'"):
        demo_stream.generate("nope", "train")


# ---------------------------------------------------------------- validation errors


def test_errors_name_file_and_field_path(tmp_path):
    folder(tmp_path)
    path = write_stream(tmp_path, {"name": "s", "tasks": [
        classification("a"),
        classification("b", fields={"text": "text"}),  # label column missing
        {**classification("c"), "sorce": {"path": "data"}},  # typo
        classification("d", type="regression"),
    ]})
    with pytest.raises(StreamConfigError) as info:
        load_stream(str(path))
    message = str(info.value)
    assert f"{path}: tasks[1].fields.label: required for a classification task" in message
    assert f"{path}: tasks[2].sorce: unknown field" in message
    assert f"{path}: tasks[3].type: Input should be 'classification'" in message
    assert "tasks[0]" not in message  # only the bad tasks are named


def test_semantic_checks(tmp_path):
    folder(tmp_path)
    (tmp_path / "one.jsonl").write_text('{"text": "x", "label": "no"}\n')
    path = write_stream(tmp_path, {"name": "s", "tasks": [
        classification("a", template="{txt} Answer:"),
        classification("b", labels=None),
        classification("c", source={"path": "missing"}),
        classification("d", source={"path": "one.jsonl"}),
        classification("e", max_prompt_length=300),
        classification("f", labels=None, labels_file="nope.json"),
        {"name": "g", "type": "generation", "source": {"builtin": "demo/nope"}},
        {"name": "h", "type": "generation", "source": {"path": "data", "hub": "x/y"}},
        classification("a"),
    ]})
    message = str(pytest.raises(StreamConfigError, load_stream, str(path)).value)
    for expected in (
        "tasks[0].template: unknown placeholder(s) {txt}; this task has {text}, {choices}, {options}",
        "tasks[1].labels: required for a classification task (give labels or labels_file)",
        f"tasks[2].source.path: not found: {tmp_path / 'missing'}",
        "tasks[3].source.path: " + str(tmp_path / "one.jsonl") + " is a single file, but a training task needs train and test",
        "tasks[4].max_prompt_length: must be below max_length (256)",
        f"tasks[5].labels_file: not found: {tmp_path / 'nope.json'}",
        "tasks[6].source.builtin: unknown generator 'demo/nope'",
        "tasks[7].source: give exactly one of path, hub, builtin (got path, hub)",
        "tasks[8].name: duplicate task name 'a'",
    ):
        assert expected in message, expected


def test_missing_split_file_and_unknown_stream(tmp_path):
    data = folder(tmp_path)
    (data / "test.jsonl").unlink()
    path = write_stream(tmp_path, {"name": "s", "tasks": [classification()]})
    with pytest.raises(StreamConfigError, match=r"tasks\[0\]\.source\.path: no test file in .*looked for test\.jsonl"):
        load_stream(str(path))
    with pytest.raises(StreamConfigError, match="neither a stream YAML file nor a built-in stream .*cl-text.*demo"):
        load_stream("no-such-stream")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(StreamConfigError, match="bad.yaml: not valid YAML"):
        load_stream(str(tmp_path / "bad.yaml"))


def test_inline_dict_defaults_labels_file_and_model_section(tmp_path):
    data = folder(tmp_path)
    (data / "labels.json").write_text('["no", "yes"]')
    stream = load_stream({
        "name": "inline", "seed": 7, "model": {"source": "tiny"},
        "defaults": {"type": "classification", "max_length": 32, "on_bad_rows": "skip"},
        "tasks": [{"name": "t", "source": "data", "labels_file": "data/labels.json"},  # shorthand sources
                  {"name": "h", "source": "hub:fancyzhx/ag_news", "labels": ["a", "b"]}],
        "probe": [{"name": "p", "source": {"path": "data/test.jsonl"}, "labels": ["no", "yes"], "seed": 3}],
    }, base_dir=tmp_path)
    assert stream.tasks[1].source.hub == "fancyzhx/ag_news" and stream.probe[0].source.path == str(data / "test.jsonl")
    task, probe = stream.tasks[0], stream.probe[0]
    assert (task.max_length, task.on_bad_rows, task.seed, probe.seed) == (32, "skip", 7, 3)
    assert task.labels == ["no", "yes"] and task.labels_file == str(data / "labels.json")
    assert task.source.path == str(data) and task.template == "{text}\nAnswer:"
    assert task.fields is not None and task.fields.roles() == {"text": "text", "label": "label"}


# ---------------------------------------------------------------- sources


ROWS = [{"text": "a", "label": "no"}, {"text": "b", "label": "yes"}, {"text": "c", "label": "no"}]


def test_file_formats_give_the_same_rows_with_locations(tmp_path):
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(ROWS))
    (tmp_path / "r.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "r.parquet")
    wheres = {
        "jsonl": ["r.jsonl:1", "r.jsonl:2", "r.jsonl:4"],  # blank line 3 skipped, numbering kept
        "json": ["r.json[0]", "r.json[1]", "r.json[2]"],
        "csv": ["r.csv:2", "r.csv:3", "r.csv:4"],
        "parquet": ["r.parquet row 1", "r.parquet row 2", "r.parquet row 3"],
    }
    for fmt, expected in wheres.items():
        records = FileSplit(tmp_path / f"r.{fmt}", fmt).records(None, "0")
        assert [r.data for r in records] == ROWS, fmt
        assert [r.where for r in records] == [str(tmp_path / e) for e in expected], fmt


def test_malformed_jsonl_line_is_a_record_error_and_hash_tracks_content(tmp_path):
    file = tmp_path / "r.jsonl"
    file.write_text('{"text": "a", "label": "no"}\n{"text": oops}\n[1]\n')
    split = FileSplit(file, "jsonl")
    records = split.records(None, "0")
    assert records[1].where == f"{file}:2" and records[1].data is None
    assert records[1].error is not None and records[1].error.startswith("malformed JSON")
    assert records[2].error == "expected a JSON object, got list"
    before = split.fingerprint()
    file.write_text(file.read_text() + "\n")
    assert split.fingerprint() != before


def test_sampling_is_seeded_sorted_and_bounded():
    picked = sample_indices(100, 10, "s")
    assert picked == sorted(picked) == sample_indices(100, 10, "s") and len(set(picked)) == 10
    assert picked != sample_indices(100, 10, "t")
    assert sample_indices(5, 10, "s") == [0, 1, 2, 3, 4]


def test_hub_sources_go_through_load_dataset(monkeypatch):
    """The Hub path offline: `datasets.load_dataset` replaced by in-memory data with the real schemas."""
    import datasets

    hub = {
        ("wmt/wmt16", "de-en", "test"): [{"translation": {"de": f"hallo {i}", "en": f"hello {i}"}} for i in range(10)],
        ("fancyzhx/dbpedia_14", None, "train"): [{"label": 13, "title": "Dune", "content": "A novel."}],
        ("extraordinarylab/logiqa", None, "test"): [
            {"context": "All A are B.", "question": "So?", "choices": ["x", "y", "z", "w"], "answer": "C", "answer_index": 2}],
    }
    calls = []

    def load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_list(hub[(name, config, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cases = [(load_stream("paper").task("wmt16-de-en"), "test"), (load_stream("order1").task("dbpedia"), "train"),
             (load_stream("paper").task("logiqa"), "test")]
    rendered = {}
    for task, split in cases:
        reader = open_split(task.source, split, seed=0)
        records = reader.records(3, seed="s")
        rows, skipped = render_split(task, split, records, reader.location)
        assert not skipped and len(reader.fingerprint()) == 64
        rendered[task.name] = (records, rows)
    assert calls[0] == ("wmt/wmt16", "de-en", "test", None)
    records, rows = rendered["wmt16-de-en"]
    assert len(rows) == 3 and records[0].where.startswith("hub:wmt/wmt16/de-en split test #")
    index = int(records[0].where.rsplit("#", 1)[1])
    assert (rows[0]["body"], rows[0]["target"]) == (f"hallo {index}", f"hello {index}")
    assert rows[0]["head"] + rows[0]["body"] + rows[0]["tail"] == f"Translate German to English.\nGerman: hallo {index}\nEnglish:"
    _, (dbpedia,) = rendered["dbpedia"]
    assert dbpedia["target"] == "Written Work" and dbpedia["body"] == "Dune\nA novel."
    _, (logiqa,) = rendered["logiqa"]
    assert (logiqa["answer"], logiqa["target"]) == (2, "z")
    assert logiqa["head"] + logiqa["body"] + logiqa["tail"] == "All A are B.\nQuestion: So?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
