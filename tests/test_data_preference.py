"""Preference data: row layouts (explicit prompt, implicit prompt, HH text, unpaired KTO rows), their errors,
golden token masks of a pair, truncation, and the pair / KTO batches with their rank slicing."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
import torch

from conftest import write_jsonl
from tuneforge.config import DataConfig
from tuneforge.data.dataset import DataReport
from tuneforge.data.formats import Message
from tuneforge.data.preference import (PairExample, PreferenceRow, UnpairedExample, UnpairedRow, collate_pairs,
                                       collate_unpaired, load_preference_rows, make_preference_batches,
                                       to_preference_row, to_unpaired_rows, tokenize_pairs, tokenize_unpaired)
from tuneforge.data.preview import render_pair, render_unpaired
from tuneforge.data.templates import Segment, Template, load_template
from tuneforge.data.tokenize import Example
from tuneforge.errors import DataError, UserError
from tuneforge.losses import IGNORE_INDEX

I = IGNORE_INDEX
PAIR = {"system": "Be brief.", "prompt": "Question one?", "chosen": "Good answer.", "rejected": "Bad answer."}
PROMPT_TEXT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQuestion one?<|im_end|>\n"
               "<|im_start|>assistant\n")
UNPAIRED = {"prompt": "Q?", "completion": "A.", "label": True}


def config(path="rows.jsonl", **data) -> DataConfig:
    return DataConfig(train=str(path), **data)


def load(path, unpaired=False, **data):
    report = DataReport()
    return load_preference_rows(str(path), config(path, **data), report, unpaired=unpaired), report


def pair_row(fields, system_prompt=None) -> PreferenceRow:
    return to_preference_row(fields, "p.jsonl", 1, system_prompt)


def summary(messages: list[Message]) -> list[tuple]:
    return [(m.role, m.content) for m in messages]


def pairs_of(rows, template, tokenizer, **data):
    report = DataReport(path="p.jsonl")
    parsed = [to_preference_row(row, "p.jsonl", number) for number, row in enumerate(rows, start=1)]
    return tokenize_pairs(parsed, template, tokenizer, config(**data), report), report


@pytest.fixture
def chatml(tokenizer):
    return load_template("chatml", tokenizer)


# --- golden token masks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["chatml", "tokenizer"])
def test_golden_pair_masks(spec, tokenizer, trained_spans):
    (pair,), report = pairs_of([PAIR], load_template(spec, tokenizer), tokenizer, max_length=512)

    assert tokenizer.decode(pair.chosen.input_ids) == PROMPT_TEXT + "Good answer.<|im_end|>\n"
    assert tokenizer.decode(pair.rejected.input_ids) == PROMPT_TEXT + "Bad answer.<|im_end|>\n"
    # Only the response and the end-of-turn token that closes it are trained; nothing of the prompt.
    assert trained_spans(pair.chosen) == ["Good answer.<|im_end|>"]
    assert trained_spans(pair.rejected) == ["Bad answer.<|im_end|>"]
    # Both sequences start with the same prompt tokens (header included), and training starts right after.
    p = pair.prompt_length
    assert tokenizer.decode(pair.chosen.input_ids[:p]) == PROMPT_TEXT
    assert pair.chosen.input_ids[:p] == pair.rejected.input_ids[:p]
    assert pair.chosen.labels[:p] == pair.rejected.labels[:p] == [I] * p
    assert pair.chosen.labels[p] == pair.chosen.input_ids[p] and pair.rejected.labels[p] == pair.rejected.input_ids[p]
    assert pair.row == 1 and pair.ref_chosen is None and pair.ref_rejected is None
    assert report.kept == 1 and report.truncated == 0
    assert report.tokens == len(pair.chosen.input_ids) + len(pair.rejected.input_ids)
    assert report.trained_tokens == pair.chosen.num_trained + pair.rejected.num_trained > 0


def test_prompt_assistant_turns_are_context_not_trained(chatml, tokenizer, trained_spans):
    row = {"prompt": [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "Earlier answer."},
                      {"role": "user", "content": "Q2?"}],
           "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]}
    (pair,), _ = pairs_of([row], chatml, tokenizer, max_length=512)
    assert trained_spans(pair.chosen) == ["Yes.<|im_end|>"] and trained_spans(pair.rejected) == ["No.<|im_end|>"]
    assert "Earlier answer." in tokenizer.decode(pair.chosen.input_ids[:pair.prompt_length])


def test_multi_message_responses_train_every_message(chatml, tokenizer, trained_spans):
    row = {"prompt": "Q?", "chosen": [{"role": "assistant", "content": "A1."}, {"role": "assistant", "content": "A2."}],
           "rejected": "B."}
    (pair,), _ = pairs_of([row], chatml, tokenizer, max_length=512)
    assert trained_spans(pair.chosen) == ["A1.<|im_end|>", "A2.<|im_end|>"]
    assert trained_spans(pair.rejected) == ["B.<|im_end|>"]


class _PromptDependsOnResponse(Template):
    """A broken template whose assistant header changes with the response: the pair shares no prompt."""

    name = "broken"

    def segments(self, conversation, add_generation_prompt=False):
        last = conversation.messages[-1].content
        return [Segment(f"user: {conversation.messages[0].content}\n", False),
                Segment(f"assistant ({len(last)}): ", False), Segment(last + "<|im_end|>", True, response=1)]


def test_template_that_renders_the_prompt_differently_fails(tokenizer):
    rows = [PAIR, {"prompt": "Q?", "chosen": "Same.", "rejected": "Also!"}]  # equal lengths: shared prompt
    parsed = [to_preference_row(r, "p.jsonl", n) for n, r in enumerate(rows, start=1)]
    with pytest.raises(DataError) as info:
        tokenize_pairs(parsed, _PromptDependsOnResponse(), tokenizer, config(), DataReport())
    assert str(info.value).startswith("p.jsonl, row 1: template broken renders the prompt differently")
    assert info.value.reason == "template_failed"

    report = DataReport(path="p.jsonl")
    pairs = tokenize_pairs(parsed, _PromptDependsOnResponse(), tokenizer, config(on_error="skip"), report)
    assert [p.row for p in pairs] == [2]
    assert report.dropped == Counter({"template_failed": 1}) and report.kept == 1


STRICT_JINJA = ("{% for message in messages %}"
                "{% if 'FORBIDDEN' in message['content'] %}{{ raise_exception('no forbidden words') }}{% endif %}"
                "{{ message['role'] + ': ' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_template_error_names_the_row_or_is_counted(tmp_path, tokenizer):
    path = tmp_path / "strict.jinja"
    path.write_text(STRICT_JINJA)
    template = load_template(str(path), tokenizer)
    bad = {"prompt": "Q?", "chosen": "fine", "rejected": "FORBIDDEN"}
    parsed = [to_preference_row(r, "p.jsonl", n) for n, r in enumerate([PAIR, bad], start=1)]
    with pytest.raises(DataError) as info:
        tokenize_pairs(parsed, template, tokenizer, config(), DataReport())
    assert (info.value.row, info.value.reason) == (2, "template_failed")
    assert "no forbidden words" in str(info.value)
    report = DataReport(path="p.jsonl")
    assert [p.row for p in tokenize_pairs(parsed, template, tokenizer, config(on_error="skip"), report)] == [1]
    assert report.dropped == Counter({"template_failed": 1})
    with pytest.raises(UserError, match="no rows left after tokenisation.*first template error"):
        tokenize_pairs(parsed[1:], template, tokenizer, config(on_error="skip"), DataReport(path="p.jsonl"))


# --- row layouts ---------------------------------------------------------------------------------------------

U, A = "user", "assistant"

# name -> (row, prompt as (role, content), chosen contents, rejected contents)
LAYOUTS = {
    "string_pair": ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
                    [(U, "Hi?")], ["Hello."], ["Go away."]),
    "conversational_pair": (
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
        [("system", "S"), (U, "Q1"), (A, "A1"), (U, "Q2")], ["good"], ["bad"]),
    "implicit_message_lists": (
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
        [(U, "Q")], ["good"], ["bad"]),
    "implicit_shared_answer_start": (
        # The shared assistant turn after the last shared user message is part of both responses.
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Well,"},
                    {"role": "assistant", "content": "yes."}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Well,"},
                      {"role": "assistant", "content": "no."}]},
        [(U, "Q")], ["Well,", "yes."], ["Well,", "no."]),
    "hh_strings": ({"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
                    "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
                   [(U, "What is 2+2?")], ["4."], ["5."]),
    "hh_multi_turn": (
        {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\n"
                   "Assistant: An apple.",
         "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\n"
                     "Assistant: A carrot\nis a fruit."},
        [(U, "Hi there"), (A, "Hello! How can I help?"), (U, "Name a fruit.")],
        ["An apple."], ["A carrot\nis a fruit."]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_row_layouts(name):
    fields, prompt, chosen, rejected = LAYOUTS[name]
    row = to_preference_row(fields, "p.jsonl", 7)
    assert summary(row.prompt) == prompt
    # Assistant turns inside a prompt are context, rendered but never trained.
    assert all(not m.trained for m in row.prompt if m.role == "assistant")
    assert [m.content for m in row.chosen] == chosen and [m.content for m in row.rejected] == rejected
    assert all(m.role == "assistant" and m.trained for m in row.chosen + row.rejected)
    assert (row.source, row.row) == ("p.jsonl", 7)


def test_hh_multi_turn_tokenises_with_earlier_answer_untrained(chatml, tokenizer, trained_spans):
    (pair,), _ = pairs_of([LAYOUTS["hh_multi_turn"][0]], chatml, tokenizer, max_length=512)
    assert trained_spans(pair.chosen) == ["An apple.<|im_end|>"]
    assert trained_spans(pair.rejected) == ["A carrot\nis a fruit.<|im_end|>"]
    assert tokenizer.decode(pair.chosen.input_ids[:pair.prompt_length]) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n")


def test_system_field_and_system_prompt():
    with_field = pair_row(PAIR, system_prompt="Default.")
    assert summary(with_field.prompt) == [("system", "Be brief."), ("user", "Question one?")]
    without = pair_row({"prompt": "Q", "chosen": "a", "rejected": "b"}, system_prompt="Default.")
    assert summary(without.prompt) == [("system", "Default."), ("user", "Q")]
    implicit = pair_row(LAYOUTS["hh_strings"][0], system_prompt="Default.")
    assert implicit.prompt[0].content == "Default." and len(implicit.prompt) == 2
    assert len(pair_row({"prompt": "Q", "chosen": "a", "rejected": "b", "system": ""}).prompt) == 1


def test_unpaired_labels_from_csv_strings(tmp_path):
    path = tmp_path / "kto.csv"
    labels = ["true", "False", "1", "0", "TRUE"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion", "label"])
        writer.writerows([[f"Q{i}", f"A{i}", label] for i, label in enumerate(labels)])
    rows, report = load(path, unpaired=True)
    assert [r.desirable for r in rows] == [True, False, True, False, True]
    assert [(r.row, r.prompt[0].content, r.completion[0].content) for r in rows][:2] == [(1, "Q0", "A0"),
                                                                                          (2, "Q1", "A1")]
    assert all(isinstance(r, UnpairedRow) for r in rows) and report.rows == 5


def test_unpaired_labels_bool_and_int_and_message_lists():
    rows = [to_unpaired_rows({**UNPAIRED, "label": value}, "k.jsonl", 1)[0].desirable for value in (True, False, 1, 0)]
    assert rows == [True, False, True, False]
    conversational = {"prompt": [{"role": "user", "content": "Q"}],
                      "completion": [{"role": "assistant", "content": "A"}], "label": "false"}
    (row,) = to_unpaired_rows(conversational, "k.jsonl", 3, system_prompt="S")
    assert summary(row.prompt) == [("system", "S"), ("user", "Q")]
    assert summary(row.completion) == [("assistant", "A")] and row.completion[0].trained and row.desirable is False


def test_paired_rows_are_split_for_kto(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [PAIR, UNPAIRED])
    rows, report = load(path, unpaired=True)
    assert [(r.row, r.completion[0].content, r.desirable) for r in rows] == [
        (1, "Good answer.", True), (1, "Bad answer.", False), (2, "A.", True)]
    assert [m.content for m in rows[0].prompt] == [m.content for m in rows[1].prompt] == ["Be brief.", "Question one?"]
    assert report.rows == 2


def test_paired_load_returns_preference_rows(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, LAYOUTS["hh_strings"][0]])
    rows, report = load(path)
    assert [type(r) for r in rows] == [PreferenceRow, PreferenceRow] and [r.row for r in rows] == [1, 2]
    assert report.rows == 2 and report.path == str(path)


# --- errors --------------------------------------------------------------------------------------------------

# name -> (bad row at row 2, unpaired mode, field, start of the message after the field, reason)
BAD_ROWS = {
    "missing_rejected": ({"prompt": "Q", "chosen": "a"}, False, "rejected", "missing required field",
                         "missing_field"),
    "missing_chosen_implicit": ({"rejected": "\n\nHuman: Q\n\nAssistant: b"}, False, "chosen",
                                "missing required field", "missing_field"),
    "chosen_is_int": ({"prompt": "Q", "chosen": 3, "rejected": "b"}, False, "chosen",
                      "expected a string or a list of messages, got int", "wrong_type"),
    "prompt_is_dict": ({"prompt": {"q": 1}, "chosen": "a", "rejected": "b"}, False, "prompt",
                       "expected a string or a list of messages, got dict", "wrong_type"),
    "message_content_int": ({"prompt": "Q", "chosen": [{"role": "assistant", "content": 1}], "rejected": "b"},
                            False, "chosen[0].content", "expected a string, got int", "wrong_type"),
    "empty_chosen": ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, False, "chosen", "is empty",
                     "empty_response"),
    "empty_rejected_list": ({"prompt": "Q", "chosen": "a", "rejected": []}, False, "rejected", "has no messages",
                            "empty_response"),
    "empty_hh_answer": ({"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "\n\nHuman: Q\n\nAssistant:"},
                        False, "rejected", "turn 2 (Assistant:) is empty", "empty_response"),
    "response_with_user_role": ({"prompt": "Q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
                                False, "chosen[0].role", "chosen messages must be assistant messages",
                                "unknown_role"),
    "identical": ({"prompt": "Q", "chosen": "same", "rejected": "same"}, False, "rejected", "is identical to chosen",
                  "identical_responses"),
    "identical_implicit": ({"chosen": "\n\nHuman: Q\n\nAssistant: same", "rejected": "\n\nHuman: Q\n\nAssistant: same"},
                           False, "rejected", "is identical to chosen", "identical_responses"),
    "plain_strings_without_prompt": ({"chosen": "a", "rejected": "b"}, False, "chosen",
                                     "is a plain string and the row has no prompt: add a `prompt` field",
                                     "no_prompt"),
    "no_shared_user_message": ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "user", "content": "Q2"},
                                             {"role": "assistant", "content": "b"}]},
                               False, "chosen", "chosen and rejected share no leading user message", "no_prompt"),
    "differ_before_final_answer": (
        {"chosen": "\n\nHuman: Q\n\nAssistant: a\n\nHuman: more\n\nAssistant: c",
         "rejected": "\n\nHuman: Q\n\nAssistant: a"},
        False, "chosen[2]", "a user message after the shared prompt", "prompt_mismatch"),
    "empty_prompt": ({"prompt": "", "chosen": "a", "rejected": "b"}, False, "prompt", "is empty", "no_prompt"),
    "prompt_ends_with_assistant": (
        {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "a",
         "rejected": "b"}, False, "prompt", "must end with a user message", "prompt_ends_with_assistant"),
    "misplaced_system": ({"prompt": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                                     {"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"},
                         False, "prompt[1]", "a system message may only come first", "misplaced_system"),
    "two_systems": ({"system": "S", "prompt": [{"role": "system", "content": "T"}, {"role": "user", "content": "Q"}],
                     "chosen": "a", "rejected": "b"}, False, "system", "the prompt already starts with a system",
                    "misplaced_system"),
    "label_in_pairwise_data": (UNPAIRED, False, "label", "this row is unpaired (KTO) data", "unpaired_row"),
    "bad_label_string": ({**UNPAIRED, "label": "maybe"}, True, "label", "expected true or false (or 1/0), got 'maybe'",
                         "bad_label"),
    "bad_label_int": ({**UNPAIRED, "label": 2}, True, "label", "expected true or false (or 1/0), got 2", "bad_label"),
    "missing_label": ({"prompt": "Q", "completion": "A"}, True, "label", "missing required field", "missing_field"),
    "unpaired_without_prompt": ({"completion": "A", "label": True}, True, "prompt", "missing required field",
                                "no_prompt"),
    "empty_completion": ({**UNPAIRED, "completion": ""}, True, "completion", "is empty", "empty_response"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_row_field_and_reason(case, tmp_path):
    fields, unpaired, field, message, reason = BAD_ROWS[case]
    good = UNPAIRED if unpaired else PAIR
    path = write_jsonl(tmp_path / "bad.jsonl", [good, fields, good])
    with pytest.raises(DataError) as info:
        load(path, unpaired=unpaired)
    assert str(info.value).startswith(f"{path}, row 2, field '{field}': {message}")
    assert (info.value.path, info.value.row, info.value.field, info.value.reason) == (str(path), 2, field, reason)


def test_skip_mode_counts_dropped_rows_by_reason(tmp_path):
    lines = [PAIR] + [BAD_ROWS[c][0] for c in BAD_ROWS if not BAD_ROWS[c][1]] + ['{"prompt": ', PAIR]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    rows, report = load(path, on_error="skip")
    expected = Counter(BAD_ROWS[c][4] for c in BAD_ROWS if not BAD_ROWS[c][1])
    expected["invalid_json"] += 1
    assert report.dropped == expected
    assert [r.row for r in rows] == [1, len(lines)]
    assert report.rows == len(lines)


def test_skip_mode_counts_unpaired_errors(tmp_path):
    lines = [UNPAIRED] + [BAD_ROWS[c][0] for c in BAD_ROWS if BAD_ROWS[c][1]] + [PAIR]
    rows, report = load(write_jsonl(tmp_path / "kto.jsonl", lines), unpaired=True, on_error="skip")
    assert report.dropped == Counter({"bad_label": 2, "missing_field": 1, "no_prompt": 1, "empty_response": 1})
    assert [(r.row, r.desirable) for r in rows] == [(1, True), (len(lines), True), (len(lines), False)]


def test_no_usable_rows_and_sft_format_are_user_errors(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "a"}])
    with pytest.raises(UserError) as info:
        load(path, on_error="skip")
    assert str(info.value) == f"{path}: no usable rows (1 read, dropped: {{'missing_field': 1}})"
    with pytest.raises(UserError, match=r"data\.format='messages' names an SFT row format.*set data\.format to auto"):
        load(write_jsonl(tmp_path / "ok.jsonl", [PAIR]), format="messages")


# --- truncation ----------------------------------------------------------------------------------------------

def _starts(example: Example) -> list[int]:
    return [i for i, label in enumerate(example.labels) if label != I and (i == 0 or example.labels[i - 1] == I)]


@pytest.fixture
def truncation_rows(chatml, tokenizer):
    """Rows 1 and 4 fit; row 2's rejected side loses its second message; row 3 is only cut short. Returns the
    rows and the max_length that does this."""
    lost = {"prompt": "Q?", "chosen": "Fine.",
            "rejected": [{"role": "assistant", "content": "First part."},
                         {"role": "assistant", "content": "Second part " * 10}]}
    (full,), _ = pairs_of([lost], chatml, tokenizer, max_length=10_000)
    max_length = _starts(full.rejected)[1]  # the second message's first token is cut off
    long = {"prompt": "Q?", "chosen": "word " * (2 * max_length), "rejected": "Short."}
    short = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}
    return [short, lost, long, short], max_length


def test_pair_losing_a_response_is_dropped_and_counted(truncation_rows, chatml, tokenizer):
    rows, max_length = truncation_rows
    pairs, report = pairs_of(rows, chatml, tokenizer, max_length=max_length)
    assert [p.row for p in pairs] == [1, 3, 4]
    assert report.dropped == Counter({"response_truncated_away": 1})
    assert (report.kept, report.truncated) == (3, 1)
    cut = pairs[1]
    assert cut.chosen.truncated and len(cut.chosen.input_ids) == max_length and cut.chosen.num_trained > 0
    assert not cut.rejected.truncated


def test_pair_losing_a_response_raises_with_on_truncation_raise(truncation_rows, chatml, tokenizer):
    rows, max_length = truncation_rows
    with pytest.raises(DataError) as info:
        pairs_of(rows, chatml, tokenizer, max_length=max_length, on_truncation="raise")
    assert str(info.value).startswith(f"p.jsonl, row 2, field 'rejected': longer than data.max_length={max_length}")
    assert info.value.reason == "response_truncated_away"


def test_prompt_longer_than_max_length_leaves_nothing(chatml, tokenizer):
    row = {"prompt": "word " * 50, "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError, match=r"no rows left after tokenisation \(dropped: \{'response_truncated_away': 1"):
        pairs_of([row], chatml, tokenizer, max_length=16)


# --- KTO tokenisation ----------------------------------------------------------------------------------------

def test_tokenize_unpaired_pairs_each_prompt_with_the_next_completion(chatml, tokenizer, trained_spans):
    rows = [UnpairedRow([Message("user", f"Q{i}?")], [Message("assistant", f"Answer {i}.")], i % 2 == 0,
                        source="k.jsonl", row=i + 1) for i in range(3)]
    report = DataReport(path="k.jsonl")
    examples = tokenize_unpaired(rows, chatml, tokenizer, config(max_length=512), report)
    assert [(e.row, e.desirable) for e in examples] == [(1, True), (2, False), (3, True)]
    for i, example in enumerate(examples):
        nxt = (i + 1) % 3
        assert trained_spans(example.example) == [f"Answer {i}.<|im_end|>"]
        assert trained_spans(example.kl_example) == [f"Answer {nxt}.<|im_end|>"]
        assert tokenizer.decode(example.kl_example.input_ids) == (
            f"<|im_start|>user\nQ{i}?<|im_end|>\n<|im_start|>assistant\nAnswer {nxt}.<|im_end|>\n")
        assert example.kl_example.input_ids[:example.prompt_length] == example.example.input_ids[:example.prompt_length]
    assert report.kept == 3 and report.tokens == sum(len(e.example.input_ids) for e in examples)


def test_kl_example_is_cut_at_max_length(chatml, tokenizer):
    # Row 2's completion is itself cut at max_length; behind row 1's longer prompt it overflows again.
    rows = [UnpairedRow([Message("user", "A much longer question, is it not?")], [Message("assistant", "A.")], True,
                        row=1),
            UnpairedRow([Message("user", "Q?")], [Message("assistant", "word " * 30)], False, row=2)]
    max_length = 24
    examples = tokenize_unpaired(rows, chatml, tokenizer, config(max_length=max_length), DataReport())
    assert examples[1].example.truncated and not examples[0].example.truncated
    kl = examples[0].kl_example
    assert len(kl.input_ids) == len(kl.labels) == max_length and kl.truncated
    assert kl.input_ids[:examples[0].prompt_length] == examples[0].example.input_ids[:examples[0].prompt_length]
    # Everything after the prompt is the other row's completion, trained as it is there.
    completion = slice(examples[0].prompt_length, None)
    assert kl.labels[completion] == kl.input_ids[completion] == examples[1].example.input_ids[
        examples[1].prompt_length:][:max_length - examples[0].prompt_length]
    # Row 2's prompt + row 1's short completion fits.
    assert not examples[1].kl_example.truncated
    assert tokenizer.decode(examples[1].kl_example.input_ids).endswith("assistant\nA.<|im_end|>\n")


# --- batches -------------------------------------------------------------------------------------------------

def _pair(chosen, rejected, prompt_length=2, row=0, refs=(None, None)):
    as_example = lambda ids: Example(list(ids), [I] * prompt_length + list(ids[prompt_length:]), row=row)  # noqa: E731
    return PairExample(as_example(chosen), as_example(rejected), prompt_length, row, *refs)


PAD = 0


def test_collate_pairs_layout():
    a = _pair([10, 11, 12, 13], [10, 11, 14], row=1)
    b = _pair([20, 21, 22], [20, 21, 23, 24, 25], row=2)
    batch = collate_pairs([a, b], pad_id=PAD)
    seq = batch.sequences
    # Chosen rows first, then rejected rows in the same order, all padded to the widest (5).
    assert seq.input_ids.tolist() == [[10, 11, 12, 13, PAD], [20, 21, 22, PAD, PAD],
                                      [10, 11, 14, PAD, PAD], [20, 21, 23, 24, 25]]
    assert seq.targets.tolist() == [[I, 12, 13, I, I], [I, 22, I, I, I], [I, 14, I, I, I], [I, 23, 24, 25, I]]
    assert seq.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.num_pairs == 2 and batch.weights.tolist() == [1.0, 1.0] and batch.weights.dtype == torch.float32
    assert batch.chosen_tokens == 3 == int((seq.targets[:2] != I).sum())
    assert (batch.global_pairs, batch.global_chosen_tokens) == (2, 3)
    assert batch.ref_chosen is None and batch.ref_rejected is None


def test_collate_pairs_shared_prompt_layout():
    """One row per pair: prompt, chosen, rejected; rejected positions restart after the prompt; the last prompt
    position predicts both sides' first tokens; rejected never sees chosen."""
    from tuneforge.data.preference import collate_pairs_shared_prompt

    a = _pair([10, 11, 12, 13], [10, 11, 14], row=1)
    b = _pair([20, 21, 22], [20, 21, 23, 24, 25], row=2)
    batch = collate_pairs_shared_prompt([a, b], pad_id=PAD)
    seq = batch.sequences
    assert seq.input_ids.tolist() == [[10, 11, 12, 13, 14, PAD], [20, 21, 22, 23, 24, 25]]
    assert seq.position_ids.tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 2, 3, 4]]
    assert seq.targets.tolist() == [[I, 12, 13, I, I, I], [I, 22, I, I, I, I]]
    assert batch.rejected_targets.tolist() == [[I, 14, I, I, I, I], [I, 23, I, 24, 25, I]]
    mask = seq.attention_mask[:, 0].int().tolist()
    assert mask[1] == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],   # chosen: prompt and itself
                       [1, 1, 0, 1, 0, 0],   # rejected: prompt and rejected, not chosen
                       [1, 1, 0, 1, 1, 0],
                       [1, 1, 0, 1, 1, 1]]
    assert mask[0][5] == [0, 0, 0, 0, 0, 1]  # padding attends to itself only
    assert batch.chosen_tokens == 3 and seq.num_tokens == 11 and batch.num_pairs == 2


def test_collate_pairs_reference_values_only_when_all_set():
    a = _pair([1, 2, 3], [1, 2, 4], refs=(-1.5, -2.5))
    b = _pair([1, 2, 5], [1, 2, 6], refs=(-3.0, -4.0))
    batch = collate_pairs([a, b], pad_id=PAD)
    assert batch.ref_chosen.tolist() == [-1.5, -3.0] and batch.ref_rejected.tolist() == [-2.5, -4.0]
    assert batch.ref_chosen.dtype == torch.float32
    half = collate_pairs([a, _pair([1, 2, 5], [1, 2, 6], refs=(-3.0, None))], pad_id=PAD)
    assert half.ref_chosen is not None and half.ref_rejected is None


def test_collate_unpaired_rows_and_kl_rows(chatml, tokenizer):
    rows = [UnpairedRow([Message("user", "Q?")], [Message("assistant", c)], d, row=n)
            for n, (c, d) in enumerate([("Yes.", True), ("No, never.", False)], start=1)]
    examples = tokenize_unpaired(rows, chatml, tokenizer, config(max_length=512), DataReport())
    examples[0].ref_logp, examples[1].ref_logp = -1.0, -2.0
    batch = collate_unpaired(examples, pad_id=tokenizer.pad_token_id)
    seq = batch.sequences
    assert seq.input_ids.shape[0] == 4 and batch.num_examples == 2
    for i, ex in enumerate([examples[0].example, examples[1].example, examples[0].kl_example,
                            examples[1].kl_example]):
        n = len(ex.input_ids)
        assert seq.input_ids[i, :n].tolist() == ex.input_ids and int(seq.attention_mask[i].sum()) == n
    assert batch.desirable.tolist() == [True, False] and batch.desirable.dtype == torch.bool
    assert batch.weights.tolist() == [1.0, 1.0] and batch.global_examples == 2
    assert batch.ref_logps.tolist() == [-1.0, -2.0] and batch.ref_kl_logps is None


def test_make_preference_batches_two_ranks_with_placeholder():
    pairs = [_pair([1, 2, 10 + i, 20 + i], [1, 2, 30 + i], row=i + 1, refs=(-1.0 * i, -2.0 * i)) for i in range(5)]
    ranks = [make_preference_batches(pairs, 2, PAD, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    # Global group 0 holds pairs 0-3: rank 0 reads 0, 1 and rank 1 reads 2, 3. Group 1 holds pair 4 only.
    assert ranks[0][0].sequences.input_ids[:, 2].tolist() == [10, 11, 30, 31]
    assert ranks[1][0].sequences.input_ids[:, 2].tolist() == [12, 13, 32, 33]
    assert ranks[0][1].sequences.input_ids[:, 2].tolist() == [14, 34] and ranks[0][1].weights.tolist() == [1.0]
    placeholder = ranks[1][1]
    assert placeholder.num_pairs == 1 and placeholder.weights.tolist() == [0.0]
    assert placeholder.sequences.input_ids[:, 2].tolist() == [14, 34]  # a copy of the group's first pair
    assert (placeholder.sequences.targets == I).all() and placeholder.chosen_tokens == 0
    assert placeholder.ref_chosen.tolist() == [-4.0]  # same tensors on every rank
    for batches in ranks:
        assert (batches[0].global_pairs, batches[0].global_chosen_tokens) == (4, 8)
        assert (batches[1].global_pairs, batches[1].global_chosen_tokens) == (1, 2)
        assert batches[0].sequences.global_tokens == 4 * 7 and batches[0].sequences.global_trained == 4 * 3
        assert batches[1].sequences.global_trained == 3
    assert ranks[0][0:2][1].weights.tolist() == [1.0]  # slices collate too


def test_make_preference_batches_shuffles_with_the_generator():
    pairs = [_pair([1, 2, 100 + i], [1, 2, 200 + i], row=i) for i in range(8)]

    def order(seed):
        batches = make_preference_batches(pairs, 3, PAD, generator=torch.Generator().manual_seed(seed))
        return [t for b in batches for t in b.sequences.input_ids[:b.num_pairs, 2].tolist()]

    expected = [100 + i for i in torch.randperm(8, generator=torch.Generator().manual_seed(3)).tolist()]
    assert order(3) == order(3) == expected
    assert expected != sorted(expected) and order(4) != order(3)
    assert [t for b in make_preference_batches(pairs, 3, PAD) for t in b.sequences.input_ids[:b.num_pairs, 2].tolist()
            ] == list(range(100, 108))


def test_make_preference_batches_unpaired_two_ranks():
    def item(i):
        ex = Example([1, 2, 10 + i], [I, I, 10 + i], row=i)
        return UnpairedExample(ex, Example([1, 2, 50 + i], [I, I, 50 + i], row=i), 2, i % 2 == 0, row=i)

    examples = [item(i) for i in range(3)]
    rank1 = make_preference_batches(examples, 1, PAD, rank=1, world_size=2)
    assert len(rank1) == 2
    assert rank1[0].sequences.input_ids[:, 2].tolist() == [11, 51] and rank1[0].desirable.tolist() == [False]
    assert rank1[1].weights.tolist() == [0.0] and rank1[1].sequences.input_ids[:, 2].tolist() == [12, 52]
    assert (rank1[1].sequences.targets == I).all()
    assert [b.global_examples for b in rank1] == [2, 1]
    with pytest.raises(TypeError, match="all PairExample or all UnpairedExample"):
        make_preference_batches([examples[0], _pair([1, 2, 3], [1, 2, 4])], 1, PAD)


# --- preview -------------------------------------------------------------------------------------------------

def test_render_pair_marks_trained_spans(chatml, tokenizer):
    (pair,), _ = pairs_of([PAIR], chatml, tokenizer, max_length=512)
    text = render_pair(pair, tokenizer)
    assert text == (PROMPT_TEXT.rstrip("\n") + "\nchosen:\n[[Good answer.<|im_end|>]]\n"
                    "rejected:\n[[Bad answer.<|im_end|>]]")
    assert text.count("Question one?") == 1
    assert "\033[32mGood answer.<|im_end|>\033[0m" in render_pair(pair, tokenizer, colour=True)


def test_render_unpaired(chatml, tokenizer):
    rows = [UnpairedRow([Message("user", "Q?")], [Message("assistant", "A.")], False, row=1)]
    (example,) = tokenize_unpaired(rows, chatml, tokenizer, config(max_length=512), DataReport())
    assert render_unpaired(example, tokenizer) == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nundesirable:\n[[A.<|im_end|>]]")
