"""Bad input: every error a user can cause names the file, the row and the field, and lenient mode
(data.on_error=skip) counts dropped rows by reason."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import write_jsonl
from tuneforge.config import DataConfig, config_from_dict
from tuneforge.data.dataset import DataReport, load_conversations, tokenize_conversations
from tuneforge.data.templates import load_template
from tuneforge.errors import ConfigError, DataError, TemplateError, UserError

GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}


def user_assistant(content, role="assistant"):
    return {"messages": [{"role": "user", "content": "Q"}, {"role": role, "content": content}]}


def load(path, **data):
    return load_conversations(str(path), DataConfig(train=str(path), **data), DataReport())


# name -> (bad line at row 2, exact message after "<path>, row 2", reason)
BAD_ROWS = {
    "malformed_json": ('{"messages": [', ": invalid JSON (Expecting value at column 15)", "invalid_json"),
    "not_an_object": ("[1, 2]", ": expected a JSON object, got list", "not_an_object"),
    "missing_field": ({"instruction": "Do it."}, ", field 'output': missing required field", "missing_field"),
    "missing_content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]},
                        ", field 'messages[0].content': missing required field", "missing_field"),
    "content_is_int": (user_assistant(5), ", field 'messages[1].content': expected a string, got int", "wrong_type"),
    "messages_not_a_list": ({"messages": "hello"}, ", field 'messages': expected a list of messages, got str",
                            "wrong_type"),
    "message_not_an_object": ({"messages": ["hi", GOOD["messages"][1]]},
                              ", field 'messages[0]': expected an object, got str", "wrong_type"),
    "empty_response": (user_assistant("   "), ", field 'messages[1].content': is empty", "empty_response"),
    "empty_alpaca_output": ({"instruction": "Do it.", "output": ""}, ", field 'output': is empty", "empty_response"),
    "empty_completion": ({"prompt": "Q", "completion": ""}, ", field 'completion': is empty", "empty_response"),
    "unknown_role": (user_assistant("A", role="bot"),
                     ", field 'messages[1].role': unknown role 'bot' (known roles: assistant, system, user)",
                     "unknown_role"),
    "unknown_sharegpt_role": ({"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]},
                              ", field 'conversations[1].from': unknown role 'robot' (known roles: assistant, bard, "
                              "bing, chatgpt, gpt, human, system, user)", "unknown_role"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_row_and_field(case, tmp_path):
    line, message, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as info:
        load(path)
    assert str(info.value) == f"{path}, row 2{message}"
    assert (info.value.path, info.value.row, info.value.reason) == (str(path), 2, reason)


def test_invalid_utf8_line_is_one_bad_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}, row 2: not valid UTF-8")
    report = DataReport()
    assert len(load_conversations(str(path), DataConfig(train=str(path), on_error="skip"), report)) == 1
    assert report.dropped == Counter({"invalid_encoding": 1})


def test_skip_mode_counts_dropped_rows_by_reason(tmp_path):
    lines = [GOOD] + [BAD_ROWS[case][0] for case in BAD_ROWS] + [{"question": "?"}, GOOD, "", GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    report = DataReport()
    conversations = load_conversations(str(path), DataConfig(train=str(path), on_error="skip"), report)
    assert report.dropped == Counter({"invalid_json": 1, "not_an_object": 1, "missing_field": 2, "wrong_type": 3,
                                      "empty_response": 3, "unknown_role": 2, "unknown_format": 1})
    assert [c.row for c in conversations] == [1, 15, 17]  # line numbers, the blank line 16 counted
    assert report.rows == 16  # blank lines are not rows
    assert report.path == str(path)
    assert "  dropped 3 row(s): empty_response" in report.lines()


def test_skip_mode_with_no_usable_rows(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", ['{"x', {"text": 3}])
    with pytest.raises(UserError) as info:
        load(path, on_error="skip")
    assert str(info.value) == f"{path}: no usable rows (2 read, dropped: {{'invalid_json': 1, 'wrong_type': 1}})"


def test_unknown_template_name(tokenizer):
    with pytest.raises(TemplateError, match=r"data\.template: unknown template 'chatmll'"):
        load_template("chatmll", tokenizer)
    with pytest.raises(TemplateError, match=r"data\.template: template file .*missing\.jinja does not exist"):
        load_template("missing.jinja", tokenizer)


def test_unknown_template_name_fails_at_config_time():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"train": "x.jsonl", "template": "chatmll"}})
    assert str(info.value).startswith("data.template: unknown template 'chatmll' (did you mean 'chatml'?)")
    with pytest.raises(ConfigError, match=r"data\.template: template file nowhere/t\.jinja does not exist"):
        config_from_dict({"data": {"train": "x.jsonl", "template": "nowhere/t.jinja"}})


@pytest.mark.parametrize("values, message", [
    ({"data": {"train": "x.jsonl", "max_lenght": 64}},
     "unknown config key 'data.max_lenght' (did you mean 'data.max_length'?)"),
    ({"dataa": {"train": "x.jsonl"}}, "unknown config key 'dataa' (did you mean 'data'?)"),
    ({"train": {"lr": 1e-4, "epochz": 2}, "data": {"train": "x.jsonl"}},
     "unknown config key 'train.epochz' (did you mean 'train.epochs'?)"),
])
def test_unknown_config_key_with_did_you_mean(values, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(values)
    assert str(info.value) == message


@pytest.mark.parametrize("values, message", [
    ({"train": {"epochs": "three"}}, "train.epochs: expected an integer, got 'three'"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer, got 2.5"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
    ({"train": {"lr": "nan"}}, "train.lr: expected a number, got 'nan'"),
    ({"train": {"lr": True}}, "train.lr: expected a number, got True"),
    ({"data": {"packing": "yes"}}, "data.packing: expected true or false, got 'yes'"),
    ({"data": {"format": "jsonl"}},
     "data.format: 'jsonl' is not one of 'auto', 'alpaca', 'sharegpt', 'messages', 'prompt_completion', 'text'"),
    ({"data": {"max_length": 4}}, "data.max_length: 4 is out of range; it must be at least 8"),
    ({"lora": 8}, "lora: expected a section (mapping), got 8"),
])
def test_wrong_config_type(values, message):
    values.setdefault("data", {}).setdefault("train", "x.jsonl")
    with pytest.raises(ConfigError) as info:
        config_from_dict(values)
    assert str(info.value) == message


# Like many chat templates, this one refuses two user messages in a row.
STRICT_JINJA = (
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_template_failure_names_the_row(tmp_path, tokenizer):
    template_path = tmp_path / "strict.jinja"
    template_path.write_text(STRICT_JINJA)
    template = load_template(str(template_path), tokenizer)
    double_user = {"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q again"},
                                {"role": "assistant", "content": "A"}]}
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, double_user, GOOD])
    config = DataConfig(train=str(path))
    conversations = load_conversations(str(path), config, DataReport())
    with pytest.raises(DataError) as info:
        tokenize_conversations(conversations, template, tokenizer, config, DataReport())
    assert str(info.value).startswith(f"{path}, row 2: chat template {template_path} failed to render")
    assert "Conversation roles must alternate" in str(info.value)

    report = DataReport()
    skip = DataConfig(train=str(path), on_error="skip")
    examples = tokenize_conversations(conversations, template, tokenizer, skip, report)
    assert [e.row for e in examples] == [1, 3]
    assert report.dropped == Counter({"template_failed": 1})
