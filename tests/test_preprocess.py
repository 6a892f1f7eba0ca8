"""Ray Data preprocessing: shard contract, masking, cache, bad input, atomic writes."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import pipelines.preprocess as pp
from pipelines import demo_stream
from pipelines.models import ModelConfig, build_byte_tokenizer, tokenizer_fingerprint
from pipelines.preprocess import (
    EVAL_SCHEMA,
    MARKER,
    RAW,
    CorruptShardError,
    DataError,
    Manifest,
    Rendering,
    ShardWarning,
    SplitSpec,
    TokenizeBatch,
    chat_rendering,
    prepare_command,
    prepare_stream,
    read_eval_rows,
    render_row,
    resolve_rendering,
    shard_hash,
    train_dataset,
)
from pipelines.streams import StreamConfigError, load_stream, with_options

TINY = ModelConfig()
PRESETS = Path(pp.__file__).parent / "presets"


def demo_with_facts() -> dict:
    """The demo stream with its probe's facts also as a training task (train and test splits)."""
    stream = yaml.safe_load((PRESETS / "demo.yaml").read_text())
    stream["tasks"].insert(0, {"name": "facts", "type": "multiple_choice", "source": "builtin:demo/facts"})
    return stream


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pp, "BLOCK_ROWS", 32)  # several blocks and files per split: row order must survive
        return out, prepare_stream(load_stream(demo_with_facts()), TINY, str(out), progress=False)


def small_stream(tmp_path: Path, train: list[str] | None = None, **task_fields) -> Path:
    """A one-task classification stream over two small JSONL files; returns the stream YAML."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    good = [json.dumps({"text": f"row {i}", "label": "yes" if i % 2 else "no"}) for i in range(6)]
    (data / "train.jsonl").write_text("\n".join(train if train is not None else good) + "\n")
    (data / "test.jsonl").write_text("\n".join(good[:4]) + "\n")
    stream = {"name": "small", "tasks": [{"name": "t", "type": "classification", "source": {"path": "data"},
                                          "labels": ["no", "yes"], "max_length": 32, **task_fields}]}
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(stream))
    return path


def no_ray(monkeypatch) -> None:
    """Fail the test if anything would start Ray or tokenise."""
    def forbidden(*args, **kwargs):
        raise AssertionError("Ray work was started")
    monkeypatch.setattr(pp, "ensure_ray", forbidden)
    monkeypatch.setattr(pp, "_write_pass", forbidden)


# ---------------------------------------------------------------- the demo stream


def test_demo_layout_and_manifest(demo):
    out, manifest = demo
    stream_dir = out / "shards" / "demo"
    assert manifest.path == str(stream_dir / "manifest.json")
    assert [t.name for t in manifest.training_tasks] == ["facts", "jobs", "creatures", "sentiment"]
    assert [(t.name, list(t.splits)) for t in manifest.probes] == [("facts-probe", ["test"])]
    for task in manifest.tasks:
        for split in task.splits.values():
            shard = Path(split.path)
            assert shard.parent == stream_dir / task.name
            assert re.fullmatch(rf"{split.name}-[0-9a-f]{{16}}", shard.name)
            assert (shard / MARKER).is_file() and split.cache == "built" and split.rows > 0 and split.skipped == 0
    assert manifest.tokenizer["fingerprint"] == tokenizer_fingerprint(build_byte_tokenizer())
    assert Manifest.load(str(stream_dir)) == manifest  # paths come back absolute
    on_disk = json.loads((stream_dir / "manifest.json").read_text())
    assert on_disk["tasks"][0]["splits"]["train"]["path"] == "facts/" + Path(manifest.task("facts").split("train").path).name
    assert not list(stream_dir.rglob(".tmp-*")) and not list(stream_dir.glob("*.tmp-*"))


def test_train_rows_are_fixed_length_with_loss_on_the_answer_only(demo, tiny_tokenizer):
    _, manifest = demo
    train_path = manifest.task("facts").split("train").path
    files = sorted(Path(train_path).glob("*.parquet"))
    assert pq.read_schema(files[0]).names == ["input_ids", "attention_mask", "labels"]
    rows = train_dataset(train_path).take_all()
    assert len(rows) == manifest.task("facts").split("train").rows == 60
    # Same questions in facts/test: each train row is the eval prompt + the right choice + EOS.
    eval_rows = {tuple(r["prompt_ids"]): r for r in read_eval_rows(manifest.task("facts").split("test").path)}
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for row in rows:
        ids, mask, labels = (np.asarray(row[k]) for k in ("input_ids", "attention_mask", "labels"))
        assert ids.shape == mask.shape == labels.shape == (64,) and ids.dtype == labels.dtype == np.int64
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (ids[n:] == pad).all()
        answer_at = int(np.argmax(labels != -100))
        prompt = eval_rows[tuple(ids[:answer_at])]
        answer = prompt["choice_ids"][prompt["answer"]] + [eos]
        assert ids[answer_at:n].tolist() == labels[answer_at:n].tolist() == answer
        assert (labels[:answer_at] == -100).all() and (labels[n:] == -100).all()
        assert tiny_tokenizer.decode(labels[answer_at:n]) == f" {prompt['target']}</s>"


def test_eval_rows_follow_the_contract_in_source_order(demo):
    _, manifest = demo
    path = manifest.task("creatures").split("test").path
    files = sorted(Path(path).glob("*.parquet"))
    assert len(files) > 1 and all(pq.read_schema(f) == EVAL_SCHEMA for f in files)
    rows = read_eval_rows(path)
    source = demo_stream.generate("creatures", "test", seed=0)
    assert [r["prompt"] for r in rows] == [f"Question: {s['question']}\nAnswer:" for s in source]
    assert [(r["choices"], r["answer"]) for r in rows] == [(s["choices"], s["answer"]) for s in source]
    assert all(r["target"] == r["choices"][r["answer"]] and len(r["choice_ids"]) == 4 for r in rows)
    sentiment = read_eval_rows(manifest.task("sentiment").split("test").path)
    assert all(r["choices"] == ["positive", "negative"] for r in sentiment)
    assert [r["target"] for r in sentiment] == [s["label"] for s in demo_stream.generate("sentiment", "test", 0)]


def test_unchanged_input_is_a_cache_hit_without_ray_in_one_line(demo, monkeypatch, capsys):
    out, manifest = demo
    no_ray(monkeypatch)
    again = prepare_stream(load_stream(demo_with_facts()), TINY, str(out), progress=True)
    assert capsys.readouterr().err == "[demo] 9 shards cached (4 tasks, 1 probe)\n"
    assert {s.cache for t in again.tasks for s in t.splits.values()} == {"hit"}
    assert [s.path for t in again.tasks for s in t.splits.values()] == [s.path for t in manifest.tasks for s in t.splits.values()]


def test_every_split_is_built_in_one_ray_data_pass_with_a_line_each(ray_local, tmp_path, monkeypatch, capsys):
    import ray.data
    from ray.data import DataContext

    small_stream(tmp_path)
    stream = load_stream({"name": "small", "tasks": [
        {"name": name, "type": "classification", "source": "data", "labels": ["no", "yes"], "max_length": 32}
        for name in ("a", "b")],
        "probe": [{"name": "p", "type": "classification", "source": "data/test.jsonl", "labels": ["no", "yes"]}]},
        base_dir=tmp_path)
    passes, operators = [], []
    write_pass, map_batches = pp._write_pass, ray.data.Dataset.map_batches

    def counted_pass(blocks, *args, **kwargs):
        passes.append((len(blocks), DataContext.get_current().enable_progress_bars))
        return write_pass(blocks, *args, **kwargs)

    def counted_map_batches(self, fn, *args, **kwargs):
        operators.append(fn)
        return map_batches(self, fn, *args, **kwargs)

    monkeypatch.setattr(pp, "_write_pass", counted_pass)
    monkeypatch.setattr(ray.data.Dataset, "map_batches", counted_map_batches)
    monkeypatch.setattr(pp, "BLOCK_ROWS", 4)  # 6 train rows: 2 files per train shard
    monkeypatch.delenv("SECURA_VERBOSE", raising=False)
    manifest = prepare_stream(stream, TINY, str(tmp_path / "out"), progress=True)

    assert passes == [(7, False)]  # one execution of 2 + 1 + 2 + 1 + 1 blocks, Ray's progress bars off
    assert operators == [pp.write_blocks]  # one map operator: its tasks build every split
    lines = capsys.readouterr().err.splitlines()
    built = sorted(re.fullmatch(r"\[small\] (\w+/\w+): (\d+) rows, \d+ tokens, 0 skipped \(built at [\d.]+s\)", line).groups()
                   for line in lines)
    assert built == [("a/test", "4"), ("a/train", "6"), ("b/test", "4"), ("b/train", "6"), ("p/test", "4")]
    train = Path(manifest.task("a").split("train").path)
    assert sorted(f.name for f in train.glob("*.parquet")) == ["part-000000.parquet", "part-000001.parquet"]
    # rows in the order the plan put them in, across files
    tok = build_byte_tokenizer()
    planned = pp._plan(stream.tasks[0], "train", RAW, tokenizer_fingerprint(tok), pp.Location.of(str(tmp_path / "x")),
                       verify=False).rows
    written = [tok.decode([i for i in ids if i != tok.pad_token_id]) for ids in pq.read_table(train)["input_ids"].to_pylist()]
    assert [re.search(r"row \d", text).group() for text in written] == [row["body"] for row in planned]


# ---------------------------------------------------------------- cache keys and the CLI


def test_changed_file_rebuilds_only_that_split_via_cli(ray_local, tmp_path, capsys):
    stream_yaml = small_stream(tmp_path)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"stream": "stream.yaml", "model": {"source": "tiny"}, "output_dir": str(tmp_path / "out")}))
    args = argparse.Namespace(config=str(run_yaml), output_dir=None, model_source=None, model_path=None, no_progress=True)
    assert prepare_command(args) == 0
    first = Manifest.load(str(tmp_path / "out" / "shards" / "small"))
    assert re.search(r"^t\s+train\s+6\s+\d+\s+0\s+0\s+built$", capsys.readouterr().out, re.M)

    with (tmp_path / "data" / "train.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "one more", "label": "yes"}) + "\n")
    assert prepare_command(args) == 0
    second = Manifest.load(str(tmp_path / "out" / "shards" / "small"))
    assert (second.task("t").split("train").cache, second.task("t").split("test").cache) == ("built", "hit")
    assert second.task("t").split("train").rows == 7
    assert second.task("t").split("train").path != first.task("t").split("train").path
    assert second.task("t").split("test").path == first.task("t").split("test").path

    task = load_stream(str(stream_yaml)).tasks[0]
    assert shard_hash(task, "train", "src", "tok-a") != shard_hash(task, "train", "src", "tok-b")  # new tokenizer
    assert shard_hash(task, "train", "src", "tok-a") != shard_hash(task.model_copy(update={"max_length": 40}), "train", "src", "tok-a")

    bad_args = argparse.Namespace(**{**vars(args), "config": str(tmp_path / "missing.yaml")})
    assert prepare_command(bad_args) == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("lines, expected", [
    (['{"text": "a", "label": "no"}', '{"text": "b", "label": "yes"}', '{"text": "c", "label": '],
     r"train\.jsonl:3: malformed JSON: Expecting value"),
    (['{"text": "a", "label": "no"}', '{"text": "b", "label": "maybe"}'],
     r"train\.jsonl:2: field 'label': 'maybe' is not in the label set \['no', 'yes'\]"),
    (['{"txt": "a", "label": "no"}'], r"train\.jsonl:1: field 'text': column 'text' is missing"),
    (['{"text": "a", "label": 5}'], r"train\.jsonl:1: field 'label': class index 5 is outside 0\.\.1"),
    ([], r"task 't' split 'train': no usable rows"),
])
def test_bad_rows_fail_before_ray_naming_file_line_and_field(tmp_path, monkeypatch, lines, expected):
    no_ray(monkeypatch)
    stream = load_stream(str(small_stream(tmp_path, train=lines)))
    with pytest.raises(DataError, match=expected) as info:
        prepare_stream(stream, TINY, str(tmp_path / "out"), progress=False)
    if lines:
        assert str(tmp_path / "data" / "train.jsonl") in str(info.value)
    assert not (tmp_path / "out").exists()


def test_skip_mode_counts_and_lists_bad_rows(ray_local, tmp_path):
    lines = [json.dumps({"text": "a", "label": "no"}), "{oops", json.dumps({"text": "b", "label": "maybe"}),
             json.dumps({"text": "c", "label": "yes"})]
    stream = load_stream(str(small_stream(tmp_path, train=lines, on_bad_rows="skip")))
    prepare_stream(stream, TINY, str(tmp_path / "out"), progress=False)
    train = Manifest.load(str(tmp_path / "out" / "shards" / "small")).task("t").split("train")
    file = tmp_path / "data" / "train.jsonl"
    assert (train.rows, train.skipped) == (2, 2)
    assert [s["where"] for s in train.skipped_rows] == [f"{file}:2", f"{file}:3"]
    assert train.skipped_rows[0]["reason"].startswith("malformed JSON")
    assert "'maybe' is not in the label set" in train.skipped_rows[1]["reason"]


# ---------------------------------------------------------------- atomic writes


def test_interrupted_write_leaves_no_trusted_shard(ray_local, tmp_path, monkeypatch):
    stream = load_stream(str(small_stream(tmp_path)))
    out = tmp_path / "out"
    staged = []

    def crash_before_rename(staging, shard, marker):
        staged.append(sorted(p.name for p in Path(staging.path).iterdir()))
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(pp, "_seal", crash_before_rename)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        prepare_stream(stream, TINY, str(out), progress=False)
    assert staged == [["part-000000.parquet"]]  # the files were written, then the run died
    stream_dir = out / "shards" / "small"
    assert [p.name for p in stream_dir.iterdir()] == ["t"]  # no manifest, no tokenizer file left
    assert list((stream_dir / "t").iterdir()) == []  # the temp dir is gone, nothing under a trusted name
    monkeypatch.undo()

    first = prepare_stream(stream, TINY, str(out), progress=False)
    train = Path(first.task("t").split("train").path)
    # A shard without its marker (e.g. an object-store write killed before the marker) is never trusted.
    (train / MARKER).unlink()
    (train / "junk.parquet").write_bytes(b"half a file")
    with pytest.raises(FileNotFoundError, match="not a complete shard"):
        train_dataset(str(train))
    again = prepare_stream(stream, TINY, str(out), progress=False)
    assert (again.task("t").split("train").cache, again.task("t").split("test").cache) == ("built", "hit")
    assert (train / MARKER).is_file() and not (train / "junk.parquet").exists()


# ---------------------------------------------------------------- tokenisation (no Ray)


def tokenize(train: bool, row: dict, rendering: Rendering = RAW, truncation_side: str = "right", **lengths) -> pa.Table | dict:
    tok = build_byte_tokenizer()
    spec = SplitSpec(train, **{"max_length": 32, **lengths}, target_prefix=rendering.target_prefix,
                     special_tokens=rendering.special_tokens, truncation_side=truncation_side)
    tokenize_batch = TokenizeBatch.from_json(tok.backend_tokenizer.to_str(), tok.eos_token_id, tok.pad_token_id, spec)
    return tokenize_batch(pa.Table.from_pylist([row]))


def test_long_prompts_lose_the_body_end_and_keep_the_cue(tmp_path):
    small_stream(tmp_path)
    task = load_stream({"name": "s", "tasks": [{
        "name": "t", "type": "classification", "source": {"path": "data"}, "labels": ["no", "yes"],
        "template": "Say: {text}\nAnswer:", "max_length": 32}]}, base_dir=tmp_path).tasks[0]
    row = render_row(task, {"text": "x" * 100, "label": "yes"})
    assert (row["head"], row["tail"]) == ("Say: ", "\nAnswer:")
    tok = build_byte_tokenizer()
    out = tokenize(True, row)
    n = int(out["attention_mask"][0].sum())
    assert n == 32 and out["_truncated"][0] == 1
    assert tok.decode(out["input_ids"][0][:n]) == "Say: " + "x" * 14 + "\nAnswer: yes</s>"
    evaluated = tokenize(False, row).to_pylist()[0]
    assert evaluated["prompt"] == "Say: " + "x" * 15 + "\nAnswer:"  # room for the longest choice, " yes"
    assert len(evaluated["prompt_ids"]) + max(map(len, evaluated["choice_ids"])) == 32


def test_generation_targets_are_capped_and_eval_has_no_choices():
    row = {"head": "Q: ", "body": "why?", "tail": "\nA:", "target": "because " * 10, "choices": [], "answer": -1}
    out = tokenize(True, row, max_target_length=8)
    labels = out["labels"][0][out["labels"][0] != -100]
    assert len(labels) == 9 and labels[-1] == build_byte_tokenizer().eos_token_id and out["_truncated"][0] == 1
    evaluated = tokenize(False, row, max_target_length=8).to_pylist()[0]
    assert (evaluated["choices"], evaluated["choice_ids"], evaluated["answer"]) == ([], [], -1)
    assert evaluated["target"] == "because " * 10 and evaluated["prompt"] == "Q: why?\nA:"


def test_left_truncation_keeps_the_end_of_the_body(tmp_path):
    small_stream(tmp_path)
    task = load_stream({"name": "s", "tasks": [{
        "name": "t", "type": "classification", "source": {"path": "data"}, "labels": ["no", "yes"],
        "template": "Say: {text}\nAnswer:", "max_length": 32, "truncation_side": "left"}]}, base_dir=tmp_path).tasks[0]
    row = render_row(task, {"text": "a" * 50 + "question?", "label": "yes"})
    evaluated = tokenize(False, row, truncation_side=task.truncation_side).to_pylist()[0]
    assert evaluated["prompt"] == "Say: " + "a" * 6 + "question?\nAnswer:"


# ---------------------------------------------------------------- chat template


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_tokenizer(template: str = CHAT_TEMPLATE):
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_chat_rendering_is_shared_by_train_rows_scoring_and_the_cache_key(tmp_path):
    small_stream(tmp_path)
    task = load_stream({"name": "s", "tasks": [{
        "name": "t", "type": "classification", "source": {"path": "data"}, "labels": ["no", "yes"],
        "template": "Say: {text}\nAnswer:", "max_length": 64}]}, base_dir=tmp_path).tasks[0]
    tok = chat_tokenizer()
    chat = resolve_rendering(task, tok)  # auto: the tokenizer has a chat template
    assert (chat.format, chat.head, chat.tail, chat.target_prefix) == ("chat", "<user>", "</user>\n<assistant>", "")
    row = render_row(task, {"text": "hi", "label": "yes"}, chat)
    train = tokenize(True, row, chat, max_length=64)
    n = int(train["attention_mask"][0].sum())
    ids, labels = train["input_ids"][0][:n], train["labels"][0][:n]
    assert tok.decode(ids) == "<user>Say: hi\nAnswer:</user>\n<assistant>yes</s>"
    answer_at = int(np.argmax(labels != -100))
    assert tok.decode(labels[answer_at:]) == "yes</s>" and (labels[:answer_at] == -100).all()
    evaluated = tokenize(False, row, chat, max_length=64).to_pylist()[0]
    assert evaluated["prompt"] == "<user>Say: hi\nAnswer:</user>\n<assistant>"
    assert evaluated["prompt_ids"] == ids[:answer_at].tolist()  # scoring and generation see the trained prompt
    assert [tok.decode(c) for c in evaluated["choice_ids"]] == ["no", "yes"]  # the reply: no leading space

    assert resolve_rendering(task, build_byte_tokenizer()) is RAW  # auto without a template
    assert resolve_rendering(task.model_copy(update={"prompt_format": "raw"}), tok) is RAW
    with pytest.raises(StreamConfigError, match="task 't': prompt_format: chat, but the tokenizer has no chat template"):
        resolve_rendering(task.model_copy(update={"prompt_format": "chat"}), build_byte_tokenizer())
    other = chat_rendering(chat_tokenizer(CHAT_TEMPLATE.replace("<assistant>", "<bot>")))
    keys = {shard_hash(task, "train", "src", "tok", r.key) for r in (RAW, chat, other)}
    assert len(keys) == 3  # the rendering, template included, is part of the shard key


def test_validation_rows_come_from_train_and_chat_is_the_default(ray_local, tmp_path, monkeypatch):
    import pipelines.models

    monkeypatch.setattr(pipelines.models, "load_tokenizer", lambda config: chat_tokenizer())
    stream = load_stream(str(small_stream(tmp_path, validation_rows=2, max_length=64)))
    manifest = prepare_stream(stream, TINY, str(tmp_path / "out"), progress=False)
    task = manifest.task("t")
    assert task.prompt_format == "chat"
    assert [(s.name, s.rows) for s in task.splits.values()] == [("train", 4), ("validation", 2), ("test", 4)]
    tok = chat_tokenizer()
    train_rows = pq.read_table(task.split("train").path).to_pylist()
    trained = {tok.decode(row["input_ids"]).split("Answer:")[0] for row in train_rows}
    validation = {row["prompt"].split("Answer:")[0] for row in read_eval_rows(task.split("validation").path)}
    assert not trained & validation
    assert trained | validation == {f"<user>row {i}\n" for i in range(6)}  # all six train rows, none from test
    assert with_options(stream, prompt_format="raw").tasks[0].prompt_format == "raw"  # the run's switch back


# ---------------------------------------------------------------- shards that cannot lie


def corrupt(path: Path, *, truncate: bool = False) -> Path:
    """A shard's first Parquet file, cut to half its size or with 6 bytes changed in its middle."""
    file = sorted(path.glob("*.parquet"))[0]
    data = bytearray(file.read_bytes())
    if truncate:
        del data[len(data) // 2:]
    else:
        middle = len(data) // 2
        data[middle:middle + 6] = bytes(b ^ 0xFF for b in data[middle:middle + 6])
    file.write_bytes(bytes(data))
    return file


def test_truncated_or_altered_shards_are_caught_at_cache_check_naming_the_file(ray_local, tmp_path, monkeypatch):
    small_stream(tmp_path)
    stream = load_stream({"name": "small", "tasks": [{
        "name": "t", "type": "classification", "source": "data", "labels": ["no", "yes"], "max_length": 32}],
        "probe": [{"name": "p", "type": "classification", "source": "data/test.jsonl", "labels": ["no", "yes"]}]},
        base_dir=tmp_path)
    out = str(tmp_path / "out")
    first = prepare_stream(stream, TINY, out, progress=False)
    marker = json.loads((Path(first.task("t").split("train").path) / MARKER).read_text())
    assert all(set(entry) == {"size", "xxh3_128"} for entry in marker["files"].values()) and marker["files"]
    probe_rows = read_eval_rows(first.task("p").split("test").path)
    probe_file = corrupt(Path(first.task("p").split("test").path))
    train_file = corrupt(Path(first.task("t").split("train").path), truncate=True)

    with monkeypatch.context() as remote:  # remote storage: fail, naming the file, before any Ray work
        no_ray(remote)
        remote.setattr(pp.Location, "local", property(lambda self: False))
        with pytest.raises(CorruptShardError, match=rf"{train_file}: \d+ bytes, but the marker says \d+"):
            prepare_stream(stream, TINY, out, progress=False)
        train_file.unlink()  # a missing file is named too
        with pytest.raises(CorruptShardError, match=rf"{train_file}: missing"):
            prepare_stream(stream, TINY, out, progress=False)

    with pytest.warns(ShardWarning) as caught:  # local: rebuild, with a warning naming each file
        again = prepare_stream(stream, TINY, out, progress=False)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{train_file}: missing: rebuilding") for m in messages)
    assert any(m.startswith(f"{probe_file}: content differs from the marker's hash: rebuilding") for m in messages)
    assert [(t.name, s.name, s.cache) for t in again.tasks for s in t.splits.values()] == [
        ("t", "train", "built"), ("t", "test", "hit"), ("p", "test", "built")]
    assert read_eval_rows(again.task("p").split("test").path) == probe_rows

    # Files above the hash budget are checked by size only, unless verify is asked for.
    no_ray(monkeypatch)
    monkeypatch.setattr(pp, "HASH_CHECK_BYTES", 0)
    probe_file = corrupt(Path(again.task("p").split("test").path))
    assert {s.cache for t in prepare_stream(stream, TINY, out, progress=False).tasks for s in t.splits.values()} == {"hit"}
    monkeypatch.setattr(pp.Location, "local", property(lambda self: False))
    with pytest.raises(CorruptShardError, match=rf"{probe_file}: content differs from the marker's hash"):
        prepare_stream(stream, TINY, out, progress=False, verify=True)
