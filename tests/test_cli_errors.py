"""The CLI on bad and good data: user errors print one line and exit 2, before any model is loaded;
`tuneforge data preview` marks trained spans and prints the counts."""

from __future__ import annotations

import pytest
import yaml

from conftest import QA_ROWS, write_jsonl
from tuneforge.cli import main
from tuneforge.errors import USER_ERROR_EXIT_CODE

GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
WRONG_TYPE = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 42}]}


def write_config(tmp_path, train_file, model, **data):
    config = {"model": {"name_or_path": str(model)},
              "data": {"train": str(train_file), "max_length": 128, **data},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 4, "lr": 1e-3,
                        "mixed_precision": "no"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading any model (or, for preview, even its tokenizer) a test failure."""
    import tuneforge.engine.build as build
    import tuneforge.models.loading as loading

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was validated")

    monkeypatch.setattr(loading, "load_model", forbidden)
    monkeypatch.setattr(build, "load_model", forbidden)  # the trainer's model builder imported the name itself
    return forbidden


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("bad_line, message", [
    (WRONG_TYPE, "row 2, field 'messages[1].content': expected a string, got int"),
    ('{"messages": [{"role": "user", "content": "Q"}', "row 2: invalid JSON (Expecting ',' delimiter at column 47)"),
    ({"messages": [{"role": "robot", "content": "Q"}, GOOD["messages"][1]]},
     "row 2, field 'messages[0].role': unknown role 'robot' (known roles: assistant, system, user)"),
])
def test_preview_bad_row_exits_2_before_loading_anything(bad_line, message, tmp_path, monkeypatch, capsys,
                                                          no_model_loading):
    import tuneforge.models.loading as loading

    # Preview needs neither model nor tokenizer to validate rows.
    monkeypatch.setattr(loading, "resolve_model", no_model_loading)
    monkeypatch.setattr(loading, "load_tokenizer", no_model_loading)
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad_line, GOOD])
    config = write_config(tmp_path, data, tmp_path / "no-such-model")
    assert main(["data", "preview", str(config)]) == USER_ERROR_EXIT_CODE
    assert one_error_line(capsys) == f"error: {data}, {message}"


def test_train_bad_row_exits_2_before_the_model_is_loaded(tmp_path, capsys, tiny_model_dir, no_model_loading):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, WRONG_TYPE])
    config = write_config(tmp_path, data, tiny_model_dir)
    assert main(["train", str(config)]) == USER_ERROR_EXIT_CODE
    assert one_error_line(capsys) == f"error: {data}, row 3, field 'messages[1].content': expected a string, got int"


def test_train_reports_the_data_error_before_a_missing_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, WRONG_TYPE])
    config = write_config(tmp_path, data, tmp_path / "no-such-model")
    assert main(["train", str(config)]) == USER_ERROR_EXIT_CODE
    assert one_error_line(capsys) == f"error: {data}, row 2, field 'messages[1].content': expected a string, got int"


@pytest.mark.parametrize("extra, overrides, message", [
    ({"train": {"lrr": 0.1}}, [], "error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ({}, ["data.formt=alpaca"], "error: unknown config key 'data.formt' (did you mean 'data.format'?)"),
    ({}, ["train.epochs=two"], "error: train.epochs: expected an integer, got 'two'"),
    ({}, ["data.template=chatmll"],
     "error: data.template: unknown template 'chatmll' (did you mean 'chatml'?); use auto, tokenizer, alpaca, "
     "chatml, simple, or the path of a .jinja file"),
])
def test_train_config_errors_exit_2(extra, overrides, message, tmp_path, capsys, no_model_loading):
    config = write_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", [GOOD]), tmp_path / "no-such-model")
    values = yaml.safe_load(config.read_text())
    for section, updates in extra.items():
        values[section].update(updates)
    config.write_text(yaml.safe_dump(values))
    assert main(["train", str(config), *overrides]) == USER_ERROR_EXIT_CODE
    assert one_error_line(capsys) == message


def test_missing_data_file_exits_2(tmp_path, capsys, no_model_loading):
    missing = tmp_path / "missing.jsonl"
    config = write_config(tmp_path, missing, tmp_path / "no-such-model")
    assert main(["data", "preview", str(config)]) == USER_ERROR_EXIT_CODE
    assert one_error_line(capsys) == f"error: data file {missing} does not exist"


def test_preview_marks_trained_spans_and_prints_counts(tmp_path, capsys, tiny_model_dir, qa_file,
                                                       no_model_loading):
    config = write_config(tmp_path, qa_file, tiny_model_dir)
    assert main(["data", "preview", str(config), "--n", "2"]) == 0
    out = capsys.readouterr().out
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    rows = [f"{system}<|im_start|>user\nWhat is item {i}?<|im_end|>\n<|im_start|>assistant\n"
            f"[[Item {i} is a {colour} thing.<|im_end|>]]\n" for i, colour in ((0, "red"), (1, "blue"))]
    lines = out.splitlines()
    assert lines[0] == "template: tokenizer; trained tokens are between [[ and ]]"
    assert lines[1].startswith("--- row 1 (") and lines[1].endswith(" trained)")
    assert rows[0] in out and rows[1] in out
    assert "--- row 3" not in out  # --n 2
    assert out.count("[[") == out.count("]]") == 3  # the legend line, then one span per row shown
    counts = [line for line in lines if line.startswith(f"{qa_file}: ")]
    assert len(counts) == 1
    assert counts[0].startswith(f"{qa_file}: 24 rows, 24 kept, ")
    assert counts[0].endswith(" trained tokens, 0 truncated rows")


def test_preview_reports_dropped_rows_in_skip_mode(tmp_path, capsys, tiny_model_dir, no_model_loading):
    data = write_jsonl(tmp_path / "mixed.jsonl", [*QA_ROWS[:3], WRONG_TYPE, "{oops"])
    config = write_config(tmp_path, data, tiny_model_dir, on_error="skip")
    assert main(["data", "preview", str(config), "--n", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{data}: "))
    assert lines[index].startswith(f"{data}: 5 rows, 3 kept, ")
    assert lines[index + 1:] == ["  dropped 1 row(s): invalid_json", "  dropped 1 row(s): wrong_type"]


def test_preview_counts_match_the_rendered_rows(tmp_path, capsys, tiny_model_dir, tokenizer, no_model_loading):
    data = write_jsonl(tmp_path / "one.jsonl", [QA_ROWS[0]])
    config = write_config(tmp_path, data, tiny_model_dir, template="chatml", system_prompt="Be brief.")
    assert main(["data", "preview", str(config)]) == 0
    out = capsys.readouterr().out
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is item 0?<|im_end|>\n"
              "<|im_start|>assistant\n")
    response = "Item 0 is a red thing.<|im_end|>"
    assert f"{prompt}[[{response}]]\n" in out
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    tokens, trained = count(prompt) + count(response) + count("\n"), count(response)
    assert f"--- row 1 ({tokens} tokens, {trained} trained)" in out
    assert f"{data}: 1 rows, 1 kept, {tokens} tokens, {trained} trained tokens, 0 truncated rows" in out
