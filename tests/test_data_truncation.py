"""Truncation at data.max_length: a row that would lose a whole response is dropped (counted) or raises; a
row whose last response is only cut short is kept and counted as truncated. A whole response is never silently
removed, in any turn."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneforge.config import DataConfig
from tuneforge.data.dataset import DataReport, tokenize_conversations
from tuneforge.data.formats import to_conversation
from tuneforge.data.templates import load_template
from tuneforge.data.tokenize import encode_conversation
from tuneforge.errors import DataError, UserError
from tuneforge.losses import IGNORE_INDEX

SHORT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
TWO_TURNS = {"messages": [
    {"role": "user", "content": "What colour is the sky on a clear day?"},
    {"role": "assistant", "content": "The sky is blue on a clear day."},
    {"role": "user", "content": "And at night?"},
    {"role": "assistant", "content": "At night the sky is dark, almost black, with stars."}]}


@pytest.fixture
def chatml(tokenizer):
    return load_template("chatml", tokenizer)


def response_starts(conversation, template, tokenizer):
    """Token index where each trained response begins, and the full length, without truncation."""
    full = encode_conversation(conversation, template, tokenizer, max_length=10_000)
    starts = [i for i, label in enumerate(full.labels)
              if label != IGNORE_INDEX and (i == 0 or full.labels[i - 1] == IGNORE_INDEX)]
    return starts, len(full.input_ids)


def run(rows, template, tokenizer, **data):
    conversations = [to_conversation(row, "auto", "rows.jsonl", number) for number, row in enumerate(rows, start=1)]
    report = DataReport(path="rows.jsonl")
    examples = tokenize_conversations(conversations, template, tokenizer, DataConfig(train="rows.jsonl", **data),
                                      report)
    return examples, report


def test_response_cut_away_entirely_is_dropped_and_counted(chatml, tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40},
                                {"role": "assistant", "content": "Short answer."}]}
    (start,), _ = response_starts(to_conversation(long_prompt, "auto", "", 0), chatml, tokenizer)
    examples, report = run([SHORT, long_prompt, SHORT], chatml, tokenizer, max_length=start)
    assert [e.row for e in examples] == [1, 3]
    assert report.dropped == Counter({"response_truncated_away": 1})
    assert (report.kept, report.truncated) == (2, 0)


def test_response_cut_away_raises_with_on_truncation_raise(chatml, tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40},
                                {"role": "assistant", "content": "Short answer."}]}
    (start,), _ = response_starts(to_conversation(long_prompt, "auto", "", 0), chatml, tokenizer)
    with pytest.raises(DataError) as info:
        run([SHORT, long_prompt], chatml, tokenizer, max_length=start, on_truncation="raise")
    assert str(info.value) == (f"rows.jsonl, row 2: longer than data.max_length={start} tokens: truncation would "
                               "remove 1 whole response(s); raise data.max_length or set data.on_truncation=drop")
    assert info.value.reason == "response_truncated_away"


def test_partly_truncated_response_is_kept_and_counted(chatml, tokenizer, trained_spans):
    (start,), length = response_starts(to_conversation(SHORT, "auto", "", 0), chatml, tokenizer)
    # Keep one token of the response: the row still teaches something, so it stays (counted as truncated).
    examples, report = run([SHORT], chatml, tokenizer, max_length=start + 1, on_truncation="raise")
    (example,) = examples
    assert len(example.input_ids) == start + 1 and example.truncated
    assert example.responses_lost == 0
    assert trained_spans(example) == ["Hello"]
    assert (report.kept, report.truncated, report.dropped) == (1, 1, Counter())
    assert report.tokens == start + 1 and report.trained_tokens == 1


def test_second_response_cut_away_drops_the_row(chatml, tokenizer):
    """The first answer survives, but losing the second one whole must not pass silently."""
    (first, second), length = response_starts(to_conversation(TWO_TURNS, "auto", "", 0), chatml, tokenizer)
    assert first < second < length
    examples, report = run([TWO_TURNS, SHORT], chatml, tokenizer, max_length=second)
    assert [e.row for e in examples] == [2]
    assert report.dropped == Counter({"response_truncated_away": 1})

    with pytest.raises(DataError, match="row 1: longer than data.max_length"):
        run([TWO_TURNS, SHORT], chatml, tokenizer, max_length=second, on_truncation="raise")


def test_second_response_partly_kept(chatml, tokenizer, trained_spans):
    (first, second), length = response_starts(to_conversation(TWO_TURNS, "auto", "", 0), chatml, tokenizer)
    examples, report = run([TWO_TURNS], chatml, tokenizer, max_length=second + 2)
    (example,) = examples
    assert trained_spans(example) == ["The sky is blue on a clear day.<|im_end|>", "At night"]
    assert report.truncated == 1 and not report.dropped


def test_row_of_exactly_max_length_is_not_truncated(chatml, tokenizer):
    _, length = response_starts(to_conversation(TWO_TURNS, "auto", "", 0), chatml, tokenizer)
    examples, report = run([TWO_TURNS], chatml, tokenizer, max_length=length)
    assert len(examples[0].input_ids) == length and not examples[0].truncated
    assert (report.truncated, report.dropped) == (0, Counter())


def test_plain_text_is_truncated_from_the_end(chatml, tokenizer):
    examples, report = run([{"text": "one two three four five six seven eight nine ten"}], chatml, tokenizer,
                           max_length=4)
    (example,) = examples
    assert example.input_ids == tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    assert example.labels == example.input_ids and example.truncated
    assert report.truncated == 1


def test_every_row_dropped_is_a_user_error(chatml, tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "A."}]}
    with pytest.raises(UserError,
                       match=r"no rows left after tokenisation \(dropped: \{'response_truncated_away': 1\}\)"):
        run([long_prompt], chatml, tokenizer, max_length=8)
