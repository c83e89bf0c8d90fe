"""Row formats: detection from a row's keys, conversion to messages, and the data.format override."""

from __future__ import annotations

import pytest

from tuneforge.data.formats import Message, detect_format, to_conversation
from tuneforge.errors import DataError


def convert(row, fmt="auto", system_prompt=None):
    return to_conversation(row, fmt, "rows.jsonl", 7, system_prompt)


@pytest.mark.parametrize("row, expected", [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "", "output": ""}, "alpaca"),
    ({"prompt": "", "completion": ""}, "prompt_completion"),
    ({"text": ""}, "text"),
    # Signature order: messages wins over text, instruction over text, completion over text.
    ({"messages": [], "text": ""}, "messages"),
    ({"instruction": "", "output": "", "text": ""}, "alpaca"),
    ({"prompt": "", "completion": "", "text": ""}, "prompt_completion"),
    ({"prompt": "only a prompt"}, None),
    ({"question": "", "answer": ""}, None),
    ({}, None),
])
def test_detect_format(row, expected):
    assert detect_format(row) == expected


def test_alpaca_without_input():
    conversation = convert({"instruction": "Add 2 and 3.", "output": "5"})
    assert conversation.messages == [Message("user", "Add 2 and 3."), Message("assistant", "5")]
    assert conversation.messages[0].context is None
    assert (conversation.source, conversation.row, conversation.is_plain_text) == ("rows.jsonl", 7, False)


def test_alpaca_input_goes_to_context():
    conversation = convert({"instruction": "Translate to English.", "input": "chat", "output": "cat"})
    user = conversation.messages[0]
    assert (user.role, user.content, user.context) == ("user", "Translate to English.", "chat")
    assert user.full_content() == "Translate to English.\n\nchat"
    assert conversation.messages[1] == Message("assistant", "cat")


def test_alpaca_empty_input_is_no_input():
    conversation = convert({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert conversation.messages[0].context is None


def test_alpaca_system_field_and_empty_system():
    with_system = convert({"system": "Be terse.", "instruction": "Hi?", "output": "Hi."})
    assert with_system.messages[0] == Message("system", "Be terse.")
    # Exported datasets often carry an empty system column: that means no system message, not an error.
    empty_system = convert({"system": "", "instruction": "Hi?", "output": "Hi."})
    assert [m.role for m in empty_system.messages] == ["user", "assistant"]


def test_sharegpt_roles_are_mapped():
    conversation = convert({"conversations": [
        {"from": "system", "value": "Sys."}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]})
    assert conversation.messages == [Message("system", "Sys."), Message("user", "Q1"), Message("assistant", "A1"),
                                     Message("user", "Q2"), Message("assistant", "A2")]


def test_messages_format():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                        {"role": "assistant", "content": "A"}], "id": 3}
    assert convert(row).messages == [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]


def test_prompt_completion_strings():
    conversation = convert({"prompt": "2+2?", "completion": "4"})
    assert conversation.messages == [Message("user", "2+2?"), Message("assistant", "4")]


def test_prompt_completion_message_lists():
    conversation = convert({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                                       {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
                            "completion": [{"role": "assistant", "content": "A2"}]})
    assert [(m.role, m.content, m.trained) for m in conversation.messages] == [
        ("system", "S", False), ("user", "Q1", False), ("assistant", "A1", False), ("user", "Q2", False),
        ("assistant", "A2", True)]


def test_prompt_completion_string_prompt_with_message_completion():
    conversation = convert({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]})
    assert conversation.messages == [Message("user", "Q"), Message("assistant", "A")]


def test_text_format():
    conversation = convert({"text": "Some text."})
    assert conversation.is_plain_text
    assert conversation.messages == [Message("assistant", "Some text.")]


def test_system_prompt_is_added_only_when_missing():
    added = convert({"instruction": "Q", "output": "A"}, system_prompt="Default.")
    assert added.messages[0] == Message("system", "Default.")
    kept = convert({"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A"}]}, system_prompt="Default.")
    assert [m.content for m in kept.messages] == ["Own.", "Q", "A"]


def test_format_override_wins_over_detection():
    # Detected as messages (first signature), but the user says alpaca.
    row = {"messages": "ignored", "instruction": "Q", "output": "A"}
    assert convert(row, "alpaca").messages == [Message("user", "Q"), Message("assistant", "A")]
    # Text override on a row that also has alpaca keys: the whole row is plain text.
    text = convert({"instruction": "Q", "output": "A", "text": "raw"}, "text")
    assert text.is_plain_text and text.messages == [Message("assistant", "raw")]


def test_format_override_names_the_missing_field():
    with pytest.raises(DataError) as info:
        convert({"messages": [{"role": "user", "content": "Q"}]}, "alpaca")
    assert str(info.value) == "rows.jsonl, row 7, field 'instruction': missing required field"
    assert info.value.reason == "missing_field"


def test_undetectable_row_lists_its_keys():
    with pytest.raises(DataError) as info:
        convert({"question": "Q", "answer": "A"})
    message = str(info.value)
    assert message.startswith("rows.jsonl, row 7: cannot tell the row format from its keys (answer, question)")
    assert "data.format" in message
    assert info.value.reason == "unknown_format"


@pytest.mark.parametrize("messages, field, reason", [
    ([{"role": "assistant", "content": "A"}], "messages[0]", "no_prompt"),
    ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}], "messages[1]", "no_prompt"),
    ([{"role": "user", "content": "Q"}], "messages", "no_response"),
    ([{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}],
     "messages[1]", "misplaced_system"),
    ([], "messages", "empty_conversation"),
])
def test_structure_errors(messages, field, reason):
    with pytest.raises(DataError) as info:
        convert({"messages": messages})
    assert (info.value.field, info.value.reason, info.value.row) == (field, reason, 7)


def test_prompt_completion_needs_a_completion_to_learn():
    with pytest.raises(DataError) as info:
        convert({"prompt": [{"role": "user", "content": "Q"}], "completion": []})
    assert (info.value.field, info.value.reason) == ("completion", "empty_response")
    with pytest.raises(DataError) as info:
        convert({"prompt": [], "completion": "A"})
    assert (info.value.field, info.value.reason) == ("prompt", "empty_conversation")
    with pytest.raises(DataError) as info:
        convert({"prompt": "Q", "completion": [{"role": "user", "content": "A"}]})
    assert (info.value.field, info.value.reason) == ("completion[0].role", "unknown_role")
