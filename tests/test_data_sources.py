"""Data sources beyond one local file: Hub-like folders, Hub ids through a local cache (no network), mixtures with
weights and fractions, and column / role mapping."""

import json
import shutil
import time

import pytest
import yaml

from conftest import QA_ROWS, write_jsonl
from tuneforge.config import config_from_dict, load_config
from tuneforge.data import hub
from tuneforge.data.dataset import DataReport, load_conversations
from tuneforge.data.prepare import read_data, tokenize_data
from tuneforge.data.preview import preview_rows
from tuneforge.data.readers import read_rows
from tuneforge.data.sources import DataSource, parse_sources
from tuneforge.data.templates import load_template
from tuneforge.errors import ConfigError, DataError, UserError

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.jsonl
  - split: test
    path: data/test-*.jsonl
- config_name: short
  data_files:
  - split: train
    path: data/test-*.jsonl
---
# a tiny dataset
"""


def alpaca(i):
    return {"question": f"What is {i}?", "answer": f"It is {i}."}


def hub_folder(root, name="tiny", train=4, test=2):
    """A local folder laid out like a Hub dataset repo: README.md with a configs: header and data/ files."""
    folder = root / name
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(README)
    write_jsonl(folder / "data" / "train-00000-of-00001.jsonl", [alpaca(i) for i in range(train)])
    write_jsonl(folder / "data" / "test-00000-of-00001.jsonl", [alpaca(100 + i) for i in range(test)])
    return folder


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face cache in tmp_path and a hub that refuses connections (fast, like no network)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    hub.hub_answers.cache_clear()
    yield home
    hub.hub_answers.cache_clear()


def cache_as_hub_id(tmp_path, home, repo_id="tinyorg/tiny"):
    """Cache a Hub-like folder under ``repo_id``, as a load of that id from the hub leaves it (datasets' layout:
    HF_DATASETS_CACHE/org___name/config/version/hash)."""
    import datasets

    folder = hub_folder(tmp_path / "src", repo_id.split("/")[1])
    datasets.load_dataset(str(folder))  # caches under the folder's name
    (home / "datasets" / folder.name).rename(home / "datasets" / repo_id.replace("/", "___"))


# ------------------------------------------------------------------------------------------------ Hub-like folders
def test_hub_like_folder_reads_its_train_split_with_dataset_row_indices(tmp_path, offline_hub):
    rows = read_rows(hub_folder(tmp_path))
    assert [row.number for row in rows] == [0, 1, 2, 3]  # dataset indices, not 1-based record numbers
    assert rows[0].fields == alpaca(0)


def test_hub_like_folder_split_subset_and_data_files(tmp_path, offline_hub):
    folder = str(hub_folder(tmp_path))
    assert [r.fields for r in read_rows(DataSource(folder, split="test"))] == [alpaca(100), alpaca(101)]
    assert len(read_rows(DataSource(folder, subset="short"))) == 2
    only = read_rows(DataSource(folder, data_files={"train": "data/test-*.jsonl"}))
    assert [r.fields for r in only] == [alpaca(100), alpaca(101)]
    with pytest.raises(UserError, match="Unknown split"):
        read_rows(DataSource(folder, split="nosuch"))


def test_hub_like_folder_row_errors_name_the_dataset_row_index(tmp_path, offline_hub):
    folder = hub_folder(tmp_path)
    config = config_from_dict({"data": {"train": {"path": str(folder), "columns": {"instruction": "question"}}}})
    with pytest.raises(DataError) as caught:
        load_conversations(config.data.train, config.data, DataReport())
    assert caught.value.row == 0 and caught.value.field == "output"


# ------------------------------------------------------------------------------------------ Hub ids, no network
def test_cached_hub_id_loads_when_the_hub_is_unreachable(tmp_path, offline_hub):
    import datasets
    from huggingface_hub import constants

    cache_as_hub_id(tmp_path, offline_hub)
    started = time.monotonic()
    rows = read_rows(DataSource("tinyorg/tiny", split="test"))
    assert [r.fields for r in rows] == [alpaca(100), alpaca(101)] and rows[0].number == 0
    assert time.monotonic() - started < 10
    # Offline mode was set for the load only, and never by hand.
    assert not datasets.config.HF_HUB_OFFLINE and not constants.HF_HUB_OFFLINE
    # The same id as data.train, from a config file: it stays a Hub id.
    mapped = {"path": "tinyorg/tiny", "columns": {"instruction": "question", "output": "answer"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"data": {"train": mapped}}))
    config = load_config(tmp_path / "run.yaml")
    assert config.data.train == mapped
    assert len(load_conversations(config.data.train, config.data, DataReport())) == 4


def test_uncached_hub_id_fails_in_seconds_with_one_line(offline_hub):
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        read_rows("someorg/not-cached")
    message = str(caught.value)
    assert time.monotonic() - started < 10
    assert "\n" not in message and "'someorg/not-cached'" in message
    assert "neither in the local Hugging Face cache" in message and "nor reachable" in message


def test_hub_id_stays_an_id_and_local_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", QA_ROWS[:2])
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"data": {"train": [
        {"path": "data/a.jsonl", "weight": 2, "template": "t.jinja"},
        {"path": "org/name", "split": "train", "fraction": 0.5}]}}))
    config = load_config(tmp_path / "run.yaml")
    first, second = config.data.train
    assert first["path"] == str(tmp_path / "data" / "a.jsonl") and first["template"] == str(tmp_path / "t.jinja")
    assert second["path"] == "org/name"
    overridden = load_config(None, ["data.train=org/other", "data.validation=data/a.jsonl"])
    assert overridden.data.train == "org/other" and overridden.data.validation.endswith("data/a.jsonl")


# ----------------------------------------------------------------------------------------------------- mixtures
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", QA_ROWS[:6])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"Q{i}?", "a": f"A{i}."} for i in range(8)]
                    + [{"q": "Q?", "a": ""}])
    return a, b


def mixture_config(tmp_path, seed=0, **b_options):
    a, b = two_sources(tmp_path)
    return config_from_dict({"data": {"train": [
        {"path": str(a), "weight": 2},
        {"path": str(b), "columns": {"instruction": "q", "output": "a"}, "name": "qa-b", **b_options}],
        "on_error": "skip", "max_length": 128}, "train": {"seed": seed}})


def test_mixture_weights_fractions_and_per_source_report(tmp_path, tokenizer):
    config = mixture_config(tmp_path, fraction=0.5)
    read = read_data(config)
    report = read.reports[0]
    a, b = report.sources
    assert (a.rows, a.mixed, b.rows, b.mixed) == (6, 12, 9, 4)  # b: 8 usable rows, half of them
    assert b.dropped == {"empty_response": 1}
    prepared = tokenize_data(read, config, tokenizer, load_template("chatml", tokenizer))
    assert len(prepared.train) == 16 and report.kept == 16
    assert report.trained_tokens == a.trained_tokens + b.trained_tokens and b.trained_tokens > 0
    saved = json.loads(json.dumps(report.to_dict()))
    assert [s["path"] for s in saved["sources"]] == [str(tmp_path / "a.jsonl"), "qa-b"]
    assert saved["sources"][0]["weight"] == 2 and saved["sources"][1]["fraction"] == 0.5
    assert saved["sources"][1]["dropped"] == {"empty_response": 1} and saved["sources"][1]["kept"] == 4
    assert any("qa-b: 9 rows, 4 in the mix (fraction 0.5)" in line for line in report.lines())


def test_mixture_is_deterministic_from_the_seed(tmp_path):
    def picked(seed):
        rows = read_data(mixture_config(tmp_path, seed=seed, weight=0.5)).train
        return [(c.source, c.row) for c in rows]

    assert picked(0) == picked(0)
    assert picked(0) != picked(1) or picked(0) != picked(2)


def test_val_fraction_holds_out_before_weights(tmp_path):
    a, _ = two_sources(tmp_path)
    config = config_from_dict({"data": {"train": [{"path": str(a), "weight": 3}, {"path": str(a), "name": "again"}],
                                        "val_fraction": 0.25}})
    read = read_data(config)
    held = {(c.source, c.row) for c in read.validation}
    assert held and not held & {(c.source, c.row) for c in read.train}
    assert sum(sub.rows for sub in read.reports[0].sources) == read.reports[0].rows == 12 - len(held)


def test_preview_takes_rows_from_every_source_and_names_it(tmp_path, tokenizer):
    config = mixture_config(tmp_path)
    report = DataReport()
    from tuneforge.data.mixture import tokenize_sources
    from tuneforge.data.dataset import tokenize_conversations

    rows = load_conversations(config.data.train, config.data, report)
    examples = tokenize_sources(rows, report, lambda r, rep: tokenize_conversations(
        r, load_template("chatml", tokenizer), tokenizer, config.data, rep))
    headings = [heading for heading, _ in preview_rows(examples, 3, report)]
    assert headings == [f"row 1 of {tmp_path / 'a.jsonl'}", "row 1 of qa-b", f"row 2 of {tmp_path / 'a.jsonl'}"]


def test_python_api_mixture_with_rows_in_memory(tmp_path):
    from tuneforge.api import build_config

    config = build_config("sft", data=[{"path": QA_ROWS[:3], "weight": 2}, {"path": QA_ROWS[3:5]}],
                          output_dir=tmp_path / "run")
    read = read_data(config)
    assert [sub.mixed for sub in read.reports[0].sources] == [6, 2]
    saved = config.to_dict()["data"]["train"]
    assert saved[0]["path"].startswith("<in-memory: 3 rows") and saved[0]["weight"] == 2
    single = build_config("sft", data={"path": "org/name", "split": "train"}, output_dir=tmp_path / "run2")
    assert single.data.train == {"path": "org/name", "split": "train"}


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "weight": 2, "fraction": 0.5}, "not both"),
    ({"path": "a.jsonl", "fraction": 1.5}, r"data.train\[0\].fraction: 1.5 is out of range"),
    ({"path": "a.jsonl", "weight": 0}, r"weight: 0 is out of range"),
    ({"path": "a.jsonl", "colums": {}}, "unknown source key 'colums'"),
    ({"weight": 2}, r"data.train\[0\].path: every source needs a path"),
    ({"path": "a.jsonl", "roles": {"bot": "robot"}}, "not a role tuneforge trains on"),
    ({"path": "a.jsonl", "format": "chat"}, "format: 'chat' is not one of"),
])
def test_malformed_sources_are_config_errors_naming_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"train": [entry, {"path": "b.jsonl"}]}})


def test_two_sources_with_the_same_name_are_refused():
    with pytest.raises(ConfigError, match="give one of them a name"):
        parse_sources(["a.jsonl", "a.jsonl"], "data.train")


# ---------------------------------------------------------------------------------------------- column mapping
def test_columns_map_fields_onto_alpaca_and_messages(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"dialog": QA_ROWS[0]["messages"], "extra": 1}])
    [conversation] = load_conversations({"path": str(data), "columns": {"messages": "dialog"}},
                                        config_from_dict({"data": {"train": "x.jsonl"}}).data, DataReport())
    assert [m.role for m in conversation.messages] == ["user", "assistant"]
    alp = write_jsonl(tmp_path / "q.jsonl", [alpaca(1)])
    [c] = load_conversations({"path": str(alp), "columns": {"instruction": "question", "output": "answer"}},
                             config_from_dict({"data": {"train": "x.jsonl"}}).data, DataReport())
    assert c.messages[0].content == "What is 1?" and c.messages[1].content == "It is 1."


def test_sharegpt_role_and_key_names_are_configurable(tmp_path):
    turns = [{"speaker": "human", "text": "Hi?"}, {"speaker": "bot", "text": "Hello."}]
    data = write_jsonl(tmp_path / "s.jsonl", [{"turns": turns}])
    source = {"path": str(data), "format": "sharegpt",
              "columns": {"conversations": "turns", "role": "speaker", "content": "text"},
              "roles": {"bot": "assistant"}}
    [c] = load_conversations(source, config_from_dict({"data": {"train": "x.jsonl"}}).data, DataReport())
    assert [(m.role, m.content) for m in c.messages] == [("user", "Hi?"), ("assistant", "Hello.")]
    # role/content data with its own role names, as the messages format.
    other = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "human", "content": "Hi?"},
                                                             {"role": "gpt", "content": "Yo."}]}])
    [m] = load_conversations({"path": str(other), "roles": {"human": "user", "gpt": "assistant"}},
                             config_from_dict({"data": {"train": "x.jsonl"}}).data, DataReport())
    assert [x.role for x in m.messages] == ["user", "assistant"]


def test_a_mapped_field_that_does_not_exist_names_source_row_and_field(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [alpaca(1), {"question": "Q?"}])
    source = {"path": str(data), "name": "my-qa", "columns": {"instruction": "question", "output": "answer"}}
    with pytest.raises(DataError) as caught:
        load_conversations(source, config_from_dict({"data": {"train": "x.jsonl"}}).data, DataReport())
    error = caught.value
    assert (error.path, error.row, error.field, error.reason) == ("my-qa", 2, "answer", "missing_mapped_field")
    assert "columns maps output onto 'answer'" in str(error)


def test_a_file_source_refuses_hub_options(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [alpaca(1)])
    with pytest.raises(UserError, match="split applies to Hub datasets"):
        read_rows(DataSource(str(data), split="train"))


def test_saved_dataset_dict_folder_takes_its_split(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([alpaca(1)]),
                          "extra": datasets.Dataset.from_list([alpaca(2), alpaca(3)])}).save_to_disk(str(folder))
    assert [r.fields for r in read_rows(DataSource(str(folder), split="extra"))] == [alpaca(2), alpaca(3)]
    shutil.rmtree(folder)


def test_eval_data_reads_a_hub_like_folder_and_keeps_a_hub_id(tmp_path, offline_hub):
    from tuneforge.eval.heldout import read_heldout
    from tuneforge.paths import EVAL_CONFIG_PATHS, resolve_paths

    folder = tmp_path / "evalset"  # no README: datasets infers the train split from data/train-*.jsonl
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-00000-of-00001.jsonl", [{"prompt": f"Q{i}?", "answer": f"A{i}"}
                                                                 for i in range(3)])
    from tuneforge.config import DataConfig

    heldout = read_heldout(str(folder), DataConfig(train=str(folder)))
    assert [(r.question, r.number) for r in heldout.rows] == [("Q0?", 0), ("Q1?", 1), ("Q2?", 2)]
    assert resolve_paths({"data": "org/name", "pairs": "p.jsonl"}, tmp_path, EVAL_CONFIG_PATHS) == {
        "data": "org/name", "pairs": str(tmp_path / "p.jsonl")}
