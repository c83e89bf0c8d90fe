"""data.streaming: positions that resume exactly (JSONL, Parquet, `datasets` streaming), rows validated as they
are reached, the options it refuses, training equal to the in-memory path, exact resume after SIGKILL, and peak
memory that does not grow with the file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main as cli_main
from tuneforge.config import config_from_dict
from tuneforge.data.dataset import DataReport
from tuneforge.data.streaming import ShuffledRows, StreamBatches, stream_source
from tuneforge.data.templates import load_template
from tuneforge.engine import checkpoint as ckpt
from tuneforge.errors import ConfigError, DataError, UserError

from conftest import QA_ROWS, write_jsonl
from test_engine_resume import (adapter, assert_same_records, assert_same_weights, complete_steps, describe,
                                run_child, train_losses)


def numbers(items: list) -> list:
    return [None if row is None else row.number for row in items]


def drain(rows: ShuffledRows, count: int) -> list:
    return [rows.next() for _ in range(count)]


def source_of(kind: str, tmp_path: Path, count: int = 10):
    """A stream source of ``count`` rows ({"i": 1..count}) of each kind."""
    records = [{"i": i} for i in range(1, count + 1)]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)  # groups of 4, 4, 2
        return stream_source(str(path))
    path = write_jsonl(tmp_path / "rows.jsonl", records[:4] + [""] + records[4:])  # a blank line is no row
    if kind == "hub":
        from tuneforge.data.sources import DataSource

        return DataSource("json", data_files=str(path))  # datasets.load_dataset("json", ..., streaming=True)
    return stream_source(str(path))


# ------------------------------------------------------------------------------------------ positions
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hub"])
def test_a_stream_made_from_a_saved_position_continues_exactly(tmp_path, kind, shuffle):
    source = source_of(kind, tmp_path)
    whole = drain(ShuffledRows(source, 7, shuffle, block_rows=3), 25)  # 2 passes and a bit, None at each end
    passes = [numbers(whole[:10]), numbers(whole[11:21])]
    assert whole[10] is None and whole[21] is None
    for rows in passes:
        assert sorted(rows) == sorted(numbers(whole[:10])) and len(set(rows)) == 10
    if shuffle:
        assert passes[0] != passes[1]  # each pass draws new permutations
        # Rows move only inside their block of 3.
        blocks = [sorted(passes[0][i:i + 3]) for i in range(0, 10, 3)]
        assert blocks == [sorted(numbers(whole[:10]))[i:i + 3] for i in range(0, 10, 3)]
    else:
        assert passes[0] == passes[1] == sorted(passes[0])
    cuts = range(25) if kind != "hub" else (0, 4, 11, 19)  # each Hub reopen costs a load_dataset
    for cut in cuts:
        first = ShuffledRows(source, 7, shuffle, block_rows=3)
        drain(first, cut)
        position = json.loads(json.dumps(first.position()))  # what state.json holds
        again = ShuffledRows(source, 7, shuffle, position, block_rows=3)
        assert numbers(drain(again, 25 - cut)) == numbers(whole[cut:]), cut


# ---------------------------------------------------------------------------------- rows as reached
def stream_config(train_file, tmp_path, tiny_model_dir, **data):
    return config_from_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train_file), "max_length": 128, "streaming": True, **data},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "seed": 0}})


def test_a_bad_row_raises_when_reached_with_its_file_and_row(tmp_path, tiny_model_dir, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:3] + ['{"messages": [', {"text": 3}] + QA_ROWS[3:8])
    config = stream_config(path, tmp_path, tiny_model_dir, shuffle=False)
    batches = StreamBatches(config, tokenizer, load_template("chatml", tokenizer), ckpt.TrainState(), DataReport())
    batches[0]  # rows 1-2: nothing read beyond them
    with pytest.raises(DataError, match=r"rows.jsonl, row 4: invalid JSON"):
        batches[1]
    skipping = stream_config(path, tmp_path, tiny_model_dir, shuffle=False, on_error="skip")
    report = DataReport()
    state = ckpt.TrainState()
    batches = StreamBatches(skipping, tokenizer, load_template("chatml", tokenizer), state, report)
    for index in range(4):
        batches[index]
    assert report.rows == 10 and report.kept == 8  # 8 kept fill 4 steps of 2
    assert dict(report.dropped) == {"invalid_json": 1, "wrong_type": 1}
    assert state.data_state["report"]["kept"] == 8


@pytest.mark.parametrize("changes, key", [
    ({"train": {"max_steps": None}}, "train.max_steps"),
    ({"data": {"val_fraction": 0.1}}, "data.val_fraction"),
    ({"data": {"group_by_length": True}}, "data.group_by_length"),
    ({"method": "dpo"}, "method sft only"),
    ({"data": {"train": "rows.csv"}}, "cannot be streamed"),
])
def test_streaming_refuses_what_it_cannot_do(tmp_path, changes, key):
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    values = {"data": {"train": str(tmp_path / "rows.jsonl"), "streaming": True}, "train": {"max_steps": 3}}
    for section, update in changes.items():
        if isinstance(update, dict):
            values[section].update({k: str(tmp_path / v) if k == "train" else v for k, v in update.items()})
        else:
            values[section] = update
    with pytest.raises(ConfigError, match=r"data\.streaming") as error:
        config_from_dict(values)
    assert key in str(error.value)


def test_a_stream_with_no_usable_row_is_an_error_not_a_hang(tmp_path, tiny_model_dir, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ["not json", {"text": 1}])
    config = stream_config(path, tmp_path, tiny_model_dir, on_error="skip")
    batches = StreamBatches(config, tokenizer, load_template("chatml", tokenizer), ckpt.TrainState(), DataReport())
    with pytest.raises(UserError, match="no usable rows in a whole pass"):
        batches[0]


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("packing, batch_size, rows", [(False, 4, 12), (True, 1, 24)], ids=["rows", "packed"])
def test_streaming_in_file_order_trains_as_the_in_memory_run(make_config, tmp_path, packing, batch_size, rows):
    """Without shuffling, the stream's batches (and packs) are the in-memory epoch's: the same losses."""
    path = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:rows])
    runs = {}
    for streaming in (False, True):
        out = tmp_path / f"run-{streaming}"
        config = make_config(path, data={"shuffle": False, "packing": packing, "streaming": streaming},
                             train={"max_steps": 3, "batch_size": batch_size, "output_dir": str(out)})
        from tuneforge.engine.trainer import run_training

        run_training(config, log=lambda _: None)
        runs[streaming] = out
    assert len(train_losses(runs[True])) == 3
    assert_same_records(train_losses(runs[True]), train_losses(runs[False]))
    assert_same_weights(adapter(runs[True]), adapter(runs[False]))


@pytest.fixture(scope="module")
def stream_resume_setup(tiny_model_dir, tmp_path_factory):
    """A shuffled streaming config over 10 good and 2 bad rows (6 steps of 4 rows: passes wrap) with skip, and an
    uninterrupted reference run, for rows and for packs."""
    root = tmp_path_factory.mktemp("stream-resume")
    rows = write_jsonl(root / "rows.jsonl", QA_ROWS[:5] + ["not json"] + QA_ROWS[5:10] + [{"text": 5}])
    configs = {}
    for name, packing in (("rows", False), ("packed", True)):
        values = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(rows), "max_length": 64, "shuffle": True, "streaming": True, "on_error": "skip",
                     "packing": packing},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "train": {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 1,
                      "log_every": 1, "seed": 3, "mixed_precision": "no"},
            "save": {"every": 1}, "eval": {"final": "last"}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        reference = root / f"reference-{name}"
        assert cli_main(["train", str(path), f"train.output_dir={reference}"]) == 0
        configs[name] = (path, reference)
    return configs


@pytest.mark.parametrize("name, kill_step", [("rows", 3), ("packed", 4)])
def test_a_killed_streaming_run_resumes_exactly(stream_resume_setup, tmp_path, name, kill_step):
    config, reference = stream_resume_setup[name]
    run_dir = tmp_path / "run"
    killed = run_child("kill-after-save", kill_step, "train", config, f"train.output_dir={run_dir}")
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert complete_steps(run_dir)[-1] == kill_step
    saved = json.loads((ckpt.checkpoint_dir(run_dir, kill_step) / "state.json").read_text())["data_state"]
    assert saved["rows"]["block_start"] == {} and saved["report"]["kept"] > 0
    assert cli_main(["train", str(config), f"train.output_dir={run_dir}", "--resume"]) == 0
    assert_same_records(train_losses(run_dir), train_losses(reference))
    assert [step for step, _ in train_losses(run_dir)] == list(range(1, 7))
    assert_same_weights(adapter(run_dir), adapter(reference))
    # The counts go on from the checkpoint: the resumed run's report is the uninterrupted run's.
    got, want = (json.loads((d / "data_report.json").read_text()) for d in (run_dir, reference))
    assert got == want
    passes = want[0]["rows"] // 12
    assert passes >= 2 and want[0]["dropped"]["invalid_json"] >= passes  # each bad row, once per pass read


def test_a_checkpoint_from_before_streaming_still_loads(tmp_path):
    state = {k: v for k, v in ckpt.TrainState(step=3).__dict__.items() if k != "data_state"}
    assert ckpt.TrainState(**state).data_state == {}


# --------------------------------------------------------------------------------------------- memory
PEAK_RSS = r"""
import sys
from tuneforge.cli import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK_KB", int(line.split()[1]))
sys.exit(code)
"""
ONE_GB = 1 << 30


def peak_rss_kb(config: Path, out: Path) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "train", str(config), f"train.output_dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, describe(done)
    return int(done.stdout.split("PEAK_KB")[-1].split()[0])


def test_streaming_a_gigabyte_file_costs_no_more_memory_than_a_small_one(tiny_model_dir, tmp_path):
    lines = "".join(json.dumps(row) + "\n" for row in QA_ROWS).encode()
    small = tmp_path / "small.jsonl"
    small.write_bytes(lines)
    big = tmp_path / "big.jsonl"
    chunk = lines * (8 * (1 << 20) // len(lines))  # ~8 MB per write
    try:
        with big.open("wb") as handle:
            written = 0
            while written < ONE_GB:
                handle.write(chunk)
                written += len(chunk)
        peaks = {}
        for name, path in (("small", small), ("big", big)):
            config = tmp_path / f"{name}.yaml"
            config.write_text(yaml.safe_dump({
                "model": {"name_or_path": str(tiny_model_dir)},
                "data": {"train": str(path), "max_length": 128, "streaming": True},
                "lora": {"r": 4, "alpha": 8},
                "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "mixed_precision": "no"}}))
            peaks[name] = peak_rss_kb(config, tmp_path / f"run-{name}")
        print(f"peak RSS: small file {peaks['small'] / 1024:.0f} MB, 1 GB file {peaks['big'] / 1024:.0f} MB")
        assert peaks["big"] - peaks["small"] <= 300 * 1024, peaks
    finally:
        big.unlink(missing_ok=True)
