"""The Python API end to end on the tiny model: train from in-memory rows and from a datasets.Dataset, load,
generate, evaluate (the numbers of `tuneforge eval`), SFT -> DPO with model=run, resume with rows in memory, and
errors: typed, naming source, row and field, in the API's words."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import tuneforge as tf
from conftest import QA_ROWS, write_jsonl
from tuneforge import cli

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TRAIN = {"batch_size": 4, "lr": 1e-3, "seed": 0, "mixed_precision": "no", "log_every": 1}
PAIRS = [{"prompt": f"What colour is item {i}?", "chosen": f"Item {i} is {['red', 'blue', 'green'][i % 3]}.",
          "rejected": f"Well, item {i} might be some colour or other, perhaps."} for i in range(8)]
BAD_ROLE = {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep."}]}


def quiet_train(model, data, output_dir, method="sft", steps=3, **sections):
    sections = {"lora": LORA, "train": {**TRAIN, "max_steps": steps}, **sections}
    return tf.train(method, model=model, data=data, output_dir=output_dir, show_progress=False, log=None,
                    **sections)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """A LoRA SFT run trained from a list of dicts (3 steps)."""
    return quiet_train(tiny_model_dir, {"train": QA_ROWS, "max_length": 128},
                       tmp_path_factory.mktemp("api") / "sft")


def test_import_is_light_and_names_the_api():
    code = "import sys, tuneforge as tf; tf.train, tf.Run, tf.DataError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert {"train", "evaluate", "load", "generate", "Run", "UserError", "ConfigError", "DataError"} <= set(tf.__all__)


def test_train_from_rows_gives_a_run_with_summary_metrics_and_model(sft_run, tiny_model_dir, tmp_path):
    from peft import PeftModel

    assert isinstance(sft_run, tf.Run)
    summary = json.loads((sft_run.path / "summary.json").read_text())
    assert sft_run.summary == summary and summary["steps"] == 3
    lines = [json.loads(line) for line in (sft_run.path / "metrics.jsonl").read_text().splitlines()]
    assert sft_run.metrics == lines and [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    # The saved config is plain YAML: the rows are recorded by count and fingerprint.
    saved = yaml.safe_load((sft_run.path / "config.yaml").read_text())
    assert saved["data"]["train"].startswith("<in-memory: 24 rows, sha256 ")
    assert sft_run.config == saved
    report = json.loads((sft_run.path / "data_report.json").read_text())
    assert report[0]["path"] == "data.train (in-memory rows)" and report[0]["kept"] == 24
    model, tokenizer = sft_run.load()
    assert isinstance(model, PeftModel) and tokenizer.pad_token_id is not None
    # The same rows from a file train the same steps: in-memory rows take the file rows' path.
    from_file = quiet_train(tiny_model_dir, {"train": write_jsonl(tmp_path / "qa.jsonl", QA_ROWS),
                                             "max_length": 128}, tmp_path / "from-file")
    assert [r["loss"] for r in from_file.metrics if "loss" in r] == [r["loss"] for r in lines if "loss" in r]


def test_generate_takes_plain_dict_messages(sft_run):
    question = [{"role": "user", "content": "What is item 1?"}]
    answer = sft_run.generate(question, max_new_tokens=6)
    assert isinstance(answer, str)
    both = sft_run.generate([question, [{"role": "system", "content": "Be brief."}, *question]], max_new_tokens=6)
    assert isinstance(both, list) and len(both) == 2 and both[0] == answer  # greedy: the same answer
    assert tf.generate(sft_run, "What is item 1?", max_new_tokens=6) == answer


def test_generate_refuses_bad_messages_before_loading(sft_run):
    with pytest.raises(tf.DataError) as error:
        tf.generate(sft_run, [{"role": "user"}])
    assert error.value.field == "messages[0].content" and "missing required field" in str(error.value)
    with pytest.raises(tf.DataError, match="must end with a user message"):
        tf.generate(sft_run, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]])


def test_train_from_a_dataset_and_a_dataset_dict(tiny_model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")

    run = quiet_train(tiny_model_dir, {"train": datasets.Dataset.from_list(QA_ROWS), "max_length": 128},
                      tmp_path / "dataset", steps=2)
    assert run.summary["steps"] == 2
    assert json.loads((run.path / "data_report.json").read_text())[0]["path"] == "data.train (Dataset)"
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(QA_ROWS[:16]),
                                   "test": datasets.Dataset.from_list(QA_ROWS[16:])})
    run = quiet_train(tiny_model_dir, {"train": splits, "max_length": 128}, tmp_path / "splits", steps=2)
    reports = json.loads((run.path / "data_report.json").read_text())
    assert [r["path"] for r in reports] == ["data.train (DatasetDict['train'])",
                                            "data.validation (DatasetDict['test'])"]
    assert [r["rows"] for r in reports] == [16, 8] and "val_loss" in run.summary
    assert run.config["data"]["validation"].startswith("<in-memory: 8 rows")


def test_a_bad_row_in_memory_names_source_row_and_field_like_a_file(tiny_model_dir, tmp_path):
    rows = QA_ROWS[:3] + [BAD_ROLE]
    with pytest.raises(tf.DataError) as memory:
        quiet_train(tiny_model_dir, rows, tmp_path / "run")
    with pytest.raises(tf.DataError) as file:
        quiet_train(tiny_model_dir, write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path / "run")
    assert (memory.value.path, memory.value.row, memory.value.field) == (
        "data.train (in-memory rows)", 3, "messages[1].role")  # row = the list index: rows[3]
    assert str(memory.value).startswith("data.train (in-memory rows), row 3, field 'messages[1].role': unknown role")
    assert (file.value.row, file.value.field, file.value.message) == (4, memory.value.field, memory.value.message)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    datasets = pytest.importorskip("datasets")
    with pytest.raises(tf.DataError, match=r"^data.validation \(Dataset\), row 0, field 'messages\[1\].role'"):
        quiet_train(tiny_model_dir, QA_ROWS, tmp_path / "run", validation=datasets.Dataset.from_list([BAD_ROLE]))
    with pytest.raises(tf.DataError, match=r"^data.train \(in-memory rows\), row 1: expected a dict, got str"):
        quiet_train(tiny_model_dir, QA_ROWS[:1] + ["not a row"], tmp_path / "run")


def test_config_errors_are_typed_and_name_the_option(tiny_model_dir, tmp_path):
    with pytest.raises(tf.ConfigError, match=r"unknown config key 'lora.rr' \(did you mean 'lora.r'\?\)"):
        tf.train("sft", model=tiny_model_dir, data=QA_ROWS, lora={"rr": 4}, output_dir=tmp_path / "run")
    with pytest.raises(tf.ConfigError, match="no training data given; pass data="):
        tf.train("sft", model=tiny_model_dir, output_dir=tmp_path / "run")
    with pytest.raises(tf.ConfigError, match="data.train: expected a file path, a list of dicts or a datasets"):
        tf.train("sft", model=tiny_model_dir, data=42, output_dir=tmp_path / "run")
    with pytest.raises(tf.ConfigError, match=r"train=: expected a dict of train\.\* options"):
        tf.train("sft", model=tiny_model_dir, data=QA_ROWS, train=3)
    start = {"train": {"epochs": 1}}
    with pytest.raises(tf.ConfigError):
        tf.train(model=tiny_model_dir, data=QA_ROWS, config=start, lora={"r": 0})
    assert start == {"train": {"epochs": 1}}  # the caller's dicts are not changed
    with pytest.raises(tf.UserError, match="not a tuneforge run directory"):
        tf.Run(tmp_path)


def test_an_existing_run_directory_asks_for_overwrite_true(sft_run, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(tf.UserError) as error:
        quiet_train(tiny_model_dir, QA_ROWS, sft_run.path)
    assert "pass overwrite=True to replace it" in str(error.value) and "--overwrite" not in str(error.value)
    # The command line keeps its own words.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                      "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", QA_ROWS))},
                                      "train": {"output_dir": str(sft_run.path)}}))
    assert cli.main(["train", str(config)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err


def test_resume_with_rows_in_memory(tiny_model_dir, tmp_path):
    out, constant = tmp_path / "run", {**TRAIN, "scheduler": "constant", "warmup_ratio": 0.0}
    whole = quiet_train(tiny_model_dir, QA_ROWS, tmp_path / "whole", steps=4, train={**constant, "max_steps": 4})
    quiet_train(tiny_model_dir, QA_ROWS, out, save={"every": 2}, train={**constant, "max_steps": 2})
    with pytest.raises(tf.UserError) as error:
        quiet_train(tiny_model_dir, QA_ROWS[:-1], out, resume=True, train={**constant, "max_steps": 4})
    assert "data.train: '<in-memory: 24 rows" in str(error.value) and "-> '<in-memory: 23 rows" in str(error.value)
    assert "pass force=True" in str(error.value) and "--force" not in str(error.value)
    resumed = tf.train("sft", model=tiny_model_dir, data=QA_ROWS, output_dir=out, resume=True, show_progress=False,
                       log=None, lora=LORA, train={**constant, "max_steps": 4})
    losses = [r["loss"] for r in resumed.metrics if "loss" in r]
    assert resumed.summary["steps"] == 4
    assert losses == pytest.approx([r["loss"] for r in whole.metrics if "loss" in r], abs=1e-5)
    with pytest.raises(tf.ConfigError, match="resume=True continues a run directory: give output_dir"):
        tf.train("sft", model=tiny_model_dir, data=QA_ROWS, resume=True)


def test_evaluate_rows_gives_what_the_cli_writes(sft_run, tmp_path, capsys):
    rows = QA_ROWS[:6]
    report = tf.evaluate(sft_run, data=rows, max_new_tokens=6, out=tmp_path / "api.json", log=None)
    assert report == json.loads((tmp_path / "api.json").read_text())
    assert cli.main(["eval", str(sft_run.path), "--data", str(write_jsonl(tmp_path / "held.jsonl", rows)),
                     "--max-new-tokens", "6", "--out", str(tmp_path / "cli.json")]) == 0
    written = json.loads((tmp_path / "cli.json").read_text())
    assert report["metrics"] == written["metrics"] and report["samples"] == written["samples"]
    assert {"loss", "perplexity", "exact_match", "token_f1"} <= set(report["metrics"][sft_run.path.name])
    assert report["data"]["generation"].startswith("<in-memory: 6 rows")
    assert sft_run.evaluate(data=rows, max_new_tokens=6, out=tmp_path / "again.json", log=None)["metrics"] \
        == report["metrics"]
    with pytest.raises(tf.ConfigError, match="nothing to evaluate: give data="):
        tf.evaluate(sft_run)


def test_sft_then_dpo_with_the_run_as_model(sft_run, tmp_path):
    from peft import PeftModel

    dpo = quiet_train(sft_run, {"train": PAIRS, "max_length": 64}, tmp_path / "dpo", method="dpo", steps=2)
    assert dpo.config["method"] == "dpo" and dpo.config["model"]["name_or_path"] == str(sft_run.path)
    assert json.loads((dpo.path / "tuneforge_run.json").read_text())["base_model"] == str(sft_run.path)
    assert dpo.summary["steps"] == 2 and all("loss" in r for r in dpo.metrics if "lr" in r)
    model, _ = tf.load(dpo)
    assert isinstance(model, PeftModel)
    assert isinstance(dpo.generate([{"role": "user", "content": "What colour is item 2?"}], max_new_tokens=4), str)
