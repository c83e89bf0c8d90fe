"""Readers: every on-disk format gives the same rows and the same conversations; row numbers are what a user
sees in an editor."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import write_jsonl
from tuneforge.config import DataConfig
from tuneforge.data.dataset import DataReport, load_conversations
from tuneforge.data.readers import BadRow, Row, read_rows
from tuneforge.errors import UserError

ALPACA = [
    {"instruction": "Translate to English.", "input": "chat", "output": "cat"},
    {"instruction": "Name a primary colour.", "output": "Red."},
    {"instruction": "Sum the numbers.", "input": "2, 3", "output": "5"},
]
MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                  {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                  {"role": "assistant", "content": "A2"}]},
    {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]},
]


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_csv(path, rows):
    keys = ["instruction", "input", "output"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": (write_jsonl, "rows.jsonl"), "json": (write_json, "rows.json"), "csv": (write_csv, "rows.csv"),
           "parquet": (write_parquet, "rows.parquet"), "datasets": (write_saved_dataset, "saved")}


def conversations_of(path):
    found = load_conversations(str(path), DataConfig(train=str(path)), DataReport())
    return [(c.row, c.messages, c.is_plain_text) for c in found]


@pytest.fixture
def reference_alpaca(tmp_path):
    return conversations_of(write_jsonl(tmp_path / "reference.jsonl", ALPACA))


@pytest.mark.parametrize("kind", list(WRITERS))
def test_alpaca_rows_read_the_same_from_every_format(kind, tmp_path, reference_alpaca):
    writer, name = WRITERS[kind]
    path = writer(tmp_path / name, ALPACA)
    assert conversations_of(path) == reference_alpaca
    # Spot-check the reference itself so "all equal" cannot mean "all equally wrong".
    assert [row for row, _, _ in reference_alpaca] == [1, 2, 3]
    assert reference_alpaca[0][1][0].context == "chat"
    assert reference_alpaca[1][1][0].context is None


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "datasets"])
def test_message_lists_read_the_same_from_every_nested_format(kind, tmp_path):
    writer, name = WRITERS[kind]
    found = conversations_of(writer(tmp_path / name, MESSAGES))
    assert [[(m.role, m.content) for m in messages] for _, messages, _ in found] == [
        [("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")],
        [("user", "Hello?"), ("assistant", "Hi.")]]


def test_jsonl_row_number_is_the_line_number(tmp_path):
    path = tmp_path / "gaps.jsonl"
    lines = [json.dumps(ALPACA[0]), "", "   ", json.dumps(ALPACA[1]), "", json.dumps(ALPACA[2])]
    path.write_text("\n".join(lines) + "\n")
    rows = read_rows(path)
    assert [r.number for r in rows] == [1, 4, 6]
    assert [c[0] for c in conversations_of(path)] == [1, 4, 6]


def test_jsonl_with_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in ALPACA).encode() + b"\r\n")
    assert [r.fields for r in read_rows(path)] == ALPACA


def test_csv_and_json_with_byte_order_mark(tmp_path):
    csv_path = write_csv(tmp_path / "rows.csv", ALPACA)
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert conversations_of(csv_path) == conversations_of(write_jsonl(tmp_path / "ref.jsonl", ALPACA))
    json_path = tmp_path / "rows.json"
    json_path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode())
    assert [r.fields for r in read_rows(json_path)] == ALPACA


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": ALPACA, "version": 1}))
    assert [(r.number, r.fields) for r in read_rows(path)] == [(i + 1, row) for i, row in enumerate(ALPACA)]


def test_json_non_object_item_is_a_bad_row_with_its_number(tmp_path):
    path = write_json(tmp_path / "mixed.json", [ALPACA[0], "oops", ALPACA[1]])
    rows = read_rows(path)
    assert isinstance(rows[0], Row) and isinstance(rows[2], Row)
    assert isinstance(rows[1], BadRow)
    assert str(rows[1].error) == f"{path}, row 2: expected a JSON object, got str"


def test_jsonl_in_a_json_file_gets_a_hint(tmp_path):
    path = tmp_path / "lines.json"
    write_jsonl(path, ALPACA)
    with pytest.raises(UserError, match=r"lines\.json: invalid JSON at line 2, column 1: Extra data "
                                        r"\(one JSON object per line\? name the file \.jsonl\)"):
        read_rows(path)


def test_csv_multiline_quoted_cell(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('instruction,output\n"Line one\nline two",Answer\n')
    assert [(r.number, r.fields) for r in read_rows(path)] == [
        (1, {"instruction": "Line one\nline two", "output": "Answer"})]


@pytest.mark.parametrize("name, message", [
    ("missing.jsonl", "does not exist"),
    ("rows.txt", "unsupported file type '.txt'"),
])
def test_unreadable_paths(tmp_path, name, message):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("hello")
    with pytest.raises(UserError, match=message):
        read_rows(path)


def test_folder_not_saved_by_datasets(tmp_path):
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    with pytest.raises(UserError, match="datasets.save_to_disk"):
        read_rows(folder)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet")
    with pytest.raises(UserError, match="fake.parquet: not a readable Parquet file"):
        read_rows(path)


def test_non_utf8_json_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"text": "café"}]'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.json: not valid UTF-8"):
        read_rows(path)
